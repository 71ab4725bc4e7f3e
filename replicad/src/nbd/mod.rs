//! The NBD server: serves exports to real NBD clients (qemu, libnbd tools, fio, the
//! kernel's `nbd-client`) over TCP or unix sockets.
//!
//! # Layers
//!
//! - [`proto`]: constants and a pure codec of the wire format (no I/O). Every parser takes
//!   `&[u8]` and returns a typed value or a [`proto::ProtocolError`]; none panics on any
//!   input.
//! - [`server`]: the tokio driver. [`server::serve`] accepts connections, runs the fixed
//!   newstyle handshake and then the transmission phase, one reader task and one writer
//!   task per connection, with one task per request in flight.
//!
//! # What is supported
//!
//! Options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT`; commands `READ`, `WRITE`, `FLUSH`, `TRIM`,
//! `WRITE_ZEROES`, `BLOCK_STATUS` and `DISC`. Without structured replies every reply is a
//! simple reply; with them, reads are one `OFFSET_DATA` chunk (still zero-copy), errors
//! are `ERROR` chunks, and `BLOCK_STATUS` answers one chunk per selected metadata context:
//! `base:allocation` on every export, plus whatever [`Export::meta_contexts`] lists
//! (e.g. `qemu:dirty-bitmap:NAME`). The query syntax is documented in `handshake.rs`. No
//! TLS, no extended headers, no `NBD_CMD_FLAG_DF`, no `CACHE`.
//! - [`Export`] / [`ExportSet`]: the boundary to the storage behind the server (the
//!   replicated volume). [`MemoryExport`] is a RAM-backed implementation for tests and
//!   demos.
//!
//! # The export boundary
//!
//! The server knows nothing of replication, journals or disks: it sees an [`Export`] with a
//! size and six asynchronous operations (five of them required). In return it promises the export:
//!
//! - **Every request is in range.** Offsets and lengths are checked against
//!   [`Export::size_bytes`] with checked arithmetic before the export is called, so
//!   `offset + length <= size_bytes()` always holds and never overflows.
//! - **Payloads are bounded.** `read` and `write` are never called with more than
//!   [`proto::MAX_PAYLOAD_BYTES`] (32 MiB). `trim` and `write_zeroes` carry no payload and
//!   may cover up to `u32::MAX` bytes.
//! - **Only whole payloads arrive.** A client that disconnects in the middle of a write
//!   payload never reaches [`Export::write`].
//! - **Writes are checked against [`Export::is_writable`] per request**, and refused with
//!   `EPERM` when it is false. The check races with a demotion, so an export must still
//!   refuse writes itself once it is no longer writable. An export whose
//!   [`Export::read_only`] is true (read once per connection) never sees a write, trim or
//!   write-zeroes, and clients see `NBD_FLAG_READ_ONLY`.
//! - **Block status is asked only for contexts the export offered** (`base:allocation`
//!   or a name from [`Export::meta_contexts`] at handshake time), with `length >= 1`,
//!   and the server cleans the answer (see [`Export::block_status`]).
//! - **Alignment.** Offsets and lengths are multiples of [`Export::minimum_block_size`].
//! - **Requests run concurrently and complete in any order.** The server calls the export
//!   from many tasks at once; replies go out in completion order. Overlapping requests in
//!   flight at the same time have no defined order (the NBD protocol leaves that to the
//!   client).
//! - **Futures run to completion.** The server never drops an export future it started,
//!   even when the client disconnects or the server shuts down, so an export can keep
//!   state across an `.await` without cancellation safety concerns.
//!
//! And the export promises the server:
//!
//! - [`Export::flush`] makes durable every write, trim and write-zeroes whose future has
//!   completed before `flush` was called. A write with `fua == true` is durable when its
//!   future completes.
//! - [`Export::read`] returns exactly `length` bytes or an error.
//! - [`Export::can_multi_conn`] is true only if a flush on one connection makes every
//!   connection's completed writes durable (the `NBD_FLAG_CAN_MULTI_CONN` promise).
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use replicad::nbd::{self, ExportMap, MemoryExport};
//!
//! # async fn example() -> std::io::Result<()> {
//! let exports = Arc::new(ExportMap::single("r0", Arc::new(MemoryExport::new(1 << 30))));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
//! let shutdown = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! nbd::serve(listener, exports, shutdown).await
//! # }
//! ```
//!
//! # Fault model
//!
//! Clients are untrusted: malformed, truncated, oversized or out-of-range input gets the
//! error the NBD specification prescribes, or a closed connection, and never disturbs
//! other connections. Memory per connection is bounded (see [`server::ServerConfig`]).

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

mod handshake;
mod memory;
pub mod proto;
pub mod server;
mod transmission;

pub use memory::{ExportMap, MemoryExport};
pub use server::{serve, serve_with_config, spawn, Listener, ServerConfig, ServerHandle};

/// An errno value (`libc::EIO`, `libc::EPERM`, ...) returned by an export.
///
/// The server maps it to the NBD error values at the wire boundary
/// ([`proto::nbd_error_from_errno`]); errno values without an NBD counterpart become `EIO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const ESHUTDOWN: Errno = Errno(libc::ESHUTDOWN);
}

impl From<std::io::Error> for Errno {
    /// Keeps the OS error code; errors without one (e.g. `UnexpectedEof`) become `EIO`.
    fn from(error: std::io::Error) -> Errno {
        Errno(error.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

/// What the server needs from one export. See the module documentation for the contract
/// in both directions.
pub trait Export: Send + Sync + 'static {
    /// The size of the export in bytes. Must not change while clients are connected.
    fn size_bytes(&self) -> u64;

    /// Checked per request: a node may be demoted while clients stay connected, and its
    /// writes are then refused with `EPERM`.
    fn is_writable(&self) -> bool;

    /// True only if a FLUSH on one connection makes every connection's completed writes
    /// durable.
    fn can_multi_conn(&self) -> bool;

    /// Resolves when the export's data stops being worth serving after this call (a
    /// Secondary whose disk went Inconsistent as a resync target): the connection
    /// that asked is closed rather than shown a half-synced image. The server asks
    /// once per connection, when its transmission phase begins. Never, by default.
    fn unservable(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// The smallest addressable unit: a power of two from 1 to 65536. The server refuses
    /// unaligned requests with `EINVAL`, and advertises this value to clients that ask
    /// for block size constraints. Defaults to 1 (any alignment).
    fn minimum_block_size(&self) -> u32 {
        1
    }

    /// Reads exactly `length` bytes at `offset`. The bytes are written to the socket
    /// from the returned buffer without a copy; `Bytes::from_owner` turns any owned
    /// buffer (e.g. an aligned O_DIRECT buffer) into `Bytes` without copying it.
    fn read(&self, offset: u64, length: u32) -> impl Future<Output = Result<Bytes, Errno>> + Send;

    /// Writes `data` at `offset`; with `fua`, the data is durable when the future
    /// completes. `data` is the buffer the payload was received into (no copy); it has
    /// no particular alignment.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<(), Errno>> + Send;

    /// Discards a range: its contents are undefined until it is written again.
    fn trim(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>> + Send;

    /// Writes zeroes over a range; the range reads back as zeroes afterwards.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), Errno>> + Send;

    /// Whether the export is read-only for its whole life. The server advertises
    /// `NBD_FLAG_READ_ONLY` and refuses writes, trims and write-zeroes with `EPERM` without
    /// calling the export. Unlike [`Export::is_writable`] this is read once per
    /// connection, at the end of the handshake. False by default.
    fn read_only(&self) -> bool {
        false
    }

    /// The metadata contexts this export answers besides [`BASE_ALLOCATION`] (which every
    /// export answers), e.g. `"qemu:dirty-bitmap:nightly"`. Each name is a namespace, a
    /// colon and a leaf name, at most 4096 bytes without NUL; the server ignores names
    /// that are not. Read during the handshake, so the list may change between
    /// connections. None by default.
    fn meta_contexts(&self) -> Vec<String> {
        Vec::new()
    }

    /// The block status of `[offset, offset + length)` in `context`, which is
    /// [`BASE_ALLOCATION`] or a name from [`Export::meta_contexts`]. `length` is at least 1
    /// and the range is in bounds and aligned like every request.
    ///
    /// Returns extents that cover a non-empty prefix of the range, in order, each of
    /// non-zero length and a multiple of [`Export::minimum_block_size`]. The server merges
    /// neighbours with equal flags, cuts the answer at the end of the range (and at the
    /// first extent with `NBD_CMD_FLAG_REQ_ONE`), stops at the first misaligned or empty
    /// extent, and fails the request with `EIO` if nothing valid is left.
    ///
    /// By default `base:allocation` is one extent of the whole range with flags 0 (data,
    /// contents unknown), which is always true; any other context is `EINVAL`.
    fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = Result<Vec<Extent>, Errno>> + Send {
        let _ = offset;
        let answer = if context == BASE_ALLOCATION {
            Ok(vec![Extent { length, flags: 0 }])
        } else {
            Err(Errno::EINVAL)
        };
        std::future::ready(answer)
    }
}

/// The metadata context every export answers (`NBD_STATE_HOLE`, `NBD_STATE_ZERO`).
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation`: the extent is not allocated (`NBD_STATE_HOLE`).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the extent reads as zeroes (`NBD_STATE_ZERO`).
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*`: the extent is dirty in the bitmap.
pub const STATE_DIRTY: u32 = 1;

/// One extent of a block-status answer: `length` bytes sharing `flags`, whose meaning
/// depends on the metadata context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    pub flags: u32,
}

/// The exports a server offers, looked up by name during the handshake.
pub trait ExportSet: Send + Sync + 'static {
    type Export: Export;

    /// The export called `name`. The empty name asks for the default export, if the set
    /// has one.
    fn get(&self, name: &str) -> Option<Arc<Self::Export>>;

    /// The names listed to clients that send `NBD_OPT_LIST`.
    fn names(&self) -> Vec<String>;
}
