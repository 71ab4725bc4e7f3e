//! Manual mode starts no thread: the process's threads are counted in
//! `/proc/self/task` around `open`, a workload and `close`. Alone in its test binary,
//! so no other test's threads come and go while it counts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use engine::backend::sim::SimBackend;
use engine::backend::Backend;
use engine::layout::MIN_JOURNAL_BYTES;
use engine::volume::{Background, CreateOptions, MetaStore};
use engine::{Volume, VolumeOptions, WriteKind, WriteRequest, BLOCK_BYTES};

const UUID: [u8; 16] = *b"manual-no-thread";

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

fn open(sim: &Arc<SimBackend>, background: Background) -> Volume {
    let options = VolumeOptions {
        background,
        ..VolumeOptions::default()
    };
    Volume::open(sim.clone(), MetaStore::Internal, Some(UUID), options)
        .expect("open")
        .0
}

#[test]
fn manual_mode_starts_no_thread() {
    let sim = Arc::new(SimBackend::new(8 << 20));
    let backend: Arc<dyn Backend> = sim.clone();
    let create = CreateOptions {
        resource_uuid: UUID,
        node_id: 0,
        node_name: "alpha".into(),
        journal_bytes: MIN_JOURNAL_BYTES,
        force: false,
        assume_zeroed: true,
    };
    Volume::create(&backend, &MetaStore::Internal, &create, &mut |_, _| {}).expect("create-md");
    let before = threads();

    let volume = open(&sim, Background::Manual);
    assert_eq!(threads(), before, "open started a thread");
    for block in 0..200u64 {
        let request = WriteRequest {
            offset: block * BLOCK_BYTES,
            kind: WriteKind::Data(Bytes::from(vec![block as u8; 8192])),
            fua: block % 7 == 0,
        };
        if block % 2 == 0 {
            volume.write(request, Box::new(|_| {})).expect("write");
        } else {
            volume
                .write_deferred(request, Box::new(|_| {}))
                .expect("write");
        }
        volume.read(block * BLOCK_BYTES, 100, Box::new(|_| {}));
        if block % 10 == 0 {
            volume.flush(Box::new(|_| {}));
            volume.pump();
        }
    }
    assert!(volume.checkpoint_blocking(Duration::from_secs(10)));
    assert_eq!(threads(), before, "the workload started a thread");
    volume.close().expect("close");
    drop(volume);
    assert_eq!(threads(), before);

    // The count does see engine threads: threaded mode starts some and joins them.
    let volume = open(&sim, Background::Threads);
    assert!(threads() > before, "threaded mode's threads not seen");
    volume.close().expect("close");
    drop(volume);
    // A joined thread may still be listed for a moment while the kernel releases it.
    let settled = (0..1_000_000).any(|_| {
        std::thread::yield_now();
        threads() == before
    });
    assert!(settled, "threaded mode's threads outlived close");
}
