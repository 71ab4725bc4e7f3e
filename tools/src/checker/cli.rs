//! `replcheck`'s command line (here, not in its binary, so that `replctl man` and
//! `replctl completions` can render it too).

use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand};

use super::Mode;

/// Exit status when a verification finds violations.
pub const EXIT_CHECK_FAILED: u8 = 1;
/// Exit status when the checker itself could not do its job.
pub const EXIT_CHECKER_ERROR: u8 = 3;

#[derive(Parser)]
#[command(
    name = "replcheck",
    version,
    about = "Write self-describing blocks through NBD, then verify what a server holds",
    after_help = "Exit status: 0 done (write: also when the server died mid-run; verify: the check passed); \
                  1 a server error reply (write) or a failed check (verify); 2 usage error; \
                  3 the checker could not run (connect, log I/O, bad log)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Write unique, self-describing 4 KiB blocks and log every issue and acknowledgement.
    Write(WriteArgs),
    /// Read back every block a log touched and check it against the log.
    Verify(VerifyArgs),
}

#[derive(Args)]
pub struct ConnectArgs {
    /// NBD URI: nbd://host[:port][/export] or nbd+unix:///export?socket=PATH.
    #[arg(long)]
    pub uri: String,
    /// Seconds allowed for connecting and the handshake.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds allowed for each request; a request that takes longer closes the connection.
    #[arg(long, default_value_t = 30.0)]
    pub request_timeout: f64,
}

#[derive(Args)]
pub struct WriteArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Where to write the run log (JSON lines).
    #[arg(long)]
    pub log: PathBuf,
    /// Writes in flight at once.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// Stop after this many writes (default 10000 unless --seconds is given).
    #[arg(long)]
    pub writes: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Blocks (4 KiB) to write: START..END (END exclusive), START.., or COUNT for 0..COUNT.
    /// Default: the whole export.
    #[arg(long)]
    pub blocks: Option<BlockRange>,
    /// Issue a flush after every K-th write.
    #[arg(long, value_name = "K")]
    pub flush_every: Option<u64>,
    /// Set FUA on every K-th write.
    #[arg(long, value_name = "K")]
    pub fua_every: Option<u64>,
    /// Seed of the block choice (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print a progress line on stderr every N acknowledged writes.
    #[arg(long, value_name = "N")]
    pub progress_every: Option<u64>,
}

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The run log written by `replcheck write`.
    #[arg(long)]
    pub log: PathBuf,
    /// Rules to check (comma-separated): acked (P1), durable (FLUSH/FUA), prefix (P2).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "acked")]
    pub mode: Vec<Mode>,
    /// Reads in flight at once.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// Violations listed per kind.
    #[arg(long, default_value_t = 5)]
    pub examples: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A block range given on the command line.
#[derive(Debug, Clone, Copy)]
pub struct BlockRange {
    pub start: u64,
    pub end: Option<u64>,
}

impl FromStr for BlockRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let number = |part: &str| {
            part.trim()
                .parse::<u64>()
                .map_err(|_| format!("bad block number {part:?}"))
        };
        let range = match text.split_once("..") {
            Some((start, "")) => BlockRange {
                start: number(start)?,
                end: None,
            },
            Some((start, end)) => BlockRange {
                start: if start.is_empty() { 0 } else { number(start)? },
                end: Some(number(end)?),
            },
            None => BlockRange {
                start: 0,
                end: Some(number(text)?),
            },
        };
        if range.end.is_some_and(|end| end <= range.start) {
            return Err(format!("empty block range {text:?}"));
        }
        Ok(range)
    }
}
