//! replicad daemon library.
pub mod nbd;
