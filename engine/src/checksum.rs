//! The per-block checksum table: one CRC32 per 4 KiB block of the data area.
//!
//! The table lives in memory as atomics (readers check blocks without taking the
//! engine's lock) and is persisted page by page into the metadata region at each
//! checkpoint, after the data it describes is durable. It is deliberately not a
//! memory map: with `mmap` the kernel may write table pages back at any moment, and
//! an I/O error on a mapped page arrives as SIGBUS, killing the daemon, where a
//! `pwrite` returns an error we can handle. See `docs/ARCHITECTURE.md`.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;

use crate::layout::{CRCS_PER_PAGE, PAGE_BYTES};
use crate::BLOCK_BYTES;

/// CRC32 (IEEE, as `crc32fast`) of one block.
pub fn block_crc(block: &[u8]) -> u32 {
    crc32fast::hash(block)
}

/// A 64-bit digest of a block (xxh3) for comparing replicas across nodes (online
/// verify, checksum-based resync). Not CRC32: CRC is affine, so every block that ends
/// in its own CRC32 has the same CRC32 (a constant residue), whatever its content and
/// seed; self-checking data (file systems, databases, our own checker) does exactly
/// that. The stored per-block checksum stays CRC32 (media errors are random, not
/// structured, and CRC32 catches them); the digest is only computed on demand.
pub fn block_digest(block: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(block)
}

/// CRC32 of a block of zeroes (what TRIM and WRITE_ZEROES leave).
pub fn zero_block_crc() -> u32 {
    static ZERO: OnceLock<u32> = OnceLock::new();
    *ZERO.get_or_init(|| block_crc(&[0u8; BLOCK_BYTES as usize]))
}

/// See the module documentation.
#[derive(Debug)]
pub struct ChecksumTable {
    entries: Vec<AtomicU32>,
    dirty_pages: Vec<AtomicBool>,
}

impl ChecksumTable {
    /// A table for `blocks` blocks, every entry `initial`.
    pub fn new(blocks: u64, initial: u32) -> ChecksumTable {
        let pages = blocks.div_ceil(CRCS_PER_PAGE) as usize;
        ChecksumTable {
            entries: (0..blocks).map(|_| AtomicU32::new(initial)).collect(),
            dirty_pages: (0..pages).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Loads a table from its on-disk bytes (little-endian u32 per block).
    pub fn from_bytes(blocks: u64, bytes: &[u8]) -> ChecksumTable {
        let table = ChecksumTable::new(blocks, 0);
        for (entry, chunk) in table.entries.iter().zip(bytes.chunks_exact(4)) {
            entry.store(
                u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]),
                Ordering::Relaxed,
            );
        }
        table
    }

    pub fn blocks(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn get(&self, block: u64) -> u32 {
        self.entries[block as usize].load(Ordering::Acquire)
    }

    pub fn set(&self, block: u64, crc: u32) {
        self.entries[block as usize].store(crc, Ordering::Release);
        self.dirty_pages[(block / CRCS_PER_PAGE) as usize].store(true, Ordering::Release);
    }

    /// Number of table pages.
    pub fn pages(&self) -> usize {
        self.dirty_pages.len()
    }

    /// Indices of pages changed since the last call (and clears their dirty marks).
    pub fn take_dirty_pages(&self) -> Vec<usize> {
        (0..self.dirty_pages.len())
            .filter(|&page| self.dirty_pages[page].swap(false, Ordering::AcqRel))
            .collect()
    }

    /// Whether any page changed since the last [`ChecksumTable::take_dirty_pages`].
    pub fn has_dirty(&self) -> bool {
        self.dirty_pages
            .iter()
            .any(|dirty| dirty.load(Ordering::Acquire))
    }

    /// Marks a page dirty again (its write failed and must be retried at the next checkpoint).
    pub fn mark_page_dirty(&self, page: usize) {
        self.dirty_pages[page].store(true, Ordering::Release);
    }

    /// Encodes page `page` (4 KiB, zero padded after the last block).
    pub fn encode_page(&self, page: usize) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE_BYTES as usize];
        let first = page * CRCS_PER_PAGE as usize;
        let last = (first + CRCS_PER_PAGE as usize).min(self.entries.len());
        for (slot, entry) in buf.chunks_exact_mut(4).zip(&self.entries[first..last]) {
            slot.copy_from_slice(&entry.load(Ordering::Acquire).to_le_bytes());
        }
        buf
    }

    /// Encodes the whole table (for `create-md` and tests).
    pub fn encode_all(&self) -> Vec<u8> {
        (0..self.pages())
            .flat_map(|page| self.encode_page(page))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_tells_apart_blocks_that_crc32_cannot() {
        // Two different blocks, each ending in the CRC32 of what precedes it.
        let make = |fill: u8| {
            let mut block = vec![fill; 4096];
            let crc = crc32fast::hash(&block[..4092]);
            block[4092..].copy_from_slice(&crc.to_le_bytes());
            block
        };
        let (a, b) = (make(1), make(2));
        assert_eq!(
            block_crc(&a),
            block_crc(&b),
            "CRC32's residue: the weakness this digest covers"
        );
        assert_ne!(block_digest(&a), block_digest(&b));
    }

    #[test]
    fn set_marks_pages_dirty_and_round_trips() {
        let table = ChecksumTable::new(3000, zero_block_crc());
        assert!(table.take_dirty_pages().is_empty());
        table.set(5, 0xdead_beef);
        table.set(2999, 7);
        assert_eq!(table.take_dirty_pages(), vec![0, 2]);
        assert!(table.take_dirty_pages().is_empty());
        let loaded = ChecksumTable::from_bytes(3000, &table.encode_all());
        assert_eq!(loaded.get(5), 0xdead_beef);
        assert_eq!(loaded.get(2999), 7);
        assert_eq!(loaded.get(6), zero_block_crc());
    }
}
