//! replicad tools library.

pub mod nbd_client;
