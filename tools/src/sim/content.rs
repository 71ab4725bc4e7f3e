//! Self-describing block contents of the simulator's clients: every block a client
//! writes names the write and the block, so whatever a node holds can be traced to
//! the write that put it there (or found to be garbage).

use bytes::Bytes;
use engine::BLOCK_BYTES;

const MAGIC: &[u8; 8] = b"RSIMBLK1";

/// The 4 KiB written to `block` by write `write_id`.
pub fn stamp(write_id: u64, block: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK_BYTES as usize];
    data[..8].copy_from_slice(MAGIC);
    data[8..16].copy_from_slice(&write_id.to_le_bytes());
    data[16..24].copy_from_slice(&block.to_le_bytes());
    let mut fill = engine::rng::SplitMix64::new(write_id.rotate_left(17) ^ block);
    fill.fill(&mut data[28..]);
    let crc = crc32fast::hash(&data[28..]) ^ crc32fast::hash(&data[..24]);
    data[24..28].copy_from_slice(&crc.to_le_bytes());
    data
}

/// The data of a write of `blocks` blocks from `first_block`.
pub fn write_data(write_id: u64, first_block: u64, blocks: u64) -> Bytes {
    let mut data = Vec::with_capacity((blocks * BLOCK_BYTES) as usize);
    for block in first_block..first_block + blocks {
        data.extend_from_slice(&stamp(write_id, block));
    }
    Bytes::from(data)
}

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Never written (or zeroed).
    Zero,
    /// The block of this write.
    Write(u64),
    /// Neither: torn, misplaced or corrupt.
    Garbage,
}

impl Content {
    /// The write id, 0 for a zero block (ids start at 1).
    pub fn id(self) -> Option<u64> {
        match self {
            Content::Zero => Some(0),
            Content::Write(id) => Some(id),
            Content::Garbage => None,
        }
    }
}

/// Decodes a 4 KiB block read from `block`.
pub fn decode(block: u64, data: &[u8]) -> Content {
    if data.iter().all(|&b| b == 0) {
        return Content::Zero;
    }
    if data.len() != BLOCK_BYTES as usize || &data[..8] != MAGIC {
        return Content::Garbage;
    }
    let id = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
    let at = u64::from_le_bytes(data[16..24].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(data[24..28].try_into().unwrap_or_default());
    if at != block || crc != crc32fast::hash(&data[28..]) ^ crc32fast::hash(&data[..24]) {
        return Content::Garbage;
    }
    Content::Write(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_decode_to_their_write_and_nothing_else() {
        let data = stamp(42, 7);
        assert_eq!(decode(7, &data), Content::Write(42));
        assert_eq!(decode(8, &data), Content::Garbage, "a misplaced block");
        let mut torn = data.clone();
        torn[2000] ^= 1;
        assert_eq!(decode(7, &torn), Content::Garbage);
        assert_eq!(decode(3, &[0u8; 4096]), Content::Zero);
    }
}
