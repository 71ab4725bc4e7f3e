//! `replctl demo`: the whole story on a fresh machine, with nothing but temp image files
//! and loopback: mirror, fail the primary, promote the spare, verify every byte.
//!
//! Two daemons run as child processes of `replctl` (`replctl daemon`, so nothing but
//! `replctl` needs to be built).
//! The write-verify checker writes through the primary's NBD export at queue depth 32;
//! the primary is killed with SIGKILL mid-write; the spare is promoted; every
//! acknowledged write is verified on it; the old primary restarts, rejoins as
//! Secondary and resyncs; both replicas are compared byte for byte. No root needed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use replicad::control::{Request, ResourceStatus};

use crate::admin::human_bytes;
use crate::checker::{self, LogWriter, Mode, WritePlan};
use crate::launch::{self, free_port, in_sync, NodeProcess};
use crate::nbd_client::NbdClient;

/// Options of `replctl demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Size of each node's image file.
    #[arg(long, default_value = "256M")]
    pub size: String,
    /// Seconds the checker writes before the primary is killed.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Replication mode.
    #[arg(long, default_value = "sync")]
    pub mode: String,
    /// Directory to work in (default: a new temp directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the work directory (images, configs, logs) for inspection.
    #[arg(long)]
    pub keep: bool,
}

const RESOURCE: &str = "r0";

struct Work {
    dir: PathBuf,
    remove: bool,
}

impl Drop for Work {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn step(started: Instant, text: &str) {
    println!("[{:>5.1}s] {text}", started.elapsed().as_secs_f64());
}

/// Sends `request`; the daemon's answer as text.
fn call(control: &Path, request: Request) -> anyhow::Result<String> {
    Ok(match launch::call(control, request)? {
        serde_json::Value::String(text) => text,
        other => other.to_string(),
    })
}

/// Polls `control`'s status until `check` holds (bounded).
fn wait_for(
    control: &Path,
    what: &str,
    timeout: Duration,
    check: impl Fn(&ResourceStatus) -> bool,
) -> anyhow::Result<ResourceStatus> {
    launch::wait_for(control, RESOURCE, what, timeout, check)
}

/// Runs the demo; prints each step; fails on any broken promise.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let size = replicad::config::parse_size(&args.size).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(size >= 64 << 20, "--size must be at least 64M");
    let mode = engine::repl::Mode::parse(&args.mode)
        .ok_or_else(|| anyhow::anyhow!("--mode must be sync, semi-sync or async"))?;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("replicad-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let work = Work {
        dir: dir.clone(),
        remove: !args.keep && args.dir.is_none(),
    };
    let (alpha_img, beta_img) = (dir.join("alpha.img"), dir.join("beta.img"));
    let (alpha_ctl, beta_ctl) = (dir.join("alpha.ctl"), dir.join("beta.ctl"));
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect::<Result<_, _>>()?;
    let config = dir.join("replicad.toml");
    std::fs::write(
        &config,
        format!(
            "[resource.{RESOURCE}]\nmode = \"{mode}\"\n\n\
             [resource.{RESOURCE}.nodes.alpha]\naddress = \"127.0.0.1:{}\"\ndisk = \"{}\"\nnbd = \"127.0.0.1:{}\"\ncontrol = \"{}\"\n\n\
             [resource.{RESOURCE}.nodes.beta]\naddress = \"127.0.0.1:{}\"\ndisk = \"{}\"\nnbd = \"127.0.0.1:{}\"\ncontrol = \"{}\"\n",
            ports[0],
            alpha_img.display(),
            ports[1],
            alpha_ctl.display(),
            ports[2],
            beta_img.display(),
            ports[3],
            beta_ctl.display()
        ),
    )?;
    step(
        started,
        &format!(
            "work directory {} (two {} image files, loopback only)",
            dir.display(),
            human_bytes(size)
        ),
    );
    for image in [&alpha_img, &beta_img] {
        engine::volume::create_image_file(image, size)?;
    }
    for node in ["alpha", "beta"] {
        crate::admin::create_md(&config, node, RESOURCE, false, true)?;
    }
    let mut alpha = NodeProcess::start(&config, "alpha", &dir.join("alpha.log"))?;
    let _beta = NodeProcess::start(&config, "beta", &dir.join("beta.log"))?;
    wait_for(
        &alpha_ctl,
        "alpha to connect to beta",
        Duration::from_secs(30),
        |s| s.peer.as_ref().is_some_and(|p| p.connection == "Connected"),
    )?;
    step(
        started,
        "alpha and beta started and connected (both Secondary, fresh stores)",
    );
    step(
        started,
        &format!(
            "alpha: {}",
            call(
                &alpha_ctl,
                Request::Promote {
                    resource: RESOURCE.into(),
                    force: true
                }
            )?
        ),
    );
    let synced = wait_for(
        &alpha_ctl,
        "the initial sync",
        Duration::from_secs(300),
        in_sync,
    )?;
    step(
        started,
        &format!(
            "initial sync done: beta is an UpToDate copy of alpha ({} exported)",
            human_bytes(synced.size_bytes)
        ),
    );

    // Write with the checker, then kill the primary mid-write.
    let alpha_uri = format!("nbd://127.0.0.1:{}/{RESOURCE}", ports[1]);
    let beta_uri = format!("nbd://127.0.0.1:{}/{RESOURCE}", ports[3]);
    let log_path = dir.join("checker.log");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = runtime.block_on(NbdClient::connect(&alpha_uri))?;
    let blocks = client.info().size_bytes / 4096;
    let plan = WritePlan {
        run_id: checker::run::new_run_id(std::process::id() as u64),
        seed: 7,
        first_block: 0,
        end_block: Some(blocks),
        queue_depth: 32,
        max_writes: None,
        duration: Some(Duration::from_secs(args.seconds + 60)),
        flush_every: None,
        fua_every: None,
        progress_every: None,
        uri: alpha_uri.clone(),
    };
    step(started, &format!("writing self-checking blocks through alpha's NBD export ({alpha_uri}), queue depth 32, {mode} mode"));
    let log_file = std::io::BufWriter::new(std::fs::File::create(&log_path)?);
    let kill_after = Duration::from_secs(args.seconds);
    let alpha_pid = alpha.id().unwrap_or(0);
    let summary = runtime.block_on(async {
        let mut log = LogWriter::new(log_file);
        let killer = async {
            tokio::time::sleep(kill_after).await;
            // SAFETY: kill with the pid of our own child daemon.
            unsafe { libc::kill(alpha_pid as i32, libc::SIGKILL) };
            // Keep the run going until the checker sees the connection drop.
            std::future::pending::<()>().await
        };
        let summary = checker::run_writes(&client, &plan, &mut log, killer, |_| {}).await;
        let finished = log.finish();
        (summary, finished)
    });
    alpha.kill();
    let (summary, finished) = summary;
    let summary = summary?;
    finished?;
    step(
        started,
        &format!(
            "killed alpha with SIGKILL after {}s: {} writes acknowledged, {} in flight when it died",
            args.seconds,
            summary.totals.writes_acked,
            summary.totals.writes_issued - summary.totals.writes_acked
        ),
    );
    let noticed = Instant::now();
    wait_for(&beta_ctl, "beta to notice", Duration::from_secs(30), |s| {
        s.peer.as_ref().is_some_and(|p| p.connection != "Connected")
    })?;
    step(
        started,
        &format!(
            "beta noticed the loss of alpha after {} ms",
            noticed.elapsed().as_millis()
        ),
    );
    step(
        started,
        &format!(
            "beta: {}",
            call(
                &beta_ctl,
                Request::Promote {
                    resource: RESOURCE.into(),
                    force: true
                }
            )?
        ),
    );

    let run_log = checker::RunLog::load(&log_path)?;
    let beta_client = runtime.block_on(NbdClient::connect(&beta_uri))?;
    let report = runtime.block_on(checker::verify_export(
        &beta_client,
        &run_log,
        &[Mode::Acked],
        32,
        5,
    ))?;
    runtime.block_on(beta_client.disconnect()).ok();
    anyhow::ensure!(
        report.passed,
        "verification on beta FAILED: {} acknowledged writes lost, {} blocks with unknown data",
        report.lost_acked,
        report.unknown_data
    );
    step(
        started,
        &format!(
            "verified on beta: all {} acknowledged writes present, 0 lost, 0 unknown blocks",
            report.writes_acked
        ),
    );

    // The old primary comes back as Secondary and resyncs from beta.
    let _alpha = NodeProcess::start(&config, "alpha", &dir.join("alpha-restart.log"))?;
    wait_for(
        &alpha_ctl,
        "alpha to rejoin",
        Duration::from_secs(30),
        |s| s.peer.is_some(),
    )?;
    let rejoined = wait_for(
        &beta_ctl,
        "the resync back to alpha",
        Duration::from_secs(300),
        in_sync,
    )?;
    let (resynced, skipped) = rejoined
        .peer
        .as_ref()
        .map_or((0, 0), |p| (p.resync_bytes, p.resync_skipped_bytes));
    step(
        started,
        &format!(
            "alpha restarted and rejoined as Secondary; beta compared the blocks either side \
             may have written unreplicated: {} differed and were resent from beta, {} were \
             equal and skipped",
            human_bytes(resynced),
            human_bytes(skipped)
        ),
    );
    let a = std::fs::File::open(&alpha_img)?;
    let b = std::fs::File::open(&beta_img)?;
    let compared = compare_prefix(&a, &b, synced.size_bytes)?;
    anyhow::ensure!(
        compared.is_none(),
        "replicas differ at byte {}",
        compared.unwrap_or(0)
    );
    step(
        started,
        &format!(
            "both replicas are byte-identical ({} compared)",
            human_bytes(synced.size_bytes)
        ),
    );
    drop(_alpha);
    drop(_beta);
    if work.remove {
        step(started, "demo passed; cleaning up");
    } else {
        step(
            started,
            &format!("demo passed; files kept in {}", work.dir.display()),
        );
    }
    Ok(())
}

/// First differing byte offset in the first `length` bytes of two files, if any.
fn compare_prefix(
    a: &std::fs::File,
    b: &std::fs::File,
    length: u64,
) -> std::io::Result<Option<u64>> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 4 << 20;
    let mut buf_a = vec![0u8; CHUNK];
    let mut buf_b = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < length {
        let n = CHUNK.min((length - offset) as usize);
        a.read_exact_at(&mut buf_a[..n], offset)?;
        b.read_exact_at(&mut buf_b[..n], offset)?;
        if let Some(index) = buf_a[..n].iter().zip(&buf_b[..n]).position(|(x, y)| x != y) {
            return Ok(Some(offset + index as u64));
        }
        offset += n as u64;
    }
    Ok(None)
}
