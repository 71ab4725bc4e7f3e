//! Deterministic workloads shared by the torture binary and the tests that check it.

use crate::rng::SplitMix64;
use crate::BLOCK_BYTES;

/// One write of a [`Workload`]: write number `index` (1-based) puts `data` at `offset`.
#[derive(Debug, Clone)]
pub struct WorkloadWrite {
    pub index: usize,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// A reproducible stream of writes (aligned and unaligned, 1 byte to 16 blocks)
/// over a volume of `size_bytes`.
#[derive(Debug, Clone)]
pub struct Workload {
    rng: SplitMix64,
    size_bytes: u64,
    written: usize,
}

impl Workload {
    pub fn new(seed: u64, size_bytes: u64) -> Workload {
        Workload {
            rng: SplitMix64::new(seed),
            size_bytes,
            written: 0,
        }
    }

    pub fn next_write(&mut self) -> WorkloadWrite {
        let rng = &mut self.rng;
        let aligned = rng.below(4) != 0;
        let (offset, length) = random_extent(rng, self.size_bytes, 16, aligned);
        let mut data = vec![0u8; length as usize];
        rng.fill(&mut data);
        self.written += 1;
        WorkloadWrite {
            index: self.written,
            offset,
            data,
        }
    }
}

/// A random extent `(offset, length)` of a volume of `size_bytes`: `aligned`, whole
/// blocks (1 to `max_blocks`) at a block boundary; else 1 byte to `max_blocks` blocks
/// anywhere. Draws the length, then the offset.
pub fn random_extent(
    rng: &mut SplitMix64,
    size_bytes: u64,
    max_blocks: u64,
    aligned: bool,
) -> (u64, u64) {
    let length = if aligned {
        (1 + rng.below(max_blocks)) * BLOCK_BYTES
    } else {
        1 + rng.below(max_blocks * BLOCK_BYTES)
    };
    let mut offset = rng.below(size_bytes - length);
    if aligned {
        offset = offset / BLOCK_BYTES * BLOCK_BYTES;
    }
    (offset, length)
}
