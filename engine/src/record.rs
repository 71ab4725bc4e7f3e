//! Journal records: the unit that is journaled, shipped to the peer and applied.
//!
//! A record is a header (64 fixed bytes, then one CRC32 per data block, padded to a
//! multiple of 64) followed by the data. Offsets and lengths are whole 4 KiB blocks.
//! TRIM and WRITE_ZEROES records carry no data. PAD records fill the ring to a 4 KiB
//! boundary after each group commit and to the ring's end before a wrap; a PAD carries
//! the sequence number of the record before it, so stale PADs from an older lap are
//! rejected like stale records. The encoding is identical in the journal and on the
//! wire (the replication stream ships these bytes unchanged). Byte table:
//! `docs/FORMAT.md`.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{BLOCK_BYTES, MAX_IO_BYTES};

pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"RJR1");
/// Fixed part of a record header.
pub const RECORD_FIXED_BYTES: usize = 64;
/// Records start and end on this granularity in the journal ring.
pub const RECORD_ALIGN: u64 = 64;
/// Most blocks one record can carry.
pub const MAX_RECORD_BLOCKS: u64 = MAX_IO_BYTES / BLOCK_BYTES;

/// Record flags.
pub mod flags {
    /// Forced unit access: durable on both nodes before the write is acknowledged.
    pub const FUA: u16 = 1;
    /// Discard: the blocks read back as zeroes afterwards (we never leave them undefined).
    pub const TRIM: u16 = 2;
    /// Write zeroes.
    pub const ZEROES: u16 = 4;
    /// Filler up to a 4 KiB boundary or the ring's end; not a write.
    pub const PAD: u16 = 8;
    pub const ALL: u16 = FUA | TRIM | ZEROES | PAD;
}

/// A decoded record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub seq: u64,
    pub offset_bytes: u64,
    /// Bytes covered on the volume (for PAD: total size of the pad record).
    pub length_bytes: u64,
    pub flags: u16,
    /// One CRC32 per data block (empty for TRIM/ZEROES/PAD).
    pub block_crcs: Vec<u32>,
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("bad record magic {0:#010x}")]
    BadMagic(u32),
    #[error("record header checksum mismatch")]
    BadHeaderCrc,
    #[error("record field {field} invalid: {value}")]
    BadField { field: &'static str, value: u64 },
    #[error("data block {index} of record {seq} fails its checksum")]
    BadDataCrc { seq: u64, index: usize },
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}
fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}
fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Header length for a record with `blocks` CRCs.
pub fn header_bytes_for(blocks: usize) -> usize {
    (RECORD_FIXED_BYTES + 4 * blocks).next_multiple_of(RECORD_ALIGN as usize)
}

impl RecordHeader {
    pub fn is_pad(&self) -> bool {
        self.flags & flags::PAD != 0
    }

    /// Bytes of data following the header.
    pub fn data_bytes(&self) -> u64 {
        if self.flags & (flags::TRIM | flags::ZEROES | flags::PAD) != 0 {
            0
        } else {
            self.length_bytes
        }
    }

    pub fn header_bytes(&self) -> usize {
        header_bytes_for(self.block_crcs.len())
    }

    /// Total bytes of the record in the ring (header + data).
    pub fn total_bytes(&self) -> u64 {
        if self.is_pad() {
            self.length_bytes
        } else {
            self.header_bytes() as u64 + self.data_bytes()
        }
    }

    pub fn first_block(&self) -> u64 {
        self.offset_bytes / BLOCK_BYTES
    }

    pub fn block_count(&self) -> u64 {
        self.length_bytes / BLOCK_BYTES
    }

    /// Encodes the header (with its CRC).
    pub fn encode(&self) -> Bytes {
        let header_bytes = self.header_bytes();
        let mut buf = BytesMut::with_capacity(header_bytes);
        buf.put_u32_le(RECORD_MAGIC);
        buf.put_u32_le(0); // CRC, filled below
        buf.put_u64_le(self.seq);
        buf.put_u64_le(self.offset_bytes);
        buf.put_u64_le(self.length_bytes);
        buf.put_u16_le(self.flags);
        buf.put_u16_le(0);
        buf.put_u32_le(self.block_crcs.len() as u32);
        buf.put_u32_le(header_bytes as u32);
        buf.put_bytes(0, RECORD_FIXED_BYTES - buf.len());
        for crc in &self.block_crcs {
            buf.put_u32_le(*crc);
        }
        buf.put_bytes(0, header_bytes - buf.len());
        let crc = crc32fast::hash(&buf[8..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        buf.freeze()
    }

    /// A PAD record of `total_bytes` (≥ 64, multiple of 64) following record `seq`.
    pub fn pad(seq: u64, total_bytes: u64) -> RecordHeader {
        RecordHeader {
            seq,
            offset_bytes: 0,
            length_bytes: total_bytes,
            flags: flags::PAD,
            block_crcs: Vec::new(),
        }
    }

    /// Decodes a header from the start of `buf`. Checks magic, CRC and field sanity;
    /// does not look at the data. Never panics on any input.
    pub fn decode(buf: &[u8]) -> Result<RecordHeader, RecordError> {
        if buf.len() < RECORD_FIXED_BYTES {
            return Err(RecordError::Truncated {
                needed: RECORD_FIXED_BYTES,
                available: buf.len(),
            });
        }
        let magic = read_u32(buf, 0);
        if magic != RECORD_MAGIC {
            return Err(RecordError::BadMagic(magic));
        }
        let block_count = u64::from(read_u32(buf, 36));
        if block_count > MAX_RECORD_BLOCKS {
            return Err(RecordError::BadField {
                field: "block_count",
                value: block_count,
            });
        }
        let header_bytes = header_bytes_for(block_count as usize);
        if u64::from(read_u32(buf, 40)) != header_bytes as u64 {
            return Err(RecordError::BadField {
                field: "header_bytes",
                value: u64::from(read_u32(buf, 40)),
            });
        }
        if buf.len() < header_bytes {
            return Err(RecordError::Truncated {
                needed: header_bytes,
                available: buf.len(),
            });
        }
        if read_u32(buf, 4) != crc32fast::hash(&buf[8..header_bytes]) {
            return Err(RecordError::BadHeaderCrc);
        }
        let header = RecordHeader {
            seq: read_u64(buf, 8),
            offset_bytes: read_u64(buf, 16),
            length_bytes: read_u64(buf, 24),
            flags: read_u16(buf, 32),
            block_crcs: (0..block_count as usize)
                .map(|i| read_u32(buf, RECORD_FIXED_BYTES + 4 * i))
                .collect(),
        };
        header.validate()?;
        Ok(header)
    }

    fn validate(&self) -> Result<(), RecordError> {
        let bad = |field, value| Err(RecordError::BadField { field, value });
        if self.flags & !flags::ALL != 0 {
            return bad("flags", u64::from(self.flags));
        }
        if self.is_pad() {
            if self.length_bytes < RECORD_ALIGN
                || self.length_bytes % RECORD_ALIGN != 0
                || !self.block_crcs.is_empty()
            {
                return bad("pad_length", self.length_bytes);
            }
            return Ok(());
        }
        if self.offset_bytes % BLOCK_BYTES != 0 {
            return bad("offset_bytes", self.offset_bytes);
        }
        if self.length_bytes == 0
            || self.length_bytes % BLOCK_BYTES != 0
            || self.length_bytes > MAX_IO_BYTES
        {
            return bad("length_bytes", self.length_bytes);
        }
        if self.offset_bytes.checked_add(self.length_bytes).is_none() {
            return bad("offset_bytes", self.offset_bytes);
        }
        let expected_crcs = if self.data_bytes() == 0 {
            0
        } else {
            self.block_count()
        };
        if self.block_crcs.len() as u64 != expected_crcs {
            return bad("block_count", self.block_crcs.len() as u64);
        }
        Ok(())
    }

    /// Checks `data` against the per-block CRCs.
    pub fn check_data(&self, data: &[u8]) -> Result<(), RecordError> {
        if data.len() as u64 != self.data_bytes() {
            return Err(RecordError::Truncated {
                needed: self.data_bytes() as usize,
                available: data.len(),
            });
        }
        for (index, (block, crc)) in data
            .chunks(BLOCK_BYTES as usize)
            .zip(&self.block_crcs)
            .enumerate()
        {
            if crate::checksum::block_crc(block) != *crc {
                return Err(RecordError::BadDataCrc {
                    seq: self.seq,
                    index,
                });
            }
        }
        Ok(())
    }
}

/// A complete record: header plus data, as journaled and shipped.
#[derive(Debug, Clone)]
pub struct Record {
    pub header: RecordHeader,
    /// The encoded header (exactly what goes to the journal and the wire).
    pub encoded_header: Bytes,
    pub data: Bytes,
}

impl Record {
    /// Builds a data record; `data` must be whole blocks (CRCs are computed here).
    pub fn write(seq: u64, offset_bytes: u64, data: Bytes, fua: bool) -> Record {
        debug_assert!(offset_bytes % BLOCK_BYTES == 0 && data.len() as u64 % BLOCK_BYTES == 0);
        let block_crcs = data
            .chunks(BLOCK_BYTES as usize)
            .map(crate::checksum::block_crc)
            .collect();
        Record::with_crcs(
            seq,
            offset_bytes,
            data,
            if fua { flags::FUA } else { 0 },
            block_crcs,
        )
    }

    /// Builds a data record whose block CRCs are already known.
    pub fn with_crcs(
        seq: u64,
        offset_bytes: u64,
        data: Bytes,
        flags: u16,
        block_crcs: Vec<u32>,
    ) -> Record {
        let header = RecordHeader {
            seq,
            offset_bytes,
            length_bytes: data.len() as u64,
            flags,
            block_crcs,
        };
        Record {
            encoded_header: header.encode(),
            header,
            data,
        }
    }

    /// Builds a TRIM or WRITE_ZEROES record (`kind` is [`flags::TRIM`] or [`flags::ZEROES`]).
    pub fn zeroes(seq: u64, offset_bytes: u64, length_bytes: u64, kind: u16, fua: bool) -> Record {
        let header = RecordHeader {
            seq,
            offset_bytes,
            length_bytes,
            flags: kind | if fua { flags::FUA } else { 0 },
            block_crcs: Vec::new(),
        };
        Record {
            encoded_header: header.encode(),
            header,
            data: Bytes::new(),
        }
    }

    /// Parses a record received as one buffer (header then data), checking every CRC.
    pub fn parse(buf: Bytes) -> Result<Record, RecordError> {
        let header = RecordHeader::decode(&buf)?;
        if header.is_pad() {
            return Err(RecordError::BadField {
                field: "flags",
                value: u64::from(header.flags),
            });
        }
        let header_bytes = header.header_bytes();
        let total = header_bytes as u64 + header.data_bytes();
        if buf.len() as u64 != total {
            return Err(RecordError::Truncated {
                needed: total as usize,
                available: buf.len(),
            });
        }
        let data = buf.slice(header_bytes..);
        header.check_data(&data)?;
        Ok(Record {
            encoded_header: buf.slice(..header_bytes),
            header,
            data,
        })
    }

    pub fn total_bytes(&self) -> u64 {
        self.encoded_header.len() as u64 + self.data.len() as u64
    }

    pub fn is_fua(&self) -> bool {
        self.header.flags & flags::FUA != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_record_round_trips_and_checks_data() {
        let data = Bytes::from(vec![7u8; 8192]);
        let record = Record::write(42, 4096 * 10, data.clone(), true);
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&record.encoded_header);
        wire.extend_from_slice(&data);
        let parsed = Record::parse(wire.clone().freeze()).unwrap();
        assert_eq!(parsed.header, record.header);
        assert!(parsed.is_fua());
        let mut corrupt = wire.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert!(matches!(
            Record::parse(corrupt.freeze()),
            Err(RecordError::BadDataCrc { index: 1, .. })
        ));
        assert!(matches!(
            Record::parse(wire.freeze().slice(..100)),
            Err(RecordError::Truncated { .. })
        ));
    }

    #[test]
    fn every_header_bit_flip_is_rejected() {
        let record = Record::write(1, 0, Bytes::from(vec![1u8; 4096]), false);
        for bit in 0..record.encoded_header.len() * 8 {
            let mut corrupt = record.encoded_header.to_vec();
            corrupt[bit / 8] ^= 1 << (bit % 8);
            assert!(RecordHeader::decode(&corrupt).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn zero_records_and_pads_carry_no_data() {
        let trim = Record::zeroes(5, 0, 1 << 20, flags::TRIM, false);
        assert_eq!(trim.header.data_bytes(), 0);
        assert_eq!(trim.total_bytes(), 64);
        let pad = RecordHeader::pad(5, 4096 - 64);
        let decoded = RecordHeader::decode(&pad.encode()).unwrap();
        assert!(decoded.is_pad());
        assert_eq!(decoded.total_bytes(), 4096 - 64);
    }

    #[test]
    fn decode_never_panics() {
        let mut rng = crate::rng::SplitMix64::new(3);
        for len in 0..300 {
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf);
            if len >= 4 {
                buf[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
            }
            let _ = RecordHeader::decode(&buf);
            let _ = Record::parse(Bytes::from(buf));
        }
    }
}
