//! Resync (source and target), online verify and read repair, as parts of [`Node`].
//!
//! Resync is driven by its source: it sends its out-of-sync bitmap (after merging the
//! target's, when the handshake decided the direction), then RESYNC_DATA frames —
//! only set bits, zero blocks as zero markers, optionally only blocks whose digests
//! differ — within a bounded window, clearing a bit only when the target acknowledges
//! exactly the range it was sent, then RESYNC_DONE. The target persists
//! `Inconsistent` and the merged bitmap before it takes any resync data (data frames
//! wait at the session's gate meanwhile), drops resync data for blocks the
//! replication stream rewrote since (the engine tracks them), and becomes `UpToDate`
//! only once everything is durable.

use std::time::Duration;

use super::machine::{Purpose, VerifyChunk, VerifyRun};
use super::peer::{Repl, Request, RequestKind, Source, SourcePhase, Target, TargetPhase};
use super::storage::{Completion, Storage, SuperblockChange};
use super::{
    Action, AdminError, HookKind, Mutation, Node, PeerId, RequestError, RequestId, SessionEnd,
    SessionId,
};
use crate::checksum::{block_crc, block_digest, zero_block_crc};
use crate::repl::{DiskState, Role};
use crate::superblock::StoredDiskState;
use crate::volume::BlockChecks;
use crate::wire::{BlockData, Frame, MAX_FRAME_BLOCKS};
use crate::BLOCK_BYTES;

/// Bitmap words per BITMAP frame (2 KiB: 64 MiB of the volume). Small, because only
/// frames with a bit set are sent: bits scattered over a huge volume then cost about
/// what is set, not a megabyte per region they touch.
const BITMAP_WORDS_PER_FRAME: usize = 256;
/// Set bits in a row that travel as one BITMAP_RUN rather than in BITMAP frames: the
/// span of one BITMAP frame (a run that long is 28 bytes instead of 2 KiB a frame).
const BITMAP_RUN_MIN_BLOCKS: u64 = BITMAP_WORDS_PER_FRAME as u64 * 64;
/// Resync bytes in flight (sent, not yet acknowledged).
pub(super) const RESYNC_WINDOW_BYTES: u64 = 16 << 20;
/// Most out-of-sync runs the source reads in one group.
const MAX_RUNS_PER_GROUP: usize = 64;
/// Blocks per verify request.
const VERIFY_CHUNK_BLOCKS: u64 = 4096;
/// A source that yields to client I/O waits this long after the last request.
const CLIENT_QUIET: Duration = Duration::from_millis(50);
/// How long a source waits before it rescans for bits it could not read yet.
const RESCAN_DELAY: Duration = Duration::from_millis(10);

fn protocol(text: impl Into<String>) -> SessionEnd {
    SessionEnd::Protocol(text.into())
}

/// What one BITMAP or BITMAP_RUN frame carries.
#[derive(Debug, Clone, Copy)]
pub(super) enum BitmapPart<'a> {
    /// Words from word `.0`.
    Words(u64, &'a [u64]),
    /// `.1` set bits from block `.0`.
    Run(u64, u64),
}

/// The frames that carry `storage`'s out-of-sync bitmap, none marked last. Only the
/// parts with a bit set travel, found by the bitmap's own search, which skips clean
/// extents: a run of at least `run_min_blocks` set bits is one BITMAP_RUN
/// (a fully marked 15 TiB volume is one frame), the rest go as BITMAP frames of
/// [`BITMAP_WORDS_PER_FRAME`] words around the bits. Neither a mostly clean nor a
/// fully marked bitmap of a huge volume costs memory or frames in proportion to it.
pub(super) fn bitmap_frames<S: Storage>(storage: &S, run_min_blocks: u64) -> Vec<Frame> {
    let per_frame = BITMAP_WORDS_PER_FRAME as u64;
    let blocks = storage.data_blocks();
    let mut frames = Vec::new();
    let mut from = 0u64;
    while let Some((block, run)) = storage.next_out_of_sync_run(from, u64::MAX) {
        if block >= blocks {
            break;
        }
        let run = run.min(blocks - block);
        if run >= run_min_blocks {
            frames.push(Frame::BitmapRun {
                first_block: block,
                blocks: run,
                last: false,
            });
            from = block + run;
            continue;
        }
        let first_word = block / 64 / per_frame * per_frame;
        frames.push(Frame::Bitmap {
            first_word,
            words: storage.bitmap_words_at(first_word, per_frame),
            last: false,
        });
        from = (first_word + per_frame) * 64;
    }
    frames
}

impl<S: Storage> Node<S> {
    // ----- bitmaps -----

    /// Sends our whole out-of-sync bitmap (the last frame marked).
    pub(super) fn send_bitmap(&mut self, peer: PeerId) {
        let Some(session) = self.peers[peer.0].session().map(|s| s.id) else {
            return;
        };
        let mut frames = match self.storage.as_ref() {
            // On a small volume a run of an eighth of it is long too (and the
            // simulator's small stores exercise the frame).
            Some(storage) => bitmap_frames(
                storage,
                BITMAP_RUN_MIN_BLOCKS.min((storage.data_blocks() / 8).max(64)),
            ),
            None => Vec::new(),
        };
        if self.config.mutated(Mutation::BitmapRunOneShort) {
            for frame in &mut frames {
                if let Frame::BitmapRun { blocks, .. } = frame {
                    *blocks -= 1;
                }
            }
        }
        // The last frame, possibly an empty BITMAP, says the bitmap is complete.
        match frames.last_mut() {
            Some(Frame::Bitmap { last, .. } | Frame::BitmapRun { last, .. }) => *last = true,
            _ => frames.push(Frame::Bitmap {
                first_word: 0,
                words: Vec::new(),
                last: true,
            }),
        }
        for frame in frames {
            self.send(peer, session, frame);
        }
    }

    pub(super) fn on_bitmap(
        &mut self,
        peer: PeerId,
        session: SessionId,
        part: BitmapPart<'_>,
        last: bool,
    ) -> Result<(), SessionEnd> {
        let blocks = self.storage.as_ref().map_or(0, Storage::data_blocks);
        let total_words = blocks.div_ceil(64);
        match part {
            BitmapPart::Words(first_word, words) => {
                let end = first_word.checked_add(words.len() as u64);
                if end.is_none_or(|end| end > total_words) {
                    return Err(protocol(format!(
                        "bitmap words {first_word}+{} beyond the volume's {total_words}",
                        words.len()
                    )));
                }
            }
            BitmapPart::Run(first_block, count) => {
                let end = first_block.checked_add(count);
                if count == 0 || end.is_none_or(|end| end > blocks) {
                    return Err(protocol(format!(
                        "bitmap run {first_block}+{count} empty or beyond the volume's {blocks} blocks"
                    )));
                }
            }
        }
        let role = self.role;
        let now = self.now;
        let state = self.session_of(peer, session)?;
        enum Next {
            Merge,
            SourceReady,
            EnterTarget,
        }
        if let Repl::Source(source) = &mut state.repl {
            source.progress_at = now;
        }
        let next = match &mut state.repl {
            Repl::Source(source) => match source.phase {
                SourcePhase::WaitPeerBitmap { .. } if last => {
                    source.phase = SourcePhase::Streaming;
                    Next::SourceReady
                }
                SourcePhase::WaitPeerBitmap { .. } => Next::Merge,
                _ => return Err(protocol("BITMAP while streaming a resync")),
            },
            Repl::Target(target) if target.phase == TargetPhase::WaitBitmap => {
                if last {
                    Next::EnterTarget
                } else {
                    Next::Merge
                }
            }
            Repl::Established if role == Role::Secondary => {
                // The source started without waiting for ours (a promotion with blocks
                // out of sync, a verify repair).
                state.repl = Repl::Target(Target {
                    phase: TargetPhase::WaitBitmap,
                    total_blocks: 0,
                    started: now,
                    source_current: 0,
                });
                if last {
                    Next::EnterTarget
                } else {
                    Next::Merge
                }
            }
            _ => return Err(protocol("unexpected BITMAP")),
        };
        if let Some(storage) = self.storage.as_mut() {
            match part {
                BitmapPart::Words(first_word, words) => storage.merge_bitmap_at(first_word, words),
                BitmapPart::Run(first_block, count) => storage.set_out_of_sync(first_block, count),
            }
        }
        match next {
            Next::Merge => Ok(()),
            Next::SourceReady => {
                self.begin_streaming(peer, session);
                Ok(())
            }
            Next::EnterTarget => self.enter_target(peer, session),
        }
    }

    // ----- source -----

    /// Starts a resync with this node as the source. With `wait_for_peer_bitmap`, the
    /// target's bitmap is merged first (the handshake decided the direction).
    pub(super) fn start_source(
        &mut self,
        peer: PeerId,
        wait_for_peer_bitmap: bool,
        after_crash: bool,
    ) {
        let now = self.now;
        let timing = self.config.timing;
        let checksum_first = self.config.resync.checksum_first.unwrap_or(after_crash);
        let Some(state) = self.peers[peer.0].session_mut() else {
            return;
        };
        if matches!(state.repl, Repl::Source(_)) {
            // One source per session: the running one picks up new bits.
            return;
        }
        let session = state.id;
        state.repl = Repl::Source(Box::new(Source {
            phase: if wait_for_peer_bitmap {
                SourcePhase::WaitPeerBitmap {
                    deadline: now + timing.resync_step,
                }
            } else {
                SourcePhase::Streaming
            },
            cursor: 0,
            in_flight: Default::default(),
            in_flight_bytes: 0,
            reads_pending: 0,
            checks: Default::default(),
            checksum_first,
            total_blocks: 0,
            started: now,
            sent_bytes: 0,
            wait_until: now,
            progress_at: now,
        }));
        if !wait_for_peer_bitmap {
            self.begin_streaming(peer, session);
        }
    }

    /// Sends our (merged) bitmap — the target enters SyncTarget on its last frame —
    /// then streams.
    fn begin_streaming(&mut self, peer: PeerId, session: SessionId) {
        self.send_bitmap(peer);
        let total = self
            .storage
            .as_ref()
            .map_or(0, |storage| storage.out_of_sync_blocks());
        let now = self.now;
        let name = self.peers[peer.0].config.name.clone();
        if let Some(Repl::Source(source)) = self.peers[peer.0].current(session).map(|s| &mut s.repl)
        {
            source.total_blocks = total;
            source.started = now;
        }
        self.event(format!(
            "peer {name} replication:SyncSource ({} bytes out of sync)",
            total * BLOCK_BYTES
        ));
        if let Err(why) = self.step_source(peer, session) {
            self.end_session(peer, why, false);
        }
    }

    /// Timers of a resync on this session.
    pub(super) fn tick_resync(
        &mut self,
        peer: PeerId,
        session: SessionId,
    ) -> Result<(), SessionEnd> {
        let now = self.now;
        let Some(state) = self.peers[peer.0].current(session) else {
            return Ok(());
        };
        if let Repl::Source(source) = &state.repl {
            match source.phase {
                SourcePhase::WaitPeerBitmap { deadline } if now >= deadline => {
                    return Err(protocol("peer sent no bitmap"));
                }
                SourcePhase::Done { deadline } if now >= deadline => {
                    return Err(protocol("the target did not confirm the end of the resync"));
                }
                SourcePhase::Streaming => return self.step_source(peer, session),
                _ => {}
            }
        }
        Ok(())
    }

    /// When a resync on `session` wants a timer.
    pub(super) fn resync_wake(session: &super::peer::Session) -> Option<super::Time> {
        match &session.repl {
            Repl::Source(source) => match source.phase {
                SourcePhase::WaitPeerBitmap { deadline } | SourcePhase::Done { deadline } => {
                    Some(deadline)
                }
                SourcePhase::Streaming if source.reads_pending == 0 => Some(source.wait_until),
                _ => None,
            },
            _ => None,
        }
    }

    /// Sends what the window allows: reads one group of out-of-sync runs, or finishes.
    pub(super) fn step_source(
        &mut self,
        peer: PeerId,
        session: SessionId,
    ) -> Result<(), SessionEnd> {
        let now = self.now;
        let paused = self.peers[peer.0].paused;
        let rate = self.config.resync.rate_bytes.filter(|&rate| rate > 0);
        let yield_to_clients = self.config.resync.yield_to_clients;
        let busy = self
            .last_client_io
            .is_some_and(|at| now.since(at) < CLIENT_QUIET);
        let Some(storage) = self.storage.as_mut() else {
            return Err(SessionEnd::Storage("no local disk".into()));
        };
        let Some(state) = self.peers[peer.0].current(session) else {
            return Ok(());
        };
        let Repl::Source(source) = &mut state.repl else {
            return Ok(());
        };
        if source.phase != SourcePhase::Streaming
            || paused
            || now < source.wait_until
            || source.reads_pending > 0
            || source.in_flight_bytes >= RESYNC_WINDOW_BYTES
        {
            return Ok(());
        }
        if yield_to_clients && busy {
            source.wait_until = now + Duration::from_millis(20);
            return Ok(());
        }
        if let Some(rate) = rate {
            // Fixed-rate throttle: never ahead of `rate` bytes per second on average.
            let due =
                source.started + Duration::from_secs_f64(source.sent_bytes as f64 / rate as f64);
            if due > now {
                source.wait_until = due;
                return Ok(());
            }
        }
        // A group of runs (at most one frame's worth of blocks) read together.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut group_blocks = 0u64;
        // The target serves at most MAX_SERVED requests at once (RESYNC_CHECKs count)
        // and ends a session that sends more: never have more in flight than that.
        let room_in_flight = super::peer::MAX_SERVED.saturating_sub(source.in_flight.len());
        while runs.len() < MAX_RUNS_PER_GROUP.min(room_in_flight)
            && group_blocks < u64::from(MAX_FRAME_BLOCKS)
        {
            let room = u64::from(MAX_FRAME_BLOCKS) - group_blocks;
            let Some((first_block, blocks)) = storage.next_out_of_sync_run(source.cursor, room)
            else {
                break;
            };
            source.cursor = first_block + blocks;
            group_blocks += blocks;
            runs.push((first_block, blocks));
        }
        if runs.is_empty() {
            if source.in_flight_bytes > 0 || !source.checks.is_empty() {
                return Ok(());
            }
            if storage.out_of_sync_blocks() > 0 {
                // Bits set behind the cursor (a failed block, a new mark): another pass.
                source.cursor = 0;
                source.wait_until = now + RESCAN_DELAY;
                return Ok(());
            }
            source.phase = SourcePhase::Flushing;
            let token = self.token(Purpose::FlushSource { peer, session });
            if let Some(storage) = self.storage.as_mut() {
                storage.flush(token);
            }
            return Ok(());
        }
        source.reads_pending = runs.len();
        let tokens: Vec<_> = runs
            .iter()
            .map(|&(first_block, blocks)| {
                (
                    first_block,
                    blocks,
                    Purpose::SourceRead {
                        peer,
                        session,
                        first_block,
                        blocks,
                    },
                )
            })
            .collect();
        for (first_block, blocks, purpose) in tokens {
            let token = self.token(purpose);
            if let Some(storage) = self.storage.as_mut() {
                storage.read(first_block * BLOCK_BYTES, blocks * BLOCK_BYTES, token);
            }
        }
        Ok(())
    }

    /// A source read completed: send its data (or digests first).
    fn source_read_done(
        &mut self,
        peer: PeerId,
        session: SessionId,
        first_block: u64,
        blocks: u64,
        result: Result<bytes::Bytes, crate::IoError>,
    ) -> Result<(), SessionEnd> {
        let Some(state) = self.peers[peer.0].current(session) else {
            return Ok(());
        };
        let Repl::Source(source) = &mut state.repl else {
            return Ok(());
        };
        source.reads_pending = source.reads_pending.saturating_sub(1);
        let data = result.map_err(|error| {
            SessionEnd::Storage(format!(
                "reading blocks {first_block}+{blocks} to resync: {error}"
            ))
        })?;
        let bytes = blocks * BLOCK_BYTES;
        let frame = if source.checksum_first {
            let digests = data
                .chunks(BLOCK_BYTES as usize)
                .map(block_digest)
                .collect();
            source.checks.insert(first_block, data);
            Frame::ResyncCheck {
                first_block,
                digests,
            }
        } else {
            let (frame, sent) = resync_frame(first_block, &data);
            source.sent_bytes += sent;
            self.peers[peer.0].resync_bytes += sent;
            frame
        };
        let Some(Repl::Source(source)) = self.peers[peer.0].current(session).map(|s| &mut s.repl)
        else {
            return Ok(());
        };
        if source.in_flight.is_empty() {
            source.progress_at = self.now;
        }
        source.in_flight.insert(first_block, blocks);
        source.in_flight_bytes += bytes;
        let more = source.reads_pending == 0;
        self.send(peer, session, frame);
        if more {
            self.step_source(peer, session)?;
        }
        Ok(())
    }

    pub(super) fn on_resync_ack(
        &mut self,
        peer: PeerId,
        session: SessionId,
        first_block: u64,
        blocks: u32,
    ) -> Result<(), SessionEnd> {
        let now = self.now;
        let state = self.session_of(peer, session)?;
        let Repl::Source(source) = &mut state.repl else {
            return Err(protocol("RESYNC_ACK without a resync"));
        };
        if source.in_flight.get(&first_block) != Some(&u64::from(blocks))
            || source.checks.contains_key(&first_block)
        {
            return Err(protocol(format!(
                "RESYNC_ACK for blocks {first_block}+{blocks}, which were not sent"
            )));
        }
        source.in_flight.remove(&first_block);
        source.in_flight_bytes -= u64::from(blocks) * BLOCK_BYTES;
        source.progress_at = now;
        if let Some(storage) = self.storage.as_mut() {
            storage.clear_out_of_sync(first_block, u64::from(blocks));
        }
        self.step_source(peer, session)
    }

    pub(super) fn on_resync_check_reply(
        &mut self,
        peer: PeerId,
        session: SessionId,
        first_block: u64,
        blocks: u32,
        differ: &[u64],
    ) -> Result<(), SessionEnd> {
        let now = self.now;
        let state = self.session_of(peer, session)?;
        let Repl::Source(source) = &mut state.repl else {
            return Err(protocol("RESYNC_CHECK_REPLY without a resync"));
        };
        let Some(data) = source.checks.remove(&first_block) else {
            return Err(protocol(format!(
                "RESYNC_CHECK_REPLY for blocks {first_block}, which were not checked"
            )));
        };
        let checked = source.in_flight.remove(&first_block).unwrap_or(0);
        source.in_flight_bytes -= checked * BLOCK_BYTES;
        source.progress_at = now;
        // Never trust the reply's count beyond what we asked about.
        let blocks = u64::from(blocks).min(data.len() as u64 / BLOCK_BYTES);
        let differs = |i: u64| {
            differ
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        };
        let mut frames = Vec::new();
        let mut same_blocks = 0u64;
        let mut sent_bytes = 0u64;
        let mut index = 0u64;
        while index < blocks {
            if !differs(index) {
                same_blocks += 1;
                if let Some(storage) = self.storage.as_mut() {
                    storage.clear_out_of_sync(first_block + index, 1);
                }
                index += 1;
                continue;
            }
            let start = index;
            while index < blocks && differs(index) && index - start < u64::from(MAX_FRAME_BLOCKS) {
                index += 1;
            }
            let slice = data.slice((start * BLOCK_BYTES) as usize..(index * BLOCK_BYTES) as usize);
            let (frame, sent) = resync_frame(first_block + start, &slice);
            sent_bytes += sent;
            frames.push((first_block + start, index - start, frame));
        }
        let Some(Repl::Source(source)) = self.peers[peer.0].current(session).map(|s| &mut s.repl)
        else {
            return Ok(());
        };
        source.sent_bytes += sent_bytes;
        for (first, count, _) in &frames {
            source.in_flight.insert(*first, *count);
            source.in_flight_bytes += count * BLOCK_BYTES;
        }
        let peer_state = &mut self.peers[peer.0];
        peer_state.resync_bytes += sent_bytes;
        peer_state.resync_skipped_bytes += same_blocks * BLOCK_BYTES;
        for (_, _, frame) in frames {
            self.send(peer, session, frame);
        }
        self.step_source(peer, session)
    }

    pub(super) fn on_resync_done_ack(
        &mut self,
        peer: PeerId,
        session: SessionId,
    ) -> Result<(), SessionEnd> {
        let state = self.session_of(peer, session)?;
        let Repl::Source(source) = &mut state.repl else {
            return Err(protocol("RESYNC_DONE_ACK without a resync"));
        };
        if !matches!(source.phase, SourcePhase::Done { .. }) {
            return Err(protocol("RESYNC_DONE_ACK before RESYNC_DONE"));
        }
        source.phase = SourcePhase::Closing;
        let forget_crash = self.role == Role::Secondary;
        let token = self.token(Purpose::FinishSource { peer, session });
        if let Some(storage) = self.storage.as_mut() {
            storage.update_superblock(SuperblockChange::FinishSource { forget_crash }, token);
        }
        Ok(())
    }

    fn source_finished(&mut self, peer: PeerId, session: SessionId, result: Result<(), String>) {
        if let Err(error) = result {
            self.end_session_if(peer, session, SessionEnd::Storage(error));
            return;
        }
        let name = self.peers[peer.0].config.name.clone();
        let Some(state) = self.peers[peer.0].current(session) else {
            return;
        };
        state.repl = Repl::Established;
        self.crashed_primary = false;
        self.event(format!("peer {name} replication:Established (resync done)"));
        self.hook(HookKind::SyncDone, vec![("REPLICAD_PEER", name)]);
        self.send_state(peer);
    }

    // ----- target -----

    /// The handshake made us the sync target. The source ships its writes at once,
    /// before the bitmaps are exchanged, and applying them makes our data a mix that
    /// is no prefix of anything: Inconsistent must be durable before the first one
    /// (the data channel waits), so a crash in between cannot leave a disk that
    /// claims to be UpToDate.
    pub(super) fn mark_target(&mut self, peer: PeerId, session: SessionId) {
        let token = self.token(Purpose::MarkTarget { peer, session });
        let Some(state) = self.peers[peer.0].current(session) else {
            self.tokens.remove(&token);
            return;
        };
        state.data_gate = Some(token);
        match self.storage.as_mut() {
            Some(storage) => {
                if !self.config.mutated(super::Mutation::ApplyStaleResyncData) {
                    storage.begin_resync_target();
                }
                storage.update_superblock(
                    SuperblockChange::SetDisk(StoredDiskState::Inconsistent),
                    token,
                );
            }
            None => {
                self.tokens.remove(&token);
                if let Some(state) = self.peers[peer.0].current(session) {
                    state.data_gate = None;
                }
            }
        }
    }

    /// The source's bitmap is merged: persist Inconsistent and the bitmap, then take
    /// resync data.
    fn enter_target(&mut self, peer: PeerId, session: SessionId) -> Result<(), SessionEnd> {
        if self.role == Role::Primary {
            return Err(protocol(
                "the peer tried to resync into this Primary; refusing",
            ));
        }
        let token = self.token(Purpose::EnterTarget {
            peer,
            session,
            bitmap: false,
        });
        let state = self.session_of(peer, session)?;
        if let Repl::Target(target) = &mut state.repl {
            target.phase = TargetPhase::Entering;
        }
        state.data_gate = Some(token);
        if let Some(storage) = self.storage.as_mut() {
            // From here on, blocks the replication stream writes are tracked, so
            // resync data read before them is dropped as stale.
            if !self.config.mutated(super::Mutation::ApplyStaleResyncData) {
                storage.begin_resync_target();
            }
            storage.update_superblock(
                SuperblockChange::SetDisk(StoredDiskState::Inconsistent),
                token,
            );
        }
        Ok(())
    }

    fn target_entered(
        &mut self,
        peer: PeerId,
        session: SessionId,
        bitmap: bool,
        result: Result<(), String>,
    ) {
        if let Err(error) = result {
            self.end_session_if(
                peer,
                session,
                SessionEnd::Storage(format!("cannot enter SyncTarget: {error}")),
            );
            return;
        }
        if !bitmap {
            // The merged bits must be durable before any resync data is acknowledged:
            // the source clears its bits on our acknowledgement.
            let token = self.token(Purpose::EnterTarget {
                peer,
                session,
                bitmap: true,
            });
            match self.peers[peer.0].current(session) {
                Some(state) => state.data_gate = Some(token),
                None => {
                    self.tokens.remove(&token);
                    return;
                }
            }
            if let Some(storage) = self.storage.as_mut() {
                storage.persist_bitmap(token);
            }
            return;
        }
        let total = self
            .storage
            .as_ref()
            .map_or(0, |storage| storage.out_of_sync_blocks());
        let now = self.now;
        let name = self.peers[peer.0].config.name.clone();
        let Some(state) = self.peers[peer.0].current(session) else {
            return;
        };
        state.data_gate = None;
        if let Repl::Target(target) = &mut state.repl {
            target.phase = TargetPhase::Receiving;
            target.total_blocks = total;
            target.started = now;
        }
        self.event(format!(
            "disk:Inconsistent peer {name} replication:SyncTarget ({} bytes to receive)",
            total * BLOCK_BYTES
        ));
        self.send_state(peer);
        self.release_deferred(peer, session);
    }

    fn receiving(
        &mut self,
        peer: PeerId,
        session: SessionId,
        what: &str,
    ) -> Result<(), SessionEnd> {
        match &self.session_of(peer, session)?.repl {
            Repl::Target(target) if target.phase == TargetPhase::Receiving => Ok(()),
            _ => Err(protocol(format!("{what} outside a resync"))),
        }
    }

    pub(super) fn on_resync_data(
        &mut self,
        peer: PeerId,
        session: SessionId,
        data: BlockData,
    ) -> Result<(), SessionEnd> {
        self.receiving(peer, session, "RESYNC_DATA")?;
        let blocks = u64::from(data.blocks);
        let in_volume = self.storage.as_ref().is_some_and(|storage| {
            data.first_block
                .checked_add(blocks)
                .is_some_and(|end| blocks > 0 && end <= storage.data_blocks())
        });
        if !in_volume {
            return Err(protocol(format!(
                "resync range {}+{blocks} is outside the volume",
                data.first_block
            )));
        }
        if data.data.is_some() {
            self.peers[peer.0].resync_bytes += blocks * BLOCK_BYTES;
        }
        let token = self.token(Purpose::ResyncWrite {
            peer,
            session,
            first_block: data.first_block,
            blocks: data.blocks,
        });
        if let Some(storage) = self.storage.as_mut() {
            storage.write_resync(data.first_block, blocks, data.data, data.crcs, token);
        }
        Ok(())
    }

    pub(super) fn on_resync_check(
        &mut self,
        peer: PeerId,
        session: SessionId,
        first_block: u64,
        digests: Vec<u64>,
    ) -> Result<(), SessionEnd> {
        self.receiving(peer, session, "RESYNC_CHECK")?;
        let count = digests.len() as u64;
        let in_range = self.storage.as_ref().is_some_and(|storage| {
            first_block
                .checked_add(count)
                .is_some_and(|end| end <= storage.data_blocks())
        });
        if !in_range {
            // Blocks outside the volume "differ": their data is then refused clearly.
            self.send_check_reply(peer, session, first_block, &digests, None);
            return Ok(());
        }
        self.serve_one(peer, session)?;
        let token = self.token(Purpose::ResyncCheck {
            peer,
            session,
            first_block,
            digests,
        });
        if let Some(storage) = self.storage.as_mut() {
            storage.check_blocks(first_block, count, token);
        }
        Ok(())
    }

    /// Answers a RESYNC_CHECK: bit i set when block `first_block + i` differs (by
    /// digest of the data as read) or its data fails its own checksum.
    fn send_check_reply(
        &mut self,
        peer: PeerId,
        session: SessionId,
        first_block: u64,
        digests: &[u64],
        checks: Option<&BlockChecks>,
    ) {
        let mut differ = vec![0u64; digests.len().div_ceil(64)];
        for (index, digest) in digests.iter().enumerate() {
            let same = checks.is_some_and(|c| {
                c.digests.get(index) == Some(digest) && c.stored.get(index) == c.actual.get(index)
            });
            if !same {
                differ[index / 64] |= 1 << (index % 64);
            }
        }
        self.send(
            peer,
            session,
            Frame::ResyncCheckReply {
                first_block,
                blocks: digests.len() as u32,
                differ,
            },
        );
    }

    /// Our journal is durable: the resync may end.
    fn source_flushed(
        &mut self,
        peer: PeerId,
        session: SessionId,
        result: Result<(), crate::IoError>,
    ) {
        if let Err(error) = result {
            self.end_session_if(
                peer,
                session,
                SessionEnd::Storage(format!("cannot flush before ending the resync: {error}")),
            );
            return;
        }
        let now = self.now;
        let deadline = now + self.config.timing.resync_step;
        let Some(current) = self
            .storage
            .as_ref()
            .map(|storage| storage.superblock().generations.current)
        else {
            return;
        };
        let Some(state) = self.peers[peer.0].current(session) else {
            return;
        };
        let Repl::Source(source) = &mut state.repl else {
            return;
        };
        if source.phase != SourcePhase::Flushing {
            return;
        }
        source.phase = SourcePhase::Done { deadline };
        self.send(peer, session, Frame::ResyncDone { current });
    }

    pub(super) fn on_resync_done(
        &mut self,
        peer: PeerId,
        session: SessionId,
        current: u64,
    ) -> Result<(), SessionEnd> {
        self.receiving(peer, session, "RESYNC_DONE")?;
        let token = self.token(Purpose::FinishTarget {
            peer,
            session,
            generation: false,
        });
        if let Repl::Target(target) = &mut self.session_of(peer, session)?.repl {
            target.phase = TargetPhase::Finishing;
            target.source_current = current;
        }
        if let Some(storage) = self.storage.as_mut() {
            storage.make_resync_durable(token);
        }
        Ok(())
    }

    fn target_finished(
        &mut self,
        peer: PeerId,
        session: SessionId,
        generation: bool,
        result: Result<(), String>,
    ) {
        if let Err(error) = result {
            self.end_session_if(peer, session, SessionEnd::Storage(error));
            return;
        }
        let name = self.peers[peer.0].config.name.clone();
        let Some(state) = self.peers[peer.0].current(session) else {
            return;
        };
        let Repl::Target(target) = &state.repl else {
            return;
        };
        let current = target.source_current;
        if !generation {
            let left = self
                .storage
                .as_ref()
                .map_or(0, |storage| storage.out_of_sync_blocks());
            if let Some(storage) = self.storage.as_mut() {
                if left > 0 {
                    // The source sent everything it had: what is still marked here is
                    // covered by its data.
                    let blocks = storage.data_blocks();
                    storage.clear_out_of_sync(0, blocks);
                }
            }
            let token = self.token(Purpose::FinishTarget {
                peer,
                session,
                generation: true,
            });
            let forget_crash = self.role == Role::Secondary;
            if let Some(storage) = self.storage.as_mut() {
                storage.update_superblock(
                    SuperblockChange::FinishTarget {
                        current,
                        forget_crash,
                    },
                    token,
                );
            }
            return;
        }
        state.repl = Repl::Established;
        self.crashed_primary = false;
        if let Some(storage) = self.storage.as_mut() {
            storage.end_resync_target();
        }
        self.send(peer, session, Frame::ResyncDoneAck);
        self.send_state(peer);
        self.event(format!(
            "disk:UpToDate peer {name} replication:Established (resync done)"
        ));
        self.hook(HookKind::SyncDone, vec![("REPLICAD_PEER", name)]);
    }

    // ----- verify -----

    /// A peer usable for verify and read repair: connected, UpToDate, replicating.
    pub(super) fn usable_peer(&self) -> Option<(PeerId, SessionId)> {
        self.peers.iter().find_map(|peer| {
            let session = peer.session()?;
            let usable = session.peer_state.disk == DiskState::UpToDate
                && matches!(session.repl, Repl::Established | Repl::Verify);
            usable.then_some((peer.id, session.id))
        })
    }

    pub(super) fn start_verify(&mut self, admin: super::AdminId, repair: bool) {
        if self.verify.is_some() {
            self.admin_done(admin, Err(AdminError::Busy("verify")));
            return;
        }
        if repair && self.role != Role::Primary {
            // A repair streams this node's blocks over the peer's: only the Primary's
            // data is the reference (a Secondary that lags would undo writes).
            self.admin_done(
                admin,
                Err(AdminError::Refused(
                    "verify --repair runs on the Primary (its data is the reference); here it only reports".into(),
                )),
            );
            return;
        }
        let connected = self
            .peers
            .iter()
            .find_map(|peer| peer.session().map(|s| (peer.id, s)));
        let Some((peer, session)) = connected.map(|(peer, s)| (peer, s.id)) else {
            self.admin_done(
                admin,
                Err(AdminError::Refused(
                    "verify needs a connected, UpToDate peer".into(),
                )),
            );
            return;
        };
        // Exactly Established: a sync target still waiting for the source's bitmap
        // shows as Established too, but its data is about to be resynced.
        let state = self.peers[peer.0].session().map(|s| {
            let established = matches!(s.repl, Repl::Established);
            let shown = if matches!(s.repl, Repl::Target(_)) {
                crate::repl::ReplicationState::SyncTarget
            } else {
                s.replication_state(false)
            };
            (s.peer_state.disk, established, shown)
        });
        match state {
            Some((DiskState::UpToDate, true, _)) => {}
            Some((DiskState::UpToDate, false, other)) => {
                self.admin_done(
                    admin,
                    Err(AdminError::Refused(format!(
                        "verify needs an established connection (now {other})"
                    ))),
                );
                return;
            }
            _ => {
                self.admin_done(
                    admin,
                    Err(AdminError::Refused(
                        "verify needs a connected, UpToDate peer".into(),
                    )),
                );
                return;
            }
        }
        if let Some(state) = self.peers[peer.0].session_mut() {
            state.repl = Repl::Verify;
        }
        let name = self.peers[peer.0].config.name.clone();
        self.event(format!("peer {name} replication:VerifyS"));
        self.verify = Some(VerifyRun {
            admin,
            peer,
            session,
            repair,
            next_block: 0,
            chunk: None,
            suspects: Vec::new(),
            rechecking: None,
        });
        self.verify_next_chunk();
    }

    fn verify_next_chunk(&mut self) {
        let blocks_total = self
            .storage
            .as_ref()
            .map_or(0, |storage| storage.data_blocks());
        let Some(run) = self.verify.as_mut() else {
            return;
        };
        let (first_block, blocks) = if let Some((to_check, _)) = run.rechecking.as_mut() {
            match to_check.pop() {
                Some(block) => (block, 1),
                None => return self.finish_verify(),
            }
        } else if run.next_block < blocks_total {
            let count = VERIFY_CHUNK_BLOCKS.min(blocks_total - run.next_block);
            (run.next_block, count)
        } else {
            // Writes in flight can make a block differ for a moment: check the
            // suspects again, one by one.
            let mut suspects = std::mem::take(&mut run.suspects);
            suspects.reverse();
            run.rechecking = Some((suspects, Vec::new()));
            return self.verify_next_chunk();
        };
        run.chunk = Some(VerifyChunk {
            first_block,
            blocks,
            local: None,
            remote: None,
        });
        let (peer, session) = (run.peer, run.session);
        let deadline = self.now + self.config.timing.request;
        let Some(state) = self.peers[peer.0].current(session) else {
            return;
        };
        let id = state.next_request;
        state.next_request += 1;
        state.requests.insert(
            id,
            Request {
                deadline,
                kind: RequestKind::Verify {
                    first_block,
                    blocks,
                },
            },
        );
        self.send(
            peer,
            session,
            Frame::VerifyRequest {
                id,
                first_block,
                blocks: blocks as u32,
            },
        );
        let token = self.token(Purpose::VerifyLocal { first_block });
        if let Some(storage) = self.storage.as_mut() {
            storage.check_blocks(first_block, blocks, token);
        }
    }

    pub(super) fn on_verify_reply(
        &mut self,
        peer: PeerId,
        session: SessionId,
        id: u64,
        first_block: u64,
        checks: BlockChecks,
    ) -> Result<(), SessionEnd> {
        let state = self.session_of(peer, session)?;
        let Some(request) = state.requests.remove(&id) else {
            return Err(protocol(format!("VERIFY_REPLY for unknown request {id}")));
        };
        let RequestKind::Verify {
            first_block: asked,
            blocks,
        } = request.kind
        else {
            return Err(protocol("VERIFY_REPLY to a read request"));
        };
        let count = blocks as usize;
        if first_block != asked
            || checks.stored.len() != count
            || checks.actual.len() != count
            || checks.digests.len() != count
        {
            return Err(protocol("the peer answered verify for the wrong range"));
        }
        if let Some(chunk) = self
            .verify
            .as_mut()
            .and_then(|run| run.chunk.as_mut())
            .filter(|chunk| chunk.first_block == first_block)
        {
            chunk.remote = Some(checks);
        }
        self.verify_compare();
        Ok(())
    }

    fn verify_local_done(&mut self, first_block: u64, result: Result<BlockChecks, crate::IoError>) {
        match result {
            Ok(checks) => {
                if let Some(chunk) = self
                    .verify
                    .as_mut()
                    .and_then(|run| run.chunk.as_mut())
                    .filter(|chunk| chunk.first_block == first_block)
                {
                    chunk.local = Some(checks);
                }
                self.verify_compare();
            }
            Err(error) => {
                if let Some(run) = self.verify.take() {
                    self.end_verify_state(run.peer, run.session);
                    self.admin_done(run.admin, Err(AdminError::Storage(error.to_string())));
                }
            }
        }
    }

    /// Both sides of the chunk are in: note what differs and go on.
    fn verify_compare(&mut self) {
        let Some(run) = self.verify.as_mut() else {
            return;
        };
        let Some(chunk) = run.chunk.as_ref() else {
            return;
        };
        let (Some(local), Some(remote)) = (chunk.local.as_ref(), chunk.remote.as_ref()) else {
            return;
        };
        // A block differs if the data differs (by digest), or either side's data does
        // not match its own stored checksum.
        let differing: Vec<u64> = (0..chunk.blocks as usize)
            .filter(|&i| {
                local.digests.get(i) != remote.digests.get(i)
                    || local.stored.get(i) != local.actual.get(i)
                    || remote.stored.get(i) != remote.actual.get(i)
            })
            .map(|i| chunk.first_block + i as u64)
            .collect();
        let blocks = chunk.blocks;
        run.chunk = None;
        match run.rechecking.as_mut() {
            Some((_, confirmed)) => confirmed.extend(differing),
            None => {
                run.suspects.extend(differing);
                run.next_block += blocks;
            }
        }
        self.verify_next_chunk();
    }

    fn end_verify_state(&mut self, peer: PeerId, session: SessionId) {
        if let Some(state) = self.peers[peer.0].current(session) {
            if matches!(state.repl, Repl::Verify) {
                state.repl = Repl::Established;
            }
        }
    }

    fn finish_verify(&mut self) {
        let Some(run) = self.verify.take() else {
            return;
        };
        let confirmed = run
            .rechecking
            .map(|(_, confirmed)| confirmed)
            .unwrap_or_default();
        self.end_verify_state(run.peer, run.session);
        let found = confirmed.len() as u64;
        self.peers[run.peer.0].verify_out_of_sync = Some(found);
        if let Some(storage) = self.storage.as_mut() {
            for block in &confirmed {
                storage.set_out_of_sync(*block, 1);
            }
        }
        let name = self.peers[run.peer.0].config.name.clone();
        self.event(format!(
            "peer {name} verify done: {found} blocks out of sync"
        ));
        if run.repair && found > 0 {
            self.start_source(run.peer, false, false);
        }
        let mut blocks = confirmed;
        blocks.sort_unstable();
        self.admin_done(run.admin, Ok(super::AdminOutput::Verify { blocks }));
    }

    // ----- read repair -----

    /// A client read found a corrupt block: fetch it from an UpToDate peer and rewrite
    /// it (a Primary only: a read never writes on a Secondary). Completes `id` when the
    /// block is repaired (the driver reads again) or cannot be.
    pub fn on_read_error(&mut self, now: super::Time, id: RequestId, block: u64) {
        self.now = now;
        let unrepairable = |why: &str| RequestError::Unrepairable {
            block,
            why: why.to_string(),
        };
        if self.role != Role::Primary {
            self.actions.push_back(Action::Complete {
                id,
                result: Err(unrepairable(
                    "this node is Secondary, and a read never writes here",
                )),
            });
            return;
        }
        let Some((peer, session)) = self.usable_peer() else {
            self.actions.push_back(Action::Complete {
                id,
                result: Err(unrepairable("the peer is not connected and UpToDate")),
            });
            return;
        };
        self.repairs.insert(block, (id, false));
        self.request_read(peer, session, RequestKind::Repair { id, block }, block, 1);
    }

    /// Sends a READ_REQUEST for `blocks` from `first_block`, answered by `kind`.
    pub(super) fn request_read(
        &mut self,
        peer: PeerId,
        session: SessionId,
        kind: RequestKind,
        first_block: u64,
        blocks: u32,
    ) {
        let deadline = self.now + self.config.timing.request;
        let Some(state) = self.peers[peer.0].current(session) else {
            return;
        };
        let request = state.next_request;
        state.next_request += 1;
        state.requests.insert(request, Request { deadline, kind });
        self.send(
            peer,
            session,
            Frame::ReadRequest {
                id: request,
                first_block,
                blocks,
            },
        );
    }

    /// A client read served by an UpToDate peer: on a diskless Primary, or (with
    /// `rewrite`) after the local store failed the read — then the blocks are written
    /// back here unless a client write raced the request. Completes with
    /// [`Action::ReadDone`]: whole blocks from `offset`'s block. At most
    /// [`crate::wire::MAX_FRAME_BLOCKS`] blocks (one READ_REPLY): larger reads are split
    /// by the caller.
    pub fn read_from_peer(
        &mut self,
        now: super::Time,
        id: RequestId,
        offset: u64,
        length: u64,
        rewrite: bool,
    ) {
        self.now = now;
        let size = self.size_bytes();
        if length == 0 || offset.checked_add(length).is_none_or(|end| end > size) {
            self.read_done(
                id,
                Err(RequestError::Io(crate::IoError::OutOfRange {
                    op: "read",
                    offset,
                    length,
                    size_bytes: size,
                })),
            );
            return;
        }
        let first_block = offset / BLOCK_BYTES;
        let end_block = (offset + length).div_ceil(BLOCK_BYTES);
        let blocks = u32::try_from(end_block - first_block).unwrap_or(u32::MAX);
        if blocks > crate::wire::MAX_FRAME_BLOCKS {
            // One READ_REPLY carries at most this much: the driver splits reads.
            self.read_done(
                id,
                Err(RequestError::Io(crate::IoError::TooLarge {
                    op: "read from the peer",
                    length,
                    limit: u64::from(crate::wire::MAX_FRAME_BLOCKS) * BLOCK_BYTES,
                })),
            );
            return;
        }
        let target = if self.role == Role::Primary {
            self.diskless_peers().first().copied()
        } else {
            None
        };
        let Some((peer, session)) = target else {
            self.read_done(
                id,
                Err(RequestError::Io(crate::IoError::Failed(
                    "the local disk cannot serve this read and no UpToDate peer is connected"
                        .into(),
                ))),
            );
            return;
        };
        if rewrite {
            for block in first_block..end_block {
                self.repairs.insert(block, (id, false));
            }
        }
        let kind = RequestKind::Read {
            id,
            first_block,
            blocks,
            rewrite,
            balanced: None,
        };
        self.request_read(peer, session, kind, first_block, blocks);
    }

    pub(super) fn read_done(&mut self, id: RequestId, result: Result<bytes::Bytes, RequestError>) {
        self.actions.push_back(Action::ReadDone { id, result });
    }

    /// The peer's answer to [`Node::read_from_peer`].
    fn on_peer_read(
        &mut self,
        peer: PeerId,
        id: RequestId,
        range: (u64, u32),
        rewrite: bool,
        data: Option<BlockData>,
        error: Option<String>,
    ) -> Result<(), SessionEnd> {
        let (first_block, blocks) = range;
        let touched = rewrite
            && (first_block..first_block + u64::from(blocks))
                .filter_map(|block| self.repairs.remove(&block))
                .any(|(_, touched)| touched);
        let data = match (data, error) {
            (Some(data), _) => data,
            (None, error) => {
                let why = error.unwrap_or_else(|| "read failed".into());
                self.read_done(
                    id,
                    Err(RequestError::Io(crate::IoError::Failed(
                        format!("the peer could not serve the read: {why}").into(),
                    ))),
                );
                return Ok(());
            }
        };
        if data.first_block != first_block || data.blocks != blocks {
            return Err(protocol(format!(
                "READ_REPLY for blocks {}+{} to a request for blocks {first_block}+{blocks}",
                data.first_block, data.blocks
            )));
        }
        let bytes = data.data.unwrap_or_else(|| {
            bytes::Bytes::from(vec![0u8; blocks as usize * BLOCK_BYTES as usize])
        });
        if rewrite && !touched && self.storage.is_some() {
            self.event(format!(
                "read error: blocks {first_block}+{blocks} served by the peer, rewritten here"
            ));
            self.repaired_blocks += u64::from(blocks);
            let internal = self.internal_request();
            self.on_write(
                self.now,
                internal,
                crate::WriteRequest {
                    offset: first_block * BLOCK_BYTES,
                    kind: crate::WriteKind::Data(bytes.clone()),
                    fua: false,
                },
            );
        }
        self.peers[peer.0].reads.served += 1;
        self.read_done(id, Ok(bytes));
        Ok(())
    }

    pub(super) fn on_read_reply(
        &mut self,
        peer: PeerId,
        session: SessionId,
        request: u64,
        data: Option<BlockData>,
        error: Option<String>,
    ) -> Result<(), SessionEnd> {
        let state = self.session_of(peer, session)?;
        let Some(pending) = state.requests.remove(&request) else {
            return Err(protocol(format!(
                "READ_REPLY for unknown request {request}"
            )));
        };
        let (id, block) = match pending.kind {
            RequestKind::Repair { id, block } => (id, block),
            RequestKind::Read {
                id,
                first_block,
                blocks,
                balanced: Some(balanced),
                ..
            } => {
                return self.on_balanced_reply(
                    peer,
                    id,
                    balanced,
                    (first_block, blocks),
                    data,
                    error,
                )
            }
            RequestKind::Read {
                id,
                first_block,
                blocks,
                rewrite,
                balanced: None,
            } => return self.on_peer_read(peer, id, (first_block, blocks), rewrite, data, error),
            RequestKind::Verify { .. } => {
                return Err(protocol("READ_REPLY to a verify request"));
            }
        };
        let touched = self
            .repairs
            .remove(&block)
            .is_some_and(|(_, touched)| touched);
        let data = match (data, error) {
            (Some(data), _) => data,
            (None, error) => {
                let why = format!(
                    "the peer's copy is bad too ({})",
                    error.unwrap_or_else(|| "read failed".into())
                );
                self.actions.push_back(Action::Complete {
                    id,
                    result: Err(RequestError::Unrepairable { block, why }),
                });
                return Ok(());
            }
        };
        if data.first_block != block || data.blocks != 1 {
            return Err(protocol(format!(
                "READ_REPLY for blocks {}+{} to a request for block {block}",
                data.first_block, data.blocks
            )));
        }
        if touched {
            // A client write to the block raced the repair: it holds newer data than
            // the peer's reply; the driver's second read sees it.
            self.actions
                .push_back(Action::Complete { id, result: Ok(()) });
            return Ok(());
        }
        let bytes = data
            .data
            .unwrap_or_else(|| bytes::Bytes::from(vec![0u8; BLOCK_BYTES as usize]));
        self.event(format!("repairing block {block} from the peer's copy"));
        self.repaired_blocks += 1;
        // The repair write is journaled (and replicated) like any write; its
        // completion completes the client's read request.
        self.on_write(
            self.now,
            id,
            crate::WriteRequest {
                offset: block * BLOCK_BYTES,
                kind: crate::WriteKind::Data(bytes),
                fua: false,
            },
        );
        Ok(())
    }

    // ----- completions of this module -----

    /// Completions of resync, verify and the operator's commands.
    pub(super) fn on_storage_more(&mut self, purpose: Purpose, completion: Completion) {
        match (purpose, completion) {
            (
                Purpose::SourceRead {
                    peer,
                    session,
                    first_block,
                    blocks,
                },
                Completion::Read(result),
            ) => {
                if let Err(why) = self.source_read_done(peer, session, first_block, blocks, result)
                {
                    self.end_session_if(peer, session, why);
                }
            }
            (Purpose::FlushSource { peer, session }, Completion::Flushed(result)) => {
                self.source_flushed(peer, session, result);
            }
            (Purpose::FinishSource { peer, session }, Completion::Persisted(result)) => {
                self.source_finished(peer, session, result);
            }
            (
                Purpose::EnterTarget {
                    peer,
                    session,
                    bitmap,
                },
                Completion::Persisted(result),
            ) => self.target_entered(peer, session, bitmap, result),
            (
                Purpose::ResyncWrite {
                    peer,
                    session,
                    first_block,
                    blocks,
                },
                Completion::ResyncQueued(result),
            ) => match result {
                Ok(_) => {
                    if self.peers[peer.0].current(session).is_some() {
                        self.send(
                            peer,
                            session,
                            Frame::ResyncAck {
                                first_block,
                                blocks,
                            },
                        );
                    }
                }
                Err(error) => self.end_session_if(
                    peer,
                    session,
                    SessionEnd::Storage(format!("writing resync data: {error}")),
                ),
            },
            (
                Purpose::ResyncCheck {
                    peer,
                    session,
                    first_block,
                    digests,
                },
                Completion::Checked(result),
            ) => {
                if self.served_one(peer, session) {
                    self.send_check_reply(
                        peer,
                        session,
                        first_block,
                        &digests,
                        result.as_ref().ok(),
                    );
                }
            }
            (
                Purpose::FinishTarget {
                    peer,
                    session,
                    generation,
                },
                Completion::Persisted(result),
            ) => self.target_finished(peer, session, generation, result),
            (Purpose::VerifyLocal { first_block }, Completion::Checked(result)) => {
                self.verify_local_done(first_block, result)
            }
            (Purpose::Admin(admin, step), Completion::Persisted(result)) => {
                self.admin_step_done(admin, step, result)
            }
            (Purpose::Admin(admin, step), Completion::Flushed(result)) => {
                self.admin_step_done(admin, step, result.map_err(|error| error.to_string()))
            }
            (purpose, completion) => {
                // A completion of the wrong kind is a bug of the storage adapter.
                debug_assert!(
                    false,
                    "unexpected completion {completion:?} for {purpose:?}"
                );
            }
        }
    }
}

/// A RESYNC_DATA frame for whole blocks starting at `first_block` (zero blocks as a
/// zero marker); returns it and the data bytes it carries.
fn resync_frame(first_block: u64, data: &bytes::Bytes) -> (Frame, u64) {
    let crcs: Vec<u32> = data.chunks(BLOCK_BYTES as usize).map(block_crc).collect();
    let all_zero = crcs.iter().all(|crc| *crc == zero_block_crc()) && data.iter().all(|&b| b == 0);
    let blocks = crcs.len() as u32;
    let sent = if all_zero { 0 } else { data.len() as u64 };
    (
        Frame::ResyncData(BlockData {
            first_block,
            blocks,
            crcs,
            data: (!all_zero).then(|| data.clone()),
        }),
        sent,
    )
}
