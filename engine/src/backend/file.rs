//! The portable backend: positional `pread`/`pwrite` and `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{check_range, is_aligned, probe, AlignedBuf, Backend, BackendError};

/// A store reached with `pread`/`pwrite`; O_DIRECT when asked and allowed.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size_bytes: u64,
    alignment: usize,
    direct: bool,
    is_block_device: bool,
    latched: AtomicBool,
}

impl FileBackend {
    /// Opens `path` read-write. With `direct`, tries O_DIRECT and falls back to
    /// buffered I/O where the file system refuses it.
    pub fn open(path: &Path, direct: bool) -> Result<FileBackend, BackendError> {
        let open_error = |source: io::Error| BackendError::Open {
            path: path.display().to_string(),
            source,
        };
        let (file, direct) = open_file(path, direct).map_err(open_error)?;
        let probe = probe(&file).map_err(open_error)?;
        let alignment = if direct {
            super::probe_direct_alignment(&file, probe.is_block_device)
        } else {
            1
        };
        Ok(FileBackend {
            file,
            size_bytes: probe.size_bytes,
            alignment,
            direct,
            is_block_device: probe.is_block_device,
            latched: AtomicBool::new(false),
        })
    }

    fn check_latch(&self) -> Result<(), BackendError> {
        if self.latched.load(Ordering::Acquire) {
            return Err(BackendError::Latched);
        }
        Ok(())
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

impl Backend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn alignment(&self) -> usize {
        self.alignment
    }

    fn kind(&self) -> &'static str {
        "pread"
    }

    fn is_direct(&self) -> bool {
        self.direct
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.check_latch()?;
        check_range(
            "read",
            offset,
            buf.len() as u64,
            self.size_bytes,
            self.alignment,
        )?;
        let read_error = |source| BackendError::Read {
            offset,
            len: buf.len(),
            source,
        };
        if self.direct && !is_aligned(buf, self.alignment) {
            let mut bounce = AlignedBuf::zeroed(buf.len(), self.alignment);
            self.file
                .read_exact_at(&mut bounce, offset)
                .map_err(read_error)?;
            buf.copy_from_slice(&bounce);
            return Ok(());
        }
        let len = buf.len();
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| BackendError::Read {
                offset,
                len,
                source,
            })
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        self.check_latch()?;
        check_range(
            "write",
            offset,
            buf.len() as u64,
            self.size_bytes,
            self.alignment,
        )?;
        let write_error = |source| BackendError::Write {
            offset,
            len: buf.len(),
            source,
        };
        if self.direct && !is_aligned(buf, self.alignment) {
            let bounce = AlignedBuf::copy_from(buf, self.alignment);
            return self.file.write_all_at(&bounce, offset).map_err(write_error);
        }
        self.file.write_all_at(buf, offset).map_err(write_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check_latch()?;
        check_range("write_zeroes", offset, len, self.size_bytes, self.alignment)?;
        if len == 0 {
            return Ok(());
        }
        if !self.is_block_device {
            // SAFETY: fallocate takes a valid descriptor and plain integers.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_ZERO_RANGE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc == 0 {
                return Ok(());
            }
        }
        super::write_zeroes_by_writing(self, offset, len)
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.check_latch()?;
        if let Err(source) = self.file.sync_data() {
            self.latched.store(true, Ordering::Release);
            return Err(BackendError::Flush { source });
        }
        Ok(())
    }
}
