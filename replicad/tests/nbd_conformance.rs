//! Protocol conformance of the NBD server, driven by a tiny in-test client over real
//! loopback sockets: a proptest model of the transmission phase against a `Vec<u8>`
//! reference, the handshake's answers, bad input of every kind, the bounds on requests in
//! flight, and graceful shutdown.
//!
//! Every wait has a timeout ([`within`]); a few tests check that something does *not*
//! happen, which needs a window of time ([`NOTHING_HAPPENS_WINDOW`]): such a check can
//! only pass wrongly on a slow machine, never fail wrongly.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use replicad::nbd::proto::{self, Info, InfoRequest, OptionHeader, OptionReplyHeader};
use replicad::nbd::proto::{RequestHeader, SimpleReplyHeader};
use replicad::nbd::{self, Errno, Export, ExportMap, MemoryExport, ServerConfig, ServerHandle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

const STEP_TIMEOUT: Duration = Duration::from_secs(20);
const NOTHING_HAPPENS_WINDOW: Duration = Duration::from_millis(200);
const EXPORT_NAME: &str = "r0";

/// Awaits `future`, failing the test if it takes longer than [`STEP_TIMEOUT`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---------------------------------------------------------------------------------------
// A tiny client
// ---------------------------------------------------------------------------------------

/// Reads the server greeting and sends fixed-newstyle client flags.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, no_zeroes: bool) {
    let mut greeting = [0u8; proto::GREETING_BYTES];
    within("greeting", stream.read_exact(&mut greeting))
        .await
        .expect("read greeting");
    let greeting = proto::Greeting::parse(&greeting).expect("valid greeting");
    assert_eq!(
        greeting.handshake_flags,
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
    );
    let mut flags = Vec::new();
    proto::ClientFlags { no_zeroes }.encode(&mut flags);
    stream.write_all(&flags).await.expect("send client flags");
}

/// An encoded option header announcing `length` bytes of data.
fn option_header(option: u32, length: u32) -> Vec<u8> {
    let mut message = Vec::new();
    OptionHeader { option, length }.encode(&mut message);
    message
}

/// An encoded request header.
fn request_header(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut message = Vec::new();
    RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    }
    .encode(&mut message);
    message
}

async fn send_option<S: AsyncWrite + Unpin>(stream: &mut S, option: u32, data: &[u8]) {
    let mut message = option_header(option, data.len() as u32);
    message.extend_from_slice(data);
    stream.write_all(&message).await.expect("send option");
}

async fn read_option_reply<S: AsyncRead + Unpin>(stream: &mut S) -> (OptionReplyHeader, Vec<u8>) {
    let mut raw = [0u8; proto::OPTION_REPLY_HEADER_BYTES];
    within("option reply", stream.read_exact(&mut raw))
        .await
        .expect("read option reply header");
    let header = OptionReplyHeader::parse(&raw).expect("valid option reply header");
    assert!(
        header.length <= 64 * 1024,
        "option reply too long: {header:?}"
    );
    let mut data = vec![0u8; header.length as usize];
    within("option reply data", stream.read_exact(&mut data))
        .await
        .expect("read option reply data");
    (header, data)
}

fn info_request(name: &str, info_types: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    InfoRequest {
        name,
        info_types: info_types.to_vec(),
    }
    .encode(&mut data);
    data
}

/// Sends `NBD_OPT_INFO` or `NBD_OPT_GO` and collects the replies up to the final one.
async fn info_option<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    name: &str,
    info_types: &[u16],
) -> Result<Vec<Info>, u32> {
    send_option(stream, option, &info_request(name, info_types)).await;
    let mut infos = Vec::new();
    loop {
        let (header, data) = read_option_reply(stream).await;
        assert_eq!(header.option, option);
        match header.reply_type {
            proto::REP_INFO => infos.push(Info::parse(&data).expect("valid info")),
            proto::REP_ACK => return Ok(infos),
            error => return Err(error),
        }
    }
}

/// Asserts that the server closes the connection, discarding whatever it still sends.
async fn assert_closed<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut sink = Vec::new();
    within(
        "server closes the connection",
        stream.read_to_end(&mut sink),
    )
    .await
    .ok();
}

struct Reply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
}

/// A client in the transmission phase.
struct Client<S> {
    stream: S,
    size_bytes: u64,
    transmission_flags: u16,
    next_cookie: u64,
    /// Offsets and lengths of reads in flight, whose successful replies carry data.
    pending_reads: HashMap<u64, (u64, u32)>,
    /// Whether structured replies were negotiated (then [`Client::receive`] reads chunks).
    structured: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Negotiates `name` with `NBD_OPT_GO`, asking for block size constraints.
    async fn go(mut stream: S, name: &str) -> Client<S> {
        greet(&mut stream, true).await;
        Client::enter(stream, name).await
    }

    /// [`Client::go`] on a stream past the greeting (and maybe other options).
    async fn enter(mut stream: S, name: &str) -> Client<S> {
        let infos = info_option(&mut stream, proto::OPT_GO, name, &[proto::INFO_BLOCK_SIZE])
            .await
            .unwrap_or_else(|error| panic!("NBD_OPT_GO refused with {error:#x}"));
        let (size_bytes, transmission_flags) = infos
            .iter()
            .find_map(|info| match info {
                Info::Export {
                    size_bytes,
                    transmission_flags,
                } => Some((*size_bytes, *transmission_flags)),
                _ => None,
            })
            .expect("NBD_INFO_EXPORT before NBD_REP_ACK");
        Client {
            stream,
            size_bytes,
            transmission_flags,
            next_cookie: 1,
            pending_reads: HashMap::new(),
            structured: false,
        }
    }

    async fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut message = request_header(command, flags, cookie, offset, length);
        message.extend_from_slice(payload);
        within("send request", self.stream.write_all(&message))
            .await
            .expect("send request");
        if command == proto::CMD_READ {
            self.pending_reads.insert(cookie, (offset, length));
        }
        cookie
    }

    async fn receive(&mut self) -> Reply {
        let mut raw = [0u8; proto::SIMPLE_REPLY_HEADER_BYTES];
        within("reply magic", self.stream.read_exact(&mut raw[..4]))
            .await
            .expect("read reply magic");
        if u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) == proto::STRUCTURED_REPLY_MAGIC {
            assert!(self.structured, "structured reply without negotiation");
            return self.receive_structured().await;
        }
        within("reply header", self.stream.read_exact(&mut raw[4..]))
            .await
            .expect("read reply header");
        let SimpleReplyHeader { error, cookie } =
            SimpleReplyHeader::parse(&raw).expect("valid reply header");
        let read_length = self.pending_reads.remove(&cookie).map(|(_, length)| length);
        assert!(
            !(self.structured && read_length.is_some()),
            "simple reply to a READ after structured replies were negotiated"
        );
        let mut data = Vec::new();
        if let (0, Some(length)) = (error, read_length) {
            data.resize(length as usize, 0);
            within("read reply data", self.stream.read_exact(&mut data))
                .await
                .expect("read reply data");
        }
        Reply {
            cookie,
            error,
            data,
        }
    }

    /// The rest of a structured reply whose first chunk's magic was read: its chunks up to
    /// the one marked done (this server never interleaves the chunks of two replies), with
    /// read data reassembled at the offsets the chunks name.
    async fn receive_structured(&mut self) -> Reply {
        let mut raw = [0u8; proto::STRUCTURED_REPLY_HEADER_BYTES];
        raw[..4].copy_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        within("chunk header", self.stream.read_exact(&mut raw[4..]))
            .await
            .expect("read chunk header");
        let mut header = proto::StructuredReplyHeader::parse(&raw).expect("valid chunk header");
        let cookie = header.cookie;
        let read = self.pending_reads.remove(&cookie);
        let mut data = vec![0u8; read.map_or(0, |(_, length)| length as usize)];
        let mut covered = 0usize;
        let mut error = 0;
        loop {
            assert_eq!(header.cookie, cookie, "chunks of two replies interleaved");
            assert!(header.length <= 33 << 20, "chunk too long: {header:?}");
            let mut payload = vec![0u8; header.length as usize];
            within("chunk payload", self.stream.read_exact(&mut payload))
                .await
                .expect("read chunk payload");
            match header.reply_type {
                proto::REPLY_TYPE_OFFSET_DATA => {
                    let (offset, length) = read.expect("data chunk for a READ");
                    let chunk_offset = u64::from_be_bytes(payload[..8].try_into().expect("8"));
                    let start = (chunk_offset - offset) as usize;
                    let bytes = &payload[8..];
                    assert!(
                        start + bytes.len() <= length as usize,
                        "chunk beyond the read"
                    );
                    data[start..start + bytes.len()].copy_from_slice(bytes);
                    covered += bytes.len();
                }
                proto::REPLY_TYPE_NONE => assert_eq!(header.length, 0),
                reply_type if header.is_error() => {
                    error = proto::ChunkError::parse(reply_type, &payload)
                        .expect("valid error chunk")
                        .error;
                }
                reply_type => panic!("unexpected chunk type {reply_type}"),
            }
            if header.is_done() {
                break;
            }
            within("chunk header", self.stream.read_exact(&mut raw))
                .await
                .expect("read chunk header");
            header = proto::StructuredReplyHeader::parse(&raw).expect("valid chunk header");
        }
        if error == 0 {
            assert_eq!(covered, data.len(), "read not covered");
        } else {
            data.clear();
        }
        Reply {
            cookie,
            error,
            data,
        }
    }

    /// Sends one request and waits for its reply.
    async fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Reply {
        let cookie = self.send(command, flags, offset, length, payload).await;
        let reply = self.receive().await;
        assert_eq!(reply.cookie, cookie, "reply to another request");
        reply
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.call(proto::CMD_WRITE, 0, offset, data.len() as u32, data)
            .await
            .error
    }

    async fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        let reply = self.call(proto::CMD_READ, 0, offset, length, &[]).await;
        match reply.error {
            0 => Ok(reply.data),
            error => Err(error),
        }
    }

    async fn disconnect(mut self) {
        self.send(proto::CMD_DISC, 0, 0, 0, &[]).await;
        assert_closed(&mut self.stream).await;
    }
}

async fn connect(address: std::net::SocketAddr) -> TcpStream {
    let stream = within("connect", TcpStream::connect(address))
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

/// A server on a loopback port serving one export as `r0`.
struct TestServer {
    address: std::net::SocketAddr,
    handle: ServerHandle,
}

impl TestServer {
    async fn start<E: Export>(export: Arc<E>, config: ServerConfig) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        let exports = Arc::new(ExportMap::single(EXPORT_NAME, export));
        TestServer {
            address,
            handle: nbd::spawn(listener, exports, config),
        }
    }

    async fn client(&self) -> Client<TcpStream> {
        Client::go(connect(self.address).await, EXPORT_NAME).await
    }

    async fn stop(self) {
        within("server shutdown", self.handle.shutdown())
            .await
            .expect("server shutdown");
    }
}

// ---------------------------------------------------------------------------------------
// The transmission model
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
        seed: u8,
    },
    Trim {
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        no_hole: bool,
    },
    Flush,
}

impl Op {
    /// The byte range the operation touches, and whether it changes the export.
    fn extent(&self) -> Option<(u64, u64, bool)> {
        match *self {
            Op::Read { offset, length } => Some((offset, u64::from(length), false)),
            Op::Write { offset, length, .. }
            | Op::Trim { offset, length }
            | Op::WriteZeroes { offset, length, .. } => Some((offset, u64::from(length), true)),
            Op::Flush => None,
        }
    }

    /// Whether two operations may not be in flight together: they overlap and one of them
    /// changes the export, so their order would decide the outcome.
    fn conflicts_with(&self, other: &Op) -> bool {
        match (self.extent(), other.extent()) {
            (Some((a, a_len, a_mut)), Some((b, b_len, b_mut))) => {
                (a_mut || b_mut) && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
            }
            _ => false,
        }
    }
}

/// Bytes expected from a read, and which of them are defined.
type Expected = (Vec<u8>, Vec<bool>);

/// A request in flight in the model: the operation, the error and data expected.
type InFlight = (Op, u32, Option<Expected>);

/// The reference: the bytes the export must hold, and which of them are defined
/// (trimmed bytes are not).
struct Reference {
    bytes: Vec<u8>,
    defined: Vec<bool>,
}

impl Reference {
    fn in_range(&self, offset: u64, length: u32) -> bool {
        offset
            .checked_add(u64::from(length))
            .is_some_and(|end| end <= self.bytes.len() as u64)
    }

    /// The NBD error the server must answer with, applying the operation if it succeeds.
    fn apply(&mut self, op: &Op, payload: &[u8]) -> u32 {
        let (offset, length) = match *op {
            Op::Flush => return 0,
            Op::Read { offset, length } | Op::Trim { offset, length } => {
                if !self.in_range(offset, length) {
                    return proto::NBD_EINVAL;
                }
                (offset, length)
            }
            Op::Write { offset, length, .. } | Op::WriteZeroes { offset, length, .. } => {
                if !self.in_range(offset, length) {
                    return proto::NBD_ENOSPC;
                }
                (offset, length)
            }
        };
        let range = offset as usize..offset as usize + length as usize;
        match op {
            Op::Read { .. } | Op::Flush => {}
            Op::Write { .. } => {
                self.bytes[range.clone()].copy_from_slice(payload);
                self.defined[range].fill(true);
            }
            Op::Trim { .. } => self.defined[range].fill(false),
            Op::WriteZeroes { .. } => {
                self.bytes[range.clone()].fill(0);
                self.defined[range].fill(true);
            }
        }
        0
    }

    /// Checks data read at `offset` against the defined bytes of `expected`.
    fn check_read(expected: &Expected, data: &[u8], offset: u64) {
        let (bytes, defined) = expected;
        assert_eq!(data.len(), bytes.len(), "read length at {offset}");
        for (index, ((&got, &want), &is_defined)) in data.iter().zip(bytes).zip(defined).enumerate()
        {
            assert!(
                !is_defined || got == want,
                "byte {} differs: read {got:#x}, expected {want:#x}",
                offset + index as u64
            );
        }
    }

    fn expected_read(&self, offset: u64, length: u32) -> Expected {
        let range = offset as usize..offset as usize + length as usize;
        (
            self.bytes[range.clone()].to_vec(),
            self.defined[range].to_vec(),
        )
    }
}

fn op_strategy(size_bytes: u64) -> impl Strategy<Value = Op> {
    // Mostly in range, sometimes across or past the end, with small and odd lengths.
    let offset = prop_oneof![
        8 => 0..size_bytes,
        1 => size_bytes.saturating_sub(64)..size_bytes + 4096,
        1 => Just(u64::MAX - 1),
    ];
    let length = prop_oneof![4 => 0u32..=4096, 2 => 4096u32..=65536, 1 => Just(0u32)];
    prop_oneof![
        4 => (offset.clone(), length.clone()).prop_map(|(offset, length)| Op::Read { offset, length }),
        4 => (offset.clone(), length.clone(), any::<bool>(), any::<u8>())
            .prop_map(|(offset, length, fua, seed)| Op::Write { offset, length, fua, seed }),
        1 => (offset.clone(), length.clone()).prop_map(|(offset, length)| Op::Trim { offset, length }),
        1 => (offset, length, any::<bool>())
            .prop_map(|(offset, length, no_hole)| Op::WriteZeroes { offset, length, no_hole }),
        1 => Just(Op::Flush),
    ]
}

fn model_strategy() -> impl Strategy<Value = (u64, usize, Vec<Op>)> {
    // Odd sizes make the end of the export unaligned.
    (1u64..300_000).prop_flat_map(|size_bytes| {
        (
            Just(size_bytes),
            1usize..=8,
            proptest::collection::vec(op_strategy(size_bytes), 1..48),
        )
    })
}

/// Runs `ops` pipelined up to `queue_depth` deep (never two conflicting operations in
/// flight), checking every reply against the reference, then reads the whole export
/// back and compares the server's memory too. With `structured`, every reply comes as
/// structured reply chunks (reads reassembled from them).
async fn run_model(size_bytes: u64, queue_depth: usize, ops: Vec<Op>, structured: bool) {
    let export = Arc::new(MemoryExport::new(size_bytes as usize));
    let server = TestServer::start(Arc::clone(&export), ServerConfig::default()).await;
    let mut client = if structured {
        let mut stream = connect(server.address).await;
        greet(&mut stream, true).await;
        assert_eq!(
            structured_reply_option(&mut stream, b"").await,
            proto::REP_ACK
        );
        let mut client = Client::enter(stream, EXPORT_NAME).await;
        client.structured = true;
        client
    } else {
        server.client().await
    };
    assert_eq!(client.size_bytes, size_bytes);
    let mut reference = Reference {
        bytes: vec![0; size_bytes as usize],
        defined: vec![true; size_bytes as usize],
    };
    // Per request in flight: the operation, the error expected, the data expected.
    let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
    for op in ops {
        while in_flight.len() >= queue_depth
            || in_flight
                .values()
                .any(|(other, _, _)| other.conflicts_with(&op))
        {
            check_reply(&mut client, &mut in_flight).await;
        }
        let (command, flags, offset, length, payload) = match op {
            Op::Read { offset, length } => (proto::CMD_READ, 0, offset, length, Vec::new()),
            Op::Write {
                offset,
                length,
                fua,
                seed,
            } => {
                let payload = (0..length)
                    .map(|i| seed.wrapping_add((i as u8).wrapping_mul(7)))
                    .collect();
                let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
                (proto::CMD_WRITE, flags, offset, length, payload)
            }
            Op::Trim { offset, length } => (proto::CMD_TRIM, 0, offset, length, Vec::new()),
            Op::WriteZeroes {
                offset,
                length,
                no_hole,
            } => {
                let flags = if no_hole { proto::CMD_FLAG_NO_HOLE } else { 0 };
                (proto::CMD_WRITE_ZEROES, flags, offset, length, Vec::new())
            }
            Op::Flush => (proto::CMD_FLUSH, 0, 0, 0, Vec::new()),
        };
        let expected_error = reference.apply(&op, &payload);
        let expected_data = match op {
            Op::Read { offset, length } if expected_error == 0 => {
                Some(reference.expected_read(offset, length))
            }
            _ => None,
        };
        let cookie = client.send(command, flags, offset, length, &payload).await;
        in_flight.insert(cookie, (op, expected_error, expected_data));
    }
    while !in_flight.is_empty() {
        check_reply(&mut client, &mut in_flight).await;
    }
    // Read everything back through the protocol, in chunks.
    let mut offset = 0;
    while offset < size_bytes {
        let length = (size_bytes - offset).min(100_000) as u32;
        let data = client.read(offset, length).await.expect("full read back");
        Reference::check_read(&reference.expected_read(offset, length), &data, offset);
        offset += u64::from(length);
    }
    Reference::check_read(&(reference.bytes, reference.defined), &export.snapshot(), 0);
    client.disconnect().await;
    server.stop().await;
}

async fn check_reply(client: &mut Client<TcpStream>, in_flight: &mut HashMap<u64, InFlight>) {
    let reply = client.receive().await;
    let (op, expected_error, expected_data) = in_flight
        .remove(&reply.cookie)
        .unwrap_or_else(|| panic!("reply with unknown cookie {}", reply.cookie));
    assert_eq!(reply.error, expected_error, "error of {op:?}");
    if let (Some(expected), Op::Read { offset, .. }) = (expected_data, &op) {
        Reference::check_read(&expected, &reply.data, *offset);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn transmission_matches_a_vec_reference((size_bytes, queue_depth, ops) in model_strategy(),
                                            structured in any::<bool>()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(run_model(size_bytes, queue_depth, ops, structured));
    }
}

// ---------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------

async fn memory_server(size_bytes: usize) -> (Arc<MemoryExport>, TestServer) {
    let export = Arc::new(MemoryExport::new(size_bytes));
    let server = TestServer::start(Arc::clone(&export), ServerConfig::default()).await;
    (export, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_honours_the_requested_information() {
    let (_export, server) = memory_server(1 << 20).await;
    let mut stream = connect(server.address).await;
    greet(&mut stream, false).await;

    let plain = info_option(&mut stream, proto::OPT_INFO, EXPORT_NAME, &[])
        .await
        .expect("info");
    let flags = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_TRIM
        | proto::FLAG_SEND_WRITE_ZEROES
        | proto::FLAG_CAN_MULTI_CONN;
    let export_info = Info::Export {
        size_bytes: 1 << 20,
        transmission_flags: flags,
    };
    assert_eq!(plain, vec![export_info.clone()]);

    // Repeated and unknown requests are answered once and ignored, respectively.
    let requested = [
        proto::INFO_NAME,
        77,
        proto::INFO_BLOCK_SIZE,
        proto::INFO_NAME,
    ];
    let block_size = Info::BlockSize {
        minimum: 1,
        preferred: 4096,
        maximum: 32 << 20,
    };
    let expected = vec![
        export_info.clone(),
        Info::Name(EXPORT_NAME.into()),
        block_size.clone(),
    ];
    let info = info_option(&mut stream, proto::OPT_INFO, EXPORT_NAME, &requested).await;
    assert_eq!(info, Ok(expected.clone()));

    // The default export is reached by the empty name and reports its canonical name.
    let default = info_option(&mut stream, proto::OPT_INFO, "", &[proto::INFO_NAME]).await;
    assert_eq!(
        default,
        Ok(vec![export_info, Info::Name(EXPORT_NAME.into())])
    );

    let unknown = info_option(&mut stream, proto::OPT_INFO, "nope", &[]).await;
    assert_eq!(unknown, Err(proto::REP_ERR_UNKNOWN));

    // GO with the same parameters as INFO gets the same information and enters
    // transmission.
    let go = info_option(&mut stream, proto::OPT_GO, EXPORT_NAME, &requested).await;
    assert_eq!(go, Ok(expected));
    let mut client = Client {
        stream,
        size_bytes: 1 << 20,
        transmission_flags: flags,
        next_cookie: 1,
        pending_reads: HashMap::new(),
        structured: false,
    };
    assert_eq!(client.write(0, b"hello").await, 0);
    assert_eq!(client.read(0, 5).await, Ok(b"hello".to_vec()));
    client.disconnect().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_unsupported_options_and_abort() {
    let (_export, server) = memory_server(4096).await;
    let mut stream = connect(server.address).await;
    greet(&mut stream, false).await;

    send_option(&mut stream, proto::OPT_LIST, &[]).await;
    let (header, data) = read_option_reply(&mut stream).await;
    assert_eq!(header.reply_type, proto::REP_SERVER);
    assert_eq!(proto::parse_rep_server(&data), Ok(EXPORT_NAME));
    let (header, _) = read_option_reply(&mut stream).await;
    assert_eq!(header.reply_type, proto::REP_ACK);

    send_option(&mut stream, proto::OPT_LIST, b"junk").await;
    let (header, _) = read_option_reply(&mut stream).await;
    assert_eq!(header.reply_type, proto::REP_ERR_INVALID);

    // Options this server does not implement are refused and haggling goes on.
    for option in [proto::OPT_STARTTLS, 4, 11, 0xDEAD_BEEF] {
        send_option(&mut stream, option, &[1, 2, 3]).await;
        let (header, message) = read_option_reply(&mut stream).await;
        assert_eq!(
            (header.option, header.reply_type),
            (option, proto::REP_ERR_UNSUP)
        );
        assert!(
            proto::parse_string(&message).is_ok(),
            "error message is a string"
        );
    }

    // Malformed NBD_OPT_GO data is refused without ending the handshake.
    send_option(&mut stream, proto::OPT_GO, &[0, 0, 0, 200, b'x']).await;
    let (header, _) = read_option_reply(&mut stream).await;
    assert_eq!(header.reply_type, proto::REP_ERR_INVALID);

    send_option(&mut stream, proto::OPT_ABORT, &[]).await;
    let (header, _) = read_option_reply(&mut stream).await;
    assert_eq!(
        (header.option, header.reply_type),
        (proto::OPT_ABORT, proto::REP_ACK)
    );
    assert_closed(&mut stream).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_with_and_without_zeroes() {
    let (_export, server) = memory_server(123_456).await;
    for no_zeroes in [false, true] {
        let mut stream = connect(server.address).await;
        greet(&mut stream, no_zeroes).await;
        send_option(&mut stream, proto::OPT_EXPORT_NAME, EXPORT_NAME.as_bytes()).await;
        let length = if no_zeroes { 10 } else { 134 };
        let mut reply = vec![0u8; length];
        within("export name reply", stream.read_exact(&mut reply))
            .await
            .expect("read reply");
        assert_eq!(&reply[..8], &123_456u64.to_be_bytes());
        assert!(reply[10..].iter().all(|&b| b == 0));
        // The connection is in transmission: a read works and nothing else was sent.
        let mut client = Client {
            stream,
            size_bytes: 123_456,
            transmission_flags: 0,
            next_cookie: 1,
            pending_reads: HashMap::new(),
            structured: false,
        };
        assert_eq!(client.read(123_000, 456).await, Ok(vec![0; 456]));
        client.disconnect().await;
    }
    // An unknown name cannot be answered with an error: the server closes.
    let mut stream = connect(server.address).await;
    greet(&mut stream, true).await;
    send_option(&mut stream, proto::OPT_EXPORT_NAME, b"nope").await;
    assert_closed(&mut stream).await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Bad input: each case gets the spec's answer or a closed connection, while a witness
// client keeps being served and the data stays unchanged.
// ---------------------------------------------------------------------------------------

const WITNESS_OFFSET: u64 = 8192;

/// Runs `attack` against a server with a known pattern in its export, checking before and
/// after that another connected client is served and the pattern is intact.
async fn with_witness<F, Fut>(config: ServerConfig, attack: F)
where
    F: FnOnce(std::net::SocketAddr, Arc<MemoryExport>) -> Fut,
    Fut: Future<Output = ()>,
{
    let export = Arc::new(MemoryExport::new(1 << 20));
    let pattern: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    export.fill(0, &pattern);
    let server = TestServer::start(Arc::clone(&export), config).await;
    let mut witness = server.client().await;
    assert_eq!(witness.read(0, 4096).await, Ok(pattern[..4096].to_vec()));
    let mutations = export.mutation_count();

    attack(server.address, Arc::clone(&export)).await;

    assert_eq!(
        export.mutation_count(),
        mutations,
        "the attack reached the export"
    );
    assert_eq!(export.snapshot(), pattern, "the attack changed the data");
    let data = witness.read(0, 1 << 20).await.expect("witness read");
    assert!(data == pattern, "witness reads changed data");
    assert_eq!(witness.write(WITNESS_OFFSET, b"still served").await, 0);
    assert_eq!(
        witness.read(WITNESS_OFFSET, 12).await,
        Ok(b"still served".to_vec())
    );
    witness.disconnect().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_greeting_replies_close_the_connection() {
    with_witness(ServerConfig::default(), |address, _| async move {
        // Client flags without NBD_FLAG_C_FIXED_NEWSTYLE, and with unknown bits.
        for flags in [0u32, 2, 1 | 4, 0xFFFF_FFFF] {
            let mut stream = connect(address).await;
            let mut greeting = [0u8; proto::GREETING_BYTES];
            within("greeting", stream.read_exact(&mut greeting))
                .await
                .expect("greeting");
            stream.write_all(&flags.to_be_bytes()).await.expect("send");
            assert_closed(&mut stream).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_option_magic_closes_the_connection() {
    with_witness(ServerConfig::default(), |address, _| async move {
        let mut stream = connect(address).await;
        greet(&mut stream, true).await;
        let mut option = option_header(proto::OPT_LIST, 0);
        option[0] ^= 0x80;
        stream.write_all(&option).await.expect("send");
        assert_closed(&mut stream).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_option_length_closes_the_connection() {
    with_witness(ServerConfig::default(), |address, _| async move {
        for option in [proto::OPT_GO, proto::OPT_EXPORT_NAME, 1234] {
            let mut stream = connect(address).await;
            greet(&mut stream, true).await;
            let header = option_header(option, 0xFFFF_FFF0);
            stream.write_all(&header).await.expect("send");
            // The server must neither wait for 4 GiB nor allocate them.
            assert_closed(&mut stream).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_handshakes_are_closed() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    with_witness(config, |address, _| async move {
        // Closed by the client halfway through the client flags.
        let mut stream = connect(address).await;
        let mut greeting = [0u8; proto::GREETING_BYTES];
        within("greeting", stream.read_exact(&mut greeting))
            .await
            .expect("greeting");
        stream.write_all(&[0, 0]).await.expect("send");
        drop(stream);
        // Halfway through an option, then silent: the handshake timeout closes it.
        let mut stream = connect(address).await;
        greet(&mut stream, true).await;
        let mut option = option_header(proto::OPT_GO, 100);
        option.extend_from_slice(&[0; 10]);
        stream.write_all(&option).await.expect("send");
        assert_closed(&mut stream).await;
        // Never says anything at all.
        let mut silent = connect(address).await;
        assert_closed(&mut silent).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_errors_and_the_connection_goes_on() {
    with_witness(ServerConfig::default(), |address, _| async move {
        let mut client = Client::go(connect(address).await, EXPORT_NAME).await;
        let size = client.size_bytes;
        // (command, flags, offset, length, payload, expected error)
        type Case<'a> = (u16, u16, u64, u32, &'a [u8], u32);
        let cases: &[Case] = &[
            // Unknown commands.
            (5, 0, 0, 512, &[], proto::NBD_EINVAL),
            (7, 0, 0, 512, &[], proto::NBD_EINVAL),
            (0x1234, 0, 0, 0, &[], proto::NBD_EINVAL),
            // Flags not valid for the command.
            (
                proto::CMD_READ,
                proto::CMD_FLAG_DF,
                0,
                512,
                &[],
                proto::NBD_EINVAL,
            ),
            (
                proto::CMD_WRITE,
                proto::CMD_FLAG_NO_HOLE,
                0,
                4,
                b"evil",
                proto::NBD_EINVAL,
            ),
            // Beyond the end.
            (proto::CMD_READ, 0, size, 1, &[], proto::NBD_EINVAL),
            (proto::CMD_READ, 0, u64::MAX, 4096, &[], proto::NBD_EINVAL),
            (proto::CMD_WRITE, 0, size - 2, 4, b"evil", proto::NBD_ENOSPC),
            (
                proto::CMD_WRITE,
                0,
                u64::MAX - 1,
                4,
                b"evil",
                proto::NBD_ENOSPC,
            ),
            (proto::CMD_TRIM, 0, size, 4096, &[], proto::NBD_EINVAL),
            (
                proto::CMD_WRITE_ZEROES,
                0,
                size - 1,
                2,
                &[],
                proto::NBD_ENOSPC,
            ),
            // A read above 32 MiB has no payload to skip: EINVAL, and go on.
            (
                proto::CMD_READ,
                0,
                0,
                (32 << 20) + 1,
                &[],
                proto::NBD_EINVAL,
            ),
            // FLUSH with arguments.
            (proto::CMD_FLUSH, 0, 0, 512, &[], proto::NBD_EINVAL),
        ];
        for &(command, flags, offset, length, payload, expected) in cases {
            let reply = client.call(command, flags, offset, length, payload).await;
            assert_eq!(
                reply.error, expected,
                "command {command} flags {flags:#x} offset {offset} length {length}"
            );
            // The stream is still in step: a valid request right after works.
            assert_eq!(client.read(0, 16).await.map(|d| d.len()), Ok(16));
        }
        client.disconnect().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_write_is_refused_without_reading_its_payload() {
    with_witness(ServerConfig::default(), |address, _| async move {
        let mut client = Client::go(connect(address).await, EXPORT_NAME).await;
        let cookie = client
            .send(proto::CMD_WRITE, 0, 0, (32 << 20) + 1, &[0xEE; 1000])
            .await;
        let reply = client.receive().await;
        assert_eq!((reply.cookie, reply.error), (cookie, proto::NBD_EINVAL));
        assert_closed(&mut client.stream).await;

        let mut client = Client::go(connect(address).await, EXPORT_NAME).await;
        client.send(proto::CMD_WRITE, 0, 0, u32::MAX, &[]).await;
        assert_eq!(client.receive().await.error, proto::NBD_EINVAL);
        assert_closed(&mut client.stream).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_request_magic_closes_the_connection() {
    with_witness(ServerConfig::default(), |address, _| async move {
        let mut client = Client::go(connect(address).await, EXPORT_NAME).await;
        let mut request = request_header(proto::CMD_READ, 0, 1, 0, 512);
        request[3] ^= 1;
        client.stream.write_all(&request).await.expect("send");
        assert_closed(&mut client.stream).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_in_the_middle_of_a_write_reaches_nothing() {
    with_witness(ServerConfig::default(), |address, _| async move {
        // Half a payload, then the client goes away.
        let mut client = Client::go(connect(address).await, EXPORT_NAME).await;
        client
            .send(proto::CMD_WRITE, 0, 0, 65536, &[0xEE; 30000])
            .await;
        drop(client);
        // Half a header.
        let mut client = Client::go(connect(address).await, EXPORT_NAME).await;
        client
            .stream
            .write_all(&[0x25, 0x60, 0x95])
            .await
            .expect("send");
        drop(client);
        // Half a payload, then the client shuts its sending side and waits: the server
        // must close without replying.
        let mut client = Client::go(connect(address).await, EXPORT_NAME).await;
        client
            .send(proto::CMD_WRITE, 0, 4096, 4096, &[0xEE; 100])
            .await;
        client.stream.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        within("server closes", client.stream.read_to_end(&mut rest))
            .await
            .expect("read");
        assert!(
            rest.is_empty(),
            "the server replied to a torn write: {rest:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demoted_export_refuses_writes_on_open_connections() {
    let (export, server) = memory_server(1 << 20).await;
    let mut client = server.client().await;
    assert_eq!(client.transmission_flags & proto::FLAG_READ_ONLY, 0);
    assert_eq!(client.write(0, b"primary").await, 0);

    export.set_writable(false);
    assert_eq!(client.write(0, b"demoted").await, proto::NBD_EPERM);
    for command in [proto::CMD_TRIM, proto::CMD_WRITE_ZEROES] {
        assert_eq!(
            client.call(command, 0, 0, 7, &[]).await.error,
            proto::NBD_EPERM
        );
    }
    assert_eq!(client.read(0, 7).await, Ok(b"primary".to_vec()));
    assert_eq!(client.call(proto::CMD_FLUSH, 0, 0, 0, &[]).await.error, 0);
    // A new client sees a read-only export.
    let second = server.client().await;
    assert_ne!(second.transmission_flags & proto::FLAG_READ_ONLY, 0);
    second.disconnect().await;

    export.set_writable(true);
    assert_eq!(client.write(0, b"PROMOTE").await, 0);
    client.disconnect().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Concurrency, bounds and shutdown, with an export whose operations wait for a gate
// ---------------------------------------------------------------------------------------

/// A memory export whose operations at or past `gated_from` wait until the test opens
/// the gate, and whose operations at `panic_at` panic (an export bug); every operation
/// reports its offset when it starts.
struct GatedExport {
    inner: MemoryExport,
    gated_from: u64,
    gate: Semaphore,
    panic_at: AtomicU64,
    started: mpsc::UnboundedSender<u64>,
}

impl GatedExport {
    fn new(size_bytes: usize, gated_from: u64) -> (Arc<GatedExport>, mpsc::UnboundedReceiver<u64>) {
        let (started, receiver) = mpsc::unbounded_channel();
        let export = GatedExport {
            inner: MemoryExport::new(size_bytes),
            gated_from,
            gate: Semaphore::new(0),
            panic_at: AtomicU64::new(u64::MAX),
            started,
        };
        (Arc::new(export), receiver)
    }

    async fn pass(&self, offset: u64) {
        let _ = self.started.send(offset);
        if offset == self.panic_at.load(Ordering::SeqCst) {
            panic!("export bug at offset {offset} (expected by the test)");
        }
        if offset >= self.gated_from {
            self.gate.acquire().await.expect("gate open").forget();
        }
    }
}

impl Export for GatedExport {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn is_writable(&self) -> bool {
        self.inner.is_writable()
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, Errno> {
        self.pass(offset).await;
        self.inner.read(offset, length).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Errno> {
        self.pass(offset).await;
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> Result<(), Errno> {
        self.pass(0).await;
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), Errno> {
        self.pass(offset).await;
        self.inner.trim(offset, length, fua).await
    }

    async fn write_zeroes(&self, offset: u64, length: u32, fua: bool) -> Result<(), Errno> {
        self.pass(offset).await;
        self.inner.write_zeroes(offset, length, fua).await
    }
}

async fn next_start(started: &mut mpsc::UnboundedReceiver<u64>) -> u64 {
    within("an export operation starts", started.recv())
        .await
        .expect("export alive")
}

async fn assert_no_start(started: &mut mpsc::UnboundedReceiver<u64>) {
    if let Ok(offset) = tokio::time::timeout(NOTHING_HAPPENS_WINDOW, started.recv()).await {
        panic!("an export operation started unexpectedly at {offset:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_out_in_completion_order() {
    let (export, mut started) = GatedExport::new(1 << 20, 1 << 19);
    let server = TestServer::start(Arc::clone(&export), ServerConfig::default()).await;
    let mut client = server.client().await;
    let slow = client.send(proto::CMD_READ, 0, 1 << 19, 4096, &[]).await;
    assert_eq!(next_start(&mut started).await, 1 << 19);
    // Requests sent after the slow one complete while it waits at the gate.
    let fast_write = client.send(proto::CMD_WRITE, 0, 0, 3, b"abc").await;
    let first = client.receive().await;
    assert_eq!((first.cookie, first.error), (fast_write, 0));
    let fast_read = client.send(proto::CMD_READ, 0, 0, 3, &[]).await;
    let second = client.receive().await;
    assert_eq!((second.cookie, second.data), (fast_read, b"abc".to_vec()));
    export.gate.add_permits(1);
    let third = client.receive().await;
    assert_eq!((third.cookie, third.data.len()), (slow, 4096));
    client.disconnect().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded() {
    let (export, mut started) = GatedExport::new(1 << 20, 0);
    let config = ServerConfig {
        max_in_flight_requests: 3,
        ..ServerConfig::default()
    };
    let server = TestServer::start(Arc::clone(&export), config).await;
    let mut client = server.client().await;
    for index in 0..10u64 {
        client
            .send(proto::CMD_WRITE, 0, index * 4096, 4, b"data")
            .await;
    }
    for _ in 0..3 {
        next_start(&mut started).await;
    }
    assert_no_start(&mut started).await;
    // Each completed reply frees room for exactly one more request.
    export.gate.add_permits(1);
    assert_eq!(client.receive().await.error, 0);
    next_start(&mut started).await;
    assert_no_start(&mut started).await;
    export.gate.add_permits(9);
    for _ in 0..9 {
        assert_eq!(client.receive().await.error, 0);
    }
    client.disconnect().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_then_closes() {
    let (export, mut started) = GatedExport::new(1 << 20, 0);
    let server = TestServer::start(Arc::clone(&export), ServerConfig::default()).await;
    let address = server.address;
    let mut client = server.client().await;
    let write = client
        .send(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 0, 5, b"flush")
        .await;
    next_start(&mut started).await;
    // A second client still haggling options.
    let mut haggling = connect(address).await;
    greet(&mut haggling, true).await;

    let shutdown = tokio::spawn(server.handle.shutdown());
    // The haggling client is closed; the server is now stopping.
    assert_closed(&mut haggling).await;
    assert!(
        !shutdown.is_finished(),
        "shutdown did not wait for the write"
    );
    export.gate.add_permits(1);
    let reply = client.receive().await;
    assert_eq!((reply.cookie, reply.error), (write, 0));
    assert_closed(&mut client.stream).await;
    within("shutdown completes", shutdown)
        .await
        .expect("join")
        .expect("shutdown");
    assert_eq!(&export.inner.snapshot()[..5], b"flush");
    // The listener is closed.
    assert!(TcpStream::connect(address).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_export_operation_gets_eio_and_the_connection_goes_on() {
    let (export, _started) = GatedExport::new(1 << 20, u64::MAX);
    export.panic_at.store(4096, Ordering::SeqCst);
    let server = TestServer::start(Arc::clone(&export), ServerConfig::default()).await;
    let mut client = server.client().await;
    assert_eq!(client.read(4096, 512).await, Err(proto::NBD_EIO));
    assert_eq!(client.write(4096, b"boom").await, proto::NBD_EIO);
    assert_eq!(client.write(0, b"fine").await, 0);
    assert_eq!(client.read(0, 4).await, Ok(b"fine".to_vec()));
    client.disconnect().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Structured replies, metadata contexts, block status, read-only exports
// ---------------------------------------------------------------------------------------

const BITMAP_CONTEXT: &str = "qemu:dirty-bitmap:nightly";

/// A 1 MiB export with data in [0, 8 KiB) and a bitmap dirty in [64 KiB, 128 KiB).
fn mapped_export() -> MemoryExport {
    let export =
        MemoryExport::new(1 << 20).with_dirty_bitmap("nightly", vec![(64 << 10, 64 << 10)]);
    export.fill(0, &[0x77; 8 << 10]);
    export
}

fn meta_context_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = Vec::new();
    proto::MetaContextRequest {
        name,
        queries: queries.to_vec(),
    }
    .encode(&mut data);
    data
}

/// Sends a metadata context option and collects `(context id, name)` replies up to
/// `NBD_REP_ACK`, or returns the error reply type.
async fn meta_context_option<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    data: &[u8],
) -> Result<Vec<(u32, String)>, u32> {
    send_option(stream, option, data).await;
    let mut contexts = Vec::new();
    loop {
        let (header, data) = read_option_reply(stream).await;
        assert_eq!(header.option, option);
        match header.reply_type {
            proto::REP_META_CONTEXT => {
                let (id, name) = proto::parse_rep_meta_context(&data).expect("valid context");
                contexts.push((id, name.to_owned()));
            }
            proto::REP_ACK => return Ok(contexts),
            error => return Err(error),
        }
    }
}

/// Sends `NBD_OPT_STRUCTURED_REPLY` with `data` and returns the reply type.
async fn structured_reply_option<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    data: &[u8],
) -> u32 {
    send_option(stream, proto::OPT_STRUCTURED_REPLY, data).await;
    let (header, _) = read_option_reply(stream).await;
    assert_eq!(header.option, proto::OPT_STRUCTURED_REPLY);
    header.reply_type
}

/// Reads one structured reply chunk (and fails on a simple reply).
async fn read_chunk<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> (proto::StructuredReplyHeader, Vec<u8>) {
    let mut raw = [0u8; proto::STRUCTURED_REPLY_HEADER_BYTES];
    within("chunk header", stream.read_exact(&mut raw))
        .await
        .expect("read chunk header");
    let header = proto::StructuredReplyHeader::parse(&raw).expect("a structured reply chunk");
    assert!(header.length <= 33 << 20, "chunk too long: {header:?}");
    let mut payload = vec![0u8; header.length as usize];
    within("chunk payload", stream.read_exact(&mut payload))
        .await
        .expect("read chunk payload");
    (header, payload)
}

/// Sends one request on a connection with structured replies and collects its chunks up
/// to the one marked done. A simple reply (allowed for commands other than READ) is
/// returned as an empty chunk list with its error.
async fn structured_call(
    client: &mut Client<TcpStream>,
    command: u16,
    flags: u16,
    offset: u64,
    length: u32,
    payload: &[u8],
) -> Result<Vec<(proto::StructuredReplyHeader, Vec<u8>)>, u32> {
    let cookie = client.send(command, flags, offset, length, payload).await;
    client.pending_reads.remove(&cookie);
    let mut magic = [0u8; 4];
    within("reply magic", client.stream.read_exact(&mut magic))
        .await
        .expect("read reply magic");
    if u32::from_be_bytes(magic) == proto::SIMPLE_REPLY_MAGIC {
        assert_ne!(command, proto::CMD_READ, "simple reply to a READ");
        let mut rest = [0u8; proto::SIMPLE_REPLY_HEADER_BYTES - 4];
        within("simple reply", client.stream.read_exact(&mut rest))
            .await
            .expect("read simple reply");
        let header = SimpleReplyHeader::parse(&[&magic[..], &rest].concat()).expect("header");
        assert_eq!(header.cookie, cookie);
        return match header.error {
            0 => Ok(Vec::new()),
            error => Err(error),
        };
    }
    // Put the magic back in front of the rest of the chunk header.
    let mut rest = [0u8; proto::STRUCTURED_REPLY_HEADER_BYTES - 4];
    within("chunk header", client.stream.read_exact(&mut rest))
        .await
        .expect("read chunk header");
    let header = proto::StructuredReplyHeader::parse(&[&magic[..], &rest].concat())
        .expect("a structured reply chunk");
    let mut payload = vec![0u8; header.length as usize];
    within("chunk payload", client.stream.read_exact(&mut payload))
        .await
        .expect("read chunk payload");
    let mut chunks = vec![(header, payload)];
    while !chunks.last().is_some_and(|(header, _)| header.is_done()) {
        chunks.push(read_chunk(&mut client.stream).await);
    }
    for (header, payload) in &chunks {
        assert_eq!(header.cookie, cookie, "chunk of another request");
        if header.is_error() {
            assert!(header.is_done(), "the error chunk is the only and last one");
            let error = proto::ChunkError::parse(header.reply_type, payload).expect("error chunk");
            return Err(error.error);
        }
    }
    Ok(chunks)
}

/// The extents of a successful BLOCK_STATUS reply, by context id.
fn block_status_extents(
    chunks: &[(proto::StructuredReplyHeader, Vec<u8>)],
) -> HashMap<u32, Vec<(u32, u32)>> {
    let mut by_context = HashMap::new();
    for (index, (header, payload)) in chunks.iter().enumerate() {
        assert_eq!(header.reply_type, proto::REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(
            header.is_done(),
            index + 1 == chunks.len(),
            "DONE on the last chunk only"
        );
        let (id, extents) = proto::parse_block_status(payload).expect("valid block status");
        let extents = extents.iter().map(|e| (e.length, e.flags)).collect();
        assert!(
            by_context.insert(id, extents).is_none(),
            "one chunk per context"
        );
    }
    by_context
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_context_options_follow_the_spec() {
    let export = Arc::new(mapped_export());
    let server = TestServer::start(Arc::clone(&export), ServerConfig::default()).await;
    let mut stream = connect(server.address).await;
    greet(&mut stream, true).await;
    let set = proto::OPT_SET_META_CONTEXT;
    let list = proto::OPT_LIST_META_CONTEXT;
    let both = [nbd::BASE_ALLOCATION, BITMAP_CONTEXT];

    // SET before structured replies is refused; LIST is allowed (ids are zero).
    let request = meta_context_request(EXPORT_NAME, &both);
    assert_eq!(
        meta_context_option(&mut stream, set, &request).await,
        Err(proto::REP_ERR_INVALID)
    );
    let everything = vec![
        (0, nbd::BASE_ALLOCATION.to_owned()),
        (0, BITMAP_CONTEXT.to_owned()),
    ];
    let all = meta_context_request(EXPORT_NAME, &[]);
    assert_eq!(
        meta_context_option(&mut stream, list, &all).await,
        Ok(everything.clone())
    );

    // NBD_OPT_STRUCTURED_REPLY takes no data.
    assert_eq!(
        structured_reply_option(&mut stream, b"x").await,
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        structured_reply_option(&mut stream, b"").await,
        proto::REP_ACK
    );

    // Queries: namespaces as wildcards when listing, unknown names ignored; garbage,
    // a query without a namespace and an unknown export are refused.
    /// (queries, expected contexts or error reply)
    type Case<'a> = (&'a [&'a str], Result<Vec<(u32, String)>, u32>);
    let cases: &[Case] = &[
        (&["base:"], Ok(vec![everything[0].clone()])),
        (&["qemu:"], Ok(vec![everything[1].clone()])),
        (&["x-unknown:", "base:nothing"], Ok(vec![])),
        (&["allocation"], Err(proto::REP_ERR_INVALID)),
    ];
    for (queries, expected) in cases {
        let request = meta_context_request(EXPORT_NAME, queries);
        assert_eq!(
            &meta_context_option(&mut stream, list, &request).await,
            expected,
            "{queries:?}"
        );
    }
    for option in [list, set] {
        let garbage = [0, 0, 0, 9, b'r'];
        assert_eq!(
            meta_context_option(&mut stream, option, &garbage).await,
            Err(proto::REP_ERR_INVALID)
        );
        let unknown = meta_context_request("nope", &both);
        assert_eq!(
            meta_context_option(&mut stream, option, &unknown).await,
            Err(proto::REP_ERR_UNKNOWN)
        );
    }

    // SET selects exact names only, with ids unique on the connection.
    let first = meta_context_option(
        &mut stream,
        set,
        &meta_context_request(EXPORT_NAME, &[nbd::BASE_ALLOCATION]),
    )
    .await
    .expect("set");
    assert_eq!(first.len(), 1);
    let request = meta_context_request(
        EXPORT_NAME,
        &[
            BITMAP_CONTEXT,
            "base:",
            "qemu:dirty-bitmap:nope",
            nbd::BASE_ALLOCATION,
        ],
    );
    let selected = meta_context_option(&mut stream, set, &request)
        .await
        .expect("set");
    let names: Vec<&str> = selected.iter().map(|(_, name)| name.as_str()).collect();
    assert_eq!(names, both);
    let ids: Vec<u32> = selected.iter().map(|(id, _)| *id).collect();
    assert!(
        ids[0] != ids[1] && !ids.contains(&first[0].0),
        "ids {ids:?} after {first:?}"
    );

    // The last selection is the one used: one chunk per context, by those ids (the
    // contexts come in the export's order, base:allocation first).
    let mut client = Client::enter(stream, EXPORT_NAME).await;
    let chunks = structured_call(&mut client, proto::CMD_BLOCK_STATUS, 0, 0, 256 << 10, &[])
        .await
        .expect("block status");
    let extents = block_status_extents(&chunks);
    assert_eq!(
        extents[&ids[1]],
        [(64 << 10, 0), (64 << 10, 1), (128 << 10, 0)]
    );
    assert_eq!(
        extents[&ids[0]],
        [(8 << 10, 0), (248 << 10, nbd::STATE_ZERO)]
    );
    client.disconnect().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_for_reads_errors_and_block_status() {
    let export = Arc::new(mapped_export());
    let server = TestServer::start(Arc::clone(&export), ServerConfig::default()).await;
    let mut stream = connect(server.address).await;
    greet(&mut stream, true).await;
    assert_eq!(
        structured_reply_option(&mut stream, b"").await,
        proto::REP_ACK
    );
    let request = meta_context_request(EXPORT_NAME, &[nbd::BASE_ALLOCATION]);
    let selected = meta_context_option(&mut stream, proto::OPT_SET_META_CONTEXT, &request)
        .await
        .expect("set");
    let id = selected[0].0;
    let mut client = Client::enter(stream, EXPORT_NAME).await;
    // Nothing new is advertised: in particular no NBD_FLAG_SEND_DF.
    assert_eq!(client.transmission_flags & proto::FLAG_SEND_DF, 0);
    let size = client.size_bytes;

    // A read is one OFFSET_DATA chunk marked done; an empty read is a NONE chunk.
    let chunks = structured_call(&mut client, proto::CMD_READ, 0, 4096, 8192, &[])
        .await
        .expect("read");
    assert_eq!(chunks.len(), 1);
    let (header, payload) = &chunks[0];
    assert_eq!(
        (header.reply_type, header.is_done()),
        (proto::REPLY_TYPE_OFFSET_DATA, true)
    );
    assert_eq!(&payload[..8], &4096u64.to_be_bytes());
    assert_eq!(&payload[8..], &export.snapshot()[4096..4096 + 8192]);
    let chunks = structured_call(&mut client, proto::CMD_READ, 0, 0, 0, &[])
        .await
        .expect("empty read");
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        (chunks[0].0.reply_type, chunks[0].0.length),
        (proto::REPLY_TYPE_NONE, 0)
    );
    assert!(chunks[0].0.is_done());

    // Block status, with REQ_ONE, from an unaligned offset to the very end.
    let whole = block_status_extents(
        &structured_call(&mut client, proto::CMD_BLOCK_STATUS, 0, 0, size as u32, &[])
            .await
            .expect("status"),
    );
    assert_eq!(
        whole[&id],
        [(8 << 10, 0), ((1 << 20) - (8 << 10), nbd::STATE_ZERO)]
    );
    let one = block_status_extents(
        &structured_call(
            &mut client,
            proto::CMD_BLOCK_STATUS,
            proto::CMD_FLAG_REQ_ONE,
            0,
            size as u32,
            &[],
        )
        .await
        .expect("status"),
    );
    assert_eq!(one[&id], [(8 << 10, 0)]);
    let tail = block_status_extents(
        &structured_call(&mut client, proto::CMD_BLOCK_STATUS, 0, size - 1, 1, &[])
            .await
            .expect("status"),
    );
    assert_eq!(tail[&id], [(1, nbd::STATE_ZERO)]);

    // Errors are ERROR chunks, READ included, and the connection goes on.
    /// (command, flags, offset, length, payload, expected error)
    type Case<'a> = (u16, u16, u64, u32, &'a [u8], u32);
    let cases: &[Case] = &[
        (proto::CMD_READ, 0, size, 1, &[], proto::NBD_EINVAL),
        (
            proto::CMD_READ,
            proto::CMD_FLAG_DF,
            0,
            512,
            &[],
            proto::NBD_EINVAL,
        ),
        (proto::CMD_BLOCK_STATUS, 0, size, 1, &[], proto::NBD_EINVAL),
        (
            proto::CMD_BLOCK_STATUS,
            0,
            size - 1,
            2,
            &[],
            proto::NBD_EINVAL,
        ),
        (proto::CMD_BLOCK_STATUS, 0, 0, 0, &[], proto::NBD_EINVAL),
        (
            proto::CMD_BLOCK_STATUS,
            proto::CMD_FLAG_NO_HOLE,
            0,
            512,
            &[],
            proto::NBD_EINVAL,
        ),
        (proto::CMD_WRITE, 0, size - 2, 4, b"evil", proto::NBD_ENOSPC),
        (0x99, 0, 0, 0, &[], proto::NBD_EINVAL),
    ];
    for &(command, flags, offset, length, payload, expected) in cases {
        let reply = structured_call(&mut client, command, flags, offset, length, payload).await;
        assert_eq!(
            reply.map(|_| ()),
            Err(expected),
            "command {command} flags {flags:#x} {offset}+{length}"
        );
        let read = structured_call(&mut client, proto::CMD_READ, 0, 0, 16, &[]).await;
        assert_eq!(
            read.map(|chunks| chunks[0].1.len()),
            Ok(8 + 16),
            "in step after {command}"
        );
    }
    // Writes and flushes still succeed (with simple replies, which the spec allows).
    assert_eq!(
        structured_call(&mut client, proto::CMD_WRITE, 0, 0, 4, b"abcd").await,
        Ok(vec![])
    );
    assert_eq!(
        structured_call(&mut client, proto::CMD_FLUSH, 0, 0, 0, &[]).await,
        Ok(vec![])
    );
    assert_eq!(&export.snapshot()[..4], b"abcd");
    client.disconnect().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_without_a_selected_context_is_einval() {
    let mut exports = ExportMap::new();
    exports.insert("r0", Arc::new(mapped_export()));
    exports.insert("r1", Arc::new(mapped_export()));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("local address");
    let handle = nbd::spawn(listener, Arc::new(exports), ServerConfig::default());

    // Structured replies but no SET; then contexts selected for another export.
    for select_for in [None, Some("r1")] {
        let mut stream = connect(address).await;
        greet(&mut stream, true).await;
        assert_eq!(
            structured_reply_option(&mut stream, b"").await,
            proto::REP_ACK
        );
        if let Some(name) = select_for {
            let request = meta_context_request(name, &[nbd::BASE_ALLOCATION]);
            let selected =
                meta_context_option(&mut stream, proto::OPT_SET_META_CONTEXT, &request).await;
            assert_eq!(selected.map(|contexts| contexts.len()), Ok(1));
        }
        let mut client = Client::enter(stream, "r0").await;
        let reply = structured_call(&mut client, proto::CMD_BLOCK_STATUS, 0, 0, 4096, &[]).await;
        assert_eq!(
            reply,
            Err(proto::NBD_EINVAL),
            "contexts selected for {select_for:?}"
        );
        let read = structured_call(&mut client, proto::CMD_READ, 0, 0, 16, &[]).await;
        assert!(read.is_ok(), "the connection goes on");
        client.disconnect().await;
    }
    within("server shutdown", handle.shutdown())
        .await
        .expect("server shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes_with_eperm() {
    let export = Arc::new(MemoryExport::new(1 << 20).with_read_only(true));
    export.fill(0, b"keep");
    let server = TestServer::start(Arc::clone(&export), ServerConfig::default()).await;

    // Simple replies.
    let mut client = server.client().await;
    assert_ne!(client.transmission_flags & proto::FLAG_READ_ONLY, 0);
    assert_eq!(client.write(0, b"evil").await, proto::NBD_EPERM);
    for command in [proto::CMD_TRIM, proto::CMD_WRITE_ZEROES] {
        let reply = client.call(command, 0, 0, 4096, &[]).await;
        assert_eq!(reply.error, proto::NBD_EPERM, "command {command}");
    }
    assert_eq!(client.read(0, 4).await, Ok(b"keep".to_vec()));
    client.disconnect().await;

    // Structured replies: the same errors as ERROR chunks.
    let mut stream = connect(server.address).await;
    greet(&mut stream, true).await;
    assert_eq!(
        structured_reply_option(&mut stream, b"").await,
        proto::REP_ACK
    );
    let mut client = Client::enter(stream, EXPORT_NAME).await;
    assert_eq!(
        structured_call(&mut client, proto::CMD_WRITE, 0, 0, 4, b"evil").await,
        Err(proto::NBD_EPERM)
    );
    assert_eq!(export.mutation_count(), 0);
    assert_eq!(&export.snapshot()[..4], b"keep");
    client.disconnect().await;
    server.stop().await;
}
