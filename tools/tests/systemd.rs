//! Running under systemd: the unit file passes `systemd-analyze verify` and keeps what
//! the daemon needs (block devices, raw sockets), `tools/install.sh` installs a working
//! set (binaries, unit, man pages, completions), and the daemon speaks the
//! `Type=notify` protocol: READY=1 only once it serves, STOPPING=1 and a clean exit 0
//! on SIGTERM.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const UNIT: &str = include_str!("../systemd/replicad.service");
const EXEC_START: &str = "/usr/local/bin/replicad --config /etc/replicad/replicad.toml";

/// The `Key=value` lines of a unit (the last one wins, as in systemd), by key.
fn unit_keys(unit: &str) -> BTreeMap<String, String> {
    unit.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.starts_with('['))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect()
}

/// `systemd-analyze verify UNIT` with the man pages of `man_dir` (a MANPATH entry
/// holding `man1/`) for its Documentation= links: must pass without a word.
fn assert_verifies(unit: &Path, man_dir: &Path) {
    require_tool("systemd-analyze", "systemd");
    let output = run_with_timeout(
        Command::new("systemd-analyze")
            .env("MANPATH", man_dir)
            .arg("verify")
            .arg(unit),
        TIMEOUT,
    );
    assert!(
        output.status.success() && output.stderr.is_empty() && output.stdout.is_empty(),
        "systemd-analyze verify {} ({}):\n{}{}",
        unit.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_unit_is_type_notify_restarts_on_failure_and_leaves_devices_alone() {
    let keys = unit_keys(UNIT);
    let key = |name: &str| keys.get(name).map(String::as_str);
    assert_eq!(key("Type"), Some("notify"));
    assert_eq!(key("ExecStart"), Some(EXEC_START));
    assert_eq!(key("Restart"), Some("on-failure"));
    assert_eq!(key("KillSignal"), Some("SIGTERM"));
    assert_eq!(key("WantedBy"), Some("multi-user.target"));
    let seconds = |name: &str| -> u64 {
        let value = key(name).unwrap_or_else(|| panic!("no {name}"));
        let (number, scale) = match value.strip_suffix("min") {
            Some(minutes) => (minutes, 60),
            None => (value.trim_end_matches('s'), 1),
        };
        number
            .parse::<u64>()
            .expect("a number of seconds or minutes")
            * scale
    };
    assert!((1..=60).contains(&seconds("RestartSec")), "RestartSec");
    // The daemon's own bounds on a stop: 40 s for NBD requests in flight, 5 s each for
    // replication and the control socket, then closing the stores.
    assert!(
        seconds("TimeoutStopSec") >= 90,
        "TimeoutStopSec too short for a clean close"
    );
    // Nothing that would close block devices or raw sockets to the daemon or its hooks.
    for forbidden in [
        "PrivateDevices",
        "DevicePolicy",
        "DeviceAllow",
        "ProtectClock",
        "PrivateNetwork",
        "PrivateTmp",
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "User",
        "DynamicUser",
    ] {
        assert!(key(forbidden).is_none(), "{forbidden}= in the unit");
    }
    if let Some(families) = key("RestrictAddressFamilies") {
        for family in ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"] {
            assert!(
                families.split_whitespace().any(|f| f == family),
                "{family} missing"
            );
        }
    }

    // systemd-analyze verify needs the ExecStart binary and the Documentation= pages
    // to exist: a copy of the unit runs the freshly built daemon, and MANPATH holds
    // the pages `replctl man` writes.
    let dir = temp_dir("systemd-verify");
    let unit = dir.join("replicad.service");
    assert!(UNIT.contains(&format!("ExecStart={EXEC_START}\n")));
    let exec_start = EXEC_START.replace("/usr/local/bin/replicad", REPLICAD);
    std::fs::write(&unit, UNIT.replace(EXEC_START, &exec_start)).expect("write unit");
    let man = dir.join("man");
    run_ok(
        Command::new(REPLCTL)
            .arg("man")
            .arg("--out-dir")
            .arg(man.join("man1")),
        TIMEOUT,
    );
    assert_verifies(&unit, &man);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn install_sh_installs_binaries_unit_man_pages_and_completions() {
    require_tool("bash", "bash");
    let dir = temp_dir("systemd-install");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("install.sh");
    let built = Path::new(REPLICAD)
        .parent()
        .expect("the binaries' directory");

    // --dry-run builds nothing, writes nothing, and says what it would do.
    let planned = dir.join("planned");
    let plan = run_ok(
        Command::new("bash")
            .arg(&script)
            .arg("--dry-run")
            .arg("--prefix")
            .arg(&planned),
        TIMEOUT,
    );
    assert!(!planned.exists(), "--dry-run created {}", planned.display());
    for step in [
        "+ cargo build --release --locked",
        "/bin/replicad",
        "/lib/systemd/system/replicad.service",
        " man --out-dir ",
        " completions bash --program replctl > ",
        "(dry run: nothing was changed)",
    ] {
        assert!(
            plan.contains(step),
            "--dry-run does not show {step:?}:\n{plan}"
        );
    }

    // A real install into a prefix, from the binaries this test run built.
    let prefix = dir.join("prefix");
    run_ok(
        Command::new("bash")
            .arg(&script)
            .arg("--prefix")
            .arg(&prefix)
            .arg("--from")
            .arg(built),
        TIMEOUT,
    );
    for program in ["replicad", "replctl", "replcheck"] {
        let version = run_ok(
            Command::new(prefix.join("bin").join(program)).arg("--version"),
            TIMEOUT,
        );
        assert!(
            version.starts_with(program),
            "{program} --version: {version}"
        );
        let bash = prefix
            .join("share/bash-completion/completions")
            .join(program);
        run_ok(Command::new("bash").arg("-n").arg(&bash), TIMEOUT);
        for file in [
            prefix
                .join("share/zsh/site-functions")
                .join(format!("_{program}")),
            prefix
                .join("share/fish/vendor_completions.d")
                .join(format!("{program}.fish")),
            prefix.join("share/man/man1").join(format!("{program}.1")),
        ] {
            assert!(file.is_file(), "{} not installed", file.display());
        }
    }
    // The installed unit runs the installed daemon, and verifies with the installed
    // man pages.
    let unit = prefix.join("lib/systemd/system/replicad.service");
    let text = std::fs::read_to_string(&unit).expect("installed unit");
    let expected = format!(
        "ExecStart={} --config /etc/replicad/replicad.toml",
        prefix.join("bin/replicad").display()
    );
    assert!(text.contains(&expected), "{text}");
    assert_verifies(&unit, &prefix.join("share/man"));
    require_tool("man", "man-db");
    let page = run_ok(
        Command::new("man")
            .arg("-M")
            .arg(prefix.join("share/man"))
            .args(["-P", "cat", "replctl-status"]),
        TIMEOUT,
    );
    assert!(page.contains("replctl status"), "{page}");
    let _ = std::fs::remove_dir_all(&dir);
}

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
