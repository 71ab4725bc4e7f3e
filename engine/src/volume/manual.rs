//! Manual mode ([`Background::Manual`](super::Background::Manual)): the engine's
//! background work without threads, for a driver that must replay a run bit for bit
//! (a deterministic cluster simulator on one thread with a virtual clock).
//!
//! Rules:
//! * `Volume::open` starts no thread. Nothing blocks, nothing waits on a condition
//!   variable, nothing reads the clock or the OS's randomness.
//! * Every completion callback runs on the caller's thread: before the call that
//!   caused it returns (`write`, `flush`, `read`, `commit_pending`,
//!   `append_replicated`, …), or from a later [`pump`].
//! * Where threaded mode would wait (memory budget, ring space, the resync queue,
//!   `wait_applied`, `checkpoint_blocking`, `close`), the caller does the background
//!   work itself, unit by unit, until the wait would be over. When no unit can be done
//!   and it still would not be (a ring full of records held for the peer, a failed
//!   volume), the call returns at once: with `IoError::Stalled`, the volume's error,
//!   or `false`; a completion that could not run yet runs from a later `pump`.
//! * A unit ([`pump`]) is what one iteration of a background thread does: a group
//!   commit round (`journal::round`, chosen by the journal thread's own
//!   `journal::has_work`), else one `applier::step` — a journal fdatasync, an apply
//!   batch, or a checkpoint. Manual mode treats the apply delay as elapsed and calls a
//!   checkpoint due without a clock (see `applier::checkpoint_due`). A driver calls
//!   `pump` when it chooses, so a simulated power cut can fall between any two units.
//!
//! Meant to be driven from one thread. Calls from several threads stay safe (rounds
//! are serialised by `committing`, applier units by `applier_turn`, taken with
//! `try_lock` so a callback that calls back into the volume never deadlocks), but a
//! unit another thread is doing counts as "no work possible" for this one.

use std::sync::{MutexGuard, TryLockError};

use super::{applier, journal, IoError, Shared, State};

/// Most units one inline call does. The work queued at any moment is finite and every
/// unit consumes some of it (a round places records or satisfies a flush, an
/// fdatasync makes the oldest record appliable, a batch applies items, a checkpoint
/// clears what made it due), so the bound is only reached when completion callbacks
/// keep submitting new work from inside the call.
pub(super) const MAX_INLINE_UNITS: usize = 1 << 20;

/// See `Volume::pump`. Does nothing in threaded mode.
pub(super) fn pump(shared: &Shared) -> bool {
    if !shared.manual() {
        return false;
    }
    let state = shared.lock();
    if state.failed.is_some() {
        return journal::fail_everything(shared, state);
    }
    let worked = unit(shared, state);
    // A unit that failed the volume fails what still waits before the caller goes on,
    // as the journal thread would.
    let state = shared.lock();
    if state.failed.is_some() {
        journal::fail_everything(shared, state);
    }
    worked
}

/// One unit: a group-commit round if one has work and room in the ring, else one
/// step of the applier (which, when the ring is full, is what makes room).
fn unit<'a>(shared: &'a Shared, mut state: MutexGuard<'a, State>) -> bool {
    if journal::has_work(&state) {
        match journal::round(shared, state) {
            journal::Round::Committed => return true,
            journal::Round::RingFull | journal::Round::Nothing => {}
        }
        state = shared.lock();
    }
    let _turn = match shared.applier_turn.try_lock() {
        Ok(turn) => turn,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return false,
    };
    // No apply delay: a record waiting for the journal's fdatasync gets it now.
    matches!(
        applier::step(shared, state, |_| true),
        applier::Step::Worked
    )
}

/// `pump` until it finds nothing to do, at most `max_units` times.
pub(super) fn pump_until_idle(shared: &Shared, max_units: usize) -> usize {
    (0..max_units).take_while(|_| pump(shared)).count()
}

/// Pumps until `done(state)` holds or no unit can be done (bounded); returns the
/// engine lock and whether `done` holds.
pub(super) fn drive<'a>(
    shared: &'a Shared,
    done: impl Fn(&State) -> bool,
) -> (MutexGuard<'a, State>, bool) {
    let mut state = shared.lock();
    for _ in 0..MAX_INLINE_UNITS {
        if done(&state) {
            return (state, true);
        }
        drop(state);
        let worked = pump(shared);
        state = shared.lock();
        if !worked {
            break;
        }
    }
    let holds = done(&state);
    (state, holds)
}

/// Back-pressure without waiting: does units until `full(state)` is false. Fails with
/// the volume's error, or [`IoError::Stalled`] (saying `stalled`) when no unit helps.
pub(super) fn work_while<'a>(
    shared: &'a Shared,
    state: MutexGuard<'a, State>,
    full: impl Fn(&State) -> bool,
    stalled: &'static str,
) -> Result<MutexGuard<'a, State>, IoError> {
    if !full(&state) {
        return Ok(state);
    }
    drop(state);
    let (state, _) = drive(shared, |state| {
        !full(state) || state.check_usable().is_err()
    });
    state.check_usable()?;
    if full(&state) {
        return Err(IoError::Stalled(stalled));
    }
    Ok(state)
}

/// Runs group-commit rounds, and what makes room for them, until nothing sequenced or
/// flushed waits for the journal (or nothing more can be done).
pub(super) fn commit(shared: &Shared) {
    drop(drive(shared, |state| {
        state.failed.is_some()
            || (state.pending.is_empty() && state.flush_requested <= state.durable_seq)
    }));
}
