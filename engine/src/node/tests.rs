//! Unit tests of what the node counts for status and metrics (replication lag,
//! promotions, failover duration), on real volumes in manual mode over simulated
//! stores, with the frames of two nodes handed across in memory.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::storage::{CompletionQueue, VolumeStorage};
use super::{
    Action, AdminId, AttachFacts, Node, NodeConfig, PeerConfig, PeerId, RequestId, ResyncConfig,
    SessionId, Time, Timing,
};
use crate::backend::sim::SimBackend;
use crate::backend::Backend;
use crate::layout::MIN_JOURNAL_BYTES;
use crate::repl::{Mode, Role};
use crate::volume::{Background, CreateOptions, MetaStore};
use crate::wire::Frame;
use crate::{Volume, VolumeOptions, WriteKind, WriteRequest, BLOCK_BYTES};

const UUID: [u8; 16] = *b"node-unit-tests!";
const STORE_BYTES: u64 = 2 << 20;

fn ms(millis: u64) -> Time {
    Time::from_nanos(millis * 1_000_000)
}

struct Member {
    node: Node<VolumeStorage>,
    volume: Volume,
    queue: CompletionQueue,
    /// The session its peer's frames belong to (`None`: no connection, or down).
    session: Option<SessionId>,
    up: bool,
    done: Vec<Action>,
}

fn member(name: &str, node_id: u32, peers: &[(&str, u32)]) -> Member {
    let sim: Arc<dyn Backend> = Arc::new(SimBackend::new(STORE_BYTES));
    let create = CreateOptions {
        resource_uuid: UUID,
        node_id,
        node_name: name.to_string(),
        journal_bytes: MIN_JOURNAL_BYTES,
        force: false,
        assume_zeroed: true,
    };
    Volume::create(&sim, &MetaStore::Internal, &create, &mut |_, _| {}).expect("create-md");
    let options = VolumeOptions {
        background: Background::Manual,
        ..VolumeOptions::default()
    };
    let (volume, _) = Volume::open(sim, MetaStore::Internal, Some(UUID), options).expect("open");
    let queue = CompletionQueue::new(Arc::new(|| {}));
    let storage = VolumeStorage::new(volume.clone(), queue.clone(), true);
    let config = NodeConfig {
        resource: "r0".into(),
        uuid: UUID,
        node_name: name.into(),
        node_id,
        mode: Mode::Sync,
        peers: peers
            .iter()
            .map(|&(name, node_id)| PeerConfig {
                name: name.into(),
                node_id,
            })
            .collect(),
        timing: Timing::default(),
        resync: ResyncConfig::default(),
        mutation: None,
    };
    let mut node = Node::new(config, Time::ZERO, u64::from(node_id));
    node.attach(Time::ZERO, storage, AttachFacts::default());
    Member {
        node,
        volume,
        queue,
        session: None,
        up: true,
        done: Vec::new(),
    }
}

/// One node alone, or two that know each other as `PeerId(0)`.
struct Cluster {
    members: Vec<Member>,
    now: Time,
    /// ACK_WRITTEN frames on their way to the first node are held here.
    hold_written: bool,
    held: Vec<Frame>,
}

impl Cluster {
    fn single() -> Cluster {
        Cluster {
            members: vec![member("alpha", 1, &[])],
            now: Time::ZERO,
            hold_written: false,
            held: Vec::new(),
        }
    }

    fn pair() -> Cluster {
        Cluster {
            members: vec![
                member("alpha", 1, &[("beta", 2)]),
                member("beta", 2, &[("alpha", 1)]),
            ],
            now: Time::ZERO,
            hold_written: false,
            held: Vec::new(),
        }
    }

    fn node(&self, index: usize) -> &Node<VolumeStorage> {
        &self.members[index].node
    }

    /// Runs the nodes until nothing moves: storage work, completions, group commits,
    /// frames handed to the other node at once.
    fn settle(&mut self) {
        let now = self.now;
        for _ in 0..10_000 {
            let mut moved = false;
            let mut frames = Vec::new();
            for (index, member) in self.members.iter_mut().enumerate() {
                if !member.up {
                    continue;
                }
                moved |= member.volume.pump_until_idle(1000) > 0;
                for (token, completion) in member.queue.drain() {
                    member.node.on_storage(now, token, completion);
                    moved = true;
                }
                member.node.end_of_batch(now);
                while let Some(action) = member.node.poll_action() {
                    moved = true;
                    match action {
                        Action::Send { frame, .. } => frames.push((1 - index, frame)),
                        Action::Close { .. } => member.session = None,
                        Action::Dial { .. } | Action::Event(_) | Action::Hook { .. } => {}
                        other => member.done.push(other),
                    }
                }
                member.node.invariants();
            }
            for (to, frame) in frames {
                if to == 0 && self.hold_written && matches!(frame, Frame::AckWritten(_)) {
                    self.held.push(frame);
                    continue;
                }
                let member = &mut self.members[to];
                if let (true, Some(session)) = (member.up, member.session) {
                    member.node.handle_frame(now, PeerId(0), session, frame);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the nodes never settled");
    }

    /// Both nodes open a session to each other.
    fn connect(&mut self) {
        for member in &mut self.members {
            member.session = member.node.on_connected(self.now, PeerId(0));
            assert!(member.session.is_some(), "a node refused the connection");
        }
        self.settle();
        for member in &self.members {
            assert!(member.node.peers()[0].session().is_some(), "no session");
        }
    }

    /// Runs an operator command on `index` at the current time; `settle_at` is when
    /// everything it set off happens.
    fn admin(
        &mut self,
        index: usize,
        command: impl FnOnce(&mut Node<VolumeStorage>, Time, AdminId),
        settle_at: Time,
    ) {
        let now = self.now;
        command(&mut self.members[index].node, now, AdminId(7));
        self.now = settle_at;
        self.settle();
        let done = self.members[index]
            .done
            .iter()
            .position(|action| matches!(action, Action::AdminDone { id: AdminId(7), .. }))
            .expect("the command answered");
        match self.members[index].done.remove(done) {
            Action::AdminDone { result, .. } => {
                result.expect("the command succeeded");
            }
            _ => unreachable!(),
        }
    }

    fn completed(&self, index: usize, id: u64) -> bool {
        self.members[index]
            .done
            .iter()
            .any(|action| matches!(action, Action::Complete { id: RequestId(i), result: Ok(()) } if *i == id))
    }

    fn write(&mut self, index: usize, id: u64, offset: u64, bytes: u64) {
        let request = WriteRequest {
            offset,
            kind: WriteKind::Data(Bytes::from(vec![0x5a; bytes as usize])),
            fua: false,
        };
        let now = self.now;
        self.members[index]
            .node
            .on_write(now, RequestId(id), request);
        self.settle();
    }

    /// A pair in sync with `alpha` Primary (both stores fresh: no initial sync).
    fn primary_pair() -> Cluster {
        let mut cluster = Cluster::pair();
        cluster.connect();
        cluster.now = ms(100);
        cluster.admin(0, |n, now, id| n.new_current_uuid(now, id, true), ms(100));
        cluster.now = ms(200);
        cluster.admin(0, |n, now, id| n.promote(now, id, false), ms(200));
        assert_eq!(cluster.node(0).role(), Role::Primary);
        cluster
    }
}

#[test]
fn a_promotion_counts_and_takes_from_its_request_to_its_completion() {
    let mut cluster = Cluster::single();
    assert_eq!(cluster.node(0).promotions(), 0);
    assert_eq!(cluster.node(0).last_failover(), None);
    cluster.now = ms(1000);
    cluster.admin(0, |n, now, id| n.promote(now, id, false), ms(1040));
    assert_eq!(cluster.node(0).role(), Role::Primary);
    assert_eq!(cluster.node(0).promotions(), 1);
    assert_eq!(
        cluster.node(0).last_failover(),
        Some(Duration::from_millis(40))
    );
    // "already Primary" is no promotion.
    cluster.now = ms(2000);
    cluster.admin(0, |n, now, id| n.promote(now, id, false), ms(2500));
    assert_eq!(cluster.node(0).promotions(), 1);
    assert_eq!(
        cluster.node(0).last_failover(),
        Some(Duration::from_millis(40))
    );
    // Demoted and promoted again: a new measurement from the new request.
    cluster.now = ms(3000);
    cluster.admin(0, |n, now, id| n.demote(now, id), ms(3000));
    cluster.now = ms(4000);
    cluster.admin(0, |n, now, id| n.promote(now, id, false), ms(4005));
    assert_eq!(cluster.node(0).promotions(), 2);
    assert_eq!(
        cluster.node(0).last_failover(),
        Some(Duration::from_millis(5))
    );
}

#[test]
fn a_failover_is_timed_from_the_loss_of_the_primary_peer() {
    let mut cluster = Cluster::primary_pair();
    // alpha's promotion with a connected peer (agreed in two phases) took no time
    // here: the frames crossed at once.
    assert_eq!(cluster.node(0).promotions(), 1);
    assert_eq!(cluster.node(0).last_failover(), Some(Duration::ZERO));
    assert_eq!(cluster.node(1).promotions(), 0);
    // alpha dies at 10 s: beta's connection breaks.
    cluster.now = ms(10_000);
    cluster.members[0].up = false;
    let session = cluster.members[1].session.take().expect("beta's session");
    cluster.members[1]
        .node
        .on_closed(ms(10_000), PeerId(0), session, "connection reset".into());
    cluster.settle();
    // The operator promotes beta at 13 s; it completes at 13.02 s.
    cluster.now = ms(13_000);
    cluster.admin(1, |n, now, id| n.promote(now, id, true), ms(13_020));
    assert_eq!(cluster.node(1).role(), Role::Primary);
    assert_eq!(cluster.node(1).promotions(), 1);
    assert_eq!(
        cluster.node(1).last_failover(),
        Some(Duration::from_millis(3020))
    );
}

#[test]
fn a_planned_switchover_is_timed_from_the_promotion_request() {
    let mut cluster = Cluster::primary_pair();
    cluster.now = ms(5_000);
    cluster.admin(0, |n, now, id| n.demote(now, id), ms(5_000));
    assert_eq!(cluster.node(0).role(), Role::Secondary);
    // beta saw its peer Primary, then Secondary: no Primary was lost.
    cluster.now = ms(8_000);
    cluster.admin(1, |n, now, id| n.promote(now, id, false), ms(8_030));
    assert_eq!(cluster.node(1).role(), Role::Primary);
    assert_eq!(
        cluster.node(1).last_failover(),
        Some(Duration::from_millis(30))
    );
}

#[test]
fn a_primary_seen_again_ends_the_outage() {
    let mut cluster = Cluster::primary_pair();
    // The link breaks at 10 s and comes back at 11 s with alpha still Primary.
    cluster.now = ms(10_000);
    for index in 0..2 {
        let session = cluster.members[index].session.take().expect("session");
        cluster.members[index]
            .node
            .on_closed(ms(10_000), PeerId(0), session, "link down".into());
    }
    cluster.settle();
    cluster.now = ms(11_000);
    cluster.connect();
    // Much later alpha is demoted and beta promoted: a switchover, not a failover.
    cluster.now = ms(60_000);
    cluster.admin(0, |n, now, id| n.demote(now, id), ms(60_000));
    cluster.now = ms(61_000);
    cluster.admin(1, |n, now, id| n.promote(now, id, false), ms(61_010));
    assert_eq!(
        cluster.node(1).last_failover(),
        Some(Duration::from_millis(10))
    );
}

#[test]
fn the_lag_is_what_the_peer_has_not_acknowledged_as_written() {
    let mut cluster = Cluster::primary_pair();
    cluster.hold_written = true;
    let lag = |cluster: &Cluster, at: Time| {
        cluster.node(0).peers()[0]
            .session()
            .expect("alpha's session")
            .written_lag(at)
    };
    assert_eq!(lag(&cluster, ms(1_000)), (0, Duration::ZERO));
    cluster.now = ms(1_000);
    cluster.write(0, 1, 0, BLOCK_BYTES);
    cluster.now = ms(1_300);
    cluster.write(0, 2, 8 * BLOCK_BYTES, 2 * BLOCK_BYTES);
    // beta received both (ACK_RECEIVED came back) but its ACK_WRITTENs are held.
    let session = cluster.node(0).peers()[0].session().expect("session");
    assert_eq!(session.received_seq, session.shipped_seq);
    assert!(session.lag.is_empty());
    let (bytes, age) = lag(&cluster, ms(1_500));
    assert!(
        bytes > 3 * BLOCK_BYTES && bytes < 4 * BLOCK_BYTES,
        "two records of 1 and 2 blocks and their headers: {bytes}"
    );
    assert_eq!(age, Duration::from_millis(500));
    // In sync mode the writes wait for exactly that acknowledgement.
    assert!(!cluster.completed(0, 1) && !cluster.completed(0, 2));
    // The acknowledgements arrive at 2 s.
    cluster.now = ms(2_000);
    cluster.hold_written = false;
    let session = cluster.members[0].session.expect("alpha's session");
    for frame in std::mem::take(&mut cluster.held) {
        cluster.members[0]
            .node
            .handle_frame(ms(2_000), PeerId(0), session, frame);
    }
    cluster.settle();
    assert_eq!(lag(&cluster, ms(2_000)), (0, Duration::ZERO));
    assert!(cluster.completed(0, 1) && cluster.completed(0, 2));
}
