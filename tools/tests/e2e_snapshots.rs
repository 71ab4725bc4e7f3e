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

    // kill -9 of the Primary while the checker writes: the snapshot is still its point.
    let writes_before = cluster.status("alpha").io.writes;
    let writer = checker_write_in_background(&cluster, "alpha", 10, "0..4096");
    cluster.wait_writes_beyond("alpha", writes_before + 300, Duration::from_secs(30));
    cluster.kill9("alpha");
    let _ = writer.join().expect("checker thread");
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
    let writes_before = cluster.status("alpha").io.writes;
    let writer = checker_write_in_background(&cluster, "alpha", 4, "0..4096");
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
    let cluster = Cluster::pair(
        "snap-bad",
        ClusterOptions {
            // 16 blocks of copy-on-write room.
            extra: "snapshot-area = \"66048\"".into(),
            ..snapshot_options()
        },
    );
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
    // A full snapshot area invalidates the snapshot, with an event, never the volume.
    let events = EventLog::start(&cluster, "alpha");
    cluster.replctl_ok("alpha", &["snapshot", "create", RESOURCE, "small"]);
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0x11 0 1M");
    wait_until("the snapshot invalidated", Duration::from_secs(30), || {
        let list = snapshot_list(&cluster, "alpha");
        list["snapshots"]
            .as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == "small"))
            .filter(|s| s["valid"] == false)
            .map(|s| s["invalid_reason"].as_str().unwrap_or("").to_string())
    });
    wait_until("the invalidation event", Duration::from_secs(10), || {
        events
            .text()
            .contains("snapshot small invalidated")
            .then_some(())
    });
    let (ok, _) = qemu_io(&snapshot_uri(&cluster, "alpha", "small"), true, "read 0 4k");
    assert!(!ok, "an invalid snapshot was served");
    qemu_io_ok(&cluster.uri("alpha"), true, "read -P 0x11 0 1M");
    // Without a snapshot area, a clear refusal.
    let plain = Cluster::pair("snap-none", small_options(false));
    let error = plain.replctl_refused("alpha", &["snapshot", "create", RESOURCE, "x"]);
    assert!(error.contains("snapshot-dir"), "{error}");
}

#[test]
fn p8_snapshot_all_takes_one_point_of_the_write_order_on_both_nodes_under_load() {
    let cluster = Cluster::pair("snap-all", snapshot_options());
    let writes_before = cluster.status("alpha").io.writes;
    let writer = checker_write_in_background(&cluster, "alpha", 4, "0..4096");
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

/// `nbdinfo --map=CONTEXT URI`: the dirty ranges `(offset, length)` (type bit 1).
fn nbdinfo_dirty(uri: &str, context: &str) -> Vec<(u64, u64)> {
    let out = run_ok(
        Command::new("nbdinfo")
            .arg(format!("--map={context}"))
            .arg(uri),
        Duration::from_secs(60),
    );
    let mut dirty: Vec<(u64, u64)> = Vec::new();
    for line in out.lines() {
        let fields: Vec<u64> = line
            .split_whitespace()
            .take(3)
            .filter_map(|f| f.parse().ok())
            .collect();
        if let [offset, length, kind] = fields[..] {
            if kind & 1 == 1 {
                match dirty.last_mut() {
                    Some((o, l)) if *o + *l == offset => *l += length,
                    _ => dirty.push((offset, length)),
                }
            }
        }
    }
    dirty
}

/// The blocks a list of byte ranges covers.
fn blocks_of(ranges: &[(u64, u64)]) -> Vec<u64> {
    ranges
        .iter()
        .flat_map(|&(offset, length)| offset / 4096..(offset + length).div_ceil(4096))
        .collect()
}

#[test]
fn p8_a_full_and_an_incremental_backup_from_the_secondary_restore_a_byte_identical_volume() {
    require_tool("nbdinfo", "libnbd-bin");
    let mut cluster = Cluster::pair("snap-backup", snapshot_options());
    let size = cluster.status("alpha").size_bytes;
    nbd_write_all(&cluster, "alpha", &pattern_bytes(0xA, size as usize));
    cluster.wait_in_sync(Duration::from_secs(60));
    cluster.replctl_ok("beta", &["snapshot", "create", RESOURCE, "s0"]);
    let full = cluster.dir.join("full.bak");
    cluster.replctl_ok(
        "beta",
        &[
            "backup",
            RESOURCE,
            "--snapshot",
            "s0",
            "--to",
            full.to_str().unwrap(),
        ],
    );

    // Pattern B over about 1 % of the blocks, scattered.
    let blocks = size / 4096;
    let mut rewritten: Vec<u64> = (0..blocks).step_by(97).collect();
    let mut qemu = Command::new("qemu-io");
    qemu.args(["-f", "raw"]);
    for block in &rewritten {
        qemu.arg("-c")
            .arg(format!("write -P 0x5b {} 4k", block * 4096));
    }
    run_ok(qemu.arg(cluster.uri("alpha")), Duration::from_secs(60));
    cluster.wait_in_sync(Duration::from_secs(60));
    // The Secondary dies right after its snapshot of B: both snapshots survive.
    cluster.replctl_ok("beta", &["snapshot", "create", RESOURCE, "s1"]);
    cluster.kill9("beta");
    cluster.start("beta");
    cluster.wait_in_sync(Duration::from_secs(60));

    // The dirty bitmap of s1 since s0 lists exactly the rewritten blocks.
    let dirty = nbdinfo_dirty(
        &snapshot_uri(&cluster, "beta", "s1"),
        "qemu:dirty-bitmap:s0",
    );
    rewritten.sort_unstable();
    assert_eq!(
        blocks_of(&dirty),
        rewritten,
        "qemu:dirty-bitmap:s0 on r0@s1"
    );
    let incremental = cluster.dir.join("inc.bak");
    let text = cluster.replctl_ok(
        "beta",
        &[
            "backup",
            RESOURCE,
            "--snapshot",
            "s1",
            "--since",
            "s0",
            "--to",
            incremental.to_str().unwrap(),
            "--json",
        ],
    );
    let summary: serde_json::Value = serde_json::from_str(&text).expect("backup --json");
    assert_eq!(
        summary["data_blocks"].as_u64(),
        Some(rewritten.len() as u64),
        "{summary}"
    );

    // Restore the chain into a fresh image: byte-identical to the volume now.
    let restored = cluster.dir.join("restored.img");
    engine::volume::create_image_file(&restored, size).expect("image");
    cluster.replctl_ok(
        "beta",
        &[
            "restore",
            "--to",
            restored.to_str().unwrap(),
            full.to_str().unwrap(),
            incremental.to_str().unwrap(),
        ],
    );
    assert_same_bytes(
        &std::fs::read(&restored).expect("restored"),
        &cluster.export_bytes("alpha"),
        "restored chain",
    );
    // The incremental alone, or in the wrong order, is refused.
    let error = cluster.replctl_refused(
        "beta",
        &[
            "restore",
            "--to",
            restored.to_str().unwrap(),
            incremental.to_str().unwrap(),
        ],
    );
    assert!(error.contains("full"), "{error}");

    // kill -9 of the node during a backup: no file that looks complete, and the
    // backup works once the node is back.
    let during = cluster.dir.join("during.bak");
    let config = cluster.config.clone();
    let target = during.clone();
    let backup = std::thread::spawn(move || {
        run_with_timeout(
            Command::new(env!("CARGO_BIN_EXE_replctl"))
                .arg("--config")
                .arg(&config)
                .arg("--node")
                .arg("beta")
                .args(["backup", RESOURCE, "--snapshot", "s1", "--to"])
                .arg(&target),
            Duration::from_secs(120),
        )
    });
    let tmp = cluster.dir.join("during.bak.tmp");
    wait_until("the backup under way", Duration::from_secs(30), || {
        (tmp.exists() || during.exists()).then_some(())
    });
    cluster.kill9("beta");
    let output = backup.join().expect("backup thread");
    if output.status.success() {
        // It finished before the kill: then it must be whole.
        cluster.replctl_ok("alpha", &["backup-verify", during.to_str().unwrap()]);
    } else {
        assert!(
            !during.exists(),
            "a failed backup left {}",
            during.display()
        );
    }
    cluster.start("beta");
    let again = cluster.dir.join("again.bak");
    cluster.replctl_ok(
        "beta",
        &[
            "backup",
            RESOURCE,
            "--snapshot",
            "s1",
            "--since",
            "s0",
            "--to",
            again.to_str().unwrap(),
        ],
    );
    cluster.replctl_ok("beta", &["backup-verify", again.to_str().unwrap()]);
}
