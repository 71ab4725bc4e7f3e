//! The simulated world: nodes, network, clock, client, faults, operator and checker.
//!
//! # What the checker demands
//!
//! Write ids grow in issue order across the whole run, and every block a client writes
//! names its write ([`super::content`]), so "holds write `w` or a later one" is a
//! number comparison. Per node and block the checker keeps a *floor*: the oldest write
//! the node must hold there (or a later one). Floors rise only on evidence the protocol
//! gives, so they never demand what no promise covers:
//!
//! * **acknowledgement**: when Primary `P` completes write `w` and, at that moment, its
//!   session with peer `B` ships records and `B` has acknowledged `w`'s last record as
//!   journaled (ACK_WRITTEN), `w` is on `B`; `P` holds its own writes;
//! * **FLUSH**: when `P` completes a FLUSH issued while its session with `B` was
//!   established, shipping and `B` UpToDate, and that session still stands, every
//!   write `P` acknowledged before the FLUSH was issued is durable on `B` (and on `P`).
//!
//! Acknowledged-but-unflushed writes are, like on any disk with a write cache, only as
//! durable as the next flush: after a power cut of any node, floors fall back to what
//! FLUSHes made durable. A process crash (kill -9) keeps the page cache, and floors.
//! A node told to discard its data (split-brain resolution) loses its floors.
//!
//! * **P1** — a node that becomes Primary, unless by `--force` of a disk that is not
//!   UpToDate, holds its floor on every block.
//! * **P2** — such a node holds a prefix of the records its last primary sent it in its
//!   last session (if it was not a sync target meanwhile): holding one of them means
//!   holding every one sent before it.
//! * **P3** — every read that succeeds returns zeroes or a block of a write to it.
//! * **read balancing** — with `--read-balancing POLICY`, a Primary balances the
//!   client's reads; a read a peer serves returns the write the Primary's own store held there when the read was
//!   issued, or a later one (never older data than an acknowledged write).
//! * **P4** — a promotion without `--force` never succeeds while another node is
//!   Primary; no two nodes complete writes in the same generation.
//! * **no silent divergence** — two nodes connected to each other, both UpToDate,
//!   nothing out of sync, nothing in flight, read the same bytes.
//! * **invariants** — the state machine's own assertions after every call.
//! * **liveness** — after the faults stop, one Primary, all connected and identical
//!   within [`LIVENESS_LIMIT`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use engine::backend::sim::SimBackend;
use engine::backend::Backend;
use engine::layout::MIN_JOURNAL_BYTES;
use engine::node::peer::{Repl, TargetPhase};
use engine::node::storage::{Completion, CompletionQueue, Storage, VolumeStorage};
use engine::node::{
    Action, AdminId, AdminOutput, AttachFacts, Mutation, Node, NodeConfig, PeerConfig, PeerId,
    ReadBalancing, ReadRoute, RequestId, SessionId, Time, Timing, Token,
};
use engine::repl::{DiskState, Mode, Role};
use engine::rng::SplitMix64;
use engine::volume::{Background, CreateOptions, MetaStore};
use engine::wire::{Channel, Frame};
use engine::{Volume, VolumeOptions, WriteKind, WriteRequest, BLOCK_BYTES};

use super::content::{self, Content};

/// Bytes of each node's simulated store.
const STORE_BYTES: u64 = 2 << 20;
/// The client writes blocks `0..WRITE_BLOCKS` (the checker reads them all).
const WRITE_BLOCKS: u64 = 192;
/// Writes and flushes the client keeps in flight.
const CLIENT_DEPTH: usize = 6;
/// After the faults, the cluster must converge within this much virtual time.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(120);
/// Request ids of flushes and repairs (writes use their write id).
const FLUSH_IDS: u64 = 1 << 62;
/// Request ids of client reads balanced to a peer.
const READ_IDS: u64 = 1 << 61;
const RESOURCE: &str = "r0";
const UUID: [u8; 16] = *b"replsim-resource";

/// Which fault classes a run draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    pub crash: bool,
    pub power: bool,
    pub partition: bool,
    pub reset: bool,
    pub slow: bool,
    pub operator: bool,
}

impl Faults {
    pub const ALL: Faults = Faults {
        crash: true,
        power: true,
        partition: true,
        reset: true,
        slow: true,
        operator: true,
    };

    /// Parses a comma-separated list (`crash,power,partition,reset,slow,operator`,
    /// `all` or `none`).
    pub fn parse(text: &str) -> Result<Faults, String> {
        let mut faults = Faults {
            crash: false,
            power: false,
            partition: false,
            reset: false,
            slow: false,
            operator: false,
        };
        for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "all" => faults = Faults::ALL,
                "none" => {}
                "crash" => faults.crash = true,
                "power" => faults.power = true,
                "partition" => faults.partition = true,
                "reset" => faults.reset = true,
                "slow" => faults.slow = true,
                "operator" => faults.operator = true,
                other => return Err(format!("unknown fault class {other:?}")),
            }
        }
        Ok(faults)
    }
}

/// How to run one seed.
#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: usize,
    pub mode: Mode,
    /// Events of the fault phase.
    pub steps: u64,
    pub faults: Faults,
    pub mutation: Option<Mutation>,
    /// The Primaries' read balancing; with a policy other than prefer-local, the
    /// client's reads of a Primary are balanced and a peer's answers checked.
    pub read_balancing: ReadBalancing,
    /// Keep every trace line (for `--seed S --trace`), not only the last ones.
    pub full_trace: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            nodes: 2,
            mode: Mode::Sync,
            steps: 20000,
            faults: Faults::ALL,
            mutation: None,
            read_balancing: ReadBalancing::PreferLocal,
            full_trace: false,
        }
    }
}

/// A broken promise.
#[derive(Debug, Clone)]
pub struct Violation {
    pub property: &'static str,
    pub detail: String,
    pub at: Time,
}

/// The result of one seed.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub violation: Option<Violation>,
    /// A hash of every trace line: the same seed gives the same digest.
    pub digest: u64,
    pub events: u64,
    pub end: Time,
    /// The last trace lines (all of them with `full_trace`).
    pub trace: Vec<String>,
    pub writes_acked: u64,
    pub promotions: u64,
}

// ----- events -----

#[derive(Debug)]
enum Event {
    Deliver {
        conn: usize,
        from_end: usize,
        channel: usize,
        frame: Frame,
    },
    /// Held frames of a healed link go out.
    FlushHeld {
        conn: usize,
        from_end: usize,
        channel: usize,
    },
    ConnectDone {
        dialer: usize,
        dialer_inc: u64,
        target: usize,
        target_inc: u64,
    },
    DialFailed {
        node: usize,
        inc: u64,
        peer: PeerId,
        why: &'static str,
    },
    Closed {
        node: usize,
        inc: u64,
        peer: PeerId,
        session: SessionId,
        why: &'static str,
    },
    Storage {
        node: usize,
        inc: u64,
        token: Token,
        completion: Completion,
    },
    Tick {
        node: usize,
        inc: u64,
    },
    Pump {
        node: usize,
        inc: u64,
    },
    Commit {
        node: usize,
        inc: u64,
    },
    Client,
    Fault,
    Restart {
        node: usize,
    },
    Heal {
        from: usize,
        to: usize,
    },
    Reconnect {
        node: usize,
    },
}

struct Scheduled {
    at: Time,
    order: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

// ----- nodes and network -----

struct Up {
    node: Node<VolumeStorage>,
    volume: Volume,
    queue: CompletionQueue,
}

struct SimNode {
    name: String,
    backend: Arc<SimBackend>,
    up: Option<Up>,
    /// Bumped at every start: events of an older incarnation are dropped.
    inc: u64,
    next_tick: Option<Time>,
    /// Storage completions scheduled and not yet delivered.
    storage_pending: usize,
    /// A slow disk until then.
    slow_until: Time,
    /// The disk hangs: no storage operation completes before this.
    hung_until: Time,
    /// Detached by the operator (the store is closed cleanly, not lost).
    detached: bool,
    /// A restart is scheduled.
    restarting: bool,
}

struct End {
    node: usize,
    inc: u64,
    peer: PeerId,
    session: SessionId,
}

struct Conn {
    ends: [End; 2],
    open: [bool; 2],
    /// Last delivery time per direction (from end) and channel: frames of one TCP
    /// connection never overtake each other.
    last: [[Time; 2]; 2],
    /// Frames stopped by a partition, per direction and channel, in order.
    held: [[VecDeque<Frame>; 2]; 2],
    /// Frames scheduled and not yet delivered, heartbeats (PING, PONG, DURABLE) not
    /// counted: they never change data.
    in_flight: usize,
}

/// Frames that only say "alive" or "durable up to": not work in flight.
fn heartbeat(frame: &Frame) -> bool {
    matches!(frame, Frame::Ping(_) | Frame::Pong(_) | Frame::Durable(_))
}

/// What the checker knows of a write.
struct WriteInfo {
    issued: Time,
    first_block: u64,
    blocks: u64,
    acked: bool,
    /// The last record sequence number per node that shipped it.
    last_seq: Option<u64>,
}

/// A flush in flight, with the sessions it may make durable.
struct FlushInfo {
    node: usize,
    /// Write acknowledgements of `node` before the flush was issued.
    acked_before: usize,
    /// Per peer: the session that was established, shipping and UpToDate at issue.
    sessions: Vec<Option<SessionId>>,
}

/// Records a node received in its last session from a primary (P2).
#[derive(Default, Clone)]
struct Feed {
    primary: usize,
    /// The simulated connection (unique for the run; session ids restart with a
    /// node's incarnation).
    conn: usize,
    /// Write ids in the order their records were shipped.
    writes: Vec<u64>,
    /// The node was a sync target in this feed's time: no prefix promised.
    target: bool,
}

/// An operator command in flight.
enum Pending {
    Promote { node: usize, force: bool },
    Demote,
    Other,
}

/// An operator command in flight and the node it went to.
struct PendingCommand {
    node: usize,
    what: Pending,
}

struct World {
    options: Options,
    rng: SplitMix64,
    now: Time,
    order: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    nodes: Vec<SimNode>,
    conns: Vec<Conn>,
    /// blocked[from][to][channel]
    blocked: Vec<Vec<[bool; 2]>>,
    // checker
    writes: Vec<WriteInfo>,
    acked: Vec<Vec<u64>>,
    flushes: BTreeMap<u64, FlushInfo>,
    next_flush: u64,
    floor_volatile: Vec<Vec<u64>>,
    /// When each node last lost power (what it acknowledged as journaled before then
    /// may be gone, even if the acknowledgement arrives later).
    power_cut_at: Vec<Option<Time>>,
    floor_durable: Vec<Vec<u64>>,
    watch_last: String,
    flush_cursor: Vec<Vec<usize>>,
    generation_writer: BTreeMap<u64, usize>,
    feeds: Vec<Option<Feed>>,
    /// Client requests without an answer yet, by request id: the node they went to.
    outstanding: BTreeMap<u64, usize>,
    /// Client reads a Primary sent to a peer, by request id: the block, and the write
    /// the Primary's own store held there when the read was issued (the answer must
    /// be that write or a later one).
    balanced_reads: BTreeMap<u64, (u64, u64)>,
    next_read: u64,
    admin: BTreeMap<u64, PendingCommand>,
    next_admin: u64,
    promoting: bool,
    violation: Option<Violation>,
    trace: VecDeque<String>,
    digest: u64,
    events: u64,
    faults_on: bool,
    last_divergence_check: Time,
    writes_acked: u64,
    promotions: u64,
}

fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

fn us(value: u64) -> Duration {
    Duration::from_micros(value)
}

/// The node of peer `peer` of node `node` (peers are the other nodes in id order).
fn peer_node(node: usize, peer: PeerId) -> usize {
    if peer.0 < node {
        peer.0
    } else {
        peer.0 + 1
    }
}

/// The peer id under which `node` knows node `other`.
fn peer_id(node: usize, other: usize) -> PeerId {
    PeerId(if other < node { other } else { other - 1 })
}

fn fresh_image(rng: &mut SplitMix64, node: usize, name: &str) -> Vec<u8> {
    let _ = rng;
    let sim: Arc<dyn Backend> = Arc::new(SimBackend::new(STORE_BYTES));
    let create = CreateOptions {
        resource_uuid: UUID,
        node_id: node as u32,
        node_name: name.to_string(),
        journal_bytes: MIN_JOURNAL_BYTES,
        force: false,
        assume_zeroed: true,
    };
    if let Err(error) = Volume::create(&sim, &MetaStore::Internal, &create, &mut |_, _| {}) {
        panic!("create-md on a fresh simulated store failed: {error}");
    }
    let mut image = vec![0u8; STORE_BYTES as usize];
    if let Err(error) = sim.read_at(0, &mut image) {
        panic!("reading a simulated store failed: {error}");
    }
    image
}

/// Runs one seed.
pub fn run_seed(seed: u64, options: &Options) -> Outcome {
    let mut world = World::new(seed, options.clone());
    world.run();
    Outcome {
        seed,
        violation: world.violation.clone(),
        digest: world.digest,
        events: world.events,
        end: world.now,
        trace: world.trace.iter().cloned().collect(),
        writes_acked: world.writes_acked,
        promotions: world.promotions,
    }
}

impl World {
    fn new(seed: u64, options: Options) -> World {
        let mut rng = SplitMix64::new(seed);
        let count = options.nodes.clamp(2, 5);
        let nodes = (0..count)
            .map(|index| {
                let name = format!("n{index}");
                let image = fresh_image(&mut rng, index, &name);
                SimNode {
                    name,
                    backend: Arc::new(SimBackend::from_image(image)),
                    up: None,
                    inc: 0,
                    next_tick: None,
                    storage_pending: 0,
                    slow_until: Time::ZERO,
                    hung_until: Time::ZERO,
                    detached: false,
                    restarting: false,
                }
            })
            .collect();
        World {
            options,
            rng,
            now: Time::ZERO,
            order: 0,
            queue: BinaryHeap::new(),
            nodes,
            conns: Vec::new(),
            blocked: vec![vec![[false; 2]; count]; count],
            writes: Vec::new(),
            acked: vec![Vec::new(); count],
            flushes: BTreeMap::new(),
            next_flush: 0,
            floor_volatile: vec![vec![0; WRITE_BLOCKS as usize]; count],
            power_cut_at: vec![None; count],
            floor_durable: vec![vec![0; WRITE_BLOCKS as usize]; count],
            watch_last: String::new(),
            flush_cursor: vec![vec![0; count]; count],
            generation_writer: BTreeMap::new(),
            feeds: vec![None; count],
            outstanding: BTreeMap::new(),
            balanced_reads: BTreeMap::new(),
            next_read: 0,
            admin: BTreeMap::new(),
            next_admin: 1,
            promoting: false,
            violation: None,
            trace: VecDeque::new(),
            digest: 0xcbf2_9ce4_8422_2325,
            events: 0,
            faults_on: true,
            last_divergence_check: Time::ZERO,
            writes_acked: 0,
            promotions: 0,
        }
    }

    // ----- scheduling and tracing -----

    fn at(&mut self, at: Time, event: Event) {
        self.order += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            order: self.order,
            event,
        }));
    }

    fn after(&mut self, delay: Duration, event: Event) {
        let at = self.now + delay;
        self.at(at, event);
    }

    fn log(&mut self, text: String) {
        let line = format!("{} {text}", self.now);
        for byte in line.bytes() {
            self.digest = (self.digest ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
        }
        self.trace.push_back(line);
        if !self.options.full_trace && self.trace.len() > 80 {
            self.trace.pop_front();
        }
    }

    fn violate(&mut self, property: &'static str, detail: String) {
        if self.violation.is_none() {
            self.log(format!("VIOLATION {property}: {detail}"));
            self.violation = Some(Violation {
                property,
                detail,
                at: self.now,
            });
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    // ----- node lifecycle -----

    fn node_config(&self, index: usize) -> NodeConfig {
        let peers = (0..self.nodes.len())
            .filter(|&other| other != index)
            .map(|other| PeerConfig {
                name: self.nodes[other].name.clone(),
                node_id: other as u32,
            })
            .collect();
        NodeConfig {
            resource: RESOURCE.into(),
            uuid: UUID,
            node_name: self.nodes[index].name.clone(),
            node_id: index as u32,
            mode: self.options.mode,
            peers,
            timing: Timing {
                // Short enough that a hung disk (a fault below) trips it in a run.
                ko_timeout: Duration::from_secs(3),
                ..Timing::default()
            },
            resync: engine::node::ResyncConfig::default(),
            on_io_error: engine::node::OnIoError::Detach,
            read_balancing: self.options.read_balancing,
            mutation: self.options.mutation,
        }
    }

    /// Opens the store (recovery) and starts a fresh state machine on it.
    fn start(&mut self, index: usize) {
        let options = VolumeOptions {
            mark_replayed_out_of_sync: true,
            background: Background::Manual,
            ..VolumeOptions::default()
        };
        let backend: Arc<dyn Backend> = self.nodes[index].backend.clone();
        let (volume, report) = match Volume::open(backend, MetaStore::Internal, Some(UUID), options)
        {
            Ok(opened) => opened,
            Err(error) => {
                self.violate(
                    "recovery",
                    format!("{} cannot open its store: {error}", self.nodes[index].name),
                );
                return;
            }
        };
        let queue = CompletionQueue::new(Arc::new(|| {}));
        let storage = VolumeStorage::new(volume.clone(), queue.clone(), true);
        let seed = self.rng.next_u64();
        let config = self.node_config(index);
        let mut node = Node::new(config, self.now, seed);
        node.attach(
            self.now,
            storage,
            AttachFacts {
                crashed_primary: report.was_primary && !report.was_clean,
            },
        );
        let state = &mut self.nodes[index];
        state.inc += 1;
        // Completions of an earlier incarnation (a detached store) never arrive.
        state.storage_pending = 0;
        state.up = Some(Up {
            node,
            volume,
            queue,
        });
        state.next_tick = None;
        state.detached = false;
        state.restarting = false;
        let inc = state.inc;
        let name = state.name.clone();
        self.log(format!(
            "{name} up (clean:{} replayed:{})",
            report.was_clean, report.records_replayed
        ));
        self.after(us(100), Event::Tick { node: index, inc });
        self.after(ms(1), Event::Pump { node: index, inc });
        self.settle(index);
    }

    /// The node goes down: `power` loses what was not flushed, else (kill -9) the
    /// page cache survives.
    fn stop(&mut self, index: usize, power: bool) {
        let Some(up) = self.nodes[index].up.take() else {
            return;
        };
        drop(up);
        self.forget_requests(index);
        let backend = &self.nodes[index].backend;
        let image = if power {
            backend.power_cut(self.rng.next_u64())
        } else {
            backend.live_image()
        };
        self.nodes[index].backend = Arc::new(SimBackend::from_image(image));
        self.nodes[index].storage_pending = 0;
        if power {
            self.power_cut_at[index] = Some(self.now);
            // Unflushed acknowledged writes may be gone wherever a resync takes them
            // from this node: only FLUSHed ones stay demanded. And a later FLUSH of
            // this node does not bring back what it acknowledged before the cut.
            self.floor_volatile = self.floor_durable.clone();
            let acked = self.acked[index].len();
            self.flush_cursor[index]
                .iter_mut()
                .for_each(|c| *c = (*c).max(acked));
            for flush in self.flushes.values_mut() {
                if flush.node == index {
                    flush.acked_before = 0;
                }
            }
        }
        let name = self.nodes[index].name.clone();
        self.log(format!(
            "{name} {}",
            if power { "POWER CUT" } else { "KILLED" }
        ));
        // Its connections die: after a process crash the kernel closes them (the peers
        // see it), after a power cut nobody tells the peers (they time out).
        for conn in 0..self.conns.len() {
            for end in 0..2 {
                let c = &self.conns[conn];
                if c.ends[end].node == index && c.open[end] {
                    self.conns[conn].open[end] = false;
                    let other = 1 - end;
                    if !power && self.conns[conn].open[other] {
                        self.close_end_later(conn, other, us(200), "peer process died");
                    }
                }
            }
        }
    }

    /// The node went away: its clients' requests never get an answer, and neither do
    /// the operator's commands.
    fn forget_requests(&mut self, index: usize) {
        self.outstanding.retain(|_, node| *node != index);
        let promoting = self.admin.values().any(|command| {
            command.node == index && matches!(command.what, Pending::Promote { .. })
        });
        if promoting {
            self.promoting = false;
        }
        self.admin.retain(|_, command| command.node != index);
    }

    fn close_end_later(&mut self, conn: usize, end: usize, delay: Duration, why: &'static str) {
        let e = &self.conns[conn].ends[end];
        let event = Event::Closed {
            node: e.node,
            inc: e.inc,
            peer: e.peer,
            session: e.session,
            why,
        };
        self.after(delay, event);
    }

    // ----- driving a node -----

    /// Delivers what a call produced: storage completions (after a disk delay),
    /// actions, and the node's next timer. Checks invariants.
    fn settle(&mut self, index: usize) {
        loop {
            let Some(up) = self.nodes[index].up.as_mut() else {
                return;
            };
            let completions = up.queue.drain();
            let mut actions = Vec::new();
            while let Some(action) = up.node.poll_action() {
                actions.push(action);
            }
            if completions.is_empty() && actions.is_empty() {
                break;
            }
            let inc = self.nodes[index].inc;
            for (token, completion) in completions {
                let slow = self.nodes[index].slow_until > self.now;
                let hung_until = self.nodes[index].hung_until;
                let delay = if hung_until > self.now {
                    hung_until.since(self.now) + us(20 + self.rng.below(400))
                } else if slow {
                    ms(5 + self.rng.below(60))
                } else {
                    us(20 + self.rng.below(400))
                };
                self.nodes[index].storage_pending += 1;
                self.after(
                    delay,
                    Event::Storage {
                        node: index,
                        inc,
                        token,
                        completion,
                    },
                );
            }
            for action in actions {
                self.act(index, action);
            }
        }
        let Some(up) = self.nodes[index].up.as_ref() else {
            return;
        };
        let checked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| up.node.invariants()));
        let next_timeout = up.node.next_timeout();
        if let Err(panic) = checked {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            self.violate("invariant", format!("{}: {text}", self.nodes[index].name));
        }
        self.observe(index);
        if let Some(next) = next_timeout {
            let next = next.max(self.now);
            if self.nodes[index]
                .next_tick
                .is_none_or(|scheduled| next < scheduled)
            {
                self.nodes[index].next_tick = Some(next);
                let inc = self.nodes[index].inc;
                self.at(next, Event::Tick { node: index, inc });
            }
        }
    }

    /// Runs `call` on node `index` (if up), then settles.
    fn call(&mut self, index: usize, call: impl FnOnce(&mut Node<VolumeStorage>, Time)) {
        let now = self.now;
        let Some(up) = self.nodes[index].up.as_mut() else {
            return;
        };
        call(&mut up.node, now);
        self.settle(index);
    }

    fn act(&mut self, index: usize, action: Action) {
        match action {
            Action::Send {
                peer,
                session,
                frame,
            } => self.send(index, peer, session, frame),
            Action::Dial { peer } => self.dial(index, peer),
            Action::Close {
                peer,
                session,
                linger,
            } => self.close(index, peer, session, linger),
            Action::Complete { id, result } => self.completed(index, id, result.is_ok()),
            Action::AdminDone { id, result } => self.admin_done(index, id, result),
            Action::Event(text) => {
                let name = self.nodes[index].name.clone();
                self.log(format!("{name} event {text}"));
            }
            // Only balanced reads go through a peer here (no disk fails with EIO; the
            // diskless paths are tested in the engine and end to end).
            Action::ReadDone { id, result } => self.balanced_read_done(index, id.0, result.ok()),
            Action::Hook { .. } => {}
        }
    }

    // ----- network -----

    fn find_conn(&self, node: usize, peer: PeerId, session: SessionId) -> Option<(usize, usize)> {
        let inc = self.nodes[node].inc;
        self.conns.iter().enumerate().find_map(|(index, conn)| {
            (0..2).find_map(|end| {
                let e = &conn.ends[end];
                (e.node == node
                    && e.inc == inc
                    && e.peer == peer
                    && e.session == session
                    && conn.open[end])
                    .then_some((index, end))
            })
        })
    }

    fn link_delay(&mut self, from: usize, to: usize) -> Duration {
        let slow = self.nodes[from].slow_until > self.now || self.nodes[to].slow_until > self.now;
        if slow {
            ms(2 + self.rng.below(40))
        } else {
            us(50 + self.rng.below(500))
        }
    }

    fn send(&mut self, node: usize, peer: PeerId, session: SessionId, frame: Frame) {
        let Some((conn, end)) = self.find_conn(node, peer, session) else {
            return;
        };
        let channel = usize::from(frame.channel() == Channel::Meta);
        if let Frame::Record(record) = &frame {
            self.note_record(node, conn, end, &record.0);
        }
        // Always through the wire in order: a partition stops frames where they
        // arrive ([`World::deliver`]), behind those already on their way.
        let to = self.conns[conn].ends[1 - end].node;
        let delay = self.link_delay(node, to);
        let at = (self.now + delay).max(self.conns[conn].last[end][channel]);
        self.conns[conn].last[end][channel] = at;
        if !heartbeat(&frame) {
            self.conns[conn].in_flight += 1;
        }
        self.at(
            at,
            Event::Deliver {
                conn,
                from_end: end,
                channel,
                frame,
            },
        );
    }

    fn deliver(&mut self, conn: usize, from_end: usize, channel: usize, frame: Frame) {
        let to_end = 1 - from_end;
        let (to, inc, peer, session) = {
            let e = &self.conns[conn].ends[to_end];
            (e.node, e.inc, e.peer, e.session)
        };
        let from = self.conns[conn].ends[from_end].node;
        if !self.conns[conn].open[to_end]
            || self.nodes[to].inc != inc
            || self.nodes[to].up.is_none()
        {
            return;
        }
        if self.blocked[from][to][channel] || !self.conns[conn].held[from_end][channel].is_empty() {
            // A partition: TCP keeps the bytes and delivers them in order after it heals.
            self.conns[conn].held[from_end][channel].push_back(frame);
            return;
        }
        if let Frame::ResyncData(data) = &frame {
            // The target takes the source's blocks: what the source must hold there is
            // what the target must hold, no more (a write the source legitimately lost,
            // say to a forced promotion, is lost for the target too).
            let end = (data.first_block + u64::from(data.blocks)).min(WRITE_BLOCKS);
            for block in data.first_block.min(end)..end {
                let block = block as usize;
                self.floor_volatile[to][block] = self.floor_volatile[from][block];
                self.floor_durable[to][block] = self.floor_durable[from][block];
            }
            // Nor does a later FLUSH of the target bring back what it acknowledged
            // before (as a Primary) and the resync replaced.
            let acked = self.acked[to].len();
            self.flush_cursor[to]
                .iter_mut()
                .for_each(|cursor| *cursor = (*cursor).max(acked));
        }
        let (from_name, to_name) = (self.nodes[from].name.clone(), self.nodes[to].name.clone());
        self.log(format!("{to_name} <- {from_name} {}", frame_text(&frame)));
        self.call(to, |node, now| node.handle_frame(now, peer, session, frame));
    }

    fn flush_held(&mut self, conn: usize, from_end: usize, channel: usize) {
        let from = self.conns[conn].ends[from_end].node;
        let to = self.conns[conn].ends[1 - from_end].node;
        if self.blocked[from][to][channel] {
            return;
        }
        let frames: Vec<Frame> = self.conns[conn].held[from_end][channel].drain(..).collect();
        for frame in frames {
            self.deliver(conn, from_end, channel, frame);
        }
    }

    fn dial(&mut self, node: usize, peer: PeerId) {
        let target = peer_node(node, peer);
        let inc = self.nodes[node].inc;
        let reachable = !self.blocked[node][target][0] && !self.blocked[target][node][0];
        let up = self.nodes[target].up.is_some();
        if up && reachable {
            let target_inc = self.nodes[target].inc;
            let delay = self.link_delay(node, target) * 3;
            self.after(
                delay,
                Event::ConnectDone {
                    dialer: node,
                    dialer_inc: inc,
                    target,
                    target_inc,
                },
            );
        } else if !up {
            self.after(
                ms(1),
                Event::DialFailed {
                    node,
                    inc,
                    peer,
                    why: "connection refused",
                },
            );
        } else {
            self.after(
                ms(2000),
                Event::DialFailed {
                    node,
                    inc,
                    peer,
                    why: "connecting timed out",
                },
            );
        }
    }

    fn connect_done(&mut self, dialer: usize, dialer_inc: u64, target: usize, target_inc: u64) {
        if self.nodes[dialer].inc != dialer_inc || self.nodes[dialer].up.is_none() {
            return;
        }
        let to_target = peer_id(dialer, target);
        let to_dialer = peer_id(target, dialer);
        let target_ok = self.nodes[target].inc == target_inc
            && self.nodes[target].up.is_some()
            && !self.blocked[dialer][target][0]
            && !self.blocked[target][dialer][0]
            && self.nodes[target]
                .up
                .as_ref()
                .is_some_and(|up| up.node.accepts(to_dialer));
        if !target_ok {
            self.call(dialer, |node, now| {
                node.on_dial_failed(now, to_target, "peer refused or gone".into())
            });
            return;
        }
        let now = self.now;
        let accepted = self.nodes[target]
            .up
            .as_mut()
            .and_then(|up| up.node.on_connected(now, to_dialer));
        let Some(target_session) = accepted else {
            self.settle(target);
            self.call(dialer, |node, now| {
                node.on_dial_failed(now, to_target, "peer refused".into())
            });
            return;
        };
        let dialed = self.nodes[dialer]
            .up
            .as_mut()
            .and_then(|up| up.node.on_connected(now, to_target));
        let conn = self.conns.len();
        let dialer_session = dialed.unwrap_or(SessionId(0));
        self.conns.push(Conn {
            ends: [
                End {
                    node: dialer,
                    inc: dialer_inc,
                    peer: to_target,
                    session: dialer_session,
                },
                End {
                    node: target,
                    inc: target_inc,
                    peer: to_dialer,
                    session: target_session,
                },
            ],
            open: [dialed.is_some(), true],
            last: [[Time::ZERO; 2]; 2],
            held: Default::default(),
            in_flight: 0,
        });
        if dialed.is_none() {
            self.close_end_later(conn, 1, us(300), "the dialer dropped the connection");
        }
        let (a, b) = (
            self.nodes[dialer].name.clone(),
            self.nodes[target].name.clone(),
        );
        self.log(format!("{a} connected to {b} (conn {conn})"));
        self.settle(target);
        self.settle(dialer);
    }

    fn close(&mut self, node: usize, peer: PeerId, session: SessionId, linger: bool) {
        let Some((conn, end)) = self.find_conn(node, peer, session) else {
            return;
        };
        self.conns[conn].open[end] = false;
        let other = 1 - end;
        if self.conns[conn].open[other] {
            let delay = if linger {
                let last = self.conns[conn].last[end][0].max(self.conns[conn].last[end][1]);
                last.since(self.now) + us(300)
            } else {
                us(100 + self.rng.below(300))
            };
            self.close_end_later(conn, other, delay, "the peer closed the connection");
        }
    }

    // ----- the checker's bookkeeping -----

    fn note_record(
        &mut self,
        node: usize,
        conn: usize,
        end: usize,
        record: &engine::record::Record,
    ) {
        if record.data.len() < BLOCK_BYTES as usize {
            return;
        }
        let first = record.header.offset_bytes / BLOCK_BYTES;
        let Content::Write(id) = content::decode(first, &record.data[..BLOCK_BYTES as usize])
        else {
            return;
        };
        if let Some(write) = self.writes.get_mut(id as usize - 1) {
            let seq = record.header.seq;
            write.last_seq = Some(write.last_seq.map_or(seq, |s| s.max(seq)));
        }
        let target = self.conns[conn].ends[1 - end].node;
        let feed = self.feeds[target].get_or_insert_with(Feed::default);
        if feed.primary != node || feed.conn != conn {
            *feed = Feed {
                primary: node,
                conn,
                writes: Vec::new(),
                target: false,
            };
        }
        if feed.writes.last() != Some(&id) {
            feed.writes.push(id);
        }
    }

    /// After every call: note when a node becomes a sync target (P2 no longer applies
    /// to what it was sent).
    fn observe(&mut self, index: usize) {
        let Some(up) = self.nodes[index].up.as_ref() else {
            return;
        };
        let target = up.node.peers().iter().any(|peer| {
            peer.session().is_some_and(|session| {
                matches!(&session.repl, Repl::Target(t) if t.phase != TargetPhase::WaitBitmap)
            })
        }) || up.node.disk() == DiskState::Inconsistent;
        if target {
            if let Some(feed) = self.feeds[index].as_mut() {
                feed.target = true;
            }
        }
    }

    fn raise(floor: &mut [u64], write: &WriteInfo, id: u64) {
        for block in write.first_block..write.first_block + write.blocks {
            if let Some(slot) = floor.get_mut(block as usize) {
                *slot = (*slot).max(id);
            }
        }
    }

    fn completed(&mut self, index: usize, id: RequestId, ok: bool) {
        self.outstanding.remove(&id.0);
        let name = self.nodes[index].name.clone();
        if id.0 >= FLUSH_IDS {
            self.log(format!("{name} done FLUSH {} ok:{ok}", id.0 - FLUSH_IDS));
        } else {
            self.log(format!("{name} done WRITE {} ok:{ok}", id.0));
        }
        if id.0 >= FLUSH_IDS {
            if let Some(flush) = self.flushes.remove(&id.0) {
                if ok {
                    self.flush_done(flush);
                }
            }
            return;
        }
        if !ok {
            return;
        }
        let write_id = id.0;
        let Some(write) = self.writes.get_mut(write_id as usize - 1) else {
            return;
        };
        write.acked = true;
        self.writes_acked += 1;
        self.acked[index].push(write_id);
        let write = &self.writes[write_id as usize - 1];
        // Its own writes a node holds — unless, in `async` mode, another node that
        // lacks them becomes Primary and it resyncs from that one (the mode promises a
        // prefix, P2, not every write).
        if self.options.mode != Mode::Async {
            Self::raise(&mut self.floor_volatile[index], write, write_id);
        }
        let Some(up) = self.nodes[index].up.as_ref() else {
            return;
        };
        // Acknowledgement coverage: peers that journaled it in a standing session.
        for peer in up.node.peers() {
            let covered = peer.session().is_some_and(|session| {
                session.shipping && write.last_seq.is_some_and(|seq| session.written_seq >= seq)
            });
            let other = peer_node(index, peer.id);
            // An acknowledgement still on its way when the peer lost power covers
            // nothing: the record was only in the peer's volatile cache.
            let lost = self.power_cut_at[other].is_some_and(|at| at >= write.issued);
            if covered && !lost {
                Self::raise(&mut self.floor_volatile[other], write, write_id);
            }
        }
        // P4: one writer per generation.
        let generation = up
            .node
            .storage()
            .map(|storage| storage.superblock().generations.current);
        if let Some(generation) = generation {
            match self.generation_writer.get(&generation) {
                Some(&writer) if writer != index => {
                    let detail = format!(
                        "{} and {} both completed writes in generation {generation:016X}",
                        self.nodes[writer].name, self.nodes[index].name
                    );
                    self.violate("P4", detail);
                }
                _ => {
                    self.generation_writer.insert(generation, index);
                }
            }
        }
    }

    fn flush_done(&mut self, flush: FlushInfo) {
        let node = flush.node;
        let acked: Vec<u64> = self.acked[node][..flush.acked_before].to_vec();
        // In `async` mode a FLUSH is local only, and a node's own writes may be
        // replaced by another primary's history (the mode's promise is P2, not P1).
        let peers_flushed = self.options.mode != Mode::Async;
        let mut targets = if peers_flushed {
            vec![node]
        } else {
            Vec::new()
        };
        if let Some(up) = self.nodes[node].up.as_ref().filter(|_| peers_flushed) {
            for (index, session) in flush.sessions.iter().enumerate() {
                let Some(session) = session else { continue };
                let standing = up.node.peers()[index]
                    .session()
                    .is_some_and(|current| current.id == *session && current.shipping);
                if standing {
                    targets.push(peer_node(node, PeerId(index)));
                }
            }
        }
        for target in targets {
            let cursor = self.flush_cursor[node][target].min(acked.len());
            for &id in &acked[cursor..] {
                let write = &self.writes[id as usize - 1];
                Self::raise(&mut self.floor_durable[target], write, id);
                Self::raise(&mut self.floor_volatile[target], write, id);
            }
            self.flush_cursor[node][target] = self.flush_cursor[node][target].max(acked.len());
        }
    }

    /// Every block of a node, as written-data ids (`None`: unreadable or garbage).
    fn contents(&mut self, index: usize) -> Option<Vec<Content>> {
        let up = self.nodes[index].up.as_ref()?;
        let data = up
            .volume
            .read_blocking(0, WRITE_BLOCKS * BLOCK_BYTES)
            .ok()?;
        Some(
            (0..WRITE_BLOCKS)
                .map(|block| {
                    let start = (block * BLOCK_BYTES) as usize;
                    content::decode(block, &data[start..start + BLOCK_BYTES as usize])
                })
                .collect(),
        )
    }

    /// P1, P2 and P4 at a successful promotion of `index`.
    fn check_promotion(&mut self, index: usize, forced_disk: bool, forced: bool) {
        self.promotions += 1;
        let name = self.nodes[index].name.clone();
        if !forced {
            for other in 0..self.nodes.len() {
                if other == index {
                    continue;
                }
                let primary = self.nodes[other]
                    .up
                    .as_ref()
                    .is_some_and(|up| up.node.role() == Role::Primary);
                if primary {
                    let detail = format!(
                        "{name} was promoted without --force while {} is Primary",
                        self.nodes[other].name
                    );
                    self.violate("P4", detail);
                    return;
                }
            }
        }
        if forced_disk {
            return;
        }
        let Some(contents) = self.contents(index) else {
            self.violate("P3", format!("{name} cannot read its blocks at promotion"));
            return;
        };
        for (block, content) in contents.iter().enumerate() {
            let floor = self.floor_volatile[index][block].max(self.floor_durable[index][block]);
            match content.id() {
                None => {
                    self.violate(
                        "P3",
                        format!("{name} block {block} holds garbage at promotion"),
                    );
                    return;
                }
                Some(id) if id < floor => {
                    self.violate(
                        "P1",
                        format!(
                            "{name} became Primary holding write {id} in block {block}, but write {floor} was acknowledged and must be there"
                        ),
                    );
                    return;
                }
                _ => {}
            }
        }
        // P2: a prefix of what the last primary sent.
        let Some(feed) = self.feeds[index].clone() else {
            return;
        };
        if feed.target || feed.writes.is_empty() {
            return;
        }
        let position: BTreeMap<u64, usize> = feed
            .writes
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, i))
            .collect();
        let newest = contents
            .iter()
            .filter_map(|c| c.id())
            .filter_map(|id| position.get(&id).copied())
            .max();
        let Some(newest) = newest else {
            return;
        };
        for &id in &feed.writes[..newest] {
            let write = &self.writes[id as usize - 1];
            for block in write.first_block..write.first_block + write.blocks {
                let held = contents
                    .get(block as usize)
                    .and_then(|c| c.id())
                    .unwrap_or(0);
                if held < id {
                    let detail = format!(
                        "{name} holds write {} from {} but not the earlier write {id} in block {block} (holds {held})",
                        feed.writes[newest], self.nodes[feed.primary].name
                    );
                    self.violate("P2", detail);
                    return;
                }
            }
        }
    }

    /// No silent divergence: two quiet nodes that say they are in sync read the same.
    fn check_divergence(&mut self) {
        let count = self.nodes.len();
        for a in 0..count {
            for b in a + 1..count {
                if !self.quiet_pair(a, b) {
                    continue;
                }
                let (Some(left), Some(right)) = (self.contents(a), self.contents(b)) else {
                    continue;
                };
                if let Some(block) = (0..left.len()).find(|&i| left[i] != right[i]) {
                    let detail = format!(
                        "{} and {} both say UpToDate and in sync, but block {block} holds {:?} and {:?}",
                        self.nodes[a].name, self.nodes[b].name, left[block], right[block]
                    );
                    self.violate("divergence", detail);
                    return;
                }
            }
        }
    }

    /// Both up, connected to each other and established, UpToDate, nothing out of
    /// sync, nothing in flight between them or to their disks.
    fn quiet_pair(&self, a: usize, b: usize) -> bool {
        let settled = |index: usize, other: usize| {
            let Some(up) = self.nodes[index].up.as_ref() else {
                return false;
            };
            let node = &up.node;
            let storage_quiet = self.nodes[index].storage_pending == 0;
            let no_bits = node.storage().is_some_and(|s| s.out_of_sync_blocks() == 0);
            storage_quiet
                && no_bits
                && node.disk() == DiskState::UpToDate
                && node.pending_requests() == 0
                && node.peers()[peer_id(index, other).0]
                    .session()
                    .is_some_and(|session| {
                        matches!(session.repl, Repl::Established)
                            && session.peer_state.disk == DiskState::UpToDate
                            && session.blocked_record.is_none()
                            && session.deferred.is_empty()
                    })
        };
        if !settled(a, b) || !settled(b, a) {
            return false;
        }
        let inc_a = self.nodes[a].inc;
        let inc_b = self.nodes[b].inc;
        let busy = self.conns.iter().any(|conn| {
            let joins = conn.ends.iter().any(|e| e.node == a && e.inc == inc_a)
                && conn.ends.iter().any(|e| e.node == b && e.inc == inc_b);
            joins
                && (conn.in_flight > 0
                    || conn
                        .held
                        .iter()
                        .any(|dir| dir.iter().any(|queue| !queue.is_empty())))
        });
        !busy
    }

    // ----- client -----

    fn client(&mut self) {
        if self.faults_on {
            let delay = us(500 + self.rng.below(8000));
            self.after(delay, Event::Client);
        }
        let primaries: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i]
                    .up
                    .as_ref()
                    .is_some_and(|up| up.node.role() == Role::Primary)
            })
            .collect();
        let roll = self.rng.below(100);
        if roll < 6 {
            // P3: read a block somewhere.
            let index = self.rng.below(self.nodes.len() as u64) as usize;
            self.client_read(index);
            return;
        }
        if primaries.is_empty() || self.outstanding.len() >= CLIENT_DEPTH {
            return;
        }
        let index = primaries[self.rng.below(primaries.len() as u64) as usize];
        if roll < 16 {
            let id = FLUSH_IDS + self.next_flush;
            self.next_flush += 1;
            let sessions = self.nodes[index]
                .up
                .as_ref()
                .map(|up| {
                    up.node
                        .peers()
                        .iter()
                        .map(|peer| {
                            peer.session()
                                .filter(|s| {
                                    s.shipping
                                        && matches!(s.repl, Repl::Established | Repl::Verify)
                                        && s.peer_state.disk == DiskState::UpToDate
                                })
                                .map(|s| s.id)
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.flushes.insert(
                id,
                FlushInfo {
                    node: index,
                    acked_before: self.acked[index].len(),
                    sessions,
                },
            );
            self.outstanding.insert(id, index);
            let name = self.nodes[index].name.clone();
            self.log(format!("client FLUSH {} on {name}", id - FLUSH_IDS));
            self.call(index, |node, now| node.on_flush(now, RequestId(id)));
            return;
        }
        let blocks = 1 + self.rng.below(2);
        let first_block = self.rng.below(WRITE_BLOCKS - blocks + 1);
        let fua = self.chance(8);
        self.writes.push(WriteInfo {
            issued: self.now,
            first_block,
            blocks,
            acked: false,
            last_seq: None,
        });
        let id = self.writes.len() as u64;
        let data = content::write_data(id, first_block, blocks);
        self.outstanding.insert(id, index);
        let name = self.nodes[index].name.clone();
        self.log(format!(
            "client WRITE {id} blocks {first_block}+{blocks}{} on {name}",
            if fua { " FUA" } else { "" }
        ));
        let request = WriteRequest {
            offset: first_block * BLOCK_BYTES,
            kind: WriteKind::Data(data),
            fua,
        };
        self.call(index, |node, now| {
            node.on_write(now, RequestId(id), request)
        });
        let inc = self.nodes[index].inc;
        let delay = us(self.rng.below(600));
        self.after(delay, Event::Commit { node: index, inc });
    }

    fn client_read(&mut self, index: usize) {
        let Some(up) = self.nodes[index].up.as_ref() else {
            return;
        };
        let block = self.rng.below(WRITE_BLOCKS);
        let result = up.volume.read_blocking(block * BLOCK_BYTES, BLOCK_BYTES);
        let balanced = up.node.role() == Role::Primary && up.node.balances_reads();
        let held = match result.as_ref().map(|data| content::decode(block, data)) {
            Ok(Content::Write(id)) => Some(id),
            Ok(Content::Zero) => Some(0),
            _ => None,
        };
        if let Ok(data) = result {
            self.check_read(index, block, &data);
        }
        // The same read, balanced by the node: a read a peer serves must return what
        // the Primary held when it was issued, or something later.
        let Some(up) = self.nodes[index].up.as_mut().filter(|_| balanced) else {
            return;
        };
        let id = READ_IDS + self.next_read;
        self.next_read += 1;
        let now = self.now;
        match up
            .node
            .balance_read(now, RequestId(id), block * BLOCK_BYTES, BLOCK_BYTES)
        {
            ReadRoute::Local => up.node.local_read_done(now, now),
            ReadRoute::Peer(_) => {
                if let Some(held) = held {
                    self.balanced_reads.insert(id, (block, held));
                }
            }
        }
        self.settle(index);
    }

    /// A balanced read's answer (`None`: it failed, and the driver would read the
    /// local store).
    fn balanced_read_done(&mut self, index: usize, id: u64, data: Option<bytes::Bytes>) {
        let Some((block, held)) = self.balanced_reads.remove(&id) else {
            return;
        };
        let Some(data) = data else {
            return;
        };
        self.check_read(index, block, &data);
        let got = match content::decode(block, &data) {
            Content::Write(id) => id,
            Content::Zero => 0,
            Content::Garbage => return,
        };
        if got < held {
            let name = self.nodes[index].name.clone();
            self.violate(
                "P1",
                format!(
                    "a read of block {block} on {name} served by a peer returned write {got}, \
                     older than write {held} the Primary held when it was issued"
                ),
            );
        }
    }

    /// P3: a read returns zeroes or a block of a write to it.
    fn check_read(&mut self, index: usize, block: u64, data: &[u8]) {
        match content::decode(block, data) {
            Content::Garbage => {
                let name = self.nodes[index].name.clone();
                self.violate(
                    "P3",
                    format!("a read of block {block} on {name} returned garbage"),
                );
            }
            Content::Write(id) => {
                let valid = self
                    .writes
                    .get(id as usize - 1)
                    .is_some_and(|w| block >= w.first_block && block < w.first_block + w.blocks);
                if !valid {
                    let name = self.nodes[index].name.clone();
                    self.violate(
                        "P3",
                        format!("a read of block {block} on {name} returned write {id}, never written there"),
                    );
                }
            }
            Content::Zero => {}
        }
    }

    // ----- operator -----

    fn admin(
        &mut self,
        index: usize,
        pending: Pending,
        command: impl FnOnce(&mut Node<VolumeStorage>, Time, AdminId),
    ) {
        let id = self.next_admin;
        self.next_admin += 1;
        self.admin.insert(
            id,
            PendingCommand {
                node: index,
                what: pending,
            },
        );
        self.call(index, |node, now| command(node, now, AdminId(id)));
    }

    fn admin_done(
        &mut self,
        index: usize,
        id: AdminId,
        result: Result<AdminOutput, engine::node::AdminError>,
    ) {
        let Some(PendingCommand { what: pending, .. }) = self.admin.remove(&id.0) else {
            return;
        };
        let name = self.nodes[index].name.clone();
        match (&pending, &result) {
            (Pending::Promote { node, force }, Ok(AdminOutput::Message(text))) => {
                self.promoting = false;
                self.log(format!("{name} promote: {text}"));
                if text.contains("is Primary") {
                    let forced_disk = text.contains("disk was not UpToDate");
                    let forced = *force;
                    self.check_promotion(*node, forced_disk, forced);
                }
            }
            (Pending::Promote { .. }, Err(error)) => {
                self.promoting = false;
                self.log(format!("{name} promote refused: {error}"));
            }
            (_, Ok(output)) => self.log(format!("{name} admin done: {output:?}")),
            (_, Err(error)) => self.log(format!("{name} admin refused: {error}")),
        }
        if matches!(pending, Pending::Demote) {
            self.log(format!("{name} demote finished"));
        }
    }

    fn operator(&mut self, index: usize) {
        let Some(up) = self.nodes[index].up.as_ref() else {
            return;
        };
        let role = up.node.role();
        let disk = up.node.disk();
        let name = self.nodes[index].name.clone();
        match self.rng.below(10) {
            0..=2 => {
                if self.promoting {
                    return;
                }
                // `--force` asserts the peer is gone; the simulated operator never
                // forces an Inconsistent disk (a half-synced store, whose blocks may
                // fail their checksums: reads of them return EIO, never bad data, and
                // no resync can take them as a source).
                let force = self.chance(40) && disk == DiskState::UpToDate;
                self.promoting = true;
                self.log(format!(
                    "operator: promote {name}{}",
                    if force { " --force" } else { "" }
                ));
                self.admin(
                    index,
                    Pending::Promote { node: index, force },
                    move |node, now, id| node.promote(now, id, force),
                );
            }
            3 if role == Role::Primary => {
                self.log(format!("operator: demote {name}"));
                self.admin(index, Pending::Demote, |node, now, id| node.demote(now, id));
            }
            4 => {
                self.log(format!("operator: disconnect {name}"));
                self.call(index, |node, now| {
                    let _ = node.disconnect(now);
                });
                let delay = ms(100 + self.rng.below(2000));
                self.after(delay, Event::Reconnect { node: index });
            }
            5 if role == Role::Secondary => {
                self.log(format!("operator: invalidate {name}"));
                self.admin(index, Pending::Other, |node, now, id| {
                    node.invalidate(now, id)
                });
            }
            6 => {
                let repair = self.chance(50) && role == Role::Primary;
                self.log(format!("operator: verify {name}"));
                self.admin(index, Pending::Other, move |node, now, id| {
                    node.verify(now, id, repair)
                });
            }
            7 => {
                // Detach: a clean close, the store kept; attach later.
                let refused = role == Role::Primary
                    && up.node.peers().iter().all(|peer| peer.session().is_none());
                if refused || self.nodes[index].restarting {
                    return;
                }
                self.log(format!("operator: detach {name}"));
                self.detach(index);
            }
            _ => {}
        }
    }

    fn detach(&mut self, index: usize) {
        let now = self.now;
        let Some(mut up) = self.nodes[index].up.take() else {
            return;
        };
        let storage = up.node.take_storage(now, "detached by the operator");
        // Deliver what taking the store produced (session ends) before it goes.
        let mut actions = Vec::new();
        while let Some(action) = up.node.poll_action() {
            actions.push(action);
        }
        self.nodes[index].up = Some(up);
        for action in actions {
            self.act(index, action);
        }
        let closed = storage.map(|storage| storage.volume().close());
        if let Some(Err(error)) = closed {
            let name = self.nodes[index].name.clone();
            self.log(format!("{name} detach: close failed: {error}"));
        }
        // A detached node restarts on its store (as attach would).
        self.nodes[index].up = None;
        self.nodes[index].detached = true;
        self.forget_requests(index);
        for conn in 0..self.conns.len() {
            for end in 0..2 {
                if self.conns[conn].ends[end].node == index && self.conns[conn].open[end] {
                    self.conns[conn].open[end] = false;
                    if self.conns[conn].open[1 - end] {
                        self.close_end_later(conn, 1 - end, us(200), "the peer detached");
                    }
                }
            }
        }
        let delay = ms(200 + self.rng.below(1500));
        self.schedule_restart(index, delay);
    }

    fn schedule_restart(&mut self, index: usize, delay: Duration) {
        if !self.nodes[index].restarting {
            self.nodes[index].restarting = true;
            self.after(delay, Event::Restart { node: index });
        }
    }

    fn fault(&mut self) {
        if !self.faults_on {
            return;
        }
        let delay = ms(30 + self.rng.below(400));
        self.after(delay, Event::Fault);
        let faults = self.options.faults;
        let count = self.nodes.len();
        let index = self.rng.below(count as u64) as usize;
        let up = self.nodes[index].up.is_some();
        match self.rng.below(12) {
            0 if faults.crash && up => {
                self.stop(index, false);
                let delay = ms(100 + self.rng.below(3000));
                self.schedule_restart(index, delay);
            }
            1 if faults.power && up => {
                self.stop(index, true);
                let delay = ms(100 + self.rng.below(3000));
                self.schedule_restart(index, delay);
            }
            2 | 3 if faults.partition => {
                let other = (index + 1 + self.rng.below(count as u64 - 1) as usize) % count;
                let shape = self.rng.below(3);
                let (a, b) = (
                    self.nodes[index].name.clone(),
                    self.nodes[other].name.clone(),
                );
                match shape {
                    0 => {
                        self.blocked[index][other] = [true; 2];
                        self.blocked[other][index] = [true; 2];
                        self.log(format!("partition {a} <-> {b}"));
                    }
                    1 => {
                        self.blocked[index][other] = [true; 2];
                        self.log(format!("partition {a} -> {b} (one way)"));
                    }
                    _ => {
                        self.blocked[index][other][0] = true;
                        self.blocked[other][index][0] = true;
                        self.log(format!("partition {a} <-> {b} (data connection only)"));
                    }
                }
                let delay = ms(100 + self.rng.below(4000));
                self.after(
                    delay,
                    Event::Heal {
                        from: index,
                        to: other,
                    },
                );
            }
            4 if faults.reset => {
                let open: Vec<usize> = (0..self.conns.len())
                    .filter(|&c| self.conns[c].open.iter().any(|o| *o))
                    .collect();
                if let Some(&conn) = open.get(self.rng.below(open.len().max(1) as u64) as usize) {
                    self.log(format!("reset conn {conn}"));
                    for end in 0..2 {
                        if self.conns[conn].open[end] {
                            self.conns[conn].open[end] = false;
                            let delay = us(100 + self.rng.below(500));
                            self.close_end_later(conn, end, delay, "connection reset");
                        }
                    }
                }
            }
            5 if faults.slow => {
                let name = self.nodes[index].name.clone();
                if self.rng.below(4) == 0 {
                    // A hung disk (not dead: everything completes when it wakes).
                    let until = self.now + ms(2500 + self.rng.below(4000));
                    self.nodes[index].hung_until = until;
                    self.log(format!("{name} disk hangs until {until}"));
                } else {
                    let until = self.now + ms(200 + self.rng.below(2000));
                    self.nodes[index].slow_until = until;
                    self.log(format!("{name} slow until {until}"));
                }
            }
            6..=9 if faults.operator && up => self.operator(index),
            _ => {}
        }
    }

    fn heal(&mut self, from: usize, to: usize) {
        for (a, b) in [(from, to), (to, from)] {
            self.blocked[a][b] = [false; 2];
        }
        let (a, b) = (self.nodes[from].name.clone(), self.nodes[to].name.clone());
        self.log(format!("heal {a} <-> {b}"));
        for conn in 0..self.conns.len() {
            for end in 0..2 {
                for channel in 0..2 {
                    if !self.conns[conn].held[end][channel].is_empty() {
                        let delay = us(100 + self.rng.below(500));
                        self.after(
                            delay,
                            Event::FlushHeld {
                                conn,
                                from_end: end,
                                channel,
                            },
                        );
                    }
                }
            }
        }
    }

    // ----- the run -----

    fn run(&mut self) {
        for index in 0..self.nodes.len() {
            self.start(index);
        }
        // The operator's first move: a fresh cluster skips its initial sync once every
        // node is connected, then node 0 is promoted.
        self.after(ms(300), Event::Fault);
        self.after(ms(200), Event::Client);
        self.setup_cluster();
        let mut steps = 0u64;
        while steps < self.options.steps && self.violation.is_none() {
            if !self.step() {
                break;
            }
            steps += 1;
        }
        if self.violation.is_none() {
            self.liveness();
        }
    }

    /// Connects the fresh nodes and makes node 0 Primary without an initial sync.
    fn setup_cluster(&mut self) {
        let deadline = self.now + Duration::from_secs(10);
        while self.now < deadline {
            let connected = (1..self.nodes.len()).all(|other| {
                self.nodes[0]
                    .up
                    .as_ref()
                    .is_some_and(|up| up.node.peers()[peer_id(0, other).0].session().is_some())
            });
            if connected {
                break;
            }
            if !self.step() {
                break;
            }
        }
        self.admin(0, Pending::Other, |node, now, id| {
            node.new_current_uuid(now, id, true)
        });
        for _ in 0..200 {
            if !self.step() {
                break;
            }
        }
        self.promote_by_operator(0, false);
    }

    /// The operator promotes `index` (the promotion is awaited before the next one).
    fn promote_by_operator(&mut self, index: usize, force: bool) {
        self.promoting = true;
        self.admin(
            index,
            Pending::Promote { node: index, force },
            move |node, now, id| node.promote(now, id, force),
        );
    }

    /// Processes one event; false when nothing is left.
    fn step(&mut self) -> bool {
        let Some(Reverse(scheduled)) = self.queue.pop() else {
            return false;
        };
        self.now = self.now.max(scheduled.at);
        self.events += 1;
        match scheduled.event {
            Event::Deliver {
                conn,
                from_end,
                channel,
                frame,
            } => {
                if !heartbeat(&frame) {
                    self.conns[conn].in_flight = self.conns[conn].in_flight.saturating_sub(1);
                }
                self.deliver(conn, from_end, channel, frame);
            }
            Event::FlushHeld {
                conn,
                from_end,
                channel,
            } => self.flush_held(conn, from_end, channel),
            Event::ConnectDone {
                dialer,
                dialer_inc,
                target,
                target_inc,
            } => self.connect_done(dialer, dialer_inc, target, target_inc),
            Event::DialFailed {
                node,
                inc,
                peer,
                why,
            } => {
                if self.nodes[node].inc == inc {
                    self.call(node, |n, now| n.on_dial_failed(now, peer, why.into()));
                }
            }
            Event::Closed {
                node,
                inc,
                peer,
                session,
                why,
            } => {
                if self.nodes[node].inc == inc {
                    let name = self.nodes[node].name.clone();
                    self.log(format!("{name} conn closed: {why}"));
                    self.call(node, |n, now| n.on_closed(now, peer, session, why.into()));
                }
            }
            Event::Storage {
                node,
                inc,
                token,
                completion,
            } => {
                if self.nodes[node].inc == inc {
                    self.nodes[node].storage_pending =
                        self.nodes[node].storage_pending.saturating_sub(1);
                    self.call(node, |n, now| n.on_storage(now, token, completion));
                }
            }
            Event::Tick { node, inc } => {
                if self.nodes[node].inc == inc && self.nodes[node].next_tick == Some(scheduled.at) {
                    self.nodes[node].next_tick = None;
                    self.call(node, |n, now| n.on_tick(now));
                }
            }
            Event::Pump { node, inc } => {
                if self.nodes[node].inc == inc {
                    if let Some(up) = self.nodes[node].up.as_ref() {
                        up.volume.pump();
                    }
                    self.settle(node);
                    let delay = us(300 + self.rng.below(5000));
                    self.after(delay, Event::Pump { node, inc });
                }
            }
            Event::Commit { node, inc } => {
                if self.nodes[node].inc == inc {
                    self.call(node, |n, now| n.end_of_batch(now));
                }
            }
            Event::Client => self.client(),
            Event::Fault => self.fault(),
            Event::Restart { node } => {
                if self.nodes[node].up.is_none() {
                    self.start(node);
                } else {
                    self.nodes[node].restarting = false;
                }
            }
            Event::Heal { from, to } => self.heal(from, to),
            Event::Reconnect { node } => {
                self.call(node, |n, now| {
                    let _ = n.connect(now, false);
                });
            }
        }
        if let Ok(watch) = std::env::var("REPLSIM_WATCH") {
            // Debugging aid: NODE:BLOCK, logged whenever it changes.
            if let Some((node, block)) = watch.split_once(':') {
                let (node, block): (usize, usize) =
                    (node.parse().unwrap_or(0), block.parse().unwrap_or(0));
                let now = self.contents(node).and_then(|c| c.get(block).copied());
                let text = format!("{now:?}");
                if self.watch_last != text {
                    self.log(format!("WATCH n{node} block {block}: {text}"));
                    self.watch_last = text;
                }
            }
        }
        if self.now.since(self.last_divergence_check) >= ms(500) {
            self.last_divergence_check = self.now;
            self.check_divergence();
        }
        true
    }

    /// The faults stop; the operator heals what needs a person; the cluster must
    /// converge.
    fn liveness(&mut self) {
        self.faults_on = false;
        self.log("LIVENESS: faults stop".into());
        let count = self.nodes.len();
        for a in 0..count {
            for b in 0..count {
                if self.blocked[a][b].iter().any(|x| *x) {
                    self.heal(a, b);
                }
            }
            self.nodes[a].slow_until = Time::ZERO;
            self.nodes[a].hung_until = Time::ZERO;
        }
        for index in 0..count {
            if self.nodes[index].up.is_none() {
                self.nodes[index].restarting = false;
                self.schedule_restart(index, ms(10));
            }
        }
        let deadline = self.now + LIVENESS_LIMIT;
        let mut next_round = self.now;
        while self.now < deadline && self.violation.is_none() {
            if self.now >= next_round {
                next_round = self.now + ms(500);
                if self.converged() {
                    self.check_divergence();
                    if self.violation.is_none() {
                        self.final_checks();
                    }
                    return;
                }
                self.operator_heals();
            }
            if !self.step() {
                // Nothing scheduled: wake the nodes' timers.
                self.after(ms(10), Event::Fault);
            }
        }
        if self.violation.is_none() {
            let mut states: Vec<String> = (0..count).map(|i| self.describe(i)).collect();
            let quiet: Vec<String> = (0..count)
                .flat_map(|a| (a + 1..count).map(move |b| (a, b)))
                .map(|(a, b)| format!("quiet({a},{b}):{}", self.quiet_pair(a, b)))
                .collect();
            states.push(quiet.join(" "));
            states.push(format!(
                "client in flight:{} frames in flight:{}",
                self.outstanding.len(),
                self.conns.iter().map(|c| c.in_flight).sum::<usize>()
            ));
            self.violate(
                "liveness",
                format!(
                    "no convergence within {}s after the faults stopped: {}",
                    LIVENESS_LIMIT.as_secs(),
                    states.join("; ")
                ),
            );
        }
    }

    fn describe(&self, index: usize) -> String {
        let name = &self.nodes[index].name;
        let Some(up) = self.nodes[index].up.as_ref() else {
            return format!("{name} down");
        };
        let peers: Vec<String> = up
            .node
            .peers()
            .iter()
            .map(|peer| {
                format!(
                    "{}:{}/{}{} ({})",
                    peer.config.name,
                    peer.connection_state(),
                    peer.session().map_or("Off".to_string(), |s| s
                        .replication_state(peer.paused)
                        .to_string()),
                    if peer.split_brain { "/split-brain" } else { "" },
                    peer.last_error
                        .as_ref()
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                )
            })
            .collect();
        format!(
            "{name} {} {} bits:{} pending:{} storage:{} [{}]",
            up.node.role(),
            up.node.disk(),
            up.node.storage().map_or(0, |s| s.out_of_sync_blocks()),
            up.node.pending_requests(),
            self.nodes[index].storage_pending,
            peers.join(" ")
        )
    }

    /// One Primary, every pair connected and established, all UpToDate, nothing out
    /// of sync, nothing in flight.
    fn converged(&self) -> bool {
        let count = self.nodes.len();
        let primaries = (0..count)
            .filter(|&i| {
                self.nodes[i]
                    .up
                    .as_ref()
                    .is_some_and(|up| up.node.role() == Role::Primary)
            })
            .count();
        primaries == 1
            && self.outstanding.is_empty()
            && (0..count).all(|a| (0..count).all(|b| a == b || self.quiet_pair(a, b)))
    }

    /// What an operator does after the faults: attach, reconnect, resolve split
    /// brains by discarding the non-Primary side, make exactly one Primary.
    fn operator_heals(&mut self) {
        let count = self.nodes.len();
        if (0..count).any(|i| self.nodes[i].up.is_none()) {
            return;
        }
        let primaries: Vec<usize> = (0..count)
            .filter(|&i| {
                self.nodes[i]
                    .up
                    .as_ref()
                    .is_some_and(|up| up.node.role() == Role::Primary)
            })
            .collect();
        if primaries.len() > 1 {
            let victim = primaries[primaries.len() - 1];
            let name = self.nodes[victim].name.clone();
            self.log(format!("operator (healing): demote {name}"));
            self.admin(victim, Pending::Demote, |node, now, id| {
                node.demote(now, id)
            });
            return;
        }
        // The Primary's data survives; without one, the first UpToDate node's (an
        // Inconsistent node's newer history is no good data), else the lowest node's.
        let up_to_date = (0..count).find(|&i| {
            self.nodes[i]
                .up
                .as_ref()
                .is_some_and(|up| up.node.disk() == DiskState::UpToDate)
        });
        let survivor = primaries.first().copied().or(up_to_date).or(Some(0));
        for index in 0..count {
            let Some(up) = self.nodes[index].up.as_ref() else {
                continue;
            };
            // A handshake refusal (split brain, unrelated data, a Primary that would be
            // overwritten) needs a person: the survivor's data wins.
            let refused = up.node.peers().iter().any(|peer| {
                peer.split_brain
                    || matches!(peer.last_error, Some(engine::node::SessionEnd::Refused(_)))
            });
            let standalone =
                up.node.peers().iter().any(|peer| {
                    peer.connection_state() == engine::repl::ConnectionState::StandAlone
                });
            if !(refused || standalone) {
                continue;
            }
            let discard = refused && survivor.is_some_and(|s| s != index);
            let name = self.nodes[index].name.clone();
            self.log(format!(
                "operator (healing): connect {name}{}",
                if discard { " --discard-my-data" } else { "" }
            ));
            if discard {
                self.floor_volatile[index].iter_mut().for_each(|f| *f = 0);
                self.floor_durable[index].iter_mut().for_each(|f| *f = 0);
                self.feeds[index] = None;
            }
            self.call(index, |node, now| {
                let _ = node.connect(now, discard);
            });
        }
        // Blocks marked while connected (a verify's findings) resync at the next
        // connection: the operator reconnects a Secondary that holds marks.
        if primaries.len() == 1 {
            for index in 0..count {
                let Some(up) = self.nodes[index].up.as_ref() else {
                    continue;
                };
                let established = up.node.peers().iter().all(|peer| {
                    peer.session()
                        .is_some_and(|session| matches!(session.repl, Repl::Established))
                });
                let marked = up
                    .node
                    .storage()
                    .is_some_and(|s| s.out_of_sync_blocks() > 0);
                if up.node.role() == Role::Secondary && established && marked {
                    let name = self.nodes[index].name.clone();
                    self.log(format!("operator (healing): disconnect and connect {name}"));
                    self.call(index, |node, now| {
                        let _ = node.disconnect(now);
                        let _ = node.connect(now, false);
                    });
                }
            }
        }
        if primaries.is_empty() && !self.promoting {
            // Promote the first node whose disk is UpToDate and that is connected.
            let candidate = (0..count).find(|&i| {
                self.nodes[i].up.as_ref().is_some_and(|up| {
                    up.node.disk() == DiskState::UpToDate
                        && up.node.peers().iter().all(|peer| peer.session().is_some())
                })
            });
            let none_up_to_date = (0..count).all(|i| {
                self.nodes[i]
                    .up
                    .as_ref()
                    .is_some_and(|up| up.node.disk() == DiskState::Inconsistent)
            });
            if candidate.is_none() && none_up_to_date {
                // No good data left (the operator invalidated both sides at once): a
                // person forces one; what the others held is forfeit with it.
                let name = self.nodes[0].name.clone();
                self.log(format!(
                    "operator (healing): promote {name} --force (no UpToDate disk left)"
                ));
                for index in 0..count {
                    self.floor_volatile[index].iter_mut().for_each(|f| *f = 0);
                    self.floor_durable[index].iter_mut().for_each(|f| *f = 0);
                    self.feeds[index] = None;
                }
                self.promote_by_operator(0, true);
                return;
            }
            if let Some(index) = candidate {
                let name = self.nodes[index].name.clone();
                self.log(format!("operator (healing): promote {name}"));
                self.promote_by_operator(index, false);
            }
        }
    }

    /// At the end: every node holds its floor (they are all in sync now).
    fn final_checks(&mut self) {
        for index in 0..self.nodes.len() {
            let name = self.nodes[index].name.clone();
            let Some(contents) = self.contents(index) else {
                self.violate("P3", format!("{name} cannot read its blocks at the end"));
                return;
            };
            for (block, content) in contents.iter().enumerate() {
                let floor = self.floor_durable[index][block].max(self.floor_volatile[index][block]);
                if content.id().is_none_or(|id| id < floor) {
                    self.violate(
                        "P1",
                        format!(
                            "after convergence {name} block {block} holds {content:?}, but write {floor} was acknowledged and must be there"
                        ),
                    );
                    return;
                }
            }
        }
        self.log("converged".into());
    }
}

/// A short name of a frame for the trace.
fn frame_text(frame: &Frame) -> String {
    match frame {
        Frame::Record(record) => format!("RECORD {}", record.0.header.seq),
        Frame::AckReceived(seq) => format!("ACK_RECEIVED {seq}"),
        Frame::AckWritten(seq) => format!("ACK_WRITTEN {seq}"),
        Frame::Durable(seq) => format!("DURABLE {seq}"),
        Frame::State(state) => format!(
            "STATE {} {} gen {:016X}/{:016X} dirty {}",
            state.role,
            state.disk,
            state.generations.current,
            state.generations.bitmap,
            state.dirty_blocks
        ),
        Frame::ResyncData(data) => format!("RESYNC_DATA {}+{}", data.first_block, data.blocks),
        Frame::ResyncAck {
            first_block,
            blocks,
        } => format!("RESYNC_ACK {first_block}+{blocks}"),
        other => other.name().to_string(),
    }
}
