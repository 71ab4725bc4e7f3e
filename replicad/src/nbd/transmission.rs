//! The transmission phase of one connection: requests in, replies out.
//!
//! A reader loop parses requests, checks them ([`classify`], a pure function) and spawns
//! one task per accepted request; each task calls the export and hands its reply to a
//! writer task, which writes replies in completion order, coalescing every reply that is
//! ready into one vectored write.
//!
//! Replies: without structured replies every reply is a simple reply. Once the client
//! negotiated them, a READ is answered by one `NBD_REPLY_TYPE_OFFSET_DATA` chunk (its data
//! still written from the export's buffer without a copy) or `NBD_REPLY_TYPE_NONE` for an
//! empty read, every error by one `NBD_REPLY_TYPE_ERROR` chunk, a BLOCK_STATUS by one
//! `NBD_REPLY_TYPE_BLOCK_STATUS` chunk per selected context, and other successes by a
//! simple reply (the spec allows it for replies without payload). The last chunk of a
//! reply carries `NBD_REPLY_FLAG_DONE`.
//!
//! **Invariants:**
//! - The export only sees requests that passed [`classify`]: in range, aligned, within
//!   the payload limit, with a whole payload.
//! - Memory is bounded per connection: at most `max_in_flight_requests` requests exist
//!   between parsing and the end of their reply's write, and at most
//!   `max_in_flight_payload_bytes` bytes of payload (write data being received or
//!   executed, read data being produced or written). The reader waits for room before
//!   it reads a payload, so a fast client is slowed by TCP back-pressure instead of
//!   growing the server's memory.
//! - Request tasks are never cancelled; the connection ends only after every started
//!   request has completed and its reply was written (or the client went away).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::handshake::{minimum_block_size, MetaContext, Session};
use super::proto::{self, RequestHeader, SimpleReplyHeader, StructuredReplyHeader};
use super::server::{stopped, AbortOnDrop, ServerConfig};
use super::{Errno, Export, Extent};

/// Replies with a payload up to this size are copied next to their header; larger
/// payloads are written from the export's buffer (zero copy).
const COPY_PAYLOAD_BYTES_MAX: usize = 16 * 1024;
/// The writer stops collecting ready replies past this many bytes and writes them out.
const COALESCE_BYTES_MAX: usize = 1024 * 1024;
/// The most slices passed to one vectored write (Linux allows 1024).
const IO_SLICES_MAX: usize = 64;
/// Refused write payloads are read and dropped through a buffer of this size.
const DISCARD_CHUNK_BYTES: usize = 64 * 1024;

/// What the server knows about the export when it checks a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub size_bytes: u64,
    pub writable: bool,
    pub minimum_block_size: u32,
    /// How many metadata contexts the client selected (zero without structured replies).
    pub contexts: usize,
}

/// The decision about one request header, before any payload is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Read {
        offset: u64,
        length: u32,
    },
    /// A write whose `length` bytes of payload are still to be read.
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
    Disconnect,
    /// Reply with `errno` after reading and dropping `discard_bytes` of payload.
    Refuse {
        errno: Errno,
        discard_bytes: u32,
    },
    /// Reply with `errno`, then end the connection: the payload announced is larger than
    /// the server is willing to read, so the stream cannot be followed any further.
    RefuseAndClose {
        errno: Errno,
    },
}

/// Checks a request against the protocol and the export, in the order the errors are
/// reported: unknown command, bad flags, bad FLUSH arguments, oversized payload,
/// read-only export, BLOCK_STATUS without a selected context, out of range, misaligned,
/// empty BLOCK_STATUS.
pub(crate) fn classify(header: &RequestHeader, geometry: Geometry) -> Action {
    let RequestHeader {
        flags,
        command,
        offset,
        length,
        ..
    } = *header;
    let payload_bytes = if command == proto::CMD_WRITE {
        length
    } else {
        0
    };
    let refuse = |errno| {
        if payload_bytes > proto::MAX_PAYLOAD_BYTES {
            Action::RefuseAndClose { errno }
        } else {
            Action::Refuse {
                errno,
                discard_bytes: payload_bytes,
            }
        }
    };
    let allowed_flags = match command {
        proto::CMD_DISC => return Action::Disconnect,
        proto::CMD_READ | proto::CMD_WRITE | proto::CMD_FLUSH | proto::CMD_TRIM => {
            proto::CMD_FLAG_FUA
        }
        proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE,
        proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_FUA | proto::CMD_FLAG_REQ_ONE,
        _ => return refuse(Errno::EINVAL),
    };
    if flags & !allowed_flags != 0 {
        return refuse(Errno::EINVAL);
    }
    let fua = flags & proto::CMD_FLAG_FUA != 0;
    if command == proto::CMD_FLUSH {
        return if offset == 0 && length == 0 {
            Action::Flush
        } else {
            refuse(Errno::EINVAL)
        };
    }
    if (command == proto::CMD_READ || command == proto::CMD_WRITE)
        && length > proto::MAX_PAYLOAD_BYTES
    {
        return refuse(Errno::EINVAL);
    }
    let writes = command != proto::CMD_READ && command != proto::CMD_BLOCK_STATUS;
    if writes && !geometry.writable {
        return refuse(Errno::EPERM);
    }
    if command == proto::CMD_BLOCK_STATUS && geometry.contexts == 0 {
        return refuse(Errno::EINVAL);
    }
    let in_range = offset
        .checked_add(length.into())
        .is_some_and(|end| end <= geometry.size_bytes);
    if !in_range {
        let writes_data = command == proto::CMD_WRITE || command == proto::CMD_WRITE_ZEROES;
        return refuse(if writes_data {
            Errno::ENOSPC
        } else {
            Errno::EINVAL
        });
    }
    let block = u64::from(geometry.minimum_block_size);
    if offset % block != 0 || u64::from(length) % block != 0 {
        return refuse(Errno::EINVAL);
    }
    match command {
        // The spec leaves an empty status query unspecified; no extent could answer it.
        proto::CMD_BLOCK_STATUS if length == 0 => refuse(Errno::EINVAL),
        proto::CMD_BLOCK_STATUS => Action::BlockStatus {
            offset,
            length,
            req_one: flags & proto::CMD_FLAG_REQ_ONE != 0,
        },
        proto::CMD_READ => Action::Read { offset, length },
        proto::CMD_WRITE => Action::Write {
            offset,
            length,
            fua,
        },
        proto::CMD_TRIM => Action::Trim {
            offset,
            length,
            fua,
        },
        _ => Action::WriteZeroes {
            offset,
            length,
            fua,
        },
    }
}

/// How the transmission phase ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between two requests.
    ClientClosed,
    /// The server is shutting down.
    Shutdown,
    /// A request was refused and the connection closed (payload too large to skip).
    Refused,
    /// The export's data stopped being servable (see `Export::unservable`).
    Unservable,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TransmissionError {
    #[error("I/O error reading requests")]
    Read(#[source] io::Error),
    #[error("the client disconnected in the middle of a request")]
    Truncated(#[source] io::Error),
    #[error("protocol violation")]
    Protocol(#[from] proto::ProtocolError),
    #[error("I/O error writing replies")]
    Write(#[source] io::Error),
    #[error("the reply writer stopped")]
    WriterGone,
}

/// The permits a request holds from the moment it is parsed until its reply is written.
struct Permits {
    _slot: OwnedSemaphorePermit,
    _payload: Option<OwnedSemaphorePermit>,
}

/// What a successful request answers.
enum Body {
    /// Success without payload.
    Done,
    /// The data of a READ at `offset`.
    Read { offset: u64, data: Bytes },
    /// One list of extents per selected context, by context id.
    BlockStatus(Vec<(u32, Vec<Extent>)>),
}

/// A reply on its way to the writer.
struct Reply {
    cookie: u64,
    /// The body, or an NBD error value.
    outcome: Result<Body, u32>,
    _permits: Permits,
}

impl Reply {
    fn new(cookie: u64, result: Result<Body, Errno>, permits: Permits) -> Reply {
        Reply {
            cookie,
            outcome: result.map_err(|errno| proto::nbd_error_from_errno(errno.0)),
            _permits: permits,
        }
    }
}

/// The obligation to reply to a request: fulfilled with the export's result, or, if the
/// request task ends without one (an export that panicked), with `EIO` when dropped, so
/// that the client is never left waiting for a reply.
struct ReplyPromise {
    cookie: u64,
    permits: Option<Permits>,
    sender: mpsc::Sender<Reply>,
}

impl ReplyPromise {
    fn fulfil(mut self, result: Result<Body, Errno>) {
        self.send(result);
    }

    fn send(&mut self, result: Result<Body, Errno>) {
        if let Some(permits) = self.permits.take() {
            // The channel holds a place for every request slot, so it is never full; it
            // is closed only when the writer is gone with the client, and then the reply
            // has no reader.
            let _ = self
                .sender
                .try_send(Reply::new(self.cookie, result, permits));
        }
    }
}

impl Drop for ReplyPromise {
    fn drop(&mut self) {
        if self.permits.is_some() {
            tracing::error!(
                cookie = self.cookie,
                "request ended without a result; replying EIO"
            );
            self.send(Err(Errno::EIO));
        }
    }
}

/// An accepted request, payload included, ready to run against the export.
enum Operation {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
}

impl Operation {
    /// Runs the operation. Zero-length requests (which the spec leaves unspecified)
    /// succeed without reaching the export.
    async fn execute<E: Export>(self, export: &E, shape: &Shape) -> Result<Body, Errno> {
        match self {
            Operation::Read { offset, length: 0 } => Ok(Body::Read {
                offset,
                data: Bytes::new(),
            }),
            Operation::Read { offset, length } => {
                let data = export.read(offset, length).await?;
                if data.len() != length as usize {
                    // A short read would desynchronise the stream; the export has a bug.
                    tracing::error!(
                        offset,
                        length,
                        returned = data.len(),
                        "export returned the wrong number of bytes"
                    );
                    return Err(Errno::EIO);
                }
                Ok(Body::Read { offset, data })
            }
            Operation::Write { data, .. } if data.is_empty() => Ok(Body::Done),
            Operation::Write { offset, data, fua } => {
                export.write(offset, data, fua).await.map(|()| Body::Done)
            }
            Operation::Flush => export.flush().await.map(|()| Body::Done),
            Operation::Trim { length: 0, .. } | Operation::WriteZeroes { length: 0, .. } => {
                Ok(Body::Done)
            }
            Operation::Trim {
                offset,
                length,
                fua,
            } => export.trim(offset, length, fua).await.map(|()| Body::Done),
            Operation::WriteZeroes {
                offset,
                length,
                fua,
            } => export
                .write_zeroes(offset, length, fua)
                .await
                .map(|()| Body::Done),
            Operation::BlockStatus {
                offset,
                length,
                req_one,
            } => {
                let mut chunks = Vec::with_capacity(shape.contexts.len());
                for context in shape.contexts.iter() {
                    let answer = export.block_status(&context.name, offset, length).await?;
                    let extents =
                        normalize_extents(&answer, length, shape.minimum_block_size, req_one);
                    if extents.is_empty() {
                        tracing::error!(
                            context = context.name,
                            offset,
                            length,
                            ?answer,
                            "export answered block status without a valid extent"
                        );
                        return Err(Errno::EIO);
                    }
                    chunks.push((context.id, extents));
                }
                Ok(Body::BlockStatus(chunks))
            }
        }
    }
}

/// Cleans an export's block status answer for a request of `length` bytes: stops at the
/// first empty extent, cuts the answer at `length`, rounds a boundary that is not a
/// multiple of `block` down and stops there, merges neighbours with equal flags, keeps
/// only the first extent with `req_one`, and at most [`proto::MAX_BLOCK_DESCRIPTORS`].
/// An empty result means the export gave nothing usable.
pub(crate) fn normalize_extents(
    answer: &[Extent],
    length: u32,
    block: u32,
    req_one: bool,
) -> Vec<Extent> {
    let block = block.max(1);
    let mut extents: Vec<Extent> = Vec::new();
    let mut covered: u32 = 0;
    for extent in answer {
        if extent.length == 0 || covered >= length {
            break;
        }
        let mut end = covered + extent.length.min(length - covered);
        let aligned = end % block == 0;
        if !aligned {
            end -= end % block;
        }
        if end > covered {
            let piece = end - covered;
            match extents.last_mut() {
                Some(last) if last.flags == extent.flags => last.length += piece,
                _ => extents.push(Extent {
                    length: piece,
                    flags: extent.flags,
                }),
            }
            covered = end;
        }
        if !aligned {
            break;
        }
    }
    let limit = if req_one {
        1
    } else {
        proto::MAX_BLOCK_DESCRIPTORS
    };
    extents.truncate(limit);
    extents
}

/// What the reader got from the wire.
enum Incoming {
    Execute {
        cookie: u64,
        operation: Operation,
        permits: Permits,
    },
    Reply(Reply),
    ReplyAndClose(Reply),
    Disconnect,
    Eof,
}

/// The per-connection bounds on requests and payload bytes in flight.
struct Budget {
    slots: Arc<Semaphore>,
    payload_bytes: Arc<Semaphore>,
}

impl Budget {
    async fn slot(&self) -> OwnedSemaphorePermit {
        // The semaphores are never closed.
        Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("request slots are never closed")
    }

    async fn payload(&self, bytes: u32) -> OwnedSemaphorePermit {
        Arc::clone(&self.payload_bytes)
            .acquire_many_owned(bytes)
            .await
            .expect("payload budget is never closed")
    }
}

/// Runs the transmission phase until the client disconnects, a protocol violation, or
/// shutdown; then waits for requests in flight and their replies.
pub(crate) async fn run<R, W, E>(
    mut reader: BufReader<R>,
    writer: W,
    session: Session<E>,
    config: &ServerConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<End, TransmissionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    E: Export,
{
    let export = session.export;
    let shape = Arc::new(Shape {
        size_bytes: export.size_bytes(),
        minimum_block_size: minimum_block_size(&*export),
        read_only: export.read_only(),
        contexts: session.contexts.into(),
    });
    let budget = Budget {
        slots: Arc::new(Semaphore::new(config.max_in_flight_requests)),
        payload_bytes: Arc::new(Semaphore::new(config.max_in_flight_payload_bytes as usize)),
    };
    // Every reply holds a request slot, so the channel never holds more than its capacity
    // and `send` never waits.
    let (reply_sender, reply_receiver) = mpsc::channel(config.max_in_flight_requests);
    let writer_task = AbortOnDrop(tokio::spawn(write_replies(
        writer,
        reply_receiver,
        session.structured_replies,
    )));

    let unservable = export.unservable();
    tokio::pin!(unservable);
    let ended = loop {
        let incoming = tokio::select! {
            biased;
            () = stopped(&mut stop) => break Ok(End::Shutdown),
            () = &mut unservable => break Ok(End::Unservable),
            incoming = next_request(&mut reader, &*export, &shape, &budget) => incoming,
        };
        match incoming {
            Err(error) => break Err(error),
            Ok(Incoming::Eof) => break Ok(End::ClientClosed),
            Ok(Incoming::Disconnect) => break Ok(End::Disconnect),
            Ok(Incoming::ReplyAndClose(reply)) => {
                let _ = reply_sender.send(reply).await;
                break Ok(End::Refused);
            }
            Ok(Incoming::Reply(reply)) => {
                if reply_sender.send(reply).await.is_err() {
                    break Err(TransmissionError::WriterGone);
                }
            }
            Ok(Incoming::Execute {
                cookie,
                operation,
                permits,
            }) => {
                let export = Arc::clone(&export);
                let shape = Arc::clone(&shape);
                let promise = ReplyPromise {
                    cookie,
                    permits: Some(permits),
                    sender: reply_sender.clone(),
                };
                tokio::spawn(async move {
                    let result = operation.execute(&*export, &shape).await;
                    promise.fulfil(result);
                });
            }
        }
    };
    // The writer finishes once every request task has sent its reply and dropped its
    // sender.
    drop(reply_sender);
    let written = match writer_task.join().await {
        Ok(written) => written.map_err(TransmissionError::Write),
        Err(join_error) => Err(TransmissionError::Write(io::Error::other(join_error))),
    };
    match (ended, written) {
        (Err(error), _) => Err(error),
        // A client that closed its socket cannot receive replies: not worth a warning.
        (Ok(End::ClientClosed), Err(_)) => Ok(End::ClientClosed),
        (Ok(_), Err(error)) => Err(error),
        (Ok(end), Ok(())) => Ok(end),
    }
}

/// What does not change about an export and the connection while a client is connected.
#[derive(Debug)]
struct Shape {
    size_bytes: u64,
    minimum_block_size: u32,
    read_only: bool,
    /// The metadata contexts selected in the handshake.
    contexts: Arc<[MetaContext]>,
}

impl Shape {
    /// The payload budget a BLOCK_STATUS reply may take: one maximal chunk per context.
    fn block_status_reply_bytes(&self) -> u32 {
        let per_context = proto::STRUCTURED_REPLY_HEADER_BYTES
            + 4
            + proto::MAX_BLOCK_DESCRIPTORS * proto::BLOCK_DESCRIPTOR_BYTES;
        // At most MAX_SELECTED_CONTEXTS contexts: far below MAX_PAYLOAD_BYTES (checked at
        // compile time in proto).
        let bytes = per_context.saturating_mul(self.contexts.len());
        u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .min(proto::MAX_PAYLOAD_BYTES)
    }
}

/// Reads and checks the next request, including its payload.
async fn next_request<R: AsyncRead + Unpin, E: Export>(
    reader: &mut BufReader<R>,
    export: &E,
    shape: &Shape,
    budget: &Budget,
) -> Result<Incoming, TransmissionError> {
    if reader
        .fill_buf()
        .await
        .map_err(TransmissionError::Read)?
        .is_empty()
    {
        return Ok(Incoming::Eof);
    }
    let mut raw = [0u8; proto::REQUEST_HEADER_BYTES];
    reader
        .read_exact(&mut raw)
        .await
        .map_err(TransmissionError::Truncated)?;
    let header = RequestHeader::parse(&raw)?;
    let cookie = header.cookie;
    let slot = budget.slot().await;
    // Writability is read when the request arrives: the node may have been demoted
    // while the connection waited for it.
    let geometry = Geometry {
        size_bytes: shape.size_bytes,
        writable: !shape.read_only && export.is_writable(),
        minimum_block_size: shape.minimum_block_size,
        contexts: shape.contexts.len(),
    };
    let action = classify(&header, geometry);
    let (operation, payload) = match action {
        Action::Disconnect => return Ok(Incoming::Disconnect),
        Action::Refuse {
            errno,
            discard_bytes,
        } => {
            log_refusal(&header, errno);
            discard(reader, discard_bytes).await?;
            let permits = Permits {
                _slot: slot,
                _payload: None,
            };
            return Ok(Incoming::Reply(Reply::new(cookie, Err(errno), permits)));
        }
        Action::RefuseAndClose { errno } => {
            warn!(
                command = header.command,
                length = header.length,
                "write payload above the limit; refusing and closing the connection"
            );
            let permits = Permits {
                _slot: slot,
                _payload: None,
            };
            return Ok(Incoming::ReplyAndClose(Reply::new(
                cookie,
                Err(errno),
                permits,
            )));
        }
        Action::Read { offset, length } => {
            let payload = budget.payload(length).await;
            (Operation::Read { offset, length }, Some(payload))
        }
        Action::Write {
            offset,
            length,
            fua,
        } => {
            let payload = budget.payload(length).await;
            let data = read_payload(reader, length).await?;
            (Operation::Write { offset, data, fua }, Some(payload))
        }
        Action::Flush => (Operation::Flush, None),
        Action::BlockStatus {
            offset,
            length,
            req_one,
        } => {
            let payload = budget.payload(shape.block_status_reply_bytes()).await;
            (
                Operation::BlockStatus {
                    offset,
                    length,
                    req_one,
                },
                Some(payload),
            )
        }
        Action::Trim {
            offset,
            length,
            fua,
        } => (
            Operation::Trim {
                offset,
                length,
                fua,
            },
            None,
        ),
        Action::WriteZeroes {
            offset,
            length,
            fua,
        } => (
            Operation::WriteZeroes {
                offset,
                length,
                fua,
            },
            None,
        ),
    };
    Ok(Incoming::Execute {
        cookie,
        operation,
        permits: Permits {
            _slot: slot,
            _payload: payload,
        },
    })
}

fn log_refusal(header: &RequestHeader, errno: Errno) {
    // EPERM is the expected answer of a demoted node, not a client bug.
    if errno == Errno::EPERM {
        debug!(
            command = header.command,
            "write refused: export is read-only"
        );
    } else {
        warn!(
            command = header.command,
            flags = header.flags,
            offset = header.offset,
            length = header.length,
            %errno,
            "invalid request refused"
        );
    }
}

/// Alignment of write payloads of at least this size.
const PAYLOAD_ALIGN: usize = 4096;

/// Reads exactly `length` bytes of payload into a fresh buffer, without zero-filling it.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    length: u32,
) -> Result<Bytes, TransmissionError> {
    let length = length as usize;
    // Block-sized payloads start on a 4 KiB boundary, so an O_DIRECT store can take
    // them without a bounce copy.
    let mut data = if length >= PAYLOAD_ALIGN {
        let mut data = BytesMut::with_capacity(length + PAYLOAD_ALIGN - 1);
        let skip = data.as_ptr().align_offset(PAYLOAD_ALIGN);
        data.resize(skip, 0);
        data.advance(skip);
        data
    } else {
        BytesMut::with_capacity(length)
    };
    crate::read_into::read_exact_into(reader, &mut data, length)
        .await
        .map_err(TransmissionError::Truncated)?;
    Ok(data.freeze())
}

/// Reads and drops `length` bytes of payload through a small buffer.
async fn discard<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    length: u32,
) -> Result<(), TransmissionError> {
    let mut remaining = u64::from(length);
    let mut scratch = [0u8; DISCARD_CHUNK_BYTES];
    while remaining > 0 {
        let want = remaining.min(DISCARD_CHUNK_BYTES as u64) as usize;
        let read = reader
            .read(&mut scratch[..want])
            .await
            .map_err(TransmissionError::Truncated)?;
        if read == 0 {
            return Err(TransmissionError::Truncated(
                io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        remaining -= read as u64;
    }
    Ok(())
}

/// Replies collected for one write: encoded bytes in order, plus the replies themselves,
/// whose permits are released only once the bytes are out.
#[derive(Default)]
struct Batch {
    /// Whether the client negotiated structured replies.
    structured: bool,
    chunks: VecDeque<Bytes>,
    current: BytesMut,
    replies: Vec<Reply>,
    queued_bytes: usize,
}

impl Batch {
    fn push(&mut self, reply: Reply) {
        let before = self.current.len();
        let cookie = reply.cookie;
        let done = proto::REPLY_FLAG_DONE;
        let simple = |current: &mut BytesMut, error: u32| {
            SimpleReplyHeader { error, cookie }.encode(current)
        };
        let mut payload = None;
        match (&reply.outcome, self.structured) {
            (Ok(Body::Done), _) => simple(&mut self.current, 0),
            (Err(error), false) => simple(&mut self.current, *error),
            (Err(error), true) => {
                proto::encode_error_chunk(&mut self.current, cookie, done, *error, "")
            }
            (Ok(Body::Read { data, .. }), false) => {
                simple(&mut self.current, 0);
                payload = Some(data.clone());
            }
            (Ok(Body::Read { data, .. }), true) if data.is_empty() => {
                StructuredReplyHeader {
                    flags: done,
                    reply_type: proto::REPLY_TYPE_NONE,
                    cookie,
                    length: 0,
                }
                .encode(&mut self.current);
            }
            (Ok(Body::Read { offset, data }), true) => {
                // Reads are at most MAX_PAYLOAD_BYTES (32 MiB), so the length fits.
                let data_bytes = u32::try_from(data.len()).unwrap_or(u32::MAX - 8);
                proto::encode_offset_data_prefix(
                    &mut self.current,
                    cookie,
                    done,
                    *offset,
                    data_bytes,
                );
                payload = Some(data.clone());
            }
            (Ok(Body::BlockStatus(chunks)), true) => {
                for (index, (context_id, extents)) in chunks.iter().enumerate() {
                    let flags = if index + 1 == chunks.len() { done } else { 0 };
                    proto::encode_block_status_chunk(
                        &mut self.current,
                        cookie,
                        flags,
                        *context_id,
                        extents,
                    );
                }
            }
            (Ok(Body::BlockStatus(_)), false) => {
                // Contexts need structured replies, so classify refuses BLOCK_STATUS on
                // this connection before it runs.
                debug_assert!(false, "block status without structured replies");
                simple(&mut self.current, proto::NBD_EINVAL);
            }
        }
        self.queued_bytes += self.current.len() - before;
        if let Some(payload) = payload {
            self.push_payload(payload);
        }
        self.replies.push(reply);
    }

    /// Queues a read's data after its header: copied when small, else by reference.
    fn push_payload(&mut self, payload: Bytes) {
        self.queued_bytes += payload.len();
        if payload.len() <= COPY_PAYLOAD_BYTES_MAX {
            self.current.extend_from_slice(&payload);
        } else {
            self.seal();
            self.chunks.push_back(payload);
        }
    }

    /// Moves the bytes encoded so far into the chunk list.
    fn seal(&mut self) {
        if !self.current.is_empty() {
            self.chunks.push_back(self.current.split().freeze());
        }
    }

    async fn write_to<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> io::Result<()> {
        self.seal();
        write_all_chunks(writer, &mut self.chunks).await?;
        self.replies.clear();
        self.queued_bytes = 0;
        Ok(())
    }
}

/// The writer task: writes replies as they complete, coalescing all that are ready.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut replies: mpsc::Receiver<Reply>,
    structured: bool,
) -> io::Result<()> {
    let mut batch = Batch {
        structured,
        ..Batch::default()
    };
    while let Some(reply) = replies.recv().await {
        batch.push(reply);
        drain_ready(&mut replies, &mut batch);
        // One yield lets requests that are already running finish and queue their
        // replies, so one writev carries them all (with one runtime thread each reply
        // had been its own writev).
        tokio::task::yield_now().await;
        drain_ready(&mut replies, &mut batch);
        batch.write_to(&mut writer).await?;
    }
    writer.shutdown().await
}

/// Moves replies that are ready into the batch, up to the coalescing limit.
fn drain_ready(replies: &mut mpsc::Receiver<Reply>, batch: &mut Batch) {
    while batch.queued_bytes < COALESCE_BYTES_MAX {
        match replies.try_recv() {
            Ok(reply) => batch.push(reply),
            Err(_) => break,
        }
    }
}

/// Writes every chunk with as few vectored writes as the socket allows.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    writer: &mut W,
    chunks: &mut VecDeque<Bytes>,
) -> io::Result<()> {
    while !chunks.is_empty() {
        let mut slices = [IoSlice::new(&[]); IO_SLICES_MAX];
        let mut count = 0;
        for (slot, chunk) in slices.iter_mut().zip(chunks.iter()) {
            *slot = IoSlice::new(chunk);
            count += 1;
        }
        let mut written = writer.write_vectored(&slices[..count]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let Some(front) = chunks.front_mut() else {
                break;
            };
            if written >= front.len() {
                written -= front.len();
                chunks.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};

    const MIB: u32 = 1024 * 1024;
    const FUA: u16 = proto::CMD_FLAG_FUA;

    fn geometry() -> Geometry {
        Geometry {
            size_bytes: 1 << 20,
            writable: true,
            minimum_block_size: 1,
            contexts: 0,
        }
    }

    fn read(offset: u64, length: u32) -> Action {
        Action::Read { offset, length }
    }

    fn write(offset: u64, length: u32, fua: bool) -> Action {
        Action::Write {
            offset,
            length,
            fua,
        }
    }

    fn trim(offset: u64, length: u32) -> Action {
        Action::Trim {
            offset,
            length,
            fua: false,
        }
    }

    fn refuse(errno: Errno, discard_bytes: u32) -> Action {
        Action::Refuse {
            errno,
            discard_bytes,
        }
    }

    /// Checks rows of (command, flags, offset, length, expected action).
    fn check(geometry: Geometry, rows: &[(u16, u16, u64, u32, Action)]) {
        for &(command, flags, offset, length, expected) in rows {
            let header = RequestHeader {
                flags,
                command,
                cookie: 7,
                offset,
                length,
            };
            assert_eq!(
                classify(&header, geometry),
                expected,
                "command {command} flags {flags:#x} offset {offset} length {length} {geometry:?}"
            );
        }
    }

    #[test]
    fn accepted_requests() {
        let end = 1 << 20;
        let zeroes = Action::WriteZeroes {
            offset: 0,
            length: 1 << 20,
            fua: true,
        };
        check(
            geometry(),
            &[
                (CMD_READ, 0, 0, 512, read(0, 512)),
                (CMD_READ, 0, end - 1, 1, read(end - 1, 1)),
                // Zero-length requests at the very end are in range.
                (CMD_READ, 0, end, 0, read(end, 0)),
                (CMD_WRITE, FUA, 4096, 4096, write(4096, 4096, true)),
                (CMD_WRITE, 0, 1, 3, write(1, 3, false)),
                (CMD_FLUSH, 0, 0, 0, Action::Flush),
                // Clients are known to set FUA on any command; the spec says to accept it.
                (CMD_FLUSH, FUA, 0, 0, Action::Flush),
                (
                    CMD_WRITE_ZEROES,
                    proto::CMD_FLAG_NO_HOLE | FUA,
                    0,
                    1 << 20,
                    zeroes,
                ),
                (CMD_TRIM, 0, 0, 1 << 20, trim(0, 1 << 20)),
                (proto::CMD_DISC, 0xFFFF, 9, 9, Action::Disconnect),
            ],
        );
    }

    #[test]
    fn payload_limit() {
        let huge = Geometry {
            size_bytes: u64::MAX,
            ..geometry()
        };
        let close = Action::RefuseAndClose {
            errno: Errno::EINVAL,
        };
        check(
            huge,
            &[
                (CMD_READ, 0, 0, 32 * MIB, read(0, 32 * MIB)),
                (CMD_WRITE, 0, 0, 32 * MIB, write(0, 32 * MIB, false)),
                (CMD_READ, 0, 0, 32 * MIB + 1, refuse(Errno::EINVAL, 0)),
                (CMD_WRITE, 0, 0, 32 * MIB + 1, close),
                // A payload too large to skip closes the connection whatever the error.
                (CMD_WRITE, proto::CMD_FLAG_DF, 0, u32::MAX, close),
                // Trim and write-zeroes carry no payload: the payload limit does not apply.
                (CMD_TRIM, 0, 0, u32::MAX, trim(0, u32::MAX)),
                (
                    CMD_WRITE_ZEROES,
                    FUA,
                    1,
                    u32::MAX,
                    Action::WriteZeroes {
                        offset: 1,
                        length: u32::MAX,
                        fua: true,
                    },
                ),
            ],
        );
    }

    #[test]
    fn refused_requests() {
        let einval = refuse(Errno::EINVAL, 0);
        let enospc = refuse(Errno::ENOSPC, 0);
        check(
            geometry(),
            &[
                // Unknown commands, including ones this server does not advertise, and
                // BLOCK_STATUS without a selected metadata context.
                (proto::CMD_CACHE, 0, 0, 512, einval),
                (proto::CMD_BLOCK_STATUS, 0, 0, 512, einval),
                (8, 0, 0, 512, einval),
                (0xFFFF, 0, 0, 512, einval),
                // Flags not valid for the command; a refused write's payload is skipped.
                (CMD_READ, proto::CMD_FLAG_DF, 0, 512, einval),
                (
                    CMD_WRITE,
                    proto::CMD_FLAG_NO_HOLE,
                    0,
                    512,
                    refuse(Errno::EINVAL, 512),
                ),
                (CMD_WRITE_ZEROES, proto::CMD_FLAG_FAST_ZERO, 0, 512, einval),
                (CMD_TRIM, 0x8000, 0, 512, einval),
                // FLUSH with arguments.
                (CMD_FLUSH, 0, 1, 0, einval),
                (CMD_FLUSH, 0, 0, 1, einval),
                // Out of range: EINVAL for read and trim, ENOSPC for writes; no overflow.
                (CMD_READ, 0, 1 << 20, 1, einval),
                (CMD_READ, 0, u64::MAX, 1, einval),
                (CMD_TRIM, 0, u64::MAX - 1, 4096, einval),
                (CMD_WRITE, 0, (1 << 20) - 1, 2, refuse(Errno::ENOSPC, 2)),
                (CMD_WRITE, 0, u64::MAX, 4096, refuse(Errno::ENOSPC, 4096)),
                (CMD_WRITE_ZEROES, 0, u64::MAX, 1, enospc),
            ],
        );
    }

    #[test]
    fn read_only_export() {
        let eperm = refuse(Errno::EPERM, 0);
        check(
            Geometry {
                writable: false,
                ..geometry()
            },
            &[
                (CMD_READ, 0, 0, 512, read(0, 512)),
                (CMD_FLUSH, 0, 0, 0, Action::Flush),
                (CMD_WRITE, 0, 0, 512, refuse(Errno::EPERM, 512)),
                (CMD_TRIM, 0, 0, 512, eperm),
                (CMD_WRITE_ZEROES, 0, 0, 512, eperm),
            ],
        );
    }

    #[test]
    fn block_status_requests() {
        let einval = refuse(Errno::EINVAL, 0);
        let status = |offset, length, req_one| Action::BlockStatus {
            offset,
            length,
            req_one,
        };
        let req_one = proto::CMD_FLAG_REQ_ONE;
        let with_contexts = Geometry {
            contexts: 2,
            minimum_block_size: 512,
            ..geometry()
        };
        let end = 1 << 20;
        let rows = [
            (proto::CMD_BLOCK_STATUS, 0, 0, 4096, status(0, 4096, false)),
            (
                proto::CMD_BLOCK_STATUS,
                req_one,
                512,
                512,
                status(512, 512, true),
            ),
            (
                proto::CMD_BLOCK_STATUS,
                req_one | FUA,
                0,
                512,
                status(0, 512, true),
            ),
            (
                proto::CMD_BLOCK_STATUS,
                0,
                end - 512,
                512,
                status(end - 512, 512, false),
            ),
            // Out of range, unaligned, empty, flags of other commands: EINVAL.
            (proto::CMD_BLOCK_STATUS, 0, end - 512, 1024, einval),
            (proto::CMD_BLOCK_STATUS, 0, u64::MAX - 511, 512, einval),
            (proto::CMD_BLOCK_STATUS, 0, 100, 512, einval),
            (proto::CMD_BLOCK_STATUS, 0, 0, 0, einval),
            (
                proto::CMD_BLOCK_STATUS,
                proto::CMD_FLAG_NO_HOLE,
                0,
                512,
                einval,
            ),
            (proto::CMD_BLOCK_STATUS, proto::CMD_FLAG_DF, 0, 512, einval),
            // REQ_ONE belongs to BLOCK_STATUS only.
            (CMD_READ, req_one, 0, 512, einval),
        ];
        check(with_contexts, &rows);
        // A read-only export still answers block status.
        check(
            Geometry {
                writable: false,
                ..with_contexts
            },
            &[(proto::CMD_BLOCK_STATUS, 0, 0, 512, status(0, 512, false))],
        );
    }

    #[test]
    fn extents_are_normalized() {
        fn extents(list: &[(u32, u32)]) -> Vec<Extent> {
            list.iter()
                .map(|&(length, flags)| Extent { length, flags })
                .collect()
        }
        /// (answer, request length, block, req_one, expected)
        type Row<'a> = (&'a [(u32, u32)], u32, u32, bool, &'a [(u32, u32)]);
        let rows: &[Row] = &[
            (&[(100, 0)], 100, 1, false, &[(100, 0)]),
            // Merged, cut at the request's end.
            (
                &[(10, 1), (10, 1), (10, 2), (50, 0)],
                40,
                1,
                false,
                &[(20, 1), (10, 2), (10, 0)],
            ),
            // Shorter answers stay short.
            (&[(10, 1)], 40, 1, false, &[(10, 1)]),
            // REQ_ONE keeps the (merged) first extent.
            (&[(10, 1), (10, 1), (10, 2)], 40, 1, true, &[(20, 1)]),
            // An empty extent ends the answer; nothing valid is nothing.
            (&[(10, 1), (0, 2), (10, 0)], 40, 1, false, &[(10, 1)]),
            (&[(0, 1)], 40, 1, false, &[]),
            (&[], 40, 1, false, &[]),
            // Misaligned boundaries are rounded down and end the answer.
            (
                &[(512, 0), (700, 1), (512, 0)],
                4096,
                512,
                false,
                &[(512, 0), (512, 1)],
            ),
            (&[(100, 0)], 4096, 512, false, &[]),
            // Lengths that would overflow are cut at the request's end.
            (
                &[(u32::MAX, 0), (u32::MAX, 1)],
                4096,
                1,
                false,
                &[(4096, 0)],
            ),
        ];
        for &(answer, length, block, req_one, expected) in rows {
            assert_eq!(
                normalize_extents(&extents(answer), length, block, req_one),
                extents(expected),
                "{answer:?} length {length} block {block} req_one {req_one}"
            );
        }
        // The number of descriptors is bounded.
        let alternating: Vec<Extent> = (0..20_000u32)
            .map(|index| Extent {
                length: 1,
                flags: index % 2,
            })
            .collect();
        assert_eq!(
            normalize_extents(&alternating, 20_000, 1, false).len(),
            proto::MAX_BLOCK_DESCRIPTORS
        );
    }

    #[test]
    fn minimum_block_size_alignment() {
        let einval = refuse(Errno::EINVAL, 0);
        check(
            Geometry {
                minimum_block_size: 512,
                ..geometry()
            },
            &[
                (CMD_READ, 0, 512, 1024, read(512, 1024)),
                (CMD_READ, 0, 511, 512, einval),
                (CMD_WRITE, 0, 512, 100, refuse(Errno::EINVAL, 100)),
                (CMD_TRIM, 0, 512, 513, einval),
            ],
        );
    }

    #[tokio::test]
    async fn vectored_writes_handle_partial_progress() {
        // A duplex pipe with a tiny buffer forces many short writes.
        let (mut client, mut server) = tokio::io::duplex(7);
        let mut chunks: VecDeque<Bytes> = (0..100u8)
            .map(|i| Bytes::from(vec![i; usize::from(i % 13)]))
            .collect();
        let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            client.read_to_end(&mut received).await.map(|_| received)
        });
        write_all_chunks(&mut server, &mut chunks)
            .await
            .expect("write");
        drop(server);
        let received = reader.await.expect("join").expect("read");
        assert_eq!(received, expected);
        assert!(chunks.is_empty());
    }
}
