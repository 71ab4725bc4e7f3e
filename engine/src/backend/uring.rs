//! io_uring backend (placeholder until implemented: reports ENOSYS so `open` falls back).

use std::io;
use std::path::Path;

use super::BackendError;

#[derive(Debug)]
pub struct UringBackend;

impl UringBackend {
    pub fn open(path: &Path, _direct: bool) -> Result<UringBackend, BackendError> {
        Err(BackendError::Open {
            path: path.display().to_string(),
            source: io::Error::from_raw_os_error(libc::ENOSYS),
        })
    }
}

impl super::Backend for UringBackend {
    fn size_bytes(&self) -> u64 {
        0
    }
    fn alignment(&self) -> usize {
        1
    }
    fn kind(&self) -> &'static str {
        "io_uring"
    }
    fn read_at(&self, _offset: u64, _buf: &mut [u8]) -> Result<(), BackendError> {
        Err(BackendError::Latched)
    }
    fn write_at(&self, _offset: u64, _buf: &[u8]) -> Result<(), BackendError> {
        Err(BackendError::Latched)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Err(BackendError::Latched)
    }
}
