//! Every fault ends in a defined state: faults injected into real daemons with real
//! components (a store that loses its unflushed writes, killed processes), each
//! checked with the write-verify checker for lost acknowledged writes.

mod common;

use std::time::Duration;

use common::*;

/// Once the pair is in sync again: the client flushes (every acknowledged write is
/// durable on both nodes), the primary dies, the spare is promoted and must hold
/// every write the checker's `log` says was acknowledged.
fn fail_over_and_verify(cluster: &mut Cluster, log: &std::path::Path, after: &str) {
    cluster.wait_in_sync(Duration::from_secs(120));
    qemu_io_ok(&cluster.uri("alpha"), false, "flush");
    cluster.kill9("alpha");
    cluster.wait_peer_lost("beta", Duration::from_secs(30));
    cluster.replctl_ok("beta", &["promote", RESOURCE, "--force"]);
    let (passed, report) = checker_verify(&cluster.uri("beta"), log, "acked");
    assert!(
        passed,
        "the promoted spare lost acknowledged writes {after}:\n{report}\n{}",
        cluster.log_tail("beta")
    );
}

/// A pair whose spare `beta` runs on a [`VolatileStore`] (power cuts and hangs on
/// demand); `alpha` is Primary and both are in sync (zeroed stores: no initial sync).
fn pair_over_a_volatile_spare(test: &str, options: ClusterOptions) -> (Cluster, VolatileStore) {
    let mut cluster = Cluster::new(test, &["alpha", "beta"], options);
    let beta_image = cluster.node("beta").image.clone();
    let store = VolatileStore::start(&cluster.dir.join("beta-store"), &beta_image);
    cluster
        .nodes
        .get_mut("beta")
        .expect("beta")
        .image
        .clone_from(&store.file());
    cluster.write_config();
    cluster.create_md_all();
    cluster.start_all();
    cluster.wait_peer_connection("alpha", "Connected", Duration::from_secs(30));
    cluster.replctl_ok("alpha", &["new-current-uuid", RESOURCE, "--clear-bitmap"]);
    cluster.replctl_ok("alpha", &["promote", RESOURCE]);
    cluster.wait_in_sync(Duration::from_secs(60));
    (cluster, store)
}

/// A secondary's power cut must not lose writes the primary acknowledged: they were
/// in the secondary's journal (ACK_WRITTEN) but perhaps only in its disk's volatile
/// cache. The primary therefore holds every record until the secondary reports it
/// durable (DURABLE) and marks what is still held out of sync, with a new generation,
/// when the session ends. Then the secondary resyncs them when it comes back, and
/// after the primary dies the promoted spare holds every acknowledged write.
///
/// Before the fix (records released on ACK_WRITTEN) this lost the writes of the last
/// few milliseconds before the power cut: they read back as zeroes after the failover.
#[test]
fn p1_secondary_power_loss_loses_no_acknowledged_flushed_write() {
    require_tool("qemu-io", "qemu-utils");
    let options = ClusterOptions {
        // Many blocks, so that the few writes after the power cut rarely rewrite (and
        // so mark) a block whose last acknowledged write beta lost.
        image_bytes: 512 << 20,
        journal: "8M",
        ..ClusterOptions::default()
    };
    let (mut cluster, mut store) = pair_over_a_volatile_spare("p1-power-loss", options);

    // Sync writes at QD32; the secondary loses power under them. The writes in flight
    // then wait for the link's timeout, so the run ends soon after the cut.
    let uri = cluster.uri("alpha");
    let dir = cluster.dir.clone();
    let writes_before = cluster.status("alpha").io.writes;
    let writer = std::thread::spawn(move || {
        checker_write(
            &dir,
            &uri,
            &["--qd", "32", "--seconds", "3", "--blocks", "0..100000"],
        )
    });
    // Cut the power once a steady stream of records is flowing (in `sync` mode every
    // write alpha completed is in beta's journal).
    cluster.wait_status("alpha", "writing", Duration::from_secs(30), |s| {
        s.io.writes > writes_before + 3000
    });
    cluster.kill9("beta");
    store.power_cut();
    let (log, output) = writer.join().expect("checker thread");
    assert!(
        output.status.success(),
        "checker failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    cluster.wait_peer_lost("alpha", Duration::from_secs(30));

    // The secondary comes back with what its disk had made durable, and resyncs.
    store.power_on();
    cluster.start("beta");
    fail_over_and_verify(&mut cluster, &log, "after its power cut");
}

/// A sick secondary never hangs the primary (DRBD's `timeout` × `ko-count`): the
/// spare's disk hangs — every request waits, nothing fails — while its daemon keeps
/// answering pings, so silence never trips. The primary drops the spare once a write
/// has waited `ko-timeout` for it, marks the blocks it may lack, and goes on alone;
/// when the disk answers again the spare reconnects, resyncs, and holds every
/// acknowledged write.
///
/// Seen failing first: with inline group commits the spare's runtime thread sat in a
/// FUSE write and the spare fell silent (dropped for silence, not by the ko check);
/// with `ko-timeout` out of reach (60 s) the spare is never dropped, and the primary
/// keeps every record the spare has not made durable pinned in its journal — a
/// longer hang fills it and stalls the writes.
#[test]
fn ko_timeout_a_hung_secondary_disk_never_hangs_the_primary() {
    require_tool("qemu-io", "qemu-utils");
    let options = ClusterOptions {
        journal: "8M",
        extra: "ko-timeout = \"2s\"".into(),
        ..ClusterOptions::default()
    };
    let (mut cluster, store) = pair_over_a_volatile_spare("ko-timeout", options);

    store.hang();
    let (log, output) = checker_write(
        &cluster.dir,
        &cluster.uri("alpha"),
        &[
            "--qd",
            "8",
            "--seconds",
            "5",
            "--blocks",
            "0..20000",
            "--request-timeout",
            "20",
        ],
    );
    assert!(
        output.status.success(),
        "writes hung or failed while the spare's disk hung: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.log_tail("alpha")
    );
    let status = cluster.wait_status(
        "alpha",
        "rid of the hung peer",
        Duration::from_secs(30),
        |s| {
            s.peer
                .as_ref()
                .is_some_and(|p| p.last_error_kind.as_deref() == Some("peer-too-slow"))
        },
    );
    assert!(
        status.out_of_sync_bytes > 0,
        "no blocks marked: {status:#?}"
    );

    // The disk answers again: the spare comes back and catches up.
    store.wake();
    fail_over_and_verify(&mut cluster, &log, "after the hang");
}
