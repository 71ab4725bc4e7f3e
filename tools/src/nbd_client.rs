//! An asynchronous, pipelined NBD client on tokio.
//!
//! Used by the write-verify checker and as the load generator of `replctl bench`, so it
//! is built for many requests in flight on one connection:
//!
//! - [`NbdClient`] is a cheap, clonable handle; any number of tasks may issue requests
//!   through clones of it at the same time.
//! - A *writer task* owns the socket's write half. Requests reach it through a channel
//!   and are written back to back; the buffer is flushed only when the channel is empty,
//!   so a burst of small requests costs one system call.
//! - A *reader task* owns the read half, parses replies and completes the waiter
//!   registered under the reply's cookie. Replies may arrive in any order.
//!
//! Handshake: fixed newstyle with `NBD_OPT_GO` (asking for `NBD_INFO_BLOCK_SIZE`), falling
//! back to `NBD_OPT_EXPORT_NAME` when the server answers `NBD_REP_ERR_UNSUP` or does not
//! speak fixed newstyle.
//!
//! Structured replies and metadata contexts are negotiated only when asked for
//! ([`ConnectOptions::structured_replies`], or a non-empty
//! [`ConnectOptions::meta_contexts`]): then `NBD_OPT_STRUCTURED_REPLY` and
//! `NBD_OPT_SET_META_CONTEXT` precede `NBD_OPT_GO`. A server that refuses either is still
//! used, without them; [`ExportInfo`] says what was negotiated. With structured replies,
//! reads are reassembled from `OFFSET_DATA` and `OFFSET_HOLE` chunks (overlaps, chunks
//! outside the request and missing bytes are protocol violations), error chunks fail the
//! request with their errno, and [`NbdClient::block_status`] answers one list of extents
//! per selected context. Without them every reply is a simple reply and a read's payload
//! length is the length the client asked for.
//!
//! Fault model and invariants:
//!
//! - Nothing the server sends is trusted: magics, cookies and option reply lengths are
//!   checked; a violation closes the connection with [`CloseReason::Protocol`].
//! - The number of requests in flight is bounded by [`ConnectOptions::max_in_flight`];
//!   further requests wait for a slot (back-pressure).
//! - When the connection ends for any reason (server closed it, I/O error, protocol
//!   violation, request timeout, client disconnect), every pending request fails at once
//!   with [`NbdError::Disconnected`] and so does every later one: nothing hangs.
//! - Connecting (TCP or unix connect plus the handshake) is bounded by
//!   [`ConnectOptions::connect_timeout`]. Each request is bounded by
//!   [`ConnectOptions::request_timeout`] when set; like the kernel's NBD client, a
//!   request that times out closes the whole connection, because its reply could still
//!   arrive later and the stream could not be resynchronised.
//! - A server error reply fails only its own request, with the errno in
//!   [`NbdError::Server`]; the connection stays usable.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};

use replicad::nbd::proto::{self as wire, ChunkError, StructuredReplyHeader};
pub use replicad::nbd::Extent;

/// The IANA-assigned NBD port, used when a `nbd://` URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// The largest read or write payload this client sends in one request. The NBD spec
/// lets servers refuse anything above 32 MiB, and a read buffer is allocated per request.
pub const MAX_PAYLOAD_BYTES: u32 = 32 * 1024 * 1024;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253; // oldstyle negotiation
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const HANDSHAKE_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const HANDSHAKE_FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_FLAG_ERROR: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Bound on one option reply's payload during the handshake (strings are at most 4 KiB).
const MAX_OPTION_REPLY_BYTES: u32 = 64 * 1024;
/// Bound on an export name, from the spec's limit on strings.
const MAX_EXPORT_NAME_BYTES: usize = 4096;
/// Bound on the replies to one option (exports listed, contexts selected).
const MAX_OPTION_REPLIES: usize = 4096;
/// Bound on the payload of a structured reply chunk that is not read data: block status
/// descriptors or an error message.
const MAX_CHUNK_PAYLOAD_BYTES: u32 = 8 * 1024 * 1024;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

const REQUEST_HEADER_BYTES: usize = 28;
const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
const SOCKET_BUFFER_BYTES: usize = 256 * 1024;

/// How long [`NbdClient::disconnect`] waits for in-flight requests and for the server to
/// close its end when no request timeout is configured.
const DEFAULT_DISCONNECT_WAIT: Duration = Duration::from_secs(30);

const ESHUTDOWN: u32 = 108;

/// The errno values the NBD spec defines, by name, for messages.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown errno",
    }
}

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP host name or IP literal (without brackets) and port.
    Tcp { host: String, port: u16 },
    /// A unix domain socket.
    Unix { path: PathBuf },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
            Endpoint::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A parsed NBD URI: `nbd://host[:port][/export]` or `nbd+unix:///[export]?socket=PATH`
/// (the subset of the NBD URI specification without TLS). The export name is
/// percent-decoded; an empty name selects the server's default export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub endpoint: Endpoint,
    pub export: String,
}

impl NbdUri {
    fn invalid(uri: &str, reason: impl Into<String>) -> NbdError {
        NbdError::InvalidUri {
            uri: uri.to_owned(),
            reason: reason.into(),
        }
    }
}

impl FromStr for NbdUri {
    type Err = NbdError;

    fn from_str(uri: &str) -> Result<Self, NbdError> {
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !path.is_empty() && !path.starts_with('/') {
                return Err(Self::invalid(uri, "nbd+unix URIs take no host"));
            }
            let export = percent_decode(path.strip_prefix('/').unwrap_or(path))
                .map_err(|reason| Self::invalid(uri, reason))?;
            let mut socket = None;
            for pair in query.split('&').filter(|pair| !pair.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                if key == "socket" {
                    let path =
                        percent_decode(value).map_err(|reason| Self::invalid(uri, reason))?;
                    socket = Some(PathBuf::from(path));
                }
            }
            let path = socket
                .filter(|path| !path.as_os_str().is_empty())
                .ok_or_else(|| Self::invalid(uri, "missing ?socket=PATH"))?;
            return Ok(NbdUri {
                endpoint: Endpoint::Unix { path },
                export,
            });
        }
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let rest = rest.split_once('?').map_or(rest, |(before, _)| before);
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
                let (host, after) = bracketed
                    .split_once(']')
                    .ok_or_else(|| Self::invalid(uri, "unclosed '[' in host"))?;
                match after {
                    "" => (host, None),
                    _ => match after.strip_prefix(':') {
                        Some(port) => (host, Some(port)),
                        None => return Err(Self::invalid(uri, "junk after ']'")),
                    },
                }
            } else {
                match authority.rsplit_once(':') {
                    Some((host, port)) => (host, Some(port)),
                    None => (authority, None),
                }
            };
            if host.is_empty() {
                return Err(Self::invalid(uri, "missing host"));
            }
            let port = match port {
                None | Some("") => DEFAULT_PORT,
                Some(port) => port
                    .parse::<u16>()
                    .map_err(|_| Self::invalid(uri, format!("bad port {port:?}")))?,
            };
            let export = percent_decode(path).map_err(|reason| Self::invalid(uri, reason))?;
            return Ok(NbdUri {
                endpoint: Endpoint::Tcp {
                    host: host.to_owned(),
                    port,
                },
                export,
            });
        }
        if uri.starts_with("nbds") {
            return Err(Self::invalid(uri, "TLS (nbds) is not supported"));
        }
        Err(Self::invalid(
            uri,
            "expected nbd://host[:port][/export] or nbd+unix:///export?socket=PATH",
        ))
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp { .. } => write!(
                f,
                "nbd://{}/{}",
                self.endpoint,
                percent_encode(&self.export)
            ),
            Endpoint::Unix { path } => write!(
                f,
                "nbd+unix:///{}?socket={}",
                percent_encode(&self.export),
                percent_encode(&path.to_string_lossy())
            ),
        }
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = bytes
                .get(index + 1..index + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {text:?}"))?;
            out.push(hex);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} does not decode to UTF-8"))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The transmission flags the server sent for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;

    fn has(self, flag: u16) -> bool {
        self.0 & flag != 0
    }
    pub fn read_only(self) -> bool {
        self.has(Self::READ_ONLY)
    }
    pub fn can_flush(self) -> bool {
        self.has(Self::SEND_FLUSH)
    }
    pub fn can_fua(self) -> bool {
        self.has(Self::SEND_FUA)
    }
    pub fn can_trim(self) -> bool {
        self.has(Self::SEND_TRIM)
    }
    pub fn can_write_zeroes(self) -> bool {
        self.has(Self::SEND_WRITE_ZEROES)
    }
    pub fn can_multi_conn(self) -> bool {
        self.has(Self::CAN_MULTI_CONN)
    }
    pub fn rotational(self) -> bool {
        self.has(Self::ROTATIONAL)
    }
}

/// Block size constraints from `NBD_INFO_BLOCK_SIZE`, when the server sent them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizeConstraints {
    pub minimum_bytes: u32,
    pub preferred_bytes: u32,
    pub maximum_bytes: u32,
}

/// What the handshake learned about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub export: String,
    pub size_bytes: u64,
    pub flags: TransmissionFlags,
    pub block_size: Option<BlockSizeConstraints>,
    /// Whether the export was opened with `NBD_OPT_GO` (false: `NBD_OPT_EXPORT_NAME`).
    pub opened_with_go: bool,
    /// Whether the server acknowledged `NBD_OPT_STRUCTURED_REPLY`.
    pub structured_replies: bool,
    /// The metadata contexts the server selected, in the order it sent them; empty when
    /// none were asked for or the server selected none.
    pub meta_contexts: Vec<MetaContext>,
}

/// A metadata context selected for the connection: the server's id for it and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    pub id: u32,
    pub name: String,
}

/// The answer of one metadata context to [`NbdClient::block_status`]: consecutive
/// extents from the requested offset on. They may cover less than the requested length
/// (ask again for the rest) and, without `REQ_ONE`, the last may reach beyond it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextStatus {
    pub context: String,
    pub extents: Vec<Extent>,
}

/// An NBD command, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    fn wire_type(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disconnect => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Read => "NBD_CMD_READ",
            Command::Write => "NBD_CMD_WRITE",
            Command::Disconnect => "NBD_CMD_DISC",
            Command::Flush => "NBD_CMD_FLUSH",
            Command::Trim => "NBD_CMD_TRIM",
            Command::WriteZeroes => "NBD_CMD_WRITE_ZEROES",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
        })
    }
}

/// Why a connection ended. Every request pending at that moment, and every later one,
/// fails with [`NbdError::Disconnected`] carrying this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The server closed the connection (EOF).
    ServerClosed,
    /// Reading or writing the socket failed (e.g. connection reset).
    Io {
        kind: io::ErrorKind,
        message: String,
    },
    /// The server broke the protocol (bad magic, unknown cookie, ...).
    Protocol(String),
    /// A request exceeded the request timeout, so the connection was closed.
    RequestTimedOut,
    /// [`NbdClient::disconnect`] was called.
    ClientDisconnected,
}

impl CloseReason {
    fn from_io(error: &io::Error) -> Self {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            CloseReason::ServerClosed
        } else {
            CloseReason::Io {
                kind: error.kind(),
                message: error.to_string(),
            }
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::ServerClosed => f.write_str("the server closed the connection"),
            CloseReason::Io { message, .. } => write!(f, "socket error: {message}"),
            CloseReason::Protocol(message) => {
                write!(f, "protocol violation by the server: {message}")
            }
            CloseReason::RequestTimedOut => f.write_str("a request timed out"),
            CloseReason::ClientDisconnected => f.write_str("the client disconnected"),
        }
    }
}

/// Everything that can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {endpoint} (with the handshake) timed out after {timeout:?}")]
    ConnectTimeout { endpoint: String, timeout: Duration },
    #[error("NBD handshake with {endpoint} failed: {reason}")]
    Handshake { endpoint: String, reason: String },
    #[error("I/O error during the NBD handshake with {endpoint}")]
    HandshakeIo {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("server {endpoint} refused export {export:?} (option reply {reply:#x}): {message}")]
    ExportRefused {
        endpoint: String,
        export: String,
        reply: u32,
        message: String,
    },
    #[error("server failed {command}: {} (errno {errno})", errno_name(*.errno))]
    Server { command: Command, errno: u32 },
    #[error("NBD connection closed: {reason}")]
    Disconnected { reason: CloseReason },
    #[error("{command} timed out after {timeout:?}; the connection was closed")]
    Timeout { command: Command, timeout: Duration },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the export does not support {0}")]
    Unsupported(&'static str),
}

impl NbdError {
    /// The errno of a server error reply.
    pub fn errno(&self) -> Option<u32> {
        match self {
            NbdError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether the error means the server went away (connection lost, request timed
    /// out, or the server is shutting down) rather than refusing one request.
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            NbdError::Disconnected { .. }
                | NbdError::Timeout { .. }
                | NbdError::Server {
                    errno: ESHUTDOWN,
                    ..
                }
        )
    }
}

/// Options for [`NbdClient::connect_with`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Bound on connecting plus the handshake.
    pub connect_timeout: Duration,
    /// Bound on each request from the moment it has a slot; `None` waits forever. A
    /// timeout closes the connection (see the module documentation).
    pub request_timeout: Option<Duration>,
    /// Most requests in flight at once; more wait for a slot.
    pub max_in_flight: usize,
    /// Negotiate structured replies even without metadata contexts.
    pub structured_replies: bool,
    /// Metadata contexts to select (e.g. `base:allocation`,
    /// `qemu:dirty-bitmap:NAME`) for [`NbdClient::block_status`]; non-empty implies
    /// structured replies.
    pub meta_contexts: Vec<String>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Some(Duration::from_secs(60)),
            max_in_flight: 256,
            structured_replies: false,
            meta_contexts: Vec::new(),
        }
    }
}

impl ConnectOptions {
    fn wants_structured_replies(&self) -> bool {
        self.structured_replies || !self.meta_contexts.is_empty()
    }
}

/// Flags for [`NbdClient::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// `NBD_CMD_FLAG_FUA`: reply only once the zeroes are on stable storage.
    pub fua: bool,
    /// `NBD_CMD_FLAG_NO_HOLE`: the server must allocate rather than punch a hole.
    pub no_hole: bool,
}

type BoxedReader = Box<dyn AsyncRead + Send + Unpin>;
type BoxedWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// One request on its way to the writer task.
struct Frame {
    header: [u8; REQUEST_HEADER_BYTES],
    payload: Option<Bytes>,
    is_disconnect: bool,
}

/// What a successful request answers.
enum Answer {
    /// Read data, or nothing for commands without a payload.
    Data(Bytes),
    /// Extents by context id, for `NBD_CMD_BLOCK_STATUS`.
    Extents(Vec<(u32, Vec<Extent>)>),
}

/// A request waiting for its reply. Holding the permit keeps the in-flight slot taken
/// until the reply arrives or the connection dies, even if the caller stopped waiting.
struct Pending {
    command: Command,
    flags: u16,
    offset: u64,
    /// The request's length (the bytes a READ expects).
    length: u32,
    reply: oneshot::Sender<Result<Answer, NbdError>>,
    _permit: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Table {
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    closed: Option<CloseReason>,
    disconnect_requested: bool,
}

/// State shared by the handles and both tasks.
struct Shared {
    table: Mutex<Table>,
    permits: Arc<Semaphore>,
    /// Flips to true once the connection is closed, to stop the writer task.
    closed_tx: watch::Sender<bool>,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        // The table is never left half-updated (no code in its critical sections
        // panics), so a poisoned lock still guards consistent data.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn closed_reason(&self) -> Option<CloseReason> {
        self.table().closed.clone()
    }

    fn disconnected(&self) -> NbdError {
        NbdError::Disconnected {
            reason: self
                .closed_reason()
                .unwrap_or(CloseReason::ClientDisconnected),
        }
    }

    /// Ends the connection: records the reason (the first one wins), fails every pending
    /// request and wakes everything that waits for a slot or for work.
    fn close(&self, reason: CloseReason) {
        let (reason, drained) = {
            let mut table = self.table();
            if table.closed.is_some() {
                return;
            }
            let reason = if table.disconnect_requested {
                CloseReason::ClientDisconnected
            } else {
                reason
            };
            table.closed = Some(reason.clone());
            (reason, std::mem::take(&mut table.pending))
        };
        self.permits.close();
        self.closed_tx.send_replace(true);
        for (_, pending) in drained {
            let _ = pending.reply.send(Err(NbdError::Disconnected {
                reason: reason.clone(),
            }));
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    frames: mpsc::UnboundedSender<Frame>,
    info: ExportInfo,
    options: ConnectOptions,
    reader: Mutex<Option<JoinHandle<()>>>,
    reader_abort: AbortHandle,
    writer_abort: AbortHandle,
}

impl Inner {
    fn shut_down(&self, reason: CloseReason) {
        self.shared.close(reason);
        self.reader_abort.abort();
        self.writer_abort.abort();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader_abort.abort();
        self.writer_abort.abort();
    }
}

/// A handle on one NBD connection. Clones share the connection; requests from all of
/// them are pipelined. See the module documentation for the fault model.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("info", &self.inner.info)
            .field("closed", &self.inner.shared.closed_reason())
            .finish()
    }
}

impl NbdClient {
    /// Connects to `uri` with default options.
    pub async fn connect(uri: &str) -> Result<Self, NbdError> {
        Self::connect_with(&uri.parse()?, ConnectOptions::default()).await
    }

    /// Connects to `uri`, performs the handshake and starts the reader and writer tasks.
    pub async fn connect_with(uri: &NbdUri, options: ConnectOptions) -> Result<Self, NbdError> {
        if options.max_in_flight == 0 || options.max_in_flight > Semaphore::MAX_PERMITS {
            return Err(NbdError::InvalidRequest(
                "max_in_flight out of range".to_owned(),
            ));
        }
        if uri.export.len() > MAX_EXPORT_NAME_BYTES {
            return Err(NbdError::InvalidRequest(
                "export name longer than 4096 bytes".to_owned(),
            ));
        }
        let endpoint = uri.endpoint.to_string();
        let connecting = async {
            match &uri.endpoint {
                Endpoint::Tcp { host, port } => {
                    let connect_error = |source| NbdError::Connect {
                        endpoint: endpoint.clone(),
                        source,
                    };
                    let mut stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(connect_error)?;
                    stream.set_nodelay(true).map_err(connect_error)?;
                    let info = handshake(&mut stream, &uri.export, &endpoint, &options).await?;
                    let (read_half, write_half) = stream.into_split();
                    Ok((
                        info,
                        Box::new(read_half) as BoxedReader,
                        Box::new(write_half) as BoxedWriter,
                    ))
                }
                Endpoint::Unix { path } => {
                    let mut stream =
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map_err(|source| NbdError::Connect {
                                endpoint: endpoint.clone(),
                                source,
                            })?;
                    let info = handshake(&mut stream, &uri.export, &endpoint, &options).await?;
                    let (read_half, write_half) = stream.into_split();
                    Ok((
                        info,
                        Box::new(read_half) as BoxedReader,
                        Box::new(write_half) as BoxedWriter,
                    ))
                }
            }
        };
        let (info, read_half, write_half) =
            tokio::time::timeout(options.connect_timeout, connecting)
                .await
                .map_err(|_| NbdError::ConnectTimeout {
                    endpoint: endpoint.clone(),
                    timeout: options.connect_timeout,
                })??;
        Ok(Self::start(info, read_half, write_half, options))
    }

    fn start(
        info: ExportInfo,
        read_half: BoxedReader,
        write_half: BoxedWriter,
        options: ConnectOptions,
    ) -> Self {
        let (closed_tx, closed_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::default()),
            permits: Arc::new(Semaphore::new(options.max_in_flight)),
            closed_tx,
        });
        let (frames, frames_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(reader_loop(
            BufReader::with_capacity(SOCKET_BUFFER_BYTES, read_half),
            shared.clone(),
            info.structured_replies,
            info.meta_contexts
                .iter()
                .map(|context| context.id)
                .collect(),
        ));
        let writer = tokio::spawn(writer_loop(
            frames_rx,
            BufWriter::with_capacity(SOCKET_BUFFER_BYTES, write_half),
            shared.clone(),
            closed_rx,
        ));
        NbdClient {
            inner: Arc::new(Inner {
                shared,
                frames,
                info,
                reader_abort: reader.abort_handle(),
                writer_abort: writer.abort_handle(),
                reader: Mutex::new(Some(reader)),
                options,
            }),
        }
    }

    /// What the handshake learned about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Why the connection ended, or `None` while it is open.
    pub fn closed(&self) -> Option<CloseReason> {
        self.inner.shared.closed_reason()
    }

    /// Requests sent and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.table().pending.len()
    }

    /// Reads `length` bytes at `offset`.
    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes, NbdError> {
        check_range(offset, u64::from(length))?;
        if length > MAX_PAYLOAD_BYTES {
            return Err(NbdError::InvalidRequest(format!(
                "read of {length} bytes exceeds {MAX_PAYLOAD_BYTES}"
            )));
        }
        match self.request(Command::Read, 0, offset, length, None).await? {
            Answer::Data(data) => Ok(data),
            Answer::Extents(_) => Err(self.inner.shared.disconnected()),
        }
    }

    /// `NBD_CMD_BLOCK_STATUS` of `[offset, offset + length)`: one [`ContextStatus`] per
    /// selected metadata context, in the order of [`ExportInfo::meta_contexts`]. Fails
    /// with [`NbdError::Unsupported`] when no context was selected.
    pub async fn block_status(
        &self,
        offset: u64,
        length: u32,
    ) -> Result<Vec<ContextStatus>, NbdError> {
        self.block_status_with(offset, length, false).await
    }

    /// [`NbdClient::block_status`] with `NBD_CMD_FLAG_REQ_ONE`: exactly one extent per
    /// context, no longer than `length`.
    pub async fn block_status_req_one(
        &self,
        offset: u64,
        length: u32,
    ) -> Result<Vec<ContextStatus>, NbdError> {
        self.block_status_with(offset, length, true).await
    }

    async fn block_status_with(
        &self,
        offset: u64,
        length: u32,
        req_one: bool,
    ) -> Result<Vec<ContextStatus>, NbdError> {
        if self.inner.info.meta_contexts.is_empty() {
            return Err(NbdError::Unsupported("NBD_CMD_BLOCK_STATUS"));
        }
        if length == 0 {
            return Err(NbdError::InvalidRequest(
                "block status of zero bytes".to_owned(),
            ));
        }
        check_range(offset, u64::from(length))?;
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        let answer = self
            .request(Command::BlockStatus, flags, offset, length, None)
            .await?;
        let Answer::Extents(mut by_id) = answer else {
            return Err(self.inner.shared.disconnected());
        };
        // The reader checked that every selected context answered exactly once.
        let mut statuses = Vec::with_capacity(by_id.len());
        for context in &self.inner.info.meta_contexts {
            if let Some(index) = by_id.iter().position(|(id, _)| *id == context.id) {
                let (_, extents) = by_id.swap_remove(index);
                statuses.push(ContextStatus {
                    context: context.name.clone(),
                    extents,
                });
            }
        }
        Ok(statuses)
    }

    /// Writes `data` at `offset`; with `fua`, the reply waits until the data is on
    /// stable storage.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdError> {
        let length = u32::try_from(data.len())
            .ok()
            .filter(|length| *length <= MAX_PAYLOAD_BYTES)
            .ok_or_else(|| {
                NbdError::InvalidRequest(format!(
                    "write of {} bytes exceeds {MAX_PAYLOAD_BYTES}",
                    data.len()
                ))
            })?;
        check_range(offset, u64::from(length))?;
        let flags = self.fua_flag(fua)?;
        self.request(Command::Write, flags, offset, length, Some(data))
            .await
            .map(drop)
    }

    /// Asks the server to make every write it has acknowledged durable.
    pub async fn flush(&self) -> Result<(), NbdError> {
        if !self.inner.info.flags.can_flush() {
            return Err(NbdError::Unsupported("NBD_CMD_FLUSH"));
        }
        self.request(Command::Flush, 0, 0, 0, None).await.map(drop)
    }

    /// Tells the server the range is no longer needed (its content becomes undefined).
    pub async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), NbdError> {
        if !self.inner.info.flags.can_trim() {
            return Err(NbdError::Unsupported("NBD_CMD_TRIM"));
        }
        check_range(offset, u64::from(length))?;
        let flags = self.fua_flag(fua)?;
        self.request(Command::Trim, flags, offset, length, None)
            .await
            .map(drop)
    }

    /// Writes zeroes over the range without sending them.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        zero_flags: ZeroFlags,
    ) -> Result<(), NbdError> {
        if !self.inner.info.flags.can_write_zeroes() {
            return Err(NbdError::Unsupported("NBD_CMD_WRITE_ZEROES"));
        }
        check_range(offset, u64::from(length))?;
        let mut flags = self.fua_flag(zero_flags.fua)?;
        if zero_flags.no_hole {
            flags |= CMD_FLAG_NO_HOLE;
        }
        self.request(Command::WriteZeroes, flags, offset, length, None)
            .await
            .map(drop)
    }

    /// Soft disconnect: waits (bounded) for in-flight requests, sends `NBD_CMD_DISC`,
    /// and waits (bounded) for the server to close the connection. Every handle is
    /// closed afterwards. Calling it again is a no-op.
    pub async fn disconnect(&self) -> Result<(), NbdError> {
        let shared = &self.inner.shared;
        match shared.closed_reason() {
            Some(CloseReason::ClientDisconnected) => return Ok(()),
            Some(reason) => return Err(NbdError::Disconnected { reason }),
            None => {}
        }
        let wait = self
            .inner
            .options
            .request_timeout
            .unwrap_or(DEFAULT_DISCONNECT_WAIT);
        // Taking every slot waits for the requests in flight and keeps new ones out.
        let slots = u32::try_from(self.inner.options.max_in_flight).unwrap_or(u32::MAX);
        let drained =
            tokio::time::timeout(wait, shared.permits.clone().acquire_many_owned(slots)).await;
        shared.table().disconnect_requested = true;
        if let Ok(Ok(_all_slots)) = drained {
            let header = encode_request(0, Command::Disconnect, 0, 0, 0);
            let frame = Frame {
                header,
                payload: None,
                is_disconnect: true,
            };
            if self.inner.frames.send(frame).is_ok() {
                let reader = self
                    .inner
                    .reader
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
                if let Some(reader) = reader {
                    // The reader ends when the server closes its side after NBD_CMD_DISC.
                    let _ =
                        tokio::time::timeout(self.inner.options.connect_timeout.min(wait), reader)
                            .await;
                }
            }
        }
        self.inner.shut_down(CloseReason::ClientDisconnected);
        Ok(())
    }

    fn fua_flag(&self, fua: bool) -> Result<u16, NbdError> {
        if !fua {
            return Ok(0);
        }
        if !self.inner.info.flags.can_fua() {
            return Err(NbdError::Unsupported("NBD_CMD_FLAG_FUA"));
        }
        Ok(CMD_FLAG_FUA)
    }

    async fn request(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
    ) -> Result<Answer, NbdError> {
        let shared = &self.inner.shared;
        let permit = shared
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| shared.disconnected())?;
        let (reply_tx, reply_rx) = oneshot::channel();
        let cookie = {
            let mut table = shared.table();
            if let Some(reason) = &table.closed {
                return Err(NbdError::Disconnected {
                    reason: reason.clone(),
                });
            }
            let cookie = table.next_cookie;
            table.next_cookie = table.next_cookie.wrapping_add(1);
            table.pending.insert(
                cookie,
                Pending {
                    command,
                    flags,
                    offset,
                    length,
                    reply: reply_tx,
                    _permit: permit,
                },
            );
            cookie
        };
        let frame = Frame {
            header: encode_request(flags, command, cookie, offset, length),
            payload,
            is_disconnect: false,
        };
        if self.inner.frames.send(frame).is_err() {
            shared.table().pending.remove(&cookie);
            return Err(shared.disconnected());
        }
        let reply = match self.inner.options.request_timeout {
            None => reply_rx.await,
            Some(timeout) => match tokio::time::timeout(timeout, reply_rx).await {
                Ok(reply) => reply,
                Err(_) => {
                    self.inner.shut_down(CloseReason::RequestTimedOut);
                    return Err(NbdError::Timeout { command, timeout });
                }
            },
        };
        // A dropped sender means the connection was torn down.
        reply.unwrap_or_else(|_| Err(shared.disconnected()))
    }
}

fn check_range(offset: u64, length: u64) -> Result<(), NbdError> {
    offset.checked_add(length).map(drop).ok_or_else(|| {
        NbdError::InvalidRequest(format!("offset {offset} + length {length} overflows"))
    })
}

fn encode_request(
    flags: u16,
    command: Command,
    cookie: u64,
    offset: u64,
    length: u32,
) -> [u8; REQUEST_HEADER_BYTES] {
    let mut header = [0u8; REQUEST_HEADER_BYTES];
    let mut cursor = &mut header[..];
    cursor.put_u32(REQUEST_MAGIC);
    cursor.put_u16(flags);
    cursor.put_u16(command.wire_type());
    cursor.put_u64(cookie);
    cursor.put_u64(offset);
    cursor.put_u32(length);
    header
}

async fn writer_loop(
    mut frames: mpsc::UnboundedReceiver<Frame>,
    mut sink: BufWriter<BoxedWriter>,
    shared: Arc<Shared>,
    mut closed: watch::Receiver<bool>,
) {
    let result: io::Result<()> = async {
        loop {
            let first = tokio::select! {
                frame = frames.recv() => frame,
                _ = closed.wait_for(|closed| *closed) => return Ok(()),
            };
            let Some(mut frame) = first else {
                // Every handle is gone: half-close so the server sees EOF.
                return sink.shutdown().await;
            };
            loop {
                sink.write_all(&frame.header).await?;
                if let Some(payload) = &frame.payload {
                    sink.write_all(payload).await?;
                }
                if frame.is_disconnect {
                    sink.flush().await?;
                    return sink.shutdown().await;
                }
                match frames.try_recv() {
                    Ok(next) => frame = next,
                    Err(_) => break,
                }
            }
            sink.flush().await?;
        }
    }
    .await;
    if let Err(error) = result {
        shared.close(CloseReason::from_io(&error));
    }
}

async fn reader_loop(
    mut source: BufReader<BoxedReader>,
    shared: Arc<Shared>,
    structured: bool,
    context_ids: Vec<u32>,
) {
    let mut assemblies: HashMap<u64, Assembly> = HashMap::new();
    let reason = loop {
        let mut magic = [0u8; 4];
        if let Err(error) = source.read_exact(&mut magic).await {
            break CloseReason::from_io(&error);
        }
        let step = match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => simple_reply(&mut source, &shared, structured, &assemblies).await,
            STRUCTURED_REPLY_MAGIC if structured => {
                structured_chunk(&mut source, &shared, &context_ids, &mut assemblies).await
            }
            STRUCTURED_REPLY_MAGIC => Err(CloseReason::Protocol(
                "structured reply although none was negotiated".to_owned(),
            )),
            magic => Err(CloseReason::Protocol(format!(
                "bad reply magic {magic:#010x}"
            ))),
        };
        if let Err(reason) = step {
            break reason;
        }
    };
    shared.close(reason);
}

/// Handles a simple reply whose magic was read.
async fn simple_reply(
    source: &mut BufReader<BoxedReader>,
    shared: &Shared,
    structured: bool,
    assemblies: &HashMap<u64, Assembly>,
) -> Result<(), CloseReason> {
    let mut rest = [0u8; SIMPLE_REPLY_HEADER_BYTES - 4];
    source
        .read_exact(&mut rest)
        .await
        .map_err(|error| CloseReason::from_io(&error))?;
    let errno = u32::from_be_bytes(array_at(&rest, 0));
    let cookie = u64::from_be_bytes(array_at(&rest, 4));
    if assemblies.contains_key(&cookie) {
        return Err(CloseReason::Protocol(format!(
            "simple reply in the middle of the structured reply to cookie {cookie}"
        )));
    }
    let Some(pending) = shared.table().pending.remove(&cookie) else {
        return Err(CloseReason::Protocol(format!(
            "reply for unknown cookie {cookie}"
        )));
    };
    let result = if errno != 0 {
        Err(NbdError::Server {
            command: pending.command,
            errno,
        })
    } else if structured && pending.command == Command::Read {
        // Its data could not be told apart from the next reply.
        let reason = CloseReason::Protocol(
            "successful simple reply to a READ after structured replies were negotiated".to_owned(),
        );
        let _ = pending.reply.send(Err(NbdError::Disconnected {
            reason: reason.clone(),
        }));
        return Err(reason);
    } else if pending.command == Command::BlockStatus {
        let reason =
            CloseReason::Protocol("simple reply to a successful NBD_CMD_BLOCK_STATUS".to_owned());
        let _ = pending.reply.send(Err(NbdError::Disconnected {
            reason: reason.clone(),
        }));
        return Err(reason);
    } else if pending.command == Command::Read && pending.length > 0 {
        match read_payload(source, pending.length).await {
            Ok(data) => Ok(Answer::Data(data)),
            Err(error) => {
                let reason = CloseReason::from_io(&error);
                let _ = pending.reply.send(Err(NbdError::Disconnected {
                    reason: reason.clone(),
                }));
                return Err(reason);
            }
        }
    } else {
        Ok(Answer::Data(Bytes::new()))
    };
    // The waiter may have given up (timeout, cancelled future): nothing to do then.
    let _ = pending.reply.send(result);
    Ok(())
}

/// The chunks of one structured reply received so far.
#[derive(Default)]
struct Assembly {
    /// A read answered by one chunk covering it all, received without a copy.
    whole: Option<Bytes>,
    /// A read answered piecewise: zero-filled, so holes need no writing.
    buffer: Option<BytesMut>,
    /// Byte ranges of the read covered so far (start to end, relative to its offset).
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    /// The first error chunk's errno.
    error: Option<u32>,
    /// Block status by context id.
    extents: Vec<(u32, Vec<Extent>)>,
}

impl Assembly {
    /// Records that `[start, end)` of the read is covered; refuses overlaps.
    fn cover(&mut self, start: u64, end: u64) -> Result<(), CloseReason> {
        let before = self.covered.range(..end).next_back();
        if before.is_some_and(|(_, &before_end)| before_end > start) || self.whole.is_some() {
            return Err(CloseReason::Protocol(format!(
                "read chunk [{start}, {end}) overlaps an earlier one"
            )));
        }
        self.covered.insert(start, end);
        self.covered_bytes += end - start;
        Ok(())
    }
}

/// What the reader needs to know about a request while its chunks arrive.
#[derive(Clone, Copy)]
struct RequestShape {
    command: Command,
    flags: u16,
    offset: u64,
    length: u32,
}

/// Handles a structured reply chunk whose magic was read.
async fn structured_chunk(
    source: &mut BufReader<BoxedReader>,
    shared: &Shared,
    context_ids: &[u32],
    assemblies: &mut HashMap<u64, Assembly>,
) -> Result<(), CloseReason> {
    let protocol = |message: String| CloseReason::Protocol(message);
    let io = |error: io::Error| CloseReason::from_io(&error);
    let mut raw = [0u8; wire::STRUCTURED_REPLY_HEADER_BYTES];
    raw[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    source.read_exact(&mut raw[4..]).await.map_err(io)?;
    let header = StructuredReplyHeader::parse(&raw)
        .map_err(|error| protocol(format!("bad chunk header: {error}")))?;
    let cookie = header.cookie;
    let request = {
        let table = shared.table();
        let pending = table
            .pending
            .get(&cookie)
            .ok_or_else(|| protocol(format!("chunk for unknown cookie {cookie}")))?;
        RequestShape {
            command: pending.command,
            flags: pending.flags,
            offset: pending.offset,
            length: pending.length,
        }
    };
    let assembly = assemblies.entry(cookie).or_default();
    let wrong_command = || {
        protocol(format!(
            "chunk type {} in reply to {}",
            header.reply_type, request.command
        ))
    };
    match header.reply_type {
        wire::REPLY_TYPE_OFFSET_DATA => {
            if request.command != Command::Read {
                return Err(wrong_command());
            }
            let mut prefix = [0u8; wire::OFFSET_DATA_PREFIX_BYTES];
            if header.length as usize <= prefix.len() {
                return Err(protocol(format!(
                    "OFFSET_DATA chunk of {} bytes",
                    header.length
                )));
            }
            source.read_exact(&mut prefix).await.map_err(io)?;
            let (offset, data_length) = wire::parse_offset_data_prefix(&prefix, header.length)
                .map_err(|error| protocol(error.to_string()))?;
            let (start, end) = chunk_range(request, offset, data_length)?;
            if assembly.covered.is_empty() && start == 0 && end == u64::from(request.length) {
                assembly.cover(start, end)?;
                assembly.whole = Some(read_payload(source, data_length).await.map_err(io)?);
            } else {
                assembly.cover(start, end)?;
                let buffer = read_buffer(assembly, request.length);
                source
                    .read_exact(&mut buffer[start as usize..end as usize])
                    .await
                    .map_err(io)?;
            }
        }
        wire::REPLY_TYPE_OFFSET_HOLE => {
            if request.command != Command::Read {
                return Err(wrong_command());
            }
            let payload = read_chunk_payload(source, header.length).await?;
            let (offset, hole_length) =
                wire::parse_offset_hole(&payload).map_err(|error| protocol(error.to_string()))?;
            let (start, end) = chunk_range(request, offset, hole_length)?;
            assembly.cover(start, end)?;
            // The buffer is zero-filled: a hole needs no writing.
            read_buffer(assembly, request.length);
        }
        wire::REPLY_TYPE_BLOCK_STATUS => {
            if request.command != Command::BlockStatus {
                return Err(wrong_command());
            }
            let payload = read_chunk_payload(source, header.length).await?;
            let (id, extents) =
                wire::parse_block_status(&payload).map_err(|error| protocol(error.to_string()))?;
            if !context_ids.contains(&id) {
                return Err(protocol(format!(
                    "block status for unselected context {id}"
                )));
            }
            if assembly.extents.iter().any(|(seen, _)| *seen == id) {
                return Err(protocol(format!(
                    "two block status chunks for context {id}"
                )));
            }
            if request.flags & CMD_FLAG_REQ_ONE != 0
                && (extents.len() != 1 || extents[0].length > request.length)
            {
                return Err(protocol(
                    "NBD_CMD_FLAG_REQ_ONE answered with more than one extent".to_owned(),
                ));
            }
            assembly.extents.push((id, extents));
        }
        wire::REPLY_TYPE_NONE => {
            if header.length != 0 || !header.is_done() {
                return Err(protocol(
                    "NONE chunk with a payload or without DONE".to_owned(),
                ));
            }
        }
        reply_type if header.is_error() => {
            let payload = read_chunk_payload(source, header.length).await?;
            let error = ChunkError::parse(reply_type, &payload)
                .map_err(|error| protocol(format!("bad error chunk: {error}")))?;
            assembly.error.get_or_insert(error.error);
        }
        reply_type => {
            return Err(protocol(format!("unknown chunk type {reply_type}")));
        }
    }
    if !header.is_done() {
        return Ok(());
    }
    let assembly = assemblies.remove(&cookie).unwrap_or_default();
    let Some(pending) = shared.table().pending.remove(&cookie) else {
        // The connection is being closed; the waiter already has its answer.
        return Ok(());
    };
    let result = finish(request, assembly, context_ids);
    let reason = match &result {
        Err(NbdError::Disconnected { reason }) => Some(reason.clone()),
        _ => None,
    };
    let _ = pending.reply.send(result);
    match reason {
        Some(reason) => Err(reason),
        None => Ok(()),
    }
}

/// The answer of a structured reply once its last chunk arrived.
fn finish(
    request: RequestShape,
    assembly: Assembly,
    context_ids: &[u32],
) -> Result<Answer, NbdError> {
    let violation = |message: String| NbdError::Disconnected {
        reason: CloseReason::Protocol(message),
    };
    if let Some(errno) = assembly.error {
        return Err(NbdError::Server {
            command: request.command,
            errno,
        });
    }
    match request.command {
        Command::Read => {
            if assembly.covered_bytes != u64::from(request.length) {
                return Err(violation(format!(
                    "read of {} bytes answered with {} bytes",
                    request.length, assembly.covered_bytes
                )));
            }
            Ok(Answer::Data(match (assembly.whole, assembly.buffer) {
                (Some(whole), _) => whole,
                (None, Some(buffer)) => buffer.freeze(),
                (None, None) => Bytes::new(),
            }))
        }
        Command::BlockStatus => {
            if assembly.extents.len() != context_ids.len() {
                return Err(violation(format!(
                    "block status answered {} of {} contexts",
                    assembly.extents.len(),
                    context_ids.len()
                )));
            }
            Ok(Answer::Extents(assembly.extents))
        }
        _ => Ok(Answer::Data(Bytes::new())),
    }
}

/// The range, relative to the read's offset, of a content chunk; it must lie within the
/// request.
fn chunk_range(request: RequestShape, offset: u64, length: u32) -> Result<(u64, u64), CloseReason> {
    let start = offset.checked_sub(request.offset);
    let end = start.and_then(|start| start.checked_add(u64::from(length)));
    match (start, end) {
        (Some(start), Some(end)) if end <= u64::from(request.length) => Ok((start, end)),
        _ => Err(CloseReason::Protocol(format!(
            "read chunk at {offset}+{length} outside the request {}+{}",
            request.offset, request.length
        ))),
    }
}

/// The zero-filled buffer of a piecewise read, allocated on first use.
fn read_buffer(assembly: &mut Assembly, read_length: u32) -> &mut BytesMut {
    assembly
        .buffer
        .get_or_insert_with(|| BytesMut::zeroed(read_length as usize))
}

/// Reads the payload of a chunk that is not read data, bounded by
/// [`MAX_CHUNK_PAYLOAD_BYTES`].
async fn read_chunk_payload(
    source: &mut BufReader<BoxedReader>,
    length: u32,
) -> Result<Bytes, CloseReason> {
    if length > MAX_CHUNK_PAYLOAD_BYTES {
        return Err(CloseReason::Protocol(format!(
            "chunk payload of {length} bytes"
        )));
    }
    read_payload(source, length)
        .await
        .map_err(|error| CloseReason::from_io(&error))
}

async fn read_payload(source: &mut BufReader<BoxedReader>, length: u32) -> io::Result<Bytes> {
    let length =
        usize::try_from(length).map_err(|_| io::Error::other("read length exceeds usize"))?;
    let mut data = BytesMut::with_capacity(length);
    while data.len() < length {
        let wanted = length - data.len();
        let read = source.read_buf(&mut (&mut data).limit(wanted)).await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(data.freeze())
}

/// What can end a handshake, before the endpoint is attached for the caller's error.
enum HandshakeFailure {
    Io(io::Error),
    Protocol(String),
    Refused { reply: u32, message: String },
}

impl From<io::Error> for HandshakeFailure {
    fn from(error: io::Error) -> Self {
        HandshakeFailure::Io(error)
    }
}

async fn handshake<S>(
    stream: &mut S,
    export: &str,
    endpoint: &str,
    options: &ConnectOptions,
) -> Result<ExportInfo, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    negotiate(stream, export, options)
        .await
        .map_err(|failure| match failure {
            HandshakeFailure::Io(source) => NbdError::HandshakeIo {
                endpoint: endpoint.to_owned(),
                source,
            },
            HandshakeFailure::Protocol(reason) => NbdError::Handshake {
                endpoint: endpoint.to_owned(),
                reason,
            },
            HandshakeFailure::Refused { reply, message } => NbdError::ExportRefused {
                endpoint: endpoint.to_owned(),
                export: export.to_owned(),
                reply,
                message,
            },
        })
}

async fn negotiate<S>(
    stream: &mut S,
    export: &str,
    options: &ConnectOptions,
) -> Result<ExportInfo, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (fixed, no_zeroes) = greeting(stream).await?;
    let mut structured_replies = false;
    let mut meta_contexts = Vec::new();
    if fixed && options.wants_structured_replies() {
        structured_replies = option_structured_reply(stream).await?;
        if structured_replies && !options.meta_contexts.is_empty() {
            meta_contexts = option_set_meta_context(stream, export, &options.meta_contexts).await?;
        }
    }
    let mut info = match fixed {
        true => option_go(stream, export).await?,
        false => None,
    };
    if info.is_none() {
        info = Some(option_export_name(stream, export, no_zeroes).await?);
    }
    let mut info = info.ok_or_else(|| HandshakeFailure::Protocol("no export".to_owned()))?;
    info.structured_replies = structured_replies;
    info.meta_contexts = meta_contexts;
    Ok(info)
}

/// Reads the greeting and sends the client flags; returns whether the server speaks
/// fixed newstyle and whether it omits the zeroes after `NBD_OPT_EXPORT_NAME`.
async fn greeting<S>(stream: &mut S) -> Result<(bool, bool), HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if stream.read_u64().await? != NBDMAGIC {
        return Err(HandshakeFailure::Protocol(
            "not an NBD server (no NBDMAGIC)".to_owned(),
        ));
    }
    match stream.read_u64().await? {
        IHAVEOPT => {}
        CLISERV_MAGIC => {
            return Err(HandshakeFailure::Protocol(
                "oldstyle negotiation is not supported".to_owned(),
            ));
        }
        other => {
            return Err(HandshakeFailure::Protocol(format!(
                "unknown negotiation magic {other:#x}"
            )))
        }
    }
    let handshake_flags = stream.read_u16().await?;
    let fixed = handshake_flags & HANDSHAKE_FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = handshake_flags & HANDSHAKE_FLAG_NO_ZEROES != 0;
    let mut client_flags = 0;
    if fixed {
        client_flags |= CLIENT_FLAG_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client_flags |= CLIENT_FLAG_NO_ZEROES;
    }
    stream.write_u32(client_flags).await?;
    Ok((fixed, no_zeroes))
}

/// Reads one option reply to `option`: its type and payload (bounded).
async fn read_option_reply<S>(
    stream: &mut S,
    option: u32,
) -> Result<(u32, Vec<u8>), HandshakeFailure>
where
    S: AsyncRead + Unpin,
{
    if stream.read_u64().await? != OPTION_REPLY_MAGIC {
        return Err(HandshakeFailure::Protocol(
            "bad option reply magic".to_owned(),
        ));
    }
    let replied = stream.read_u32().await?;
    let reply = stream.read_u32().await?;
    let length = stream.read_u32().await?;
    if replied != option {
        return Err(HandshakeFailure::Protocol(format!(
            "reply to option {replied} while option {option} was sent"
        )));
    }
    if length > MAX_OPTION_REPLY_BYTES {
        return Err(HandshakeFailure::Protocol(format!(
            "option reply of {length} bytes"
        )));
    }
    let mut payload = vec![0u8; length as usize];
    stream.read_exact(&mut payload).await?;
    Ok((reply, payload))
}

/// `NBD_OPT_STRUCTURED_REPLY`; true when acknowledged. Any error reply leaves simple
/// replies in place.
async fn option_structured_reply<S>(stream: &mut S) -> Result<bool, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(stream, OPT_STRUCTURED_REPLY, &[]).await?;
    match read_option_reply(stream, OPT_STRUCTURED_REPLY).await? {
        (REP_ACK, _) => Ok(true),
        (reply, _) if reply & REP_FLAG_ERROR != 0 => Ok(false),
        (reply, _) => Err(HandshakeFailure::Protocol(format!(
            "reply {reply:#x} to NBD_OPT_STRUCTURED_REPLY"
        ))),
    }
}

/// `NBD_OPT_SET_META_CONTEXT` for `export`; the contexts the server selected (none if it
/// refused).
async fn option_set_meta_context<S>(
    stream: &mut S,
    export: &str,
    queries: &[String],
) -> Result<Vec<MetaContext>, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut data = Vec::new();
    wire::MetaContextRequest {
        name: export,
        queries: queries.iter().map(String::as_str).collect(),
    }
    .encode(&mut data);
    send_option(stream, OPT_SET_META_CONTEXT, &data).await?;
    let mut contexts: Vec<MetaContext> = Vec::new();
    for _ in 0..MAX_OPTION_REPLIES {
        match read_option_reply(stream, OPT_SET_META_CONTEXT).await? {
            (REP_ACK, _) => return Ok(contexts),
            (REP_META_CONTEXT, payload) => {
                let (id, name) = wire::parse_rep_meta_context(&payload).map_err(|error| {
                    HandshakeFailure::Protocol(format!("bad NBD_REP_META_CONTEXT: {error}"))
                })?;
                if contexts.iter().any(|context| context.id == id) {
                    return Err(HandshakeFailure::Protocol(format!(
                        "metadata context id {id} given twice"
                    )));
                }
                contexts.push(MetaContext {
                    id,
                    name: name.to_owned(),
                });
            }
            // The selection is void; the connection goes on without contexts.
            (reply, _) if reply & REP_FLAG_ERROR != 0 => return Ok(Vec::new()),
            // Unknown non-error replies are skipped, as the spec allows new ones.
            _ => {}
        }
    }
    Err(HandshakeFailure::Protocol(
        "too many replies to NBD_OPT_SET_META_CONTEXT".to_owned(),
    ))
}

async fn send_option<S>(stream: &mut S, option: u32, data: &[u8]) -> Result<(), HandshakeFailure>
where
    S: AsyncWrite + Unpin,
{
    let length = u32::try_from(data.len())
        .map_err(|_| HandshakeFailure::Protocol("option data too long".to_owned()))?;
    let mut message = Vec::with_capacity(16 + data.len());
    message.put_u64(IHAVEOPT);
    message.put_u32(option);
    message.put_u32(length);
    message.put_slice(data);
    stream.write_all(&message).await?;
    stream.flush().await?;
    Ok(())
}

/// `NBD_OPT_GO`; `Ok(None)` when the server does not support it.
async fn option_go<S>(stream: &mut S, export: &str) -> Result<Option<ExportInfo>, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name_length = u32::try_from(export.len())
        .map_err(|_| HandshakeFailure::Protocol("export name too long".to_owned()))?;
    let mut data = Vec::with_capacity(8 + export.len());
    data.put_u32(name_length);
    data.put_slice(export.as_bytes());
    // One information request: the block size constraints.
    data.put_u16(1);
    data.put_u16(INFO_BLOCK_SIZE);
    send_option(stream, OPT_GO, &data).await?;

    let mut size_and_flags = None;
    let mut block_size = None;
    loop {
        let (reply, payload) = read_option_reply(stream, OPT_GO).await?;
        let length = payload.len();
        match reply {
            REP_ACK => break,
            REP_INFO => {
                let info_type = payload
                    .get(0..2)
                    .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]));
                match info_type {
                    Some(INFO_EXPORT) if payload.len() >= 12 => {
                        let size = u64::from_be_bytes(array_at(&payload, 2));
                        let flags = u16::from_be_bytes(array_at(&payload, 10));
                        size_and_flags = Some((size, flags));
                    }
                    Some(INFO_BLOCK_SIZE) if payload.len() >= 14 => {
                        block_size = Some(BlockSizeConstraints {
                            minimum_bytes: u32::from_be_bytes(array_at(&payload, 2)),
                            preferred_bytes: u32::from_be_bytes(array_at(&payload, 6)),
                            maximum_bytes: u32::from_be_bytes(array_at(&payload, 10)),
                        });
                    }
                    Some(INFO_EXPORT | INFO_BLOCK_SIZE) | None => {
                        return Err(HandshakeFailure::Protocol(format!(
                            "short NBD_REP_INFO of {length} bytes"
                        )));
                    }
                    // Information this client did not ask for is ignored.
                    Some(_) => {}
                }
            }
            REP_ERR_UNSUP => return Ok(None),
            error if error & REP_FLAG_ERROR != 0 => {
                return Err(HandshakeFailure::Refused {
                    reply: error,
                    message: String::from_utf8_lossy(&payload).into_owned(),
                });
            }
            // Unknown non-error replies are skipped, as the spec allows new ones.
            _ => {}
        }
    }
    let (size_bytes, flags) = size_and_flags.ok_or_else(|| {
        HandshakeFailure::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".to_owned())
    })?;
    Ok(Some(export_info(
        export, size_bytes, flags, block_size, true,
    )?))
}

async fn option_export_name<S>(
    stream: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(stream, OPT_EXPORT_NAME, export.as_bytes()).await?;
    // A server that does not have the export can only close the connection.
    let size_bytes = stream.read_u64().await.map_err(|error| {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeFailure::Refused {
                reply: 0,
                message:
                    "the server closed the connection after NBD_OPT_EXPORT_NAME (no such export?)"
                        .to_owned(),
            }
        } else {
            HandshakeFailure::Io(error)
        }
    })?;
    let flags = stream.read_u16().await?;
    if !no_zeroes {
        let mut reserved = [0u8; 124];
        stream.read_exact(&mut reserved).await?;
    }
    export_info(export, size_bytes, flags, None, false)
}

fn export_info(
    export: &str,
    size_bytes: u64,
    flags: u16,
    block_size: Option<BlockSizeConstraints>,
    opened_with_go: bool,
) -> Result<ExportInfo, HandshakeFailure> {
    if flags & TransmissionFlags::HAS_FLAGS == 0 {
        return Err(HandshakeFailure::Protocol(
            "transmission flags lack NBD_FLAG_HAS_FLAGS".to_owned(),
        ));
    }
    Ok(ExportInfo {
        export: export.to_owned(),
        size_bytes,
        flags: TransmissionFlags(flags),
        block_size,
        opened_with_go,
        structured_replies: false,
        meta_contexts: Vec::new(),
    })
}

/// The names of the exports a server lists (`NBD_OPT_LIST`), asked on a connection of
/// its own that ends with `NBD_OPT_ABORT`. The export part of `uri` is ignored. Bounded
/// by the default connect timeout.
pub async fn list_exports(uri: &str) -> Result<Vec<String>, NbdError> {
    let uri: NbdUri = uri.parse()?;
    let endpoint = uri.endpoint.to_string();
    let timeout = ConnectOptions::default().connect_timeout;
    let listing = async {
        let connect_error = |source| NbdError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let failure = |failure| match failure {
            HandshakeFailure::Io(source) => NbdError::HandshakeIo {
                endpoint: endpoint.clone(),
                source,
            },
            HandshakeFailure::Protocol(reason) => NbdError::Handshake {
                endpoint: endpoint.clone(),
                reason,
            },
            HandshakeFailure::Refused { reply, message } => NbdError::ExportRefused {
                endpoint: endpoint.clone(),
                export: String::new(),
                reply,
                message,
            },
        };
        match &uri.endpoint {
            Endpoint::Tcp { host, port } => {
                let mut stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(connect_error)?;
                list_on(&mut stream).await.map_err(failure)
            }
            Endpoint::Unix { path } => {
                let mut stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(connect_error)?;
                list_on(&mut stream).await.map_err(failure)
            }
        }
    };
    tokio::time::timeout(timeout, listing)
        .await
        .map_err(|_| NbdError::ConnectTimeout {
            endpoint: endpoint.clone(),
            timeout,
        })?
}

async fn list_on<S>(stream: &mut S) -> Result<Vec<String>, HandshakeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (fixed, _) = greeting(stream).await?;
    if !fixed {
        return Err(HandshakeFailure::Protocol(
            "the server does not speak fixed newstyle, so it cannot list exports".to_owned(),
        ));
    }
    send_option(stream, OPT_LIST, &[]).await?;
    let mut names = Vec::new();
    for _ in 0..MAX_OPTION_REPLIES {
        match read_option_reply(stream, OPT_LIST).await? {
            (REP_SERVER, payload) => {
                let name = wire::parse_rep_server(&payload).map_err(|error| {
                    HandshakeFailure::Protocol(format!("bad NBD_REP_SERVER: {error}"))
                })?;
                names.push(name.to_owned());
            }
            (REP_ACK, _) => {
                // A soft disconnect; the server may close without answering.
                send_option(stream, OPT_ABORT, &[]).await?;
                let _ = read_option_reply(stream, OPT_ABORT).await;
                return Ok(names);
            }
            (reply, payload) if reply & REP_FLAG_ERROR != 0 => {
                return Err(HandshakeFailure::Refused {
                    reply,
                    message: String::from_utf8_lossy(&payload).into_owned(),
                });
            }
            _ => {}
        }
    }
    Err(HandshakeFailure::Protocol(
        "too many replies to NBD_OPT_LIST".to_owned(),
    ))
}

fn array_at<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
    let mut array = [0u8; N];
    array.copy_from_slice(&bytes[offset..offset + N]);
    array
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(uri: &str) -> NbdUri {
        uri.parse().unwrap_or_else(|error| panic!("{uri}: {error}"))
    }

    #[test]
    fn parses_tcp_uris() {
        let uri = parse("nbd://localhost");
        assert_eq!(
            uri.endpoint,
            Endpoint::Tcp {
                host: "localhost".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(uri.export, "");
        let uri = parse("nbd://127.0.0.1:1234/disk%20one");
        assert_eq!(
            uri.endpoint,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 1234
            }
        );
        assert_eq!(uri.export, "disk one");
        let uri = parse("nbd://[::1]:99/x");
        assert_eq!(
            uri.endpoint,
            Endpoint::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        assert_eq!(uri.to_string(), "nbd://[::1]:99/x");
        assert_eq!(parse(&uri.to_string()), uri);
    }

    #[test]
    fn parses_unix_uris() {
        let uri = parse("nbd+unix:///r0?socket=/run/r%200.sock");
        assert_eq!(
            uri.endpoint,
            Endpoint::Unix {
                path: "/run/r 0.sock".into()
            }
        );
        assert_eq!(uri.export, "r0");
        assert_eq!(parse(&uri.to_string()), uri);
        assert_eq!(parse("nbd+unix://?socket=s").export, "");
    }

    #[test]
    fn rejects_bad_uris() {
        for bad in [
            "http://x",
            "nbd://",
            "nbd://:10809/x",
            "nbd://host:port/x",
            "nbd://host:70000",
            "nbd://[::1/x",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=s",
            "nbds://host/x",
            "nbd://host/%zz",
        ] {
            assert!(bad.parse::<NbdUri>().is_err(), "{bad} parsed");
        }
    }

    /// A client on one end of a pipe whose other end plays the server: for each request,
    /// `answer` gets its cookie and returns the bytes to send back.
    fn scripted(
        contexts: &[(u32, &str)],
        answer: impl Fn(u64) -> Vec<u8> + Send + 'static,
    ) -> NbdClient {
        let (client_side, mut server_side) = tokio::io::duplex(1 << 20);
        let (read_half, write_half) = tokio::io::split(client_side);
        let info = ExportInfo {
            export: "scripted".to_owned(),
            size_bytes: 1 << 20,
            flags: TransmissionFlags(TransmissionFlags::HAS_FLAGS),
            block_size: None,
            opened_with_go: true,
            structured_replies: true,
            meta_contexts: contexts
                .iter()
                .map(|&(id, name)| MetaContext {
                    id,
                    name: name.to_owned(),
                })
                .collect(),
        };
        tokio::spawn(async move {
            let mut header = [0u8; REQUEST_HEADER_BYTES];
            while server_side.read_exact(&mut header).await.is_ok() {
                let cookie = u64::from_be_bytes(array_at(&header, 8));
                if server_side.write_all(&answer(cookie)).await.is_err() {
                    break;
                }
            }
        });
        NbdClient::start(
            info,
            Box::new(read_half),
            Box::new(write_half),
            ConnectOptions::default(),
        )
    }

    fn data_chunk(out: &mut Vec<u8>, cookie: u64, flags: u16, offset: u64, data: &[u8]) {
        wire::encode_offset_data_prefix(out, cookie, flags, offset, data.len() as u32);
        out.extend_from_slice(data);
    }

    fn hole_chunk(out: &mut Vec<u8>, cookie: u64, flags: u16, offset: u64, length: u32) {
        StructuredReplyHeader {
            flags,
            reply_type: wire::REPLY_TYPE_OFFSET_HOLE,
            cookie,
            length: 12,
        }
        .encode(out);
        out.put_u64(offset);
        out.put_u32(length);
    }

    const DONE: u16 = wire::REPLY_FLAG_DONE;

    #[tokio::test]
    async fn reassembles_reads_from_data_and_hole_chunks_in_any_order() {
        let client = scripted(&[], |cookie| {
            let mut out = Vec::new();
            hole_chunk(&mut out, cookie, 0, 1050, 30);
            data_chunk(&mut out, cookie, 0, 1080, &[2; 20]);
            data_chunk(&mut out, cookie, DONE, 1000, &[1; 50]);
            out
        });
        let data = client.read(1000, 100).await.expect("read");
        let expected: Vec<u8> = [vec![1; 50], vec![0; 30], vec![2; 20]].concat();
        assert_eq!(data, expected);
        // The same answer serves the next read: the stream stayed in step.
        assert_eq!(client.read(1000, 100).await.expect("read"), expected);
    }

    #[tokio::test]
    async fn an_error_chunk_fails_only_its_request() {
        let client = scripted(&[], |cookie| {
            let mut out = Vec::new();
            if cookie == 0 {
                data_chunk(&mut out, cookie, 0, 0, &[9; 4]);
                wire::encode_error_chunk(&mut out, cookie, DONE, 5, "disk on fire");
            } else {
                data_chunk(&mut out, cookie, DONE, 0, &[7; 4]);
            }
            out
        });
        let failed = client.read(0, 4).await;
        assert!(
            matches!(failed, Err(NbdError::Server { errno: 5, .. })),
            "{failed:?}"
        );
        assert_eq!(&client.read(0, 4).await.expect("read")[..], [7; 4]);
    }

    #[tokio::test]
    async fn broken_structured_replies_close_the_connection() {
        type Script = fn(u64) -> Vec<u8>;
        let cases: [(&str, Script); 6] = [
            ("overlapping chunks", |cookie| {
                let mut out = Vec::new();
                data_chunk(&mut out, cookie, 0, 0, &[1; 60]);
                hole_chunk(&mut out, cookie, DONE, 50, 50);
                out
            }),
            ("missing bytes", |cookie| {
                let mut out = Vec::new();
                data_chunk(&mut out, cookie, DONE, 0, &[1; 99]);
                out
            }),
            ("chunk outside the request", |cookie| {
                let mut out = Vec::new();
                data_chunk(&mut out, cookie, DONE, 1, &[1; 100]);
                out
            }),
            ("simple reply with data to a read", |cookie| {
                let mut out = Vec::new();
                out.put_u32(SIMPLE_REPLY_MAGIC);
                out.put_u32(0);
                out.put_u64(cookie);
                out.extend_from_slice(&[0; 100]);
                out
            }),
            ("unknown chunk type", |cookie| {
                let mut out = Vec::new();
                StructuredReplyHeader {
                    flags: DONE,
                    reply_type: 77,
                    cookie,
                    length: 0,
                }
                .encode(&mut out);
                out
            }),
            ("unknown cookie", |cookie| {
                let mut out = Vec::new();
                data_chunk(&mut out, cookie + 1, DONE, 0, &[1; 100]);
                out
            }),
        ];
        for (what, script) in cases {
            let client = scripted(&[], script);
            let read = client.read(0, 100).await;
            assert!(
                matches!(
                    read,
                    Err(NbdError::Disconnected {
                        reason: CloseReason::Protocol(_)
                    })
                ),
                "{what}: {read:?}"
            );
            assert!(client.closed().is_some(), "{what}");
        }
    }

    #[tokio::test]
    async fn block_status_is_returned_per_context_in_negotiated_order() {
        let contexts = [(9, "base:allocation"), (4, "qemu:dirty-bitmap:x")];
        let client = scripted(&contexts, |cookie| {
            let extent = |length, flags| replicad::nbd::Extent { length, flags };
            let mut out = Vec::new();
            // The server may answer the contexts in any order.
            wire::encode_block_status_chunk(&mut out, cookie, 0, 4, &[extent(512, 1)]);
            wire::encode_block_status_chunk(
                &mut out,
                cookie,
                DONE,
                9,
                &[extent(256, 0), extent(256, 3)],
            );
            out
        });
        let answer = client.block_status(0, 512).await.expect("block status");
        assert_eq!(
            answer,
            [
                ContextStatus {
                    context: "base:allocation".to_owned(),
                    extents: vec![
                        Extent {
                            length: 256,
                            flags: 0
                        },
                        Extent {
                            length: 256,
                            flags: 3
                        }
                    ],
                },
                ContextStatus {
                    context: "qemu:dirty-bitmap:x".to_owned(),
                    extents: vec![Extent {
                        length: 512,
                        flags: 1
                    }],
                },
            ]
        );
        // REQ_ONE answered with two extents breaks the protocol.
        let broken = client.block_status_req_one(0, 512).await;
        assert!(
            matches!(broken, Err(NbdError::Disconnected { .. })),
            "{broken:?}"
        );
    }

    /// Plays a scripted fixed-newstyle server that answers NBD_OPT_GO with
    /// NBD_REP_ERR_UNSUP, to check the fallback to NBD_OPT_EXPORT_NAME.
    #[tokio::test]
    async fn falls_back_to_export_name_when_go_is_unsupported() {
        let (mut client_side, mut server_side) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut hello = Vec::new();
            hello.put_u64(NBDMAGIC);
            hello.put_u64(IHAVEOPT);
            hello.put_u16(HANDSHAKE_FLAG_FIXED_NEWSTYLE);
            server_side.write_all(&hello).await?;
            assert_eq!(server_side.read_u32().await?, CLIENT_FLAG_FIXED_NEWSTYLE);
            assert_eq!(server_side.read_u64().await?, IHAVEOPT);
            assert_eq!(server_side.read_u32().await?, OPT_GO);
            let length = server_side.read_u32().await?;
            let mut data = vec![0u8; length as usize];
            server_side.read_exact(&mut data).await?;
            let mut reply = Vec::new();
            reply.put_u64(OPTION_REPLY_MAGIC);
            reply.put_u32(OPT_GO);
            reply.put_u32(REP_ERR_UNSUP);
            reply.put_u32(0);
            server_side.write_all(&reply).await?;
            assert_eq!(server_side.read_u64().await?, IHAVEOPT);
            assert_eq!(server_side.read_u32().await?, OPT_EXPORT_NAME);
            let length = server_side.read_u32().await?;
            let mut name = vec![0u8; length as usize];
            server_side.read_exact(&mut name).await?;
            assert_eq!(name, b"vol");
            let mut answer = Vec::new();
            answer.put_u64(1 << 20);
            answer.put_u16(TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY);
            answer.put_slice(&[0u8; 124]);
            server_side.write_all(&answer).await?;
            io::Result::Ok(())
        });
        let info = handshake(
            &mut client_side,
            "vol",
            "scripted",
            &ConnectOptions::default(),
        )
        .await
        .expect("handshake");
        server.await.expect("server task").expect("server io");
        assert_eq!(info.size_bytes, 1 << 20);
        assert!(info.flags.read_only());
        assert!(!info.opened_with_go);
    }
}
