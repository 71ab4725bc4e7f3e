//! One resource on this node: the driver of its replication state machine.
//!
//! Everything the resource decides is decided by [`engine::node::Node`]; this module
//! feeds it — client requests from the NBD server, frames from the peer transport,
//! storage completions, a 10 ms tick, operator commands — and carries out what it
//! answers. One lock (`core`) guards the node together with its sessions' outboxes,
//! and every frame the node sends is queued under that lock, so frames leave in the
//! order it made them. Completions of client requests, events, hooks and dials are
//! carried out after the lock is released.
//!
//! The write path: a client write takes in-flight permits (async back-pressure, so no
//! runtime thread ever blocks in the engine), is handed to the node (which sequences
//! it and queues its records for every peer), yields once so that the writes the
//! connection has already read are sequenced too, then asks for the group commit and
//! waits for the node's completion. No runtime thread waits for a disk: slow storage
//! work runs on the engine's threads and the storage adapter's worker.
//!
//! Lock order: `core` → an outbox's queue. `volume`, `local` and the waiter tables
//! are never held while `core` is taken.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use engine::backend::{self, BackendKind, OpenOptions};
use engine::node::storage::{CompletionQueue, VolumeStorage};
use engine::node::{
    self, Action, AdminError, AdminId, AdminOutput, AttachFacts, HookKind, Node, OnIoError, PeerId,
    ReadBalancing, ReadRoute, RequestError, RequestId, SessionEnd, SessionId, Time,
};
use engine::repl::{ConnectionState, DiskState, Role};
use engine::volume::{MetaStore, OpenReport};
use engine::wire::{Channel, Frame};
use engine::{IoError, Volume, VolumeOptions, WriteKind, WriteRequest};
use tokio::sync::{broadcast, oneshot, watch, Notify, Semaphore};

use crate::config::{IoMode, NodeConfig, ResourceConfig};
use crate::control::{ChecksumCacheStatus, GenerationStatus, IoStatus, PeerStatus, ResourceStatus};
use crate::nbd::{Errno, Export};
use crate::peer::{self, Connections, Identity, LinkError, SessionHandle};

/// Opens a node's backing store (and its metadata) as the config says.
pub fn open_stores(
    node: &NodeConfig,
    io: IoMode,
) -> Result<(Arc<dyn backend::Backend>, MetaStore), backend::BackendError> {
    let (data, internal_meta) = match io {
        IoMode::Direct => {
            let data = backend::open(
                &node.disk,
                OpenOptions {
                    kind: BackendKind::Auto,
                    direct: true,
                },
            )?;
            // The journal and metadata go through the page cache (fast group commits);
            // when O_DIRECT was refused anyway, one handle serves both.
            let meta = if data.is_direct() {
                MetaStore::InternalHandle(backend::open(
                    &node.disk,
                    OpenOptions {
                        kind: BackendKind::Pread,
                        direct: false,
                    },
                )?)
            } else {
                MetaStore::Internal
            };
            (data, meta)
        }
        IoMode::Buffered => (
            backend::open(
                &node.disk,
                OpenOptions {
                    kind: BackendKind::Pread,
                    direct: false,
                },
            )?,
            MetaStore::Internal,
        ),
    };
    let meta = match node.meta_disk.as_deref() {
        None | Some("internal") => internal_meta,
        Some(path) => MetaStore::External(backend::open(
            Path::new(path),
            OpenOptions {
                kind: BackendKind::Pread,
                direct: false,
            },
        )?),
    };
    Ok((data, meta))
}

/// Why a store cannot be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is in use (a running replicad holds it)")]
    InUse { path: String },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Takes an exclusive advisory lock on the backing store, so `create-md` and a second
/// daemon cannot touch a store that is in use.
pub fn lock_store(path: &Path) -> Result<File, LockError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|source| LockError::Open {
        path: shown.clone(),
        source,
    })?;
    // SAFETY: flock on a valid descriptor owned by `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LockError::InUse { path: shown });
        }
        return Err(LockError::Lock {
            path: shown,
            source,
        });
    }
    Ok(file)
}

/// What went wrong with a resource command, by kind (`replctl` prints the message;
/// `status --json` and the control protocol carry [`ResourceError::kind`]).
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("already attached")]
    AlreadyAttached,
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot open the store: {0}")]
    Open(String),
    #[error("closing the store failed: {0}")]
    Close(String),
    #[error("refusing to detach the only copy while Primary: demote first")]
    OnlyCopy,
    #[error("this node is a diskless Primary serving through its peer: demote it (or fail over) before attaching a disk")]
    DisklessPrimary,
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("no disk is attached on this node")]
    NoDisk,
    #[error(transparent)]
    Snapshot(#[from] engine::snapshot::SnapshotError),
    #[error("snapshot {name:?} is being read by {readers} NBD client(s): disconnect them first")]
    SnapshotInUse { name: String, readers: usize },
}

impl ResourceError {
    pub fn kind(&self) -> &'static str {
        match self {
            ResourceError::Admin(error) => error.kind(),
            ResourceError::AlreadyAttached => "already-attached",
            ResourceError::Lock(_) => "store-locked",
            ResourceError::Open(_) => "store-open",
            ResourceError::Close(_) => "store-close",
            ResourceError::OnlyCopy | ResourceError::DisklessPrimary => "refused",
            ResourceError::ShuttingDown => "shutting-down",
            ResourceError::NoDisk => "no-disk",
            ResourceError::Snapshot(error) => error.kind(),
            ResourceError::SnapshotInUse { .. } => "snapshot-in-use",
        }
    }
}

fn hex(id: u64) -> String {
    format!("{id:016X}")
}

fn errno(error: &RequestError) -> Errno {
    Errno(error.errno())
}

/// A peer as the config names it.
struct PeerEntry {
    name: String,
    node_id: u32,
    address: std::net::SocketAddr,
}

/// The state machine and its sessions' transport handles, under one lock.
struct Core {
    node: Node<VolumeStorage>,
    sessions: Vec<Option<SessionHandle>>,
}

/// Facts outside the state machine.
#[derive(Default)]
struct Local {
    disk_error: Option<String>,
    recovery: Option<String>,
    /// Held while attached.
    lock: Option<File>,
}

/// Who waits for which request or command.
#[derive(Default)]
struct Waiters {
    requests: HashMap<u64, oneshot::Sender<Result<(), RequestError>>>,
    /// Reads served by a peer.
    reads: HashMap<u64, oneshot::Sender<Result<Bytes, RequestError>>>,
    admins: HashMap<u64, oneshot::Sender<Result<AdminOutput, AdminError>>>,
}

/// See the module documentation.
pub struct Resource {
    pub name: String,
    pub node: String,
    pub node_id: u32,
    pub config: ResourceConfig,
    pub node_config: NodeConfig,
    pub uuid: [u8; 16],
    identity: Identity,
    peers: Vec<PeerEntry>,
    core: Mutex<Core>,
    /// The open volume, for reads and status without the core lock.
    volume: RwLock<Option<Volume>>,
    completions: CompletionQueue,
    completion_wake: Arc<Notify>,
    /// Fired after every step: a data gate may have opened.
    gate: Notify,
    /// Per peer: its data frames wait (mirrors the node, read without the lock).
    gated: Vec<AtomicBool>,
    /// Mirrors of the node for the NBD server, read without the lock.
    writable: AtomicBool,
    exportable: AtomicBool,
    /// How often `exportable` went from true to false, watched by connected NBD
    /// clients (each is disconnected at the first change after it connected).
    unservable: watch::Sender<u64>,
    waiters: Mutex<Waiters>,
    next_id: AtomicU64,
    /// Client reads served by the local store since start (the peers' count is the
    /// node's).
    reads_local: AtomicU64,
    /// In-flight client write payload, in KiB (async back-pressure).
    inflight: Semaphore,
    inflight_permits: AtomicU32,
    events: broadcast::Sender<String>,
    local: Mutex<Local>,
    /// Serialises attach and detach.
    admin: tokio::sync::Mutex<()>,
    epoch: Instant,
    this: Weak<Resource>,
    /// Per snapshot: NBD clients reading it (a snapshot being read is not deleted).
    snapshot_readers: Mutex<HashMap<String, usize>>,
}

impl Resource {
    pub fn new(
        name: &str,
        node: &str,
        config: &ResourceConfig,
        secret: Option<engine::auth::Secret>,
        events: broadcast::Sender<String>,
    ) -> Result<Arc<Resource>, crate::config::ConfigError> {
        let node_config = config
            .nodes
            .get(node)
            .ok_or_else(|| crate::config::ConfigError::UnknownNode {
                node: node.to_string(),
                resource: name.to_string(),
            })?
            .clone();
        let node_id = config.node_id(node).unwrap_or(0);
        let uuid = config.resource_uuid(name);
        let peers: Vec<PeerEntry> = config
            .nodes
            .iter()
            .filter(|(peer, _)| peer.as_str() != node)
            .map(|(peer, peer_config)| PeerEntry {
                name: peer.clone(),
                node_id: config.node_id(peer).unwrap_or(0),
                address: peer_config.address,
            })
            .collect();
        let timing = node::Timing {
            ping_interval: config.ping_interval(),
            timeout: config.timeout(),
            ko_timeout: config.ko_timeout(),
            ..node::Timing::default()
        };
        let machine_config = node::NodeConfig {
            resource: name.to_string(),
            uuid,
            node_name: node.to_string(),
            node_id,
            mode: config.mode,
            peers: peers
                .iter()
                .map(|peer| node::PeerConfig {
                    name: peer.name.clone(),
                    node_id: peer.node_id,
                })
                .collect(),
            timing,
            resync: node::ResyncConfig {
                rate_bytes: config.resync_rate,
                checksum_first: config.checksum_resync,
                yield_to_clients: config.resync_yield,
            },
            on_io_error: config.on_io_error,
            read_balancing: config.read_balancing,
            mutation: None,
        };
        let completion_wake = Arc::new(Notify::new());
        let wake = completion_wake.clone();
        let completions = CompletionQueue::new(Arc::new(move || wake.notify_one()));
        let epoch = Instant::now();
        let gated = peers.iter().map(|_| AtomicBool::new(false)).collect();
        let sessions = peers.iter().map(|_| None).collect();
        Ok(Arc::new_cyclic(|this| Resource {
            name: name.to_string(),
            node: node.to_string(),
            node_id,
            config: config.clone(),
            node_config,
            uuid,
            identity: Identity {
                resource: name.to_string(),
                uuid,
                node: node.to_string(),
                node_id,
                secret,
            },
            peers,
            core: Mutex::new(Core {
                node: Node::new(machine_config, Time::ZERO, engine::rng::os_random_u64()),
                sessions,
            }),
            volume: RwLock::new(None),
            completions,
            completion_wake,
            gate: Notify::new(),
            gated,
            writable: AtomicBool::new(false),
            exportable: AtomicBool::new(false),
            unservable: watch::Sender::new(0),
            waiters: Mutex::new(Waiters::default()),
            next_id: AtomicU64::new(1),
            reads_local: AtomicU64::new(0),
            inflight: Semaphore::new(0),
            inflight_permits: AtomicU32::new(0),
            events,
            local: Mutex::new(Local::default()),
            admin: tokio::sync::Mutex::new(()),
            epoch,
            this: this.clone(),
            snapshot_readers: Mutex::new(HashMap::new()),
        }))
    }

    fn now(&self) -> Time {
        Time::from_nanos(u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn lock_core(&self) -> MutexGuard<'_, Core> {
        // A poisoned lock means a bug panicked while stepping the node; its state may
        // be half-changed, but refusing every later request would take the daemon
        // down with it. The panic itself is in the log.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the node, delivers storage completions, queues the frames it sends
    /// (under the lock), then carries out the rest of its actions.
    fn step<R>(&self, f: impl FnOnce(&mut Core, Time) -> R) -> R {
        let mut later = Vec::new();
        let result = {
            let mut core = self.lock_core();
            let now = self.now();
            let result = f(&mut core, now);
            self.settle(&mut core, now, &mut later);
            result
        };
        self.gate.notify_waiters();
        self.carry_out(later);
        result
    }

    fn settle(&self, core: &mut Core, now: Time, later: &mut Vec<Action>) {
        // Bounded: completions keep arriving from engine threads under load, and each
        // round takes what is there; the rest wakes the completion task.
        for _ in 0..64 {
            for (token, completion) in self.completions.drain() {
                core.node.on_storage(now, token, completion);
            }
            while let Some(action) = core.node.poll_action() {
                match action {
                    Action::Send {
                        peer,
                        session,
                        frame,
                    } => {
                        if let Some(handle) = core.sessions[peer.0]
                            .as_ref()
                            .filter(|handle| handle.id == session)
                        {
                            handle.outbox(frame.channel()).push(frame);
                        }
                    }
                    Action::Close {
                        peer,
                        session,
                        linger,
                    } => {
                        if core.sessions[peer.0]
                            .as_ref()
                            .is_some_and(|handle| handle.id == session)
                        {
                            if let Some(handle) = core.sessions[peer.0].take() {
                                handle.close(linger);
                            }
                        }
                    }
                    other => later.push(other),
                }
            }
            if self.completions.is_empty() {
                break;
            }
        }
        if let Some(failed) = core.node.take_failed_storage() {
            self.close_failed_store(failed, core.node.detached_reason());
        }
        for (index, gated) in self.gated.iter().enumerate() {
            gated.store(
                !core.node.wants_frames(PeerId(index), Channel::Data),
                Ordering::Relaxed,
            );
        }
        let node = &core.node;
        self.writable.store(node.is_writable(), Ordering::Relaxed);
        let exportable = matches!(node.disk(), DiskState::UpToDate | DiskState::Outdated)
            || (node.role() == Role::Primary
                && (node.storage().is_some() || node.is_diskless_primary()));
        if self.exportable.swap(exportable, Ordering::Relaxed) && !exportable {
            self.unservable.send_modify(|count| *count += 1);
        }
    }

    fn carry_out(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Complete { id, result } => {
                    if let Some(sender) = self.lock_waiters().requests.remove(&id.0) {
                        let _ = sender.send(result);
                    }
                }
                Action::ReadDone { id, result } => {
                    if let Some(sender) = self.lock_waiters().reads.remove(&id.0) {
                        let _ = sender.send(result);
                    }
                }
                Action::AdminDone { id, result } => {
                    if let Some(sender) = self.lock_waiters().admins.remove(&id.0) {
                        let _ = sender.send(result);
                    }
                }
                Action::Event(text) => self.emit(&text),
                Action::Hook { kind, env } => self.run_hook(kind, &env),
                Action::Dial { peer } => self.dial(peer),
                Action::Send { .. } | Action::Close { .. } => {}
            }
        }
    }

    /// The node detached its failed store (`on-io-error = detach`): the NBD server
    /// stops reading through it, and it is closed without a checkpoint on a thread of
    /// its own (a dying disk may take long to fail every call).
    fn close_failed_store(&self, failed: VolumeStorage, why: Option<&str>) {
        let volume = self
            .volume
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let lock = {
            let mut local = self.lock_local();
            local.disk_error = why.map(str::to_string);
            local.lock.take()
        };
        let name = self.name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-detach"))
            .spawn(move || {
                if let Some(volume) = volume {
                    volume.abandon();
                }
                drop(failed);
                drop(lock);
            });
        if let Err(error) = spawned {
            tracing::error!("{name}: cannot start the thread closing the failed disk: {error}");
        }
    }

    fn register(&self) -> (RequestId, oneshot::Receiver<Result<(), RequestError>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.lock_waiters().requests.insert(id, sender);
        (RequestId(id), receiver)
    }

    fn register_admin(&self) -> (AdminId, oneshot::Receiver<Result<AdminOutput, AdminError>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.lock_waiters().admins.insert(id, sender);
        (AdminId(id), receiver)
    }

    /// Runs an operator command that answers later.
    async fn admin_command(
        &self,
        command: impl FnOnce(&mut Node<VolumeStorage>, Time, AdminId),
    ) -> Result<AdminOutput, ResourceError> {
        let (id, receiver) = self.register_admin();
        self.step(|core, now| command(&mut core.node, now, id));
        Ok(receiver.await.map_err(|_| ResourceError::ShuttingDown)??)
    }

    pub(crate) async fn admin_message(
        &self,
        command: impl FnOnce(&mut Node<VolumeStorage>, Time, AdminId),
    ) -> Result<String, ResourceError> {
        match self.admin_command(command).await? {
            AdminOutput::Message(text) => Ok(text),
            AdminOutput::Verify { blocks } => Ok(format!("{} blocks differ", blocks.len())),
        }
    }

    // ----- transport -----

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The peer called `name`: its id, name and node id.
    pub fn peer_by_name(&self, name: &str) -> Option<(PeerId, String, u32)> {
        self.peers
            .iter()
            .position(|peer| peer.name == name)
            .map(|index| {
                let peer = &self.peers[index];
                (PeerId(index), peer.name.clone(), peer.node_id)
            })
    }

    /// Whether a connection from `peer` would be taken now.
    pub fn accepts(&self, peer: PeerId) -> bool {
        self.lock_core().node.accepts(peer)
    }

    /// The listener refused a connection that claimed to be (or to reach) a peer.
    pub fn refused_a_peer(&self, peer: Option<PeerId>, reason: &str) {
        self.emit(&format!("refused a connection: {reason}"));
        let peer = peer.unwrap_or(PeerId(0));
        if peer.0 < self.peers.len() {
            self.step(|core, _| {
                core.node.note_error(
                    peer,
                    SessionEnd::Refused(format!("refused a peer: {reason}")),
                )
            });
        }
    }

    /// A connection of (or to) `peer` failed authentication: both nodes log it, status
    /// shows it; a running session is not touched.
    pub fn auth_failed(&self, peer: PeerId, reason: &str) {
        self.emit(&format!("refused a connection: {reason}"));
        self.step(|core, _| {
            core.node
                .note_error(peer, SessionEnd::Unauthenticated(reason.into()))
        });
    }

    /// A checked pair of connections from (or to) `peer`: a new session.
    pub fn incoming(&self, peer: PeerId, connections: Connections) {
        let Some(this) = self.this.upgrade() else {
            return;
        };
        self.step(|core, now| {
            if let Some(session) = core.node.on_connected(now, peer) {
                if let Some(old) = core.sessions[peer.0].take() {
                    old.close(false);
                }
                core.sessions[peer.0] =
                    Some(peer::start_session(&this, peer, session, connections));
            }
        });
    }

    fn dial(&self, peer: PeerId) {
        let Some(this) = self.this.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let entry = &this.peers[peer.0];
            match peer::dial(entry.address, &this.identity, &entry.name, entry.node_id).await {
                Ok(connections) => this.incoming(peer, connections),
                Err(error) => {
                    // A refusal is not a network failure: status names its kind, and
                    // the log says it once (not at every retry).
                    let refusal = match &error {
                        LinkError::Auth(error) => {
                            Some(SessionEnd::Unauthenticated(error.to_string()))
                        }
                        LinkError::Refused(reason) => {
                            Some(SessionEnd::RefusedByPeer(reason.clone()))
                        }
                        _ => None,
                    };
                    let mut news = None;
                    this.step(|core, now| {
                        let before = core.node.peers()[peer.0].last_error.clone();
                        core.node.on_dial_failed(now, peer, error.to_string());
                        if let Some(refusal) = refusal {
                            if before.as_ref() != Some(&refusal) {
                                news = Some(refusal.to_string());
                            }
                            core.node.note_error(peer, refusal);
                        }
                    });
                    if let Some(news) = news {
                        this.emit(&format!("connection to {} refused: {news}", entry.name));
                    }
                }
            }
        });
    }

    /// A frame from `peer`'s session.
    pub fn frame_in(&self, peer: PeerId, session: SessionId, frame: Frame) {
        self.step(|core, now| core.node.handle_frame(now, peer, session, frame));
    }

    /// A reader has no further frame at hand: the group commit point.
    pub fn end_of_batch(&self) {
        self.step(|core, now| core.node.end_of_batch(now));
    }

    /// A session's connection failed.
    pub fn session_closed(&self, peer: PeerId, session: SessionId, why: String) {
        self.step(|core, now| core.node.on_closed(now, peer, session, why));
    }

    /// Waits until `peer`'s data frames are taken again (a storage operation gates them).
    pub async fn wait_for_data_gate(&self, peer: PeerId) {
        loop {
            let opened = self.gate.notified();
            if !self.gated[peer.0].load(Ordering::Relaxed) {
                return;
            }
            // The gate can open from a completion alone: bounded wait, then re-check.
            let _ = tokio::time::timeout(Duration::from_millis(20), opened).await;
        }
    }

    /// The resource's background work until shutdown: the node's timers (a 10 ms
    /// tick) and storage completions that arrive while nothing else steps the node.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(Duration::from_millis(10));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.step(|core, now| core.node.on_tick(now));
                    // A snapshot invalidated by the applier (area full, log write error).
                    if let Some(volume) = self.volume() {
                        for event in volume.take_snapshot_events() {
                            self.emit(&event);
                        }
                    }
                }
                _ = self.completion_wake.notified() => {
                    if !self.completions.is_empty() {
                        self.step(|_, _| ());
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    // ----- attach / detach -----

    /// The open volume, if attached.
    pub fn volume(&self) -> Option<Volume> {
        self.volume
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The resource names no other node.
    pub fn single_node(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn role(&self) -> Role {
        self.lock_core().node.role()
    }

    pub fn disk(&self) -> DiskState {
        self.lock_core().node.disk()
    }

    /// Opens the backing store (recovery runs here) on a blocking thread.
    pub async fn attach(&self) -> Result<OpenReport, ResourceError> {
        let _admin = self.admin.lock().await;
        if self.volume().is_some() {
            return Err(ResourceError::AlreadyAttached);
        }
        if self.lock_core().node.is_diskless_primary() {
            // Its peer holds newer data than the detached store: that store can only
            // come back as a resync target, which a Primary cannot be.
            return Err(ResourceError::DisklessPrimary);
        }
        self.step(|core, _| core.node.set_attaching(true));
        let disk = self.node_config.disk.clone();
        let node_config = self.node_config.clone();
        let io = self.config.io;
        let uuid = self.uuid;
        let options = VolumeOptions {
            mark_replayed_out_of_sync: !self.single_node(),
            // No runtime thread waits for the store: with a hung disk this node must
            // still answer pings and report what it can.
            commit_inline: false,
            checksum_cache_bytes: self.config.checksum_cache_bytes(),
            snapshots: self.node_config.snapshot_dir.as_ref().map(|dir| {
                engine::snapshot::SnapshotOptions {
                    dir: dir.clone(),
                    area_bytes: self.config.snapshot_area_bytes(),
                }
            }),
            ..VolumeOptions::default()
        };
        let opened = tokio::task::spawn_blocking(move || {
            let lock = lock_store(&disk)?;
            let (data, meta) =
                open_stores(&node_config, io).map_err(|e| ResourceError::Open(e.to_string()))?;
            let (volume, report) = Volume::open(data, meta, Some(uuid), options)
                .map_err(|e| ResourceError::Open(e.to_string()))?;
            Ok::<_, ResourceError>((volume, report, lock))
        })
        .await
        .map_err(|e| ResourceError::Open(e.to_string()))
        .and_then(|result| result);
        match opened {
            Ok((volume, report, lock)) => {
                self.size_inflight_limit(volume.geometry().journal_bytes);
                let recovery = if report.was_clean {
                    "clean".to_string()
                } else {
                    format!(
                        "crash recovery replayed {} journal records ({} bytes); scan stopped: {}",
                        report.records_replayed, report.bytes_replayed, report.scan_stop
                    )
                };
                {
                    let mut local = self.lock_local();
                    local.lock = Some(lock);
                    local.disk_error = None;
                    local.recovery = Some(recovery.clone());
                }
                *self.volume.write().unwrap_or_else(|p| p.into_inner()) = Some(volume.clone());
                let storage = VolumeStorage::new(volume, self.completions.clone(), false);
                let facts = AttachFacts {
                    crashed_primary: report.was_primary && !report.was_clean,
                };
                self.step(|core, now| core.node.attach(now, storage, facts));
                self.emit(&format!("disk attached ({recovery})"));
                Ok(report)
            }
            Err(error) => {
                self.step(|core, _| core.node.set_attaching(false));
                self.lock_local().disk_error = Some(error.to_string());
                self.emit(&format!("disk:Diskless attach failed: {error}"));
                Err(error)
            }
        }
    }

    /// Closes the volume cleanly (Diskless afterwards). Refused while Primary without
    /// a connected peer.
    pub async fn detach(&self) -> Result<(), ResourceError> {
        let _admin = self.admin.lock().await;
        let refused = {
            let core = self.lock_core();
            core.node.role() == Role::Primary
                && core
                    .node
                    .peers()
                    .iter()
                    .all(|peer| peer.connection_state() != ConnectionState::Connected)
        };
        if refused {
            return Err(ResourceError::OnlyCopy);
        }
        self.close_volume("detached by the operator").await
    }

    /// Ends every session, takes the store from the node and closes it.
    pub async fn close_volume(&self, why: &str) -> Result<(), ResourceError> {
        self.step(|core, now| {
            core.node.take_storage(now, why);
        });
        let volume = self
            .volume
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(volume) = volume else { return Ok(()) };
        let result = tokio::task::spawn_blocking(move || volume.close())
            .await
            .map_err(|e| ResourceError::Close(e.to_string()))?
            .map_err(|e| ResourceError::Close(e.to_string()));
        self.lock_local().lock = None;
        self.emit("disk:Diskless (detached)");
        result
    }

    // ----- operator commands -----

    pub async fn promote(&self, force: bool) -> Result<String, ResourceError> {
        self.admin_message(|node, now, id| node.promote(now, id, force))
            .await
    }

    pub async fn demote(&self) -> Result<String, ResourceError> {
        self.admin_message(|node, now, id| node.demote(now, id))
            .await
    }

    pub async fn invalidate(&self) -> Result<String, ResourceError> {
        self.admin_message(|node, now, id| node.invalidate(now, id))
            .await
    }

    pub async fn new_current_uuid(&self, clear_bitmap: bool) -> Result<String, ResourceError> {
        self.admin_message(|node, now, id| node.new_current_uuid(now, id, clear_bitmap))
            .await
    }

    /// Online verify: the blocks that differ between the replicas (marked out of sync;
    /// with `repair`, resynced).
    pub async fn verify(&self, repair: bool) -> Result<Vec<u64>, ResourceError> {
        match self
            .admin_command(|node, now, id| node.verify(now, id, repair))
            .await?
        {
            AdminOutput::Verify { blocks } => Ok(blocks),
            AdminOutput::Message(_) => Ok(Vec::new()),
        }
    }

    pub fn connect(&self, discard_my_data: bool) -> Result<String, ResourceError> {
        Ok(self.step(|core, now| core.node.connect(now, discard_my_data))?)
    }

    pub fn disconnect(&self) -> Result<String, ResourceError> {
        Ok(self.step(|core, now| core.node.disconnect(now))?)
    }

    pub fn pause_sync(&self, paused: bool) -> Result<String, ResourceError> {
        Ok(self.step(|core, now| core.node.pause_sync(now, paused))?)
    }

    // ----- events and hooks -----

    /// Publishes an event line to `replctl events` subscribers and the log.
    /// NBD clients reading snapshot `name` now.
    pub fn snapshot_readers(&self, name: &str) -> usize {
        let readers = self
            .snapshot_readers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        readers.get(name).copied().unwrap_or(0)
    }

    /// Counts a reader of snapshot `name` in (`+1`) or out (`-1`).
    pub fn add_snapshot_reader(&self, name: &str, change: isize) {
        let mut readers = self
            .snapshot_readers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let count = readers.entry(name.to_string()).or_default();
        *count = count.saturating_add_signed(change);
        if *count == 0 {
            readers.remove(name);
        }
    }

    pub fn emit(&self, text: &str) {
        let line = format!("{} {} {text}", crate::now_rfc3339(), self.name);
        tracing::info!("{}: {text}", self.name);
        let _ = self.events.send(line);
    }

    /// Runs a hook command (if configured) in the background with `REPLICAD_*` variables.
    fn run_hook(&self, kind: HookKind, extra: &[(&'static str, String)]) {
        let command = match kind {
            HookKind::RoleChange => self.config.hooks.role_change.clone(),
            HookKind::SplitBrain => self.config.hooks.split_brain.clone(),
            HookKind::SyncDone => self.config.hooks.sync_done.clone(),
        };
        let Some(command) = command else { return };
        let mut process = tokio::process::Command::new("sh");
        process
            .arg("-c")
            .arg(&command)
            .env("REPLICAD_RESOURCE", &self.name)
            .env("REPLICAD_NODE", &self.node)
            .env("REPLICAD_EVENT", kind.name());
        for (key, value) in extra {
            process.env(key, value);
        }
        process.kill_on_drop(true);
        let name = self.name.clone();
        tokio::spawn(async move {
            let outcome = match process.spawn() {
                Ok(mut child) => {
                    match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
                        Ok(Ok(status)) if status.success() => return,
                        Ok(Ok(status)) => format!("exited with {status}"),
                        Ok(Err(error)) => error.to_string(),
                        Err(_) => "timed out after 60s".to_string(),
                    }
                }
                Err(error) => error.to_string(),
            };
            tracing::warn!("{name}: {} hook `{command}` failed: {outcome}", kind.name());
        });
    }

    /// Sets the in-flight write limit to half of the attached store's journal.
    fn size_inflight_limit(&self, journal_bytes: u64) {
        let wanted = (journal_bytes / 2 / 1024).clamp(64, u64::from(u32::MAX) / 2) as u32;
        let previous = self.inflight_permits.swap(wanted, Ordering::SeqCst);
        if wanted > previous {
            self.inflight.add_permits((wanted - previous) as usize);
        } else {
            self.inflight.forget_permits((previous - wanted) as usize);
        }
    }

    /// Permits (KiB) a write of `length` bytes takes.
    fn permits(&self, length: u64) -> u32 {
        (length.div_ceil(1024) as u32 + 1).min(self.inflight_permits.load(Ordering::Relaxed).max(1))
    }

    // ----- the client path -----

    /// The write path (see the module documentation).
    pub async fn submit(&self, request: WriteRequest) -> Result<(), Errno> {
        if !self.writable.load(Ordering::Relaxed) {
            return Err(Errno::EPERM);
        }
        let permits = self.permits(request.length());
        let _permit = self
            .inflight
            .acquire_many(permits)
            .await
            .map_err(|_| Errno::ESHUTDOWN)?;
        let (id, receiver) = self.register();
        self.step(|core, now| core.node.on_write(now, id, request));
        let commit = CommitOnDrop(self);
        // One yield lets the writes an NBD connection has already read be sequenced
        // too, so one group commit (one fresh journal page) takes them all. The guard
        // commits even if this future is dropped at the yield.
        tokio::task::yield_now().await;
        drop(commit);
        match receiver.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(errno(&error)),
            Err(_) => Err(Errno::EIO),
        }
    }

    /// Flushes locally and, in sync and semi-sync, on the peers.
    pub async fn flush_all(&self) -> Result<(), Errno> {
        let (id, receiver) = self.register();
        self.step(|core, now| core.node.on_flush(now, id));
        match receiver.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(errno(&error)),
            Err(_) => Err(Errno::EIO),
        }
    }

    /// A client read: from the local store, or from a peer when read balancing
    /// sends it there (see `Node::balance_read`; a peer that fails, is slow or goes
    /// away gives the read back, and the local store serves it).
    pub async fn read_at(&self, offset: u64, length: u64) -> Result<Bytes, Errno> {
        let Some(volume) = self.volume() else {
            // A diskless Primary reads through its UpToDate peer.
            return self.read_from_peer(offset, length, false).await;
        };
        if self.config.read_balancing == ReadBalancing::PreferLocal {
            // The default never asks the node (no lock on the read path).
            return self.read_local(&volume, offset, length).await;
        }
        let (id, receiver) = self.register_read();
        let route = self.step(|core, now| core.node.balance_read(now, id, offset, length));
        match route {
            ReadRoute::Local => {
                self.lock_waiters().reads.remove(&id.0);
                let _measure = LocalReadDone {
                    resource: self,
                    started: self.now(),
                };
                self.read_local(&volume, offset, length).await
            }
            ReadRoute::Peer(_) => match receiver.await {
                Ok(Ok(blocks)) => {
                    let skip = (offset % engine::BLOCK_BYTES) as usize;
                    let end = usize::try_from(length)
                        .ok()
                        .and_then(|length| skip.checked_add(length))
                        .filter(|end| *end <= blocks.len())
                        .ok_or(Errno::EIO)?;
                    Ok(blocks.slice(skip..end))
                }
                Ok(Err(error)) => {
                    tracing::debug!("{}: read locally: {error}", self.name);
                    self.read_local(&volume, offset, length).await
                }
                Err(_) => self.read_local(&volume, offset, length).await,
            },
        }
    }

    /// Reads through the local volume; a block whose checksum fails is repaired from
    /// an UpToDate peer (on a Primary) and read again.
    async fn read_local(&self, volume: &Volume, offset: u64, length: u64) -> Result<Bytes, Errno> {
        self.reads_local.fetch_add(1, Ordering::Relaxed);
        let read = |volume: &Volume| {
            let (sender, receiver) = oneshot::channel();
            volume.read(
                offset,
                length,
                Box::new(move |result| drop(sender.send(result))),
            );
            receiver
        };
        match read(volume).await.unwrap_or(Err(IoError::Closed)) {
            Err(IoError::Checksum { block, .. }) => {
                let (id, receiver) = self.register();
                self.step(|core, now| core.node.on_read_error(now, id, block));
                match receiver.await {
                    Ok(Ok(())) => read(volume)
                        .await
                        .unwrap_or(Err(IoError::Closed))
                        .map_err(|error| Errno(error.errno())),
                    Ok(Err(error)) => {
                        tracing::warn!("{}: {error}", self.name);
                        Err(errno(&error))
                    }
                    Err(_) => Err(Errno::EIO),
                }
            }
            Err(IoError::Backend(error))
                if self.node_config_policy() == OnIoError::Detach
                    && self.role() == Role::Primary =>
            {
                // The disk failed the read: the peer serves it, and the blocks are
                // rewritten here (a failing write then detaches the disk).
                tracing::warn!("{}: read error, served by the peer: {error}", self.name);
                self.read_from_peer(offset, length, true).await
            }
            other => other.map_err(|error| Errno(error.errno())),
        }
    }

    fn checksum_cache_status(&self, volume: &Volume) -> ChecksumCacheStatus {
        let cache = volume.checksum_cache_stats();
        let page = engine::layout::PAGE_BYTES;
        ChecksumCacheStatus {
            hits: cache.hits,
            misses: cache.misses,
            evictions: cache.evictions,
            resident_bytes: cache.resident * page,
            dirty_bytes: cache.dirty * page,
            limit_bytes: self.config.checksum_cache_bytes(),
        }
    }

    fn node_config_policy(&self) -> OnIoError {
        self.config.on_io_error
    }

    /// A read served by an UpToDate peer (see `Node::read_from_peer`), in pieces of
    /// at most one READ_REPLY each, all asked for at once.
    async fn read_from_peer(
        &self,
        offset: u64,
        length: u64,
        rewrite: bool,
    ) -> Result<Bytes, Errno> {
        const PIECE: u64 = engine::wire::MAX_FRAME_BLOCKS as u64 * engine::BLOCK_BYTES;
        let end = offset.checked_add(length).ok_or(Errno::EINVAL)?;
        let mut pieces = Vec::new();
        let mut at = offset;
        while at < end {
            let piece_end = (at / PIECE + 1).saturating_mul(PIECE).min(end);
            pieces.push(self.ask_peer_read(at, piece_end - at, rewrite));
            at = piece_end;
        }
        let mut data = bytes::BytesMut::with_capacity(usize::try_from(length).unwrap_or(0));
        for (at, piece_length, receiver) in pieces {
            let blocks = match receiver.await {
                Ok(Ok(blocks)) => blocks,
                Ok(Err(error)) => {
                    tracing::warn!("{}: {error}", self.name);
                    return Err(errno(&error));
                }
                Err(_) => return Err(Errno::EIO),
            };
            let skip = (at % engine::BLOCK_BYTES) as usize;
            let piece_end = usize::try_from(piece_length)
                .map_or(usize::MAX, |length| skip.saturating_add(length));
            if piece_end > blocks.len() {
                return Err(Errno::EIO);
            }
            if data.is_empty() && at + piece_length == end {
                return Ok(blocks.slice(skip..piece_end));
            }
            data.extend_from_slice(&blocks[skip..piece_end]);
        }
        Ok(data.freeze())
    }

    /// Asks the node for one piece of a read from the peer: (offset, length, answer).
    fn ask_peer_read(
        &self,
        offset: u64,
        length: u64,
        rewrite: bool,
    ) -> (u64, u64, oneshot::Receiver<Result<Bytes, RequestError>>) {
        let (id, receiver) = self.register_read();
        self.step(|core, now| core.node.read_from_peer(now, id, offset, length, rewrite));
        (offset, length, receiver)
    }

    /// A waiter for an [`Action::ReadDone`].
    fn register_read(&self) -> (RequestId, oneshot::Receiver<Result<Bytes, RequestError>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.lock_waiters().reads.insert(id, sender);
        (RequestId(id), receiver)
    }

    // ----- status -----

    /// Status for `replctl status`.
    pub fn status(&self) -> ResourceStatus {
        let (role, disk, peers, repaired, dirty, promotions, last_failover) = {
            let core = self.lock_core();
            let node = &core.node;
            let now = self.now();
            let dirty = node
                .storage()
                .map_or(0, |storage| storage.volume().out_of_sync_blocks());
            let peers: Vec<PeerStatus> = node
                .peers()
                .iter()
                .map(|peer| self.peer_status(node, peer, now, dirty))
                .collect();
            (
                node.role(),
                node.disk(),
                peers,
                node.repaired_blocks(),
                dirty,
                node.promotions(),
                node.last_failover(),
            )
        };
        let local = self.lock_local();
        let mut status = ResourceStatus {
            name: self.name.clone(),
            node: self.node.clone(),
            role: role.to_string(),
            disk: disk.to_string(),
            disk_error: local.disk_error.clone(),
            mode: self.config.mode.to_string(),
            nbd: self.node_config.nbd.uri(&self.name),
            recovery: local.recovery.clone(),
            promotions,
            last_failover_seconds: last_failover.map(|took| took.as_secs_f64()),
            read_balancing: self.config.read_balancing.name(),
            ..ResourceStatus::default()
        };
        drop(local);
        if let Some(volume) = self.volume() {
            let superblock = volume.superblock();
            let stats = volume.stats();
            status.size_bytes = volume.size_bytes();
            status.generation = GenerationStatus {
                current: hex(superblock.generations.current),
                bitmap: hex(superblock.generations.bitmap),
                history: superblock
                    .generations
                    .history
                    .iter()
                    .map(|id| hex(*id))
                    .collect(),
            };
            status.out_of_sync_bytes = dirty * engine::BLOCK_BYTES;
            status.io = IoStatus {
                reads: stats.reads,
                read_bytes: stats.read_bytes,
                writes: stats.writes,
                write_bytes: stats.write_bytes,
                flushes: stats.flushes,
                checksum_errors: stats.checksum_errors,
                repaired_blocks: repaired,
                reads_local: self.reads_local.load(Ordering::Relaxed),
                journal_used_bytes: stats.journal_used_bytes,
                journal_bytes: volume.geometry().journal_bytes,
                journal_commits: stats.journal_commits,
                journal_syncs: stats.journal_syncs,
                checkpoints: stats.checkpoints,
                checksum_cache: Some(self.checksum_cache_status(&volume)),
            };
            if let Some(reason) = volume.failure() {
                status.disk_error = Some(reason);
            }
        }
        status.peer = peers.first().cloned();
        status
    }

    fn peer_status(
        &self,
        node: &Node<VolumeStorage>,
        peer: &node::peer::Peer,
        now: Time,
        dirty_blocks: u64,
    ) -> PeerStatus {
        let entry = &self.peers[peer.id.0];
        let session = peer.session();
        let (lag_bytes, lag_age) = session.map_or((0, Duration::ZERO), |s| s.written_lag(now));
        let mut status = PeerStatus {
            name: entry.name.clone(),
            address: entry.address.to_string(),
            connection: peer.connection_state().to_string(),
            replication: session
                .map_or(engine::repl::ReplicationState::Off, |s| {
                    s.replication_state(peer.paused)
                })
                .to_string(),
            role: session.map(|s| s.peer_state.role.to_string()),
            peer_disk: session.map(|s| s.peer_state.disk.to_string()),
            in_flight: session.map_or(0, |s| s.shipped_seq.saturating_sub(s.received_seq)),
            unacked: node.pending_requests() as u64,
            lag_bytes,
            lag_seconds: lag_age.as_secs_f64(),
            resync_bytes: peer.resync_bytes,
            resync_skipped_bytes: peer.resync_skipped_bytes,
            resync_remaining_bytes: dirty_blocks * engine::BLOCK_BYTES,
            last_error: peer.last_error.as_ref().map(SessionEnd::to_string),
            last_error_kind: peer
                .last_error
                .as_ref()
                .map(|error| error.kind().to_string()),
            split_brain: peer.split_brain,
            verify_out_of_sync_blocks: peer.verify_out_of_sync,
            reads_served: peer.reads.served,
            read_fallbacks: peer.reads.fallbacks,
            ..PeerStatus::default()
        };
        let progress = session.and_then(|s| match &s.repl {
            node::peer::Repl::Source(source)
                if !matches!(source.phase, node::peer::SourcePhase::WaitPeerBitmap { .. }) =>
            {
                Some((source.total_blocks, source.started))
            }
            node::peer::Repl::Target(target)
                if target.phase != node::peer::TargetPhase::WaitBitmap =>
            {
                Some((target.total_blocks, target.started))
            }
            _ => None,
        });
        if let Some((total, started)) = progress {
            let total = total.max(1);
            let done = total.saturating_sub(dirty_blocks.min(total));
            status.done_percent = Some((done as f64 * 10000.0 / total as f64).floor() / 100.0);
            let elapsed = now.since(started).as_secs_f64();
            if elapsed > 0.5 && done > 0 {
                let rate_blocks = done as f64 / elapsed;
                status.resync_rate_bytes = Some((rate_blocks * engine::BLOCK_BYTES as f64) as u64);
                status.eta_seconds = Some((dirty_blocks as f64 / rate_blocks).ceil() as u64);
            }
        }
        status
    }

    /// Whether NBD clients may see this export at all (data worth reading).
    pub fn exportable(&self) -> bool {
        self.exportable.load(Ordering::Relaxed)
    }
}

impl Export for Resource {
    fn size_bytes(&self) -> u64 {
        match self.volume() {
            Some(volume) => volume.size_bytes(),
            // A diskless Primary still serves the volume (through its peer).
            None => self.lock_core().node.size_bytes(),
        }
    }

    fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    fn unservable(&self) -> impl std::future::Future<Output = ()> + Send {
        let mut changes = self.unservable.subscribe();
        let start = *changes.borrow_and_update();
        async move {
            let _ = changes.wait_for(|count| *count != start).await;
        }
    }

    fn can_multi_conn(&self) -> bool {
        // A FLUSH makes every sequenced record durable, whichever connection wrote it.
        true
    }

    fn minimum_block_size(&self) -> u32 {
        1
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, Errno> {
        self.read_at(offset, u64::from(length)).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Errno> {
        self.submit(WriteRequest {
            offset,
            kind: WriteKind::Data(data),
            fua,
        })
        .await
    }

    async fn flush(&self) -> Result<(), Errno> {
        self.flush_all().await
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), Errno> {
        self.submit(WriteRequest {
            offset,
            kind: WriteKind::Trim(u64::from(length)),
            fua,
        })
        .await
    }

    async fn write_zeroes(&self, offset: u64, length: u32, fua: bool) -> Result<(), Errno> {
        self.submit(WriteRequest {
            offset,
            kind: WriteKind::Zeroes(u64::from(length)),
            fua,
        })
        .await
    }
}

/// Tells the node a read it routed to the local store is done, when dropped (also
/// when the client's request is dropped mid-read), so its queue depth stays right.
struct LocalReadDone<'a> {
    resource: &'a Resource,
    started: Time,
}

impl Drop for LocalReadDone<'_> {
    fn drop(&mut self) {
        let started = self.started;
        self.resource
            .step(|core, now| core.node.local_read_done(now, started));
    }
}

/// Asks for the group commit when dropped (see `Resource::submit`).
struct CommitOnDrop<'a>(&'a Resource);

impl Drop for CommitOnDrop<'_> {
    fn drop(&mut self) {
        self.0.end_of_batch();
    }
}
