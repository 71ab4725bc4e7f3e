//! End-to-end replication: a real file system across a failover (P1), never two
//! primaries and split-brain resolution (P4), a crashed primary that rejoins, a silent
//! partition noticed within the timeout, and what `replctl status` shows.
//!
//! Real daemons on loopback, real clients (nbdfuse + loop + ext4, qemu-io, nbdcopy,
//! replcheck), faults from the `FaultProxy` in front of beta's replication listener.
//! alpha has the lower node id, so it dials beta (through the proxy when there is one).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use engine::rng::SplitMix64;

fn seed() -> u64 {
    std::process::id() as u64 ^ 0x5EED_0004
}

fn proxy(cluster: &Cluster) -> &tools::faultproxy::FaultProxy {
    cluster.proxy.as_ref().expect("the cluster has a proxy")
}

/// A pair whose replication link adds `delay` each way: records are still in flight
/// when the primary dies, so an acknowledgement given too early shows as a loss.
fn slow_link_pair(test: &str, image_bytes: u64, journal: &'static str, delay: Duration) -> Cluster {
    let cluster = Cluster::pair(
        test,
        ClusterOptions {
            image_bytes,
            journal,
            proxy: true,
            ..ClusterOptions::default()
        },
    );
    proxy(&cluster).set_delay(delay);
    cluster
}

/// Planned switch-over to beta: demote alpha (one write first: a demotion flushes, see
/// e2e_flush.rs), wait until beta has heard of it, promote beta.
fn switch_over_to_beta(cluster: &Cluster) {
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0x01 0 4096");
    cluster.replctl_ok("alpha", &["demote", RESOURCE]);
    cluster.wait_status(
        "beta",
        "aware alpha is Secondary",
        Duration::from_secs(10),
        |s| {
            s.peer
                .as_ref()
                .is_some_and(|p| p.role.as_deref() == Some("Secondary"))
        },
    );
    cluster.replctl_ok("beta", &["promote", RESOURCE]);
}

/// Runs `round` `count` times with one seeded random source (the seed is printed).
fn rounds(count: u32, mut round: impl FnMut(u32, &mut SplitMix64)) {
    let seed = seed();
    eprintln!("seed {seed}");
    let mut rng = SplitMix64::new(seed);
    for index in 0..count {
        round(index, &mut rng);
    }
}

// ---------------------------------------------------------------------------------
// 1. ext4 across a failover (P1)
// ---------------------------------------------------------------------------------

/// Writes `count` files of pseudo-random sizes and content under `dir`; returns their
/// contents by name.
fn write_files(
    dir: &std::path::Path,
    prefix: &str,
    count: usize,
    rng: &mut SplitMix64,
    fsync: bool,
) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for index in 0..count {
        let name = format!("{prefix}-{index:03}.bin");
        let mut data = vec![0u8; 4096 + rng.below(3 << 20) as usize];
        rng.fill(&mut data);
        let mut file = std::fs::File::create(dir.join(&name)).expect("create file");
        file.write_all(&data).expect("write file");
        if fsync {
            file.sync_all().expect("fsync file");
        }
        files.insert(name, data);
    }
    files
}

/// Creates, writes and fsyncs files (and their directory) until `stop` or an error;
/// each file counts as acknowledged once both fsyncs returned. Returns the error.
fn fsync_files_until_error(
    dir: &std::path::Path,
    rng: &mut SplitMix64,
    acknowledged: &Mutex<BTreeMap<String, Vec<u8>>>,
    stop: &AtomicBool,
) -> String {
    for index in 0.. {
        if stop.load(Ordering::Relaxed) {
            return "stopped".into();
        }
        let name = format!("acked-{index:05}.bin");
        let mut data = vec![0u8; 1 + rng.below(256 << 10) as usize];
        rng.fill(&mut data);
        let result = (|| -> std::io::Result<()> {
            let mut file = std::fs::File::create(dir.join(&name))?;
            file.write_all(&data)?;
            file.sync_all()?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if let Err(error) = result {
            return format!("{name}: {error}");
        }
        acknowledged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, data);
    }
    unreachable!()
}

#[test]
fn p1_ext4_survives_kill9_of_the_primary_and_a_forced_promotion() {
    assert!(is_root(), "needs root for loop devices and mounts");
    require_tool("mkfs.ext4", "e2fsprogs");
    rounds(2, ext4_failover_round);
}

fn ext4_failover_round(round: u32, rng: &mut SplitMix64) {
    let delay = Duration::from_millis(2 + rng.below(10));
    let mut cluster = slow_link_pair(&format!("ext4-{round}"), 192 << 20, "16M", delay);

    // Work-around for an engine bug (reported; caught by e2e_flush.rs): a FLUSH before
    // any write since the daemon started never completes, and `losetup` fsyncs its
    // backing file first. One write before it lets the flush complete.
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0 0 4096");
    let fuse = NbdFuse::mount(&cluster.dir.join("fuse-alpha"), &cluster.uri("alpha"));
    let device = LoopDevice::attach(&fuse.file());
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&device.path),
        Duration::from_secs(120),
    );
    let mount = Mount::new(&device.path, &cluster.dir.join("mnt-alpha"));
    let mut synced = write_files(&mount.dir, "fsynced", 8, rng, true);
    std::fs::create_dir_all(mount.dir.join("tree/a/b")).expect("mkdir");
    synced.extend(
        write_files(&mount.dir.join("tree/a/b"), "synced", 12, rng, false)
            .into_iter()
            .map(|(name, data)| (format!("tree/a/b/{name}"), data)),
    );
    // This file system only: a plain `sync` waits for every file system of the
    // machine, and a hung one elsewhere would hang this test out of any timeout's reach.
    run_ok(
        Command::new("sync").arg("-f").arg(&mount.dir),
        Duration::from_secs(60),
    );
    // More files that were never synced: they may or may not survive, but must not
    // break the file system.
    let _unsynced = write_files(&mount.dir, "unsynced", 6, rng, false);

    // The primary dies while files are being written and fsynced: every file whose
    // fsync (and its directory's) returned before the crash must survive.
    let acknowledged = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dir, acknowledged, stop) = (mount.dir.clone(), acknowledged.clone(), stop.clone());
        let mut rng = SplitMix64::new(rng.next_u64());
        std::thread::spawn(move || fsync_files_until_error(&dir, &mut rng, &acknowledged, &stop))
    };
    wait_until("two files fsynced", Duration::from_secs(30), || {
        (acknowledged.lock().unwrap_or_else(|p| p.into_inner()).len() >= 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(rng.below(1000)));
    cluster.kill9("alpha");
    // The writer sees the dead device as an I/O error soon; bounded, never joined blind.
    stop.store(true, Ordering::Relaxed);
    wait_until("the file writer to stop", Duration::from_secs(60), || {
        writer.is_finished().then_some(())
    });
    let stopped_by = writer.join().expect("writer thread");
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap_or_else(|p| p.into_inner()));
    eprintln!(
        "ext4 round {round}: {} files fsynced before the kill; the writer stopped on: {stopped_by}",
        acknowledged.len()
    );
    synced.extend(acknowledged);
    teardown_dead_stack(mount, device, fuse);

    cluster.wait_peer_lost("beta", Duration::from_secs(10));
    cluster.replctl_ok("beta", &["promote", RESOURCE, "--force"]);
    let fuse = NbdFuse::mount(&cluster.dir.join("fuse-beta"), &cluster.uri("beta"));
    let device = LoopDevice::attach(&fuse.file());
    {
        // Mounting replays the ext4 journal on the new primary.
        let mount = Mount::new(&device.path, &cluster.dir.join("mnt-beta"));
        for (name, data) in &synced {
            let found = std::fs::read(mount.dir.join(name))
                .unwrap_or_else(|e| panic!("synced file {name} is gone after failover: {e}"));
            assert!(
                found == *data,
                "synced file {name} differs after failover ({} bytes, expected {})",
                found.len(),
                data.len()
            );
        }
    }
    let fsck = run_with_timeout(
        Command::new("fsck.ext4")
            .arg("-f")
            .arg("-n")
            .arg(&device.path),
        Duration::from_secs(120),
    );
    assert!(
        fsck.status.success(),
        "fsck.ext4 -n found problems after failover ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    drop(device);
    drop(fuse);
}

// ---------------------------------------------------------------------------------
// 2. P4: never two primaries; split brain detected and resolved
// ---------------------------------------------------------------------------------

const BLOCK: u64 = 4096;

/// Regions (in 4 KiB blocks) of the split-brain test.
const BASE: (u64, u64) = (0, 160);
const ALPHA_ONLY: (u64, u64) = (0, 64);
const BETA_ONLY: (u64, u64) = (64, 128);
const BOTH: (u64, u64) = (128, 160);

fn fill(uri: &str, region: (u64, u64), pattern: u8) {
    qemu_io_ok(
        uri,
        false,
        &format!(
            "write -P {pattern:#x} {} {}",
            region.0 * BLOCK,
            (region.1 - region.0) * BLOCK
        ),
    );
}

fn expect(uri: &str, region: (u64, u64), pattern: u8, what: &str) {
    let (ok, text) = qemu_io(
        uri,
        true,
        &format!(
            "read -P {pattern:#x} {} {}",
            region.0 * BLOCK,
            (region.1 - region.0) * BLOCK
        ),
    );
    assert!(
        ok,
        "{what}: blocks {region:?} of {uri} do not hold {pattern:#x}:\n{text}"
    );
}

#[test]
fn p4_promote_is_refused_while_the_peer_is_a_connected_primary() {
    let cluster = Cluster::small_pair("p4-refuse", false);
    for args in [
        &["promote", RESOURCE][..],
        &["promote", RESOURCE, "--force"][..],
    ] {
        let reason = cluster.replctl_refused("beta", args);
        assert!(
            reason.contains("peer is Primary") && reason.contains("never two primaries"),
            "unclear reason for {args:?}: {reason}"
        );
    }
    assert_eq!(cluster.status("beta").role, "Secondary");
    assert_eq!(cluster.status("alpha").role, "Primary");
    // Discarding a Primary's data is refused too.
    cluster.replctl_refused("alpha", &["connect", RESOURCE, "--discard-my-data"]);
}

#[test]
fn p4_secondary_serves_read_only_and_refuses_writes() {
    let cluster = Cluster::small_pair("p4-readonly", false);
    fill(&cluster.uri("alpha"), (0, 16), 0x5a);
    let beta = cluster.uri("beta");
    // A real client: qemu-io cannot open the export for writing…
    let (ok, text) = qemu_io(&beta, false, "write -P 0x66 0 4096");
    assert!(!ok, "qemu-io wrote to the Secondary:\n{text}");
    eprintln!("qemu-io write on the Secondary: {}", text.trim());
    // …and reads what the primary wrote.
    expect(&beta, (0, 16), 0x5a, "secondary read");

    // A client that ignores the read-only flag gets EPERM for every kind of write.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = tools::nbd_client::NbdClient::connect(&beta)
            .await
            .expect("connect to the secondary");
        assert!(
            client.info().flags.read_only(),
            "the secondary does not export read-only"
        );
        let data = bytes::Bytes::from(vec![0x66u8; 4096]);
        let write = client.write(0, data, false).await;
        let zeroes = client
            .write_zeroes(0, 4096, tools::nbd_client::ZeroFlags::default())
            .await;
        let trim = client.trim(0, 4096, false).await;
        for (what, result) in [("WRITE", write), ("WRITE_ZEROES", zeroes), ("TRIM", trim)] {
            let error = result.expect_err(&format!("{what} accepted by the Secondary"));
            assert_eq!(
                error.errno(),
                Some(libc::EPERM as u32),
                "{what} refused with {error}"
            );
        }
        // The connection stays usable.
        let block = client.read(0, 4096).await.expect("read after refusals");
        assert!(block.iter().all(|&b| b == 0x5a));
    });
    expect(&beta, (0, 16), 0x5a, "secondary after refused writes");
    expect(
        &cluster.uri("alpha"),
        (0, 16),
        0x5a,
        "primary after refused writes",
    );
}

#[test]
fn p4_split_brain_is_detected_on_both_sides_and_resolved_by_discarding_one() {
    let cluster = Cluster::small_pair("p4-split", true);
    let (alpha, beta) = (cluster.uri("alpha"), cluster.uri("beta"));
    fill(&alpha, BASE, 0x11);
    cluster.wait_in_sync(Duration::from_secs(30));
    expect(&beta, BASE, 0x11, "beta before the partition");

    proxy(&cluster).cut();
    cluster.wait_peer_lost("alpha", Duration::from_secs(10));
    cluster.wait_peer_lost("beta", Duration::from_secs(10));
    // Without --force the spare refuses: the primary might still be alive.
    let reason = cluster.replctl_refused("beta", &["promote", RESOURCE]);
    assert!(reason.contains("--force"), "unclear reason: {reason}");
    cluster.replctl_ok("alpha", &["promote", RESOURCE, "--force"]);
    cluster.replctl_ok("beta", &["promote", RESOURCE, "--force"]);
    fill(&alpha, ALPHA_ONLY, 0xa1);
    fill(&alpha, BOTH, 0xa3);
    fill(&beta, BETA_ONLY, 0xb2);
    fill(&beta, BOTH, 0xb3);

    let events = [
        EventLog::start(&cluster, "alpha"),
        EventLog::start(&cluster, "beta"),
    ];
    // Latency on the healed link: the handshake's frames are still on their way when
    // a side has decided (each side must still learn of the split brain).
    proxy(&cluster).set_delay(Duration::from_millis(20));
    proxy(&cluster).heal();
    for (name, events) in ["alpha", "beta"].iter().zip(&events) {
        cluster.wait_status(name, "in split brain", Duration::from_secs(20), |s| {
            s.peer
                .as_ref()
                .is_some_and(|p| p.split_brain && p.connection == "StandAlone")
        });
        let json = cluster.status_json(name);
        assert_eq!(json["peer"]["split_brain"], true, "{name}: {json}");
        assert!(
            json["peer"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("split brain")),
            "{name}: {json}"
        );
        events.wait_for("split brain", Duration::from_secs(5));
        let text = cluster.replctl_ok(name, &["status", RESOURCE]);
        assert!(text.contains("SPLIT BRAIN"), "{name}: {text}");
        cluster.wait_log(name, "split brain", Duration::from_secs(5));
        assert_eq!(cluster.status(name).role, "Primary");
    }
    // No data was exchanged: each side holds exactly its own writes.
    expect(&alpha, ALPHA_ONLY, 0xa1, "alpha's own writes");
    expect(&alpha, BETA_ONLY, 0x11, "alpha untouched by beta");
    expect(&alpha, BOTH, 0xa3, "alpha's own overlapping writes");
    expect(&beta, ALPHA_ONLY, 0x11, "beta untouched by alpha");
    expect(&beta, BETA_ONLY, 0xb2, "beta's own writes");
    expect(&beta, BOTH, 0xb3, "beta's own overlapping writes");

    // Resolution: beta's changes are dropped, alpha survives.
    cluster.replctl_ok("beta", &["demote", RESOURCE]);
    cluster.replctl_ok("beta", &["connect", RESOURCE, "--discard-my-data"]);
    cluster.replctl_ok("alpha", &["connect", RESOURCE]);
    events[1].wait_for("replication:SyncTarget", Duration::from_secs(20));
    events[0].wait_for("replication:SyncSource", Duration::from_secs(20));
    cluster.wait_in_sync(Duration::from_secs(60));
    for name in ["alpha", "beta"] {
        let status = cluster.status(name);
        let peer = status.peer.expect("peer");
        assert!(!peer.split_brain, "{name} still reports a split brain");
        assert_eq!(status.disk, "UpToDate");
    }
    assert_eq!(cluster.status("beta").role, "Secondary");
    expect(&beta, ALPHA_ONLY, 0xa1, "beta after resolution");
    expect(&beta, BETA_ONLY, 0x11, "beta after resolution");
    expect(&beta, BOTH, 0xa3, "beta after resolution");
    cluster.assert_exports_identical("alpha", "beta");
    let mut cluster = cluster;
    cluster.stop_and_assert_data_areas_identical("alpha", "beta");
}

// ---------------------------------------------------------------------------------
// 3. A crashed primary rejoins safely
// ---------------------------------------------------------------------------------

fn checker_ok(dir: &std::path::Path, uri: &str, args: &[&str]) -> std::path::PathBuf {
    let (log, output) = checker_write(dir, uri, args);
    assert!(
        output.status.success(),
        "checker failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    log
}

fn verify_ok(cluster: &Cluster, name: &str, log: &std::path::Path) {
    let (passed, report) = checker_verify(&cluster.uri(name), log, "acked");
    assert!(
        passed,
        "verify against {name} failed:\n{report}\n{}",
        cluster.log_tail(name)
    );
}

#[test]
fn rejoin_of_a_killed_primary_makes_it_a_sync_target_then_identical() {
    rounds(3, rejoin_round);
}

fn rejoin_round(round: u32, rng: &mut SplitMix64) {
    let delay = Duration::from_millis(10 + rng.below(30));
    let mut cluster = slow_link_pair(&format!("rejoin-{round}"), 96 << 20, "8M", delay);
    let dir = cluster.dir.clone();

    // Phase 1: the checker writes through alpha; alpha dies under it.
    let alpha_uri = cluster.uri("alpha");
    let writes_before = cluster.status("alpha").io.writes;
    let writer = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            checker_ok(
                &dir,
                &alpha_uri,
                &["--qd", "32", "--seconds", "30", "--blocks", "0..6000"],
            )
        })
    };
    // A random kill moment, counted from when the checker's writes arrive.
    cluster.wait_writes_beyond("alpha", writes_before, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500 + rng.below(1000)));
    cluster.kill9("alpha");
    let log_on_alpha = writer.join().expect("checker thread");

    // Phase 2: beta takes over and writes more.
    cluster.wait_peer_lost("beta", Duration::from_secs(10));
    cluster.replctl_ok("beta", &["promote", RESOURCE, "--force"]);
    let beta_uri = cluster.uri("beta");
    let log_on_beta = checker_ok(
        &dir,
        &beta_uri,
        &["--qd", "16", "--seconds", "2", "--blocks", "6000..9000"],
    );

    // Phase 3: alpha restarts while beta keeps writing.
    let events = EventLog::start(&cluster, "beta");
    let during = {
        let (dir, uri) = (dir.clone(), beta_uri.clone());
        std::thread::spawn(move || {
            checker_ok(
                &dir,
                &uri,
                &["--qd", "8", "--seconds", "4", "--blocks", "9000..11000"],
            )
        })
    };
    cluster.start("alpha");
    let status = cluster.status("alpha");
    assert_eq!(
        status.role, "Secondary",
        "alpha did not come back Secondary"
    );
    assert!(
        status
            .recovery
            .as_deref()
            .is_some_and(|r| r.starts_with("crash recovery")),
        "alpha's restart was not a crash recovery: {:?}",
        status.recovery
    );
    let log_during_rejoin = during.join().expect("checker thread");
    cluster.wait_in_sync(Duration::from_secs(90));
    events.wait_for("replication:SyncSource", Duration::from_secs(5));
    let alpha_log = std::fs::read_to_string(&cluster.node("alpha").log).unwrap_or_default();
    assert!(
        alpha_log.contains("replication:SyncTarget"),
        "alpha never became SyncTarget:\n{}",
        cluster.log_tail("alpha")
    );
    let alpha = cluster.status("alpha");
    assert_eq!(
        (alpha.role.as_str(), alpha.disk.as_str()),
        ("Secondary", "UpToDate")
    );
    assert!(
        alpha.peer.as_ref().is_some_and(|p| p.resync_bytes > 0),
        "alpha received no resync data: {alpha:#?}"
    );
    assert_eq!(cluster.status("beta").role, "Primary");

    for log in [&log_on_alpha, &log_on_beta, &log_during_rejoin] {
        verify_ok(&cluster, "beta", log);
        verify_ok(&cluster, "alpha", log);
    }
    cluster.assert_exports_identical("alpha", "beta");
    cluster.stop_and_assert_data_areas_identical("alpha", "beta");
}

// ---------------------------------------------------------------------------------
// 5. A silent partition is noticed within the timeout
// ---------------------------------------------------------------------------------

/// Sequential 4 KiB writes (QD1) through an NBD client; records issue time and latency.
struct LatencyWriter {
    samples: Arc<Mutex<Vec<(Instant, Duration)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

impl LatencyWriter {
    fn start(uri: &str, blocks: u64) -> LatencyWriter {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, stopped, uri) = (samples.clone(), stop.clone(), uri.to_string());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let client = tools::nbd_client::NbdClient::connect(&uri)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut written = 0u64;
                while !stopped.load(Ordering::Relaxed) {
                    let data = bytes::Bytes::from(vec![(written % 251) as u8 + 1; 4096]);
                    let issued = Instant::now();
                    client
                        .write((written % blocks) * 4096, data, false)
                        .await
                        .map_err(|e| format!("write {written} failed: {e}"))?;
                    sink.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((issued, issued.elapsed()));
                    written += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(written)
            })
        });
        LatencyWriter {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    fn samples(&self) -> Vec<(Instant, Duration)> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until `count` writes issued after `since` completed.
    fn wait_writes_after(&self, since: Instant, count: usize, timeout: Duration) {
        wait_until("writes to complete", timeout, || {
            let done = self
                .samples()
                .iter()
                .filter(|(issued, _)| *issued > since)
                .count();
            (done >= count).then_some(())
        });
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("running");
        wait_until("the writer to stop", Duration::from_secs(60), || {
            thread.is_finished().then_some(())
        });
        let result = thread.join().expect("writer thread");
        result.unwrap_or_else(|e| panic!("the writer saw an error: {e}"))
    }
}

#[test]
fn dead_link_blackhole_is_noticed_within_the_timeout_and_resyncs_on_heal() {
    let cluster = Cluster::small_pair("blackhole", true);
    let timeout = Duration::from_secs(2);
    let slack = Duration::from_millis(1500);
    let writer = LatencyWriter::start(&cluster.uri("alpha"), 2048);
    // A steady stream of replicated writes before the partition.
    writer.wait_writes_after(Instant::now(), 20, Duration::from_secs(30));

    let blackholed = Instant::now();
    proxy(&cluster).blackhole();
    let alpha_noticed = cluster.wait_peer_lost("alpha", timeout + slack * 2);
    cluster.wait_peer_lost("beta", timeout + slack * 2);
    let beta_noticed = blackholed.elapsed();
    for (name, noticed) in [("alpha", alpha_noticed), ("beta", beta_noticed)] {
        assert!(
            noticed <= timeout + slack,
            "{name} noticed the dead link after {noticed:?} (timeout {timeout:?})"
        );
    }
    assert!(
        alpha_noticed >= timeout / 2,
        "alpha noticed after {alpha_noticed:?}: the link was not silent (a fault in the test)"
    );
    let noticed = Instant::now();
    // Enough writes without the peer for the latency check below (at least 10).
    writer.wait_writes_after(noticed, 20, Duration::from_secs(30));
    let alone = cluster.status("alpha");
    assert!(
        alone.out_of_sync_bytes > 0,
        "writes without the peer were not marked out of sync"
    );

    proxy(&cluster).heal();
    let healed = Instant::now();
    cluster.wait_in_sync(Duration::from_secs(30));
    let reconnected = healed.elapsed();
    let writes = writer.samples();
    let written = writer.finish();
    // Latency: no write waited much longer than the timeout; once the link was declared
    // dead, writes completed at local speed.
    let stalled = writes
        .iter()
        .filter(|(issued, _)| *issued >= blackholed)
        .map(|(_, latency)| *latency)
        .max()
        .unwrap_or_default();
    assert!(
        stalled <= timeout + slack,
        "a write waited {stalled:?} during the silent partition"
    );
    let after: Vec<Duration> = writes
        .iter()
        .filter(|(issued, _)| *issued >= noticed && *issued < healed)
        .map(|(_, latency)| *latency)
        .collect();
    assert!(after.len() >= 10, "only {} writes while alone", after.len());
    let slowest_alone = after.iter().max().copied().unwrap_or_default();
    assert!(
        slowest_alone < Duration::from_secs(1),
        "writes stayed slow without the peer: {slowest_alone:?}"
    );
    eprintln!(
        "blackhole: alpha noticed after {alpha_noticed:?}, slowest write {stalled:?}, \
         slowest write alone {slowest_alone:?}, reconnected and in sync {reconnected:?} \
         after heal, {written} writes"
    );
    let beta = cluster.status("beta");
    assert!(
        beta.peer.is_some_and(|p| p.resync_bytes > 0),
        "beta received no resync after the heal"
    );
    cluster.assert_exports_identical("alpha", "beta");
}

// ---------------------------------------------------------------------------------
// 6. Status and connect/disconnect
// ---------------------------------------------------------------------------------

fn peer_field<'a>(json: &'a serde_json::Value, field: &str) -> &'a serde_json::Value {
    &json["peer"][field]
}

#[test]
fn status_shows_the_peer_connection_and_connect_disconnect_work() {
    // A slow link keeps records in flight. The proxy also drops what it still holds
    // when a side closes: a REJECT must still reach the dialer (the refusing side
    // lingers until it was read).
    let cluster = Cluster::small_pair("status", true);
    proxy(&cluster).set_delay(Duration::from_millis(20));
    let alpha = cluster.status_json("alpha");
    let beta = cluster.status_json("beta");
    for (json, role, peer, peer_role) in [
        (&alpha, "Primary", "beta", "Secondary"),
        (&beta, "Secondary", "alpha", "Primary"),
    ] {
        assert_eq!(json["role"], role, "{json}");
        assert_eq!(json["disk"], "UpToDate", "{json}");
        assert_eq!(peer_field(json, "name"), peer, "{json}");
        assert_eq!(peer_field(json, "connection"), "Connected", "{json}");
        assert_eq!(peer_field(json, "replication"), "Established", "{json}");
        assert_eq!(peer_field(json, "role"), peer_role, "{json}");
        assert_eq!(peer_field(json, "peer_disk"), "UpToDate", "{json}");
        assert_eq!(peer_field(json, "split_brain"), false, "{json}");
        for counter in ["in_flight", "unacked"] {
            assert!(peer_field(json, counter).is_u64(), "{counter}: {json}");
        }
    }
    let text = cluster.replctl_ok("alpha", &["status", RESOURCE]);
    for needle in [
        "r0 role:Primary",
        "disk:UpToDate",
        "beta role:Secondary connection:Connected",
        "replication:Established peer-disk:UpToDate",
        "in-flight:",
        "unacked:",
    ] {
        assert!(text.contains(needle), "status lacks {needle:?}:\n{text}");
    }

    // Under load, records are in flight and writes wait for the peer's acks.
    let uri = cluster.uri("alpha");
    let dir = cluster.dir.clone();
    let writer = std::thread::spawn(move || {
        checker_ok(
            &dir,
            &uri,
            &["--qd", "32", "--seconds", "3", "--blocks", "0..4000"],
        )
    });
    let (mut in_flight_seen, mut unacked_seen) = (0u64, 0u64);
    let mut client = cluster.client("alpha");
    while !writer.is_finished() {
        let status = client.status(Some(RESOURCE)).expect("status").remove(0);
        let peer = status.peer.expect("peer");
        in_flight_seen = in_flight_seen.max(peer.in_flight);
        unacked_seen = unacked_seen.max(peer.unacked);
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = writer.join().expect("checker thread");
    assert!(
        in_flight_seen > 0 && unacked_seen > 0,
        "status never showed replication in progress (in_flight {in_flight_seen}, unacked {unacked_seen})"
    );
    cluster.wait_status("alpha", "drained", Duration::from_secs(10), |s| {
        s.peer
            .as_ref()
            .is_some_and(|p| p.in_flight == 0 && p.unacked == 0)
    });

    // disconnect on the dialing side: StandAlone there, the peer keeps trying.
    cluster.replctl_ok("alpha", &["disconnect", RESOURCE]);
    cluster.wait_status("alpha", "StandAlone", Duration::from_secs(10), |s| {
        s.peer.as_ref().is_some_and(|p| {
            p.connection == "StandAlone" && p.role.is_none() && p.peer_disk.is_none()
        })
    });
    cluster.wait_peer_connection("beta", "Connecting", Duration::from_secs(10));
    fill(&cluster.uri("alpha"), (5000, 5016), 0x77);
    assert!(cluster.status("alpha").out_of_sync_bytes >= 16 * BLOCK);
    cluster.replctl_ok("alpha", &["connect", RESOURCE]);
    cluster.wait_in_sync(Duration::from_secs(30));
    expect(
        &cluster.uri("beta"),
        (5000, 5016),
        0x77,
        "beta after reconnect",
    );

    // disconnect on the accepting side: the dialer is refused with a clear reason.
    cluster.replctl_ok("beta", &["disconnect", RESOURCE]);
    cluster.wait_peer_connection("beta", "StandAlone", Duration::from_secs(10));
    cluster.wait_status("alpha", "refused", Duration::from_secs(15), |s| {
        s.peer.as_ref().is_some_and(|p| {
            p.connection != "Connected"
                && p.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("StandAlone"))
        })
    });
    fill(&cluster.uri("alpha"), (5016, 5032), 0x78);
    cluster.replctl_ok("beta", &["connect", RESOURCE]);
    cluster.wait_in_sync(Duration::from_secs(30));
    expect(
        &cluster.uri("beta"),
        (5016, 5032),
        0x78,
        "beta after reconnect",
    );
    verify_ok(&cluster, "beta", &log);
    cluster.assert_verify_clean("alpha");
}

// ---------------------------------------------------------------------------------
// 7. Writes completed by a link cut are not undone by the next resync (P1)
// ---------------------------------------------------------------------------------

#[test]
fn p1_writes_completed_by_a_link_cut_survive_a_demotion_and_the_reconnect() {
    let cluster = Cluster::small_pair("cut-demote", true);
    // Planned switch-over: beta becomes the Primary (the node with the higher id, so
    // no tie-break favours it later).
    switch_over_to_beta(&cluster);
    cluster.wait_in_sync(Duration::from_secs(30));
    // Records wait on the slow link when the cut comes.
    proxy(&cluster).set_delay(Duration::from_millis(300));
    let region = (100u64, 116u64);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let writes_before = cluster.status("beta").io.writes;
    runtime.block_on(async {
        let client = tools::nbd_client::NbdClient::connect(&cluster.uri("beta"))
            .await
            .expect("connect to beta");
        let writes: Vec<_> = (region.0..region.1)
            .map(|block| {
                let client = client.clone();
                tokio::spawn(async move {
                    let data = bytes::Bytes::from(vec![0xc1u8; BLOCK as usize]);
                    client.write(block * BLOCK, data, false).await
                })
            })
            .collect();
        // Cut once beta has sequenced all of them: they then wait on the slow link.
        let all_sequenced = writes_before + (region.1 - region.0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.status("beta").io.writes < all_sequenced {
            assert!(
                Instant::now() < deadline,
                "the writes never reached beta's engine"
            );
            // Polling interval of a bounded wait; lets the write tasks run meanwhile.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        proxy(&cluster).cut();
        for write in writes {
            write
                .await
                .expect("write task")
                .expect("a write in flight at the cut must complete");
        }
    });
    // The writes completed without the peer: beta knows they are not on alpha.
    let beta = cluster.wait_peer_lost("beta", Duration::from_secs(10));
    let _ = beta;
    assert!(cluster.status("beta").out_of_sync_bytes >= (region.1 - region.0) * BLOCK);
    // The operator demotes beta while the link is down; later the link comes back.
    cluster.replctl_ok("beta", &["demote", RESOURCE]);
    proxy(&cluster).set_delay(Duration::ZERO);
    proxy(&cluster).heal();
    cluster.wait_in_sync(Duration::from_secs(30));
    for name in ["alpha", "beta"] {
        expect(
            &cluster.uri(name),
            region,
            0xc1,
            &format!("acknowledged writes on {name} after the reconnect"),
        );
    }
    cluster.assert_exports_identical("alpha", "beta");
}

// ---------------------------------------------------------------------------------
// 8. A crashed primary that comes back is the authority for its last writes, also
//    after an earlier crash and rejoin of its peer
// ---------------------------------------------------------------------------------

#[test]
fn p2_a_returning_crashed_primary_resyncs_its_last_async_writes_to_a_rejoined_peer() {
    let mut cluster = Cluster::pair(
        "crashed-twice",
        ClusterOptions {
            mode: "async",
            ..small_options(true)
        },
    );
    // alpha crashes as Primary, beta takes over, alpha rejoins (SyncTarget, UpToDate).
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0x0a 0 64k");
    cluster.kill9("alpha");
    cluster.wait_peer_lost("beta", Duration::from_secs(10));
    cluster.replctl_ok("beta", &["promote", RESOURCE, "--force"]);
    qemu_io_ok(&cluster.uri("beta"), false, "write -P 0x0b 0 64k");
    cluster.start("alpha");
    cluster.wait_in_sync(Duration::from_secs(30));

    // beta acknowledges async writes that are still on the slow link when it crashes.
    let region = (200u64, 216u64);
    proxy(&cluster).set_delay(Duration::from_secs(2));
    fill(&cluster.uri("beta"), region, 0xb5);
    cluster.kill9("beta");
    cluster.wait_peer_lost("alpha", Duration::from_secs(10));
    proxy(&cluster).set_delay(Duration::ZERO);
    // Nobody was promoted: beta comes back, and with it its last writes.
    cluster.start("beta");
    cluster.wait_in_sync(Duration::from_secs(30));
    cluster.assert_exports_identical("alpha", "beta");
    for name in ["alpha", "beta"] {
        expect(
            &cluster.uri(name),
            region,
            0xb5,
            &format!("beta's last writes on {name} after it came back"),
        );
    }
}

// ---------------------------------------------------------------------------------
// 9. A crashed primary that returns before any failover (a reboot)
// ---------------------------------------------------------------------------------

/// The checker writes through `primary`; it is killed with SIGKILL and restarted with
/// nobody promoted. It comes back Secondary and, as the crashed primary, is the source
/// of the blocks its crash left in doubt: afterwards both replicas are identical.
/// Returns the resync bytes the returning primary skipped (digests matched) and sent.
fn reboot_round(test: &str, primary: &str, rng: &mut SplitMix64) -> (u64, u64) {
    let delay = Duration::from_millis(10 + rng.below(30));
    let mut cluster = slow_link_pair(test, 64 << 20, "8M", delay);
    if primary == "beta" {
        switch_over_to_beta(&cluster);
    }
    let (dir, uri) = (cluster.dir.clone(), cluster.uri(primary));
    let writes_before = cluster.status(primary).io.writes;
    let writer = std::thread::spawn(move || {
        checker_ok(
            &dir,
            &uri,
            &["--qd", "32", "--seconds", "30", "--blocks", "0..6000"],
        )
    });
    // A random kill moment, counted from when the checker's writes arrive.
    cluster.wait_writes_beyond(primary, writes_before, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300 + rng.below(700)));
    cluster.kill9(primary);
    let log = writer.join().expect("checker thread");
    let other = if primary == "alpha" { "beta" } else { "alpha" };
    cluster.wait_peer_lost(other, Duration::from_secs(10));
    cluster.start(primary);
    cluster.wait_in_sync(Duration::from_secs(60));
    for name in ["alpha", "beta"] {
        assert_eq!(cluster.status(name).role, "Secondary");
        verify_ok(&cluster, name, &log);
    }
    // Bytes, not checksums: the checker's blocks all have the same CRC32, so a resync
    // that compared CRC32s would skip blocks that differ; digests must not.
    cluster.assert_exports_identical("alpha", "beta");
    let returned = cluster.status(primary);
    let peer = returned.peer.expect("the returned primary has a peer");
    (peer.resync_skipped_bytes, peer.resync_bytes)
}

#[test]
fn p1_a_crashed_primary_returning_before_a_failover_resyncs_its_peer() {
    // Either side: as beta the returning source is the accepting node, whose session
    // starts after the target has already sent its bitmap.
    let mut skipped = 0;
    rounds(4, |round, rng| {
        let primary = ["alpha", "beta"][round as usize % 2];
        let (round_skipped, round_sent) = reboot_round(&format!("reboot-{round}"), primary, rng);
        eprintln!("round {round}: resync skipped {round_skipped} bytes, sent {round_sent}");
        skipped += round_skipped;
    });
    // After a primary crash the resync compares digests first (the default): blocks
    // both journals hold are not sent again.
    assert!(
        skipped > 0,
        "no block was skipped by digest in four crash resyncs"
    );
}

/// A client of a Secondary's read-only export is disconnected as soon as that disk
/// stops being UpToDate/Outdated (here `invalidate` makes it a resync target,
/// Inconsistent): it is never shown a half-synced image. New clients are refused
/// until the resync ends.
///
/// Seen failing first: the connected client went on reading the Inconsistent disk.
#[test]
fn item10_a_secondary_export_client_is_disconnected_when_its_disk_goes_inconsistent() {
    let cluster = Cluster::small_pair("item10-unservable", false);
    fill(&cluster.uri("alpha"), (0, 16), 0x5a);
    let beta = cluster.uri("beta");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = tools::nbd_client::NbdClient::connect(&beta)
            .await
            .expect("connect to the secondary");
        let block = client.read(0, 4096).await.expect("read while UpToDate");
        assert!(block.iter().all(|&b| b == 0x5a));
        cluster.replctl_ok("beta", &["invalidate", RESOURCE]);
        let after = tokio::time::timeout(Duration::from_secs(30), client.read(0, 4096))
            .await
            .expect("the read after the invalidate answered or failed in time");
        assert!(
            after.is_err(),
            "the client still reads the Secondary after its disk went Inconsistent"
        );
    });
    cluster.wait_in_sync(Duration::from_secs(60));
    expect(&beta, (0, 16), 0x5a, "a new client after the resync");
}
