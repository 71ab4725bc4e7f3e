//! The volume's API: round trips, metadata checks, corruption, bad input.
//!
//! Each corruption test flips bits behind the engine's back (in a data block, a
//! journal record, one superblock copy, the checksum table) and requires that it is
//! detected and reported, never returned as good data, and never crashes the process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use engine::backend::sim::SimBackend;
use engine::backend::{self, Backend, BackendKind, OpenOptions};
use engine::layout::{Geometry, LayoutError, MIN_JOURNAL_BYTES};
use engine::volume::{create_image_file, CreateOptions, MetaStore};
use engine::{EngineError, IoError, Volume, VolumeOptions, WriteKind, WriteRequest};

const UUID: [u8; 16] = *b"volume-api-tests";

fn create_options() -> CreateOptions {
    CreateOptions {
        resource_uuid: UUID,
        node_id: 1,
        node_name: "alpha".into(),
        journal_bytes: MIN_JOURNAL_BYTES,
        force: false,
        assume_zeroed: false,
    }
}

fn options() -> VolumeOptions {
    VolumeOptions {
        checkpoint_interval: Duration::from_millis(20),
        reader_threads: 2,
        mark_replayed_out_of_sync: true,
        ..VolumeOptions::default()
    }
}

fn sim_store(bytes: u64) -> Arc<SimBackend> {
    let sim = Arc::new(SimBackend::new(bytes));
    let backend: Arc<dyn Backend> = sim.clone();
    Volume::create(
        &backend,
        &MetaStore::Internal,
        &create_options(),
        &mut |_, _| {},
    )
    .expect("create-md");
    sim
}

fn open(sim: &Arc<SimBackend>) -> Result<(Volume, engine::volume::OpenReport), EngineError> {
    Volume::open(sim.clone(), MetaStore::Internal, Some(UUID), options())
}

fn write(volume: &Volume, offset: u64, data: &[u8]) -> Result<u64, IoError> {
    volume.write_blocking(WriteRequest {
        offset,
        kind: WriteKind::Data(Bytes::copy_from_slice(data)),
        fua: false,
    })
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("volume-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn writes_read_back_at_every_alignment_and_survive_reopen() {
    for kind in [BackendKind::Pread, BackendKind::Uring] {
        let dir = temp_dir(&format!("roundtrip-{kind:?}"));
        let path = dir.join("store.img");
        create_image_file(&path, 8 << 20).unwrap();
        let store = backend::open(
            &path,
            OpenOptions {
                kind,
                direct: false,
            },
        )
        .unwrap();
        Volume::create(
            &store,
            &MetaStore::Internal,
            &create_options(),
            &mut |_, _| {},
        )
        .unwrap();
        let (volume, report) =
            Volume::open(store.clone(), MetaStore::Internal, Some(UUID), options()).unwrap();
        assert!(report.was_clean);
        let size = volume.size_bytes();
        let cases: [(u64, usize); 6] = [
            (0, 4096),
            (4096 * 3, 8192),
            (100, 10),
            (4090, 20),
            (size - 4096, 4096),
            (12345, 70000),
        ];
        let mut expected = vec![0u8; size as usize];
        for (index, (offset, length)) in cases.iter().enumerate() {
            let data: Vec<u8> = (0..*length)
                .map(|i| (i as u8).wrapping_add(index as u8 * 31))
                .collect();
            write(&volume, *offset, &data).unwrap();
            expected[*offset as usize..*offset as usize + length].copy_from_slice(&data);
            // Read back at once (overlay) …
            let read = volume.read_blocking(*offset, *length as u64).unwrap();
            assert_eq!(&read[..], &data[..], "case {index}");
        }
        volume
            .write_blocking(WriteRequest {
                offset: 8192 + 7,
                kind: WriteKind::Zeroes(5000),
                fua: true,
            })
            .unwrap();
        expected[8192 + 7..8192 + 7 + 5000].fill(0);
        volume.flush_blocking().unwrap();
        // … and after everything was applied in place and checkpointed.
        assert!(volume.checkpoint_blocking(Duration::from_secs(10)));
        assert_eq!(&volume.read_blocking(0, size).unwrap()[..], &expected[..]);
        volume.close().unwrap();
        drop(volume);
        let (volume, report) =
            Volume::open(store, MetaStore::Internal, Some(UUID), options()).unwrap();
        assert!(report.was_clean, "close() marks the store clean");
        assert_eq!(report.records_replayed, 0);
        assert_eq!(&volume.read_blocking(0, size).unwrap()[..], &expected[..]);
        volume.close().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn trim_reads_back_zeroes_and_partial_trim_is_ignored() {
    let sim = sim_store(4 << 20);
    let (volume, _) = open(&sim).unwrap();
    write(&volume, 0, &[0xAB; 16384]).unwrap();
    volume
        .write_blocking(WriteRequest {
            offset: 4096,
            kind: WriteKind::Trim(8192),
            fua: false,
        })
        .unwrap();
    volume
        .write_blocking(WriteRequest {
            offset: 100,
            kind: WriteKind::Trim(200),
            fua: false,
        })
        .unwrap();
    let data = volume.read_blocking(0, 16384).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 0xAB));
    assert!(data[4096..12288].iter().all(|&b| b == 0));
    assert!(data[12288..].iter().all(|&b| b == 0xAB));
    volume.close().unwrap();
}

#[test]
fn large_writes_split_into_records_and_stay_whole() {
    let sim = sim_store(8 << 20);
    let (volume, _) = open(&sim).unwrap();
    let max_record = volume.geometry().max_record_data_bytes() as usize;
    let data: Vec<u8> = (0..3 * max_record + 4096)
        .map(|i| (i % 251) as u8)
        .collect();
    let records = volume
        .write(
            WriteRequest {
                offset: 4096,
                kind: WriteKind::Data(Bytes::from(data.clone())),
                fua: true,
            },
            Box::new(|_| {}),
        )
        .unwrap();
    assert_eq!(
        records.len(),
        4,
        "a write larger than a record becomes several, in order"
    );
    assert!(records
        .windows(2)
        .all(|pair| pair[0].header.seq + 1 == pair[1].header.seq));
    volume.flush_blocking().unwrap();
    assert_eq!(
        &volume.read_blocking(4096, data.len() as u64).unwrap()[..],
        &data[..]
    );
    volume.close().unwrap();
}

#[test]
fn trim_and_zeroes_longer_than_32_mib_become_records_of_at_most_32_mib() {
    const MIB: u64 = 1 << 20;
    let sim = sim_store(80 * MIB);
    let (volume, _) = open(&sim).unwrap();
    let size = volume.size_bytes();
    assert!(size > 70 * MIB, "store too small: {size}");
    let pattern =
        |seed: u8| -> Vec<u8> { (0..MIB as usize).map(|i| (i % 253) as u8 ^ seed).collect() };
    for (kind, seed) in [(WriteKind::Trim(0), 0x5A), (WriteKind::Zeroes(0), 0xA5)] {
        // Data everywhere, then a 66 MiB range (unaligned for WRITE_ZEROES) cleared.
        for mib in 0..70 {
            write(&volume, mib * MIB, &pattern(seed ^ mib as u8)).unwrap();
        }
        let (offset, length) = match kind {
            WriteKind::Trim(_) => (2 * MIB, 66 * MIB),
            _ => (2 * MIB + 100, 66 * MIB - 200),
        };
        let kind = match kind {
            WriteKind::Trim(_) => WriteKind::Trim(length),
            _ => WriteKind::Zeroes(length),
        };
        let (sender, receiver) = std::sync::mpsc::channel();
        let records = volume
            .write(
                WriteRequest {
                    offset,
                    kind: kind.clone(),
                    fua: true,
                },
                Box::new(move |result| drop(sender.send(result))),
            )
            .unwrap_or_else(|e| panic!("{kind:?} at {offset} refused: {e}"));
        receiver
            .recv_timeout(Duration::from_secs(20))
            .expect("completion")
            .expect("trim or write-zeroes");
        let zero_records: Vec<_> = records.iter().filter(|r| r.data.is_empty()).collect();
        assert_eq!(
            zero_records.len(),
            3,
            "{kind:?}: 66 MiB in records of 32 MiB"
        );
        assert!(zero_records
            .iter()
            .all(|r| r.header.length_bytes <= engine::MAX_IO_BYTES));
        let covered: u64 = zero_records.iter().map(|r| r.header.length_bytes).sum();
        assert_eq!(covered, 66 * MIB - 8192 * u64::from(offset % 4096 != 0));
        // Read from the store itself, not the overlay.
        assert!(volume.wait_applied(Duration::from_secs(20)), "not applied");
        let (start, end) = (offset, offset + length);
        for mib in 0..70u64 {
            let chunk = volume.read_blocking(mib * MIB, MIB).unwrap();
            let expected = pattern(seed ^ mib as u8);
            for (index, (&got, &want)) in chunk.iter().zip(&expected).enumerate() {
                let at = mib * MIB + index as u64;
                let want = if (start..end).contains(&at) { 0 } else { want };
                assert_eq!(got, want, "{kind:?}: byte {at} (range {start}..{end})");
            }
        }
    }
    volume.close().unwrap();
}

/// On a thread of its own: a deferred 4 KiB write at offset 0 (value 1), then `then`,
/// then the `commit_pending` the deferred write's caller owes, as an async task sharing
/// the thread would do it. Returns what `then` returned, or panics after 20 s: `then`
/// waited for the commit that only comes after it.
fn after_a_deferred_write<T: Send + 'static>(
    volume: &Volume,
    then: impl FnOnce(&Volume) -> T + Send + 'static,
) -> T {
    let (sender, receiver) = std::sync::mpsc::channel();
    let writer = volume.clone();
    std::thread::spawn(move || {
        writer
            .write_deferred(
                WriteRequest {
                    offset: 0,
                    kind: WriteKind::Data(Bytes::from(vec![1; 4096])),
                    fua: false,
                },
                Box::new(|_| {}),
            )
            .expect("deferred write");
        let result = then(&writer);
        writer.commit_pending();
        drop(sender.send(result));
    });
    receiver
        .recv_timeout(Duration::from_secs(20))
        .expect("waited behind an uncommitted deferred write of the same thread")
}

#[test]
fn trim_and_zeroes_do_not_wait_for_memory_they_do_not_use() {
    // The journal (256 KiB) is the memory budget. TRIM and WRITE_ZEROES records carry
    // no data, so a 64 MiB one must not wait for room as a 64 MiB write would.
    let sim = sim_store(80 << 20);
    let (volume, _) = open(&sim).unwrap();
    let results = after_a_deferred_write(&volume, |writer| {
        [WriteKind::Trim(64 << 20), WriteKind::Zeroes(64 << 20)].map(|kind| {
            writer.write_blocking(WriteRequest {
                offset: 4096,
                kind,
                fua: false,
            })
        })
    });
    for result in results {
        result.expect("trim or write-zeroes");
    }
    volume.close().unwrap();
}

#[test]
fn a_write_waiting_for_memory_does_not_wait_for_a_deferred_commit() {
    // The journal (256 KiB) is the memory budget: a 1 MiB write waits until what is
    // pending is committed, here a deferred write whose commit comes after it.
    let sim = sim_store(8 << 20);
    let (volume, _) = open(&sim).unwrap();
    after_a_deferred_write(&volume, |writer| write(writer, 1 << 20, &[2; 1 << 20]))
        .expect("the 1 MiB write");
    assert!(volume
        .read_blocking(0, 4096)
        .unwrap()
        .iter()
        .all(|&b| b == 1));
    assert!(volume
        .read_blocking(1 << 20, 1 << 20)
        .unwrap()
        .iter()
        .all(|&b| b == 2));
    volume.close().unwrap();
}

#[test]
fn deferred_writes_share_one_commit_and_all_complete() {
    let sim = sim_store(16 << 20);
    let (volume, _) = open(&sim).unwrap();
    let before = volume.stats().journal_commits;
    let (sender, receiver) = std::sync::mpsc::channel();
    for block in 0..8u64 {
        let sender = sender.clone();
        volume
            .write_deferred(
                WriteRequest {
                    offset: block * 4096,
                    kind: WriteKind::Data(Bytes::from(vec![block as u8 + 1; 4096])),
                    fua: false,
                },
                Box::new(move |result| drop(sender.send(result))),
            )
            .unwrap();
    }
    volume.commit_pending();
    for _ in 0..8 {
        let result = receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("completion");
        result.expect("write");
    }
    let commits = volume.stats().journal_commits - before;
    // Written one by one with `write`, each would have been its own commit.
    assert!(commits < 8, "8 deferred writes took {commits} commits");
    for block in 0..8u64 {
        let data = volume.read_blocking(block * 4096, 4096).unwrap();
        assert!(data.iter().all(|&b| b == block as u8 + 1));
    }
    volume.close().unwrap();
}

/// Journals `record` on `secondary` as the primary's stream would and waits until the
/// applier has put it in place (bounded).
fn append_and_apply(secondary: &Volume, record: engine::record::Record) {
    let seq = record.header.seq;
    let (sender, receiver) = std::sync::mpsc::channel();
    secondary
        .append_replicated(record, Box::new(move |result| drop(sender.send(result))))
        .unwrap();
    receiver
        .recv_timeout(Duration::from_secs(10))
        .expect("journaled")
        .expect("journal");
    secondary.flush_blocking().unwrap();
    assert!(
        secondary.wait_applied(Duration::from_secs(10)),
        "record {seq} never applied"
    );
    assert!(secondary.stats().applied_seq >= seq);
}

/// A primary (only a maker of records here) and a secondary with its store, fresh.
fn open_pair() -> (Volume, Volume, Arc<SimBackend>) {
    let (primary, _) = open(&sim_store(16 << 20)).unwrap();
    let secondary_sim = sim_store(16 << 20);
    let (secondary, _) = open(&secondary_sim).unwrap();
    (primary, secondary, secondary_sim)
}

/// The records a volume makes of 4 KiB writes to blocks `0..blocks`, block `b` filled
/// with `fill(b)` (the journal's completion is not awaited).
fn records_of_writes(
    volume: &Volume,
    blocks: u64,
    fill: impl Fn(u64) -> u8,
) -> Vec<engine::record::Record> {
    (0..blocks)
        .flat_map(|block| {
            volume
                .write(
                    WriteRequest {
                        offset: block * 4096,
                        kind: WriteKind::Data(Bytes::from(vec![fill(block); 4096])),
                        fua: false,
                    },
                    Box::new(|_| {}),
                )
                .unwrap()
        })
        .collect()
}

#[test]
fn a_replicated_record_clears_out_of_sync_bits_only_during_a_resync() {
    // A secondary marks the blocks of records the primary may not hold when a session
    // ends; a record of that session applied afterwards must leave the mark set, or
    // the next resync skips a block the two nodes hold differently.
    let (primary, secondary, _) = open_pair();
    let records = records_of_writes(&primary, 2, |_| 7);
    let mut records = records.into_iter();
    secondary.advance_seq(records.as_slice()[0].header.seq);

    secondary.set_out_of_sync(0, 1);
    append_and_apply(&secondary, records.next().unwrap());
    assert_eq!(secondary.stats().out_of_sync_blocks, 1, "outside a resync");

    secondary.set_out_of_sync(1, 1);
    secondary.begin_resync_target();
    append_and_apply(&secondary, records.next().unwrap());
    secondary.end_resync_target();
    // Block 1 came by the stream during the resync: in sync. Block 0 still marked.
    assert_eq!(secondary.stats().out_of_sync_blocks, 1, "during a resync");
    assert_eq!(
        secondary.read_blocking(4096, 4096).unwrap()[..],
        [7u8; 4096]
    );
    primary.close().unwrap();
    secondary.close().unwrap();
}

#[test]
fn a_secondary_keeps_records_in_its_journal_until_the_primary_reports_them_durable() {
    // A primary ships a record before its own journal has it. If both nodes lose
    // power, the primary may lack a record the secondary applied: the secondary must
    // still have it in its journal, so replay marks its block for the next resync.
    let (primary, secondary, secondary_sim) = open_pair();
    let records = records_of_writes(&primary, 2, |block| block as u8 + 1);
    let first_seq = records[0].header.seq;
    secondary.advance_seq(first_seq);
    for record in records {
        append_and_apply(&secondary, record);
    }
    // The primary's journal holds the first record durably, not yet the second.
    secondary.peer_acked(first_seq);
    assert!(secondary.checkpoint_blocking(Duration::from_secs(10)));
    assert_eq!(secondary.stats().checkpoint_seq, first_seq);
    assert_eq!(secondary.stats().out_of_sync_blocks, 0);
    secondary.abandon();
    drop(secondary);

    let (secondary, report) = open(&secondary_sim).unwrap();
    assert_eq!(report.records_replayed, 1, "{report:?}");
    assert_eq!(secondary.stats().out_of_sync_blocks, 1);
    assert_eq!(secondary.next_out_of_sync_run(0, 16), Some((1, 1)));
    primary.close().unwrap();
    secondary.close().unwrap();
}

#[test]
fn deferred_replicated_records_share_one_commit_and_all_complete() {
    let (primary, secondary, _) = open_pair();
    let records = records_of_writes(&primary, 8, |block| block as u8 + 1);
    secondary.advance_seq(records[0].header.seq);
    let before = secondary.stats().journal_commits;
    let (sender, receiver) = std::sync::mpsc::channel();
    for record in records {
        let sender = sender.clone();
        let refused = secondary
            .try_append_replicated_deferred(record, Box::new(move |r| drop(sender.send(r))))
            .unwrap();
        assert!(refused.is_none(), "the memory budget is far from full");
    }
    secondary.commit_pending();
    for _ in 0..8 {
        let result = receiver.recv_timeout(Duration::from_secs(10));
        result.expect("completion").expect("journal");
    }
    let commits = secondary.stats().journal_commits - before;
    assert!(commits < 8, "8 deferred records took {commits} commits");
    for block in 0..8u64 {
        let data = secondary.read_blocking(block * 4096, 4096).unwrap();
        assert!(data.iter().all(|&b| b == block as u8 + 1));
    }
    primary.close().unwrap();
    secondary.close().unwrap();
}

#[test]
fn wait_applied_waits_for_a_batch_the_applier_is_still_writing() {
    // The applier takes a batch off its queue before writing it in place: an empty
    // queue does not mean "applied" (a test caught `wait_applied` returning early).
    struct ReleaseOnDrop(Arc<SimBackend>);
    impl Drop for ReleaseOnDrop {
        fn drop(&mut self) {
            self.0.release_writes();
        }
    }
    let sim = sim_store(16 << 20);
    let (volume, _) = open(&sim).unwrap();
    sim.hold_writes(0..volume.geometry().data_bytes);
    // Declared after the volume, so dropped first: a failing assertion cannot leave
    // the applier stuck at the gate while the volume's threads are joined.
    let gate = ReleaseOnDrop(sim.clone());
    let seq = write(&volume, 0, &[9u8; 4096]).unwrap();
    volume.flush_blocking().unwrap();
    assert!(
        sim.wait_for_held_write(Duration::from_secs(10)),
        "the applier never wrote the record in place"
    );
    assert!(
        !volume.wait_applied(Duration::from_millis(100)),
        "wait_applied returned while the in-place write was still held"
    );
    drop(gate);
    assert!(volume.wait_applied(Duration::from_secs(10)));
    assert!(volume.stats().applied_seq >= seq);
    volume.close().unwrap();
}

#[test]
fn many_concurrent_writers_share_group_commits() {
    let sim = sim_store(16 << 20);
    let (volume, _) = open(&sim).unwrap();
    let threads: Vec<_> = (0..8u8)
        .map(|thread| {
            let volume = volume.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let block = thread as u64 * 200 + i;
                    write(&volume, block * 4096, &[thread.wrapping_add(i as u8); 4096]).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    volume.flush_blocking().unwrap();
    let stats = volume.stats();
    assert_eq!(stats.writes, 1600);
    assert!(stats.journal_commits <= 1600);
    for thread in 0..8u8 {
        for i in 0..200u64 {
            let block = thread as u64 * 200 + i;
            let data = volume.read_blocking(block * 4096, 4096).unwrap();
            assert!(data.iter().all(|&b| b == thread.wrapping_add(i as u8)));
        }
    }
    volume.close().unwrap();
}

#[test]
fn ring_wraps_many_times_under_sustained_writes() {
    let sim = sim_store(4 << 20);
    let (volume, _) = open(&sim).unwrap();
    let size = volume.size_bytes();
    // Far more bytes than the 256 KiB journal holds.
    for round in 0..40u64 {
        for block in 0..16u64 {
            let offset = (round * 16 + block) * 4096 % (size - 8192);
            write(&volume, offset, &[(round + block) as u8; 8192]).unwrap();
        }
    }
    volume.flush_blocking().unwrap();
    assert!(volume.stats().checkpoints > 0);
    let reference = volume.read_blocking(0, size).unwrap();
    volume.abandon();
    drop(volume);
    // Crash-reopen: recovery must reproduce exactly what was flushed.
    let (volume, _) = open(&sim).unwrap();
    assert_eq!(volume.read_blocking(0, size).unwrap(), reference);
    volume.close().unwrap();
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let sim = sim_store(4 << 20);
    let (volume, _) = open(&sim).unwrap();
    let size = volume.size_bytes();
    write(&volume, 0, &[1; 4096]).unwrap();
    volume.flush_blocking().unwrap();
    let before = volume.read_blocking(0, size).unwrap();
    let ops_before = volume.stats().writes;
    type Expectation = fn(&IoError) -> bool;
    let cases: Vec<(WriteRequest, Expectation)> = vec![
        (
            WriteRequest {
                offset: size,
                kind: WriteKind::Data(Bytes::from(vec![2; 4096])),
                fua: false,
            },
            |e| matches!(e, IoError::OutOfRange { .. }),
        ),
        (
            WriteRequest {
                offset: size - 1,
                kind: WriteKind::Data(Bytes::from(vec![2; 2])),
                fua: false,
            },
            |e| matches!(e, IoError::OutOfRange { .. }),
        ),
        (
            WriteRequest {
                offset: u64::MAX - 1,
                kind: WriteKind::Data(Bytes::from(vec![2; 4096])),
                fua: false,
            },
            |e| matches!(e, IoError::OutOfRange { .. }),
        ),
        (
            WriteRequest {
                offset: 0,
                kind: WriteKind::Data(Bytes::new()),
                fua: false,
            },
            |e| matches!(e, IoError::ZeroLength { .. }),
        ),
        (
            WriteRequest {
                offset: 0,
                kind: WriteKind::Zeroes(u64::from(u32::MAX) + 1),
                fua: false,
            },
            |e| matches!(e, IoError::TooLarge { .. }),
        ),
        (
            WriteRequest {
                offset: 0,
                kind: WriteKind::Trim(u64::MAX),
                fua: false,
            },
            |e| matches!(e, IoError::TooLarge { .. }),
        ),
    ];
    for (request, expected) in cases {
        let error = volume
            .write_blocking(request.clone())
            .expect_err("bad request accepted");
        assert!(expected(&error), "{request:?} gave {error}");
        assert!(!error.to_string().is_empty());
    }
    assert!(matches!(
        volume.read_blocking(size, 1),
        Err(IoError::OutOfRange { .. })
    ));
    assert!(matches!(
        volume.read_blocking(0, 0),
        Err(IoError::ZeroLength { .. })
    ));
    assert_eq!(
        volume.read_blocking(0, size).unwrap(),
        before,
        "nothing changed"
    );
    assert_eq!(
        volume.stats().writes,
        ops_before,
        "rejected requests are not counted as writes"
    );
    volume.close().unwrap();
}

#[test]
fn stores_too_small_or_without_metadata_are_refused_with_clear_errors() {
    let tiny: Arc<dyn Backend> = Arc::new(SimBackend::new(512 << 10));
    let error = Volume::create(
        &tiny,
        &MetaStore::Internal,
        &create_options(),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(
        matches!(error, EngineError::Layout(LayoutError::TooSmall { .. })),
        "{error}"
    );
    assert!(error.to_string().contains("too small"));
    let blank = Arc::new(SimBackend::new(4 << 20));
    assert!(matches!(open(&blank), Err(EngineError::NoMetadata)));
    assert!(
        blank.live_image().iter().all(|&b| b == 0),
        "a failed open writes nothing"
    );
}

#[test]
fn create_md_refuses_existing_metadata_without_force() {
    let sim = sim_store(4 << 20);
    let backend: Arc<dyn Backend> = sim.clone();
    let image = sim.live_image();
    let error = Volume::create(
        &backend,
        &MetaStore::Internal,
        &create_options(),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(error, EngineError::MetadataExists));
    assert_eq!(
        sim.live_image(),
        image,
        "refused create-md changed the store"
    );
    let forced = CreateOptions {
        force: true,
        ..create_options()
    };
    Volume::create(&backend, &MetaStore::Internal, &forced, &mut |_, _| {}).unwrap();
}

#[test]
fn wrong_resource_and_changed_geometry_are_refused() {
    let sim = sim_store(4 << 20);
    let error =
        Volume::open(sim.clone(), MetaStore::Internal, Some([9; 16]), options()).unwrap_err();
    assert!(
        matches!(error, EngineError::WrongResource { .. }),
        "{error}"
    );
    // The same metadata found on a larger store (device replaced or resized): its
    // superblocks are where they should be but the geometry no longer matches.
    let mut image = sim.live_image();
    let superblocks = image.split_off(image.len() - 8192);
    image.extend(vec![0u8; 1 << 20]);
    image.extend(superblocks);
    let grown = Arc::new(SimBackend::from_image(image));
    let error = open(&grown).unwrap_err();
    assert!(
        matches!(error, EngineError::GeometryMismatch { .. }),
        "{error}"
    );
}

#[test]
fn a_corrupt_superblock_copy_falls_back_to_the_other_and_two_are_an_error() {
    let sim = sim_store(4 << 20);
    let geometry = Geometry::internal(4 << 20, MIN_JOURNAL_BYTES).unwrap();
    let (volume, _) = open(&sim).unwrap();
    write(&volume, 0, &[5; 4096]).unwrap();
    volume.close().unwrap();
    drop(volume);
    let newest =
        engine::volume::read_superblock(&(sim.clone() as Arc<dyn Backend>), &MetaStore::Internal)
            .unwrap();
    sim.corrupt(geometry.superblock_offsets[newest.copy] + 20, 0x40);
    let (volume, report) = open(&sim).expect("falls back to the older copy");
    assert_eq!(report.superblock_copy, 1 - newest.copy);
    assert!(
        report
            .other_copy_error
            .as_deref()
            .is_some_and(|e| e.contains("checksum")),
        "{report:?}"
    );
    assert!(volume
        .read_blocking(0, 4096)
        .unwrap()
        .iter()
        .all(|&b| b == 5));
    volume.close().unwrap();
    drop(volume);
    sim.corrupt(geometry.superblock_offsets[0] + 30, 0x01);
    sim.corrupt(geometry.superblock_offsets[1] + 30, 0x01);
    let error = open(&sim).unwrap_err();
    assert!(matches!(error, EngineError::BadMetadata(_)), "{error}");
}

#[test]
fn p3_a_flipped_bit_in_a_data_block_is_an_error_never_data() {
    let sim = sim_store(4 << 20);
    let (volume, _) = open(&sim).unwrap();
    write(&volume, 0, &[7; 4 * 4096]).unwrap();
    volume.flush_blocking().unwrap();
    assert!(volume.checkpoint_blocking(Duration::from_secs(10)));
    sim.corrupt(4096 * 2 + 100, 0x10);
    let error = volume.read_blocking(0, 4 * 4096).unwrap_err();
    assert!(
        matches!(error, IoError::Checksum { block: 2, .. }),
        "{error}"
    );
    assert_eq!(error.errno(), libc::EIO);
    assert_eq!(volume.stats().checksum_errors, 1);
    // Other blocks still read; a rewrite of the bad block repairs it.
    assert!(volume.read_blocking(0, 2 * 4096).is_ok());
    write(&volume, 2 * 4096, &[8; 4096]).unwrap();
    assert!(volume
        .read_blocking(2 * 4096, 4096)
        .unwrap()
        .iter()
        .all(|&b| b == 8));
    // A partial write over a corrupt block must not merge garbage: it fails.
    sim.corrupt(4096 * 3 + 1, 0x01);
    assert!(volume.checkpoint_blocking(Duration::from_secs(10)));
    assert!(matches!(
        write(&volume, 3 * 4096 + 10, &[9; 10]),
        Err(IoError::Checksum { block: 3, .. })
    ));
    volume.close().unwrap();
}

#[test]
fn p3_a_flipped_bit_in_the_checksum_table_is_detected() {
    let sim = sim_store(4 << 20);
    let geometry = Geometry::internal(4 << 20, MIN_JOURNAL_BYTES).unwrap();
    let (volume, _) = open(&sim).unwrap();
    write(&volume, 5 * 4096, &[3; 4096]).unwrap();
    volume.close().unwrap();
    drop(volume);
    sim.corrupt(geometry.checksum_offset + 5 * 4, 0x80);
    let (volume, _) = open(&sim).unwrap();
    assert!(matches!(
        volume.read_blocking(5 * 4096, 4096),
        Err(IoError::Checksum { block: 5, .. })
    ));
    assert!(volume.read_blocking(6 * 4096, 4096).is_ok());
    volume.close().unwrap();
}

#[test]
fn p3_a_flipped_bit_in_a_journal_record_ends_replay_there() {
    let sim = sim_store(4 << 20);
    let geometry = Geometry::internal(4 << 20, MIN_JOURNAL_BYTES).unwrap();
    let (volume, _) = open(&sim).unwrap();
    let checkpoint_pos = volume.superblock().checkpoint_pos;
    let record_data = volume.geometry().max_record_data_bytes() as usize;
    // Keep the applier from writing in place, so the records live only in the journal.
    sim.fail_writes(0..geometry.data_bytes);
    // One write of three records' worth: sequenced together, one group commit.
    let data: Vec<u8> = (0..3 * record_data)
        .map(|i| (i / record_data + 1) as u8)
        .collect();
    let records = volume
        .write(
            WriteRequest {
                offset: 0,
                kind: WriteKind::Data(Bytes::from(data)),
                fua: true,
            },
            Box::new(|_| {}),
        )
        .unwrap();
    assert_eq!(records.len(), 3);
    volume.flush_blocking().ok();
    volume.abandon();
    drop(volume);
    // Power comes back with the journal intact but one bit of record 2's data flipped.
    let image = sim.live_image();
    let sim = Arc::new(SimBackend::from_image(image));
    let second = geometry.journal_offset + checkpoint_pos + records[0].total_bytes();
    sim.corrupt(second + records[1].encoded_header.len() as u64 + 10, 0x04);
    let (volume, report) = open(&sim).unwrap();
    assert_eq!(report.records_replayed, 1, "{report:?}");
    assert!(report.scan_stop.contains("torn record"), "{report:?}");
    let read = volume.read_blocking(0, 3 * record_data as u64).unwrap();
    assert!(read[..record_data].iter().all(|&b| b == 1));
    // Records after the corrupt one are discarded, never applied out of order.
    assert!(read[record_data..].iter().all(|&b| b == 0));
    volume.close().unwrap();
}

#[test]
fn storage_errors_fail_requests_without_panicking() {
    let sim = sim_store(4 << 20);
    let (volume, _) = open(&sim).unwrap();
    write(&volume, 0, &[1; 8192]).unwrap();
    assert!(volume.checkpoint_blocking(Duration::from_secs(10)));
    sim.fail_reads(4096..8192);
    let error = volume.read_blocking(0, 8192).unwrap_err();
    assert_eq!(error.errno(), libc::EIO, "{error}");
    sim.clear_faults();
    assert!(volume.read_blocking(0, 8192).is_ok());
    // A failing journal write fails the volume: later writes get a clear error.
    let geometry = volume.geometry();
    sim.fail_writes(geometry.journal_offset..geometry.journal_offset + geometry.journal_bytes);
    assert!(write(&volume, 0, &[2; 4096]).is_err());
    let error = write(&volume, 0, &[2; 4096]).unwrap_err();
    assert!(matches!(error, IoError::Failed(_)), "{error}");
    assert!(volume.failure().is_some());
}

#[test]
fn a_commit_after_recovery_starts_on_a_fresh_page_even_on_an_aligned_backend() {
    // The simulated store needs 512-byte-aligned I/O. A lost PAD leaves the recovered
    // journal ending mid-page; the next group commit must still be aligned.
    let sim = sim_store(4 << 20);
    let geometry = Geometry::internal(4 << 20, MIN_JOURNAL_BYTES).unwrap();
    let (volume, _) = open(&sim).unwrap();
    let start = volume.superblock().checkpoint_pos;
    sim.fail_writes(0..geometry.data_bytes);
    let (sender, receiver) = std::sync::mpsc::channel();
    let records = volume
        .write(
            WriteRequest {
                offset: 0,
                kind: WriteKind::Data(Bytes::from(vec![1u8; 4096])),
                fua: true,
            },
            Box::new(move |r| drop(sender.send(r))),
        )
        .unwrap();
    receiver.recv().unwrap().unwrap();
    volume.abandon();
    drop(volume);
    let sim = Arc::new(SimBackend::from_image(sim.live_image()));
    // Break the PAD that follows the record (it ends the group commit's page).
    sim.corrupt(
        geometry.journal_offset + start + records[0].total_bytes() + 8,
        0x01,
    );
    let (volume, report) = open(&sim).unwrap();
    assert_eq!(report.records_replayed, 1, "{report:?}");
    write(&volume, 4096, &[2u8; 4096]).expect("first commit after recovery");
    volume.flush_blocking().unwrap();
    volume.abandon();
    drop(volume);
    let (volume, _) = open(&sim).unwrap();
    let data = volume.read_blocking(0, 8192).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 1) && data[4096..].iter().all(|&b| b == 2));
    volume.close().unwrap();
}

#[test]
fn a_flush_before_any_write_after_open_completes() {
    // Opening moves the sequence far forward; a flush must wait only for records that
    // exist (found by an NBD FLUSH right after a daemon start).
    let sim = sim_store(4 << 20);
    for round in 0..2 {
        let (volume, _) = open(&sim).unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        volume.flush(Box::new(move |result| drop(sender.send(result))));
        let result = receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("flush before any write hung");
        assert!(result.is_ok(), "round {round}: {result:?}");
        volume.advance_seq(volume.next_seq() + 1000);
        volume.flush_blocking().unwrap();
        write(&volume, 0, &[round as u8; 4096]).unwrap();
        volume.abandon();
    }
}
