//! A RAM-backed [`Export`] and a named [`ExportSet`].
//!
//! [`MemoryExport`] exists for protocol tests, demos and benchmarks of the server alone:
//! it has no durability (flush is a no-op) and checks its arguments with assertions,
//! because the server promises in-range requests (a violation is a server bug).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use super::{Errno, Export, ExportSet};

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
        }
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
        if !self.writable.load(Ordering::SeqCst) {
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
