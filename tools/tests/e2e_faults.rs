//! Every fault ends in a defined state: faults injected into real daemons with real
//! components (a store that loses its unflushed writes, killed processes), each
//! checked with the write-verify checker for lost acknowledged writes.

mod common;

use std::time::Duration;

use common::*;

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
    let mut cluster = Cluster::new("p1-power-loss", &["alpha", "beta"], options);
    let beta_image = cluster.node("beta").image.clone();
    let mut store = VolatileStore::start(&cluster.dir.join("beta-store"), &beta_image);
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
    // Both stores are zeroes: no initial sync needed.
    cluster.replctl_ok("alpha", &["new-current-uuid", RESOURCE, "--clear-bitmap"]);
    cluster.replctl_ok("alpha", &["promote", RESOURCE]);
    cluster.wait_in_sync(Duration::from_secs(60));

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
    cluster.wait_in_sync(Duration::from_secs(120));
    // The client flushes: every acknowledged write is now durable on both nodes.
    qemu_io_ok(&cluster.uri("alpha"), false, "flush");

    // The primary dies; the spare takes over and must hold every acknowledged write.
    cluster.kill9("alpha");
    cluster.wait_peer_lost("beta", Duration::from_secs(30));
    cluster.replctl_ok("beta", &["promote", RESOURCE, "--force"]);
    let (passed, report) = checker_verify(&cluster.uri("beta"), &log, "acked");
    assert!(
        passed,
        "the promoted spare lost acknowledged writes after its power cut:\n{report}\n{}",
        cluster.log_tail("beta")
    );
}
