//! replicad daemon library.
