//! The verification rules: a pure function of a run log and the blocks read back.
//!
//! For every block the log touched, the block's content (see [`super::block`]) is
//! placed in the block's write history (issue order, a total order by the log's
//! invariant). Then:
//!
//! - **Always:** no block holds data that was never written to it: garbage, a torn
//!   mix, an image made for another block, another run's data, or a write id the log
//!   did not issue for this block ("unknown data").
//! - **`acked` (promise P1):** each block holds its last acknowledged write or a write
//!   issued after it; zeroes only if no write to the block was acknowledged.
//! - **`durable`:** the same with only the writes that FLUSH or FUA made durable: a write
//!   with FUA that was acknowledged, or one acknowledged before an acknowledged flush was
//!   issued. This is what must survive a power loss of a single node.
//! - **`prefix` (promise P2):** the visible writes form a prefix of the acknowledged
//!   order: no block misses an acknowledged write W while another block shows a write
//!   issued after W was acknowledged. With per-block versions this is O(n): the earliest
//!   acknowledgement among missing writes against the latest issue among visible writes.
//!   Missing acknowledged writes alone are allowed here (an asynchronous replica lags).

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

use super::block::BlockContent;
use super::log::{RunLog, WriteRecord};

/// Which promise a verification checks; several may be combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every acknowledged write is present (P1, synchronous replication).
    Acked,
    /// Every write made durable by FLUSH or FUA is present.
    Durable,
    /// The visible writes form a prefix of the acknowledged order (P2).
    Prefix,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Acked => "acked",
            Mode::Durable => "durable",
            Mode::Prefix => "prefix",
        })
    }
}

/// A block's content placed in the block's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "found", rename_all = "kebab-case")]
pub enum Observed {
    /// Zeroes: the initial content.
    Initial,
    /// A write the log issued for this block.
    Version {
        write_id: u64,
        issued_event: u64,
        acked_event: Option<u64>,
    },
    /// A valid image of this run naming this block, with a write id the log did not
    /// issue for this block (`logged_block`: the block it was issued for, if any).
    UnloggedWrite {
        write_id: u64,
        logged_block: Option<u64>,
    },
    /// Misplaced, another run's, or garbage (see [`BlockContent`]).
    Foreign { content: BlockContent },
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observed::Initial => f.write_str("zeroes (never written)"),
            Observed::Version {
                write_id,
                issued_event,
                acked_event,
            } => {
                write!(f, "write {write_id} (issued at event {issued_event}, ")?;
                match acked_event {
                    Some(acked) => write!(f, "acknowledged at event {acked})"),
                    None => f.write_str("never acknowledged)"),
                }
            }
            Observed::UnloggedWrite {
                write_id,
                logged_block: Some(block),
            } => write!(
                f,
                "write {write_id}, which the log issued for block {block}"
            ),
            Observed::UnloggedWrite {
                write_id,
                logged_block: None,
            } => write!(f, "write {write_id}, which is not in the log"),
            Observed::Foreign { content } => match content {
                BlockContent::Misplaced {
                    header_block,
                    write_id,
                } => {
                    write!(f, "the image of write {write_id} for block {header_block} (misdirected or copied)")
                }
                BlockContent::OtherRun { run_id, write_id } => {
                    write!(
                        f,
                        "write {write_id} of another run {run_id:016x} (stale data)"
                    )
                }
                BlockContent::Garbage { reason } => write!(f, "garbage: {reason}"),
                BlockContent::Zeroes | BlockContent::Written { .. } => write!(f, "{content:?}"),
            },
        }
    }
}

/// One violation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Finding {
    /// The write `mode` requires in `block` is missing.
    LostWrite {
        mode: Mode,
        block: u64,
        write_id: u64,
        acked_event: u64,
        observed: Observed,
    },
    /// `block` holds data that was never written to it.
    UnknownData { block: u64, observed: Observed },
    /// `missing_block` lacks an acknowledged write while `visible_block` shows a write
    /// issued after that acknowledgement.
    PrefixHole {
        missing_block: u64,
        missing_write_id: u64,
        missing_acked_event: u64,
        visible_block: u64,
        visible_write_id: u64,
        visible_issued_event: u64,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::LostWrite {
                mode,
                block,
                write_id,
                acked_event,
                observed,
            } => write!(
                f,
                "lost write ({mode}): block {block} lacks write {write_id} (acknowledged at event {acked_event}); found {observed}"
            ),
            Finding::UnknownData { block, observed } => {
                write!(f, "unknown data: block {block} holds {observed}")
            }
            Finding::PrefixHole {
                missing_block,
                missing_write_id,
                missing_acked_event,
                visible_block,
                visible_write_id,
                visible_issued_event,
            } => write!(
                f,
                "prefix hole: block {missing_block} lacks write {missing_write_id} (acknowledged at event \
                 {missing_acked_event}) while block {visible_block} shows write {visible_write_id} issued later \
                 (event {visible_issued_event})"
            ),
        }
    }
}

/// How the checked blocks divide up (each block counts once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BlockCounts {
    /// Holds its last acknowledged write, or a write issued after it.
    pub acked_present: u64,
    /// Holds an older write than its last acknowledged one.
    pub stale: u64,
    /// Has no acknowledged write and holds one of its unacknowledged writes.
    pub unacked_present: u64,
    /// Holds zeroes (whether allowed or not).
    pub initial: u64,
    /// Holds data never written to it.
    pub unknown: u64,
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub passed: bool,
    pub modes: Vec<Mode>,
    pub run_id: String,
    pub writes_in_log: u64,
    pub writes_acked: u64,
    pub blocks_checked: u64,
    pub blocks: BlockCounts,
    /// Blocks whose last acknowledged write is missing (fails mode `acked`).
    pub lost_acked: u64,
    /// Blocks whose last durable write is missing (fails mode `durable`).
    pub lost_durable: u64,
    /// Blocks holding data never written to them (always fails).
    pub unknown_data: u64,
    /// Visible writes issued after an acknowledged write that is missing elsewhere
    /// (fails mode `prefix`).
    pub prefix_violations: u64,
    /// The first few violations of each kind that counts for the chosen modes.
    pub findings: Vec<Finding>,
    /// Violations counted but not listed.
    pub findings_omitted: u64,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let modes: Vec<String> = self.modes.iter().map(Mode::to_string).collect();
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        writeln!(
            f,
            "replcheck verify: {verdict} (modes: {})",
            modes.join(",")
        )?;
        writeln!(
            f,
            "  run {}: {} writes in the log, {} acknowledged; {} blocks checked",
            self.run_id, self.writes_in_log, self.writes_acked, self.blocks_checked
        )?;
        let counts = &self.blocks;
        writeln!(
            f,
            "  blocks: {} hold their last acknowledged write (or later), {} hold an unacknowledged write, \
             {} are zeroes, {} hold an older write, {} hold unknown data",
            counts.acked_present, counts.unacked_present, counts.initial, counts.stale, counts.unknown
        )?;
        if self.modes.contains(&Mode::Acked) {
            writeln!(f, "  lost acknowledged writes: {}", self.lost_acked)?;
        }
        if self.modes.contains(&Mode::Durable) {
            writeln!(f, "  lost durable writes: {}", self.lost_durable)?;
        }
        writeln!(f, "  unknown data: {}", self.unknown_data)?;
        if self.modes.contains(&Mode::Prefix) {
            writeln!(f, "  prefix violations: {}", self.prefix_violations)?;
        }
        for finding in &self.findings {
            writeln!(f, "  - {finding}")?;
        }
        if self.findings_omitted > 0 {
            writeln!(f, "  ... and {} more", self.findings_omitted)?;
        }
        Ok(())
    }
}

/// Collects findings, keeping the first `limit` of each kind.
struct Findings {
    limit: usize,
    listed: HashMap<&'static str, usize>,
    findings: Vec<Finding>,
    omitted: u64,
}

impl Findings {
    fn add(&mut self, kind: &'static str, finding: impl FnOnce() -> Finding) {
        let listed = self.listed.entry(kind).or_default();
        if *listed < self.limit {
            *listed += 1;
            self.findings.push(finding());
        } else {
            self.omitted += 1;
        }
    }
}

/// Verifies the blocks of `log` under `modes`. `observe(block)` gives the classified
/// content of each block the log touched. `log` must have passed [`RunLog::validate`].
/// `max_examples` bounds the findings listed per kind.
pub fn verify(
    log: &RunLog,
    modes: &[Mode],
    mut observe: impl FnMut(u64) -> BlockContent,
    max_examples: usize,
) -> VerifyReport {
    let writes = &log.writes;
    let checks = |mode| modes.contains(&mode);
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_unstable_by_key(|&index| (writes[index].block, writes[index].issued));
    let by_id: HashMap<u64, usize> = writes
        .iter()
        .enumerate()
        .map(|(index, write)| (write.id, index))
        .collect();
    // A write acknowledged before an acknowledged flush was issued is durable.
    let last_covering_flush = log
        .flushes
        .iter()
        .filter(|flush| flush.acked.is_some())
        .map(|flush| flush.issued)
        .max();
    let is_durable = |write: &WriteRecord| {
        write.acked.is_some_and(|acked| {
            write.fua || last_covering_flush.is_some_and(|flush| acked < flush)
        })
    };

    let mut counts = BlockCounts::default();
    let mut findings = Findings {
        limit: max_examples,
        listed: HashMap::new(),
        findings: Vec::new(),
        omitted: 0,
    };
    let (mut lost_acked, mut lost_durable, mut blocks_checked) = (0u64, 0u64, 0u64);
    // Prefix bookkeeping: visible writes, and the earliest acknowledged missing write.
    let mut visible_writes: Vec<(u64, u64, u64)> = Vec::new();
    let mut earliest_missing: Option<(u64, u64, u64)> = None;

    for history in order.chunk_by(|&left, &right| writes[left].block == writes[right].block) {
        let block = writes[history[0]].block;
        blocks_checked += 1;
        let at = |position: usize| &writes[history[position]];
        let visible = match observe(block) {
            BlockContent::Zeroes => Ok(None),
            BlockContent::Written { write_id } => {
                let position = by_id
                    .get(&write_id)
                    .and_then(|&index| history.iter().position(|&candidate| candidate == index));
                position.map(Some).ok_or(Observed::UnloggedWrite {
                    write_id,
                    logged_block: by_id.get(&write_id).map(|&index| writes[index].block),
                })
            }
            content => Err(Observed::Foreign { content }),
        };
        let visible = match visible {
            Ok(visible) => visible,
            Err(observed) => {
                counts.unknown += 1;
                findings.add("unknown-data", || Finding::UnknownData { block, observed });
                continue;
            }
        };
        let observed = match visible {
            None => Observed::Initial,
            Some(position) => Observed::Version {
                write_id: at(position).id,
                issued_event: at(position).issued,
                acked_event: at(position).acked,
            },
        };
        let last_acked = history
            .iter()
            .rposition(|&index| writes[index].acked.is_some());
        let last_durable = history
            .iter()
            .rposition(|&index| is_durable(&writes[index]));
        match (visible, last_acked) {
            (None, _) => counts.initial += 1,
            (Some(position), Some(required)) if position < required => counts.stale += 1,
            (Some(_), Some(_)) => counts.acked_present += 1,
            (Some(_), None) => counts.unacked_present += 1,
        }
        for (mode, required, lost) in [
            (Mode::Acked, last_acked, &mut lost_acked),
            (Mode::Durable, last_durable, &mut lost_durable),
        ] {
            let Some(required) = required else { continue };
            if visible.is_some_and(|position| position >= required) {
                continue;
            }
            *lost += 1;
            if checks(mode) {
                let write = at(required);
                let acked_event = write.acked.unwrap_or_default();
                findings.add(
                    if mode == Mode::Acked {
                        "lost-acked"
                    } else {
                        "lost-durable"
                    },
                    || Finding::LostWrite {
                        mode,
                        block,
                        write_id: write.id,
                        acked_event,
                        observed,
                    },
                );
            }
        }
        if let Some(position) = visible {
            visible_writes.push((at(position).issued, block, at(position).id));
        }
        let first_missing = visible.map_or(0, |position| position + 1);
        let missing_acked = history[first_missing..]
            .iter()
            .map(|&index| &writes[index])
            .find(|write| write.acked.is_some());
        if let Some(write) = missing_acked {
            let acked = write.acked.unwrap_or_default();
            if earliest_missing.is_none_or(|(earliest, _, _)| acked < earliest) {
                earliest_missing = Some((acked, block, write.id));
            }
        }
    }

    let mut prefix_violations = 0;
    if let Some((missing_acked_event, missing_block, missing_write_id)) = earliest_missing {
        visible_writes.sort_unstable();
        for &(visible_issued_event, visible_block, visible_write_id) in &visible_writes {
            if visible_issued_event <= missing_acked_event {
                continue;
            }
            prefix_violations += 1;
            if checks(Mode::Prefix) {
                findings.add("prefix-hole", || Finding::PrefixHole {
                    missing_block,
                    missing_write_id,
                    missing_acked_event,
                    visible_block,
                    visible_write_id,
                    visible_issued_event,
                });
            }
        }
    }

    let passed = counts.unknown == 0
        && !(checks(Mode::Acked) && lost_acked > 0)
        && !(checks(Mode::Durable) && lost_durable > 0)
        && !(checks(Mode::Prefix) && prefix_violations > 0);
    VerifyReport {
        passed,
        modes: modes.to_vec(),
        run_id: format!("{:016x}", log.header.run_id),
        writes_in_log: writes.len() as u64,
        writes_acked: writes.iter().filter(|write| write.acked.is_some()).count() as u64,
        blocks_checked,
        blocks: counts,
        lost_acked,
        lost_durable,
        unknown_data: counts.unknown,
        prefix_violations,
        findings: findings.findings,
        findings_omitted: findings.omitted,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::checker::block::{classify_block, encode_block, BLOCK_SIZE};
    use crate::checker::log::{
        FlushRecord, RunEnd, RunHeader, StopReason, LOG_FORMAT, LOG_VERSION,
    };

    const RUN: u64 = 0x5EED_0000_0000_0001;

    /// A synthetic run: a log built event by event, and an image of what "landed".
    struct History {
        log: RunLog,
        event: u64,
        image: HashMap<u64, [u8; BLOCK_SIZE]>,
    }

    impl History {
        fn new() -> Self {
            let header = RunHeader {
                format: LOG_FORMAT.to_owned(),
                version: LOG_VERSION,
                run_id: RUN,
                seed: 1,
                block_size: 4096,
                export_size: 1 << 20,
                first_block: 0,
                end_block: 256,
                queue_depth: 4,
                flush_every: None,
                fua_every: None,
                uri: "nbd://test".to_owned(),
                started_unix_ms: 0,
            };
            let end = RunEnd {
                stop: StopReason::ServerDisconnected,
                detail: String::new(),
                events: 0,
                writes_issued: 0,
                writes_acked: 0,
                flushes_issued: 0,
                flushes_acked: 0,
            };
            History {
                log: RunLog {
                    header,
                    writes: Vec::new(),
                    flushes: Vec::new(),
                    end,
                },
                event: 0,
                image: HashMap::new(),
            }
        }

        fn next_event(&mut self) -> u64 {
            self.event += 1;
            self.event
        }

        /// Issues a write to `block`; returns its id.
        fn issue(&mut self, block: u64, fua: bool) -> u64 {
            let id = self.log.writes.len() as u64 + 1;
            let issued = self.next_event();
            self.log
                .writes
                .push(WriteRecord::new(id, block, issued, fua));
            id
        }

        fn ack(&mut self, id: u64) {
            let acked = self.next_event();
            self.log.writes[id as usize - 1].acked = Some(acked);
        }

        /// Issues, acknowledges and lands a write.
        fn write(&mut self, block: u64) -> u64 {
            let id = self.issue(block, false);
            self.ack(id);
            self.land(id);
            id
        }

        fn flush(&mut self) {
            let issued = self.next_event();
            let acked = self.next_event();
            let id = self.log.flushes.len() as u64 + 1;
            self.log.flushes.push(FlushRecord {
                id,
                issued,
                acked: Some(acked),
                errno: None,
            });
        }

        /// Puts write `id`'s image into its block.
        fn land(&mut self, id: u64) {
            let block = self.log.writes[id as usize - 1].block;
            let mut data = [0u8; BLOCK_SIZE];
            encode_block(RUN, block, id, &mut data);
            self.image.insert(block, data);
        }

        fn set_raw(&mut self, block: u64, data: [u8; BLOCK_SIZE]) {
            self.image.insert(block, data);
        }

        fn check(&mut self, modes: &[Mode]) -> VerifyReport {
            let end = &mut self.log.end;
            end.events = self.event;
            end.writes_issued = self.log.writes.len() as u64;
            end.writes_acked = self
                .log
                .writes
                .iter()
                .filter(|write| write.acked.is_some())
                .count() as u64;
            end.flushes_issued = self.log.flushes.len() as u64;
            end.flushes_acked = self.log.flushes.len() as u64;
            self.log.validate().expect("synthetic log is valid");
            let image = &self.image;
            verify(
                &self.log,
                modes,
                |block| {
                    image.get(&block).map_or(BlockContent::Zeroes, |data| {
                        classify_block(data, block, RUN)
                    })
                },
                8,
            )
        }
    }

    const ALL: [Mode; 3] = [Mode::Acked, Mode::Durable, Mode::Prefix];

    fn kinds(report: &VerifyReport) -> Vec<&'static str> {
        report
            .findings
            .iter()
            .map(|finding| match finding {
                Finding::LostWrite {
                    mode: Mode::Acked, ..
                } => "lost-acked",
                Finding::LostWrite { .. } => "lost-durable",
                Finding::UnknownData { .. } => "unknown-data",
                Finding::PrefixHole { .. } => "prefix-hole",
            })
            .collect()
    }

    #[test]
    fn a_complete_image_passes_every_mode() {
        let mut history = History::new();
        for block in [1, 2, 3, 1, 2] {
            history.write(block);
        }
        history.flush();
        let report = history.check(&ALL);
        assert!(report.passed, "{report}");
        assert_eq!((report.blocks_checked, report.blocks.acked_present), (3, 3));
    }

    #[test]
    fn unacknowledged_writes_may_or_may_not_have_landed() {
        let mut history = History::new();
        history.write(1);
        let later = history.issue(1, false);
        history.land(later);
        history.issue(2, false); // never landed: block 2 stays zeroes
        let report = history.check(&ALL);
        assert!(report.passed, "{report}");
        assert_eq!((report.blocks.acked_present, report.blocks.initial), (1, 1));
    }

    #[test]
    fn a_lost_acknowledged_write_fails() {
        let mut history = History::new();
        history.write(1);
        history.write(2);
        history.image.remove(&2);
        let report = history.check(&[Mode::Acked]);
        assert!(!report.passed, "{report}");
        assert_eq!((report.lost_acked, kinds(&report)), (1, vec!["lost-acked"]));
    }

    #[test]
    fn a_stale_version_is_a_lost_write() {
        let mut history = History::new();
        let old = history.write(1);
        history.write(1);
        history.land(old);
        let report = history.check(&[Mode::Acked]);
        assert_eq!(
            (report.passed, report.blocks.stale, report.lost_acked),
            (false, 1, 1),
            "{report}"
        );
    }

    #[test]
    fn data_never_written_to_a_block_fails_every_mode() {
        let image = |run, block, write_id| {
            let mut data = [0u8; BLOCK_SIZE];
            encode_block(run, block, write_id, &mut data);
            data
        };
        // The histories below write block 5 (write 1), then block 6 (write 2).
        let mut torn = image(RUN, 5, 1);
        torn[BLOCK_SIZE / 2..].copy_from_slice(&image(RUN, 5, 9)[BLOCK_SIZE / 2..]);
        let cases = [
            ("misplaced copy of another block", image(RUN, 6, 2)),
            ("write id issued for another block", image(RUN, 5, 2)),
            ("write id never issued", image(RUN, 5, 99)),
            ("garbage", [0xA5; BLOCK_SIZE]),
            ("torn mix of two writes", torn),
            ("another run's data", image(RUN + 1, 5, 1)),
        ];
        for (name, data) in cases {
            for modes in [&[Mode::Acked][..], &[Mode::Durable], &[Mode::Prefix]] {
                let mut history = History::new();
                history.write(5);
                history.write(6);
                history.set_raw(5, data);
                let report = history.check(modes);
                assert!(!report.passed, "{name}: {report}");
                assert_eq!(
                    (report.unknown_data, kinds(&report)),
                    (1, vec!["unknown-data"]),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn a_block_without_acknowledged_writes_may_read_as_zeroes() {
        let mut history = History::new();
        history.issue(3, false);
        assert!(history.check(&[Mode::Acked]).passed);
    }

    #[test]
    fn a_prefix_hole_fails_prefix_mode() {
        let mut history = History::new();
        history.write(1);
        history.write(2); // acknowledged...
        history.write(3); // ...and block 3 was written after that acknowledgement
        history.image.remove(&2);
        let report = history.check(&[Mode::Prefix]);
        assert!(!report.passed, "{report}");
        assert_eq!(
            (report.prefix_violations, kinds(&report)),
            (1, vec!["prefix-hole"])
        );
        assert_eq!(report.lost_acked, 1, "counted even when not checked");
    }

    #[test]
    fn a_lagging_but_consistent_replica_passes_prefix_mode() {
        let mut history = History::new();
        history.write(1);
        // Two concurrent writes: the second was issued before the first was acknowledged,
        // so either may be visible without the other.
        let first = history.issue(2, false);
        let second = history.issue(3, false);
        history.ack(first);
        history.ack(second);
        history.land(second);
        // The tail (acknowledged, not replicated yet) is missing: allowed in prefix mode.
        history.write(4);
        history.image.remove(&4);
        let report = history.check(&[Mode::Prefix]);
        assert!(report.passed, "{report}");
        assert!(!history.check(&[Mode::Acked]).passed);
    }

    #[test]
    fn durable_mode_requires_only_flushed_or_fua_writes() {
        let mut history = History::new();
        history.write(1);
        history.flush();
        let fua = history.issue(2, true);
        history.ack(fua);
        history.land(fua);
        history.write(3); // acknowledged but never flushed: may vanish in a power loss
        history.image.remove(&3);
        let report = history.check(&[Mode::Durable]);
        assert!(report.passed, "{report}");
        history.image.remove(&2);
        let report = history.check(&[Mode::Durable]);
        assert_eq!(
            (report.passed, report.lost_durable, kinds(&report)),
            (false, 1, vec!["lost-durable"])
        );
        history.land(fua);
        history.image.remove(&1);
        assert_eq!(
            history.check(&[Mode::Durable]).lost_durable,
            1,
            "a flushed write is durable"
        );
    }

    #[test]
    fn findings_are_bounded_per_kind() {
        let mut history = History::new();
        for block in 0..20 {
            history.write(block);
        }
        history.image.clear();
        let report = history.check(&[Mode::Acked]);
        assert_eq!(
            (
                report.lost_acked,
                report.findings.len(),
                report.findings_omitted
            ),
            (20, 8, 12)
        );
    }
}
