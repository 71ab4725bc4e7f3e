//! The NBD wire format: constants and a pure codec, with no I/O.
//!
//! Encoders append to a [`BufMut`]; parsers take `&[u8]` and return a typed value or a
//! [`ProtocolError`]. **Invariant:** no parser panics or allocates more than its input on
//! any input; every length read from the wire is checked against a limit before use.
//!
//! Covers the fixed newstyle handshake, the options `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`,
//! `INFO`, `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT`, simple
//! replies and structured reply chunks (`NONE`, `OFFSET_DATA`, `OFFSET_HOLE`,
//! `BLOCK_STATUS`, `ERROR`, `ERROR_OFFSET`) in the transmission phase. Not covered:
//! extended headers, TLS. Both directions are encoded and parsed, so the codec can be
//! round-tripped and tests can speak the client side.

use bytes::BufMut;

/// `NBDMAGIC`, the first word the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server in the greeting and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured reply chunk types; error chunks have bit 15 set.
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Error values of the transmission phase (fixed by the protocol, not the platform).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// The largest READ or WRITE payload the server accepts, and the maximum block size it
/// advertises: 32 MiB, the size the specification says no client should consider too big.
pub const MAX_PAYLOAD_BYTES: u32 = 32 * 1024 * 1024;
/// The longest string (export name, error message) the protocol allows.
pub const MAX_STRING_BYTES: usize = 4096;
/// The most option data the server reads for one option. Enough for a maximal export
/// name and a long list of information requests; longer options are a denial of service
/// and end the connection.
pub const MAX_OPTION_DATA_BYTES: u32 = 16 * 1024;
/// The preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// The largest minimum block size the protocol allows.
pub const MAX_MINIMUM_BLOCK_SIZE: u32 = 64 * 1024;

/// Bytes of the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_BYTES: usize = 18;
/// Bytes of the client flags.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// Bytes of an option header: magic, option, length.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Bytes of a request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
/// Bytes of a structured reply chunk header: magic, flags, type, cookie, length.
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
/// Bytes of the offset in front of the data of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk.
pub const OFFSET_DATA_PREFIX_BYTES: usize = 8;
/// Bytes of an `NBD_REPLY_TYPE_OFFSET_HOLE` payload: offset and hole size.
pub const OFFSET_HOLE_BYTES: usize = 12;
/// Bytes of one block status descriptor: length and flags.
pub const BLOCK_DESCRIPTOR_BYTES: usize = 8;
/// The most descriptors the server puts in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (the
/// client asks again for the rest), so that a chunk is at most 64 KiB.
pub const MAX_BLOCK_DESCRIPTORS: usize = 8 * 1024 - 1;
/// The most metadata contexts one `NBD_OPT_SET_META_CONTEXT` may select; more get
/// `NBD_REP_ERR_TOO_BIG`. Bounds the block status reply of one request (one chunk per
/// context).
pub const MAX_SELECTED_CONTEXTS: usize = 64;
/// Bytes of the reply to `NBD_OPT_EXPORT_NAME` without and with the 124 zero bytes.
pub const EXPORT_NAME_REPLY_BYTES: usize = 10;
pub const EXPORT_NAME_REPLY_ZEROES: usize = 124;

const _: () = assert!(MAX_PAYLOAD_BYTES.is_power_of_two());
const _: () = assert!(PREFERRED_BLOCK_SIZE.is_power_of_two());
const _: () = assert!(MAX_PAYLOAD_BYTES % MAX_MINIMUM_BLOCK_SIZE == 0);
const _: () = assert!(MAX_OPTION_DATA_BYTES as usize >= 4 + MAX_STRING_BYTES + 2 + 2 * 64);
const _: () = assert!(
    MAX_SELECTED_CONTEXTS * (4 + MAX_BLOCK_DESCRIPTORS * BLOCK_DESCRIPTOR_BYTES)
        <= MAX_PAYLOAD_BYTES as usize
);

/// Why a message could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message truncated: {needed} bytes needed, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("unknown client flags {flags:#x}")]
    UnknownClientFlags { flags: u32 },
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE (flags {flags:#x})")]
    NotFixedNewstyle { flags: u32 },
    #[error("option data of {length} bytes exceeds the limit of {limit}")]
    OptionTooLong { length: u32, limit: u32 },
    #[error("string of {length} bytes exceeds the limit of {limit}")]
    StringTooLong { length: usize, limit: usize },
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
    #[error("{length} bytes of trailing data")]
    TrailingData { length: usize },
    #[error("information reply of type {info_type} has a bad length {length}")]
    BadInfoLength { info_type: u16, length: usize },
    #[error("structured reply chunk of type {reply_type} has a bad length {length}")]
    BadChunkLength { reply_type: u16, length: usize },
    #[error("block status descriptor of length zero")]
    EmptyDescriptor,
    #[error("error chunk with error value zero")]
    ZeroError,
}

/// A bounds-checked big-endian reader over a byte slice.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Cursor<'a> {
        Cursor { bytes }
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], ProtocolError> {
        if self.bytes.len() < count {
            return Err(ProtocolError::Truncated {
                needed: count,
                available: self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn finish(&self) -> Result<(), ProtocolError> {
        match self.bytes.len() {
            0 => Ok(()),
            length => Err(ProtocolError::TrailingData { length }),
        }
    }
}

/// Checks a protocol string: UTF-8, no NUL, at most [`MAX_STRING_BYTES`].
pub fn parse_string(bytes: &[u8]) -> Result<&str, ProtocolError> {
    if bytes.len() > MAX_STRING_BYTES {
        return Err(ProtocolError::StringTooLong {
            length: bytes.len(),
            limit: MAX_STRING_BYTES,
        });
    }
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => Ok(text),
        _ => Err(ProtocolError::BadString),
    }
}

fn put_string(out: &mut impl BufMut, text: &str) {
    let length = text.len().min(MAX_STRING_BYTES);
    let length = floor_char_boundary(text, length);
    out.put_slice(&text.as_bytes()[..length]);
}

/// The largest index `<= index` on a char boundary of `text`.
fn floor_char_boundary(text: &str, index: usize) -> usize {
    (0..=index.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------

/// The server greeting: `NBDMAGIC`, `IHAVEOPT` and the handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub handshake_flags: u16,
}

impl Greeting {
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(NBD_MAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(self.handshake_flags);
    }

    pub fn parse(bytes: &[u8]) -> Result<Greeting, ProtocolError> {
        let mut cursor = Cursor::new(bytes);
        expect_magic64(&mut cursor, NBD_MAGIC)?;
        expect_magic64(&mut cursor, IHAVEOPT)?;
        let handshake_flags = cursor.u16()?;
        cursor.finish()?;
        Ok(Greeting { handshake_flags })
    }
}

fn expect_magic64(cursor: &mut Cursor<'_>, expected: u64) -> Result<(), ProtocolError> {
    let found = cursor.u64()?;
    if found != expected {
        return Err(ProtocolError::BadMagic { expected, found });
    }
    Ok(())
}

/// The client flags this server accepts: fixed newstyle, optionally without zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub no_zeroes: bool,
}

impl ClientFlags {
    pub fn encode(&self, out: &mut impl BufMut) {
        let mut flags = FLAG_C_FIXED_NEWSTYLE;
        if self.no_zeroes {
            flags |= FLAG_C_NO_ZEROES;
        }
        out.put_u32(flags);
    }

    /// Refuses unknown flags (the specification says the server MUST drop the connection)
    /// and clients without `NBD_FLAG_C_FIXED_NEWSTYLE` (this server speaks fixed newstyle
    /// only).
    pub fn parse(bytes: &[u8]) -> Result<ClientFlags, ProtocolError> {
        let mut cursor = Cursor::new(bytes);
        let flags = cursor.u32()?;
        cursor.finish()?;
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(ProtocolError::UnknownClientFlags { flags });
        }
        if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(ProtocolError::NotFixedNewstyle { flags });
        }
        Ok(ClientFlags {
            no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        })
    }
}

/// The header of an option sent by the client; `length` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(IHAVEOPT);
        out.put_u32(self.option);
        out.put_u32(self.length);
    }

    /// Parses an option header, refusing data longer than `length_limit`.
    pub fn parse(bytes: &[u8], length_limit: u32) -> Result<OptionHeader, ProtocolError> {
        let mut cursor = Cursor::new(bytes);
        expect_magic64(&mut cursor, IHAVEOPT)?;
        let option = cursor.u32()?;
        let length = cursor.u32()?;
        cursor.finish()?;
        if length > length_limit {
            return Err(ProtocolError::OptionTooLong {
                length,
                limit: length_limit,
            });
        }
        Ok(OptionHeader { option, length })
    }
}

/// The header of an option reply; `length` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u64(OPTION_REPLY_MAGIC);
        out.put_u32(self.option);
        out.put_u32(self.reply_type);
        out.put_u32(self.length);
    }

    pub fn parse(bytes: &[u8]) -> Result<OptionReplyHeader, ProtocolError> {
        let mut cursor = Cursor::new(bytes);
        expect_magic64(&mut cursor, OPTION_REPLY_MAGIC)?;
        let header = OptionReplyHeader {
            option: cursor.u32()?,
            reply_type: cursor.u32()?,
            length: cursor.u32()?,
        };
        cursor.finish()?;
        Ok(header)
    }

    pub fn is_error(&self) -> bool {
        self.reply_type & (1 << 31) != 0
    }
}

/// Encodes a whole option reply: header and data.
pub fn encode_option_reply(out: &mut impl BufMut, option: u32, reply_type: u32, data: &[u8]) {
    // Option replies are built from bounded pieces (names, messages, info), far below 4 GiB.
    let length = u32::try_from(data.len()).expect("option reply data is bounded");
    OptionReplyHeader {
        option,
        reply_type,
        length,
    }
    .encode(out);
    out.put_slice(data);
}

/// Encodes an error reply carrying a message for the human at the client.
pub fn encode_option_error(out: &mut impl BufMut, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & (1 << 31) != 0, "not an error reply type");
    let mut data = Vec::with_capacity(message.len().min(MAX_STRING_BYTES));
    put_string(&mut data, message);
    encode_option_reply(out, option, reply_type, &data);
}

/// Encodes the data of an `NBD_REP_SERVER` reply.
pub fn encode_rep_server(out: &mut impl BufMut, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    let mut bytes = Vec::new();
    put_string(&mut bytes, name);
    data.put_u32(bytes.len() as u32);
    data.put_slice(&bytes);
    encode_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// Parses the data of an `NBD_REP_SERVER` reply into the export name.
pub fn parse_rep_server(data: &[u8]) -> Result<&str, ProtocolError> {
    let mut cursor = Cursor::new(data);
    let length = cursor.u32()? as usize;
    let name = parse_string(cursor.take(length)?)?;
    // Anything after the name is a free-form description.
    parse_string(cursor.rest())?;
    Ok(name)
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and (unless the client
/// negotiated `NBD_FLAG_C_NO_ZEROES`) 124 zero bytes.
pub fn encode_export_name_reply(
    out: &mut impl BufMut,
    size_bytes: u64,
    transmission_flags: u16,
    no_zeroes: bool,
) {
    out.put_u64(size_bytes);
    out.put_u16(transmission_flags);
    if !no_zeroes {
        out.put_bytes(0, EXPORT_NAME_REPLY_ZEROES);
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information the
/// client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a str,
    pub info_types: Vec<u16>,
}

impl InfoRequest<'_> {
    pub fn encode(&self, out: &mut impl BufMut) {
        let mut name = Vec::new();
        put_string(&mut name, self.name);
        out.put_u32(name.len() as u32);
        out.put_slice(&name);
        let count = self.info_types.len().min(u16::MAX as usize);
        out.put_u16(count as u16);
        for &info_type in &self.info_types[..count] {
            out.put_u16(info_type);
        }
    }

    /// Parses option data. The data must be exactly as long as the name and the list say.
    pub fn parse(data: &[u8]) -> Result<InfoRequest<'_>, ProtocolError> {
        let mut cursor = Cursor::new(data);
        let name_length = cursor.u32()? as usize;
        if name_length > MAX_STRING_BYTES {
            return Err(ProtocolError::StringTooLong {
                length: name_length,
                limit: MAX_STRING_BYTES,
            });
        }
        let name = parse_string(cursor.take(name_length)?)?;
        let count = cursor.u16()? as usize;
        // `count` is at most 65535, and the bytes must be there before the list is built.
        let list = cursor.take(count * 2)?;
        cursor.finish()?;
        let info_types = list
            .chunks_exact(2)
            .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
            .collect();
        Ok(InfoRequest { name, info_types })
    }
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size_bytes: u64,
        transmission_flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// An information type this codec does not know, kept raw.
    Unknown {
        info_type: u16,
        payload: Vec<u8>,
    },
}

impl Info {
    /// Encodes the data of an `NBD_REP_INFO` reply (without the option reply header).
    pub fn encode(&self, out: &mut impl BufMut) {
        match self {
            Info::Export {
                size_bytes,
                transmission_flags,
            } => {
                out.put_u16(INFO_EXPORT);
                out.put_u64(*size_bytes);
                out.put_u16(*transmission_flags);
            }
            Info::Name(name) => {
                out.put_u16(INFO_NAME);
                put_string(out, name);
            }
            Info::Description(text) => {
                out.put_u16(INFO_DESCRIPTION);
                put_string(out, text);
            }
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                out.put_u16(INFO_BLOCK_SIZE);
                out.put_u32(*minimum);
                out.put_u32(*preferred);
                out.put_u32(*maximum);
            }
            Info::Unknown { info_type, payload } => {
                out.put_u16(*info_type);
                out.put_slice(&payload[..payload.len().min(MAX_STRING_BYTES)]);
            }
        }
    }

    /// Encodes a whole `NBD_REP_INFO` option reply.
    pub fn encode_reply(&self, out: &mut impl BufMut, option: u32) {
        let mut data = Vec::with_capacity(16);
        self.encode(&mut data);
        encode_option_reply(out, option, REP_INFO, &data);
    }

    /// Parses the data of an `NBD_REP_INFO` reply.
    pub fn parse(data: &[u8]) -> Result<Info, ProtocolError> {
        let mut cursor = Cursor::new(data);
        let info_type = cursor.u16()?;
        let expect_length = |length: usize| {
            if data.len() == length {
                Ok(())
            } else {
                Err(ProtocolError::BadInfoLength {
                    info_type,
                    length: data.len(),
                })
            }
        };
        let info = match info_type {
            INFO_EXPORT => {
                expect_length(12)?;
                Info::Export {
                    size_bytes: cursor.u64()?,
                    transmission_flags: cursor.u16()?,
                }
            }
            INFO_NAME => Info::Name(parse_string(cursor.rest())?.to_owned()),
            INFO_DESCRIPTION => Info::Description(parse_string(cursor.rest())?.to_owned()),
            INFO_BLOCK_SIZE => {
                expect_length(14)?;
                Info::BlockSize {
                    minimum: cursor.u32()?,
                    preferred: cursor.u32()?,
                    maximum: cursor.u32()?,
                }
            }
            _ => {
                let payload = cursor.rest();
                if payload.len() > MAX_STRING_BYTES {
                    return Err(ProtocolError::BadInfoLength {
                        info_type,
                        length: data.len(),
                    });
                }
                Info::Unknown {
                    info_type,
                    payload: payload.to_vec(),
                }
            }
        };
        cursor.finish()?;
        Ok(info)
    }
}

// ---------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------

/// The header of a transmission request. A WRITE is followed by `length` bytes of payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    /// The client's opaque identifier of the request (the specification's "handle").
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.command);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    pub fn parse(bytes: &[u8]) -> Result<RequestHeader, ProtocolError> {
        let mut cursor = Cursor::new(bytes);
        let magic = cursor.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadMagic {
                expected: REQUEST_MAGIC.into(),
                found: magic.into(),
            });
        }
        let header = RequestHeader {
            flags: cursor.u16()?,
            command: cursor.u16()?,
            cookie: cursor.u64()?,
            offset: cursor.u64()?,
            length: cursor.u32()?,
        };
        cursor.finish()?;
        Ok(header)
    }
}

/// The header of a simple reply. A successful READ is followed by its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyHeader {
    /// An NBD error value (`NBD_EIO`, ...), zero on success.
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReplyHeader {
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(SIMPLE_REPLY_MAGIC);
        out.put_u32(self.error);
        out.put_u64(self.cookie);
    }

    pub fn parse(bytes: &[u8]) -> Result<SimpleReplyHeader, ProtocolError> {
        let mut cursor = Cursor::new(bytes);
        let magic = cursor.u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtocolError::BadMagic {
                expected: SIMPLE_REPLY_MAGIC.into(),
                found: magic.into(),
            });
        }
        let header = SimpleReplyHeader {
            error: cursor.u32()?,
            cookie: cursor.u64()?,
        };
        cursor.finish()?;
        Ok(header)
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: an export name
/// and the queries, each a namespace, a colon and an implementation-defined rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub name: &'a str,
    pub queries: Vec<&'a str>,
}

impl MetaContextRequest<'_> {
    pub fn encode(&self, out: &mut impl BufMut) {
        put_length_prefixed(out, self.name);
        out.put_u32(self.queries.len() as u32);
        for query in &self.queries {
            put_length_prefixed(out, query);
        }
    }

    /// Parses option data. The data must be exactly as long as the name and the queries
    /// say; the number of queries is checked against the bytes present before any list is
    /// built, so the list never holds more than a quarter of the input's length.
    pub fn parse(data: &[u8]) -> Result<MetaContextRequest<'_>, ProtocolError> {
        let mut cursor = Cursor::new(data);
        let name = take_length_prefixed(&mut cursor)?;
        let count = cursor.u32()? as usize;
        // Every query takes at least its 4-byte length.
        let needed = count.saturating_mul(4);
        if needed > cursor.bytes.len() {
            return Err(ProtocolError::Truncated {
                needed,
                available: cursor.bytes.len(),
            });
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            queries.push(take_length_prefixed(&mut cursor)?);
        }
        cursor.finish()?;
        Ok(MetaContextRequest { name, queries })
    }
}

/// Appends a 32-bit length and a string cut to [`MAX_STRING_BYTES`].
fn put_length_prefixed(out: &mut impl BufMut, text: &str) {
    let mut bytes = Vec::with_capacity(text.len().min(MAX_STRING_BYTES));
    put_string(&mut bytes, text);
    out.put_u32(bytes.len() as u32);
    out.put_slice(&bytes);
}

/// Takes a 32-bit length and a string of that length.
fn take_length_prefixed<'a>(cursor: &mut Cursor<'a>) -> Result<&'a str, ProtocolError> {
    let length = cursor.u32()? as usize;
    if length > MAX_STRING_BYTES {
        return Err(ProtocolError::StringTooLong {
            length,
            limit: MAX_STRING_BYTES,
        });
    }
    parse_string(cursor.take(length)?)
}

/// Encodes a whole `NBD_REP_META_CONTEXT` option reply: a context id and its name.
pub fn encode_rep_meta_context(out: &mut impl BufMut, option: u32, context_id: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len().min(MAX_STRING_BYTES));
    data.put_u32(context_id);
    put_string(&mut data, name);
    encode_option_reply(out, option, REP_META_CONTEXT, &data);
}

/// Parses the data of an `NBD_REP_META_CONTEXT` reply into the context id and name.
pub fn parse_rep_meta_context(data: &[u8]) -> Result<(u32, &str), ProtocolError> {
    let mut cursor = Cursor::new(data);
    let context_id = cursor.u32()?;
    let name = parse_string(cursor.rest())?;
    Ok((context_id, name))
}

/// The header of a structured reply chunk; `length` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredReplyHeader {
    pub flags: u16,
    pub reply_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl StructuredReplyHeader {
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.reply_type);
        out.put_u64(self.cookie);
        out.put_u32(self.length);
    }

    pub fn parse(bytes: &[u8]) -> Result<StructuredReplyHeader, ProtocolError> {
        let mut cursor = Cursor::new(bytes);
        let magic = cursor.u32()?;
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(ProtocolError::BadMagic {
                expected: STRUCTURED_REPLY_MAGIC.into(),
                found: magic.into(),
            });
        }
        let header = StructuredReplyHeader {
            flags: cursor.u16()?,
            reply_type: cursor.u16()?,
            cookie: cursor.u64()?,
            length: cursor.u32()?,
        };
        cursor.finish()?;
        Ok(header)
    }

    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    pub fn is_error(&self) -> bool {
        self.reply_type & (1 << 15) != 0
    }
}

/// Encodes the header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying
/// `data_bytes` bytes, which the caller writes next (so that they need not be copied).
/// `data_bytes` is at least 1 and at most `u32::MAX - 8`.
pub fn encode_offset_data_prefix(
    out: &mut impl BufMut,
    cookie: u64,
    flags: u16,
    offset: u64,
    data_bytes: u32,
) {
    debug_assert!((1..=u32::MAX - 8).contains(&data_bytes));
    StructuredReplyHeader {
        flags,
        reply_type: REPLY_TYPE_OFFSET_DATA,
        cookie,
        length: data_bytes.saturating_add(OFFSET_DATA_PREFIX_BYTES as u32),
    }
    .encode(out);
    out.put_u64(offset);
}

/// Parses the 8-byte offset in front of an `NBD_REPLY_TYPE_OFFSET_DATA` payload whose
/// chunk header announced `chunk_length` bytes; returns the offset and the data length.
pub fn parse_offset_data_prefix(
    prefix: &[u8],
    chunk_length: u32,
) -> Result<(u64, u32), ProtocolError> {
    if (chunk_length as usize) <= OFFSET_DATA_PREFIX_BYTES {
        return Err(ProtocolError::BadChunkLength {
            reply_type: REPLY_TYPE_OFFSET_DATA,
            length: chunk_length as usize,
        });
    }
    let mut cursor = Cursor::new(prefix);
    let offset = cursor.u64()?;
    cursor.finish()?;
    Ok((offset, chunk_length - OFFSET_DATA_PREFIX_BYTES as u32))
}

/// Parses an `NBD_REPLY_TYPE_OFFSET_HOLE` payload into the offset and the hole size.
pub fn parse_offset_hole(payload: &[u8]) -> Result<(u64, u32), ProtocolError> {
    if payload.len() != OFFSET_HOLE_BYTES {
        return Err(ProtocolError::BadChunkLength {
            reply_type: REPLY_TYPE_OFFSET_HOLE,
            length: payload.len(),
        });
    }
    let mut cursor = Cursor::new(payload);
    let offset = cursor.u64()?;
    let length = cursor.u32()?;
    if length == 0 {
        return Err(ProtocolError::BadChunkLength {
            reply_type: REPLY_TYPE_OFFSET_HOLE,
            length: payload.len(),
        });
    }
    Ok((offset, length))
}

/// Encodes a whole `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: the context id and one
/// descriptor per extent. `extents` holds 1 to [`MAX_BLOCK_DESCRIPTORS`] entries.
pub fn encode_block_status_chunk(
    out: &mut impl BufMut,
    cookie: u64,
    flags: u16,
    context_id: u32,
    extents: &[super::Extent],
) {
    debug_assert!(!extents.is_empty() && extents.len() <= MAX_BLOCK_DESCRIPTORS);
    let count = extents.len().min(MAX_BLOCK_DESCRIPTORS);
    StructuredReplyHeader {
        flags,
        reply_type: REPLY_TYPE_BLOCK_STATUS,
        cookie,
        // At most 4 + 8 * 8191 bytes.
        length: (4 + count * BLOCK_DESCRIPTOR_BYTES) as u32,
    }
    .encode(out);
    out.put_u32(context_id);
    for extent in &extents[..count] {
        out.put_u32(extent.length);
        out.put_u32(extent.flags);
    }
}

/// Parses an `NBD_REPLY_TYPE_BLOCK_STATUS` payload into the context id and its extents:
/// 4 bytes of id and one or more descriptors of non-zero length.
pub fn parse_block_status(payload: &[u8]) -> Result<(u32, Vec<super::Extent>), ProtocolError> {
    let bad_length = || ProtocolError::BadChunkLength {
        reply_type: REPLY_TYPE_BLOCK_STATUS,
        length: payload.len(),
    };
    if payload.len() < 4 + BLOCK_DESCRIPTOR_BYTES
        || (payload.len() - 4) % BLOCK_DESCRIPTOR_BYTES != 0
    {
        return Err(bad_length());
    }
    let mut cursor = Cursor::new(payload);
    let context_id = cursor.u32()?;
    let mut extents = Vec::with_capacity((payload.len() - 4) / BLOCK_DESCRIPTOR_BYTES);
    while !cursor.bytes.is_empty() {
        let length = cursor.u32()?;
        let flags = cursor.u32()?;
        if length == 0 {
            return Err(ProtocolError::EmptyDescriptor);
        }
        extents.push(super::Extent { length, flags });
    }
    Ok((context_id, extents))
}

/// The payload of an error chunk (`NBD_REPLY_TYPE_ERROR`, `NBD_REPLY_TYPE_ERROR_OFFSET`, or
/// an unknown type with bit 15 set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    /// An NBD error value, never zero.
    pub error: u32,
    pub message: String,
    /// The offset of an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk.
    pub offset: Option<u64>,
}

/// Encodes a whole `NBD_REPLY_TYPE_ERROR` chunk with an optional message.
pub fn encode_error_chunk(
    out: &mut impl BufMut,
    cookie: u64,
    flags: u16,
    error: u32,
    message: &str,
) {
    debug_assert!(error != 0, "error chunks carry a non-zero error");
    let mut text = Vec::with_capacity(message.len().min(MAX_STRING_BYTES));
    put_string(&mut text, message);
    StructuredReplyHeader {
        flags,
        reply_type: REPLY_TYPE_ERROR,
        cookie,
        // The message is at most 4096 bytes.
        length: (6 + text.len()) as u32,
    }
    .encode(out);
    out.put_u32(error);
    out.put_u16(text.len() as u16);
    out.put_slice(&text);
}

impl ChunkError {
    /// Parses the payload of an error chunk of type `reply_type` (bit 15 set). The
    /// message must fit in the payload; `NBD_REPLY_TYPE_ERROR_OFFSET` must end with exactly
    /// 8 bytes of offset, other types' trailing bytes are ignored.
    pub fn parse(reply_type: u16, payload: &[u8]) -> Result<ChunkError, ProtocolError> {
        let bad_length = || ProtocolError::BadChunkLength {
            reply_type,
            length: payload.len(),
        };
        let mut cursor = Cursor::new(payload);
        let error = cursor.u32().map_err(|_| bad_length())?;
        let message_length = cursor.u16().map_err(|_| bad_length())? as usize;
        let message = cursor.take(message_length).map_err(|_| bad_length())?;
        // Messages are for humans: a broken one is shown lossily rather than refused.
        let message = String::from_utf8_lossy(message).into_owned();
        if error == 0 {
            return Err(ProtocolError::ZeroError);
        }
        let offset = if reply_type == REPLY_TYPE_ERROR_OFFSET {
            let offset = cursor.u64().map_err(|_| bad_length())?;
            cursor.finish()?;
            Some(offset)
        } else {
            None
        };
        Ok(ChunkError {
            error,
            message,
            offset,
        })
    }
}

/// Maps an errno of this platform to the NBD error value sent on the wire, as the
/// specification asks: `EDQUOT` and `EFBIG` become `ENOSPC`, `EROFS` becomes `EPERM`, and
/// anything without an NBD counterpart becomes `EIO`.
pub fn nbd_error_from_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ENOTSUP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out);
        out
    }

    #[test]
    fn greeting_is_the_fixed_newstyle_byte_sequence() {
        let bytes = encoded(|out| {
            Greeting {
                handshake_flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            }
            .encode(out)
        });
        assert_eq!(bytes.len(), GREETING_BYTES);
        assert_eq!(&bytes[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&bytes[16..], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        fn check(flags: u32, expected: Result<ClientFlags, ProtocolError>) {
            assert_eq!(ClientFlags::parse(&flags.to_be_bytes()), expected);
        }
        check(1, Ok(ClientFlags { no_zeroes: false }));
        check(3, Ok(ClientFlags { no_zeroes: true }));
        check(0, Err(ProtocolError::NotFixedNewstyle { flags: 0 }));
        check(2, Err(ProtocolError::NotFixedNewstyle { flags: 2 }));
        check(5, Err(ProtocolError::UnknownClientFlags { flags: 5 }));
        check(
            0x8000_0001,
            Err(ProtocolError::UnknownClientFlags { flags: 0x8000_0001 }),
        );
    }

    #[test]
    fn option_header_length_limit() {
        let bytes = encoded(|out| {
            OptionHeader {
                option: OPT_GO,
                length: 0xFFFF_FFF0,
            }
            .encode(out)
        });
        assert_eq!(
            OptionHeader::parse(&bytes, MAX_OPTION_DATA_BYTES),
            Err(ProtocolError::OptionTooLong {
                length: 0xFFFF_FFF0,
                limit: MAX_OPTION_DATA_BYTES
            })
        );
        let mut bad_magic = bytes.clone();
        bad_magic[0] ^= 1;
        assert!(matches!(
            OptionHeader::parse(&bad_magic, u32::MAX),
            Err(ProtocolError::BadMagic { .. })
        ));
    }

    #[test]
    fn info_request_parsing() {
        fn check(data: &[u8], expected: Result<(&str, Vec<u16>), ProtocolError>) {
            let parsed = InfoRequest::parse(data).map(|r| (r.name, r.info_types));
            assert_eq!(parsed, expected);
        }
        check(
            &[0, 0, 0, 2, b'r', b'0', 0, 2, 0, 3, 0, 1],
            Ok(("r0", vec![INFO_BLOCK_SIZE, INFO_NAME])),
        );
        check(&[0, 0, 0, 0, 0, 0], Ok(("", vec![])));
        // Name length beyond the data.
        check(
            &[0, 0, 0, 9, b'r', 0, 0],
            Err(ProtocolError::Truncated {
                needed: 9,
                available: 3,
            }),
        );
        // Absurd name length.
        check(
            &[0xFF, 0xFF, 0xFF, 0xF0],
            Err(ProtocolError::StringTooLong {
                length: 0xFFFF_FFF0,
                limit: MAX_STRING_BYTES,
            }),
        );
        // Info count beyond the data, and data beyond the count.
        check(
            &[0, 0, 0, 0, 0, 2, 0, 3],
            Err(ProtocolError::Truncated {
                needed: 4,
                available: 2,
            }),
        );
        check(
            &[0, 0, 0, 0, 0, 0, 7],
            Err(ProtocolError::TrailingData { length: 1 }),
        );
        check(&[0, 0, 0, 1, 0, 0, 0], Err(ProtocolError::BadString));
        check(&[0, 0, 0, 1, 0xFF, 0, 0], Err(ProtocolError::BadString));
    }

    #[test]
    fn request_header_layout() {
        let header = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1000,
            length: 512,
        };
        let bytes = encoded(|out| header.encode(out));
        assert_eq!(
            bytes,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
    }

    #[test]
    fn structured_chunk_parsing() {
        // OFFSET_DATA: the prefix is 8 bytes and at least one byte of data follows.
        assert_eq!(parse_offset_data_prefix(&7u64.to_be_bytes(), 9), Ok((7, 1)));
        assert!(parse_offset_data_prefix(&7u64.to_be_bytes(), 8).is_err());
        assert!(parse_offset_data_prefix(&[0; 7], 100).is_err());
        // OFFSET_HOLE: exactly 12 bytes, non-zero size.
        let hole = [&5u64.to_be_bytes()[..], &3u32.to_be_bytes()].concat();
        assert_eq!(parse_offset_hole(&hole), Ok((5, 3)));
        assert!(parse_offset_hole(&hole[..11]).is_err());
        let empty_hole = [&5u64.to_be_bytes()[..], &0u32.to_be_bytes()].concat();
        assert!(parse_offset_hole(&empty_hole).is_err());
        // BLOCK_STATUS: 4 + 8n bytes with n >= 1, no empty descriptor.
        assert!(parse_block_status(&[0, 0, 0, 1]).is_err());
        assert!(parse_block_status(&[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]).is_err());
        assert_eq!(
            parse_block_status(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::EmptyDescriptor)
        );
        // Errors: the message must fit; ERROR_OFFSET ends with exactly 8 bytes of offset.
        let error = [0, 0, 0, 22, 0, 2, b'h', b'i'];
        assert_eq!(
            ChunkError::parse(REPLY_TYPE_ERROR, &error),
            Ok(ChunkError {
                error: 22,
                message: "hi".to_owned(),
                offset: None
            })
        );
        assert!(ChunkError::parse(REPLY_TYPE_ERROR, &error[..7]).is_err());
        assert!(ChunkError::parse(REPLY_TYPE_ERROR_OFFSET, &error).is_err());
        let with_offset = [&error[..], &9u64.to_be_bytes()].concat();
        assert_eq!(
            ChunkError::parse(REPLY_TYPE_ERROR_OFFSET, &with_offset).map(|e| e.offset),
            Ok(Some(9))
        );
        assert_eq!(
            ChunkError::parse(REPLY_TYPE_ERROR, &[0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::ZeroError)
        );
    }

    #[test]
    fn meta_context_request_parsing() {
        // Export "r0", one query "base:".
        let data = [
            &[0, 0, 0, 2, b'r', b'0', 0, 0, 0, 1, 0, 0, 0, 5][..],
            b"base:",
        ]
        .concat();
        assert_eq!(
            MetaContextRequest::parse(&data),
            Ok(MetaContextRequest {
                name: "r0",
                queries: vec!["base:"]
            })
        );
        // An absurd query count is refused before anything is allocated.
        assert_eq!(
            MetaContextRequest::parse(&[0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]),
            Err(ProtocolError::Truncated {
                needed: 0xFFFF_FFFF * 4,
                available: 4
            })
        );
        // Trailing data, bad strings.
        assert_eq!(
            MetaContextRequest::parse(&[0, 0, 0, 0, 0, 0, 0, 0, 7]),
            Err(ProtocolError::TrailingData { length: 1 })
        );
        assert_eq!(
            MetaContextRequest::parse(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0]),
            Err(ProtocolError::BadString)
        );
    }

    #[test]
    fn errno_mapping() {
        fn check(errno: i32, expected: u32) {
            assert_eq!(nbd_error_from_errno(errno), expected, "errno {errno}");
        }
        check(libc::EPERM, NBD_EPERM);
        check(libc::EROFS, NBD_EPERM);
        check(libc::EIO, NBD_EIO);
        check(libc::EINVAL, NBD_EINVAL);
        check(libc::ENOSPC, NBD_ENOSPC);
        check(libc::EDQUOT, NBD_ENOSPC);
        check(libc::EFBIG, NBD_ENOSPC);
        check(libc::ESHUTDOWN, NBD_ESHUTDOWN);
        check(libc::ENOENT, NBD_EIO);
        check(0, NBD_EIO);
        check(-1, NBD_EIO);
    }

    #[test]
    fn long_strings_are_cut_on_a_char_boundary() {
        let name = "é".repeat(MAX_STRING_BYTES);
        let mut out = Vec::new();
        put_string(&mut out, &name);
        assert_eq!(out.len(), MAX_STRING_BYTES);
        assert!(parse_string(&out).is_ok());
    }

    fn info_strategy() -> impl Strategy<Value = Info> {
        prop_oneof![
            (any::<u64>(), any::<u16>()).prop_map(|(size_bytes, transmission_flags)| {
                Info::Export {
                    size_bytes,
                    transmission_flags,
                }
            }),
            "[^\u{0}]{0,64}".prop_map(Info::Name),
            "[^\u{0}]{0,64}".prop_map(Info::Description),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(minimum, preferred, maximum)| {
                Info::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                }
            }),
            (4u16.., proptest::collection::vec(any::<u8>(), 0..32))
                .prop_map(|(info_type, payload)| Info::Unknown { info_type, payload }),
        ]
    }

    proptest! {
        /// No parser panics on any input, and every error is a typed one.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                               limit in any::<u32>()) {
            let _ = Greeting::parse(&bytes);
            let _ = ClientFlags::parse(&bytes);
            let _ = OptionHeader::parse(&bytes, limit);
            let _ = OptionReplyHeader::parse(&bytes);
            let _ = InfoRequest::parse(&bytes);
            let _ = Info::parse(&bytes);
            let _ = parse_rep_server(&bytes);
            let _ = parse_string(&bytes);
            let _ = RequestHeader::parse(&bytes);
            let _ = SimpleReplyHeader::parse(&bytes);
            let _ = MetaContextRequest::parse(&bytes);
            let _ = parse_rep_meta_context(&bytes);
            let _ = StructuredReplyHeader::parse(&bytes);
            let _ = parse_offset_data_prefix(&bytes, limit);
            let _ = parse_offset_hole(&bytes);
            let _ = parse_block_status(&bytes);
            let _ = ChunkError::parse(REPLY_TYPE_ERROR, &bytes);
            let _ = ChunkError::parse(REPLY_TYPE_ERROR_OFFSET, &bytes);
            let _ = ChunkError::parse(0x8000 | (limit as u16), &bytes);
        }

        /// Parsers also never panic on inputs that start with a valid magic, which random
        /// bytes almost never do.
        #[test]
        fn parsers_never_panic_past_the_magic(tail in proptest::collection::vec(any::<u8>(), 0..40)) {
            let with = |prefix: &[u8]| [prefix, &tail].concat();
            let _ = Greeting::parse(&with(&NBD_MAGIC.to_be_bytes()));
            let _ = OptionHeader::parse(&with(&IHAVEOPT.to_be_bytes()), MAX_OPTION_DATA_BYTES);
            let _ = OptionReplyHeader::parse(&with(&OPTION_REPLY_MAGIC.to_be_bytes()));
            let _ = RequestHeader::parse(&with(&REQUEST_MAGIC.to_be_bytes()));
            let _ = SimpleReplyHeader::parse(&with(&SIMPLE_REPLY_MAGIC.to_be_bytes()));
            let _ = StructuredReplyHeader::parse(&with(&STRUCTURED_REPLY_MAGIC.to_be_bytes()));
        }

        #[test]
        fn meta_context_request_round_trips(name in "[^\u{0}]{0,40}",
                                            queries in proptest::collection::vec("[^\u{0}]{0,40}", 0..8)) {
            let request = MetaContextRequest {
                name: &name,
                queries: queries.iter().map(String::as_str).collect(),
            };
            let bytes = encoded(|out| request.encode(out));
            prop_assert_eq!(MetaContextRequest::parse(&bytes), Ok(request));
            for cut in 0..bytes.len() {
                prop_assert!(MetaContextRequest::parse(&bytes[..cut]).is_err(), "prefix of {} bytes", cut);
            }
        }

        #[test]
        fn structured_reply_header_round_trips(flags in any::<u16>(), reply_type in any::<u16>(),
                                               cookie in any::<u64>(), length in any::<u32>()) {
            let header = StructuredReplyHeader { flags, reply_type, cookie, length };
            let bytes = encoded(|out| header.encode(out));
            prop_assert_eq!(bytes.len(), STRUCTURED_REPLY_HEADER_BYTES);
            prop_assert_eq!(StructuredReplyHeader::parse(&bytes), Ok(header));
        }

        #[test]
        fn block_status_chunk_round_trips(cookie in any::<u64>(), context_id in any::<u32>(),
                                          extents in proptest::collection::vec((1u32.., any::<u32>()), 1..64)) {
            let extents: Vec<super::super::Extent> = extents
                .into_iter()
                .map(|(length, flags)| super::super::Extent { length, flags })
                .collect();
            let bytes = encoded(|out| encode_block_status_chunk(out, cookie, REPLY_FLAG_DONE, context_id, &extents));
            let header = StructuredReplyHeader::parse(&bytes[..STRUCTURED_REPLY_HEADER_BYTES]).expect("header");
            prop_assert_eq!(header.reply_type, REPLY_TYPE_BLOCK_STATUS);
            prop_assert!(header.is_done());
            prop_assert_eq!(header.length as usize, bytes.len() - STRUCTURED_REPLY_HEADER_BYTES);
            prop_assert_eq!(parse_block_status(&bytes[STRUCTURED_REPLY_HEADER_BYTES..]), Ok((context_id, extents)));
        }

        #[test]
        fn error_chunk_round_trips(cookie in any::<u64>(), error in 1u32.., message in "[^\u{0}]{0,40}") {
            let bytes = encoded(|out| encode_error_chunk(out, cookie, REPLY_FLAG_DONE, error, &message));
            let header = StructuredReplyHeader::parse(&bytes[..STRUCTURED_REPLY_HEADER_BYTES]).expect("header");
            prop_assert!(header.is_error() && header.is_done());
            prop_assert_eq!(header.length as usize, bytes.len() - STRUCTURED_REPLY_HEADER_BYTES);
            prop_assert_eq!(
                ChunkError::parse(header.reply_type, &bytes[STRUCTURED_REPLY_HEADER_BYTES..]),
                Ok(ChunkError { error, message: message.clone(), offset: None })
            );
        }

        #[test]
        fn request_header_round_trips(flags in any::<u16>(), command in any::<u16>(),
                                      cookie in any::<u64>(), offset in any::<u64>(),
                                      length in any::<u32>()) {
            let header = RequestHeader { flags, command, cookie, offset, length };
            let bytes = encoded(|out| header.encode(out));
            prop_assert_eq!(bytes.len(), REQUEST_HEADER_BYTES);
            prop_assert_eq!(RequestHeader::parse(&bytes), Ok(header));
            // Every strict prefix is reported as truncated.
            for cut in 0..bytes.len() {
                let truncated = matches!(
                    RequestHeader::parse(&bytes[..cut]),
                    Err(ProtocolError::Truncated { .. })
                );
                prop_assert!(truncated, "prefix of {} bytes", cut);
            }
        }

        #[test]
        fn simple_reply_round_trips(error in any::<u32>(), cookie in any::<u64>()) {
            let header = SimpleReplyHeader { error, cookie };
            let bytes = encoded(|out| header.encode(out));
            prop_assert_eq!(bytes.len(), SIMPLE_REPLY_HEADER_BYTES);
            prop_assert_eq!(SimpleReplyHeader::parse(&bytes), Ok(header));
        }

        #[test]
        fn option_headers_round_trip(option in any::<u32>(), reply_type in any::<u32>(),
                                     length in any::<u32>()) {
            let header = OptionHeader { option, length };
            let bytes = encoded(|out| header.encode(out));
            prop_assert_eq!(bytes.len(), OPTION_HEADER_BYTES);
            prop_assert_eq!(OptionHeader::parse(&bytes, u32::MAX), Ok(header));
            let reply = OptionReplyHeader { option, reply_type, length };
            let bytes = encoded(|out| reply.encode(out));
            prop_assert_eq!(bytes.len(), OPTION_REPLY_HEADER_BYTES);
            prop_assert_eq!(OptionReplyHeader::parse(&bytes), Ok(reply));
        }

        #[test]
        fn greeting_and_client_flags_round_trip(handshake_flags in any::<u16>(), no_zeroes in any::<bool>()) {
            let greeting = Greeting { handshake_flags };
            prop_assert_eq!(Greeting::parse(&encoded(|out| greeting.encode(out))), Ok(greeting));
            let flags = ClientFlags { no_zeroes };
            prop_assert_eq!(ClientFlags::parse(&encoded(|out| flags.encode(out))), Ok(flags));
        }

        #[test]
        fn info_request_round_trips(name in "[^\u{0}]{0,40}",
                                    info_types in proptest::collection::vec(any::<u16>(), 0..20)) {
            let request = InfoRequest { name: &name, info_types };
            let bytes = encoded(|out| request.encode(out));
            prop_assert_eq!(InfoRequest::parse(&bytes), Ok(request));
        }

        #[test]
        fn info_round_trips(info in info_strategy()) {
            let bytes = encoded(|out| info.encode(out));
            prop_assert_eq!(Info::parse(&bytes), Ok(info));
        }

        #[test]
        fn rep_server_round_trips(name in "[^\u{0}]{0,40}") {
            let bytes = encoded(|out| encode_rep_server(out, &name));
            let header = OptionReplyHeader::parse(&bytes[..OPTION_REPLY_HEADER_BYTES]);
            prop_assert_eq!(header, Ok(OptionReplyHeader {
                option: OPT_LIST,
                reply_type: REP_SERVER,
                length: (bytes.len() - OPTION_REPLY_HEADER_BYTES) as u32,
            }));
            prop_assert_eq!(parse_rep_server(&bytes[OPTION_REPLY_HEADER_BYTES..]), Ok(name.as_str()));
        }

        #[test]
        fn export_name_reply_length(size in any::<u64>(), flags in any::<u16>(), no_zeroes in any::<bool>()) {
            let bytes = encoded(|out| encode_export_name_reply(out, size, flags, no_zeroes));
            let expected = EXPORT_NAME_REPLY_BYTES + if no_zeroes { 0 } else { EXPORT_NAME_REPLY_ZEROES };
            prop_assert_eq!(bytes.len(), expected);
            prop_assert_eq!(&bytes[..8], &size.to_be_bytes());
            prop_assert_eq!(&bytes[8..10], &flags.to_be_bytes());
        }
    }
}
