//! replicad's tools: `replctl` (admin CLI, demo, bench) and the write-verify checker
//! (`replcheck`), with the async NBD client both use.

pub mod admin;
pub mod backup;
pub mod bench;
pub mod checker;
pub mod demo;
pub mod faultproxy;
pub mod launch;
pub mod manual;
pub mod nbd_client;
pub mod node;
pub mod serve;
pub mod sim;
