//! What the file-backed backends (`pread` and io_uring) share: opening and probing a
//! store, the flush latch, and zeroing through the file system.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{check_range, probe, probe_direct_alignment, Backend, BackendError};

/// An open block device or image file and what probing it found.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) file: File,
    pub(crate) size_bytes: u64,
    /// Granularity of offsets and lengths: the O_DIRECT alignment, else 1.
    pub(crate) alignment: usize,
    /// Whether O_DIRECT is in effect.
    pub(crate) direct: bool,
    pub(crate) is_block_device: bool,
    /// Set by a failed flush; see the fault model in the module `backend`.
    latched: AtomicBool,
}

impl Store {
    /// Opens `path` read-write. With `direct`, tries O_DIRECT and falls back to
    /// buffered I/O where the file system refuses it.
    pub(crate) fn open(path: &Path, direct: bool) -> Result<Store, BackendError> {
        let (file, direct) = open_file(path, direct).map_err(|source| open_error(path, source))?;
        Store::from_file(file, direct).map_err(|source| open_error(path, source))
    }

    /// Probes an open store; `direct` says whether it was opened with O_DIRECT.
    pub(crate) fn from_file(file: File, direct: bool) -> io::Result<Store> {
        let probe = probe(&file)?;
        let alignment = if direct {
            probe_direct_alignment(&file, probe.is_block_device)
        } else {
            1
        };
        Ok(Store {
            file,
            size_bytes: probe.size_bytes,
            alignment,
            direct,
            is_block_device: probe.is_block_device,
            latched: AtomicBool::new(false),
        })
    }

    /// Fails with [`BackendError::Latched`] once a flush has failed.
    pub(crate) fn check_latch(&self) -> Result<(), BackendError> {
        if self.latched.load(Ordering::Acquire) {
            return Err(BackendError::Latched);
        }
        Ok(())
    }

    /// Runs a flush (fdatasync) unless latched; latches if it fails. A failed fdatasync
    /// may have dropped dirty pages, so it is never retried.
    pub(crate) fn flush_with(
        &self,
        flush: impl FnOnce() -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        self.check_latch()?;
        let result = flush();
        if result.is_err() {
            self.latched.store(true, Ordering::Release);
        }
        result
    }

    /// [`Backend::write_zeroes`] for `backend` over this store: `fallocate` ZERO_RANGE
    /// on image files, else (block devices, refusals) writing zero buffers.
    pub(crate) fn write_zeroes<B: Backend>(
        &self,
        backend: &B,
        offset: u64,
        len: u64,
    ) -> Result<(), BackendError> {
        self.check_latch()?;
        check_range("write_zeroes", offset, len, self.size_bytes, self.alignment)?;
        if len == 0 {
            return Ok(());
        }
        if !self.is_block_device && zero_file_range(&self.file, offset, len) {
            return Ok(());
        }
        super::write_zeroes_by_writing(backend, offset, len)
    }
}

impl Store {
    /// See [`Backend::is_hole`]: image files only (a block device has no holes).
    pub(crate) fn is_hole(&self, offset: u64, len: u64) -> bool {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return false;
        };
        !self.is_block_device && len > 0 && is_hole(&self.file, offset, len)
    }
}

pub(crate) fn open_error(path: &Path, source: io::Error) -> BackendError {
    BackendError::Open {
        path: path.display().to_string(),
        source,
    }
}

/// Opens read-write, with O_DIRECT if asked; returns whether O_DIRECT is in effect.
pub(crate) fn open_file(path: &Path, direct: bool) -> io::Result<(File, bool)> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if direct {
        match options.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(file) => return Ok((file, true)),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!("{}: O_DIRECT refused, using buffered I/O", path.display());
            }
            Err(error) => return Err(error),
        }
    }
    Ok((options.open(path)?, false))
}

/// Whether `[offset, offset+len)` of an image file is one hole (no data in it, as
/// `lseek(SEEK_DATA)` tells; false when the file system cannot say).
fn is_hole(file: &File, offset: libc::off_t, len: libc::off_t) -> bool {
    // SAFETY: lseek takes a valid descriptor and plain integers. SEEK_DATA moves the
    // file offset, which pread/pwrite never use.
    let data = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data at or after `offset`.
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    data >= offset.saturating_add(len)
}

/// Asks the file system to zero `[offset, offset+len)` of an image file
/// (`fallocate(FALLOC_FL_ZERO_RANGE)`). Returns false where it cannot (file systems
/// without the mode, unaligned ranges): the caller then writes zeroes.
fn zero_file_range(file: &File, offset: u64, len: u64) -> bool {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return false;
    };
    if is_hole(file, offset, len) {
        // Already reads as zeroes, and stays unallocated (ZERO_RANGE would allocate
        // unwritten extents: gigabytes of them for the metadata of a huge volume).
        return true;
    }
    // SAFETY: fallocate takes a valid descriptor and plain integers.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, offset, len) };
    rc == 0
}
