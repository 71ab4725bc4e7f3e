//! The [`Node`] itself: construction, the client write path and its acknowledgement
//! rules, the handshake, session ends, timers and frame dispatch. Resync and verify
//! are in `resync.rs`, the operator's commands in `admin.rs`.
//!
//! Invariants (checked by [`Node::invariants`] after every step of the simulator):
//! * a write or FLUSH completes only once the local journal has it and every peer it
//!   was shipped to acknowledged it as the mode requires, or that peer's session ended
//!   and its records were marked out of sync — and never while a new generation is
//!   being persisted (the barrier: the marks must outlive a crash first);
//! * records leave in sequence order, to every shipping peer, in the call that
//!   sequences them;
//! * the engine holds (does not checkpoint past) every record a peer has not reported
//!   durable, and is told to forget one only when every shipping peer has;
//! * a node that is not Primary never sequences a client write; a Primary never
//!   accepts a record, resync data or a new generation from a peer.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::peer::{Conn, Peer, Repl, RequestKind, Session, SourcePhase, TargetPhase, MAX_SERVED};
use super::resync::BitmapPart;
use super::storage::{Completion, Storage, SuperblockChange, Token};
use super::{
    Action, AdminId, HookKind, Mutation, NodeConfig, OnIoError, PeerId, RequestError, RequestId,
    SessionEnd, SessionId, Time,
};
use crate::gen::{decide, Decision, SideState, SyncScope};
use crate::repl::{self, AckNeeds, DiskState, Mode, Role};
use crate::rng::SplitMix64;
use crate::superblock::StoredDiskState;
use crate::wire::{BlockData, Channel, Frame, PeerState, RecordFrame};
use crate::{IoError, WriteRequest, BLOCK_BYTES};

/// A blocked replicated record is retried at least this often.
const RETRY_INTERVAL: Duration = Duration::from_millis(5);

/// What a pending storage operation is for.
#[derive(Debug)]
pub(super) enum Purpose {
    /// A client write's records are journaled.
    Write(RequestId),
    /// A client FLUSH is durable locally.
    Flush,
    /// A new generation before writes without (all) peers.
    Rotation,
    /// As a chosen sync target: Inconsistent is durable, records may be applied.
    MarkTarget { peer: PeerId, session: SessionId },
    /// As secondary: a received record is journaled (ACK_WRITTEN).
    Replicated {
        peer: PeerId,
        session: SessionId,
        seq: u64,
    },
    /// As secondary: the peer's FLUSH is durable (FLUSH_ACK).
    PeerFlush {
        peer: PeerId,
        session: SessionId,
        id: u64,
    },
    /// A NEW_GENERATION of the primary is persisted.
    Adopt {
        peer: PeerId,
        session: SessionId,
        fresh: bool,
    },
    /// Serving a peer's READ_REQUEST.
    PeerRead {
        peer: PeerId,
        session: SessionId,
        id: u64,
        first_block: u64,
        blocks: u32,
    },
    /// Serving a peer's VERIFY_REQUEST.
    PeerVerify {
        peer: PeerId,
        session: SessionId,
        id: u64,
        first_block: u64,
    },
    /// Resync source: a group member read.
    SourceRead {
        peer: PeerId,
        session: SessionId,
        first_block: u64,
        blocks: u64,
    },
    /// Resync source: our generation change after the target confirmed.
    FinishSource { peer: PeerId, session: SessionId },
    /// Resync source: what we sent is durable here before RESYNC_DONE.
    FlushSource { peer: PeerId, session: SessionId },
    /// Sync target entering: Inconsistent persisted, then the bitmap.
    EnterTarget {
        peer: PeerId,
        session: SessionId,
        bitmap: bool,
    },
    /// Sync target: resync data queued.
    ResyncWrite {
        peer: PeerId,
        session: SessionId,
        first_block: u64,
        blocks: u32,
    },
    /// Sync target: a RESYNC_CHECK's local digests.
    ResyncCheck {
        peer: PeerId,
        session: SessionId,
        first_block: u64,
        digests: Vec<u64>,
    },
    /// Sync target: everything durable at the end, then the new generation.
    FinishTarget {
        peer: PeerId,
        session: SessionId,
        generation: bool,
    },
    /// Verify: our side of a chunk.
    VerifyLocal { first_block: u64 },
    /// As secondary of a Primary whose disk was detached: the whole volume marked
    /// out of sync is durable, then our own new generation.
    CoverDiskless {
        peer: PeerId,
        session: SessionId,
        rotated: bool,
    },
    /// Operator commands that persist something.
    Admin(AdminId, AdminStep),
    /// This node's part of a `--all` snapshot.
    LocalSnapshot { id: AdminId },
    /// A snapshot a peer's SNAPSHOT asked for.
    PeerSnapshot {
        peer: PeerId,
        session: SessionId,
        name: String,
    },
}

/// Which step of an operator command a completion belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AdminStep {
    Promote {
        new_current: u64,
        detached: bool,
        forced_disk: bool,
    },
    DemoteFlush,
    DemoteClear,
    Invalidate,
    NewCurrentUuid {
        new_current: u64,
    },
}

/// A client write in flight.
#[derive(Debug)]
struct PendingWrite {
    id: RequestId,
    local: Option<Result<(), IoError>>,
    last_seq: u64,
    /// Peers (and the session it was shipped in) whose acknowledgement it waits for.
    waits: Vec<(PeerId, SessionId, AckNeeds)>,
}

/// A client FLUSH in flight.
#[derive(Debug)]
struct PendingFlush {
    id: RequestId,
    started: Time,
    local: Option<Result<(), IoError>>,
    /// FLUSH frames it waits for, per peer session.
    waits: Vec<(PeerId, SessionId, u64)>,
}

/// A client request that waits for a new generation before it may be sequenced.
#[derive(Debug)]
enum Queued {
    Write(RequestId, WriteRequest),
    Flush(RequestId),
}

/// A verify run of the operator.
#[derive(Debug)]
pub(super) struct VerifyRun {
    pub admin: AdminId,
    pub peer: PeerId,
    pub session: SessionId,
    pub repair: bool,
    /// Next block to compare in the first pass.
    pub next_block: u64,
    /// The chunk being compared: our checks and the peer's, as they arrive.
    pub chunk: Option<VerifyChunk>,
    /// Blocks that differed in the first pass (re-checked one by one at the end).
    pub suspects: Vec<u64>,
    /// Second pass: suspects still to re-check, and the confirmed ones.
    pub rechecking: Option<(Vec<u64>, Vec<u64>)>,
}

#[derive(Debug)]
pub(super) struct VerifyChunk {
    pub first_block: u64,
    pub blocks: u64,
    pub local: Option<crate::volume::BlockChecks>,
    pub remote: Option<crate::volume::BlockChecks>,
}

/// A promotion in its first phase: the connected peers are asked to agree.
#[derive(Debug)]
pub(super) struct Promotion {
    pub admin: AdminId,
    pub force: bool,
    pub forced_disk: bool,
    /// PROMOTE_REQUESTs not yet answered: peer, session, request id.
    pub waiting: Vec<(PeerId, SessionId, u64)>,
    /// Why a peer refused (or went away).
    pub refused: Option<String>,
    pub deadline: Time,
}

/// A demotion in progress.
#[derive(Debug)]
pub(super) struct Demoting {
    pub admin: AdminId,
    pub phase: DemotePhase,
}

#[derive(Debug)]
pub(super) enum DemotePhase {
    /// New writes are refused; those in flight finish.
    Draining,
    /// The final flush: local (`local` once durable) and the FLUSH frames sent to
    /// each shipping peer.
    Flushing {
        local: bool,
        peers: Vec<(PeerId, SessionId, u64)>,
    },
    /// The PRIMARY flag is being cleared.
    Clearing,
}

/// A Primary whose store failed and was detached (`on-io-error = detach`): it goes
/// on through its UpToDate peers. Their copy is the only one, so every write waits
/// until they hold it (whatever the mode), reads are served by them, and nothing
/// completes before a peer confirmed it tracks every block for the lost disk (it
/// started a generation of its own and marked the whole volume: the lost disk, if
/// it comes back, is a full resync target, never a source).
#[derive(Debug)]
pub(super) struct DisklessPrimary {
    /// The next record's sequence number (the store's, when it was detached).
    pub next_seq: u64,
    /// The store's current generation when it was detached.
    pub generation: u64,
    pub size_bytes: u64,
    pub max_record: u64,
    pub generations: crate::gen::GenerationIds,
}

/// See the module documentation of [`super`].
pub struct Node<S: Storage> {
    pub(super) config: NodeConfig,
    pub(super) storage: Option<S>,
    pub(super) rng: SplitMix64,
    pub(super) role: Role,
    /// The store was Primary and was not closed cleanly when it was attached.
    pub(super) crashed_primary: bool,
    /// The driver is opening the store.
    pub(super) attaching: bool,
    /// A new generation was started since every peer was last attached.
    pub(super) rotated: bool,
    /// A new generation is being persisted: nothing completes meanwhile.
    pub(super) barrier: Option<Token>,
    queued: VecDeque<Queued>,
    writes: BTreeMap<Token, PendingWrite>,
    flushes: BTreeMap<Token, PendingFlush>,
    /// Something was sequenced or appended since the last group commit.
    uncommitted: bool,
    pub(super) peers: Vec<Peer>,
    pub(super) tokens: BTreeMap<Token, Purpose>,
    next_token: u64,
    next_session: u64,
    pub(super) actions: VecDeque<Action>,
    pub(super) last_client_io: Option<Time>,
    /// Whether the engine holds records for the peers (every peer shipping).
    engine_attached: bool,
    pub(super) demoting: Option<Demoting>,
    /// A promotion waiting for its connected peers' agreement.
    pub(super) promotion: Option<Promotion>,
    /// An operator command that persists something is running.
    pub(super) admin_busy: Option<&'static str>,
    pub(super) verify: Option<VerifyRun>,
    /// Read repairs in progress: block → (client request, a write raced it).
    pub(super) repairs: BTreeMap<u64, (RequestId, bool)>,
    /// Blocks repaired from a peer since start.
    pub(super) repaired_blocks: u64,
    /// Promotions completed since start.
    pub(super) promotions: u64,
    /// How long the last promotion took to give the resource a Primary again (see
    /// [`Node::last_failover`]).
    pub(super) last_failover: Option<Duration>,
    /// When the promotion in progress was asked for.
    pub(super) promote_asked: Option<Time>,
    /// When a session with a Primary peer last ended, until a Primary is seen again
    /// (a peer's STATE says so, or this node is promoted).
    pub(super) primary_lost: Option<Time>,
    /// The store failed and was detached while Primary (see [`DisklessPrimary`]).
    pub(super) diskless: Option<DisklessPrimary>,
    /// A failed store taken away, for the driver to close.
    failed_storage: Option<S>,
    /// Why the store was detached after an error (status shows it).
    pub(super) detached_reason: Option<String>,
    /// Internal request ids (see [`RequestId::INTERNAL`]).
    next_internal: u64,
    /// Client reads read balancing sent to the local store: outstanding, latency.
    pub(super) local_reads: super::ReplicaLoad,
    /// Read-balancing decisions made (turns and probes follow it).
    pub(super) read_decisions: u64,
    /// `--all` snapshots waiting for the nodes' answers.
    pub(super) pending_snapshots: Vec<super::snapshot::PendingSnapshot>,
    pub(super) now: Time,
}

/// Facts of the store at attach time.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttachFacts {
    /// The store was Primary and not closed cleanly (its last writes may be missing
    /// on the peers).
    pub crashed_primary: bool,
}

impl<S: Storage> Node<S> {
    /// A node in the Secondary role. `seed` feeds the generator of generation
    /// identifiers and nonces (the daemon takes it from the OS, a simulator from its
    /// seed).
    pub fn new(config: NodeConfig, now: Time, seed: u64) -> Node<S> {
        let peers = config
            .peers
            .iter()
            .enumerate()
            .map(|(index, peer)| Peer {
                id: PeerId(index),
                dialer: config.dials(peer),
                config: peer.clone(),
                conn: Conn::Connecting {
                    next_dial: now,
                    dialing: false,
                },
                backoff: config.timing.backoff_min,
                discard_my_data: false,
                split_brain: false,
                last_error: None,
                paused: false,
                resync_bytes: 0,
                resync_skipped_bytes: 0,
                verify_out_of_sync: None,
                reads: Default::default(),
            })
            .collect();
        Node {
            config,
            storage: None,
            rng: SplitMix64::new(seed),
            role: Role::Secondary,
            crashed_primary: false,
            attaching: false,
            rotated: false,
            barrier: None,
            queued: VecDeque::new(),
            writes: BTreeMap::new(),
            flushes: BTreeMap::new(),
            uncommitted: false,
            peers,
            tokens: BTreeMap::new(),
            next_token: 1,
            next_session: 1,
            actions: VecDeque::new(),
            last_client_io: None,
            engine_attached: false,
            demoting: None,
            promotion: None,
            admin_busy: None,
            verify: None,
            repairs: BTreeMap::new(),
            repaired_blocks: 0,
            promotions: 0,
            last_failover: None,
            promote_asked: None,
            primary_lost: None,
            diskless: None,
            failed_storage: None,
            detached_reason: None,
            next_internal: RequestId::INTERNAL,
            local_reads: Default::default(),
            read_decisions: 0,
            pending_snapshots: Vec::new(),
            now,
        }
    }

    // ----- accessors -----

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn storage(&self) -> Option<&S> {
        self.storage.as_ref()
    }

    pub fn storage_mut(&mut self) -> Option<&mut S> {
        self.storage.as_mut()
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    pub fn crashed_primary(&self) -> bool {
        self.crashed_primary
    }

    /// Blocks repaired from a peer since start.
    pub fn repaired_blocks(&self) -> u64 {
        self.repaired_blocks
    }

    /// Promotions of this node completed since start.
    pub fn promotions(&self) -> u64 {
        self.promotions
    }

    /// How long the last promotion took to give the resource a Primary again: from the
    /// moment this node saw the session with its last Primary peer end (the peer died,
    /// the link broke or went silent for `timeout`) to the promotion's completion; when
    /// no Primary peer was lost since a Primary was last seen, from the promotion's
    /// request instead. `None` before the first promotion.
    pub fn last_failover(&self) -> Option<Duration> {
        self.last_failover
    }

    /// Records why the transport refused a connection of `peer` (status shows it).
    pub fn note_error(&mut self, peer: PeerId, error: SessionEnd) {
        if let Some(state) = self.peers.get_mut(peer.0) {
            state.last_error = Some(error);
        }
    }

    pub fn set_attaching(&mut self, attaching: bool) {
        self.attaching = attaching;
    }

    /// The resource names no other node.
    pub fn single_node(&self) -> bool {
        self.peers.is_empty()
    }

    /// The local disk state.
    pub fn disk(&self) -> DiskState {
        if self.attaching {
            return DiskState::Attaching;
        }
        match &self.storage {
            None => DiskState::Diskless,
            Some(storage) if storage.failure().is_some() => DiskState::Failed,
            Some(storage) => match storage.stored_disk_state() {
                StoredDiskState::UpToDate => DiskState::UpToDate,
                StoredDiskState::Outdated => DiskState::Outdated,
                StoredDiskState::Inconsistent => DiskState::Inconsistent,
            },
        }
    }

    /// Whether client writes are taken now.
    pub fn is_writable(&self) -> bool {
        self.role == Role::Primary
            && self.demoting.is_none()
            && (matches!(
                self.disk(),
                DiskState::UpToDate | DiskState::Inconsistent | DiskState::Outdated
            ) || (self.diskless.is_some() && !self.diskless_peers().is_empty()))
    }

    /// A Primary serving through its peers after its store was detached.
    pub fn is_diskless_primary(&self) -> bool {
        self.role == Role::Primary && self.diskless.is_some()
    }

    /// Why the store was detached after an I/O error, if it was.
    pub fn detached_reason(&self) -> Option<&str> {
        self.detached_reason.as_deref()
    }

    /// The volume's size: the store's, or the detached store's for a diskless Primary.
    pub fn size_bytes(&self) -> u64 {
        match (&self.storage, &self.diskless) {
            (Some(storage), _) => storage.size_bytes(),
            (None, Some(diskless)) => diskless.size_bytes,
            (None, None) => 0,
        }
    }

    /// A store detached after an I/O error, once, for the driver to close.
    pub fn take_failed_storage(&mut self) -> Option<S> {
        self.failed_storage.take()
    }

    /// The sessions a diskless Primary serves through: records go there, and the
    /// peer is UpToDate with no resync running.
    pub(super) fn diskless_peers(&self) -> Vec<(PeerId, SessionId)> {
        self.peers
            .iter()
            .filter_map(|peer| {
                let session = peer.session()?;
                (session.shipping
                    && session.peer_state.disk == DiskState::UpToDate
                    && matches!(session.repl, Repl::Established | Repl::Verify))
                .then_some((peer.id, session.id))
            })
            .collect()
    }

    /// Whether the driver may hand over the next frame of `channel` from `peer` (data
    /// frames wait while a storage operation gates them).
    pub fn wants_frames(&self, peer: PeerId, channel: Channel) -> bool {
        channel == Channel::Meta
            || self.peers[peer.0]
                .session()
                .is_none_or(|session| session.takes_data())
    }

    /// Whether an incoming connection from `peer` would be taken.
    pub fn accepts(&self, peer: PeerId) -> bool {
        self.storage.is_some() && !matches!(self.peers[peer.0].conn, Conn::StandAlone)
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Client writes and flushes not yet completed.
    pub fn pending_requests(&self) -> usize {
        self.writes.len() + self.flushes.len() + self.queued.len()
    }

    pub(super) fn token(&mut self, purpose: Purpose) -> Token {
        let token = Token(self.next_token);
        self.next_token += 1;
        self.tokens.insert(token, purpose);
        token
    }

    pub(super) fn event(&mut self, text: impl Into<String>) {
        self.actions.push_back(Action::Event(text.into()));
    }

    pub(super) fn hook(&mut self, kind: HookKind, env: Vec<(&'static str, String)>) {
        self.actions.push_back(Action::Hook { kind, env });
    }

    pub(super) fn send(&mut self, peer: PeerId, session: SessionId, frame: Frame) {
        self.actions.push_back(Action::Send {
            peer,
            session,
            frame,
        });
    }

    pub(super) fn complete(&mut self, id: RequestId, result: Result<(), RequestError>) {
        if id.is_internal() {
            if let Err(error) = result {
                self.event(format!(
                    "rewriting a block read from the peer failed: {error}"
                ));
            }
            return;
        }
        self.actions.push_back(Action::Complete { id, result });
    }

    pub(super) fn internal_request(&mut self) -> RequestId {
        self.next_internal += 1;
        RequestId(self.next_internal)
    }

    pub(super) fn random_generation(&mut self) -> u64 {
        // 0 and JUST_CREATED are reserved meanings.
        loop {
            let id = self.rng.next_u64();
            if id != 0 && id != crate::gen::JUST_CREATED {
                return id;
            }
        }
    }

    // ----- storage attach / detach -----

    /// The driver opened the store (recovery done): it is the node's from now on.
    pub fn attach(&mut self, now: Time, storage: S, facts: AttachFacts) {
        self.now = now;
        self.attaching = false;
        self.crashed_primary = facts.crashed_primary;
        self.storage = Some(storage);
        self.detached_reason = None;
        self.engine_attached = false;
        self.rotated = false;
    }

    /// Takes the store away (detach, shutdown): every session ends first. Returns it
    /// for the driver to close.
    pub fn take_storage(&mut self, now: Time, why: &str) -> Option<S> {
        self.now = now;
        self.diskless = None;
        for index in 0..self.peers.len() {
            self.end_session(PeerId(index), SessionEnd::Local(why.to_string()), false);
        }
        self.fail_pending(IoError::Closed);
        self.role = Role::Secondary;
        self.storage.take()
    }

    /// Fails every queued and pending client request (the store is going away).
    fn fail_pending(&mut self, error: IoError) {
        let mut ids: Vec<RequestId> = self
            .queued
            .drain(..)
            .map(|queued| match queued {
                Queued::Write(id, _) | Queued::Flush(id) => id,
            })
            .collect();
        ids.extend(self.writes.values().map(|write| write.id));
        ids.extend(self.flushes.values().map(|flush| flush.id));
        self.writes.clear();
        self.flushes.clear();
        for id in ids {
            self.complete(id, Err(RequestError::Io(error.clone())));
        }
    }

    // ----- the client write path -----

    /// A client write. Completes with [`Action::Complete`] once the local journal has
    /// it and the peers acknowledged it as the mode requires.
    pub fn on_write(&mut self, now: Time, id: RequestId, request: WriteRequest) {
        self.now = now;
        self.last_client_io = Some(now);
        self.check_disk();
        if !self.is_writable() {
            let error = self.not_writable_error();
            self.complete(id, Err(error));
            return;
        }
        if self.barrier.is_some() || !self.queued.is_empty() {
            self.queued.push_back(Queued::Write(id, request));
            return;
        }
        if self.needs_rotation() {
            self.start_rotation();
            self.queued.push_back(Queued::Write(id, request));
            return;
        }
        self.sequence_write(id, request);
    }

    /// Why a write is refused: EIO where a Primary's disk failed (or a diskless
    /// Primary lost its last UpToDate peer), EPERM otherwise.
    fn not_writable_error(&self) -> RequestError {
        if self.role == Role::Primary && self.demoting.is_none() {
            if let Some(why) = self.storage.as_ref().and_then(Storage::failure) {
                return RequestError::Io(IoError::Failed(
                    format!("the local disk failed (on-io-error=pass-on): {why}").into(),
                ));
            }
            if self.diskless.is_some() {
                return RequestError::Io(IoError::Failed(
                    "this Primary's disk was detached and no UpToDate peer is connected".into(),
                ));
            }
        }
        RequestError::NotWritable
    }

    /// A client FLUSH: durable locally and, in `sync` and `semi-sync`, on every peer
    /// that was shipped records.
    pub fn on_flush(&mut self, now: Time, id: RequestId) {
        self.now = now;
        if self.storage.is_none() && !self.is_diskless_primary() {
            self.complete(id, Err(RequestError::Io(IoError::Closed)));
            return;
        }
        if self.barrier.is_some() || !self.queued.is_empty() {
            self.queued.push_back(Queued::Flush(id));
            return;
        }
        self.start_flush(id);
    }

    /// The end of a batch of inputs (the driver has no further request or frame at
    /// hand): one group commit takes everything sequenced meanwhile.
    pub fn end_of_batch(&mut self, now: Time) {
        self.now = now;
        if self.uncommitted {
            self.uncommitted = false;
            if let Some(storage) = self.storage.as_mut() {
                storage.commit();
            }
        }
    }

    /// A first write without all peers attached starts a new generation (persisted
    /// before the write is sequenced), so a later handshake knows which side moved on.
    fn needs_rotation(&self) -> bool {
        // A diskless Primary has no store to persist one in: its peers start their own.
        self.diskless.is_none()
            && !self.single_node()
            && !self.rotated
            && !self.all_peers_shipping()
            && !self.config.mutated(Mutation::SkipGenerationRotation)
    }

    pub(super) fn all_peers_shipping(&self) -> bool {
        self.peers
            .iter()
            .all(|peer| peer.session().is_some_and(|session| session.shipping))
    }

    /// Persists a new generation; until it is durable no write is sequenced and
    /// nothing completes.
    pub(super) fn start_rotation(&mut self) {
        if self.barrier.is_some() {
            return;
        }
        self.rotated = true;
        let new_current = self.random_generation();
        let token = self.token(Purpose::Rotation);
        self.barrier = Some(token);
        match self.storage.as_mut() {
            Some(storage) => {
                storage.update_superblock(SuperblockChange::StartDetached { new_current }, token)
            }
            None => {
                self.tokens.remove(&token);
                self.barrier = None;
            }
        }
    }

    fn rotation_done(&mut self, result: Result<(), String>) {
        self.barrier = None;
        if let Err(error) = result {
            // The store failed: the queued requests fail when they reach it.
            self.event(format!("cannot persist a new generation: {error}"));
        }
        while self.barrier.is_none() {
            let Some(queued) = self.queued.pop_front() else {
                break;
            };
            match queued {
                Queued::Write(id, request) => {
                    if !self.is_writable() {
                        self.complete(id, Err(RequestError::NotWritable));
                    } else {
                        self.sequence_write(id, request);
                    }
                }
                Queued::Flush(id) => self.start_flush(id),
            }
        }
        // These writes waited; nothing else will call the group commit for them.
        self.commit_now();
        self.try_complete_all();
    }

    /// Commits what is sequenced now (outside the driver's batching points).
    fn commit_now(&mut self) {
        if std::mem::take(&mut self.uncommitted) {
            if let Some(storage) = self.storage.as_mut() {
                storage.commit();
            }
        }
    }

    fn sequence_write(&mut self, id: RequestId, request: WriteRequest) {
        let fua = request.fua;
        if !self.repairs.is_empty() {
            // A repair in progress must not overwrite this newer write.
            let first = request.offset / BLOCK_BYTES;
            let end = (request.offset + request.length()).div_ceil(BLOCK_BYTES);
            for (_, (_, touched)) in self.repairs.range_mut(first..end) {
                *touched = true;
            }
        }
        let token = self.token(Purpose::Write(id));
        let diskless_peers = self.diskless_peers();
        let sequenced = match (self.storage.as_mut(), self.diskless.as_mut()) {
            (Some(storage), _) => {
                let sequenced = storage.sequence(request.clone(), token);
                if sequenced.is_err() && self.detached_while_sequencing() {
                    // The store failed while this write waited for room in it: the
                    // write goes on through the peers like the ones in flight.
                    self.tokens.remove(&token);
                    return self.sequence_write(id, request);
                }
                sequenced
            }
            (None, Some(diskless)) => {
                let records = crate::volume::aligned_records(
                    &request,
                    diskless.size_bytes,
                    diskless.next_seq,
                    diskless.max_record,
                );
                if let Ok(records) = &records {
                    diskless.next_seq += records.len() as u64;
                }
                records
            }
            (None, None) => Err(IoError::Closed),
        };
        let records = match sequenced {
            Ok(records) => records,
            Err(error) => {
                self.tokens.remove(&token);
                self.complete(id, Err(RequestError::Io(error)));
                return;
            }
        };
        let diskless = self.diskless.is_some();
        let mut local = None;
        if diskless {
            // No store: the write is the peers' to hold, nothing to journal here.
            self.tokens.remove(&token);
            local = Some(Ok(()));
        } else {
            self.uncommitted = true;
        }
        let last_seq = records.last().map_or(0, |record| record.header.seq);
        let needs = repl::ack_needs(self.config.mode, fua);
        let journal_bytes = self.storage.as_ref().map_or(0, |s| s.journal_bytes());
        let mut waits = Vec::new();
        let mut fell_behind = Vec::new();
        let now = self.now;
        for index in 0..self.peers.len() {
            let Some(session) = self.peers[index].session_mut() else {
                continue;
            };
            if !session.shipping {
                continue;
            }
            let session_id = session.id;
            for record in &records {
                let bytes = record.total_bytes();
                session.shipped_seq = session.shipped_seq.max(record.header.seq);
                session.lag.push_back((record.header.seq, bytes));
                session.lag_bytes += bytes;
                let first_block = record.header.offset_bytes / BLOCK_BYTES;
                let end_block = record
                    .header
                    .offset_bytes
                    .saturating_add(record.header.length_bytes)
                    .div_ceil(BLOCK_BYTES);
                session.note_shipped(record.header.seq, bytes, (first_block, end_block), self.now);
            }
            session.shipped_at.push_back((last_seq, now));
            let lag_bytes = session.lag_bytes;
            for record in &records {
                self.actions.push_back(Action::Send {
                    peer: PeerId(index),
                    session: session_id,
                    frame: Frame::Record(RecordFrame(record.clone())),
                });
            }
            if diskless {
                if diskless_peers.contains(&(PeerId(index), session_id)) {
                    waits.push((PeerId(index), session_id, repl::ack_needs(Mode::Sync, true)));
                }
            } else if needs.peer_received || needs.peer_written {
                waits.push((PeerId(index), session_id, needs));
            } else if lag_bytes > journal_bytes / 2 {
                // Async: the lag is bounded; past half the journal the peer falls
                // back to a bitmap resync.
                fell_behind.push(PeerId(index));
            }
        }
        if diskless && waits.is_empty() {
            self.complete(
                id,
                Err(RequestError::Io(IoError::Failed(
                    "this Primary's disk was detached and no UpToDate peer is connected".into(),
                ))),
            );
            return;
        }
        self.writes.insert(
            token,
            PendingWrite {
                id,
                local,
                last_seq,
                waits,
            },
        );
        for peer in fell_behind {
            self.end_session(
                peer,
                SessionEnd::Local(
                    "peer fell behind by more than half the journal: resyncing from the bitmap"
                        .into(),
                ),
                false,
            );
        }
    }

    /// After a failed `sequence`: whether the store failed meanwhile and was detached
    /// (the engine waits for memory inside `sequence`; the store may fail then).
    fn detached_while_sequencing(&mut self) -> bool {
        self.check_disk();
        self.storage.is_none() && self.diskless.is_some()
    }

    /// Sends FLUSH to every shipping peer (not in `async` mode, where a FLUSH is
    /// local): what the caller waits for, per peer session.
    pub(super) fn flush_peers(&mut self) -> Vec<(PeerId, SessionId, u64)> {
        let mut waits = Vec::new();
        if self.config.mode == Mode::Async && self.diskless.is_none() {
            return waits;
        }
        for index in 0..self.peers.len() {
            let Some(session) = self.peers[index].session_mut() else {
                continue;
            };
            if !session.shipping {
                continue;
            }
            let flush_id = session.next_flush_id;
            session.next_flush_id += 1;
            session.flushes.insert(flush_id, session.shipped_seq);
            let session_id = session.id;
            waits.push((PeerId(index), session_id, flush_id));
            self.send(PeerId(index), session_id, Frame::Flush(flush_id));
        }
        waits
    }

    fn start_flush(&mut self, id: RequestId) {
        let token = self.token(Purpose::Flush);
        let waits = self.flush_peers();
        self.flushes.insert(
            token,
            PendingFlush {
                id,
                started: self.now,
                local: None,
                waits,
            },
        );
        match self.storage.as_mut() {
            Some(storage) => storage.flush(token),
            None => {
                self.tokens.remove(&token);
                let usable = self.diskless.is_some() && !self.diskless_peers().is_empty();
                if usable {
                    // A diskless Primary: the peers' FLUSH is the whole of it.
                    if let Some(flush) = self.flushes.get_mut(&token) {
                        flush.local = Some(Ok(()));
                    }
                    self.try_complete_all();
                } else if let Some(flush) = self.flushes.remove(&token) {
                    self.complete(flush.id, Err(RequestError::Io(IoError::Closed)));
                }
            }
        }
    }

    /// Whether peer `peer`'s session `session` acknowledged up to `seq` as `needs` says.
    fn acked(&self, peer: PeerId, session: SessionId, seq: u64, needs: AckNeeds) -> bool {
        match self.peers[peer.0].session() {
            Some(current) if current.id == session => {
                (self.diskless.is_none() || current.covers_diskless)
                    && (!needs.peer_received || current.received_seq >= seq)
                    && (!needs.peer_written || current.written_seq >= seq)
            }
            // The session ended: its records were marked out of sync (and a new
            // generation started) before this runs.
            _ => true,
        }
    }

    fn flush_acked(&self, peer: PeerId, session: SessionId, flush_id: u64) -> bool {
        match self.peers[peer.0].session() {
            Some(current) if current.id == session => {
                (self.diskless.is_none() || current.covers_diskless)
                    && !current.flushes.contains_key(&flush_id)
            }
            _ => true,
        }
    }

    /// Completes every write and flush whose conditions hold (none while a new
    /// generation is being persisted).
    pub(super) fn try_complete_all(&mut self) {
        if self.barrier.is_some() {
            return;
        }
        let done: Vec<Token> = self
            .writes
            .iter()
            .filter(|(_, write)| {
                write.local.is_some()
                    && (matches!(write.local, Some(Err(_)))
                        || write.waits.iter().all(|&(peer, session, needs)| {
                            self.acked(peer, session, write.last_seq, needs)
                        }))
            })
            .map(|(token, _)| *token)
            .collect();
        for token in done {
            if let Some(write) = self.writes.remove(&token) {
                let result = match write.local {
                    Some(Err(error)) => Err(RequestError::Io(error)),
                    _ => Ok(()),
                };
                self.complete(write.id, result);
            }
        }
        let done: Vec<Token> = self
            .flushes
            .iter()
            .filter(|(_, flush)| {
                flush.local.is_some()
                    && (matches!(flush.local, Some(Err(_)))
                        || flush
                            .waits
                            .iter()
                            .all(|&(peer, session, id)| self.flush_acked(peer, session, id)))
            })
            .map(|(token, _)| *token)
            .collect();
        for token in done {
            if let Some(flush) = self.flushes.remove(&token) {
                let result = match flush.local {
                    Some(Err(error)) => Err(RequestError::Io(error)),
                    _ => Ok(()),
                };
                self.complete(flush.id, result);
            }
        }
        self.continue_demotion();
    }

    /// Tells the engine what every shipping peer holds durably (it may forget those
    /// records), or — as secondary — what the primary holds.
    fn release_held(&mut self) {
        let held_by_all = match self.role {
            Role::Primary => {
                if !self.engine_attached {
                    return;
                }
                self.peers
                    .iter()
                    .filter_map(Peer::session)
                    .filter(|session| session.shipping)
                    .map(|session| session.peer_durable.min(session.shipped_seq))
                    .min()
            }
            // A diskless Primary holds nothing durably, ever: once we marked every
            // block for its lost disk (the data gate kept its records out until then),
            // nothing of what it sent needs holding.
            Role::Secondary => self
                .peers
                .iter()
                .filter_map(Peer::session)
                .find(|session| session.peer_state.role == Role::Primary)
                .map(|session| {
                    if session.peer_state.disk == DiskState::Diskless && session.data_gate.is_none()
                    {
                        session.last_record_seq.max(session.peer_durable)
                    } else {
                        session.peer_durable
                    }
                }),
        };
        if let (Some(seq), Some(storage)) = (held_by_all, self.storage.as_mut()) {
            storage.peer_acked(seq);
        }
    }

    // ----- sessions -----

    /// Our STATE for `peer`.
    pub(super) fn local_state(&self, peer: PeerId) -> PeerState {
        let (generations, dirty_blocks, next_seq, size_bytes) = match &self.storage {
            Some(storage) => (
                storage.superblock().generations,
                storage.out_of_sync_blocks(),
                storage.next_seq(),
                storage.size_bytes(),
            ),
            None => match &self.diskless {
                Some(diskless) => (
                    diskless.generations,
                    0,
                    diskless.next_seq,
                    diskless.size_bytes,
                ),
                None => (Default::default(), 0, 0, 0),
            },
        };
        PeerState {
            role: self.role,
            disk: self.disk(),
            generations,
            crashed_primary: self.crashed_primary,
            discard_my_data: self.peers[peer.0].discard_my_data,
            dirty_blocks,
            next_seq,
            size_bytes,
        }
    }

    pub(super) fn send_state(&mut self, peer: PeerId) {
        if let Some(session) = self.peers[peer.0].session() {
            let id = session.id;
            let state = self.local_state(peer);
            self.send(peer, id, Frame::State(state));
        }
    }

    /// Sends STATE to every connected peer (our role or disk changed).
    pub(super) fn broadcast_state(&mut self) {
        for index in 0..self.peers.len() {
            self.send_state(PeerId(index));
        }
    }

    /// A dial failed; the next waits (with back-off).
    pub fn on_dial_failed(&mut self, now: Time, peer: PeerId, error: String) {
        self.now = now;
        let max = self.config.timing.backoff_max;
        let state = &mut self.peers[peer.0];
        if let Conn::Connecting { next_dial, dialing } = &mut state.conn {
            *dialing = false;
            *next_dial = now + state.backoff;
            state.backoff = (state.backoff * 2).min(max);
        }
        state.last_error = Some(SessionEnd::ConnectionLost(error));
    }

    /// Both channels to `peer` are open and its HELLOs checked. Returns the session
    /// id for its frames, or `None` when the node takes no connection now (the driver
    /// closes it).
    pub fn on_connected(&mut self, now: Time, peer: PeerId) -> Option<SessionId> {
        self.now = now;
        if !self.accepts(peer) {
            if let Conn::Connecting { dialing, next_dial } = &mut self.peers[peer.0].conn {
                *dialing = false;
                *next_dial = now + self.config.timing.backoff_min;
            }
            return None;
        }
        if matches!(
            self.peers[peer.0].conn,
            Conn::Connected(_) | Conn::Handshake { .. }
        ) {
            self.end_session(
                peer,
                SessionEnd::Local("replaced by a new connection from the peer".into()),
                false,
            );
        }
        let session = SessionId(self.next_session);
        self.next_session += 1;
        let deadline = now + self.config.timing.handshake;
        self.peers[peer.0].conn = Conn::Handshake { session, deadline };
        self.peers[peer.0].backoff = self.config.timing.backoff_min;
        let state = self.local_state(peer);
        self.send(peer, session, Frame::State(state));
        Some(session)
    }

    /// The transport lost the session's connection.
    pub fn on_closed(&mut self, now: Time, peer: PeerId, session: SessionId, why: String) {
        self.now = now;
        let current = match &self.peers[peer.0].conn {
            Conn::Connected(s) => s.id == session,
            Conn::Handshake { session: s, .. } => *s == session,
            _ => false,
        };
        if current {
            self.end_session(peer, SessionEnd::ConnectionLost(why), false);
        }
    }

    fn side(state: &PeerState, node_id: u32) -> SideState {
        SideState {
            generations: state.generations,
            primary: state.role == Role::Primary,
            crashed_primary: state.crashed_primary,
            inconsistent: state.disk == DiskState::Inconsistent,
            dirty_blocks: state.dirty_blocks,
            discard_my_data: state.discard_my_data,
            node_id,
        }
    }

    /// The peer's STATE arrived in the handshake: decide and begin the session.
    fn begin_session(&mut self, peer: PeerId, session: SessionId, peer_state: PeerState) {
        let now = self.now;
        let local = self.local_state(peer);
        let name = self.peers[peer.0].config.name.clone();
        if peer_state.size_bytes != local.size_bytes {
            let reason = format!(
                "peer's volume is {} bytes, ours is {}: refusing to replicate",
                peer_state.size_bytes, local.size_bytes
            );
            self.refuse(peer, session, reason);
            return;
        }
        let decision = decide(
            &Self::side(&local, self.config.node_id),
            &Self::side(&peer_state, self.peers[peer.0].config.node_id),
        );
        self.peers[peer.0].discard_my_data = false;
        let refusal = match decision {
            Decision::SplitBrain => Some("split brain: both nodes wrote since they last saw each other; no data exchanged. Resolve with `replctl connect RES --discard-my-data` on the node whose changes to drop"),
            Decision::Unrelated => Some("the peer holds unrelated data (no common generation); refusing. If one node's data is to be dropped, `replctl connect RES --discard-my-data` on it pulls everything from the other"),
            Decision::BothPrimary => Some("both nodes are Primary; refusing (never two primaries)"),
            Decision::PrimaryWouldBeTarget => Some("the Primary holds older data than its peer; refusing to overwrite it under its users (demote it, or resolve by hand)"),
            Decision::NoGoodData => Some("the node with newer data is Inconsistent; nothing to sync from"),
            _ => None,
        };
        if let Some(reason) = refusal {
            if decision == Decision::SplitBrain {
                self.peers[peer.0].split_brain = true;
                self.event(format!("peer {name} split brain detected: {reason}"));
                self.hook(HookKind::SplitBrain, vec![("REPLICAD_PEER", name.clone())]);
            }
            self.refuse(peer, session, reason.to_string());
            return;
        }
        let resync_after_crash = local.crashed_primary || peer_state.crashed_primary;
        if let Some(storage) = self.storage.as_mut() {
            storage.advance_seq(local.next_seq.max(peer_state.next_seq));
        }
        if peer_state.role == Role::Primary {
            self.primary_lost = None;
        }
        let mut state = Session::new(session, decision, peer_state, now);
        state.next_ping = now + self.config.timing.ping_interval;
        let peer_ref = &mut self.peers[peer.0];
        peer_ref.conn = Conn::Connected(Box::new(state));
        peer_ref.split_brain = false;
        peer_ref.last_error = None;
        self.event(format!("peer {name} connection:Connected ({decision:?})"));
        let primary = self.role == Role::Primary;
        let dirty = self
            .storage
            .as_ref()
            .map_or(0, |storage| storage.out_of_sync_blocks());
        match decision {
            Decision::InSync | Decision::BothFresh if primary => {
                self.attach_peer(peer);
                if dirty > 0 {
                    self.start_source(peer, false, resync_after_crash);
                }
            }
            Decision::SyncSource(scope) => {
                if primary {
                    self.attach_peer(peer);
                }
                if scope == SyncScope::Full {
                    if let Some(storage) = self.storage.as_mut() {
                        let blocks = storage.data_blocks();
                        storage.set_out_of_sync(0, blocks);
                    }
                }
                self.start_source(peer, true, resync_after_crash);
            }
            Decision::SyncTarget(_) => {
                self.send_bitmap(peer);
                if let Some(session) = self.peers[peer.0].session_mut() {
                    session.repl = Repl::Target(super::peer::Target {
                        phase: TargetPhase::WaitBitmap,
                        total_blocks: 0,
                        started: now,
                        source_current: 0,
                    });
                }
                self.mark_target(peer, session);
            }
            _ => {}
        }
    }

    /// A diskless Primary lost a session it served through: what only that peer was
    /// to hold fails (EIO), for it may be nowhere now.
    fn fail_diskless_waits(&mut self, peer: PeerId, session: SessionId) {
        let error = || {
            RequestError::Io(IoError::Failed(
                "the peer holding this diskless Primary's data went away".into(),
            ))
        };
        // Whether `waits` waited only for this session (then the request fails).
        fn only_this<T>(waits: &mut Vec<(PeerId, SessionId, T)>, key: (PeerId, SessionId)) -> bool {
            let before = waits.len();
            waits.retain(|(p, s, _)| (*p, *s) != key);
            before != waits.len() && waits.is_empty()
        }
        let mut failed = Vec::new();
        self.writes.retain(|_, write| {
            let fails = only_this(&mut write.waits, (peer, session));
            if fails {
                failed.push(write.id);
            }
            !fails
        });
        self.flushes.retain(|_, flush| {
            let fails = only_this(&mut flush.waits, (peer, session));
            if fails {
                failed.push(flush.id);
            }
            !fails
        });
        for id in failed {
            self.complete(id, Err(error()));
        }
    }

    /// The store failed: with `on-io-error = detach` it is taken away (see
    /// [`OnIoError`]). Cheap when it did not.
    pub(super) fn check_disk(&mut self) {
        if self.config.on_io_error != OnIoError::Detach {
            return;
        }
        if let Some(why) = self.storage.as_ref().and_then(Storage::failure) {
            self.detach_failed(why);
        }
    }

    /// Detaches the failed store. A Secondary ends its sessions (its Primary marks
    /// and rotates as for any lost peer). A Primary goes on diskless through its
    /// UpToDate peers: writes they were shipped complete once they hold them, the
    /// rest fail (EIO); FLUSHes in flight become FLUSHes of the peers.
    fn detach_failed(&mut self, why: String) {
        let Some(storage) = self.storage.take() else {
            return;
        };
        self.event(format!(
            "disk:Diskless (the local disk failed: {why}; detached, on-io-error=detach)"
        ));
        self.detached_reason = Some(why.clone());
        if let Some(token) = self.barrier.take() {
            self.tokens.remove(&token);
        }
        self.engine_attached = false;
        let primary = self.role == Role::Primary;
        if primary {
            self.diskless = Some(DisklessPrimary {
                next_seq: storage.next_seq(),
                generation: storage.superblock().generations.current,
                generations: storage.superblock().generations,
                size_bytes: storage.size_bytes(),
                max_record: crate::layout::max_record_data_bytes(storage.journal_bytes()),
            });
        }
        self.failed_storage = Some(storage);
        if !primary {
            for index in 0..self.peers.len() {
                self.end_session(
                    PeerId(index),
                    SessionEnd::Storage(format!("the local disk failed and was detached: {why}")),
                    false,
                );
            }
            self.fail_pending(IoError::Failed(why.into()));
            return;
        }
        let usable = self.diskless_peers();
        let full = repl::ack_needs(Mode::Sync, true);
        let mut failed = Vec::new();
        for write in self.writes.values_mut() {
            let shipped: Vec<_> = usable
                .iter()
                .filter(|&&(peer, session)| {
                    self.peers[peer.0]
                        .session()
                        .is_some_and(|s| s.id == session && s.shipped_seq >= write.last_seq)
                })
                .map(|&(peer, session)| (peer, session, full))
                .collect();
            if shipped.is_empty() {
                failed.push(write.id);
            } else {
                write.local = Some(Ok(()));
                write.waits = shipped;
            }
        }
        self.writes.retain(|_, write| !failed.contains(&write.id));
        // The store's completions of client writes and flushes no longer decide them.
        self.tokens
            .retain(|_, purpose| !matches!(purpose, Purpose::Write(_) | Purpose::Flush));
        let flush_waits = if self.flushes.is_empty() || usable.is_empty() {
            Vec::new()
        } else {
            self.flush_peers()
        };
        for flush in self.flushes.values_mut() {
            if flush_waits.is_empty() {
                failed.push(flush.id);
            } else {
                flush.local = Some(Ok(()));
                flush.waits.clone_from(&flush_waits);
            }
        }
        self.flushes.retain(|_, flush| !failed.contains(&flush.id));
        for id in failed {
            self.complete(
                id,
                Err(RequestError::Io(IoError::Failed(
                    format!("the local disk failed and no UpToDate peer holds this: {why}").into(),
                ))),
            );
        }
        self.rotation_done(Ok(()));
        self.broadcast_state();
    }

    /// Refuses the peer in the handshake: REJECT, close after it arrived, StandAlone.
    fn refuse(&mut self, peer: PeerId, session: SessionId, reason: String) {
        self.send(peer, session, Frame::Reject(reason.clone()));
        self.actions.push_back(Action::Close {
            peer,
            session,
            linger: true,
        });
        let name = self.peers[peer.0].config.name.clone();
        self.peers[peer.0].conn = Conn::StandAlone;
        self.peers[peer.0].last_error = Some(SessionEnd::Refused(reason.clone()));
        self.event(format!("peer {name} connection:StandAlone ({reason})"));
    }

    /// From now on every record goes to `peer` (we are Primary, it is in sync or a
    /// sync target).
    pub(super) fn attach_peer(&mut self, peer: PeerId) {
        if let Some(session) = self.peers[peer.0].session_mut() {
            session.shipping = true;
        }
        if self.all_peers_shipping() && !self.engine_attached {
            self.engine_attached = true;
            self.rotated = false;
            if let Some(storage) = self.storage.as_mut() {
                storage.peers_attached();
            }
        }
    }

    /// Stops shipping to every peer (demotion): what they do not hold durably is
    /// marked out of sync.
    pub(super) fn detach_all_peers(&mut self) {
        for peer in &mut self.peers {
            if let Some(session) = peer.session_mut() {
                session.shipping = false;
            }
        }
        self.engine_attached = false;
        if let Some(storage) = self.storage.as_mut() {
            storage.peer_detached();
        }
    }

    /// Ends the session with `peer` (if any): the node goes on alone.
    pub(super) fn end_session(&mut self, peer: PeerId, why: SessionEnd, standalone: bool) {
        let name = self.peers[peer.0].config.name.clone();
        let conn = std::mem::replace(&mut self.peers[peer.0].conn, Conn::StandAlone);
        let session_id = match &conn {
            Conn::Connected(session) => Some(session.id),
            Conn::Handshake { session, .. } => Some(*session),
            _ => None,
        };
        if let Some(session_id) = session_id {
            self.actions.push_back(Action::Close {
                peer,
                session: session_id,
                linger: false,
            });
            self.snapshot_peer_gone(peer, session_id);
        }
        if let Conn::Connected(session) = conn {
            let session = *session;
            if session.peer_state.role == Role::Primary {
                self.primary_lost = Some(self.now);
            }
            // The tracking of stream-written blocks belongs to a resync this node
            // receives; with no target session left, none runs (whatever state the
            // ended session was in: a verify may have replaced it).
            let target_left = self.peers.iter().any(|peer| {
                peer.session()
                    .is_some_and(|other| matches!(other.repl, Repl::Target(_)))
            });
            if !target_left {
                if let Some(storage) = self.storage.as_mut() {
                    storage.end_resync_target();
                }
            }
            let unmarked = self.config.mutated(Mutation::NoOutOfSyncOnDetach);
            if session.shipping {
                let marked = if std::mem::take(&mut self.engine_attached) && !unmarked {
                    self.storage
                        .as_mut()
                        .map_or(0, |storage| storage.peer_detached())
                } else {
                    0
                };
                let waiting = self.writes.values().any(|write| {
                    write
                        .waits
                        .iter()
                        .any(|&(p, s, _)| p == peer && s == session.id)
                }) || !session.flushes.is_empty()
                    || !session.lag.is_empty();
                // Writes the peer may not hold complete without it, so this node
                // moved on alone: a new generation, persisted before they complete.
                if (marked > 0 || waiting)
                    && !self.rotated
                    && !self.config.mutated(Mutation::SkipGenerationRotation)
                {
                    self.start_rotation();
                }
            } else if (session.peer_state.role == Role::Primary || session.last_record_seq > 0)
                && !unmarked
            {
                // Records received above the primary's last DURABLE mark may be
                // missing there: their blocks are reconciled at the next resync.
                // (Also when the peer demoted itself before the session ended: held
                // records would otherwise pin the journal for good.)
                if let Some(storage) = self.storage.as_mut() {
                    storage.peer_detached();
                }
            }
            self.promotion_peer_gone(peer, session.id, &name);
            if let Some(verify) = self.verify.as_ref() {
                if verify.peer == peer && verify.session == session.id {
                    let admin = verify.admin;
                    self.verify = None;
                    self.actions.push_back(Action::AdminDone {
                        id: admin,
                        result: Err(super::AdminError::ConnectionLost(name.clone())),
                    });
                }
            }
            for request in session.requests.values() {
                match request.kind {
                    RequestKind::Repair { id, block } => self.complete(
                        id,
                        Err(RequestError::Unrepairable {
                            block,
                            why: "the connection to the peer ended".into(),
                        }),
                    ),
                    RequestKind::Read {
                        balanced: Some(balanced),
                        ..
                    } if balanced.abandoned => {}
                    RequestKind::Read {
                        id,
                        balanced: Some(_),
                        ..
                    } => self.balanced_read_failed(peer, id, "the connection ended"),
                    RequestKind::Read { id, .. } => self.read_done(
                        id,
                        Err(RequestError::Io(IoError::Failed(
                            "the connection to the peer serving the read ended".into(),
                        ))),
                    ),
                    RequestKind::Verify { .. } => {}
                }
            }
            self.peers[peer.0].reads.load.pending = 0;
            if self.diskless.is_some() {
                self.fail_diskless_waits(peer, session.id);
            }
        }
        let now = self.now;
        let state = &mut self.peers[peer.0];
        let was_connected = session_id.is_some();
        state.last_error = Some(why.clone());
        state.conn = if standalone {
            Conn::StandAlone
        } else {
            Conn::Connecting {
                next_dial: now + state.backoff,
                dialing: false,
            }
        };
        if was_connected || standalone {
            let connection = if standalone {
                "StandAlone"
            } else {
                "Connecting"
            };
            self.event(format!("peer {name} connection:{connection} ({why})"));
        }
        self.try_complete_all();
    }

    // ----- frames -----

    /// A frame from `peer` in `session` (frames of an ended session are ignored).
    pub fn handle_frame(&mut self, now: Time, peer: PeerId, session: SessionId, frame: Frame) {
        self.now = now;
        match &mut self.peers[peer.0].conn {
            Conn::Handshake { session: s, .. } if *s == session => match frame {
                Frame::State(state) => self.begin_session(peer, session, state),
                Frame::Reject(reason) => {
                    self.end_session(peer, SessionEnd::RefusedByPeer(reason), true);
                }
                // The peer may have decided already and sent heartbeats or reports on
                // the meta connection, which can overtake its STATE on the data one.
                other if other.channel() == Channel::Meta => {}
                other => self.end_session(
                    peer,
                    SessionEnd::Protocol(format!("{} instead of STATE", other.name())),
                    false,
                ),
            },
            Conn::Connected(state) if state.id == session => {
                state.last_heard = now;
                if frame.channel() == Channel::Data && !state.takes_data() {
                    state.deferred.push_back(frame);
                    return;
                }
                if let Err(why) = self.dispatch(peer, session, frame) {
                    self.end_session(peer, why, false);
                }
            }
            _ => {}
        }
    }

    /// Runs the data frames that waited for a gate, until the next gate closes.
    pub(super) fn release_deferred(&mut self, peer: PeerId, session: SessionId) {
        loop {
            let Some(state) = self.peers[peer.0].current(session) else {
                return;
            };
            if !state.takes_data() {
                return;
            }
            let Some(frame) = state.deferred.pop_front() else {
                return;
            };
            if let Err(why) = self.dispatch(peer, session, frame) {
                self.end_session(peer, why, false);
                return;
            }
        }
    }

    fn dispatch(
        &mut self,
        peer: PeerId,
        session: SessionId,
        frame: Frame,
    ) -> Result<(), SessionEnd> {
        let protocol = |text: String| SessionEnd::Protocol(text);
        match frame {
            Frame::Hello(_) | Frame::Reject(_) | Frame::Auth(_) => {
                Err(protocol(format!("peer sent {} mid-session", frame.name())))
            }
            Frame::State(state) => self.on_state(peer, session, state),
            Frame::Record(RecordFrame(record)) => self.on_record(peer, session, record),
            Frame::AckReceived(seq) => self.on_ack(peer, session, seq, false),
            Frame::AckWritten(seq) => self.on_ack(peer, session, seq, true),
            Frame::Flush(id) => {
                if self.role == Role::Primary {
                    return Err(protocol("peer sent FLUSH to a Primary".into()));
                }
                let token = self.token(Purpose::PeerFlush { peer, session, id });
                if let Some(storage) = self.storage.as_mut() {
                    storage.flush(token);
                }
                Ok(())
            }
            Frame::FlushAck(id) => {
                let state = self.session_of(peer, session)?;
                let Some(shipped) = state.flushes.remove(&id) else {
                    return Err(protocol(format!("FLUSH_ACK for unknown flush {id}")));
                };
                // Everything shipped before that FLUSH is durable on the peer.
                state.peer_durable = state.peer_durable.max(shipped);
                self.release_held();
                self.try_complete_all();
                Ok(())
            }
            Frame::Durable(seq) => {
                let state = self.session_of(peer, session)?;
                state.peer_durable = state.peer_durable.max(seq);
                self.release_held();
                Ok(())
            }
            Frame::Ping(nonce) => {
                self.send(peer, session, Frame::Pong(nonce));
                Ok(())
            }
            Frame::Pong(_) => Ok(()),
            Frame::NewGeneration { current } => self.on_new_generation(peer, session, current),
            Frame::ReadRequest {
                id,
                first_block,
                blocks,
            } => self.serve_read(peer, session, id, first_block, blocks),
            Frame::ReadReply { id, data, error } => {
                self.on_read_reply(peer, session, id, data, error)
            }
            Frame::VerifyRequest {
                id,
                first_block,
                blocks,
            } => self.serve_verify(peer, session, id, first_block, blocks),
            Frame::VerifyReply {
                id,
                first_block,
                stored,
                actual,
                digests,
            } => self.on_verify_reply(
                peer,
                session,
                id,
                first_block,
                crate::volume::BlockChecks {
                    stored,
                    actual,
                    digests,
                },
            ),
            Frame::Bitmap {
                first_word,
                words,
                last,
            } => self.on_bitmap(peer, session, BitmapPart::Words(first_word, &words), last),
            Frame::BitmapRun {
                first_block,
                blocks,
                last,
            } => self.on_bitmap(peer, session, BitmapPart::Run(first_block, blocks), last),
            Frame::ResyncData(data) => self.on_resync_data(peer, session, data),
            Frame::ResyncAck {
                first_block,
                blocks,
            } => self.on_resync_ack(peer, session, first_block, blocks),
            Frame::ResyncDone { current } => self.on_resync_done(peer, session, current),
            Frame::ResyncDoneAck => self.on_resync_done_ack(peer, session),
            Frame::ResyncCheck {
                first_block,
                digests,
            } => self.on_resync_check(peer, session, first_block, digests),
            Frame::ResyncCheckReply {
                first_block,
                blocks,
                differ,
            } => self.on_resync_check_reply(peer, session, first_block, blocks, &differ),
            Frame::PromoteRequest { id } => self.on_promote_request(peer, session, id),
            Frame::PromoteReply { id, ok, reason } => {
                self.on_promote_reply(peer, session, id, ok, reason)
            }
            Frame::Snapshot { name, point } => {
                self.on_snapshot_frame(peer, session, name, point);
                Ok(())
            }
            Frame::SnapshotReply { name, error } => {
                self.on_snapshot_reply(peer, session, &name, error);
                Ok(())
            }
        }
    }

    pub(super) fn session_of(
        &mut self,
        peer: PeerId,
        session: SessionId,
    ) -> Result<&mut Session, SessionEnd> {
        self.peers[peer.0]
            .current(session)
            .ok_or_else(|| SessionEnd::Local("session ended".into()))
    }

    fn on_state(
        &mut self,
        peer: PeerId,
        session: SessionId,
        state: PeerState,
    ) -> Result<(), SessionEnd> {
        if state.role == Role::Primary && self.role == Role::Primary {
            return Err(SessionEnd::Protocol(
                "the peer says it is Primary while this node is (never two primaries)".into(),
            ));
        }
        let name = self.peers[peer.0].config.name.clone();
        let current = self.session_of(peer, session)?;
        // The peer's promotion, if it asked us to agree to one, is decided.
        current.peer_promoting = false;
        let previous = std::mem::replace(&mut current.peer_state, state);
        if state.role == Role::Primary {
            self.primary_lost = None;
        }
        if self.diskless.as_ref().is_some_and(|d| {
            state.disk == DiskState::UpToDate && state.generations.current != d.generation
        }) {
            if let Some(current) = self.peers[peer.0].current(session) {
                current.covers_diskless = true;
            }
        }
        if previous.role != state.role || previous.disk != state.disk {
            self.event(format!(
                "peer {name} role:{} disk:{}",
                state.role, state.disk
            ));
        }
        if state.role == Role::Primary
            && state.disk == DiskState::Diskless
            && previous.disk != DiskState::Diskless
        {
            self.cover_diskless(peer, session);
        }
        self.try_complete_all();
        Ok(())
    }

    /// Our Primary peer detached its failed disk and serves through us: we hold the
    /// only copy. Before another of its records is taken (the data gate), the whole
    /// volume is marked out of sync for it and a generation of our own begins, both
    /// durable: the lost disk can then only come back as a full resync target. Our
    /// STATE with the new generation tells the Primary it may complete writes.
    fn cover_diskless(&mut self, peer: PeerId, session: SessionId) {
        let Some(storage) = self.storage.as_mut() else {
            return;
        };
        let blocks = storage.data_blocks();
        storage.set_out_of_sync(0, blocks);
        let token = self.gated_cover_step(peer, session, false);
        if let Some(storage) = self.storage.as_mut() {
            storage.persist_bitmap(token);
        }
    }

    /// The token of a step of covering a diskless Primary; the session takes none of
    /// its data frames until the step completes.
    fn gated_cover_step(&mut self, peer: PeerId, session: SessionId, rotated: bool) -> Token {
        let token = self.token(Purpose::CoverDiskless {
            peer,
            session,
            rotated,
        });
        if let Some(state) = self.peers[peer.0].current(session) {
            state.data_gate = Some(token);
        }
        token
    }

    fn cover_diskless_step(
        &mut self,
        peer: PeerId,
        session: SessionId,
        rotated: bool,
        result: Result<(), String>,
    ) {
        if let Err(error) = result {
            self.end_session_if(
                peer,
                session,
                SessionEnd::Storage(format!("cannot cover the Primary's lost disk: {error}")),
            );
            return;
        }
        let Some(state) = self.peers[peer.0].current(session) else {
            return;
        };
        if rotated {
            // Both steps are durable: take the Primary's records again.
            state.data_gate = None;
            self.event("covering the Primary's lost disk: every block marked, new generation");
            self.send_state(peer);
            self.release_deferred(peer, session);
            return;
        }
        let new_current = self.random_generation();
        let token = self.gated_cover_step(peer, session, true);
        if let Some(storage) = self.storage.as_mut() {
            storage.update_superblock(SuperblockChange::StartDetached { new_current }, token);
        }
    }

    fn on_record(
        &mut self,
        peer: PeerId,
        session: SessionId,
        record: crate::record::Record,
    ) -> Result<(), SessionEnd> {
        if self.role == Role::Primary {
            return Err(SessionEnd::Protocol(
                "peer sent a record to a Primary (two primaries?); refusing".into(),
            ));
        }
        let seq = record.header.seq;
        let state = self.session_of(peer, session)?;
        if state.peer_state.role != Role::Primary {
            return Err(SessionEnd::Protocol(
                "a peer that is not Primary sent a record".into(),
            ));
        }
        if matches!(state.repl, Repl::Source(_)) {
            return Err(SessionEnd::Protocol(
                "the resync target sent a record to its source".into(),
            ));
        }
        if seq <= state.last_record_seq {
            return Err(SessionEnd::Protocol(format!(
                "record {seq} arrived after {} (out of order or replayed)",
                state.last_record_seq
            )));
        }
        state.last_record_seq = seq;
        self.send(peer, session, Frame::AckReceived(seq));
        let token = self.token(Purpose::Replicated { peer, session, seq });
        self.append_record(peer, session, record, token)
    }

    /// Journals a received record, or parks it (with the data channel) when the
    /// engine's memory budget is full.
    fn append_record(
        &mut self,
        peer: PeerId,
        session: SessionId,
        record: crate::record::Record,
        token: Token,
    ) -> Result<(), SessionEnd> {
        let Some(storage) = self.storage.as_mut() else {
            return Err(SessionEnd::Storage("no local disk".into()));
        };
        match storage.append_replicated(record, token) {
            Ok(None) => {
                self.uncommitted = true;
                Ok(())
            }
            Ok(Some(record)) => {
                // Commit what is sequenced so the journal frees memory, then retry.
                storage.commit();
                self.uncommitted = false;
                self.session_of(peer, session)?.blocked_record = Some((record, token));
                Ok(())
            }
            Err(error) => {
                self.tokens.remove(&token);
                Err(SessionEnd::Protocol(format!(
                    "peer sent a record we cannot take: {error}"
                )))
            }
        }
    }

    /// Retries parked records (after storage progress or a timer).
    fn retry_blocked(&mut self) {
        for index in 0..self.peers.len() {
            let peer = PeerId(index);
            let Some(state) = self.peers[index].session_mut() else {
                continue;
            };
            let session = state.id;
            let Some((record, token)) = state.blocked_record.take() else {
                continue;
            };
            if let Err(why) = self.append_record(peer, session, record, token) {
                self.end_session(peer, why, false);
                continue;
            }
            self.release_deferred(peer, session);
            self.commit_now();
        }
    }

    fn on_ack(
        &mut self,
        peer: PeerId,
        session: SessionId,
        seq: u64,
        written: bool,
    ) -> Result<(), SessionEnd> {
        let early_release = written && self.config.mutated(Mutation::AckBeforePeerDurable);
        let state = self.session_of(peer, session)?;
        if seq > state.shipped_seq {
            return Err(SessionEnd::Protocol(format!(
                "acknowledgement of record {seq}, which was never shipped (last {})",
                state.shipped_seq
            )));
        }
        state.received_seq = state.received_seq.max(seq);
        if written {
            state.written_seq = state.written_seq.max(seq);
            state.note_written(seq);
        }
        if early_release {
            state.peer_durable = state.peer_durable.max(seq);
        }
        while state.lag.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, bytes)) = state.lag.pop_front() {
                state.lag_bytes = state.lag_bytes.saturating_sub(bytes);
            }
        }
        if early_release {
            self.release_held();
        }
        self.try_complete_all();
        Ok(())
    }

    fn on_new_generation(
        &mut self,
        peer: PeerId,
        session: SessionId,
        current: u64,
    ) -> Result<(), SessionEnd> {
        if self.role == Role::Primary {
            return Err(SessionEnd::Protocol(
                "peer announced a new generation to a Primary; refusing".into(),
            ));
        }
        let fresh = self
            .storage
            .as_ref()
            .is_some_and(|s| s.superblock().generations.current == crate::gen::JUST_CREATED);
        let token = self.token(Purpose::Adopt {
            peer,
            session,
            fresh,
        });
        self.session_of(peer, session)?.data_gate = Some(token);
        if let Some(storage) = self.storage.as_mut() {
            storage.update_superblock(SuperblockChange::Adopt { current, fresh }, token);
        }
        Ok(())
    }

    fn serve_read(
        &mut self,
        peer: PeerId,
        session: SessionId,
        id: u64,
        first_block: u64,
        blocks: u32,
    ) -> Result<(), SessionEnd> {
        self.serve_one(peer, session)?;
        let token = self.token(Purpose::PeerRead {
            peer,
            session,
            id,
            first_block,
            blocks,
        });
        if let Some(storage) = self.storage.as_mut() {
            storage.read(
                first_block.saturating_mul(BLOCK_BYTES),
                u64::from(blocks) * BLOCK_BYTES,
                token,
            );
        }
        Ok(())
    }

    fn serve_verify(
        &mut self,
        peer: PeerId,
        session: SessionId,
        id: u64,
        first_block: u64,
        blocks: u32,
    ) -> Result<(), SessionEnd> {
        self.serve_one(peer, session)?;
        let token = self.token(Purpose::PeerVerify {
            peer,
            session,
            id,
            first_block,
        });
        if let Some(storage) = self.storage.as_mut() {
            storage.check_blocks(first_block, u64::from(blocks), token);
        }
        Ok(())
    }

    /// Counts one more request of the peer being served (READ_REQUEST, VERIFY_REQUEST,
    /// RESYNC_CHECK); a peer with [`MAX_SERVED`] in work breaks the protocol.
    pub(super) fn serve_one(&mut self, peer: PeerId, session: SessionId) -> Result<(), SessionEnd> {
        let state = self.session_of(peer, session)?;
        if state.served >= MAX_SERVED {
            return Err(SessionEnd::Protocol(format!(
                "more than {MAX_SERVED} requests at once"
            )));
        }
        state.served += 1;
        Ok(())
    }

    pub(super) fn served_one(&mut self, peer: PeerId, session: SessionId) -> bool {
        match self.peers[peer.0].current(session) {
            Some(state) => {
                state.served = state.served.saturating_sub(1);
                true
            }
            None => false,
        }
    }

    // ----- storage completions -----

    /// A storage operation completed.
    pub fn on_storage(&mut self, now: Time, token: Token, completion: Completion) {
        self.now = now;
        let Some(purpose) = self.tokens.remove(&token) else {
            return;
        };
        // A failed store is detached before its failed completions are taken as the
        // requests' outcome (a diskless Primary completes them through its peers).
        self.check_disk();
        match (purpose, completion) {
            (Purpose::Write(_), Completion::Journaled(result)) => {
                // (A diskless Primary decided the local part when it detached.)
                if let Some(write) = self.writes.get_mut(&token).filter(|w| w.local.is_none()) {
                    write.local = Some(result.map(drop));
                }
                self.try_complete_all();
            }
            (Purpose::Flush, Completion::Flushed(result)) => {
                if let Some(flush) = self.flushes.get_mut(&token).filter(|f| f.local.is_none()) {
                    flush.local = Some(result);
                }
                self.try_complete_all();
            }
            (Purpose::Rotation, Completion::Persisted(result)) => self.rotation_done(result),
            (Purpose::LocalSnapshot { id }, Completion::Persisted(result)) => {
                self.local_snapshot_stored(id, result)
            }
            (
                Purpose::PeerSnapshot {
                    peer,
                    session,
                    name,
                },
                Completion::Persisted(result),
            ) => self.peer_snapshot_stored(peer, session, name, result),
            (Purpose::Replicated { peer, session, seq }, Completion::Journaled(result)) => {
                match result {
                    Ok(_) => {
                        if let Some(state) = self.peers[peer.0].current(session) {
                            // A diskless Primary's records are held for nothing: let
                            // them go now, not at the next tick (a small journal
                            // would keep its next record waiting until then).
                            let diskless_primary = state.peer_state.role == Role::Primary
                                && state.peer_state.disk == DiskState::Diskless;
                            self.send(peer, session, Frame::AckWritten(seq));
                            if diskless_primary {
                                self.release_held();
                            }
                        }
                    }
                    Err(error) => self.end_session_if(
                        peer,
                        session,
                        SessionEnd::Storage(format!("journaling record {seq}: {error}")),
                    ),
                }
            }
            (Purpose::PeerFlush { peer, session, id }, Completion::Flushed(result)) => match result
            {
                Ok(()) => {
                    if self.peers[peer.0].current(session).is_some() {
                        self.send(peer, session, Frame::FlushAck(id));
                    }
                }
                Err(error) => self.end_session_if(
                    peer,
                    session,
                    SessionEnd::Storage(format!("flush: {error}")),
                ),
            },
            (Purpose::MarkTarget { peer, session }, Completion::Persisted(result)) => {
                match result {
                    Ok(()) => {
                        if let Some(state) = self.peers[peer.0].current(session) {
                            state.data_gate = None;
                            self.release_deferred(peer, session);
                        }
                    }
                    Err(error) => self.end_session_if(
                        peer,
                        session,
                        SessionEnd::Storage(format!("cannot mark the disk Inconsistent: {error}")),
                    ),
                }
            }
            (
                Purpose::Adopt {
                    peer,
                    session,
                    fresh,
                },
                Completion::Persisted(result),
            ) => match result {
                Ok(()) => {
                    if let Some(state) = self.peers[peer.0].current(session) {
                        state.data_gate = None;
                        if fresh {
                            if let Some(storage) = self.storage.as_mut() {
                                let blocks = storage.data_blocks();
                                storage.clear_out_of_sync(0, blocks);
                            }
                            self.send_state(peer);
                        }
                        self.release_deferred(peer, session);
                    }
                }
                Err(error) => self.end_session_if(
                    peer,
                    session,
                    SessionEnd::Storage(format!("adopting the new generation: {error}")),
                ),
            },
            (
                Purpose::PeerRead {
                    peer,
                    session,
                    id,
                    first_block,
                    blocks,
                },
                Completion::Read(result),
            ) => {
                if self.served_one(peer, session) {
                    let frame = match result {
                        Ok(data) => Frame::ReadReply {
                            id,
                            data: Some(BlockData {
                                first_block,
                                blocks,
                                crcs: data
                                    .chunks(BLOCK_BYTES as usize)
                                    .map(crate::checksum::block_crc)
                                    .collect(),
                                data: Some(data),
                            }),
                            error: None,
                        },
                        Err(error) => Frame::ReadReply {
                            id,
                            data: None,
                            error: Some(error.to_string()),
                        },
                    };
                    self.send(peer, session, frame);
                }
            }
            (
                Purpose::PeerVerify {
                    peer,
                    session,
                    id,
                    first_block,
                },
                Completion::Checked(result),
            ) => {
                if self.served_one(peer, session) {
                    match result {
                        Ok(checks) => self.send(
                            peer,
                            session,
                            Frame::VerifyReply {
                                id,
                                first_block,
                                stored: checks.stored,
                                actual: checks.actual,
                                digests: checks.digests,
                            },
                        ),
                        Err(error) => self.end_session_if(
                            peer,
                            session,
                            SessionEnd::Protocol(format!("verify request failed: {error}")),
                        ),
                    }
                }
            }
            (
                Purpose::CoverDiskless {
                    peer,
                    session,
                    rotated,
                },
                Completion::Persisted(result),
            ) => self.cover_diskless_step(peer, session, rotated, result),
            (purpose, completion) => self.on_storage_more(purpose, completion),
        }
        self.check_disk();
        self.retry_blocked();
    }

    pub(super) fn end_session_if(&mut self, peer: PeerId, session: SessionId, why: SessionEnd) {
        if self.peers[peer.0].current(session).is_some() {
            self.end_session(peer, why, false);
        }
    }

    // ----- timers -----

    /// Time passed: heartbeats, timeouts, dials, DURABLE reports, resync pacing.
    pub fn on_tick(&mut self, now: Time) {
        self.now = now;
        self.check_disk();
        if self.role == Role::Secondary {
            self.release_held();
        }
        self.promotion_deadline();
        for index in 0..self.peers.len() {
            let peer = PeerId(index);
            match self.tick_peer(peer) {
                Ok(()) => {}
                Err(why) => self.end_session(peer, why, false),
            }
        }
        self.drop_slow_peers();
        self.retry_blocked();
        self.tick_balanced_reads();
    }

    /// A peer that leaves a shipped write not durable, a FLUSH unanswered, or resync
    /// data unacknowledged, for longer than `ko_timeout` is dropped (its blocks marked, the generation
    /// rotated, the waiting requests completed without it): a sick spare — a hung
    /// disk, a data connection that black-holes while pings still flow — never hangs
    /// the Primary. (DRBD's `timeout` × `ko-count`.)
    fn drop_slow_peers(&mut self) {
        let now = self.now;
        let limit = self.config.timing.ko_timeout;
        let mut slow = Vec::new();
        for peer in &mut self.peers {
            let peer_id = peer.id;
            let Some(session) = peer.session_mut() else {
                continue;
            };
            while session
                .shipped_at
                .front()
                .is_some_and(|&(seq, _)| seq <= session.peer_durable)
            {
                session.shipped_at.pop_front();
            }
            let oldest_write = session.shipped_at.front().map(|&(_, at)| at);
            let oldest_flush = self
                .flushes
                .values()
                .filter(|flush| {
                    flush
                        .waits
                        .iter()
                        .any(|&(p, s, _)| p == peer_id && s == session.id)
                })
                .map(|flush| flush.started)
                .min();
            let stalled_resync = match &session.repl {
                Repl::Source(source)
                    if !source.in_flight.is_empty()
                        || matches!(source.phase, SourcePhase::WaitPeerBitmap { .. }) =>
                {
                    Some(source.progress_at)
                }
                _ => None,
            };
            let oldest = [oldest_write, oldest_flush, stalled_resync]
                .into_iter()
                .flatten()
                .min();
            if let Some(age) = oldest.map(|at| now.since(at)).filter(|age| *age > limit) {
                slow.push((peer_id, age));
            }
        }
        for (peer, age) in slow {
            self.end_session(peer, SessionEnd::TooSlow(age), false);
        }
    }

    /// One peer's timers; an error ends its session.
    fn tick_peer(&mut self, peer: PeerId) -> Result<(), SessionEnd> {
        let now = self.now;
        let timing = self.config.timing;
        let has_disk = self.storage.is_some();
        let durable = self.storage.as_ref().map(|s| s.durable_seq());
        let state = &mut self.peers[peer.0];
        let dialer = state.dialer;
        let session = match &mut state.conn {
            Conn::Connecting { next_dial, dialing } => {
                if dialer && !*dialing && now >= *next_dial && has_disk {
                    *dialing = true;
                    self.actions.push_back(Action::Dial { peer });
                }
                return Ok(());
            }
            Conn::Handshake { deadline, .. } if now >= *deadline => {
                return Err(SessionEnd::Protocol("peer sent no STATE".into()));
            }
            Conn::Connected(session) => session,
            _ => return Ok(()),
        };
        let silent = now.since(session.last_heard);
        if silent > timing.timeout {
            return Err(SessionEnd::Silent(silent));
        }
        if session
            .requests
            .values()
            .any(|request| now >= request.deadline)
        {
            return Err(SessionEnd::Protocol(
                "the peer did not answer a request in time".into(),
            ));
        }
        let id = session.id;
        let mut frames = Vec::new();
        if now >= session.next_ping {
            session.ping_nonce += 1;
            session.next_ping = now + timing.ping_interval;
            frames.push(Frame::Ping(session.ping_nonce));
        }
        if now >= session.next_durable_report {
            session.next_durable_report = now + timing.durable_report;
            if let Some(durable) = durable.filter(|d| *d > session.reported_durable) {
                session.reported_durable = durable;
                frames.push(Frame::Durable(durable));
            }
        }
        for frame in frames {
            self.send(peer, id, frame);
        }
        self.tick_resync(peer, id)
    }

    /// When [`Node::on_tick`] must run next.
    pub fn next_timeout(&self) -> Option<Time> {
        let timing = self.config.timing;
        let mut next: Option<Time> = None;
        // A tick handles everything due when it runs; a time not after `now` here is
        // one that waits for something else (a window, a gate): look again shortly,
        // never in a loop at the same instant.
        let soon = self.now + RETRY_INTERVAL;
        let mut consider = |at: Time| {
            let at = if at <= self.now { soon } else { at };
            next = Some(next.map_or(at, |n| n.min(at)));
        };
        if let Some(promotion) = &self.promotion {
            consider(promotion.deadline);
        }
        if let Some(at) = self.next_read_fallback() {
            consider(at);
        }
        for peer in &self.peers {
            match &peer.conn {
                Conn::Connecting { next_dial, dialing }
                    if peer.dialer && !*dialing && self.storage.is_some() =>
                {
                    consider(*next_dial)
                }
                Conn::Handshake { deadline, .. } => consider(*deadline),
                Conn::Connected(session) => {
                    consider(session.last_heard + timing.timeout + Duration::from_millis(1));
                    consider(session.next_ping);
                    consider(session.next_durable_report);
                    for request in session.requests.values() {
                        consider(request.deadline);
                    }
                    if session.blocked_record.is_some() {
                        consider(self.now + RETRY_INTERVAL);
                    }
                    if let Some(at) = Self::resync_wake(session) {
                        consider(at);
                    }
                }
                _ => {}
            }
        }
        next
    }

    /// Internal consistency (assertions for tests and the simulator). Panics on a bug.
    pub fn invariants(&self) {
        if self.role != Role::Primary {
            assert!(
                self.writes.is_empty() || self.demoting.is_some() || self.storage.is_none(),
                "a Secondary has client writes in flight"
            );
        }
        for peer in &self.peers {
            if let Some(session) = peer.session() {
                assert!(
                    !(session.shipping && self.role != Role::Primary && self.demoting.is_none()),
                    "a Secondary ships records to {}",
                    peer.config.name
                );
                assert!(session.received_seq <= session.shipped_seq || !session.shipping);
                assert!(session.written_seq <= session.received_seq);
                assert!(session.served <= MAX_SERVED);
                if let Repl::Source(source) = &session.repl {
                    let sum: u64 = source.in_flight.values().map(|b| b * BLOCK_BYTES).sum();
                    assert_eq!(sum, source.in_flight_bytes, "resync in-flight accounting");
                    if matches!(
                        source.phase,
                        SourcePhase::Flushing | SourcePhase::Done { .. } | SourcePhase::Closing
                    ) {
                        assert!(source.in_flight.is_empty());
                    }
                }
            }
        }
        if self.engine_attached {
            assert!(
                self.all_peers_shipping(),
                "engine holds for peers not all shipping"
            );
        }
        for (token, purpose) in &self.tokens {
            if let Purpose::Write(id) = purpose {
                assert!(
                    self.writes.get(token).is_some_and(|w| w.id == *id),
                    "a write token without its write"
                );
            }
        }
    }
}
