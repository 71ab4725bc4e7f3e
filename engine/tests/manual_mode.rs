//! Manual mode (`Background::Manual`): what a deterministic simulator relies on.
//!
//! * The same calls on two fresh stores give byte-identical live and durable images,
//!   identical statistics and the same callbacks in the same order (a randomized
//!   primary/secondary workload: writes, FUA, flushes, trims, zeroes, reads, pumps,
//!   replicated records, resync data, acknowledgements).
//! * Every callback runs exactly once (none for a call that returned an error), on the
//!   caller's thread, before the call that caused it returns where the engine can
//!   finish the work inline.
//! * `pump` does one unit at a time, in a documented order.
//! * Back-pressure (memory, ring, resync queue) is worked off inline and never hangs;
//!   what cannot be worked off (a ring full of records held for the peer) is reported
//!   at once as `IoError::Stalled` and completes from later pumps.
//! * A failure fails every waiting callback once, inside the call that hit it.
//!
//! That no thread is started is checked in `manual_mode_threads.rs` (alone in its
//! binary, so no other test's threads come and go while it counts). Crash
//! consistency in manual mode is in `crash_consistency.rs`, with its model.

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use engine::backend::sim::SimBackend;
use engine::backend::Backend;
use engine::checksum::block_crc;
use engine::layout::MIN_JOURNAL_BYTES;
use engine::record::Record;
use engine::rng::SplitMix64;
use engine::testing::random_extent;
use engine::volume::{
    Background, CreateOptions, FlushDone, MetaStore, ReadDone, StatsSnapshot, WriteDone,
};
use engine::{IoError, Volume, VolumeOptions, WriteKind, WriteRequest, BLOCK_BYTES};

const UUID: [u8; 16] = *b"manual-mode-test";

fn manual() -> VolumeOptions {
    VolumeOptions {
        background: Background::Manual,
        ..VolumeOptions::default()
    }
}

/// A freshly created store (created once per test and copied: `create` stamps the
/// wall clock into the superblock).
fn fresh_image(store_bytes: u64, journal_bytes: u64) -> Vec<u8> {
    let sim = Arc::new(SimBackend::new(store_bytes));
    let backend: Arc<dyn Backend> = sim.clone();
    let create = CreateOptions {
        resource_uuid: UUID,
        node_id: 0,
        node_name: "alpha".into(),
        journal_bytes,
        force: false,
        assume_zeroed: true,
    };
    Volume::create(&backend, &MetaStore::Internal, &create, &mut |_, _| {}).expect("create-md");
    sim.live_image()
}

fn open_manual(image: &[u8]) -> (Arc<SimBackend>, Volume) {
    let sim = Arc::new(SimBackend::from_image(image.to_vec()));
    let (volume, _) = Volume::open(sim.clone(), MetaStore::Internal, Some(UUID), manual())
        .expect("open in manual mode");
    (sim, volume)
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

fn data_write(offset: u64, data: Vec<u8>, fua: bool) -> WriteRequest {
    WriteRequest {
        offset,
        kind: WriteKind::Data(Bytes::from(data)),
        fua,
    }
}

/// Every callback handed to the engine: how often it ran, and a log of events
/// (callbacks and the test's own notes) in the order they happened.
#[derive(Default)]
struct Calls {
    log: Mutex<Vec<String>>,
    /// Per callback: times called, and whether the call it went to refused it.
    counts: Mutex<Vec<(usize, bool)>>,
}

impl Calls {
    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn note(&self, line: String) {
        Calls::lock(&self.log).push(line);
    }

    fn issue(&self) -> usize {
        let mut counts = Calls::lock(&self.counts);
        counts.push((0, false));
        counts.len() - 1
    }

    fn called(&self, id: usize, line: String) {
        Calls::lock(&self.counts)[id].0 += 1;
        self.note(line);
    }

    /// The call returned an error: its callback must never run.
    fn refused(&self, id: usize) {
        Calls::lock(&self.counts)[id].1 = true;
    }

    fn times(&self, id: usize) -> usize {
        Calls::lock(&self.counts)[id].0
    }

    fn write_done(self: &Arc<Self>, what: String) -> (usize, WriteDone) {
        let id = self.issue();
        let calls = self.clone();
        (
            id,
            Box::new(move |result| calls.called(id, format!("{what} done: {result:?}"))),
        )
    }

    fn flush_done(self: &Arc<Self>, what: String) -> (usize, FlushDone) {
        let id = self.issue();
        let calls = self.clone();
        (
            id,
            Box::new(move |result| calls.called(id, format!("{what} done: {result:?}"))),
        )
    }

    fn read_done(self: &Arc<Self>, what: String) -> (usize, ReadDone) {
        let id = self.issue();
        let calls = self.clone();
        let done = move |result: Result<Bytes, IoError>| {
            let outcome = result.map(|data| (data.len(), hash_bytes(&data)));
            calls.called(id, format!("{what} done: {outcome:?}"));
        };
        (id, Box::new(done))
    }

    /// Every callback ran exactly once, or never if its call refused it.
    fn assert_each_ran_once(&self, context: &str) {
        for (id, (times, refused)) in Calls::lock(&self.counts).iter().enumerate() {
            let expected = usize::from(!refused);
            assert_eq!(
                *times, expected,
                "{context}: callback {id} ran {times} times (refused: {refused})"
            );
        }
    }

    fn log(&self) -> Vec<String> {
        Calls::lock(&self.log).clone()
    }
}

/// A random write: data (aligned or not), TRIM or WRITE_ZEROES, sometimes FUA.
fn random_write(rng: &mut SplitMix64, size: u64) -> WriteRequest {
    let aligned = rng.below(2) == 0;
    let (offset, length) = random_extent(rng, size, 6, aligned);
    let kind = match rng.below(10) {
        0 => WriteKind::Trim(length),
        1 => WriteKind::Zeroes(length),
        _ => {
            let mut data = vec![0u8; length as usize];
            rng.fill(&mut data);
            WriteKind::Data(Bytes::from(data))
        }
    };
    WriteRequest {
        offset,
        kind,
        fua: rng.below(5) == 0,
    }
}

/// What a run leaves: the event log, each store's live and durable image, stats.
#[derive(PartialEq)]
struct Trace {
    log: Vec<String>,
    images: Vec<(Vec<u8>, Vec<u8>)>,
    stats: Vec<StatsSnapshot>,
}

const STEPS: usize = 400;

/// Ships the primary's records to the secondary: each by `append_replicated` or
/// `try_append_replicated_deferred`; a stalled one goes back to the queue's front.
fn ship(
    rng: &mut SplitMix64,
    calls: &Arc<Calls>,
    secondary: &Volume,
    shipping: &mut VecDeque<Record>,
) {
    for _ in 0..1 + rng.below(4) {
        let Some(record) = shipping.pop_front() else {
            return;
        };
        let seq = record.header.seq;
        let (id, done) = calls.write_done(format!("S record {seq}"));
        let result = if rng.below(2) == 0 {
            match secondary.try_append_replicated_deferred(record.clone(), done) {
                Ok(Some((_, done))) => {
                    calls.note(format!("S record {seq}: no room without waiting"));
                    secondary.commit_pending();
                    secondary.append_replicated(record.clone(), done)
                }
                Ok(None) => Ok(()),
                Err(error) => Err(error),
            }
        } else {
            secondary.append_replicated(record.clone(), done)
        };
        calls.note(format!("S record {seq} taken: {result:?}"));
        if let Err(error) = result {
            calls.refused(id);
            if matches!(error, IoError::Stalled(_)) {
                shipping.push_front(record);
                return;
            }
        }
    }
}

/// Resync data for a random run of blocks (random data or zeroes).
fn resync_write(rng: &mut SplitMix64, calls: &Calls, secondary: &Volume) {
    let blocks = 1 + rng.below(8);
    let first_block = rng.below(secondary.size_bytes() / BLOCK_BYTES - blocks);
    let (data, crcs) = if rng.below(4) == 0 {
        (None, Vec::new())
    } else {
        let mut data = vec![0u8; (blocks * BLOCK_BYTES) as usize];
        rng.fill(&mut data);
        let crcs = data.chunks(BLOCK_BYTES as usize).map(block_crc).collect();
        (Some(Bytes::from(data)), crcs)
    };
    let result = secondary.write_resync(first_block, blocks, data, crcs);
    calls.note(format!("S resync {first_block}+{blocks}: {result:?}"));
}

/// A random read of up to four blocks on `volume`.
fn random_read(rng: &mut SplitMix64, calls: &Arc<Calls>, name: &str, volume: &Volume) {
    let length = 1 + rng.below(4 * BLOCK_BYTES);
    let offset = rng.below(volume.size_bytes() - length);
    let (_, done) = calls.read_done(format!("{name} read {offset}+{length}"));
    volume.read(offset, length, done);
}

/// A primary (peer attached) and a secondary (a resync target for the first third of
/// the run), both in manual mode, driven by `seed`.
fn replicated_workload(seed: u64, base: &[u8]) -> (Trace, Arc<Calls>) {
    let (primary_sim, primary) = open_manual(base);
    let (secondary_sim, secondary) = open_manual(base);
    let calls = Arc::new(Calls::default());
    let mut rng = SplitMix64::new(seed);
    let size = primary.size_bytes();
    let mut shipping: VecDeque<Record> = VecDeque::new();
    primary.peer_attached();
    secondary.begin_resync_target();
    for step in 0..STEPS {
        if step == STEPS / 3 {
            secondary.end_resync_target();
            calls.note("S resync ends".into());
        }
        let resyncing = step < STEPS / 3;
        let (name, volume) = if rng.below(2) == 0 {
            ("P", &primary)
        } else {
            ("S", &secondary)
        };
        match rng.below(100) {
            0..=29 => {
                let request = random_write(&mut rng, size);
                let what = format!(
                    "P write {}+{} fua {}",
                    request.offset,
                    request.length(),
                    request.fua
                );
                let (id, done) = calls.write_done(what.clone());
                let result = if rng.below(3) == 0 {
                    primary.write_deferred(request, done)
                } else {
                    primary.write(request, done)
                };
                match result {
                    Ok(records) => {
                        calls.note(format!("{what}: {} records", records.len()));
                        shipping.extend(records);
                    }
                    Err(error) => {
                        calls.refused(id);
                        calls.note(format!("{what}: {error:?}"));
                    }
                }
            }
            30..=35 => {
                let (_, done) = calls.flush_done(format!("{name} flush"));
                volume.flush(done);
            }
            36..=39 => volume.commit_pending(),
            40..=51 => random_read(&mut rng, &calls, name, volume),
            52..=63 => ship(&mut rng, &calls, &secondary, &mut shipping),
            64..=69 => secondary.peer_acked(primary.durable_seq()),
            70..=73 => primary.peer_acked(secondary.durable_seq()),
            74..=83 => {
                let wanted = 1 + rng.below(6);
                let done = (0..wanted).filter(|_| volume.pump()).count();
                calls.note(format!("{name} pumped {done} of {wanted}"));
            }
            84..=89 if resyncing => resync_write(&mut rng, &calls, &secondary),
            84..=89 => {
                let marked = primary.peer_detached();
                primary.peer_attached();
                calls.note(format!("P peer away and back: {marked} marked"));
            }
            90..=92 => {
                let applied = volume.wait_applied(Duration::from_secs(10));
                calls.note(format!("{name} wait_applied: {applied}"));
            }
            93..=94 => {
                let done = volume.checkpoint_blocking(Duration::from_secs(10));
                calls.note(format!("{name} checkpoint_blocking: {done}"));
            }
            95..=96 => {
                let request = random_write(&mut rng, size);
                let result = primary.write_blocking(request);
                calls.note(format!("P write_blocking: {result:?}"));
            }
            97 => {
                let result = volume.flush_blocking();
                calls.note(format!("{name} flush_blocking: {result:?}"));
            }
            _ => {
                let units = volume.pump_until_idle(64);
                calls.note(format!("{name} pumped {units} until idle"));
            }
        }
    }
    calls.note(format!("P close: {:?}", primary.close()));
    calls.note(format!("S close: {:?}", secondary.close()));
    let trace = Trace {
        log: calls.log(),
        images: [&primary_sim, &secondary_sim]
            .iter()
            .map(|sim| (sim.live_image(), sim.durable_image()))
            .collect(),
        stats: vec![primary.stats(), secondary.stats()],
    };
    (trace, calls)
}

#[test]
fn the_same_calls_give_the_same_images_and_callbacks_in_the_same_order() {
    let base = fresh_image(4 << 20, MIN_JOURNAL_BYTES);
    let mut totals = StatsSnapshot::default();
    let mut stalls = 0;
    for seed in 1..=6u64 {
        let (first, calls) = replicated_workload(seed, &base);
        calls.assert_each_ran_once(&format!("seed {seed}"));
        let (second, _) = replicated_workload(seed, &base);
        if let Some(index) = (0..first.log.len().max(second.log.len()))
            .find(|&index| first.log.get(index) != second.log.get(index))
        {
            panic!(
                "seed {seed}: the runs diverge at event {index}: {:?} against {:?}",
                first.log.get(index),
                second.log.get(index)
            );
        }
        assert_eq!(first.stats, second.stats, "seed {seed}: statistics differ");
        for (node, (one, two)) in first.images.iter().zip(&second.images).enumerate() {
            assert!(
                one.0 == two.0,
                "seed {seed}: node {node}'s live images differ"
            );
            assert!(
                one.1 == two.1,
                "seed {seed}: node {node}'s durable images differ"
            );
        }
        assert!(first == second);
        stalls += first
            .log
            .iter()
            .filter(|line| line.contains("Stalled"))
            .count();
        for stats in &first.stats {
            totals.writes += stats.writes;
            totals.reads += stats.reads;
            totals.flushes += stats.flushes;
            totals.journal_syncs += stats.journal_syncs;
            totals.records_applied += stats.records_applied;
            totals.checkpoints += stats.checkpoints;
            totals.resync_blocks_written += stats.resync_blocks_written;
        }
    }
    // The workload reaches every path it is meant to.
    for (what, count) in [
        ("writes", totals.writes),
        ("reads", totals.reads),
        ("flushes", totals.flushes),
        ("journal syncs", totals.journal_syncs),
        ("records applied", totals.records_applied),
        ("checkpoints", totals.checkpoints),
        ("resync blocks", totals.resync_blocks_written),
        ("stalls", stalls as u64),
    ] {
        assert!(count > 0, "the workload never reached {what}");
    }
}

/// Counts calls of one callback.
fn counted(calls: &Arc<Calls>, what: &str) -> (usize, WriteDone) {
    calls.write_done(what.to_string())
}

#[test]
fn callbacks_run_exactly_once_and_before_the_call_returns() {
    let base = fresh_image(8 << 20, 1 << 20);
    let (_, primary) = open_manual(&base);
    let (_, secondary) = open_manual(&base);
    let calls = Arc::new(Calls::default());

    let (id, done) = counted(&calls, "write");
    primary
        .write(data_write(0, vec![1; 4096], false), done)
        .unwrap();
    assert_eq!(calls.times(id), 1, "write");

    let (id, done) = counted(&calls, "FUA write");
    let records = primary
        .write(data_write(4096, vec![2; 4096], true), done)
        .unwrap();
    assert_eq!(calls.times(id), 1, "FUA write");
    assert!(
        primary.durable_seq() >= records[0].header.seq,
        "FUA is durable"
    );

    let seq = primary
        .write_blocking(data_write(8192, vec![3; 100], false))
        .unwrap();
    assert_eq!(seq, primary.stats().next_seq - 1, "write_blocking");

    let (id, done) = counted(&calls, "deferred write");
    primary
        .write_deferred(data_write(12288, vec![4; 4096], false), done)
        .unwrap();
    assert_eq!(calls.times(id), 0, "a deferred write waits for the commit");
    primary.commit_pending();
    assert_eq!(calls.times(id), 1, "commit_pending ran it");

    let (write_id, done) = counted(&calls, "deferred write before a flush");
    primary
        .write_deferred(data_write(16384, vec![5; 4096], false), done)
        .unwrap();
    let (flush_id, flush_done) = calls.flush_done("flush".into());
    primary.flush(flush_done);
    assert_eq!(calls.times(write_id), 1, "the flush committed the write");
    assert_eq!(calls.times(flush_id), 1, "flush");
    assert_eq!(primary.durable_seq(), primary.stats().next_seq - 1);

    let seen = Arc::new(Mutex::new(None));
    let slot = seen.clone();
    primary.read(
        4000,
        200,
        Box::new(move |result| *Calls::lock(&slot) = Some(result)),
    );
    let read = Calls::lock(&seen)
        .take()
        .expect("read ran before returning");
    let read = read.unwrap();
    assert!(read[..96].iter().all(|&b| b == 1) && read[96..].iter().all(|&b| b == 2));

    let (id, done) = calls.read_done("read past the end".into());
    primary.read(primary.size_bytes(), 1, done);
    assert_eq!(calls.times(id), 1, "a bad read fails through its callback");

    let (id, done) = counted(&calls, "refused write");
    let refused = primary.write(data_write(primary.size_bytes(), vec![0; 4096], false), done);
    assert!(matches!(refused, Err(IoError::OutOfRange { .. })));
    calls.refused(id);

    // A secondary takes the primary's records.
    let records = primary
        .write(data_write(0, vec![6; 8192], false), Box::new(|_| {}))
        .unwrap();
    let mut records = records.into_iter();
    let (id, done) = counted(&calls, "replicated record");
    secondary
        .append_replicated(records.next().unwrap(), done)
        .unwrap();
    assert_eq!(calls.times(id), 1, "append_replicated");
    // Manual mode: a full budget would be worked off inline, so never handed back here.
    let (id, done) = counted(&calls, "deferred replicated record");
    let refused = secondary
        .try_append_replicated_deferred(data_record(&primary), done)
        .unwrap();
    assert!(refused.is_none());
    assert_eq!(calls.times(id), 0, "a deferred record waits for the commit");
    secondary.commit_pending();
    assert_eq!(calls.times(id), 1, "commit_pending ran it");

    // Whatever the pumps and the closes do, nothing runs twice.
    primary.pump_until_idle(1000);
    secondary.pump_until_idle(1000);
    primary.close().unwrap();
    secondary.close().unwrap();
    calls.assert_each_ran_once("after close");
}

/// A record made by `primary` (sequenced there; its own completion is not awaited).
fn data_record(primary: &Volume) -> Record {
    let records = primary
        .write(data_write(65536, vec![7; 4096], false), Box::new(|_| {}))
        .unwrap();
    records.into_iter().next().unwrap()
}

#[test]
fn pump_does_one_unit_at_a_time_commit_sync_apply_checkpoint() {
    let base = fresh_image(8 << 20, 1 << 20);
    let (sim, volume) = open_manual(&base);
    let calls = Arc::new(Calls::default());
    let (id, done) = counted(&calls, "deferred write");
    let seq = volume
        .write_deferred(data_write(0, vec![9; 4096], false), done)
        .unwrap()[0]
        .header
        .seq;
    let before = volume.stats();
    let flushes = sim.flushes();

    assert!(volume.pump(), "a group commit round");
    let stats = volume.stats();
    assert_eq!(stats.journal_commits, before.journal_commits + 1);
    assert_eq!(calls.times(id), 1, "the round completed the write");
    assert!(stats.durable_seq < seq, "no FUA, no flush: not synced yet");
    assert_eq!(sim.flushes(), flushes);

    assert!(volume.pump(), "the journal fdatasync (no apply delay)");
    let stats = volume.stats();
    assert_eq!(stats.durable_seq, seq);
    assert_eq!(stats.records_applied, before.records_applied);

    assert!(volume.pump(), "the apply batch");
    let stats = volume.stats();
    assert_eq!(stats.records_applied, before.records_applied + 1);
    assert_eq!(stats.checkpoints, before.checkpoints);

    assert!(volume.pump(), "the checkpoint, nothing being left to apply");
    let stats = volume.stats();
    assert_eq!(stats.checkpoints, before.checkpoints + 1);
    assert_eq!(stats.checkpoint_seq, seq);

    assert!(!volume.pump(), "idle");
    assert_eq!(volume.pump_until_idle(100), 0);
    volume.close().unwrap();

    // Threaded mode: its threads do this work; pump does nothing.
    let sim = Arc::new(SimBackend::from_image(base));
    let (threaded, _) = Volume::open(
        sim,
        MetaStore::Internal,
        Some(UUID),
        VolumeOptions::default(),
    )
    .unwrap();
    threaded
        .write_deferred(data_write(0, vec![9; 4096], false), Box::new(|_| {}))
        .unwrap();
    assert!(!threaded.pump());
    threaded.close().unwrap();
}

#[test]
fn back_pressure_is_worked_off_inline_without_pumps() {
    let base = fresh_image(16 << 20, MIN_JOURNAL_BYTES);
    let (_, volume) = open_manual(&base);
    let calls = Arc::new(Calls::default());
    let size = volume.size_bytes();
    let mut expected = vec![0u8; size as usize];
    let mut rng = SplitMix64::new(11);
    let journal_bytes = volume.geometry().journal_bytes;
    // Each write is larger than the whole journal (many records, many ring fulls).
    for index in 0..24 {
        let length = 2 * journal_bytes + rng.below(BLOCK_BYTES);
        let offset = rng.below(size - length);
        let mut data = vec![0u8; length as usize];
        rng.fill(&mut data);
        expected[offset as usize..(offset + length) as usize].copy_from_slice(&data);
        let (id, done) = counted(&calls, &format!("large write {index}"));
        volume
            .write(data_write(offset, data, index % 5 == 0), done)
            .unwrap();
        assert_eq!(calls.times(id), 1, "large write {index} completed inline");
    }
    // Deferred writes beyond the memory budget: earlier ones get committed inline.
    for index in 0..64 {
        let length = journal_bytes / 4;
        let offset = rng.below(size - length) / BLOCK_BYTES * BLOCK_BYTES;
        let mut data = vec![0u8; length as usize];
        rng.fill(&mut data);
        expected[offset as usize..(offset + length) as usize].copy_from_slice(&data);
        let (_, done) = counted(&calls, &format!("deferred write {index}"));
        volume
            .write_deferred(data_write(offset, data, false), done)
            .unwrap();
    }
    volume.commit_pending();
    calls.assert_each_ran_once("after commit_pending");
    assert!(volume.stats().checkpoints > 10, "{:?}", volume.stats());
    assert!(volume.read_blocking(0, size).unwrap() == expected[..]);
    volume.close().unwrap();
}

#[test]
fn replicated_and_resync_back_pressure_is_worked_off_inline_without_pumps() {
    let base = fresh_image(16 << 20, MIN_JOURNAL_BYTES);
    let (_, primary) = open_manual(&base);
    let (_, secondary) = open_manual(&base);
    let calls = Arc::new(Calls::default());
    let size = primary.size_bytes();
    let journal_bytes = primary.geometry().journal_bytes;
    let mut rng = SplitMix64::new(12);
    // Records worth many journals, each reported durable by the primary at once.
    for index in 0..32 {
        let offset = rng.below(size / BLOCK_BYTES - 64) * BLOCK_BYTES;
        let mut data = vec![0u8; (journal_bytes / 2) as usize];
        rng.fill(&mut data);
        let records = primary
            .write(data_write(offset, data, false), Box::new(|_| {}))
            .unwrap();
        for record in records {
            let seq = record.header.seq;
            let (id, done) = counted(&calls, &format!("record {seq} of write {index}"));
            secondary.append_replicated(record, done).unwrap();
            assert_eq!(calls.times(id), 1, "record {seq} completed inline");
            secondary.peer_acked(seq);
        }
    }
    calls.assert_each_ran_once("records");
    assert!(secondary.wait_applied(Duration::from_secs(10)));
    assert!(secondary.read_blocking(0, size).unwrap() == primary.read_blocking(0, size).unwrap());

    // More resync data than the 32 MiB queue holds, on a fresh sync target.
    let (_, target) = open_manual(&base);
    target.begin_resync_target();
    let blocks = size / BLOCK_BYTES;
    let chunk = 256;
    let mut expected = vec![0u8; size as usize];
    for index in 0..(48 << 20) / (chunk * BLOCK_BYTES) {
        let first = (index * chunk) % (blocks - chunk);
        let mut data = vec![0u8; (chunk * BLOCK_BYTES) as usize];
        rng.fill(&mut data);
        let crcs = data.chunks(BLOCK_BYTES as usize).map(block_crc).collect();
        let at = (first * BLOCK_BYTES) as usize;
        expected[at..at + data.len()].copy_from_slice(&data);
        let queued = target
            .write_resync(first, chunk, Some(Bytes::from(data)), crcs)
            .unwrap();
        assert_eq!(queued, chunk);
    }
    assert!(target.stats().records_applied == 0 && target.stats().resync_blocks_written > 0);
    assert!(target.checkpoint_blocking(Duration::from_secs(10)));
    target.end_resync_target();
    assert!(target.read_blocking(0, size).unwrap() == expected[..]);
    for volume in [primary, secondary, target] {
        volume.close().unwrap();
    }
}

#[test]
fn a_journal_full_of_records_held_for_the_peer_stalls_at_once_and_pumps_finish_later() {
    let base = fresh_image(8 << 20, MIN_JOURNAL_BYTES);
    let (_, volume) = open_manual(&base);
    let calls = Arc::new(Calls::default());
    volume.peer_attached();
    let mut accepted = Vec::new();
    let mut stalled = false;
    // The checkpoint may not pass a record the peer has not acknowledged: the ring
    // fills, then the memory budget, and nothing inline can help.
    for index in 0..1000u64 {
        let (id, done) = counted(&calls, &format!("write {index}"));
        match volume.write(
            data_write(index * 16384 % (4 << 20), vec![index as u8; 16384], false),
            done,
        ) {
            Ok(_) => accepted.push(id),
            Err(IoError::Stalled(_)) => {
                calls.refused(id);
                stalled = true;
                break;
            }
            Err(error) => panic!("write {index}: {error}"),
        }
    }
    assert!(stalled, "the writes never stalled");
    let waiting = accepted.iter().filter(|&&id| calls.times(id) == 0).count();
    assert!(waiting > 0, "no accepted write was left waiting");
    let started = Instant::now();
    assert!(matches!(
        volume.write_blocking(data_write(0, vec![1; 4096], false)),
        Err(IoError::Stalled(_))
    ));
    assert!(matches!(volume.flush_blocking(), Err(IoError::Stalled(_))));
    assert!(!volume.wait_applied(Duration::from_secs(10)));
    assert!(!volume.checkpoint_blocking(Duration::from_secs(10)));
    assert!(volume.pump_until_idle(1000) < 1000);
    assert!(
        !volume.pump(),
        "nothing can be done until the peer acknowledges"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a stalled call waited"
    );
    assert_eq!(
        accepted.iter().filter(|&&id| calls.times(id) == 0).count(),
        waiting
    );

    // The peer acknowledges: later pumps complete every waiting write.
    volume.peer_acked(u64::MAX);
    assert!(volume.pump_until_idle(100_000) > 0);
    assert!(!volume.pump());
    calls.assert_each_ran_once("after the acknowledgement");
    assert!(volume.wait_applied(Duration::from_secs(10)));
    volume.close().unwrap();
}

#[test]
fn a_failure_fails_each_waiting_callback_once_inside_the_call_that_hit_it() {
    let base = fresh_image(8 << 20, 1 << 20);
    let (sim, volume) = open_manual(&base);
    let calls = Arc::new(Calls::default());
    let geometry = volume.geometry();
    let mut waiting = Vec::new();
    for index in 0..3u64 {
        let (id, done) = counted(&calls, &format!("deferred write {index}"));
        volume
            .write_deferred(data_write(index * 4096, vec![1; 4096], false), done)
            .unwrap();
        waiting.push(id);
    }
    sim.fail_writes(geometry.journal_offset..geometry.journal_offset + geometry.journal_bytes);
    let (flush_id, done) = calls.flush_done("flush".into());
    volume.flush(done);
    waiting.push(flush_id);
    for id in waiting {
        assert_eq!(calls.times(id), 1, "callback {id} before flush returned");
    }
    assert!(
        calls.log().iter().all(|line| !line.contains("Ok")),
        "{:?}",
        calls.log()
    );
    assert!(volume.failure().is_some());
    assert!(matches!(
        volume.write(data_write(0, vec![2; 4096], false), Box::new(|_| {})),
        Err(IoError::Failed(_))
    ));
    assert!(!volume.pump());
    assert!(!volume.wait_applied(Duration::from_secs(10)));
    assert!(volume.close().is_err());
    calls.assert_each_ran_once("failed volume");

    // Abandoned (a crash) with writes waiting: each fails once, before abandon returns.
    let (_, volume) = open_manual(&base);
    let (id, done) = counted(&calls, "deferred write before abandon");
    volume
        .write_deferred(data_write(0, vec![3; 4096], false), done)
        .unwrap();
    volume.abandon();
    assert_eq!(calls.times(id), 1);
    // Dropped without close: the same.
    let (_, volume) = open_manual(&base);
    let (id, done) = counted(&calls, "deferred write before drop");
    volume
        .write_deferred(data_write(0, vec![4; 4096], false), done)
        .unwrap();
    drop(volume);
    assert_eq!(calls.times(id), 1);
    calls.assert_each_ran_once("abandoned and dropped");
}
