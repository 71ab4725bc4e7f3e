//! Snapshots on one node: copy-on-write images at a point of the write order, the
//! changed-block sets an incremental backup reads, and both across power cuts
//! (`engine::snapshot`, `docs/FORMAT.md` §16).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use engine::backend::sim::SimBackend;
use engine::backend::Backend;
use engine::layout::MIN_JOURNAL_BYTES;
use engine::rng::SplitMix64;
use engine::snapshot::{SnapshotError, SnapshotOptions, ENTRY_BYTES};
use engine::superblock::StoredDiskState;
use engine::volume::{Background, CreateOptions, MetaStore};
use engine::{Volume, VolumeOptions, WriteKind, WriteRequest, BLOCK_BYTES};

const STORE_BYTES: u64 = 4 << 20;

fn area(dir: &Path, area_bytes: u64) -> SnapshotOptions {
    SnapshotOptions {
        dir: dir.to_path_buf(),
        area_bytes,
    }
}

fn options(background: Background, dir: &Path, area_bytes: u64) -> VolumeOptions {
    VolumeOptions {
        checkpoint_interval: Duration::from_millis(5),
        reader_threads: 1,
        background,
        snapshots: Some(area(dir, area_bytes)),
        ..VolumeOptions::default()
    }
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("replicad-snapshots-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn fresh_store() -> Arc<SimBackend> {
    let sim = Arc::new(SimBackend::new(STORE_BYTES));
    let backend: Arc<dyn Backend> = sim.clone();
    let create = CreateOptions {
        resource_uuid: [9; 16],
        node_id: 0,
        node_name: "alpha".into(),
        journal_bytes: MIN_JOURNAL_BYTES,
        force: false,
        assume_zeroed: true,
    };
    Volume::create(&backend, &MetaStore::Internal, &create, &mut |_, _| {}).expect("create-md");
    sim
}

fn open(sim: Arc<SimBackend>, background: Background, dir: &Path) -> Volume {
    up_to_date(
        Volume::open(
            sim,
            MetaStore::Internal,
            Some([9; 16]),
            options(background, dir, 1 << 30),
        )
        .expect("open")
        .0,
    )
}

/// A fresh store is Inconsistent (never synced), where snapshots are refused; the
/// tests stand for a node whose data is good.
fn up_to_date(volume: Volume) -> Volume {
    if volume.stored_disk_state() == StoredDiskState::Inconsistent {
        assert_eq!(
            volume.create_snapshot("x", None, 0),
            Err(SnapshotError::Inconsistent)
        );
        volume
            .update_superblock(|sb| sb.disk_state = StoredDiskState::UpToDate)
            .unwrap();
    }
    volume
}

fn pattern(tag: u8, blocks: u64) -> Bytes {
    let mut data = vec![0u8; (blocks * BLOCK_BYTES) as usize];
    for (index, byte) in data.iter_mut().enumerate() {
        *byte = tag ^ (index / 4096) as u8 ^ (index % 251) as u8;
    }
    Bytes::from(data)
}

fn write(volume: &Volume, block: u64, data: Bytes) {
    volume
        .write_blocking(WriteRequest {
            offset: block * BLOCK_BYTES,
            kind: WriteKind::Data(data),
            fua: false,
        })
        .expect("write");
}

fn blocks(range: std::ops::Range<u64>) -> Vec<u64> {
    range.collect()
}

#[test]
fn a_snapshot_reads_its_point_while_the_volume_moves_on_and_lists_what_changed() {
    let dir = tempdir("point");
    let volume = open(fresh_store(), Background::Threads, &dir);
    let size = 64;
    let a = pattern(0xA0, size);
    write(&volume, 0, a.clone());
    volume.create_snapshot("a", None, 1).unwrap();
    write(&volume, 10, pattern(0xB0, 10));
    // A partial write: read-modify-write of one block.
    volume
        .write_blocking(WriteRequest {
            offset: 40 * BLOCK_BYTES + 100,
            kind: WriteKind::Data(Bytes::from(vec![0xEE; 50])),
            fua: false,
        })
        .unwrap();
    assert!(
        volume.read_snapshot("a", 0, size * BLOCK_BYTES).unwrap() == a,
        "bytes differ"
    );
    let now = volume.read_blocking(0, size * BLOCK_BYTES).unwrap();
    assert_ne!(now, a);
    assert_eq!(&now[10 * 4096..20 * 4096], &pattern(0xB0, 10)[..]);
    let mut expected = blocks(10..20);
    expected.push(40);
    assert_eq!(volume.changed_blocks("a", None, 0, 1024).unwrap(), expected);
    // Once applied (not only in the overlay), the same answer.
    assert!(volume.wait_applied(Duration::from_secs(10)));
    assert_eq!(volume.changed_blocks("a", None, 0, 1024).unwrap(), expected);

    volume.create_snapshot("b", None, 2).unwrap();
    write(&volume, 30, pattern(0xC0, 5));
    write(&volume, 12, pattern(0xC1, 1));
    assert_eq!(
        volume.changed_blocks("a", Some("b"), 0, 1024).unwrap(),
        expected
    );
    let mut since_b = vec![12];
    since_b.extend(30..35);
    assert_eq!(volume.changed_blocks("b", None, 0, 1024).unwrap(), since_b);
    assert!(
        volume.read_snapshot("b", 0, size * BLOCK_BYTES).unwrap() == now,
        "bytes differ"
    );
    assert!(
        volume.read_snapshot("a", 4096 * 12, 4096).unwrap() == a.slice(4096 * 12..4096 * 13),
        "bytes differ"
    );
    // Unaligned reads of a snapshot.
    assert!(
        volume.read_snapshot("a", 4000, 9000).unwrap() == a.slice(4000..13000),
        "bytes differ"
    );

    // Bad input changes nothing.
    assert_eq!(
        volume.create_snapshot("a", None, 3),
        Err(SnapshotError::Exists("a".into()))
    );
    assert!(matches!(
        volume.create_snapshot("no/slash", None, 3),
        Err(SnapshotError::BadName(_))
    ));
    assert_eq!(
        volume.read_snapshot("zz", 0, 4096),
        Err(SnapshotError::NotFound("zz".into()))
    );
    assert!(volume.read_snapshot("a", STORE_BYTES, 4096).is_err());
    assert!(matches!(
        volume.changed_blocks("b", Some("a"), 0, 10),
        Err(SnapshotError::Io(_))
    ));
    assert!(volume.wait_applied(Duration::from_secs(10)));
    let (list, used, _) = volume.list_snapshots().unwrap();
    assert_eq!(list.len(), 2);
    // a: blocks 10..20, 40, 30..35 (12 was preserved for a already); b: 30..35, 12.
    assert_eq!(used, (11 + 5 + 6) * ENTRY_BYTES);
    volume.delete_snapshot("a").unwrap();
    assert!(
        volume.read_snapshot("b", 0, size * BLOCK_BYTES).unwrap() == now,
        "bytes differ"
    );
    volume.close().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// "Changed between A and B" while the writes before B's point are not applied yet
/// (they have no log entry): still every block they rewrite.
#[test]
fn p8_changed_between_two_snapshots_counts_writes_not_yet_applied() {
    let dir = tempdir("unapplied");
    let volume = open(fresh_store(), Background::Manual, &dir);
    write(&volume, 0, pattern(0xA2, 16));
    volume.pump_until_idle(10_000);
    volume.create_snapshot("a", None, 1).unwrap();
    write(&volume, 3, pattern(0xB2, 2));
    write(&volume, 9, pattern(0xB3, 1));
    volume.create_snapshot("b", None, 2).unwrap();
    assert_eq!(
        volume.changed_blocks("a", Some("b"), 0, 16).unwrap(),
        vec![3, 4, 9],
        "before the applier ran"
    );
    // Block 12 only after b; block 3 again after b (its entry brackets both writes).
    write(&volume, 12, pattern(0xC2, 1));
    write(&volume, 3, pattern(0xC3, 1));
    assert_eq!(
        volume.changed_blocks("a", Some("b"), 0, 16).unwrap(),
        vec![3, 4, 9],
        "with writes after b pending"
    );
    assert_eq!(
        volume.changed_blocks("b", None, 0, 16).unwrap(),
        vec![3, 12],
        "since b, up to now"
    );
    volume.pump_until_idle(10_000);
    assert_eq!(
        volume.changed_blocks("a", Some("b"), 0, 16).unwrap(),
        vec![3, 4, 9],
        "after"
    );
    volume.close().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The reader threads serve snapshot reads in the same batches as reads of the volume:
/// each gets its own image.
#[test]
fn queued_snapshot_reads_and_volume_reads_each_see_their_image() {
    let dir = tempdir("queued");
    let volume = open(fresh_store(), Background::Threads, &dir);
    let a = pattern(0xA1, 32);
    write(&volume, 0, a.clone());
    volume.create_snapshot("a", None, 1).unwrap();
    let b = pattern(0xB1, 16);
    write(&volume, 8, b.clone());
    // Readable once every record up to its point is applied; B again, so the volume's
    // reads of it likely come from the overlay.
    assert!(volume.wait_applied(Duration::from_secs(10)));
    assert!(volume.snapshot_readable("a").unwrap());
    write(&volume, 8, b.clone());
    let (sender, receiver) = std::sync::mpsc::channel();
    for round in 0..64u64 {
        let block = round % 32;
        let offset = block * BLOCK_BYTES;
        let to_snapshot = sender.clone();
        volume.read_snapshot_queued(
            "a",
            offset,
            BLOCK_BYTES,
            Box::new(move |r| drop(to_snapshot.send((true, block, r)))),
        );
        let to_volume = sender.clone();
        volume.read(
            offset,
            BLOCK_BYTES,
            Box::new(move |r| drop(to_volume.send((false, block, r)))),
        );
    }
    for _ in 0..128 {
        let (snapshot, block, result) = receiver.recv_timeout(Duration::from_secs(10)).unwrap();
        let at = (block * BLOCK_BYTES) as usize;
        let expected = if !snapshot && (8..24).contains(&block) {
            b.slice(at - 8 * 4096..at - 8 * 4096 + 4096)
        } else {
            a.slice(at..at + 4096)
        };
        assert!(
            result.unwrap() == expected,
            "block {block} of the {} differs",
            if snapshot { "snapshot" } else { "volume" }
        );
    }
    // Unknown snapshots fail the read with their reason; the volume is untouched.
    let (sender, receiver) = std::sync::mpsc::channel();
    volume.read_snapshot_queued("zz", 0, 4096, Box::new(move |r| drop(sender.send(r))));
    let error = receiver
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap_err();
    assert!(error.to_string().contains("zz"), "{error}");
    volume.close().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Resync data is the source's newer content: written after every snapshot the node
/// has, it is a change after all of them — never one inside an older pair's range.
#[test]
fn a_resync_write_after_a_snapshot_counts_as_changed_after_it() {
    let dir = tempdir("resync");
    let volume = open(fresh_store(), Background::Threads, &dir);
    write(&volume, 0, pattern(0xA0, 8));
    volume.create_snapshot("a", None, 1).unwrap();
    write(&volume, 2, pattern(0xB0, 1));
    volume.create_snapshot("b", None, 2).unwrap();
    let b = volume.read_blocking(0, 8 * BLOCK_BYTES).unwrap();
    // A resync rewrites blocks 5 and 6 with the content they already hold (a
    // conservative mark) and block 7 with newer data.
    let newer = pattern(0xC0, 1);
    let mut data = b.slice(5 * 4096..7 * 4096).to_vec();
    data.extend_from_slice(&newer);
    let crcs = data.chunks(4096).map(crc32fast::hash).collect::<Vec<u32>>();
    // (Resync data for a block with a newer unapplied write is stale and dropped.)
    assert!(volume.wait_applied(Duration::from_secs(10)));
    assert_eq!(
        volume
            .write_resync(5, 3, Some(Bytes::from(data)), crcs)
            .unwrap(),
        3
    );
    assert!(volume.wait_applied(Duration::from_secs(10)));
    assert_eq!(
        volume.changed_blocks("a", Some("b"), 0, 8).unwrap(),
        vec![2]
    );
    assert_eq!(
        volume.changed_blocks("a", None, 0, 8).unwrap(),
        vec![2, 5, 6, 7]
    );
    assert_eq!(
        volume.changed_blocks("b", None, 0, 8).unwrap(),
        vec![5, 6, 7]
    );
    assert!(
        volume.read_snapshot("b", 0, 8 * BLOCK_BYTES).unwrap() == b,
        "bytes differ"
    );
    volume.close().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_secondary_snapshot_at_a_point_refuses_once_a_later_record_was_applied() {
    let dir = tempdir("at");
    let volume = open(fresh_store(), Background::Threads, &dir);
    write(&volume, 0, pattern(1, 4));
    assert!(volume.wait_applied(Duration::from_secs(10)));
    let applied = volume.stats().applied_seq;
    assert!(matches!(
        volume.create_snapshot("old", Some(applied - 1), 1),
        Err(SnapshotError::PointPassed { .. })
    ));
    volume.create_snapshot("now", Some(applied), 1).unwrap();
    volume.close().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_full_area_invalidates_the_snapshot_and_never_the_volume() {
    let dir = tempdir("full");
    let sim = fresh_store();
    let (volume, _) = Volume::open(
        sim,
        MetaStore::Internal,
        Some([9; 16]),
        options(Background::Threads, &dir, 8 * ENTRY_BYTES),
    )
    .unwrap();
    let volume = up_to_date(volume);
    write(&volume, 0, pattern(1, 16));
    volume.create_snapshot("s", None, 1).unwrap();
    write(&volume, 0, pattern(2, 16));
    assert!(volume.wait_applied(Duration::from_secs(10)));
    let (list, used, limit) = volume.list_snapshots().unwrap();
    assert!(
        list[0].invalid.as_deref().unwrap_or("").contains("full"),
        "{list:?}"
    );
    assert_eq!((used, limit), (0, 8 * ENTRY_BYTES));
    assert_eq!(volume.take_snapshot_events().len(), 1);
    assert!(matches!(
        volume.read_snapshot("s", 0, 4096),
        Err(SnapshotError::Invalid { .. })
    ));
    assert!(
        volume.read_blocking(0, 16 * BLOCK_BYTES).unwrap() == pattern(2, 16),
        "bytes differ"
    );
    volume.close().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Random writes after a snapshot, a power cut at a random unit of the background
/// work (manual mode), reopen: the snapshot still reads its point exactly, and the
/// changed-block set covers every block where the volume now differs from it.
#[test]
fn p8_a_snapshot_survives_power_cuts_and_its_changed_set_is_never_smaller_than_the_truth() {
    let seeds: u64 = std::env::var("SNAP_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let blocks_in_use = 96u64;
    for seed in 0..seeds {
        let dir = tempdir(&format!("cut-{seed}"));
        let sim = fresh_store();
        let mut rng = SplitMix64::new(seed);
        let volume = open(sim.clone(), Background::Manual, &dir);
        for block in 0..blocks_in_use {
            write(&volume, block, pattern(block as u8, 1));
        }
        volume.flush_blocking().unwrap();
        // Odd seeds: the records before the point are still unapplied when the
        // snapshot is made (the applier must not batch them with later ones).
        if seed % 2 == 0 {
            volume.pump_until_idle(10_000);
        }
        let at_point = volume
            .read_blocking(0, blocks_in_use * BLOCK_BYTES)
            .unwrap();
        volume.create_snapshot("s", None, 1).unwrap();
        let cut_after = rng.below(400);
        let mut units = 0;
        'work: for round in 0..40u64 {
            let block = rng.below(blocks_in_use);
            let count = 1 + rng.below(4).min(blocks_in_use - block - 1);
            write(&volume, block, pattern(0x80 ^ round as u8, count));
            if rng.below(4) == 0 {
                volume.flush(Box::new(|_| {}));
            }
            for _ in 0..rng.below(6) {
                if units == cut_after {
                    break 'work;
                }
                volume.pump();
                units += 1;
            }
        }
        volume.abandon();
        let image = sim.power_cut(seed ^ 0x5A5A);
        let context = format!("seed {seed} (cut after {cut_after} units; rerun SNAP_SEEDS)");
        let reopened = open(
            Arc::new(SimBackend::from_image(image)),
            Background::Manual,
            &dir,
        );
        let snap = reopened
            .read_snapshot("s", 0, blocks_in_use * BLOCK_BYTES)
            .unwrap_or_else(|e| panic!("{context}: snapshot unreadable: {e}"));
        assert!(
            snap == at_point,
            "{context}: the snapshot no longer reads its point"
        );
        let now = reopened
            .read_blocking(0, blocks_in_use * BLOCK_BYTES)
            .unwrap();
        let changed = reopened
            .changed_blocks("s", None, 0, blocks_in_use)
            .unwrap();
        for block in 0..blocks_in_use {
            let range = (block * BLOCK_BYTES) as usize..((block + 1) * BLOCK_BYTES) as usize;
            if now[range.clone()] != at_point[range] {
                assert!(
                    changed.contains(&block),
                    "{context}: block {block} differs but is not listed"
                );
            }
        }
        // And the volume goes on, snapshot intact, after the crash.
        write(&reopened, 0, pattern(0xFF, 8));
        reopened.pump_until_idle(10_000);
        assert!(
            reopened
                .read_snapshot("s", 0, blocks_in_use * BLOCK_BYTES)
                .unwrap()
                == at_point,
            "{context}"
        );
        reopened.abandon();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Records on both sides of a snapshot's point waiting for the applier together: the
/// applier applies the older ones first, so the snapshot preserves the block as of
/// its point (not as of before the older records).
#[test]
fn records_on_both_sides_of_a_point_are_never_applied_in_one_batch() {
    let dir = tempdir("batch");
    let volume = open(fresh_store(), Background::Manual, &dir);
    volume.pump_until_idle(10_000);
    write(&volume, 5, pattern(0xA1, 2));
    volume.flush_blocking().unwrap();
    volume.create_snapshot("s", None, 1).unwrap();
    write(&volume, 5, pattern(0xB2, 2));
    volume.flush_blocking().unwrap();
    volume.pump_until_idle(10_000);
    assert!(
        volume
            .read_snapshot("s", 5 * BLOCK_BYTES, 2 * BLOCK_BYTES)
            .unwrap()
            == pattern(0xA1, 2),
        "bytes differ"
    );
    assert!(
        volume
            .read_blocking(5 * BLOCK_BYTES, 2 * BLOCK_BYTES)
            .unwrap()
            == pattern(0xB2, 2),
        "bytes differ"
    );
    assert_eq!(
        volume.changed_blocks("s", None, 0, 100).unwrap(),
        vec![5, 6]
    );
    volume.abandon();
    std::fs::remove_dir_all(&dir).unwrap();
}
