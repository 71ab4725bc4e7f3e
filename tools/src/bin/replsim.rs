//! `replsim`: the deterministic cluster simulator (see `tools::sim`).
//!
//! `replsim --seeds 1000` runs seeds 1..=1000 and prints one line per failing seed and
//! a summary `N seeds, V violations`; it exits 0 only when V = 0. `replsim --seed S`
//! replays one seed exactly (the same trace digest every time; `--trace` prints the
//! whole trace). `replsim --mutate NAME` re-introduces a known class of bug and exits
//! 0 only when the checker catches it within the seed budget.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;
use engine::node::Mutation;
use engine::repl::Mode;
use tools::sim::{run_seed, Faults, Options, Outcome};

#[derive(Debug, Parser)]
#[command(
    name = "replsim",
    version,
    about = "Deterministic simulation of a replicad cluster: seeded faults, a virtual clock, \
             a checker of the promises after every step",
    after_help = "Exit status: 0 every seed passed (with --mutate: the mutation was caught); \
                  1 a violation (with --mutate: not caught); 2 usage error."
)]
struct Args {
    /// Run this many seeds, from --first on.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed of a --seeds run.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Replay exactly this seed (prints its trace digest).
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes in the cluster (2 to 5). Three or more model the N-node membership that
    /// is not built yet: one out-of-sync bitmap serves every peer, so two Secondaries
    /// that meet after one of them missed writes take each other as in sync, and
    /// those seeds report divergence (per-peer bitmaps will fix it).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(2..=5))]
    nodes: u64,
    /// Replication mode: sync, semi-sync or async.
    #[arg(long, default_value = "sync")]
    mode: String,
    /// Events in the fault phase of each seed (20000: about 20 virtual seconds).
    #[arg(long, default_value_t = 20000)]
    steps: u64,
    /// Fault classes: crash,power,partition,reset,slow,operator (or all, none).
    #[arg(long, default_value = "all")]
    faults: String,
    /// Re-introduce a known bug: ack-before-peer-durable, no-out-of-sync-on-detach,
    /// apply-stale-resync-data, promote-ignores-peer-role, skip-generation-rotation,
    /// balanced-reads-ignore-the-rule, bitmap-run-one-short.
    #[arg(long)]
    mutate: Option<String>,
    /// The Primaries' read-balancing policy (prefer-local: every read local, as
    /// before read balancing; any other: reads a peer serves are checked too).
    #[arg(long, default_value = "prefer-local")]
    read_balancing: String,
    /// With --seed: print every trace line.
    #[arg(long)]
    trace: bool,
    /// Seeds run in parallel (default: the number of CPUs).
    #[arg(long)]
    jobs: Option<usize>,
}

fn options(args: &Args) -> Result<Options, String> {
    let mode = Mode::parse(&args.mode).ok_or_else(|| {
        format!(
            "--mode must be sync, semi-sync or async, not {:?}",
            args.mode
        )
    })?;
    let mutation = match &args.mutate {
        Some(name) => Some(Mutation::parse(name).ok_or_else(|| {
            let known: Vec<&str> = Mutation::ALL.iter().map(|m| m.name()).collect();
            format!("unknown mutation {name:?} (known: {})", known.join(", "))
        })?),
        None => None,
    };
    let read_balancing = engine::node::ReadBalancing::parse(&args.read_balancing)
        .map_err(|why| format!("--read-balancing: {why}"))?;
    Ok(Options {
        read_balancing,
        nodes: args.nodes as usize,
        mode,
        steps: args.steps,
        faults: Faults::parse(&args.faults)?,
        mutation,
        full_trace: args.trace,
    })
}

/// Runs a seed, turning a panic (a bug) into a violation.
fn run_guarded(seed: u64, options: &Options) -> Outcome {
    match std::panic::catch_unwind(|| run_seed(seed, options)) {
        Ok(outcome) => outcome,
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Outcome {
                seed,
                violation: Some(tools::sim::Violation {
                    property: "panic",
                    detail: text,
                    at: engine::node::Time::ZERO,
                }),
                digest: 0,
                events: 0,
                end: engine::node::Time::ZERO,
                trace: Vec::new(),
                writes_acked: 0,
                promotions: 0,
            }
        }
    }
}

fn report(outcome: &Outcome, lines: usize) {
    if let Some(violation) = &outcome.violation {
        println!(
            "seed {}: VIOLATION {}: {} (at {}, {} events)",
            outcome.seed, violation.property, violation.detail, violation.at, outcome.events
        );
        let start = outcome.trace.len().saturating_sub(lines);
        for line in &outcome.trace[start..] {
            println!("    {line}");
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let options = match options(&args) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("replsim: {error}");
            return ExitCode::from(2);
        }
    };
    // Quiet panics: a panic is reported as a violation of its seed.
    std::panic::set_hook(Box::new(|_| {}));
    if let Some(seed) = args.seed {
        let outcome = run_guarded(seed, &options);
        if args.trace {
            for line in &outcome.trace {
                println!("{line}");
            }
        }
        report(&outcome, 40);
        println!(
            "seed {seed}: {} · {} events · {} writes acknowledged · {} promotions · virtual {} · trace digest {:016x}",
            if outcome.violation.is_some() { "FAILED" } else { "ok" },
            outcome.events,
            outcome.writes_acked,
            outcome.promotions,
            outcome.end,
            outcome.digest
        );
        return if outcome.violation.is_some() == options.mutation.is_some() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(args.first));
    let end = args.first.saturating_add(args.seeds);
    let violations = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicUsize::new(0));
    let output = Arc::new(Mutex::new(()));
    let stop_on_catch = options.mutation.is_some();
    let threads: Vec<_> = (0..jobs)
        .map(|_| {
            let (next, violations, ran, output, options) = (
                next.clone(),
                violations.clone(),
                ran.clone(),
                output.clone(),
                options.clone(),
            );
            std::thread::spawn(move || loop {
                if stop_on_catch && violations.load(Ordering::SeqCst) > 0 {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= end {
                    return;
                }
                let outcome = run_guarded(seed, &options);
                ran.fetch_add(1, Ordering::SeqCst);
                if outcome.violation.is_some() {
                    violations.fetch_add(1, Ordering::SeqCst);
                    let _guard = output.lock().unwrap_or_else(|p| p.into_inner());
                    report(&outcome, 20);
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    let (ran, violations) = (
        ran.load(Ordering::SeqCst),
        violations.load(Ordering::SeqCst),
    );
    match &options.mutation {
        Some(mutation) => {
            println!(
                "mutation {}: {} after {ran} seeds ({:.1}s)",
                mutation.name(),
                if violations > 0 {
                    "caught"
                } else {
                    "NOT caught"
                },
                started.elapsed().as_secs_f64()
            );
            if violations > 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        None => {
            println!(
                "{ran} seeds, {violations} violations ({} nodes, {}, {:.1}s)",
                options.nodes,
                options.mode,
                started.elapsed().as_secs_f64()
            );
            if violations == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
