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

    fn write_vectored_at(&self, offset: u64, parts: &[&[u8]]) -> Result<(), BackendError> {
        let store = &self.store;
        let total: u64 = parts.iter().map(|part| part.len() as u64).sum();
        if store.direct {
            // O_DIRECT needs aligned memory for every part: join them once.
            let joined: Vec<u8> = parts.concat();
            return self.write_at(offset, &joined);
        }
        store.check_latch()?;
        check_range("write", offset, total, store.size_bytes, store.alignment)?;
        let mut iovecs: Vec<libc::iovec> = parts
            .iter()
            .filter(|part| !part.is_empty())
            .map(|part| libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            })
            .collect();
        let mut done = 0u64;
        let mut first = 0usize;
        while first < iovecs.len() {
            let count = (iovecs.len() - first).min(1024);
            // SAFETY: every iovec points into a live slice of `parts` (borrowed for this
            // call), advanced below only within its own bounds; the count is in range.
            let written = unsafe {
                libc::pwritev(
                    std::os::unix::io::AsRawFd::as_raw_fd(&store.file),
                    iovecs[first..].as_ptr(),
                    count as libc::c_int,
                    (offset + done) as libc::off_t,
                )
            };
            if written < 0 {
                let source = std::io::Error::last_os_error();
                if source.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(BackendError::Write {
                    offset: offset + done,
                    len: (total - done) as usize,
                    source,
                });
            }
            if written == 0 {
                return Err(BackendError::Write {
                    offset: offset + done,
                    len: (total - done) as usize,
                    source: std::io::ErrorKind::WriteZero.into(),
                });
            }
            done += written as u64;
            let mut left = written as usize;
            while left > 0 && first < iovecs.len() {
                let iovec = &mut iovecs[first];
                if left >= iovec.iov_len {
                    left -= iovec.iov_len;
                    first += 1;
                } else {
                    // SAFETY: advancing within the same slice (left < iov_len).
                    iovec.iov_base =
                        unsafe { (iovec.iov_base as *mut u8).add(left) } as *mut libc::c_void;
                    iovec.iov_len -= left;
                    left = 0;
                }
            }
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.store.write_zeroes(self, offset, len)
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.store.is_hole(offset, len)
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
