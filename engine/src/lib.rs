//! The storage engine and sans-IO replication core of replicad.
//!
//! **Architecture Invariant:** this crate knows nothing of tokio, sockets or NBD. It
//! is driven through plain method calls and completion callbacks, so the daemon, the
//! tools and the tests all reach the same code.
//!
//! * [`backend`] — the storage trait and its implementations (pread, io_uring, sim).
//! * [`layout`], [`superblock`], [`record`], [`checksum`], [`bitmap`] — on-disk formats.
//! * [`volume`] — an open store: journal, overlay, applier, checkpoints, recovery.
//! * [`gen`] — generation identifiers and the connect-time decision.
//! * [`node`] — the replication state machine of one resource on one node (sans-IO).

pub mod auth;
pub mod backend;
pub mod bitmap;
pub mod checksum;
pub mod error;
pub mod gen;
pub mod layout;
pub mod node;
pub mod record;
pub mod repl;
pub mod rng;
pub mod snapshot;
pub mod superblock;
pub mod testing;
pub mod volume;
pub mod wire;

pub use error::{EngineError, IoError};
pub use volume::{Volume, VolumeOptions, WriteKind, WriteRequest};

/// Bytes per block: the unit of checksums, bitmap bits and journal records.
pub const BLOCK_BYTES: u64 = 4096;
/// Largest single I/O request (the NBD maximum we advertise).
pub const MAX_IO_BYTES: u64 = 32 << 20;
/// Longest TRIM or WRITE_ZEROES request: they carry no data, so the limit is the
/// 32-bit length field of NBD, not [`MAX_IO_BYTES`]. Each becomes records of at most
/// [`MAX_IO_BYTES`].
pub const MAX_ZERO_BYTES: u64 = u32::MAX as u64;
