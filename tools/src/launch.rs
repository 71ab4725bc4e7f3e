//! Node daemons as child processes, and the control-socket helpers of the tools that
//! start them (`replctl demo`, `serve`, `bench`, and the end-to-end test harness).
//!
//! A daemon is this very executable run as `replctl daemon` (or any binary that takes
//! the daemon's arguments, such as `replicad`): no binary is looked for "next to"
//! another, so `cargo run --bin replctl -- demo` works although it builds only
//! `replctl`.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use replicad::control::{Client, Request, ResourceStatus};

/// How long [`NodeProcess::stop`] waits for a clean exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The program that runs a daemon, with the arguments that select it.
#[derive(Debug, Clone)]
pub struct DaemonProgram {
    pub program: PathBuf,
    pub prefix: Vec<String>,
    /// Environment variables set for the daemon on top of the inherited ones.
    pub env: Vec<(OsString, OsString)>,
}

impl DaemonProgram {
    /// This executable's `daemon` subcommand (for `replctl`).
    pub fn this_replctl() -> anyhow::Result<DaemonProgram> {
        Ok(DaemonProgram {
            program: std::env::current_exe()?,
            prefix: vec!["daemon".into()],
            env: Vec::new(),
        })
    }

    /// A binary that takes the daemon's arguments itself (`replicad`).
    pub fn binary(path: &Path) -> DaemonProgram {
        DaemonProgram {
            program: path.to_path_buf(),
            prefix: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The same program with `key=value` in its environment (`NOTIFY_SOCKET`).
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A running daemon; SIGTERM (then SIGKILL) on drop. It also dies with its parent.
pub struct NodeProcess {
    child: Option<Child>,
}

impl NodeProcess {
    /// Starts `node` of `config` with `replctl daemon`, its log in `log`.
    pub fn start(config: &Path, node: &str, log: &Path) -> anyhow::Result<NodeProcess> {
        let log = File::create(log)?;
        NodeProcess::spawn(&DaemonProgram::this_replctl()?, config, node, log, &[])
    }

    /// Starts `node` with `program`; stderr (the log) goes to `log`, `extra` are more
    /// daemon arguments (`--threads 2`).
    pub fn spawn(
        program: &DaemonProgram,
        config: &Path,
        node: &str,
        log: File,
        extra: &[&str],
    ) -> anyhow::Result<NodeProcess> {
        let mut command = Command::new(&program.program);
        command
            .args(&program.prefix)
            .arg("--config")
            .arg(config)
            .arg("--node")
            .arg(node)
            .args(extra)
            .envs(program.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl and sigprocmask between fork and exec only set process
        // attributes (both are async-signal-safe). The daemon dies with its parent
        // even if the parent is killed. The mask is emptied because a caller may block
        // SIGTERM/SIGINT to take them itself (`replctl bench`), and a blocked mask
        // survives exec: the daemon would never see `stop`'s SIGTERM.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        Ok(NodeProcess {
            child: Some(command.spawn()?),
        })
    }

    /// The daemon's process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the daemon has exited (it was not stopped by us).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// SIGKILL: a crash, no cleanup at all.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, bounded wait, then SIGKILL. Returns the exit status when the daemon
    /// exited by itself after SIGTERM; `None` when it had to be killed or was stopped
    /// before.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill with the pid of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The status of resource `resource` from the daemon at `control`.
pub fn status(control: &Path, resource: &str) -> anyhow::Result<ResourceStatus> {
    let mut client = Client::connect(control, Duration::from_secs(30))?;
    client
        .status(Some(resource))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no status for {resource}"))
}

/// Sends `request` to the daemon at `control`; its answer.
pub fn call(control: &Path, request: Request) -> anyhow::Result<serde_json::Value> {
    let mut client = Client::connect(control, Duration::from_secs(120))?;
    Ok(client.call(&request)?)
}

/// Connected, replicating and both disks UpToDate.
pub fn in_sync(status: &ResourceStatus) -> bool {
    status.disk == "UpToDate"
        && status.peer.as_ref().is_some_and(|peer| {
            peer.connection == "Connected"
                && peer.replication == "Established"
                && peer.peer_disk.as_deref() == Some("UpToDate")
        })
}

/// Polls `resource`'s status at `control` until `check` holds (bounded by `timeout`).
pub fn wait_for(
    control: &Path,
    resource: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&ResourceStatus) -> bool,
) -> anyhow::Result<ResourceStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = status(control, resource);
        match &last {
            Ok(status) if check(status) => return last,
            _ if Instant::now() >= deadline => {
                let seen = match last {
                    Ok(status) => format!(
                        "disk:{} peer:{:?}",
                        status.disk,
                        status.peer.map(|p| (p.connection, p.replication))
                    ),
                    Err(error) => format!("daemon not answering: {error}"),
                };
                anyhow::bail!("timed out after {timeout:?} waiting for {what} ({seen})")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
