//! P1/P3 with a real process: `replicad-engine-writer` writes through the engine to an
//! image file and is killed with SIGKILL mid-stream at a random moment; the store is
//! reopened (journal recovery runs) and checked against the same deterministic
//! workload: every write the writer reported durable (FLUSHED n) is present, every
//! block passes its checksum, and the store shows a prefix of the write order.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use engine::backend::{self, OpenOptions};
use engine::rng::SplitMix64;
use engine::testing::Workload;
use engine::volume::{create_image_file, MetaStore};
use engine::{Volume, VolumeOptions, BLOCK_BYTES};

const WRITER: &str = env!("CARGO_BIN_EXE_replicad-engine-writer");

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hash(block: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    block.hash(&mut hasher);
    hasher.finish()
}

#[test]
fn p1_p3_kill_9_of_a_writing_process_loses_no_flushed_write() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("process-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut chooser = SplitMix64::new(std::process::id() as u64);
    for round in 0..3u64 {
        let store = dir.join(format!("store-{round}.img"));
        create_image_file(&store, 16 << 20).unwrap();
        let seed = 1000 + round;
        let status = Command::new(WRITER)
            .arg(&store)
            .arg(seed.to_string())
            .arg("--create")
            .status()
            .unwrap();
        assert!(status.success(), "create-md through the writer failed");

        let mut child = KillOnDrop(
            Command::new(WRITER)
                .arg(&store)
                .arg(seed.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stdout = child.0.stdout.take().unwrap();
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        // Kill after a random number of durable flush points (10..60).
        let kill_after = 10 + chooser.below(50);
        let mut flushed = 0usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < kill_after {
            let line = receiver
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("writer stopped reporting");
            if let Some(count) = line.strip_prefix("FLUSHED ") {
                flushed = count.parse().unwrap();
                seen += 1;
            }
        }
        // SIGKILL mid-stream (writes keep flowing between flush points).
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        while let Ok(line) = receiver.recv_timeout(Duration::from_secs(5)) {
            if let Some(count) = line.strip_prefix("FLUSHED ") {
                flushed = count.parse().unwrap();
            }
        }

        let backend = backend::open(&store, OpenOptions::default()).unwrap();
        let (volume, report) = Volume::open(
            backend,
            MetaStore::Internal,
            Some([0x5A; 16]),
            VolumeOptions::default(),
        )
        .unwrap();
        assert!(
            !report.was_clean,
            "the killed writer cannot have closed cleanly"
        );
        let size = volume.size_bytes();
        let blocks = (size / BLOCK_BYTES) as usize;
        // Model: each block's content history under the same workload.
        let mut image = vec![0u8; size as usize];
        let mut history: Vec<Vec<(usize, u64)>> =
            vec![vec![(0, hash(&[0u8; BLOCK_BYTES as usize]))]; blocks];
        let mut workload = Workload::new(seed, size);
        let generated = flushed + 64; // at most 32 in flight plus the next batch
        for _ in 0..generated {
            let write = workload.next_write();
            let start = write.offset as usize;
            image[start..start + write.data.len()].copy_from_slice(&write.data);
            let first = write.offset / BLOCK_BYTES;
            let last = (write.offset + write.data.len() as u64 - 1) / BLOCK_BYTES;
            for block in first..=last {
                let at = (block * BLOCK_BYTES) as usize;
                history[block as usize]
                    .push((write.index, hash(&image[at..at + BLOCK_BYTES as usize])));
            }
        }
        let on_disk = volume.read_blocking(0, size).unwrap_or_else(|error| {
            panic!("round {round}: recovered store unreadable: {error} ({report:?})")
        });
        let contents: Vec<u64> = on_disk.chunks(BLOCK_BYTES as usize).map(hash).collect();
        for (block, content) in contents.iter().enumerate() {
            assert!(
                history[block].iter().any(|(_, h)| h == content),
                "round {round}: block {block} holds data never written ({report:?})"
            );
        }
        let explains = |cut: usize| {
            (0..blocks).all(|b| {
                history[b]
                    .iter()
                    .rev()
                    .find(|(w, _)| *w <= cut)
                    .map(|(_, h)| *h)
                    == Some(contents[b])
            })
        };
        assert!(
            (flushed..=generated).any(explains),
            "round {round}: no prefix of at least the {flushed} flushed writes explains the store ({report:?})"
        );
        volume.close().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
