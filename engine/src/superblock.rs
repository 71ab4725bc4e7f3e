//! The superblock: identity, geometry, generation identifiers, checkpoint, state.
//!
//! Two copies live in the last 8 KiB of the metadata store. Each write goes to the
//! copy *not* holding the newest valid version, with the sequence number incremented,
//! so a torn superblock write always leaves the previous version intact in the other
//! copy. On open, the valid copy (magic, version, CRC) with the higher sequence wins.
//! Byte table: `docs/FORMAT.md`.

use crate::gen::GenerationIds;
use crate::layout::{Geometry, SUPERBLOCK_BYTES};

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"RPLCD-SB";
pub const FORMAT_VERSION: u32 = 2;
/// Bytes of the encoded header; the rest of the 4 KiB copy is zero.
pub const SUPERBLOCK_HEADER_BYTES: usize = 256;
const CRC_OFFSET: usize = SUPERBLOCK_HEADER_BYTES - 4;
/// Longest node name stored.
pub const NODE_NAME_BYTES: usize = 64;

/// `flags` bits.
pub mod flags {
    /// The store was closed cleanly: nothing to replay, no crash to report.
    pub const CLEAN: u64 = 1;
    /// The node was Primary when this superblock was written (a crash then means
    /// "crashed primary": its last writes may never have reached the peer).
    pub const PRIMARY: u64 = 2;
}

/// Persistent disk state (the runtime-only states Failed/Diskless/Attaching are not stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoredDiskState {
    /// Holds a complete, consistent copy of its current generation.
    #[default]
    UpToDate,
    /// Consistent but known to miss newer writes the peer has.
    Outdated,
    /// A resync target or never synced: must not be promoted without force.
    Inconsistent,
}

impl StoredDiskState {
    fn code(self) -> u8 {
        match self {
            StoredDiskState::UpToDate => 1,
            StoredDiskState::Outdated => 2,
            StoredDiskState::Inconsistent => 3,
        }
    }

    fn from_code(code: u8) -> Option<StoredDiskState> {
        match code {
            1 => Some(StoredDiskState::UpToDate),
            2 => Some(StoredDiskState::Outdated),
            3 => Some(StoredDiskState::Inconsistent),
            _ => None,
        }
    }
}

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub sequence: u64,
    pub resource_uuid: [u8; 16],
    pub node_id: u32,
    pub node_name: String,
    pub geometry: Geometry,
    pub generations: GenerationIds,
    /// Last journal record whose effects are durable in place; replay starts after it.
    pub checkpoint_seq: u64,
    /// Ring offset (relative to the journal start) of the first byte after the checkpoint.
    pub checkpoint_pos: u64,
    pub flags: u64,
    pub disk_state: StoredDiskState,
    /// Unix seconds of `create-md`.
    pub created_unix_secs: u64,
}

/// Why a superblock copy was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("no replicad metadata (bad magic)")]
    BadMagic,
    #[error(
        "metadata format version {0} is not supported (this build reads version {FORMAT_VERSION}; \
         a store of another version must be recreated with `replctl create-md --force`, \
         and resynced from its peer)"
    )]
    BadVersion(u32),
    #[error("superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc { stored: u32, computed: u32 },
    #[error("superblock field {field} is invalid: {detail}")]
    BadField { field: &'static str, detail: String },
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, bytes: &[u8]) {
        self.buf[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
    fn u8(&mut self, value: u8) {
        self.bytes(&[value]);
    }
    fn u32(&mut self, value: u32) {
        self.bytes(&value.to_le_bytes());
    }
    fn u64(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.at..self.at + N]);
        self.at += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

impl Superblock {
    /// Encodes into one 4 KiB copy.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; SUPERBLOCK_BYTES as usize];
        let mut w = Writer {
            buf: &mut buf,
            at: 0,
        };
        w.bytes(&SUPERBLOCK_MAGIC); // 0
        w.u32(FORMAT_VERSION); // 8
        w.u32(SUPERBLOCK_HEADER_BYTES as u32); // 12
        w.u64(self.sequence); // 16
        w.bytes(&self.resource_uuid); // 24
        w.u32(self.node_id); // 40
        w.u32(crate::BLOCK_BYTES as u32); // 44
        let g = &self.geometry;
        w.u64(g.data_bytes); // 48
        w.u64(g.journal_offset); // 56
        w.u64(g.journal_bytes); // 64
        w.u64(g.checksum_offset); // 72
        w.u64(g.checksum_bytes); // 80
        w.u64(g.bitmap_offset); // 88
        w.u64(g.bitmap_bytes); // 96
        w.u64(self.generations.current); // 104
        w.u64(self.generations.bitmap); // 112
        w.u64(self.generations.history[0]); // 120
        w.u64(self.generations.history[1]); // 128
        w.u64(self.checkpoint_seq); // 136
        w.u64(self.checkpoint_pos); // 144
        w.u64(self.flags); // 152
        w.u8(self.disk_state.code()); // 160
        w.bytes(&[0u8; 7]); // 161 reserved
        w.u64(self.created_unix_secs); // 168
        let mut name = [0u8; NODE_NAME_BYTES];
        let name_bytes = self.node_name.as_bytes();
        let name_len = name_bytes.len().min(NODE_NAME_BYTES);
        name[..name_len].copy_from_slice(&name_bytes[..name_len]);
        w.bytes(&name); // 176
        debug_assert_eq!(w.at, 240);
        // 240..252 reserved (zero).
        let crc = crc32fast::hash(&buf[..CRC_OFFSET]);
        buf[CRC_OFFSET..SUPERBLOCK_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes and validates one copy. Never panics on any input.
    pub fn decode(buf: &[u8]) -> Result<Superblock, SuperblockError> {
        if buf.len() < SUPERBLOCK_HEADER_BYTES || buf[..8] != SUPERBLOCK_MAGIC {
            return Err(SuperblockError::BadMagic);
        }
        let mut r = Reader { buf, at: 8 };
        let version = r.u32();
        if version != FORMAT_VERSION {
            return Err(SuperblockError::BadVersion(version));
        }
        let stored = u32::from_le_bytes([
            buf[CRC_OFFSET],
            buf[CRC_OFFSET + 1],
            buf[CRC_OFFSET + 2],
            buf[CRC_OFFSET + 3],
        ]);
        let computed = crc32fast::hash(&buf[..CRC_OFFSET]);
        if stored != computed {
            return Err(SuperblockError::BadCrc { stored, computed });
        }
        let bad = |field: &'static str, detail: String| SuperblockError::BadField { field, detail };
        let header_bytes = r.u32();
        if header_bytes as usize != SUPERBLOCK_HEADER_BYTES {
            return Err(bad("header_bytes", header_bytes.to_string()));
        }
        let sequence = r.u64();
        let resource_uuid = r.bytes::<16>();
        let node_id = r.u32();
        let block_bytes = r.u32();
        if u64::from(block_bytes) != crate::BLOCK_BYTES {
            return Err(bad("block_bytes", block_bytes.to_string()));
        }
        let geometry = Geometry {
            data_bytes: r.u64(),
            journal_offset: r.u64(),
            journal_bytes: r.u64(),
            checksum_offset: r.u64(),
            checksum_bytes: r.u64(),
            bitmap_offset: r.u64(),
            bitmap_bytes: r.u64(),
            superblock_offsets: [0, 0],
            meta_offset: 0,
        };
        let generations = GenerationIds {
            current: r.u64(),
            bitmap: r.u64(),
            history: [r.u64(), r.u64()],
        };
        let checkpoint_seq = r.u64();
        let checkpoint_pos = r.u64();
        let flags = r.u64();
        let disk_code = r.u8();
        let disk_state = StoredDiskState::from_code(disk_code)
            .ok_or_else(|| bad("disk_state", disk_code.to_string()))?;
        r.at += 7;
        let created_unix_secs = r.u64();
        let name = r.bytes::<NODE_NAME_BYTES>();
        let name_len = name.iter().position(|&b| b == 0).unwrap_or(NODE_NAME_BYTES);
        let node_name = String::from_utf8(name[..name_len].to_vec())
            .map_err(|_| bad("node_name", "not UTF-8".into()))?;
        if checkpoint_pos >= geometry.journal_bytes || checkpoint_pos % 64 != 0 {
            return Err(bad(
                "checkpoint_pos",
                format!(
                    "{checkpoint_pos} outside a {}-byte journal",
                    geometry.journal_bytes
                ),
            ));
        }
        Ok(Superblock {
            sequence,
            resource_uuid,
            node_id,
            node_name,
            geometry,
            generations,
            checkpoint_seq,
            checkpoint_pos,
            flags,
            disk_state,
            created_unix_secs,
        })
    }

    /// The copy (0 = A, 1 = B) the next write of this superblock goes to.
    pub fn next_copy(&self) -> usize {
        ((self.sequence + 1) % 2) as usize
    }
}

/// Outcome of reading both copies.
#[derive(Debug)]
pub struct LoadedSuperblock {
    pub superblock: Superblock,
    /// Which copy won (0 = A, 1 = B).
    pub copy: usize,
    /// Why the other copy was not used, if it was invalid (not merely older).
    pub other_copy_error: Option<SuperblockError>,
}

/// Picks the newest valid copy of two encoded superblocks.
pub fn choose(copy_a: &[u8], copy_b: &[u8]) -> Result<LoadedSuperblock, SuperblockError> {
    match (Superblock::decode(copy_a), Superblock::decode(copy_b)) {
        (Ok(a), Ok(b)) => {
            let (superblock, copy) = if b.sequence > a.sequence {
                (b, 1)
            } else {
                (a, 0)
            };
            Ok(LoadedSuperblock {
                superblock,
                copy,
                other_copy_error: None,
            })
        }
        (Ok(a), Err(error)) => Ok(LoadedSuperblock {
            superblock: a,
            copy: 0,
            other_copy_error: Some(error),
        }),
        (Err(error), Ok(b)) => Ok(LoadedSuperblock {
            superblock: b,
            copy: 1,
            other_copy_error: Some(error),
        }),
        // Report the more telling error: a CRC or version problem over plain "no magic".
        (Err(error_a), Err(error_b)) => Err(if error_a == SuperblockError::BadMagic {
            error_b
        } else {
            error_a
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MIN_JOURNAL_BYTES;

    pub(crate) fn sample() -> Superblock {
        Superblock {
            sequence: 7,
            resource_uuid: *b"0123456789abcdef",
            node_id: 1,
            node_name: "alpha".into(),
            geometry: Geometry::internal(64 << 20, MIN_JOURNAL_BYTES).unwrap(),
            generations: GenerationIds {
                current: 0x1111,
                bitmap: 0x2222,
                history: [0x3333, 0x4444],
            },
            checkpoint_seq: 99,
            checkpoint_pos: 8192,
            flags: flags::PRIMARY,
            disk_state: StoredDiskState::UpToDate,
            created_unix_secs: 1_700_000_000,
        }
    }

    fn without_placement(mut sb: Superblock) -> Superblock {
        sb.geometry.superblock_offsets = [0, 0];
        sb.geometry.meta_offset = 0;
        sb
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let decoded = Superblock::decode(&sb.encode()).unwrap();
        assert_eq!(decoded, without_placement(sb));
    }

    #[test]
    fn every_single_bit_flip_in_the_header_is_rejected() {
        let encoded = sample().encode();
        for bit in 0..SUPERBLOCK_HEADER_BYTES * 8 {
            let mut corrupt = encoded.clone();
            corrupt[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Superblock::decode(&corrupt).is_err(),
                "bit {bit} flip accepted"
            );
        }
    }

    #[test]
    fn newest_valid_copy_wins_and_a_corrupt_copy_falls_back() {
        let older = sample();
        let mut newer = sample();
        newer.sequence += 1;
        newer.checkpoint_seq += 5;
        let loaded = choose(&older.encode(), &newer.encode()).unwrap();
        assert_eq!((loaded.copy, loaded.superblock.checkpoint_seq), (1, 104));
        let mut torn = newer.encode();
        torn[100] ^= 0xff;
        let loaded = choose(&older.encode(), &torn).unwrap();
        assert_eq!(loaded.copy, 0);
        assert!(matches!(
            loaded.other_copy_error,
            Some(SuperblockError::BadCrc { .. })
        ));
        assert_eq!(
            choose(&[0; 4096], &[0; 4096]).unwrap_err(),
            SuperblockError::BadMagic
        );
    }

    #[test]
    fn decode_never_panics_on_short_or_random_input() {
        let mut rng = crate::rng::SplitMix64::new(1);
        for len in [0, 1, 8, 12, 100, 255, 256, 4096] {
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf);
            let _ = Superblock::decode(&buf);
            if len >= 8 {
                buf[..8].copy_from_slice(&SUPERBLOCK_MAGIC);
                let _ = Superblock::decode(&buf);
            }
        }
    }
}
