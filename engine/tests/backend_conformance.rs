//! One conformance suite, run against every storage backend.
//!
//! Each backend configuration ("subject") gets a module of the same tests, so a failure
//! names the backend that broke: `uring_direct_image::scattered_batches_round_trip`.
//! Subjects: `pread` and `io_uring`, buffered and O_DIRECT, on an image file and (when
//! running as root) on a loop device over an image file; and the in-memory `sim`.
//!
//! Every check keeps a `Vec<u8>` model of the store and compares the whole store with it
//! at the end, so a write that lands in the wrong place fails too, not only a write that
//! does not land.
//!
//! Images live in the target directory (`CARGO_TARGET_TMPDIR`): O_DIRECT needs a real
//! file system, and the system temp dir may be tmpfs, which refuses it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use engine::backend::file::FileBackend;
use engine::backend::sim::SimBackend;
use engine::backend::uring::UringBackend;
use engine::backend::{AlignedBuf, Backend, BackendError, ReadOp, WriteOp};
use engine::rng::SplitMix64;

const STORE_BYTES: u64 = 8 << 20;
const BLOCK_BYTES: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Implementation {
    Pread,
    Uring,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Medium {
    ImageFile,
    LoopDevice,
}

#[derive(Debug, Clone, Copy)]
enum Subject {
    Sim,
    Store {
        implementation: Implementation,
        direct: bool,
        medium: Medium,
    },
}

impl Subject {
    const fn store(implementation: Implementation, direct: bool, medium: Medium) -> Subject {
        Subject::Store {
            implementation,
            direct,
            medium,
        }
    }
}

/// A loop device over an image file, detached on drop (also when a check panics).
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(image: &Path) -> LoopDevice {
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .expect("run losetup");
        assert!(
            output.status.success(),
            "losetup --find --show failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let path = String::from_utf8(output.stdout).expect("losetup prints a path");
        LoopDevice {
            path: PathBuf::from(path.trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let detached = Command::new("losetup").arg("-d").arg(&self.path).status();
        if !detached.is_ok_and(|status| status.success()) {
            eprintln!("could not detach {}", self.path.display());
        }
    }
}

/// A store under test and how to (re)open it. Removes its files on drop.
struct Fixture {
    subject: Subject,
    // Declared before `dir` so the device is detached before its image is removed.
    device: Option<LoopDevice>,
    dir: Option<PathBuf>,
    /// The path backends open: the image, or the loop device over it.
    path: Option<PathBuf>,
    /// The in-memory store of a `Sim` subject (so a "reopen" can keep its durable image).
    sim: Mutex<Option<Arc<SimBackend>>>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Fixture {
    /// Sets up the store; `None` when this machine cannot host the subject (loop devices
    /// need root), which the check reports and then passes.
    fn new(subject: Subject, test: &str) -> Option<Fixture> {
        let Subject::Store { medium, .. } = subject else {
            return Some(Fixture {
                subject,
                device: None,
                dir: None,
                path: None,
                sim: Mutex::new(None),
            });
        };
        if medium == Medium::LoopDevice && !is_root() {
            eprintln!("{test}: skipped, loop devices need root");
            return None;
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{}-{}",
            test.replace("::", "-"),
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("store.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(STORE_BYTES)
            .unwrap();
        let device = (medium == Medium::LoopDevice).then(|| LoopDevice::attach(&image));
        let path = device.as_ref().map_or(image, |device| device.path.clone());
        Some(Fixture {
            subject,
            device,
            dir: Some(dir),
            path: Some(path),
            sim: Mutex::new(None),
        })
    }

    fn open(&self) -> Arc<dyn Backend> {
        match self.subject {
            Subject::Sim => {
                let mut sim = self.sim.lock().unwrap();
                let backend = match sim.take() {
                    // Reopening after a clean shutdown sees what was made durable.
                    Some(old) => Arc::new(SimBackend::from_image(old.durable_image())),
                    None => Arc::new(SimBackend::new(STORE_BYTES)),
                };
                *sim = Some(backend.clone());
                backend
            }
            Subject::Store {
                implementation,
                direct,
                ..
            } => {
                let path = self.path.as_deref().unwrap();
                let backend: Arc<dyn Backend> = match implementation {
                    Implementation::Pread => Arc::new(FileBackend::open(path, direct).unwrap()),
                    Implementation::Uring => Arc::new(UringBackend::open(path, direct).unwrap()),
                };
                backend
            }
        }
    }

    /// Closes `backend` (the caller must hold no other reference) and opens the store again.
    fn reopen(&self, backend: Arc<dyn Backend>) -> Arc<dyn Backend> {
        if matches!(self.subject, Subject::Store { .. }) {
            assert_eq!(Arc::strong_count(&backend), 1, "backend still shared");
        }
        drop(backend);
        self.open()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.device.take();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Sets up `subject` for the test named `test`, runs `check` on a fresh backend.
fn run(subject: Subject, test: &str, check: fn(&Fixture, Arc<dyn Backend>)) {
    let Some(fixture) = Fixture::new(subject, test) else {
        return;
    };
    let backend = fixture.open();
    check(&fixture, backend);
}

// ---------------------------------------------------------------------------------------
// Helpers

fn random_bytes(rng: &mut SplitMix64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes);
    bytes
}

/// A zeroed buffer of `len` bytes whose address is one past an aligned address, so it
/// is misaligned for every alignment above 1.
struct Misaligned {
    storage: AlignedBuf,
    len: usize,
}

impl Misaligned {
    fn new(len: usize) -> Misaligned {
        Misaligned {
            storage: AlignedBuf::zeroed(len + 1, 4096),
            len,
        }
    }
    fn copy_of(data: &[u8]) -> Misaligned {
        let mut buf = Misaligned::new(data.len());
        buf.as_mut().copy_from_slice(data);
        buf
    }
    fn as_ref(&self) -> &[u8] {
        &self.storage[1..1 + self.len]
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[1..1 + self.len]
    }
}

/// Reads the whole store and compares it with `model`, naming the first bad offset.
fn assert_store_matches(backend: &dyn Backend, model: &[u8]) {
    assert_eq!(backend.size_bytes(), model.len() as u64);
    let chunk_bytes = 1 << 20;
    let mut chunk = vec![0u8; chunk_bytes];
    for (index, expected) in model.chunks(chunk_bytes).enumerate() {
        let offset = (index * chunk_bytes) as u64;
        let chunk = &mut chunk[..expected.len()];
        backend.read_at(offset, chunk).unwrap();
        if let Some(position) = chunk.iter().zip(expected).position(|(a, b)| a != b) {
            panic!(
                "store differs from the model at byte {}: {:#04x}, expected {:#04x}",
                offset + position as u64,
                chunk[position],
                expected[position]
            );
        }
    }
}

fn write_model(model: &mut [u8], offset: u64, data: &[u8]) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

/// Writes random 4 KiB blocks, as one batch, to the blocks numbered `blocks` of the
/// region that starts at `region_offset`; `model` mirrors that region.
fn write_random_blocks(
    backend: &dyn Backend,
    rng: &mut SplitMix64,
    blocks: &[u64],
    region_offset: u64,
    model: &mut [u8],
) {
    let data: Vec<Vec<u8>> = blocks
        .iter()
        .map(|_| random_bytes(rng, BLOCK_BYTES as usize))
        .collect();
    let ops: Vec<WriteOp<'_>> = blocks
        .iter()
        .zip(&data)
        .map(|(&block, buf)| WriteOp {
            offset: region_offset + block * BLOCK_BYTES,
            buf,
        })
        .collect();
    backend.write_many(&ops).unwrap();
    for (&block, buf) in blocks.iter().zip(&data) {
        write_model(model, block * BLOCK_BYTES, buf);
    }
}

/// Reads `(offset, len)` segments as one batch and compares each with `model`.
fn assert_batch_read_matches(backend: &dyn Backend, segments: &[(u64, usize)], model: &[u8]) {
    let mut back: Vec<Vec<u8>> = segments.iter().map(|&(_, len)| vec![0u8; len]).collect();
    let mut reads: Vec<ReadOp<'_>> = segments
        .iter()
        .zip(back.iter_mut())
        .map(|(&(offset, _), buf)| ReadOp { offset, buf })
        .collect();
    backend.read_many(&mut reads).unwrap();
    for read in &reads {
        let start = read.offset as usize;
        assert!(
            read.buf[..] == model[start..start + read.buf.len()],
            "{} bytes at {start} read back wrong",
            read.buf.len()
        );
    }
}

/// Cuts `[0, STORE_BYTES)` into runs of 1..=16 units of `unit` bytes, in random order.
fn random_segments(rng: &mut SplitMix64, unit: u64) -> Vec<(u64, usize)> {
    let mut segments = Vec::new();
    let mut offset = 0;
    while offset < STORE_BYTES {
        let len = ((1 + rng.below(16)) * unit).min(STORE_BYTES - offset);
        segments.push((offset, len as usize));
        offset += len;
    }
    shuffle(rng, &mut segments);
    segments
}

fn shuffle<T>(rng: &mut SplitMix64, items: &mut [T]) {
    for index in (1..items.len()).rev() {
        let other = rng.below(index as u64 + 1) as usize;
        items.swap(index, other);
    }
}

fn assert_out_of_range(result: Result<(), BackendError>, what: &str) {
    match result {
        Err(error @ BackendError::OutOfRange { .. }) => assert_eq!(error.errno(), libc::EINVAL),
        other => panic!("{what}: expected OutOfRange, got {other:?}"),
    }
}

fn assert_unaligned(result: Result<(), BackendError>, what: &str) {
    match result {
        Err(error @ BackendError::Unaligned { .. }) => assert_eq!(error.errno(), libc::EINVAL),
        other => panic!("{what}: expected Unaligned, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Checks

fn reports_size_and_geometry(fixture: &Fixture, backend: Arc<dyn Backend>) {
    assert_eq!(backend.size_bytes(), STORE_BYTES);
    let alignment = backend.alignment();
    assert!(
        alignment.is_power_of_two() && alignment <= 4096,
        "{alignment}"
    );
    assert_eq!(backend.size_bytes() % alignment as u64, 0);
    match fixture.subject {
        Subject::Sim => assert_eq!(backend.kind(), "sim"),
        Subject::Store {
            implementation,
            direct,
            ..
        } => {
            let kind = match implementation {
                Implementation::Pread => "pread",
                Implementation::Uring => "io_uring",
            };
            assert_eq!(backend.kind(), kind);
            // The target directory is on a real file system, so O_DIRECT is granted.
            assert_eq!(backend.is_direct(), direct, "O_DIRECT in effect");
            assert_eq!(alignment > 1, direct, "alignment {alignment}");
        }
    }
}

fn round_trips_at_aligned_offsets(_: &Fixture, backend: Arc<dyn Backend>) {
    let a = backend.alignment() as u64;
    let mut cases = vec![
        (0, a),
        (a, a),
        (BLOCK_BYTES, 3 * BLOCK_BYTES),
        ((1 << 20) + a, BLOCK_BYTES + a),
        (STORE_BYTES / 2 - BLOCK_BYTES, 2 * BLOCK_BYTES),
        (2 << 20, 2 << 20),
        (STORE_BYTES - 2 * BLOCK_BYTES, BLOCK_BYTES),
        (STORE_BYTES - BLOCK_BYTES, BLOCK_BYTES),
        (STORE_BYTES - a, a),
    ];
    if a == 1 {
        cases.extend([(4097, 1), (12_345, 777), (STORE_BYTES - 3, 3)]);
    }
    let mut rng = SplitMix64::new(1);
    let mut model = vec![0u8; STORE_BYTES as usize];
    for &(offset, len) in &cases {
        let data = random_bytes(&mut rng, len as usize);
        backend.write_at(offset, &data).unwrap();
        write_model(&mut model, offset, &data);
        let mut back = vec![0u8; len as usize];
        backend.read_at(offset, &mut back).unwrap();
        assert!(back == data, "{len} bytes at {offset} did not round-trip");
    }
    assert_store_matches(&*backend, &model);
}

fn scattered_batches_round_trip(_: &Fixture, backend: Arc<dyn Backend>) {
    let mut rng = SplitMix64::new(2);
    let mut model = vec![0u8; STORE_BYTES as usize];

    // 1000 single-block writes to distinct random blocks: far more than a ring holds.
    let mut blocks: Vec<u64> = (0..STORE_BYTES / BLOCK_BYTES).collect();
    shuffle(&mut rng, &mut blocks);
    blocks.truncate(1000);
    write_random_blocks(&*backend, &mut rng, &blocks, 0, &mut model);
    shuffle(&mut rng, &mut blocks);
    let segments: Vec<(u64, usize)> = blocks
        .iter()
        .map(|&block| (block * BLOCK_BYTES, BLOCK_BYTES as usize))
        .collect();
    assert_batch_read_matches(&*backend, &segments, &model);

    // The whole store as writes of mixed sizes in random order, read back cut differently.
    let unit = (backend.alignment() as u64).max(512);
    let segments = random_segments(&mut rng, unit);
    let data: Vec<Vec<u8>> = segments
        .iter()
        .map(|&(_, len)| random_bytes(&mut rng, len))
        .collect();
    let ops: Vec<WriteOp<'_>> = segments
        .iter()
        .zip(&data)
        .map(|(&(offset, _), buf)| WriteOp { offset, buf })
        .collect();
    backend.write_many(&ops).unwrap();
    for op in &ops {
        write_model(&mut model, op.offset, op.buf);
    }
    let segments = random_segments(&mut rng, unit);
    assert_batch_read_matches(&*backend, &segments, &model);
    assert_store_matches(&*backend, &model);
}

fn unaligned_memory_round_trips(_: &Fixture, backend: Arc<dyn Backend>) {
    let mut rng = SplitMix64::new(3);
    let mut model = vec![0u8; STORE_BYTES as usize];
    let a = backend.alignment() as u64;

    // Single calls, including one longer than a bounce piece.
    for &(offset, len) in &[(0, BLOCK_BYTES), (a, 3 * a), (1 << 20, 1 << 20)] {
        let data = Misaligned::copy_of(&random_bytes(&mut rng, len as usize));
        backend.write_at(offset, data.as_ref()).unwrap();
        write_model(&mut model, offset, data.as_ref());
        let mut back = Misaligned::new(len as usize);
        backend.read_at(offset, back.as_mut()).unwrap();
        assert!(back.as_ref() == data.as_ref(), "{len} bytes at {offset}");
    }

    // A batch of 300 misaligned buffers, aligned and misaligned mixed.
    let offsets: Vec<u64> = (0..300)
        .map(|index| (4 << 20) + index * BLOCK_BYTES)
        .collect();
    let data: Vec<Misaligned> = offsets
        .iter()
        .map(|_| Misaligned::copy_of(&random_bytes(&mut rng, BLOCK_BYTES as usize)))
        .collect();
    let ops: Vec<WriteOp<'_>> = offsets
        .iter()
        .zip(&data)
        .map(|(&offset, buf)| WriteOp {
            offset,
            buf: buf.as_ref(),
        })
        .collect();
    backend.write_many(&ops).unwrap();
    for op in &ops {
        write_model(&mut model, op.offset, op.buf);
    }
    let mut back: Vec<Misaligned> = offsets
        .iter()
        .map(|_| Misaligned::new(BLOCK_BYTES as usize))
        .collect();
    let mut reads: Vec<ReadOp<'_>> = offsets
        .iter()
        .zip(back.iter_mut())
        .map(|(&offset, buf)| ReadOp {
            offset,
            buf: buf.as_mut(),
        })
        .collect();
    backend.read_many(&mut reads).unwrap();
    for read in &reads {
        let start = read.offset as usize;
        assert!(read.buf[..] == model[start..start + read.buf.len()]);
    }
    assert_store_matches(&*backend, &model);
}

fn rejects_bad_ranges_and_writes_nothing(_: &Fixture, backend: Arc<dyn Backend>) {
    let size = backend.size_bytes();
    let a = backend.alignment() as u64;
    let block = vec![0xAAu8; BLOCK_BYTES as usize];
    let mut back = vec![0u8; BLOCK_BYTES as usize];

    for (offset, what) in [
        (size, "at the end"),
        (size - BLOCK_BYTES / 2, "across the end"),
        (size + BLOCK_BYTES, "past the end"),
        (u64::MAX - BLOCK_BYTES + 1, "overflowing"),
        (u64::MAX - a + 1, "at u64::MAX"),
    ] {
        // Under O_DIRECT some of these offsets are also unaligned; the range check comes first.
        assert_out_of_range(backend.write_at(offset, &block), &format!("write {what}"));
        assert_out_of_range(backend.read_at(offset, &mut back), &format!("read {what}"));
        assert_out_of_range(
            backend.write_zeroes(offset, BLOCK_BYTES),
            &format!("write_zeroes {what}"),
        );
    }
    assert_out_of_range(backend.write_zeroes(0, size + a), "write_zeroes too long");
    assert_out_of_range(
        backend.write_zeroes(size - (2 << 20), 4 << 20),
        "write_zeroes longer than one chunk across the end",
    );

    // A batch with one bad op fails as a whole, and its good ops are not written.
    let good = WriteOp {
        offset: 0,
        buf: &block,
    };
    let past_end = WriteOp {
        offset: size,
        buf: &block,
    };
    assert_out_of_range(
        backend.write_many(&[good, past_end]),
        "batch with one op past the end",
    );
    let mut reads = [ReadOp {
        offset: size,
        buf: &mut back,
    }];
    assert_out_of_range(backend.read_many(&mut reads), "read batch past the end");

    if a > 1 {
        let half = a / 2;
        let sector = vec![0xAAu8; a as usize];
        let mut sector_back = vec![0u8; a as usize];
        assert_unaligned(backend.write_at(half, &sector), "write at unaligned offset");
        assert_unaligned(
            backend.write_at(0, &sector[1..]),
            "write of unaligned length",
        );
        assert_unaligned(
            backend.read_at(half, &mut sector_back),
            "read at unaligned offset",
        );
        assert_unaligned(
            backend.read_at(0, &mut sector_back[1..]),
            "read of unaligned length",
        );
        assert_unaligned(backend.write_zeroes(half, a), "write_zeroes unaligned");
        let unaligned = WriteOp {
            offset: a + half,
            buf: &sector,
        };
        assert_unaligned(
            backend.write_many(&[good, unaligned]),
            "batch with one unaligned op",
        );
    }
    assert_store_matches(&*backend, &vec![0u8; size as usize]);
}

fn zero_length_io_succeeds(_: &Fixture, backend: Arc<dyn Backend>) {
    let size = backend.size_bytes();
    let a = backend.alignment() as u64;
    for offset in [0, a, size] {
        backend.write_at(offset, &[]).unwrap();
        backend.read_at(offset, &mut []).unwrap();
        backend.write_zeroes(offset, 0).unwrap();
    }
    // Even an empty op must start inside the store.
    assert_out_of_range(backend.write_at(size + a, &[]), "empty write past the end");
    assert_out_of_range(
        backend.read_at(size + a, &mut []),
        "empty read past the end",
    );
    backend.write_many(&[]).unwrap();
    backend.read_many(&mut []).unwrap();

    // Empty ops mixed into a batch change nothing else.
    let data = vec![0x5Au8; BLOCK_BYTES as usize];
    let ops = [
        WriteOp {
            offset: 0,
            buf: &[],
        },
        WriteOp {
            offset: BLOCK_BYTES,
            buf: &data,
        },
        WriteOp {
            offset: size,
            buf: &[],
        },
    ];
    backend.write_many(&ops).unwrap();
    let mut model = vec![0u8; size as usize];
    write_model(&mut model, BLOCK_BYTES, &data);
    let mut back = vec![0u8; BLOCK_BYTES as usize];
    let mut reads = [
        ReadOp {
            offset: 0,
            buf: &mut [],
        },
        ReadOp {
            offset: BLOCK_BYTES,
            buf: &mut back,
        },
    ];
    backend.read_many(&mut reads).unwrap();
    assert!(back == data);
    assert_store_matches(&*backend, &model);
}

fn write_zeroes_reads_back_zeroes(_: &Fixture, backend: Arc<dyn Backend>) {
    let mut rng = SplitMix64::new(4);
    let model_data = random_bytes(&mut rng, STORE_BYTES as usize);
    let ops: Vec<WriteOp<'_>> = model_data
        .chunks(1 << 20)
        .enumerate()
        .map(|(index, buf)| WriteOp {
            offset: (index as u64) << 20,
            buf,
        })
        .collect();
    backend.write_many(&ops).unwrap();
    let mut model = model_data.clone();
    let a = backend.alignment() as u64;
    // Small, unaligned to 4 KiB where allowed, longer than one fallback chunk, the tail.
    for (offset, len) in [
        (a, a),
        (BLOCK_BYTES, (3 << 20) + 2 * BLOCK_BYTES),
        (5 << 20, BLOCK_BYTES),
        (STORE_BYTES - BLOCK_BYTES, BLOCK_BYTES),
    ] {
        backend.write_zeroes(offset, len).unwrap();
        model[offset as usize..(offset + len) as usize].fill(0);
    }
    assert_store_matches(&*backend, &model);
}

/// `is_hole` may say "not known" anywhere, but never calls written data a hole, and
/// what it calls a hole reads as zeroes.
fn holes_read_as_zeroes(_: &Fixture, backend: Arc<dyn Backend>) {
    let data = vec![0x5Au8; BLOCK_BYTES as usize];
    backend.write_at(1 << 20, &data).unwrap();
    backend.flush().unwrap();
    assert!(!backend.is_hole(1 << 20, BLOCK_BYTES));
    assert!(!backend.is_hole(0, STORE_BYTES));
    for (offset, len) in [
        (0, 1 << 20),
        (2 << 20, 1 << 20),
        (STORE_BYTES - BLOCK_BYTES, BLOCK_BYTES),
    ] {
        if backend.is_hole(offset, len) {
            let mut buf = vec![0xFFu8; len as usize];
            backend.read_at(offset, &mut buf).unwrap();
            assert!(
                buf.iter().all(|&b| b == 0),
                "a hole at {offset}+{len} is not zero"
            );
        }
    }
}

fn flush_succeeds(_: &Fixture, backend: Arc<dyn Backend>) {
    backend.flush().unwrap();
    let data = vec![0xC3u8; BLOCK_BYTES as usize];
    backend.write_at(BLOCK_BYTES, &data).unwrap();
    backend.flush().unwrap();
    backend.flush().unwrap();
    let mut model = vec![0u8; STORE_BYTES as usize];
    write_model(&mut model, BLOCK_BYTES, &data);
    assert_store_matches(&*backend, &model);
}

fn data_survives_reopen(fixture: &Fixture, backend: Arc<dyn Backend>) {
    let mut rng = SplitMix64::new(5);
    let mut model = vec![0u8; STORE_BYTES as usize];
    for offset in [0, 3 << 20, STORE_BYTES - BLOCK_BYTES] {
        let data = random_bytes(&mut rng, 2 * BLOCK_BYTES as usize);
        let offset = offset.min(STORE_BYTES - data.len() as u64);
        backend.write_at(offset, &data).unwrap();
        write_model(&mut model, offset, &data);
    }
    backend.write_zeroes(3 << 20, BLOCK_BYTES).unwrap();
    write_model(&mut model, 3 << 20, &[0; BLOCK_BYTES as usize]);
    backend.flush().unwrap();
    let backend = fixture.reopen(backend);
    assert_eq!(backend.size_bytes(), STORE_BYTES);
    assert_store_matches(&*backend, &model);
}

fn concurrent_callers_see_their_own_data(_: &Fixture, backend: Arc<dyn Backend>) {
    const THREADS: u64 = 4;
    const ROUNDS: u64 = 20;
    const BLOCKS_PER_BATCH: usize = 24;
    let region_bytes = STORE_BYTES / THREADS;
    let models: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let backend = &backend;
                scope.spawn(move || {
                    let mut rng = SplitMix64::new(100 + thread);
                    let base = thread * region_bytes;
                    let mut model = vec![0u8; region_bytes as usize];
                    let mut blocks: Vec<u64> = (0..region_bytes / BLOCK_BYTES).collect();
                    for round in 0..ROUNDS {
                        shuffle(&mut rng, &mut blocks);
                        let chosen = &blocks[..BLOCKS_PER_BATCH];
                        write_random_blocks(&**backend, &mut rng, chosen, base, &mut model);
                        let mut back = vec![0u8; BLOCK_BYTES as usize];
                        for &block in chosen {
                            backend
                                .read_at(base + block * BLOCK_BYTES, &mut back)
                                .unwrap();
                            let start = (block * BLOCK_BYTES) as usize;
                            assert!(
                                back[..] == model[start..start + back.len()],
                                "thread {thread} round {round}: block {block}"
                            );
                        }
                        if round % 5 == 0 {
                            backend.flush().unwrap();
                        }
                    }
                    model
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().unwrap())
            .collect()
    });
    assert_store_matches(&*backend, &models.concat());
}

// ---------------------------------------------------------------------------------------
// One module per subject, one test per check.

macro_rules! conformance_tests {
    ($subject:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                let test = concat!(module_path!(), "::", stringify!($check));
                super::run($subject, test, super::$check);
            }
        )*
    };
}

macro_rules! subjects {
    ($($name:ident => $subject:expr),* $(,)?) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::{Implementation::*, Medium::*, Subject};
                conformance_tests!(
                    $subject;
                    reports_size_and_geometry,
                    round_trips_at_aligned_offsets,
                    scattered_batches_round_trip,
                    unaligned_memory_round_trips,
                    rejects_bad_ranges_and_writes_nothing,
                    zero_length_io_succeeds,
                    write_zeroes_reads_back_zeroes,
                    holes_read_as_zeroes,
                    flush_succeeds,
                    data_survives_reopen,
                    concurrent_callers_see_their_own_data,
                );
            }
        )*
    };
}

subjects! {
    sim => Subject::Sim,
    pread_buffered_image => Subject::store(Pread, false, ImageFile),
    pread_direct_image => Subject::store(Pread, true, ImageFile),
    uring_buffered_image => Subject::store(Uring, false, ImageFile),
    uring_direct_image => Subject::store(Uring, true, ImageFile),
    pread_buffered_loop => Subject::store(Pread, false, LoopDevice),
    pread_direct_loop => Subject::store(Pread, true, LoopDevice),
    uring_buffered_loop => Subject::store(Uring, false, LoopDevice),
    uring_direct_loop => Subject::store(Uring, true, LoopDevice),
}
