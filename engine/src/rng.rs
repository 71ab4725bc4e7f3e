//! A tiny deterministic PRNG (SplitMix64) so tests and simulations replay from a seed.

/// SplitMix64: fast, seedable, statistically fine for test workloads.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let value = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&value[..chunk.len()]);
        }
    }
}

/// A fresh random u64 from the kernel (for generation identifiers and UUIDs).
pub fn os_random_u64() -> u64 {
    let mut value = [0u8; 8];
    // SAFETY: getrandom writes at most value.len() bytes into the live buffer.
    let n = unsafe { libc::getrandom(value.as_mut_ptr().cast(), value.len(), 0) };
    if n == value.len() as isize {
        return u64::from_le_bytes(value);
    }
    // getrandom cannot fail for 8 bytes on Linux ≥ 3.17; mix time as a last resort.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    SplitMix64::new(now ^ u64::from(std::process::id())).next_u64()
}
