//! `replicad` — the node daemon.

/// mimalloc: measurably cheaper than glibc malloc for the many small, short-lived
/// allocations of the request path (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use clap::Parser;
use replicad::config::{self, Config};

/// replicad: block-level replication and hot-spare daemon.
#[derive(Debug, Parser)]
#[command(name = "replicad", version, about, long_about = None)]
struct Args {
    /// Config file (the same on every node).
    #[arg(long, default_value = config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// This node's name in the config (default: the hostname).
    #[arg(long)]
    node: Option<String>,
    /// Log filter (as RUST_LOG), e.g. `info` or `replicad=debug`.
    #[arg(long, default_value = "info")]
    log: String,
    /// Runtime threads for NBD, replication and control traffic (default: half the
    /// CPUs, at least one). The engine's journal, applier and reader threads run
    /// beside them; on two vCPUs one runtime thread measured 15 % more 4 KiB write
    /// IOPS than two (docs/BENCHMARKS.md).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
}

/// Half the CPUs, at least one: the default number of runtime threads.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cpus| (cpus.get() / 2).max(1))
}

fn main() {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = (|| {
        let config = Config::load(&args.config)?;
        let node = args.node.clone().unwrap_or_else(config::hostname);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads.map_or_else(default_threads, usize::from))
            .enable_all()
            .thread_name("replicad")
            .build()?;
        runtime.block_on(replicad::daemon::run(config, node))
    })();
    if let Err(error) = result {
        eprintln!("replicad: {}", tools::admin::error_line(&error));
        std::process::exit(1);
    }
}
