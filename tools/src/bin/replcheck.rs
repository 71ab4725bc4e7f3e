//! `replcheck`: the write-verify checker (a thin shell over `tools::checker`; its
//! command line is `tools::checker::cli`; see that module for the block format, the log
//! format and the rules).

/// mimalloc: measurably cheaper than glibc malloc for the many small, short-lived
/// allocations of the request path (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use tools::checker::cli::{
    Cli, Command, ConnectArgs, VerifyArgs, WriteArgs, EXIT_CHECKER_ERROR, EXIT_CHECK_FAILED,
};
use tools::checker::run::new_run_id;
use tools::checker::{run_writes, verify_export, LogWriter, RunLog, WritePlan};
use tools::nbd_client::{ConnectOptions, NbdClient, NbdUri};

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
