//! `replsim`: a deterministic simulator of a replicad cluster, in the style of
//! TigerBeetle's VOPR and FoundationDB's simulation.
//!
//! One thread, one seeded generator, one virtual clock. 2 to 5 nodes, each the real
//! replication state machine ([`engine::node::Node`]) on the real engine
//! ([`engine::Volume`] in manual mode, no threads) over a [`SimBackend`] that knows what
//! a power cut leaves. A simulated network carries the nodes' frames over two
//! connections per session (data and meta: each in order, the two independent of each
//! other), with delays, partitions of any shape (full, one-way, data connection only),
//! connection resets and slow links. The seed also chooses the faults: process crashes
//! (kill -9: the page cache survives), power cuts (only what was flushed survives, torn
//! at sector granularity), slow disks, and the operator's commands (promote with and
//! without `--force`, demote, disconnect and connect, invalidate, verify, detach and
//! attach). A client writes self-describing blocks to whichever node is Primary, flushes
//! and reads.
//!
//! After every step a checker tests the promises ([`world`] documents each rule): P1
//! (every write a node must hold, it holds when it becomes Primary), P2 (a promoted
//! spare holds a prefix of what its primary sent it), P3 (reads return written data),
//! P4 (no two Primaries by a promotion without `--force`, no two nodes completing writes
//! in one generation), no silent divergence (two quiet nodes that say they are in sync
//! hold the same bytes) and the state machine's own invariants. Then the faults stop,
//! the operator heals what needs a person (split brains), and every run must converge
//! within a bounded virtual time: one Primary, everyone connected, in sync, identical.
//!
//! The same seed replays the same run, event for event (the trace digest proves it).
//!
//! [`SimBackend`]: engine::backend::sim::SimBackend

pub mod content;
mod world;

pub use world::{run_seed, Faults, Options, Outcome, Violation};
