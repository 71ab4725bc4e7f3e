//! Read balancing in the state machine: the rule that says whether a peer may serve
//! a Primary's client read, and the bookkeeping of the reads sent there (their
//! latency, their fallback to the local store, what each replica served). The choice
//! among the replicas the rule allows is [`super::balance::choose`].
//!
//! **The rule** (a read never returns data older than an acknowledged write): a peer
//! may serve blocks only while this node is a Primary with an UpToDate store, the
//! peer's session ships every record to it and the peer said it is UpToDate with no
//! resync running, none of the blocks is marked out of sync (the bitmap marks what a
//! peer may not hold), and no record shipped to it and not yet acknowledged as
//! written writes any of them. The last is belt and braces — READ_REQUEST travels on
//! the data connection behind every record shipped before it, and the peer reads
//! after it has sequenced them — but it keeps the rule independent of that ordering.
//!
//! **Fault model.** A peer may answer with an error, answer late, never answer, or
//! go away; each ends the balanced read with an error ([`Action::ReadDone`]) and the
//! driver reads the local store, which could have served it all along. The data of
//! an answer was checked against the peer's checksum table when it read it and
//! against the per-block CRC32s of READ_REPLY when it arrived (see `wire.rs`).

use super::balance::{self, ReadBalancing};
use super::peer::{BalancedRead, Peer, Repl, RequestKind, MAX_SERVED};
use super::storage::Storage;
use super::{Action, Mutation, Node, PeerId, RequestError, RequestId, SessionEnd, Time};
use crate::repl::{DiskState, Role};
use crate::wire::BlockData;
use crate::{IoError, BLOCK_BYTES};

/// Where a client read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadRoute {
    /// Read the local store, then report it with [`Node::local_read_done`].
    Local,
    /// Sent to this peer; completes with [`Action::ReadDone`]. An error there means:
    /// read the local store instead.
    Peer(PeerId),
}

/// Records shipped and not yet acknowledged as written that the in-flight test looks
/// through; a peer further behind than this serves no balanced read.
pub const IN_FLIGHT_SCAN_LIMIT: usize = 256;

/// Balanced reads outstanding on one session at most: half of what a peer serves at
/// once ([`MAX_SERVED`]), so read repair and verify always find room.
pub const BALANCED_PER_SESSION: usize = MAX_SERVED / 2;

impl<S: Storage> Node<S> {
    /// Whether reads are balanced at all (`prefer-local` never asks the node, so the
    /// driver may read the local store without taking the node's lock).
    pub fn balances_reads(&self) -> bool {
        self.config.read_balancing != ReadBalancing::PreferLocal
    }

    /// Routes one client read of a Primary with a store. [`ReadRoute::Local`]: the
    /// driver reads the store and calls [`Node::local_read_done`]. A peer: a
    /// READ_REQUEST was sent, and `id` completes with [`Action::ReadDone`].
    pub fn balance_read(
        &mut self,
        now: Time,
        id: RequestId,
        offset: u64,
        length: u64,
    ) -> ReadRoute {
        self.now = now;
        let route = self.route_read(offset, length);
        match route {
            ReadRoute::Local => self.local_reads.started(),
            ReadRoute::Peer(peer) => {
                let first_block = offset / BLOCK_BYTES;
                let end_block = (offset + length).div_ceil(BLOCK_BYTES);
                let Some(session) = self.peers[peer.0].session().map(|s| s.id) else {
                    // `route_read` chose a connected peer a moment ago.
                    self.local_reads.started();
                    return ReadRoute::Local;
                };
                self.peers[peer.0].reads.load.started();
                let kind = RequestKind::Read {
                    id,
                    first_block,
                    blocks: (end_block - first_block) as u32,
                    rewrite: false,
                    balanced: Some(BalancedRead {
                        sent: now,
                        fallback_at: now + self.config.timing.read_fallback,
                        abandoned: false,
                    }),
                };
                self.request_read(
                    peer,
                    session,
                    kind,
                    first_block,
                    (end_block - first_block) as u32,
                );
            }
        }
        route
    }

    /// A read [`Node::balance_read`] routed to the local store, started at `started`,
    /// is done (whatever its outcome).
    pub fn local_read_done(&mut self, now: Time, started: Time) {
        self.now = now;
        self.local_reads.ended();
        self.local_reads.measured(now.since(started));
    }

    /// The peers the rule allows for this read, and the policy's choice among them
    /// and the local store.
    fn route_read(&mut self, offset: u64, length: u64) -> ReadRoute {
        let policy = self.config.read_balancing;
        if policy == ReadBalancing::PreferLocal
            || self.role != Role::Primary
            || self.demoting.is_some()
            || self.disk() != DiskState::UpToDate
            || length == 0
        {
            return ReadRoute::Local;
        }
        let Some(end) = offset
            .checked_add(length)
            .filter(|end| *end <= self.size_bytes())
        else {
            // The local read reports the error.
            return ReadRoute::Local;
        };
        let first_block = offset / BLOCK_BYTES;
        let end_block = end.div_ceil(BLOCK_BYTES);
        if end_block - first_block > u64::from(crate::wire::MAX_FRAME_BLOCKS) {
            return ReadRoute::Local;
        }
        let rule = !self.config.mutated(Mutation::BalancedReadsIgnoreTheRule);
        let out_of_sync = rule
            && self.storage.as_ref().is_none_or(|storage| {
                storage
                    .next_out_of_sync_run(first_block, 1)
                    .is_some_and(|(start, _)| start < end_block)
            });
        if out_of_sync {
            return ReadRoute::Local;
        }
        let (ids, loads): (Vec<PeerId>, Vec<balance::ReplicaLoad>) = self
            .peers
            .iter()
            .filter(|peer| may_serve(peer, first_block, end_block, rule))
            .map(|peer| (peer.id, peer.reads.load))
            .unzip();
        let decision = self.read_decisions;
        self.read_decisions += 1;
        match balance::choose(policy, &self.local_reads, &loads, offset, decision) {
            Some(index) => ReadRoute::Peer(ids[index]),
            None => ReadRoute::Local,
        }
    }

    /// The peer's answer to a balanced read (`range`: the blocks asked for).
    pub(super) fn on_balanced_reply(
        &mut self,
        peer: PeerId,
        id: RequestId,
        balanced: BalancedRead,
        range: (u64, u32),
        data: Option<BlockData>,
        error: Option<String>,
    ) -> Result<(), SessionEnd> {
        let now = self.now;
        let reads = &mut self.peers[peer.0].reads;
        reads.load.ended();
        if !balanced.abandoned {
            reads.load.measured(now.since(balanced.sent));
        }
        let (first_block, blocks) = range;
        let answer = match data {
            Some(data) if data.first_block == first_block && data.blocks == blocks => Ok(data),
            Some(data) => Err(Some(format!(
                "READ_REPLY for blocks {}+{} to a request for blocks {first_block}+{blocks}",
                data.first_block, data.blocks
            ))),
            None => Err(None),
        };
        if balanced.abandoned {
            // Read locally already; a malformed answer still breaks the protocol.
            return match answer {
                Err(Some(why)) => Err(SessionEnd::Protocol(why)),
                _ => Ok(()),
            };
        }
        match answer {
            Ok(data) => {
                self.peers[peer.0].reads.served += 1;
                let bytes = data.data.unwrap_or_else(|| {
                    bytes::Bytes::from(vec![0u8; blocks as usize * BLOCK_BYTES as usize])
                });
                self.read_done(id, Ok(bytes));
                Ok(())
            }
            Err(protocol) => {
                let why = match &protocol {
                    Some(why) => why.clone(),
                    None => error.unwrap_or_else(|| "read failed".into()),
                };
                self.balanced_read_failed(peer, id, &why);
                match protocol {
                    Some(why) => Err(SessionEnd::Protocol(why)),
                    None => Ok(()),
                }
            }
        }
    }

    /// A balanced read goes back to the driver, to be read locally.
    pub(super) fn balanced_read_failed(&mut self, peer: PeerId, id: RequestId, why: &str) {
        self.peers[peer.0].reads.fallbacks += 1;
        let name = &self.peers[peer.0].config.name;
        let error =
            IoError::Failed(format!("peer {name} did not serve a balanced read: {why}").into());
        self.actions.push_back(Action::ReadDone {
            id,
            result: Err(RequestError::Io(error)),
        });
    }

    /// Balanced reads not answered within `read_fallback` go back to the driver (the
    /// request stays, so the late answer is recognised; the request's own deadline
    /// still ends a session that never answers).
    pub(super) fn tick_balanced_reads(&mut self) {
        let now = self.now;
        let mut late = Vec::new();
        for peer in &mut self.peers {
            let peer_id = peer.id;
            let Some(session) = peer.session_mut() else {
                continue;
            };
            for request in session.requests.values_mut() {
                if let RequestKind::Read {
                    id,
                    balanced: Some(balanced),
                    ..
                } = &mut request.kind
                {
                    if !balanced.abandoned && now >= balanced.fallback_at {
                        balanced.abandoned = true;
                        late.push((peer_id, *id, now.since(balanced.sent)));
                    }
                }
            }
        }
        for (peer, id, waited) in late {
            // What the peer made us wait is what it costs now.
            self.peers[peer.0].reads.load.measured(waited);
            self.balanced_read_failed(peer, id, &format!("no answer in {waited:?}"));
        }
    }

    /// When the next balanced read falls back, if one is outstanding.
    pub(super) fn next_read_fallback(&self) -> Option<Time> {
        self.peers
            .iter()
            .filter_map(Peer::session)
            .flat_map(|session| session.requests.values())
            .filter_map(|request| match request.kind {
                RequestKind::Read {
                    balanced: Some(balanced),
                    ..
                } if !balanced.abandoned => Some(balanced.fallback_at),
                _ => None,
            })
            .min()
    }
}

/// The per-peer half of the rule: the session ships every record to an UpToDate peer
/// with no resync running, has room for another request, and has no record in flight
/// that writes one of the blocks.
fn may_serve(peer: &Peer, first_block: u64, end_block: u64, rule: bool) -> bool {
    peer.session().is_some_and(|session| {
        if !rule {
            // The simulator's mutation: any session with room for a request.
            return session.requests.len() < BALANCED_PER_SESSION;
        }
        session.shipping
            && session.peer_state.disk == DiskState::UpToDate
            && matches!(session.repl, Repl::Established | Repl::Verify)
            && session.requests.len() < BALANCED_PER_SESSION
            && !session.may_be_in_flight(first_block, end_block, IN_FLIGHT_SCAN_LIMIT)
    })
}
