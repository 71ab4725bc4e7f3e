//! A torture writer for the engine's real-process crash test: writes a deterministic
//! workload (engine::testing::Workload) through the engine to a store, up to 32
//! writes in flight, flushing after every 16, and prints `FLUSHED <n>` once the
//! first `n` writes are durable. Meant to be killed with SIGKILL at any moment.
//!
//! usage: replicad-engine-writer STORE SEED [--create]

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use bytes::Bytes;
use engine::backend::{self, Backend, OpenOptions};
use engine::layout::MIN_JOURNAL_BYTES;
use engine::testing::Workload;
use engine::volume::{CreateOptions, MetaStore};
use engine::{Volume, VolumeOptions, WriteKind, WriteRequest};

fn main() {
    if let Err(message) = run() {
        eprintln!("replicad-engine-writer: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: replicad-engine-writer STORE SEED [--create]".into());
    }
    let path = PathBuf::from(&args[1]);
    let seed: u64 = args[2]
        .parse()
        .map_err(|_| "SEED must be a number".to_string())?;
    let store: Arc<dyn Backend> =
        backend::open(&path, OpenOptions::default()).map_err(|e| e.to_string())?;
    if args.iter().any(|arg| arg == "--create") {
        let options = CreateOptions {
            resource_uuid: [0x5A; 16],
            node_id: 0,
            node_name: "torture".into(),
            journal_bytes: MIN_JOURNAL_BYTES * 4,
            force: true,
            assume_zeroed: true,
        };
        Volume::create(&store, &MetaStore::Internal, &options, &mut |_, _| {})
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    let (volume, _) = Volume::open(
        store,
        MetaStore::Internal,
        Some([0x5A; 16]),
        VolumeOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let mut workload = Workload::new(seed, volume.size_bytes());
    let (sender, receiver) = mpsc::channel();
    let mut in_flight = 0;
    let mut stdout = std::io::stdout();
    loop {
        let write = workload.next_write();
        let sender = sender.clone();
        let request = WriteRequest {
            offset: write.offset,
            kind: WriteKind::Data(Bytes::from(write.data)),
            fua: false,
        };
        volume
            .write(request, Box::new(move |result| drop(sender.send(result))))
            .map_err(|e| e.to_string())?;
        in_flight += 1;
        if in_flight == 32 {
            receiver
                .recv()
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            in_flight -= 1;
        }
        if write.index % 16 == 0 {
            volume.flush_blocking().map_err(|e| e.to_string())?;
            writeln!(stdout, "FLUSHED {}", write.index).map_err(|e| e.to_string())?;
            stdout.flush().map_err(|e| e.to_string())?;
        }
    }
}
