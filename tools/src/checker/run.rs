//! The checker's I/O drivers: the write workload and reading blocks back for
//! verification. All decisions about content live in the pure modules; this module
//! only moves bytes and stamps events.
//!
//! Fault model of the writer: the server may vanish at any moment (the normal case in a
//! failover test). Then every request in flight fails promptly (see
//! [`crate::nbd_client`]), the writer stops issuing, records those writes as never
//! acknowledged, still writes the complete log, and reports
//! [`StopReason::ServerDisconnected`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::block::{
    block_image, classify_block, BlockContent, GarbageReason, Mix64, BLOCK_BYTES, BLOCK_SIZE,
};
use super::log::{
    FlushRecord, LogError, LogRecord, LogWriter, RunEnd, RunHeader, RunLog, StopReason,
    WriteRecord, LOG_FORMAT, LOG_VERSION,
};
use super::verify::{verify, Mode, VerifyReport};
use crate::nbd_client::{NbdClient, NbdError};

/// Most blocks read by one request during verification.
const MAX_READ_BLOCKS: u64 = 64;

/// Errors of the checker itself (not of the storage under test).
#[derive(Debug, thiserror::Error)]
pub enum CheckerError {
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("writing the log failed")]
    LogWrite(#[source] io::Error),
    #[error("{0}")]
    Config(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a write run does.
#[derive(Debug, Clone)]
pub struct WritePlan {
    /// Written into every block image; tells this run's data from any other's.
    pub run_id: u64,
    /// Seeds the choice of blocks.
    pub seed: u64,
    /// Writes choose blocks in `first_block..end_block`; `None`: to the export's end.
    pub first_block: u64,
    pub end_block: Option<u64>,
    /// Writes in flight at once (capped at the number of blocks in range).
    pub queue_depth: usize,
    /// Stop after this many writes ...
    pub max_writes: Option<u64>,
    /// ... or after this long, whichever comes first.
    pub duration: Option<Duration>,
    /// Issue a flush after every K-th write.
    pub flush_every: Option<u64>,
    /// Set FUA on every K-th write.
    pub fua_every: Option<u64>,
    /// Call the progress callback every N acknowledged writes.
    pub progress_every: Option<u64>,
    /// Recorded in the log header.
    pub uri: String,
}

/// Counters handed to the progress callback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteProgress {
    pub writes_issued: u64,
    pub writes_acked: u64,
    pub flushes_issued: u64,
    pub flushes_acked: u64,
}

/// How a write run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    pub run_id: u64,
    pub stop: StopReason,
    pub detail: String,
    pub events: u64,
    pub totals: WriteProgress,
}

impl fmt::Display for WriteSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let totals = &self.totals;
        write!(
            f,
            "replcheck write: stop {} ({}); run {:016x}; writes issued {}, acked {}, unacked {}; \
             flushes issued {}, acked {}; events {}",
            self.stop,
            self.detail,
            self.run_id,
            totals.writes_issued,
            totals.writes_acked,
            totals.writes_issued - totals.writes_acked,
            totals.flushes_issued,
            totals.flushes_acked,
            self.events
        )
    }
}

/// A fresh run id: never zero, different for every call in practice.
pub fn new_run_id(seed: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    let pid = u64::from(std::process::id());
    Mix64::new(seed ^ nanos ^ pid.rotate_left(32))
        .next_u64()
        .max(1)
}

enum Request {
    Write,
    Flush,
}

struct Completion {
    request: Request,
    id: u64,
    result: Result<(), NbdError>,
    event: u64,
}

/// The first reason to stop wins, except that a failure replaces a benign reason.
fn stop_with(stopped: &mut Option<(StopReason, String)>, reason: StopReason, detail: String) {
    let replace = match stopped {
        None => true,
        Some((current, _)) => reason.is_failure() && !current.is_failure(),
    };
    if replace {
        *stopped = Some((reason, detail));
    }
}

/// A request's outcome as its log record keeps it: the ack event, or the errno of an
/// error reply. A lost server stops the run quietly; an error reply stops it as a
/// failure.
fn settle(
    result: Result<(), NbdError>,
    event: u64,
    stopped: &mut Option<(StopReason, String)>,
) -> (Option<u64>, Option<u32>) {
    let Err(error) = result else {
        return (Some(event), None);
    };
    if error.is_disconnect() {
        stop_with(stopped, StopReason::ServerDisconnected, error.to_string());
    } else if error.errno().is_some() {
        stop_with(stopped, StopReason::ServerError, error.to_string());
    } else {
        stop_with(stopped, StopReason::InternalError, error.to_string());
    }
    (None, error.errno())
}

/// Takes the record of a completed request out of its in-flight table; a completion
/// without one is a bug of the checker and stops the run.
fn claim<R>(
    in_flight: &mut HashMap<u64, R>,
    id: u64,
    stopped: &mut Option<(StopReason, String)>,
) -> Option<R> {
    let record = in_flight.remove(&id);
    if record.is_none() {
        let detail = format!("completion of unknown request {id}");
        stop_with(stopped, StopReason::InternalError, detail);
    }
    record
}

fn pick_block(rng: &mut Mix64, first_block: u64, block_count: u64, busy: &HashSet<u64>) -> u64 {
    let start = rng.next_u64() % block_count;
    (0..block_count)
        .map(|step| first_block + (start + step) % block_count)
        .find(|block| !busy.contains(block))
        .expect("fewer writes in flight than blocks in range, so one block is free")
}

/// Runs the write workload of `plan` through `client`, streaming the log to `log`.
///
/// Returns `Ok` however the server behaved (see [`WriteSummary::stop`]); `Err` only for
/// the checker's own failures (bad plan, log I/O). The log is complete on `Ok`.
/// `stop` ends the run early (e.g. a signal); writes in flight are still awaited.
pub async fn run_writes<W: Write>(
    client: &NbdClient,
    plan: &WritePlan,
    log: &mut LogWriter<W>,
    stop: impl Future<Output = ()>,
    mut on_progress: impl FnMut(&WriteProgress),
) -> Result<WriteSummary, CheckerError> {
    let info = client.info();
    let export_blocks = info.size_bytes / BLOCK_BYTES;
    let end_block = plan.end_block.unwrap_or(export_blocks);
    let config = |message: String| Err(CheckerError::Config(message));
    if plan.first_block >= end_block || end_block > export_blocks {
        return config(format!(
            "block range {}..{end_block} is empty or exceeds the export ({export_blocks} blocks of 4 KiB)",
            plan.first_block
        ));
    }
    if plan.queue_depth == 0
        || [plan.flush_every, plan.fua_every, plan.progress_every].contains(&Some(0))
    {
        return config("queue depth and --*-every values must be at least 1".to_owned());
    }
    if info.flags.read_only() {
        return config("the export is read-only".to_owned());
    }
    if plan.flush_every.is_some() && !info.flags.can_flush() {
        return config("the export does not support FLUSH".to_owned());
    }
    if plan.fua_every.is_some() && !info.flags.can_fua() {
        return config("the export does not support FUA".to_owned());
    }
    let block_count = end_block - plan.first_block;
    let queue_depth = plan
        .queue_depth
        .min(usize::try_from(block_count).unwrap_or(usize::MAX));
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64);
    let header = RunHeader {
        format: LOG_FORMAT.to_owned(),
        version: LOG_VERSION,
        run_id: plan.run_id,
        seed: plan.seed,
        block_size: BLOCK_SIZE as u32,
        export_size: info.size_bytes,
        first_block: plan.first_block,
        end_block,
        queue_depth: u32::try_from(queue_depth).unwrap_or(u32::MAX),
        flush_every: plan.flush_every,
        fua_every: plan.fua_every,
        uri: plan.uri.clone(),
        started_unix_ms,
    };
    log.append(&LogRecord::Run(header))
        .map_err(CheckerError::LogWrite)?;

    // One counter orders every issue and acknowledgement of the run.
    let events = Arc::new(AtomicU64::new(0));
    let stamp = |events: &AtomicU64| events.fetch_add(1, Ordering::SeqCst) + 1;
    let mut rng = Mix64::new(plan.seed);
    let mut tasks: JoinSet<Completion> = JoinSet::new();
    let mut busy_blocks: HashSet<u64> = HashSet::with_capacity(queue_depth);
    let mut in_flight_writes: HashMap<u64, WriteRecord> = HashMap::with_capacity(queue_depth);
    let mut in_flight_flushes: HashMap<u64, FlushRecord> = HashMap::new();
    let mut totals = WriteProgress::default();
    let mut stopped: Option<(StopReason, String)> = None;
    let deadline = plan.duration.map(|duration| Instant::now() + duration);
    let time_up = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now));
    tokio::pin!(stop, time_up);

    loop {
        while stopped.is_none()
            && busy_blocks.len() < queue_depth
            && plan.max_writes.is_none_or(|max| totals.writes_issued < max)
        {
            let block = pick_block(&mut rng, plan.first_block, block_count, &busy_blocks);
            let id = totals.writes_issued + 1;
            let fua = plan.fua_every.is_some_and(|every| id % every == 0);
            let data = block_image(plan.run_id, block, id);
            let issued = stamp(&events);
            busy_blocks.insert(block);
            in_flight_writes.insert(id, WriteRecord::new(id, block, issued, fua));
            totals.writes_issued += 1;
            let (client_handle, counter) = (client.clone(), events.clone());
            tasks.spawn(async move {
                let result = client_handle.write(block * BLOCK_BYTES, data, fua).await;
                let event = stamp(&counter);
                Completion {
                    request: Request::Write,
                    id,
                    result,
                    event,
                }
            });
            if plan.flush_every.is_some_and(|every| id % every == 0) {
                let flush_id = totals.flushes_issued + 1;
                let issued = stamp(&events);
                let record = FlushRecord {
                    id: flush_id,
                    issued,
                    acked: None,
                    errno: None,
                };
                in_flight_flushes.insert(flush_id, record);
                totals.flushes_issued += 1;
                let (client_handle, counter) = (client.clone(), events.clone());
                tasks.spawn(async move {
                    let result = client_handle.flush().await;
                    let event = stamp(&counter);
                    Completion {
                        request: Request::Flush,
                        id: flush_id,
                        result,
                        event,
                    }
                });
            }
        }
        if tasks.is_empty() {
            break;
        }
        let joined = tokio::select! {
            joined = tasks.join_next() => joined,
            () = &mut stop, if stopped.is_none() => {
                stop_with(&mut stopped, StopReason::Interrupted, "stop requested".to_owned());
                continue;
            }
            () = &mut time_up, if deadline.is_some() && stopped.is_none() => {
                stop_with(&mut stopped, StopReason::TimeUp, "the requested duration passed".to_owned());
                continue;
            }
        };
        let completion = match joined {
            Some(Ok(completion)) => completion,
            Some(Err(join_error)) => {
                // The request's record stays in flight and is logged as unacknowledged.
                stop_with(
                    &mut stopped,
                    StopReason::InternalError,
                    format!("a request task failed: {join_error}"),
                );
                continue;
            }
            None => continue,
        };
        let (acked, errno) = settle(completion.result, completion.event, &mut stopped);
        let id = completion.id;
        match completion.request {
            Request::Write => {
                let Some(mut record) = claim(&mut in_flight_writes, id, &mut stopped) else {
                    continue;
                };
                busy_blocks.remove(&record.block);
                (record.acked, record.errno) = (acked, errno);
                if acked.is_some() {
                    totals.writes_acked += 1;
                    if plan
                        .progress_every
                        .is_some_and(|every| totals.writes_acked % every == 0)
                    {
                        on_progress(&totals);
                    }
                }
                log.append(&LogRecord::Write(record))
                    .map_err(CheckerError::LogWrite)?;
            }
            Request::Flush => {
                let Some(mut record) = claim(&mut in_flight_flushes, id, &mut stopped) else {
                    continue;
                };
                (record.acked, record.errno) = (acked, errno);
                totals.flushes_acked += u64::from(acked.is_some());
                log.append(&LogRecord::Flush(record))
                    .map_err(CheckerError::LogWrite)?;
            }
        }
    }

    // Only a failed task leaves records behind: their outcome is unknown.
    let mut leftover_writes: Vec<WriteRecord> = in_flight_writes.into_values().collect();
    leftover_writes.sort_unstable_by_key(|record| record.id);
    for record in leftover_writes {
        log.append(&LogRecord::Write(record))
            .map_err(CheckerError::LogWrite)?;
    }
    let mut leftover_flushes: Vec<FlushRecord> = in_flight_flushes.into_values().collect();
    leftover_flushes.sort_unstable_by_key(|record| record.id);
    for record in leftover_flushes {
        log.append(&LogRecord::Flush(record))
            .map_err(CheckerError::LogWrite)?;
    }
    let (stop, detail) = stopped.unwrap_or((StopReason::Completed, "all writes done".to_owned()));
    if client.closed().is_none() {
        // The server is still there: leave politely. Its answer does not change the run.
        let _ = client.disconnect().await;
    }
    let events = events.load(Ordering::SeqCst);
    let end = RunEnd {
        stop,
        detail: detail.clone(),
        events,
        writes_issued: totals.writes_issued,
        writes_acked: totals.writes_acked,
        flushes_issued: totals.flushes_issued,
        flushes_acked: totals.flushes_acked,
    };
    log.append(&LogRecord::End(end))
        .map_err(CheckerError::LogWrite)?;
    Ok(WriteSummary {
        run_id: plan.run_id,
        stop,
        detail,
        events,
        totals,
    })
}

/// Reads `blocks` (sorted, without duplicates) at `queue_depth` requests in flight,
/// coalescing consecutive blocks, and classifies each against run `run_id`.
pub async fn read_blocks(
    client: &NbdClient,
    blocks: &[u64],
    run_id: u64,
    queue_depth: usize,
) -> Result<HashMap<u64, BlockContent>, CheckerError> {
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for &block in blocks {
        match extents.last_mut() {
            Some((first, count)) if *first + *count == block && *count < MAX_READ_BLOCKS => {
                *count += 1
            }
            _ => extents.push((block, 1)),
        }
    }
    let mut extents = extents.into_iter();
    let mut tasks = JoinSet::new();
    let mut contents = HashMap::with_capacity(blocks.len());
    loop {
        while tasks.len() < queue_depth.max(1) {
            let Some((first, count)) = extents.next() else {
                break;
            };
            let client = client.clone();
            tasks.spawn(async move {
                // count <= MAX_READ_BLOCKS, so the length fits a u32.
                let length = (count * BLOCK_BYTES) as u32;
                let data = client.read(first * BLOCK_BYTES, length).await?;
                let classified: Vec<(u64, BlockContent)> = (first..first + count)
                    .zip(data.chunks(BLOCK_SIZE))
                    .map(|(block, bytes)| (block, classify_block(bytes, block, run_id)))
                    .collect();
                Ok::<_, NbdError>(classified)
            });
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let classified =
            joined.map_err(|join_error| CheckerError::Internal(join_error.to_string()))??;
        contents.extend(classified);
    }
    Ok(contents)
}

/// Reads every block `log` touched from `client` and verifies it under `modes`.
pub async fn verify_export(
    client: &NbdClient,
    log: &RunLog,
    modes: &[Mode],
    queue_depth: usize,
    max_examples: usize,
) -> Result<VerifyReport, CheckerError> {
    let mut blocks: Vec<u64> = log.writes.iter().map(|write| write.block).collect();
    blocks.sort_unstable();
    blocks.dedup();
    let export_blocks = client.info().size_bytes / BLOCK_BYTES;
    if let Some(&last) = blocks.last() {
        if last >= export_blocks {
            return Err(CheckerError::Config(format!(
                "the export has {export_blocks} blocks but the log wrote block {last}"
            )));
        }
    }
    let contents = read_blocks(client, &blocks, log.header.run_id, queue_depth).await?;
    let observe = |block| {
        // Every block was read above; a gap would be a bug, reported as garbage.
        contents
            .get(&block)
            .copied()
            .unwrap_or(BlockContent::Garbage {
                reason: GarbageReason::WrongSize,
            })
    };
    Ok(verify(log, modes, observe, max_examples))
}
