//! Self-describing 4 KiB block images and their classification.
//!
//! Every write of the checker stores one block image that names itself, so a reader can
//! tell from the bytes alone which write (if any) put them there. Layout (all integers
//! little-endian):
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! |      0 |    8 | magic `RPLCHK01`                                             |
//! |      8 |    8 | block number (offset / 4096) the write was meant for          |
//! |     16 |    8 | write id, unique within the run, starting at 1               |
//! |     24 |    8 | run id                                                       |
//! |     32 | 4060 | payload: a pseudo-random stream keyed by (run id, write id)  |
//! |   4092 |    4 | CRC32 (IEEE, `crc32fast`) of bytes 0..4092                   |
//!
//! A torn block (parts of two writes, or a write and old content) fails the CRC; a
//! block copied or misdirected to another offset names the wrong block number; stale
//! data from an earlier run names another run id. Never-written blocks are expected to
//! read as zeroes.

use bytes::Bytes;
use serde::Serialize;

/// Size of one checker block; every checker write is exactly one block, aligned.
pub const BLOCK_SIZE: usize = 4096;
/// [`BLOCK_SIZE`] as a `u64`, for offset arithmetic.
pub const BLOCK_BYTES: u64 = BLOCK_SIZE as u64;
/// First bytes of every block image.
pub const BLOCK_MAGIC: [u8; 8] = *b"RPLCHK01";

const HEADER_BYTES: usize = 32;
const CRC_OFFSET: usize = BLOCK_SIZE - 4;
const _: () = assert!(HEADER_BYTES < CRC_OFFSET);

/// What a block read back from a server holds, judged from its bytes alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "content", rename_all = "kebab-case")]
pub enum BlockContent {
    /// All zeroes: never written (the initial content the checker assumes).
    Zeroes,
    /// A valid image of this run, made for this block, by write `write_id`.
    Written { write_id: u64 },
    /// A valid image of this run, but made for another block (a misdirected write or a
    /// copy of another block).
    Misplaced { header_block: u64, write_id: u64 },
    /// A valid image, but of another run (stale data).
    OtherRun { run_id: u64, write_id: u64 },
    /// Not a valid image: corrupt, torn, or foreign data.
    Garbage { reason: GarbageReason },
}

/// Why a block is not a valid image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GarbageReason {
    /// The read returned a buffer of another size (never from a correct server).
    WrongSize,
    /// Neither zeroes nor the checker's magic.
    BadMagic,
    /// Magic present but the CRC does not match: torn or corrupted.
    BadCrc,
    /// Header and CRC are valid but the payload is not the one the write id implies.
    BadPayload,
}

impl std::fmt::Display for GarbageReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GarbageReason::WrongSize => "wrong size",
            GarbageReason::BadMagic => "not a checker block",
            GarbageReason::BadCrc => "CRC mismatch (torn or corrupt)",
            GarbageReason::BadPayload => "payload does not match its write id",
        })
    }
}

/// Fills `out` with the image that write `write_id` of run `run_id` stores in `block`.
pub fn encode_block(run_id: u64, block: u64, write_id: u64, out: &mut [u8; BLOCK_SIZE]) {
    out[0..8].copy_from_slice(&BLOCK_MAGIC);
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&write_id.to_le_bytes());
    out[24..32].copy_from_slice(&run_id.to_le_bytes());
    fill_payload(run_id, write_id, &mut out[HEADER_BYTES..CRC_OFFSET]);
    let crc = crc32fast::hash(&out[..CRC_OFFSET]);
    out[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
}

/// The image of [`encode_block`] as a `Bytes`, ready for [`crate::nbd_client::NbdClient::write`].
pub fn block_image(run_id: u64, block: u64, write_id: u64) -> Bytes {
    let mut image = Box::new([0u8; BLOCK_SIZE]);
    encode_block(run_id, block, write_id, &mut image);
    Bytes::from(image as Box<[u8]>)
}

/// Judges the bytes read from `block` against run `run_id`.
pub fn classify_block(data: &[u8], block: u64, run_id: u64) -> BlockContent {
    let garbage = |reason| BlockContent::Garbage { reason };
    if data.len() != BLOCK_SIZE {
        return garbage(GarbageReason::WrongSize);
    }
    if data.iter().all(|&byte| byte == 0) {
        return BlockContent::Zeroes;
    }
    if data[0..8] != BLOCK_MAGIC {
        return garbage(GarbageReason::BadMagic);
    }
    let stored_crc = u32::from_le_bytes(le_array(&data[CRC_OFFSET..]));
    if crc32fast::hash(&data[..CRC_OFFSET]) != stored_crc {
        return garbage(GarbageReason::BadCrc);
    }
    let header_block = u64::from_le_bytes(le_array(&data[8..16]));
    let write_id = u64::from_le_bytes(le_array(&data[16..24]));
    let header_run = u64::from_le_bytes(le_array(&data[24..32]));
    let mut expected = [0u8; CRC_OFFSET - HEADER_BYTES];
    fill_payload(header_run, write_id, &mut expected);
    if data[HEADER_BYTES..CRC_OFFSET] != expected {
        return garbage(GarbageReason::BadPayload);
    }
    if header_run != run_id {
        return BlockContent::OtherRun {
            run_id: header_run,
            write_id,
        };
    }
    if header_block != block {
        return BlockContent::Misplaced {
            header_block,
            write_id,
        };
    }
    BlockContent::Written { write_id }
}

fn le_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut array = [0u8; N];
    array.copy_from_slice(&bytes[..N]);
    array
}

/// The payload stream of one write: SplitMix64 keyed by run and write id.
fn fill_payload(run_id: u64, write_id: u64, out: &mut [u8]) {
    let mut state = Mix64::new(run_id ^ write_id.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    for chunk in out.chunks_mut(8) {
        let word = state.next_u64().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// SplitMix64, the checker's only source of pseudo-randomness (payloads, block choice).
#[derive(Debug, Clone)]
pub struct Mix64(u64);

impl Mix64 {
    pub fn new(seed: u64) -> Self {
        Mix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mixed = (self.0 ^ (self.0 >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(run: u64, block: u64, write: u64) -> [u8; BLOCK_SIZE] {
        let mut out = [0u8; BLOCK_SIZE];
        encode_block(run, block, write, &mut out);
        out
    }

    #[test]
    fn classifies_every_kind_of_content() {
        let run = 0xABCD;
        let cases: Vec<(&str, Vec<u8>, BlockContent)> = vec![
            ("zeroes", vec![0; BLOCK_SIZE], BlockContent::Zeroes),
            (
                "own write",
                image(run, 7, 3).to_vec(),
                BlockContent::Written { write_id: 3 },
            ),
            (
                "other block's image",
                image(run, 8, 4).to_vec(),
                BlockContent::Misplaced {
                    header_block: 8,
                    write_id: 4,
                },
            ),
            (
                "other run",
                image(run + 1, 7, 3).to_vec(),
                BlockContent::OtherRun {
                    run_id: run + 1,
                    write_id: 3,
                },
            ),
            (
                "random bytes",
                vec![0x5A; BLOCK_SIZE],
                BlockContent::Garbage {
                    reason: GarbageReason::BadMagic,
                },
            ),
            (
                "short read",
                vec![0; 512],
                BlockContent::Garbage {
                    reason: GarbageReason::WrongSize,
                },
            ),
        ];
        for (name, data, expected) in cases {
            assert_eq!(classify_block(&data, 7, run), expected, "{name}");
        }
    }

    #[test]
    fn torn_and_flipped_blocks_fail_the_crc() {
        let run = 1;
        let (old, new) = (image(run, 7, 1), image(run, 7, 2));
        let mut torn = old;
        torn[2048..].copy_from_slice(&new[2048..]);
        let mut flipped = new;
        flipped[100] ^= 1;
        for data in [torn, flipped] {
            assert_eq!(
                classify_block(&data, 7, run),
                BlockContent::Garbage {
                    reason: GarbageReason::BadCrc
                }
            );
        }
    }

    #[test]
    fn payload_is_checked_behind_a_valid_crc() {
        let run = 9;
        let mut forged = image(run, 7, 1);
        forged[16..24].copy_from_slice(&2u64.to_le_bytes());
        let crc = crc32fast::hash(&forged[..CRC_OFFSET]);
        forged[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            classify_block(&forged, 7, run),
            BlockContent::Garbage {
                reason: GarbageReason::BadPayload
            }
        );
    }

    #[test]
    fn payloads_differ_between_writes_and_runs() {
        let base = image(1, 0, 1);
        assert_ne!(
            base[HEADER_BYTES..CRC_OFFSET],
            image(1, 0, 2)[HEADER_BYTES..CRC_OFFSET]
        );
        assert_ne!(
            base[HEADER_BYTES..CRC_OFFSET],
            image(2, 0, 1)[HEADER_BYTES..CRC_OFFSET]
        );
        assert_eq!(block_image(1, 0, 1).as_ref(), &base[..]);
    }
}
