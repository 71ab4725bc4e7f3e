//! Round trips, chain validation and damage, against an in-memory volume and a target
//! that records every write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::*;
use crate::checker::servers::TempDir;

const KIB: u64 = 1024;

/// A volume in memory.
#[derive(Clone)]
struct MemVolume(Arc<Vec<u8>>);

impl BackupSource for MemVolume {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    async fn read(&self, offset: u64, len: u32) -> anyhow::Result<Bytes> {
        let start = offset as usize;
        Ok(Bytes::copy_from_slice(&self.0[start..start + len as usize]))
    }
}

/// A source whose reads fail past `fail_from`.
#[derive(Clone)]
struct FailingVolume {
    inner: MemVolume,
    fail_from: u64,
}

impl BackupSource for FailingVolume {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    async fn read(&self, offset: u64, len: u32) -> anyhow::Result<Bytes> {
        anyhow::ensure!(offset < self.fail_from, "injected read error");
        self.inner.read(offset, len).await
    }
}

/// A target in memory that counts every request.
#[derive(Clone)]
struct RecordingTarget {
    image: Arc<Mutex<Vec<u8>>>,
    requests: Arc<AtomicU64>,
}

impl RecordingTarget {
    /// A target of `size` bytes of garbage, so that zero extents must really be written.
    fn new(size: u64) -> Self {
        RecordingTarget {
            image: Arc::new(Mutex::new(vec![0xEE; size as usize])),
            requests: Arc::new(AtomicU64::new(0)),
        }
    }
    fn image(&self) -> Vec<u8> {
        self.image.lock().expect("image lock").clone()
    }
    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
    fn put(&self, offset: u64, bytes: &[u8]) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut image = self.image.lock().expect("image lock");
        let start = offset as usize;
        image[start..start + bytes.len()].copy_from_slice(bytes);
    }
}

impl RestoreTarget for RecordingTarget {
    fn size(&self) -> u64 {
        self.image.lock().expect("image lock").len() as u64
    }
    async fn write(&self, offset: u64, data: Bytes) -> anyhow::Result<()> {
        assert!(data.len() as u64 <= u64::from(MAX_IO_BYTES));
        self.put(offset, &data);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> anyhow::Result<()> {
        assert!(len <= MAX_ZERO_BYTES);
        self.put(offset, &vec![0; len as usize]);
        Ok(())
    }
    async fn flush(&self) -> anyhow::Result<()> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// 3 MiB + 20 KiB (not a whole number of 1 MiB requests): data at the start, a zero
/// middle, data at the end.
fn volume_a() -> Vec<u8> {
    let size = 3 * 1024 * KIB + 20 * KIB;
    let mut volume = vec![0u8; size as usize];
    for (index, byte) in volume[..1200 * KIB as usize].iter_mut().enumerate() {
        *byte = (index % 251) as u8 + 1;
    }
    let tail = size as usize - 300 * KIB as usize;
    for (index, byte) in volume[tail..].iter_mut().enumerate() {
        *byte = (index % 13) as u8 + 7;
    }
    volume
}

/// Volume A changed: unaligned writes (in the data and in the zero middle), and a
/// range zeroed. Returns the volume and the changed byte ranges.
fn volume_b() -> (Vec<u8>, Vec<(u64, u64)>) {
    let mut volume = volume_a();
    let changes = [(5000u64, 3000u64, 0x42u8), (2000 * KIB + 100, 70_000, 0x99)];
    for (offset, length, fill) in changes {
        volume[offset as usize..(offset + length) as usize].fill(fill);
    }
    let zeroed = (256 * KIB, 512 * KIB);
    volume[zeroed.0 as usize..(zeroed.0 + zeroed.1) as usize].fill(0);
    // Out of order and overlapping on purpose.
    let ranges = vec![
        (2000 * KIB + 100, 70_000),
        zeroed,
        (5000, 3000),
        (300 * KIB, 10),
    ];
    (volume, ranges)
}

fn meta(volume_id: &str, bytes: u64, snapshot: &str, seq: u64) -> BackupMeta {
    BackupMeta {
        volume_id: volume_id.to_owned(),
        volume_bytes: bytes,
        snapshot: snapshot.to_owned(),
        snapshot_seq: seq,
        base: None,
        created_unix: 1_764_000_000,
    }
}

fn incremental(base: &BackupMeta, snapshot: &str, seq: u64) -> BackupMeta {
    BackupMeta {
        base: Some((base.snapshot.clone(), base.snapshot_seq)),
        ..meta(&base.volume_id, base.volume_bytes, snapshot, seq)
    }
}

/// Files of one test: a full backup of volume A and an incremental to volume B.
struct Fixture {
    dir: TempDir,
    full: PathBuf,
    incr: PathBuf,
    volume_a: Vec<u8>,
    volume_b: Vec<u8>,
}

async fn fixture() -> Fixture {
    let dir = TempDir::new("backup-test").expect("temp dir");
    let volume_a = volume_a();
    let (volume_b, ranges) = volume_b();
    let size = volume_a.len() as u64;
    let full = dir.path().join("backup.0");
    let incr = dir.path().join("backup.1");
    let full_meta = meta("vol-1", size, "nightly-0", 700);
    write_backup(
        MemVolume(Arc::new(volume_a.clone())),
        &full_meta,
        None,
        &full,
        |_, _| {},
    )
    .await
    .expect("full backup");
    write_backup(
        MemVolume(Arc::new(volume_b.clone())),
        &incremental(&full_meta, "nightly-1", 812),
        Some(&ranges),
        &incr,
        |_, _| {},
    )
    .await
    .expect("incremental backup");
    Fixture {
        dir,
        full,
        incr,
        volume_a,
        volume_b,
    }
}

#[tokio::test]
async fn full_and_incremental_backups_round_trip() {
    let f = fixture().await;
    let size = f.volume_a.len() as u64;

    let full = verify(&f.full).expect("verify full");
    assert_eq!(full.meta.snapshot, "nightly-0");
    assert_eq!(full.totals.data_blocks, (1200 + 300) * KIB / BLOCK_BYTES);
    assert_eq!(
        full.totals.data_blocks + full.totals.zero_blocks,
        size / BLOCK_BYTES
    );
    // The zero middle costs one record, not its 1.5 MiB.
    assert!(full.totals.file_bytes < 1600 * KIB, "{full:?}");
    let incr = verify(&f.incr).expect("verify incremental");
    // 5000+3000 → blocks 1..=1; 256 KiB..768 KiB; 300 KiB+10 inside it; 2000 KiB+100 → 18 blocks.
    assert_eq!(
        incr.totals.data_blocks + incr.totals.zero_blocks,
        1 + 128 + 18
    );
    assert_eq!(incr.totals.zero_blocks, 128);
    assert!(!f.dir.path().join("backup.1.tmp").exists());

    let target = RecordingTarget::new(size);
    let mut last = (0, 0);
    let mut verified = (0, 0);
    let summary = restore(
        std::slice::from_ref(&f.full),
        target.clone(),
        Some("vol-1"),
        |phase, done, total| match phase {
            RestorePhase::Verify => verified = (done, total),
            RestorePhase::Write => last = (done, total),
        },
    )
    .await
    .expect("restore full");
    assert!(target.image() == f.volume_a, "full restore differs");
    assert_eq!(last, (size, size));
    let file_bytes = full.totals.file_bytes;
    assert_eq!(verified, (file_bytes, file_bytes));
    assert_eq!(summary.data_bytes + summary.zero_bytes, size);
    assert_eq!(summary.snapshot, "nightly-0");

    let target = RecordingTarget::new(size);
    let summary = restore(
        &[f.full.clone(), f.incr.clone()],
        target.clone(),
        None,
        |_, _, _| {},
    )
    .await
    .expect("restore chain");
    assert!(target.image() == f.volume_b, "chain restore differs");
    assert_eq!(
        (summary.snapshot.as_str(), summary.snapshot_seq),
        ("nightly-1", 812)
    );
    assert_eq!(summary.files.len(), 2);
}

#[tokio::test]
async fn a_raw_file_target_restores_the_chain() {
    let f = fixture().await;
    let image = f.dir.path().join("target.img");
    std::fs::write(&image, vec![0x5a; f.volume_a.len()]).expect("image");
    let target = RawFileTarget::open(&image).expect("open target");
    restore(
        &[f.full.clone(), f.incr.clone()],
        target,
        None,
        |_, _, _| {},
    )
    .await
    .expect("restore");
    assert!(std::fs::read(&image).expect("read image") == f.volume_b);
}

/// Runs a restore that must be refused before writing anything; returns the error.
async fn refused(chain: &[&Path], target_bytes: u64, expected: Option<&str>) -> RestoreError {
    let target = RecordingTarget::new(target_bytes);
    let chain: Vec<PathBuf> = chain.iter().map(|path| path.to_path_buf()).collect();
    let outcome = restore(&chain, target.clone(), expected, |_, _, _| {}).await;
    assert_eq!(target.requests(), 0, "{chain:?} wrote to the target");
    assert!(target.image().iter().all(|&byte| byte == 0xEE));
    match outcome {
        Ok(summary) => panic!("{chain:?} restored: {summary:?}"),
        Err(error) => error,
    }
}

#[tokio::test]
async fn a_bad_chain_is_refused_with_nothing_written() {
    let f = fixture().await;
    let size = f.volume_a.len() as u64;
    let path = |name: &str| f.dir.path().join(name);
    let write = |name: &str, meta: BackupMeta, volume: &[u8], ranges: Option<Vec<(u64, u64)>>| {
        let to = path(name);
        let volume = volume.to_vec();
        async move {
            write_backup(
                MemVolume(Arc::new(volume)),
                &meta,
                ranges.as_deref(),
                &to,
                |_, _| {},
            )
            .await
            .expect("backup");
            to
        }
    };
    let full_meta = meta("vol-1", size, "nightly-0", 700);
    // Based on a snapshot the full backup is not.
    let stray = write(
        "stray",
        incremental(&meta("vol-1", size, "nightly-1", 812), "nightly-2", 900),
        &f.volume_b,
        Some(vec![(0, 4096)]),
    )
    .await;
    let other_volume = write(
        "other",
        meta("vol-2", size, "nightly-0", 700),
        &f.volume_a,
        None,
    )
    .await;
    let other_incr = write(
        "other-incr",
        incremental(&meta("vol-2", size, "nightly-0", 700), "nightly-1", 812),
        &f.volume_b,
        Some(vec![(0, 4096)]),
    )
    .await;
    let smaller = write(
        "smaller",
        incremental(
            &meta("vol-1", size - 4096, "nightly-0", 700),
            "nightly-1",
            812,
        ),
        &f.volume_b[..f.volume_b.len() - 4096],
        Some(vec![(0, 4096)]),
    )
    .await;
    let _ = full_meta;

    let error = refused(&[&f.full, &stray], size, None).await;
    assert!(matches!(error, RestoreError::WrongBase { .. }), "{error}");
    assert_eq!(
        error.to_string(),
        format!(
            "{} is an incremental of 'nightly-1' (seq 812) but the previous file {} is snapshot 'nightly-0' (seq 700)",
            stray.display(),
            f.full.display()
        )
    );
    let error = refused(&[&f.incr, &f.full], size, None).await;
    assert!(
        matches!(error, RestoreError::StartsWithIncremental { .. }),
        "{error}"
    );
    let error = refused(&[&f.full, &f.incr, &f.incr], size, None).await;
    assert!(matches!(error, RestoreError::WrongBase { .. }), "{error}");
    let error = refused(&[&f.full, &f.full], size, None).await;
    assert!(
        matches!(error, RestoreError::FullAfterFirst { .. }),
        "{error}"
    );
    let error = refused(&[&other_volume], size, Some("vol-1")).await;
    assert!(matches!(error, RestoreError::WrongVolume { .. }), "{error}");
    assert!(
        error
            .to_string()
            .ends_with("is a backup of volume 'vol-2', target is volume 'vol-1'"),
        "{error}"
    );
    let error = refused(&[&f.full, &other_incr], size, None).await;
    assert!(
        matches!(error, RestoreError::MixedVolumes { .. }),
        "{error}"
    );
    let error = refused(&[&f.full, &smaller], size, None).await;
    assert!(matches!(error, RestoreError::MixedSizes { .. }), "{error}");
    let error = refused(&[&f.full], size + 4096, None).await;
    assert!(matches!(error, RestoreError::TargetSize { .. }), "{error}");
    let error = refused(&[], size, None).await;
    assert!(matches!(error, RestoreError::EmptyChain), "{error}");
    let error = refused(&[&path("missing")], size, None).await;
    assert!(
        matches!(error, RestoreError::File(BackupError::Io { .. })),
        "{error}"
    );
}

#[tokio::test]
async fn a_damaged_or_truncated_file_anywhere_in_the_chain_writes_nothing() {
    let f = fixture().await;
    let size = f.volume_a.len() as u64;
    let bytes = std::fs::read(&f.incr).expect("read incremental");
    let damaged = f.dir.path().join("damaged");
    // A byte of the last data block of the incremental (its last extent is data).
    let mut copy = bytes.clone();
    let at = bytes.len() - format::TRAILER_BYTES - 10;
    copy[at] ^= 0x10;
    std::fs::write(&damaged, &copy).expect("write");
    let error = refused(&[&f.full, &damaged], size, None).await;
    assert!(
        matches!(error, RestoreError::File(BackupError::BlockCrc { .. })),
        "{error}"
    );
    assert!(
        error.to_string().contains("CRC mismatch at block"),
        "{error}"
    );
    for cut in [bytes.len() - 1, bytes.len() - format::TRAILER_BYTES, 200] {
        std::fs::write(&damaged, &bytes[..cut]).expect("write");
        let error = refused(&[&f.full, &damaged], size, None).await;
        assert!(
            matches!(error, RestoreError::File(BackupError::Truncated { .. })),
            "cut at {cut}: {error}"
        );
        assert!(verify(&damaged).is_err());
    }
}

#[tokio::test]
async fn a_failed_read_leaves_no_file_and_an_existing_file_is_not_overwritten() {
    let dir = TempDir::new("backup-test").expect("temp dir");
    let volume = MemVolume(Arc::new(volume_a()));
    let size = volume.size();
    let to = dir.path().join("b");
    let failing = FailingVolume {
        inner: volume.clone(),
        fail_from: 2 << 20,
    };
    let error = write_backup(failing, &meta("v", size, "s", 1), None, &to, |_, _| {})
        .await
        .expect_err("the source fails");
    assert!(
        matches!(error, BackupError::Source { offset, .. } if offset == 2 << 20),
        "{error}"
    );
    assert!(!to.exists() && !tmp_path(&to).exists());

    std::fs::write(&to, b"precious").expect("write");
    let error = write_backup(
        volume.clone(),
        &meta("v", size, "s", 1),
        None,
        &to,
        |_, _| {},
    )
    .await
    .expect_err("exists");
    assert!(matches!(error, BackupError::Exists { .. }), "{error}");
    assert_eq!(std::fs::read(&to).expect("read"), b"precious");

    let other = dir.path().join("c");
    let error = write_backup(
        volume.clone(),
        &meta("v", size + 4096, "s", 1),
        None,
        &other,
        |_, _| {},
    )
    .await
    .expect_err("size");
    assert!(matches!(error, BackupError::SourceSize { .. }), "{error}");
    let base = meta("v", size, "s", 1);
    let error = write_backup(volume.clone(), &base, Some(&[(0, 1)]), &other, |_, _| {})
        .await
        .expect_err("ranges without a base");
    assert!(matches!(error, BackupError::InvalidMeta { .. }), "{error}");
    let error = write_backup(
        volume,
        &incremental(&base, "t", 2),
        Some(&[(size - 10, 11)]),
        &other,
        |_, _| {},
    )
    .await
    .expect_err("range beyond the volume");
    assert!(
        matches!(error, BackupError::InvalidRanges { .. }),
        "{error}"
    );
    assert!(!other.exists());
}

#[tokio::test]
async fn an_empty_incremental_is_valid() {
    let dir = TempDir::new("backup-test").expect("temp dir");
    let volume = MemVolume(Arc::new(volume_a()));
    let base = meta("v", volume.size(), "s", 1);
    let to = dir.path().join("empty");
    let summary = write_backup(
        volume,
        &incremental(&base, "t", 2),
        Some(&[]),
        &to,
        |_, _| {},
    )
    .await
    .expect("backup");
    assert_eq!(summary.totals.extents, 0);
    assert_eq!(verify(&to).expect("verify"), summary);
}

#[test]
fn ranges_are_widened_to_blocks_sorted_and_merged() {
    let volume = 100 * BLOCK_BYTES;
    assert_eq!(
        block_ranges(
            &[(8192, 1), (4095, 2), (0, 0), (40960, 4096), (45056, 1)],
            volume
        ),
        Ok(vec![(0, 3), (10, 12)])
    );
    assert!(block_ranges(&[(volume, 1)], volume).is_err());
    assert!(block_ranges(&[(u64::MAX, 2)], volume).is_err());
    assert_eq!(
        block_ranges(&[(volume - 1, 1)], volume),
        Ok(vec![(99, 100)])
    );
}

mod model {
    //! A chain of random backups against a `Vec<u8>` model: after restoring every
    //! prefix of the chain, the target is the volume as it was at that snapshot.

    use proptest::prelude::*;

    use super::*;

    /// One write to the volume: byte offset (scaled to the volume), length, fill byte
    /// (0 makes all-zero blocks, stored as zero extents).
    type Write = (u64, u64, u8);

    fn check(blocks: u64, initial: &[Write], steps: &[Vec<Write>]) -> Result<(), TestCaseError> {
        let size = blocks * BLOCK_BYTES;
        let apply = |volume: &mut Vec<u8>, writes: &[Write]| -> Vec<(u64, u64)> {
            writes
                .iter()
                .map(|&(offset, length, fill)| {
                    let offset = offset % size;
                    let length = length.min(size - offset);
                    volume[offset as usize..(offset + length) as usize].fill(fill);
                    (offset, length)
                })
                .collect()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = TempDir::new("backup-model").expect("temp dir");
        let mut volume = vec![0u8; size as usize];
        apply(&mut volume, initial);
        let mut snapshots = vec![volume.clone()];
        let mut chain = vec![dir.path().join("backup.0")];
        let mut previous = meta("model", size, "snap-0", 10);
        runtime.block_on(async {
            write_backup(
                MemVolume(Arc::new(volume.clone())),
                &previous,
                None,
                &chain[0],
                |_, _| {},
            )
            .await
            .expect("full backup");
            for (index, writes) in steps.iter().enumerate() {
                let ranges = apply(&mut volume, writes);
                let next = incremental(
                    &previous,
                    &format!("snap-{}", index + 1),
                    10 + index as u64 + 1,
                );
                let to = dir.path().join(format!("backup.{}", index + 1));
                write_backup(
                    MemVolume(Arc::new(volume.clone())),
                    &next,
                    Some(&ranges),
                    &to,
                    |_, _| {},
                )
                .await
                .expect("incremental backup");
                chain.push(to);
                snapshots.push(volume.clone());
                previous = next;
            }
        });
        for (length, expected) in snapshots.iter().enumerate() {
            let target = RecordingTarget::new(size);
            let summary = runtime
                .block_on(restore(
                    &chain[..=length],
                    target.clone(),
                    Some("model"),
                    |_, _, _| {},
                ))
                .map_err(|error| TestCaseError::fail(error.to_string()))?;
            prop_assert_eq!(summary.files.len(), length + 1);
            prop_assert!(
                target.image() == *expected,
                "prefix of {} files differs",
                length + 1
            );
        }
        Ok(())
    }

    fn writes(max: usize) -> impl Strategy<Value = Vec<Write>> {
        proptest::collection::vec(
            (
                0u64..u64::MAX,
                prop_oneof![1u64..5000, 1u64..(2 << 20)],
                prop_oneof![Just(0u8), any::<u8>()],
            ),
            0..max,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn every_prefix_of_a_chain_restores_its_snapshot(
            blocks in 1u64..700,
            initial in writes(6),
            steps in proptest::collection::vec(writes(5), 0..4),
        ) {
            check(blocks, &initial, &steps)?;
        }
    }
}
