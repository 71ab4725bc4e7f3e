//! P1 and P2 across a failover: the write-verify checker writes through the primary's
//! NBD export, the primary is killed with SIGKILL at a random moment, the secondary
//! is promoted with --force, and the checker verifies the survivor.

mod common;

use std::time::Duration;

use common::*;
use engine::rng::SplitMix64;

/// One failover round: returns the verify report.
fn failover_round(
    cluster: &mut Cluster,
    rng: &mut SplitMix64,
    checker_args: &[&str],
    verify_mode: &str,
) -> String {
    let primary_uri = cluster.uri("alpha");
    let dir = cluster.dir.clone();
    // The checker runs in the background; the primary dies under it.
    let kill_after = Duration::from_millis(300 + rng.below(1500));
    let args: Vec<String> = checker_args.iter().map(|s| s.to_string()).collect();
    let writes_before = cluster.status("alpha").io.writes;
    let writer = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        checker_write(&dir, &primary_uri, &args)
    });
    // The kill moment is random, but counted from when the checker's writes arrive.
    cluster.wait_writes_beyond("alpha", writes_before, Duration::from_secs(30));
    std::thread::sleep(kill_after);
    cluster.kill9("alpha");
    let (log, output) = writer.join().expect("checker thread");
    assert!(
        output.status.success(),
        "checker failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let survivor = cluster.wait_status(
        "beta",
        "aware the peer is gone",
        Duration::from_secs(10),
        |s| s.peer.as_ref().is_some_and(|p| p.connection != "Connected"),
    );
    // P2 covers a spare that is not a resync target; the load here never pushes an
    // async peer past its lag bound, so the spare must be UpToDate.
    assert_eq!(
        survivor.disk,
        "UpToDate",
        "the spare was not UpToDate when the primary died:\n{}",
        cluster.log_tail("beta")
    );
    cluster.replctl_ok("beta", &["promote", RESOURCE, "--force"]);
    let (passed, report) = checker_verify(&cluster.uri("beta"), &log, verify_mode);
    assert!(
        passed,
        "survivor failed verification after kill at {kill_after:?}:\n{report}\n{}",
        cluster.log_tail("beta")
    );
    report
}

fn failover_rounds(
    test: &str,
    mode: &'static str,
    rounds: usize,
    checker_args: &[&str],
    verify_mode: &str,
) {
    failover_rounds_with(test, mode, "8M", rounds, checker_args, verify_mode)
}

fn failover_rounds_with(
    test: &str,
    mode: &'static str,
    journal: &'static str,
    rounds: usize,
    checker_args: &[&str],
    verify_mode: &str,
) {
    let seed = std::process::id() as u64 ^ 0x5EED;
    let mut rng = SplitMix64::new(seed);
    for round in 0..rounds {
        let options = ClusterOptions {
            mode,
            image_bytes: 128 << 20,
            journal,
            proxy: true,
            ..ClusterOptions::default()
        };
        let mut cluster = Cluster::pair(&format!("{test}-{round}"), options);
        // Latency on the link keeps records in flight when the primary dies, so an
        // acknowledgement given too early would show as a lost write.
        if let Some(proxy) = &cluster.proxy {
            proxy.set_delay(Duration::from_millis(10 + rng.below(30)));
        }
        let report = failover_round(&mut cluster, &mut rng, checker_args, verify_mode);
        eprintln!(
            "{test} round {round} (seed {seed}): {}",
            report.lines().find(|l| l.contains("lost")).unwrap_or("")
        );
    }
}

#[test]
fn p1_sync_failover_kill9_primary_loses_no_acknowledged_write() {
    // 14 kill moments here and 6 in the flush-heavy sync test: 20 in `sync` mode.
    failover_rounds(
        "p1-sync",
        "sync",
        14,
        &["--qd", "32", "--seconds", "30", "--blocks", "0..20000"],
        "acked",
    );
}

#[test]
fn p1_semi_sync_failover_with_flushes_loses_no_durable_write() {
    failover_rounds(
        "p1-semi",
        "semi-sync",
        6,
        &[
            "--qd",
            "32",
            "--seconds",
            "30",
            "--blocks",
            "0..20000",
            "--flush-every",
            "16",
            "--fua-every",
            "7",
        ],
        "durable,prefix",
    );
}

#[test]
fn p1_sync_failover_flush_heavy_workload() {
    failover_rounds(
        "p1-flush",
        "sync",
        6,
        &[
            "--qd",
            "8",
            "--seconds",
            "30",
            "--blocks",
            "0..20000",
            "--flush-every",
            "4",
        ],
        "acked",
    );
}

#[test]
fn p2_async_failover_leaves_a_prefix_of_the_acknowledged_order() {
    // A journal large enough that the lag through the slow link stays within bounds.
    failover_rounds_with(
        "p2-async",
        "async",
        "32M",
        6,
        &["--qd", "8", "--seconds", "30", "--blocks", "0..20000"],
        "prefix",
    );
}
