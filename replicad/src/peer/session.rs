//! Connection management, the handshake, and one connected session.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use engine::gen::{decide, Decision, SideState, SyncScope};
use engine::repl::{ConnectionState, DiskState, ReplicationState, Role};
use engine::wire::{self, Channel, Frame, Hello, PeerState, FRAME_HEADER_BYTES, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::{resync, Link};

/// Both connections of a session, with the peer's HELLO.
pub struct Connections {
    pub data: TcpStream,
    pub meta: TcpStream,
    pub hello: Hello,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a refusing side keeps the connection open for the peer to take in its
/// last frames (see [`reject_and_linger`]).
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// Reads one frame. Errors are strings for logs and status.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Frame, String> {
    let mut head = [0u8; FRAME_HEADER_BYTES];
    reader
        .read_exact(&mut head)
        .await
        .map_err(|error| format!("connection lost: {error}"))?;
    let header =
        wire::decode_header(&head).map_err(|error| format!("bad frame from peer: {error}"))?;
    let mut body = BytesMut::new();
    crate::read_into::read_exact_into(reader, &mut body, header.body_bytes as usize)
        .await
        .map_err(|error| format!("connection lost mid-frame: {error}"))?;
    wire::decode_body(&header, body.freeze())
        .map_err(|error| format!("bad frame from peer: {error}"))
}

/// Writes frames (gathered into one vectored write where possible).
pub(crate) async fn write_frames<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frames: &[Frame],
) -> std::io::Result<()> {
    let mut parts: Vec<Bytes> = Vec::with_capacity(frames.len() * 3);
    for frame in frames {
        parts.extend(frame.encode());
    }
    let mut index = 0;
    let mut offset = 0;
    while index < parts.len() {
        let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&parts[index][offset..])
            .chain(parts[index + 1..].iter().map(|p| &p[..]))
            .take(64)
            .map(std::io::IoSlice::new)
            .collect();
        let mut written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "peer closed",
            ));
        }
        while written > 0 && index < parts.len() {
            let left = parts[index].len() - offset;
            if written >= left {
                written -= left;
                index += 1;
                offset = 0;
            } else {
                offset += written;
                written = 0;
            }
        }
    }
    writer.flush().await
}

/// Refuses a connection: sends REJECT with `reason`, then keeps the connection open
/// until the peer answers (any frame, typically its own REJECT) or closes, bounded by
/// [`REFUSAL_LINGER`]. Closing right after sending can lose what was sent: a proxy or
/// a reset drops bytes still on the way, and the peer would never learn the reason
/// (or, in the handshake, never get the STATE it needs to reach the same decision —
/// one side of a split brain would not notice it).
pub(crate) async fn reject_and_linger<R, W>(reader: &mut R, writer: &mut W, reason: &str)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if write_frames(writer, &[Frame::Reject(reason.to_string())])
        .await
        .is_ok()
    {
        let _ = tokio::time::timeout(REFUSAL_LINGER, read_frame(reader)).await;
    }
}

pub(crate) fn our_hello(link: &Link, channel: Channel) -> Option<Hello> {
    let resource = link.resource()?;
    Some(Hello {
        protocol_version: PROTOCOL_VERSION,
        channel,
        resource_uuid: resource.uuid,
        node_id: resource.node_id,
        resource: resource.name.clone(),
        node: resource.node.clone(),
    })
}

/// Checks a peer's HELLO against what this resource expects.
pub(crate) fn check_hello(link: &Link, hello: &Hello) -> Result<(), String> {
    let resource = link.resource().ok_or("shutting down")?;
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "peer speaks replication protocol {}, this node speaks {PROTOCOL_VERSION}",
            hello.protocol_version
        ));
    }
    if hello.resource != resource.name {
        return Err(format!(
            "peer offers resource {:?}, expected {:?}",
            hello.resource, resource.name
        ));
    }
    if hello.resource_uuid != resource.uuid {
        return Err(format!(
            "peer's resource UUID {} differs from ours {} (a peer of another resource?)",
            engine::volume::format_uuid(&hello.resource_uuid),
            engine::volume::format_uuid(&resource.uuid)
        ));
    }
    if hello.node != link.peer_name || hello.node_id != link.peer_node_id {
        return Err(format!(
            "peer calls itself {} (id {}), expected {} (id {})",
            hello.node, hello.node_id, link.peer_name, link.peer_node_id
        ));
    }
    Ok(())
}

async fn dial_one(link: &Link, channel: Channel) -> Result<(TcpStream, Hello), String> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(link.peer_address))
        .await
        .map_err(|_| format!("connecting to {} timed out", link.peer_address))?
        .map_err(|error| format!("connecting to {}: {error}", link.peer_address))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let hello = our_hello(link, channel).ok_or("shutting down")?;
    write_frames(&mut stream, &[Frame::Hello(hello)])
        .await
        .map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream))
        .await
        .map_err(|_| "peer did not answer HELLO".to_string())??;
    match reply {
        Frame::Hello(hello) => {
            check_hello(link, &hello)?;
            Ok((stream, hello))
        }
        Frame::Reject(reason) => Err(format!("peer refused the connection: {reason}")),
        other => Err(format!("peer answered HELLO with {}", other.name())),
    }
}

async fn dial(link: &Link) -> Result<Connections, String> {
    let (data, hello) = dial_one(link, Channel::Data).await?;
    let (meta, _) = dial_one(link, Channel::Meta).await?;
    Ok(Connections { data, meta, hello })
}

async fn accept(link: &Link, shutdown: &mut watch::Receiver<bool>) -> Option<Connections> {
    loop {
        if let Some(connections) = link
            .incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Some(connections);
        }
        tokio::select! {
            _ = link.incoming_wake.notified() => {}
            _ = link.wake.notified() => return None,
            _ = shutdown.changed() => return None,
        }
    }
}

/// The connection manager: connect, run a session, back off, repeat.
pub(super) async fn manage(link: Arc<Link>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let standalone = link.lock().standalone;
        if standalone {
            set_connection(&link, ConnectionState::StandAlone, None);
            tokio::select! {
                _ = link.wake.notified() => continue,
                _ = shutdown.changed() => return,
            }
        }
        set_connection(&link, ConnectionState::Connecting, None);
        let connections = if link.dialer {
            match dial(&link).await {
                Ok(connections) => Some(connections),
                Err(error) => {
                    note_error(&link, &error);
                    None
                }
            }
        } else {
            accept(&link, &mut shutdown).await
        };
        if let Some(connections) = connections {
            backoff = Duration::from_millis(100);
            let ended = run_session(&link, connections, &mut shutdown).await;
            end_session(&link, &ended);
        }
        if !link.dialer {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = link.wake.notified() => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn note_error(link: &Link, error: &str) {
    let mut inner = link.lock();
    if inner.last_error.as_deref() != Some(error) {
        tracing::debug!("{}: {error}", link.peer_name);
    }
    inner.last_error = Some(error.to_string());
}

fn set_connection(link: &Link, connection: ConnectionState, reason: Option<&str>) {
    let mut inner = link.lock();
    if inner.connection == connection {
        return;
    }
    inner.connection = connection;
    drop(inner);
    if let Some(resource) = link.resource() {
        match reason {
            Some(reason) => resource.emit(&format!(
                "peer {} connection:{connection} ({reason})",
                link.peer_name
            )),
            None => resource.emit(&format!("peer {} connection:{connection}", link.peer_name)),
        }
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

/// Why a session ended.
pub(crate) struct Ended {
    pub reason: String,
    /// Stay StandAlone (refused peer, split brain, operator disconnect).
    pub standalone: bool,
}

async fn run_session(
    link: &Arc<Link>,
    connections: Connections,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let Some(resource) = link.resource() else {
        return Ended {
            reason: "shutting down".into(),
            standalone: false,
        };
    };
    let Some(volume) = resource.volume() else {
        return Ended {
            reason: "no local disk".into(),
            standalone: false,
        };
    };
    let (data_read, mut data_write) = connections.data.into_split();
    let (meta_read, meta_write) = connections.meta.into_split();
    let mut data_read = BufReader::with_capacity(256 << 10, data_read);
    let meta_read = BufReader::with_capacity(16 << 10, meta_read);

    // Handshake: exchange STATE, decide.
    let Some(local) = link.local_state() else {
        return Ended {
            reason: "shutting down".into(),
            standalone: false,
        };
    };
    if let Err(error) = write_frames(&mut data_write, &[Frame::State(local)]).await {
        return Ended {
            reason: format!("handshake failed: {error}"),
            standalone: false,
        };
    }
    let peer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut data_read)).await {
        Ok(Ok(Frame::State(state))) => state,
        Ok(Ok(Frame::Reject(reason))) => {
            return Ended {
                reason: format!("peer refused: {reason}"),
                standalone: true,
            }
        }
        Ok(Ok(other)) => {
            return Ended {
                reason: format!("peer sent {} instead of STATE", other.name()),
                standalone: false,
            }
        }
        Ok(Err(error)) => {
            return Ended {
                reason: error,
                standalone: false,
            }
        }
        Err(_) => {
            return Ended {
                reason: "peer sent no STATE".into(),
                standalone: false,
            }
        }
    };
    if peer.size_bytes != local.size_bytes {
        let reason = format!(
            "peer's volume is {} bytes, ours is {}: refusing to replicate",
            peer.size_bytes, local.size_bytes
        );
        reject_and_linger(&mut data_read, &mut data_write, &reason).await;
        return Ended {
            reason,
            standalone: true,
        };
    }
    let decision = decide(
        &side(&local, resource.node_id),
        &side(&peer, link.peer_node_id),
    );
    link.lock().resync_after_crash = local.crashed_primary || peer.crashed_primary;
    link.lock().discard_my_data = false;
    let refusal = match decision {
        Decision::SplitBrain => Some("split brain: both nodes wrote since they last saw each other; no data exchanged. Resolve with `replctl connect RES --discard-my-data` on the node whose changes to drop"),
        Decision::Unrelated => Some("the peer holds unrelated data (no common generation); refusing"),
        Decision::BothPrimary => Some("both nodes are Primary; refusing (never two primaries)"),
        Decision::PrimaryWouldBeTarget => Some("the Primary holds older data than its peer; refusing to overwrite it under its users (demote it, or resolve by hand)"),
        Decision::NoGoodData => Some("the node with newer data is Inconsistent; nothing to sync from"),
        _ => None,
    };
    if let Some(reason) = refusal {
        link.lock().split_brain = decision == Decision::SplitBrain;
        if decision == Decision::SplitBrain {
            tracing::error!("{}: {reason}", resource.name);
            resource.run_hook(
                resource.config.hooks.split_brain.clone(),
                "split-brain",
                &[("REPLICAD_PEER", &link.peer_name)],
            );
        }
        // The peer reaches the same decision from our STATE: let it arrive.
        reject_and_linger(&mut data_read, &mut data_write, reason).await;
        return Ended {
            reason: reason.to_string(),
            standalone: true,
        };
    }
    volume.advance_seq(local.next_seq.max(peer.next_seq));

    let (data_tx, data_rx) = mpsc::unbounded_channel::<Frame>();
    let (meta_tx, meta_rx) = mpsc::unbounded_channel::<Frame>();
    let session = {
        let mut inner = link.lock();
        inner.session += 1;
        inner.peer = Some(peer);
        inner.data_tx = Some(data_tx.clone());
        inner.meta_tx = Some(meta_tx.clone());
        inner.last_error = None;
        inner.split_brain = false;
        inner.tracker = engine::repl::AckTracker::new();
        inner.replication = ReplicationState::Established;
        inner.session
    };
    set_connection(
        link,
        ConnectionState::Connected,
        Some(&format!("{decision:?}")),
    );
    // What to do right after connecting — before the readers start, so a frame the
    // peer sends at once (the target's BITMAP) finds the resync set up to take it: a
    // source that got it earlier took it for its own resync target's bitmap.
    let primary = resource.role() == Role::Primary;
    match decision {
        Decision::InSync | Decision::BothFresh if primary => {
            resource.attach_peer(link);
            if volume.out_of_sync_blocks() > 0 {
                resync::start_as_source(link, false);
            }
        }
        Decision::SyncSource(scope) => {
            if primary {
                resource.attach_peer(link);
            }
            if scope == SyncScope::Full {
                volume.set_out_of_sync(0, volume.geometry().data_blocks());
            }
            resync::start_as_source(link, true);
        }
        Decision::SyncTarget(_) => {
            resync::send_bitmap(link, &volume);
        }
        _ => {}
    }

    let last_heard = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(writer_task(data_write, data_rx));
    tasks.spawn(writer_task(meta_write, meta_rx));
    tasks.spawn(reader_task(
        link.clone(),
        data_read,
        last_heard.clone(),
        epoch,
        session,
    ));
    tasks.spawn(reader_task(
        link.clone(),
        meta_read,
        last_heard.clone(),
        epoch,
        session,
    ));
    tasks.spawn(durable_reporter(link.clone()));
    tasks.spawn(watchdog(
        link.clone(),
        last_heard,
        epoch,
        resource.config.ping_interval(),
        resource.config.timeout(),
    ));

    let reason = tokio::select! {
        result = tasks.join_next() => match result {
            Some(Ok(Err(reason))) => reason,
            Some(Ok(Ok(()))) => "connection closed".to_string(),
            Some(Err(error)) => format!("session task failed: {error}"),
            None => "no session tasks".to_string(),
        },
        _ = link.session_kill.notified() => {
            let inner = link.lock();
            if inner.standalone { "disconnected by the operator".to_string() } else { inner.last_error.clone().unwrap_or_else(|| "session restarted".to_string()) }
        }
        _ = shutdown.changed() => "daemon shutting down".to_string(),
    };
    // Wait until every task has stopped, not only been told to: on a multi-thread
    // runtime a reader could otherwise still be handling a record on another thread
    // while `end_session` takes the `recent` marks, and that record's blocks would go
    // unmarked.
    tasks.shutdown().await;
    let standalone = link.lock().standalone;
    Ended { reason, standalone }
}

/// Tears a session down: the node goes on alone.
fn end_session(link: &Arc<Link>, ended: &Ended) {
    let resource = link.resource();
    let was_attached;
    let completes_alone;
    let was_target;
    {
        let mut inner = link.lock();
        inner.session += 1;
        was_attached = inner.attached;
        // Shipped records the peer has not acknowledged: their client writes complete
        // (or completed, in async mode) without the peer.
        completes_alone =
            was_attached && (inner.tracker.waiting() > 0 || !inner.unacked_bytes.is_empty());
        was_target = matches!(
            inner.replication,
            ReplicationState::SyncTarget | ReplicationState::PausedSyncT
        );
        inner.attached = false;
        inner.data_tx = None;
        inner.meta_tx = None;
        inner.peer = None;
        inner.replication = ReplicationState::Off;
        inner.resync = None;
        inner.shipped_seq = 0;
        inner.received_seq = 0;
        if ended.standalone {
            inner.standalone = true;
        }
        inner.last_error = Some(ended.reason.clone());
    }
    if let Some(volume) = resource.as_ref().and_then(|r| r.volume()) {
        if was_target {
            // First: from here on, records of this session applied late no longer
            // clear out-of-sync bits (the marks just below among them).
            volume.end_resync_target();
        }
        match &resource {
            // Under the order lock, so no write slips between "shipped" and "marked";
            // before the waiting writes are released below.
            Some(resource) if was_attached => {
                resource.detach_peer(&volume, link, completes_alone);
            }
            // A secondary: records received above the primary's last DURABLE mark may
            // be missing there (it ships a record before its own journal has it), so
            // their blocks are reconciled at the next resync.
            _ => {
                volume.peer_detached();
            }
        }
    }
    link.release_waiters();
    let state = if ended.standalone {
        ConnectionState::StandAlone
    } else {
        ConnectionState::Connecting
    };
    set_connection(link, state, Some(&ended.reason));
    if ended.standalone {
        tracing::warn!(
            "{}: peer {} StandAlone: {}",
            resource.as_ref().map_or("?", |r| r.name.as_str()),
            link.peer_name,
            ended.reason
        );
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut frames: mpsc::UnboundedReceiver<Frame>,
) -> Result<(), String> {
    let mut batch = Vec::with_capacity(64);
    while let Some(frame) = frames.recv().await {
        push_coalesced(&mut batch, frame);
        drain_ready(&mut frames, &mut batch);
        // One yield lets the frames that running tasks are about to queue (records of
        // writes being sequenced, acknowledgements of a group commit) join this write.
        // Not for resync data: those frames are large already, and the source waits.
        if !batch
            .iter()
            .any(|frame| matches!(frame, Frame::ResyncData(_)))
        {
            tokio::task::yield_now().await;
            drain_ready(&mut frames, &mut batch);
        }
        write_frames(&mut writer, &batch)
            .await
            .map_err(|error| format!("connection lost: {error}"))?;
        batch.clear();
    }
    Ok(())
}

/// Moves the frames that are ready into the batch, up to 256.
fn drain_ready(frames: &mut mpsc::UnboundedReceiver<Frame>, batch: &mut Vec<Frame>) {
    while batch.len() < 256 {
        match frames.try_recv() {
            Ok(frame) => push_coalesced(batch, frame),
            Err(_) => break,
        }
    }
}

/// Adds a frame to a batch that goes out in one write. Acknowledgements are
/// cumulative ("everything up to `seq`"), so one of a kind the batch already holds
/// merges into that one (the higher wins: callbacks of two group commits may queue
/// their acks out of order). A group commit of 32 records then sends two frames, not 64.
fn push_coalesced(batch: &mut Vec<Frame>, frame: Frame) {
    // Records, the bulk of the data connection, go straight in: no scan per record.
    if !matches!(frame, Frame::AckReceived(_) | Frame::AckWritten(_)) {
        batch.push(frame);
        return;
    }
    for held in batch.iter_mut().rev() {
        match (held, &frame) {
            (Frame::AckReceived(held), Frame::AckReceived(seq))
            | (Frame::AckWritten(held), Frame::AckWritten(seq)) => {
                *held = (*held).max(*seq);
                return;
            }
            _ => {}
        }
    }
    batch.push(frame);
}

async fn reader_task<R: AsyncRead + Unpin>(
    link: Arc<Link>,
    mut reader: R,
    last_heard: Arc<AtomicU64>,
    epoch: Instant,
    session: u64,
) -> Result<(), String> {
    // Also when the session aborts this task: records left uncommitted would sit in
    // the overlay, neither durable nor applied, until some later write commits.
    let _commit = CommitOnExit(link.clone());
    let mut uncommitted = 0usize;
    loop {
        let frame = {
            let mut read = std::pin::pin!(read_frame(&mut reader));
            match std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
                Poll::Ready(frame) if uncommitted < COMMIT_FRAMES_MAX => frame?,
                ready => {
                    // No further frame at hand (or many already): the records
                    // journaled since the last commit go to the journal in one
                    // group commit (each had been its own commit, a fresh journal
                    // page per 4 KiB record).
                    commit_received(&link);
                    uncommitted = 0;
                    match ready {
                        Poll::Ready(frame) => frame?,
                        Poll::Pending => read.await?,
                    }
                }
            }
        };
        uncommitted += 1;
        last_heard.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        if link.lock().session != session {
            return Ok(());
        }
        super::resync::handle_frame(&link, frame).await?;
    }
}

/// Commits deferred received records when the reader ends, however it ends.
struct CommitOnExit(Arc<Link>);

impl Drop for CommitOnExit {
    fn drop(&mut self) {
        commit_received(&self.0);
    }
}

/// The most frames a reader handles between two group commits of received records.
const COMMIT_FRAMES_MAX: usize = 64;

/// Commits the replicated records whose group commit the reader deferred.
fn commit_received(link: &Link) {
    if let Some(volume) = link.resource().and_then(|resource| resource.volume()) {
        volume.commit_pending();
    }
}

async fn watchdog(
    link: Arc<Link>,
    last_heard: Arc<AtomicU64>,
    epoch: Instant,
    ping_interval: Duration,
    timeout: Duration,
) -> Result<(), String> {
    let mut ticker = tokio::time::interval(ping_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    loop {
        ticker.tick().await;
        nonce += 1;
        link.send_meta(Frame::Ping(nonce));
        let heard = Duration::from_millis(last_heard.load(Ordering::Relaxed));
        let silent = epoch.elapsed().saturating_sub(heard);
        if silent > timeout {
            return Err(format!(
                "peer silent for {} ms (timeout {} ms)",
                silent.as_millis(),
                timeout.as_millis()
            ));
        }
    }
}

/// How often a node reports how far its journal is durable, when that moved.
const DURABLE_REPORT_INTERVAL: Duration = Duration::from_millis(20);

/// Tells the peer how far our own journal is durable (DURABLE), in both roles. Each
/// side holds the records the other may not have durably in its journal until this
/// report covers them: the secondary those above the primary's mark (the primary
/// ships a record before its own journal has it), the primary those above the
/// secondary's mark (ACK_WRITTEN means "in the peer's journal", which a power cut of
/// the peer can still lose). Whatever is held when the session ends is marked out of
/// sync. So this must come often enough that the hold never fills a ring: the journal
/// is made durable at least every 10 ms while records wait, and reported within 20 ms.
async fn durable_reporter(link: Arc<Link>) -> Result<(), String> {
    let mut ticker = tokio::time::interval(DURABLE_REPORT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = 0u64;
    loop {
        ticker.tick().await;
        let Some(volume) = link.resource().and_then(|r| r.volume()) else {
            continue;
        };
        let durable = volume.durable_seq();
        if durable > reported && link.send_meta(Frame::Durable(durable)) {
            reported = durable;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_of(frames: &[Frame]) -> Vec<Frame> {
        let mut batch = Vec::new();
        for frame in frames {
            push_coalesced(&mut batch, frame.clone());
        }
        batch
    }

    #[test]
    fn acknowledgements_of_one_kind_merge_into_the_highest() {
        let batch = batch_of(&[
            Frame::AckReceived(1),
            Frame::AckReceived(2),
            Frame::AckWritten(1),
            Frame::Ping(7),
            Frame::AckReceived(3),
            Frame::AckWritten(2),
        ]);
        assert_eq!(
            batch,
            vec![Frame::AckReceived(3), Frame::AckWritten(2), Frame::Ping(7)]
        );
    }

    #[test]
    fn an_acknowledgement_queued_late_never_lowers_the_batch() {
        // Two group commits may queue their callbacks' acks out of order.
        let batch = batch_of(&[Frame::AckWritten(9), Frame::AckWritten(5)]);
        assert_eq!(batch, vec![Frame::AckWritten(9)]);
    }

    #[test]
    fn other_frames_are_kept_in_order() {
        let frames = [Frame::Ping(1), Frame::FlushAck(4), Frame::Ping(2)];
        assert_eq!(batch_of(&frames), frames.to_vec());
    }
}
