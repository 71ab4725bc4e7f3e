//! Per-peer state of the replication state machine: the connection, one session's
//! bookkeeping, and what flows over it (replication and resync states).
//!
//! Each state is an enum variant that carries exactly the data valid in it, so a
//! combination such as "resync source active but no session" cannot be represented.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;

use super::{PeerConfig, PeerId, SessionEnd, SessionId, Time, Token};
use crate::gen::Decision;
use crate::record::Record;
use crate::repl::{ConnectionState, ReplicationState};
use crate::wire::{Frame, PeerState};

/// One peer of the resource, across sessions.
#[derive(Debug)]
pub struct Peer {
    pub id: PeerId,
    pub config: PeerConfig,
    /// This node opens the connections (the lower node id dials).
    pub dialer: bool,
    pub conn: Conn,
    /// The next dial waits this long after a failure (doubling, bounded).
    pub backoff: Duration,
    /// Discard this node's changes at the next handshake (split-brain resolution).
    pub discard_my_data: bool,
    pub split_brain: bool,
    pub last_error: Option<SessionEnd>,
    /// The operator paused resync with this peer (kept across sessions).
    pub paused: bool,
    /// Block bytes sent (source) or received (target) by resyncs since start.
    pub resync_bytes: u64,
    /// Bytes a checksum comparison found equal and did not send.
    pub resync_skipped_bytes: u64,
    /// Blocks found different by the last verify.
    pub verify_out_of_sync: Option<u64>,
    /// Client reads balanced to this peer (kept across sessions).
    pub reads: PeerReads,
}

/// Read balancing's view of one peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerReads {
    /// Balanced reads outstanding and the moving average of their latency.
    pub load: super::ReplicaLoad,
    /// Client reads this peer served since start.
    pub served: u64,
    /// Balanced reads this peer failed, or answered too late, that were read locally
    /// instead.
    pub fallbacks: u64,
}

impl Peer {
    pub fn session(&self) -> Option<&Session> {
        match &self.conn {
            Conn::Connected(session) => Some(session),
            _ => None,
        }
    }

    pub fn session_mut(&mut self) -> Option<&mut Session> {
        match &mut self.conn {
            Conn::Connected(session) => Some(session),
            _ => None,
        }
    }

    /// The session, if it is `id` and established.
    pub fn current(&mut self, id: SessionId) -> Option<&mut Session> {
        self.session_mut().filter(|session| session.id == id)
    }

    pub fn connection_state(&self) -> ConnectionState {
        match self.conn {
            Conn::StandAlone => ConnectionState::StandAlone,
            Conn::Connecting { .. } | Conn::Handshake { .. } => ConnectionState::Connecting,
            Conn::Connected(_) => ConnectionState::Connected,
        }
    }
}

/// The connection to a peer.
#[derive(Debug)]
pub enum Conn {
    /// Not trying to connect (operator `disconnect`, a refused handshake, split brain).
    StandAlone,
    /// Waiting to dial (`dialing`: a dial is under way) or, as acceptor, for the peer.
    Connecting {
        next_dial: Time,
        dialing: bool,
    },
    /// Both channels are open; STATE sent, waiting for the peer's.
    Handshake {
        session: SessionId,
        deadline: Time,
    },
    Connected(Box<Session>),
}

/// What one established session knows.
#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    pub decision: Decision,
    /// The peer's latest STATE.
    pub peer_state: PeerState,
    pub last_heard: Time,
    pub next_ping: Time,
    pub ping_nonce: u64,
    /// We are Primary and ship every record to this peer.
    pub shipping: bool,
    /// Highest record sequence shipped in this session.
    pub shipped_seq: u64,
    /// The peer's cumulative acknowledgements.
    pub received_seq: u64,
    pub written_seq: u64,
    /// The peer's journal holds every record up to this durably (its DURABLE, or a
    /// FLUSH_ACK covering what was shipped before the FLUSH).
    pub peer_durable: u64,
    /// When each shipped write left (its last sequence number, the time), oldest
    /// first, until the peer reports it durable: the age of the oldest is what the
    /// `ko-timeout` measures.
    pub shipped_at: VecDeque<(u64, Time)>,
    /// Our durable sequence number as last reported to the peer.
    pub reported_durable: u64,
    pub next_durable_report: Time,
    /// Shipped records not yet received, `(seq, bytes)` (the async lag bound).
    pub lag: VecDeque<(u64, u64)>,
    pub lag_bytes: u64,
    /// Shipped records the peer has not yet acknowledged as written (ACK_WRITTEN),
    /// oldest first: the replication lag that status and metrics report, and the
    /// blocks in flight that read balancing must not read from the peer. At most
    /// [`MAX_UNWRITTEN`] entries.
    pub unwritten: VecDeque<Unwritten>,
    pub unwritten_bytes: u64,
    /// The last record shipped when `unwritten` was full (so not tracked there): until
    /// the peer acknowledges it, any block may be in flight.
    pub untracked_seq: Option<u64>,
    /// FLUSH frames sent to the peer: id → the last sequence shipped before it.
    pub flushes: BTreeMap<u64, u64>,
    pub next_flush_id: u64,
    /// As secondary: the last record received (records arrive in sequence order).
    pub last_record_seq: u64,
    pub repl: Repl,
    /// Data-channel frames wait until this storage operation completes (a generation
    /// adopted, a sync target's Inconsistent state persisted); they are kept in
    /// `deferred` meanwhile, in order.
    pub data_gate: Option<Token>,
    pub deferred: VecDeque<Frame>,
    /// A received record the engine had no memory for yet, retried after progress.
    pub blocked_record: Option<(Record, Token)>,
    /// Requests we sent the peer (read repair, verify), by request id.
    pub requests: BTreeMap<u64, Request>,
    pub next_request: u64,
    /// Requests of the peer we are serving (bounded: [`MAX_SERVED`]).
    pub served: usize,
    /// We agreed to the peer's promotion: no promotion of ours until its next STATE.
    pub peer_promoting: bool,
    /// As a diskless Primary: the peer confirmed (a STATE with a generation of its
    /// own) that it tracks every block for our lost disk; nothing completes before.
    pub covers_diskless: bool,
}

/// A shipped record the peer has not acknowledged as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unwritten {
    pub seq: u64,
    /// The record's whole encoded size.
    pub bytes: u64,
    pub shipped: Time,
    /// The blocks it writes: `first_block .. end_block`.
    pub first_block: u64,
    pub end_block: u64,
}

/// Most requests of a peer (READ_REQUEST, VERIFY_REQUEST, RESYNC_CHECK) served at once;
/// a peer that sends more breaks the protocol.
pub const MAX_SERVED: usize = 128;

/// Most shipped records [`Session::unwritten`] tracks. A peer that works never comes
/// near it (what it received and has not written is bounded by its memory budget); one
/// that never acknowledges a write cannot grow our memory: past the bound newer records
/// are not tracked, so the lag in bytes is then an underestimate (the age stays right).
pub const MAX_UNWRITTEN: usize = 1 << 20;

impl Session {
    pub fn new(id: SessionId, decision: Decision, peer_state: PeerState, now: Time) -> Session {
        Session {
            id,
            decision,
            peer_state,
            last_heard: now,
            next_ping: now,
            ping_nonce: 0,
            shipping: false,
            shipped_seq: 0,
            received_seq: 0,
            written_seq: 0,
            peer_durable: 0,
            shipped_at: VecDeque::new(),
            reported_durable: 0,
            next_durable_report: now,
            lag: VecDeque::new(),
            lag_bytes: 0,
            unwritten: VecDeque::new(),
            unwritten_bytes: 0,
            untracked_seq: None,
            flushes: BTreeMap::new(),
            next_flush_id: 1,
            last_record_seq: 0,
            repl: Repl::Established,
            data_gate: None,
            deferred: VecDeque::new(),
            blocked_record: None,
            requests: BTreeMap::new(),
            next_request: 1,
            served: 0,
            peer_promoting: false,
            covers_diskless: false,
        }
    }

    /// A record of `bytes` (its whole encoded size) writing `blocks` was shipped at
    /// `now`.
    pub fn note_shipped(&mut self, seq: u64, bytes: u64, blocks: (u64, u64), now: Time) {
        if self.unwritten.len() < MAX_UNWRITTEN {
            self.unwritten.push_back(Unwritten {
                seq,
                bytes,
                shipped: now,
                first_block: blocks.0,
                end_block: blocks.1,
            });
            self.unwritten_bytes += bytes;
        } else {
            self.untracked_seq = Some(seq);
        }
    }

    /// The peer acknowledged every record up to `seq` as written.
    pub fn note_written(&mut self, seq: u64) {
        while let Some(oldest) = self.unwritten.front() {
            if oldest.seq > seq {
                break;
            }
            self.unwritten_bytes = self.unwritten_bytes.saturating_sub(oldest.bytes);
            self.unwritten.pop_front();
        }
        if self.untracked_seq.is_some_and(|untracked| untracked <= seq) {
            self.untracked_seq = None;
        }
    }

    /// Whether a record shipped and not yet acknowledged as written may write a block
    /// of `first_block .. end_block`. Looks at no more than `scan_limit` records:
    /// past that, or when some were not tracked, it answers yes.
    pub fn may_be_in_flight(&self, first_block: u64, end_block: u64, scan_limit: usize) -> bool {
        self.untracked_seq.is_some()
            || self.unwritten.len() > scan_limit
            || self
                .unwritten
                .iter()
                .any(|record| record.first_block < end_block && first_block < record.end_block)
    }

    /// The replication lag at `now`: bytes shipped and not yet acknowledged as written
    /// by the peer, and how long ago the oldest of them was shipped (zero when none).
    pub fn written_lag(&self, now: Time) -> (u64, Duration) {
        let age = self
            .unwritten
            .front()
            .map_or(Duration::ZERO, |record| now.since(record.shipped));
        (self.unwritten_bytes, age)
    }

    /// Whether the driver may hand us the next data-channel frame.
    pub fn takes_data(&self) -> bool {
        self.data_gate.is_none() && self.blocked_record.is_none()
    }

    pub fn replication_state(&self, paused: bool) -> ReplicationState {
        match (&self.repl, paused) {
            (Repl::Established, _) => ReplicationState::Established,
            (Repl::Verify, _) => ReplicationState::VerifyS,
            (Repl::Source(_), false) => ReplicationState::SyncSource,
            (Repl::Source(_), true) => ReplicationState::PausedSyncS,
            (Repl::Target(target), _) if target.phase == TargetPhase::WaitBitmap => {
                ReplicationState::Established
            }
            (Repl::Target(_), false) => ReplicationState::SyncTarget,
            (Repl::Target(_), true) => ReplicationState::PausedSyncT,
        }
    }
}

/// A request we sent the peer.
#[derive(Debug)]
pub struct Request {
    pub deadline: Time,
    pub kind: RequestKind,
}

#[derive(Debug, Clone, Copy)]
pub enum RequestKind {
    /// Read repair of `block` for a client request.
    Repair { id: super::RequestId, block: u64 },
    /// A chunk of an online verify.
    Verify { first_block: u64, blocks: u64 },
    /// A client read served by the peer (a diskless Primary, a local read error, or
    /// read balancing); with `rewrite`, the blocks are written back locally when no
    /// write raced.
    Read {
        id: super::RequestId,
        first_block: u64,
        blocks: u32,
        rewrite: bool,
        balanced: Option<BalancedRead>,
    },
}

/// A read sent to a peer by read balancing: the local store can serve it, so a
/// failure or a late answer falls back to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalancedRead {
    pub sent: Time,
    /// Past this the client's read is given back to the driver to read locally.
    pub fallback_at: Time,
    /// It was given back; the answer, when it comes, only ends the peer's count.
    pub abandoned: bool,
}

/// What flows over an established session.
#[derive(Debug)]
pub enum Repl {
    /// Records (if we are Primary), nothing to resync.
    Established,
    /// An online verify runs (we compare; records flow as in Established).
    Verify,
    Source(Box<Source>),
    Target(Target),
}

/// A resync with this node as the source.
#[derive(Debug)]
pub struct Source {
    pub phase: SourcePhase,
    /// Where the next scan for out-of-sync runs starts.
    pub cursor: u64,
    /// Sent and not yet acknowledged: first block → blocks (RESYNC_DATA, or a
    /// RESYNC_CHECK awaiting its reply).
    pub in_flight: BTreeMap<u64, u64>,
    pub in_flight_bytes: u64,
    /// Reads of the current group not yet completed.
    pub reads_pending: usize,
    /// Data read for a RESYNC_CHECK, waiting for the target's verdict.
    pub checks: BTreeMap<u64, Bytes>,
    pub checksum_first: bool,
    pub total_blocks: u64,
    pub started: Time,
    /// Bytes sent, for the rate limit.
    pub sent_bytes: u64,
    /// Nothing to do before this (rate limit, yielding to clients, bits behind the
    /// cursor that are not yet readable).
    pub wait_until: Time,
    /// When the target last sent a bitmap part or acknowledged something, or
    /// something was sent with nothing in flight: a target that leaves data
    /// unacknowledged, or its bitmap unsent, longer than `ko_timeout` is dropped (a link that black-holes bulk data stalls a resync
    /// while its pings still flow).
    pub progress_at: Time,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    /// The handshake chose the direction: the target's bitmap comes first.
    WaitPeerBitmap {
        deadline: Time,
    },
    Streaming,
    /// Everything is sent; our own journal is being flushed first, so no block the
    /// target now holds can be lost here by a power cut (the target would keep a
    /// write we no longer have, with no bit left to say so).
    Flushing,
    /// RESYNC_DONE sent; waiting for RESYNC_DONE_ACK.
    Done {
        deadline: Time,
    },
    /// The target confirmed; our generation change is being persisted.
    Closing,
}

/// A resync with this node as the target.
#[derive(Debug)]
pub struct Target {
    pub phase: TargetPhase,
    pub total_blocks: u64,
    pub started: Time,
    /// RESYNC_DONE arrived with the source's generation.
    pub source_current: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetPhase {
    /// Our bitmap is sent (or the source started one); the source's bitmap comes.
    WaitBitmap,
    /// Persisting Inconsistent and the merged bitmap before any resync data.
    Entering,
    Receiving,
    /// RESYNC_DONE arrived: making everything durable, then the new generation.
    Finishing,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::GenerationIds;
    use crate::repl::{DiskState, Role};

    fn session() -> Session {
        let peer = PeerState {
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            generations: GenerationIds::default(),
            crashed_primary: false,
            discard_my_data: false,
            dirty_blocks: 0,
            next_seq: 0,
            size_bytes: 0,
        };
        Session::new(SessionId(1), Decision::InSync, peer, Time::ZERO)
    }

    fn at(millis: u64) -> Time {
        Time::from_nanos(millis * 1_000_000)
    }

    #[test]
    fn written_lag_counts_what_the_peer_has_not_written_and_ages_the_oldest() {
        let mut session = session();
        assert_eq!(session.written_lag(at(5)), (0, Duration::ZERO));
        session.note_shipped(7, 4160, (0, 1), at(1000));
        session.note_shipped(8, 8256, (1, 3), at(1200));
        session.note_shipped(9, 64, (9, 10), at(1500));
        assert_eq!(
            session.written_lag(at(1750)),
            (4160 + 8256 + 64, Duration::from_millis(750))
        );
        // Received is not written: only ACK_WRITTEN shortens the lag.
        session.note_written(7);
        assert_eq!(
            session.written_lag(at(1750)),
            (8256 + 64, Duration::from_millis(550))
        );
        // A cumulative acknowledgement covers every record up to it.
        session.note_written(9);
        assert_eq!(session.written_lag(at(2000)), (0, Duration::ZERO));
        assert!(session.unwritten.is_empty());
        // A stale (lower) acknowledgement changes nothing.
        session.note_shipped(10, 100, (4, 5), at(2100));
        session.note_written(8);
        assert_eq!(
            session.written_lag(at(2200)),
            (100, Duration::from_millis(100))
        );
        // A clock that went backwards gives zero, not a panic.
        assert_eq!(session.written_lag(at(2000)), (100, Duration::ZERO));
    }

    #[test]
    fn written_lag_tracking_is_bounded() {
        let mut session = session();
        for seq in 1..=(MAX_UNWRITTEN as u64 + 10) {
            session.note_shipped(seq, 1, (seq, seq + 1), at(seq));
        }
        assert_eq!(session.unwritten.len(), MAX_UNWRITTEN);
        assert_eq!(session.unwritten_bytes, MAX_UNWRITTEN as u64);
        // The age stays that of the oldest record.
        assert_eq!(session.written_lag(at(5000)).1, Duration::from_millis(4999));
        // Past the bound any block may be in flight, until the peer catches up.
        assert!(session.may_be_in_flight(0, 1, usize::MAX));
        session.note_written(MAX_UNWRITTEN as u64 + 9);
        assert!(session.may_be_in_flight(0, 1, usize::MAX));
        session.note_written(MAX_UNWRITTEN as u64 + 10);
        assert_eq!(session.written_lag(at(5000)), (0, Duration::ZERO));
        assert!(!session.may_be_in_flight(0, 1, usize::MAX));
    }

    #[test]
    fn in_flight_blocks_are_the_unwritten_records_ranges() {
        let mut session = session();
        assert!(!session.may_be_in_flight(0, u64::MAX, 16));
        session.note_shipped(1, 0, (10, 12), at(1));
        session.note_shipped(2, 0, (20, 21), at(1));
        for (range, in_flight) in [
            ((9, 10), false),
            ((9, 11), true),
            ((11, 12), true),
            ((12, 20), false),
            ((20, 21), true),
            ((21, 99), false),
        ] {
            assert_eq!(
                session.may_be_in_flight(range.0, range.1, 16),
                in_flight,
                "{range:?}"
            );
        }
        // Too many to look at: assume the worst.
        assert!(session.may_be_in_flight(0, 1, 1));
        // Received is not written.
        session.note_written(1);
        assert!(!session.may_be_in_flight(10, 12, 16));
        assert!(session.may_be_in_flight(20, 21, 16));
    }
}
