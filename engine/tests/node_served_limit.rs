//! The state machine bounds the work a peer can queue on this node: READ_REQUEST,
//! VERIFY_REQUEST and RESYNC_CHECK each start a storage operation whose answer goes
//! back to the peer, and at most `MAX_SERVED` of them may be in progress per session.
//! A peer that sends more is disconnected with a protocol error (and nothing more is
//! queued); answering frees the slots again.
//!
//! Driven by hand, without sockets: one Secondary node on a simulated store, the test
//! playing its peer. Storage completions are delivered only when the test says so, so
//! the requests stay "in progress" for as long as the test needs.

use std::sync::Arc;

use engine::backend::sim::SimBackend;
use engine::backend::Backend;
use engine::node::peer::{Repl, TargetPhase, MAX_SERVED};
use engine::node::storage::{CompletionQueue, Storage, VolumeStorage};
use engine::node::{Node, PeerId, SessionEnd, SessionId, Time};
use engine::repl::{ConnectionState, DiskState, Role};
use engine::wire::{Frame, PeerState};

const UUID: [u8; 16] = *b"served-limit-tst";
const PEER: PeerId = PeerId(0);

struct Harness {
    node: Node<VolumeStorage>,
    queue: CompletionQueue,
    session: SessionId,
}

impl Harness {
    /// beta (node id 1), Secondary, connected to alpha (the test), in sync.
    fn start() -> Harness {
        let backend: Arc<dyn Backend> = Arc::new(SimBackend::new(16 << 20));
        let (mut node, _volume, queue) =
            engine::testing::manual_node(backend, UUID, "beta", 1, &[("alpha", 0)]);
        let session = node.on_connected(Time::ZERO, PEER).expect("accepted");
        let storage = node.storage().expect("attached");
        let state = PeerState {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            generations: storage.superblock().generations,
            crashed_primary: false,
            discard_my_data: false,
            dirty_blocks: 0,
            next_seq: storage.next_seq(),
            size_bytes: storage.size_bytes(),
        };
        let mut harness = Harness {
            node,
            queue,
            session,
        };
        harness.frame(Frame::State(state));
        harness.complete_all();
        assert!(harness.connected(), "{:?}", harness.last_error());
        harness
    }

    fn frame(&mut self, frame: Frame) {
        self.node
            .handle_frame(Time::ZERO, PEER, self.session, frame);
        while self.node.poll_action().is_some() {}
    }

    /// Delivers every storage completion (and those they cause).
    fn complete_all(&mut self) {
        for _ in 0..1000 {
            let done = self.queue.drain();
            if done.is_empty() {
                return;
            }
            for (token, completion) in done {
                self.node.on_storage(Time::ZERO, token, completion);
            }
            while self.node.poll_action().is_some() {}
        }
        panic!("storage completions never stop");
    }

    fn connected(&self) -> bool {
        self.node.peers()[PEER.0].connection_state() == ConnectionState::Connected
    }

    fn last_error(&self) -> Option<SessionEnd> {
        self.node.peers()[PEER.0].last_error.clone()
    }

    /// Sends `MAX_SERVED` requests made by `request` (none answered): the session
    /// holds; one more ends it as a protocol error.
    fn flood(&mut self, request: impl Fn(u64) -> Frame) {
        for id in 0..MAX_SERVED as u64 {
            self.frame(request(id));
            assert!(self.connected(), "request {id}: {:?}", self.last_error());
        }
        assert!(!self.queue.is_empty(), "the requests were not started");
        self.frame(request(MAX_SERVED as u64));
        assert!(!self.connected(), "a peer queued more than {MAX_SERVED}");
        assert_eq!(
            self.last_error(),
            Some(SessionEnd::Protocol(format!(
                "more than {MAX_SERVED} requests at once"
            )))
        );
        assert_eq!(self.last_error().map(|e| e.kind()), Some("protocol"));
    }

    /// Answering frees the slots: `MAX_SERVED` more are taken.
    fn answered_requests_free_their_slots(&mut self, request: impl Fn(u64) -> Frame) {
        for round in 0..2u64 {
            for id in 0..MAX_SERVED as u64 {
                self.frame(request(round * 1000 + id));
            }
            assert!(self.connected(), "round {round}: {:?}", self.last_error());
            self.complete_all();
        }
    }
}

fn verify_request(id: u64) -> Frame {
    Frame::VerifyRequest {
        id,
        first_block: id % 64,
        blocks: 4,
    }
}

fn read_request(id: u64) -> Frame {
    Frame::ReadRequest {
        id,
        first_block: id % 64,
        blocks: 1,
    }
}

fn resync_check(id: u64) -> Frame {
    Frame::ResyncCheck {
        first_block: id % 64,
        digests: vec![0; 2],
    }
}

#[test]
fn verify_requests_in_progress_are_bounded() {
    let mut harness = Harness::start();
    harness.answered_requests_free_their_slots(verify_request);
    harness.flood(verify_request);
}

#[test]
fn read_requests_in_progress_are_bounded() {
    let mut harness = Harness::start();
    harness.answered_requests_free_their_slots(read_request);
    harness.flood(read_request);
}

#[test]
fn resync_checks_in_progress_are_bounded() {
    let mut harness = Harness::start();
    // The primary starts a resync towards us: its bitmap (block 0 out of sync).
    harness.frame(Frame::Bitmap {
        first_word: 0,
        words: vec![1],
        last: true,
    });
    harness.complete_all();
    let receiving = harness.node.peers()[PEER.0].session().is_some_and(|session| {
        matches!(&session.repl, Repl::Target(target) if target.phase == TargetPhase::Receiving)
    });
    assert!(
        receiving,
        "not a receiving sync target: {:?}",
        harness.last_error()
    );
    harness.answered_requests_free_their_slots(resync_check);
    harness.flood(resync_check);
}
