//! `replcheck`: the write-verify checker's command line (a thin shell over
//! `tools::checker`; see that module for the block format, the log format and the rules).

/// mimalloc: measurably cheaper than glibc malloc for the many small, short-lived
/// allocations of the request path (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tools::checker::run::new_run_id;
use tools::checker::{run_writes, verify_export, LogWriter, Mode, RunLog, WritePlan};
use tools::nbd_client::{ConnectOptions, NbdClient, NbdUri};

/// Exit status when a verification finds violations.
const EXIT_CHECK_FAILED: u8 = 1;
/// Exit status when the checker itself could not do its job.
const EXIT_CHECKER_ERROR: u8 = 3;

#[derive(Parser)]
#[command(
    name = "replcheck",
    version,
    about = "Write self-describing blocks through NBD, then verify what a server holds",
    after_help = "Exit status: 0 done (write: also when the server died mid-run; verify: the check passed); \
                  1 a server error reply (write) or a failed check (verify); 2 usage error; \
                  3 the checker could not run (connect, log I/O, bad log)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write unique, self-describing 4 KiB blocks and log every issue and acknowledgement.
    Write(WriteArgs),
    /// Read back every block a log touched and check it against the log.
    Verify(VerifyArgs),
}

#[derive(Args)]
struct ConnectArgs {
    /// NBD URI: nbd://host[:port][/export] or nbd+unix:///export?socket=PATH.
    #[arg(long)]
    uri: String,
    /// Seconds allowed for connecting and the handshake.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Seconds allowed for each request; a request that takes longer closes the connection.
    #[arg(long, default_value_t = 30.0)]
    request_timeout: f64,
}

#[derive(Args)]
struct WriteArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Where to write the run log (JSON lines).
    #[arg(long)]
    log: PathBuf,
    /// Writes in flight at once.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Stop after this many writes (default 10000 unless --seconds is given).
    #[arg(long)]
    writes: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    seconds: Option<f64>,
    /// Blocks (4 KiB) to write: START..END (END exclusive), START.., or COUNT for 0..COUNT.
    /// Default: the whole export.
    #[arg(long)]
    blocks: Option<BlockRange>,
    /// Issue a flush after every K-th write.
    #[arg(long, value_name = "K")]
    flush_every: Option<u64>,
    /// Set FUA on every K-th write.
    #[arg(long, value_name = "K")]
    fua_every: Option<u64>,
    /// Seed of the block choice (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Print a progress line on stderr every N acknowledged writes.
    #[arg(long, value_name = "N")]
    progress_every: Option<u64>,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The run log written by `replcheck write`.
    #[arg(long)]
    log: PathBuf,
    /// Rules to check (comma-separated): acked (P1), durable (FLUSH/FUA), prefix (P2).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "acked")]
    mode: Vec<Mode>,
    /// Reads in flight at once.
    #[arg(long, default_value_t = 32)]
    qd: usize,
    /// Violations listed per kind.
    #[arg(long, default_value_t = 5)]
    examples: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// A block range given on the command line.
#[derive(Debug, Clone, Copy)]
struct BlockRange {
    start: u64,
    end: Option<u64>,
}

impl FromStr for BlockRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let number = |part: &str| {
            part.trim()
                .parse::<u64>()
                .map_err(|_| format!("bad block number {part:?}"))
        };
        let range = match text.split_once("..") {
            Some((start, "")) => BlockRange {
                start: number(start)?,
                end: None,
            },
            Some((start, end)) => BlockRange {
                start: if start.is_empty() { 0 } else { number(start)? },
                end: Some(number(end)?),
            },
            None => BlockRange {
                start: 0,
                end: Some(number(text)?),
            },
        };
        if range.end.is_some_and(|end| end <= range.start) {
            return Err(format!("empty block range {text:?}"));
        }
        Ok(range)
    }
}

fn seconds(value: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("{what} must be a non-negative number of seconds"))
}

async fn connect(args: &ConnectArgs) -> anyhow::Result<NbdClient> {
    let uri: NbdUri = args.uri.parse()?;
    let options = ConnectOptions {
        connect_timeout: seconds(args.connect_timeout, "--connect-timeout")?,
        request_timeout: Some(seconds(args.request_timeout, "--request-timeout")?),
        ..ConnectOptions::default()
    };
    Ok(NbdClient::connect_with(&uri, options).await?)
}

/// Resolves on SIGINT or SIGTERM; never when the handlers cannot be installed.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut interrupt), Ok(mut terminate)) => {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

async fn write(args: WriteArgs) -> anyhow::Result<ExitCode> {
    let file = File::create(&args.log)
        .with_context(|| format!("creating the log {}", args.log.display()))?;
    let client = connect(&args.connect).await?;
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64)
    });
    let duration = args
        .seconds
        .map(|value| seconds(value, "--seconds"))
        .transpose()?;
    let plan = WritePlan {
        run_id: new_run_id(seed),
        seed,
        first_block: args.blocks.map_or(0, |range| range.start),
        end_block: args.blocks.and_then(|range| range.end),
        queue_depth: args.qd,
        max_writes: args.writes.or(if duration.is_none() {
            Some(10_000)
        } else {
            None
        }),
        duration,
        flush_every: args.flush_every,
        fua_every: args.fua_every,
        progress_every: args.progress_every,
        uri: args.connect.uri.clone(),
    };
    eprintln!(
        "replcheck write: connected to {} ({} bytes), run {:016x}, seed {seed}",
        args.connect.uri,
        client.info().size_bytes,
        plan.run_id
    );
    let mut log = LogWriter::new(BufWriter::with_capacity(1 << 20, file));
    let summary = run_writes(&client, &plan, &mut log, stop_signal(), |progress| {
        eprintln!(
            "progress: acked {} writes (issued {}), flushes acked {}",
            progress.writes_acked, progress.writes_issued, progress.flushes_acked
        );
    })
    .await?;
    let file = log
        .finish()
        .and_then(|buffered| buffered.into_inner().map_err(|error| error.into_error()))
        .with_context(|| format!("writing the log {}", args.log.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing the log {}", args.log.display()))?;
    println!("{summary}; log {}", args.log.display());
    Ok(if summary.stop.is_failure() {
        ExitCode::from(EXIT_CHECK_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

async fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let log = RunLog::load(Path::new(&args.log))?;
    let client = connect(&args.connect).await?;
    let report = verify_export(&client, &log, &args.mode, args.qd, args.examples).await?;
    // The verdict is in; a failed goodbye does not change it.
    let _ = client.disconnect().await;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CHECK_FAILED)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("replcheck: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_CHECKER_ERROR);
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Write(args) => write(args).await,
            Command::Verify(args) => verify(args).await,
        }
    });
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("replcheck: {error:#}");
            ExitCode::from(EXIT_CHECKER_ERROR)
        }
    }
}
