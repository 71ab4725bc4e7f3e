//! Where everything lives on a store: the data area and the metadata region.
//!
//! The metadata region is the last `meta_bytes` of the metadata store: the same
//! backend as the data (internal metadata, the default) or a separate file
//! (external metadata). From low to high offsets it holds the journal ring, the
//! checksum table, the out-of-sync bitmap and the two superblock copies, so the
//! superblocks always sit in the last 8 KiB where `open` can find them without
//! knowing anything else. Every area starts and ends on a 4 KiB boundary.

use crate::BLOCK_BYTES;

/// Size of one superblock copy.
pub const SUPERBLOCK_BYTES: u64 = 4096;
/// Bytes of one metadata page (checksum table and bitmap are read and written in pages).
pub const PAGE_BYTES: u64 = 4096;
/// Checksum entries (u32) per checksum-table page.
pub const CRCS_PER_PAGE: u64 = PAGE_BYTES / 4;
/// Bitmap bits per bitmap page.
pub const BITS_PER_PAGE: u64 = PAGE_BYTES * 8;
/// Smallest journal ring. Writes larger than a quarter of the ring are split into
/// several records, so any ring of at least this size can take any write.
pub const MIN_JOURNAL_BYTES: u64 = 256 << 10;
/// Largest data payload of one journal record (see `Geometry::max_record_data_bytes`).
pub const MAX_RECORD_DATA_BYTES: u64 = 1 << 20;
/// Largest data payload of one record in a journal of `journal_bytes` (see
/// [`Geometry::max_record_data_bytes`]).
pub fn max_record_data_bytes(journal_bytes: u64) -> u64 {
    (journal_bytes / 4).min(MAX_RECORD_DATA_BYTES) & !(BLOCK_BYTES - 1)
}
/// Smallest journal the daemon accepts: records of [`MAX_RECORD_DATA_BYTES`] always fit.
pub const MIN_DAEMON_JOURNAL_BYTES: u64 = 4 * MAX_RECORD_DATA_BYTES;
/// Default journal ring size.
pub const DEFAULT_JOURNAL_BYTES: u64 = 128 << 20;
/// Smallest data area worth creating.
pub const MIN_DATA_BYTES: u64 = 1 << 20;

const _: () = assert!(MIN_JOURNAL_BYTES / 4 >= 16 * BLOCK_BYTES);
const _: () = assert!(BLOCK_BYTES == PAGE_BYTES);

/// Offsets (in the metadata store) and sizes of every area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Exported size: data area `[0, data_bytes)` of the data store.
    pub data_bytes: u64,
    pub journal_offset: u64,
    pub journal_bytes: u64,
    pub checksum_offset: u64,
    pub checksum_bytes: u64,
    pub bitmap_offset: u64,
    pub bitmap_bytes: u64,
    /// Offsets of superblock copies A and B.
    pub superblock_offsets: [u64; 2],
    /// First byte of the metadata region in the metadata store.
    pub meta_offset: u64,
}

/// Why a store cannot hold a volume.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error(
        "store of {store_bytes} bytes is too small: metadata with a {journal_bytes}-byte journal \
         needs {needed_bytes} bytes plus at least {min_data} bytes of data"
    , min_data = MIN_DATA_BYTES)]
    TooSmall {
        store_bytes: u64,
        journal_bytes: u64,
        needed_bytes: u64,
    },
    #[error("journal size {0} must be a multiple of 4096 and at least {MIN_JOURNAL_BYTES} bytes")]
    BadJournalSize(u64),
}

/// Bytes the metadata region needs for `data_blocks` blocks and a journal of `journal_bytes`.
pub fn meta_bytes_for(data_blocks: u64, journal_bytes: u64) -> u64 {
    journal_bytes
        + checksum_bytes_for(data_blocks)
        + bitmap_bytes_for(data_blocks)
        + 2 * SUPERBLOCK_BYTES
}

pub fn checksum_bytes_for(data_blocks: u64) -> u64 {
    (data_blocks * 4).next_multiple_of(PAGE_BYTES)
}

pub fn bitmap_bytes_for(data_blocks: u64) -> u64 {
    data_blocks.div_ceil(8).next_multiple_of(PAGE_BYTES)
}

fn check_journal(journal_bytes: u64) -> Result<(), LayoutError> {
    if journal_bytes < MIN_JOURNAL_BYTES || journal_bytes % PAGE_BYTES != 0 {
        return Err(LayoutError::BadJournalSize(journal_bytes));
    }
    Ok(())
}

impl Geometry {
    /// Internal metadata: data and metadata share one store of `store_bytes`.
    pub fn internal(store_bytes: u64, journal_bytes: u64) -> Result<Geometry, LayoutError> {
        check_journal(journal_bytes)?;
        let store_bytes = store_bytes & !(PAGE_BYTES - 1);
        let fixed = journal_bytes + 2 * SUPERBLOCK_BYTES;
        let too_small = || LayoutError::TooSmall {
            store_bytes,
            journal_bytes,
            needed_bytes: meta_bytes_for(MIN_DATA_BYTES / BLOCK_BYTES, journal_bytes),
        };
        let available = store_bytes.checked_sub(fixed).ok_or_else(too_small)?;
        // Each data block costs 4096 bytes + 4 bytes of checksum + 1 bit of bitmap; start
        // from the estimate and step down until the page-rounded areas fit.
        let mut data_blocks = available * 8 / (BLOCK_BYTES * 8 + 32 + 1);
        while data_blocks > 0
            && data_blocks * BLOCK_BYTES + meta_bytes_for(data_blocks, journal_bytes) > store_bytes
        {
            data_blocks -= 1;
        }
        if data_blocks * BLOCK_BYTES < MIN_DATA_BYTES {
            return Err(too_small());
        }
        Ok(Geometry::place(data_blocks, journal_bytes, store_bytes))
    }

    /// External metadata: the whole data store is exported; the metadata store must
    /// hold at least [`meta_bytes_for`] bytes (its last bytes are used).
    pub fn external(
        data_store_bytes: u64,
        meta_store_bytes: u64,
        journal_bytes: u64,
    ) -> Result<Geometry, LayoutError> {
        check_journal(journal_bytes)?;
        let data_blocks = data_store_bytes / BLOCK_BYTES;
        let needed_bytes = meta_bytes_for(data_blocks, journal_bytes);
        if data_blocks * BLOCK_BYTES < MIN_DATA_BYTES || meta_store_bytes < needed_bytes {
            return Err(LayoutError::TooSmall {
                store_bytes: meta_store_bytes,
                journal_bytes,
                needed_bytes,
            });
        }
        Ok(Geometry::place(
            data_blocks,
            journal_bytes,
            meta_store_bytes & !(PAGE_BYTES - 1),
        ))
    }

    /// Lays the metadata areas out so that they end at `meta_end`.
    fn place(data_blocks: u64, journal_bytes: u64, meta_end: u64) -> Geometry {
        let superblock_b = meta_end - SUPERBLOCK_BYTES;
        let superblock_a = superblock_b - SUPERBLOCK_BYTES;
        let bitmap_bytes = bitmap_bytes_for(data_blocks);
        let bitmap_offset = superblock_a - bitmap_bytes;
        let checksum_bytes = checksum_bytes_for(data_blocks);
        let checksum_offset = bitmap_offset - checksum_bytes;
        let journal_offset = checksum_offset - journal_bytes;
        Geometry {
            data_bytes: data_blocks * BLOCK_BYTES,
            journal_offset,
            journal_bytes,
            checksum_offset,
            checksum_bytes,
            bitmap_offset,
            bitmap_bytes,
            superblock_offsets: [superblock_a, superblock_b],
            meta_offset: journal_offset,
        }
    }

    /// Largest data payload of one journal record: a quarter of the ring, at most
    /// [`MAX_RECORD_DATA_BYTES`], whole blocks. Larger writes become several records.
    /// With journals of at least 4 MiB (what the daemon requires) this is the same
    /// on every node, so a peer can always place the records it receives.
    pub fn max_record_data_bytes(&self) -> u64 {
        max_record_data_bytes(self.journal_bytes)
    }

    pub fn data_blocks(&self) -> u64 {
        self.data_bytes / BLOCK_BYTES
    }

    /// Superblock offsets for a metadata store of `meta_store_bytes` (before the geometry is known).
    pub fn superblock_offsets_for(meta_store_bytes: u64) -> Option<[u64; 2]> {
        let end = meta_store_bytes & !(PAGE_BYTES - 1);
        let b = end.checked_sub(SUPERBLOCK_BYTES)?;
        let a = b.checked_sub(SUPERBLOCK_BYTES)?;
        Some([a, b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_layout_fits_and_is_aligned() {
        for store in [
            64u64 << 20,
            (64 << 20) + 12345,
            1 << 30,
            3 << 30,
            (1 << 40) + 4096,
        ] {
            let g = Geometry::internal(store, MIN_JOURNAL_BYTES).unwrap();
            assert!(g.data_bytes <= g.journal_offset, "data overlaps metadata");
            assert_eq!(g.superblock_offsets[1] + SUPERBLOCK_BYTES, store & !4095);
            for offset in [
                g.journal_offset,
                g.checksum_offset,
                g.bitmap_offset,
                g.data_bytes,
            ] {
                assert_eq!(offset % 4096, 0);
            }
            assert!(g.checksum_bytes >= g.data_blocks() * 4);
            assert!(g.bitmap_bytes * 8 >= g.data_blocks());
            // Tight: one more data block would not fit.
            let more = g.data_blocks() + 1;
            assert!(more * 4096 + meta_bytes_for(more, MIN_JOURNAL_BYTES) > store & !4095);
        }
    }

    #[test]
    fn too_small_stores_and_bad_journals_are_refused() {
        assert!(matches!(
            Geometry::internal(1 << 20, MIN_JOURNAL_BYTES),
            Err(LayoutError::TooSmall { .. })
        ));
        assert!(matches!(
            Geometry::internal(0, MIN_JOURNAL_BYTES),
            Err(LayoutError::TooSmall { .. })
        ));
        assert!(matches!(
            Geometry::internal(1 << 30, 4096),
            Err(LayoutError::BadJournalSize(_))
        ));
        assert!(matches!(
            Geometry::internal(1 << 30, MIN_JOURNAL_BYTES + 1),
            Err(LayoutError::BadJournalSize(_))
        ));
        assert!(matches!(
            Geometry::external(1 << 30, 4096, MIN_JOURNAL_BYTES),
            Err(LayoutError::TooSmall { .. })
        ));
    }

    #[test]
    fn external_layout_exports_the_whole_data_store() {
        let meta = meta_bytes_for((1u64 << 30) / 4096, MIN_JOURNAL_BYTES);
        let g = Geometry::external(1 << 30, meta, MIN_JOURNAL_BYTES).unwrap();
        assert_eq!(g.data_bytes, 1 << 30);
        assert_eq!(g.meta_offset, 0);
    }
}
