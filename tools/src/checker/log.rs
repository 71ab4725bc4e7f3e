//! The run log: what the writer issued, what the server acknowledged, and when.
//!
//! # Format (version 1)
//!
//! JSON lines: UTF-8, one JSON object per line, the field `"t"` naming the record.
//! "Event" numbers come from one counter per run that increases by one at every issue
//! and every completion, so they order all issues and acknowledgements of the run.
//! An issue event is taken just before the request is handed to the client, an ack
//! event just after its reply arrived; so `issue(B) > ack(A)` proves B was sent after
//! A was acknowledged.
//!
//! 1. First line, the run header:
//!    `{"t":"run","format":"replcheck-log","version":1,"run_id":"00c0ffee00c0ffee",
//!    "seed":42,"block_size":4096,"export_size":67108864,"first_block":0,
//!    "end_block":16384,"queue_depth":32,"flush_every":100,"fua_every":null,
//!    "uri":"nbd://127.0.0.1:10809/r0","started_unix_ms":1700000000000}`.
//!    `run_id` is 16 hex digits; writes chose blocks in `first_block..end_block`.
//! 2. One line per write, in completion order (`a`, `fua`, `e` omitted when absent):
//!    `{"t":"w","id":7,"b":123,"i":15,"a":20,"fua":true}` — write id, block number, issue
//!    event, ack event (absent: never acknowledged), FUA flag, and `e`: the errno of a
//!    server error reply (the write may or may not have landed).
//! 3. One line per flush: `{"t":"f","id":2,"i":40,"a":52}` (same fields).
//! 4. Last line, the end record:
//!    `{"t":"end","stop":"server-disconnected","detail":"...","events":10020,
//!    "writes_issued":5000,"writes_acked":4968,"flushes_issued":50,"flushes_acked":49}`;
//!    `stop` is one of `completed`, `time-up`, `interrupted`, `server-disconnected`,
//!    `server-error`, `internal-error`.
//!
//! A log without its end record is incomplete (the writer itself died, so writes that
//! were in flight are unknown) and is refused.
//!
//! **Invariant** (checked by [`RunLog::validate`]): writes to one block never overlap;
//! each was issued after the previous write to that block was acknowledged. So only the
//! last write of a block can be unacknowledged, and each block's history is a total order.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::block::BLOCK_SIZE;

/// The `format` field of every log header.
pub const LOG_FORMAT: &str = "replcheck-log";
/// The log format version this code writes and reads.
pub const LOG_VERSION: u32 = 1;

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t")]
pub enum LogRecord {
    #[serde(rename = "run")]
    Run(RunHeader),
    #[serde(rename = "w")]
    Write(WriteRecord),
    #[serde(rename = "f")]
    Flush(FlushRecord),
    #[serde(rename = "end")]
    End(RunEnd),
}

/// The first record: what the run was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunHeader {
    pub format: String,
    pub version: u32,
    #[serde(with = "hex_u64")]
    pub run_id: u64,
    pub seed: u64,
    pub block_size: u32,
    pub export_size: u64,
    pub first_block: u64,
    pub end_block: u64,
    pub queue_depth: u32,
    pub flush_every: Option<u64>,
    pub fua_every: Option<u64>,
    pub uri: String,
    pub started_unix_ms: u64,
}

/// One write of one block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRecord {
    pub id: u64,
    #[serde(rename = "b")]
    pub block: u64,
    #[serde(rename = "i")]
    pub issued: u64,
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub acked: Option<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub fua: bool,
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<u32>,
}

impl WriteRecord {
    /// A write issued at event `issued`, not (yet) acknowledged.
    pub fn new(id: u64, block: u64, issued: u64, fua: bool) -> Self {
        WriteRecord {
            id,
            block,
            issued,
            acked: None,
            fua,
            errno: None,
        }
    }
}

/// One flush.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushRecord {
    pub id: u64,
    #[serde(rename = "i")]
    pub issued: u64,
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub acked: Option<u64>,
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<u32>,
}

/// Why a write run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// The requested number of writes was done.
    Completed,
    /// The requested duration passed.
    TimeUp,
    /// SIGINT or SIGTERM.
    Interrupted,
    /// The connection was lost (reset, EOF, timeout, ESHUTDOWN): the normal end of a
    /// failover test.
    ServerDisconnected,
    /// The server answered a request with an error.
    ServerError,
    /// The checker itself failed.
    InternalError,
}

impl StopReason {
    /// Whether the run ended by a failure that `replcheck write` reports with a
    /// non-zero exit status (a lost server is not one).
    pub fn is_failure(self) -> bool {
        matches!(self, StopReason::ServerError | StopReason::InternalError)
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Completed => "completed",
            StopReason::TimeUp => "time-up",
            StopReason::Interrupted => "interrupted",
            StopReason::ServerDisconnected => "server-disconnected",
            StopReason::ServerError => "server-error",
            StopReason::InternalError => "internal-error",
        })
    }
}

/// The last record: how the run ended, with totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEnd {
    pub stop: StopReason,
    pub detail: String,
    pub events: u64,
    pub writes_issued: u64,
    pub writes_acked: u64,
    pub flushes_issued: u64,
    pub flushes_acked: u64,
}

fn is_false(value: &bool) -> bool {
    !*value
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{value:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        let text = String::deserialize(deserializer)?;
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

/// Streams records to a log, one line each.
pub struct LogWriter<W: Write> {
    out: W,
}

impl<W: Write> LogWriter<W> {
    pub fn new(out: W) -> Self {
        LogWriter { out }
    }

    pub fn append(&mut self, record: &LogRecord) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")
    }

    /// Flushes and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Why a log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot read the log {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the log")]
    Read(#[source] io::Error),
    #[error("log line {line}: not a log record")]
    Parse {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("log line {line}: {reason}")]
    Invalid { line: usize, reason: String },
    #[error("the log is invalid: {0}")]
    Inconsistent(String),
    #[error("the log is incomplete (no end record): the writer did not finish, so its in-flight writes are unknown")]
    Incomplete,
}

/// A whole run log in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLog {
    pub header: RunHeader,
    pub writes: Vec<WriteRecord>,
    pub flushes: Vec<FlushRecord>,
    pub end: RunEnd,
}

impl RunLog {
    /// Reads and validates the log at `path`.
    pub fn load(path: &Path) -> Result<Self, LogError> {
        let file = File::open(path).map_err(|source| LogError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(BufReader::new(file))
    }

    /// Reads and validates a log.
    pub fn parse(reader: impl BufRead) -> Result<Self, LogError> {
        let mut header = None;
        let mut writes = Vec::new();
        let mut flushes = Vec::new();
        let mut end = None;
        for (index, line) in reader.lines().enumerate() {
            let line_number = index + 1;
            let line = line.map_err(LogError::Read)?;
            if line.trim().is_empty() {
                continue;
            }
            let invalid = |reason: &str| LogError::Invalid {
                line: line_number,
                reason: reason.to_owned(),
            };
            let record: LogRecord =
                serde_json::from_str(&line).map_err(|source| LogError::Parse {
                    line: line_number,
                    source,
                })?;
            if end.is_some() {
                return Err(invalid("record after the end record"));
            }
            match (record, &header) {
                (LogRecord::Run(run), None) => {
                    if run.format != LOG_FORMAT || run.version != LOG_VERSION {
                        return Err(invalid(&format!(
                            "format {:?} version {} (this tool reads {LOG_FORMAT:?} version {LOG_VERSION})",
                            run.format, run.version
                        )));
                    }
                    header = Some(run);
                }
                (_, None) => return Err(invalid("the first record must be the run header")),
                (LogRecord::Run(_), Some(_)) => return Err(invalid("second run header")),
                (LogRecord::Write(write), Some(_)) => writes.push(write),
                (LogRecord::Flush(flush), Some(_)) => flushes.push(flush),
                (LogRecord::End(run_end), Some(_)) => end = Some(run_end),
            }
        }
        let header = header.ok_or(LogError::Incomplete)?;
        let end = end.ok_or(LogError::Incomplete)?;
        let log = RunLog {
            header,
            writes,
            flushes,
            end,
        };
        log.validate()?;
        Ok(log)
    }

    /// Writes the log in its file format.
    pub fn write_to<W: Write>(&self, out: W) -> io::Result<W> {
        let mut writer = LogWriter::new(out);
        writer.append(&LogRecord::Run(self.header.clone()))?;
        for write in &self.writes {
            writer.append(&LogRecord::Write(write.clone()))?;
        }
        for flush in &self.flushes {
            writer.append(&LogRecord::Flush(flush.clone()))?;
        }
        writer.append(&LogRecord::End(self.end.clone()))?;
        writer.finish()
    }

    /// Checks the log's internal consistency, including the per-block ordering
    /// invariant the verification relies on.
    pub fn validate(&self) -> Result<(), LogError> {
        let inconsistent = |reason: String| Err(LogError::Inconsistent(reason));
        let header = &self.header;
        if header.block_size as usize != BLOCK_SIZE {
            return inconsistent(format!(
                "block size {} (this tool uses {BLOCK_SIZE})",
                header.block_size
            ));
        }
        let mut ids = HashMap::with_capacity(self.writes.len());
        for write in &self.writes {
            if ids.insert(write.id, ()).is_some() {
                return inconsistent(format!("write id {} appears twice", write.id));
            }
            if !(header.first_block..header.end_block).contains(&write.block) {
                return inconsistent(format!(
                    "write {} to block {} outside the run's range",
                    write.id, write.block
                ));
            }
            if write.acked.is_some_and(|acked| acked <= write.issued)
                || write.issued > self.end.events
            {
                return inconsistent(format!("write {} has impossible events", write.id));
            }
        }
        for flush in &self.flushes {
            if flush.acked.is_some_and(|acked| acked <= flush.issued) {
                return inconsistent(format!("flush {} has impossible events", flush.id));
            }
        }
        let mut order: Vec<&WriteRecord> = self.writes.iter().collect();
        order.sort_unstable_by_key(|write| (write.block, write.issued));
        for pair in order.windows(2) {
            let (earlier, later) = (pair[0], pair[1]);
            if earlier.block == later.block
                && earlier.acked.is_none_or(|acked| acked >= later.issued)
            {
                return inconsistent(format!(
                    "writes {} and {} to block {} overlap (the second was issued before the first was acknowledged)",
                    earlier.id, later.id, earlier.block
                ));
            }
        }
        let writes_acked = self
            .writes
            .iter()
            .filter(|write| write.acked.is_some())
            .count();
        let flushes_acked = self
            .flushes
            .iter()
            .filter(|flush| flush.acked.is_some())
            .count();
        let counted = [
            (self.end.writes_issued, self.writes.len(), "writes issued"),
            (self.end.writes_acked, writes_acked, "writes acknowledged"),
            (
                self.end.flushes_issued,
                self.flushes.len(),
                "flushes issued",
            ),
            (
                self.end.flushes_acked,
                flushes_acked,
                "flushes acknowledged",
            ),
        ];
        for (total, records, what) in counted {
            if usize::try_from(total).ok() != Some(records) {
                return inconsistent(format!(
                    "end record counts {total} {what} but the log has {records}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RunLog {
        RunLog {
            header: RunHeader {
                format: LOG_FORMAT.to_owned(),
                version: LOG_VERSION,
                run_id: 0xfeed_0000_0000_beef,
                seed: 42,
                block_size: 4096,
                export_size: 1 << 20,
                first_block: 0,
                end_block: 256,
                queue_depth: 2,
                flush_every: Some(2),
                fua_every: None,
                uri: "nbd://127.0.0.1:1/x".to_owned(),
                started_unix_ms: 1,
            },
            writes: vec![
                WriteRecord {
                    id: 1,
                    block: 5,
                    issued: 1,
                    acked: Some(3),
                    fua: false,
                    errno: None,
                },
                WriteRecord {
                    id: 2,
                    block: 5,
                    issued: 4,
                    acked: None,
                    fua: true,
                    errno: None,
                },
            ],
            flushes: vec![FlushRecord {
                id: 1,
                issued: 2,
                acked: Some(5),
                errno: None,
            }],
            end: RunEnd {
                stop: StopReason::ServerDisconnected,
                detail: "the server closed the connection".to_owned(),
                events: 6,
                writes_issued: 2,
                writes_acked: 1,
                flushes_issued: 1,
                flushes_acked: 1,
            },
        }
    }

    fn text_of(log: &RunLog) -> String {
        String::from_utf8(log.write_to(Vec::new()).expect("in-memory write")).expect("utf-8")
    }

    #[test]
    fn round_trips_and_stays_compact() {
        let log = sample();
        let text = text_of(&log);
        assert!(
            text.contains(r#"{"t":"w","id":2,"b":5,"i":4,"fua":true}"#),
            "{text}"
        );
        assert!(text.contains(r#""run_id":"feed00000000beef""#), "{text}");
        assert_eq!(RunLog::parse(text.as_bytes()).expect("parse"), log);
    }

    #[test]
    fn refuses_broken_logs() {
        let text = text_of(&sample());
        let without_end: String = text
            .lines()
            .take(4)
            .map(|line| format!("{line}\n"))
            .collect();
        assert!(matches!(
            RunLog::parse(without_end.as_bytes()),
            Err(LogError::Incomplete)
        ));
        let garbage = format!("{text}not json\n");
        assert!(matches!(
            RunLog::parse(garbage.as_bytes()),
            Err(LogError::Parse { line: 6, .. })
        ));

        let mut overlapping = sample();
        overlapping.writes[1].issued = 2;
        assert!(
            matches!(overlapping.validate(), Err(LogError::Inconsistent(reason)) if reason.contains("overlap"))
        );
        let mut miscounted = sample();
        miscounted.end.writes_acked = 2;
        assert!(miscounted.validate().is_err());
        let mut out_of_range = sample();
        out_of_range.writes[0].block = 256;
        assert!(out_of_range.validate().is_err());
    }
}
