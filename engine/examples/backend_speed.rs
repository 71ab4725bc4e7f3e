//! A quick, criterion-free comparison of the storage backends.
//!
//! `cargo run --release -p replicad-engine --example backend_speed -- [DIR] [SIZE_MIB]`
//!
//! Creates a fully written image of SIZE_MIB (default 256) in DIR (default: the system
//! temp dir; use a real file system for O_DIRECT) and prints, per backend, buffered and
//! O_DIRECT: 4 KiB random writes and reads in batches of 32, 4 KiB random writes one at
//! a time (QD1), and QD1 writes from 4 threads at once. Numbers only; nothing asserted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::backend::file::FileBackend;
use engine::backend::uring::UringBackend;
use engine::backend::{AlignedBuf, Backend, ReadOp, WriteOp};
use engine::rng::SplitMix64;

const BLOCK_BYTES: usize = 4096;
const BATCH_OPS: usize = 32;
const BATCHED_OPS_TOTAL: usize = 32 * 1024;
const QD1_OPS_TOTAL: usize = 4096;
const THREADS: usize = 4;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map_or_else(std::env::temp_dir, PathBuf::from);
    let size_mib: u64 = args
        .next()
        .map_or(256, |arg| arg.parse().expect("SIZE_MIB"));
    let path = dir.join(format!("backend-speed-{}.img", std::process::id()));
    make_image(&path, size_mib << 20);
    println!(
        "{:<22} {:>14} {:>14} {:>12} {:>16}",
        "backend", "write QD32/s", "read QD32/s", "write QD1/s", "write QD1 x4 /s"
    );
    for direct in [false, true] {
        for uring in [false, true] {
            let backend: Arc<dyn Backend> = if uring {
                Arc::new(UringBackend::open(&path, direct).expect("open io_uring"))
            } else {
                Arc::new(FileBackend::open(&path, direct).expect("open pread"))
            };
            let name = format!(
                "{} {}",
                backend.kind(),
                if backend.is_direct() {
                    "O_DIRECT"
                } else {
                    "buffered"
                }
            );
            let write_batched = batched_writes(&*backend, 1);
            let read_batched = batched_reads(&*backend, 2);
            let write_qd1 = qd1_writes(&*backend, 3, QD1_OPS_TOTAL);
            let write_threads = threaded_qd1_writes(&backend);
            backend.flush().expect("flush");
            println!(
                "{name:<22} {:>14.0} {:>14.0} {:>12.0} {:>16.0}",
                write_batched, read_batched, write_qd1, write_threads
            );
        }
    }
    let _ = std::fs::remove_file(&path);
}

fn make_image(path: &Path, size_bytes: u64) {
    let mut file = std::fs::File::create(path).expect("create image");
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..size_bytes >> 20 {
        file.write_all(&chunk).expect("fill image");
    }
    file.sync_all().expect("sync image");
}

fn rate(ops: usize, elapsed: Duration) -> f64 {
    ops as f64 / elapsed.as_secs_f64()
}

fn random_offsets(backend: &dyn Backend, seed: u64, count: usize) -> Vec<u64> {
    let blocks = backend.size_bytes() / BLOCK_BYTES as u64;
    let mut rng = SplitMix64::new(seed);
    (0..count)
        .map(|_| rng.below(blocks) * BLOCK_BYTES as u64)
        .collect()
}

/// Random 4 KiB writes in batches; the offsets of one batch are distinct.
fn batched_writes(backend: &dyn Backend, seed: u64) -> f64 {
    let data = AlignedBuf::zeroed(BLOCK_BYTES * BATCH_OPS, 4096);
    let mut offsets = random_offsets(backend, seed, BATCHED_OPS_TOTAL);
    let start = Instant::now();
    for batch in offsets.chunks_mut(BATCH_OPS) {
        batch.sort_unstable();
        let mut previous = None;
        let ops: Vec<WriteOp<'_>> = batch
            .iter()
            .filter(|&&offset| previous.replace(offset) != Some(offset))
            .zip(data.chunks(BLOCK_BYTES))
            .map(|(&offset, buf)| WriteOp { offset, buf })
            .collect();
        backend.write_many(&ops).expect("write batch");
    }
    rate(BATCHED_OPS_TOTAL, start.elapsed())
}

fn batched_reads(backend: &dyn Backend, seed: u64) -> f64 {
    let mut data = AlignedBuf::zeroed(BLOCK_BYTES * BATCH_OPS, 4096);
    let offsets = random_offsets(backend, seed, BATCHED_OPS_TOTAL);
    let start = Instant::now();
    for batch in offsets.chunks(BATCH_OPS) {
        let mut ops: Vec<ReadOp<'_>> = batch
            .iter()
            .zip(data.chunks_mut(BLOCK_BYTES))
            .map(|(&offset, buf)| ReadOp { offset, buf })
            .collect();
        backend.read_many(&mut ops).expect("read batch");
    }
    rate(BATCHED_OPS_TOTAL, start.elapsed())
}

fn qd1_writes(backend: &dyn Backend, seed: u64, count: usize) -> f64 {
    let data = AlignedBuf::zeroed(BLOCK_BYTES, 4096);
    let offsets = random_offsets(backend, seed, count);
    let start = Instant::now();
    for &offset in &offsets {
        backend.write_at(offset, &data).expect("write");
    }
    rate(count, start.elapsed())
}

fn threaded_qd1_writes(backend: &Arc<dyn Backend>) -> f64 {
    let per_thread = QD1_OPS_TOTAL / THREADS;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let backend = &**backend;
            scope.spawn(move || qd1_writes(backend, 10 + thread as u64, per_thread));
        }
    });
    rate(per_thread * THREADS, start.elapsed())
}
