//! The journal writer: group commit into the ring.
//!
//! Each round takes every queued record that fits, lays them out contiguously from
//! the ring head (a PAD fills the ring's end when a record does not fit there; a PAD
//! after the last record brings the head to a 4 KiB boundary, so no later commit
//! rewrites a page holding acknowledged records), writes the round with at most two
//! `pwrite`s (before and after a wrap), and fdatasyncs if any record asked for FUA or
//! a flush is waiting. Then it completes the callbacks and hands the records to the
//! applier. A full ring waits for the applier's checkpoint (after making the written
//! records durable, so the applier may apply them).
//!
//! A [`round`] runs on the journal thread ([`run`]), inline on a writer's thread
//! (threaded mode, when no fdatasync is needed), or from `Volume::pump` and the
//! inline paths of manual mode (see `manual.rs`), which decide with the same
//! [`has_work`] as the thread. Manual mode does not wait on a full ring: the
//! applier's step (fdatasync, apply, checkpoint) runs next instead.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use super::{ApplyItem, FlushDone, Pending, Shared, State, WriteDone};
use crate::error::IoError;
use crate::layout::PAGE_BYTES;
use crate::record::{RecordHeader, RECORD_ALIGN};

/// Largest single group commit.
const MAX_COMMIT_BYTES: u64 = 16 << 20;

/// One thing placed in the ring this round.
enum Placed {
    Record { pos: u64, pending: Pending },
    Pad { pos: u64, header: RecordHeader },
}

impl Placed {
    fn pos(&self) -> u64 {
        match self {
            Placed::Record { pos, .. } | Placed::Pad { pos, .. } => *pos,
        }
    }
}

/// Places as many pending records as fit; returns what was placed (in ring order).
fn place(state: &mut State, ring_bytes: u64) -> Vec<Placed> {
    let mut placed = Vec::new();
    let mut round_bytes = 0u64;
    while let Some(front) = state.pending.front() {
        let size = front.record.total_bytes();
        debug_assert!(size % RECORD_ALIGN == 0);
        let waste = if state.ring_head + size > ring_bytes {
            ring_bytes - state.ring_head
        } else {
            0
        };
        // Keep a page free so the closing PAD always fits and head never meets tail.
        if state.ring_used + waste + size + PAGE_BYTES > ring_bytes
            || (round_bytes > 0 && round_bytes + size > MAX_COMMIT_BYTES)
        {
            break;
        }
        if waste > 0 {
            placed.push(Placed::Pad {
                pos: state.ring_head,
                header: RecordHeader::pad(state.last_placed_seq, waste),
            });
            state.ring_used += waste;
            state.ring_head = 0;
        }
        let Some(pending) = state.pending.pop_front() else {
            break;
        };
        state.pending_bytes -= size;
        let pos = state.ring_head;
        state.last_placed_seq = pending.record.header.seq;
        placed.push(Placed::Record { pos, pending });
        state.ring_used += size;
        state.ring_head = (pos + size) % ring_bytes;
        round_bytes += size;
    }
    if placed.iter().any(|p| matches!(p, Placed::Record { .. }))
        && state.ring_head % PAGE_BYTES != 0
    {
        let pad_bytes = state.ring_head.next_multiple_of(PAGE_BYTES) - state.ring_head;
        placed.push(Placed::Pad {
            pos: state.ring_head,
            header: RecordHeader::pad(state.last_placed_seq, pad_bytes),
        });
        state.ring_used += pad_bytes;
        state.ring_head = (state.ring_head + pad_bytes) % ring_bytes;
    }
    placed
}

/// Zeroes for PAD bodies.
static ZEROES: [u8; 64 * 1024] = [0u8; 64 * 1024];

impl Placed {
    fn len(&self) -> u64 {
        match self {
            Placed::Record { pending, .. } => pending.record.total_bytes(),
            Placed::Pad { header, .. } => header.total_bytes(),
        }
    }

    /// The item's bytes as slices (no copy): header and data, or a PAD header and zeroes.
    fn parts<'a>(&'a self, encoded_pad: Option<&'a [u8]>, out: &mut Vec<&'a [u8]>) {
        match self {
            Placed::Record { pending, .. } => {
                out.push(&pending.record.encoded_header);
                out.push(&pending.record.data);
            }
            Placed::Pad { header, .. } => {
                let encoded = encoded_pad.unwrap_or_default();
                out.push(encoded);
                let mut zeroes = header.total_bytes() as usize - encoded.len();
                while zeroes > 0 {
                    let n = zeroes.min(ZEROES.len());
                    out.push(&ZEROES[..n]);
                    zeroes -= n;
                }
            }
        }
    }
}

/// Writes a round: each contiguous run of items (one, or two when the round wraps)
/// with one vectored write straight from the records' buffers.
fn write_round(shared: &Shared, placed: &[Placed]) -> Result<(), IoError> {
    let pads: Vec<Option<bytes::Bytes>> = placed
        .iter()
        .map(|item| match item {
            Placed::Pad { header, .. } => Some(header.encode()),
            Placed::Record { .. } => None,
        })
        .collect();
    let mut index = 0;
    while index < placed.len() {
        let start = placed[index].pos();
        let mut end = index;
        let mut length = 0u64;
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * (placed.len() - index));
        while end < placed.len() && placed[end].pos() == start + length {
            placed[end].parts(pads[end].as_deref(), &mut parts);
            length += placed[end].len();
            end += 1;
        }
        shared
            .meta
            .write_vectored_at(shared.geometry.journal_offset + start, &parts)?;
        index = end;
    }
    Ok(())
}

/// What one round did.
pub(super) enum Round {
    /// Records were written (or a flush was made durable).
    Committed,
    /// Records wait but none fits in the ring until the applier checkpoints.
    RingFull,
    /// Nothing to do.
    Nothing,
}

/// Whether the calling writer may run the next round itself: the journal is written
/// through the page cache, nobody is committing and no queued record or flush needs
/// an fdatasync (those stay on the journal thread,
/// so a client thread never blocks on the disk's cache flush).
pub(super) fn may_commit_inline(shared: &Shared, state: &State) -> bool {
    // Through the page cache a round costs microseconds; an O_DIRECT journal would make
    // each writer wait for the device alone, defeating group commit.
    shared.options.commit_inline
        && !shared.meta.is_direct()
        && !state.committing
        && !state.closing
        && state.failed.is_none()
        && state.flush_requested <= state.durable_seq
        && !state.pending.iter().any(|pending| pending.record.is_fua())
}

/// One group commit: place what fits, write it (fdatasync if asked), complete the
/// callbacks, hand the records to the applier. Run by the journal thread, or inline
/// by a writer when [`may_commit_inline`] allows. Only one round runs at a time
/// (`committing`), so rounds complete in sequence order.
pub(super) fn round(shared: &Shared, mut state: MutexGuard<'_, State>) -> Round {
    let ring_bytes = shared.geometry.journal_bytes;
    debug_assert!(!state.committing);
    let placed = place(&mut state, ring_bytes);
    let placed_records = placed
        .iter()
        .filter(|p| matches!(p, Placed::Record { .. }))
        .count();
    let want_flush = state.flush_requested > state.durable_seq;
    if placed_records == 0 {
        if !state.pending.is_empty() {
            return Round::RingFull;
        }
        if !want_flush {
            return Round::Nothing;
        }
    }
    state.committing = true;
    let last_seq = placed.iter().rev().find_map(|p| match p {
        Placed::Record { pending, .. } => Some(pending.record.header.seq),
        Placed::Pad { .. } => None,
    });
    let any_fua = placed
        .iter()
        .any(|p| matches!(p, Placed::Record { pending, .. } if pending.record.is_fua()));
    let sync_target = last_seq.unwrap_or(state.written_seq).max(state.written_seq);
    let needs_sync = any_fua || want_flush;
    drop(state);

    let mut result = Ok(());
    if placed_records > 0 {
        let bytes: u64 = placed.iter().map(Placed::len).sum();
        result = write_round(shared, &placed);
        shared.stats.journal_commits.fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .journal_bytes_written
            .fetch_add(bytes, Ordering::Relaxed);
    }
    if result.is_ok() && needs_sync {
        result = shared.meta.flush().map_err(IoError::from);
        shared.stats.journal_syncs.fetch_add(1, Ordering::Relaxed);
    }

    let mut state = shared.lock();
    state.committing = false;
    if let Err(error) = result {
        shared.fail(&mut state, format!("journal write failed: {error}"));
        let callbacks: Vec<WriteDone> = placed
            .into_iter()
            .filter_map(|p| match p {
                Placed::Record { pending, .. } => pending.done,
                Placed::Pad { .. } => None,
            })
            .collect();
        drop(state);
        for done in callbacks {
            done(Err(error.clone()));
        }
        return Round::Committed;
    }
    if let Some(seq) = last_seq {
        state.written_seq = state.written_seq.max(seq);
    }
    if needs_sync {
        state.durable_seq = state.durable_seq.max(sync_target);
    }
    let mut callbacks: Vec<(WriteDone, u64)> = Vec::with_capacity(placed_records);
    for item in placed {
        if let Placed::Record { pos, pending } = item {
            let seq = pending.record.header.seq;
            let end_pos = (pos + pending.record.total_bytes()) % ring_bytes;
            if let Some(done) = pending.done {
                callbacks.push((done, seq));
            }
            state.apply_queue.push_back(ApplyItem::Record {
                record: pending.record,
                end_pos,
                from_peer: pending.from_peer,
            });
        }
    }
    let flushes = take_satisfied_flushes(&mut state);
    shared.wake_applier(&state);
    shared.wake_progress(&state);
    // Work that arrived meanwhile goes to the journal thread.
    if !state.pending.is_empty() || state.flush_requested > state.durable_seq {
        shared.wake_writer(&state);
    }
    drop(state);
    for (done, seq) in callbacks {
        done(Ok(seq));
    }
    for done in flushes {
        done(Ok(()));
    }
    Round::Committed
}

/// Whether a round would have something to do: records wait or a flush wants an
/// fdatasync, and no round is running.
pub(super) fn has_work(state: &State) -> bool {
    let want_flush = state.flush_requested > state.durable_seq;
    (!state.pending.is_empty() || want_flush) && !state.committing
}

/// The journal writer thread's body.
pub(super) fn run(shared: Arc<Shared>) {
    loop {
        let mut state = shared.lock();
        loop {
            if state.failed.is_some() {
                fail_everything(&shared, state);
                return;
            }
            if has_work(&state) {
                break;
            }
            if state.closing && state.pending.is_empty() && !state.committing {
                return;
            }
            state.writer_idle = true;
            state = shared
                .writer_wake
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
            state.writer_idle = false;
        }
        if let Round::RingFull = round(&shared, state) {
            // Make what is written durable so the applier can apply and checkpoint,
            // then wait for space.
            let state = shared.lock();
            let needs_sync = state.written_seq > state.durable_seq;
            let target = state.written_seq;
            drop(state);
            if needs_sync {
                sync(&shared, target);
            }
            let mut state = shared.lock();
            state.checkpoint_requested = true;
            shared.applier_wake.notify_one();
            // The applier notifies `progress` after each checkpoint; the timeout only
            // bounds the wait should a wake-up be missed.
            drop(shared.wait_progress(state, Duration::from_millis(50)));
        }
    }
}

/// Makes the journal durable up to `target` (already written) from any thread.
pub(super) fn sync(shared: &Shared, target: u64) {
    let result = shared.meta.flush();
    shared.stats.journal_syncs.fetch_add(1, Ordering::Relaxed);
    let mut state = shared.lock();
    match result {
        Ok(()) => {
            state.durable_seq = state.durable_seq.max(target);
            let flushes = take_satisfied_flushes(&mut state);
            shared.wake_progress(&state);
            shared.wake_applier(&state);
            drop(state);
            for done in flushes {
                done(Ok(()));
            }
        }
        Err(error) => shared.fail(&mut state, format!("journal fdatasync failed: {error}")),
    }
}

fn take_satisfied_flushes(state: &mut State) -> Vec<FlushDone> {
    let durable = state.durable_seq;
    let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut state.flush_waiters)
        .into_iter()
        .partition(|(target, _)| *target <= durable);
    state.flush_waiters = waiting;
    ready.into_iter().map(|(_, done)| done).collect()
}

/// The volume failed: fail every queued write and flush. Returns whether there was any.
pub(super) fn fail_everything(shared: &Shared, mut state: MutexGuard<'_, State>) -> bool {
    let reason = state.failed.clone().unwrap_or_else(|| "failed".into());
    let pending: Vec<Pending> = state.pending.drain(..).collect();
    state.pending_bytes = 0;
    let flushes: Vec<FlushDone> = state
        .flush_waiters
        .drain(..)
        .map(|(_, done)| done)
        .collect();
    shared.progress.notify_all();
    drop(state);
    let any = !pending.is_empty() || !flushes.is_empty();
    for pending in pending {
        if let Some(done) = pending.done {
            done(Err(IoError::Failed(reason.clone())));
        }
    }
    for done in flushes {
        done(Err(IoError::Failed(reason.clone())));
    }
    any
}
