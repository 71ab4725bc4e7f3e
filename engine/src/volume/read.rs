//! Reads: overlay first, then the store, every block checked against its checksum.
//!
//! The first attempt takes no lock beyond a short overlay lookup. If a block's
//! checksum does not match, the applier may have been rewriting it at that moment
//! (its newer write landed after our overlay lookup), so the read is retried while
//! holding the apply lock for reading; a mismatch then is real corruption and fails
//! the read with [`IoError::Checksum`] — never bad data.
//!
//! Queued reads are served in batches by the reader threads ([`run`]); in manual mode
//! `Volume::read` runs the same [`read_batch`] for its one read on the caller's thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::Shared;
use crate::backend::ReadOp;
use crate::checksum::block_crc;
use crate::error::IoError;
use crate::snapshot::{BlockSource, SnapshotError};
use crate::BLOCK_BYTES;

/// Reads `[offset, offset+length)` (already range-checked).
pub(super) fn read_now(shared: &Shared, offset: u64, length: u64) -> Result<Bytes, IoError> {
    let mut read = PreparedRead::new(shared, offset, length);
    {
        let state = shared.lock();
        read.fill_from_overlay(&state)?;
    }
    let mut ops = Vec::new();
    read.store_ops(&mut ops);
    if !ops.is_empty() {
        shared.data.read_many(&mut ops)?;
    }
    drop(ops);
    read.finish(shared)
}

/// Reads `[offset, offset+length)` of snapshot `name` (already range-checked; every
/// record up to its point applied): preserved blocks from its log, the others from the
/// store under the apply lock, every block checked.
pub(super) fn read_snapshot_now(
    shared: &Shared,
    name: &str,
    offset: u64,
    length: u64,
) -> Result<Bytes, IoError> {
    let mut read = PreparedRead::new(shared, offset, length);
    let _apply = shared.apply_lock.read().unwrap_or_else(|p| p.into_inner());
    read.fill_from_snapshot(shared, name)?;
    let mut ops = Vec::new();
    read.store_ops(&mut ops);
    if !ops.is_empty() {
        shared.data.read_many(&mut ops)?;
    }
    drop(ops);
    read.check(shared, true)?;
    Ok(read.bytes())
}

/// One read in progress: its buffer and which blocks came from elsewhere than the
/// store.
struct PreparedRead {
    offset: u64,
    length: u64,
    first_block: u64,
    buf: BytesMut,
    /// Blocks already filled (from the overlay, or a snapshot's log): not read from
    /// the store.
    filled: Vec<bool>,
}

impl PreparedRead {
    fn new(shared: &Shared, offset: u64, length: u64) -> PreparedRead {
        shared.stats.reads.fetch_add(1, Ordering::Relaxed);
        shared.stats.read_bytes.fetch_add(length, Ordering::Relaxed);
        let first_block = offset / BLOCK_BYTES;
        let last_block = (offset + length - 1) / BLOCK_BYTES;
        let blocks = (last_block - first_block + 1) as usize;
        PreparedRead {
            offset,
            length,
            first_block,
            buf: BytesMut::zeroed(blocks * BLOCK_BYTES as usize),
            filled: vec![false; blocks],
        }
    }

    /// Copies blocks with unapplied writes from the overlay (engine lock held).
    fn fill_from_overlay(&mut self, state: &super::State) -> Result<(), IoError> {
        if let Some(reason) = &state.failed {
            return Err(IoError::Failed(reason.clone()));
        }
        if state.overlay.is_empty() {
            return Ok(());
        }
        for index in 0..self.filled.len() {
            if let Some(entry) = state.overlay.get(&(self.first_block + index as u64)) {
                let at = index * BLOCK_BYTES as usize;
                let slot = &mut self.buf[at..at + BLOCK_BYTES as usize];
                match &entry.data {
                    Some(data) => slot.copy_from_slice(data),
                    None => slot.fill(0),
                }
                self.filled[index] = true;
            }
        }
        Ok(())
    }

    /// A read of snapshot `name`: fills the blocks its log preserved (each checked
    /// against the log's checksum); the others are the store's, in place. The caller
    /// holds the apply lock for reading from before this lookup until the store has
    /// been read, so no block is overwritten in between.
    fn fill_from_snapshot(&mut self, shared: &Shared, name: &str) -> Result<(), IoError> {
        let snapshot_error = |error: SnapshotError| IoError::Failed(error.to_string().into());
        let snapshots = shared
            .snapshots
            .as_ref()
            .ok_or(SnapshotError::NotConfigured)
            .map_err(snapshot_error)?;
        let count = self.filled.len() as u64;
        let (point, sources, log) = snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sources(name, self.first_block, count)
            .map_err(snapshot_error)?;
        let applied = shared.lock().applied_seq;
        if applied < point {
            return Err(snapshot_error(SnapshotError::NotReady {
                name: name.to_string(),
                point,
                applied,
            }));
        }
        for (index, source) in sources.into_iter().enumerate() {
            let BlockSource::Log { slot, crc } = source else {
                continue;
            };
            let block_number = self.first_block + index as u64;
            let at = index * BLOCK_BYTES as usize;
            let block = &mut self.buf[at..at + BLOCK_BYTES as usize];
            log.read_slot(slot, block).map_err(snapshot_error)?;
            let computed = block_crc(block);
            if computed != crc {
                shared.stats.checksum_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "checksum mismatch in block {block_number} preserved by snapshot {name}: stored {crc:#010x}, data {computed:#010x}"
                );
                return Err(IoError::Checksum {
                    block: block_number,
                    stored: crc,
                    computed,
                });
            }
            self.filled[index] = true;
        }
        Ok(())
    }

    /// The store reads still needed: one per run of blocks not filled already.
    fn store_ops<'a>(&'a mut self, ops: &mut Vec<ReadOp<'a>>) {
        let blocks = self.filled.len();
        let mut rest: &mut [u8] = &mut self.buf[..];
        let mut consumed = 0usize;
        let mut index = 0usize;
        while index < blocks {
            if self.filled[index] {
                index += 1;
                continue;
            }
            let run_start = index;
            while index < blocks && !self.filled[index] {
                index += 1;
            }
            let skip = (run_start - consumed) * BLOCK_BYTES as usize;
            let take = (index - run_start) * BLOCK_BYTES as usize;
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
            let (run, tail) = tail.split_at_mut(take);
            rest = tail;
            consumed = index;
            ops.push(ReadOp {
                offset: (self.first_block + run_start as u64) * BLOCK_BYTES,
                buf: run,
            });
        }
    }

    /// Checks every block read from the store against the checksum table.
    fn check(&self, shared: &Shared, final_attempt: bool) -> Result<(), IoError> {
        for (index, filled) in self.filled.iter().enumerate() {
            if *filled {
                continue;
            }
            let block = self.first_block + index as u64;
            let at = index * BLOCK_BYTES as usize;
            let computed = block_crc(&self.buf[at..at + BLOCK_BYTES as usize]);
            let stored = shared.checksums.get(block)?;
            if computed != stored {
                if final_attempt {
                    shared.stats.checksum_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("checksum mismatch in block {block}: stored {stored:#010x}, data {computed:#010x}");
                }
                return Err(IoError::Checksum {
                    block,
                    stored,
                    computed,
                });
            }
        }
        Ok(())
    }

    /// Checks the blocks; on a mismatch, reads again under the apply lock (the applier
    /// may have been rewriting a block at that moment), where a mismatch is real.
    fn finish(mut self, shared: &Shared) -> Result<Bytes, IoError> {
        if let Err(error) = self.check(shared, false) {
            if !matches!(error, IoError::Checksum { .. }) {
                return Err(error);
            }
            let _apply = shared.apply_lock.read().unwrap_or_else(|p| p.into_inner());
            self.filled.iter_mut().for_each(|b| *b = false);
            {
                let state = shared.lock();
                self.fill_from_overlay(&state)?;
            }
            let mut ops = Vec::new();
            self.store_ops(&mut ops);
            if !ops.is_empty() {
                shared.data.read_many(&mut ops)?;
            }
            drop(ops);
            self.check(shared, true)?;
        }
        Ok(self.bytes())
    }

    /// The bytes asked for.
    fn bytes(self) -> Bytes {
        let start = (self.offset % BLOCK_BYTES) as usize;
        self.buf.freeze().slice(start..start + self.length as usize)
    }
}

/// Serves a batch of queued reads with one overlay pass and one `read_many` (the
/// io_uring backend runs them concurrently).
pub(super) fn read_batch(shared: &Shared, jobs: Vec<super::ReadJob>) {
    let mut reads: Vec<PreparedRead> = jobs
        .iter()
        .map(|job| PreparedRead::new(shared, job.offset, job.length))
        .collect();
    let mut results: Vec<Option<Result<Bytes, IoError>>> = (0..jobs.len()).map(|_| None).collect();
    // Snapshot reads need the store unchanged from their lookup to their read.
    let snapshot_reads = jobs.iter().any(|job| job.snapshot.is_some());
    let apply = snapshot_reads.then(|| shared.apply_lock.read().unwrap_or_else(|p| p.into_inner()));
    {
        let state = shared.lock();
        for (index, (read, job)) in reads.iter_mut().zip(&jobs).enumerate() {
            if job.snapshot.is_none() {
                if let Err(error) = read.fill_from_overlay(&state) {
                    results[index] = Some(Err(error));
                }
            }
        }
    }
    for (index, (read, job)) in reads.iter_mut().zip(&jobs).enumerate() {
        if let Some(name) = &job.snapshot {
            if let Err(error) = read.fill_from_snapshot(shared, name) {
                results[index] = Some(Err(error));
            }
        }
    }
    let mut ops = Vec::new();
    for (read, result) in reads.iter_mut().zip(&results) {
        if result.is_none() {
            read.store_ops(&mut ops);
        }
    }
    let batch_result = if ops.is_empty() {
        Ok(())
    } else {
        shared.data.read_many(&mut ops)
    };
    drop(ops);
    let failed = batch_result.is_err();
    // Snapshot blocks read under the apply lock: a mismatch is real.
    for ((job, read), result) in jobs.iter().zip(&reads).zip(&mut results) {
        if job.snapshot.is_some() && result.is_none() && !failed {
            *result = read.check(shared, true).err().map(Err);
        }
    }
    drop(apply);
    for ((job, read), result) in jobs.into_iter().zip(reads).zip(results) {
        let outcome = match (result, &job.snapshot) {
            (Some(error), _) => error,
            // One failed store read fails the batch: redo each read alone, so only the
            // reads that touch the bad range fail.
            (None, None) if failed => read_now(shared, job.offset, job.length),
            (None, Some(name)) if failed => read_snapshot_now(shared, name, job.offset, job.length),
            (None, None) => read.finish(shared),
            (None, Some(_)) => Ok(read.bytes()),
        };
        (job.done)(outcome);
    }
}

/// See `Volume::verify_checksums`.
pub(super) fn verify_checksums(
    shared: &Shared,
    first_block: u64,
    blocks: u64,
) -> Result<super::BlockChecks, IoError> {
    // Hold the apply lock so no in-place write is half done while we look.
    let _apply = shared.apply_lock.read().unwrap_or_else(|p| p.into_inner());
    // Blocks with unapplied writes: their newest content, not the store's.
    let overlay: Vec<Option<Option<Bytes>>> = {
        let state = shared.lock();
        (0..blocks)
            .map(|index| {
                state
                    .overlay
                    .get(&(first_block + index))
                    .map(|entry| entry.data.clone())
            })
            .collect()
    };
    let mut buf = vec![0u8; (blocks * BLOCK_BYTES) as usize];
    shared.data.read_at(first_block * BLOCK_BYTES, &mut buf)?;
    let zeroes = [0u8; BLOCK_BYTES as usize];
    let mut checks = super::BlockChecks {
        stored: Vec::new(),
        actual: Vec::new(),
        digests: Vec::new(),
    };
    for (index, block) in buf.chunks(BLOCK_BYTES as usize).enumerate() {
        match &overlay[index] {
            Some(newest) => {
                let data: &[u8] = newest.as_deref().unwrap_or(&zeroes);
                let crc = block_crc(data);
                checks.stored.push(crc);
                checks.actual.push(crc);
                checks.digests.push(crate::checksum::block_digest(data));
            }
            None => {
                checks
                    .stored
                    .push(shared.checksums.get(first_block + index as u64)?);
                checks.actual.push(block_crc(block));
                checks.digests.push(crate::checksum::block_digest(block));
            }
        }
    }
    Ok(checks)
}

/// Most reads served in one batch.
const MAX_READ_BATCH: usize = 64;

/// A reader thread's body: serve queued reads until the volume closes.
pub(super) fn run(shared: Arc<Shared>) {
    loop {
        let jobs = {
            let mut queue = shared.reads.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if !queue.jobs.is_empty() {
                    let take = queue.jobs.len().min(MAX_READ_BATCH);
                    break queue.jobs.drain(..take).collect::<Vec<_>>();
                }
                let state = shared.lock();
                let stopping = state.closing || state.failed.is_some();
                drop(state);
                if stopping {
                    return;
                }
                queue.idle += 1;
                queue = shared
                    .reads_wake
                    .wait(queue)
                    .unwrap_or_else(|p| p.into_inner());
                queue.idle -= 1;
            }
        };
        read_batch(&shared, jobs);
    }
}
