//! `replctl bench`: the end-to-end benchmark. One table of what replication and the
//! engine cost: the same workloads on the raw device, on one node standalone and on a
//! replicated pair, plus the full-rebuild rate of the pair.
//!
//! Method:
//!
//! - Each configuration gets fresh stores: image files in a private work directory,
//!   behind loop devices (`losetup --direct-io=on`) when run as root, the image files
//!   themselves otherwise. Each starts with a sequential fill of the whole volume with
//!   random data, so reads hit real blocks and the rebuild moves real data (zero blocks
//!   resync as markers and would flatter it).
//! - The raw row drives the backing store with Linux native AIO under O_DIRECT from one
//!   thread, as many requests in flight as the queue depth (what fio's `libaio` engine
//!   does; one blocking thread per request in flight measured about a quarter below
//!   that on two cores, which would flatter the engine). The standalone and pair rows
//!   drive the primary's NBD export with the crate's pipelined async NBD client (one
//!   TCP connection, as many requests in flight as the queue depth, one thread), the
//!   daemons started as `replctl serve` starts them.
//! - Every workload runs for `--runtime` after a warm-up; only operations completed in
//!   the measured window count. A failed operation fails the whole run with its
//!   message: no cell is ever left out.
//! - After the pair's workloads, an online verify must find the replicas identical;
//!   then a full rebuild (`invalidate` on the secondary) is timed from the request
//!   until the primary reports both in sync, and compared with a raw sequential copy
//!   of the same bytes measured in the same run. After a clean shutdown the data areas
//!   are compared byte for byte.
//!
//! Cleanup: loop devices, daemons and files are released by `Drop` guards, so an error
//! or a panic cleans up too. SIGINT/SIGTERM are taken by the main thread (the bench
//! runs in a second thread): the bench stops at its next operation and unwinds through
//! its guards; if that takes too long, or on a second signal, the main thread detaches
//! the loop devices backed by the work directory, removes it and exits (the daemons die
//! with us: they are started with a parent-death signal).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{IsTerminal, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use engine::backend::{self, AlignedBuf, Backend, BackendKind, OpenOptions, ReadOp, WriteOp};
use engine::repl::Mode;
use engine::rng::SplitMix64;
use replicad::control::{Client, Request};
use serde::Serialize;

use crate::admin::human_bytes;
use crate::launch::{self, NodeProcess};
use crate::nbd_client::{ConnectOptions, NbdClient};
use crate::serve::{self, ServeArgs};

/// Options of `replctl bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Size of each backing store (loop device or image file).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Replication mode of the pair.
    #[arg(long, default_value = "sync", value_parser = parse_mode)]
    pub mode: Mode,
    /// Measured time per workload.
    #[arg(long, default_value = "10s", value_parser = parse_runtime)]
    pub runtime: Duration,
    /// Unmeasured warm-up before each workload (default: a fifth of --runtime, at most 2s).
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Directory in which to create the private work directory (default: the system
    /// temp directory). Must not be tmpfs: O_DIRECT would be impossible there.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let size = replicad::config::parse_size(text)?;
    if size < 64 << 20 || size % BLOCK_BYTES != 0 {
        return Err("the size must be at least 64M and a multiple of 4K".into());
    }
    Ok(size)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    replicad::config::parse_duration(text)
}

fn parse_runtime(text: &str) -> Result<Duration, String> {
    let runtime = parse_duration(text)?;
    if runtime < Duration::from_secs(1) {
        return Err("the runtime must be at least 1s".into());
    }
    Ok(runtime)
}

fn parse_mode(text: &str) -> Result<Mode, String> {
    Mode::parse(text).ok_or_else(|| format!("{text:?} is not a mode (sync, semi-sync or async)"))
}

const RESOURCE: &str = "r0";
const BLOCK_BYTES: u64 = engine::BLOCK_BYTES;
const MIB: f64 = (1u64 << 20) as f64;
/// Random data the writes take their payloads from (at 4 KiB-aligned offsets).
const POOL_BYTES: usize = 4 << 20;
/// Writes between two flushes in the flush workload (fio `--fsync=32`).
const FLUSH_EVERY: u32 = 32;
/// Transfer unit of the fill, the raw copy and the comparison.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks per batch of the raw copy and the comparison (run in parallel by io_uring).
const CHUNKS_PER_BATCH: usize = 8;
/// How long the bench may take to unwind after SIGINT/SIGTERM before the main thread
/// cleans up itself.
const SIGNAL_GRACE: Duration = Duration::from_secs(15);
/// Poll interval while timing the rebuild (its resolution).
const REBUILD_POLL: Duration = Duration::from_millis(20);

/// Set by the main thread on SIGINT/SIGTERM; every loop of the bench checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The work directory, for the main thread's last-resort cleanup.
static WORK_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn check_interrupted() -> anyhow::Result<()> {
    anyhow::ensure!(!interrupted(), "interrupted");
    Ok(())
}

// ---------------------------------------------------------------------------------
// Entry point and signals
// ---------------------------------------------------------------------------------

/// SIGINT and SIGTERM.
struct TerminationSignals(libc::sigset_t);

impl TerminationSignals {
    /// Blocks SIGINT and SIGTERM in this thread and in every thread it starts later
    /// (the daemons start with an empty mask; `losetup` inherits it, harmlessly).
    fn block() -> TerminationSignals {
        TerminationSignals(serve::block_termination_signals())
    }

    /// A pending signal, waiting at most `timeout` for one.
    fn wait(&self, timeout: Duration) -> Option<i32> {
        let timeout = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the set is initialised and the signals are blocked; a null info
        // pointer is allowed.
        let signal = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &timeout) };
        (signal > 0).then_some(signal)
    }
}

/// `replctl bench`: runs the benchmark in a second thread and handles SIGINT/SIGTERM.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let options = Options::new(args)?;
    let signals = TerminationSignals::block();
    let worker = std::thread::Builder::new()
        .name("bench".into())
        .spawn(move || bench(&options))?;
    let signal = loop {
        if worker.is_finished() {
            return match worker.join() {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("the benchmark panicked (see above)")),
            };
        }
        if let Some(signal) = signals.wait(Duration::from_millis(100)) {
            break signal;
        }
    };
    INTERRUPTED.store(true, Ordering::Relaxed);
    let name = if signal == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    eprintln!("\nreplctl bench: {name}: stopping and cleaning up");
    let deadline = Instant::now() + SIGNAL_GRACE;
    while !worker.is_finished() && Instant::now() < deadline {
        if signals.wait(Duration::from_millis(100)).is_some() {
            eprintln!("replctl bench: second signal: cleaning up now");
            break;
        }
    }
    if worker.is_finished() {
        let _ = worker.join();
    } else {
        // The bench is stuck in a bounded wait: release what outlives us ourselves.
        // The daemons die with this process (parent-death signal), then the loop
        // devices detach themselves (a busy device is detached on its last close).
        let dir = WORK_DIR.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(dir) = dir {
            detach_loops_under(&dir);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    std::process::exit(128 + signal)
}

// ---------------------------------------------------------------------------------
// Options and context
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Options {
    size_bytes: u64,
    mode: Mode,
    runtime: Duration,
    warmup: Duration,
    json: bool,
    parent: PathBuf,
    journal_bytes: u64,
    /// Exported size of the volume on a store of `size_bytes`; every row spans it.
    volume_bytes: u64,
}

impl Options {
    fn new(args: &BenchArgs) -> anyhow::Result<Options> {
        let warmup = args
            .warmup
            .unwrap_or_else(|| (args.runtime / 5).min(Duration::from_secs(2)));
        // The daemon's default journal (an eighth of the store, at most 128 MiB), made
        // explicit so the raw row can span exactly the volume's bytes.
        let journal_bytes = (args.size / 8).clamp(
            engine::layout::MIN_DAEMON_JOURNAL_BYTES,
            engine::layout::DEFAULT_JOURNAL_BYTES,
        ) & !4095;
        let geometry = engine::layout::Geometry::internal(args.size, journal_bytes)?;
        Ok(Options {
            size_bytes: args.size,
            mode: args.mode,
            runtime: args.runtime,
            warmup,
            json: args.json,
            parent: args.dir.clone().unwrap_or_else(std::env::temp_dir),
            journal_bytes,
            volume_bytes: geometry.data_bytes,
        })
    }
}

/// What every configuration needs.
struct Context {
    options: Options,
    work: PathBuf,
    /// Loop devices (root) or the image files themselves.
    loops: bool,
    reporter: Reporter,
    /// Random, non-zero payloads.
    pool: Arc<AlignedBuf>,
}

impl Context {
    /// A fresh directory for one configuration.
    fn config_dir(&self, name: &str) -> anyhow::Result<ScratchDir> {
        let path = self.work.join(name);
        std::fs::create_dir(&path)
            .map_err(|error| anyhow::anyhow!("cannot create {}: {error}", path.display()))?;
        Ok(ScratchDir(path))
    }

    fn timing(&self) -> Timing {
        Timing {
            warmup: self.options.warmup,
            runtime: self.options.runtime,
        }
    }
}

/// Progress on stderr: a live line on a terminal, one line per finished step always.
struct Reporter {
    started: Instant,
    live: bool,
}

impl Reporter {
    fn step(&self, text: &str) {
        let clear = if self.live { "\r\x1b[K" } else { "" };
        eprintln!(
            "{clear}[{:>6.1}s] {text}",
            self.started.elapsed().as_secs_f64()
        );
    }

    fn live(&self, text: &str) {
        if self.live {
            eprint!(
                "\r\x1b[K[{:>6.1}s] {text}",
                self.started.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    }
}

// ---------------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------------

fn bench(options: &Options) -> anyhow::Result<()> {
    let reporter = Reporter {
        started: Instant::now(),
        live: std::io::stderr().is_terminal(),
    };
    // SAFETY: geteuid has no preconditions.
    let loops = unsafe { libc::geteuid() } == 0;
    let file_system = check_file_system(&options.parent, options.size_bytes)?;
    let work = WorkDir::create(&options.parent)?;
    let stores = if loops {
        "loop devices (losetup --direct-io=on) on image files".to_string()
    } else {
        "image files (not root: no loop devices)".to_string()
    };
    reporter.step(&format!(
        "work directory {} on {file_system}; {} stores: {stores}",
        work.0.display(),
        human_bytes(options.size_bytes)
    ));
    if !loops {
        eprintln!("replctl bench: not root, so the stores are image files, not loop devices");
    }
    let mut pool = AlignedBuf::zeroed(POOL_BYTES, 4096);
    SplitMix64::new(0x6265_6e63_6800_0001).fill(&mut pool);
    let context = Context {
        options: options.clone(),
        work: work.0.clone(),
        loops,
        reporter,
        pool: Arc::new(pool),
    };
    let raw = run_raw(&context)?;
    let standalone = run_standalone(&context)?;
    let pair = run_pair(&context)?;
    let report = Report::new(&context, &file_system, &stores, raw, standalone, pair);
    drop(work);
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    let replicas = &report.replicas;
    anyhow::ensure!(
        replicas.identical,
        "the replicas differ: online verify found {} blocks out of sync; first differing byte of the data areas: {:?}",
        replicas.verify_out_of_sync_blocks,
        replicas.first_difference
    );
    Ok(())
}

/// Refuses tmpfs and a file system without room for the stores; names the file system.
fn check_file_system(dir: &Path, size_bytes: u64) -> anyhow::Result<String> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs fills the zero-initialised struct; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        let error = std::io::Error::last_os_error();
        anyhow::bail!("cannot use {}: {error}", dir.display());
    }
    let name = match stat.f_type as u64 {
        0xEF53 => "ext2/ext3/ext4".to_string(),
        0x5846_5342 => "xfs".to_string(),
        0x9123_683E => "btrfs".to_string(),
        0x0102_1994 => anyhow::bail!(
            "{} is on tmpfs: O_DIRECT is impossible there and the figures would measure memory; pass --dir on a disk-backed file system (e.g. --dir /var/tmp)",
            dir.display()
        ),
        other => format!("file system 0x{other:x}"),
    };
    // The pair's two stores plus the scratch file of the raw copy, and some slack.
    let needed = 3 * size_bytes + (64 << 20);
    let available = stat.f_bavail as u64 * stat.f_bsize as u64;
    anyhow::ensure!(
        available >= needed,
        "{} has {} free; the benchmark needs {} (two stores and a scratch copy of --size)",
        dir.display(),
        human_bytes(available),
        human_bytes(needed)
    );
    Ok(name)
}

/// The raw row: the workloads straight on a fresh store, O_DIRECT, no engine.
fn run_raw(context: &Context) -> anyhow::Result<ConfigResult> {
    let dir = context.config_dir("raw")?;
    let store = Store::create(&dir.0, "raw", context)?;
    let (file, direct) = open_for_aio(store.path())?;
    let target = Target::Raw {
        file: &file,
        pool: &context.pool,
    };
    let workloads = run_workloads(context, &target, "raw")?;
    let method = format!(
        "Linux native AIO (io_submit, like fio --ioengine=libaio){} on the {}, from one thread with as many requests in flight as the queue depth; flush = fdatasync",
        if direct {
            " with O_DIRECT"
        } else {
            ", buffered (O_DIRECT refused)"
        },
        if context.loops {
            "loop device"
        } else {
            "image file"
        }
    );
    Ok(ConfigResult {
        name: "raw",
        workloads,
        rebuild: None,
        method,
    })
}

/// Opens a store read-write with O_DIRECT, buffered where the file system refuses it;
/// says which.
fn open_for_aio(path: &Path) -> anyhow::Result<(std::fs::File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_DIRECT) {
        Ok(file) => Ok((file, true)),
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => Ok((open(0)?, false)),
        Err(error) => Err(anyhow::anyhow!("cannot open {}: {error}", path.display())),
    }
}

/// The standalone row: one node, promoted alone, driven over NBD.
fn run_standalone(context: &Context) -> anyhow::Result<ConfigResult> {
    let dir = context.config_dir("standalone")?;
    let store = Store::create(&dir.0, "alpha", context)?;
    with_log_tails(&dir.0, || {
        let mut volume = Volume::start(context, &dir.0, &store, None)?;
        let workloads = volume.run_workloads(context, "standalone")?;
        volume.stop()?;
        Ok(ConfigResult {
            name: "standalone",
            workloads,
            rebuild: None,
            method: String::new(),
        })
    })
}

/// The pair row, the rebuild and the replica checks.
fn run_pair(context: &Context) -> anyhow::Result<(ConfigResult, Replicas)> {
    let dir = context.config_dir("pair")?;
    let alpha = Store::create(&dir.0, "alpha", context)?;
    let beta = Store::create(&dir.0, "beta", context)?;
    let label = format!("pair ({})", context.options.mode);
    with_log_tails(&dir.0, || {
        let mut volume = Volume::start(context, &dir.0, &alpha, Some(&beta))?;
        let workloads = volume.run_workloads(context, &label)?;
        let verify_out_of_sync_blocks = verify_online(context, &volume.primary_control)?;
        context.reporter.step(&format!(
            "{label}: online verify after the workloads: {verify_out_of_sync_blocks} blocks differ"
        ));
        let mut rebuild = time_rebuild(context, &volume)?;
        context.reporter.step(&format!(
            "{label}: full rebuild of {} in {:.2}s: {:.0} MiB/s",
            human_bytes(rebuild.bytes),
            rebuild.seconds,
            rebuild.mib_per_second
        ));
        volume.stop()?;
        let first_difference = compare_stores(alpha.path(), beta.path(), rebuild.bytes)?;
        context.reporter.step(&format!(
            "{label}: data areas after the rebuild and a clean shutdown: {}",
            match first_difference {
                None => "identical".to_string(),
                Some(offset) => format!("DIFFER at byte {offset}"),
            }
        ));
        let scratch = Scratch(dir.0.join("scratch.img"));
        let copy = raw_copy(alpha.path(), &scratch.0, rebuild.bytes)?;
        drop(scratch);
        rebuild.raw_copy_seconds = copy.seconds;
        rebuild.raw_copy_mib_per_second = rebuild.bytes as f64 / MIB / copy.seconds;
        rebuild.raw_copy_method = copy.method;
        rebuild.ratio_to_raw_copy = rebuild.mib_per_second / rebuild.raw_copy_mib_per_second;
        context.reporter.step(&format!(
            "raw sequential copy of the same {}: {:.0} MiB/s; rebuild/copy = {:.2}x",
            human_bytes(rebuild.bytes),
            rebuild.raw_copy_mib_per_second,
            rebuild.ratio_to_raw_copy
        ));
        let replicas = Replicas {
            identical: verify_out_of_sync_blocks == 0 && first_difference.is_none(),
            verify_out_of_sync_blocks,
            compared_bytes: rebuild.bytes,
            first_difference,
        };
        Ok((
            ConfigResult {
                name: "pair",
                workloads,
                rebuild: Some(rebuild),
                method: String::new(),
            },
            replicas,
        ))
    })
}

/// Runs `body`; on failure, shows the last lines of the daemon logs in `dir` on stderr
/// (the error itself stays the one line the CLI contract asks for).
fn with_log_tails<T>(dir: &Path, body: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let result = body();
    if result.is_err() && !interrupted() {
        for node in ["alpha", "beta"] {
            let Ok(text) = std::fs::read_to_string(dir.join(format!("{node}.log"))) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("{node}.log ends with:");
            for line in &lines[lines.len().saturating_sub(8)..] {
                eprintln!("    {line}");
            }
        }
    }
    result
}

/// A running standalone node or pair and an NBD client of its primary.
struct Volume {
    // Dropped in this order: the daemons, the client, its runtime.
    setup: serve::Setup,
    client: NbdClient,
    runtime: tokio::runtime::Runtime,
    primary_control: PathBuf,
    secondary_control: PathBuf,
}

impl Volume {
    /// Starts the daemon(s) as `replctl serve` does, on stores known to be zeroes.
    fn start(
        context: &Context,
        dir: &Path,
        primary: &Store,
        secondary: Option<&Store>,
    ) -> anyhow::Result<Volume> {
        check_interrupted()?;
        let port = launch::free_port()?;
        let args = ServeArgs {
            disk: primary.path().to_path_buf(),
            nbd: format!("127.0.0.1:{port}"),
            peer_disk: secondary.map(|store| store.path().to_path_buf()),
            dir: dir.to_path_buf(),
            mode: context.options.mode.to_string(),
            io: "direct".into(),
            journal: Some(context.options.journal_bytes.to_string()),
            checksum_cache: None,
            zeroed: true,
            peer_zeroed: true,
            snapshots: false,
            snapshot_area: None,
        };
        let setup = {
            let _quiet = QuietStdout::new()?;
            serve::set_up(&args)?
        };
        anyhow::ensure!(
            setup.size_bytes == context.options.volume_bytes,
            "the volume exports {} bytes, expected {}",
            setup.size_bytes,
            context.options.volume_bytes
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let uri = format!("nbd://127.0.0.1:{port}/{RESOURCE}");
        let client = runtime.block_on(NbdClient::connect_with(
            &uri.parse()?,
            ConnectOptions::default(),
        ))?;
        Ok(Volume {
            setup,
            runtime,
            client,
            primary_control: dir.join("alpha.ctl"),
            secondary_control: dir.join("beta.ctl"),
        })
    }

    fn run_workloads(
        &self,
        context: &Context,
        label: &str,
    ) -> anyhow::Result<Vec<(Workload, Measurement)>> {
        let pool = Bytes::copy_from_slice(&context.pool);
        let target = Target::Nbd {
            runtime: &self.runtime,
            client: &self.client,
            pool: &pool,
        };
        let result = run_workloads(context, &target, label);
        // Leave no connection behind, whatever happened (bounded inside).
        let _ = self.runtime.block_on(self.client.disconnect());
        result
    }

    /// SIGTERM to every daemon (secondary first); each must exit cleanly, which
    /// applies its whole journal to the data area.
    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(secondary) = self.setup.secondary.as_mut() {
            stop_cleanly(secondary, "the secondary")?;
        }
        stop_cleanly(&mut self.setup.primary, "the primary")
    }
}

fn stop_cleanly(daemon: &mut NodeProcess, name: &str) -> anyhow::Result<()> {
    match daemon.stop() {
        Some(status) if status.success() => Ok(()),
        Some(status) => anyhow::bail!("{name} exited with {status} on SIGTERM"),
        None => anyhow::bail!("{name} did not stop within 30s of SIGTERM and was killed"),
    }
}

/// Discards what `create-md` prints on stdout while it lives (the progress lines say
/// the same): stdout carries the report only, which `--json` relies on. Its errors are
/// returned, not printed, so nothing of value is lost.
struct QuietStdout {
    saved: libc::c_int,
}

impl QuietStdout {
    fn new() -> anyhow::Result<QuietStdout> {
        std::io::stdout().flush()?;
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        // SAFETY: dup/dup2 on the process's standard output and a descriptor we own.
        let saved = unsafe { libc::dup(libc::STDOUT_FILENO) };
        anyhow::ensure!(
            saved >= 0,
            "dup(stdout): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: as above.
        unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) };
        Ok(QuietStdout { saved })
    }
}

impl Drop for QuietStdout {
    fn drop(&mut self) {
        let _ = std::io::stdout().flush();
        // SAFETY: restores the descriptor saved by `new` and closes the copy.
        unsafe {
            libc::dup2(self.saved, libc::STDOUT_FILENO);
            libc::close(self.saved);
        }
    }
}

/// Online verify on the primary: blocks found different between the replicas.
fn verify_online(context: &Context, control: &Path) -> anyhow::Result<u64> {
    check_interrupted()?;
    // Reads both replicas: allow for a slow disk (at least 10 MiB/s).
    let timeout = Duration::from_secs(120 + context.options.volume_bytes / (10 << 20));
    let mut client = Client::connect(control, timeout)?;
    let value = client.call(&Request::Verify {
        resource: RESOURCE.into(),
        repair: false,
    })?;
    value["out_of_sync_blocks"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("verify answered without out_of_sync_blocks: {value}"))
}

/// `invalidate` on the secondary, timed until the primary reports both in sync again.
fn time_rebuild(context: &Context, volume: &Volume) -> anyhow::Result<Rebuild> {
    let bytes = context.options.volume_bytes;
    let primary = &volume.primary_control;
    let before = serve::wait_for(
        primary,
        "the pair in sync before the rebuild",
        Duration::from_secs(30),
        launch::in_sync,
    )?;
    let sent_before = before.peer.as_ref().map_or(0, |peer| peer.resync_bytes);
    let timeout = Duration::from_secs(120 + bytes / (10 << 20));
    let started = Instant::now();
    launch::call(
        &volume.secondary_control,
        Request::Invalidate {
            resource: RESOURCE.into(),
        },
    )?;
    let mut transfer_started = None;
    let (finished, sent) = loop {
        check_interrupted()?;
        let status = launch::status(primary, serve::RESOURCE)?;
        let now = Instant::now();
        let peer = status.peer.as_ref();
        let sent = peer.map_or(0, |p| p.resync_bytes.saturating_sub(sent_before));
        if transfer_started.is_none()
            && (sent > 0 || peer.is_some_and(|p| p.replication == "SyncSource"))
        {
            transfer_started = Some(now);
        }
        // Resync counters only grow once the session after `invalidate` started: a
        // status from before the secondary dropped the connection cannot pass.
        if sent > 0 && launch::in_sync(&status) {
            break (now, sent);
        }
        if now - started > timeout {
            anyhow::bail!(
                "the rebuild did not finish within {timeout:?}:\n{}",
                crate::admin::render_status(&status)
            );
        }
        if let Some(percent) = peer.and_then(|p| p.done_percent) {
            context
                .reporter
                .live(&format!("full rebuild: {percent:.1}% done"));
        }
        std::thread::sleep(REBUILD_POLL);
    };
    anyhow::ensure!(
        sent >= bytes,
        "the rebuild sent {sent} bytes of block data for a {bytes}-byte volume: blocks that \
         travel as zero markers or are skipped would flatter the figure"
    );
    serve::wait_for(
        &volume.secondary_control,
        "the secondary UpToDate after the rebuild",
        Duration::from_secs(30),
        |status| status.disk == "UpToDate",
    )?;
    let seconds = (finished - started).as_secs_f64();
    Ok(Rebuild {
        bytes,
        data_bytes_sent: sent,
        seconds,
        reconnect_seconds: transfer_started.map_or(0.0, |t| (t - started).as_secs_f64()),
        mib_per_second: bytes as f64 / MIB / seconds,
        raw_copy_seconds: 0.0,
        raw_copy_mib_per_second: 0.0,
        raw_copy_method: String::new(),
        ratio_to_raw_copy: 0.0,
    })
}

// ---------------------------------------------------------------------------------
// Stores: image files, loop devices, directories
// ---------------------------------------------------------------------------------

/// The private work directory: removed on drop, after detaching any loop device still
/// backed by a file in it.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(parent: &Path) -> anyhow::Result<WorkDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = parent.join(format!("replctl-bench-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir(&path)
            .map_err(|error| anyhow::anyhow!("cannot create {}: {error}", path.display()))?;
        *WORK_DIR.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.clone());
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let mut registered = WORK_DIR.lock().unwrap_or_else(|p| p.into_inner());
        detach_loops_under(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
        *registered = None;
    }
}

/// A configuration's directory (configs, sockets, logs), removed on drop.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh (sparse, all-zero) image file, behind a loop device when root. Drop
/// detaches the device, then removes the file.
struct Store {
    device: Option<LoopDevice>,
    image: Scratch,
}

impl Store {
    fn create(dir: &Path, name: &str, context: &Context) -> anyhow::Result<Store> {
        check_interrupted()?;
        let image = Scratch(dir.join(format!("{name}.img")));
        engine::volume::create_image_file(&image.0, context.options.size_bytes)
            .map_err(|error| anyhow::anyhow!("cannot create {}: {error}", image.0.display()))?;
        let device = if context.loops {
            Some(LoopDevice::attach(&image.0)?)
        } else {
            None
        };
        Ok(Store { device, image })
    }

    fn path(&self) -> &Path {
        self.device
            .as_ref()
            .map_or(&self.image.0, |device| &device.0)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // The device goes before the file (field order would drop the device first
        // too; spelled out because it matters).
        self.device.take();
    }
}

/// A loop device we attached; detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(image: &Path) -> anyhow::Result<LoopDevice> {
        let mut command = Command::new("losetup");
        command
            .args(["--find", "--show", "--direct-io=on"])
            .arg(image);
        let output = run_command(&mut command, Duration::from_secs(30));
        let device = match output {
            Ok(text) if text.trim().starts_with("/dev/") => PathBuf::from(text.trim()),
            other => {
                // It may have attached a device before failing or timing out.
                detach_loops_of(image);
                anyhow::bail!(
                    "losetup could not attach {}: {}",
                    image.display(),
                    match other {
                        Ok(text) => format!("unexpected output {text:?}"),
                        Err(error) => error.to_string(),
                    }
                );
            }
        };
        Ok(LoopDevice(device))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = run_command(
            Command::new("losetup").arg("--detach").arg(&self.0),
            Duration::from_secs(30),
        );
    }
}

/// Detaches every loop device backed by `image` (only ever files we created).
fn detach_loops_of(image: &Path) {
    let Ok(list) = run_command(
        Command::new("losetup").arg("--associated").arg(image),
        Duration::from_secs(30),
    ) else {
        return;
    };
    for line in list.lines() {
        if let Some(device) = line.split(':').next().filter(|d| d.starts_with("/dev/")) {
            let _ = run_command(
                Command::new("losetup").arg("--detach").arg(device),
                Duration::from_secs(30),
            );
        }
    }
}

/// [`detach_loops_of`] for every image file below `dir`.
fn detach_loops_under(dir: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            detach_loops_under(&path);
        } else if path.extension().is_some_and(|e| e == "img") {
            detach_loops_of(&path);
        }
    }
}

/// Runs a short command with a bounded wait; its stdout, or an error with its stderr.
fn run_command(command: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| anyhow::anyhow!("cannot run {description}: {error}"))?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{description} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "{description} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

// ---------------------------------------------------------------------------------
// Sequential transfers: comparison and raw copy
// ---------------------------------------------------------------------------------

fn open_direct(path: &Path) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(backend::open(
        path,
        OpenOptions {
            kind: BackendKind::Uring,
            direct: true,
        },
    )?)
}

/// Reads `buf.len()` bytes at `offset` as parallel chunks.
fn read_chunks(store: &dyn Backend, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
    let mut ops: Vec<ReadOp<'_>> = buf
        .chunks_mut(CHUNK_BYTES)
        .enumerate()
        .map(|(index, part)| ReadOp {
            offset: offset + (index * CHUNK_BYTES) as u64,
            buf: part,
        })
        .collect();
    Ok(store.read_many(&mut ops)?)
}

/// Writes `buf` at `offset` as parallel chunks.
fn write_chunks(store: &dyn Backend, offset: u64, buf: &[u8]) -> anyhow::Result<()> {
    let ops: Vec<WriteOp<'_>> = buf
        .chunks(CHUNK_BYTES)
        .enumerate()
        .map(|(index, part)| WriteOp {
            offset: offset + (index * CHUNK_BYTES) as u64,
            buf: part,
        })
        .collect();
    Ok(store.write_many(&ops)?)
}

/// First differing byte of the first `bytes` bytes of two stores (O_DIRECT), if any.
fn compare_stores(a: &Path, b: &Path, bytes: u64) -> anyhow::Result<Option<u64>> {
    let (a, b) = (open_direct(a)?, open_direct(b)?);
    let batch = CHUNK_BYTES * CHUNKS_PER_BATCH;
    let mut buf_a = AlignedBuf::zeroed(batch, 4096);
    let mut buf_b = AlignedBuf::zeroed(batch, 4096);
    let mut offset = 0u64;
    while offset < bytes {
        check_interrupted()?;
        let len = batch.min((bytes - offset) as usize);
        read_chunks(&*a, offset, &mut buf_a[..len])?;
        read_chunks(&*b, offset, &mut buf_b[..len])?;
        if let Some(index) = buf_a[..len]
            .iter()
            .zip(&buf_b[..len])
            .position(|(x, y)| x != y)
        {
            return Ok(Some(offset + index as u64));
        }
        offset += len as u64;
    }
    Ok(None)
}

struct Copy {
    seconds: f64,
    method: String,
}

/// The raw baseline of the rebuild: `bytes` of `source` copied to a fresh scratch file
/// with O_DIRECT, reads overlapped with writes, ending with fdatasync.
fn raw_copy(source: &Path, scratch: &Path, bytes: u64) -> anyhow::Result<Copy> {
    check_interrupted()?;
    let file = std::fs::File::create(scratch)
        .map_err(|error| anyhow::anyhow!("cannot create {}: {error}", scratch.display()))?;
    // Allocate up front: the rebuild's target was allocated by the fill too.
    // SAFETY: fallocate on a valid descriptor we own.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, bytes as libc::off_t) } != 0 {
        file.set_len(bytes)?;
    }
    drop(file);
    let (source_store, target_store) = (open_direct(source)?, open_direct(scratch)?);
    let (reader, writer): (&dyn Backend, &dyn Backend) = (&*source_store, &*target_store);
    let batch = CHUNK_BYTES * CHUNKS_PER_BATCH;
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let (full_tx, full_rx) = mpsc::sync_channel::<(u64, usize, AlignedBuf)>(2);
        let (empty_tx, empty_rx) = mpsc::channel::<AlignedBuf>();
        for _ in 0..3 {
            empty_tx.send(AlignedBuf::zeroed(batch, 4096))?;
        }
        let reading = scope.spawn(move || -> anyhow::Result<()> {
            let mut offset = 0u64;
            while offset < bytes {
                check_interrupted()?;
                // The writer hung up: it failed, and says why.
                let Ok(mut buf) = empty_rx.recv() else {
                    return Ok(());
                };
                let len = batch.min((bytes - offset) as usize);
                read_chunks(reader, offset, &mut buf[..len])?;
                if full_tx.send((offset, len, buf)).is_err() {
                    return Ok(());
                }
                offset += len as u64;
            }
            Ok(())
        });
        let written = (|| -> anyhow::Result<u64> {
            let mut written = 0u64;
            for (offset, len, buf) in full_rx {
                write_chunks(writer, offset, &buf[..len])?;
                written += len as u64;
                let _ = empty_tx.send(buf);
            }
            writer.flush()?;
            Ok(written)
        })();
        drop(empty_tx);
        reading
            .join()
            .map_err(|_| anyhow::anyhow!("the copy's reader panicked"))??;
        let written = written?;
        anyhow::ensure!(written == bytes, "the copy stopped after {written} bytes");
        Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let direct = reader.is_direct() && writer.is_direct();
    Ok(Copy {
        seconds,
        method: format!(
            "{} read of the primary's store, write to a scratch file, {} MiB batches of 1 MiB requests, reads overlapped with writes, fdatasync at the end{}",
            reader.kind(),
            batch >> 20,
            if direct { ", O_DIRECT" } else { ", buffered (O_DIRECT refused)" }
        ),
    })
}

// ---------------------------------------------------------------------------------
// The load generator
// ---------------------------------------------------------------------------------

/// What the benchmark measures. `Fill` is the unmeasured sequential fill that starts
/// every configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Fill,
    RandomWrite4kQd32,
    RandomWrite4kQd1,
    SequentialWrite1mQd8,
    RandomRead4kQd32,
    WriteFlush32,
}

impl Workload {
    const MEASURED: [Workload; 5] = [
        Workload::RandomWrite4kQd32,
        Workload::RandomWrite4kQd1,
        Workload::SequentialWrite1mQd8,
        Workload::RandomRead4kQd32,
        Workload::WriteFlush32,
    ];

    fn key(self) -> &'static str {
        match self {
            Workload::Fill => "fill",
            Workload::RandomWrite4kQd32 => "rw4k_qd32",
            Workload::RandomWrite4kQd1 => "rw4k_qd1",
            Workload::SequentialWrite1mQd8 => "sw1m_qd8",
            Workload::RandomRead4kQd32 => "rr4k_qd32",
            Workload::WriteFlush32 => "rw4k_flush32",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Workload::Fill => "sequential fill with random data (1M QD8)",
            Workload::RandomWrite4kQd32 => "4k random write QD32",
            Workload::RandomWrite4kQd1 => "4k random write QD1",
            Workload::SequentialWrite1mQd8 => "1M sequential write QD8",
            Workload::RandomRead4kQd32 => "4k random read QD32",
            Workload::WriteFlush32 => "4k random write QD1, flush every 32",
        }
    }

    fn block_bytes(self) -> u64 {
        match self {
            Workload::Fill | Workload::SequentialWrite1mQd8 => CHUNK_BYTES as u64,
            _ => BLOCK_BYTES,
        }
    }

    fn queue_depth(self) -> usize {
        match self {
            Workload::RandomWrite4kQd32 | Workload::RandomRead4kQd32 => 32,
            Workload::Fill | Workload::SequentialWrite1mQd8 => 8,
            Workload::RandomWrite4kQd1 | Workload::WriteFlush32 => 1,
        }
    }

    /// Progress and summaries in MiB/s rather than IOPS.
    fn in_bytes(self) -> bool {
        matches!(self, Workload::Fill | Workload::SequentialWrite1mQd8)
    }
}

/// One request.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `len` bytes of the payload pool from `pattern` written at `offset`.
    Write {
        offset: u64,
        len: usize,
        pattern: usize,
    },
    Read {
        offset: u64,
        len: usize,
    },
    Flush,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write { offset, len, .. } => write!(f, "write of {len} bytes at offset {offset}"),
            Op::Read { offset, len } => write!(f, "read of {len} bytes at offset {offset}"),
            Op::Flush => f.write_str("flush"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Timing {
    warmup: Duration,
    runtime: Duration,
}

/// One run of one workload, shared by its workers.
struct Plan {
    workload: Workload,
    span_bytes: u64,
    /// Completions from here on count (`None`: all, for the fill).
    measure_from: Option<Instant>,
    /// No request starts after this, and completions after it do not count.
    end: Option<Instant>,
    /// Next offset of the sequential workloads.
    cursor: AtomicU64,
    /// Set by the first worker that fails, to stop the others.
    halted: AtomicBool,
    /// Progress: requests and bytes completed (including the warm-up).
    completed_ops: AtomicU64,
    completed_bytes: AtomicU64,
}

impl Plan {
    fn new(workload: Workload, span_bytes: u64, timing: Option<Timing>) -> Plan {
        let now = Instant::now();
        let measure_from = timing.map(|t| now + t.warmup);
        Plan {
            workload,
            span_bytes,
            measure_from,
            end: timing.and_then(|t| measure_from.map(|from| from + t.runtime)),
            cursor: AtomicU64::new(0),
            halted: AtomicBool::new(false),
            completed_ops: AtomicU64::new(0),
            completed_bytes: AtomicU64::new(0),
        }
    }

    fn in_window(&self, finished: Instant) -> bool {
        self.measure_from.is_none_or(|from| finished >= from)
            && self.end.is_none_or(|end| finished <= end)
    }

    /// The failure of one worker stops them all.
    fn fail(&self, op: Op, error: impl fmt::Display) -> anyhow::Error {
        self.halted.store(true, Ordering::Relaxed);
        anyhow::anyhow!("{op} failed: {error}")
    }
}

/// One worker's request generator.
struct Stream<'a> {
    plan: &'a Plan,
    rng: SplitMix64,
    writes_since_flush: u32,
}

impl<'a> Stream<'a> {
    fn new(plan: &'a Plan, worker: usize) -> Stream<'a> {
        let seed = (plan.workload as u64) << 32 | worker as u64;
        Stream {
            plan,
            rng: SplitMix64::new(seed ^ 0x5eed),
            writes_since_flush: 0,
        }
    }

    /// The next request, or `None` when the worker is done.
    fn next(&mut self) -> Option<Op> {
        let plan = self.plan;
        if plan.halted.load(Ordering::Relaxed) || interrupted() {
            return None;
        }
        if plan.end.is_some_and(|end| Instant::now() >= end) {
            return None;
        }
        let block = plan.workload.block_bytes();
        Some(match plan.workload {
            Workload::Fill => {
                let offset = plan.cursor.fetch_add(block, Ordering::Relaxed);
                if offset >= plan.span_bytes {
                    return None;
                }
                self.write(offset, block.min(plan.span_bytes - offset))
            }
            Workload::SequentialWrite1mQd8 => {
                let region = plan.span_bytes / block * block;
                let offset = plan.cursor.fetch_add(block, Ordering::Relaxed) % region;
                self.write(offset, block)
            }
            Workload::RandomRead4kQd32 => Op::Read {
                offset: self.random_offset(block),
                len: block as usize,
            },
            Workload::WriteFlush32 if self.writes_since_flush == FLUSH_EVERY => {
                self.writes_since_flush = 0;
                Op::Flush
            }
            Workload::WriteFlush32 => {
                self.writes_since_flush += 1;
                let offset = self.random_offset(block);
                self.write(offset, block)
            }
            Workload::RandomWrite4kQd32 | Workload::RandomWrite4kQd1 => {
                let offset = self.random_offset(block);
                self.write(offset, block)
            }
        })
    }

    fn random_offset(&mut self, block: u64) -> u64 {
        self.rng.below(self.plan.span_bytes / block) * block
    }

    fn write(&mut self, offset: u64, len: u64) -> Op {
        let len = len as usize;
        let slots = (POOL_BYTES - len) / BLOCK_BYTES as usize + 1;
        Op::Write {
            offset,
            len,
            pattern: self.rng.below(slots as u64) as usize * BLOCK_BYTES as usize,
        }
    }
}

/// What one worker completed in the measured window.
#[derive(Debug, Default)]
struct Tally {
    ops: u64,
    bytes: u64,
    latencies_ns: Vec<u64>,
    flushes: u64,
    flush_ns: u64,
}

impl Tally {
    fn record(&mut self, plan: &Plan, op: Op, started: Instant, finished: Instant) {
        let bytes = match op {
            Op::Write { len, .. } | Op::Read { len, .. } => len as u64,
            Op::Flush => 0,
        };
        plan.completed_ops.fetch_add(1, Ordering::Relaxed);
        plan.completed_bytes.fetch_add(bytes, Ordering::Relaxed);
        if !plan.in_window(finished) {
            return;
        }
        let nanos = u64::try_from((finished - started).as_nanos()).unwrap_or(u64::MAX);
        match op {
            Op::Flush => {
                self.flushes += 1;
                self.flush_ns += nanos;
            }
            Op::Write { .. } | Op::Read { .. } => {
                self.ops += 1;
                self.bytes += bytes;
                self.latencies_ns.push(nanos);
            }
        }
    }
}

/// Where the requests go.
enum Target<'a> {
    /// The backing store itself, through Linux native AIO from this thread.
    Raw {
        file: &'a std::fs::File,
        pool: &'a AlignedBuf,
    },
    /// The primary's NBD export: one task per request in flight, one connection.
    Nbd {
        runtime: &'a tokio::runtime::Runtime,
        client: &'a NbdClient,
        pool: &'a Bytes,
    },
}

impl Target<'_> {
    /// Runs `plan` to its end; the first failure is the error.
    fn drive(&self, plan: &Arc<Plan>) -> anyhow::Result<Vec<Tally>> {
        let depth = plan.workload.queue_depth();
        let results: Vec<anyhow::Result<Tallies>> = match self {
            Target::Raw { file, pool } => vec![RawRun::new(file, plan, pool)?.run()],
            Target::Nbd {
                runtime,
                client,
                pool,
            } => runtime.block_on(async {
                let workers: Vec<_> = (0..depth)
                    .map(|worker| {
                        let (client, plan, pool) =
                            ((*client).clone(), plan.clone(), (*pool).clone());
                        tokio::spawn(nbd_worker(client, plan, pool, worker))
                    })
                    .collect();
                let mut results = Vec::with_capacity(depth);
                for worker in workers {
                    results.push(
                        worker
                            .await
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked"))),
                    );
                }
                results
            }),
        };
        check_interrupted()?;
        let mut tallies = Vec::new();
        for result in results {
            match result? {
                Tallies::One(tally) => tallies.push(tally),
                Tallies::Many(many) => tallies.extend(many),
            }
        }
        Ok(tallies)
    }
}

/// What a driver returns: an NBD worker tallies its one slot, the AIO loop all of them.
enum Tallies {
    One(Tally),
    Many(Vec<Tally>),
}

async fn nbd_worker(
    client: NbdClient,
    plan: Arc<Plan>,
    pool: Bytes,
    worker: usize,
) -> anyhow::Result<Tallies> {
    let mut stream = Stream::new(&plan, worker);
    let mut tally = Tally::default();
    while let Some(op) = stream.next() {
        let started = Instant::now();
        let result = match op {
            Op::Write {
                offset,
                len,
                pattern,
            } => {
                client
                    .write(offset, pool.slice(pattern..pattern + len), false)
                    .await
            }
            Op::Read { offset, len } => client.read(offset, len as u32).await.map(drop),
            Op::Flush => client.flush().await,
        };
        result.map_err(|error| plan.fail(op, error))?;
        tally.record(&plan, op, started, Instant::now());
    }
    Ok(Tallies::One(tally))
}

/// The raw row's driver: one request slot per queue-depth unit, each with its own
/// [`Stream`], kept busy through one AIO context from this thread. A slot's next
/// request is submitted as soon as its previous one completes; a flush (QD1
/// workloads) is a synchronous fdatasync.
struct RawRun<'a> {
    // First, so it is dropped (io_destroy waits for in-flight requests) before the
    // buffers and control blocks the kernel may still be using.
    aio: Aio,
    file: &'a std::fs::File,
    plan: &'a Plan,
    pool: &'a AlignedBuf,
    streams: Vec<Stream<'a>>,
    tallies: Vec<Tally>,
    /// Per slot: the read buffer and the control block of the request in flight.
    read_bufs: Vec<AlignedBuf>,
    iocbs: Box<[Iocb]>,
    in_flight: Vec<Option<(Op, Instant)>>,
}

impl<'a> RawRun<'a> {
    fn new(file: &'a std::fs::File, plan: &'a Plan, pool: &'a AlignedBuf) -> anyhow::Result<Self> {
        let depth = plan.workload.queue_depth();
        let block = plan.workload.block_bytes() as usize;
        Ok(RawRun {
            aio: Aio::new(depth)?,
            file,
            plan,
            pool,
            streams: (0..depth).map(|slot| Stream::new(plan, slot)).collect(),
            tallies: (0..depth).map(|_| Tally::default()).collect(),
            read_bufs: (0..depth)
                .map(|_| AlignedBuf::zeroed(block, 4096))
                .collect(),
            iocbs: vec![Iocb::default(); depth].into_boxed_slice(),
            in_flight: vec![None; depth],
        })
    }

    fn run(mut self) -> anyhow::Result<Tallies> {
        let mut failure = None;
        for slot in 0..self.in_flight.len() {
            if let Err(error) = self.start(slot) {
                failure = Some(error);
                break;
            }
        }
        let mut events = vec![IoEvent::default(); self.in_flight.len()];
        // Every request submitted is reaped before this returns, failure or not.
        while self.aio.in_flight > 0 {
            let completed = self.aio.wait(&mut events)?;
            let finished = Instant::now();
            for event in &events[..completed] {
                let slot = event.data as usize;
                let Some((op, started)) = self.in_flight.get_mut(slot).and_then(Option::take)
                else {
                    anyhow::bail!("AIO completed an unknown request {}", event.data);
                };
                let expected = match op {
                    Op::Write { len, .. } | Op::Read { len, .. } => len as i64,
                    Op::Flush => 0,
                };
                let outcome = if event.res < 0 {
                    Err(std::io::Error::from_raw_os_error(-event.res as i32))
                } else if event.res != expected {
                    Err(std::io::Error::other(format!(
                        "short transfer of {} bytes",
                        event.res
                    )))
                } else {
                    Ok(())
                };
                match outcome {
                    Ok(()) => self.tallies[slot].record(self.plan, op, started, finished),
                    Err(error) if failure.is_none() => failure = Some(self.plan.fail(op, error)),
                    Err(_) => {}
                }
                if failure.is_none() {
                    if let Err(error) = self.start(slot) {
                        failure = Some(error);
                    }
                }
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(Tallies::Many(std::mem::take(&mut self.tallies))),
        }
    }

    /// Submits `slot`'s next request (after any flushes it asks for first).
    fn start(&mut self, slot: usize) -> anyhow::Result<()> {
        loop {
            let Some(op) = self.streams[slot].next() else {
                return Ok(());
            };
            let started = Instant::now();
            let (opcode, buf, len, offset) = match op {
                Op::Flush => {
                    // SAFETY: fdatasync on a descriptor we hold open.
                    if unsafe { libc::fdatasync(self.file.as_raw_fd()) } != 0 {
                        return Err(self.plan.fail(op, std::io::Error::last_os_error()));
                    }
                    self.tallies[slot].record(self.plan, op, started, Instant::now());
                    continue;
                }
                Op::Write {
                    offset,
                    len,
                    pattern,
                } => (IOCB_CMD_PWRITE, self.pool[pattern..].as_ptr(), len, offset),
                Op::Read { offset, len } => (
                    IOCB_CMD_PREAD,
                    self.read_bufs[slot].as_mut_ptr().cast_const(),
                    len,
                    offset,
                ),
            };
            self.iocbs[slot] = Iocb {
                data: slot as u64,
                opcode,
                fd: self.file.as_raw_fd() as u32,
                buf: buf as u64,
                bytes: len as u64,
                offset: offset as i64,
                ..Iocb::default()
            };
            self.in_flight[slot] = Some((op, started));
            // SAFETY: the control block and the buffer it points to (the shared pool,
            // or this slot's read buffer, which nothing else touches) live in `self`
            // or outlive it, and `self.aio` is dropped first, which waits for every
            // request in flight; the slot is not reused before its completion.
            if let Err(error) = unsafe { self.aio.submit(&mut self.iocbs[slot]) } {
                self.in_flight[slot] = None;
                return Err(self.plan.fail(op, error));
            }
            return Ok(());
        }
    }
}

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;

/// `struct iocb` of the kernel's AIO ABI (`linux/aio_abi.h`); `key` and `rw_flags`
/// swap places on big-endian machines, and both stay zero here.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Iocb {
    data: u64,
    key: u32,
    rw_flags: u32,
    opcode: u16,
    priority: i16,
    fd: u32,
    buf: u64,
    bytes: u64,
    offset: i64,
    reserved: u64,
    flags: u32,
    result_fd: u32,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);

/// `struct io_event` of the kernel's AIO ABI.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    object: u64,
    res: i64,
    res2: i64,
}

const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);

/// A Linux AIO context (`io_setup`) and the count of its requests in flight.
struct Aio {
    context: libc::c_ulong,
    in_flight: usize,
}

impl Aio {
    fn new(depth: usize) -> anyhow::Result<Aio> {
        let mut context: libc::c_ulong = 0;
        // SAFETY: io_setup writes the new context id through the pointer to a live local.
        let rc = unsafe { libc::syscall(libc::SYS_io_setup, depth as libc::c_long, &mut context) };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            anyhow::bail!("io_setup({depth}) failed: {error} (is fs.aio-max-nr exhausted?)");
        }
        Ok(Aio {
            context,
            in_flight: 0,
        })
    }

    /// Submits one request.
    ///
    /// # Safety
    /// `iocb` and the buffer it names must stay valid and untouched by anyone else until
    /// the request's completion has been reaped by [`Aio::wait`] or the context dropped.
    unsafe fn submit(&mut self, iocb: &mut Iocb) -> std::io::Result<()> {
        let mut list = [iocb as *mut Iocb];
        loop {
            // SAFETY: a one-element array of a valid control block (the caller's
            // guarantee); the context is ours.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.context,
                    1 as libc::c_long,
                    list.as_mut_ptr(),
                )
            };
            match rc {
                1 => {
                    self.in_flight += 1;
                    return Ok(());
                }
                -1 if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {}
                -1 => return Err(std::io::Error::last_os_error()),
                other => {
                    return Err(std::io::Error::other(format!(
                        "io_submit accepted {other} of 1 requests"
                    )))
                }
            }
        }
    }

    /// Waits for at least one completion; returns how many landed in `events`.
    fn wait(&mut self, events: &mut [IoEvent]) -> anyhow::Result<usize> {
        loop {
            // SAFETY: `events` is a live, writable array of `events.len()` io_events;
            // no timeout (null): requests in flight always complete.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.context,
                    1 as libc::c_long,
                    events.len() as libc::c_long,
                    events.as_mut_ptr(),
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            if rc >= 0 {
                let completed = rc as usize;
                self.in_flight -= completed.min(self.in_flight);
                return Ok(completed);
            }
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EINTR) {
                anyhow::bail!("io_getevents failed: {error}");
            }
        }
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        // SAFETY: destroys our own context; the kernel cancels or waits for every
        // request still in flight before it returns, so no buffer is used afterwards.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.context) };
    }
}

/// The fill, then every measured workload, on `target`.
fn run_workloads(
    context: &Context,
    target: &Target<'_>,
    label: &str,
) -> anyhow::Result<Vec<(Workload, Measurement)>> {
    let fill = measure(context, target, label, Workload::Fill, None)?;
    context.reporter.step(&format!(
        "{label}: filled {} with random data at {:.0} MiB/s",
        human_bytes(fill.bytes),
        fill.mib_per_second
    ));
    let mut results = vec![(Workload::Fill, fill)];
    for workload in Workload::MEASURED {
        let measurement = measure(context, target, label, workload, Some(context.timing()))?;
        context.reporter.step(&format!(
            "{label}: {}: {}",
            workload.title(),
            measurement.summary(workload)
        ));
        results.push((workload, measurement));
    }
    Ok(results)
}

/// Runs one workload with a live progress line.
fn measure(
    context: &Context,
    target: &Target<'_>,
    label: &str,
    workload: Workload,
    timing: Option<Timing>,
) -> anyhow::Result<Measurement> {
    check_interrupted()?;
    let plan = Arc::new(Plan::new(workload, context.options.volume_bytes, timing));
    let started = Instant::now();
    let done = AtomicBool::new(false);
    let tallies = std::thread::scope(|scope| {
        let ticker = scope.spawn(|| {
            let mut last = (Instant::now(), 0u64, 0u64);
            loop {
                std::thread::park_timeout(Duration::from_millis(500));
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let now = Instant::now();
                let ops = plan.completed_ops.load(Ordering::Relaxed);
                let bytes = plan.completed_bytes.load(Ordering::Relaxed);
                let seconds = (now - last.0).as_secs_f64().max(1e-3);
                let rate = if workload.in_bytes() {
                    format!("{:.0} MiB/s", (bytes - last.2) as f64 / MIB / seconds)
                } else {
                    format!("{:.0} IOPS", (ops - last.1) as f64 / seconds)
                };
                let phase = match plan.measure_from {
                    Some(from) if now < from => "warming up",
                    Some(_) => "measuring",
                    None => "filling",
                };
                context
                    .reporter
                    .live(&format!("{label}: {}: {phase}: {rate}", workload.title()));
                last = (now, ops, bytes);
            }
        });
        let result = target.drive(&plan);
        done.store(true, Ordering::Relaxed);
        ticker.thread().unpark();
        result
    });
    let tallies =
        tallies.map_err(|error| error.context(format!("{label}: {}", workload.title())))?;
    let seconds = match timing {
        Some(timing) => timing.runtime.as_secs_f64(),
        None => started.elapsed().as_secs_f64(),
    };
    let measurement = Measurement::new(tallies, seconds);
    anyhow::ensure!(
        measurement.ops > 0,
        "{label}: {}: no request completed in the measured window",
        workload.title()
    );
    Ok(measurement)
}

// ---------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------

/// One workload's figures, over its measured window.
#[derive(Debug, Clone, Serialize)]
struct Measurement {
    ops: u64,
    bytes: u64,
    seconds: f64,
    iops: f64,
    mib_per_second: f64,
    latency_us_mean: f64,
    latency_us_p50: f64,
    latency_us_p99: f64,
    latency_us_max: f64,
    flushes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    flush_latency_us_mean: Option<f64>,
}

impl Measurement {
    fn new(tallies: Vec<Tally>, seconds: f64) -> Measurement {
        let mut latencies = Vec::new();
        let (mut ops, mut bytes, mut flushes, mut flush_ns) = (0, 0, 0, 0);
        for tally in tallies {
            ops += tally.ops;
            bytes += tally.bytes;
            flushes += tally.flushes;
            flush_ns += tally.flush_ns;
            latencies.extend(tally.latencies_ns);
        }
        latencies.sort_unstable();
        let percentile = |p: f64| -> f64 {
            if latencies.is_empty() {
                return 0.0;
            }
            let rank = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len());
            latencies[rank - 1] as f64 / 1000.0
        };
        let mean = if latencies.is_empty() {
            0.0
        } else {
            latencies.iter().sum::<u64>() as f64 / latencies.len() as f64 / 1000.0
        };
        Measurement {
            ops,
            bytes,
            seconds,
            iops: ops as f64 / seconds,
            mib_per_second: bytes as f64 / MIB / seconds,
            latency_us_mean: mean,
            latency_us_p50: percentile(0.50),
            latency_us_p99: percentile(0.99),
            latency_us_max: percentile(1.0),
            flushes,
            flush_latency_us_mean: (flushes > 0).then(|| flush_ns as f64 / flushes as f64 / 1000.0),
        }
    }

    fn summary(&self, workload: Workload) -> String {
        let rate = if workload.in_bytes() {
            format!("{:.0} MiB/s", self.mib_per_second)
        } else {
            format!("{:.0} IOPS", self.iops)
        };
        let flush = self
            .flush_latency_us_mean
            .map(|us| format!(", {} flushes, flush mean {us:.0}us", self.flushes))
            .unwrap_or_default();
        format!(
            "{rate} (latency p50 {:.0}us p99 {:.0}us{flush})",
            self.latency_us_p50, self.latency_us_p99
        )
    }
}

struct ConfigResult {
    name: &'static str,
    workloads: Vec<(Workload, Measurement)>,
    rebuild: Option<Rebuild>,
    /// How the row was measured, where it differs from the NBD rows.
    method: String,
}

impl ConfigResult {
    fn measurement(&self, workload: Workload) -> Option<&Measurement> {
        self.workloads
            .iter()
            .find(|(w, _)| *w == workload)
            .map(|(_, m)| m)
    }
}

#[derive(Debug, Clone, Serialize)]
struct Rebuild {
    /// The volume's bytes, all resynced.
    bytes: u64,
    /// Block data the primary sent (zero markers and skipped blocks excluded).
    data_bytes_sent: u64,
    /// From the `invalidate` request until the primary reported both in sync.
    seconds: f64,
    /// Of which until the resync started (reconnect and handshake).
    reconnect_seconds: f64,
    mib_per_second: f64,
    raw_copy_seconds: f64,
    raw_copy_mib_per_second: f64,
    raw_copy_method: String,
    ratio_to_raw_copy: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Replicas {
    identical: bool,
    /// Online verify on the primary after the workloads.
    verify_out_of_sync_blocks: u64,
    /// Data areas compared byte for byte after the rebuild and a clean shutdown.
    compared_bytes: u64,
    first_difference: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Column {
    key: &'static str,
    title: &'static str,
    unit: &'static str,
    higher_is_better: bool,
}

const COLUMNS: [Column; 7] = [
    Column {
        key: "rw4k_qd32_iops",
        title: "4k randW QD32",
        unit: "IOPS",
        higher_is_better: true,
    },
    Column {
        key: "rw4k_qd1_p50_us",
        title: "4k randW QD1",
        unit: "p50 us",
        higher_is_better: false,
    },
    Column {
        key: "rw4k_qd1_p99_us",
        title: "4k randW QD1",
        unit: "p99 us",
        higher_is_better: false,
    },
    Column {
        key: "sw1m_qd8_mib_s",
        title: "1M seqW QD8",
        unit: "MiB/s",
        higher_is_better: true,
    },
    Column {
        key: "rr4k_qd32_iops",
        title: "4k randR QD32",
        unit: "IOPS",
        higher_is_better: true,
    },
    Column {
        key: "rw4k_flush32_iops",
        title: "4k W+flush/32",
        unit: "IOPS",
        higher_is_better: true,
    },
    Column {
        key: "rebuild_mib_s",
        title: "full rebuild",
        unit: "MiB/s",
        higher_is_better: true,
    },
];

/// One line of the table: a configuration, or the ratio of two.
#[derive(Debug, Clone, Serialize)]
struct Row {
    name: String,
    /// Aligned with `columns`; `null` where not applicable (rebuild of a single store).
    cells: Vec<Option<f64>>,
}

impl Row {
    fn of(name: String, result: &ConfigResult) -> Row {
        let cell = |workload, pick: fn(&Measurement) -> f64| result.measurement(workload).map(pick);
        Row {
            name,
            cells: vec![
                cell(Workload::RandomWrite4kQd32, |m| m.iops),
                cell(Workload::RandomWrite4kQd1, |m| m.latency_us_p50),
                cell(Workload::RandomWrite4kQd1, |m| m.latency_us_p99),
                cell(Workload::SequentialWrite1mQd8, |m| m.mib_per_second),
                cell(Workload::RandomRead4kQd32, |m| m.iops),
                cell(Workload::WriteFlush32, |m| m.iops),
                result.rebuild.as_ref().map(|r| r.mib_per_second),
            ],
        }
    }

    fn ratio(name: &str, over: &Row, under: &Row) -> Row {
        Row {
            name: name.to_string(),
            cells: over
                .cells
                .iter()
                .zip(&under.cells)
                .map(|(a, b)| match (a, b) {
                    (Some(a), Some(b)) if *b > 0.0 => Some(a / b),
                    _ => None,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    size_bytes: u64,
    volume_bytes: u64,
    journal_bytes: u64,
    mode: String,
    runtime_seconds: f64,
    warmup_seconds: f64,
    cpus: usize,
    stores: String,
    file_system: String,
    raw_method: String,
    nbd_method: String,
    columns: Vec<Column>,
    rows: Vec<Row>,
    /// Throughput ratios below 1 and latency ratios above 1 are slower. The rebuild
    /// cell of `pair/raw` is the rebuild over the raw sequential copy.
    ratios: Vec<Row>,
    /// Every figure of every workload, per configuration.
    workloads: BTreeMap<String, BTreeMap<String, Measurement>>,
    rebuild: Rebuild,
    replicas: Replicas,
    notes: Vec<String>,
}

impl Report {
    fn new(
        context: &Context,
        file_system: &str,
        stores: &str,
        raw: ConfigResult,
        standalone: ConfigResult,
        (pair, replicas): (ConfigResult, Replicas),
    ) -> Report {
        let options = &context.options;
        let pair_name = format!("pair ({})", options.mode);
        let rows = vec![
            Row::of("raw".into(), &raw),
            Row::of("standalone".into(), &standalone),
            Row::of(pair_name.clone(), &pair),
        ];
        let rebuild = pair
            .rebuild
            .clone()
            .expect("the pair's result always has a rebuild");
        let mut pair_over_raw = Row::ratio("pair/raw", &rows[2], &rows[0]);
        if let Some(cell) = pair_over_raw.cells.last_mut() {
            *cell = Some(rebuild.ratio_to_raw_copy);
        }
        let ratios = vec![
            Row::ratio("standalone/raw", &rows[1], &rows[0]),
            pair_over_raw,
            Row::ratio("pair/standalone", &rows[2], &rows[1]),
        ];
        let workloads = [&raw, &standalone, &pair]
            .iter()
            .map(|result| {
                (
                    result.name.to_string(),
                    result
                        .workloads
                        .iter()
                        .map(|(w, m)| (w.key().to_string(), m.clone()))
                        .collect(),
                )
            })
            .collect();
        Report {
            size_bytes: options.size_bytes,
            volume_bytes: options.volume_bytes,
            journal_bytes: options.journal_bytes,
            mode: options.mode.to_string(),
            runtime_seconds: options.runtime.as_secs_f64(),
            warmup_seconds: options.warmup.as_secs_f64(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            stores: stores.to_string(),
            file_system: file_system.to_string(),
            raw_method: raw.method,
            nbd_method: "replctl's pipelined async NBD client, one TCP connection to 127.0.0.1, one request in flight per queue slot, on one thread".into(),
            columns: COLUMNS.to_vec(),
            rows,
            ratios,
            workloads,
            rebuild,
            replicas,
            notes: vec![
                "every configuration starts on fresh stores filled sequentially with random data".into(),
                "only requests completed in the measured window count; latency is per request, submission to reply".into(),
                "single samples on a shared machine: differences below ~30% are noise".into(),
            ],
        }
    }

    fn render(&self) -> String {
        let mut out = format!(
            "replctl bench: {} stores (volume {}), {} mode, {}s per workload after {}s warm-up, {} CPUs\n",
            human_bytes(self.size_bytes),
            human_bytes(self.volume_bytes),
            self.mode,
            self.runtime_seconds,
            self.warmup_seconds,
            self.cpus
        );
        out.push_str(&format!(
            "stores:   {} on {}, fresh and filled with random data per configuration\n",
            self.stores, self.file_system
        ));
        out.push_str(&format!("raw row:  {}\n", self.raw_method));
        out.push_str(&format!("NBD rows: {}\n\n", self.nbd_method));
        out.push_str(&render_table(&self.rows, format_value));
        out.push_str("\nratios (throughput: below 1 is slower; latency: above 1 is slower)\n");
        out.push_str(&render_table(&self.ratios, |_, value| {
            format!("{value:.2}x")
        }));
        let rebuild = &self.rebuild;
        out.push_str(&format!(
            "\nrebuild:  invalidate on the secondary, {} pulled in {:.2}s ({:.2}s of it reconnecting) = {:.0} MiB/s\n",
            human_bytes(rebuild.bytes),
            rebuild.seconds,
            rebuild.reconnect_seconds,
            rebuild.mib_per_second
        ));
        out.push_str(&format!(
            "          raw sequential copy of the same bytes: {:.0} MiB/s ({}); rebuild/copy = {:.2}x (target >= 0.8x)\n",
            rebuild.raw_copy_mib_per_second, rebuild.raw_copy_method, rebuild.ratio_to_raw_copy
        ));
        let replicas = &self.replicas;
        out.push_str(&format!(
            "replicas: {}: online verify after the workloads found {} blocks different; data areas ({}) compared byte for byte after the rebuild and a clean shutdown: {}\n",
            if replicas.identical { "identical" } else { "DIFFERENT" },
            replicas.verify_out_of_sync_blocks,
            human_bytes(replicas.compared_bytes),
            match replicas.first_difference {
                None => "equal".to_string(),
                Some(offset) => format!("first difference at byte {offset}"),
            }
        ));
        for note in &self.notes {
            out.push_str(&format!("note:     {note}\n"));
        }
        out
    }
}

fn format_value(column: &Column, value: f64) -> String {
    match column.unit {
        "IOPS" => format!("{value:.0}"),
        _ if value < 100.0 => format!("{value:.1}"),
        _ => format!("{value:.0}"),
    }
}

/// A fixed-width table: a header of two lines (title, unit), then one line per row,
/// `-` where a cell does not apply.
fn render_table(rows: &[Row], format: impl Fn(&Column, f64) -> String) -> String {
    let name_width = rows
        .iter()
        .map(|row| row.name.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let widths: Vec<usize> = COLUMNS
        .iter()
        .map(|column| column.title.len().max(column.unit.len()).max(9))
        .collect();
    let mut out = String::new();
    for line in [0, 1] {
        out.push_str(&format!(
            "{:<name_width$}",
            if line == 0 { "config" } else { "" }
        ));
        for (column, width) in COLUMNS.iter().zip(&widths) {
            let text = if line == 0 { column.title } else { column.unit };
            out.push_str(&format!("  {text:>width$}"));
        }
        out.push('\n');
    }
    for row in rows {
        out.push_str(&format!("{:<name_width$}", row.name));
        for ((column, width), cell) in COLUMNS.iter().zip(&widths).zip(&row.cells) {
            let text = cell.map_or_else(|| "-".to_string(), |value| format(column, value));
            out.push_str(&format!("  {text:>width$}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally_of(latencies_us: impl IntoIterator<Item = u64>) -> Tally {
        let latencies_ns: Vec<u64> = latencies_us.into_iter().map(|us| us * 1000).collect();
        Tally {
            ops: latencies_ns.len() as u64,
            bytes: latencies_ns.len() as u64 * BLOCK_BYTES,
            latencies_ns,
            flushes: 2,
            flush_ns: 3_000_000,
        }
    }

    #[test]
    fn measurement_merges_workers_and_takes_nearest_rank_percentiles() {
        // Two workers: 1..=50 us and 51..=100 us, over 2 seconds.
        let measurement = Measurement::new(vec![tally_of(1..=50), tally_of(51..=100)], 2.0);
        assert_eq!(measurement.ops, 100);
        assert_eq!(measurement.iops, 50.0);
        assert_eq!(measurement.mib_per_second, 100.0 * 4096.0 / MIB / 2.0);
        assert_eq!(measurement.latency_us_p50, 50.0);
        assert_eq!(measurement.latency_us_p99, 99.0);
        assert_eq!(measurement.latency_us_max, 100.0);
        assert_eq!(measurement.latency_us_mean, 50.5);
        assert_eq!(measurement.flushes, 4);
        assert_eq!(measurement.flush_latency_us_mean, Some(1500.0));
    }

    #[test]
    fn only_completions_inside_the_window_count() {
        let plan = Plan::new(
            Workload::RandomWrite4kQd1,
            1 << 20,
            Some(Timing {
                warmup: Duration::from_secs(1),
                runtime: Duration::from_secs(1),
            }),
        );
        let from = plan.measure_from.unwrap();
        let op = Op::Write {
            offset: 0,
            len: 4096,
            pattern: 0,
        };
        let mut tally = Tally::default();
        tally.record(&plan, op, from, from - Duration::from_millis(1));
        tally.record(&plan, op, from, from + Duration::from_millis(500));
        tally.record(&plan, op, from, from + Duration::from_millis(1001));
        assert_eq!(tally.ops, 1, "only the completion inside the window counts");
        assert_eq!(tally.latencies_ns, [500_000_000]);
        assert_eq!(
            plan.completed_ops.load(Ordering::Relaxed),
            3,
            "progress counts all"
        );
    }

    #[test]
    fn the_fill_covers_the_volume_once_with_a_short_tail() {
        let span = 3 * CHUNK_BYTES as u64 + 8192;
        let plan = Plan::new(Workload::Fill, span, None);
        let mut streams: Vec<Stream<'_>> = (0..2).map(|w| Stream::new(&plan, w)).collect();
        let mut covered = Vec::new();
        for turn in 0.. {
            let Some(op) = streams[turn % 2].next() else {
                break;
            };
            let Op::Write { offset, len, .. } = op else {
                panic!("the fill only writes: {op}");
            };
            covered.push((offset, len as u64));
        }
        covered.sort_unstable();
        let mut next = 0;
        for (offset, len) in covered {
            assert_eq!(offset, next, "gap or overlap");
            next += len;
        }
        assert_eq!(next, span);
    }

    #[test]
    fn streams_stay_aligned_in_range_and_flush_every_32_writes() {
        let span = 64 << 20;
        for workload in Workload::MEASURED {
            let plan = Plan::new(workload, span, None);
            let mut stream = Stream::new(&plan, 0);
            let mut writes_since_flush = 0;
            for _ in 0..1000 {
                let op = stream.next().expect("an unbounded stream");
                match op {
                    Op::Write {
                        offset,
                        len,
                        pattern,
                    } => {
                        assert!(workload != Workload::RandomRead4kQd32);
                        assert_eq!(len as u64, workload.block_bytes());
                        assert!(pattern % 4096 == 0 && pattern + len <= POOL_BYTES);
                        assert!(offset % 4096 == 0 && offset + len as u64 <= span, "{op}");
                        writes_since_flush += 1;
                    }
                    Op::Read { offset, len } => {
                        assert_eq!(workload, Workload::RandomRead4kQd32);
                        assert!(offset % 4096 == 0 && offset + len as u64 <= span, "{op}");
                    }
                    Op::Flush => {
                        assert_eq!(workload, Workload::WriteFlush32);
                        assert_eq!(writes_since_flush, FLUSH_EVERY);
                        writes_since_flush = 0;
                    }
                }
            }
        }
    }

    #[test]
    fn the_table_shows_a_dash_where_a_cell_does_not_apply() {
        let rows = [
            Row {
                name: "raw".into(),
                cells: vec![
                    Some(1234.4),
                    Some(50.25),
                    Some(150.0),
                    Some(99.0),
                    None,
                    None,
                    None,
                ],
            },
            Row {
                name: "pair (sync)".into(),
                cells: vec![Some(1.0); 7],
            },
        ];
        let table = render_table(&rows, format_value);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines.iter().all(|line| line.len() == lines[0].len()),
            "{table}"
        );
        let raw: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(raw, ["raw", "1234", "50.2", "150", "99.0", "-", "-", "-"]);
    }
}
