//! Readiness and stop notifications for a service manager: systemd's `Type=notify`
//! protocol (`READY=1`, `STOPPING=1`, `STATUS=…` datagrams to `$NOTIFY_SOCKET`),
//! through the `sd-notify` crate. Without `NOTIFY_SOCKET` every call does nothing.

use sd_notify::NotifyState;

/// The daemon serves: every store is attached, every listener is bound.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The daemon has begun to stop.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A free-form status line (`systemctl status` shows the last one).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A manager that cannot be told is no reason to stop serving: logged, not returned.
fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {error}");
    }
}
