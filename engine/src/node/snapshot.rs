//! Snapshots at one point of the write order on every node (`snapshot create --all`).
//!
//! The Primary picks the point — the last sequence number it has handed out — and,
//! in the same step, queues a SNAPSHOT frame to every connected peer on the data
//! channel. Every record after the point is sequenced in a later step, so it travels
//! behind the frame; a peer takes its snapshot when the frame is dispatched, before
//! any later record (`Volume::reserve_snapshot_point` keeps its applier from passing
//! the point while the snapshot is made durable). Records up to the point that are
//! still on their way are applied without preservation: they belong to the snapshot.
//! Each node answers; the command completes when every node asked has answered or
//! lost its session.

use super::machine::Purpose;
use super::peer::Conn;
use super::storage::Storage;
use super::{AdminError, AdminId, AdminOutput, Node, PeerId, SessionId, Time};
use crate::repl::Role;
use crate::wire::Frame;

/// A `--all` snapshot waiting for answers.
#[derive(Debug)]
pub(super) struct PendingSnapshot {
    id: AdminId,
    name: String,
    point: u64,
    /// This node's outcome, once known.
    local: Option<Result<(), String>>,
    /// Per peer asked: its session and outcome, once known.
    peers: Vec<(PeerId, SessionId, Option<Outcome>)>,
}

/// A node's answer: taken, or why not.
type Outcome = Result<(), String>;

impl<S: Storage> Node<S> {
    /// `replctl snapshot create --all` on the Primary: snapshot `name` here and on
    /// every connected peer, at the same point of the write order.
    pub fn snapshot_all(&mut self, now: Time, id: AdminId, name: String) {
        self.now = now;
        if self.role != Role::Primary {
            self.admin_done(
                id,
                Err(AdminError::Refused(
                    "--all is taken on the Primary: its write order is the one every node follows"
                        .into(),
                )),
            );
            return;
        }
        let Some(storage) = self.storage.as_mut() else {
            self.admin_done(id, Err(AdminError::NoDisk));
            return;
        };
        let point = storage.next_seq().saturating_sub(1);
        let mut asked = Vec::new();
        for index in 0..self.peers.len() {
            if let Conn::Connected(session) = &self.peers[index].conn {
                asked.push((PeerId(index), session.id, None));
            }
        }
        for &(peer, session, _) in &asked {
            self.send(
                peer,
                session,
                Frame::Snapshot {
                    name: name.clone(),
                    point,
                },
            );
        }
        let token = self.token(Purpose::LocalSnapshot { id });
        if let Some(storage) = self.storage.as_mut() {
            storage.create_snapshot(&name, point, token);
        }
        self.pending_snapshots.push(PendingSnapshot {
            id,
            name,
            point,
            local: None,
            peers: asked,
        });
    }

    /// A SNAPSHOT from the Primary: take it at its point.
    pub(super) fn on_snapshot_frame(
        &mut self,
        peer: PeerId,
        session: SessionId,
        name: String,
        point: u64,
    ) {
        if self.role == Role::Primary {
            let error =
                "this node is Primary: it takes snapshots of its own write order".to_string();
            self.send(
                peer,
                session,
                Frame::SnapshotReply {
                    name,
                    error: Some(error),
                },
            );
            return;
        }
        let token = self.token(Purpose::PeerSnapshot {
            peer,
            session,
            name: name.clone(),
        });
        match self.storage.as_mut() {
            Some(storage) => storage.create_snapshot(&name, point, token),
            None => {
                self.tokens.remove(&token);
                let error = "no disk attached".to_string();
                self.send(
                    peer,
                    session,
                    Frame::SnapshotReply {
                        name,
                        error: Some(error),
                    },
                );
            }
        }
    }

    /// A peer's snapshot is made (or failed): tell the Primary.
    pub(super) fn peer_snapshot_stored(
        &mut self,
        peer: PeerId,
        session: SessionId,
        name: String,
        result: Result<(), String>,
    ) {
        if self.peers[peer.0].current(session).is_some() {
            self.send(
                peer,
                session,
                Frame::SnapshotReply {
                    name,
                    error: result.err(),
                },
            );
        }
    }

    /// This node's part of a `--all` snapshot is done.
    pub(super) fn local_snapshot_stored(&mut self, id: AdminId, result: Result<(), String>) {
        if let Some(pending) = self.pending_snapshots.iter_mut().find(|p| p.id == id) {
            pending.local = Some(result);
        }
        self.finish_snapshots();
    }

    /// A peer's SNAPSHOT_REPLY.
    pub(super) fn on_snapshot_reply(
        &mut self,
        peer: PeerId,
        session: SessionId,
        name: &str,
        error: Option<String>,
    ) {
        for pending in self.pending_snapshots.iter_mut().filter(|p| p.name == name) {
            for (p, s, outcome) in &mut pending.peers {
                if *p == peer && *s == session && outcome.is_none() {
                    *outcome = Some(error.clone().map_or(Ok(()), Err));
                }
            }
        }
        self.finish_snapshots();
    }

    /// A session ended: its peer will not answer.
    pub(super) fn snapshot_peer_gone(&mut self, peer: PeerId, session: SessionId) {
        for pending in &mut self.pending_snapshots {
            for (p, s, outcome) in &mut pending.peers {
                if *p == peer && *s == session && outcome.is_none() {
                    *outcome = Some(Err("the connection ended before it answered".into()));
                }
            }
        }
        self.finish_snapshots();
    }

    /// Completes every `--all` snapshot whose answers are all in.
    fn finish_snapshots(&mut self) {
        let mut index = 0;
        while index < self.pending_snapshots.len() {
            let pending = &self.pending_snapshots[index];
            let complete =
                pending.local.is_some() && pending.peers.iter().all(|(_, _, o)| o.is_some());
            if !complete {
                index += 1;
                continue;
            }
            let pending = self.pending_snapshots.remove(index);
            let mut taken = Vec::new();
            let mut failed = Vec::new();
            let mut outcomes = vec![(self.config.node_name.clone(), pending.local)];
            for (peer, _, outcome) in pending.peers {
                outcomes.push((self.peers[peer.0].config.name.clone(), outcome));
            }
            for (node, outcome) in outcomes {
                match outcome {
                    Some(Ok(())) => taken.push(node),
                    Some(Err(why)) => failed.push(format!("{node}: {why}")),
                    None => failed.push(format!("{node}: no answer")),
                }
            }
            let text = format!(
                "snapshot {} at write {} taken on {}",
                pending.name,
                pending.point,
                if taken.is_empty() {
                    "no node".to_string()
                } else {
                    taken.join(", ")
                }
            );
            let result = if failed.is_empty() {
                Ok(AdminOutput::Message(text))
            } else {
                Err(AdminError::Refused(format!(
                    "{text}; failed on {}",
                    failed.join("; ")
                )))
            };
            self.admin_done(pending.id, result);
        }
    }
}
