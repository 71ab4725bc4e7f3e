//! The per-block checksum table: one CRC32 per 4 KiB block of the data area.
//!
//! On disk (`docs/FORMAT.md` §4) the table is an array of 4 KiB pages of
//! [`CRCS_PER_PAGE`] little-endian u32 entries. An entry holds the block's CRC32
//! XOR the CRC32 of a zero block ([`encode_entry`]), so zero bytes mean "a zero
//! block": a table that was never written (a hole, a ZERO_RANGE extent) describes an
//! all-zero data area, and `create-md --zeroed` writes no table at all. Entries are
//! independent 4-byte values: a torn page write leaves each entry old or new, and
//! journal replay rewrites every entry that a checkpoint had not made durable.
//!
//! In memory the table is a bounded cache ([`ChecksumTable`]) of pages, loaded on
//! demand and evicted (second-chance clock) when clean. A page changed since its last
//! write is *dirty* and stays in memory until a checkpoint has written it and made it
//! durable; the applier asks for a checkpoint when dirty pages pass half the cache.
//! Only the applier (and recovery, before the volume serves) changes entries and
//! writes pages back; readers look entries up concurrently.
//!
//! It is deliberately not a memory map: with `mmap` the kernel may write table pages
//! back at any moment, and an I/O error on a mapped page arrives as SIGBUS, killing the
//! daemon, where a `pwrite` returns an error we can handle. See `docs/ARCHITECTURE.md`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::backend::{Backend, BackendError};
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

/// The on-disk form of a block's CRC: zero for a zero block.
pub fn encode_entry(crc: u32) -> u32 {
    crc ^ zero_block_crc()
}

/// The CRC an on-disk entry stands for.
pub fn decode_entry(stored: u32) -> u32 {
    stored ^ zero_block_crc()
}

const ENTRIES: usize = CRCS_PER_PAGE as usize;

/// Encodes one table page from the CRCs of its blocks (at most [`CRCS_PER_PAGE`];
/// the rest of the page is zero bytes).
pub fn encode_page(crcs: &[u32]) -> Vec<u8> {
    assert!(crcs.len() <= ENTRIES, "too many entries for one page");
    let mut buf = vec![0u8; PAGE_BYTES as usize];
    for (slot, &crc) in buf.chunks_exact_mut(4).zip(crcs) {
        slot.copy_from_slice(&encode_entry(crc).to_le_bytes());
    }
    buf
}

/// Decodes one table page into the CRCs of its [`CRCS_PER_PAGE`] blocks.
pub fn decode_page(bytes: &[u8]) -> Box<[u32]> {
    let mut entries = vec![zero_block_crc(); ENTRIES].into_boxed_slice();
    for (entry, raw) in entries.iter_mut().zip(bytes.chunks_exact(4)) {
        *entry = decode_entry(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
    }
    entries
}

/// Page numbers are already well spread: hash them by a multiply, not SipHash.
#[derive(Default)]
struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 << 8 | u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One cached page.
struct CachedPage {
    entries: Box<[u32]>,
    /// Looked up since the clock hand last passed (second chance).
    referenced: bool,
    /// Changed since its last write began.
    dirty: bool,
    /// Written, not yet known durable: pinned like a dirty page.
    writing: bool,
}

#[derive(Default)]
struct Shard {
    pages: HashMap<u64, CachedPage, BuildHasherDefault<PageHasher>>,
    /// Resident pages in clock order (eviction scans from the front).
    clock: VecDeque<u64>,
    /// Dirty pages, in page order (a deterministic write-back order).
    dirty: BTreeSet<u64>,
}

/// Counters of the cache (monotonic, except `resident` and `dirty`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub pages_written: u64,
    pub resident: u64,
    pub dirty: u64,
}

/// Shards of the cache: a miss reads its page under its shard's lock, so misses on
/// different shards proceed in parallel, and a load never races an eviction or a
/// write-back of the same page.
const SHARDS: usize = 32;

/// Smallest cache: a few pages per shard.
pub const MIN_CACHE_BYTES: u64 = SHARDS as u64 * 4 * PAGE_BYTES;
/// Default cache size (`checksum-cache` in the daemon's configuration): 64 MiB hold
/// the table of 64 GiB of volume.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// The bounded, write-back cache of the checksum table. See the module documentation.
pub struct ChecksumTable {
    meta: Arc<dyn Backend>,
    /// Byte offset of the table in `meta`.
    offset: u64,
    blocks: u64,
    capacity_per_shard: usize,
    shards: Vec<Mutex<Shard>>,
    dirty: AtomicUsize,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    pages_written: AtomicU64,
}

impl std::fmt::Debug for ChecksumTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChecksumTable")
            .field("blocks", &self.blocks)
            .field("stats", &self.stats())
            .finish()
    }
}

impl ChecksumTable {
    /// A cache of about `cache_bytes` over the table of `blocks` blocks at byte
    /// `offset` of `meta`.
    pub fn new(meta: Arc<dyn Backend>, offset: u64, blocks: u64, cache_bytes: u64) -> Self {
        let pages = (cache_bytes.max(MIN_CACHE_BYTES) / PAGE_BYTES) as usize;
        ChecksumTable {
            meta,
            offset,
            blocks,
            capacity_per_shard: pages / SHARDS,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            dirty: AtomicUsize::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            pages_written: AtomicU64::new(0),
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Number of table pages.
    pub fn pages(&self) -> u64 {
        self.blocks.div_ceil(CRCS_PER_PAGE)
    }

    /// Pages the cache holds at most, dirty pages aside.
    pub fn capacity_pages(&self) -> usize {
        self.capacity_per_shard * SHARDS
    }

    fn shard(&self, page: u64) -> MutexGuard<'_, Shard> {
        // A poisoned shard means a panic in this module (a bug); its data is intact.
        self.shards[(page % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn page_offset(&self, page: u64) -> u64 {
        self.offset + page * PAGE_BYTES
    }

    /// The cached page `page`, loaded on a miss (evicting a clean page if the shard is
    /// full).
    fn resident<'a>(
        &self,
        shard: &'a mut Shard,
        page: u64,
    ) -> Result<&'a mut CachedPage, BackendError> {
        if shard.pages.contains_key(&page) {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            let mut bytes = vec![0u8; PAGE_BYTES as usize];
            self.meta.read_at(self.page_offset(page), &mut bytes)?;
            self.evict_to(shard, self.capacity_per_shard.saturating_sub(1));
            shard.pages.insert(
                page,
                CachedPage {
                    entries: decode_page(&bytes),
                    referenced: false,
                    dirty: false,
                    writing: false,
                },
            );
            shard.clock.push_back(page);
        }
        match shard.pages.get_mut(&page) {
            Some(cached) => Ok(cached),
            None => unreachable!("page {page} was just made resident"),
        }
    }

    /// Evicts clean pages (second-chance clock) until at most `keep` remain or only
    /// pinned (dirty or being written) pages are left.
    fn evict_to(&self, shard: &mut Shard, keep: usize) {
        let mut passes = 0;
        let limit = 2 * shard.clock.len() + 1;
        while shard.pages.len() > keep && passes < limit {
            passes += 1;
            let Some(page) = shard.clock.pop_front() else {
                break;
            };
            let Some(cached) = shard.pages.get_mut(&page) else {
                continue;
            };
            if cached.dirty || cached.writing || cached.referenced {
                cached.referenced = false;
                shard.clock.push_back(page);
                continue;
            }
            shard.pages.remove(&page);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn check_range(&self, first: u64, count: u64) {
        assert!(
            first
                .checked_add(count)
                .is_some_and(|end| end <= self.blocks),
            "blocks {first}+{count} beyond the table of {}",
            self.blocks
        );
    }

    /// The CRC stored for `block`.
    pub fn get(&self, block: u64) -> Result<u32, BackendError> {
        self.check_range(block, 1);
        let page = block / CRCS_PER_PAGE;
        let mut shard = self.shard(page);
        let cached = self.resident(&mut shard, page)?;
        cached.referenced = true;
        Ok(cached.entries[(block % CRCS_PER_PAGE) as usize])
    }

    /// Splits `[first, first + count)` (checked against the table) by page:
    /// `(page, first block, end block)`.
    fn runs_by_page(&self, first: u64, count: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        self.check_range(first, count);
        let end = first + count;
        let mut block = first;
        std::iter::from_fn(move || {
            (block < end).then(|| {
                let page = block / CRCS_PER_PAGE;
                let page_end = ((page + 1) * CRCS_PER_PAGE).min(end);
                let run = (page, block, page_end);
                block = page_end;
                run
            })
        })
    }

    /// The CRCs of `count` blocks from `first`, appended to `out` (one lookup per page).
    pub fn get_range(
        &self,
        first: u64,
        count: u64,
        out: &mut Vec<u32>,
    ) -> Result<(), BackendError> {
        for (page, block, page_end) in self.runs_by_page(first, count) {
            let mut shard = self.shard(page);
            let cached = self.resident(&mut shard, page)?;
            cached.referenced = true;
            let from = (block % CRCS_PER_PAGE) as usize;
            out.extend_from_slice(&cached.entries[from..from + (page_end - block) as usize]);
        }
        Ok(())
    }

    /// Sets the CRC of `block` (applier and recovery only). The page becomes dirty
    /// and stays in memory until a checkpoint has made it durable.
    pub fn set(&self, block: u64, crc: u32) -> Result<(), BackendError> {
        self.set_run(block, 1, |_| crc)
    }

    /// Sets the CRCs of `count` consecutive blocks from `first` to `crc_of(i)` for
    /// the `i`-th (one lookup per page).
    pub fn set_run(
        &self,
        first: u64,
        count: u64,
        crc_of: impl Fn(u64) -> u32,
    ) -> Result<(), BackendError> {
        for (page, block, page_end) in self.runs_by_page(first, count) {
            let mut shard = self.shard(page);
            let cached = self.resident(&mut shard, page)?;
            for b in block..page_end {
                cached.entries[(b % CRCS_PER_PAGE) as usize] = crc_of(b - first);
            }
            cached.referenced = true;
            if !cached.dirty {
                cached.dirty = true;
                shard.dirty.insert(page);
                self.dirty.fetch_add(1, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    /// Loads the pages of `[first, first + count)` ahead of an update (so the update
    /// itself, under the apply lock, rarely waits for a read).
    pub fn preload(&self, first: u64, count: u64) -> Result<(), BackendError> {
        for (page, _, _) in self.runs_by_page(first, count) {
            let mut shard = self.shard(page);
            self.resident(&mut shard, page)?.referenced = true;
        }
        Ok(())
    }

    /// Pages changed since their last write began.
    pub fn dirty_pages(&self) -> usize {
        self.dirty.load(Ordering::Acquire)
    }

    pub fn has_dirty(&self) -> bool {
        self.dirty_pages() > 0
    }

    /// Dirty pages fill half the cache: time for a checkpoint (dirty pages are never
    /// evicted, so only write-back bounds them).
    pub fn wants_writeback(&self) -> bool {
        self.dirty_pages() * 2 >= self.capacity_pages().max(2)
    }

    /// Writes every dirty page in place (not yet durable: the caller fdatasyncs the
    /// metadata store, then calls [`ChecksumTable::written_durable`] with what this
    /// returns, or [`ChecksumTable::write_failed`] if the flush fails; on an error here,
    /// every page stays dirty). Pages changed again meanwhile are simply dirty again.
    pub fn write_dirty(&self) -> Result<Vec<u64>, BackendError> {
        let mut written = Vec::new();
        let mut outcome = Ok(());
        'shards: for shard in &self.shards {
            let mut shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            while let Some(page) = shard.dirty.pop_first() {
                let Some(cached) = shard.pages.get_mut(&page) else {
                    unreachable!("dirty page {page} is not resident");
                };
                let first = page * CRCS_PER_PAGE;
                let valid = (self.blocks - first).min(CRCS_PER_PAGE) as usize;
                let bytes = encode_page(&cached.entries[..valid]);
                if let Err(error) = self.meta.write_at(self.page_offset(page), &bytes) {
                    shard.dirty.insert(page);
                    outcome = Err(error);
                    break 'shards;
                }
                cached.dirty = false;
                cached.writing = true;
                self.dirty.fetch_sub(1, Ordering::AcqRel);
                written.push(page);
            }
        }
        self.pages_written
            .fetch_add(written.len() as u64, Ordering::Relaxed);
        if let Err(error) = outcome {
            self.write_failed(&written);
            return Err(error);
        }
        Ok(written)
    }

    /// The pages written by [`ChecksumTable::write_dirty`] are durable: they may be
    /// evicted again (unless changed since).
    pub fn written_durable(&self, pages: &[u64]) {
        for &page in pages {
            let mut shard = self.shard(page);
            if let Some(cached) = shard.pages.get_mut(&page) {
                cached.writing = false;
            }
            self.evict_to(&mut shard, self.capacity_per_shard);
        }
    }

    /// A write of the pages [`ChecksumTable::write_dirty`] returned failed to become
    /// durable: they are dirty again.
    pub fn write_failed(&self, pages: &[u64]) {
        for &page in pages {
            let mut shard = self.shard(page);
            if let Some(cached) = shard.pages.get_mut(&page) {
                cached.writing = false;
                if !cached.dirty {
                    cached.dirty = true;
                    shard.dirty.insert(page);
                    self.dirty.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        let (resident, dirty) = self.shards.iter().fold((0, 0), |(r, d), shard| {
            let shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            (r + shard.pages.len() as u64, d + shard.dirty.len() as u64)
        });
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            pages_written: self.pages_written.load(Ordering::Relaxed),
            resident,
            dirty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim::SimBackend;

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
    fn zero_bytes_mean_zero_blocks() {
        assert_eq!(encode_entry(zero_block_crc()), 0);
        let page = decode_page(&[0u8; 4096]);
        assert!(page.iter().all(|&crc| crc == zero_block_crc()));
        let encoded = encode_page(&[1, 2, zero_block_crc()]);
        let decoded = decode_page(&encoded);
        assert_eq!(&decoded[..4], &[1, 2, zero_block_crc(), zero_block_crc()]);
        assert!(encoded[8..].iter().all(|&b| b == 0));
    }

    fn table(store_bytes: u64, cache_bytes: u64) -> (Arc<SimBackend>, ChecksumTable) {
        let sim = Arc::new(SimBackend::new(store_bytes));
        let blocks = store_bytes / 2 / 4;
        let meta: Arc<dyn Backend> = sim.clone();
        (sim, ChecksumTable::new(meta, 4096, blocks, cache_bytes))
    }

    #[test]
    fn dirty_pages_stay_until_durable_and_clean_ones_are_evicted() {
        let (sim, table) = table(64 << 20, MIN_CACHE_BYTES);
        let blocks = table.blocks();
        assert_eq!(table.get(5).unwrap(), zero_block_crc());
        // Dirty more pages than the cache holds: none is lost.
        let pages = (table.capacity_pages() * 2) as u64;
        for page in 0..pages {
            table
                .set(page * CRCS_PER_PAGE + 1, page as u32 + 100)
                .unwrap();
        }
        assert_eq!(table.dirty_pages() as u64, pages);
        assert!(table.wants_writeback());
        for page in 0..pages {
            assert_eq!(
                table.get(page * CRCS_PER_PAGE + 1).unwrap(),
                page as u32 + 100
            );
        }
        let written = table.write_dirty().unwrap();
        assert_eq!(written.len() as u64, pages);
        // Changed while being written: dirty again, written again next time.
        table.set(1, 55).unwrap();
        table.written_durable(&written);
        assert_eq!(table.dirty_pages(), 1);
        table.written_durable(&table.write_dirty().unwrap());
        assert_eq!(table.dirty_pages(), 0);
        assert!(table.stats().resident as usize <= table.capacity_pages());
        // Reloaded after eviction, from the store.
        for page in (1..pages).rev() {
            assert_eq!(
                table.get(page * CRCS_PER_PAGE + 1).unwrap(),
                page as u32 + 100
            );
        }
        assert!(table.stats().evictions > 0 && table.stats().misses > pages);
        table.set(blocks - 1, 42).unwrap();
        table.written_durable(&table.write_dirty().unwrap());
        let meta: Arc<dyn Backend> = sim;
        let again = ChecksumTable::new(meta, 4096, blocks, MIN_CACHE_BYTES);
        assert_eq!(again.get(1).unwrap(), 55);
        assert_eq!(again.get(blocks - 1).unwrap(), 42);
        let mut out = Vec::new();
        again.get_range(0, 3, &mut out).unwrap();
        assert_eq!(out, vec![zero_block_crc(), 55, zero_block_crc()]);
    }

    #[test]
    fn a_failed_write_leaves_pages_dirty() {
        let (_sim, table) = table(1 << 20, MIN_CACHE_BYTES);
        table.set(3, 9).unwrap();
        let written = table.write_dirty().unwrap();
        table.write_failed(&written);
        assert_eq!(table.dirty_pages(), 1);
        assert_eq!(table.write_dirty().unwrap(), vec![0]);
    }
}
