//! replicad tools library.

pub mod checker;
pub mod nbd_client;
