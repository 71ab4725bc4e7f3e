//! Every fault ends in a defined state: faults injected into real daemons with real
//! components (a store that loses its unflushed writes, killed processes), each
//! checked with the write-verify checker for lost acknowledged writes.

mod common;

use std::time::Duration;

use common::*;

/// A pair whose spare `beta` runs on a [`VolatileStore`] (power cuts, hangs and
/// failures on demand); `alpha` is Primary and both are in sync (zeroed stores: no
/// initial sync).
fn pair_over_a_volatile_spare(test: &str, options: ClusterOptions) -> (Cluster, VolatileStore) {
    pair_over_a_volatile_store(test, options, "beta")
}

/// As [`pair_over_a_volatile_spare`], with the [`VolatileStore`] under `node`.
fn pair_over_a_volatile_store(
    test: &str,
    options: ClusterOptions,
    node: &str,
) -> (Cluster, VolatileStore) {
    let mut cluster = Cluster::new(test, &["alpha", "beta"], options);
    let image = cluster.node(node).image.clone();
    let store = VolatileStore::start(&cluster.dir.join(format!("{node}-store")), &image);
    cluster
        .nodes
        .get_mut(node)
        .expect("node")
        .image
        .clone_from(&store.file());
    cluster.start_fresh_pair_in_sync();
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
        s.io.writes > writes_before + 1000
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

/// The checker writes through alpha at QD8 for 4 s; `node`'s disk (the
/// [`VolatileStore`]) dies under it. Waits for the detach, then for the checker,
/// which must have run its full time (no write failed or hung); returns its log.
fn a_disk_dies_under_load(
    cluster: &Cluster,
    store: &VolatileStore,
    node: &str,
) -> std::path::PathBuf {
    let events = EventLog::start(cluster, node);
    let before = cluster.status("alpha").io.writes;
    let writer = checker_in_background(cluster, 8, "4", "0..20000");
    cluster.wait_writes_beyond("alpha", before + 500, Duration::from_secs(30));
    store.fail();
    events.wait_for("disk:Diskless", Duration::from_secs(30));
    let (log, output) = writer.join().expect("checker thread");
    let what = format!("when {node}'s disk died");
    assert_checker_ran_out_its_time(cluster, &output, &what);
    log
}

/// `on-io-error = detach` (the default): the Primary's disk dies under the checker's
/// writes (every request EIO: nbdkit's error filter). The node detaches it and goes
/// on as a diskless Primary through its UpToDate spare: no write fails or hangs, and
/// reads through the Primary (the checker's verify) come from the spare. Then the
/// spare takes over and holds every acknowledged write.
///
/// Seen failing first: before the policy, the first failed journal write failed the
/// volume, the writes in flight returned EIO and every later write EPERM.
#[test]
fn item4_a_primary_disk_that_dies_under_load_is_detached_and_the_primary_goes_on_diskless() {
    require_tool("qemu-io", "qemu-utils");
    let options = ClusterOptions {
        journal: "8M",
        ..ClusterOptions::default()
    };
    let (cluster, store) = pair_over_a_volatile_store("eio-primary", options, "alpha");
    let log = a_disk_dies_under_load(&cluster, &store, "alpha");
    let status = cluster.status("alpha");
    assert_eq!(status.role, "Primary", "{status:#?}");
    assert_eq!(status.disk, "Diskless", "{status:#?}");
    assert!(
        status.disk_error.is_some(),
        "the reason is shown: {status:#?}"
    );
    let beta = cluster.status("beta");
    assert_eq!(beta.disk, "UpToDate", "{beta:#?}");

    // Reads through the diskless Primary come from the spare: every acknowledged
    // write is there.
    let (passed, report) = checker_verify(&cluster.uri("alpha"), &log, "acked");
    assert!(
        passed,
        "reads through the diskless primary:\n{report}\n{}",
        cluster.log_tail("alpha")
    );
    // Whole-volume reads (nbdcopy) and one 8 MiB request (split into READ_REPLY-sized
    // pieces) through the diskless Primary match the spare's export byte for byte.
    qemu_io_ok(&cluster.uri("alpha"), true, "read 0 8M");
    cluster.assert_exports_identical("alpha", "beta");
    // Its store cannot come back under a Primary: refused, with the reason.
    store.repair();
    let refusal = cluster.replctl_refused("alpha", &["attach", RESOURCE]);
    assert!(refusal.contains("diskless Primary"), "{refusal}");
    let (flushed, text) = qemu_io(&cluster.uri("alpha"), false, "flush");
    assert!(
        flushed,
        "flush through the diskless primary: {text}\n{}",
        cluster.log_tail("alpha")
    );
    // A planned switchover: the diskless Primary demotes, the spare is promoted.
    cluster.replctl_ok("alpha", &["demote", RESOURCE]);
    cluster.replctl_ok("beta", &["promote", RESOURCE]);
    let (passed, report) = checker_verify(&cluster.uri("beta"), &log, "acked");
    assert!(
        passed,
        "the new primary:\n{report}\n{}",
        cluster.log_tail("beta")
    );
    // The old disk works again: attached to the Secondary it is a resync target of
    // every block (its peer marked them all), never a source, and ends identical.
    cluster.replctl_ok("alpha", &["attach", RESOURCE]);
    cluster.wait_in_sync(Duration::from_secs(120));
    cluster.assert_exports_identical("alpha", "beta");
    cluster.assert_no_panic_logged("alpha");
}

/// The spare's disk dies under the checker's writes: the spare detaches it and
/// leaves; the Primary goes on alone (no write fails or hangs) and marks what the
/// spare misses. The disk is replaced (the error stops), the operator attaches it,
/// the spare resyncs, and after a failover holds every acknowledged write.
#[test]
fn item4_a_secondary_disk_that_dies_under_load_is_detached_and_rebuilt_after_attach() {
    require_tool("qemu-io", "qemu-utils");
    let options = ClusterOptions {
        journal: "8M",
        ..ClusterOptions::default()
    };
    let (mut cluster, store) = pair_over_a_volatile_spare("eio-secondary", options);
    let log = a_disk_dies_under_load(&cluster, &store, "beta");
    let beta = cluster.status("beta");
    assert_eq!(beta.disk, "Diskless", "{beta:#?}");
    let alpha = cluster.wait_status("alpha", "peer gone", Duration::from_secs(30), |s| {
        s.peer.as_ref().is_some_and(|p| p.connection != "Connected")
    });
    assert!(alpha.out_of_sync_bytes > 0, "{alpha:#?}");

    store.repair();
    cluster.replctl_ok("beta", &["attach", RESOURCE]);
    fail_over_and_verify(&mut cluster, &log, "after its disk was replaced");
    cluster.assert_no_panic_logged("beta");
}

/// A read that fails with EIO on the Primary's disk (its reads fail, its writes
/// work: bad sectors) is served from the UpToDate spare and the blocks are rewritten
/// here: the client reads the right data, `repaired_blocks` counts them, the disk
/// stays attached, and once its reads work again the rewritten blocks read back
/// locally.
#[test]
fn item4_a_read_error_on_the_primary_is_served_by_the_peer_and_rewritten() {
    require_tool("qemu-io", "qemu-utils");
    let (cluster, store) =
        pair_over_a_volatile_store("eio-read", ClusterOptions::default(), "alpha");
    let uri = cluster.uri("alpha");
    let checkpoints = cluster.status("alpha").io.checkpoints;
    qemu_io_ok(&uri, false, "write -P 0x6b 1M 256k");
    qemu_io_ok(&uri, false, "flush");
    // Once a checkpoint followed the write (it was applied in place), the blocks are
    // read from the disk, not from the engine's overlay of recent writes.
    cluster.wait_status("alpha", "checkpointed", Duration::from_secs(60), |s| {
        s.io.checkpoints > checkpoints
    });
    store.fail_reads();
    qemu_io_ok(&uri, true, "read -P 0x6b 1M 256k");
    let status = cluster.status("alpha");
    assert_eq!(status.disk, "UpToDate", "{status:#?}");
    assert!(
        status.io.repaired_blocks >= 64,
        "the blocks read from the peer were not rewritten: {status:#?}"
    );
    store.repair();
    qemu_io_ok(&uri, true, "read -P 0x6b 1M 256k");
    cluster.wait_in_sync(Duration::from_secs(60));
    cluster.assert_exports_identical("alpha", "beta");
    cluster.assert_no_panic_logged("alpha");
}
