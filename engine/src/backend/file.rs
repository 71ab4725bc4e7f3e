//! The portable backend: positional `pread`/`pwrite` and `fdatasync`.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::store::Store;
use super::{check_range, is_aligned, AlignedBuf, Backend, BackendError};

/// A store reached with `pread`/`pwrite`; O_DIRECT when asked and allowed.
#[derive(Debug)]
pub struct FileBackend {
    store: Store,
}

impl FileBackend {
    /// Opens `path` read-write. With `direct`, tries O_DIRECT and falls back to
    /// buffered I/O where the file system refuses it.
    pub fn open(path: &Path, direct: bool) -> Result<FileBackend, BackendError> {
        Ok(FileBackend {
            store: Store::open(path, direct)?,
        })
    }
}

impl Backend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.store.size_bytes
    }

    fn alignment(&self) -> usize {
        self.store.alignment
    }

    fn kind(&self) -> &'static str {
        "pread"
    }

    fn is_direct(&self) -> bool {
        self.store.direct
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let store = &self.store;
        store.check_latch()?;
        check_range(
            "read",
            offset,
            buf.len() as u64,
            store.size_bytes,
            store.alignment,
        )?;
        let len = buf.len();
        let read_error = |source| BackendError::Read {
            offset,
            len,
            source,
        };
        if store.direct && !is_aligned(buf, store.alignment) {
            let mut bounce = AlignedBuf::zeroed(len, store.alignment);
            store
                .file
                .read_exact_at(&mut bounce, offset)
                .map_err(read_error)?;
            buf.copy_from_slice(&bounce);
            return Ok(());
        }
        store.file.read_exact_at(buf, offset).map_err(read_error)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        let store = &self.store;
        store.check_latch()?;
        check_range(
            "write",
            offset,
            buf.len() as u64,
            store.size_bytes,
            store.alignment,
        )?;
        let write_error = |source| BackendError::Write {
            offset,
            len: buf.len(),
            source,
        };
        if store.direct && !is_aligned(buf, store.alignment) {
            let bounce = AlignedBuf::copy_from(buf, store.alignment);
            return store
                .file
                .write_all_at(&bounce, offset)
                .map_err(write_error);
        }
        store.file.write_all_at(buf, offset).map_err(write_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.store.write_zeroes(self, offset, len)
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.store.flush_with(|| {
            self.store
                .file
                .sync_data()
                .map_err(|source| BackendError::Flush { source })
        })
    }
}
