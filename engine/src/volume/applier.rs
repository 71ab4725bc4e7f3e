//! The applier: journaled records (and resync data) into place, checkpoints.
//!
//! Records are applied only once durable in the journal (the write-ahead rule). A
//! batch is applied with the apply lock held for writing: last writer wins per block,
//! runs of blocks that lie contiguously in one record go out as one write, zero runs
//! as `write_zeroes`, and the checksum table is updated before the lock is released.
//! Only then are the overlay entries dropped (if no newer write replaced them).
//!
//! A checkpoint makes the applied state durable in this order: data fdatasync;
//! bitmap and checksum-table pages; metadata fdatasync; superblock with the new
//! checkpoint; fdatasync. A crash anywhere in between leaves the previous superblock,
//! whose checkpoint is older, and replay redoes the difference.
//!
//! One unit of this work is a [`step`]: the applier thread ([`run`]) loops over it and
//! sleeps when it finds nothing; manual mode's `Volume::pump` calls it directly. The
//! two differ only in time: the thread lets records written to the journal wait up
//! to [`APPLY_DELAY`] for the fdatasync that makes them appliable, and checkpoints on
//! an interval; manual mode syncs at once and checkpoints when nothing is left to
//! apply (see [`checkpoint_due`]).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use super::{journal, ApplyItem, Shared, State};
use crate::backend::{BackendError, WriteOp};
use crate::checksum::zero_block_crc;
use crate::error::EngineError;
use crate::BLOCK_BYTES;

/// Most items applied in one batch.
const MAX_BATCH_ITEMS: usize = 8192;
/// How long durable-but-unapplied records may wait so that one journal fdatasync
/// covers many of them (reads are served from the overlay meanwhile). Threaded mode.
const APPLY_DELAY: Duration = Duration::from_millis(10);

fn item_ready(state: &State, item: &ApplyItem) -> bool {
    match item {
        ApplyItem::Record { record, .. } => {
            record.header.seq <= state.durable_seq
                && state
                    .apply_holds
                    .iter()
                    .all(|&hold| record.header.seq <= hold)
        }
        ApplyItem::Resync { .. } => true,
    }
}

/// Whether a checkpoint is due: when requested; when the ring is over half full and
/// the checkpoint can move its tail; or when there is something to make durable
/// (applied records, changed checksum or bitmap pages) and — threaded mode — the
/// checkpoint interval has passed, or — manual mode, which keeps no clock — nothing
/// is left to apply.
fn checkpoint_due(shared: &Shared, state: &State) -> bool {
    if state.checkpoint_requested {
        return true;
    }
    let limit = state.checkpoint_limit();
    let can_advance = state
        .applied_positions
        .front()
        .is_some_and(|(seq, _)| *seq <= limit);
    if can_advance && state.ring_used > shared.geometry.journal_bytes / 2 {
        return true;
    }
    if shared.checksums.wants_writeback() {
        return true;
    }
    let meta_dirty = can_advance || state.bitmap_dirty() || shared.checksums_dirty();
    meta_dirty
        && if shared.manual() {
            state.apply_queue.is_empty()
        } else {
            state
                .last_checkpoint
                .is_none_or(|at| at.elapsed() >= shared.options.checkpoint_interval)
        }
}

/// Whether the journal should be fdatasynced now for records waiting to be applied,
/// without waiting out the apply delay: space, a checkpoint or the close waits.
fn sync_pressing(shared: &Shared, state: &State) -> bool {
    state.ring_used > shared.geometry.journal_bytes / 4
        || state.checkpoint_requested
        || state.closing
}

/// What one [`step`] found.
pub(super) enum Step<'a> {
    /// It did one unit of work: a journal fdatasync, an apply batch or a checkpoint
    /// (which may have failed the volume).
    Worked,
    /// The volume failed, or it is closing and everything is done: stop.
    Stop,
    /// The oldest item waits for a journal fdatasync that `sync_now` put off.
    WaitsForSync(MutexGuard<'a, State>),
    /// Nothing to do.
    Idle(MutexGuard<'a, State>),
}

/// One unit of the applier's work, in this order of preference: an fdatasync of the
/// journal when the oldest record waits for one (if `sync_now` agrees); a due
/// checkpoint (first, so a queue that never drains cannot starve it, and with it the
/// persisted progress of a resync target and the reclaiming of journal space); an
/// apply batch; the final checkpoint of a close; a checkpoint due while idle.
pub(super) fn step<'a>(
    shared: &'a Shared,
    mut state: MutexGuard<'a, State>,
    sync_now: impl FnOnce(&State) -> bool,
) -> Step<'a> {
    if state.failed.is_some() {
        return Step::Stop;
    }
    let front_ready = state
        .apply_queue
        .front()
        .is_some_and(|item| item_ready(&state, item));
    // A durable record held back for a snapshot being made: nothing to sync for it.
    let front_held = !front_ready
        && state.apply_queue.front().is_some_and(|item| {
            matches!(item, ApplyItem::Record { record, .. } if record.header.seq <= state.durable_seq)
        });
    if front_held && !state.closing {
        return Step::Idle(state);
    }
    if !front_ready && !state.apply_queue.is_empty() {
        if !sync_now(&state) {
            return Step::WaitsForSync(state);
        }
        let target = state.written_seq;
        drop(state);
        journal::sync(shared, target);
        return Step::Worked;
    }
    if front_ready && checkpoint_due(shared, &state) {
        drop(state);
        checkpoint_or_fail(shared);
        return Step::Worked;
    }
    if front_ready {
        let mut batch = Vec::new();
        // A batch never holds records from both sides of a snapshot's point: the
        // block a snapshot preserves must be the one in place at its point.
        let mut cut: Option<u64> = None;
        while batch.len() < MAX_BATCH_ITEMS
            && state
                .apply_queue
                .front()
                .is_some_and(|item| item_ready(&state, item))
        {
            if let Some(ApplyItem::Record { record, .. }) = state.apply_queue.front() {
                let seq = record.header.seq;
                if cut.is_some_and(|point| seq > point) {
                    break;
                }
                if cut.is_none() {
                    cut = state
                        .snapshot_points
                        .iter()
                        .copied()
                        .filter(|&p| p >= seq)
                        .min();
                }
                state.taken_seq = state.taken_seq.max(seq);
            }
            if let Some(item) = state.apply_queue.pop_front() {
                batch.push(item);
            }
        }
        // Resync data carries the source's newer content: a write after every point
        // this node has (a node mid-resync takes no snapshot, and its last sequenced
        // number is at or above every point), so it counts as changed after all of them.
        let resync_trigger = state.last_sequenced.saturating_add(1);
        state.applying = true;
        drop(state);
        if let Err(error) = apply_batch(shared, batch, resync_trigger) {
            let mut state = shared.lock();
            state.applying = false;
            shared.fail(&mut state, format!("writing data in place failed: {error}"));
        }
        return Step::Worked;
    }
    let closing_idle = state.closing && state.pending.is_empty() && state.apply_queue.is_empty();
    if closing_idle {
        let final_checkpoint_needed = !state.applied_positions.is_empty()
            || state.checkpoint_requested
            || state.bitmap_dirty()
            || shared.checksums_dirty();
        if !final_checkpoint_needed {
            return Step::Stop;
        }
    }
    if closing_idle || checkpoint_due(shared, &state) {
        drop(state);
        checkpoint_or_fail(shared);
        return Step::Worked;
    }
    Step::Idle(state)
}

/// The applier thread's body.
pub(super) fn run(shared: Arc<Shared>) {
    let mut waiting_since: Option<Instant> = None;
    loop {
        let state = shared.lock();
        let mut front_waits = false;
        let step = step(&shared, state, |state| {
            front_waits = true;
            let since = *waiting_since.get_or_insert_with(Instant::now);
            sync_pressing(&shared, state) || since.elapsed() >= APPLY_DELAY
        });
        if !front_waits {
            waiting_since = None;
        }
        match step {
            Step::Worked => {}
            Step::Stop => return,
            Step::WaitsForSync(state) => {
                // Not marked idle: new commits need not wake us, the timer will. Ring
                // pressure and shutdown wake us explicitly.
                let waited = waiting_since.map_or(Duration::ZERO, |since| since.elapsed());
                let remaining = APPLY_DELAY.saturating_sub(waited);
                drop(shared.applier_wake.wait_timeout(state, remaining));
            }
            Step::Idle(mut state) => {
                let since_checkpoint = state
                    .last_checkpoint
                    .map_or(Duration::ZERO, |at| at.elapsed());
                let timeout = shared
                    .options
                    .checkpoint_interval
                    .saturating_sub(since_checkpoint)
                    .max(Duration::from_millis(5));
                state.applier_idle = true;
                let (mut state, _) = shared
                    .applier_wake
                    .wait_timeout(state, timeout)
                    .unwrap_or_else(|p| p.into_inner());
                state.applier_idle = false;
            }
        }
    }
}

/// Where a block's new content comes from.
#[derive(Clone, Copy)]
enum Source {
    /// Block `index` of the data of batch item `item`.
    Data {
        item: usize,
        index: u64,
        crc: u32,
    },
    Zero,
}

/// The data bytes of batch item `item` (empty for zero items).
fn item_data(batch: &[ApplyItem], item: usize) -> &[u8] {
    match &batch[item] {
        ApplyItem::Record { record, .. } => &record.data,
        ApplyItem::Resync { data, .. } => data.as_deref().unwrap_or_default(),
    }
}

fn apply_batch(
    shared: &Shared,
    batch: Vec<ApplyItem>,
    resync_trigger: u64,
) -> Result<(), BackendError> {
    // Last writer wins per block; the batch is in order.
    let mut blocks: BTreeMap<u64, Source> = BTreeMap::new();
    // The first write of the batch to each block: its sequence number (`None` for
    // resync data), for copy-on-write.
    let mut first_writes: BTreeMap<u64, Option<u64>> = BTreeMap::new();
    for (item_index, item) in batch.iter().enumerate() {
        let (first_block, count, data, crcs) = match item {
            ApplyItem::Record { record, .. } => {
                let header = &record.header;
                (
                    header.first_block(),
                    header.block_count(),
                    (!record.data.is_empty()).then_some(&record.data),
                    &header.block_crcs,
                )
            }
            ApplyItem::Resync {
                first_block,
                blocks,
                data,
                crcs,
            } => (*first_block, *blocks, data.as_ref(), crcs),
        };
        for index in 0..count {
            let source = match data {
                Some(_) => Source::Data {
                    item: item_index,
                    index,
                    crc: crcs[index as usize],
                },
                None => Source::Zero,
            };
            blocks.insert(first_block + index, source);
            let seq = match item {
                ApplyItem::Record { record, .. } => Some(record.header.seq),
                ApplyItem::Resync { .. } => None,
            };
            if shared.snapshots.is_some() {
                first_writes.entry(first_block + index).or_insert(seq);
            }
        }
    }
    if let Some(snapshots) = &shared.snapshots {
        let first_writes: Vec<(u64, Option<u64>)> = first_writes.into_iter().collect();
        snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .preserve(&first_writes, resync_trigger, &mut |blocks| {
                super::read_in_place(shared.data.as_ref(), blocks)
            });
    }
    // Runs: consecutive blocks from consecutive positions of one item's data, or zeroes.
    let mut runs: Vec<(u64, u64, Source)> = Vec::new(); // (first block, count, first source)
    for (&block, &source) in &blocks {
        let extends = match (runs.last(), source) {
            (
                Some((first, count, Source::Data { item, index, .. })),
                Source::Data {
                    item: next_item,
                    index: next_index,
                    ..
                },
            ) => first + count == block && *item == next_item && index + count == next_index,
            (Some((first, count, Source::Zero)), Source::Zero) => first + count == block,
            _ => false,
        };
        match runs.last_mut() {
            Some(run) if extends => run.1 += 1,
            _ => runs.push((block, 1, source)),
        }
    }
    let mut writes: Vec<WriteOp<'_>> = Vec::new();
    let mut zero_runs: Vec<(u64, u64)> = Vec::new();
    for (first, count, source) in runs {
        match source {
            Source::Data { item, index, .. } => {
                let start = (index * BLOCK_BYTES) as usize;
                let end = start + (count * BLOCK_BYTES) as usize;
                writes.push(WriteOp {
                    offset: first * BLOCK_BYTES,
                    buf: &item_data(&batch, item)[start..end],
                });
            }
            Source::Zero => zero_runs.push((first, count)),
        }
    }

    // Bring the table pages in before taking the apply lock, so readers do not wait
    // for those reads too.
    for write in &writes {
        let blocks = write.buf.len() as u64 / BLOCK_BYTES;
        shared
            .checksums
            .preload(write.offset / BLOCK_BYTES, blocks)?;
    }
    for &(first, count) in &zero_runs {
        shared.checksums.preload(first, count)?;
    }
    {
        let _apply = shared.apply_lock.write().unwrap_or_else(|p| p.into_inner());
        shared.data.write_many(&writes)?;
        for (first, count) in &zero_runs {
            shared
                .data
                .write_zeroes(first * BLOCK_BYTES, count * BLOCK_BYTES)?;
        }
        let zero_crc = zero_block_crc();
        for (&block, source) in &blocks {
            let crc = match source {
                Source::Data { crc, .. } => *crc,
                Source::Zero => zero_crc,
            };
            shared.checksums.set(block, crc)?;
        }
    }

    let mut state = shared.lock();
    let mut records = 0u64;
    for item in &batch {
        match item {
            ApplyItem::Record {
                record,
                end_pos,
                from_peer,
            } => {
                let header = &record.header;
                for block in header.first_block()..header.first_block() + header.block_count() {
                    if state
                        .overlay
                        .get(&block)
                        .is_some_and(|entry| entry.seq == header.seq)
                    {
                        state.overlay.remove(&block);
                    }
                }
                // A record streamed during a resync brings its blocks in sync. Outside
                // one, a bit set on a secondary means "the primary may not hold this
                // block" (or a verify found it different): a record applied late,
                // after the session that carried it ended, must not clear that.
                if *from_peer && state.resync_written.is_some() {
                    state
                        .bitmap
                        .clear_range(header.first_block(), header.block_count());
                }
                state.applied_seq = state.applied_seq.max(header.seq);
                state.applied_positions.push_back((header.seq, *end_pos));
                records += 1;
            }
            ApplyItem::Resync {
                first_block,
                blocks,
                ..
            } => {
                state.bitmap.clear_range(*first_block, *blocks);
                state.resync_queued_bytes = state
                    .resync_queued_bytes
                    .saturating_sub(blocks * BLOCK_BYTES);
            }
        }
    }
    shared
        .stats
        .records_applied
        .fetch_add(records, Ordering::Relaxed);
    state.applying = false;
    shared.wake_progress(&state);
    Ok(())
}

/// Runs a checkpoint; if it fails, the volume is failed (the next step stops).
fn checkpoint_or_fail(shared: &Shared) {
    if let Err(error) = checkpoint(shared) {
        let mut state = shared.lock();
        shared.fail(&mut state, format!("checkpoint failed: {error}"));
    }
}

/// Makes everything applied so far durable and moves the checkpoint forward.
fn checkpoint(shared: &Shared) -> Result<(), EngineError> {
    let chosen = {
        let mut state = shared.lock();
        let limit = state.checkpoint_limit();
        let mut chosen = None;
        while let Some(&(seq, pos)) = state.applied_positions.front() {
            if seq > limit {
                break;
            }
            chosen = Some((seq, pos));
            state.applied_positions.pop_front();
        }
        chosen
    };
    // Data first, then the checksums that describe it, then the bitmap whose cleared
    // bits claim "in sync" (a cleared bit must never be durable before the block's
    // data and checksum are), each made durable before the next.
    shared.data.flush()?;
    let geometry = &shared.geometry;
    let table_pages = shared.checksums.write_dirty()?;
    if let Err(error) = shared.meta.flush() {
        shared.checksums.write_failed(&table_pages);
        return Err(error.into());
    }
    shared.checksums.written_durable(&table_pages);
    shared.write_bitmap_pages()?;
    shared.meta.flush()?;
    {
        let _guard = shared
            .superblock_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let superblock = {
            let mut state = shared.lock();
            if let Some((seq, pos)) = chosen {
                state.superblock.checkpoint_seq = seq;
                state.superblock.checkpoint_pos = pos;
            }
            state.superblock.sequence += 1;
            state.superblock.clone()
        };
        shared.write_superblock(&superblock)?;
    }
    let mut state = shared.lock();
    if let Some((_, pos)) = chosen {
        let ring_bytes = geometry.journal_bytes;
        state.ring_tail = pos;
        state.ring_used = (state.ring_head + ring_bytes - pos) % ring_bytes;
    }
    state.checkpoint_requested = false;
    if !shared.manual() {
        state.last_checkpoint = Some(Instant::now());
    }
    shared.stats.checkpoints.fetch_add(1, Ordering::Release);
    shared.wake_progress(&state);
    Ok(())
}
