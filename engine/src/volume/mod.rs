//! An open volume: the write journal, the in-memory overlay, the applier, reads.
//!
//! Write path: a write becomes one or more [`Record`]s (whole blocks; partial blocks
//! are read-modify-written under the engine lock), each gets the next sequence
//! number, its blocks enter the *overlay* (so reads see it at once) and it is queued
//! for the journal writer thread. That thread group-commits everything queued into
//! one contiguous journal write (padded to a 4 KiB boundary), fdatasyncs when any
//! record asks for FUA or a FLUSH is waiting, and completes the callbacks. The
//! applier thread writes journaled records in place and updates the checksum table,
//! but only once they are durable in the journal (the write-ahead rule), then drops
//! their overlay entries. A checkpoint (data fdatasync, checksum and bitmap pages,
//! superblock) lets the journal ring reuse the space.
//!
//! Invariants (checked in tests and, cheaply, in code):
//! * a block's data in place and its checksum-table entry agree for every block not
//!   in the overlay, except transiently while the applier holds the apply lock;
//! * a record is applied in place only after it is durable in the journal, so after
//!   any crash replay from the checkpoint restores data and checksums together;
//! * the checkpoint never passes a record the peer has not acknowledged while a peer
//!   is attached (its blocks would otherwise be lost to resync after a crash);
//! * sequence numbers only grow, across restarts too (reopen jumps past anything a
//!   torn tail could have left), so recovery can reject stale records by sequence.
//!
//! Memory is bounded: queued-but-unwritten record bytes by `journal_bytes`, written-
//! but-unapplied bytes by the ring itself. Writers block (back-pressure) when full.
//!
//! Two ways to run ([`Background`], chosen at open):
//! * **Threads** (the daemon): a journal writer thread, an applier thread and reader
//!   threads do the work described above; writers wait on condition variables.
//! * **Manual** (a deterministic simulator): no thread is started. Every call does
//!   its own work on the caller's thread and never blocks — a write commits inline, a
//!   flush syncs inline, a read reads inline, back-pressure is worked off inline —
//!   and [`Volume::pump`] does the rest one unit at a time (a group commit round, a
//!   journal fdatasync, an apply batch or a checkpoint). Callbacks run on the
//!   caller's thread, and nothing depends on the clock, so a run replays exactly.
//!   The thread bodies and `pump` share the same step functions (`journal::round`,
//!   `applier::step`); the rules are in `manual.rs`.

mod applier;
mod journal;
mod manual;
mod open;
mod read;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

pub use open::{
    create_image_file, format_uuid, read_superblock, uuid_from_name, CreateOptions, MetaStore,
    OpenReport,
};

use crate::backend::Backend;
use crate::bitmap::Bitmap;
use crate::checksum::{block_crc, ChecksumTable};
use crate::error::{EngineError, IoError};
use crate::layout::Geometry;
use crate::record::{self, Record};
use crate::snapshot::{SnapshotError, SnapshotInfo};
use crate::superblock::Superblock;
use crate::{BLOCK_BYTES, MAX_IO_BYTES, MAX_ZERO_BYTES};

/// Who does an open volume's background work (group commit, journal fdatasyncs,
/// applying, checkpoints, reads).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Background {
    /// A journal writer thread, an applier thread and reader threads; writers wait
    /// when the engine's memory or ring is full. What the daemon runs.
    #[default]
    Threads,
    /// No thread at all: every call does its own work inline and never blocks, and
    /// the rest is done one unit at a time by [`Volume::pump`]. No wall clock either,
    /// so a driver (a deterministic simulator) replays a run exactly. See the
    /// `manual` module of `volume` for the rules.
    Manual,
}

/// Tuning knobs of an open volume.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// Longest time between checkpoints while records are waiting (threaded mode).
    pub checkpoint_interval: Duration,
    /// Threads serving reads from the store (threaded mode).
    pub reader_threads: usize,
    /// Mark the blocks of records replayed at open in the out-of-sync bitmap (their
    /// peer may never have seen them). On for replicated resources.
    pub mark_replayed_out_of_sync: bool,
    /// Engine threads, or work driven by the caller.
    pub background: Background,
    /// A writer may run the group commit on its own thread when the journal thread is
    /// idle and no fdatasync is needed (two thread hand-offs fewer per write). Off
    /// where the caller's thread must never wait for the store (the daemon's
    /// runtime: a hung disk would stall its heartbeats too).
    pub commit_inline: bool,
    /// Bytes of memory for the checksum table cache (pages changed since the last
    /// checkpoint come on top, bounded by the journal: see `docs/FORMAT.md` §4).
    pub checksum_cache_bytes: u64,
    /// The snapshot area, if snapshots are wanted (see [`crate::snapshot`]).
    pub snapshots: Option<crate::snapshot::SnapshotOptions>,
}

impl Default for VolumeOptions {
    fn default() -> VolumeOptions {
        VolumeOptions {
            checkpoint_interval: Duration::from_millis(500),
            reader_threads: 2,
            mark_replayed_out_of_sync: true,
            background: Background::Threads,
            commit_inline: true,
            checksum_cache_bytes: crate::checksum::DEFAULT_CACHE_BYTES,
            snapshots: None,
        }
    }
}

/// Completion of a write (or a replicated record): the sequence number of its last record.
pub type WriteDone = Box<dyn FnOnce(Result<u64, IoError>) + Send>;
/// Completion of a read.
pub type ReadDone = Box<dyn FnOnce(Result<Bytes, IoError>) + Send>;
/// Completion of a flush.
pub type FlushDone = Box<dyn FnOnce(Result<(), IoError>) + Send>;

/// What a client asks to write.
#[derive(Debug, Clone)]
pub enum WriteKind {
    Data(Bytes),
    Trim(u64),
    Zeroes(u64),
}

/// One client write.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub offset: u64,
    pub kind: WriteKind,
    pub fua: bool,
}

impl WriteRequest {
    pub fn length(&self) -> u64 {
        match &self.kind {
            WriteKind::Data(data) => data.len() as u64,
            WriteKind::Trim(length) | WriteKind::Zeroes(length) => *length,
        }
    }
}

/// Counters since open (all monotonic).
#[derive(Debug, Default)]
pub struct Stats {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub journal_commits: AtomicU64,
    pub journal_syncs: AtomicU64,
    pub journal_bytes_written: AtomicU64,
    pub records_applied: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checksum_errors: AtomicU64,
    pub resync_blocks_written: AtomicU64,
    pub resync_blocks_dropped: AtomicU64,
}

/// A snapshot of [`Stats`] plus gauges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub journal_commits: u64,
    pub journal_syncs: u64,
    pub journal_bytes_written: u64,
    pub records_applied: u64,
    pub checkpoints: u64,
    pub checksum_errors: u64,
    pub resync_blocks_written: u64,
    pub resync_blocks_dropped: u64,
    pub journal_used_bytes: u64,
    pub overlay_blocks: u64,
    pub next_seq: u64,
    pub durable_seq: u64,
    pub applied_seq: u64,
    pub checkpoint_seq: u64,
    pub out_of_sync_blocks: u64,
}

/// One overlay entry: the newest unapplied content of a block.
#[derive(Debug, Clone)]
struct OverlayEntry {
    seq: u64,
    /// The oldest write to the block not applied yet (or an older, applied one): with
    /// `seq`, brackets the unapplied writes for changed-block sets.
    first_seq: u64,
    /// `None`: the block reads as zeroes.
    data: Option<Bytes>,
}

/// A sequenced record waiting for the journal writer.
struct Pending {
    record: Record,
    done: Option<WriteDone>,
    /// Clear the record's blocks in the out-of-sync bitmap once applied (records that
    /// came from the peer make those blocks equal to the peer's).
    from_peer: bool,
}

/// Work for the applier, in order.
enum ApplyItem {
    Record {
        record: Record,
        /// Ring offset just past the record (where the next one starts).
        end_pos: u64,
        from_peer: bool,
    },
    /// Resync data on a sync target: written in place without journaling; its
    /// bitmap bits are cleared once applied and persisted at the next checkpoint.
    /// One item per run of consecutive blocks, so the applier writes the run at once.
    Resync {
        first_block: u64,
        blocks: u64,
        data: Option<Bytes>,
        crcs: Vec<u32>,
    },
}

/// A record the peer may not hold: on a primary, one shipped and not yet acknowledged;
/// on a secondary, one received that the primary has not yet reported durable in its
/// own journal. Held in the journal (the checkpoint stops before it), so a crash
/// replays it and replay marks it out of sync; released by [`Volume::peer_acked`];
/// marked out of sync by [`Volume::peer_detached`].
#[derive(Debug, Clone, Copy)]
struct Unacked {
    seq: u64,
    first_block: u64,
    blocks: u64,
}

/// Everything behind the engine lock.
struct State {
    superblock: Superblock,
    next_seq: u64,
    /// Sequence number of the last record sequenced (what a flush must cover). Not
    /// `next_seq - 1`: the sequence jumps forward at open and at the handshake.
    last_sequenced: u64,
    /// Sequence of the last record placed in the ring (the seq a PAD carries).
    last_placed_seq: u64,
    ring_head: u64,
    ring_tail: u64,
    ring_used: u64,
    pending: VecDeque<Pending>,
    pending_bytes: u64,
    apply_queue: VecDeque<ApplyItem>,
    written_seq: u64,
    durable_seq: u64,
    applied_seq: u64,
    /// `(seq, end_pos)` of applied records not yet covered by a checkpoint.
    applied_positions: VecDeque<(u64, u64)>,
    overlay: HashMap<u64, OverlayEntry>,
    flush_waiters: Vec<(u64, FlushDone)>,
    flush_requested: u64,
    checkpoint_requested: bool,
    /// When the last checkpoint finished (threaded mode; manual mode keeps no clock).
    last_checkpoint: Option<Instant>,
    failed: Option<Arc<str>>,
    closing: bool,
    bitmap: Bitmap,
    peer_attached: bool,
    unacked: VecDeque<Unacked>,
    /// On a sync target: blocks written through the replication stream since the
    /// resync began; resync data for them is stale and dropped.
    resync_written: Option<Bitmap>,
    /// The journal writer / applier sleeps on its condition variable (so a wake-up,
    /// a futex system call, is only paid when someone actually waits).
    writer_idle: bool,
    applier_idle: bool,
    /// The applier has taken a batch off `apply_queue` and not yet finished it.
    applying: bool,
    /// Threads waiting on `progress`.
    progress_waiters: usize,
    /// A group commit round is running (on the journal thread or inline).
    committing: bool,
    /// Bytes of resync data queued for the applier (bounded: a sync target
    /// acknowledges resync data when queued, so this bounds what it owes).
    resync_queued_bytes: u64,
    /// Points of the valid snapshots: the applier never puts records from both sides
    /// of one into a batch (the block a snapshot preserves is the one in place when the
    /// first record after its point is applied).
    snapshot_points: Vec<u64>,
    /// The highest sequence number the applier has taken off the queue: a snapshot at
    /// an older point can no longer be made.
    taken_seq: u64,
    /// Points the applier must not pass yet (snapshots being made durable).
    apply_holds: Vec<u64>,
}

impl State {
    fn check_usable(&self) -> Result<(), IoError> {
        if let Some(reason) = &self.failed {
            return Err(IoError::Failed(reason.clone()));
        }
        if self.closing {
            return Err(IoError::Closed);
        }
        Ok(())
    }

    fn bitmap_dirty(&self) -> bool {
        self.bitmap.has_dirty()
    }

    /// Everything sequenced is journaled and written in place.
    fn all_applied(&self) -> bool {
        self.apply_queue.is_empty() && self.pending.is_empty() && !self.applying
    }

    fn checkpoint_limit(&self) -> u64 {
        let hold = self
            .unacked
            .front()
            .map_or(u64::MAX, |unacked| unacked.seq - 1);
        self.applied_seq.min(hold)
    }
}

/// Reads waiting for a reader thread, and how many readers sleep.
#[derive(Default)]
struct ReadQueue {
    jobs: VecDeque<ReadJob>,
    idle: usize,
}

struct ReadJob {
    offset: u64,
    length: u64,
    /// A read of this snapshot, not of the volume.
    snapshot: Option<String>,
    done: ReadDone,
}

/// Drops one hold at `point` and lets the applier go on.
fn release_hold(shared: &Shared, state: &mut State, point: u64) {
    if let Some(index) = state.apply_holds.iter().position(|&p| p == point) {
        state.apply_holds.swap_remove(index);
    }
    shared.wake_applier(state);
}

/// Reads whole blocks in place (what copy-on-write preserves).
pub(crate) fn read_in_place(data: &dyn Backend, blocks: &[u64]) -> Result<Vec<Vec<u8>>, String> {
    let mut out: Vec<Vec<u8>> = blocks
        .iter()
        .map(|_| vec![0u8; BLOCK_BYTES as usize])
        .collect();
    let mut ops: Vec<crate::backend::ReadOp<'_>> = blocks
        .iter()
        .zip(out.iter_mut())
        .map(|(&block, buf)| crate::backend::ReadOp {
            offset: block * BLOCK_BYTES,
            buf,
        })
        .collect();
    data.read_many(&mut ops).map_err(|e| e.to_string())?;
    drop(ops);
    Ok(out)
}

/// Shared between the handle and the engine's threads.
pub(crate) struct Shared {
    data: Arc<dyn Backend>,
    meta: Arc<dyn Backend>,
    geometry: Geometry,
    checksums: ChecksumTable,
    options: VolumeOptions,
    state: Mutex<State>,
    /// Wakes the journal writer.
    writer_wake: Condvar,
    /// Wakes the applier.
    applier_wake: Condvar,
    /// Wakes anyone waiting for progress (memory, ring space, durability).
    progress: Condvar,
    /// Held for writing while the applier changes data in place and the checksum
    /// table; a read whose checksum fails retries under it for reading.
    apply_lock: RwLock<()>,
    /// Serialises superblock writes.
    superblock_lock: Mutex<()>,
    /// Serialises encoding and writing bitmap pages, so an older snapshot of a page is
    /// never written after a newer one.
    bitmap_io: Mutex<()>,
    reads: Mutex<ReadQueue>,
    reads_wake: Condvar,
    /// Manual mode: held (with `try_lock`, never waited for) while a unit of the
    /// applier's work runs, so two callers of `pump` on different threads cannot
    /// apply or checkpoint at once. Threaded mode never touches it: there the applier
    /// thread alone does that work.
    applier_turn: Mutex<()>,
    stats: Stats,
    /// `State::failed` is set (it never clears): lets [`Volume::failure`] answer
    /// without the engine lock, which the state machine asks on every step.
    failed_flag: AtomicBool,
    /// The snapshots, if an area is configured. Taken after the state lock, never
    /// before it.
    snapshots: Option<Mutex<crate::snapshot::Snapshots>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means an engine thread panicked: a bug. Keep serving what we
        // can rather than cascade the panic into every client thread.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Manual mode: no threads, the caller drives the background work.
    fn manual(&self) -> bool {
        self.options.background == Background::Manual
    }

    /// Back-pressure: returns once `full(state)` is false. Threaded mode waits for the
    /// background threads; manual mode does their work inline instead and fails with
    /// [`IoError::Stalled`] (`stalled` says what is full) when none can be done.
    fn wait_while<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        full: impl Fn(&State) -> bool,
        stalled: &'static str,
    ) -> Result<MutexGuard<'a, State>, IoError> {
        if self.manual() {
            return manual::work_while(self, state, full, stalled);
        }
        while full(&state) {
            // What is pending may be deferred writes whose callers commit them only
            // after this one returns (async tasks on this very thread): the journal
            // thread commits them instead, or this waits for itself.
            self.wake_writer(&state);
            state = self.wait_progress(state, Duration::from_millis(100));
            state.check_usable()?;
        }
        Ok(state)
    }

    fn fail(&self, state: &mut State, reason: String) {
        if state.failed.is_none() {
            tracing::error!("volume failed: {reason}");
            state.failed = Some(reason.into());
            self.failed_flag.store(true, Ordering::Release);
        }
        self.writer_wake.notify_all();
        self.applier_wake.notify_all();
        self.progress.notify_all();
    }

    /// Wakes the journal writer if it sleeps. Call with the engine lock held.
    fn wake_writer(&self, state: &State) {
        if state.writer_idle {
            self.writer_wake.notify_one();
        }
    }

    /// Wakes the applier if it sleeps. Call with the engine lock held.
    fn wake_applier(&self, state: &State) {
        if state.applier_idle {
            self.applier_wake.notify_one();
        }
    }

    /// Wakes threads waiting for progress, if any. Call with the engine lock held.
    fn wake_progress(&self, state: &State) {
        if state.progress_waiters > 0 {
            self.progress.notify_all();
        }
    }

    /// Waits for progress (at most `timeout`), counted so wakers know to notify.
    fn wait_progress<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        state.progress_waiters += 1;
        let mut state = self
            .progress
            .wait_timeout(state, timeout)
            .map(|(guard, _)| guard)
            .unwrap_or_else(|p| p.into_inner().0);
        state.progress_waiters -= 1;
        state
    }

    fn checksums_dirty(&self) -> bool {
        self.checksums.has_dirty()
    }

    fn max_memory_bytes(&self) -> u64 {
        self.geometry.journal_bytes
    }

    /// Writes the bitmap pages changed since the last call (not yet durable).
    fn write_bitmap_pages(&self) -> Result<(), EngineError> {
        let _io = self.bitmap_io.lock().unwrap_or_else(|p| p.into_inner());
        // The pages as they are at this point of the checkpoint, written in runs.
        let dirty = self.lock().bitmap.take_dirty();
        let written = dirty.write_runs(BITMAP_WRITE_PAGES, |page, bytes| {
            self.meta.write_at(
                self.geometry.bitmap_offset + page * crate::layout::PAGE_BYTES,
                bytes,
            )
        });
        if let Err((failed, error)) = written {
            let mut state = self.lock();
            dirty
                .pages()
                .filter(|&page| page >= failed)
                .for_each(|page| state.bitmap.mark_page_dirty(page as usize));
            return Err(error.into());
        }
        Ok(())
    }

    /// Writes `superblock` to its next copy and makes it durable.
    fn write_superblock(&self, superblock: &Superblock) -> Result<(), EngineError> {
        let copy = superblock.next_copy();
        let offset = self.geometry.superblock_offsets[copy];
        self.meta.write_at(offset, &superblock.encode())?;
        self.meta.flush()?;
        Ok(())
    }
}

/// An open volume. Cloning shares it. Dropping the last handle without
/// [`Volume::close`] stops the threads without a final checkpoint (like a crash).
pub struct Volume {
    shared: Arc<Shared>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("geometry", &self.shared.geometry)
            .finish()
    }
}

/// A boxed completion callback.
type Callback<T> = Box<dyn FnOnce(Result<T, IoError>) + Send>;

/// Bitmap pages written in one call (1 MiB).
pub(crate) const BITMAP_WRITE_PAGES: usize = 256;

/// Most resync data a sync target holds queued for the applier.
const MAX_RESYNC_QUEUED_BYTES: u64 = 32 << 20;

/// Why a manual-mode write or replicated record cannot be taken (`IoError::Stalled`).
const MEMORY_FULL: &str = "the journal queue is full and no inline work can make room";

/// Calls `done` once all `parts` sub-operations have completed (first error wins).
struct Join<T> {
    remaining: usize,
    result: Result<T, IoError>,
    done: Option<Callback<T>>,
}

fn join_callbacks<T: Send + Copy + Ord + 'static>(
    parts: usize,
    initial: T,
    done: Callback<T>,
) -> Vec<Callback<T>> {
    if parts == 1 {
        return vec![done];
    }
    let join = Arc::new(Mutex::new(Join {
        remaining: parts,
        result: Ok(initial),
        done: Some(done),
    }));
    (0..parts)
        .map(|_| {
            let join = join.clone();
            Box::new(move |result: Result<T, IoError>| {
                let mut join = join.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                match (&mut join.result, result) {
                    (Ok(best), Ok(value)) => *best = (*best).max(value),
                    (Ok(_), Err(error)) => join.result = Err(error),
                    (Err(_), _) => {}
                }
                join.remaining -= 1;
                if join.remaining == 0 {
                    let result = std::mem::replace(&mut join.result, Err(IoError::Closed));
                    if let Some(done) = join.done.take() {
                        drop(join);
                        done(result);
                    }
                }
            }) as Callback<T>
        })
        .collect()
}

/// Validates an I/O range against the volume with checked arithmetic. `limit` is the
/// longest request of its kind.
fn check_io(
    op: &'static str,
    offset: u64,
    length: u64,
    size_bytes: u64,
    limit: u64,
) -> Result<(), IoError> {
    if length == 0 {
        return Err(IoError::ZeroLength { op });
    }
    if length > limit {
        return Err(IoError::TooLarge { op, length, limit });
    }
    if offset
        .checked_add(length)
        .is_none_or(|end| end > size_bytes)
    {
        return Err(IoError::OutOfRange {
            op,
            offset,
            length,
            size_bytes,
        });
    }
    Ok(())
}

impl Volume {
    pub fn size_bytes(&self) -> u64 {
        self.shared.geometry.data_bytes
    }

    pub fn geometry(&self) -> Geometry {
        self.shared.geometry
    }

    /// A copy of the in-memory superblock (what the next superblock write will hold).
    /// The stored disk state alone (no copy of the superblock).
    pub fn stored_disk_state(&self) -> crate::superblock::StoredDiskState {
        self.shared.lock().superblock.disk_state
    }

    pub fn superblock(&self) -> Superblock {
        self.shared.lock().superblock.clone()
    }

    /// Changes persistent state (generations, disk state, flags) and writes it durably.
    pub fn update_superblock(
        &self,
        change: impl FnOnce(&mut Superblock),
    ) -> Result<Superblock, EngineError> {
        let _guard = self
            .shared
            .superblock_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let superblock = {
            let mut state = self.shared.lock();
            if let Some(reason) = &state.failed {
                return Err(EngineError::Failed(reason.to_string()));
            }
            change(&mut state.superblock);
            state.superblock.sequence += 1;
            state.superblock.clone()
        };
        self.shared.write_superblock(&superblock)?;
        Ok(superblock)
    }

    /// Why the volume failed, if it did (a journal or store write error).
    pub fn failure(&self) -> Option<String> {
        if !self.shared.failed_flag.load(Ordering::Acquire) {
            return None;
        }
        self.shared
            .lock()
            .failed
            .as_ref()
            .map(|reason| reason.to_string())
    }

    /// Submits a client write. Returns the records it became, in sequence order (the
    /// replication stream ships them); `done` fires when all are in the journal
    /// (durable there too if `fua`). Blocks while the engine's memory budget is full.
    ///
    /// Manual mode: makes room and commits inline, so `done` has run when this
    /// returns, unless the journal cannot take the records yet (they wait for the
    /// peer's acknowledgements); then a later [`Volume::pump`] runs it.
    pub fn write(&self, request: WriteRequest, done: WriteDone) -> Result<Vec<Record>, IoError> {
        self.write_with(request, done, true)
    }

    /// As [`Volume::write`], but when the group commit could run on this thread, it is
    /// left for [`Volume::commit_pending`]: a caller that knows more writes are about to
    /// be sequenced (an async front end that yields once) lets one commit take them all,
    /// instead of one commit (and one fresh journal page) per write. The caller must
    /// call `commit_pending` afterwards; until then the write stays uncommitted.
    /// Manual mode: only sequences (after making room inline if the memory budget is
    /// full); the commit happens in `commit_pending` or [`Volume::pump`].
    pub fn write_deferred(
        &self,
        request: WriteRequest,
        done: WriteDone,
    ) -> Result<Vec<Record>, IoError> {
        self.write_with(request, done, false)
    }

    /// Commits whatever is sequenced and not yet committed: on this thread when that is
    /// cheap (see `write`), else by waking the journal thread. Cheap when nothing waits.
    /// Manual mode: runs group-commit rounds inline (fdatasync included when a record
    /// has FUA or a flush waits) until nothing is pending, or nothing can be placed.
    pub fn commit_pending(&self) {
        let shared = &self.shared;
        if shared.manual() {
            return manual::commit(shared);
        }
        let state = shared.lock();
        if state.pending.is_empty() {
            return;
        }
        commit_or_hand_off(shared, state);
    }

    fn write_with(
        &self,
        request: WriteRequest,
        done: WriteDone,
        commit_now: bool,
    ) -> Result<Vec<Record>, IoError> {
        let size_bytes = self.size_bytes();
        let length = request.length();
        // TRIM and WRITE_ZEROES carry no data: they may be longer than a data write
        // (up to the 32-bit NBD length) and become records of at most 32 MiB each.
        let (limit, budget) = match &request.kind {
            WriteKind::Data(_) => (
                MAX_IO_BYTES,
                length.next_multiple_of(BLOCK_BYTES) + 2 * BLOCK_BYTES,
            ),
            // Their records queue a header each, plus at most two read-modify-written
            // edge blocks.
            WriteKind::Trim(_) | WriteKind::Zeroes(_) => (
                MAX_ZERO_BYTES,
                length.div_ceil(MAX_IO_BYTES) * record::RECORD_FIXED_BYTES as u64
                    + 2 * (BLOCK_BYTES + record::header_bytes_for(1) as u64),
            ),
        };
        check_io("write", request.offset, length, size_bytes, limit)?;
        let shared = &self.shared;
        shared.stats.writes.fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .write_bytes
            .fetch_add(length, Ordering::Relaxed);
        let max_record = shared.geometry.max_record_data_bytes();
        // Reserve memory first: waiting releases the lock, and the read-modify-write
        // below must not be interleaved with other writes.
        let mut state = shared.lock();
        state.check_usable()?;
        state = shared.wait_while(
            state,
            |state| {
                state.pending_bytes > 0 && state.pending_bytes + budget > shared.max_memory_bytes()
            },
            MEMORY_FULL,
        )?;
        // Turn the request into whole-block pieces (read-modify-write at the edges).
        let pieces = match &request.kind {
            WriteKind::Data(data) => {
                let (first_block, blocks) = self.whole_blocks(&state, request.offset, data)?;
                split_data(first_block, blocks, max_record)
            }
            WriteKind::Trim(length) | WriteKind::Zeroes(length) => {
                let is_trim = matches!(request.kind, WriteKind::Trim(_));
                self.zero_pieces(&state, request.offset, *length, is_trim, max_record)?
            }
        };
        if pieces.is_empty() {
            // A TRIM inside one block: advisory, nothing to do.
            let seq = state.next_seq - 1;
            drop(state);
            done(Ok(seq));
            return Ok(Vec::new());
        }
        let callbacks = join_callbacks(pieces.len(), 0u64, done);
        let mut records = Vec::with_capacity(pieces.len());
        for (piece, done) in pieces.into_iter().zip(callbacks) {
            let seq = state.next_seq;
            state.next_seq += 1;
            let record = piece.into_record(seq, request.fua);
            self.sequence(&mut state, record.clone(), Some(done), false);
            records.push(record);
        }
        commit_after_sequencing(shared, state, commit_now);
        Ok(records)
    }

    /// Puts a sequenced record into the overlay, the out-of-sync tracking and the
    /// journal queue.
    fn sequence(
        &self,
        state: &mut State,
        record: Record,
        done: Option<WriteDone>,
        from_peer: bool,
    ) {
        let header = &record.header;
        let first_block = header.first_block();
        let blocks = header.block_count();
        let seq = header.seq;
        for index in 0..blocks {
            let data = (!record.data.is_empty()).then(|| {
                let start = (index * BLOCK_BYTES) as usize;
                record.data.slice(start..start + BLOCK_BYTES as usize)
            });
            let first_seq = state
                .overlay
                .get(&(first_block + index))
                .map_or(seq, |older| older.first_seq);
            state.overlay.insert(
                first_block + index,
                OverlayEntry {
                    seq,
                    first_seq,
                    data,
                },
            );
        }
        if from_peer || state.peer_attached {
            state.unacked.push_back(Unacked {
                seq,
                first_block,
                blocks,
            });
        } else {
            state.bitmap.set_range(first_block, blocks);
        }
        if let (true, Some(written)) = (from_peer, state.resync_written.as_mut()) {
            written.set_range(first_block, blocks);
        }
        state.last_sequenced = state.last_sequenced.max(seq);
        state.pending_bytes += record.total_bytes();
        state.pending.push_back(Pending {
            record,
            done,
            from_peer,
        });
    }

    /// Turns a possibly unaligned data write into whole blocks, reading the edge
    /// blocks (overlay first, then the store, checksum-checked) under the lock.
    fn whole_blocks(
        &self,
        state: &State,
        offset: u64,
        data: &Bytes,
    ) -> Result<(u64, Bytes), IoError> {
        let first_block = offset / BLOCK_BYTES;
        let head = (offset % BLOCK_BYTES) as usize;
        let end = offset + data.len() as u64;
        let tail = (end % BLOCK_BYTES) as usize;
        if head == 0 && tail == 0 {
            return Ok((first_block, data.clone()));
        }
        let last_block = (end - 1) / BLOCK_BYTES;
        let blocks = (last_block - first_block + 1) as usize;
        let mut merged = BytesMut::zeroed(blocks * BLOCK_BYTES as usize);
        if head != 0 {
            let old = self.read_block_locked(state, first_block)?;
            merged[..BLOCK_BYTES as usize].copy_from_slice(&old);
        }
        if tail != 0 && (last_block != first_block || head == 0) {
            let old = self.read_block_locked(state, last_block)?;
            let at = (blocks - 1) * BLOCK_BYTES as usize;
            merged[at..].copy_from_slice(&old);
        }
        merged[head..head + data.len()].copy_from_slice(data);
        Ok((first_block, merged.freeze()))
    }

    /// Reads one block while holding the engine lock (no write can race it).
    fn read_block_locked(&self, state: &State, block: u64) -> Result<Vec<u8>, IoError> {
        if let Some(entry) = state.overlay.get(&block) {
            return Ok(entry
                .data
                .as_ref()
                .map_or_else(|| vec![0; BLOCK_BYTES as usize], |data| data.to_vec()));
        }
        // Not in the overlay, and we hold the engine lock: the applier finished every
        // write of this block (it drops overlay entries only after writing data and
        // checksum), and no new one can start. Resync writes, which bypass the
        // overlay, only happen on a sync target, which never takes client writes.
        // So the store and the table agree here unless the block is corrupt.
        let mut buf = vec![0u8; BLOCK_BYTES as usize];
        self.shared.data.read_at(block * BLOCK_BYTES, &mut buf)?;
        self.check_block(block, &buf)?;
        Ok(buf)
    }

    fn check_block(&self, block: u64, data: &[u8]) -> Result<(), IoError> {
        let stored = self.shared.checksums.get(block)?;
        let computed = block_crc(data);
        if stored != computed {
            self.shared
                .stats
                .checksum_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "checksum mismatch in block {block}: stored {stored:#010x}, data {computed:#010x}"
            );
            return Err(IoError::Checksum {
                block,
                stored,
                computed,
            });
        }
        Ok(())
    }

    /// TRIM/WRITE_ZEROES: whole blocks become zero records; partial edge blocks of
    /// WRITE_ZEROES become data records (read-modify-write); TRIM ignores partial
    /// edges (it is advisory).
    fn zero_pieces(
        &self,
        state: &State,
        offset: u64,
        length: u64,
        is_trim: bool,
        max_record: u64,
    ) -> Result<Vec<Piece>, IoError> {
        let end = offset + length;
        let first_full = offset.div_ceil(BLOCK_BYTES);
        let end_full = end / BLOCK_BYTES;
        let kind = if is_trim {
            record::flags::TRIM
        } else {
            record::flags::ZEROES
        };
        let mut pieces = whole_zero_pieces(first_full, end_full, kind);
        if is_trim {
            return Ok(pieces);
        }
        let partial_ranges = if first_full > end_full {
            // Start and end inside the same block.
            vec![(offset, end)]
        } else {
            let mut ranges = Vec::new();
            if offset % BLOCK_BYTES != 0 {
                ranges.push((offset, first_full * BLOCK_BYTES));
            }
            if end % BLOCK_BYTES != 0 {
                ranges.push((end_full * BLOCK_BYTES, end));
            }
            ranges
        };
        for (start, stop) in partial_ranges {
            let zeros = Bytes::from(vec![0u8; (stop - start) as usize]);
            let (first_block, data) = self.whole_blocks(state, start, &zeros)?;
            pieces.extend(split_data(first_block, data, max_record));
        }
        Ok(pieces)
    }

    /// Submits a flush: `done` fires when every write submitted before it is durable.
    pub fn flush(&self, done: FlushDone) {
        let shared = &self.shared;
        shared.stats.flushes.fetch_add(1, Ordering::Relaxed);
        let mut state = shared.lock();
        if let Err(error) = state.check_usable() {
            drop(state);
            return done(Err(error));
        }
        let target = state.last_sequenced;
        if state.durable_seq >= target {
            drop(state);
            return done(Ok(()));
        }
        state.flush_requested = state.flush_requested.max(target);
        state.flush_waiters.push((target, done));
        if shared.manual() {
            drop(state);
            return manual::commit(shared);
        }
        shared.wake_writer(&state);
        drop(state);
    }

    /// Submits a read; `done` gets exactly `length` bytes or an error. Manual mode:
    /// the read runs on this thread and `done` has run when this returns.
    pub fn read(&self, offset: u64, length: u64, done: ReadDone) {
        if let Err(error) = check_io("read", offset, length, self.size_bytes(), MAX_IO_BYTES) {
            return done(Err(error));
        }
        self.queue_read(ReadJob {
            offset,
            length,
            snapshot: None,
            done,
        });
    }

    /// Queues a read for the reader threads (manual mode: serves it now).
    fn queue_read(&self, job: ReadJob) {
        let shared = &self.shared;
        if shared.manual() {
            return read::read_batch(shared, vec![job]);
        }
        let mut queue = shared.reads.lock().unwrap_or_else(|p| p.into_inner());
        queue.jobs.push_back(job);
        if queue.idle > 0 {
            shared.reads_wake.notify_one();
        }
    }

    /// Reads synchronously on the calling thread (tools, tests, resync source).
    pub fn read_blocking(&self, offset: u64, length: u64) -> Result<Bytes, IoError> {
        check_io("read", offset, length, self.size_bytes(), MAX_IO_BYTES)?;
        read::read_now(&self.shared, offset, length)
    }

    /// Writes synchronously (tools and tests). Manual mode: never waits; a write the
    /// journal cannot take yet fails with [`IoError::Stalled`] (it stays sequenced and
    /// completes at a later [`Volume::pump`]).
    pub fn write_blocking(&self, request: WriteRequest) -> Result<u64, IoError> {
        let (sender, receiver) = std::sync::mpsc::channel();
        self.write(request, Box::new(move |result| drop(sender.send(result))))?;
        self.completion(&receiver, "the write is not in the journal yet")
    }

    /// Flushes synchronously (manual mode: as `write_blocking`).
    pub fn flush_blocking(&self) -> Result<(), IoError> {
        let (sender, receiver) = std::sync::mpsc::channel();
        self.flush(Box::new(move |result| drop(sender.send(result))));
        self.completion(&receiver, "the flush cannot be made durable yet")
    }

    /// The result a callback sent: waited for in threaded mode; in manual mode the
    /// call that caused it ran it already, or `Stalled` (`stalled` says why).
    fn completion<T>(
        &self,
        receiver: &std::sync::mpsc::Receiver<Result<T, IoError>>,
        stalled: &'static str,
    ) -> Result<T, IoError> {
        if !self.shared.manual() {
            return receiver.recv().unwrap_or(Err(IoError::Closed));
        }
        match receiver.try_recv() {
            Ok(result) => result,
            Err(std::sync::mpsc::TryRecvError::Empty) => Err(IoError::Stalled(stalled)),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(IoError::Closed),
        }
    }

    /// Every record up to this sequence number is durable in the journal.
    pub fn durable_seq(&self) -> u64 {
        self.shared.lock().durable_seq
    }

    /// The next sequence number a local write would get.
    pub fn next_seq(&self) -> u64 {
        self.shared.lock().next_seq
    }

    /// Moves the sequence forward to at least `seq` (the handshake aligns both nodes
    /// on the larger value so a secondary can journal the primary's numbers).
    pub fn advance_seq(&self, seq: u64) {
        let mut state = self.shared.lock();
        state.next_seq = state.next_seq.max(seq);
    }

    /// Secondary: journals a record received from the primary, keeping its sequence
    /// number. `done` fires when it is in the journal (durable too if FUA). Waits while
    /// the engine's memory budget is full. The record stays in the journal until
    /// [`Volume::peer_acked`] covers it (the primary's journal has it too), so a crash
    /// of both nodes cannot leave it in place here and absent there unnoticed.
    pub fn append_replicated(&self, record: Record, done: WriteDone) -> Result<(), IoError> {
        self.append_replicated_with(record, done, true).map(drop)
    }

    /// As [`Volume::append_replicated`], but never waits and leaves the group commit
    /// to the caller (as [`Volume::write_deferred`]): when the memory budget is full,
    /// the record and its callback come back untouched (`Some`), for the caller to
    /// [`Volume::commit_pending`] and retry where blocking is allowed. Lets an async
    /// caller stay on its thread and commit every record it has at hand in one round.
    /// Manual mode: when the budget is full, room is first made inline; the record
    /// comes back only when no inline work can make room.
    pub fn try_append_replicated_deferred(
        &self,
        record: Record,
        done: WriteDone,
    ) -> Result<Option<(Record, WriteDone)>, IoError> {
        self.append_replicated_with(record, done, false)
    }

    fn append_replicated_with(
        &self,
        record: Record,
        done: WriteDone,
        wait: bool,
    ) -> Result<Option<(Record, WriteDone)>, IoError> {
        let header = &record.header;
        let end = header.offset_bytes.checked_add(header.length_bytes);
        if end.is_none_or(|end| end > self.size_bytes()) {
            return Err(IoError::BadRecord(
                format!("record {} reaches beyond the volume", header.seq).into(),
            ));
        }
        let shared = &self.shared;
        // A record must fit the ring with the page kept free (see journal placement).
        if record.total_bytes() + 2 * crate::layout::PAGE_BYTES > shared.geometry.journal_bytes {
            return Err(IoError::BadRecord(
                format!(
                    "record {} of {} bytes cannot fit this node's {}-byte journal",
                    header.seq,
                    record.total_bytes(),
                    shared.geometry.journal_bytes
                )
                .into(),
            ));
        }
        let mut state = shared.lock();
        state.check_usable()?;
        if header.seq < state.next_seq {
            return Err(IoError::BadRecord(
                format!(
                    "record {} arrived after {} (out of order or replayed)",
                    header.seq,
                    state.next_seq - 1
                )
                .into(),
            ));
        }
        let size = record.total_bytes();
        let full = |state: &State| {
            state.pending_bytes > 0 && state.pending_bytes + size > shared.max_memory_bytes()
        };
        if !wait && !shared.manual() && full(&state) {
            return Ok(Some((record, done)));
        }
        state = match shared.wait_while(state, full, MEMORY_FULL) {
            Ok(state) => state,
            Err(IoError::Stalled(_)) if !wait => return Ok(Some((record, done))),
            Err(error) => return Err(error),
        };
        state.next_seq = header.seq + 1;
        self.sequence(&mut state, record, Some(done), true);
        commit_after_sequencing(shared, state, wait);
        Ok(None)
    }

    /// Sync target: begins tracking blocks written through the stream, so stale
    /// resync data for them is dropped.
    pub fn begin_resync_target(&self) {
        let mut state = self.shared.lock();
        let blocks = self.shared.geometry.data_blocks();
        // Already tracking (the target was marked before its bitmap came): keep what
        // the replication stream wrote meanwhile.
        state
            .resync_written
            .get_or_insert_with(|| Bitmap::new(blocks));
    }

    /// Sync target: resync finished (or abandoned).
    pub fn end_resync_target(&self) {
        self.shared.lock().resync_written = None;
    }

    /// Sync target: writes resync data for `[first_block, first_block + blocks)` in
    /// place (not journaled; the out-of-sync bits stay set on disk until it is
    /// durable). `data` is `None` for zero blocks, else whole blocks matching `crcs`.
    /// Blocks the stream wrote since the resync began are skipped (stale). Returns
    /// the number of blocks queued. Waits while the resync queue is full (manual mode:
    /// applies inline instead).
    pub fn write_resync(
        &self,
        first_block: u64,
        blocks: u64,
        data: Option<Bytes>,
        crcs: Vec<u32>,
    ) -> Result<u64, IoError> {
        let size_blocks = self.shared.geometry.data_blocks();
        if blocks == 0
            || first_block
                .checked_add(blocks)
                .is_none_or(|end| end > size_blocks)
        {
            return Err(IoError::BadRecord(
                format!("resync range {first_block}+{blocks} is outside the volume").into(),
            ));
        }
        if let Some(data) = &data {
            if data.len() as u64 != blocks * BLOCK_BYTES || crcs.len() as u64 != blocks {
                return Err(IoError::BadRecord(
                    "resync data length does not match its block count".into(),
                ));
            }
        }
        let shared = &self.shared;
        let state = shared.lock();
        state.check_usable()?;
        // Back-pressure: the source's window is only as good as our applying.
        let mut state = shared.wait_while(
            state,
            |state| state.resync_queued_bytes >= MAX_RESYNC_QUEUED_BYTES,
            "the resync queue is full and no inline work can apply it",
        )?;
        let mut queued = 0;
        let mut dropped = 0;
        // Runs of blocks not rewritten meanwhile (stale ones are dropped): one item each.
        let mut index = 0;
        while index < blocks {
            let is_stale = |index: u64| {
                let block = first_block + index;
                state
                    .resync_written
                    .as_ref()
                    .is_some_and(|written| written.test(block))
                    || state.overlay.contains_key(&block)
            };
            if is_stale(index) {
                dropped += 1;
                index += 1;
                continue;
            }
            let run_start = index;
            while index < blocks && !is_stale(index) {
                index += 1;
            }
            let run_blocks = index - run_start;
            let (run_data, run_crcs) =
                match &data {
                    Some(data) => (
                        Some(data.slice(
                            (run_start * BLOCK_BYTES) as usize..(index * BLOCK_BYTES) as usize,
                        )),
                        crcs[run_start as usize..index as usize].to_vec(),
                    ),
                    None => (None, Vec::new()),
                };
            state.resync_queued_bytes += run_blocks * BLOCK_BYTES;
            state.apply_queue.push_back(ApplyItem::Resync {
                first_block: first_block + run_start,
                blocks: run_blocks,
                data: run_data,
                crcs: run_crcs,
            });
            queued += run_blocks;
        }
        shared.wake_applier(&state);
        drop(state);
        shared
            .stats
            .resync_blocks_written
            .fetch_add(queued, Ordering::Relaxed);
        shared
            .stats
            .resync_blocks_dropped
            .fetch_add(dropped, Ordering::Relaxed);
        Ok(queued)
    }

    /// Blocks until the applier has written everything queued so far in place.
    /// Manual mode: does that work inline (ignoring `timeout`) and returns at once;
    /// false if it could not all be done (failed, or records wait for the peer).
    pub fn wait_applied(&self, timeout: Duration) -> bool {
        let shared = &self.shared;
        if shared.manual() {
            let (state, _) = manual::drive(shared, |state| {
                state.all_applied() || state.failed.is_some()
            });
            return state.all_applied() && state.failed.is_none();
        }
        let deadline = Instant::now() + timeout;
        let mut state = shared.lock();
        loop {
            if state.all_applied() || state.failed.is_some() {
                return state.failed.is_none();
            }
            shared.applier_wake.notify_one();
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = shared.wait_progress(state, deadline - now);
        }
    }

    /// Forces a checkpoint now and waits for it (makes applied resync data and bitmap
    /// changes durable). Manual mode: does it inline (ignoring `timeout`).
    pub fn checkpoint_blocking(&self, timeout: Duration) -> bool {
        let shared = &self.shared;
        if !self.wait_applied(timeout) {
            return false;
        }
        // Counted only now that everything is applied: the applier does one thing at a
        // time, so any checkpoint that finishes from here on started after the last
        // batch and covers it. (Counted before `wait_applied`, a checkpoint taken
        // between two batches during that wait would have been mistaken for ours.)
        let before = shared.stats.checkpoints.load(Ordering::Acquire);
        let checkpointed = || shared.stats.checkpoints.load(Ordering::Acquire) != before;
        let mut state = shared.lock();
        state.checkpoint_requested = true;
        if shared.manual() {
            drop(state);
            let (state, _) =
                manual::drive(shared, |state| checkpointed() || state.failed.is_some());
            return checkpointed() && state.failed.is_none();
        }
        let deadline = Instant::now() + timeout;
        shared.applier_wake.notify_one();
        while !checkpointed() && state.failed.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = shared.wait_progress(state, deadline - now);
        }
        state.failed.is_none()
    }

    // ----- replication bookkeeping -----

    /// A peer is connected and in sync: records from now on are held in the journal
    /// until it acknowledges them.
    pub fn peer_attached(&self) {
        self.shared.lock().peer_attached = true;
    }

    /// The peer holds every record up to `seq`: a primary's peer acknowledged them, or
    /// a secondary's primary reported them durable in its journal.
    pub fn peer_acked(&self, seq: u64) {
        let mut state = self.shared.lock();
        let mut released = false;
        while state
            .unacked
            .front()
            .is_some_and(|unacked| unacked.seq <= seq)
        {
            state.unacked.pop_front();
            released = true;
        }
        if released {
            self.shared.wake_applier(&state);
        }
        drop(state);
    }

    /// The peer is gone: every record it may not hold is marked out of sync, and
    /// later writes are too. Returns how many held records were marked.
    pub fn peer_detached(&self) -> usize {
        let mut state = self.shared.lock();
        state.peer_attached = false;
        let mut marked = 0;
        while let Some(unacked) = state.unacked.pop_front() {
            state.bitmap.set_range(unacked.first_block, unacked.blocks);
            marked += 1;
        }
        self.shared.wake_applier(&state);
        drop(state);
        marked
    }

    /// Makes the out-of-sync bitmap durable now (a sync target persists the bits it
    /// merged before it acknowledges any resync data).
    pub fn persist_bitmap(&self) -> Result<(), EngineError> {
        self.shared.write_bitmap_pages()?;
        self.shared.meta.flush()?;
        Ok(())
    }

    /// Number of blocks marked out of sync.
    pub fn out_of_sync_blocks(&self) -> u64 {
        self.shared.lock().bitmap.count_ones()
    }

    /// A copy of the out-of-sync bitmap (its memory follows the pages with bits set).
    pub fn bitmap(&self) -> Bitmap {
        self.shared.lock().bitmap.clone()
    }

    /// `count` words of the out-of-sync bitmap from word `first_word` (clamped to
    /// the bitmap), for shipping to the peer one frame at a time.
    pub fn bitmap_words_at(&self, first_word: u64, count: u64) -> Vec<u64> {
        self.shared.lock().bitmap.words_at(first_word, count)
    }

    /// Counters of the checksum table's cache.
    pub fn checksum_cache_stats(&self) -> crate::checksum::CacheStats {
        self.shared.checksums.stats()
    }

    /// Adds the peer's out-of-sync blocks (bitmap words starting at word
    /// `first_word`) to ours: both sides resync the union.
    pub fn merge_bitmap_at(&self, first_word: u64, words: &[u64]) {
        let mut state = self.shared.lock();
        let bits = state.bitmap.bits();
        for (index, word) in words.iter().enumerate() {
            // Words past the end (a peer's bad frame) are ignored, never wrapped.
            let Some(base) = first_word
                .checked_add(index as u64)
                .and_then(|w| w.checked_mul(64))
            else {
                break;
            };
            if base >= bits {
                break;
            }
            let mut rest = *word;
            while rest != 0 {
                let bit = base + u64::from(rest.trailing_zeros());
                if bit < bits {
                    state.bitmap.set_range(bit, 1);
                }
                rest &= rest - 1;
            }
        }
    }

    /// The next run of out-of-sync blocks at or after `from`, at most `max_blocks` long.
    pub fn next_out_of_sync_run(&self, from: u64, max_blocks: u64) -> Option<(u64, u64)> {
        self.shared.lock().bitmap.next_run(from, max_blocks)
    }

    /// For online verify: per block, the stored checksum and the checksum of the data
    /// actually on the store (overlay blocks: both are the overlay's). Reads bypass the
    /// checksum check, so a corrupt block shows as `stored != actual`.
    pub fn verify_checksums(&self, first_block: u64, blocks: u64) -> Result<BlockChecks, IoError> {
        let size_blocks = self.shared.geometry.data_blocks();
        if blocks == 0
            || first_block
                .checked_add(blocks)
                .is_none_or(|end| end > size_blocks)
        {
            return Err(IoError::OutOfRange {
                op: "verify",
                offset: first_block * BLOCK_BYTES,
                length: blocks * BLOCK_BYTES,
                size_bytes: self.size_bytes(),
            });
        }
        read::verify_checksums(&self.shared, first_block, blocks)
    }

    /// The snapshots, or `NotConfigured`.
    fn snapshots(&self) -> Result<&Mutex<crate::snapshot::Snapshots>, SnapshotError> {
        self.shared
            .snapshots
            .as_ref()
            .ok_or(SnapshotError::NotConfigured)
    }

    /// Creates snapshot `name` of the volume as of sequence number `at` (every record up
    /// to it included, none after), or — `None` — as of the last record sequenced here,
    /// so every write completed before this call is in it. `at` serves a Secondary
    /// taking a snapshot at a point of the Primary's write order: it fails once a record
    /// after `at` has been taken for applying, unless the point was reserved with
    /// [`Volume::reserve_snapshot_point`]. Refused on an Inconsistent store.
    ///
    /// The applier does not pass the point while the snapshot is being made durable
    /// (its catalog entry is written without the engine lock held).
    pub fn create_snapshot(
        &self,
        name: &str,
        at: Option<u64>,
        created_unix: u64,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let point = {
            let mut state = self.shared.lock();
            let point = at.unwrap_or(state.last_sequenced);
            let reserved = at.is_some() && state.apply_holds.contains(&point);
            let checked = self.snapshots().and_then(|_| {
                crate::snapshot::check_name(name)?;
                if state.resync_written.is_some()
                    || state.superblock.disk_state
                        == crate::superblock::StoredDiskState::Inconsistent
                {
                    return Err(SnapshotError::Inconsistent);
                }
                if !reserved && point < state.taken_seq {
                    return Err(SnapshotError::PointPassed {
                        point,
                        applied: state.taken_seq,
                    });
                }
                Ok(())
            });
            if let Err(error) = checked {
                if reserved {
                    release_hold(&self.shared, &mut state, point);
                }
                return Err(error);
            }
            if !reserved {
                state.apply_holds.push(point);
            }
            point
        };
        // The catalog's fsync without the engine lock: writers go on meanwhile.
        let created = match self.snapshots() {
            Ok(snapshots) => snapshots.lock().unwrap_or_else(|p| p.into_inner()).create(
                name,
                point,
                created_unix,
            ),
            Err(error) => Err(error),
        };
        let mut state = self.shared.lock();
        if created.is_ok() {
            if let Ok(snapshots) = self.snapshots() {
                state.snapshot_points =
                    snapshots.lock().unwrap_or_else(|p| p.into_inner()).points();
            }
        }
        release_hold(&self.shared, &mut state, point);
        created
    }

    /// Keeps the applier from taking any record after `point` until a
    /// [`Volume::create_snapshot`] at `point` (which must follow) is done: the
    /// synchronous half of taking a snapshot at a point of the replicated write order
    /// whose durable half runs on another thread.
    pub fn reserve_snapshot_point(&self, point: u64) -> Result<(), SnapshotError> {
        let mut state = self.shared.lock();
        if point < state.taken_seq {
            return Err(SnapshotError::PointPassed {
                point,
                applied: state.taken_seq,
            });
        }
        state.apply_holds.push(point);
        Ok(())
    }

    /// Deletes snapshot `name` (its log goes; the volume is untouched).
    pub fn delete_snapshot(&self, name: &str) -> Result<SnapshotInfo, SnapshotError> {
        let snapshots = self.snapshots()?;
        let mut state = self.shared.lock();
        let mut snaps = snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let info = snaps.delete(name)?;
        state.snapshot_points = snaps.points();
        Ok(info)
    }

    /// The snapshots, oldest first, and the area's `(used, limit)` bytes.
    pub fn list_snapshots(&self) -> Result<(Vec<SnapshotInfo>, u64, u64), SnapshotError> {
        let snaps = self.snapshots()?.lock().unwrap_or_else(|p| p.into_inner());
        Ok((snaps.list(), snaps.area_used_bytes(), snaps.area_bytes()))
    }

    /// Snapshot `name`'s description.
    pub fn snapshot_info(&self, name: &str) -> Result<SnapshotInfo, SnapshotError> {
        let snaps = self.snapshots()?.lock().unwrap_or_else(|p| p.into_inner());
        snaps.info(name)
    }

    /// Invalidations since the last call (for the daemon's events).
    pub fn take_snapshot_events(&self) -> Vec<String> {
        match &self.shared.snapshots {
            Some(snaps) => snaps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take_events(),
            None => Vec::new(),
        }
    }

    /// Reads `[offset, offset+length)` of snapshot `name` (blocking: call it off an
    /// async runtime). Preserved blocks come from the snapshot's log, the others from
    /// the store in place, each checked against its checksum. Fails with `NotReady`
    /// until every record up to the snapshot's point has been applied here.
    pub fn read_snapshot(
        &self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, SnapshotError> {
        self.check_snapshot_read(name, offset, length)?;
        read::read_snapshot_now(&self.shared, name, offset, length)
            .map_err(|error| SnapshotError::Io(error.to_string()))
    }

    /// Queues a read of snapshot `name` for the reader threads, batched with other
    /// reads (what the daemon's `RESOURCE@NAME` exports use). Every record up to the
    /// snapshot's point must have been applied ([`Volume::snapshot_readable`]); a
    /// snapshot error fails the read as [`IoError::Failed`] with its reason.
    pub fn read_snapshot_queued(&self, name: &str, offset: u64, length: u64, done: ReadDone) {
        if let Err(error) = check_io("read", offset, length, self.size_bytes(), MAX_IO_BYTES) {
            return done(Err(error));
        }
        self.queue_read(ReadJob {
            offset,
            length,
            snapshot: Some(name.to_string()),
            done,
        });
    }

    /// Whether snapshot `name` can be read without waiting: every record up to its
    /// point has been applied here.
    pub fn snapshot_readable(&self, name: &str) -> Result<bool, SnapshotError> {
        let point = self
            .snapshots()?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .point(name)?;
        Ok(self.shared.lock().applied_seq >= point)
    }

    /// A snapshot read's range, and (waiting up to 10 s) its point applied.
    fn check_snapshot_read(
        &self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<(), SnapshotError> {
        let snapshots = self.snapshots()?;
        let size = self.size_bytes();
        if length == 0 || offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(SnapshotError::Io(format!(
                "read of {length} bytes at {offset} is outside the volume ({size} bytes)"
            )));
        }
        let point = snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .point(name)?;
        let applied = self.shared.lock().applied_seq;
        if applied < point && !self.wait_applied_to(point, Duration::from_secs(10)) {
            return Err(SnapshotError::NotReady {
                name: name.to_string(),
                point,
                applied: self.shared.lock().applied_seq,
            });
        }
        Ok(())
    }

    /// Blocks of `[first_block, first_block+blocks)` changed since snapshot `since`:
    /// with `until`, up to that (later) snapshot's point — what an incremental backup
    /// from `until` must copy; without, up to now (unapplied writes included). Never
    /// fewer than the truth, also after a crash (see `docs/FORMAT.md` §16).
    pub fn changed_blocks(
        &self,
        since: &str,
        until: Option<&str>,
        first_block: u64,
        blocks: u64,
    ) -> Result<Vec<u64>, SnapshotError> {
        let snapshots = self.snapshots()?;
        // The engine's state before the snapshots: a block leaves the overlay only
        // after it was preserved, so holding the state lock, it is in one or the other.
        let state = self.shared.lock();
        let snaps = snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let since_point = snaps.point(since)?;
        let until_point = match until {
            Some(until) => {
                let until_point = snaps.point(until)?;
                if since_point > until_point {
                    return Err(SnapshotError::Io(format!(
                        "snapshot {since} (point {since_point}) is newer than {until} (point {until_point})"
                    )));
                }
                Some(until_point)
            }
            None => None,
        };
        let mut changed = snaps.changed(since, until_point, first_block, blocks)?;
        // Writes not applied yet have no log entry yet: a block counts if its unapplied
        // writes, from the oldest to the newest, reach into (since, until].
        let end = first_block.saturating_add(blocks);
        changed.extend(
            state
                .overlay
                .iter()
                .filter(|(block, entry)| {
                    (first_block..end).contains(*block)
                        && entry.seq > since_point
                        && until_point.is_none_or(|until| entry.first_seq <= until)
                })
                .map(|(block, _)| *block),
        );
        changed.sort_unstable();
        changed.dedup();
        Ok(changed)
    }

    /// Waits (threaded mode) until every record up to `seq` is applied, or `timeout`.
    fn wait_applied_to(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while state.applied_seq < seq {
            if self.shared.manual() || state.failed.is_some() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self.shared.wait_progress(state, deadline - now);
        }
        true
    }

    /// Marks `[first_block, first_block+blocks)` out of sync (verify findings, invalidate).
    pub fn set_out_of_sync(&self, first_block: u64, blocks: u64) {
        self.shared.lock().bitmap.set_range(first_block, blocks);
    }

    /// Clears bits (sync source: the target acknowledged those blocks).
    pub fn clear_out_of_sync(&self, first_block: u64, blocks: u64) {
        self.shared.lock().bitmap.clear_range(first_block, blocks);
    }

    /// The stored checksum of `block` (for verify and checksum-based resync).
    pub fn block_checksum(&self, block: u64) -> Result<u32, IoError> {
        Ok(self.shared.checksums.get(block)?)
    }

    /// Counters and gauges.
    pub fn stats(&self) -> StatsSnapshot {
        let shared = &self.shared;
        let stats = &shared.stats;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let state = shared.lock();
        StatsSnapshot {
            reads: load(&stats.reads),
            read_bytes: load(&stats.read_bytes),
            writes: load(&stats.writes),
            write_bytes: load(&stats.write_bytes),
            flushes: load(&stats.flushes),
            journal_commits: load(&stats.journal_commits),
            journal_syncs: load(&stats.journal_syncs),
            journal_bytes_written: load(&stats.journal_bytes_written),
            records_applied: load(&stats.records_applied),
            checkpoints: load(&stats.checkpoints),
            checksum_errors: load(&stats.checksum_errors),
            resync_blocks_written: load(&stats.resync_blocks_written),
            resync_blocks_dropped: load(&stats.resync_blocks_dropped),
            journal_used_bytes: state.ring_used,
            overlay_blocks: state.overlay.len() as u64,
            next_seq: state.next_seq,
            durable_seq: state.durable_seq,
            applied_seq: state.applied_seq,
            checkpoint_seq: state.superblock.checkpoint_seq,
            out_of_sync_blocks: state.bitmap.count_ones(),
        }
    }

    /// Clean shutdown: journals and applies everything, checkpoints, marks the store
    /// clean and stops the threads. Later calls on any clone fail with `Closed`.
    pub fn close(&self) -> Result<(), EngineError> {
        {
            let mut state = self.shared.lock();
            if state.closing {
                return Ok(());
            }
            state.closing = true;
            state.checkpoint_requested = true;
            // Records the peer never acknowledged stay out of sync (conservative), so
            // the final checkpoint can cover everything.
            state.peer_attached = false;
            while let Some(unacked) = state.unacked.pop_front() {
                state.bitmap.set_range(unacked.first_block, unacked.blocks);
            }
        }
        if self.shared.manual() {
            // What the threads would do before they stop: journal, apply, checkpoint.
            manual::pump_until_idle(&self.shared, manual::MAX_INLINE_UNITS);
        } else {
            self.wake_all();
            self.join_threads();
        }
        let state = self.shared.lock();
        if let Some(reason) = &state.failed {
            return Err(EngineError::Failed(reason.to_string()));
        }
        drop(state);
        self.update_superblock(|superblock| superblock.flags |= crate::superblock::flags::CLEAN)?;
        Ok(())
    }

    fn wake_all(&self) {
        let shared = &self.shared;
        shared.writer_wake.notify_all();
        shared.applier_wake.notify_all();
        shared.progress.notify_all();
        // Take the read queue's lock so a reader between its `closing` check and its
        // wait cannot miss this wake-up.
        drop(shared.reads.lock());
        shared.reads_wake.notify_all();
    }

    fn join_threads(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("an engine thread panicked");
            }
        }
    }

    /// Stops the threads without a checkpoint (what a crash leaves; for tests). Writes
    /// and flushes still waiting fail (manual mode: before this returns).
    pub fn abandon(&self) {
        let mut state = self.shared.lock();
        state.closing = true;
        if state.failed.is_none() {
            state.failed = Some("abandoned".into());
            self.shared.failed_flag.store(true, Ordering::Release);
        }
        if self.shared.manual() {
            // No journal thread to fail what waits: do it here.
            journal::fail_everything(&self.shared, state);
            return;
        }
        drop(state);
        self.wake_all();
        self.join_threads();
    }

    /// Manual mode: does one unit of the work the background threads would do and
    /// returns whether there was any. In order of preference: one group-commit round
    /// (pending records or a waiting flush); one journal fdatasync so written records
    /// may be applied (the apply delay counts as elapsed); one apply batch; one
    /// checkpoint when due. A checkpoint is due when requested (`checkpoint_blocking`,
    /// `close`), when the ring is over half full and it can free space, or when there
    /// is something to checkpoint (applied records, changed checksum or bitmap pages)
    /// and nothing left to apply — never by the clock. A volume found failed has its
    /// waiting writes and flushes failed (that is a unit too). Callbacks the unit
    /// completes run on this thread before it returns.
    ///
    /// Threaded mode: does nothing and returns false (the threads do this work).
    pub fn pump(&self) -> bool {
        manual::pump(&self.shared)
    }

    /// [`Volume::pump`] until it finds nothing to do, at most `max_units` times;
    /// returns how many units it did.
    pub fn pump_until_idle(&self, max_units: usize) -> usize {
        manual::pump_until_idle(&self.shared, max_units)
    }
}

impl Clone for Volume {
    fn clone(&self) -> Volume {
        Volume {
            shared: self.shared.clone(),
            threads: self.threads.clone(),
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        // The engine threads hold one reference each to `shared`, the handles the rest.
        // When the last handle goes without close(), stop the threads (manual mode:
        // fail what still waits, as the journal thread would).
        if Arc::strong_count(&self.threads) != 1 {
            return;
        }
        let running = if self.shared.manual() {
            !self.shared.lock().closing
        } else {
            !self.threads.lock().map(|t| t.is_empty()).unwrap_or(true)
        };
        if running {
            self.abandon();
        }
    }
}

/// After sequencing: commit now (`commit_now`) or leave it to `commit_pending`. In
/// threaded mode a deferred commit still goes to the journal thread when it could not
/// run inline anyway; manual mode commits on this thread, whatever it takes.
fn commit_after_sequencing(shared: &Shared, state: MutexGuard<'_, State>, commit_now: bool) {
    if shared.manual() {
        drop(state);
        if commit_now {
            manual::commit(shared);
        }
    } else if commit_now || !journal::may_commit_inline(shared, &state) {
        commit_or_hand_off(shared, state);
    }
}

/// After sequencing: run the group commit on this thread when nobody else is and no
/// fdatasync is needed (saving two thread hand-offs per write), else wake the journal
/// thread.
fn commit_or_hand_off(shared: &Shared, state: MutexGuard<'_, State>) {
    if journal::may_commit_inline(shared, &state) {
        if let journal::Round::RingFull = journal::round(shared, state) {
            let state = shared.lock();
            shared.wake_writer(&state);
        }
    } else {
        shared.wake_writer(&state);
    }
}

/// Per block of a range: stored CRC32, CRC32 of the data on the store, and the data's
/// 64-bit digest (what replicas are compared by; see `checksum::block_digest`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockChecks {
    pub stored: Vec<u32>,
    pub actual: Vec<u32>,
    pub digests: Vec<u64>,
}

/// A whole-block piece of a write, before it gets its sequence number.
enum Piece {
    Data {
        first_block: u64,
        data: Bytes,
    },
    Zero {
        first_block: u64,
        blocks: u64,
        kind: u16,
    },
}

impl Piece {
    fn into_record(self, seq: u64, fua: bool) -> Record {
        match self {
            Piece::Data { first_block, data } => {
                Record::write(seq, first_block * BLOCK_BYTES, data, fua)
            }
            Piece::Zero {
                first_block,
                blocks,
                kind,
            } => Record::zeroes(
                seq,
                first_block * BLOCK_BYTES,
                blocks * BLOCK_BYTES,
                kind,
                fua,
            ),
        }
    }
}

/// Zero records for the whole blocks `first_full..end_full`.
fn whole_zero_pieces(first_full: u64, end_full: u64, kind: u16) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut block = first_full;
    while block < end_full {
        let blocks = (end_full - block).min(crate::record::MAX_RECORD_BLOCKS);
        pieces.push(Piece::Zero {
            first_block: block,
            blocks,
            kind,
        });
        block += blocks;
    }
    pieces
}

/// The records of a write that needs no read-modify-write (data and WRITE_ZEROES on
/// whole blocks; TRIM of its whole blocks), numbered from `first_seq` as a volume
/// would sequence them. A diskless Primary builds its records so, without a store.
pub fn aligned_records(
    request: &WriteRequest,
    size_bytes: u64,
    first_seq: u64,
    max_record: u64,
) -> Result<Vec<Record>, IoError> {
    let length = request.length();
    let offset = request.offset;
    let limit = match request.kind {
        WriteKind::Data(_) => MAX_IO_BYTES,
        WriteKind::Trim(_) | WriteKind::Zeroes(_) => MAX_ZERO_BYTES,
    };
    check_io("write", offset, length, size_bytes, limit)?;
    let unaligned = || {
        IoError::Failed(
            "this node is a diskless Primary: it takes only writes of whole 4 KiB blocks".into(),
        )
    };
    let pieces = match &request.kind {
        WriteKind::Data(data) => {
            if offset % BLOCK_BYTES != 0 || length % BLOCK_BYTES != 0 {
                return Err(unaligned());
            }
            split_data(offset / BLOCK_BYTES, data.clone(), max_record)
        }
        WriteKind::Zeroes(_) if offset % BLOCK_BYTES != 0 || length % BLOCK_BYTES != 0 => {
            return Err(unaligned());
        }
        WriteKind::Zeroes(_) => whole_zero_pieces(
            offset / BLOCK_BYTES,
            (offset + length) / BLOCK_BYTES,
            record::flags::ZEROES,
        ),
        // TRIM is advisory: its partial edge blocks are ignored, as on a store.
        WriteKind::Trim(_) => whole_zero_pieces(
            offset.div_ceil(BLOCK_BYTES),
            (offset + length) / BLOCK_BYTES,
            record::flags::TRIM,
        ),
    };
    Ok(pieces
        .into_iter()
        .zip(first_seq..)
        .map(|(piece, seq)| piece.into_record(seq, request.fua))
        .collect())
}

/// Splits whole-block data into records of at most `max_record` bytes.
fn split_data(first_block: u64, data: Bytes, max_record: u64) -> Vec<Piece> {
    let max_record = max_record as usize;
    let mut pieces = Vec::with_capacity(data.len().div_ceil(max_record));
    let mut start = 0;
    while start < data.len() {
        let end = (start + max_record).min(data.len());
        pieces.push(Piece::Data {
            first_block: first_block + (start as u64 / BLOCK_BYTES),
            data: data.slice(start..end),
        });
        start = end;
    }
    pieces
}
