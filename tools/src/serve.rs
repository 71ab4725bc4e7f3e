//! `replctl serve`: a throwaway node or pair on image files, in the foreground, for
//! external benchmarks (`shared/bench/peers.sh --ours-cmd …`) and experiments.
//!
//! With `--peer-disk`, the primary's image is first copied to the peer's, both get
//! metadata, and the pair skips its initial sync (`new-current-uuid --clear-bitmap`:
//! they are identical), so the export is ready in seconds and measured in steady
//! state. Runs until SIGTERM/SIGINT, then stops both daemons cleanly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use replicad::control::Request;

use crate::launch::{call, free_port, NodeProcess};

/// The resource `serve` sets up.
pub(crate) const RESOURCE: &str = "r0";

/// Polls the resource's status at `control` until `check` holds (bounded).
pub(crate) fn wait_for(
    control: &Path,
    what: &str,
    timeout: Duration,
    check: impl Fn(&replicad::control::ResourceStatus) -> bool,
) -> anyhow::Result<replicad::control::ResourceStatus> {
    crate::launch::wait_for(control, RESOURCE, what, timeout, check)
}

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
    /// Memory for the checksum table's page cache (`checksum-cache`, default 64M).
    #[arg(long)]
    pub checksum_cache: Option<String>,
    /// The store is all zeroes (skip the checksum scan).
    #[arg(long)]
    pub zeroed: bool,
    /// Give each node a snapshot area (`DIR/NODE.snap`), so `replctl snapshot` works.
    #[arg(long)]
    pub snapshots: bool,
    /// The snapshot area's limit (`snapshot-area`, default 1G).
    #[arg(long, requires = "snapshots")]
    pub snapshot_area: Option<String>,
    /// The peer's store is all zeroes too, so both are already identical and the copy
    /// is skipped. Not a command-line option: only a caller that created both stores
    /// (`replctl bench`) knows it.
    #[arg(skip)]
    pub peer_zeroed: bool,
}

/// A running single node or pair; stops its daemons on drop.
pub(crate) struct Setup {
    pub primary: NodeProcess,
    pub secondary: Option<NodeProcess>,
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
    let cache = args
        .checksum_cache
        .as_ref()
        .map(|c| format!("checksum-cache = \"{c}\"\n"))
        .unwrap_or_default();
    let area = args
        .snapshot_area
        .as_ref()
        .map(|a| format!("snapshot-area = \"{a}\"\n"))
        .unwrap_or_default();
    let snapshot_dir = |node: &str| {
        if args.snapshots {
            format!(
                "snapshot-dir = \"{}\"\n",
                dir.join(format!("{node}.snap")).display()
            )
        } else {
            String::new()
        }
    };
    let mut config_text = format!(
        "[resource.r0]\nmode = \"{}\"\nio = \"{}\"\n{journal}{cache}{area}\n",
        args.mode, args.io
    );
    config_text.push_str(&format!(
        "[resource.r0.nodes.alpha]\naddress = \"127.0.0.1:{}\"\ndisk = \"{}\"\nnbd = \"{}\"\ncontrol = \"{}\"\n{}",
        free_port()?,
        args.disk.display(),
        args.nbd,
        dir.join("alpha.ctl").display(),
        snapshot_dir("alpha")
    ));
    if let Some(peer_disk) = &args.peer_disk {
        // Identical stores skip the initial sync: copy the primary's data over, unless
        // both are known to be all zeroes.
        if !(args.zeroed && args.peer_zeroed) {
            copy_store(&args.disk, peer_disk)?;
        }
        config_text.push_str(&format!(
            "[resource.r0.nodes.beta]\naddress = \"127.0.0.1:{}\"\ndisk = \"{}\"\nnbd = \"127.0.0.1:{}\"\ncontrol = \"{}\"\n{}",
            free_port()?,
            peer_disk.display(),
            free_port()?,
            dir.join("beta.ctl").display(),
            snapshot_dir("beta")
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
    let primary = NodeProcess::start(&config, "alpha", &dir.join("alpha.log"))?;
    let primary_control = dir.join("alpha.ctl");
    let secondary = match args.peer_disk {
        Some(_) => Some(NodeProcess::start(&config, "beta", &dir.join("beta.log"))?),
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
/// inherit the mask: [`NodeProcess::spawn`] empties it for the daemons.
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
