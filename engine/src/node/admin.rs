//! The operator's commands, as parts of [`Node`]: promote, demote, connect,
//! disconnect, pause and resume a resync, invalidate, new-current-uuid, verify.
//!
//! A command that must persist something answers later with [`Action::AdminDone`];
//! only one such command runs at a time (the others are refused as busy). The role
//! rules are `repl::decide_promote` (P4: never two primaries).

use super::machine::{AdminStep, DemotePhase, Demoting, Promotion, Purpose};
use super::peer::{Conn, Repl};
use super::storage::{Storage, SuperblockChange};
use super::{Action, AdminError, AdminId, AdminOutput, HookKind, Node, SessionEnd, Time};
use crate::gen::JUST_CREATED;
use crate::repl::{self, ConnectionState, DiskState, PromoteAction, PromoteFacts, Role};
use crate::superblock::StoredDiskState;
use crate::wire::Frame;

impl<S: Storage> Node<S> {
    pub(super) fn admin_done(&mut self, id: AdminId, result: Result<AdminOutput, AdminError>) {
        self.actions.push_back(Action::AdminDone { id, result });
    }

    fn message(&mut self, id: AdminId, text: String) {
        self.admin_done(id, Ok(AdminOutput::Message(text)));
    }

    /// Starts a command that persists something, unless another one runs.
    fn begin_admin(&mut self, id: AdminId, what: &'static str) -> bool {
        if let Some(running) = self.admin_busy {
            self.admin_done(id, Err(AdminError::Busy(running)));
            return false;
        }
        // A diskless Primary can still demote (through its peers' FLUSH).
        if self.storage.is_none() && !(what == "demote" && self.is_diskless_primary()) {
            self.admin_done(id, Err(AdminError::NoDisk));
            return false;
        }
        self.admin_busy = Some(what);
        true
    }

    fn persist(&mut self, id: AdminId, step: AdminStep, change: SuperblockChange) {
        let token = self.token(Purpose::Admin(id, step));
        match self.storage.as_mut() {
            Some(storage) => storage.update_superblock(change, token),
            None => {
                self.tokens.remove(&token);
                self.admin_busy = None;
                self.admin_done(id, Err(AdminError::NoDisk));
            }
        }
    }

    /// Every peer is connected, replicating in sync and UpToDate: a new generation can
    /// be shared with them instead of tracked in the bitmap.
    fn peers_in_sync(&self) -> bool {
        self.peers.iter().all(|peer| {
            peer.session().is_some_and(|session| {
                matches!(session.repl, Repl::Established | Repl::Verify)
                    && session.peer_state.disk == DiskState::UpToDate
            })
        })
    }

    /// `replctl promote` (P4 rules in `repl::decide_promote`). With connected peers
    /// the promotion is agreed in two phases: each peer is asked (PROMOTE_REQUEST) and
    /// refuses if it is Primary or being promoted itself; once every peer agreed, the
    /// new generation and role are persisted. A peer that agreed promotes nothing of
    /// its own until the requester's next STATE. So two connected nodes promoted at the
    /// same moment cannot both succeed, and a node whose peer went silent (a partition
    /// not yet noticed) cannot promote without `--force`.
    pub fn promote(&mut self, now: Time, id: AdminId, force: bool) {
        self.now = now;
        if self.role == Role::Primary && self.demoting.is_none() {
            self.message(id, "already Primary".into());
            return;
        }
        let ignores_peers = self.config.mutated(super::Mutation::PromoteIgnoresPeerRole);
        let all_connected = self.peers.iter().all(|peer| peer.session().is_some());
        let peer_primary = self.peers.iter().any(|peer| {
            peer.session()
                .is_some_and(|session| session.peer_state.role == Role::Primary)
        });
        let facts = PromoteFacts {
            role: self.role,
            disk: self.disk(),
            single_node: self.single_node(),
            connection: if all_connected && !self.single_node() {
                ConnectionState::Connected
            } else {
                ConnectionState::Connecting
            },
            peer_role: Some(if peer_primary && !ignores_peers {
                Role::Primary
            } else {
                Role::Secondary
            }),
            witness_says_peer_gone: false,
            force,
        };
        let forced_disk = match repl::decide_promote(&facts) {
            Err(refusal) => {
                self.admin_done(id, Err(AdminError::Promote(refusal)));
                return;
            }
            Ok(PromoteAction::AlreadyPrimary) => {
                self.message(id, "already Primary".into());
                return;
            }
            Ok(PromoteAction::Promote { forced_disk, .. }) => forced_disk,
        };
        let peer_promoting = self
            .peers
            .iter()
            .any(|peer| peer.session().is_some_and(|session| session.peer_promoting));
        if peer_promoting && !ignores_peers {
            self.admin_done(
                id,
                Err(AdminError::Refused(
                    "a peer is being promoted; wait for it to finish (or demote it)".into(),
                )),
            );
            return;
        }
        if !self.begin_admin(id, "promote") {
            return;
        }
        self.promote_asked = Some(now);
        // A sync target promoted by force stops its resync in both directions first:
        // the old source must not go on streaming into a Primary (the handshake that
        // follows sees the divergence and refuses, so nothing is overwritten).
        for index in 0..self.peers.len() {
            let target = self.peers[index]
                .session()
                .is_some_and(|session| matches!(session.repl, Repl::Target(_)));
            if target {
                self.end_session(
                    super::PeerId(index),
                    SessionEnd::Local("promoted while a sync target: the resync stops".into()),
                    false,
                );
            }
        }
        let mut waiting = Vec::new();
        if !ignores_peers {
            for index in 0..self.peers.len() {
                let peer = super::PeerId(index);
                let Some(session) = self.peers[index].session_mut() else {
                    continue;
                };
                let request = session.next_request;
                session.next_request += 1;
                let session_id = session.id;
                waiting.push((peer, session_id, request));
                self.send(peer, session_id, Frame::PromoteRequest { id: request });
            }
        }
        if waiting.is_empty() {
            self.persist_promotion(id, forced_disk);
            return;
        }
        self.promotion = Some(Promotion {
            admin: id,
            force,
            forced_disk,
            waiting,
            refused: None,
            deadline: now + self.config.timing.timeout,
        });
    }

    /// The second phase: the new generation, the PRIMARY flag and UpToDate, persisted
    /// before the role changes.
    fn persist_promotion(&mut self, id: AdminId, forced_disk: bool) {
        let fresh = self
            .storage
            .as_ref()
            .is_some_and(|s| s.superblock().generations.current == JUST_CREATED);
        // A never-synced store's first promotion tracks every block for the peers,
        // connected or not (they have nothing yet); a peer that is not an UpToDate,
        // established copy cannot simply follow the new generation either.
        let detached = fresh || !self.peers_in_sync();
        if fresh && !self.single_node() {
            if let Some(storage) = self.storage.as_mut() {
                let blocks = storage.data_blocks();
                storage.set_out_of_sync(0, blocks);
            }
        }
        let new_current = self.random_generation();
        self.persist(
            id,
            AdminStep::Promote {
                new_current,
                detached,
                forced_disk,
            },
            SuperblockChange::Promote {
                new_current,
                detached,
            },
        );
    }

    /// A peer answered our PROMOTE_REQUEST.
    pub(super) fn on_promote_reply(
        &mut self,
        peer: super::PeerId,
        session: super::SessionId,
        request: u64,
        ok: bool,
        reason: String,
    ) -> Result<(), SessionEnd> {
        let name = self.peers[peer.0].config.name.clone();
        let Some(promotion) = self.promotion.as_mut() else {
            // A promotion that timed out already: the answer comes late.
            return Ok(());
        };
        let before = promotion.waiting.len();
        promotion
            .waiting
            .retain(|&(p, s, r)| !(p == peer && s == session && r == request));
        if promotion.waiting.len() == before {
            return Ok(());
        }
        if !ok {
            promotion.refused = Some(format!("the peer {name} refused the promotion: {reason}"));
        }
        self.promotion_progress();
        Ok(())
    }

    /// A peer asks us to agree to its promotion.
    pub(super) fn on_promote_request(
        &mut self,
        peer: super::PeerId,
        session: super::SessionId,
        request: u64,
    ) -> Result<(), SessionEnd> {
        let refusal = if self.role == Role::Primary {
            Some("this node is Primary (never two primaries)")
        } else if self.promotion.is_some() || self.admin_busy == Some("promote") {
            Some("this node is being promoted itself")
        } else {
            None
        };
        let state = self.session_of(peer, session)?;
        if refusal.is_none() {
            state.peer_promoting = true;
        }
        self.send(
            peer,
            session,
            Frame::PromoteReply {
                id: request,
                ok: refusal.is_none(),
                reason: refusal.unwrap_or_default().to_string(),
            },
        );
        Ok(())
    }

    /// A peer whose agreement we wait for went away: without `--force` the promotion
    /// fails (it might be Primary by now, unseen).
    pub(super) fn promotion_peer_gone(
        &mut self,
        peer: super::PeerId,
        session: super::SessionId,
        name: &str,
    ) {
        let Some(promotion) = self.promotion.as_mut() else {
            return;
        };
        let before = promotion.waiting.len();
        promotion
            .waiting
            .retain(|&(p, s, _)| !(p == peer && s == session));
        if promotion.waiting.len() == before {
            return;
        }
        if !promotion.force {
            promotion.refused = Some(format!(
                "the peer {name} went away during the promotion and might be Primary now; if you know it is gone, use --force"
            ));
        }
        self.promotion_progress();
    }

    /// The promotion's first phase timed out: refused.
    pub(super) fn promotion_deadline(&mut self) {
        let now = self.now;
        let Some(promotion) = self.promotion.as_mut() else {
            return;
        };
        if now < promotion.deadline {
            return;
        }
        promotion.waiting.clear();
        promotion.refused = Some(
            "the peers did not answer the promotion request in time; if they are gone, use --force"
                .into(),
        );
        self.promotion_progress();
    }

    /// Every peer answered: persist, or give up (telling the peers, whose agreement
    /// holds until our next STATE).
    fn promotion_progress(&mut self) {
        let Some(promotion) = self.promotion.as_ref() else {
            return;
        };
        if !promotion.waiting.is_empty() {
            return;
        }
        let Some(promotion) = self.promotion.take() else {
            return;
        };
        match promotion.refused {
            Some(reason) => {
                self.admin_busy = None;
                self.broadcast_state();
                self.admin_done(promotion.admin, Err(AdminError::Refused(reason)));
            }
            None => self.persist_promotion(promotion.admin, promotion.forced_disk),
        }
    }

    fn promoted(&mut self, id: AdminId, new_current: u64, detached: bool, forced_disk: bool) {
        self.role = Role::Primary;
        self.promotions += 1;
        let asked = self.promote_asked.take();
        let since = self.primary_lost.take().or(asked);
        self.last_failover = since.map(|since| self.now.since(since));
        // A detached promotion started a new generation already: the first write
        // without the peers needs none of its own.
        self.rotated = detached;
        // A connected peer follows the new generation, or (detached) resyncs.
        for index in 0..self.peers.len() {
            let peer = super::PeerId(index);
            let Some(session) = self.peers[index].session().map(|s| s.id) else {
                continue;
            };
            if !detached {
                self.send(
                    peer,
                    session,
                    Frame::NewGeneration {
                        current: new_current,
                    },
                );
            }
            self.attach_peer(peer);
            self.send_state(peer);
            let dirty = self
                .storage
                .as_ref()
                .map_or(0, |storage| storage.out_of_sync_blocks());
            if dirty > 0 {
                self.start_source(peer, false, false);
            }
        }
        let how = match (forced_disk, detached && !self.single_node()) {
            (true, _) => " (forced: disk was not UpToDate)",
            (false, true) => " (forced: peer unreachable)",
            _ => "",
        };
        self.event(format!("role:Primary{how}"));
        self.hook(
            HookKind::RoleChange,
            vec![("REPLICAD_ROLE", "Primary".to_string())],
        );
        let resource = self.config.resource.clone();
        self.message(id, format!("{resource} is Primary{how}"));
    }

    /// `replctl demote`: refuses new writes, waits for those in flight, flushes (on the
    /// peers too), clears the PRIMARY flag, then stops shipping.
    pub fn demote(&mut self, now: Time, id: AdminId) {
        self.now = now;
        if self.role == Role::Secondary {
            self.message(id, "already Secondary".into());
            return;
        }
        if !self.begin_admin(id, "demote") {
            return;
        }
        self.demoting = Some(Demoting {
            admin: id,
            phase: DemotePhase::Draining,
        });
        self.continue_demotion();
    }

    /// Moves a demotion on: once nothing is in flight, the final flush (local, and a
    /// FLUSH to every shipping peer in `sync` and `semi-sync`); once all of it is
    /// done, the PRIMARY flag goes.
    pub(super) fn continue_demotion(&mut self) {
        let Some(demoting) = self.demoting.as_ref() else {
            return;
        };
        let admin = demoting.admin;
        match &demoting.phase {
            DemotePhase::Draining => {
                if self.barrier.is_some() || self.pending_requests() > 0 {
                    return;
                }
                let peers = self.flush_peers();
                // A diskless Primary has nothing to flush here: its peers' FLUSH is all.
                let diskless = self.storage.is_none();
                self.demoting = Some(Demoting {
                    admin,
                    phase: DemotePhase::Flushing {
                        local: diskless,
                        peers,
                    },
                });
                if diskless {
                    return self.continue_demotion();
                }
                let token = self.token(Purpose::Admin(admin, AdminStep::DemoteFlush));
                if let Some(storage) = self.storage.as_mut() {
                    storage.flush(token);
                }
            }
            DemotePhase::Flushing { local, peers } => {
                let peers_done = peers.iter().all(|&(peer, session, flush)| {
                    self.peers[peer.0].session().is_none_or(|current| {
                        current.id != session || !current.flushes.contains_key(&flush)
                    })
                });
                if *local && peers_done {
                    self.demoting = Some(Demoting {
                        admin,
                        phase: DemotePhase::Clearing,
                    });
                    if self.storage.is_none() {
                        // No PRIMARY flag to clear: the detached store keeps its own,
                        // and comes back (if ever) as a crashed Primary's full target.
                        self.diskless = None;
                        self.admin_step_done(admin, AdminStep::DemoteClear, Ok(()));
                    } else {
                        self.persist(admin, AdminStep::DemoteClear, SuperblockChange::Demote);
                    }
                }
            }
            DemotePhase::Clearing => {}
        }
    }

    pub(super) fn admin_step_done(
        &mut self,
        id: AdminId,
        step: AdminStep,
        result: Result<(), String>,
    ) {
        if let Err(error) = result {
            self.admin_busy = None;
            if matches!(step, AdminStep::Promote { .. }) {
                // Peers that agreed hold off until our next STATE.
                self.broadcast_state();
            }
            if matches!(step, AdminStep::DemoteFlush | AdminStep::DemoteClear) {
                self.demoting = None;
            }
            let error = match step {
                AdminStep::DemoteFlush => format!("the final flush failed: {error}"),
                _ => error,
            };
            self.admin_done(id, Err(AdminError::Storage(error)));
            return;
        }
        match step {
            AdminStep::Promote {
                new_current,
                detached,
                forced_disk,
            } => {
                self.admin_busy = None;
                self.promoted(id, new_current, detached, forced_disk);
            }
            AdminStep::DemoteFlush => {
                if let Some(Demoting {
                    phase: DemotePhase::Flushing { local, .. },
                    ..
                }) = self.demoting.as_mut()
                {
                    *local = true;
                }
                self.continue_demotion();
            }
            AdminStep::DemoteClear => {
                self.admin_busy = None;
                self.demoting = None;
                self.role = Role::Secondary;
                self.detach_all_peers();
                self.broadcast_state();
                self.event("role:Secondary");
                self.hook(
                    HookKind::RoleChange,
                    vec![("REPLICAD_ROLE", "Secondary".to_string())],
                );
                let resource = self.config.resource.clone();
                self.message(id, format!("{resource} is Secondary"));
            }
            AdminStep::Invalidate => {
                self.admin_busy = None;
                self.event("invalidated: disk:Inconsistent, pulling every block from the peer");
                // Reconnect: the handshake makes the consistent peer the source.
                for index in 0..self.peers.len() {
                    self.end_session(
                        super::PeerId(index),
                        SessionEnd::Local("invalidated: reconnecting to pull every block".into()),
                        false,
                    );
                }
                let name = self
                    .peers
                    .first()
                    .map(|peer| peer.config.name.clone())
                    .unwrap_or_default();
                let resource = self.config.resource.clone();
                self.message(
                    id,
                    format!("{resource}: invalidated; pulling everything from {name}"),
                );
            }
            AdminStep::NewCurrentUuid { new_current } => {
                self.admin_busy = None;
                if let Some(storage) = self.storage.as_mut() {
                    let blocks = storage.data_blocks();
                    storage.clear_out_of_sync(0, blocks);
                }
                for index in 0..self.peers.len() {
                    let peer = super::PeerId(index);
                    if let Some(session) = self.peers[index].session().map(|s| s.id) {
                        self.send(
                            peer,
                            session,
                            Frame::NewGeneration {
                                current: new_current,
                            },
                        );
                        self.send_state(peer);
                    }
                }
                self.event("new generation without initial sync: disk:UpToDate");
                let resource = self.config.resource.clone();
                self.message(
                    id,
                    format!("{resource}: both nodes UpToDate, initial sync skipped"),
                );
            }
        }
    }

    /// `replctl connect`: leave StandAlone; optionally discard our data at the next
    /// handshake (split-brain resolution on the victim).
    pub fn connect(&mut self, now: Time, discard_my_data: bool) -> Result<String, AdminError> {
        self.now = now;
        if discard_my_data && self.role == Role::Primary {
            return Err(AdminError::Refused(
                "refusing to discard the data of a Primary: demote it first".into(),
            ));
        }
        if self.peers.is_empty() {
            return Err(AdminError::Refused(format!(
                "resource {} has no peer in the config",
                self.config.resource
            )));
        }
        for peer in &mut self.peers {
            peer.discard_my_data = discard_my_data;
            peer.split_brain = false;
            peer.last_error = None;
            if matches!(peer.conn, Conn::StandAlone) {
                peer.conn = Conn::Connecting {
                    next_dial: now,
                    dialing: false,
                };
            }
        }
        let names: Vec<String> = self.peers.iter().map(|p| p.config.name.clone()).collect();
        Ok(format!(
            "{}: connecting to {}{}",
            self.config.resource,
            names.join(", "),
            if discard_my_data {
                " (discarding local changes)"
            } else {
                ""
            }
        ))
    }

    /// `replctl disconnect`: end the sessions and stay StandAlone.
    pub fn disconnect(&mut self, now: Time) -> Result<String, AdminError> {
        self.now = now;
        if self.peers.is_empty() {
            return Err(AdminError::Refused(format!(
                "resource {} has no peer in the config",
                self.config.resource
            )));
        }
        for index in 0..self.peers.len() {
            self.end_session(
                super::PeerId(index),
                SessionEnd::Local("disconnected by the operator".into()),
                true,
            );
        }
        let names: Vec<String> = self.peers.iter().map(|p| p.config.name.clone()).collect();
        Ok(format!(
            "{}: disconnected from {}",
            self.config.resource,
            names.join(", ")
        ))
    }

    /// `replctl pause-sync` / `resume-sync`.
    pub fn pause_sync(&mut self, now: Time, paused: bool) -> Result<String, AdminError> {
        self.now = now;
        if self.peers.is_empty() {
            return Err(AdminError::Refused(format!(
                "resource {} has no peer in the config",
                self.config.resource
            )));
        }
        for index in 0..self.peers.len() {
            self.peers[index].paused = paused;
            if !paused {
                if let Some(session) = self.peers[index].session().map(|s| s.id) {
                    if let Err(why) = self.step_source(super::PeerId(index), session) {
                        self.end_session(super::PeerId(index), why, false);
                    }
                }
            }
        }
        Ok(format!(
            "{}: resync {}",
            self.config.resource,
            if paused { "paused" } else { "resumed" }
        ))
    }

    /// `replctl invalidate`: throw local data away and pull everything from the peer.
    pub fn invalidate(&mut self, now: Time, id: AdminId) {
        self.now = now;
        if self.role == Role::Primary {
            self.admin_done(
                id,
                Err(AdminError::Refused(
                    "refusing to invalidate a Primary: demote it first".into(),
                )),
            );
            return;
        }
        if self.usable_peer().is_none() {
            self.admin_done(
                id,
                Err(AdminError::Refused(
                    "the peer must be connected and UpToDate to pull data from".into(),
                )),
            );
            return;
        }
        if !self.begin_admin(id, "invalidate") {
            return;
        }
        if let Some(storage) = self.storage.as_mut() {
            let blocks = storage.data_blocks();
            storage.set_out_of_sync(0, blocks);
        }
        self.persist(
            id,
            AdminStep::Invalidate,
            SuperblockChange::SetDisk(StoredDiskState::Inconsistent),
        );
    }

    /// `replctl new-current-uuid --clear-bitmap`: two connected, freshly created
    /// stores known to be identical (e.g. both zeroed) skip their initial sync.
    pub fn new_current_uuid(&mut self, now: Time, id: AdminId, clear_bitmap: bool) {
        self.now = now;
        if !clear_bitmap {
            self.admin_done(
                id,
                Err(AdminError::Refused(
                    "only --clear-bitmap is supported; for an initial full sync use `promote --force`"
                        .into(),
                )),
            );
            return;
        }
        let fresh = self
            .storage
            .as_ref()
            .is_some_and(|s| s.superblock().generations.current == JUST_CREATED);
        if self.storage.is_some() && !fresh {
            self.admin_done(
                id,
                Err(AdminError::Refused(
                    "the store already holds a generation: new-current-uuid --clear-bitmap is only for fresh stores"
                        .into(),
                )),
            );
            return;
        }
        let peers_fresh = self.peers.iter().all(|peer| {
            peer.session()
                .is_some_and(|session| session.peer_state.generations.current == JUST_CREATED)
        });
        if !peers_fresh {
            self.admin_done(
                id,
                Err(AdminError::Refused(
                    "both nodes must be connected and freshly created".into(),
                )),
            );
            return;
        }
        if !self.begin_admin(id, "new-current-uuid") {
            return;
        }
        let new_current = self.random_generation();
        self.persist(
            id,
            AdminStep::NewCurrentUuid { new_current },
            SuperblockChange::NewCurrentUuid { new_current },
        );
    }

    /// `replctl verify`: compares both replicas block by block; the blocks that differ
    /// are marked (with `repair`, resynced). Answers with [`AdminOutput::Verify`].
    pub fn verify(&mut self, now: Time, id: AdminId, repair: bool) {
        self.now = now;
        if self.storage.is_none() {
            self.admin_done(id, Err(AdminError::NoDisk));
            return;
        }
        self.start_verify(id, repair);
    }
}
