//! Random 4 KiB writes through the engine (journaled, checksummed, applied in place)
//! at a queue depth, for comparison with `fio --ioengine=io_uring --direct=1` on the
//! same file. The clock stops only after everything is applied and checkpointed.
//!
//! usage: cargo run --release -p replicad-engine --example engine_randwrite -- FILE [SECONDS] [QD] [direct]

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use engine::backend::{self, Backend, OpenOptions};
use engine::rng::SplitMix64;
use engine::volume::{CreateOptions, MetaStore};
use engine::{Volume, VolumeOptions, WriteKind, WriteRequest};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(
        args.get(1)
            .expect("usage: engine_randwrite FILE [SECONDS] [QD] [direct]"),
    );
    let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    let queue_depth: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let direct = args.get(4).is_some_and(|s| s == "direct");
    let store: Arc<dyn Backend> = backend::open(
        &path,
        OpenOptions {
            direct,
            ..OpenOptions::default()
        },
    )
    .expect("open store");
    // As the daemon does: with O_DIRECT data, the journal and metadata go through a
    // second, buffered handle.
    let meta = if store.is_direct() {
        let handle = OpenOptions {
            kind: backend::BackendKind::Pread,
            direct: false,
        };
        MetaStore::InternalHandle(backend::open(&path, handle).expect("open metadata handle"))
    } else {
        MetaStore::Internal
    };
    let create = CreateOptions {
        resource_uuid: [3; 16],
        node_id: 0,
        node_name: "bench".into(),
        journal_bytes: 128 << 20,
        force: true,
        assume_zeroed: false,
    };
    Volume::create(&store, &meta, &create, &mut |_, _| {}).expect("create-md");
    let (volume, _) =
        Volume::open(store.clone(), meta, None, VolumeOptions::default()).expect("open");
    let blocks = volume.size_bytes() / 4096;
    let data = Bytes::from(vec![0x42u8; 4096]);
    let mut rng = SplitMix64::new(9);
    let (sender, receiver) = mpsc::channel();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut in_flight = 0;
    let mut done = 0u64;
    while Instant::now() < deadline {
        while in_flight < queue_depth {
            let sender = sender.clone();
            let offset = rng.below(blocks) * 4096;
            let request = WriteRequest {
                offset,
                kind: WriteKind::Data(data.clone()),
                fua: false,
            };
            volume
                .write(request, Box::new(move |r| drop(sender.send(r))))
                .expect("write");
            in_flight += 1;
        }
        receiver.recv().expect("completion").expect("write ok");
        in_flight -= 1;
        done += 1;
    }
    while in_flight > 0 {
        receiver.recv().expect("completion").expect("write ok");
        in_flight -= 1;
        done += 1;
    }
    let acked = start.elapsed();
    assert!(
        volume.checkpoint_blocking(Duration::from_secs(300)),
        "checkpoint"
    );
    let applied = start.elapsed();
    let stats = volume.stats();
    println!(
        "backend={} direct={} qd={} writes={} acked_iops={:.0} applied_iops={:.0} commits={} syncs={} checkpoints={}",
        store.kind(),
        store.is_direct(),
        queue_depth,
        done,
        done as f64 / acked.as_secs_f64(),
        done as f64 / applied.as_secs_f64(),
        stats.journal_commits,
        stats.journal_syncs,
        stats.checkpoints
    );
    volume.close().expect("close");
}
