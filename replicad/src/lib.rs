//! The replicad daemon: configuration, the NBD front door, the replication link, the
//! control socket. The binary (`src/main.rs`) only parses arguments and calls
//! [`daemon::run`].
//!
//! **Architecture Invariant:** every decision about data (handshake outcome, role
//! rules, ack rules, journal, recovery) lives in the `engine` crate; this crate moves
//! bytes between sockets and the engine and keeps runtime state.

pub mod config;
pub mod control;
pub mod daemon;
pub mod metrics;
pub mod nbd;
pub mod notify;
pub mod peer;
mod read_into;
pub mod resource;
pub mod snapshots;

/// A listener [`accept_until`] drives.
pub(crate) trait Accept {
    type Stream;
    fn accept_one(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>>;
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Accepts connections on `listener` until `shutdown` resolves, each served by the
/// task `serve` makes of it. A failed accept (say, out of file descriptors) is logged
/// as `what` and retried after a short pause.
pub(crate) async fn accept_until<L: Accept, F>(
    listener: &L,
    shutdown: impl std::future::Future<Output = ()>,
    what: &str,
    mut serve: impl FnMut(L::Stream) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept_one() => match accepted {
                Ok(stream) => {
                    tokio::spawn(serve(stream));
                }
                Err(error) => {
                    tracing::warn!("{what} accept failed: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Current time as RFC 3339 (UTC, seconds), for event lines.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (hour, minute, second) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let (year, month, day) = civil_date(secs / 86400);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// The (year, month, day) of a day number since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
pub fn civil_date(days: u64) -> (i64, i64, i64) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::civil_date;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(59), (1970, 3, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(19_782), (2024, 2, 29));
        assert_eq!(civil_date(20_818), (2026, 12, 31));
    }
}
