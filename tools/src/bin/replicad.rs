//! `replicad` — the node daemon (its command line is `tools::node::ReplicadArgs`).

/// mimalloc: measurably cheaper than glibc malloc for the many small, short-lived
/// allocations of the request path (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use tools::node::ReplicadArgs;

fn main() {
    let args = ReplicadArgs::parse();
    if let Err(error) = tools::node::run(&args.config, args.node.as_deref(), &args.daemon) {
        eprintln!("replicad: {}", tools::admin::error_line(&error));
        std::process::exit(1);
    }
}
