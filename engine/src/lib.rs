//! The storage engine and sans-IO replication core of replicad.
//!
//! **Architecture Invariant:** this crate knows nothing of tokio, sockets or NBD. It
//! is driven through plain method calls and completion callbacks, so the daemon, the
//! tools and the tests all reach the same code.

pub mod backend;
pub mod rng;
