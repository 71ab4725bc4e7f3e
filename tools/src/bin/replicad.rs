//! `replicad` — the node daemon.

/// mimalloc: measurably cheaper than glibc malloc for the many small, short-lived
/// allocations of the request path (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use clap::Parser;
use replicad::config;

/// replicad: the node daemon of a block-replication and hot-spare engine.
#[derive(Debug, Parser)]
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
                  SIGINT. `replctl daemon` runs the same daemon."
)]
struct Args {
    /// Config file (the same on every node).
    #[arg(long, default_value = config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// This node's name in the config (default: the hostname).
    #[arg(long)]
    node: Option<String>,
    #[command(flatten)]
    daemon: tools::node::DaemonArgs,
}

fn main() {
    let args = Args::parse();
    if let Err(error) = tools::node::run(&args.config, args.node.as_deref(), &args.daemon) {
        eprintln!("replicad: {}", tools::admin::error_line(&error));
        std::process::exit(1);
    }
}
