//! The backup file format (`docs/FORMAT.md` §15): encoding and decoding, free of
//! async and of any volume.
//!
//! A file is a header, a stream of extent records in ascending volume order, and a
//! trailer. [`Encoder`] writes one in a single pass without knowing the extents in
//! advance; [`Decoder`] reads one in a single pass with bounded memory (one extent of
//! at most [`MAX_DATA_EXTENT_BLOCKS`] blocks at a time) and checks every CRC on the way.
//!
//! Fault model: the file may be truncated anywhere (a crash of the writer, a full disk,
//! a partial copy) or have any byte changed (media, transfer). Truncation is caught by
//! the trailer, which is the last thing written and must be followed by nothing; a
//! changed byte by the header CRC, the per-extent header CRC, the per-block CRCs or
//! the whole-file CRC in the trailer — every byte is covered by at least one of them.
//! Nothing read from a file is trusted: every length is bounded before it is used.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The first 8 bytes of every backup file.
pub const MAGIC: [u8; 8] = *b"RPLCD-BK";
/// The version this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Block size of every backup (the project's block size).
pub const BLOCK_BYTES: u64 = engine::BLOCK_BYTES;
/// Fixed part of the header, before the three names.
pub const HEADER_FIXED_BYTES: usize = 64;
/// Bound on each name in the header (volume id, snapshot, base snapshot).
pub const MAX_NAME_BYTES: usize = 1024;
/// Most blocks in one data extent: 1 MiB of data, the unit of reads and writes.
pub const MAX_DATA_EXTENT_BLOCKS: u32 = 256;
/// Size of the trailer.
pub const TRAILER_BYTES: usize = 44;

const DATA_MAGIC: [u8; 4] = *b"BKDX";
const ZERO_MAGIC: [u8; 4] = *b"BKZX";
const TRAILER_MAGIC: [u8; 4] = *b"BKTR";
const EXTENT_FIXED_BYTES: usize = 16;
const FLAG_INCREMENTAL: u32 = 1;
const MAX_HEADER_BYTES: usize = HEADER_FIXED_BYTES + 3 * MAX_NAME_BYTES + 4;

const _: () = assert!(BLOCK_BYTES == 4096);
const _: () = assert!(MAX_DATA_EXTENT_BLOCKS as u64 * BLOCK_BYTES == 1 << 20);

/// What a backup is of: stored in the header of every backup file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupMeta {
    /// Identity of the volume (a resource UUID or name), supplied by the caller.
    pub volume_id: String,
    /// Size of the volume in bytes: a whole number of 4096-byte blocks.
    pub volume_bytes: u64,
    /// The snapshot this backup holds.
    pub snapshot: String,
    /// The snapshot's sequence number.
    pub snapshot_seq: u64,
    /// For an incremental backup, the snapshot (name, sequence number) it is based on;
    /// `None` for a full backup. (JSON: `{"snapshot": NAME, "seq": N}` or `null`.)
    #[serde(serialize_with = "serialize_base")]
    pub base: Option<(String, u64)>,
    /// Creation time, seconds since the Unix epoch (informational).
    pub created_unix: u64,
}

fn serialize_base<S: serde::Serializer>(
    base: &Option<(String, u64)>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Base<'a> {
        snapshot: &'a str,
        seq: u64,
    }
    base.as_ref()
        .map(|(snapshot, seq)| Base {
            snapshot,
            seq: *seq,
        })
        .serialize(serializer)
}

impl BackupMeta {
    /// Whether this is a full backup (no base).
    pub fn is_full(&self) -> bool {
        self.base.is_none()
    }

    /// Checks what the format can hold; `Err` names the problem.
    pub fn validate(&self) -> Result<(), String> {
        let name = |what: &str, value: &str| {
            if value.is_empty() {
                Err(format!("the {what} is empty"))
            } else if value.len() > MAX_NAME_BYTES {
                Err(format!(
                    "the {what} has {} bytes; at most {MAX_NAME_BYTES}",
                    value.len()
                ))
            } else {
                Ok(())
            }
        };
        name("volume id", &self.volume_id)?;
        name("snapshot name", &self.snapshot)?;
        if let Some((base, _)) = &self.base {
            name("base snapshot name", base)?;
        }
        if self.volume_bytes == 0 || self.volume_bytes % BLOCK_BYTES != 0 {
            return Err(format!(
                "the volume size {} is not a positive multiple of {BLOCK_BYTES}",
                self.volume_bytes
            ));
        }
        Ok(())
    }
}

/// What a backup file holds, beyond its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Extent records (data and zero).
    pub extents: u64,
    /// Blocks stored with their data.
    pub data_blocks: u64,
    /// Blocks stored as zero extents (no data).
    pub zero_blocks: u64,
    /// Size of the whole file.
    pub file_bytes: u64,
}

/// Why a backup file cannot be written or read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{}: {what}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{} already exists; refusing to overwrite a backup", path.display())]
    Exists { path: PathBuf },
    #[error("{}: invalid backup metadata: {reason}", path.display())]
    InvalidMeta { path: PathBuf, reason: String },
    #[error("{}: invalid changed ranges: {reason}", path.display())]
    InvalidRanges { path: PathBuf, reason: String },
    #[error("{}: the source has {source_bytes} bytes but the metadata says the volume has {volume_bytes}", path.display())]
    SourceSize {
        path: PathBuf,
        source_bytes: u64,
        volume_bytes: u64,
    },
    #[error("{}: reading the source at byte {offset} failed", path.display())]
    Source {
        path: PathBuf,
        offset: u64,
        #[source]
        source: anyhow::Error,
    },
    #[error("{}: the source returned {got} bytes at byte {offset}, {wanted} were asked for", path.display())]
    ShortRead {
        path: PathBuf,
        offset: u64,
        wanted: u64,
        got: u64,
    },
    #[error("{} is not a replicad backup file (no RPLCD-BK magic)", path.display())]
    NotABackup { path: PathBuf },
    #[error("{}: backup format version {found} is not supported (this build reads version {FORMAT_VERSION})", path.display())]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{}: header CRC mismatch (the header is corrupt)", path.display())]
    HeaderCrc { path: PathBuf },
    #[error("{}: invalid header: {reason}", path.display())]
    BadHeader { path: PathBuf, reason: String },
    #[error("{} is truncated: it ends at byte {at}, inside {inside} (the backup is incomplete)", path.display())]
    Truncated {
        path: PathBuf,
        at: u64,
        inside: &'static str,
    },
    #[error("{}: corrupt extent record at byte {at}: {reason}", path.display())]
    BadExtent {
        path: PathBuf,
        at: u64,
        reason: String,
    },
    #[error("{}: CRC mismatch at block {block} (volume byte {}; file byte {at})", path.display(), block * BLOCK_BYTES)]
    BlockCrc { path: PathBuf, block: u64, at: u64 },
    #[error("{}: corrupt trailer at byte {at}: {reason}", path.display())]
    BadTrailer {
        path: PathBuf,
        at: u64,
        reason: String,
    },
    #[error("{}: whole-file CRC mismatch (stored {stored:#010x}, computed {computed:#010x})", path.display())]
    FileCrc {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error("{}: unexpected bytes after the trailer at byte {at}", path.display())]
    TrailingBytes { path: PathBuf, at: u64 },
    #[error("backup task failed: {0}")]
    Internal(String),
}

impl BackupError {
    fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> BackupError + 'a {
        move |source| BackupError::Io {
            path: path.to_owned(),
            what,
            source,
        }
    }
}

fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}
fn u16_at(bytes: &[u8], at: usize) -> u16 {
    let mut array = [0u8; 2];
    array.copy_from_slice(&bytes[at..at + 2]);
    u16::from_le_bytes(array)
}
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut array = [0u8; 4];
    array.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(array)
}
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(array)
}

/// The header of `meta` (which must be valid: see [`BackupMeta::validate`]).
pub fn encode_header(meta: &BackupMeta) -> Vec<u8> {
    assert!(meta.validate().is_ok(), "encode_header of invalid metadata");
    let (base_name, base_seq) = match &meta.base {
        Some((name, seq)) => (name.as_str(), *seq),
        None => ("", 0),
    };
    let names = meta.volume_id.len() + meta.snapshot.len() + base_name.len();
    let header_bytes = HEADER_FIXED_BYTES + names + 4;
    let mut out = Vec::with_capacity(header_bytes);
    out.extend_from_slice(&MAGIC);
    put_u32(&mut out, FORMAT_VERSION);
    put_u32(&mut out, header_bytes as u32);
    put_u32(&mut out, BLOCK_BYTES as u32);
    put_u32(&mut out, if meta.is_full() { 0 } else { FLAG_INCREMENTAL });
    put_u64(&mut out, meta.volume_bytes);
    put_u64(&mut out, meta.snapshot_seq);
    put_u64(&mut out, base_seq);
    put_u64(&mut out, meta.created_unix);
    // Lengths fit: validate() bounds each name by MAX_NAME_BYTES.
    put_u16(&mut out, meta.volume_id.len() as u16);
    put_u16(&mut out, meta.snapshot.len() as u16);
    put_u16(&mut out, base_name.len() as u16);
    put_u16(&mut out, 0);
    debug_assert_eq!(out.len(), HEADER_FIXED_BYTES);
    out.extend_from_slice(meta.volume_id.as_bytes());
    out.extend_from_slice(meta.snapshot.as_bytes());
    out.extend_from_slice(base_name.as_bytes());
    let crc = crc32fast::hash(&out);
    put_u32(&mut out, crc);
    debug_assert_eq!(out.len(), header_bytes);
    out
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` when the file ends first.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    Ok(read_up_to(input, buf)? == buf.len())
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// A writer of one backup file, in one pass. Extents must come in ascending,
/// non-overlapping order, whole blocks; a full backup must cover the whole volume.
/// These are the caller's invariants (checked with assertions, as bugs); the decoder
/// checks them again as facts about the file.
pub struct Encoder<W: Write> {
    out: W,
    hasher: crc32fast::Hasher,
    meta: BackupMeta,
    /// Volume byte just past the last extent.
    next_offset: u64,
    totals: Totals,
}

impl<W: Write> Encoder<W> {
    /// Writes the header of `meta` (valid: see [`BackupMeta::validate`]).
    pub fn new(mut out: W, meta: &BackupMeta) -> io::Result<Self> {
        let header = encode_header(meta);
        out.write_all(&header)?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header);
        Ok(Encoder {
            out,
            hasher,
            meta: meta.clone(),
            next_offset: 0,
            totals: Totals {
                extents: 0,
                data_blocks: 0,
                zero_blocks: 0,
                file_bytes: header.len() as u64,
            },
        })
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.hasher.update(bytes);
        self.totals.file_bytes += bytes.len() as u64;
        Ok(())
    }

    fn check_placement(&mut self, offset_bytes: u64, blocks: u64) {
        assert!(offset_bytes % BLOCK_BYTES == 0, "unaligned extent");
        assert!(blocks > 0, "empty extent");
        assert!(offset_bytes >= self.next_offset, "extents out of order");
        assert!(
            !self.meta.is_full() || offset_bytes == self.next_offset,
            "a full backup leaves a gap"
        );
        let end = blocks
            .checked_mul(BLOCK_BYTES)
            .and_then(|bytes| bytes.checked_add(offset_bytes))
            .filter(|end| *end <= self.meta.volume_bytes);
        self.next_offset = end.unwrap_or_else(|| panic!("extent beyond the volume"));
    }

    /// Writes `data` (whole blocks, at most [`MAX_DATA_EXTENT_BLOCKS`]) stored at
    /// volume byte `offset_bytes`.
    pub fn data_extent(&mut self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        assert!(data.len() as u64 % BLOCK_BYTES == 0, "partial block");
        let blocks = data.len() as u64 / BLOCK_BYTES;
        assert!(
            blocks <= u64::from(MAX_DATA_EXTENT_BLOCKS),
            "extent too long"
        );
        self.check_placement(offset_bytes, blocks);
        let mut header = Vec::with_capacity(EXTENT_FIXED_BYTES + 4 * blocks as usize + 4);
        header.extend_from_slice(&DATA_MAGIC);
        put_u32(&mut header, blocks as u32);
        put_u64(&mut header, offset_bytes);
        for block in data.chunks_exact(BLOCK_BYTES as usize) {
            put_u32(&mut header, engine::checksum::block_crc(block));
        }
        let crc = crc32fast::hash(&header);
        put_u32(&mut header, crc);
        self.emit(&header)?;
        self.emit(data)?;
        self.totals.extents += 1;
        self.totals.data_blocks += blocks;
        Ok(())
    }

    /// Records `blocks` zero blocks from volume byte `offset_bytes` (no data stored;
    /// split into records of at most `u32::MAX` blocks).
    pub fn zero_extent(&mut self, offset_bytes: u64, blocks: u64) -> io::Result<()> {
        self.check_placement(offset_bytes, blocks);
        let mut offset = offset_bytes;
        let mut left = blocks;
        while left > 0 {
            let count = left.min(u64::from(u32::MAX));
            let mut record = Vec::with_capacity(EXTENT_FIXED_BYTES + 4);
            record.extend_from_slice(&ZERO_MAGIC);
            put_u32(&mut record, count as u32);
            put_u64(&mut record, offset);
            let crc = crc32fast::hash(&record);
            put_u32(&mut record, crc);
            self.emit(&record)?;
            self.totals.extents += 1;
            self.totals.zero_blocks += count;
            offset += count * BLOCK_BYTES;
            left -= count;
        }
        Ok(())
    }

    /// Writes the trailer; returns the output (flushed) and what the file holds.
    pub fn finish(mut self) -> io::Result<(W, Totals)> {
        assert!(
            !self.meta.is_full() || self.next_offset == self.meta.volume_bytes,
            "a full backup ends before the end of the volume"
        );
        let mut trailer = Vec::with_capacity(TRAILER_BYTES);
        trailer.extend_from_slice(&TRAILER_MAGIC);
        put_u32(&mut trailer, 0);
        put_u64(&mut trailer, self.totals.extents);
        put_u64(&mut trailer, self.totals.data_blocks);
        put_u64(&mut trailer, self.totals.zero_blocks);
        put_u64(&mut trailer, self.totals.file_bytes + TRAILER_BYTES as u64);
        self.hasher.update(&trailer);
        let crc = self.hasher.clone().finalize();
        put_u32(&mut trailer, crc);
        debug_assert_eq!(trailer.len(), TRAILER_BYTES);
        self.out.write_all(&trailer)?;
        self.totals.file_bytes += TRAILER_BYTES as u64;
        self.out.flush()?;
        Ok((self.out, self.totals))
    }
}

/// One extent read back from a file (its CRCs already checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extent {
    /// Blocks with their data, at volume byte `offset_bytes`.
    Data { offset_bytes: u64, data: Vec<u8> },
    /// `blocks` zero blocks at volume byte `offset_bytes`.
    Zero { offset_bytes: u64, blocks: u64 },
}

/// A reader of one backup file, in one pass: [`Decoder::open`] checks the header,
/// [`Decoder::next_extent`] returns each extent after checking its CRCs, and returns
/// `None` only after a valid trailer at the very end of the file.
pub struct Decoder<R: Read> {
    input: R,
    path: PathBuf,
    meta: BackupMeta,
    hasher: crc32fast::Hasher,
    /// File bytes consumed so far.
    position: u64,
    next_offset: u64,
    totals: Totals,
    done: bool,
}

impl Decoder<io::BufReader<std::fs::File>> {
    /// Opens the file at `path` and checks its header.
    pub fn open_path(path: &Path) -> Result<Self, BackupError> {
        let file =
            std::fs::File::open(path).map_err(BackupError::io(path, "cannot open the backup"))?;
        Decoder::open(io::BufReader::with_capacity(1 << 20, file), path)
    }
}

impl<R: Read> Decoder<R> {
    /// Reads and checks the header from `input`; `path` names the file in errors.
    pub fn open(mut input: R, path: &Path) -> Result<Self, BackupError> {
        let (meta, header) = decode_header(&mut input, path)?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header);
        Ok(Decoder {
            input,
            path: path.to_owned(),
            meta,
            hasher,
            position: header.len() as u64,
            next_offset: 0,
            totals: Totals {
                extents: 0,
                data_blocks: 0,
                zero_blocks: 0,
                file_bytes: 0,
            },
            done: false,
        })
    }

    pub fn meta(&self) -> &BackupMeta {
        &self.meta
    }

    /// File bytes read and checked so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// What the file holds; complete once [`Decoder::next_extent`] returned `None`.
    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    fn read_exact(&mut self, buf: &mut [u8], inside: &'static str) -> Result<(), BackupError> {
        let read = read_up_to(&mut self.input, buf)
            .map_err(BackupError::io(&self.path, "cannot read the backup"))?;
        if read < buf.len() {
            return Err(BackupError::Truncated {
                path: self.path.clone(),
                at: self.position + read as u64,
                inside,
            });
        }
        self.hasher.update(buf);
        self.position += buf.len() as u64;
        Ok(())
    }

    fn bad_extent(&self, at: u64, reason: String) -> BackupError {
        BackupError::BadExtent {
            path: self.path.clone(),
            at,
            reason,
        }
    }

    /// Checks an extent's placement: block-aligned, inside the volume, after the
    /// previous one (and right after it in a full backup).
    fn place(&mut self, at: u64, offset_bytes: u64, blocks: u64) -> Result<(), BackupError> {
        if offset_bytes % BLOCK_BYTES != 0 {
            return Err(self.bad_extent(at, format!("offset {offset_bytes} is not block-aligned")));
        }
        let end = blocks
            .checked_mul(BLOCK_BYTES)
            .and_then(|bytes| bytes.checked_add(offset_bytes))
            .filter(|end| *end <= self.meta.volume_bytes)
            .ok_or_else(|| {
                self.bad_extent(
                    at,
                    format!(
                        "{blocks} blocks at byte {offset_bytes} go beyond the volume of {} bytes",
                        self.meta.volume_bytes
                    ),
                )
            })?;
        if offset_bytes < self.next_offset {
            return Err(self.bad_extent(
                at,
                format!(
                    "offset {offset_bytes} overlaps or precedes the previous extent (which ends at {})",
                    self.next_offset
                ),
            ));
        }
        if self.meta.is_full() && offset_bytes != self.next_offset {
            return Err(self.bad_extent(
                at,
                format!(
                    "a full backup skips volume bytes {}..{offset_bytes}",
                    self.next_offset
                ),
            ));
        }
        self.next_offset = end;
        Ok(())
    }

    /// The next extent, or `None` after the trailer has been read and checked.
    pub fn next_extent(&mut self) -> Result<Option<Extent>, BackupError> {
        if self.done {
            return Ok(None);
        }
        let at = self.position;
        let mut magic = [0u8; 4];
        self.read_exact(&mut magic, "the next extent or the trailer (no trailer)")?;
        match magic {
            DATA_MAGIC => self.data_extent(at, magic).map(Some),
            ZERO_MAGIC => self.zero_extent(at, magic).map(Some),
            TRAILER_MAGIC => self.trailer(at).map(|()| None),
            other => Err(self.bad_extent(at, format!("unknown record magic {other:02x?}"))),
        }
    }

    fn data_extent(&mut self, at: u64, magic: [u8; 4]) -> Result<Extent, BackupError> {
        let mut fixed = [0u8; EXTENT_FIXED_BYTES - 4];
        self.read_exact(&mut fixed, "a data extent header")?;
        let blocks = u32_at(&fixed, 0);
        let offset_bytes = u64_at(&fixed, 4);
        if blocks == 0 || blocks > MAX_DATA_EXTENT_BLOCKS {
            return Err(self.bad_extent(
                at,
                format!("{blocks} blocks (a data extent has 1 to {MAX_DATA_EXTENT_BLOCKS})"),
            ));
        }
        let mut crcs = vec![0u8; 4 * blocks as usize + 4];
        self.read_exact(&mut crcs, "a data extent header")?;
        let mut header_hasher = crc32fast::Hasher::new();
        header_hasher.update(&magic);
        header_hasher.update(&fixed);
        header_hasher.update(&crcs[..4 * blocks as usize]);
        if header_hasher.finalize() != u32_at(&crcs, 4 * blocks as usize) {
            return Err(self.bad_extent(at, "extent header CRC mismatch".to_owned()));
        }
        self.place(at, offset_bytes, u64::from(blocks))?;
        let data_at = self.position;
        let mut data = vec![0u8; blocks as usize * BLOCK_BYTES as usize];
        self.read_exact(&mut data, "the data of an extent")?;
        for (index, block) in data.chunks_exact(BLOCK_BYTES as usize).enumerate() {
            if engine::checksum::block_crc(block) != u32_at(&crcs, 4 * index) {
                return Err(BackupError::BlockCrc {
                    path: self.path.clone(),
                    block: offset_bytes / BLOCK_BYTES + index as u64,
                    at: data_at + index as u64 * BLOCK_BYTES,
                });
            }
        }
        self.totals.extents += 1;
        self.totals.data_blocks += u64::from(blocks);
        Ok(Extent::Data { offset_bytes, data })
    }

    fn zero_extent(&mut self, at: u64, magic: [u8; 4]) -> Result<Extent, BackupError> {
        let mut rest = [0u8; EXTENT_FIXED_BYTES];
        self.read_exact(&mut rest, "a zero extent")?;
        let blocks = u32_at(&rest, 0);
        let offset_bytes = u64_at(&rest, 4);
        let mut header_hasher = crc32fast::Hasher::new();
        header_hasher.update(&magic);
        header_hasher.update(&rest[..12]);
        if header_hasher.finalize() != u32_at(&rest, 12) {
            return Err(self.bad_extent(at, "extent header CRC mismatch".to_owned()));
        }
        if blocks == 0 {
            return Err(self.bad_extent(at, "a zero extent of 0 blocks".to_owned()));
        }
        self.place(at, offset_bytes, u64::from(blocks))?;
        self.totals.extents += 1;
        self.totals.zero_blocks += u64::from(blocks);
        Ok(Extent::Zero {
            offset_bytes,
            blocks: u64::from(blocks),
        })
    }

    fn trailer(&mut self, at: u64) -> Result<(), BackupError> {
        let mut rest = [0u8; TRAILER_BYTES - 8];
        // The CRC field is not part of what it covers: read it apart from the hasher.
        self.read_exact(&mut rest, "the trailer")?;
        let computed = self.hasher.clone().finalize();
        let mut stored = [0u8; 4];
        let read = read_up_to(&mut self.input, &mut stored)
            .map_err(BackupError::io(&self.path, "cannot read the backup"))?;
        if read < stored.len() {
            return Err(BackupError::Truncated {
                path: self.path.clone(),
                at: self.position + read as u64,
                inside: "the trailer",
            });
        }
        self.position += 4;
        let stored = u32::from_le_bytes(stored);
        if stored != computed {
            return Err(BackupError::FileCrc {
                path: self.path.clone(),
                stored,
                computed,
            });
        }
        let bad = |reason: String| BackupError::BadTrailer {
            path: self.path.clone(),
            at,
            reason,
        };
        let counts = (u64_at(&rest, 4), u64_at(&rest, 12), u64_at(&rest, 20));
        let file_bytes = u64_at(&rest, 28);
        let read = (
            self.totals.extents,
            self.totals.data_blocks,
            self.totals.zero_blocks,
        );
        if counts != read {
            return Err(bad(format!(
                "it counts (extents, data blocks, zero blocks) = {counts:?}, the file holds {read:?}"
            )));
        }
        if file_bytes != self.position {
            return Err(bad(format!(
                "it says the file has {file_bytes} bytes, it ends at {}",
                self.position
            )));
        }
        if self.meta.is_full() && self.next_offset != self.meta.volume_bytes {
            return Err(bad(format!(
                "a full backup ends at volume byte {}, the volume has {}",
                self.next_offset, self.meta.volume_bytes
            )));
        }
        let mut extra = [0u8; 1];
        if read_full(&mut self.input, &mut extra)
            .map_err(BackupError::io(&self.path, "cannot read the backup"))?
        {
            return Err(BackupError::TrailingBytes {
                path: self.path.clone(),
                at: self.position,
            });
        }
        self.totals.file_bytes = self.position;
        self.done = true;
        Ok(())
    }
}

/// Reads and checks a header (magic, version, size, CRC, fields); returns it decoded
/// and as read.
fn decode_header(input: &mut impl Read, path: &Path) -> Result<(BackupMeta, Vec<u8>), BackupError> {
    let truncated = |at: u64| BackupError::Truncated {
        path: path.to_owned(),
        at,
        inside: "the header",
    };
    let mut fixed = [0u8; HEADER_FIXED_BYTES];
    // A file shorter than the magic, or with another magic, is not a backup at all.
    if !read_full(input, &mut fixed[..8])
        .map_err(BackupError::io(path, "cannot read the backup"))?
    {
        return Err(BackupError::NotABackup {
            path: path.to_owned(),
        });
    }
    if fixed[..8] != MAGIC {
        return Err(BackupError::NotABackup {
            path: path.to_owned(),
        });
    }
    let read = read_up_to(input, &mut fixed[8..])
        .map_err(BackupError::io(path, "cannot read the backup"))?;
    if read < HEADER_FIXED_BYTES - 8 {
        return Err(truncated(8 + read as u64));
    }
    // The version before the CRC: a newer file is reported as newer, not as corrupt.
    let version = u32_at(&fixed, 8);
    if version != FORMAT_VERSION {
        return Err(BackupError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
        });
    }
    let bad = |reason: String| BackupError::BadHeader {
        path: path.to_owned(),
        reason,
    };
    let header_bytes = u32_at(&fixed, 12) as usize;
    let name_lengths = [
        u16_at(&fixed, 56) as usize,
        u16_at(&fixed, 58) as usize,
        u16_at(&fixed, 60) as usize,
    ];
    let expected = HEADER_FIXED_BYTES + name_lengths.iter().sum::<usize>() + 4;
    if header_bytes != expected || header_bytes > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header_bytes {header_bytes} does not match its names ({expected}, at most {MAX_HEADER_BYTES})"
        )));
    }
    let mut rest = vec![0u8; header_bytes - HEADER_FIXED_BYTES];
    let read =
        read_up_to(input, &mut rest).map_err(BackupError::io(path, "cannot read the backup"))?;
    if read < rest.len() {
        return Err(truncated((HEADER_FIXED_BYTES + read) as u64));
    }
    let names_end = rest.len() - 4;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&fixed);
    hasher.update(&rest[..names_end]);
    if hasher.finalize() != u32_at(&rest, names_end) {
        return Err(BackupError::HeaderCrc {
            path: path.to_owned(),
        });
    }
    let block_bytes = u32_at(&fixed, 16);
    if u64::from(block_bytes) != BLOCK_BYTES {
        return Err(bad(format!("block size {block_bytes}, not {BLOCK_BYTES}")));
    }
    let flags = u32_at(&fixed, 20);
    if flags & !FLAG_INCREMENTAL != 0 {
        return Err(bad(format!("unknown flags {flags:#x}")));
    }
    let mut names = Vec::with_capacity(3);
    let mut start = 0;
    for (length, what) in
        name_lengths
            .iter()
            .zip(["volume id", "snapshot name", "base snapshot name"])
    {
        let name = std::str::from_utf8(&rest[start..start + length])
            .map_err(|_| bad(format!("the {what} is not UTF-8")))?;
        names.push(name.to_owned());
        start += length;
    }
    let base_seq = u64_at(&fixed, 40);
    let incremental = flags & FLAG_INCREMENTAL != 0;
    let base_name = names.pop().unwrap_or_default();
    let base = if incremental {
        Some((base_name, base_seq))
    } else if !base_name.is_empty() || base_seq != 0 {
        return Err(bad("a full backup names a base snapshot".to_owned()));
    } else {
        None
    };
    let snapshot = names.pop().unwrap_or_default();
    let volume_id = names.pop().unwrap_or_default();
    let meta = BackupMeta {
        volume_id,
        volume_bytes: u64_at(&fixed, 24),
        snapshot,
        snapshot_seq: u64_at(&fixed, 32),
        base,
        created_unix: u64_at(&fixed, 48),
    };
    meta.validate().map_err(bad)?;
    let mut raw = fixed.to_vec();
    raw.extend_from_slice(&rest);
    Ok((meta, raw))
}

/// Reads and checks the header of the backup file at `path`.
pub fn read_header(path: &Path) -> Result<BackupMeta, BackupError> {
    let file =
        std::fs::File::open(path).map_err(BackupError::io(path, "cannot open the backup"))?;
    decode_header(&mut io::BufReader::new(file), path).map(|(meta, _)| meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(full: bool) -> BackupMeta {
        BackupMeta {
            volume_id: "vol-Ω".to_owned(),
            volume_bytes: 64 * BLOCK_BYTES,
            snapshot: "nightly-1".to_owned(),
            snapshot_seq: 812,
            base: (!full).then(|| ("nightly-0".to_owned(), 700)),
            created_unix: 1_764_000_000,
        }
    }

    fn block(fill: u8) -> Vec<u8> {
        (0..BLOCK_BYTES as usize)
            .map(|i| fill.wrapping_add(i as u8))
            .collect()
    }

    /// A small full backup: data, zeroes, data, zeroes to the end.
    fn small_full() -> Vec<u8> {
        let mut encoder = Encoder::new(Vec::new(), &meta(true)).expect("header");
        let mut data = block(1);
        data.extend(block(2));
        encoder.data_extent(0, &data).expect("data");
        encoder.zero_extent(2 * BLOCK_BYTES, 5).expect("zero");
        encoder
            .data_extent(7 * BLOCK_BYTES, &block(3))
            .expect("data");
        encoder.zero_extent(8 * BLOCK_BYTES, 56).expect("zero");
        encoder.finish().expect("trailer").0
    }

    fn decode_all(bytes: &[u8]) -> Result<(BackupMeta, Vec<Extent>, Totals), BackupError> {
        let mut decoder = Decoder::open(bytes, Path::new("test.bak"))?;
        let mut extents = Vec::new();
        while let Some(extent) = decoder.next_extent()? {
            extents.push(extent);
        }
        Ok((decoder.meta().clone(), extents, decoder.totals().clone()))
    }

    #[test]
    fn the_header_round_trips_for_full_and_incremental() {
        for full in [true, false] {
            let header = encode_header(&meta(full));
            let (decoded, raw) =
                decode_header(&mut header.as_slice(), Path::new("h")).expect("decode");
            assert_eq!(decoded, meta(full));
            assert_eq!(raw, header);
        }
    }

    #[test]
    fn a_small_file_round_trips() {
        let bytes = small_full();
        let (decoded_meta, extents, totals) = decode_all(&bytes).expect("decode");
        assert_eq!(decoded_meta, meta(true));
        assert_eq!(extents.len(), 4);
        assert_eq!(
            extents[1],
            Extent::Zero {
                offset_bytes: 2 * BLOCK_BYTES,
                blocks: 5
            }
        );
        assert_eq!(
            totals,
            Totals {
                extents: 4,
                data_blocks: 3,
                zero_blocks: 61,
                file_bytes: bytes.len() as u64
            }
        );
    }

    /// The byte tables and the worked example of docs/FORMAT.md §15, field by field.
    #[test]
    fn the_documented_layout_holds() {
        let bytes = small_full();
        assert_eq!(bytes.len(), 12_507, "the worked example's size");
        let header = &bytes[..83];
        assert_eq!(&header[..8], b"RPLCD-BK");
        assert_eq!(u32_at(header, 8), 1);
        assert_eq!(u32_at(header, 12), 83);
        assert_eq!(u32_at(header, 16), 4096);
        assert_eq!(u32_at(header, 20), 0);
        assert_eq!(u64_at(header, 24), 64 * 4096);
        assert_eq!(u64_at(header, 32), 812);
        assert_eq!(u64_at(header, 40), 0);
        assert_eq!(u64_at(header, 48), 1_764_000_000);
        assert_eq!(
            (u16_at(header, 56), u16_at(header, 58), u16_at(header, 60)),
            (6, 9, 0)
        );
        assert_eq!(&header[64..70], "vol-Ω".as_bytes());
        assert_eq!(&header[70..79], b"nightly-1");
        assert_eq!(u32_at(header, 79), crc32fast::hash(&header[..79]));
        let extent = &bytes[83..];
        assert_eq!(&extent[..4], b"BKDX");
        assert_eq!((u32_at(extent, 4), u64_at(extent, 8)), (2, 0));
        assert_eq!(u32_at(extent, 16), crc32fast::hash(&block(1)));
        assert_eq!(u32_at(extent, 24), crc32fast::hash(&extent[..24]));
        let zero = &bytes[83 + 28 + 8192..];
        assert_eq!(&zero[..4], b"BKZX");
        assert_eq!((u32_at(zero, 4), u64_at(zero, 8)), (5, 2 * 4096));
        assert_eq!(u32_at(zero, 16), crc32fast::hash(&zero[..16]));
        let trailer = &bytes[bytes.len() - TRAILER_BYTES..];
        assert_eq!(&trailer[..4], b"BKTR");
        assert_eq!(
            (
                u64_at(trailer, 8),
                u64_at(trailer, 16),
                u64_at(trailer, 24),
                u64_at(trailer, 32)
            ),
            (4, 3, 61, 12_507)
        );
        assert_eq!(
            u32_at(trailer, 40),
            crc32fast::hash(&bytes[..bytes.len() - 4])
        );
    }

    #[test]
    fn truncation_at_every_offset_is_detected() {
        let bytes = small_full();
        for length in 0..bytes.len() {
            match decode_all(&bytes[..length]) {
                Err(BackupError::Truncated { at, .. }) if at == length as u64 => {}
                Err(BackupError::NotABackup { .. }) if length < MAGIC.len() => {}
                other => panic!("truncated to {length} of {}: {other:?}", bytes.len()),
            }
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_detected() {
        let bytes = small_full();
        for at in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut damaged = bytes.clone();
                damaged[at] ^= bit;
                assert!(
                    decode_all(&damaged).is_err(),
                    "bit {bit:#x} of byte {at} flipped went unnoticed"
                );
            }
        }
    }

    #[test]
    fn a_damaged_block_is_named() {
        let mut bytes = small_full();
        let header = encode_header(&meta(true)).len();
        // The second block of the first extent: header, extent header (16 + 2·4 + 4).
        let at = header + 28 + BLOCK_BYTES as usize + 100;
        bytes[at] ^= 0xff;
        match decode_all(&bytes) {
            Err(BackupError::BlockCrc { block: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bytes_after_the_trailer_are_refused() {
        let mut bytes = small_full();
        bytes.push(0);
        assert!(matches!(
            decode_all(&bytes),
            Err(BackupError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn an_other_version_is_reported_before_the_crc() {
        let mut bytes = small_full();
        bytes[8] = 2;
        assert!(matches!(
            decode_all(&bytes),
            Err(BackupError::UnsupportedVersion { found: 2, .. })
        ));
    }

    #[test]
    fn the_json_of_a_base_names_its_fields() {
        let json = serde_json::to_value(meta(false)).expect("json");
        assert_eq!(
            json["base"],
            serde_json::json!({"snapshot": "nightly-0", "seq": 700})
        );
        let json = serde_json::to_value(meta(true)).expect("json");
        assert!(json["base"].is_null());
    }

    #[test]
    fn invalid_metadata_is_described() {
        let mut bad = meta(true);
        bad.volume_bytes = 4097;
        assert!(bad.validate().is_err_and(|reason| reason.contains("4097")));
        let mut bad = meta(false);
        bad.base = Some((String::new(), 1));
        assert!(bad.validate().is_err_and(|reason| reason.contains("base")));
        let mut bad = meta(true);
        bad.volume_id = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(bad.validate().is_err());
    }
}
