//! The write-verify checker: the project's core instrument for promises P1 and P2.
//!
//! `replcheck write` writes self-describing 4 KiB blocks ([`block`]) through one NBD
//! connection at a chosen queue depth and records in a run log ([`log`]) when each
//! write and flush was issued and acknowledged, on one event counter. After any fault,
//! `replcheck verify` reads back every block the log touched, from the same or another
//! server, and checks the rules of [`verify`]: every acknowledged write is present (P1),
//! the visible writes form a prefix of the acknowledged order (P2), and no block holds
//! data that was never written to it.
//!
//! **Architecture invariant:** [`block`], [`log`] and [`verify`] are pure (no sockets,
//! no clock); [`run`] does the NBD I/O around them, and the CLI is a thin shell over
//! it. [`servers`] starts real NBD servers for tests and demos.

pub mod block;
pub mod cli;
pub mod log;
pub mod run;
pub mod servers;
pub mod verify;

pub use block::{classify_block, BlockContent, BLOCK_SIZE};
pub use log::{LogError, LogWriter, RunLog, StopReason};
pub use run::{
    read_blocks, run_writes, verify_export, CheckerError, WritePlan, WriteProgress, WriteSummary,
};
pub use verify::{verify, Finding, Mode, VerifyReport};
