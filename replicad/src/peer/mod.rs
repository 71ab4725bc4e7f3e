//! The replication transport: two TCP connections per peer session, *data* (records,
//! resync data, bitmaps) and *meta* (acknowledgements and heartbeats), so a heartbeat
//! never waits behind megabytes of bulk data.
//!
//! This module only moves frames. Every decision — what to send, what a frame means,
//! when a session ends — is the state machine's ([`engine::node::Node`]); the
//! resource ([`crate::resource`]) feeds it what arrives here and queues what it sends
//! into a session's [`Outbox`]es, under its lock, so frames leave in the order the
//! state machine produced them.
//!
//! Per session: one writer task per connection (drains its outbox, merges cumulative
//! acknowledgements, one vectored write per batch) and one reader task per connection
//! (reads a frame, hands it over; data frames wait while the state machine gates them,
//! and a group commit follows each batch of frames read without waiting). The node
//! with the lower node id dials ([`dial`]); the other accepts on the shared
//! [`listener`].

pub mod listener;
pub mod wire_io;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use engine::node::{PeerId, SessionId};
use engine::wire::{Channel, Frame};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::resource::Resource;
pub use wire_io::{Identity, LinkError};

/// Most frames written in one batch.
const MAX_BATCH_FRAMES: usize = 256;
/// Most frames a reader hands over between two group commits.
const COMMIT_FRAMES_MAX: usize = 64;
/// How long a closed session's connection stays open for its last frames (a REJECT).
const LINGER: Duration = Duration::from_secs(2);

/// Both connections of a new session.
pub struct Connections {
    pub data: TcpStream,
    pub meta: TcpStream,
}

/// Frames waiting for one connection's writer. Its length is bounded by the
/// protocol, not here: records by the resource's in-flight write limit, resync data
/// by the source's window, acknowledgements by the records they answer (and they are
/// merged), everything else by requests that are themselves bounded.
#[derive(Default)]
pub struct Outbox {
    frames: Mutex<VecDeque<Frame>>,
    ready: Notify,
    closed: AtomicBool,
}

impl Outbox {
    pub fn push(&self, frame: Frame) {
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(frame);
        self.ready.notify_one();
    }

    /// The writer drains what is queued and stops.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.ready.notify_one();
    }

    /// Moves up to [`MAX_BATCH_FRAMES`] frames into `batch`, merging acknowledgements.
    fn drain_into(&self, batch: &mut Vec<Frame>) {
        let mut frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        while batch.len() < MAX_BATCH_FRAMES {
            match frames.pop_front() {
                Some(frame) => push_coalesced(batch, frame),
                None => break,
            }
        }
    }
}

/// The resource's handle on one session's transport.
pub struct SessionHandle {
    pub id: SessionId,
    pub data: Arc<Outbox>,
    pub meta: Arc<Outbox>,
    tasks: Vec<tokio::task::AbortHandle>,
    /// Readers stop at once, or (linger) keep the connection open a little longer.
    stop: Arc<Notify>,
}

/// A lingering close: writers keep their connections open (after writing what was
/// queued) until a reader sees the peer close, or [`LINGER`]. Closing one connection
/// early would let the peer see its end before the other connection delivered the
/// last frames (the REJECT and the STATE it needs to reach the same decision).
#[derive(Default)]
struct Linger {
    peer_closed: Notify,
}

impl SessionHandle {
    pub fn outbox(&self, channel: Channel) -> &Outbox {
        match channel {
            Channel::Data => &self.data,
            Channel::Meta => &self.meta,
        }
    }

    /// Closes the session's connections. With `linger`, the queued frames are written
    /// first and the connection stays open until the peer closes it or [`LINGER`].
    pub fn close(self, linger: bool) {
        if linger {
            self.data.close();
            self.meta.close();
            self.stop.notify_waiters();
        } else {
            for task in &self.tasks {
                task.abort();
            }
        }
    }
}

/// Starts the tasks of a new session on `connections`; the caller stores the handle
/// where [`Resource`] finds it for sending (under its lock, together with telling the
/// state machine, so the first frames are not lost).
pub fn start_session(
    resource: &Arc<Resource>,
    peer: PeerId,
    id: SessionId,
    connections: Connections,
) -> SessionHandle {
    let data = Arc::new(Outbox::default());
    let meta = Arc::new(Outbox::default());
    let stop = Arc::new(Notify::new());
    let linger = Arc::new(Linger::default());
    let (data_read, data_write) = connections.data.into_split();
    let (meta_read, meta_write) = connections.meta.into_split();
    let tasks = vec![
        tokio::spawn(writer_task(
            resource.clone(),
            peer,
            id,
            data_write,
            data.clone(),
            linger.clone(),
        ))
        .abort_handle(),
        tokio::spawn(writer_task(
            resource.clone(),
            peer,
            id,
            meta_write,
            meta.clone(),
            linger.clone(),
        ))
        .abort_handle(),
        tokio::spawn(reader_task(
            resource.clone(),
            peer,
            id,
            Channel::Data,
            BufReader::with_capacity(256 << 10, data_read),
            stop.clone(),
            linger.clone(),
        ))
        .abort_handle(),
        tokio::spawn(reader_task(
            resource.clone(),
            peer,
            id,
            Channel::Meta,
            BufReader::with_capacity(16 << 10, meta_read),
            stop.clone(),
            linger.clone(),
        ))
        .abort_handle(),
    ];
    SessionHandle {
        id,
        data,
        meta,
        tasks,
        stop,
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    resource: Arc<Resource>,
    peer: PeerId,
    session: SessionId,
    mut writer: W,
    outbox: Arc<Outbox>,
    linger: Arc<Linger>,
) {
    let mut batch = Vec::with_capacity(64);
    loop {
        outbox.drain_into(&mut batch);
        if batch.is_empty() {
            if outbox.closed.load(Ordering::SeqCst) {
                let _ = tokio::time::timeout(LINGER, linger.peer_closed.notified()).await;
                return;
            }
            outbox.ready.notified().await;
            continue;
        }
        // One yield lets the frames that running tasks are about to queue (records of
        // writes being sequenced, acknowledgements of a group commit) join this write.
        // Not for resync data: those frames are large already, and the source waits.
        if !batch
            .iter()
            .any(|frame| matches!(frame, Frame::ResyncData(_)))
        {
            tokio::task::yield_now().await;
            outbox.drain_into(&mut batch);
        }
        if let Err(error) = wire_io::write_frames(&mut writer, &batch).await {
            resource.session_closed(peer, session, format!("connection lost: {error}"));
            return;
        }
        batch.clear();
    }
}

async fn reader_task<R: AsyncRead + Unpin>(
    resource: Arc<Resource>,
    peer: PeerId,
    session: SessionId,
    channel: Channel,
    mut reader: R,
    stop: Arc<Notify>,
    linger: Arc<Linger>,
) {
    let why = tokio::select! {
        why = read_loop(&resource, peer, session, channel, &mut reader) => why,
        _ = stop.notified() => {
            // A lingering close: keep reading (and ignoring) until the peer closes.
            let _ = tokio::time::timeout(LINGER, async {
                while wire_io::read_frame(&mut reader).await.is_ok() {}
            })
            .await;
            linger.peer_closed.notify_waiters();
            return;
        }
    };
    linger.peer_closed.notify_waiters();
    resource.session_closed(peer, session, why.to_string());
}

/// Reads frames and hands them over until the connection fails. Frames read without
/// waiting are handed over as one batch, followed by one group commit.
async fn read_loop<R: AsyncRead + Unpin>(
    resource: &Arc<Resource>,
    peer: PeerId,
    session: SessionId,
    channel: Channel,
    reader: &mut R,
) -> LinkError {
    let mut in_batch = 0usize;
    loop {
        if channel == Channel::Data {
            resource.wait_for_data_gate(peer).await;
        }
        let frame = {
            let mut read = std::pin::pin!(wire_io::read_frame(reader));
            let ready = if in_batch > 0 && in_batch < COMMIT_FRAMES_MAX {
                std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await
            } else {
                Poll::Pending
            };
            match ready {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    if in_batch > 0 {
                        // No further frame at hand: the records journaled meanwhile
                        // go to the journal in one group commit.
                        resource.end_of_batch();
                        in_batch = 0;
                    }
                    read.await
                }
            }
        };
        match frame {
            Ok(frame) => {
                resource.frame_in(peer, session, frame);
                in_batch += 1;
            }
            Err(error) => {
                if in_batch > 0 {
                    resource.end_of_batch();
                }
                return error;
            }
        }
    }
}

/// Adds a frame to a batch that goes out in one write. Acknowledgements are
/// cumulative ("everything up to `seq`"), so one of a kind the batch already holds
/// merges into that one (the higher wins).
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

/// Dials `address` for both channels (data first), checking the peer's HELLOs.
pub async fn dial(
    address: std::net::SocketAddr,
    identity: &Identity,
    peer: &str,
    peer_id: u32,
) -> Result<Connections, LinkError> {
    let data = wire_io::dial_one(address, identity, peer, peer_id, Channel::Data).await?;
    let meta = wire_io::dial_one(address, identity, peer, peer_id, Channel::Meta).await?;
    Ok(Connections { data, meta })
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
        let batch = batch_of(&[Frame::AckWritten(9), Frame::AckWritten(5)]);
        assert_eq!(batch, vec![Frame::AckWritten(9)]);
    }

    #[test]
    fn other_frames_are_kept_in_order() {
        let frames = [Frame::Ping(1), Frame::FlushAck(4), Frame::Ping(2)];
        assert_eq!(batch_of(&frames), frames.to_vec());
    }
}
