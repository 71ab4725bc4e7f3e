//! The node daemon's command line, shared by `replicad` and `replctl daemon`.
//!
//! Both binaries run the same daemon: `replicad` for service managers and scripts,
//! `replctl daemon` so that `replctl` alone (for example `cargo run --bin replctl --
//! demo` on a fresh clone, which builds only `replctl`) can start nodes of its own.

use std::path::{Path, PathBuf};

use replicad::config::{self, Config};

/// The command line of `replicad` (here, not in its binary, so that `replctl man` and
/// `replctl completions` can render it too).
#[derive(Debug, clap::Parser)]
#[command(
    name = "replicad",
    version,
    about = "The replicad node daemon: serves this node's resources over NBD and \
             replicates every write to their peers",
    long_about = "The replicad node daemon. It attaches this node's backing stores (crash \
                  recovery runs here), serves each resource over NBD, replicates every write \
                  of a Primary to its peers over TCP, and answers `replctl` on its control \
                  socket. One config file, the same on every node, names the resources and \
                  nodes; --node picks this node's section. Stops cleanly on SIGTERM or \
                  SIGINT. Under systemd (Type=notify) it reports READY=1 once every store \
                  is attached and every listener is bound, STOPPING=1 when it stops. \
                  `replctl daemon` runs the same daemon."
)]
pub struct ReplicadArgs {
    /// Config file (the same on every node).
    #[arg(long, default_value = config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// This node's name in the config (default: the hostname).
    #[arg(long)]
    pub node: Option<String>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// Options of the daemon beyond `--config` and `--node`.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Log filter (as RUST_LOG), e.g. `info` or `replicad=debug`.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Runtime threads for NBD, replication and control traffic (default: half the
    /// CPUs, at least one). The engine's journal, applier and reader threads run
    /// beside them; on two vCPUs one runtime thread measured 15 % more 4 KiB write
    /// IOPS than two (docs/BENCHMARKS.md).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
}

/// Half the CPUs, at least one: the default number of runtime threads.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cpus| (cpus.get() / 2).max(1))
}

/// Runs the daemon of `node` (default: the hostname) from `config_path` until SIGTERM,
/// SIGINT or a `shutdown` request.
pub fn run(config_path: &Path, node: Option<&str>, args: &DaemonArgs) -> anyhow::Result<()> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = Config::load(config_path)?;
    let node = node.map_or_else(config::hostname, str::to_string);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.map_or_else(default_threads, usize::from))
        .enable_all()
        .thread_name("replicad")
        .build()?;
    runtime.block_on(replicad::daemon::run(config, node))
}
