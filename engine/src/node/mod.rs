//! The replication state machine of one resource on one node (sans-IO).
//!
//! [`Node`] owns every replication decision: roles and promotion, the handshake and
//! the generation comparison, which records go to which peer, when a client write or
//! FLUSH completes, what a session end marks out of sync, resync in both directions,
//! online verify and read repair. It is driven by events and answers with actions, in
//! the manner of quinn-proto:
//!
//! * inputs: [`Node::on_write`], [`Node::on_flush`], [`Node::end_of_batch`] (the group
//!   commit point), [`Node::on_connected`], [`Node::handle_frame`], [`Node::on_closed`],
//!   [`Node::on_storage`] (a storage completion), [`Node::on_tick`], and the operator's
//!   commands ([`Node::promote`], [`Node::demote`], …);
//! * outputs: [`Node::poll_action`] ([`Action::Send`], [`Action::Complete`],
//!   [`Action::Dial`], [`Action::Close`], [`Action::AdminDone`], events and hooks) and
//!   [`Node::next_timeout`].
//!
//! **Architecture Invariant:** this module knows no socket, no thread, no clock and no
//! OS randomness. Time comes in as [`Time`]; random identifiers come from a generator
//! seeded by the caller; storage is reached through the [`Storage`] trait, whose slow
//! operations complete later through [`Node::on_storage`]. The daemon
//! (`replicad::driver`) and the deterministic simulator (`replsim`) drive the same
//! code, so a seed that breaks a promise in the simulator is a bug of the daemon.
//!
//! States are explicit enums ([`peer::Conn`], [`peer::Repl`]); every frame handler
//! checks the state it is valid in, and a valid frame in the wrong state is a protocol
//! error that ends the session, never data. Designed for N peers: every per-peer fact
//! lives in [`peer::Peer`]; the rules that combine peers (which writes wait for whom,
//! what the engine may forget) iterate over them.

mod admin;
mod balance;
mod machine;
pub mod peer;
mod reads;
mod resync;
mod snapshot;
pub mod storage;
#[cfg(test)]
mod tests;

use std::fmt;
use std::ops::Add;
use std::time::Duration;

pub use balance::{ReadBalancing, ReplicaLoad};
pub use machine::{AttachFacts, Node};
pub use reads::ReadRoute;

pub use storage::{Completion, Storage, SuperblockChange, Token};

use crate::repl::Mode;
use crate::wire::Frame;
use crate::IoError;

/// A point in (real or virtual) time, in nanoseconds from an origin the driver picks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(u64);

impl Time {
    pub const ZERO: Time = Time(0);

    pub fn from_nanos(nanos: u64) -> Time {
        Time(nanos)
    }

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this is (zero if it is not later).
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, span: Duration) -> Time {
        Time(
            self.0
                .saturating_add(u64::try_from(span.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:06}s",
            self.0 / 1_000_000_000,
            (self.0 / 1000) % 1_000_000
        )
    }
}

/// A peer, by its index in [`NodeConfig::peers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub usize);

/// One connected session with a peer; frames and closes of an older session are
/// recognised as stale and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

/// A client request (write, FLUSH, read repair), named by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl RequestId {
    /// Ids from here up name the node's own requests (the rewrite of a block read
    /// from the peer after a local read error); their completions never reach the
    /// driver. A driver numbers its requests below.
    pub const INTERNAL: u64 = 1 << 63;

    pub fn is_internal(self) -> bool {
        self.0 >= RequestId::INTERNAL
    }
}

/// An operator command that completes later, named by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AdminId(pub u64);

/// A peer of the resource, as the config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub node_id: u32,
}

/// Timers of the protocol. Every wait of the state machine is bounded by one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A PING goes to a connected peer this often.
    pub ping_interval: Duration,
    /// A peer silent for this long (no frame at all) is declared dead.
    pub timeout: Duration,
    /// A handshake (STATE exchange) must finish within this.
    pub handshake: Duration,
    /// First and longest wait between two dial attempts.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often a node reports its durable sequence number (DURABLE) when it moved.
    pub durable_report: Duration,
    /// A read repair, a verify request or a resync check not answered within this
    /// fails (or ends the session).
    pub request: Duration,
    /// The other side of a resync must send its bitmap, or confirm the end, within this.
    pub resync_step: Duration,
    /// A peer that leaves a shipped write not durable, or a FLUSH unanswered, this
    /// long is dropped (DRBD's `timeout` × `ko-count`; 6 s × 7 there).
    pub ko_timeout: Duration,
    /// A client read balanced to a peer and not answered within this is read locally
    /// instead (the peer's answer, when it comes, is dropped).
    pub read_fallback: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            ping_interval: Duration::from_millis(500),
            timeout: Duration::from_secs(2),
            handshake: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            durable_report: Duration::from_millis(20),
            request: Duration::from_secs(60),
            resync_step: Duration::from_secs(120),
            ko_timeout: Duration::from_secs(42),
            read_fallback: Duration::from_millis(500),
        }
    }
}

/// Resync knobs of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncConfig {
    /// Bytes per second a source sends at most (`None`: as fast as it can).
    pub rate_bytes: Option<u64>,
    /// Compare digests before sending data: `None` means only after a primary crash.
    pub checksum_first: Option<bool>,
    /// Pause the source while clients did I/O in the last 50 ms.
    pub yield_to_clients: bool,
}

/// A known class of bug that the deterministic simulator re-introduces on purpose
/// (`replsim --mutate NAME`) to prove its checker catches it. The daemon never sets
/// one; a mutation only exists so that a checker that cannot fail is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// The primary forgets a record as soon as the peer has it in its journal
    /// (ACK_WRITTEN), not once the peer reports it durable.
    AckBeforePeerDurable,
    /// A session end marks nothing out of sync (neither held records nor later writes).
    NoOutOfSyncOnDetach,
    /// A sync target does not track what the replication stream wrote during the
    /// resync, so stale resync data overwrites newer records.
    ApplyStaleResyncData,
    /// Promotion does not look at the peer's role.
    PromoteIgnoresPeerRole,
    /// Writes without the peer never start a new generation.
    SkipGenerationRotation,
    /// Read balancing sends reads to any connected peer: out of sync, in flight, not
    /// UpToDate or a resync target alike.
    BalancedReadsIgnoreTheRule,
    /// A BITMAP_RUN leaves out the last block of its run.
    BitmapRunOneShort,
}

impl Mutation {
    pub const ALL: [Mutation; 7] = [
        Mutation::AckBeforePeerDurable,
        Mutation::NoOutOfSyncOnDetach,
        Mutation::ApplyStaleResyncData,
        Mutation::PromoteIgnoresPeerRole,
        Mutation::SkipGenerationRotation,
        Mutation::BalancedReadsIgnoreTheRule,
        Mutation::BitmapRunOneShort,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::AckBeforePeerDurable => "ack-before-peer-durable",
            Mutation::NoOutOfSyncOnDetach => "no-out-of-sync-on-detach",
            Mutation::ApplyStaleResyncData => "apply-stale-resync-data",
            Mutation::PromoteIgnoresPeerRole => "promote-ignores-peer-role",
            Mutation::SkipGenerationRotation => "skip-generation-rotation",
            Mutation::BalancedReadsIgnoreTheRule => "balanced-reads-ignore-the-rule",
            Mutation::BitmapRunOneShort => "bitmap-run-one-short",
        }
    }

    pub fn parse(name: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// What a node does when its local store fails (DRBD's `on-io-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnIoError {
    /// The failed store is detached: the node goes Diskless and says so. A Primary
    /// with an UpToDate peer goes on serving reads and writes through it (a diskless
    /// Primary); a read that fails with EIO is served from the peer and the block
    /// rewritten.
    #[default]
    Detach,
    /// The error goes to the client (EIO) and the store stays attached, Failed.
    PassOn,
}

impl OnIoError {
    pub fn name(self) -> &'static str {
        match self {
            OnIoError::Detach => "detach",
            OnIoError::PassOn => "pass-on",
        }
    }

    pub fn parse(name: &str) -> Option<OnIoError> {
        [OnIoError::Detach, OnIoError::PassOn]
            .into_iter()
            .find(|policy| policy.name() == name)
    }
}

/// What a node knows about itself and its resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub resource: String,
    pub uuid: [u8; 16],
    pub node_name: String,
    pub node_id: u32,
    pub mode: Mode,
    /// The other data nodes of the resource (empty for a one-node resource).
    pub peers: Vec<PeerConfig>,
    pub timing: Timing,
    pub resync: ResyncConfig,
    pub on_io_error: OnIoError,
    /// Which replica serves this node's client reads while it is Primary.
    pub read_balancing: ReadBalancing,
    /// A bug re-introduced by the simulator; always `None` in the daemon.
    #[doc(hidden)]
    pub mutation: Option<Mutation>,
}

impl NodeConfig {
    pub(crate) fn mutated(&self, mutation: Mutation) -> bool {
        self.mutation == Some(mutation)
    }

    /// Whether this node dials `peer` (the lower node id dials; the other accepts).
    pub fn dials(&self, peer: &PeerConfig) -> bool {
        self.node_id < peer.node_id
    }
}

/// What a request failed with, at the boundary to a client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    /// The node is not a writable Primary (EPERM).
    #[error("this node is not a writable Primary")]
    NotWritable,
    /// The local store failed the request (EIO or the engine's errno).
    #[error("{0}")]
    Io(IoError),
    /// A corrupt block could not be repaired from a peer (EIO).
    #[error("block {block} is corrupt and cannot be repaired: {why}")]
    Unrepairable { block: u64, why: String },
}

impl RequestError {
    /// The errno an NBD client sees.
    pub fn errno(&self) -> i32 {
        match self {
            RequestError::NotWritable => libc::EPERM,
            RequestError::Io(error) => error.errno(),
            RequestError::Unrepairable { .. } => libc::EIO,
        }
    }
}

/// Kinds of refusal and failure of the operator's commands, for `replctl` (which
/// prints the message), hooks and tests (which match the kind) and `status --json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Promote(#[from] crate::repl::PromoteRefusal),
    #[error("{0}")]
    Refused(String),
    #[error("no disk attached")]
    NoDisk,
    #[error("another operation is in progress on this resource: {0}")]
    Busy(&'static str),
    #[error("the peer {0} is not connected")]
    NotConnected(String),
    #[error("storage failed: {0}")]
    Storage(String),
    #[error("the connection to {0} ended during the operation")]
    ConnectionLost(String),
    #[error("{0}")]
    Timeout(String),
}

impl AdminError {
    /// A stable, machine-readable name of the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            AdminError::Promote(_) => "promote-refused",
            AdminError::Refused(_) => "refused",
            AdminError::NoDisk => "no-disk",
            AdminError::Busy(_) => "busy",
            AdminError::NotConnected(_) => "not-connected",
            AdminError::Storage(_) => "storage",
            AdminError::ConnectionLost(_) => "connection-lost",
            AdminError::Timeout(_) => "timeout",
        }
    }
}

/// What a completed operator command answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminOutput {
    Message(String),
    /// A verify: the blocks found different (marked out of sync).
    Verify {
        blocks: Vec<u64>,
    },
}

/// Why a session ended, as status shows it and tests match it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The transport reported the connection closed or broken.
    ConnectionLost(String),
    /// The peer sent nothing for `timeout`.
    Silent(Duration),
    /// The peer sent a frame that is invalid here (or invalid at all).
    Protocol(String),
    /// The handshake refused the peer (split brain, unrelated data, sizes, …).
    Refused(String),
    /// The peer refused us (REJECT).
    RefusedByPeer(String),
    /// The peer failed authentication, or refused ours (a missing or different
    /// secret, or a connection that is not from the peer it claims to be).
    Unauthenticated(String),
    /// The operator disconnected, invalidated, detached, or a new connection replaced
    /// this one.
    Local(String),
    /// A storage operation failed.
    Storage(String),
    /// The peer left a write not durable, a FLUSH unanswered, or resync data
    /// unacknowledged, for this long (longer than `ko_timeout`).
    TooSlow(Duration),
}

impl SessionEnd {
    pub fn kind(&self) -> &'static str {
        match self {
            SessionEnd::ConnectionLost(_) => "connection-lost",
            SessionEnd::Silent(_) => "timeout",
            SessionEnd::Protocol(_) => "protocol",
            SessionEnd::Refused(_) => "refused",
            SessionEnd::RefusedByPeer(_) => "refused-by-peer",
            SessionEnd::Unauthenticated(_) => "auth-failed",
            SessionEnd::Local(_) => "local",
            SessionEnd::Storage(_) => "storage",
            SessionEnd::TooSlow(_) => "peer-too-slow",
        }
    }
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::ConnectionLost(why) => f.write_str(why),
            SessionEnd::Silent(silent) => write!(f, "peer silent for {} ms", silent.as_millis()),
            SessionEnd::TooSlow(age) => write!(
                f,
                "peer left a write, FLUSH or resync data incomplete for {} ms (ko-timeout): dropped, its blocks marked out of sync",
                age.as_millis()
            ),
            SessionEnd::Protocol(why) => write!(f, "bad frame from peer: {why}"),
            SessionEnd::Refused(why) => f.write_str(why),
            SessionEnd::RefusedByPeer(why) => write!(f, "peer refused: {why}"),
            SessionEnd::Unauthenticated(why) => f.write_str(why),
            SessionEnd::Local(why) => f.write_str(why),
            SessionEnd::Storage(why) => write!(f, "storage: {why}"),
        }
    }
}

/// Hooks the operator may attach shell commands to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    RoleChange,
    SplitBrain,
    SyncDone,
}

impl HookKind {
    pub fn name(self) -> &'static str {
        match self {
            HookKind::RoleChange => "role-change",
            HookKind::SplitBrain => "split-brain",
            HookKind::SyncDone => "sync-done",
        }
    }
}

/// What the driver must do.
#[derive(Debug)]
pub enum Action {
    /// Queue `frame` on the session's connection its type belongs to
    /// ([`Frame::channel`]); drop it if that session is gone.
    Send {
        peer: PeerId,
        session: SessionId,
        frame: Frame,
    },
    /// Open a session to `peer` (connect both channels, exchange HELLO), then call
    /// [`Node::on_connected`] or [`Node::on_dial_failed`].
    Dial { peer: PeerId },
    /// Close the session's connections. With `linger`, first let the frames queued so
    /// far (a REJECT) reach the peer, bounded by a short wait.
    Close {
        peer: PeerId,
        session: SessionId,
        linger: bool,
    },
    /// A client request is done.
    Complete {
        id: RequestId,
        result: Result<(), RequestError>,
    },
    /// A read served by a peer ([`Node::read_from_peer`], or one that
    /// [`Node::balance_read`] sent there) is done: whole blocks, from the first block
    /// of the range asked for. A balanced read that failed, or was not answered within
    /// [`Timing::read_fallback`], completes with an error: the driver reads locally.
    ReadDone {
        id: RequestId,
        result: Result<bytes::Bytes, RequestError>,
    },
    /// An operator command is done.
    AdminDone {
        id: AdminId,
        result: Result<AdminOutput, AdminError>,
    },
    /// A state change, one line for `replctl events` and the log.
    Event(String),
    /// Run the operator's hook of this kind with these extra variables.
    Hook {
        kind: HookKind,
        env: Vec<(&'static str, String)>,
    },
}
