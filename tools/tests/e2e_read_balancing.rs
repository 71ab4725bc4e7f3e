//! Issue 17, read balancing, end to end: real daemons, a real NBD client. Under
//! concurrent writes to the same blocks, every policy returns only data a read issued
//! after a write's acknowledgement may see (that write or a later one); a resync in
//! progress never serves old blocks; a peer that freezes or dies mid-read does not
//! fail the client's read.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use common::*;

const BLOCK: u64 = 4096;

/// A block written by the workload: its number and version, then a fill byte that
/// depends on both (a torn or misplaced block does not decode).
fn block_data(block: u64, version: u64) -> Bytes {
    let mut data =
        vec![(block.wrapping_mul(31).wrapping_add(version) % 251) as u8 + 1; BLOCK as usize];
    data[..8].copy_from_slice(&block.to_le_bytes());
    data[8..16].copy_from_slice(&version.to_le_bytes());
    Bytes::from(data)
}

/// The version a read of `block` returned (0: never written), or why it is garbage.
fn decode(block: u64, data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|&byte| byte == 0) {
        return Ok(0);
    }
    let number = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    let version = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
    if number != block || data[..] != block_data(block, version)[..] {
        return Err(format!(
            "block {block} holds garbage (says block {number} version {version})"
        ));
    }
    Ok(version)
}

/// What a workload saw.
#[derive(Debug, Default)]
struct Report {
    writes: u64,
    reads: u64,
    /// Reads that returned older data than an acknowledged write, garbage, or an error;
    /// writes that failed.
    violations: Vec<String>,
}

/// Writers that each own some blocks and rewrite them one version after another, and
/// readers that read any of those blocks at random: a read must return the version
/// acknowledged last before it was issued, or a later one.
struct ReadAfterAck {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    thread: Option<JoinHandle<Report>>,
}

impl ReadAfterAck {
    fn start(uri: &str, blocks: u64, writers: u64, readers: u64) -> ReadAfterAck {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let (stopped, read_count, uri) = (stop.clone(), reads.clone(), uri.to_string());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(workload(uri, blocks, writers, readers, stopped, read_count))
        });
        ReadAfterAck {
            stop,
            reads,
            thread: Some(thread),
        }
    }

    fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("the workload panicked")
    }
}

impl Drop for ReadAfterAck {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn workload(
    uri: String,
    blocks: u64,
    writers: u64,
    readers: u64,
    stop: Arc<AtomicBool>,
    read_count: Arc<AtomicU64>,
) -> Report {
    let report = Arc::new(Mutex::new(Report::default()));
    let client = match tools::nbd_client::NbdClient::connect(&uri).await {
        Ok(client) => Arc::new(client),
        Err(error) => {
            let mut report = Report::default();
            report.violations.push(format!("connect: {error}"));
            return report;
        }
    };
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..blocks).map(|_| AtomicU64::new(0)).collect());
    let violation = {
        let report = report.clone();
        move |text: String| {
            let mut report = report.lock().unwrap_or_else(|p| p.into_inner());
            if report.violations.len() < 20 {
                report.violations.push(text);
            }
        }
    };
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let (client, acked, stop, report) =
            (client.clone(), acked.clone(), stop.clone(), report.clone());
        let violation = violation.clone();
        tasks.push(tokio::spawn(async move {
            let owned: Vec<u64> = (writer..blocks).step_by(writers as usize).collect();
            let mut version = 0;
            while !stop.load(Ordering::Relaxed) {
                version += 1;
                for &block in &owned {
                    let data = block_data(block, version);
                    match client.write(block * BLOCK, data, false).await {
                        Ok(()) => acked[block as usize].store(version, Ordering::SeqCst),
                        Err(error) => {
                            violation(format!("write of block {block} failed: {error}"));
                            return;
                        }
                    }
                    report.lock().unwrap_or_else(|p| p.into_inner()).writes += 1;
                }
            }
        }));
    }
    for reader in 0..readers {
        let (client, acked, stop, read_count) = (
            client.clone(),
            acked.clone(),
            stop.clone(),
            read_count.clone(),
        );
        let violation = violation.clone();
        tasks.push(tokio::spawn(async move {
            let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (reader + 1);
            while !stop.load(Ordering::Relaxed) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let block = state % blocks;
                let floor = acked[block as usize].load(Ordering::SeqCst);
                match client.read(block * BLOCK, BLOCK as u32).await {
                    Ok(data) => match decode(block, &data) {
                        Ok(version) if version < floor => violation(format!(
                            "a read of block {block} returned version {version}, issued after \
                             version {floor} was acknowledged"
                        )),
                        Ok(_) => {}
                        Err(why) => violation(why),
                    },
                    Err(error) => violation(format!("a read of block {block} failed: {error}")),
                }
                read_count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        if let Err(error) = task.await {
            violation(format!("a task failed: {error}"));
        }
    }
    let _ = client.disconnect().await;
    let mut report = std::mem::take(&mut *report.lock().unwrap_or_else(|p| p.into_inner()));
    report.reads = read_count.load(Ordering::Relaxed);
    report
}

/// A fresh in-sync pair (zeroed stores) in `mode`, alpha Primary, with these lines
/// added to the resource.
fn pair_in_mode(test: &str, mode: &'static str, extra: &str) -> Cluster {
    let mut cluster = Cluster::new(
        test,
        &["alpha", "beta"],
        ClusterOptions {
            mode,
            extra: extra.to_string(),
            ..small_options(false)
        },
    );
    cluster.start_fresh_pair_in_sync();
    cluster
}

fn pair_with(test: &str, extra: &str) -> Cluster {
    pair_in_mode(test, "sync", extra)
}

fn reads_served_by_beta(status: &replicad::control::ResourceStatus) -> u64 {
    status.peer.as_ref().map_or(0, |peer| peer.reads_served)
}

fn assert_clean(report: &Report, what: &str) {
    assert!(
        report.violations.is_empty(),
        "{what}: {} reads, {} writes, violations:\n{}",
        report.reads,
        report.writes,
        report.violations.join("\n")
    );
}

/// Every policy, under concurrent writes to the blocks it reads: no read returns
/// older data than a write acknowledged before it was issued; every policy but
/// prefer-local really has the peer serve reads, and status counts them. In `async`
/// mode a write is acknowledged before the peer has it: only the rule (no read of a
/// block in flight to the peer) keeps such a read local; in `sync` mode the peer
/// holds every acknowledged write.
#[test]
fn read_balancing_every_policy_returns_only_data_acknowledged_before_the_read() {
    for (mode, policy) in ["async", "sync"].into_iter().flat_map(|mode| {
        [
            "prefer-local",
            "prefer-remote",
            "round-robin",
            "least-pending",
            "striping-32K",
            "adaptive",
        ]
        .map(|policy| (mode, policy))
    }) {
        let cluster = pair_in_mode(
            &format!("rb-{mode}-{policy}"),
            mode,
            &format!("read-balancing = \"{policy}\""),
        );
        // 64 blocks in 8 owners' hands, 24 readers: reads race writes to the same
        // blocks, and a third of them hit a block with a write in flight.
        let workload = ReadAfterAck::start(&cluster.uri("alpha"), 64, 8, 24);
        let remote = policy != "prefer-local";
        cluster.wait_status("alpha", "reads to flow", Duration::from_secs(120), |s| {
            (s.io.reads_local >= 2000 || remote)
                && (!remote || reads_served_by_beta(s) >= 100)
                && workload.reads() >= 2000
        });
        let report = workload.finish();
        assert_clean(&report, &format!("{policy} in {mode} mode"));
        let status = cluster.status("alpha");
        assert_eq!(status.read_balancing, policy);
        if remote {
            assert!(reads_served_by_beta(&status) >= 100, "{policy}: {status:?}");
        } else {
            assert_eq!(reads_served_by_beta(&status), 0, "{status:?}");
            assert!(status.io.reads_local >= 2000);
        }
        let text = cluster.replctl_ok("alpha", &["status", RESOURCE]);
        if remote {
            assert!(
                text.contains(&format!("reads: balancing:{policy} local:")),
                "{text}"
            );
        }
    }
}

/// A resync target holds old blocks: while the peer is resynced, no read goes there;
/// afterwards it serves again, and the newest data.
#[test]
fn read_balancing_never_serves_blocks_of_a_resync_in_progress() {
    let cluster = pair_with(
        "rb-resync",
        "read-balancing = \"prefer-remote\"\nresync-rate = \"1M\"",
    );
    // 2048 blocks (8 MiB): a resync of them at 1 MiB/s runs for seconds.
    let workload = ReadAfterAck::start(&cluster.uri("alpha"), 2048, 16, 16);
    cluster.wait_status("alpha", "reads from beta", Duration::from_secs(60), |s| {
        reads_served_by_beta(s) >= 200
    });
    cluster.replctl_ok("alpha", &["disconnect", RESOURCE]);
    let since = cluster.status("alpha").io.writes;
    cluster.wait_status(
        "alpha",
        "blocks written without the peer",
        Duration::from_secs(60),
        |s| s.io.writes > since + 4000 && s.out_of_sync_bytes >= 4 << 20,
    );
    cluster.replctl_ok("alpha", &["connect", RESOURCE]);
    cluster.wait_status("alpha", "a resync running", Duration::from_secs(30), |s| {
        s.peer
            .as_ref()
            .is_some_and(|peer| peer.replication == "SyncSource")
    });
    let during = reads_served_by_beta(&cluster.status("alpha"));
    let reads_before = workload.reads();
    cluster.wait_status(
        "alpha",
        "reads during the resync",
        Duration::from_secs(60),
        |s| {
            workload.reads() > reads_before + 1000
                && s.peer
                    .as_ref()
                    .is_some_and(|peer| peer.replication == "SyncSource")
        },
    );
    assert!(
        reads_served_by_beta(&cluster.status("alpha")) == during,
        "the sync target served reads"
    );
    cluster.wait_in_sync(Duration::from_secs(120));
    let after = reads_served_by_beta(&cluster.status("alpha"));
    cluster.wait_status(
        "alpha",
        "beta serving again",
        Duration::from_secs(60),
        |s| reads_served_by_beta(s) >= after + 200,
    );
    assert_clean(&workload.finish(), "reads across a resync");
}

/// A peer that freezes mid-read (SIGSTOP: its reads fall back after 500 ms, then its
/// session times out) or dies mid-read (kill -9) fails no client read.
#[test]
fn read_balancing_a_peer_that_drops_out_mid_read_does_not_fail_the_read() {
    let mut cluster = pair_with("rb-dropout", "read-balancing = \"prefer-remote\"");
    let workload = ReadAfterAck::start(&cluster.uri("alpha"), 256, 4, 28);
    cluster.wait_status("alpha", "reads from beta", Duration::from_secs(60), |s| {
        reads_served_by_beta(s) >= 500
    });
    let pid = cluster.nodes["beta"]
        .process
        .as_ref()
        .and_then(|process| process.id())
        .expect("beta runs") as libc::pid_t;
    // SAFETY: signals a child process this test started and still owns.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    cluster.wait_status("alpha", "reads given back", Duration::from_secs(30), |s| {
        s.peer.as_ref().is_some_and(|peer| peer.read_fallbacks > 0)
    });
    cluster.wait_peer_lost("alpha", Duration::from_secs(30));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    cluster.wait_in_sync(Duration::from_secs(60));
    let served = reads_served_by_beta(&cluster.status("alpha"));
    cluster.wait_status(
        "alpha",
        "beta serving again",
        Duration::from_secs(60),
        |s| reads_served_by_beta(s) >= served + 500,
    );
    cluster.kill9("beta");
    cluster.wait_peer_lost("alpha", Duration::from_secs(30));
    let reads = workload.reads();
    cluster.wait_status(
        "alpha",
        "reads without beta",
        Duration::from_secs(60),
        |_| workload.reads() > reads + 1000,
    );
    let report = workload.finish();
    assert_clean(&report, "reads while the peer froze and died");
    let status = cluster.status("alpha");
    assert!(
        status
            .peer
            .as_ref()
            .is_some_and(|peer| peer.read_fallbacks > 0),
        "{status:?}"
    );
    cluster.assert_no_panic_logged("alpha");
}
