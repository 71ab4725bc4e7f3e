//! replicad tools library.
