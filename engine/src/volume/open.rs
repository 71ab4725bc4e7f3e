//! `create` (write fresh metadata), `open` (validate, recover, start the threads —
//! none in manual mode).
//!
//! Recovery scans the journal from the checkpoint: each record must have a valid
//! header CRC, a sequence number above the previous one (a PAD: equal to it), fit in
//! the ring, and carry data matching its block CRCs. The first record that fails
//! ends the scan — a torn tail is discarded, never half-applied. Valid records are
//! written in place with their checksums, then a checkpoint makes the result durable
//! before the volume takes new I/O. The sequence then jumps past anything the ring
//! could still hold, so stale records beyond the torn tail can never look newer than
//! what is written next.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;

use super::{Background, Shared, State, Volume, VolumeOptions};
use crate::backend::{Backend, BackendError};
use crate::bitmap::Bitmap;
use crate::checksum::{block_crc, encode_page, zero_block_crc, ChecksumTable};
use crate::error::EngineError;
use crate::gen::GenerationIds;
use crate::layout::{Geometry, CRCS_PER_PAGE, PAGE_BYTES};
use crate::record::{RecordError, RecordHeader, RECORD_FIXED_BYTES};
use crate::superblock::{self, LoadedSuperblock, StoredDiskState, Superblock};
use crate::BLOCK_BYTES;

/// Where the metadata lives.
#[derive(Debug, Clone)]
pub enum MetaStore {
    /// At the end of the data store (the default).
    Internal,
    /// At the end of the data store, reached through a second handle on the same
    /// file or device (typically: data through O_DIRECT io_uring, metadata and
    /// journal through the page cache).
    InternalHandle(Arc<dyn Backend>),
    /// In a separate store (file or device) of its own.
    External(Arc<dyn Backend>),
}

impl MetaStore {
    fn backend(&self, data: &Arc<dyn Backend>) -> Arc<dyn Backend> {
        match self {
            MetaStore::Internal => data.clone(),
            MetaStore::InternalHandle(meta) | MetaStore::External(meta) => meta.clone(),
        }
    }

    fn geometry(&self, data: &dyn Backend, journal_bytes: u64) -> Result<Geometry, EngineError> {
        Ok(match self {
            MetaStore::Internal | MetaStore::InternalHandle(_) => {
                Geometry::internal(data.size_bytes(), journal_bytes)?
            }
            MetaStore::External(meta) => {
                Geometry::external(data.size_bytes(), meta.size_bytes(), journal_bytes)?
            }
        })
    }
}

/// Parameters of `create-md`.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub resource_uuid: [u8; 16],
    pub node_id: u32,
    pub node_name: String,
    pub journal_bytes: u64,
    /// Overwrite existing metadata.
    pub force: bool,
    /// The data area is known to be all zeroes: skip reading it for checksums.
    pub assume_zeroed: bool,
}

/// What `open` found and did.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// The store was closed cleanly last time.
    pub was_clean: bool,
    /// It was Primary when it stopped (a crash then means "crashed primary").
    pub was_primary: bool,
    pub records_replayed: u64,
    pub bytes_replayed: u64,
    /// Why the journal scan stopped (`end of journal` on a clean store).
    pub scan_stop: String,
    /// Superblock copy used (0 = A, 1 = B) and why the other was not, if invalid.
    pub superblock_copy: usize,
    pub other_copy_error: Option<String>,
}

fn read_superblocks(meta: &dyn Backend) -> Result<LoadedSuperblock, EngineError> {
    let offsets =
        Geometry::superblock_offsets_for(meta.size_bytes()).ok_or(EngineError::NoMetadata)?;
    let mut copy_a = vec![0u8; PAGE_BYTES as usize];
    let mut copy_b = vec![0u8; PAGE_BYTES as usize];
    meta.read_at(offsets[0], &mut copy_a)?;
    meta.read_at(offsets[1], &mut copy_b)?;
    match superblock::choose(&copy_a, &copy_b) {
        Ok(loaded) => Ok(loaded),
        Err(superblock::SuperblockError::BadMagic) => Err(EngineError::NoMetadata),
        Err(error) => Err(EngineError::BadMetadata(error)),
    }
}

/// Reads the newest valid superblock without opening the volume (`replctl dump-md`).
pub fn read_superblock(
    data: &Arc<dyn Backend>,
    meta: &MetaStore,
) -> Result<LoadedSuperblock, EngineError> {
    read_superblocks(meta.backend(data).as_ref())
}

/// A resource UUID derived from its name (both nodes agree without coordination);
/// the config may set one explicitly instead.
pub fn uuid_from_name(name: &str) -> [u8; 16] {
    let mut uuid = [0u8; 16];
    let mut hasher = crc32fast::Hasher::new();
    for (index, chunk) in uuid.chunks_mut(4).enumerate() {
        hasher.update(&[index as u8]);
        hasher.update(name.as_bytes());
        chunk.copy_from_slice(&hasher.clone().finalize().to_le_bytes());
    }
    uuid
}

/// Formats a UUID as 32 hex digits in 8-4-4-4-12 groups.
pub fn format_uuid(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

impl Volume {
    /// Writes fresh metadata (`create-md`): zeroes the journal, computes the checksum
    /// table (reading the data area unless `assume_zeroed`), an empty bitmap and both
    /// superblock copies. Refuses a store that already has metadata unless `force`.
    /// `progress(done_bytes, total_bytes)` is called while reading the data area.
    pub fn create(
        data: &Arc<dyn Backend>,
        meta: &MetaStore,
        options: &CreateOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Superblock, EngineError> {
        let geometry = meta.geometry(data.as_ref(), options.journal_bytes)?;
        let meta_backend = meta.backend(data);
        if !options.force {
            for offset in geometry.superblock_offsets {
                let mut copy = vec![0u8; PAGE_BYTES as usize];
                meta_backend.read_at(offset, &mut copy)?;
                if copy[..8] == superblock::SUPERBLOCK_MAGIC {
                    return Err(EngineError::MetadataExists);
                }
            }
        }
        // Real zeroes, not a ZERO_RANGE hole: journal commits then overwrite allocated
        // blocks (writes into unwritten extents cost an extent conversion each time).
        crate::backend::write_zeroes_by_writing(
            meta_backend.as_ref(),
            geometry.journal_offset,
            geometry.journal_bytes,
        )?;
        // The table and the bitmap start as zero bytes: a zero table page describes
        // zero blocks (`checksum::encode_entry`), a zero bitmap page is in sync. A
        // file gets them as one ZERO_RANGE each, whatever the volume's size.
        meta_backend.write_zeroes(geometry.checksum_offset, geometry.checksum_bytes)?;
        meta_backend.write_zeroes(geometry.bitmap_offset, geometry.bitmap_bytes)?;
        if !options.assume_zeroed {
            // One table page per 4 MiB of data: read, checksum, write, page by page.
            const CHUNK: u64 = CRCS_PER_PAGE * BLOCK_BYTES;
            let mut buf = vec![0u8; CHUNK as usize];
            let mut crcs = Vec::with_capacity(CRCS_PER_PAGE as usize);
            let mut offset = 0;
            while offset < geometry.data_bytes {
                let length = CHUNK.min(geometry.data_bytes - offset);
                data.read_at(offset, &mut buf[..length as usize])?;
                crcs.clear();
                crcs.extend(
                    buf[..length as usize]
                        .chunks(BLOCK_BYTES as usize)
                        .map(block_crc),
                );
                if crcs.iter().any(|&crc| crc != zero_block_crc()) {
                    meta_backend.write_at(
                        geometry.checksum_offset + offset / CHUNK * PAGE_BYTES,
                        &encode_page(&crcs),
                    )?;
                }
                offset += length;
                progress(offset, geometry.data_bytes);
            }
        }
        let created_unix_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut superblock = Superblock {
            sequence: 1,
            resource_uuid: options.resource_uuid,
            node_id: options.node_id,
            node_name: options.node_name.clone(),
            geometry,
            generations: GenerationIds::just_created(),
            checkpoint_seq: 0,
            checkpoint_pos: 0,
            flags: superblock::flags::CLEAN,
            disk_state: StoredDiskState::Inconsistent,
            created_unix_secs,
        };
        data.flush()?;
        meta_backend.write_at(geometry.superblock_offsets[0], &superblock.encode())?;
        superblock.sequence = 2;
        meta_backend.write_at(geometry.superblock_offsets[1], &superblock.encode())?;
        meta_backend.flush()?;
        Ok(superblock)
    }

    /// Opens a store: validates identity and geometry, recovers from the journal,
    /// checkpoints, and starts the engine threads (none with [`Background::Manual`]).
    /// `expected_uuid`, when given, must match the store's resource UUID.
    pub fn open(
        data: Arc<dyn Backend>,
        meta: MetaStore,
        expected_uuid: Option<[u8; 16]>,
        options: VolumeOptions,
    ) -> Result<(Volume, OpenReport), EngineError> {
        let meta_backend = meta.backend(&data);
        let loaded = read_superblocks(meta_backend.as_ref())?;
        let mut superblock = loaded.superblock;
        if let Some(expected) = expected_uuid {
            if expected != superblock.resource_uuid {
                return Err(EngineError::WrongResource {
                    expected: format_uuid(&expected),
                    found: format_uuid(&superblock.resource_uuid),
                });
            }
        }
        let geometry = meta.geometry(data.as_ref(), superblock.geometry.journal_bytes)?;
        let recorded = superblock.geometry;
        for (field, recorded, actual) in [
            ("data_bytes", recorded.data_bytes, geometry.data_bytes),
            (
                "journal_offset",
                recorded.journal_offset,
                geometry.journal_offset,
            ),
            (
                "checksum_offset",
                recorded.checksum_offset,
                geometry.checksum_offset,
            ),
            (
                "checksum_bytes",
                recorded.checksum_bytes,
                geometry.checksum_bytes,
            ),
            (
                "bitmap_offset",
                recorded.bitmap_offset,
                geometry.bitmap_offset,
            ),
            ("bitmap_bytes", recorded.bitmap_bytes, geometry.bitmap_bytes),
        ] {
            if recorded != actual {
                return Err(EngineError::GeometryMismatch {
                    field,
                    recorded,
                    actual,
                });
            }
        }
        superblock.geometry = geometry;
        let blocks = geometry.data_blocks();
        let checksums = ChecksumTable::new(
            meta_backend.clone(),
            geometry.checksum_offset,
            blocks,
            options.checksum_cache_bytes,
        );
        let mut bitmap = load_bitmap(meta_backend.as_ref(), &geometry)?;

        let mut report = OpenReport {
            was_clean: superblock.flags & superblock::flags::CLEAN != 0,
            was_primary: superblock.flags & superblock::flags::PRIMARY != 0,
            superblock_copy: loaded.copy,
            other_copy_error: loaded.other_copy_error.map(|e| e.to_string()),
            ..OpenReport::default()
        };
        let mut snapshots = match &options.snapshots {
            Some(area) => Some(
                crate::snapshot::Snapshots::open(area.clone(), blocks)
                    .map_err(|error| EngineError::Snapshots(error.to_string()))?,
            ),
            None => None,
        };
        let scan = replay(
            &data,
            meta_backend.as_ref(),
            &geometry,
            &superblock,
            &checksums,
            ReplayMarks {
                bitmap: &mut bitmap,
                mark_out_of_sync: options.mark_replayed_out_of_sync,
                snapshots: snapshots.as_mut(),
            },
        )?;
        report.records_replayed = scan.records;
        report.bytes_replayed = scan.bytes;
        report.scan_stop = scan.stop_reason;
        if scan.records > 0 {
            tracing::info!(
                "journal recovery replayed {} records ({} bytes) after checkpoint {}; stopped: {}",
                scan.records,
                scan.bytes,
                superblock.checkpoint_seq,
                report.scan_stop
            );
        }

        // Make the recovered state durable, then mark the store open (not clean).
        data.flush()?;
        let table_pages = checksums.write_dirty()?;
        bitmap
            .take_dirty()
            .write_runs(super::BITMAP_WRITE_PAGES, |page, bytes| {
                meta_backend.write_at(geometry.bitmap_offset + page * PAGE_BYTES, bytes)
            })
            .map_err(|(_, error)| error)?;
        // The next group commit must start on a fresh page: pad the rest of the page
        // after the last valid record (rewriting that page with the bytes it holds).
        let ring_bytes = geometry.journal_bytes;
        let head = pad_to_page(
            meta_backend.as_ref(),
            &geometry,
            scan.end_pos,
            scan.last_seq,
        )?;
        // Every record still in the ring (even past a torn one) must be older than what
        // comes next, so recovery can always tell stale records by their sequence.
        let highest_in_ring = highest_seq_in_ring(meta_backend.as_ref(), &geometry)?;
        meta_backend.flush()?;
        checksums.written_durable(&table_pages);
        superblock.checkpoint_seq = scan.last_seq;
        superblock.checkpoint_pos = scan.end_pos;
        superblock.flags &= !superblock::flags::CLEAN;
        superblock.sequence += 1;
        meta_backend.write_at(
            geometry.superblock_offsets[superblock.next_copy()],
            &superblock.encode(),
        )?;
        meta_backend.flush()?;

        // A snapshot whose point lies beyond the recovered journal (made just before a
        // crash that lost unflushed records) must never see a later record under a
        // number it counts as its own.
        let newest_point = snapshots
            .as_ref()
            .and_then(|snaps| snaps.points().into_iter().max())
            .unwrap_or(0);
        let next_seq = scan.last_seq.max(highest_in_ring).max(newest_point) + 1;
        let state = State {
            superblock,
            next_seq,
            last_sequenced: scan.last_seq,
            last_placed_seq: scan.last_seq,
            ring_head: head,
            ring_tail: scan.end_pos,
            ring_used: (head + ring_bytes - scan.end_pos) % ring_bytes,
            pending: VecDeque::new(),
            pending_bytes: 0,
            apply_queue: VecDeque::new(),
            written_seq: scan.last_seq,
            durable_seq: scan.last_seq,
            applied_seq: scan.last_seq,
            applied_positions: VecDeque::new(),
            overlay: HashMap::new(),
            flush_waiters: Vec::new(),
            flush_requested: 0,
            checkpoint_requested: false,
            // Manual mode keeps no clock (`applier::checkpoint_due`).
            last_checkpoint: (options.background == Background::Threads).then(Instant::now),
            failed: None,
            closing: false,
            bitmap,
            peer_attached: false,
            unacked: VecDeque::new(),
            resync_written: None,
            writer_idle: false,
            applier_idle: false,
            applying: false,
            progress_waiters: 0,
            committing: false,
            resync_queued_bytes: 0,
            snapshot_points: snapshots
                .as_ref()
                .map(crate::snapshot::Snapshots::points)
                .unwrap_or_default(),
            taken_seq: scan.last_seq,
            apply_holds: Vec::new(),
        };
        let reader_threads = options.reader_threads.max(1);
        let shared = Arc::new(Shared {
            data,
            meta: meta_backend,
            geometry,
            checksums,
            options,
            state: Mutex::new(state),
            writer_wake: Condvar::new(),
            applier_wake: Condvar::new(),
            progress: Condvar::new(),
            apply_lock: RwLock::new(()),
            superblock_lock: Mutex::new(()),
            bitmap_io: Mutex::new(()),
            reads: Mutex::new(super::ReadQueue::default()),
            reads_wake: Condvar::new(),
            applier_turn: Mutex::new(()),
            stats: Default::default(),
            failed_flag: std::sync::atomic::AtomicBool::new(false),
            snapshots: snapshots.map(Mutex::new),
        });
        let mut threads = Vec::new();
        if !shared.manual() {
            let spawn = |name: String, body: fn(Arc<Shared>), shared: Arc<Shared>| {
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || body(shared))
                    .map_err(|source| {
                        EngineError::Backend(BackendError::Open {
                            path: "engine thread".into(),
                            source,
                        })
                    })
            };
            threads.push(spawn(
                "journal".into(),
                super::journal::run,
                shared.clone(),
            )?);
            threads.push(spawn(
                "applier".into(),
                super::applier::run,
                shared.clone(),
            )?);
            for index in 0..reader_threads {
                threads.push(spawn(
                    format!("reader-{index}"),
                    super::read::run,
                    shared.clone(),
                )?);
            }
        }
        Ok((
            Volume {
                shared,
                threads: Arc::new(Mutex::new(threads)),
            },
            report,
        ))
    }
}

/// Reads the out-of-sync bitmap a few MiB at a time, keeping only pages with bits set
/// (memory follows what is out of sync, not the volume's size). Chunks that are holes
/// of an image file (never written since `create-md`) are not read at all.
fn load_bitmap(meta: &dyn Backend, geometry: &Geometry) -> Result<Bitmap, BackendError> {
    const CHUNK: u64 = 4 << 20;
    let mut bitmap = Bitmap::new(geometry.data_blocks());
    let mut buf = vec![0u8; CHUNK as usize];
    let mut done = 0;
    while done < geometry.bitmap_bytes {
        let length = CHUNK.min(geometry.bitmap_bytes - done);
        if meta.is_hole(geometry.bitmap_offset + done, length) {
            done += length;
            continue;
        }
        let chunk = &mut buf[..length as usize];
        meta.read_at(geometry.bitmap_offset + done, chunk)?;
        for (index, page) in chunk.chunks(PAGE_BYTES as usize).enumerate() {
            if page.iter().any(|&byte| byte != 0) {
                bitmap.load_page(done / PAGE_BYTES + index as u64, page);
            }
        }
        done += length;
    }
    Ok(bitmap)
}

/// What the journal scan found.
struct Scan {
    records: u64,
    bytes: u64,
    last_seq: u64,
    end_pos: u64,
    stop_reason: String,
}

/// Reads `length` bytes at ring offset `pos` (the caller keeps `pos + length` inside
/// the ring), widening to the backend's alignment.
fn read_ring(
    meta: &dyn Backend,
    geometry: &Geometry,
    pos: u64,
    length: u64,
) -> Result<Vec<u8>, BackendError> {
    let alignment = meta.alignment().max(1) as u64;
    let start = pos / alignment * alignment;
    let end = (pos + length)
        .next_multiple_of(alignment)
        .min(geometry.journal_bytes);
    let mut buf = vec![0u8; (end - start) as usize];
    meta.read_at(geometry.journal_offset + start, &mut buf)?;
    let skip = (pos - start) as usize;
    Ok(buf[skip..skip + length as usize].to_vec())
}

/// What replay records besides the data: the out-of-sync bitmap (when asked) and the
/// snapshots' copies of what it overwrites.
struct ReplayMarks<'a> {
    bitmap: &'a mut Bitmap,
    mark_out_of_sync: bool,
    snapshots: Option<&'a mut crate::snapshot::Snapshots>,
}

/// Scans the journal from the checkpoint and applies every valid record in place.
fn replay(
    data: &Arc<dyn Backend>,
    meta: &dyn Backend,
    geometry: &Geometry,
    superblock: &Superblock,
    checksums: &ChecksumTable,
    marks: ReplayMarks<'_>,
) -> Result<Scan, EngineError> {
    let ReplayMarks {
        bitmap,
        mark_out_of_sync,
        mut snapshots,
    } = marks;
    let ring_bytes = geometry.journal_bytes;
    let mut scan = Scan {
        records: 0,
        bytes: 0,
        last_seq: superblock.checkpoint_seq,
        end_pos: superblock.checkpoint_pos,
        stop_reason: "end of journal".into(),
    };
    let mut pos = superblock.checkpoint_pos;
    let mut scanned = 0u64;
    let stop = |scan: &mut Scan, reason: String| scan.stop_reason = reason;
    while scanned < ring_bytes {
        let fixed = read_ring(meta, geometry, pos, RECORD_FIXED_BYTES as u64)?;
        let header_bytes = match RecordHeader::decode(&fixed) {
            Ok(header) => header.header_bytes(),
            Err(RecordError::Truncated { needed, .. }) => needed,
            Err(RecordError::BadMagic(_)) => break,
            Err(error) => {
                stop(
                    &mut scan,
                    format!("invalid record at ring offset {pos}: {error}"),
                );
                break;
            }
        };
        if pos + header_bytes as u64 > ring_bytes {
            stop(
                &mut scan,
                format!("record header at ring offset {pos} crosses the ring's end"),
            );
            break;
        }
        let header_buf = read_ring(meta, geometry, pos, header_bytes as u64)?;
        let header = match RecordHeader::decode(&header_buf) {
            Ok(header) => header,
            Err(error) => {
                stop(
                    &mut scan,
                    format!("torn record header at ring offset {pos}: {error}"),
                );
                break;
            }
        };
        let total = header.total_bytes();
        if pos + total > ring_bytes {
            stop(
                &mut scan,
                format!("record at ring offset {pos} crosses the ring's end"),
            );
            break;
        }
        if header.is_pad() {
            if header.seq != scan.last_seq {
                stop(&mut scan, format!("stale pad at ring offset {pos}"));
                break;
            }
        } else {
            if header.seq <= scan.last_seq {
                // An older lap's record: the live journal ends here.
                break;
            }
            let end = header.offset_bytes.checked_add(header.length_bytes);
            if end.is_none_or(|end| end > geometry.data_bytes) {
                stop(
                    &mut scan,
                    format!("record {} reaches beyond the volume", header.seq),
                );
                break;
            }
            let payload = if header.data_bytes() > 0 {
                let payload = read_ring(
                    meta,
                    geometry,
                    pos + header_bytes as u64,
                    header.data_bytes(),
                )?;
                if let Err(error) = header.check_data(&payload) {
                    stop(
                        &mut scan,
                        format!("torn record at ring offset {pos}: {error}"),
                    );
                    break;
                }
                Some(Bytes::from(payload))
            } else {
                None
            };
            if let Some(snapshots) = snapshots.as_deref_mut() {
                // Replay overwrites in place like the applier: preserve first.
                let blocks: Vec<(u64, Option<u64>)> = (header.first_block()
                    ..header.first_block() + header.block_count())
                    .map(|block| (block, Some(header.seq)))
                    .collect();
                snapshots.preserve(&blocks, header.seq, &mut |blocks| {
                    super::read_in_place(data.as_ref(), blocks)
                });
            }
            apply_replayed(data, &header, payload.as_deref(), checksums)?;
            if mark_out_of_sync {
                bitmap.set_range(header.first_block(), header.block_count());
            }
            scan.records += 1;
            scan.bytes += header.length_bytes;
            scan.last_seq = header.seq;
        }
        pos = (pos + total) % ring_bytes;
        scanned += total;
        scan.end_pos = pos;
    }
    Ok(scan)
}

fn apply_replayed(
    data: &Arc<dyn Backend>,
    header: &RecordHeader,
    payload: Option<&[u8]>,
    checksums: &ChecksumTable,
) -> Result<(), BackendError> {
    let first = header.first_block();
    match payload {
        Some(payload) => {
            data.write_at(header.offset_bytes, payload)?;
            checksums.set_run(first, header.block_crcs.len() as u64, |index| {
                header.block_crcs[index as usize]
            })?;
        }
        None => {
            data.write_zeroes(header.offset_bytes, header.length_bytes)?;
            checksums.set_run(first, header.block_count(), |_| zero_block_crc())?;
        }
    }
    Ok(())
}

/// Writes a PAD from ring offset `pos` to the next 4 KiB boundary (if `pos` is not on
/// one), by rewriting that whole page: the bytes before `pos` are kept as they are.
/// Returns where the next commit starts.
fn pad_to_page(
    meta: &dyn Backend,
    geometry: &Geometry,
    pos: u64,
    last_seq: u64,
) -> Result<u64, BackendError> {
    let within = pos % PAGE_BYTES;
    if within == 0 {
        return Ok(pos);
    }
    let page_start = pos - within;
    let mut page = read_ring(meta, geometry, page_start, PAGE_BYTES)?;
    let pad = RecordHeader::pad(last_seq, PAGE_BYTES - within).encode();
    let at = within as usize;
    page[at..].fill(0);
    page[at..at + pad.len()].copy_from_slice(&pad);
    meta.write_at(geometry.journal_offset + page_start, &page)?;
    Ok((page_start + PAGE_BYTES) % geometry.journal_bytes)
}

/// The highest sequence number of any record header in the ring with a valid CRC
/// (current lap, stale laps, beyond a torn record alike).
fn highest_seq_in_ring(meta: &dyn Backend, geometry: &Geometry) -> Result<u64, BackendError> {
    const CHUNK: u64 = 4 << 20;
    // A header can reach 64 + 4 × 8192 bytes past its start.
    const OVERLAP: u64 = 64 << 10;
    let ring_bytes = geometry.journal_bytes;
    let mut highest = 0;
    let mut pos = 0;
    while pos < ring_bytes {
        let length = (CHUNK + OVERLAP).min(ring_bytes - pos);
        let buf = read_ring(meta, geometry, pos, length)?;
        let scan_end = CHUNK.min(length) as usize;
        let magic = crate::record::RECORD_MAGIC.to_le_bytes();
        for at in (0..scan_end).step_by(crate::record::RECORD_ALIGN as usize) {
            if buf[at..at + 4] == magic {
                if let Ok(header) = RecordHeader::decode(&buf[at..]) {
                    highest = highest.max(header.seq);
                }
            }
        }
        pos += CHUNK;
    }
    Ok(highest)
}

/// Creates (or truncates) an image file of `size_bytes` (tools and tests).
pub fn create_image_file(path: &Path, size_bytes: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    file.set_len(size_bytes)
}
