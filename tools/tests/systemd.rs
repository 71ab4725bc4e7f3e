//! Running under systemd: the daemon speaks the `Type=notify` protocol: READY=1 only
//! once it serves, STOPPING=1 and a clean exit 0 on SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A `NOTIFY_SOCKET` of our own: the datagrams a daemon sends to its service manager.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    received: Vec<String>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> NotifySocket {
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        NotifySocket {
            socket,
            path,
            received: Vec::new(),
        }
    }

    /// Receives until a datagram has a line `line`; returns that datagram. Bounded.
    fn wait_for(&mut self, line: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 4096];
        loop {
            if let Some(found) = self
                .received
                .iter()
                .find(|message| message.lines().any(|l| l == line))
            {
                return found.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {line} within {timeout:?}; received {:?}",
                self.received
            );
            match self.socket.recv(&mut buffer) {
                Ok(length) => self
                    .received
                    .push(String::from_utf8_lossy(&buffer[..length]).into_owned()),
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(error) => panic!("notify socket: {error}"),
            }
        }
    }
}

/// Starts `name` of `cluster` with `NOTIFY_SOCKET` set, without waiting for anything.
fn start_notifying(cluster: &mut Cluster, name: &str, socket: &Path) {
    let node = cluster.nodes.get_mut(name).expect("node");
    let log = std::fs::File::create(&node.log).expect("log file");
    let program =
        tools::launch::DaemonProgram::binary(&replicad_bin()).with_env("NOTIFY_SOCKET", socket);
    node.process = Some(
        tools::launch::NodeProcess::spawn(&program, &cluster.config, name, log, &[])
            .expect("spawn replicad"),
    );
}

#[test]
fn ready_is_notified_once_every_listener_serves_and_stopping_on_sigterm() {
    // Two nodes in the config, so alpha binds a replication listener too; beta never
    // runs.
    let mut cluster = Cluster::new("notify", &["alpha", "beta"], ClusterOptions::default());
    cluster.create_md_all();
    let mut notify = NotifySocket::bind(cluster.dir.join("notify.sock"));
    start_notifying(&mut cluster, "alpha", &notify.path);

    let ready = notify.wait_for("READY=1", TIMEOUT);
    // At that moment every listener answers, without any retry.
    let node = cluster.node("alpha");
    let status = replicad::control::Client::connect(&node.control, Duration::from_secs(5))
        .and_then(|mut client| client.status(Some(RESOURCE)))
        .unwrap_or_else(|e| panic!("control socket not answering at READY=1: {e}"));
    assert_eq!(status[0].name, RESOURCE, "{status:?}");
    // The NBD server accepts and greets (its task runs, not just its socket).
    RawNbd::greeted(node.nbd_port);
    std::net::TcpStream::connect(("127.0.0.1", node.listen_port))
        .unwrap_or_else(|e| panic!("replication port not accepting at READY=1: {e}"));
    assert!(
        ready.lines().any(|line| line.starts_with("STATUS=")),
        "READY=1 without a STATUS line: {ready:?}"
    );
    // Before READY=1 it only said what it was doing.
    let before: Vec<&String> = notify
        .received
        .iter()
        .take_while(|message| !message.lines().any(|l| l == "READY=1"))
        .collect();
    assert!(
        before
            .iter()
            .all(|message| message.lines().all(|l| l.starts_with("STATUS="))),
        "{before:?}"
    );

    // SIGTERM: STOPPING=1, then a clean exit 0.
    let mut process = cluster
        .nodes
        .get_mut("alpha")
        .and_then(|node| node.process.take())
        .expect("alpha runs");
    let exit = process.stop();
    assert!(
        exit.is_some_and(|status| status.success()),
        "replicad did not exit 0 on SIGTERM ({exit:?}):\n{}",
        cluster.log_tail("alpha")
    );
    notify.wait_for("STOPPING=1", Duration::from_secs(5));
    cluster.wait_log("alpha", "stopped cleanly", Duration::from_secs(5));
}

#[test]
fn a_notify_socket_nobody_listens_on_is_logged_and_the_daemon_serves() {
    let mut cluster = Cluster::new("notify-nowhere", &["alpha"], ClusterOptions::default());
    cluster.create_md_all();
    let nowhere = cluster.dir.join("nobody-listens.sock");
    start_notifying(&mut cluster, "alpha", &nowhere);
    cluster.wait_log("alpha", "cannot notify the service manager", TIMEOUT);
    cluster.wait_status("alpha", "answering", TIMEOUT, |s| s.name == RESOURCE);
    cluster.stop("alpha");
}
