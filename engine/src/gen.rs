//! Generation identifiers and the handshake decision (sans-IO).
//!
//! Every node carries a *current* generation identifier (a random u64 naming the
//! data history it holds), a *bitmap* identifier (the generation its out-of-sync
//! bitmap tracks changes since; 0 when it tracks nothing) and two *history* slots
//! (older currents). A new current is drawn when a node starts writing without its
//! peer (the first write after the peer was lost) and on promotion. Comparing the
//! two nodes' sets on connect tells, as in DRBD:
//!
//! * equal currents — the same history; resync only the blocks either bitmap holds;
//! * my current is the peer's bitmap id — the peer moved on from my data: I am the
//!   sync target and the peer's bitmap names every block that differs;
//! * my current is in the peer's history — the peer is ahead but the bitmap is gone:
//!   full sync;
//! * both moved on from the same bitmap id (or share only history) — split brain;
//! * nothing in common — unrelated data: refuse.
//!
//! [`decide`] is a pure function of both sides' identifiers and a few flags, unit
//! tested case by case below.

/// The current identifier of a store that has never held data (after `create-md`).
pub const JUST_CREATED: u64 = 4;

/// One node's generation identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GenerationIds {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

impl GenerationIds {
    /// The identifiers of a freshly created store.
    pub fn just_created() -> GenerationIds {
        GenerationIds {
            current: JUST_CREATED,
            bitmap: 0,
            history: [0, 0],
        }
    }

    fn push_history(&mut self, id: u64) {
        if id != 0 && self.history[0] != id {
            self.history[1] = self.history[0];
            self.history[0] = id;
        }
    }

    /// Starts a new generation while the peer is away: the bitmap (if not already
    /// tracking) starts tracking changes since the old current.
    pub fn start_new_detached(&mut self, new_current: u64) {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        } else {
            self.push_history(self.current);
        }
        self.current = new_current;
    }

    /// Starts a new generation while connected and in sync: the peer adopts the same
    /// identifier ([`GenerationIds::adopt_peer_current`]), so no bitmap is needed.
    pub fn start_new_connected(&mut self, new_current: u64) {
        self.push_history(self.current);
        self.current = new_current;
    }

    /// In-sync peer announced a new current: follow it.
    pub fn adopt_peer_current(&mut self, peer_current: u64) {
        if peer_current != self.current {
            self.push_history(self.current);
            self.current = peer_current;
        }
    }

    /// This node finished a resync as its source: the peer is now in sync.
    pub fn finish_resync_as_source(&mut self) {
        let bitmap = self.bitmap;
        self.push_history(bitmap);
        self.bitmap = 0;
    }

    /// This node finished a resync as its target: it now holds the source's generation.
    pub fn finish_resync_as_target(&mut self, source_current: u64) {
        self.push_history(self.current);
        self.current = source_current;
        self.bitmap = 0;
    }

    fn has_in_history(&self, id: u64) -> bool {
        id != 0 && self.history.contains(&id)
    }
}

/// What one side tells the other in the handshake (beyond identity checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SideState {
    pub generations: GenerationIds,
    /// The node is Primary right now.
    pub primary: bool,
    /// The node crashed while Primary (its last writes may not have reached the peer).
    pub crashed_primary: bool,
    /// The node's disk is Inconsistent (an interrupted sync target or never synced).
    pub inconsistent: bool,
    /// Number of blocks set in the node's out-of-sync bitmap.
    pub dirty_blocks: u64,
    /// The operator asked to throw this node's changes away (split-brain resolution).
    pub discard_my_data: bool,
    /// Node id, for deterministic tie breaks.
    pub node_id: u32,
}

/// Which bits to resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncScope {
    /// The union of both out-of-sync bitmaps.
    Bitmap,
    /// Every block.
    Full,
}

/// Outcome of comparing both sides on connect, from the local node's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Same data: replicate from here on.
    InSync,
    /// Both stores are fresh: connect, but nothing to sync until one is promoted.
    BothFresh,
    /// Local data is newer: stream `scope` to the peer.
    SyncSource(SyncScope),
    /// Peer data is newer: receive `scope` from the peer.
    SyncTarget(SyncScope),
    /// Both sides wrote independently since a common ancestor. No data is exchanged.
    SplitBrain,
    /// No common history: refuse.
    Unrelated,
    /// Both are Primary and their data did not diverge: refuse (never two primaries).
    /// Two primaries that both wrote are a [`Decision::SplitBrain`].
    BothPrimary,
    /// The sync direction would make a Primary a sync target (its users would see data
    /// change under them): refuse; demote it first or resolve by hand.
    PrimaryWouldBeTarget,
    /// The side that would be the sync source has no good data.
    NoGoodData,
}

/// Decides how two nodes proceed on connect. Pure: same inputs, same answer, and the
/// peer computing `decide(peer, local)` reaches the mirrored answer.
pub fn decide(local: &SideState, peer: &SideState) -> Decision {
    let decision = decide_direction(local, peer);
    if local.primary && peer.primary {
        // Two primaries never connect; but when both wrote since they last saw each
        // other, the divergence is what the operator must learn about (and resolve).
        return match decision {
            Decision::SplitBrain => Decision::SplitBrain,
            _ => Decision::BothPrimary,
        };
    }
    match decision {
        Decision::SyncTarget(_) if local.primary => Decision::PrimaryWouldBeTarget,
        Decision::SyncSource(_) if peer.primary => Decision::PrimaryWouldBeTarget,
        Decision::SyncSource(_) if local.inconsistent => Decision::NoGoodData,
        Decision::SyncTarget(_) if peer.inconsistent => Decision::NoGoodData,
        other => other,
    }
}

fn decide_direction(local: &SideState, peer: &SideState) -> Decision {
    let l = &local.generations;
    let p = &peer.generations;
    // An operator's discard-my-data turns split brain (and only a relation that
    // shares history) into a full or bitmap sync towards the discarding side.
    let split = is_split_brain(l, p);
    if split {
        return match (local.discard_my_data, peer.discard_my_data) {
            (true, false) => Decision::SyncTarget(SyncScope::Bitmap),
            (false, true) => Decision::SyncSource(SyncScope::Bitmap),
            _ => Decision::SplitBrain,
        };
    }
    let local_fresh = l.current == JUST_CREATED;
    let peer_fresh = p.current == JUST_CREATED;
    match (local_fresh, peer_fresh) {
        (true, true) => return Decision::BothFresh,
        (true, false) => {
            let scope = if p.bitmap == JUST_CREATED {
                SyncScope::Bitmap
            } else {
                SyncScope::Full
            };
            return Decision::SyncTarget(scope);
        }
        (false, true) => {
            let scope = if l.bitmap == JUST_CREATED {
                SyncScope::Bitmap
            } else {
                SyncScope::Full
            };
            return Decision::SyncSource(scope);
        }
        (false, false) => {}
    }
    if l.current == p.current {
        if local.dirty_blocks == 0
            && peer.dirty_blocks == 0
            && !local.inconsistent
            && !peer.inconsistent
        {
            return Decision::InSync;
        }
        // Same generation but blocks in doubt (a crashed primary's last writes, an
        // interrupted resync): the side with authority is the source.
        return if local_is_authority(local, peer) {
            Decision::SyncSource(SyncScope::Bitmap)
        } else {
            Decision::SyncTarget(SyncScope::Bitmap)
        };
    }
    if p.bitmap != 0 && l.current == p.bitmap {
        return Decision::SyncTarget(SyncScope::Bitmap);
    }
    if l.bitmap != 0 && p.current == l.bitmap {
        return Decision::SyncSource(SyncScope::Bitmap);
    }
    if p.has_in_history(l.current) {
        return Decision::SyncTarget(SyncScope::Full);
    }
    if l.has_in_history(p.current) {
        return Decision::SyncSource(SyncScope::Full);
    }
    // Histories that no longer share an identifier (each side moved on more often than
    // the two history slots remember) are unrelated; an operator's discard-my-data
    // still resolves them, with a full sync (HELLO already checked that both nodes
    // belong to the same resource).
    match (local.discard_my_data, peer.discard_my_data) {
        (true, false) => Decision::SyncTarget(SyncScope::Full),
        (false, true) => Decision::SyncSource(SyncScope::Full),
        _ if shares_history(l, p) => Decision::SplitBrain,
        _ => Decision::Unrelated,
    }
}

/// Both moved on from the same bitmap identifier: each wrote without the other.
fn is_split_brain(l: &GenerationIds, p: &GenerationIds) -> bool {
    l.current != p.current && l.bitmap != 0 && l.bitmap == p.bitmap
}

fn shares_history(l: &GenerationIds, p: &GenerationIds) -> bool {
    let ids_l = [l.bitmap, l.history[0], l.history[1]];
    let ids_p = [p.bitmap, p.history[0], p.history[1]];
    ids_l
        .iter()
        .any(|&id| id != 0 && id != JUST_CREATED && ids_p.contains(&id))
}

/// With equal currents, who is the source: not a side whose operator asked to
/// discard its data, then the Primary, then a consistent side over an inconsistent
/// one (an inconsistent side can never be a source, so ranking it first would leave
/// the pair stuck), then a crashed primary, then the lower node id.
fn local_is_authority(local: &SideState, peer: &SideState) -> bool {
    let rank = |side: &SideState| {
        (
            !side.discard_my_data,
            side.primary,
            !side.inconsistent,
            side.crashed_primary,
        )
    };
    match rank(local).cmp(&rank(peer)) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => local.node_id < peer.node_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(current: u64, bitmap: u64, history: [u64; 2]) -> SideState {
        SideState {
            generations: GenerationIds {
                current,
                bitmap,
                history,
            },
            ..SideState::default()
        }
    }

    /// Checks `decide` both ways: the peer must reach the mirrored decision.
    fn check(local: SideState, peer: SideState, expected: Decision) {
        assert_eq!(decide(&local, &peer), expected, "local view");
        let mirrored = match expected {
            Decision::SyncSource(scope) => Decision::SyncTarget(scope),
            Decision::SyncTarget(scope) => Decision::SyncSource(scope),
            other => other,
        };
        assert_eq!(decide(&peer, &local), mirrored, "peer view");
    }

    #[test]
    fn equal_generations_and_clean_bitmaps_are_in_sync() {
        check(side(10, 0, [0, 0]), side(10, 0, [0, 0]), Decision::InSync);
    }

    #[test]
    fn fresh_stores_wait_for_a_forced_promotion() {
        check(
            side(JUST_CREATED, 0, [0, 0]),
            side(JUST_CREATED, 0, [0, 0]),
            Decision::BothFresh,
        );
        // One side promoted with force: it started tracking since JUST_CREATED with all bits set.
        let mut promoted = GenerationIds::just_created();
        promoted.start_new_detached(77);
        let promoted = SideState {
            generations: promoted,
            ..SideState::default()
        };
        check(
            promoted,
            side(JUST_CREATED, 0, [0, 0]),
            Decision::SyncSource(SyncScope::Bitmap),
        );
        check(
            side(77, 0, [0, 0]),
            side(JUST_CREATED, 0, [0, 0]),
            Decision::SyncSource(SyncScope::Full),
        );
    }

    #[test]
    fn a_side_that_moved_on_from_my_generation_is_the_source() {
        // Peer lost me at generation 10, wrote on in 11 tracking changes since 10.
        let mut peer = GenerationIds {
            current: 10,
            ..Default::default()
        };
        peer.start_new_detached(11);
        check(
            side(10, 0, [0, 0]),
            SideState {
                generations: peer,
                ..SideState::default()
            },
            Decision::SyncTarget(SyncScope::Bitmap),
        );
    }

    #[test]
    fn history_without_bitmap_means_full_sync() {
        check(
            side(10, 0, [0, 0]),
            side(12, 0, [10, 0]),
            Decision::SyncTarget(SyncScope::Full),
        );
    }

    #[test]
    fn both_moving_on_from_one_generation_is_split_brain() {
        check(
            side(11, 10, [0, 0]),
            side(12, 10, [0, 0]),
            Decision::SplitBrain,
        );
        check(
            side(13, 0, [11, 10]),
            side(14, 0, [12, 10]),
            Decision::SplitBrain,
        );
    }

    #[test]
    fn discard_my_data_resolves_split_brain_towards_the_discarding_side() {
        let mut victim = side(11, 10, [0, 0]);
        victim.discard_my_data = true;
        check(
            victim,
            side(12, 10, [0, 0]),
            Decision::SyncTarget(SyncScope::Bitmap),
        );
    }

    #[test]
    fn unrelated_data_is_refused() {
        check(
            side(10, 0, [0, 0]),
            side(20, 0, [0, 0]),
            Decision::Unrelated,
        );
    }

    #[test]
    fn discard_my_data_resolves_unrelated_data_with_a_full_sync() {
        let mut victim = side(10, 0, [0, 0]);
        victim.discard_my_data = true;
        check(
            victim,
            side(20, 0, [0, 0]),
            Decision::SyncTarget(SyncScope::Full),
        );
    }

    #[test]
    fn two_primaries_never_connect() {
        let mut a = side(10, 0, [0, 0]);
        let mut b = side(10, 0, [0, 0]);
        a.primary = true;
        b.primary = true;
        check(a, b, Decision::BothPrimary);
    }

    #[test]
    fn two_primaries_that_both_wrote_are_a_split_brain() {
        // Both promoted during a partition and both wrote: the histories diverged.
        let mut a = side(11, 10, [0, 0]);
        let mut b = side(12, 10, [0, 0]);
        a.primary = true;
        b.primary = true;
        check(a, b, Decision::SplitBrain);
        // Only one of them wrote: no divergence, but still never two primaries.
        let mut idle = side(10, 0, [0, 0]);
        idle.primary = true;
        check(idle, b, Decision::BothPrimary);
    }

    #[test]
    fn a_primary_is_never_made_a_sync_target() {
        let mut old = side(10, 0, [0, 0]);
        old.primary = true;
        check(old, side(11, 10, [0, 0]), Decision::PrimaryWouldBeTarget);
    }

    #[test]
    fn an_inconsistent_side_cannot_be_a_source() {
        let mut broken = side(11, 10, [0, 0]);
        broken.inconsistent = true;
        check(broken, side(10, 0, [0, 0]), Decision::NoGoodData);
    }

    #[test]
    fn equal_generations_with_doubtful_blocks_sync_from_the_authority() {
        let mut crashed = side(10, 0, [0, 0]);
        crashed.crashed_primary = true;
        crashed.dirty_blocks = 3;
        check(
            crashed,
            side(10, 0, [0, 0]),
            Decision::SyncSource(SyncScope::Bitmap),
        );
        let mut target = side(10, 0, [0, 0]);
        target.inconsistent = true;
        check(
            side(10, 0, [0, 0]),
            target,
            Decision::SyncSource(SyncScope::Bitmap),
        );
    }

    #[test]
    fn a_consistent_side_outranks_an_inconsistent_crashed_primary() {
        let mut crashed = side(10, 0, [0, 0]);
        crashed.crashed_primary = true;
        crashed.inconsistent = true;
        crashed.dirty_blocks = 3;
        check(
            side(10, 0, [0, 0]),
            crashed,
            Decision::SyncSource(SyncScope::Bitmap),
        );
    }

    #[test]
    fn discard_my_data_makes_the_discarding_side_the_target_of_equal_generations() {
        let mut victim = side(10, 0, [0, 0]);
        victim.crashed_primary = true;
        victim.discard_my_data = true;
        victim.dirty_blocks = 4;
        check(
            victim,
            side(10, 0, [0, 0]),
            Decision::SyncTarget(SyncScope::Bitmap),
        );
    }

    #[test]
    fn finished_resyncs_leave_both_sides_in_sync() {
        let mut source = GenerationIds {
            current: 10,
            ..Default::default()
        };
        source.start_new_detached(11);
        let mut target = GenerationIds {
            current: 10,
            ..Default::default()
        };
        source.finish_resync_as_source();
        target.finish_resync_as_target(source.current);
        check(
            SideState {
                generations: source,
                ..SideState::default()
            },
            SideState {
                generations: target,
                ..SideState::default()
            },
            Decision::InSync,
        );
    }
}
