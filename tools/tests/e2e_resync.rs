//! P6 and resync end to end: resync moves only what differs, a rebuild of a blank
//! member survives `kill -9` of either side and resumes, stale resync data never wins,
//! online verify finds planted divergence, and the operator's tools (detach/attach,
//! invalidate, pause/resume, throttle) work on real daemons.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use engine::rng::SplitMix64;
use replicad::control::ResourceStatus;
use tools::nbd_client::NbdClient;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Writes one 4 KiB block per `(block, fill)` through NBD, 32 in flight.
fn write_blocks(uri: &str, blocks: &[(u64, u8)]) {
    let runtime = runtime();
    runtime.block_on(async {
        let client = NbdClient::connect(uri).await.expect("connect");
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in blocks.chunks(32) {
            for &(block, fill) in chunk {
                let client = client.clone();
                tasks.spawn(async move {
                    client
                        .write(block * 4096, Bytes::from(vec![fill; 4096]), false)
                        .await
                });
            }
            while let Some(result) = tasks.join_next().await {
                result.expect("task").expect("write");
            }
        }
        client.flush().await.expect("flush");
        let _ = client.disconnect().await;
    });
}

/// Reads block `block` through NBD.
fn read_block(uri: &str, block: u64) -> Vec<u8> {
    runtime().block_on(async {
        let client = NbdClient::connect(uri).await.expect("connect");
        let data = client
            .read(block * 4096, 4096)
            .await
            .expect("read")
            .to_vec();
        let _ = client.disconnect().await;
        data
    })
}

/// Fills an image with pseudo-random data quickly (the "existing data" of a store),
/// leaving its first `zero_bytes` zero (the checker assumes a zeroed start).
fn fill_random(path: &std::path::Path, bytes: u64, seed: u64, zero_bytes: u64) {
    use std::io::Write;
    let mut rng = SplitMix64::new(seed);
    let mut file =
        std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(path).expect("image"));
    let mut chunk = vec![0u8; 1 << 20];
    for index in 0..bytes / chunk.len() as u64 {
        if index * chunk.len() as u64 >= zero_bytes {
            rng.fill(&mut chunk);
        } else {
            chunk.fill(0);
        }
        file.write_all(&chunk).expect("fill");
    }
    file.flush().expect("flush");
}

fn peer(status: &ResourceStatus) -> replicad::control::PeerStatus {
    status.peer.clone().expect("a peer")
}

/// Both images' data areas and checksum tables are identical (daemons stopped).
fn assert_replicas_identical(cluster: &Cluster, size_bytes: u64, journal: u64) {
    let a = cluster.data_area("alpha", size_bytes);
    let b = cluster.data_area("beta", size_bytes);
    if let Some(index) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "data areas differ first at byte {index} (block {})",
            index / 4096
        );
    }
    let geometry =
        engine::layout::Geometry::internal(cluster.options.image_bytes, journal).expect("geometry");
    let table = |name: &str| {
        let image = std::fs::read(&cluster.node(name).image).expect("image");
        image[geometry.checksum_offset as usize
            ..(geometry.checksum_offset + geometry.checksum_bytes) as usize]
            .to_vec()
    };
    assert!(table("alpha") == table("beta"), "checksum tables differ");
}

/// `replctl verify r0 --json` on alpha, parsed.
fn verify_json(cluster: &Cluster) -> serde_json::Value {
    serde_json::from_str(&cluster.replctl_ok("alpha", &["verify", RESOURCE, "--json"]))
        .expect("verify --json")
}

/// The block numbers a `verify --json` answer reports as different.
fn reported_blocks(found: &serde_json::Value) -> Vec<u64> {
    found["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .filter_map(|b| b.as_u64())
        .collect()
}

#[test]
fn p6_minimal_resync_moves_only_the_dirtied_blocks() {
    let options = ClusterOptions {
        image_bytes: (1 << 30) + (64 << 20),
        journal: "16M",
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::pair("p6-minimal", options);
    let size = cluster.status("alpha").size_bytes;
    assert!(size >= 1 << 30, "a 1 GiB volume (got {size})");
    cluster.replctl_ok("alpha", &["disconnect", RESOURCE]);
    cluster.wait_status("alpha", "StandAlone", Duration::from_secs(10), |s| {
        peer(s).connection == "StandAlone"
    });
    // 8 MiB scattered over the whole volume.
    let mut rng = SplitMix64::new(42);
    let blocks = size / 4096;
    let mut dirtied: Vec<(u64, u8)> = (0..2048)
        .map(|i| (rng.below(blocks), (i % 250 + 1) as u8))
        .collect();
    dirtied.sort();
    dirtied.dedup_by_key(|(block, _)| *block);
    let dirtied_bytes = dirtied.len() as u64 * 4096;
    write_blocks(&cluster.uri("alpha"), &dirtied);
    let before = peer(&cluster.status("alpha")).resync_bytes;
    let out_of_sync = cluster.status("alpha").out_of_sync_bytes;
    assert_eq!(
        out_of_sync, dirtied_bytes,
        "every dirtied block, and only those, is marked"
    );
    cluster.replctl_ok("alpha", &["connect", RESOURCE]);
    cluster.wait_in_sync(Duration::from_secs(120));
    let sent = peer(&cluster.status("alpha")).resync_bytes - before;
    assert!(
        sent <= dirtied_bytes * 11 / 10,
        "resync sent {sent} bytes for {dirtied_bytes} dirtied"
    );
    assert!(
        sent >= dirtied_bytes,
        "resync sent {sent} bytes, less than the {dirtied_bytes} dirtied"
    );
    cluster.stop("alpha");
    cluster.stop("beta");
    assert_replicas_identical(&cluster, size, 16 << 20);
}

/// Waits until the resync has moved at least `fraction` of what it had to.
fn wait_progress(cluster: &Cluster, node: &str, fraction: f64) -> ResourceStatus {
    cluster.wait_status(
        node,
        &format!("resync past {:.0}%", fraction * 100.0),
        Duration::from_secs(180),
        |s| {
            s.peer
                .as_ref()
                .and_then(|p| p.done_percent)
                .is_some_and(|done| done >= fraction * 100.0)
        },
    )
}

#[test]
fn p6_rebuild_under_load_resumes_after_kill9_of_target_and_source() {
    let image_bytes = (1 << 30) + (64 << 20);
    let options = ClusterOptions {
        image_bytes,
        journal: "16M",
        // Throttled so the kills land mid-rebuild on any machine.
        extra: "resync-rate = \"96M\"".into(),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new("p6-rebuild", &["alpha", "beta"], options);
    // alpha holds 1 GiB of real data; beta is a blank replacement.
    fill_random(
        &cluster.node("alpha").image.clone(),
        image_bytes,
        7,
        64 << 20,
    );
    cluster.replctl_ok("alpha", &["create-md", RESOURCE]);
    cluster.replctl_ok("beta", &["create-md", RESOURCE, "--zeroed"]);
    cluster.start_all();
    cluster.wait_status("alpha", "connected", Duration::from_secs(30), |s| {
        s.peer.as_ref().is_some_and(|p| p.connection == "Connected")
    });
    cluster.replctl_ok("alpha", &["promote", RESOURCE, "--force"]);
    let total = cluster.status("alpha").size_bytes;

    // The checker writes at QD 32 through the primary during the whole rebuild.
    let uri = cluster.uri("alpha");
    let dir = cluster.dir.clone();
    let writer = std::thread::spawn(move || {
        checker_write(
            &dir,
            &uri,
            &["--qd", "32", "--seconds", "25", "--blocks", "0..16384"],
        )
    });

    // Kill the target mid-rebuild; on restart it must resume, not start over.
    let before = peer(&wait_progress(&cluster, "alpha", 0.15));
    cluster.kill9("beta");
    cluster.start("beta");
    let resumed = cluster.wait_status(
        "alpha",
        "the rebuild to resume",
        Duration::from_secs(60),
        |s| {
            s.peer
                .as_ref()
                .is_some_and(|p| p.connection == "Connected" && p.replication.contains("SyncS"))
        },
    );
    // Resumes from the target's last durable progress: at most the bits the checker
    // dirtied meanwhile plus what the target had received but not yet made durable
    // (one checkpoint interval at the throttled rate) come back.
    let checker_range = 16384 * 4096;
    let slack = checker_range + 96 * (1 << 20);
    assert!(
        peer(&resumed).resync_remaining_bytes <= before.resync_remaining_bytes + slack,
        "rebuild restarted from scratch after kill -9 of the target: {} bytes left, {} before",
        peer(&resumed).resync_remaining_bytes,
        before.resync_remaining_bytes
    );
    assert!(
        peer(&resumed).resync_remaining_bytes < total / 100 * 95,
        "no progress survived the restart"
    );

    // Kill the source (the primary) mid-rebuild too.
    let before = peer(&wait_progress(&cluster, "alpha", 0.5));
    let target_remaining = cluster.status("beta").out_of_sync_bytes;
    cluster.kill9("alpha");
    let (log, output) = writer.join().expect("checker thread");
    assert!(
        output.status.success(),
        "checker: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // An Inconsistent target is never promoted without --force (P2).
    let refused = cluster.replctl("beta", &["promote", RESOURCE]);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "promoting an Inconsistent target must be refused"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Inconsistent"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    cluster.start("alpha");
    let resumed = cluster.wait_status(
        "alpha",
        "the rebuild to resume after the source's crash",
        Duration::from_secs(60),
        |s| {
            s.peer
                .as_ref()
                .is_some_and(|p| p.connection == "Connected" && p.replication.contains("SyncS"))
        },
    );
    assert!(
        peer(&resumed).resync_remaining_bytes
            <= before.resync_remaining_bytes.max(target_remaining) + checker_range,
        "rebuild restarted from scratch after kill -9 of the source"
    );
    cluster.replctl_ok("alpha", &["promote", RESOURCE]);
    cluster.wait_in_sync(Duration::from_secs(300));
    let (passed, report) = checker_verify(&cluster.uri("alpha"), &log, "acked");
    assert!(passed, "lost writes across the rebuild:\n{report}");
    cluster.stop("alpha");
    cluster.stop("beta");
    assert_replicas_identical(&cluster, total, 16 << 20);
}

#[test]
fn p6_stale_resync_data_never_overwrites_a_newer_write() {
    // A slow, throttled resync through a slow link, while the primary rewrites blocks
    // just ahead of and just behind the resync cursor: every rewrite must win.
    let options = ClusterOptions {
        image_bytes: 256 << 20,
        journal: "16M",
        proxy: true,
        extra: "resync-rate = \"24M\"".into(),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new("p6-stale", &["alpha", "beta"], options);
    fill_random(&cluster.node("alpha").image.clone(), 256 << 20, 9, 0);
    cluster.replctl_ok("alpha", &["create-md", RESOURCE]);
    cluster.replctl_ok("beta", &["create-md", RESOURCE, "--zeroed"]);
    cluster.start_all();
    cluster.wait_status("alpha", "connected", Duration::from_secs(30), |s| {
        s.peer.as_ref().is_some_and(|p| p.connection == "Connected")
    });
    if let Some(proxy) = &cluster.proxy {
        proxy.set_delay(Duration::from_millis(20));
    }
    cluster.replctl_ok("alpha", &["promote", RESOURCE, "--force"]);
    let size = cluster.status("alpha").size_bytes;
    let blocks = size / 4096;
    let uri = cluster.uri("alpha");
    let mut written: std::collections::BTreeMap<u64, u8> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut round = 0u8;
    loop {
        let status = cluster.status("alpha");
        let done = status
            .peer
            .as_ref()
            .and_then(|p| p.done_percent)
            .unwrap_or(0.0);
        if status
            .peer
            .as_ref()
            .is_some_and(|p| p.replication == "Established")
            || Instant::now() > deadline
        {
            break;
        }
        // Blocks around the resync cursor (the source walks the bitmap in order).
        let cursor = (done / 100.0 * blocks as f64) as u64;
        round = round.wrapping_add(1).max(1);
        let batch: Vec<(u64, u8)> = (0..64)
            .map(|i| ((cursor + i * 16).min(blocks - 1), round))
            .collect();
        write_blocks(&uri, &batch);
        for (block, fill) in batch {
            written.insert(block, fill);
        }
    }
    cluster.wait_in_sync(Duration::from_secs(120));
    assert!(!written.is_empty());
    cluster.stop("alpha");
    cluster.stop("beta");
    let b = cluster.data_area("beta", size);
    for (block, fill) in &written {
        let at = (*block * 4096) as usize;
        assert!(
            b[at..at + 4096].iter().all(|x| x == fill),
            "block {block} on the target lost its rewrite to stale resync data"
        );
    }
    assert_replicas_identical(&cluster, size, 16 << 20);
}

#[test]
fn verify_finds_planted_divergence_and_repair_fixes_it() {
    let mut cluster = Cluster::pair("verify", ClusterOptions::default());
    let uri = cluster.uri("alpha");
    let blocks: Vec<(u64, u8)> = (0..64).map(|i| (i * 50, 0xA0 + i as u8)).collect();
    write_blocks(&uri, &blocks);
    cluster.replctl_ok("alpha", &["verify", RESOURCE]);
    // Flip bytes in three of beta's blocks behind the daemon's back.
    let planted = [100u64, 1500, 3000];
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cluster.node("beta").image)
            .expect("image");
        for block in planted {
            let mut byte = [0u8; 1];
            file.read_exact_at(&mut byte, block * 4096 + 77)
                .expect("read");
            byte[0] ^= 0x5A;
            file.write_all_at(&byte, block * 4096 + 77).expect("write");
        }
        file.sync_all().expect("sync");
    }
    let found = verify_json(&cluster);
    let reported = reported_blocks(&found);
    assert_eq!(
        reported,
        planted.to_vec(),
        "verify must report exactly the planted blocks: {found}"
    );
    cluster.replctl_ok("alpha", &["verify", RESOURCE, "--repair"]);
    cluster.wait_status("alpha", "repaired", Duration::from_secs(60), |s| {
        s.out_of_sync_bytes == 0
            && s.peer
                .as_ref()
                .is_some_and(|p| p.replication == "Established")
    });
    cluster.wait_in_sync(Duration::from_secs(60));
    let again = verify_json(&cluster);
    assert_eq!(again["out_of_sync_blocks"], 0, "after repair: {again}");
    // Reads on beta (promoted read-only view) return the good data again.
    cluster.stop("alpha");
    cluster.replctl_ok("beta", &["promote", RESOURCE, "--force"]);
    for block in planted {
        let fill = 0xA0 + (block / 50) as u8;
        let data = read_block(&cluster.uri("beta"), block);
        assert!(
            data.iter().all(|&b| b == fill),
            "block {block} not repaired"
        );
    }
}

#[test]
fn rebuild_of_a_replaced_disk_with_detach_create_md_attach() {
    let mut cluster = Cluster::pair("replace", ClusterOptions::default());
    let uri = cluster.uri("alpha");
    write_blocks(&uri, &(0..256).map(|i| (i * 7, 0x11)).collect::<Vec<_>>());
    cluster.replctl_ok("beta", &["detach", RESOURCE]);
    cluster.wait_status("beta", "Diskless", Duration::from_secs(10), |s| {
        s.disk == "Diskless"
    });
    // The primary keeps serving alone.
    write_blocks(&uri, &(0..256).map(|i| (i * 13, 0x22)).collect::<Vec<_>>());
    // A blank replacement store.
    let image = cluster.node("beta").image.clone();
    engine::volume::create_image_file(&image, cluster.options.image_bytes).expect("blank image");
    cluster.replctl_ok("beta", &["create-md", RESOURCE, "--zeroed"]);
    cluster.replctl_ok("beta", &["attach", RESOURCE]);
    cluster.wait_in_sync(Duration::from_secs(120));
    let size = cluster.status("alpha").size_bytes;
    cluster.stop("alpha");
    cluster.stop("beta");
    assert_replicas_identical(&cluster, size, 16 << 20);
}

#[test]
fn invalidate_pulls_everything_and_pause_resume_hold_the_resync() {
    let options = ClusterOptions {
        extra: "resync-rate = \"32M\"".into(),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::pair("invalidate", options);
    write_blocks(
        &cluster.uri("alpha"),
        &(0..512).map(|i| (i * 3, 0x33)).collect::<Vec<_>>(),
    );
    cluster.replctl_ok("beta", &["invalidate", RESOURCE]);
    cluster.wait_status("beta", "SyncTarget", Duration::from_secs(30), |s| {
        s.disk == "Inconsistent"
    });
    cluster.replctl_ok("alpha", &["pause-sync", RESOURCE]);
    let paused = cluster.wait_status("alpha", "PausedSyncS", Duration::from_secs(10), |s| {
        peer(s).replication == "PausedSyncS"
    });
    let remaining = peer(&paused).resync_remaining_bytes;
    // While paused, nothing moves: an observation window, not synchronisation (a
    // running resync of this size moves megabytes in it).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        peer(&cluster.status("alpha")).resync_remaining_bytes,
        remaining,
        "a paused resync made progress"
    );
    cluster.replctl_ok("alpha", &["resume-sync", RESOURCE]);
    let wait = cluster.replctl("beta", &["wait-sync", RESOURCE, "--wait", "120"]);
    assert!(
        wait.status.success(),
        "wait-sync: {}",
        String::from_utf8_lossy(&wait.stderr)
    );
    cluster.wait_in_sync(Duration::from_secs(30));
    let size = cluster.status("alpha").size_bytes;
    cluster.stop("alpha");
    cluster.stop("beta");
    assert_replicas_identical(&cluster, size, 16 << 20);
}

#[test]
fn verify_finds_a_block_swapped_for_another_with_the_same_crc32() {
    // Self-checking blocks (the checker's, like many file systems' and databases')
    // end in their own CRC32, so they all share one CRC32: only a real digest tells
    // them apart. Swap one such block for another on the secondary.
    let cluster = Cluster::pair("verify-crc-residue", ClusterOptions::default());
    let (log, output) = checker_write(
        &cluster.dir,
        &cluster.uri("alpha"),
        &["--qd", "8", "--writes", "64", "--blocks", "0..64"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Two blocks the checker wrote, from its log.
    let text = std::fs::read_to_string(&log).expect("checker log");
    let mut written: Vec<u64> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|value| value["t"] == "w")
        .filter_map(|value| value["b"].as_u64())
        .collect();
    written.sort_unstable();
    written.dedup();
    let (source, target) = (written[0], written[written.len() - 1]);
    cluster.wait_in_sync(Duration::from_secs(30));
    let clean = verify_json(&cluster);
    assert_eq!(clean["out_of_sync_blocks"], 0, "{clean}");
    let image = cluster.node("beta").image.clone();
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .expect("image");
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        file.read_exact_at(&mut a, source * 4096).expect("read");
        file.read_exact_at(&mut b, target * 4096).expect("read");
        assert_ne!(a, b, "the checker wrote different blocks");
        assert_eq!(
            crc32fast::hash(&a),
            crc32fast::hash(&b),
            "self-checking blocks share their CRC32"
        );
        file.write_all_at(&a, target * 4096).expect("write");
        file.sync_all().expect("sync");
    }
    let found = verify_json(&cluster);
    let reported = reported_blocks(&found);
    assert_eq!(reported, vec![target], "{found}");
}
