//! End-to-end test harness: real `replicad` daemons on loopback, driven by `replctl`
//! and the control socket, with real clients (qemu-io, nbdcopy, fio, nbdfuse + ext4).
//!
//! Every wait is bounded; every spawned process and every loop device or FUSE mount
//! is cleaned up on drop, even when a test fails. Set `REPLICAD_TEST_KEEP=1` to keep
//! a failed test's directory (configs, images, daemon logs).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use replicad::control::{Client, Request, ResourceStatus};

pub const REPLCTL: &str = env!("CARGO_BIN_EXE_replctl");
pub const REPLCHECK: &str = env!("CARGO_BIN_EXE_replcheck");

pub const REPLICAD: &str = env!("CARGO_BIN_EXE_replicad");

/// The daemon binary.
pub fn replicad_bin() -> PathBuf {
    PathBuf::from(REPLICAD)
}

/// A fresh, empty directory for one test (`NAME-PID` under the target's temp dir).
pub fn temp_dir(name: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Fails the test with a clear message if `tool` is not installed.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new(tool).is_file();
    assert!(
        found,
        "{tool} is not installed (Debian package {package}); .ci/run installs it"
    );
}

/// Whether this process runs as root (loop devices, mounts).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A fresh, unused TCP port on 127.0.0.1, below the kernel's ephemeral range (so
/// no outgoing connection or `bind(0)` can take it between now and its use), in a
/// slice of the range chosen by process id (test binaries run side by side).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 60) as u16 * 200;
    for _ in 0..200 {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 200;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:{base}..{}", base + 200)
}

/// Polls `check` every 50 ms until it returns `Some`, failing after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command with a timeout; returns its output (never hangs the suite).
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> Output {
    let program = format!("{command:?}");
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let output = child.wait_with_output().expect("collect output");
                panic!(
                    "{program} timed out after {timeout:?}; stderr: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(error) => panic!("waiting for {program}: {error}"),
        }
    }
    child.wait_with_output().expect("collect output")
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(command: &mut Command, timeout: Duration) -> String {
    let description = format!("{command:?}");
    let output = run_with_timeout(command, timeout);
    assert!(
        output.status.success(),
        "{description} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Options of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Image size per node (the exported size is smaller: internal metadata).
    pub image_bytes: u64,
    pub mode: &'static str,
    pub journal: &'static str,
    pub io: &'static str,
    pub timeout: &'static str,
    pub ping_interval: &'static str,
    /// Extra lines for the `[resource.r0]` section.
    pub extra: String,
    /// Serve NBD on a unix socket instead of TCP.
    pub unix_nbd: bool,
    /// Route replication through a [`FaultProxy`] in front of the second node.
    pub proxy: bool,
    /// Serve Prometheus metrics on each node's `metrics_port`.
    pub metrics: bool,
    /// Give each node a snapshot area (`snapshot-dir`, `NAME.snap` in the test dir).
    pub snapshots: bool,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            image_bytes: 256 << 20,
            mode: "sync",
            journal: "16M",
            io: "direct",
            timeout: "2s",
            ping_interval: "200ms",
            extra: String::new(),
            unix_nbd: false,
            proxy: false,
            metrics: false,
            snapshots: false,
        }
    }
}

/// One node of a cluster.
pub struct Node {
    pub name: String,
    pub image: PathBuf,
    /// Where the peer dials this node (the proxy's port when proxied).
    pub replication_port: u16,
    /// Where this node listens for replication.
    pub listen_port: u16,
    pub nbd_port: u16,
    /// Where the daemon serves `/metrics` when [`ClusterOptions::metrics`] is set.
    pub metrics_port: u16,
    pub nbd_socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    pub process: Option<tools::launch::NodeProcess>,
    starts: u32,
    /// The IP address the node listens on and is dialed at (`127.0.0.1` unless the
    /// node runs in a network namespace of a [`NetnsPair`]).
    pub ip: String,
    /// The network namespace the daemon runs in (`ip netns exec`), if any.
    pub netns: Option<String>,
}

/// One resource (`r0`) on one or two nodes, in its own temp directory.
pub struct Cluster {
    /// The proxy in front of the second node's replication listener, if asked for.
    pub proxy: Option<tools::faultproxy::FaultProxy>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub options: ClusterOptions,
    pub nodes: BTreeMap<String, Node>,
    keep: bool,
}

pub const RESOURCE: &str = "r0";

impl Cluster {
    /// Writes images and a config for `nodes` (not started, no metadata yet).
    pub fn new(test: &str, nodes: &[&str], options: ClusterOptions) -> Cluster {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("e2e-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let mut cluster = Cluster {
            proxy: None,
            config: dir.join("replicad.toml"),
            dir,
            options,
            nodes: BTreeMap::new(),
            keep: std::env::var_os("REPLICAD_TEST_KEEP").is_some(),
        };
        for name in nodes {
            let image = cluster.dir.join(format!("{name}.img"));
            engine::volume::create_image_file(&image, cluster.options.image_bytes).expect("image");
            let port = free_port();
            let node = Node {
                name: name.to_string(),
                image,
                replication_port: port,
                listen_port: port,
                nbd_port: free_port(),
                metrics_port: free_port(),
                nbd_socket: cluster.dir.join(format!("{name}.nbd")),
                control: cluster.dir.join(format!("{name}.ctl")),
                log: cluster.dir.join(format!("{name}.log")),
                process: None,
                starts: 0,
                ip: "127.0.0.1".into(),
                netns: None,
            };
            cluster.nodes.insert(name.to_string(), node);
        }
        if cluster.options.proxy {
            let second = cluster
                .nodes
                .values_mut()
                .nth(1)
                .expect("a proxy needs two nodes");
            let real = format!("127.0.0.1:{}", second.listen_port)
                .parse()
                .expect("address");
            // Port 0: the kernel picks one that is free at bind time (a port probed
            // free earlier can be taken by someone else before the proxy binds it).
            let listen = "127.0.0.1:0".parse().expect("address");
            let proxy = tools::faultproxy::FaultProxy::start(listen, real).expect("start proxy");
            second.replication_port = proxy.listen.port();
            cluster.proxy = Some(proxy);
        }
        cluster.write_config();
        cluster
    }

    /// (Re)writes the config file from the current options.
    pub fn write_config(&self) {
        let o = &self.options;
        let mut text = format!(
            "[resource.{RESOURCE}]\nmode = \"{}\"\njournal-size = \"{}\"\nio = \"{}\"\ntimeout = \"{}\"\nping-interval = \"{}\"\n{}\n",
            o.mode, o.journal, o.io, o.timeout, o.ping_interval, o.extra
        );
        for node in self.nodes.values() {
            let nbd = if o.unix_nbd {
                format!("unix:{}", node.nbd_socket.display())
            } else {
                format!("127.0.0.1:{}", node.nbd_port)
            };
            text.push_str(&format!(
                "[resource.{RESOURCE}.nodes.{}]\naddress = \"{}:{}\"\nlisten = \"{}:{}\"\ndisk = \"{}\"\nnbd = \"{nbd}\"\ncontrol = \"{}\"\n",
                node.name,
                node.ip,
                node.replication_port,
                node.ip,
                node.listen_port,
                node.image.display(),
                node.control.display()
            ));
            if o.metrics {
                text.push_str(&format!("metrics = \"127.0.0.1:{}\"\n", node.metrics_port));
            }
            if o.snapshots {
                text.push_str(&format!(
                    "snapshot-dir = \"{}\"\n",
                    self.dir.join(format!("{}.snap", node.name)).display()
                ));
            }
        }
        std::fs::write(&self.config, text).expect("write config");
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .get(name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// `replctl --config … --node NAME ARGS…` with a timeout.
    pub fn replctl(&self, node: &str, args: &[&str]) -> Output {
        let mut command = Command::new(REPLCTL);
        command
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(node)
            .args(args);
        run_with_timeout(&mut command, Duration::from_secs(120))
    }

    /// `replctl` that must succeed; returns stdout.
    pub fn replctl_ok(&self, node: &str, args: &[&str]) -> String {
        let output = self.replctl(node, args);
        assert!(
            output.status.success(),
            "replctl {args:?} on {node} failed: {}{}\n{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout),
            self.log_tail(node)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `create-md` on every node (the stores are zero: no checksum scan).
    pub fn create_md_all(&self) {
        for name in self.nodes.keys() {
            self.replctl_ok(name, &["create-md", RESOURCE, "--zeroed"]);
        }
    }

    /// Starts a node's daemon and waits until its control socket answers.
    pub fn start(&mut self, name: &str) {
        let config = self.config.clone();
        let node = self
            .nodes
            .get_mut(name)
            .unwrap_or_else(|| panic!("no node {name}"));
        assert!(node.process.is_none(), "{name} already running");
        node.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("log file");
        // alpha runs two runtime threads (tasks truly concurrent, as on larger
        // machines), every other node the default (one on a two-CPU machine), so a
        // pair test drives both kinds of daemon.
        let mut extra = vec!["--log", "info"];
        if name == "alpha" {
            extra.extend(["--threads", "2"]);
        }
        let mut program = tools::launch::DaemonProgram::binary(&replicad_bin());
        if let Some(netns) = &node.netns {
            // `ip netns exec` enters the namespace and execs the daemon (no fork): the
            // child's pid is the daemon's.
            program = tools::launch::DaemonProgram {
                program: PathBuf::from("ip"),
                prefix: vec![
                    "netns".into(),
                    "exec".into(),
                    netns.clone(),
                    replicad_bin().display().to_string(),
                ],
                env: Vec::new(),
            };
        }
        node.process = Some(
            tools::launch::NodeProcess::spawn(&program, &config, name, log, &extra)
                .expect("spawn replicad"),
        );
        let control = node.control.clone();
        let log_path = node.log.clone();
        let mut attempts = 0;
        wait_until(
            &format!("{name}'s control socket"),
            Duration::from_secs(30),
            || {
                attempts += 1;
                if let Some(child) = self.nodes.get_mut(name).and_then(|n| n.process.as_mut()) {
                    if let Some(status) = child.exited() {
                        panic!(
                            "replicad {name} exited during startup ({status}):\n{}",
                            std::fs::read_to_string(&log_path).unwrap_or_default()
                        );
                    }
                }
                Client::connect(&control, Duration::from_secs(5))
                    .ok()
                    .and_then(|mut c| c.status(None).ok())
                    .map(|_| ())
            },
        );
        let _ = attempts;
    }

    pub fn start_all(&mut self) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            self.start(&name);
        }
    }

    /// SIGKILL, no cleanup at all (a crash).
    pub fn kill9(&mut self, name: &str) {
        let node = self
            .nodes
            .get_mut(name)
            .unwrap_or_else(|| panic!("no node {name}"));
        if let Some(mut child) = node.process.take() {
            child.kill();
        }
    }

    /// SIGTERM and wait for a clean exit (bounded).
    pub fn stop(&mut self, name: &str) {
        let node = self
            .nodes
            .get_mut(name)
            .unwrap_or_else(|| panic!("no node {name}"));
        if let Some(mut child) = node.process.take() {
            let status = child.stop();
            assert!(
                status.is_some_and(|status| status.success()),
                "replicad {name} did not stop cleanly on SIGTERM ({status:?}):\n{}",
                self.log_tail(name)
            );
        }
    }

    pub fn client(&self, name: &str) -> Client {
        Client::connect(&self.node(name).control, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("control socket of {name}: {e}"))
    }

    pub fn status(&self, name: &str) -> ResourceStatus {
        self.client(name)
            .status(Some(RESOURCE))
            .unwrap_or_else(|e| panic!("status of {name}: {e}"))
            .remove(0)
    }

    /// Sends a control request; returns the daemon's answer (Ok) or refusal (Err).
    pub fn request(&self, name: &str, request: Request) -> Result<serde_json::Value, String> {
        self.client(name).call(&request).map_err(|e| e.to_string())
    }

    /// Waits until `name` has taken more than `since` writes: a workload started
    /// in the background is really writing (so a kill that follows lands under load).
    pub fn wait_writes_beyond(&self, name: &str, since: u64, timeout: Duration) {
        self.wait_status(name, "writes to arrive", timeout, |s| s.io.writes > since);
    }

    /// Waits until `name`'s status satisfies `check`.
    pub fn wait_status(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&ResourceStatus) -> bool,
    ) -> ResourceStatus {
        let mut last = None;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(mut client) =
                Client::connect(&self.node(name).control, Duration::from_secs(10))
            {
                if let Ok(mut statuses) = client.status(Some(RESOURCE)) {
                    let status = statuses.remove(0);
                    if check(&status) {
                        return status;
                    }
                    last = Some(status);
                }
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {name} to be {what}; last status: {last:#?}\n{}", self.log_tail(name));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until both nodes of a two-node cluster are Connected, Established and UpToDate.
    pub fn wait_in_sync(&self, timeout: Duration) {
        for name in self.nodes.keys() {
            self.wait_status(name, "in sync", timeout, |s| {
                s.disk == "UpToDate"
                    && s.peer.as_ref().is_none_or(|p| {
                        p.connection == "Connected"
                            && p.replication == "Established"
                            && p.peer_disk.as_deref() == Some("UpToDate")
                    })
            });
        }
    }

    /// The NBD URI of `name`'s export.
    pub fn uri(&self, name: &str) -> String {
        let node = self.node(name);
        if self.options.unix_nbd {
            format!(
                "nbd+unix:///{RESOURCE}?socket={}",
                node.nbd_socket.display()
            )
        } else {
            format!("nbd://127.0.0.1:{}/{RESOURCE}", node.nbd_port)
        }
    }

    /// The last lines of a node's log (for failure messages).
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(&self.node(name).log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- last lines of {name}'s log ---\n{}",
            lines[lines.len().saturating_sub(25)..].join("\n")
        )
    }

    /// Bytes of the exported data area of `name`'s image (its first `size_bytes`).
    pub fn data_area(&self, name: &str, size_bytes: u64) -> Vec<u8> {
        let mut data = std::fs::read(&self.node(name).image).expect("read image");
        data.truncate(size_bytes as usize);
        data
    }

    /// Sets up a primary/secondary pair: create-md, start, promote `primary` with force,
    /// wait for the initial sync.
    pub fn pair(test: &str, options: ClusterOptions) -> Cluster {
        let mut cluster = Cluster::new(test, &["alpha", "beta"], options);
        cluster.create_md_all();
        cluster.start_all();
        cluster.wait_status("alpha", "connected", Duration::from_secs(30), |s| {
            s.peer.as_ref().is_some_and(|p| p.connection == "Connected")
        });
        cluster.replctl_ok("alpha", &["promote", RESOURCE, "--force"]);
        cluster.wait_in_sync(Duration::from_secs(120));
        cluster
    }

    /// Writes the config, creates zeroed-store metadata, starts both nodes and makes
    /// alpha Primary of an in-sync pair without an initial sync (the stores are
    /// zeroed: `new-current-uuid --clear-bitmap`).
    pub fn start_fresh_pair_in_sync(&mut self) {
        self.write_config();
        self.create_md_all();
        self.start_all();
        self.wait_peer_connection("alpha", "Connected", Duration::from_secs(30));
        self.replctl_ok("alpha", &["new-current-uuid", RESOURCE, "--clear-bitmap"]);
        self.replctl_ok("alpha", &["promote", RESOURCE]);
        self.wait_in_sync(Duration::from_secs(60));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.process.take() {
                child.kill();
            }
        }
        if !self.keep || !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("kept test directory {}", self.dir.display());
        }
    }
}

/// Runs `replcheck write` against `uri`; returns the log path.
pub fn checker_write(dir: &Path, uri: &str, args: &[&str]) -> (PathBuf, Output) {
    let log = dir.join(format!("check-{}.log", free_port()));
    let mut command = Command::new(REPLCHECK);
    command
        .arg("write")
        .arg("--uri")
        .arg(uri)
        .arg("--log")
        .arg(&log)
        .args(args);
    let output = run_with_timeout(&mut command, Duration::from_secs(300));
    (log, output)
}

/// Starts `replcheck write` against `node`'s export at QD32 for `seconds` over
/// `blocks` (e.g. `"0..4096"`) on a thread; join it for the log path and output.
pub fn checker_write_in_background(
    cluster: &Cluster,
    node: &str,
    seconds: u32,
    blocks: &str,
) -> std::thread::JoinHandle<(PathBuf, Output)> {
    let dir = cluster.dir.clone();
    let uri = cluster.uri(node);
    let seconds = seconds.to_string();
    let blocks = blocks.to_string();
    std::thread::spawn(move || {
        checker_write(
            &dir,
            &uri,
            &["--qd", "32", "--seconds", &seconds, "--blocks", &blocks],
        )
    })
}

/// Runs `replcheck verify`; returns (passed, report text).
pub fn checker_verify(uri: &str, log: &Path, mode: &str) -> (bool, String) {
    let mut command = Command::new(REPLCHECK);
    command
        .arg("verify")
        .arg("--uri")
        .arg(uri)
        .arg("--log")
        .arg(log)
        .arg("--mode")
        .arg(mode);
    let output = run_with_timeout(&mut command, Duration::from_secs(300));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A loop device on a file, detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> LoopDevice {
        let output = run_ok(
            Command::new("losetup")
                .arg("--find")
                .arg("--show")
                .arg(file),
            Duration::from_secs(30),
        );
        LoopDevice {
            path: PathBuf::from(output.trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// `nbdfuse DIR URI`: the export as the file `DIR/nbd`, unmounted on drop.
pub struct NbdFuse {
    pub dir: PathBuf,
    process: Child,
}

impl NbdFuse {
    pub fn mount(dir: &Path, uri: &str) -> NbdFuse {
        require_tool("nbdfuse", "libnbd-bin");
        std::fs::create_dir_all(dir).expect("fuse dir");
        let process = Command::new("nbdfuse")
            .arg(dir)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdfuse");
        let file = dir.join("nbd");
        wait_until(
            "nbdfuse to expose the export",
            Duration::from_secs(30),
            || {
                std::fs::metadata(&file)
                    .ok()
                    .filter(|m| m.len() > 0)
                    .map(|_| ())
            },
        );
        NbdFuse {
            dir: dir.to_path_buf(),
            process,
        }
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    /// Kills nbdfuse with SIGKILL and unmounts lazily: whatever the kernel still held
    /// for the file is lost (a power cut of the store behind it).
    pub fn cut(mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.process.try_wait() {
            return;
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.process.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A mounted file system, unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    pub fn new(device: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).expect("mount dir");
        run_ok(
            Command::new("mount").arg(device).arg(dir),
            Duration::from_secs(60),
        );
        Mount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

// ---------------------------------------------------------------------------------------
// Single-node clusters and a raw NBD client (used by e2e_nbd.rs and e2e_bad_input.rs)
// ---------------------------------------------------------------------------------------

/// How a daemon goes down before a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// SIGTERM and a clean exit.
    Clean,
    /// SIGKILL: a crash.
    Kill9,
}

/// A one-node resource on node `alpha`: metadata written, daemon started, promoted.
pub fn single_node(test: &str, options: ClusterOptions) -> Cluster {
    let mut cluster = Cluster::new(test, &["alpha"], options);
    cluster.create_md_all();
    cluster.start("alpha");
    cluster.replctl_ok("alpha", &["promote", RESOURCE]);
    cluster
}

impl Cluster {
    /// Whether `name`'s daemon process is still running.
    pub fn is_running(&mut self, name: &str) -> bool {
        let node = self
            .nodes
            .get_mut(name)
            .unwrap_or_else(|| panic!("no node {name}"));
        node.process
            .as_mut()
            .is_some_and(|child| child.exited().is_none())
    }

    /// Stops `name` as `how` says, starts it again and promotes it: a restarted node
    /// comes up Secondary. Returns the status right after the restart (before the
    /// promotion), whose `recovery` says what the engine did when it opened the store.
    pub fn restart_primary(&mut self, name: &str, how: Restart) -> ResourceStatus {
        match how {
            Restart::Clean => self.stop(name),
            Restart::Kill9 => self.kill9(name),
        }
        self.start(name);
        let status = self.status(name);
        assert_eq!(
            status.role, "Secondary",
            "a restarted node must come up Secondary"
        );
        self.replctl_ok(name, &["promote", RESOURCE]);
        status
    }

    /// The log of `name` must not show a panic.
    pub fn assert_no_panic_logged(&self, name: &str) {
        let text = std::fs::read_to_string(&self.node(name).log).unwrap_or_default();
        assert!(
            !text.contains("panicked"),
            "{name}'s log shows a panic:\n{}",
            self.log_tail(name)
        );
    }
}

/// Bytes of a deterministic pseudo-random pattern.
pub fn pattern_bytes(seed: u64, length: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; length];
    engine::rng::SplitMix64::new(seed).fill(&mut bytes);
    bytes
}

/// A blocking NBD client over TCP that speaks the protocol by hand, so that tests can
/// send what no real client would. Every read and write has a timeout, so nothing hangs.
pub struct RawNbd {
    pub stream: std::net::TcpStream,
    next_cookie: u64,
    /// Export size and transmission flags, once `NBD_OPT_GO` succeeded.
    pub size_bytes: u64,
    pub transmission_flags: u16,
}

/// How long one raw read or write may block.
pub const RAW_IO_TIMEOUT: Duration = Duration::from_secs(20);

impl RawNbd {
    /// Connects without reading anything.
    pub fn connect(port: u16) -> RawNbd {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to NBD port {port}: {e}"));
        stream.set_read_timeout(Some(RAW_IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(RAW_IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        RawNbd {
            stream,
            next_cookie: 1,
            size_bytes: 0,
            transmission_flags: 0,
        }
    }

    /// Connects and reads the server greeting, checking it.
    pub fn greeted(port: u16) -> RawNbd {
        use replicad::nbd::proto;
        let mut client = RawNbd::connect(port);
        let raw = client.read_exactly(proto::GREETING_BYTES);
        let greeting = proto::Greeting::parse(&raw).expect("valid greeting");
        assert_ne!(greeting.handshake_flags & proto::FLAG_FIXED_NEWSTYLE, 0);
        client
    }

    /// A well-behaved client in the transmission phase of export `name`.
    pub fn open(port: u16, name: &str) -> RawNbd {
        use replicad::nbd::proto;
        let mut client = RawNbd::greeted(port);
        client.send(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes());
        client
            .go(name)
            .unwrap_or_else(|reply| panic!("NBD_OPT_GO {name:?} refused with {reply:#x}"));
        client
    }

    /// Sends `NBD_OPT_GO` and reads the replies: Ok once acknowledged, or the error
    /// reply type.
    pub fn go(&mut self, name: &str) -> Result<(), u32> {
        use replicad::nbd::proto::{self, Info, InfoRequest, OptionHeader, OptionReplyHeader};
        let mut data = Vec::new();
        InfoRequest {
            name,
            info_types: vec![proto::INFO_BLOCK_SIZE],
        }
        .encode(&mut data);
        let mut message = Vec::new();
        OptionHeader {
            option: proto::OPT_GO,
            length: data.len() as u32,
        }
        .encode(&mut message);
        message.extend_from_slice(&data);
        self.send(&message);
        loop {
            let raw = self.read_exactly(proto::OPTION_REPLY_HEADER_BYTES);
            let header = OptionReplyHeader::parse(&raw).expect("valid option reply");
            assert!(
                header.length <= 64 * 1024,
                "option reply too long: {header:?}"
            );
            let data = self.read_exactly(header.length as usize);
            if header.is_error() {
                return Err(header.reply_type);
            }
            match header.reply_type {
                proto::REP_ACK => return Ok(()),
                proto::REP_INFO => {
                    if let Ok(Info::Export {
                        size_bytes,
                        transmission_flags,
                    }) = Info::parse(&data)
                    {
                        self.size_bytes = size_bytes;
                        self.transmission_flags = transmission_flags;
                    }
                }
                other => panic!("unexpected option reply type {other:#x}"),
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.stream.write_all(bytes).expect("send to the server");
    }

    pub fn read_exactly(&mut self, length: usize) -> Vec<u8> {
        use std::io::Read;
        let mut bytes = vec![0u8; length];
        self.stream
            .read_exact(&mut bytes)
            .unwrap_or_else(|e| panic!("reading {length} bytes from the server: {e}"));
        bytes
    }

    /// Sends a request header (and `payload`, if any); returns its cookie.
    pub fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut message = Vec::with_capacity(28 + payload.len());
        replicad::nbd::proto::RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(&mut message);
        message.extend_from_slice(payload);
        self.send(&message);
        cookie
    }

    /// Reads one simple reply header for `cookie`; returns its NBD error (0: success).
    pub fn reply(&mut self, cookie: u64) -> u32 {
        use replicad::nbd::proto;
        let raw = self.read_exactly(proto::SIMPLE_REPLY_HEADER_BYTES);
        let reply = proto::SimpleReplyHeader::parse(&raw).expect("valid simple reply");
        assert_eq!(reply.cookie, cookie, "reply to another request");
        reply.error
    }

    /// A request without payload, answered without payload; returns the NBD error.
    pub fn call(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> u32 {
        let cookie = self.request(command, flags, offset, length, &[]);
        self.reply(cookie)
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> u32 {
        use replicad::nbd::proto;
        let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
        let cookie = self.request(proto::CMD_WRITE, flags, offset, data.len() as u32, data);
        self.reply(cookie)
    }

    pub fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        let cookie = self.request(replicad::nbd::proto::CMD_READ, 0, offset, length, &[]);
        match self.reply(cookie) {
            0 => Ok(self.read_exactly(length as usize)),
            error => Err(error),
        }
    }

    pub fn flush(&mut self) -> u32 {
        self.call(replicad::nbd::proto::CMD_FLUSH, 0, 0, 0)
    }

    /// Waits (bounded) until the server closes the connection; returns whatever it sent
    /// before closing.
    pub fn expect_closed(&mut self) -> Vec<u8> {
        use std::io::{ErrorKind, Read};
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            match self.stream.read(&mut buffer) {
                Ok(0) => return received,
                Ok(count) => {
                    received.extend_from_slice(&buffer[..count]);
                    assert!(received.len() < 1 << 20, "the server keeps sending");
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
                    ) =>
                {
                    return received
                }
                Err(error) => panic!(
                    "the server did not close the connection within {RAW_IO_TIMEOUT:?}: {error}"
                ),
            }
        }
    }
}

/// Detaches, when dropped, every loop device still backed by a file: the cleanup of a
/// `losetup` that attached a device but failed or timed out before its [`LoopDevice`]
/// guard existed.
pub struct LoopLeftovers(pub PathBuf);

impl Drop for LoopLeftovers {
    fn drop(&mut self) {
        let Ok(output) = Command::new("losetup").arg("-j").arg(&self.0).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if let Some(device) = line.split(':').next().filter(|d| d.starts_with("/dev/")) {
                let _ = Command::new("losetup").arg("-d").arg(device).status();
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Replication end-to-end helpers (e2e_replication.rs and friends): the CLI's JSON
// status, event recording, NBD content comparison, raw replication-port clients and
// the tear-down of a file system stack whose server died under it.
// ---------------------------------------------------------------------------------

/// Small images (64 MiB, 8 MiB journal): quick to set up and to compare.
pub fn small_options(proxy: bool) -> ClusterOptions {
    ClusterOptions {
        image_bytes: 64 << 20,
        journal: "8M",
        proxy,
        ..ClusterOptions::default()
    }
}

impl Cluster {
    /// [`Cluster::pair`] with [`small_options`].
    pub fn small_pair(test: &str, proxy: bool) -> Cluster {
        Cluster::pair(test, small_options(proxy))
    }

    /// Waits until `name` sees its peer's connection as `connection`.
    pub fn wait_peer_connection(
        &self,
        name: &str,
        connection: &str,
        timeout: Duration,
    ) -> ResourceStatus {
        self.wait_status(name, connection, timeout, |s| {
            s.peer.as_ref().is_some_and(|p| p.connection == connection)
        })
    }

    /// Waits until `name`'s log contains `needle` (log lines trail the events).
    pub fn wait_log(&self, name: &str, needle: &str, timeout: Duration) {
        wait_until(&format!("{name}'s log to say {needle:?}"), timeout, || {
            std::fs::read_to_string(&self.node(name).log)
                .ok()
                .filter(|log| log.contains(needle))
                .map(|_| ())
        });
    }

    /// `replctl verify r0 --json` on `name` finds no block that differs.
    pub fn assert_verify_clean(&self, name: &str) {
        let text = self.replctl_ok(name, &["verify", RESOURCE, "--json"]);
        let verify: serde_json::Value = serde_json::from_str(&text).expect("verify --json");
        assert_eq!(
            verify["out_of_sync_blocks"], 0,
            "verify on {name}: {verify}"
        );
    }

    /// `replctl status r0 --json` through the CLI, parsed (the operator's view).
    pub fn status_json(&self, name: &str) -> serde_json::Value {
        let text = self.replctl_ok(name, &["status", RESOURCE, "--json"]);
        let value: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("status --json of {name} is not JSON ({e}): {text}"));
        value
            .as_array()
            .and_then(|all| all.first())
            .cloned()
            .unwrap_or_else(|| panic!("status --json of {name} lists no resource: {text}"))
    }

    /// `replctl ARGS` that must be refused: exit status 1 and a one-line reason on
    /// stderr, which is returned.
    pub fn replctl_refused(&self, node: &str, args: &[&str]) -> String {
        let output = self.replctl(node, args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(
            output.status.code(),
            Some(1),
            "replctl {args:?} on {node} should be refused with exit 1; stdout: {} stderr: {stderr}",
            String::from_utf8_lossy(&output.stdout)
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "the refusal must be one line: {stderr:?}"
        );
        stderr
    }

    /// Waits until `name` no longer sees its peer as Connected; returns how long it took.
    pub fn wait_peer_lost(&self, name: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        self.wait_status(name, "aware the peer is gone", timeout, |s| {
            s.peer.as_ref().is_some_and(|p| p.connection != "Connected")
        });
        started.elapsed()
    }

    /// The whole exported content of `name`, read with `nbdcopy`.
    pub fn export_bytes(&self, name: &str) -> Vec<u8> {
        let copy = self.dir.join(format!("{name}-export-{}.raw", free_port()));
        let bytes = export_bytes(&self.uri(name), &copy);
        let _ = std::fs::remove_file(&copy);
        bytes
    }

    /// Both exports hold the same bytes (read over NBD while the daemons run).
    pub fn assert_exports_identical(&self, left: &str, right: &str) {
        let left_bytes = self.export_bytes(left);
        let right_bytes = self.export_bytes(right);
        assert_same_bytes(
            &left_bytes,
            &right_bytes,
            &format!("exports of {left} and {right}"),
        );
    }

    /// Stops every node cleanly (every record applied, checkpointed) and compares the
    /// first `size_bytes` of both image files: the replicas' data areas.
    pub fn stop_and_assert_data_areas_identical(&mut self, left: &str, right: &str) {
        let size_bytes = self.status(left).size_bytes;
        assert_eq!(size_bytes, self.status(right).size_bytes, "sizes differ");
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in &names {
            self.stop(name);
        }
        assert_same_bytes(
            &self.data_area(left, size_bytes),
            &self.data_area(right, size_bytes),
            &format!("data areas of {left} and {right}"),
        );
    }
}

/// Fails with the first differing 4 KiB block (and how many differ) unless equal.
pub fn assert_same_bytes(left: &[u8], right: &[u8], what: &str) {
    assert_eq!(left.len(), right.len(), "{what}: lengths differ");
    if left == right {
        return;
    }
    let differing: Vec<usize> = left
        .chunks(4096)
        .zip(right.chunks(4096))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(block, _)| block)
        .collect();
    panic!(
        "{what}: {} blocks of 4 KiB differ, first ones: {:?}",
        differing.len(),
        &differing[..differing.len().min(10)]
    );
}

/// The whole content of the export at `uri`, copied to `copy` with `nbdcopy` (libnbd).
pub fn export_bytes(uri: &str, copy: &Path) -> Vec<u8> {
    require_tool("nbdcopy", "libnbd-bin");
    std::fs::File::create(copy).expect("create the copy");
    run_ok(
        Command::new("nbdcopy").arg(uri).arg(copy),
        Duration::from_secs(120),
    );
    std::fs::read(copy).expect("read the copy")
}

/// `qemu-io -f raw [-r] -c COMMAND URI`; returns (success, stdout + stderr). qemu-io
/// reports a failed command on its output, so both are checked.
pub fn qemu_io(uri: &str, read_only: bool, command: &str) -> (bool, String) {
    require_tool("qemu-io", "qemu-utils");
    let mut qemu = Command::new("qemu-io");
    qemu.arg("-f").arg("raw");
    if read_only {
        qemu.arg("-r");
    }
    qemu.arg("-c").arg(command).arg(uri);
    let output = run_with_timeout(&mut qemu, Duration::from_secs(60));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let failed = text.contains("failed")
        || text.contains("Pattern verification")
        || text.contains("error")
        || text.contains("Error");
    (output.status.success() && !failed, text)
}

/// `qemu-io` that must succeed.
pub fn qemu_io_ok(uri: &str, read_only: bool, command: &str) {
    let (ok, text) = qemu_io(uri, read_only, command);
    assert!(ok, "qemu-io -c {command:?} {uri} failed:\n{text}");
}

/// The event stream (`replctl events`) of one node, recorded from the moment
/// [`EventLog::start`] returns (the daemon confirmed the subscription) until dropped.
pub struct EventLog {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl EventLog {
    pub fn start(cluster: &Cluster, name: &str) -> EventLog {
        use std::sync::atomic::Ordering;
        let mut client = Client::connect(&cluster.node(name).control, Duration::from_millis(200))
            .unwrap_or_else(|e| panic!("control socket of {name}: {e}"));
        client
            .subscribe()
            .unwrap_or_else(|e| panic!("subscribing to {name}'s events: {e}"));
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sink, stopped) = (lines.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match client.next_event() {
                    Ok(Some(line)) => sink.lock().unwrap_or_else(|p| p.into_inner()).push(line),
                    Ok(None) => return,
                    // The read timeout: look at the stop flag again.
                    Err(_) => continue,
                }
            }
        });
        EventLog {
            lines,
            stop,
            reader: Some(reader),
        }
    }

    pub fn text(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// Waits until an event line contains `needle`; returns that line.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            if let Some(line) = text.lines().find(|line| line.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no event containing {needle:?} within {timeout:?}; events:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Connects to a replication port, sends `bytes`, and returns the first frame the
/// daemon answers (`Ok(None)`: it closed the connection without a frame). Bounded.
pub fn raw_replication_exchange(
    port: u16,
    bytes: &[u8],
) -> Result<Option<engine::wire::Frame>, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("connect to replication port {port}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // A daemon that hangs up early (reset) shows in the read below.
    let _ = stream.write_all(bytes);
    let mut head = [0u8; engine::wire::FRAME_HEADER_BYTES];
    match stream.read_exact(&mut head) {
        Ok(()) => {}
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            return Ok(None)
        }
        Err(error) => return Err(format!("reading the answer: {error}")),
    }
    let header = engine::wire::decode_header(&head).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; header.body_bytes as usize];
    stream.read_exact(&mut body).map_err(|e| e.to_string())?;
    let frame =
        engine::wire::decode_body(&header, bytes::Bytes::from(body)).map_err(|e| e.to_string())?;
    // After its answer the daemon must close the connection (a refusing daemon waits
    // for the peer to hang up first, as a real peer does after a REJECT).
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Ok(Some(frame)),
        Ok(_) => Err(format!("{} more bytes after {}", rest.len(), frame.name())),
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => Ok(Some(frame)),
        Err(error) => Err(format!("the daemon kept the connection open: {error}")),
    }
}

/// A HELLO as node `node` (id `node_id`) of resource `resource` would send it.
pub fn hello_frame(
    protocol_version: u32,
    resource: &str,
    resource_uuid: [u8; 16],
    node: &str,
    node_id: u32,
) -> Vec<u8> {
    engine::wire::Frame::Hello(engine::wire::Hello {
        protocol_version,
        channel: engine::wire::Channel::Data,
        resource_uuid,
        node_id,
        resource: resource.to_string(),
        node: node.to_string(),
        authenticates: false,
        challenge: [0; 32],
        proof: [0; 32],
    })
    .encode_to_vec()
}

/// Tears down `mount` on `loop_device` on `fuse` after the NBD server under them died:
/// unmount (lazily if the dead device makes a clean unmount hang), detach the loop
/// device, unmount FUSE — in that order, each bounded.
pub fn teardown_dead_stack(mount: Mount, loop_device: LoopDevice, fuse: NbdFuse) {
    let dir = mount.dir.clone();
    std::mem::forget(mount);
    let output = run_with_timeout(
        Command::new("timeout").arg("20").arg("umount").arg(&dir),
        Duration::from_secs(30),
    );
    if !output.status.success() {
        run_ok(
            Command::new("umount").arg("-l").arg(&dir),
            Duration::from_secs(30),
        );
    }
    drop(loop_device);
    drop(fuse);
}

/// The checker writes through alpha's export at queue depth `qd` for `seconds` over
/// `blocks`, in the background (each request bounded: a hung write ends the run as
/// `server-disconnected`).
pub fn checker_in_background(
    cluster: &Cluster,
    qd: u32,
    seconds: &str,
    blocks: &str,
) -> std::thread::JoinHandle<(PathBuf, Output)> {
    let uri = cluster.uri("alpha");
    let dir = cluster.dir.clone();
    let (qd, seconds, blocks) = (qd.to_string(), seconds.to_string(), blocks.to_string());
    std::thread::spawn(move || {
        checker_write(
            &dir,
            &uri,
            &[
                "--qd",
                &qd,
                "--seconds",
                &seconds,
                "--blocks",
                &blocks,
                "--request-timeout",
                "20",
            ],
        )
    })
}

/// The checker ran its full time: no write hung or failed.
pub fn assert_checker_ran_out_its_time(cluster: &Cluster, output: &Output, what: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("stop time-up"),
        "the checker's writes did not run their course {what} ({}):\n{stdout}{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        cluster.log_tail("alpha")
    );
    eprintln!("{}", stdout.trim());
}

/// Once the pair is in sync again: the client flushes (every acknowledged write is
/// durable on both nodes), the primary dies, the spare is promoted and must hold
/// every write the checker's `log` says was acknowledged.
pub fn fail_over_and_verify(cluster: &mut Cluster, log: &Path, after: &str) {
    cluster.wait_in_sync(Duration::from_secs(120));
    qemu_io_ok(&cluster.uri("alpha"), false, "flush");
    cluster.kill9("alpha");
    cluster.wait_peer_lost("beta", Duration::from_secs(30));
    cluster.replctl_ok("beta", &["promote", RESOURCE, "--force"]);
    let (passed, report) = checker_verify(&cluster.uri("beta"), log, "acked");
    assert!(
        passed,
        "the promoted spare lost acknowledged writes {after}:\n{report}\n{}",
        cluster.log_tail("beta")
    );
    eprintln!(
        "{}",
        report.lines().find(|l| l.contains("lost")).unwrap_or("")
    );
}

// ---------------------------------------------------------------------------------
// A store that can lose power: only what was flushed survives.
// ---------------------------------------------------------------------------------

/// A store whose unflushed writes a test can drop, as a power cut drops a disk's
/// volatile cache: the image file sits behind `nbdkit --filter=cache
/// cache=writeback` (writes stay in nbdkit's cache until a FLUSH writes them back),
/// exposed as the file `mount/nbd` by `nbdfuse` (O_DIRECT works on it). A daemon
/// whose `disk` is that file sees an ordinary store; [`VolatileStore::power_cut`]
/// kills nbdkit and nbdfuse with SIGKILL and unmounts lazily, so the image file keeps
/// exactly what the daemon's fdatasyncs made durable. [`VolatileStore::hang`] makes
/// every request wait (nbdkit's `pause` filter, above the cache) until
/// [`VolatileStore::wake`]: a disk that hangs without failing. [`VolatileStore::fail`]
/// makes every request fail with EIO (nbdkit's `error` filter, outermost) until
/// [`VolatileStore::repair`]: a disk that dies.
pub struct VolatileStore {
    pub image: PathBuf,
    mount: PathBuf,
    socket: PathBuf,
    pause: PathBuf,
    error_file: PathBuf,
    read_error_file: PathBuf,
    nbdkit: Option<Child>,
    fuse: Option<NbdFuse>,
}

impl VolatileStore {
    /// Starts the stack over `image` (an existing file) in `dir`.
    pub fn start(dir: &Path, image: &Path) -> VolatileStore {
        require_tool("nbdkit", "nbdkit");
        std::fs::create_dir_all(dir).expect("store dir");
        let mut store = VolatileStore {
            image: image.to_path_buf(),
            mount: dir.join("mount"),
            socket: dir.join("nbdkit.sock"),
            pause: dir.join("pause.sock"),
            error_file: dir.join("fail-now"),
            read_error_file: dir.join("fail-reads-now"),
            nbdkit: None,
            fuse: None,
        };
        store.power_on();
        store
    }

    /// The file the daemon uses as its store.
    pub fn file(&self) -> PathBuf {
        self.mount.join("nbd")
    }

    /// (Re)starts nbdkit and nbdfuse over the image; waits until the file is there.
    pub fn power_on(&mut self) {
        assert!(self.nbdkit.is_none(), "the store is already on");
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.pause);
        let mut nbdkit = Command::new("nbdkit");
        nbdkit
            .arg("--foreground")
            .arg("--exit-with-parent")
            .arg("--unix")
            .arg(&self.socket)
            .arg("--filter=error")
            .arg("--filter=pause")
            .arg("--filter=cache")
            .arg("file")
            .arg(&self.image)
            .arg("cache=writeback")
            .arg(format!("pause-control={}", self.pause.display()))
            .arg("error=EIO")
            .arg("error-rate=100%")
            .arg(format!("error-file={}", self.error_file.display()))
            .arg("error-pread=EIO")
            .arg("error-pread-rate=100%")
            .arg(format!(
                "error-pread-file={}",
                self.read_error_file.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.nbdkit = Some(nbdkit.spawn().expect("start nbdkit"));
        let socket = self.socket.clone();
        wait_until("nbdkit's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(|_| ())
        });
        let uri = format!("nbd+unix:///?socket={}", self.socket.display());
        self.fuse = Some(NbdFuse::mount(&self.mount, &uri));
    }

    /// The disk hangs: requests from now on wait (those in flight finish first).
    pub fn hang(&self) {
        self.pause_control(b'p');
    }

    /// The hung disk answers again.
    pub fn wake(&self) {
        self.pause_control(b'r');
    }

    /// The disk dies: every request from now on fails with EIO.
    pub fn fail(&self) {
        std::fs::write(&self.error_file, b"").expect("create the error file");
        self.fail_reads();
    }

    /// Reads fail with EIO from now on (bad sectors); writes still work.
    pub fn fail_reads(&self) {
        std::fs::write(&self.read_error_file, b"").expect("create the read error file");
    }

    /// The dead disk was replaced by a working one (with the same contents).
    pub fn repair(&self) {
        for file in [&self.error_file, &self.read_error_file] {
            let _ = std::fs::remove_file(file);
        }
    }

    /// Sends a command to the pause filter; it echoes it in upper case once done.
    fn pause_control(&self, command: u8) {
        use std::io::{Read, Write};
        let mut socket =
            std::os::unix::net::UnixStream::connect(&self.pause).expect("pause control socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        socket.write_all(&[command]).expect("pause command");
        let mut reply = [0u8; 1];
        socket.read_exact(&mut reply).expect("pause reply");
        assert_eq!(reply[0], command.to_ascii_uppercase(), "pause filter reply");
    }

    /// The power goes: everything not flushed to the image file is lost.
    pub fn power_cut(&mut self) {
        if let Some(mut nbdkit) = self.nbdkit.take() {
            let _ = nbdkit.kill();
            let _ = nbdkit.wait();
        }
        if let Some(fuse) = self.fuse.take() {
            fuse.cut();
        }
    }
}

impl Drop for VolatileStore {
    fn drop(&mut self) {
        self.power_cut();
    }
}

// ---------------------------------------------------------------------------------
// Prometheus metrics.
// ---------------------------------------------------------------------------------

/// `GET path` over HTTP/1.0 to `address` (`IP:PORT`), bounded: (status code, body).
pub fn http_get(address: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let socket = address
        .parse()
        .map_err(|e| format!("bad address {address}: {e}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(5))
        .map_err(|e| format!("connect {address}: {e}"))?;
    let timeout = Some(Duration::from_secs(10));
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")
        .map_err(|e| format!("send to {address}: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read from {address}: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {response:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status code in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// The value of one series (`name{labels}` exactly as exposed) in an exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// `promtool check metrics` on an exposition: fails the test on any problem it reports.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    require_tool("promtool", "prometheus");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait for promtool").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("promtool check metrics did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("promtool output");
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool check metrics is not clean ({}):\n{}{}\n--- exposition ---\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Cluster {
    /// The address `name` serves metrics on.
    pub fn metrics_address(&self, name: &str) -> String {
        format!("127.0.0.1:{}", self.node(name).metrics_port)
    }

    /// Scrapes `name`'s `/metrics` (must answer 200).
    pub fn scrape(&self, name: &str) -> String {
        let (code, body) = http_get(&self.metrics_address(name), "/metrics")
            .unwrap_or_else(|e| panic!("scrape of {name}: {e}\n{}", self.log_tail(name)));
        assert_eq!(code, 200, "scrape of {name}: {body}");
        body
    }

    /// Scrapes `name` until `check` accepts the exposition; returns it.
    pub fn wait_metrics(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.scrape(name);
            if check(&last) {
                return last;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {name}'s metrics to show {what}; last scrape:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------
// Real network partitions: each node in its own network namespace, the two joined
// by a veth pair, traffic dropped with nftables (e2e_partition.rs).
// ---------------------------------------------------------------------------------

/// Two network namespaces joined by a veth pair (`10.213.N.1/24` and `.2/24`, `lo`
/// up in both). Dropping it deletes both namespaces, and with them the veth pair and
/// every nftables table made in them, even when the test panics.
pub struct NetnsPair {
    /// The namespaces' names (unique: the test's process id and a counter).
    pub names: [String; 2],
    /// The veth addresses, in the same order.
    pub ips: [String; 2],
}

/// The nftables table [`NetnsPair::drop_traffic`] adds and [`NetnsPair::heal`] deletes.
pub const PARTITION_TABLE: &str = "replicad_partition";

impl NetnsPair {
    pub fn create() -> NetnsPair {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        require_tool("ip", "iproute2");
        require_tool("nft", "nftables");
        require_tool("ss", "iproute2");
        assert!(is_root(), "network namespaces need root");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // The guard exists before the first namespace does: a failed setup is undone.
        let pair = NetnsPair {
            names: [format!("rpart-{pid}-{n}-a"), format!("rpart-{pid}-{n}-b")],
            ips: [
                format!("10.213.{}.1", n % 250),
                format!("10.213.{}.2", n % 250),
            ],
        };
        // Interface names: at most 15 bytes.
        let veth = [
            format!("rp{}{n}a", pid % 1_000_000),
            format!("rp{}{n}b", pid % 1_000_000),
        ];
        let ip = |args: &[&str]| {
            run_ok(Command::new("ip").args(args), Duration::from_secs(30));
        };
        for name in &pair.names {
            ip(&["netns", "add", name]);
        }
        ip(&[
            "link",
            "add",
            &veth[0],
            "netns",
            &pair.names[0],
            "type",
            "veth",
            "peer",
            "name",
            &veth[1],
            "netns",
            &pair.names[1],
        ]);
        for ((ns, address), veth) in pair.names.iter().zip(&pair.ips).zip(&veth) {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                veth,
            ]);
            ip(&["-n", ns, "link", "set", veth, "up"]);
        }
        pair
    }

    /// Runs `ARGS…` inside namespace `side` (0 or 1); returns its stdout.
    pub fn exec(&self, side: usize, args: &[&str]) -> String {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.names[side]])
                .args(args),
            Duration::from_secs(30),
        )
    }

    /// Puts node `name` of `cluster` (not started yet) into namespace `side`: it
    /// listens on and is dialed at that side's veth address. Call
    /// [`Cluster::write_config`] afterwards.
    pub fn place(&self, cluster: &mut Cluster, name: &str, side: usize) {
        assert!(
            cluster.options.unix_nbd,
            "a namespaced node serves NBD on a unix socket (the client runs outside)"
        );
        let node = cluster.nodes.get_mut(name).expect("node");
        node.ip.clone_from(&self.ips[side]);
        node.netns = Some(self.names[side].clone());
    }

    /// In namespace `side`: drops every packet, in and out, that one of the nftables
    /// `matches` (e.g. `ip saddr 10.0.0.2`) selects, in table [`PARTITION_TABLE`].
    pub fn drop_traffic(&self, side: usize, input: &[String], output: &[String]) {
        self.exec(side, &["nft", &format!("add table inet {PARTITION_TABLE}")]);
        for (chain, hook, rules) in [("in", "input", input), ("out", "output", output)] {
            self.exec(
                side,
                &[
                    "nft",
                    &format!(
                        "add chain inet {PARTITION_TABLE} {chain} {{ type filter hook {hook} priority 0; policy accept; }}"
                    ),
                ],
            );
            for rule in rules {
                self.exec(
                    side,
                    &[
                        "nft",
                        &format!("add rule inet {PARTITION_TABLE} {chain} {rule} drop"),
                    ],
                );
            }
        }
    }

    /// Deletes namespace `side`'s partition table: traffic flows again.
    pub fn heal(&self, side: usize) {
        self.exec(
            side,
            &["nft", &format!("delete table inet {PARTITION_TABLE}")],
        );
    }

    /// The established TCP connections in namespace `side`, from `ss -tniH`: (local
    /// address, peer address, bytes sent + received).
    pub fn tcp_connections(
        &self,
        side: usize,
    ) -> Vec<(std::net::SocketAddr, std::net::SocketAddr, u64)> {
        let text = self.exec(side, &["ss", "-tniH", "state", "established"]);
        let mut connections: Vec<(std::net::SocketAddr, std::net::SocketAddr, u64)> = Vec::new();
        for line in text.lines() {
            let addresses: Vec<std::net::SocketAddr> = line
                .split_whitespace()
                .filter_map(|token| token.parse().ok())
                .collect();
            if let [local, peer] = addresses[..] {
                connections.push((local, peer, 0));
                continue;
            }
            let Some(last) = connections.last_mut() else {
                continue;
            };
            for token in line.split_whitespace() {
                for key in ["bytes_sent:", "bytes_received:"] {
                    if let Some(value) = token.strip_prefix(key).and_then(|v| v.parse::<u64>().ok())
                    {
                        last.2 += value;
                    }
                }
            }
        }
        connections
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
