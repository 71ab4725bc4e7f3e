//! Storage backends: one small, blocking trait and its implementations.
//!
//! The engine reaches a backing store (block device or image file) only through
//! [`Backend`]. Every implementation passes the same conformance suite
//! (`engine/tests/backend_conformance.rs`):
//!
//! * [`file::FileBackend`] — portable `pread`/`pwrite`/`fdatasync`, buffered or O_DIRECT.
//! * [`uring::UringBackend`] — io_uring; batches (`read_many`/`write_many`) run in
//!   parallel inside the kernel, bounded by the ring size.
//! * [`sim::SimBackend`] — in memory, keeps a *live* and a *durable* image and builds
//!   what a power cut leaves behind; used by the crash-consistency tests.
//!
//! Fault model: any call may fail with an I/O error. After a failed `flush` the
//! backend *latches* (every later call fails with [`BackendError::Latched`]): a failed
//! fdatasync may have dropped dirty pages, so retrying it could report success for data
//! that is gone (the "fsyncgate" lesson). Offsets and lengths must be multiples of
//! [`Backend::alignment`]; buffers may sit anywhere in memory (backends that need
//! aligned memory bounce through an [`AlignedBuf`]).

mod aligned;
pub use aligned::is_aligned;
pub mod file;
pub mod sim;
mod store;
pub mod uring;

use std::fmt;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

pub use aligned::AlignedBuf;

/// Errors of the storage layer. Each variant names the failed operation.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot open store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("read of {len} bytes at offset {offset} failed: {source}")]
    Read {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("write of {len} bytes at offset {offset} failed: {source}")]
    Write {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("flush (fdatasync) failed: {source}")]
    Flush {
        #[source]
        source: io::Error,
    },
    #[error("{op} of {len} bytes at offset {offset} is outside the store ({size_bytes} bytes)")]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: u64,
        size_bytes: u64,
    },
    #[error("{op} of {len} bytes at offset {offset} is not aligned to {alignment} bytes")]
    Unaligned {
        op: &'static str,
        offset: u64,
        len: u64,
        alignment: usize,
    },
    #[error("store refused I/O after an earlier flush failure (the error latches)")]
    Latched,
}

impl BackendError {
    /// The errno to report to a client for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            BackendError::Open { source, .. }
            | BackendError::Read { source, .. }
            | BackendError::Write { source, .. }
            | BackendError::Flush { source } => source.raw_os_error().unwrap_or(libc::EIO),
            BackendError::OutOfRange { .. } | BackendError::Unaligned { .. } => libc::EINVAL,
            BackendError::Latched => libc::EIO,
        }
    }
}

/// One write of a batch: `buf` goes to `offset`.
#[derive(Debug, Clone, Copy)]
pub struct WriteOp<'a> {
    pub offset: u64,
    pub buf: &'a [u8],
}

/// One read of a batch: `buf.len()` bytes from `offset` into `buf`.
#[derive(Debug)]
pub struct ReadOp<'a> {
    pub offset: u64,
    pub buf: &'a mut [u8],
}

/// A backing store. All calls block until the I/O is complete.
///
/// Operations in one `*_many` batch are independent: their order of completion is
/// unspecified, so a batch must not contain two writes that overlap.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Usable size in bytes (a multiple of [`Backend::alignment`]).
    fn size_bytes(&self) -> u64;
    /// Granularity that offsets and lengths must respect (1, 512 or 4096).
    fn alignment(&self) -> usize;
    /// Short name for logs and status (`pread`, `io_uring`, `sim`).
    fn kind(&self) -> &'static str;
    /// Whether I/O bypasses the page cache (O_DIRECT).
    fn is_direct(&self) -> bool {
        false
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError>;
    /// Several reads; a backend may run them concurrently. Every op is checked before
    /// any runs, so a bad op fails the batch without touching the store.
    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> Result<(), BackendError> {
        let ranges = ops.iter().map(ReadOp::range);
        check_batch("read", ranges, self.size_bytes(), self.alignment())?;
        for op in ops.iter_mut() {
            self.read_at(op.offset, op.buf)?;
        }
        Ok(())
    }
    /// Several non-overlapping writes; a backend may run them concurrently. Every op is
    /// checked before any runs, so a bad op fails the batch with nothing written.
    fn write_many(&self, ops: &[WriteOp<'_>]) -> Result<(), BackendError> {
        let ranges = ops.iter().map(WriteOp::range);
        check_batch("write", ranges, self.size_bytes(), self.alignment())?;
        for op in ops {
            self.write_at(op.offset, op.buf)?;
        }
        Ok(())
    }
    /// Writes `parts` back to back from `offset` (one `pwritev` where the backend can).
    /// The total length must respect the alignment; the parts need not.
    fn write_vectored_at(&self, offset: u64, parts: &[&[u8]]) -> Result<(), BackendError> {
        let total: usize = parts.iter().map(|part| part.len()).sum();
        let mut joined = AlignedBuf::zeroed(total, self.alignment().max(1));
        let mut at = 0;
        for part in parts {
            joined[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        self.write_at(offset, &joined)
    }
    /// Whether `[offset, offset+len)` is known to read as zeroes without reading it
    /// (a hole of an image file). `false` means "not known", never "not zero".
    fn is_hole(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Make `[offset, offset+len)` read back as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        write_zeroes_by_writing(self, offset, len)
    }
    /// Make every completed write durable (fdatasync). Latches on failure.
    fn flush(&self) -> Result<(), BackendError>;
}

/// Writes zero buffers: the portable fallback of [`Backend::write_zeroes`].
///
/// The range is checked first, so a bad range writes nothing. The zeroes go out as
/// batches of [`WriteOp`]s that share one aligned zero buffer, so a backend that runs
/// batches concurrently zeroes in parallel; memory stays bounded by one chunk.
pub fn write_zeroes_by_writing<B: Backend + ?Sized>(
    backend: &B,
    offset: u64,
    len: u64,
) -> Result<(), BackendError> {
    const CHUNK_BYTES: u64 = 1 << 20;
    const CHUNKS_PER_BATCH: u64 = 64;
    const _: () = assert!(CHUNK_BYTES % 4096 == 0);
    check_range(
        "write_zeroes",
        offset,
        len,
        backend.size_bytes(),
        backend.alignment(),
    )?;
    if len == 0 {
        return Ok(());
    }
    // At most one chunk (1 MiB), so the cast cannot truncate.
    let zeros = AlignedBuf::zeroed(len.min(CHUNK_BYTES) as usize, 4096);
    let mut ops = Vec::with_capacity(CHUNKS_PER_BATCH as usize);
    let mut done = 0u64;
    while done < len {
        ops.clear();
        while done < len && (ops.len() as u64) < CHUNKS_PER_BATCH {
            let chunk = (len - done).min(CHUNK_BYTES);
            ops.push(WriteOp {
                offset: offset + done,
                buf: &zeros[..chunk as usize],
            });
            done += chunk;
        }
        backend.write_many(&ops)?;
    }
    Ok(())
}

/// Checks an I/O range against the store size and alignment, with checked arithmetic.
pub fn check_range(
    op: &'static str,
    offset: u64,
    len: u64,
    size_bytes: u64,
    alignment: usize,
) -> Result<(), BackendError> {
    let end = offset.checked_add(len);
    if end.is_none_or(|end| end > size_bytes) {
        return Err(BackendError::OutOfRange {
            op,
            offset,
            len,
            size_bytes,
        });
    }
    let alignment_u64 = alignment as u64;
    if offset % alignment_u64 != 0 || len % alignment_u64 != 0 {
        return Err(BackendError::Unaligned {
            op,
            offset,
            len,
            alignment,
        });
    }
    Ok(())
}

/// Checks every `(offset, len)` of a batch with [`check_range`] before any of it runs;
/// the first bad one is the error.
pub fn check_batch(
    op: &'static str,
    ranges: impl IntoIterator<Item = (u64, u64)>,
    size_bytes: u64,
    alignment: usize,
) -> Result<(), BackendError> {
    ranges
        .into_iter()
        .try_for_each(|(offset, len)| check_range(op, offset, len, size_bytes, alignment))
}

impl WriteOp<'_> {
    /// The op's `(offset, len)`, as [`check_batch`] takes it.
    pub fn range(&self) -> (u64, u64) {
        (self.offset, self.buf.len() as u64)
    }
}

impl ReadOp<'_> {
    /// The op's `(offset, len)`, as [`check_batch`] takes it.
    pub fn range(&self) -> (u64, u64) {
        (self.offset, self.buf.len() as u64)
    }
}

/// Which implementation to open a store with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// io_uring for O_DIRECT stores (it wins on batches there), `pread` for buffered
    /// ones (buffered io_uring writes are punted to kernel workers and measured
    /// slower than `pwrite` on ext4; see `examples/backend_speed.rs`).
    #[default]
    Auto,
    /// Portable `pread`/`pwrite`.
    Pread,
    /// io_uring, falling back to `pread` when the kernel refuses a ring.
    Uring,
}

/// How to open a store.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub kind: BackendKind,
    /// Ask for O_DIRECT; silently buffered where the file system refuses it (tmpfs).
    pub direct: bool,
}

/// Opens a block device or image file as a backend.
pub fn open(path: &Path, options: OpenOptions) -> Result<Arc<dyn Backend>, BackendError> {
    let kind = match options.kind {
        BackendKind::Auto if options.direct => BackendKind::Uring,
        BackendKind::Auto => BackendKind::Pread,
        explicit => explicit,
    };
    match kind {
        BackendKind::Pread | BackendKind::Auto => {
            Ok(Arc::new(file::FileBackend::open(path, options.direct)?))
        }
        BackendKind::Uring => match uring::UringBackend::open(path, options.direct) {
            Ok(backend) => Ok(Arc::new(backend)),
            Err(BackendError::Open { source, .. })
                if source.raw_os_error() == Some(libc::ENOSYS)
                    || source.raw_os_error() == Some(libc::EPERM) =>
            {
                tracing::warn!("io_uring unavailable ({source}); using pread/pwrite");
                Ok(Arc::new(file::FileBackend::open(path, options.direct)?))
            }
            Err(error) => Err(error),
        },
    }
}

/// What [`probe`] learns about a path before opening it.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub size_bytes: u64,
    pub is_block_device: bool,
}

/// Size of a regular file or block device (BLKGETSIZE64), rounded down to 4 KiB.
pub fn probe(file: &std::fs::File) -> io::Result<Probe> {
    use std::os::unix::io::AsRawFd;
    let metadata = file.metadata()?;
    let is_block_device = metadata.file_type().is_block_device();
    let size_bytes = if is_block_device {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a
        // live, properly aligned u64 for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        size
    } else if metadata.file_type().is_file() {
        metadata.len()
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        ));
    };
    Ok(Probe {
        size_bytes: size_bytes & !4095,
        is_block_device,
    })
}

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 104)`: logical sector size of a block device.
const BLKSSZGET: libc::c_ulong = 0x1268;

/// Alignment O_DIRECT needs on this file: statx DIOALIGN where the kernel reports it,
/// the logical sector size for block devices, else 4096 (always sufficient).
pub fn probe_direct_alignment(file: &std::fs::File, is_block_device: bool) -> usize {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: statx fills the zero-initialised struct we pass; the path is an empty,
    // NUL-terminated string used with AT_EMPTY_PATH on a valid descriptor.
    let mut statx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    let rc = unsafe {
        libc::statx(
            fd,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut statx,
        )
    };
    if rc == 0 && statx.stx_mask & libc::STATX_DIOALIGN != 0 {
        let offset_align = statx.stx_dio_offset_align as usize;
        let memory_align = statx.stx_dio_mem_align as usize;
        let align = offset_align.max(memory_align);
        if align.is_power_of_two() && align <= 4096 {
            return align.max(512);
        }
    }
    if is_block_device {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer to a live local.
        let rc = unsafe { libc::ioctl(fd, BLKSSZGET, &mut sector as *mut libc::c_int) };
        if rc == 0 && sector > 0 && (sector as usize).is_power_of_two() {
            return sector as usize;
        }
    }
    4096
}
