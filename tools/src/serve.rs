//! `replctl serve`: a throwaway node or pair on image files, in the foreground, for
//! external benchmarks (`shared/bench/peers.sh --ours-cmd …`) and experiments.
//!
//! With `--peer-disk`, the primary's image is first copied to the peer's, both get
//! metadata, and the pair skips its initial sync (`new-current-uuid --clear-bitmap`:
//! they are identical), so the export is ready in seconds and measured in steady
//! state. Runs until SIGTERM/SIGINT, then stops both daemons cleanly.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use replicad::control::{Client, Request, ResourceStatus};

/// Options of `replctl serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The primary's store (image file or block device); its data is kept.
    #[arg(long)]
    pub disk: PathBuf,
    /// NBD listener of the primary: `IP:PORT` or `unix:PATH`.
    #[arg(long)]
    pub nbd: String,
    /// The secondary's store: replicate to it (its data is overwritten).
    #[arg(long)]
    pub peer_disk: Option<PathBuf>,
    /// Working directory for configs, sockets and logs.
    #[arg(long)]
    pub dir: PathBuf,
    /// Replication mode.
    #[arg(long, default_value = "sync")]
    pub mode: String,
    /// Data I/O: direct (O_DIRECT io_uring, journal buffered) or buffered.
    #[arg(long, default_value = "direct")]
    pub io: String,
    /// Journal size (default: an eighth of the store, at most 128M).
    #[arg(long)]
    pub journal: Option<String>,
    /// The store is all zeroes (skip the checksum scan).
    #[arg(long)]
    pub zeroed: bool,
    /// The peer's store is all zeroes too, so both are already identical and the copy
    /// is skipped. Not a command-line option: only a caller that created both stores
    /// (`replctl bench`) knows it.
    #[arg(skip)]
    pub peer_zeroed: bool,
}

pub(crate) struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    /// Starts `replicad` (next to this binary) for `node`; it dies with us.
    pub(crate) fn start(config: &Path, node: &str, log: &Path) -> anyhow::Result<Daemon> {
        let binary = std::env::current_exe()?.with_file_name("replicad");
        anyhow::ensure!(
            binary.exists(),
            "replicad not found next to replctl ({})",
            binary.display()
        );
        let log = std::fs::File::create(log)?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(config)
            .arg("--node")
            .arg(node)
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl and sigprocmask between fork and exec only set process
        // attributes (both are async-signal-safe). The mask is emptied because a
        // caller may block SIGTERM/SIGINT to take them itself (`replctl bench`), and a
        // blocked mask survives exec: the daemon would never see `stop`'s SIGTERM.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        Ok(Daemon {
            child: Some(command.spawn()?),
        })
    }

    /// SIGTERM, bounded wait, then SIGKILL. Returns the exit status when the daemon
    /// exited by itself after SIGTERM; `None` when it had to be killed or was stopped
    /// before.
    pub(crate) fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill with the pid of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
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

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn status(control: &Path) -> anyhow::Result<ResourceStatus> {
    let mut client = Client::connect(control, Duration::from_secs(30))?;
    client
        .status(Some("r0"))?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no status for r0"))
}

pub(crate) fn call(control: &Path, request: Request) -> anyhow::Result<serde_json::Value> {
    let mut client = Client::connect(control, Duration::from_secs(120))?;
    Ok(client.call(&request)?)
}

/// Connected, replicating and both disks UpToDate.
pub(crate) fn in_sync(status: &ResourceStatus) -> bool {
    status.disk == "UpToDate"
        && status.peer.as_ref().is_some_and(|peer| {
            peer.connection == "Connected"
                && peer.replication == "Established"
                && peer.peer_disk.as_deref() == Some("UpToDate")
        })
}

/// Polls until `check` holds (bounded).
pub(crate) fn wait_for(
    control: &Path,
    what: &str,
    timeout: Duration,
    check: impl Fn(&ResourceStatus) -> bool,
) -> anyhow::Result<ResourceStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match status(control) {
            Ok(status) if check(&status) => return Ok(status),
            _ if Instant::now() >= deadline => {
                anyhow::bail!("timed out after {timeout:?} waiting for {what}")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running single node or pair; stops its daemons on drop.
pub(crate) struct Setup {
    pub primary: Daemon,
    pub secondary: Option<Daemon>,
    pub size_bytes: u64,
}

/// Writes a config, creates metadata, starts the daemons and makes `alpha` an UpToDate
/// Primary (skipping the initial sync of a pair by copying the store first).
pub(crate) fn set_up(args: &ServeArgs) -> anyhow::Result<Setup> {
    std::fs::create_dir_all(&args.dir)?;
    let dir = &args.dir;
    let journal = args
        .journal
        .as_ref()
        .map(|j| format!("journal-size = \"{j}\"\n"))
        .unwrap_or_default();
    let mut config_text = format!(
        "[resource.r0]\nmode = \"{}\"\nio = \"{}\"\n{journal}\n",
        args.mode, args.io
    );
    config_text.push_str(&format!(
        "[resource.r0.nodes.alpha]\naddress = \"127.0.0.1:{}\"\ndisk = \"{}\"\nnbd = \"{}\"\ncontrol = \"{}\"\n",
        free_port()?,
        args.disk.display(),
        args.nbd,
        dir.join("alpha.ctl").display()
    ));
    if let Some(peer_disk) = &args.peer_disk {
        // Identical stores skip the initial sync: copy the primary's data over, unless
        // both are known to be all zeroes.
        if !(args.zeroed && args.peer_zeroed) {
            copy_store(&args.disk, peer_disk)?;
        }
        config_text.push_str(&format!(
            "[resource.r0.nodes.beta]\naddress = \"127.0.0.1:{}\"\ndisk = \"{}\"\nnbd = \"127.0.0.1:{}\"\ncontrol = \"{}\"\n",
            free_port()?,
            peer_disk.display(),
            free_port()?,
            dir.join("beta.ctl").display()
        ));
    }
    let config = dir.join("replicad.toml");
    std::fs::write(&config, config_text)?;
    let nodes: Vec<&str> = if args.peer_disk.is_some() {
        vec!["alpha", "beta"]
    } else {
        vec!["alpha"]
    };
    for node in &nodes {
        crate::admin::create_md(&config, node, "r0", true, args.zeroed)?;
    }
    let primary = Daemon::start(&config, "alpha", &dir.join("alpha.log"))?;
    let primary_control = dir.join("alpha.ctl");
    let secondary = match args.peer_disk {
        Some(_) => Some(Daemon::start(&config, "beta", &dir.join("beta.log"))?),
        None => None,
    };
    let status = wait_for(
        &primary_control,
        "the primary to start",
        Duration::from_secs(60),
        |_| true,
    )?;
    if args.peer_disk.is_some() {
        wait_for(
            &primary_control,
            "the pair to connect",
            Duration::from_secs(60),
            |s| s.peer.as_ref().is_some_and(|p| p.connection == "Connected"),
        )?;
        call(
            &primary_control,
            Request::NewCurrentUuid {
                resource: "r0".into(),
                clear_bitmap: true,
            },
        )?;
        wait_for(
            &primary_control,
            "both nodes UpToDate",
            Duration::from_secs(60),
            |s| {
                s.disk == "UpToDate"
                    && s.peer
                        .as_ref()
                        .is_some_and(|p| p.peer_disk.as_deref() == Some("UpToDate"))
            },
        )?;
    }
    call(
        &primary_control,
        Request::Promote {
            resource: "r0".into(),
            force: args.peer_disk.is_none(),
        },
    )?;
    Ok(Setup {
        primary,
        secondary,
        size_bytes: status.size_bytes,
    })
}

/// Blocks SIGTERM and SIGINT in the calling thread (and the threads it starts later),
/// so they can be taken with `sigwait`/`sigtimedwait`; returns the set. Children
/// inherit the mask: [`Daemon::start`] empties it for the daemons.
pub(crate) fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Copies `from` to `to` (a regular file or block device), whole.
fn copy_store(from: &Path, to: &Path) -> anyhow::Result<()> {
    let mut source = std::fs::File::open(from)?;
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(!is_block_device(to))
        .open(to)?;
    std::io::copy(&mut source, &mut target)?;
    target.sync_all()?;
    Ok(())
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
}

/// `replctl serve`: set up, print the URI, wait for SIGTERM/SIGINT, stop cleanly.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let mut setup = set_up(args)?;
    let uri = match args.nbd.strip_prefix("unix:") {
        Some(path) => format!("nbd+unix:///r0?socket={path}"),
        None => format!("nbd://{}/r0", args.nbd),
    };
    eprintln!(
        "serving {uri} ({} bytes){}",
        setup.size_bytes,
        if args.peer_disk.is_some() {
            format!(", replicated ({})", args.mode)
        } else {
            ", single node".to_string()
        }
    );
    // Wait for a termination signal.
    let set = block_termination_signals();
    let mut signal = 0;
    // SAFETY: the set is initialised and its signals are blocked, as sigwait requires.
    unsafe { libc::sigwait(&set, &mut signal) };
    setup.primary.stop();
    if let Some(secondary) = setup.secondary.as_mut() {
        secondary.stop();
    }
    Ok(())
}
