//! Errors of the engine's two faces: opening/creating a store, and I/O on an open volume.

use std::sync::Arc;

use crate::backend::BackendError;
use crate::layout::LayoutError;
use crate::superblock::SuperblockError;

/// Errors from `create`, `open`, `close` and metadata updates.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("no replicad metadata found on this store (run create-md first)")]
    NoMetadata,
    #[error("snapshot area: {0}")]
    Snapshots(String),
    #[error("metadata is unreadable: {0}")]
    BadMetadata(#[from] SuperblockError),
    #[error("store already holds replicad metadata; use --force to overwrite it")]
    MetadataExists,
    #[error("store belongs to resource {found}, not {expected}")]
    WrongResource { expected: String, found: String },
    #[error("store geometry changed: metadata says {field} = {recorded}, the store now gives {actual} (was the device resized or replaced?)")]
    GeometryMismatch {
        field: &'static str,
        recorded: u64,
        actual: u64,
    },
    #[error("volume is failed: {0}")]
    Failed(String),
}

/// Errors of reads, writes and flushes on an open volume. Cheap to clone (one error
/// may fail many waiting requests).
#[derive(Debug, Clone, thiserror::Error)]
pub enum IoError {
    #[error("{op} of {length} bytes at offset {offset} is beyond the end of the volume ({size_bytes} bytes)")]
    OutOfRange {
        op: &'static str,
        offset: u64,
        length: u64,
        size_bytes: u64,
    },
    #[error("{op} of {length} bytes is larger than the limit of {limit} bytes")]
    TooLarge {
        op: &'static str,
        length: u64,
        limit: u64,
    },
    #[error("zero-length {op}")]
    ZeroLength { op: &'static str },
    #[error(
        "checksum mismatch in block {block}: stored {stored:#010x}, data has {computed:#010x}"
    )]
    Checksum {
        block: u64,
        stored: u32,
        computed: u32,
    },
    #[error("storage I/O failed: {0}")]
    Backend(Arc<BackendError>),
    #[error("volume is failed: {0}")]
    Failed(Arc<str>),
    #[error("volume is closing")]
    Closed,
    #[error("replicated record rejected: {0}")]
    BadRecord(Arc<str>),
    /// Manual mode only (see `volume::Background::Manual`): the call would have to
    /// wait for something no inline work can bring about (typically a journal full of
    /// records held for the peer's acknowledgement). Nothing was lost; retry after the
    /// driver has made that happen.
    #[error("cannot go on without outside progress: {0}")]
    Stalled(&'static str),
}

impl IoError {
    /// The errno a client should see.
    pub fn errno(&self) -> i32 {
        match self {
            IoError::OutOfRange { op, .. } if *op == "write" => libc::ENOSPC,
            IoError::OutOfRange { .. } | IoError::ZeroLength { .. } | IoError::BadRecord(_) => {
                libc::EINVAL
            }
            IoError::TooLarge { .. } => libc::EOVERFLOW,
            IoError::Checksum { .. } | IoError::Failed(_) => libc::EIO,
            IoError::Backend(error) => error.errno(),
            IoError::Closed => libc::ESHUTDOWN,
            IoError::Stalled(_) => libc::EAGAIN,
        }
    }
}

impl From<BackendError> for IoError {
    fn from(error: BackendError) -> IoError {
        IoError::Backend(Arc::new(error))
    }
}
