//! The replication link to the peer node of one resource.
//!
//! Two TCP connections per peer: *data* (records, resync data, bitmaps) and *meta*
//! (acknowledgements and heartbeats), so a heartbeat never waits behind megabytes of
//! bulk data. The node with the lower node id dials; the other accepts (on the shared
//! [`listener`]). Each connection opens with HELLO (protocol version, resource name and
//! UUID, node); then both send STATE on the data connection and each computes the same
//! [`engine::gen::decide`] outcome: in sync, resync one way, split brain, or refuse.
//!
//! While connected, the primary ships every record in sequence order (under the
//! resource's order lock) and client writes wait for the acknowledgements their mode
//! needs ([`engine::repl::AckTracker`]). A peer silent for `timeout` is declared dead:
//! waiting writes complete (their blocks are marked out of sync), the node goes on
//! alone and keeps reconnecting with back-off. Resync is driven by its source:
//! BITMAP, then RESYNC_DATA frames in a bounded window, then RESYNC_DONE.

pub mod listener;
mod resync;
mod session;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use engine::gen::JUST_CREATED;
use engine::record::Record;
use engine::repl::{self, AckTracker, ConnectionState, DiskState, ReplicationState, Role};
use engine::wire::{BlockData, Frame, PeerState, RecordFrame};
use engine::{IoError, Volume};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::control::PeerStatus;
use crate::resource::Resource;

pub use session::Connections;

/// Resync progress as shown in status.
#[derive(Debug, Clone)]
pub(crate) struct ResyncProgress {
    pub total_blocks: u64,
    pub started: Instant,
    pub done_blocks: u64,
}

/// A peer's answer to a verify request: stored and actual checksums per block.
pub(crate) type VerifyChecksums = engine::volume::BlockChecks;

/// State behind the link's lock.
pub(crate) struct Inner {
    pub connection: ConnectionState,
    pub replication: ReplicationState,
    pub peer: Option<PeerState>,
    /// Records are shipped to the peer (we are primary and connected).
    pub attached: bool,
    pub data_tx: Option<mpsc::UnboundedSender<Frame>>,
    pub meta_tx: Option<mpsc::UnboundedSender<Frame>>,
    pub tracker: AckTracker,
    pub waiters: HashMap<u64, oneshot::Sender<()>>,
    pub next_waiter: u64,
    pub flush_waiters: HashMap<u64, oneshot::Sender<()>>,
    pub next_request: u64,
    pub read_waiters: HashMap<u64, oneshot::Sender<Result<BlockData, String>>>,
    pub verify_waiters: HashMap<u64, oneshot::Sender<VerifyChecksums>>,
    /// A new generation was started since the peer was lost (first write alone).
    pub rotated_since_detach: bool,
    /// Do not reconnect (operator `disconnect`, split brain, refused peer).
    pub standalone: bool,
    pub discard_my_data: bool,
    pub last_error: Option<String>,
    pub split_brain: bool,
    pub shipped_seq: u64,
    pub received_seq: u64,
    pub shipped_bytes_unacked: u64,
    pub resync: Option<ResyncProgress>,
    pub paused: bool,
    /// The session began with a crashed primary on either side: this resync
    /// compares digests first unless the config says otherwise (`checksum-resync`).
    pub resync_after_crash: bool,
    /// Bumped for each session; tasks of an older session stop touching state.
    pub session: u64,
    pub verify_out_of_sync: Option<u64>,
    /// `(seq, bytes)` of shipped records not yet acknowledged (async lag bound).
    pub unacked_bytes: VecDeque<(u64, u64)>,
    /// Source: completes when the target's bitmap has been merged.
    pub peer_bitmap_done: Option<oneshot::Sender<()>>,
    /// Source: completes when the target confirmed the end of the resync.
    pub resync_done: Option<oneshot::Sender<()>>,
    pub resync_source_active: bool,
    /// Resync bytes sent and not yet acknowledged.
    pub resync_in_flight: u64,
    /// Source: data read for checksum comparison, waiting for the target's verdict.
    pub pending_checks: HashMap<u64, bytes::Bytes>,
}

/// See the module documentation.
pub struct Link {
    pub(crate) resource: Weak<Resource>,
    pub peer_name: String,
    pub peer_address: std::net::SocketAddr,
    pub peer_node_id: u32,
    pub dialer: bool,
    pub(crate) inner: Mutex<Inner>,
    /// Wakes the connection manager (connect/disconnect commands, new incoming pair).
    pub(crate) wake: Notify,
    /// Incoming connection pairs from the listener (acceptor side).
    pub(crate) incoming: Mutex<Option<Connections>>,
    pub(crate) incoming_wake: Notify,
    pub(crate) resync_bytes: AtomicU64,
    pub(crate) resync_skipped_bytes: AtomicU64,
    /// Wakes the resync loop (acks, pause/resume).
    pub(crate) resync_wake: Notify,
    /// Ends the current session (disconnect command).
    pub(crate) session_kill: Notify,
}

impl Link {
    pub fn new(resource: &Arc<Resource>) -> Option<Arc<Link>> {
        let (peer_name, peer) = resource.config.peer_of(&resource.node)?;
        let peer_node_id = resource.config.node_id(peer_name).unwrap_or(0);
        Some(Arc::new(Link {
            resource: Arc::downgrade(resource),
            peer_name: peer_name.clone(),
            peer_address: peer.address,
            peer_node_id,
            dialer: resource.node_id < peer_node_id,
            inner: Mutex::new(Inner {
                connection: ConnectionState::Connecting,
                replication: ReplicationState::Off,
                peer: None,
                attached: false,
                data_tx: None,
                meta_tx: None,
                tracker: AckTracker::new(),
                waiters: HashMap::new(),
                next_waiter: 1,
                flush_waiters: HashMap::new(),
                next_request: 1,
                read_waiters: HashMap::new(),
                verify_waiters: HashMap::new(),
                rotated_since_detach: false,
                standalone: false,
                discard_my_data: false,
                last_error: None,
                split_brain: false,
                shipped_seq: 0,
                received_seq: 0,
                shipped_bytes_unacked: 0,
                resync: None,
                paused: false,
                resync_after_crash: false,
                session: 0,
                verify_out_of_sync: None,
                unacked_bytes: VecDeque::new(),
                peer_bitmap_done: None,
                resync_done: None,
                resync_source_active: false,
                resync_in_flight: 0,
                pending_checks: HashMap::new(),
            }),
            wake: Notify::new(),
            incoming: Mutex::new(None),
            incoming_wake: Notify::new(),
            resync_bytes: AtomicU64::new(0),
            resync_skipped_bytes: AtomicU64::new(0),
            resync_wake: Notify::new(),
            session_kill: Notify::new(),
        }))
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn resource(&self) -> Option<Arc<Resource>> {
        self.resource.upgrade()
    }

    pub fn is_connected(&self) -> bool {
        self.lock().connection == ConnectionState::Connected
    }

    pub fn connection(&self) -> ConnectionState {
        self.lock().connection
    }

    pub fn peer_role(&self) -> Option<Role> {
        let inner = self.lock();
        (inner.connection == ConnectionState::Connected)
            .then_some(inner.peer.map(|p| p.role))
            .flatten()
    }

    pub(crate) fn send_data(&self, frame: Frame) -> bool {
        self.lock()
            .data_tx
            .as_ref()
            .is_some_and(|tx| tx.send(frame).is_ok())
    }

    pub(crate) fn send_meta(&self, frame: Frame) -> bool {
        self.lock()
            .meta_tx
            .as_ref()
            .is_some_and(|tx| tx.send(frame).is_ok())
    }

    /// Called under the resource's order lock before a write is sequenced: the first
    /// write without the peer starts a new generation (persisted before any such write
    /// completes), so a later handshake knows which side moved on.
    pub fn before_write(&self, volume: &Volume) {
        let mut inner = self.lock();
        if inner.attached || inner.rotated_since_detach {
            return;
        }
        inner.rotated_since_detach = true;
        drop(inner);
        let new_current = engine::rng::os_random_u64();
        if let Err(error) =
            volume.update_superblock(|sb| sb.generations.start_new_detached(new_current))
        {
            tracing::error!("cannot persist a new generation: {error}");
        }
    }

    /// Ships a write's records (in sequence order, under the order lock). Returns what
    /// the client must wait for, if anything.
    pub fn ship(&self, records: &[Record], fua: bool) -> Option<oneshot::Receiver<()>> {
        let resource = self.resource()?;
        let mut inner = self.lock();
        if !inner.attached {
            return None;
        }
        let tx = inner.data_tx.clone()?;
        let mut last_seq = 0;
        for record in records {
            last_seq = record.header.seq;
            inner.shipped_bytes_unacked += record.total_bytes();
            inner
                .unacked_bytes
                .push_back((last_seq, record.total_bytes()));
            if tx.send(Frame::Record(RecordFrame(record.clone()))).is_err() {
                return None;
            }
        }
        inner.shipped_seq = inner.shipped_seq.max(last_seq);
        let needs = repl::ack_needs(resource.config.mode, fua);
        if !needs.peer_received && !needs.peer_written {
            // Async: bounded lag; past half the journal, fall back to the bitmap.
            let journal = resource.config.journal_bytes();
            if inner.shipped_bytes_unacked > journal / 2 {
                inner.last_error = Some(
                    "peer fell behind by more than half the journal: resyncing from the bitmap"
                        .into(),
                );
                drop(inner);
                self.session_kill.notify_one();
            }
            return None;
        }
        let waiter = inner.next_waiter;
        inner.next_waiter += 1;
        if inner.tracker.track(last_seq, needs, waiter) {
            return None;
        }
        let (sender, receiver) = oneshot::channel();
        inner.waiters.insert(waiter, sender);
        Some(receiver)
    }

    /// A FLUSH for the peer (sync and semi-sync); `None` when not needed or not connected.
    pub fn flush(&self) -> Option<oneshot::Receiver<()>> {
        let resource = self.resource()?;
        if resource.config.mode == repl::Mode::Async {
            return None;
        }
        let mut inner = self.lock();
        if !inner.attached {
            return None;
        }
        let id = inner.next_request;
        inner.next_request += 1;
        let (sender, receiver) = oneshot::channel();
        inner.flush_waiters.insert(id, sender);
        let sent = inner
            .data_tx
            .as_ref()
            .is_some_and(|tx| tx.send(Frame::Flush(id)).is_ok());
        if !sent {
            inner.flush_waiters.remove(&id);
            return None;
        }
        Some(receiver)
    }

    /// Our node was promoted.
    pub fn on_local_promoted(&self, new_current: u64, detached: bool) {
        let resource = match self.resource() {
            Some(resource) => resource,
            None => return,
        };
        let volume = resource.volume();
        let fresh_full_sync = volume
            .as_ref()
            .is_some_and(|v| v.superblock().generations.bitmap == JUST_CREATED);
        let connected = self.is_connected();
        if connected && !detached {
            self.send_data(Frame::NewGeneration {
                current: new_current,
            });
        }
        if connected {
            // Ship records from now on; if blocks are out of sync (a fresh store's first
            // promotion), stream them unless a resync already runs.
            resource.attach_peer(self);
            self.send_state();
            if fresh_full_sync || volume.as_ref().is_some_and(|v| v.out_of_sync_blocks() > 0) {
                resync::start_as_source(self, false);
            }
        }
    }

    /// Connected, established and the peer UpToDate: a new generation on promotion can
    /// be shared with it instead of tracked in the bitmap.
    pub fn peer_in_sync(&self) -> bool {
        let inner = self.lock();
        inner.connection == ConnectionState::Connected
            && inner.replication == ReplicationState::Established
            && inner.peer.is_some_and(|p| p.disk == DiskState::UpToDate)
    }

    /// Our role changed (demotion): tell the peer.
    pub fn on_local_role(&self, _role: Role) {
        let mut inner = self.lock();
        inner.attached = false;
        drop(inner);
        if let Some(volume) = self.resource().and_then(|r| r.volume()) {
            volume.peer_detached();
        }
        self.release_waiters();
        self.send_state();
    }

    /// Our current STATE frame.
    pub(crate) fn local_state(&self) -> Option<PeerState> {
        let resource = self.resource()?;
        let volume = resource.volume();
        let superblock = volume.as_ref().map(|v| v.superblock());
        let inner = self.lock();
        let discard_my_data = inner.discard_my_data;
        drop(inner);
        Some(PeerState {
            role: resource.role(),
            disk: resource.disk(),
            generations: superblock
                .as_ref()
                .map(|sb| sb.generations)
                .unwrap_or_default(),
            crashed_primary: resource.crashed_primary(),
            discard_my_data,
            dirty_blocks: volume.as_ref().map_or(0, |v| v.out_of_sync_blocks()),
            next_seq: volume.as_ref().map_or(0, |v| v.next_seq()),
            size_bytes: volume.as_ref().map_or(0, |v| v.size_bytes()),
        })
    }

    pub(crate) fn send_state(&self) {
        if let Some(state) = self.local_state() {
            self.send_data(Frame::State(state));
        }
    }

    /// Completes every waiting write and flush (the peer is gone or detached).
    pub(crate) fn release_waiters(&self) {
        let mut inner = self.lock();
        let waiters: Vec<u64> = inner.tracker.detach();
        let senders: Vec<oneshot::Sender<()>> = waiters
            .iter()
            .filter_map(|w| inner.waiters.remove(w))
            .collect();
        inner.waiters.clear();
        let flushes: Vec<_> = inner.flush_waiters.drain().map(|(_, s)| s).collect();
        inner.read_waiters.clear();
        inner.verify_waiters.clear();
        inner.shipped_bytes_unacked = 0;
        inner.unacked_bytes.clear();
        inner.peer_bitmap_done = None;
        inner.resync_done = None;
        inner.resync_source_active = false;
        inner.resync_in_flight = 0;
        inner.pending_checks.clear();
        drop(inner);
        for sender in senders {
            let _ = sender.send(());
        }
        for sender in flushes {
            let _ = sender.send(());
        }
    }

    /// Operator `disconnect`: stop and stay StandAlone.
    pub fn disconnect(&self) {
        let mut inner = self.lock();
        inner.standalone = true;
        drop(inner);
        self.session_kill.notify_one();
        self.wake.notify_one();
    }

    /// Operator `connect`: leave StandAlone; optionally discard our data at the next
    /// handshake (split-brain resolution on the victim).
    pub fn connect(&self, discard_my_data: bool) {
        let mut inner = self.lock();
        inner.standalone = false;
        inner.discard_my_data = discard_my_data;
        inner.split_brain = false;
        inner.last_error = None;
        if inner.connection == ConnectionState::StandAlone {
            inner.connection = ConnectionState::Connecting;
        }
        drop(inner);
        self.wake.notify_one();
    }

    pub fn pause_sync(&self, paused: bool) {
        let mut inner = self.lock();
        inner.paused = paused;
        inner.replication = match (inner.replication, paused) {
            (ReplicationState::SyncSource, true) => ReplicationState::PausedSyncS,
            (ReplicationState::SyncTarget, true) => ReplicationState::PausedSyncT,
            (ReplicationState::PausedSyncS, false) => ReplicationState::SyncSource,
            (ReplicationState::PausedSyncT, false) => ReplicationState::SyncTarget,
            (other, _) => other,
        };
        drop(inner);
        self.resync_wake.notify_waiters();
    }

    /// Read repair: fetches `block` from the peer and rewrites it locally.
    pub async fn repair_block(&self, volume: &Volume, block: u64) -> Result<(), IoError> {
        let unavailable = |why: &str| {
            IoError::Failed(
                format!("block {block} is corrupt and cannot be repaired: {why}").into(),
            )
        };
        let (id, receiver) = {
            let mut inner = self.lock();
            let usable = inner.connection == ConnectionState::Connected
                && inner.peer.is_some_and(|p| p.disk == DiskState::UpToDate)
                && inner.replication == ReplicationState::Established;
            if !usable {
                return Err(unavailable("the peer is not connected and UpToDate"));
            }
            let id = inner.next_request;
            inner.next_request += 1;
            let (sender, receiver) = oneshot::channel();
            inner.read_waiters.insert(id, sender);
            (id, receiver)
        };
        if !self.send_meta(Frame::ReadRequest {
            id,
            first_block: block,
            blocks: 1,
        }) {
            return Err(unavailable("the connection closed"));
        }
        let reply = tokio::time::timeout(Duration::from_secs(10), receiver)
            .await
            .map_err(|_| unavailable("the peer did not answer"))?
            .map_err(|_| unavailable("the connection closed"))?
            .map_err(|error| unavailable(&format!("the peer's copy is bad too ({error})")))?;
        let data = reply
            .data
            .unwrap_or_else(|| bytes::Bytes::from(vec![0u8; engine::BLOCK_BYTES as usize]));
        tracing::warn!("repairing block {block} from the peer's copy");
        let (sender, done) = oneshot::channel();
        let request = engine::WriteRequest {
            offset: block * engine::BLOCK_BYTES,
            kind: engine::WriteKind::Data(data),
            fua: false,
        };
        // The repair write is journaled (and replicated) like any write.
        let resource = self
            .resource()
            .ok_or_else(|| unavailable("shutting down"))?;
        resource.submit_internal(volume, request, sender)?;
        done.await.unwrap_or(Err(IoError::Closed)).map(|_| ())
    }

    /// Online verify: compares both replicas block by block. Returns the blocks that
    /// differ (marked out of sync; with `repair`, resynced).
    pub async fn verify(self: &Arc<Self>, repair: bool) -> Result<Vec<u64>, String> {
        resync::verify(self, repair).await
    }

    /// `replctl invalidate`: throw local data away and pull everything from the peer.
    pub async fn invalidate(self: &Arc<Self>) -> Result<(), String> {
        let resource = self.resource().ok_or("shutting down")?;
        if resource.role() == Role::Primary {
            return Err("refusing to invalidate a Primary: demote it first".into());
        }
        {
            let inner = self.lock();
            if inner.connection != ConnectionState::Connected
                || inner.peer.is_none_or(|p| p.disk != DiskState::UpToDate)
            {
                return Err("the peer must be connected and UpToDate to pull data from".into());
            }
        }
        let volume = resource.volume().ok_or("no disk attached")?;
        volume.set_out_of_sync(0, volume.geometry().data_blocks());
        let update = volume.clone();
        tokio::task::spawn_blocking(move || {
            update.update_superblock(|sb| {
                sb.disk_state = engine::superblock::StoredDiskState::Inconsistent
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        resource.emit("invalidated: disk:Inconsistent, pulling every block from the peer");
        // Reconnect: the handshake makes the consistent peer the source of our bitmap.
        self.session_kill.notify_one();
        Ok(())
    }

    /// Status as `replctl status` shows it.
    pub fn status(&self) -> PeerStatus {
        let inner = self.lock();
        let mut status = PeerStatus {
            name: self.peer_name.clone(),
            address: self.peer_address.to_string(),
            connection: inner.connection.to_string(),
            replication: inner.replication.to_string(),
            role: (inner.connection == ConnectionState::Connected)
                .then(|| inner.peer.map(|p| p.role.to_string()))
                .flatten(),
            peer_disk: (inner.connection == ConnectionState::Connected)
                .then(|| inner.peer.map(|p| p.disk.to_string()))
                .flatten(),
            in_flight: inner.shipped_seq.saturating_sub(inner.received_seq),
            unacked: inner.tracker.waiting() as u64,
            resync_bytes: self.resync_bytes.load(Ordering::Relaxed),
            resync_skipped_bytes: self.resync_skipped_bytes.load(Ordering::Relaxed),
            last_error: inner.last_error.clone(),
            split_brain: inner.split_brain,
            verify_out_of_sync_blocks: inner.verify_out_of_sync,
            ..PeerStatus::default()
        };
        let resync = inner.resync.clone();
        drop(inner);
        let remaining_blocks = self
            .resource()
            .and_then(|r| r.volume())
            .map_or(0, |v| v.out_of_sync_blocks());
        status.resync_remaining_bytes = remaining_blocks * engine::BLOCK_BYTES;
        if let Some(progress) = resync {
            let total = progress.total_blocks.max(1);
            let done = total.saturating_sub(remaining_blocks.min(total));
            status.done_percent = Some((done as f64 * 10000.0 / total as f64).floor() / 100.0);
            let elapsed = progress.started.elapsed().as_secs_f64();
            if elapsed > 0.5 && done > 0 {
                let rate_blocks = done as f64 / elapsed;
                status.resync_rate_bytes = Some((rate_blocks * engine::BLOCK_BYTES as f64) as u64);
                status.eta_seconds = Some((remaining_blocks as f64 / rate_blocks).ceil() as u64);
            }
        }
        status
    }
}

/// Spawns the link's connection manager.
pub fn spawn(
    link: Arc<Link>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(session::manage(link, shutdown))
}
