//! P8 with real clients and real daemons: snapshots taken with `replctl snapshot`,
//! read back over NBD as `r0@NAME` by nbdcopy while the volume moves on, across
//! kill -9, on a Secondary under the checker's load; and the bad input around them.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn snapshot_options() -> ClusterOptions {
    ClusterOptions {
        snapshots: true,
        ..small_options(false)
    }
}

fn snapshot_uri(cluster: &Cluster, node: &str, name: &str) -> String {
    format!(
        "nbd://127.0.0.1:{}/{RESOURCE}@{name}",
        cluster.node(node).nbd_port
    )
}

/// Writes `data` over the export from offset 0 with nbdcopy.
fn nbd_write_all(cluster: &Cluster, node: &str, data: &[u8]) {
    let file = cluster.dir.join(format!("pattern-{}.raw", free_port()));
    std::fs::write(&file, data).expect("pattern file");
    run_ok(
        Command::new("nbdcopy").arg(&file).arg(cluster.uri(node)),
        Duration::from_secs(120),
    );
    let _ = std::fs::remove_file(&file);
}

fn uri_bytes(cluster: &Cluster, uri: &str) -> Vec<u8> {
    let copy = cluster.dir.join(format!("copy-{}.raw", free_port()));
    let bytes = export_bytes(uri, &copy);
    let _ = std::fs::remove_file(&copy);
    bytes
}

fn snapshot_list(cluster: &Cluster, node: &str) -> serde_json::Value {
    let text = cluster.replctl_ok(node, &["snapshot", "list", RESOURCE, "--json"]);
    serde_json::from_str(&text).expect("snapshot list --json")
}

#[test]
fn p8_a_snapshot_export_reads_its_point_while_the_volume_moves_on_and_after_kill9() {
    require_tool("nbdinfo", "libnbd-bin");
    let mut cluster = Cluster::pair("snap-point", snapshot_options());
    let size = cluster.status("alpha").size_bytes as usize;
    let a = pattern_bytes(0xA, size);
    nbd_write_all(&cluster, "alpha", &a);
    let created = cluster.replctl_ok("alpha", &["snapshot", "create", RESOURCE, "a"]);
    assert!(created.contains("r0@a"), "{created}");
    // Pattern B over 2 MiB of it.
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0xbb 1M 2M");
    let mut b = a.clone();
    b[1 << 20..3 << 20].fill(0xbb);

    assert_same_bytes(
        &uri_bytes(&cluster, &snapshot_uri(&cluster, "alpha", "a")),
        &a,
        "snapshot a",
    );
    assert_same_bytes(&cluster.export_bytes("alpha"), &b, "the volume");
    let listed = run_ok(
        Command::new("nbdinfo").arg("--list").arg(format!(
            "nbd://127.0.0.1:{}",
            cluster.node("alpha").nbd_port
        )),
        Duration::from_secs(30),
    );
    assert!(
        listed.contains("r0@a"),
        "NBD_OPT_LIST lacks the snapshot:\n{listed}"
    );
    // Read-only: a write through the snapshot's export fails and changes nothing.
    let (ok, out) = qemu_io(
        &snapshot_uri(&cluster, "alpha", "a"),
        false,
        "write -P 0xcc 0 4k",
    );
    assert!(!ok, "a write to a snapshot export succeeded:\n{out}");
    let list = snapshot_list(&cluster, "alpha");
    assert_eq!(list["snapshots"][0]["changed_blocks"], 512, "{list}");

    // kill -9 and restart: the snapshot is still its point.
    cluster.kill9("alpha");
    cluster.start("alpha");
    wait_until("alpha's disk back", Duration::from_secs(30), || {
        (cluster.status("alpha").disk != "Diskless").then_some(())
    });
    assert_same_bytes(
        &uri_bytes(&cluster, &snapshot_uri(&cluster, "alpha", "a")),
        &a,
        "snapshot a after kill -9",
    );
    cluster.assert_no_panic_logged("alpha");
}

#[test]
fn p8_a_snapshot_on_the_secondary_under_load_is_a_prefix_of_the_acknowledged_writes() {
    let cluster = Cluster::pair("snap-secondary", snapshot_options());
    let dir = cluster.dir.clone();
    let uri = cluster.uri("alpha");
    let writes_before = cluster.status("alpha").io.writes;
    let writer = std::thread::spawn(move || {
        checker_write(
            &dir,
            &uri,
            &["--qd", "32", "--seconds", "4", "--blocks", "0..4096"],
        )
    });
    cluster.wait_writes_beyond("alpha", writes_before + 500, Duration::from_secs(30));
    cluster.replctl_ok("beta", &["snapshot", "create", RESOURCE, "mid"]);
    let (log, output) = writer.join().expect("checker thread");
    assert!(
        output.status.success(),
        "checker: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (passed, report) = checker_verify(&snapshot_uri(&cluster, "beta", "mid"), &log, "prefix");
    assert!(
        passed,
        "the Secondary's snapshot is not a prefix of the write order:\n{report}"
    );
    // And it is a point in the middle: some writes came after it.
    let list = snapshot_list(&cluster, "beta");
    assert!(
        list["snapshots"][0]["changed_blocks"].as_u64().unwrap_or(0) > 0,
        "{list}"
    );
    let (passed, report) = checker_verify(&cluster.uri("alpha"), &log, "acked");
    assert!(passed, "{report}");
}

#[test]
fn p5_snapshot_commands_refuse_bad_input_and_change_nothing() {
    let cluster = Cluster::pair("snap-bad", snapshot_options());
    cluster.replctl_ok("alpha", &["snapshot", "create", RESOURCE, "keep"]);
    for (args, needle) in [
        (
            vec!["snapshot", "create", RESOURCE, "bad/name"],
            "invalid snapshot name",
        ),
        (
            vec!["snapshot", "create", RESOURCE, "keep"],
            "exists already",
        ),
        (
            vec!["snapshot", "delete", RESOURCE, "nope"],
            "no snapshot named",
        ),
        (vec!["snapshot", "list", "r9"], "no resource"),
    ] {
        let error = cluster.replctl_refused("alpha", &args);
        assert!(error.contains(needle), "{args:?}: {error}");
    }
    let list = snapshot_list(&cluster, "alpha");
    assert_eq!(
        list["snapshots"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    // An unknown snapshot is no export.
    let (ok, _) = qemu_io(&snapshot_uri(&cluster, "alpha", "nope"), true, "read 0 4k");
    assert!(!ok, "an unknown snapshot was served");
    // A snapshot being read is not deleted.
    let mut reader = RawNbd::open(cluster.node("alpha").nbd_port, "r0@keep");
    assert!(reader.read(0, 4096).is_ok());
    let error = cluster.replctl_refused("alpha", &["snapshot", "delete", RESOURCE, "keep"]);
    assert!(error.contains("being read"), "{error}");
    drop(reader);
    wait_until("the reader gone", Duration::from_secs(10), || {
        (snapshot_list(&cluster, "alpha")["snapshots"][0]["readers"] == 0).then_some(())
    });
    cluster.replctl_ok("alpha", &["snapshot", "delete", RESOURCE, "keep"]);
    // Without a snapshot area, a clear refusal.
    let plain = Cluster::pair("snap-none", small_options(false));
    let error = plain.replctl_refused("alpha", &["snapshot", "create", RESOURCE, "x"]);
    assert!(error.contains("snapshot-dir"), "{error}");
}

#[test]
fn p8_snapshot_all_takes_one_point_of_the_write_order_on_both_nodes_under_load() {
    let cluster = Cluster::pair("snap-all", snapshot_options());
    let dir = cluster.dir.clone();
    let uri = cluster.uri("alpha");
    let writes_before = cluster.status("alpha").io.writes;
    let writer = std::thread::spawn(move || {
        checker_write(
            &dir,
            &uri,
            &["--qd", "32", "--seconds", "4", "--blocks", "0..4096"],
        )
    });
    cluster.wait_writes_beyond("alpha", writes_before + 500, Duration::from_secs(30));
    let text = cluster.replctl_ok("alpha", &["snapshot", "create", RESOURCE, "both", "--all"]);
    assert!(text.contains("taken on alpha, beta"), "{text}");
    let (log, output) = writer.join().expect("checker thread");
    assert!(
        output.status.success(),
        "checker: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The same point on both: byte-identical images, a prefix of the write order.
    let on_alpha = uri_bytes(&cluster, &snapshot_uri(&cluster, "alpha", "both"));
    let on_beta = uri_bytes(&cluster, &snapshot_uri(&cluster, "beta", "both"));
    assert_same_bytes(&on_alpha, &on_beta, "snapshot 'both' on alpha and beta");
    let (passed, report) = checker_verify(&snapshot_uri(&cluster, "beta", "both"), &log, "prefix");
    assert!(passed, "{report}");
    let points: Vec<u64> = ["alpha", "beta"]
        .iter()
        .map(|node| {
            snapshot_list(&cluster, node)["snapshots"][0]["point"]
                .as_u64()
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(points[0], points[1], "the nodes' points differ");
    // On a Secondary, --all is refused (the Primary's write order is the one).
    let error = cluster.replctl_refused("beta", &["snapshot", "create", RESOURCE, "x", "--all"]);
    assert!(error.contains("Primary"), "{error}");
}
