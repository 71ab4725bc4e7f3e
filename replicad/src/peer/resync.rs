//! Frame handling in a session, and resync (source loop, target side) and verify.
//!
//! Resync is driven by its source: it sends its out-of-sync bitmap (after merging the
//! target's, when the handshake decided the direction), then RESYNC_DATA frames —
//! only set bits, zero blocks as zero markers, optionally only blocks whose checksums
//! differ — in a bounded window, clearing bits as the target acknowledges them, then
//! RESYNC_DONE. The target persists `Inconsistent` before it takes any resync data,
//! drops resync data for blocks the replication stream rewrote meanwhile (the engine
//! tracks them), and becomes `UpToDate` only once everything is durable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::checksum::{block_crc, block_digest, zero_block_crc};
use engine::repl::{DiskState, PeerAck, ReplicationState, Role};
use engine::superblock::StoredDiskState;
use engine::wire::{BlockData, Frame, RecordFrame, MAX_FRAME_BLOCKS};
use engine::{Volume, BLOCK_BYTES};
use tokio::sync::oneshot;

use super::{Link, ResyncProgress};

/// Bitmap words per BITMAP frame (1 MiB).
const BITMAP_WORDS_PER_FRAME: usize = 128 * 1024;
/// Resync bytes in flight (sent, not yet acknowledged).
const RESYNC_WINDOW_BYTES: u64 = 16 << 20;
/// Most out-of-sync runs the source reads in one batch.
const MAX_RUNS_PER_GROUP: usize = 64;
/// Blocks per verify request.
const VERIFY_CHUNK_BLOCKS: u32 = 4096;

/// Sends our whole out-of-sync bitmap (last frame marked).
pub(crate) fn send_bitmap(link: &Link, volume: &Volume) {
    let bitmap = volume.bitmap();
    let words = bitmap.words();
    let mut first = 0;
    loop {
        let end = (first + BITMAP_WORDS_PER_FRAME).min(words.len());
        let last = end == words.len();
        link.send_data(Frame::Bitmap {
            first_word: first as u64,
            words: words[first..end].to_vec(),
            last,
        });
        if last {
            break;
        }
        first = end;
    }
}

/// Starts a resync with this node as the source. With `wait_for_peer_bitmap`, the
/// target's bitmap is merged first (the handshake decided the direction).
pub(crate) fn start_as_source(link: &Link, wait_for_peer_bitmap: bool) {
    let Some(resource) = link.resource() else {
        return;
    };
    let Some(link) = resource.link().cloned() else {
        return;
    };
    let (session, receiver) = {
        let mut inner = link.lock();
        if inner.resync_source_active {
            // One source loop per session: the running one picks up new bits.
            return;
        }
        let receiver = if wait_for_peer_bitmap {
            let (sender, receiver) = oneshot::channel();
            inner.peer_bitmap_done = Some(sender);
            Some(receiver)
        } else {
            None
        };
        inner.replication = if inner.paused {
            ReplicationState::PausedSyncS
        } else {
            ReplicationState::SyncSource
        };
        inner.resync_source_active = true;
        (inner.session, receiver)
    };
    tokio::spawn(async move {
        if let Some(receiver) = receiver {
            if tokio::time::timeout(Duration::from_secs(30), receiver)
                .await
                .is_err()
            {
                link.lock().last_error = Some("peer sent no bitmap".into());
                link.session_kill.notify_one();
                return;
            }
        }
        if let Err(error) = source_loop(&link, session).await {
            if link.lock().session == session {
                link.lock().last_error = Some(format!("resync failed: {error}"));
                link.session_kill.notify_one();
            }
        }
    });
}

fn current_session(link: &Link, session: u64) -> bool {
    link.lock().session == session
}

async fn source_loop(link: &Arc<Link>, session: u64) -> Result<(), String> {
    let resource = link.resource().ok_or("shutting down")?;
    let volume = resource.volume().ok_or("no local disk")?;
    // Tell the target what to expect (it enters SyncTarget on the last bitmap frame).
    send_bitmap(link, &volume);
    let total_blocks = volume.out_of_sync_blocks();
    {
        let mut inner = link.lock();
        inner.resync = Some(ResyncProgress {
            total_blocks,
            started: Instant::now(),
            done_blocks: 0,
        });
        inner.resync_in_flight = 0;
    }
    resource.emit(&format!(
        "peer {} replication:SyncSource ({} bytes out of sync)",
        link.peer_name,
        total_blocks * BLOCK_BYTES
    ));
    let rate_limit = resource.config.resync_rate.filter(|&rate| rate > 0);
    // Compare first after a primary crash (the marked blocks then mostly hold the same
    // data on both sides: records both journals have, which the primary had not yet
    // reported durable), else only on request. The comparison is of 64-bit digests of
    // the data as read, not of the stored CRC32s: a CRC32 cannot tell every two blocks
    // apart (any block that ends in its own CRC32 has the same one, 0x2144DF1C).
    let checksum_first = resource
        .config
        .checksum_resync
        .unwrap_or_else(|| link.lock().resync_after_crash);
    let started = Instant::now();
    let mut sent_bytes_for_rate = 0u64;
    let mut cursor = 0u64;
    loop {
        if !current_session(link, session) {
            return Ok(());
        }
        let (paused, in_flight) = {
            let inner = link.lock();
            (inner.paused, inner.resync_in_flight)
        };
        if paused || in_flight >= RESYNC_WINDOW_BYTES {
            wait_for_change(link).await;
            continue;
        }
        if resource.config.resync_yield && resource.busy() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        // A group of runs (at most one frame's worth of blocks) read together: scattered
        // single blocks are read in one batch, not one disk round trip each.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut group_blocks = 0u64;
        while runs.len() < MAX_RUNS_PER_GROUP && group_blocks < u64::from(MAX_FRAME_BLOCKS) {
            let room = u64::from(MAX_FRAME_BLOCKS) - group_blocks;
            let Some((first_block, blocks)) = volume.next_out_of_sync_run(cursor, room) else {
                break;
            };
            cursor = first_block + blocks;
            group_blocks += blocks;
            runs.push((first_block, blocks));
        }
        if runs.is_empty() {
            if in_flight > 0 {
                wait_for_change(link).await;
                continue;
            }
            if volume.out_of_sync_blocks() > 0 {
                // Bits set behind the cursor (a failed block, a new mark): another pass.
                cursor = 0;
                if volume.next_out_of_sync_run(0, 1).is_none() {
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            return finish_source(link, &volume, session).await;
        }
        if let Some(rate) = rate_limit {
            // Fixed-rate throttle: never ahead of `rate` bytes per second on average.
            let due = Duration::from_secs_f64(sent_bytes_for_rate as f64 / rate as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
        let reads: Vec<_> = runs
            .iter()
            .map(|&(first_block, blocks)| {
                let (sender, receiver) = oneshot::channel();
                volume.read(
                    first_block * BLOCK_BYTES,
                    blocks * BLOCK_BYTES,
                    Box::new(move |result| {
                        let _ = sender.send(result);
                    }),
                );
                receiver
            })
            .collect();
        for ((first_block, blocks), read) in runs.into_iter().zip(reads) {
            let data = read
                .await
                .map_err(|_| "the engine dropped a resync read".to_string())?
                .map_err(|error| {
                    format!("reading blocks {first_block}+{blocks} to resync: {error}")
                })?;
            let bytes = blocks * BLOCK_BYTES;
            let frame = if checksum_first {
                let digests = data
                    .chunks(BLOCK_BYTES as usize)
                    .map(block_digest)
                    .collect();
                link.lock().pending_checks.insert(first_block, data);
                Frame::ResyncCheck {
                    first_block,
                    digests,
                }
            } else {
                let crcs: Vec<u32> = data.chunks(BLOCK_BYTES as usize).map(block_crc).collect();
                let all_zero =
                    crcs.iter().all(|crc| *crc == zero_block_crc()) && data.iter().all(|&b| b == 0);
                if !all_zero {
                    link.resync_bytes
                        .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                    sent_bytes_for_rate += bytes;
                }
                Frame::ResyncData(BlockData {
                    first_block,
                    blocks: blocks as u32,
                    crcs,
                    data: (!all_zero).then_some(data),
                })
            };
            link.lock().resync_in_flight += bytes;
            if !link.send_data(frame) {
                return Ok(());
            }
        }
    }
}

async fn wait_for_change(link: &Link) {
    let _ = tokio::time::timeout(Duration::from_millis(200), link.resync_wake.notified()).await;
}

async fn finish_source(link: &Arc<Link>, volume: &Volume, session: u64) -> Result<(), String> {
    let current = volume.superblock().generations.current;
    let (sender, receiver) = oneshot::channel();
    link.lock().resync_done = Some(sender);
    link.send_data(Frame::ResyncDone { current });
    if tokio::time::timeout(Duration::from_secs(120), receiver)
        .await
        .is_err()
    {
        return Err("the target did not confirm the end of the resync".into());
    }
    if !current_session(link, session) {
        return Ok(());
    }
    // The target is durable and UpToDate: stop tracking since the old generation.
    let resource = link.resource().ok_or("shutting down")?;
    let update = volume.clone();
    let secondary = resource.role() == Role::Secondary;
    tokio::task::spawn_blocking(move || {
        update.update_superblock(|sb| {
            sb.generations.finish_resync_as_source();
            forget_crash(sb, secondary);
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    resource.crash_resolved();
    {
        let mut inner = link.lock();
        inner.replication = ReplicationState::Established;
        inner.resync = None;
        inner.resync_source_active = false;
    }
    resource.emit(&format!(
        "peer {} replication:Established (resync done)",
        link.peer_name
    ));
    resource.run_hook(
        resource.config.hooks.sync_done.clone(),
        "sync-done",
        &[("REPLICAD_PEER", &link.peer_name)],
    );
    link.send_state();
    Ok(())
}

/// A finished resync settled the blocks a crash as Primary left in doubt: a Secondary
/// no longer counts as a crashed primary (its superblock stops saying Primary), so it
/// cannot later outrank the node that really was Primary last.
fn forget_crash(sb: &mut engine::superblock::Superblock, secondary: bool) {
    if secondary {
        sb.flags &= !engine::superblock::flags::PRIMARY;
    }
}

/// Target: the source's bitmap arrived; persist Inconsistent, then take resync data.
async fn enter_target(link: &Arc<Link>, volume: &Volume) -> Result<(), String> {
    let resource = link.resource().ok_or("shutting down")?;
    if resource.role() == Role::Primary {
        return Err("the peer tried to resync into this Primary; refusing".into());
    }
    let update = volume.clone();
    tokio::task::spawn_blocking(move || {
        update.update_superblock(|sb| sb.disk_state = StoredDiskState::Inconsistent)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot mark the disk Inconsistent: {e}"))?;
    // The merged bits must be durable before any resync data is acknowledged: the
    // source clears its bits on our acknowledgement.
    let persist = volume.clone();
    tokio::task::spawn_blocking(move || persist.persist_bitmap())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot persist the out-of-sync bitmap: {e}"))?;
    volume.begin_resync_target();
    let total_blocks = volume.out_of_sync_blocks();
    {
        let mut inner = link.lock();
        inner.replication = if inner.paused {
            ReplicationState::PausedSyncT
        } else {
            ReplicationState::SyncTarget
        };
        inner.resync = Some(ResyncProgress {
            total_blocks,
            started: Instant::now(),
            done_blocks: 0,
        });
    }
    resource.emit(&format!(
        "disk:Inconsistent peer {} replication:SyncTarget ({} bytes to receive)",
        link.peer_name,
        total_blocks * BLOCK_BYTES
    ));
    link.send_state();
    Ok(())
}

async fn finish_target(link: Arc<Link>, volume: Volume, current: u64, session: u64) {
    let result: Result<(), String> = async {
        let durable = volume.clone();
        let ok = tokio::task::spawn_blocking(move || durable.wait_applied(Duration::from_secs(120)) && durable.checkpoint_blocking(Duration::from_secs(120)))
            .await
            .map_err(|e| e.to_string())?;
        if !ok {
            return Err("resync data could not be made durable".into());
        }
        let left = volume.out_of_sync_blocks();
        if left > 0 {
            tracing::warn!("resync done but {left} blocks still marked; clearing (the source sent everything it had)");
            volume.clear_out_of_sync(0, volume.geometry().data_blocks());
        }
        let update = volume.clone();
        let secondary = link
            .resource()
            .is_some_and(|resource| resource.role() == Role::Secondary);
        tokio::task::spawn_blocking(move || {
            update.update_superblock(|sb| {
                sb.generations.finish_resync_as_target(current);
                sb.disk_state = StoredDiskState::UpToDate;
                forget_crash(sb, secondary);
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if let Some(resource) = link.resource() {
            resource.crash_resolved();
        }
        Ok(())
    }
    .await;
    if !current_session(&link, session) {
        return;
    }
    match result {
        Ok(()) => {
            volume.end_resync_target();
            {
                let mut inner = link.lock();
                inner.replication = ReplicationState::Established;
                inner.resync = None;
            }
            link.send_data(Frame::ResyncDoneAck);
            link.send_state();
            if let Some(resource) = link.resource() {
                resource.emit(&format!(
                    "disk:UpToDate peer {} replication:Established (resync done)",
                    link.peer_name
                ));
                resource.run_hook(
                    resource.config.hooks.sync_done.clone(),
                    "sync-done",
                    &[("REPLICAD_PEER", &link.peer_name)],
                );
            }
        }
        Err(error) => {
            link.lock().last_error = Some(error);
            link.session_kill.notify_one();
        }
    }
}

/// Handles one frame of a session. An error ends the session.
pub(crate) async fn handle_frame(link: &Arc<Link>, frame: Frame) -> Result<(), String> {
    let resource = link.resource().ok_or("shutting down")?;
    let volume = resource.volume().ok_or("no local disk")?;
    match frame {
        Frame::Record(RecordFrame(record)) => {
            if resource.role() == Role::Primary {
                return Err("peer sent a record to a Primary (two primaries?); refusing".into());
            }
            let seq = record.header.seq;
            link.send_meta(Frame::AckReceived(seq));
            let meta = link.lock().meta_tx.clone();
            let done = Box::new(move |result: Result<u64, engine::IoError>| {
                if result.is_ok() {
                    if let Some(meta) = meta {
                        let _ = meta.send(Frame::AckWritten(seq));
                    }
                }
            });
            // Only when the engine's memory budget is full (bounded back-pressure) does
            // this wait, and then off the runtime's hands: handing the worker over
            // for every record cost more than journaling it. The group commit is left
            // to the session's reader, which commits once no further frame is at hand.
            let refused =
                |error: engine::IoError| format!("peer sent a record we cannot take: {error}");
            if let Some((record, done)) = volume
                .try_append_replicated_deferred(record, done)
                .map_err(refused)?
            {
                volume.commit_pending();
                tokio::task::block_in_place(|| volume.append_replicated(record, done))
                    .map_err(refused)?;
            }
        }
        Frame::AckReceived(seq) => complete_acks(link, PeerAck::Received, seq),
        // ACK_WRITTEN completes client writes (the record is in the peer's journal),
        // but the record stays held until the peer reports it durable (DURABLE): a
        // power cut of the peer can still lose what is only in its page cache, and a
        // held record is marked out of sync when the session ends.
        Frame::AckWritten(seq) => complete_acks(link, PeerAck::Written, seq),
        Frame::Flush(id) => {
            let meta = link.lock().meta_tx.clone();
            volume.flush(Box::new(move |result| {
                if result.is_ok() {
                    if let Some(meta) = meta {
                        let _ = meta.send(Frame::FlushAck(id));
                    }
                }
            }));
        }
        Frame::FlushAck(id) => {
            if let Some(sender) = link.lock().flush_waiters.remove(&id) {
                let _ = sender.send(());
            }
        }
        Frame::State(state) => {
            let previous = link.lock().peer.replace(state);
            if previous.is_none_or(|p| p.role != state.role || p.disk != state.disk) {
                resource.emit(&format!(
                    "peer {} role:{} disk:{}",
                    link.peer_name, state.role, state.disk
                ));
            }
        }
        Frame::NewGeneration { current } => {
            // A fresh store follows a fresh peer that skipped the initial sync
            // (`new-current-uuid --clear-bitmap`): both are identical and UpToDate.
            let fresh = volume.superblock().generations.current == engine::gen::JUST_CREATED;
            let update = volume.clone();
            tokio::task::spawn_blocking(move || {
                update.update_superblock(|sb| {
                    sb.generations.adopt_peer_current(current);
                    if fresh {
                        sb.disk_state = StoredDiskState::UpToDate;
                    }
                })
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            if fresh {
                volume.clear_out_of_sync(0, volume.geometry().data_blocks());
                link.send_state();
            }
        }
        Frame::Bitmap {
            first_word,
            words,
            last,
        } => {
            volume.merge_bitmap_at(first_word, &words);
            if last {
                let waiting_source = link.lock().peer_bitmap_done.take();
                match waiting_source {
                    Some(sender) => {
                        let _ = sender.send(());
                    }
                    None if link.lock().resync_source_active => {}
                    None => enter_target(link, &volume).await?,
                }
            }
        }
        Frame::ResyncData(data) => {
            let bytes = u64::from(data.blocks) * BLOCK_BYTES;
            if data.data.is_some() {
                link.resync_bytes
                    .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            }
            // May wait for the applier (bounded queue: the back-pressure that keeps our
            // acknowledgements honest), so leave the runtime thread meanwhile.
            tokio::task::block_in_place(|| {
                volume.write_resync(
                    data.first_block,
                    u64::from(data.blocks),
                    data.data,
                    data.crcs,
                )
            })
            .map_err(|e| e.to_string())?;
            link.send_meta(Frame::ResyncAck {
                first_block: data.first_block,
                blocks: data.blocks,
            });
        }
        Frame::ResyncCheck {
            first_block,
            digests,
        } => {
            // Compare the data itself (its digest), read off the store: blocks outside
            // the volume "differ", and the engine then refuses their data clearly.
            let count = digests.len() as u64;
            let in_range = first_block
                .checked_add(count)
                .is_some_and(|end| end <= volume.geometry().data_blocks());
            let link = link.clone();
            tokio::spawn(async move {
                let checks = if in_range {
                    let check_volume = volume.clone();
                    tokio::task::spawn_blocking(move || {
                        check_volume.verify_checksums(first_block, count)
                    })
                    .await
                    .ok()
                    .and_then(Result::ok)
                } else {
                    None
                };
                let mut differ = vec![0u64; digests.len().div_ceil(64)];
                for (index, digest) in digests.iter().enumerate() {
                    let same = checks.as_ref().is_some_and(|c| {
                        c.digests[index] == *digest && c.stored[index] == c.actual[index]
                    });
                    if !same {
                        differ[index / 64] |= 1 << (index % 64);
                    }
                }
                link.send_meta(Frame::ResyncCheckReply {
                    first_block,
                    blocks: count as u32,
                    differ,
                });
            });
        }
        Frame::ResyncCheckReply {
            first_block,
            blocks,
            differ,
        } => {
            let data = link.lock().pending_checks.remove(&first_block);
            let Some(data) = data else { return Ok(()) };
            // Never trust the reply's count beyond what we asked about.
            let blocks = blocks.min((data.len() as u64 / BLOCK_BYTES) as u32);
            let mut same_blocks = 0u64;
            let mut index = 0u64;
            while index < u64::from(blocks) {
                let differs = |i: u64| {
                    differ
                        .get((i / 64) as usize)
                        .is_some_and(|w| w & (1 << (i % 64)) != 0)
                };
                if !differs(index) {
                    same_blocks += 1;
                    volume.clear_out_of_sync(first_block + index, 1);
                    index += 1;
                    continue;
                }
                let start = index;
                while index < u64::from(blocks)
                    && differs(index)
                    && index - start < u64::from(MAX_FRAME_BLOCKS)
                {
                    index += 1;
                }
                let slice =
                    data.slice((start * BLOCK_BYTES) as usize..(index * BLOCK_BYTES) as usize);
                let crcs: Vec<u32> = slice.chunks(BLOCK_BYTES as usize).map(block_crc).collect();
                let all_zero = slice.iter().all(|&b| b == 0);
                let run_bytes = (index - start) * BLOCK_BYTES;
                if !all_zero {
                    link.resync_bytes
                        .fetch_add(run_bytes, std::sync::atomic::Ordering::Relaxed);
                }
                link.lock().resync_in_flight += run_bytes;
                link.send_data(Frame::ResyncData(BlockData {
                    first_block: first_block + start,
                    blocks: (index - start) as u32,
                    crcs,
                    data: (!all_zero).then_some(slice),
                }));
            }
            link.resync_skipped_bytes.fetch_add(
                same_blocks * BLOCK_BYTES,
                std::sync::atomic::Ordering::Relaxed,
            );
            let mut inner = link.lock();
            inner.resync_in_flight = inner
                .resync_in_flight
                .saturating_sub(u64::from(blocks) * BLOCK_BYTES);
            drop(inner);
            link.resync_wake.notify_waiters();
        }
        Frame::ResyncAck {
            first_block,
            blocks,
        } => {
            volume.clear_out_of_sync(first_block, u64::from(blocks));
            let mut inner = link.lock();
            inner.resync_in_flight = inner
                .resync_in_flight
                .saturating_sub(u64::from(blocks) * BLOCK_BYTES);
            if let Some(progress) = inner.resync.as_mut() {
                progress.done_blocks += u64::from(blocks);
            }
            drop(inner);
            link.resync_wake.notify_waiters();
        }
        Frame::ResyncDone { current } => {
            let session = link.lock().session;
            tokio::spawn(finish_target(link.clone(), volume, current, session));
        }
        Frame::ResyncDoneAck => {
            if let Some(sender) = link.lock().resync_done.take() {
                let _ = sender.send(());
            }
        }
        Frame::Ping(nonce) => {
            link.send_meta(Frame::Pong(nonce));
        }
        Frame::Pong(_) => {}
        // The peer's journal holds every record up to `seq` durably: on a secondary,
        // the primary has the records we hold for it; on a primary, the secondary has
        // the records we shipped. Either way ours may let go of them.
        Frame::Durable(seq) => volume.peer_acked(seq),
        Frame::ReadRequest {
            id,
            first_block,
            blocks,
        } => {
            let read_volume = volume.clone();
            let link = link.clone();
            tokio::spawn(async move {
                let result = tokio::task::spawn_blocking(move || {
                    read_volume
                        .read_blocking(first_block * BLOCK_BYTES, u64::from(blocks) * BLOCK_BYTES)
                })
                .await;
                let frame = match result {
                    Ok(Ok(data)) => {
                        let crcs = data.chunks(BLOCK_BYTES as usize).map(block_crc).collect();
                        Frame::ReadReply {
                            id,
                            data: Some(BlockData {
                                first_block,
                                blocks,
                                crcs,
                                data: Some(data),
                            }),
                            error: None,
                        }
                    }
                    Ok(Err(error)) => Frame::ReadReply {
                        id,
                        data: None,
                        error: Some(error.to_string()),
                    },
                    Err(error) => Frame::ReadReply {
                        id,
                        data: None,
                        error: Some(error.to_string()),
                    },
                };
                link.send_data(frame);
            });
        }
        Frame::ReadReply { id, data, error } => {
            if let Some(sender) = link.lock().read_waiters.remove(&id) {
                let _ = sender.send(match (data, error) {
                    (Some(data), _) => Ok(data),
                    (None, error) => Err(error.unwrap_or_else(|| "read failed".into())),
                });
            }
        }
        Frame::VerifyRequest {
            id,
            first_block,
            blocks,
        } => {
            let verify_volume = volume.clone();
            let link = link.clone();
            tokio::spawn(async move {
                let result = tokio::task::spawn_blocking(move || {
                    verify_volume.verify_checksums(first_block, u64::from(blocks))
                })
                .await;
                if let Ok(Ok(checks)) = result {
                    link.send_data(Frame::VerifyReply {
                        id,
                        first_block,
                        stored: checks.stored,
                        actual: checks.actual,
                        digests: checks.digests,
                    });
                }
            });
        }
        Frame::VerifyReply {
            id,
            stored,
            actual,
            digests,
            ..
        } => {
            if let Some(sender) = link.lock().verify_waiters.remove(&id) {
                let _ = sender.send(engine::volume::BlockChecks {
                    stored,
                    actual,
                    digests,
                });
            }
        }
        Frame::Hello(_) | Frame::Reject(_) => {
            return Err(format!("peer sent {} mid-session", frame.name()))
        }
    }
    Ok(())
}

fn complete_acks(link: &Link, kind: PeerAck, seq: u64) {
    let mut inner = link.lock();
    inner.received_seq = inner.received_seq.max(seq);
    while inner.unacked_bytes.front().is_some_and(|(s, _)| *s <= seq) {
        if let Some((_, bytes)) = inner.unacked_bytes.pop_front() {
            inner.shipped_bytes_unacked = inner.shipped_bytes_unacked.saturating_sub(bytes);
        }
    }
    let done = inner.tracker.ack(kind, seq);
    let senders: Vec<_> = done
        .iter()
        .filter_map(|waiter| inner.waiters.remove(waiter))
        .collect();
    drop(inner);
    for sender in senders {
        let _ = sender.send(());
    }
}

/// Online verify (see `Link::verify`).
pub(crate) async fn verify(link: &Arc<Link>, repair: bool) -> Result<Vec<u64>, String> {
    let resource = link.resource().ok_or("shutting down")?;
    let volume = resource.volume().ok_or("no local disk")?;
    {
        let inner = link.lock();
        if inner.connection != engine::repl::ConnectionState::Connected
            || inner.peer.is_none_or(|p| p.disk != DiskState::UpToDate)
        {
            return Err("verify needs a connected, UpToDate peer".into());
        }
        if inner.replication != ReplicationState::Established {
            return Err(format!(
                "verify needs an established connection (now {})",
                inner.replication
            ));
        }
    }
    let blocks = volume.geometry().data_blocks();
    link.lock().replication = ReplicationState::VerifyS;
    resource.emit(&format!("peer {} replication:VerifyS", link.peer_name));
    let mut suspects: Vec<u64> = Vec::new();
    let mut first = 0u64;
    let result: Result<(), String> = async {
        while first < blocks {
            let count = u64::from(VERIFY_CHUNK_BLOCKS).min(blocks - first);
            let differing = compare_chunk(link, &volume, first, count).await?;
            suspects.extend(differing);
            first += count;
        }
        // Writes in flight can make a block differ for a moment: check suspects again.
        let mut confirmed = Vec::new();
        for block in suspects.drain(..) {
            if !compare_chunk(link, &volume, block, 1).await?.is_empty() {
                confirmed.push(block);
            }
        }
        suspects = confirmed;
        Ok(())
    }
    .await;
    {
        let mut inner = link.lock();
        if inner.replication == ReplicationState::VerifyS {
            inner.replication = ReplicationState::Established;
        }
    }
    result?;
    let found = suspects.len() as u64;
    link.lock().verify_out_of_sync = Some(found);
    for block in &suspects {
        volume.set_out_of_sync(*block, 1);
        tracing::warn!("verify: block {block} differs between the replicas");
    }
    resource.emit(&format!(
        "peer {} verify done: {found} blocks out of sync",
        link.peer_name
    ));
    if repair && found > 0 {
        start_as_source(link, false);
    }
    Ok(suspects)
}

/// Blocks of `[first, first+count)` that differ between the replicas or whose data
/// does not match its stored checksum on either side.
async fn compare_chunk(
    link: &Arc<Link>,
    volume: &Volume,
    first: u64,
    count: u64,
) -> Result<Vec<u64>, String> {
    let (id, receiver) = {
        let mut inner = link.lock();
        let id = inner.next_request;
        inner.next_request += 1;
        let (sender, receiver) = oneshot::channel();
        inner.verify_waiters.insert(id, sender);
        (id, receiver)
    };
    if !link.send_data(Frame::VerifyRequest {
        id,
        first_block: first,
        blocks: count as u32,
    }) {
        return Err("connection lost during verify".into());
    }
    let local_volume = volume.clone();
    let local = tokio::task::spawn_blocking(move || local_volume.verify_checksums(first, count))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let peer = tokio::time::timeout(Duration::from_secs(60), receiver)
        .await
        .map_err(|_| "the peer did not answer a verify request".to_string())?
        .map_err(|_| "connection lost during verify".to_string())?;
    let count_usize = count as usize;
    if peer.stored.len() != count_usize
        || peer.actual.len() != count_usize
        || peer.digests.len() != count_usize
    {
        return Err("the peer answered verify for the wrong range".into());
    }
    // A block differs if the data differs (by digest), or either side's data does not
    // match its own stored checksum.
    Ok((0..count_usize)
        .filter(|&i| {
            local.digests[i] != peer.digests[i]
                || local.stored[i] != local.actual[i]
                || peer.stored[i] != peer.actual[i]
        })
        .map(|i| first + i as u64)
        .collect())
}
