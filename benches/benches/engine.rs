//! Micro-benchmarks of the engine's hot paths. `cargo bench -p replicad-benches`
//! measures; `cargo test --benches` runs each once (CI) so they never rot.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::backend::{self, Backend, OpenOptions};
use engine::bitmap::Bitmap;
use engine::checksum::block_crc;
use engine::layout::MIN_JOURNAL_BYTES;
use engine::record::Record;
use engine::rng::SplitMix64;
use engine::volume::{create_image_file, CreateOptions, MetaStore};
use engine::{Volume, VolumeOptions, WriteKind, WriteRequest};

fn crc(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32");
    for size in [4096usize, 1 << 20] {
        let data = vec![0x5Au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &data, |b, data| {
            b.iter(|| block_crc(black_box(data)))
        });
    }
    group.finish();
}

fn record_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    for size in [4096usize, 1 << 20] {
        let data = Bytes::from(vec![0xA5u8; size]);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &data, |b, data| {
            b.iter(|| Record::write(black_box(7), 4096, data.clone(), false))
        });
        let record = Record::write(7, 4096, data.clone(), false);
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&record.encoded_header);
        wire.extend_from_slice(&record.data);
        let wire = wire.freeze();
        group.bench_with_input(BenchmarkId::new("parse", size), &wire, |b, wire| {
            b.iter(|| Record::parse(black_box(wire.clone())).is_ok())
        });
    }
    group.finish();
}

fn frame_codec(c: &mut Criterion) {
    use engine::wire::{self, Frame, RecordFrame};
    let mut group = c.benchmark_group("frame");
    for size in [4096usize, 1 << 20] {
        let record = Record::write(9, 0, Bytes::from(vec![0x3Cu8; size]), false);
        let frame = Frame::Record(RecordFrame(record));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(
            BenchmarkId::new("encode_record", size),
            &frame,
            |b, frame| b.iter(|| black_box(frame.encode())),
        );
        let wire_bytes = frame.encode_to_vec();
        group.bench_with_input(
            BenchmarkId::new("decode_record", size),
            &wire_bytes,
            |b, bytes| b.iter(|| wire::decode(black_box(bytes)).is_ok()),
        );
    }
    group.finish();
}

fn bitmap_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("bitmap");
    // 1 TiB volume worth of bits, 0.1% set in short runs.
    let bits = 1u64 << 28;
    let mut bitmap = Bitmap::new(bits);
    let mut rng = SplitMix64::new(1);
    for _ in 0..(bits / 1000 / 8) {
        bitmap.set_range(rng.below(bits), 8);
    }
    group.throughput(Throughput::Bytes(bits / 8));
    group.bench_function("scan_runs_1TiB_sparse", |b| {
        b.iter(|| {
            let mut from = 0;
            let mut runs = 0u64;
            while let Some((start, len)) = bitmap.next_run(from, 1 << 16) {
                runs += 1;
                from = start + len;
            }
            runs
        })
    });
    group.finish();
}

fn bench_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("replicad-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    dir
}

fn volume_paths(c: &mut Criterion) {
    let dir = bench_dir();
    let path = dir.join("store.img");
    create_image_file(&path, 256 << 20).expect("image");
    let store: Arc<dyn Backend> = backend::open(&path, OpenOptions::default()).expect("open");
    let create = CreateOptions {
        resource_uuid: [1; 16],
        node_id: 0,
        node_name: "bench".into(),
        journal_bytes: MIN_JOURNAL_BYTES * 64,
        force: true,
        assume_zeroed: true,
    };
    Volume::create(&store, &MetaStore::Internal, &create, &mut |_, _| {}).expect("create-md");
    let (volume, _) = Volume::open(store, MetaStore::Internal, None, VolumeOptions::default())
        .expect("open volume");
    let blocks = volume.size_bytes() / 4096;
    let mut group = c.benchmark_group("volume");
    group.throughput(Throughput::Bytes(4096));
    group.measurement_time(Duration::from_secs(3));
    let data = Bytes::from(vec![0x11u8; 4096]);
    let mut rng = SplitMix64::new(2);
    // Journal append: a 4 KiB write sequenced, group-committed and completed.
    group.bench_function("write_4k_journaled", |b| {
        b.iter(|| {
            let offset = rng.below(blocks) * 4096;
            volume
                .write_blocking(WriteRequest {
                    offset,
                    kind: WriteKind::Data(data.clone()),
                    fua: false,
                })
                .expect("write")
        })
    });
    // Overlay lookup: a read of a block written just before (not yet applied).
    group.bench_function("read_4k_overlay_or_store", |b| {
        b.iter(|| {
            let offset = rng.below(64) * 4096;
            volume.read_blocking(offset, 4096).expect("read")
        })
    });
    group.finish();
    volume.close().expect("close");
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(
    benches,
    crc,
    record_codec,
    frame_codec,
    bitmap_scan,
    volume_paths
);
criterion_main!(benches);
