//! A RAM-backed [`Export`] and a named [`ExportSet`].
//!
//! [`MemoryExport`] exists for protocol tests, demos and benchmarks of the server alone:
//! it has no durability (flush is a no-op) and checks its arguments with assertions,
//! because the server promises in-range requests (a violation is a server bug).
//!
//! For block-status tests it answers `base:allocation` truthfully (every
//! [`ZERO_SCAN_BYTES`]-aligned piece that holds only zeroes is `NBD_STATE_ZERO`, never a
//! hole) and serves named dirty bitmaps set with [`MemoryExport::with_dirty_bitmap`] as
//! `qemu:dirty-bitmap:NAME` contexts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use super::{Errno, Export, ExportSet, Extent, BASE_ALLOCATION, STATE_DIRTY, STATE_ZERO};

/// The granularity (and alignment) of the zero detection behind `base:allocation`, unless
/// the minimum block size is larger.
pub const ZERO_SCAN_BYTES: u64 = 4096;
/// The prefix of the contexts that serve [`MemoryExport::with_dirty_bitmap`] bitmaps.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// An export held in memory.
#[derive(Debug)]
pub struct MemoryExport {
    data: RwLock<Vec<u8>>,
    size_bytes: u64,
    writable: AtomicBool,
    multi_conn: bool,
    minimum_block_size: u32,
    /// Counts calls of `write`, `trim` and `write_zeroes` that reached the export.
    mutations: AtomicU64,
    read_only: bool,
    /// Dirty bitmaps by name: sorted, disjoint, non-empty `(offset, length)` ranges.
    dirty_bitmaps: BTreeMap<String, Vec<(u64, u64)>>,
}

impl MemoryExport {
    /// A writable, zero-filled export of `size_bytes` bytes, safe for multi-conn.
    pub fn new(size_bytes: usize) -> MemoryExport {
        MemoryExport::with_options(size_bytes, true, 1)
    }

    /// An export with a chosen multi-conn promise and minimum block size (a power of two
    /// from 1 to 65536).
    pub fn with_options(
        size_bytes: usize,
        multi_conn: bool,
        minimum_block_size: u32,
    ) -> MemoryExport {
        assert!(
            minimum_block_size.is_power_of_two()
                && minimum_block_size <= super::proto::MAX_MINIMUM_BLOCK_SIZE,
            "minimum block size must be a power of two up to 64 KiB"
        );
        MemoryExport {
            data: RwLock::new(vec![0; size_bytes]),
            size_bytes: size_bytes as u64,
            writable: AtomicBool::new(true),
            multi_conn,
            minimum_block_size,
            mutations: AtomicU64::new(0),
            read_only: false,
            dirty_bitmaps: BTreeMap::new(),
        }
    }

    /// Makes the export read-only for its whole life ([`Export::read_only`]): clients see
    /// `NBD_FLAG_READ_ONLY` and every write fails with `EPERM`.
    pub fn with_read_only(mut self, read_only: bool) -> MemoryExport {
        self.read_only = read_only;
        self
    }

    /// Adds a dirty bitmap served as the context `qemu:dirty-bitmap:NAME`, dirty exactly
    /// in `ranges` (`(offset, length)` pairs, in any order, overlapping or not; empty ones
    /// are ignored). Panics if a range ends beyond the export.
    pub fn with_dirty_bitmap(mut self, name: &str, ranges: Vec<(u64, u64)>) -> MemoryExport {
        let mut ranges: Vec<(u64, u64)> = ranges
            .into_iter()
            .filter(|&(_, length)| length > 0)
            .map(|(offset, length)| {
                let end = offset.checked_add(length).expect("dirty range overflows");
                assert!(end <= self.size_bytes, "dirty range beyond the export");
                (offset, end)
            })
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        self.dirty_bitmaps.insert(name.to_owned(), merged);
        self
    }

    /// Makes the export writable or read-only, e.g. to model a demotion.
    pub fn set_writable(&self, writable: bool) {
        self.writable.store(writable, Ordering::SeqCst);
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.read_guard().clone()
    }

    /// Replaces the contents from `offset` on; panics if the range is out of bounds.
    pub fn fill(&self, offset: usize, bytes: &[u8]) {
        self.write_guard()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// How many writes, trims and write-zeroes reached this export.
    pub fn mutation_count(&self) -> u64 {
        self.mutations.load(Ordering::SeqCst)
    }

    fn read_guard(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        // A panic while holding the lock leaves plain bytes behind, never a broken
        // invariant, so a poisoned lock is still usable.
        self.data
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn write_guard(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The byte range of a request, asserting the server's promises.
    fn range(&self, data_len: usize, offset: u64, length: u64) -> std::ops::Range<usize> {
        let end = offset.checked_add(length).expect("request range overflows");
        assert!(
            end <= data_len as u64,
            "request {offset}+{length} beyond the export"
        );
        offset as usize..end as usize
    }

    /// Applies a write-like operation, refusing it once the export is read-only: the
    /// server checks too, but its check can race with a demotion.
    fn mutate(&self, offset: u64, length: u64, apply: impl FnOnce(&mut [u8])) -> Result<(), Errno> {
        if self.read_only || !self.writable.load(Ordering::SeqCst) {
            return Err(Errno::EPERM);
        }
        self.mutations.fetch_add(1, Ordering::SeqCst);
        let mut data = self.write_guard();
        let range = self.range(data.len(), offset, length);
        apply(&mut data[range]);
        Ok(())
    }
}

impl Export for MemoryExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn is_writable(&self) -> bool {
        self.writable.load(Ordering::SeqCst)
    }

    fn can_multi_conn(&self) -> bool {
        self.multi_conn
    }

    fn minimum_block_size(&self) -> u32 {
        self.minimum_block_size
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, Errno> {
        let data = self.read_guard();
        let range = self.range(data.len(), offset, length.into());
        Ok(Bytes::copy_from_slice(&data[range]))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), Errno> {
        self.mutate(offset, data.len() as u64, |target| {
            target.copy_from_slice(&data)
        })
    }

    async fn flush(&self) -> Result<(), Errno> {
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, _fua: bool) -> Result<(), Errno> {
        // Trimmed bytes are undefined for the client; zeroes are one valid choice.
        self.mutate(offset, length.into(), |target| target.fill(0))
    }

    async fn write_zeroes(&self, offset: u64, length: u32, _fua: bool) -> Result<(), Errno> {
        self.mutate(offset, length.into(), |target| target.fill(0))
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn meta_contexts(&self) -> Vec<String> {
        self.dirty_bitmaps
            .keys()
            .map(|name| format!("{DIRTY_BITMAP_PREFIX}{name}"))
            .collect()
    }

    async fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u32,
    ) -> Result<Vec<Extent>, Errno> {
        let end = offset
            .checked_add(length.into())
            .expect("request range overflows");
        assert!(end <= self.size_bytes, "block status beyond the export");
        if context == BASE_ALLOCATION {
            return Ok(self.allocation(offset, end));
        }
        let bitmap = context
            .strip_prefix(DIRTY_BITMAP_PREFIX)
            .and_then(|name| self.dirty_bitmaps.get(name))
            .ok_or(Errno::EINVAL)?;
        Ok(dirty_extents(bitmap, offset, end))
    }
}

impl MemoryExport {
    /// `base:allocation` of `[offset, end)`: zero pieces and data pieces, cut at multiples
    /// of the scan granularity.
    fn allocation(&self, offset: u64, end: u64) -> Vec<Extent> {
        let granularity = ZERO_SCAN_BYTES.max(self.minimum_block_size.into());
        let data = self.read_guard();
        let mut extents = Vec::new();
        let mut start = offset;
        while start < end {
            let piece_end = ((start / granularity + 1) * granularity).min(end);
            let zero = data[start as usize..piece_end as usize]
                .iter()
                .all(|&byte| byte == 0);
            push_extent(
                &mut extents,
                piece_end - start,
                if zero { STATE_ZERO } else { 0 },
            );
            start = piece_end;
        }
        extents
    }
}

/// The extents of a dirty bitmap (sorted, disjoint `(start, end)` ranges) over
/// `[offset, end)`.
fn dirty_extents(bitmap: &[(u64, u64)], offset: u64, end: u64) -> Vec<Extent> {
    let mut extents = Vec::new();
    let mut position = offset;
    for &(dirty_start, dirty_end) in bitmap {
        if dirty_end <= position {
            continue;
        }
        if dirty_start >= end {
            break;
        }
        if dirty_start > position {
            push_extent(&mut extents, dirty_start - position, 0);
        }
        let stop = dirty_end.min(end);
        push_extent(&mut extents, stop - position.max(dirty_start), STATE_DIRTY);
        position = stop;
    }
    if position < end {
        push_extent(&mut extents, end - position, 0);
    }
    extents
}

/// Appends an extent, merging it into the last one when the flags are equal. Lengths
/// stay within the request's `u32` length.
fn push_extent(extents: &mut Vec<Extent>, length: u64, flags: u32) {
    let length = u32::try_from(length).expect("extent within a u32 request");
    match extents.last_mut() {
        Some(last) if last.flags == flags => last.length += length,
        _ => extents.push(Extent { length, flags }),
    }
}

/// Exports by name. With exactly one export, it is also the default export (the empty
/// name).
#[derive(Debug)]
pub struct ExportMap<E> {
    exports: BTreeMap<String, Arc<E>>,
}

impl<E> Default for ExportMap<E> {
    fn default() -> ExportMap<E> {
        ExportMap {
            exports: BTreeMap::new(),
        }
    }
}

impl<E: Export> ExportMap<E> {
    pub fn new() -> ExportMap<E> {
        ExportMap::default()
    }

    /// Adds (or replaces) the export called `name`.
    pub fn insert(&mut self, name: impl Into<String>, export: Arc<E>) {
        self.exports.insert(name.into(), export);
    }

    /// A map holding one export.
    pub fn single(name: impl Into<String>, export: Arc<E>) -> ExportMap<E> {
        let mut map = ExportMap::new();
        map.insert(name, export);
        map
    }
}

impl<E: Export> ExportSet for ExportMap<E> {
    type Export = E;

    fn get(&self, name: &str) -> Option<Arc<E>> {
        if name.is_empty() && self.exports.len() == 1 {
            return self.exports.values().next().cloned();
        }
        self.exports.get(name).cloned()
    }

    fn names(&self) -> Vec<String> {
        self.exports.keys().cloned().collect()
    }
}
