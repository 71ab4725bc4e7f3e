//! The transmission phase of one connection: requests in, replies out.
//!
//! A reader loop parses requests, checks them ([`classify`], a pure function) and spawns
//! one task per accepted request; each task calls the export and hands its reply to a
//! writer task, which writes replies in completion order, coalescing every reply that is
//! ready into one vectored write.
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

use super::handshake::{minimum_block_size, Session};
use super::proto::{self, RequestHeader, SimpleReplyHeader};
use super::server::{stopped, AbortOnDrop, ServerConfig};
use super::{Errno, Export};

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
/// read-only export, out of range, misaligned.
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
    if command != proto::CMD_READ && !geometry.writable {
        return refuse(Errno::EPERM);
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

/// A reply on its way to the writer.
struct Reply {
    cookie: u64,
    /// An NBD error value, zero on success.
    error: u32,
    payload: Option<Bytes>,
    _permits: Permits,
}

impl Reply {
    fn new(cookie: u64, result: Result<Option<Bytes>, Errno>, permits: Permits) -> Reply {
        let (error, payload) = match result {
            Ok(payload) => (0, payload),
            Err(errno) => (proto::nbd_error_from_errno(errno.0), None),
        };
        Reply {
            cookie,
            error,
            payload,
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
    fn fulfil(mut self, result: Result<Option<Bytes>, Errno>) {
        self.send(result);
    }

    fn send(&mut self, result: Result<Option<Bytes>, Errno>) {
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
    Read { offset: u64, length: u32 },
    Write { offset: u64, data: Bytes, fua: bool },
    Flush,
    Trim { offset: u64, length: u32, fua: bool },
    WriteZeroes { offset: u64, length: u32, fua: bool },
}

impl Operation {
    /// Runs the operation. Zero-length requests (which the spec leaves unspecified)
    /// succeed without reaching the export.
    async fn execute<E: Export>(self, export: &E) -> Result<Option<Bytes>, Errno> {
        match self {
            Operation::Read { length: 0, .. } => Ok(Some(Bytes::new())),
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
                Ok(Some(data))
            }
            Operation::Write { data, .. } if data.is_empty() => Ok(None),
            Operation::Write { offset, data, fua } => {
                export.write(offset, data, fua).await.map(|()| None)
            }
            Operation::Flush => export.flush().await.map(|()| None),
            Operation::Trim { length: 0, .. } | Operation::WriteZeroes { length: 0, .. } => {
                Ok(None)
            }
            Operation::Trim {
                offset,
                length,
                fua,
            } => export.trim(offset, length, fua).await.map(|()| None),
            Operation::WriteZeroes {
                offset,
                length,
                fua,
            } => export
                .write_zeroes(offset, length, fua)
                .await
                .map(|()| None),
        }
    }
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
    let shape = Shape {
        size_bytes: export.size_bytes(),
        minimum_block_size: minimum_block_size(&*export),
    };
    let budget = Budget {
        slots: Arc::new(Semaphore::new(config.max_in_flight_requests)),
        payload_bytes: Arc::new(Semaphore::new(config.max_in_flight_payload_bytes as usize)),
    };
    // Every reply holds a request slot, so the channel never holds more than its capacity
    // and `send` never waits.
    let (reply_sender, reply_receiver) = mpsc::channel(config.max_in_flight_requests);
    let writer_task = AbortOnDrop(tokio::spawn(write_replies(writer, reply_receiver)));

    let unservable = export.unservable();
    tokio::pin!(unservable);
    let ended = loop {
        let incoming = tokio::select! {
            biased;
            () = stopped(&mut stop) => break Ok(End::Shutdown),
            () = &mut unservable => break Ok(End::Unservable),
            incoming = next_request(&mut reader, &*export, shape, &budget) => incoming,
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
                let promise = ReplyPromise {
                    cookie,
                    permits: Some(permits),
                    sender: reply_sender.clone(),
                };
                tokio::spawn(async move {
                    let result = operation.execute(&*export).await;
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

/// What does not change about an export while a client is connected.
#[derive(Debug, Clone, Copy)]
struct Shape {
    size_bytes: u64,
    minimum_block_size: u32,
}

/// Reads and checks the next request, including its payload.
async fn next_request<R: AsyncRead + Unpin, E: Export>(
    reader: &mut BufReader<R>,
    export: &E,
    shape: Shape,
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
        writable: export.is_writable(),
        minimum_block_size: shape.minimum_block_size,
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
    chunks: VecDeque<Bytes>,
    current: BytesMut,
    replies: Vec<Reply>,
    queued_bytes: usize,
}

impl Batch {
    fn push(&mut self, reply: Reply) {
        SimpleReplyHeader {
            error: reply.error,
            cookie: reply.cookie,
        }
        .encode(&mut self.current);
        self.queued_bytes += proto::SIMPLE_REPLY_HEADER_BYTES;
        if let Some(payload) = &reply.payload {
            if payload.len() <= COPY_PAYLOAD_BYTES_MAX {
                self.current.extend_from_slice(payload);
            } else {
                self.seal();
                self.chunks.push_back(payload.clone());
            }
            self.queued_bytes += payload.len();
        }
        self.replies.push(reply);
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
) -> io::Result<()> {
    let mut batch = Batch::default();
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
                // Unknown commands, including ones this server does not advertise.
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
