//! The replication wire format: length-prefixed frames with header and body CRCs.
//!
//! Every frame is a 24-byte header followed by its body:
//!
//! | offset | size | field                                            |
//! |--------|------|--------------------------------------------------|
//! | 0      | 4    | magic `RPLW`                                     |
//! | 4      | 2    | frame type                                       |
//! | 6      | 2    | reserved (0)                                     |
//! | 8      | 4    | body length (≤ [`MAX_BODY_BYTES`])               |
//! | 12     | 4    | body CRC32                                       |
//! | 16     | 4    | reserved (0)                                     |
//! | 20     | 4    | header CRC32 of bytes 0..20                      |
//!
//! The body CRC covers the whole body, except for RECORD and RESYNC_DATA frames, where
//! it covers the body up to the block data: that data is covered block by block by
//! CRCs inside the covered part (the journal record's own, for RECORD), so it is
//! checked end to end without hashing it twice. Decoding never panics and never
//! allocates more than the (bounded) body length. Byte tables: `docs/FORMAT.md`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::auth::{Challenge, Proof, CHALLENGE_BYTES, PROOF_BYTES};
use crate::gen::GenerationIds;
use crate::record::{Record, RecordError};
use crate::repl::{DiskState, Role};
use crate::BLOCK_BYTES;

pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"RPLW");
pub const FRAME_HEADER_BYTES: usize = 24;
/// Largest body: a 32 MiB record plus its header, with room to spare.
pub const MAX_BODY_BYTES: u32 = 33 << 20;
/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = 6;
/// Most blocks in one RESYNC_DATA, READ_REPLY or VERIFY frame.
pub const MAX_FRAME_BLOCKS: u32 = 256;

/// Which of the two connections a HELLO opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Records, resync data, bitmaps (bulk).
    Data,
    /// Acknowledgements and heartbeats (never waits behind bulk data).
    Meta,
}

/// First frame on each connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    pub channel: Channel,
    pub resource_uuid: [u8; 16],
    pub node_id: u32,
    pub resource: String,
    pub node: String,
    /// The sender holds a secret and authenticates ([`crate::auth`]).
    pub authenticates: bool,
    /// A fresh random value for the receiver to answer (zero when not authenticating).
    pub challenge: Challenge,
    /// The acceptor's answer to the dialer's challenge; zero in the dialer's HELLO and
    /// when not authenticating.
    pub proof: Proof,
}

/// A node's state, exchanged after HELLO and whenever it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerState {
    pub role: Role,
    pub disk: DiskState,
    pub generations: GenerationIds,
    pub crashed_primary: bool,
    pub discard_my_data: bool,
    pub dirty_blocks: u64,
    pub next_seq: u64,
    pub size_bytes: u64,
}

/// Every frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello(Hello),
    /// Connection refused; the reason is for logs and status.
    Reject(String),
    /// The dialer's answer to the acceptor's challenge (after the HELLOs, when both
    /// nodes hold a secret).
    Auth(Proof),
    State(PeerState),
    /// Part of an out-of-sync bitmap: `words` start at word `first_word`.
    Bitmap {
        first_word: u64,
        words: Vec<u64>,
        last: bool,
    },
    /// Part of an out-of-sync bitmap: `blocks` set bits from `first_block` (a long
    /// run, as after a full sync is decided, in one frame whatever its length).
    BitmapRun {
        first_block: u64,
        blocks: u64,
        last: bool,
    },
    Record(RecordFrame),
    /// The peer received every record up to `seq`.
    AckReceived(u64),
    /// The peer journaled every record up to `seq` (durably for FUA records).
    AckWritten(u64),
    Flush(u64),
    FlushAck(u64),
    ResyncData(BlockData),
    ResyncAck {
        first_block: u64,
        blocks: u32,
    },
    /// The source sent every out-of-sync block; `current` is its generation.
    ResyncDone {
        current: u64,
    },
    ResyncDoneAck,
    Ping(u64),
    Pong(u64),
    /// Asks for blocks (read repair).
    ReadRequest {
        id: u64,
        first_block: u64,
        blocks: u32,
    },
    /// Answers a read request (`data` empty and `error` set on failure).
    ReadReply {
        id: u64,
        data: Option<BlockData>,
        error: Option<String>,
    },
    /// Asks for the stored and the actual checksums of blocks (online verify).
    VerifyRequest {
        id: u64,
        first_block: u64,
        blocks: u32,
    },
    /// Per block: the stored CRC32, the CRC32 of the data on the store, and the data's
    /// 64-bit digest (`checksum::block_digest`), which is what replicas are compared by.
    VerifyReply {
        id: u64,
        first_block: u64,
        stored: Vec<u32>,
        actual: Vec<u32>,
        digests: Vec<u64>,
    },
    /// The primary started a new generation while connected and in sync.
    NewGeneration {
        current: u64,
    },
    /// Digests (`checksum::block_digest`) of blocks the source would resync; the
    /// target answers which differ from its data.
    ResyncCheck {
        first_block: u64,
        digests: Vec<u64>,
    },
    /// Bitmap over the checked run: bit i set = block differs, send it.
    ResyncCheckReply {
        first_block: u64,
        blocks: u32,
        differ: Vec<u64>,
    },
    /// The sender's journal holds every record up to this sequence durably; the
    /// receiver may forget that it holds records the sender might not have.
    Durable(u64),
    /// The sender wants to become Primary and asks the receiver to agree (the first
    /// phase of a promotion with connected peers).
    PromoteRequest {
        id: u64,
    },
    /// The answer: agreed (the receiver will not promote itself until the requester's
    /// next STATE), or refused with a reason.
    PromoteReply {
        id: u64,
        ok: bool,
        reason: String,
    },
    /// Take snapshot `name` as of record `point` (every record up to it, none after).
    /// Travels on the data channel behind the records up to `point`, ahead of the rest.
    Snapshot {
        name: String,
        point: u64,
    },
    /// The answer to a SNAPSHOT: taken, or why not.
    SnapshotReply {
        name: String,
        error: Option<String>,
    },
}

/// A journal record carried on the wire (its bytes are exactly the journal's).
#[derive(Debug, Clone)]
pub struct RecordFrame(pub Record);

impl PartialEq for RecordFrame {
    fn eq(&self, other: &RecordFrame) -> bool {
        self.0.encoded_header == other.0.encoded_header && self.0.data == other.0.data
    }
}

/// Blocks with their CRCs (`data` is `None` when all blocks are zero).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockData {
    pub first_block: u64,
    pub blocks: u32,
    pub crcs: Vec<u32>,
    pub data: Option<Bytes>,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic {0:#010x} (not a replicad peer, or the stream is corrupt)")]
    BadMagic(u32),
    #[error("frame header checksum mismatch (corrupt frame)")]
    BadHeaderCrc,
    #[error("frame body checksum mismatch (corrupt frame)")]
    BadBodyCrc,
    #[error("frame body of {0} bytes exceeds the limit")]
    TooLarge(u32),
    #[error("unknown frame type {0}")]
    UnknownType(u16),
    #[error("malformed {frame} frame: {detail}")]
    Malformed { frame: &'static str, detail: String },
    #[error("record in frame: {0}")]
    Record(#[from] RecordError),
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub frame_type: u16,
    pub body_bytes: u32,
    pub body_crc: u32,
}

const T_HELLO: u16 = 1;
const T_REJECT: u16 = 2;
const T_STATE: u16 = 3;
const T_BITMAP: u16 = 4;
const T_RECORD: u16 = 5;
const T_ACK_RECEIVED: u16 = 6;
const T_ACK_WRITTEN: u16 = 7;
const T_FLUSH: u16 = 8;
const T_FLUSH_ACK: u16 = 9;
const T_RESYNC_DATA: u16 = 10;
const T_RESYNC_ACK: u16 = 11;
const T_RESYNC_DONE: u16 = 12;
const T_RESYNC_DONE_ACK: u16 = 13;
const T_PING: u16 = 14;
const T_PONG: u16 = 15;
const T_READ_REQUEST: u16 = 16;
const T_READ_REPLY: u16 = 17;
const T_VERIFY_REQUEST: u16 = 18;
const T_VERIFY_REPLY: u16 = 19;
const T_NEW_GENERATION: u16 = 20;
const T_RESYNC_CHECK: u16 = 21;
const T_RESYNC_CHECK_REPLY: u16 = 22;
const T_DURABLE: u16 = 23;
const T_PROMOTE_REQUEST: u16 = 24;
const T_PROMOTE_REPLY: u16 = 25;
const T_AUTH: u16 = 26;
const T_BITMAP_RUN: u16 = 27;
const T_SNAPSHOT: u16 = 28;
const T_SNAPSHOT_REPLY: u16 = 29;

/// Decodes a frame header. Never panics.
pub fn decode_header(buf: &[u8; FRAME_HEADER_BYTES]) -> Result<FrameHeader, WireError> {
    let u32_at = |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    let magic = u32_at(0);
    if magic != FRAME_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if u32_at(20) != crc32fast::hash(&buf[..20]) {
        return Err(WireError::BadHeaderCrc);
    }
    let body_bytes = u32_at(8);
    if body_bytes > MAX_BODY_BYTES {
        return Err(WireError::TooLarge(body_bytes));
    }
    Ok(FrameHeader {
        frame_type: u16::from_le_bytes([buf[4], buf[5]]),
        body_bytes,
        body_crc: u32_at(12),
    })
}

fn encode_header(frame_type: u16, body_bytes: usize, body_crc: u32) -> [u8; FRAME_HEADER_BYTES] {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    header[..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    header[4..6].copy_from_slice(&frame_type.to_le_bytes());
    header[8..12].copy_from_slice(&(body_bytes as u32).to_le_bytes());
    header[12..16].copy_from_slice(&body_crc.to_le_bytes());
    let crc = crc32fast::hash(&header[..20]);
    header[20..24].copy_from_slice(&crc.to_le_bytes());
    header
}

fn put_string(buf: &mut BytesMut, text: &str) {
    let bytes = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
    buf.put_u16_le(bytes.len() as u16);
    buf.put_slice(bytes);
}

fn role_code(role: Role) -> u8 {
    match role {
        Role::Primary => 1,
        Role::Secondary => 2,
    }
}

fn disk_code(disk: DiskState) -> u8 {
    match disk {
        DiskState::UpToDate => 1,
        DiskState::Inconsistent => 2,
        DiskState::Outdated => 3,
        DiskState::Failed => 4,
        DiskState::Diskless => 5,
        DiskState::Attaching => 6,
    }
}

fn put_block_data(buf: &mut BytesMut, data: &BlockData) {
    buf.put_u64_le(data.first_block);
    buf.put_u32_le(data.blocks);
    buf.put_u32_le(u32::from(data.data.is_none()));
    for crc in &data.crcs {
        buf.put_u32_le(*crc);
    }
}

impl Frame {
    /// The connection a frame travels on (FORMAT.md §9.3): bulk and ordered work on
    /// *data*, acknowledgements, heartbeats and small requests on *meta*, so that they
    /// never wait behind megabytes of records or resync data.
    pub fn channel(&self) -> Channel {
        match self {
            Frame::AckReceived(_)
            | Frame::AckWritten(_)
            | Frame::FlushAck(_)
            | Frame::ResyncAck { .. }
            | Frame::Ping(_)
            | Frame::Pong(_)
            | Frame::ResyncCheckReply { .. }
            | Frame::PromoteReply { .. }
            | Frame::SnapshotReply { .. }
            | Frame::Durable(_) => Channel::Meta,
            Frame::Hello(_)
            | Frame::Reject(_)
            | Frame::Auth(_)
            | Frame::State(_)
            | Frame::Bitmap { .. }
            | Frame::BitmapRun { .. }
            | Frame::Record(_)
            | Frame::Flush(_)
            | Frame::ResyncData(_)
            | Frame::ResyncDone { .. }
            | Frame::ResyncDoneAck
            | Frame::ReadRequest { .. }
            | Frame::ReadReply { .. }
            | Frame::VerifyRequest { .. }
            | Frame::VerifyReply { .. }
            | Frame::NewGeneration { .. }
            | Frame::PromoteRequest { .. }
            | Frame::Snapshot { .. }
            | Frame::ResyncCheck { .. } => Channel::Data,
        }
    }

    /// Encodes into wire parts (header, body head, bulk data) to send with one vectored write.
    pub fn encode(&self) -> Vec<Bytes> {
        let mut body = BytesMut::new();
        let mut bulk: Option<Bytes> = None;
        let frame_type = match self {
            Frame::Hello(hello) => {
                body.put_u32_le(hello.protocol_version);
                body.put_u8(match hello.channel {
                    Channel::Data => 1,
                    Channel::Meta => 2,
                });
                body.put_slice(&hello.resource_uuid);
                body.put_u32_le(hello.node_id);
                put_string(&mut body, &hello.resource);
                put_string(&mut body, &hello.node);
                body.put_u8(u8::from(hello.authenticates));
                body.put_slice(&hello.challenge);
                body.put_slice(&hello.proof);
                T_HELLO
            }
            Frame::Reject(reason) => {
                put_string(&mut body, reason);
                T_REJECT
            }
            Frame::Auth(proof) => {
                body.put_slice(proof);
                T_AUTH
            }
            Frame::State(state) => {
                body.put_u8(role_code(state.role));
                body.put_u8(disk_code(state.disk));
                body.put_u8(u8::from(state.crashed_primary) | u8::from(state.discard_my_data) << 1);
                body.put_u8(0);
                body.put_u64_le(state.generations.current);
                body.put_u64_le(state.generations.bitmap);
                body.put_u64_le(state.generations.history[0]);
                body.put_u64_le(state.generations.history[1]);
                body.put_u64_le(state.dirty_blocks);
                body.put_u64_le(state.next_seq);
                body.put_u64_le(state.size_bytes);
                T_STATE
            }
            Frame::Bitmap {
                first_word,
                words,
                last,
            } => {
                body.put_u64_le(*first_word);
                body.put_u32_le(words.len() as u32);
                body.put_u32_le(u32::from(*last));
                for word in words {
                    body.put_u64_le(*word);
                }
                T_BITMAP
            }
            Frame::BitmapRun {
                first_block,
                blocks,
                last,
            } => {
                body.put_u64_le(*first_block);
                body.put_u64_le(*blocks);
                body.put_u32_le(u32::from(*last));
                T_BITMAP_RUN
            }
            Frame::Record(RecordFrame(record)) => {
                body.put_slice(&record.encoded_header);
                bulk = Some(record.data.clone());
                T_RECORD
            }
            Frame::AckReceived(seq) => {
                body.put_u64_le(*seq);
                T_ACK_RECEIVED
            }
            Frame::AckWritten(seq) => {
                body.put_u64_le(*seq);
                T_ACK_WRITTEN
            }
            Frame::Flush(id) => {
                body.put_u64_le(*id);
                T_FLUSH
            }
            Frame::FlushAck(id) => {
                body.put_u64_le(*id);
                T_FLUSH_ACK
            }
            Frame::ResyncData(data) => {
                put_block_data(&mut body, data);
                bulk = data.data.clone();
                T_RESYNC_DATA
            }
            Frame::ResyncAck {
                first_block,
                blocks,
            } => {
                body.put_u64_le(*first_block);
                body.put_u32_le(*blocks);
                T_RESYNC_ACK
            }
            Frame::ResyncDone { current } => {
                body.put_u64_le(*current);
                T_RESYNC_DONE
            }
            Frame::ResyncDoneAck => T_RESYNC_DONE_ACK,
            Frame::Ping(nonce) => {
                body.put_u64_le(*nonce);
                T_PING
            }
            Frame::Pong(nonce) => {
                body.put_u64_le(*nonce);
                T_PONG
            }
            Frame::ReadRequest {
                id,
                first_block,
                blocks,
            } => {
                body.put_u64_le(*id);
                body.put_u64_le(*first_block);
                body.put_u32_le(*blocks);
                T_READ_REQUEST
            }
            Frame::ReadReply { id, data, error } => {
                body.put_u64_le(*id);
                match (data, error) {
                    (Some(data), _) => {
                        body.put_u8(0);
                        put_block_data(&mut body, data);
                        bulk = data.data.clone();
                    }
                    (None, error) => {
                        body.put_u8(1);
                        put_string(&mut body, error.as_deref().unwrap_or("read failed"));
                    }
                }
                T_READ_REPLY
            }
            Frame::VerifyRequest {
                id,
                first_block,
                blocks,
            } => {
                body.put_u64_le(*id);
                body.put_u64_le(*first_block);
                body.put_u32_le(*blocks);
                T_VERIFY_REQUEST
            }
            Frame::VerifyReply {
                id,
                first_block,
                stored,
                actual,
                digests,
            } => {
                body.put_u64_le(*id);
                body.put_u64_le(*first_block);
                body.put_u32_le(stored.len() as u32);
                for crc in stored.iter().chain(actual) {
                    body.put_u32_le(*crc);
                }
                for digest in digests {
                    body.put_u64_le(*digest);
                }
                T_VERIFY_REPLY
            }
            Frame::NewGeneration { current } => {
                body.put_u64_le(*current);
                T_NEW_GENERATION
            }
            Frame::ResyncCheck {
                first_block,
                digests,
            } => {
                body.put_u64_le(*first_block);
                body.put_u32_le(digests.len() as u32);
                for digest in digests {
                    body.put_u64_le(*digest);
                }
                T_RESYNC_CHECK
            }
            Frame::Durable(seq) => {
                body.put_u64_le(*seq);
                T_DURABLE
            }
            Frame::PromoteRequest { id } => {
                body.put_u64_le(*id);
                T_PROMOTE_REQUEST
            }
            Frame::PromoteReply { id, ok, reason } => {
                body.put_u64_le(*id);
                body.put_u8(u8::from(*ok));
                put_string(&mut body, reason);
                T_PROMOTE_REPLY
            }
            Frame::Snapshot { name, point } => {
                body.put_u64_le(*point);
                put_string(&mut body, name);
                T_SNAPSHOT
            }
            Frame::SnapshotReply { name, error } => {
                body.put_u8(u8::from(error.is_none()));
                put_string(&mut body, name);
                put_string(&mut body, error.as_deref().unwrap_or(""));
                T_SNAPSHOT_REPLY
            }
            Frame::ResyncCheckReply {
                first_block,
                blocks,
                differ,
            } => {
                body.put_u64_le(*first_block);
                body.put_u32_le(*blocks);
                body.put_u32_le(differ.len() as u32);
                for word in differ {
                    body.put_u64_le(*word);
                }
                T_RESYNC_CHECK_REPLY
            }
        };
        let covered = body.freeze();
        let body_crc = crc32fast::hash(&covered);
        let total = covered.len() + bulk.as_ref().map_or(0, Bytes::len);
        let mut parts = vec![
            Bytes::copy_from_slice(&encode_header(frame_type, total, body_crc)),
            covered,
        ];
        if let Some(bulk) = bulk.filter(|b| !b.is_empty()) {
            parts.push(bulk);
        }
        parts
    }

    /// Encodes into one contiguous buffer (tests, small frames).
    pub fn encode_to_vec(&self) -> Vec<u8> {
        self.encode()
            .iter()
            .flat_map(|part| part.iter().copied())
            .collect()
    }

    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "HELLO",
            Frame::Reject(_) => "REJECT",
            Frame::Auth(_) => "AUTH",
            Frame::State(_) => "STATE",
            Frame::Bitmap { .. } => "BITMAP",
            Frame::BitmapRun { .. } => "BITMAP_RUN",
            Frame::Record(_) => "RECORD",
            Frame::AckReceived(_) => "ACK_RECEIVED",
            Frame::AckWritten(_) => "ACK_WRITTEN",
            Frame::Flush(_) => "FLUSH",
            Frame::FlushAck(_) => "FLUSH_ACK",
            Frame::ResyncData(_) => "RESYNC_DATA",
            Frame::ResyncAck { .. } => "RESYNC_ACK",
            Frame::ResyncDone { .. } => "RESYNC_DONE",
            Frame::ResyncDoneAck => "RESYNC_DONE_ACK",
            Frame::Ping(_) => "PING",
            Frame::Pong(_) => "PONG",
            Frame::ReadRequest { .. } => "READ_REQUEST",
            Frame::ReadReply { .. } => "READ_REPLY",
            Frame::VerifyRequest { .. } => "VERIFY_REQUEST",
            Frame::VerifyReply { .. } => "VERIFY_REPLY",
            Frame::NewGeneration { .. } => "NEW_GENERATION",
            Frame::ResyncCheck { .. } => "RESYNC_CHECK",
            Frame::ResyncCheckReply { .. } => "RESYNC_CHECK_REPLY",
            Frame::Durable(_) => "DURABLE",
            Frame::PromoteRequest { .. } => "PROMOTE_REQUEST",
            Frame::PromoteReply { .. } => "PROMOTE_REPLY",
            Frame::Snapshot { .. } => "SNAPSHOT",
            Frame::SnapshotReply { .. } => "SNAPSHOT_REPLY",
        }
    }
}

/// A cursor over a body that reports truncation instead of panicking.
struct Body<'a> {
    frame: &'static str,
    buf: &'a [u8],
}

impl Body<'_> {
    fn need(&self, bytes: usize) -> Result<(), WireError> {
        if self.buf.remaining() < bytes {
            return Err(WireError::Malformed {
                frame: self.frame,
                detail: format!("truncated (needs {bytes} more bytes)"),
            });
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.buf.get_u64_le())
    }
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.need(N)?;
        let mut out = [0u8; N];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }
    fn string(&mut self) -> Result<String, WireError> {
        self.need(2)?;
        let len = self.buf.get_u16_le() as usize;
        self.need(len)?;
        let text = String::from_utf8(self.buf[..len].to_vec())
            .map_err(|_| self.malformed("string is not UTF-8"))?;
        self.buf.advance(len);
        Ok(text)
    }
    fn u32s(&mut self, count: usize) -> Result<Vec<u32>, WireError> {
        self.need(
            count
                .checked_mul(4)
                .ok_or_else(|| self.malformed("count overflows"))?,
        )?;
        Ok((0..count).map(|_| self.buf.get_u32_le()).collect())
    }
    fn u64s(&mut self, count: usize) -> Result<Vec<u64>, WireError> {
        self.need(
            count
                .checked_mul(8)
                .ok_or_else(|| self.malformed("count overflows"))?,
        )?;
        Ok((0..count).map(|_| self.buf.get_u64_le()).collect())
    }
    fn malformed(&self, detail: &str) -> WireError {
        WireError::Malformed {
            frame: self.frame,
            detail: detail.to_string(),
        }
    }
    fn finish(self) -> Result<(), WireError> {
        if self.buf.has_remaining() {
            return Err(self.malformed("trailing bytes"));
        }
        Ok(())
    }
}

fn decode_block_head(body: &mut Body<'_>) -> Result<(u64, u32, bool, Vec<u32>), WireError> {
    let first_block = body.u64()?;
    let blocks = body.u32()?;
    let zero = body.u32()? != 0;
    if blocks == 0 || blocks > MAX_FRAME_BLOCKS {
        return Err(body.malformed("block count out of range"));
    }
    let crcs = body.u32s(blocks as usize)?;
    Ok((first_block, blocks, zero, crcs))
}

/// Splits a block-data body into head and data, checks the CRCs and builds [`BlockData`].
fn decode_block_data(
    frame: &'static str,
    full: &Bytes,
    head_start: usize,
    header: &FrameHeader,
) -> Result<BlockData, WireError> {
    let mut body = Body {
        frame,
        buf: &full[head_start..],
    };
    let before = body.buf.len();
    let (first_block, blocks, zero, crcs) = decode_block_head(&mut body)?;
    let head_end = head_start + (before - body.buf.len());
    if crc32fast::hash(&full[..head_end]) != header.body_crc {
        return Err(WireError::BadBodyCrc);
    }
    let data = full.slice(head_end..);
    if zero {
        if !data.is_empty() {
            return Err(WireError::Malformed {
                frame,
                detail: "zero blocks carry data".into(),
            });
        }
        let zero_crc = crate::checksum::zero_block_crc();
        if crcs.iter().any(|crc| *crc != zero_crc) {
            return Err(WireError::Malformed {
                frame,
                detail: "zero blocks with non-zero checksums".into(),
            });
        }
        return Ok(BlockData {
            first_block,
            blocks,
            crcs,
            data: None,
        });
    }
    if data.len() as u64 != u64::from(blocks) * BLOCK_BYTES {
        return Err(WireError::Malformed {
            frame,
            detail: format!("{} data bytes for {blocks} blocks", data.len()),
        });
    }
    for (index, (block, crc)) in data.chunks(BLOCK_BYTES as usize).zip(&crcs).enumerate() {
        if crate::checksum::block_crc(block) != *crc {
            return Err(WireError::Malformed {
                frame,
                detail: format!("block {} fails its checksum", first_block + index as u64),
            });
        }
    }
    Ok(BlockData {
        first_block,
        blocks,
        crcs,
        data: Some(data),
    })
}

/// Decodes a body for `header`. Checks the body CRC and every field; never panics.
pub fn decode_body(header: &FrameHeader, body_bytes: Bytes) -> Result<Frame, WireError> {
    if body_bytes.len() != header.body_bytes as usize {
        return Err(WireError::Malformed {
            frame: "any",
            detail: "body length mismatch".into(),
        });
    }
    match header.frame_type {
        T_RECORD => {
            let record_header = crate::record::RecordHeader::decode(&body_bytes)?;
            let head = record_header.header_bytes();
            if crc32fast::hash(&body_bytes[..head]) != header.body_crc {
                return Err(WireError::BadBodyCrc);
            }
            let record = Record::parse(body_bytes)?;
            return Ok(Frame::Record(RecordFrame(record)));
        }
        T_RESYNC_DATA => {
            return Ok(Frame::ResyncData(decode_block_data(
                "RESYNC_DATA",
                &body_bytes,
                0,
                header,
            )?))
        }
        T_READ_REPLY => {
            let mut body = Body {
                frame: "READ_REPLY",
                buf: &body_bytes,
            };
            let id = body.u64()?;
            let status = body.u8()?;
            if status == 0 {
                let data = decode_block_data("READ_REPLY", &body_bytes, 9, header)?;
                return Ok(Frame::ReadReply {
                    id,
                    data: Some(data),
                    error: None,
                });
            }
            let error = body.string()?;
            body.finish()?;
            if crc32fast::hash(&body_bytes) != header.body_crc {
                return Err(WireError::BadBodyCrc);
            }
            return Ok(Frame::ReadReply {
                id,
                data: None,
                error: Some(error),
            });
        }
        _ => {}
    }
    if crc32fast::hash(&body_bytes) != header.body_crc {
        return Err(WireError::BadBodyCrc);
    }
    let name = |t: u16| match t {
        T_HELLO => "HELLO",
        T_REJECT => "REJECT",
        T_STATE => "STATE",
        T_BITMAP => "BITMAP",
        T_BITMAP_RUN => "BITMAP_RUN",
        _ => "control",
    };
    let mut body = Body {
        frame: name(header.frame_type),
        buf: &body_bytes,
    };
    let frame = match header.frame_type {
        T_HELLO => {
            let protocol_version = body.u32()?;
            let channel = match body.u8()? {
                1 => Channel::Data,
                2 => Channel::Meta,
                _ => return Err(body.malformed("unknown channel")),
            };
            let resource_uuid = body.bytes::<16>()?;
            let node_id = body.u32()?;
            let resource = body.string()?;
            let node = body.string()?;
            let mut hello = Hello {
                protocol_version,
                channel,
                resource_uuid,
                node_id,
                resource,
                node,
                authenticates: false,
                challenge: [0; CHALLENGE_BYTES],
                proof: [0; PROOF_BYTES],
            };
            // A HELLO of protocol 3 or older ends here: it decodes, so that the
            // receiver refuses the version with a clear reason instead of a bad frame.
            if protocol_version >= 4 || !body.buf.is_empty() {
                hello.authenticates = match body.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(body.malformed("authentication flag is neither 0 nor 1")),
                };
                hello.challenge = body.bytes()?;
                hello.proof = body.bytes()?;
            }
            Frame::Hello(hello)
        }
        T_REJECT => Frame::Reject(body.string()?),
        T_AUTH => Frame::Auth(body.bytes()?),
        T_STATE => {
            let role = match body.u8()? {
                1 => Role::Primary,
                2 => Role::Secondary,
                _ => return Err(body.malformed("unknown role")),
            };
            let disk = match body.u8()? {
                1 => DiskState::UpToDate,
                2 => DiskState::Inconsistent,
                3 => DiskState::Outdated,
                4 => DiskState::Failed,
                5 => DiskState::Diskless,
                6 => DiskState::Attaching,
                _ => return Err(body.malformed("unknown disk state")),
            };
            let flags = body.u8()?;
            body.u8()?;
            let generations = GenerationIds {
                current: body.u64()?,
                bitmap: body.u64()?,
                history: [body.u64()?, body.u64()?],
            };
            Frame::State(PeerState {
                role,
                disk,
                generations,
                crashed_primary: flags & 1 != 0,
                discard_my_data: flags & 2 != 0,
                dirty_blocks: body.u64()?,
                next_seq: body.u64()?,
                size_bytes: body.u64()?,
            })
        }
        T_BITMAP => {
            let first_word = body.u64()?;
            let count = body.u32()? as usize;
            let last = body.u32()? != 0;
            Frame::Bitmap {
                first_word,
                words: body.u64s(count)?,
                last,
            }
        }
        T_BITMAP_RUN => Frame::BitmapRun {
            first_block: body.u64()?,
            blocks: body.u64()?,
            last: body.u32()? != 0,
        },
        T_ACK_RECEIVED => Frame::AckReceived(body.u64()?),
        T_ACK_WRITTEN => Frame::AckWritten(body.u64()?),
        T_FLUSH => Frame::Flush(body.u64()?),
        T_FLUSH_ACK => Frame::FlushAck(body.u64()?),
        T_RESYNC_ACK => Frame::ResyncAck {
            first_block: body.u64()?,
            blocks: body.u32()?,
        },
        T_RESYNC_DONE => Frame::ResyncDone {
            current: body.u64()?,
        },
        T_RESYNC_DONE_ACK => Frame::ResyncDoneAck,
        T_PING => Frame::Ping(body.u64()?),
        T_PONG => Frame::Pong(body.u64()?),
        T_READ_REQUEST | T_VERIFY_REQUEST => {
            let id = body.u64()?;
            let first_block = body.u64()?;
            let blocks = body.u32()?;
            // A read answers with one READ_REPLY (at most MAX_FRAME_BLOCKS); verify
            // answers with checksums only, so larger ranges are fine.
            let limit = if header.frame_type == T_READ_REQUEST {
                MAX_FRAME_BLOCKS
            } else {
                MAX_FRAME_BLOCKS * 16
            };
            if blocks == 0 || blocks > limit {
                return Err(body.malformed("block count out of range"));
            }
            if header.frame_type == T_READ_REQUEST {
                Frame::ReadRequest {
                    id,
                    first_block,
                    blocks,
                }
            } else {
                Frame::VerifyRequest {
                    id,
                    first_block,
                    blocks,
                }
            }
        }
        T_VERIFY_REPLY => {
            let id = body.u64()?;
            let first_block = body.u64()?;
            let count = body.u32()? as usize;
            let stored = body.u32s(count)?;
            let actual = body.u32s(count)?;
            let digests = body.u64s(count)?;
            Frame::VerifyReply {
                id,
                first_block,
                stored,
                actual,
                digests,
            }
        }
        T_DURABLE => Frame::Durable(body.u64()?),
        T_PROMOTE_REQUEST => Frame::PromoteRequest { id: body.u64()? },
        T_PROMOTE_REPLY => Frame::PromoteReply {
            id: body.u64()?,
            ok: match body.u8()? {
                0 => false,
                1 => true,
                _ => return Err(body.malformed("agreement is neither 0 nor 1")),
            },
            reason: body.string()?,
        },
        T_SNAPSHOT => Frame::Snapshot {
            point: body.u64()?,
            name: body.string()?,
        },
        T_SNAPSHOT_REPLY => {
            let ok = match body.u8()? {
                0 => false,
                1 => true,
                _ => return Err(body.malformed("outcome is neither 0 nor 1")),
            };
            let name = body.string()?;
            let error = body.string()?;
            Frame::SnapshotReply {
                name,
                error: (!ok).then_some(error),
            }
        }
        T_NEW_GENERATION => Frame::NewGeneration {
            current: body.u64()?,
        },
        T_RESYNC_CHECK => {
            let first_block = body.u64()?;
            let count = body.u32()? as usize;
            if count == 0 || count > (MAX_FRAME_BLOCKS * 16) as usize {
                return Err(body.malformed("block count out of range"));
            }
            Frame::ResyncCheck {
                first_block,
                digests: body.u64s(count)?,
            }
        }
        T_RESYNC_CHECK_REPLY => {
            let first_block = body.u64()?;
            let blocks = body.u32()?;
            let count = body.u32()? as usize;
            if count as u64 != u64::from(blocks).div_ceil(64) {
                return Err(body.malformed("difference bitmap has the wrong size"));
            }
            Frame::ResyncCheckReply {
                first_block,
                blocks,
                differ: body.u64s(count)?,
            }
        }
        other => return Err(WireError::UnknownType(other)),
    };
    body.finish()?;
    Ok(frame)
}

/// Decodes one whole frame from a buffer (tests and fuzzing).
pub fn decode(buf: &[u8]) -> Result<(Frame, usize), WireError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Err(WireError::Malformed {
            frame: "any",
            detail: "shorter than a frame header".into(),
        });
    }
    let mut head = [0u8; FRAME_HEADER_BYTES];
    head.copy_from_slice(&buf[..FRAME_HEADER_BYTES]);
    let header = decode_header(&head)?;
    let end = FRAME_HEADER_BYTES + header.body_bytes as usize;
    if buf.len() < end {
        return Err(WireError::Malformed {
            frame: "any",
            detail: "truncated body".into(),
        });
    }
    let frame = decode_body(
        &header,
        Bytes::copy_from_slice(&buf[FRAME_HEADER_BYTES..end]),
    )?;
    Ok((frame, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_of_protocol_3_decodes_so_that_its_version_can_be_refused() {
        let mut body = BytesMut::new();
        body.put_u32_le(3);
        body.put_u8(1);
        body.put_slice(&[3; 16]);
        body.put_u32_le(0);
        put_string(&mut body, "r0");
        put_string(&mut body, "alpha");
        let header = FrameHeader {
            frame_type: T_HELLO,
            body_bytes: body.len() as u32,
            body_crc: crc32fast::hash(&body),
        };
        match decode_body(&header, body.freeze()) {
            Ok(Frame::Hello(hello)) => {
                assert_eq!(hello.protocol_version, 3);
                assert!(!hello.authenticates);
            }
            other => panic!("{other:?}"),
        }
    }
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        let data = Bytes::from(vec![9u8; 8192]);
        let crcs: Vec<u32> = data.chunks(4096).map(crate::checksum::block_crc).collect();
        vec![
            Frame::Hello(Hello {
                protocol_version: 1,
                channel: Channel::Meta,
                resource_uuid: [3; 16],
                node_id: 1,
                resource: "r0".into(),
                node: "beta".into(),
                authenticates: true,
                challenge: [4; 32],
                proof: [5; 32],
            }),
            Frame::Reject("wrong resource".into()),
            Frame::Auth([6; 32]),
            Frame::State(PeerState {
                role: Role::Primary,
                disk: DiskState::Inconsistent,
                generations: GenerationIds {
                    current: 5,
                    bitmap: 4,
                    history: [3, 2],
                },
                crashed_primary: true,
                discard_my_data: false,
                dirty_blocks: 77,
                next_seq: 1000,
                size_bytes: 1 << 30,
            }),
            Frame::Bitmap {
                first_word: 8,
                words: vec![1, 2, u64::MAX],
                last: true,
            },
            Frame::BitmapRun {
                first_block: 3,
                blocks: 1 << 40,
                last: false,
            },
            Frame::Record(RecordFrame(Record::write(42, 8192, data.clone(), true))),
            Frame::Record(RecordFrame(Record::zeroes(
                43,
                0,
                1 << 20,
                crate::record::flags::TRIM,
                false,
            ))),
            Frame::AckReceived(41),
            Frame::AckWritten(40),
            Frame::Flush(7),
            Frame::FlushAck(7),
            Frame::ResyncData(BlockData {
                first_block: 10,
                blocks: 2,
                crcs: crcs.clone(),
                data: Some(data.clone()),
            }),
            Frame::ResyncData(BlockData {
                first_block: 12,
                blocks: 3,
                crcs: vec![crate::checksum::zero_block_crc(); 3],
                data: None,
            }),
            Frame::ResyncAck {
                first_block: 10,
                blocks: 2,
            },
            Frame::ResyncDone { current: 99 },
            Frame::ResyncDoneAck,
            Frame::Ping(1),
            Frame::Pong(1),
            Frame::ReadRequest {
                id: 1,
                first_block: 5,
                blocks: 1,
            },
            Frame::ReadReply {
                id: 1,
                data: Some(BlockData {
                    first_block: 5,
                    blocks: 2,
                    crcs,
                    data: Some(data),
                }),
                error: None,
            },
            Frame::ReadReply {
                id: 2,
                data: None,
                error: Some("checksum mismatch".into()),
            },
            Frame::Snapshot {
                name: "nightly-1".into(),
                point: 812,
            },
            Frame::SnapshotReply {
                name: "nightly-1".into(),
                error: None,
            },
            Frame::SnapshotReply {
                name: "x".into(),
                error: Some("no snapshot area".into()),
            },
            Frame::VerifyRequest {
                id: 3,
                first_block: 0,
                blocks: 4,
            },
            Frame::VerifyReply {
                id: 3,
                first_block: 0,
                stored: vec![1, 2],
                actual: vec![1, 3],
                digests: vec![10, 30],
            },
            Frame::NewGeneration { current: 1234 },
            Frame::Durable(77),
            Frame::PromoteRequest { id: 5 },
            Frame::PromoteReply {
                id: 5,
                ok: false,
                reason: "this node is Primary".into(),
            },
            Frame::ResyncCheck {
                first_block: 64,
                digests: vec![1, 2, 3],
            },
            Frame::ResyncCheckReply {
                first_block: 64,
                blocks: 3,
                differ: vec![0b101],
            },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for frame in samples() {
            let bytes = frame.encode_to_vec();
            let (decoded, used) =
                decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", frame.name()));
            assert_eq!(used, bytes.len());
            assert_eq!(decoded, frame);
        }
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        for frame in samples() {
            let bytes = frame.encode_to_vec();
            // Flip bits across the header, the covered body and (sampled) bulk data.
            let step = if bytes.len() > 512 { 61 } else { 1 };
            for bit in (0..bytes.len() * 8).step_by(step) {
                let mut corrupt = bytes.clone();
                corrupt[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    decode(&corrupt).is_err(),
                    "{}: flip of bit {bit} accepted",
                    frame.name()
                );
            }
        }
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused_without_allocating() {
        let mut header = encode_header(T_PING, 8, 0);
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32fast::hash(&header[..20]);
        header[20..24].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_header(&header), Err(WireError::TooLarge(u32::MAX)));
        let unknown = encode_header(999, 0, crc32fast::hash(&[]));
        assert_eq!(
            decode(&unknown).map(|(f, _)| f),
            Err(WireError::UnknownType(999))
        );
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), frame_type in 0u16..30) {
            let _ = decode(&bytes);
            // Also with a valid header around arbitrary bodies of every type.
            let mut framed = encode_header(frame_type, bytes.len(), crc32fast::hash(&bytes)).to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed);
        }
    }
}
