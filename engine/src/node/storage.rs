//! What the replication state machine needs of its store, and the adapter that gives it
//! an [`engine::Volume`](crate::Volume).
//!
//! Every method returns at once. Memory-only operations (sequencing a write, marking
//! bits) answer directly; operations that touch the disk and may take long (persist a
//! superblock change, flush, read, checksum a range, queue resync data behind the
//! applier) take a [`Token`] and complete later: the storage pushes `(token,
//! Completion)` into a [`CompletionQueue`], and the driver hands each to
//! [`Node::on_storage`](super::Node::on_storage). A completion may be pushed before
//! the call that caused it returns (a group commit run inline); the driver delivers
//! it after that call, so the state machine is never re-entered.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;

use crate::record::Record;
use crate::superblock::{flags, StoredDiskState, Superblock};
use crate::volume::BlockChecks;
use crate::{IoError, Volume, WriteRequest};

/// Names one pending storage operation of a [`Node`](super::Node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u64);

/// The outcome of an operation that took a [`Token`].
#[derive(Debug)]
pub enum Completion {
    /// A client write, or a replicated record, is in the journal (durably if FUA).
    Journaled(Result<u64, IoError>),
    /// Everything sequenced before the flush is durable.
    Flushed(Result<(), IoError>),
    Read(Result<Bytes, IoError>),
    /// Stored and actual checksums and digests of a range.
    Checked(Result<BlockChecks, IoError>),
    /// A superblock change, a bitmap persist or a resync made durable.
    Persisted(Result<(), String>),
    /// Resync data is queued for the applier (stale blocks were dropped).
    ResyncQueued(Result<u64, IoError>),
}

/// The superblock changes the protocol makes, each persisted before it is acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperblockChange {
    /// First write without (all of) the peers: track changes since the old generation.
    StartDetached {
        new_current: u64,
    },
    /// Promotion: a new generation (shared with an in-sync peer unless `detached`),
    /// the PRIMARY flag, and the disk UpToDate.
    Promote {
        new_current: u64,
        detached: bool,
    },
    /// Demotion: the PRIMARY flag goes.
    Demote,
    /// An in-sync Primary announced a new generation: follow it (a fresh store that
    /// skipped its initial sync also becomes UpToDate).
    Adopt {
        current: u64,
        fresh: bool,
    },
    /// `new-current-uuid --clear-bitmap` on a fresh, connected store.
    NewCurrentUuid {
        new_current: u64,
    },
    SetDisk(StoredDiskState),
    /// The end of a resync as its source: the bitmap generation goes to history.
    FinishSource {
        forget_crash: bool,
    },
    /// The end of a resync as its target: the source's generation, UpToDate.
    FinishTarget {
        current: u64,
        forget_crash: bool,
    },
}

impl SuperblockChange {
    /// Applies the change to a superblock (in memory).
    pub fn apply(&self, sb: &mut Superblock) {
        match *self {
            SuperblockChange::StartDetached { new_current } => {
                sb.generations.start_new_detached(new_current);
            }
            SuperblockChange::Promote {
                new_current,
                detached,
            } => {
                if detached {
                    sb.generations.start_new_detached(new_current);
                } else {
                    sb.generations.start_new_connected(new_current);
                }
                sb.flags |= flags::PRIMARY;
                sb.disk_state = StoredDiskState::UpToDate;
            }
            SuperblockChange::Demote => sb.flags &= !flags::PRIMARY,
            SuperblockChange::Adopt { current, fresh } => {
                sb.generations.adopt_peer_current(current);
                if fresh {
                    sb.disk_state = StoredDiskState::UpToDate;
                }
            }
            SuperblockChange::NewCurrentUuid { new_current } => {
                sb.generations.start_new_connected(new_current);
                sb.disk_state = StoredDiskState::UpToDate;
            }
            SuperblockChange::SetDisk(disk) => sb.disk_state = disk,
            SuperblockChange::FinishSource { forget_crash } => {
                sb.generations.finish_resync_as_source();
                if forget_crash {
                    sb.flags &= !flags::PRIMARY;
                }
            }
            SuperblockChange::FinishTarget {
                current,
                forget_crash,
            } => {
                sb.generations.finish_resync_as_target(current);
                sb.disk_state = StoredDiskState::UpToDate;
                if forget_crash {
                    sb.flags &= !flags::PRIMARY;
                }
            }
        }
    }
}

/// The store as the state machine sees it. See the module documentation.
pub trait Storage {
    fn size_bytes(&self) -> u64;
    fn data_blocks(&self) -> u64;
    /// The journal ring's size (bounds an async peer's lag).
    fn journal_bytes(&self) -> u64;
    fn superblock(&self) -> Superblock;
    /// The stored disk state (asked on every driver step: no superblock copy).
    fn stored_disk_state(&self) -> crate::superblock::StoredDiskState {
        self.superblock().disk_state
    }
    /// Why the store failed, if it did.
    fn failure(&self) -> Option<String>;
    fn next_seq(&self) -> u64;
    /// Every record up to this sequence number is durable in the journal.
    fn durable_seq(&self) -> u64;
    fn advance_seq(&mut self, seq: u64);

    fn out_of_sync_blocks(&self) -> u64;
    /// `count` words of the out-of-sync bitmap from word `first_word` (clamped).
    fn bitmap_words_at(&self, first_word: u64, count: u64) -> Vec<u64>;
    fn merge_bitmap_at(&mut self, first_word: u64, words: &[u64]);
    fn set_out_of_sync(&mut self, first_block: u64, blocks: u64);
    fn clear_out_of_sync(&mut self, first_block: u64, blocks: u64);
    fn next_out_of_sync_run(&self, from: u64, max_blocks: u64) -> Option<(u64, u64)>;

    /// Sequences a client write (records in sequence order; their group commit waits
    /// for [`Storage::commit`]). Completes with [`Completion::Journaled`].
    fn sequence(&mut self, request: WriteRequest, token: Token) -> Result<Vec<Record>, IoError>;
    /// Journals a record received from the primary under its sequence number (group
    /// commit deferred as for `sequence`). `Ok(Some(record))`: the memory budget is
    /// full, nothing was done; try again after a completion. Completes with
    /// [`Completion::Journaled`].
    fn append_replicated(
        &mut self,
        record: Record,
        token: Token,
    ) -> Result<Option<Record>, IoError>;
    /// Commits everything sequenced so far (the group commit point).
    fn commit(&mut self);
    fn flush(&mut self, token: Token);
    fn read(&mut self, offset: u64, length: u64, token: Token);
    /// Checksums and digests of a range (verify, resync checks).
    fn check_blocks(&mut self, first_block: u64, blocks: u64, token: Token);
    /// Queues resync data (sync target). Completes with [`Completion::ResyncQueued`].
    fn write_resync(
        &mut self,
        first_block: u64,
        blocks: u64,
        data: Option<Bytes>,
        crcs: Vec<u32>,
        token: Token,
    );
    fn begin_resync_target(&mut self);
    fn end_resync_target(&mut self);

    /// Every peer is attached: records from now on are held in the journal until
    /// [`Storage::peer_acked`] covers them.
    fn peers_attached(&mut self);
    /// The peers hold every record up to `seq` durably.
    fn peer_acked(&mut self, seq: u64);
    /// A peer went away: held records are marked out of sync, and so are later writes
    /// until [`Storage::peers_attached`]. Returns how many records were marked.
    fn peer_detached(&mut self) -> usize;

    fn update_superblock(&mut self, change: SuperblockChange, token: Token);
    /// Makes the in-memory bitmap durable now.
    fn persist_bitmap(&mut self, token: Token);
    /// Sync target at the end: every queued resync write applied and checkpointed.
    fn make_resync_durable(&mut self, token: Token);
    /// Takes snapshot `name` as of record `point`: reserves the point at once (no
    /// record after it is applied until the snapshot is made), then completes with
    /// [`Completion::Persisted`] once it is durable (or with why not).
    fn create_snapshot(&mut self, name: &str, point: u64, token: Token);
}

/// Completions waiting for the driver, with a wake-up for it.
#[derive(Clone)]
pub struct CompletionQueue {
    queue: Arc<Mutex<VecDeque<(Token, Completion)>>>,
    wake: Arc<dyn Fn() + Send + Sync>,
}

impl CompletionQueue {
    /// `wake` is called after each push (from any thread): it must be cheap.
    pub fn new(wake: Arc<dyn Fn() + Send + Sync>) -> CompletionQueue {
        CompletionQueue {
            queue: Arc::new(Mutex::new(VecDeque::new())),
            wake,
        }
    }

    pub fn push(&self, token: Token, completion: Completion) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((token, completion));
        (self.wake)();
    }

    /// Takes every completion queued so far, oldest first.
    pub fn drain(&self) -> VecDeque<(Token, Completion)> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn is_empty(&self) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// One thread that runs a volume's slow operations in submission order, so a runtime
/// thread never waits for an fdatasync and superblock changes land in the order the
/// state machine made them.
struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn start(name: &str) -> Worker {
        let (jobs, receiver) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while let Ok(job) = receiver.recv() {
                    job();
                }
            })
            .ok();
        Worker {
            jobs: thread.as_ref().map(|_| jobs),
            thread,
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread once the queued jobs ran.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long a sync target's end waits for its resync data to be applied.
const RESYNC_DURABLE_TIMEOUT: Duration = Duration::from_secs(120);

/// [`Storage`] over an [`engine::Volume`](crate::Volume). With `inline` (a volume in
/// manual mode, driven by a simulator) slow operations run on the caller's thread;
/// otherwise on one worker thread per volume.
pub struct VolumeStorage {
    volume: Volume,
    completions: CompletionQueue,
    worker: Option<Worker>,
}

impl VolumeStorage {
    pub fn new(volume: Volume, completions: CompletionQueue, inline: bool) -> VolumeStorage {
        VolumeStorage {
            volume,
            completions,
            worker: (!inline).then(|| Worker::start("replicad-storage")),
        }
    }

    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// Runs `job` on the worker (in order), or now when inline.
    fn slow(&self, job: impl FnOnce() + Send + 'static) {
        match self.worker.as_ref().and_then(|worker| worker.jobs.as_ref()) {
            Some(jobs) => {
                if let Err(mpsc::SendError(job)) = jobs.send(Box::new(job)) {
                    job();
                }
            }
            None => job(),
        }
    }

    fn done(&self, token: Token) -> impl FnOnce(Completion) + Send + 'static {
        let completions = self.completions.clone();
        move |completion| completions.push(token, completion)
    }
}

impl Storage for VolumeStorage {
    fn size_bytes(&self) -> u64 {
        self.volume.size_bytes()
    }

    fn data_blocks(&self) -> u64 {
        self.volume.geometry().data_blocks()
    }

    fn journal_bytes(&self) -> u64 {
        self.volume.geometry().journal_bytes
    }

    fn superblock(&self) -> Superblock {
        self.volume.superblock()
    }

    fn stored_disk_state(&self) -> crate::superblock::StoredDiskState {
        self.volume.stored_disk_state()
    }

    fn failure(&self) -> Option<String> {
        self.volume.failure()
    }

    fn next_seq(&self) -> u64 {
        self.volume.next_seq()
    }

    fn durable_seq(&self) -> u64 {
        self.volume.durable_seq()
    }

    fn advance_seq(&mut self, seq: u64) {
        self.volume.advance_seq(seq);
    }

    fn out_of_sync_blocks(&self) -> u64 {
        self.volume.out_of_sync_blocks()
    }

    fn bitmap_words_at(&self, first_word: u64, count: u64) -> Vec<u64> {
        self.volume.bitmap_words_at(first_word, count)
    }

    fn merge_bitmap_at(&mut self, first_word: u64, words: &[u64]) {
        self.volume.merge_bitmap_at(first_word, words);
    }

    fn set_out_of_sync(&mut self, first_block: u64, blocks: u64) {
        self.volume.set_out_of_sync(first_block, blocks);
    }

    fn clear_out_of_sync(&mut self, first_block: u64, blocks: u64) {
        self.volume.clear_out_of_sync(first_block, blocks);
    }

    fn next_out_of_sync_run(&self, from: u64, max_blocks: u64) -> Option<(u64, u64)> {
        self.volume.next_out_of_sync_run(from, max_blocks)
    }

    fn sequence(&mut self, request: WriteRequest, token: Token) -> Result<Vec<Record>, IoError> {
        let done = self.done(token);
        self.volume.write_deferred(
            request,
            Box::new(move |result| done(Completion::Journaled(result))),
        )
    }

    fn append_replicated(
        &mut self,
        record: Record,
        token: Token,
    ) -> Result<Option<Record>, IoError> {
        let done = self.done(token);
        let returned = self.volume.try_append_replicated_deferred(
            record,
            Box::new(move |result| done(Completion::Journaled(result))),
        )?;
        Ok(returned.map(|(record, _)| record))
    }

    fn commit(&mut self) {
        self.volume.commit_pending();
    }

    fn flush(&mut self, token: Token) {
        let done = self.done(token);
        self.volume
            .flush(Box::new(move |result| done(Completion::Flushed(result))));
    }

    fn read(&mut self, offset: u64, length: u64, token: Token) {
        let done = self.done(token);
        self.volume.read(
            offset,
            length,
            Box::new(move |result| done(Completion::Read(result))),
        );
    }

    fn check_blocks(&mut self, first_block: u64, blocks: u64, token: Token) {
        let done = self.done(token);
        let volume = self.volume.clone();
        self.slow(move || {
            done(Completion::Checked(
                volume.verify_checksums(first_block, blocks),
            ))
        });
    }

    fn write_resync(
        &mut self,
        first_block: u64,
        blocks: u64,
        data: Option<Bytes>,
        crcs: Vec<u32>,
        token: Token,
    ) {
        let done = self.done(token);
        let volume = self.volume.clone();
        self.slow(move || {
            done(Completion::ResyncQueued(volume.write_resync(
                first_block,
                blocks,
                data,
                crcs,
            )))
        });
    }

    fn begin_resync_target(&mut self) {
        self.volume.begin_resync_target();
    }

    fn end_resync_target(&mut self) {
        self.volume.end_resync_target();
    }

    fn peers_attached(&mut self) {
        self.volume.peer_attached();
    }

    fn peer_acked(&mut self, seq: u64) {
        self.volume.peer_acked(seq);
    }

    fn peer_detached(&mut self) -> usize {
        self.volume.peer_detached()
    }

    fn update_superblock(&mut self, change: SuperblockChange, token: Token) {
        let done = self.done(token);
        let volume = self.volume.clone();
        self.slow(move || {
            let result = volume
                .update_superblock(|sb| change.apply(sb))
                .map(drop)
                .map_err(|error| error.to_string());
            done(Completion::Persisted(result));
        });
    }

    fn create_snapshot(&mut self, name: &str, point: u64, token: Token) {
        let done = self.done(token);
        if let Err(error) = self.volume.reserve_snapshot_point(point) {
            done(Completion::Persisted(Err(error.to_string())));
            return;
        }
        let volume = self.volume.clone();
        let name = name.to_string();
        self.slow(move || {
            let created_unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let result = volume
                .create_snapshot(&name, Some(point), created_unix)
                .map(drop)
                .map_err(|error| error.to_string());
            done(Completion::Persisted(result));
        });
    }

    fn persist_bitmap(&mut self, token: Token) {
        let done = self.done(token);
        let volume = self.volume.clone();
        self.slow(move || {
            let result = volume.persist_bitmap().map_err(|error| error.to_string());
            done(Completion::Persisted(result));
        });
    }

    fn make_resync_durable(&mut self, token: Token) {
        let done = self.done(token);
        let volume = self.volume.clone();
        self.slow(move || {
            let durable = volume.wait_applied(RESYNC_DURABLE_TIMEOUT)
                && volume.checkpoint_blocking(RESYNC_DURABLE_TIMEOUT);
            let result = if durable {
                Ok(())
            } else {
                Err("resync data could not be made durable".to_string())
            };
            done(Completion::Persisted(result));
        });
    }
}
