//! Reads: overlay first, then the store, every block checked against its checksum.
//!
//! The first attempt takes no lock beyond a short overlay lookup. If a block's
//! checksum does not match, the applier may have been rewriting it at that moment
//! (its newer write landed after our overlay lookup), so the read is retried while
//! holding the apply lock for reading; a mismatch then is real corruption and fails
//! the read with [`IoError::Checksum`] — never bad data.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::Shared;
use crate::backend::ReadOp;
use crate::checksum::block_crc;
use crate::error::IoError;
use crate::BLOCK_BYTES;

/// Reads `[offset, offset+length)` (already range-checked).
pub(super) fn read_now(shared: &Shared, offset: u64, length: u64) -> Result<Bytes, IoError> {
    shared.stats.reads.fetch_add(1, Ordering::Relaxed);
    shared.stats.read_bytes.fetch_add(length, Ordering::Relaxed);
    let first_block = offset / BLOCK_BYTES;
    let last_block = (offset + length - 1) / BLOCK_BYTES;
    let blocks = last_block - first_block + 1;
    let mut buf = BytesMut::zeroed((blocks * BLOCK_BYTES) as usize);
    if let Err(first_error) = read_blocks(shared, first_block, &mut buf, false) {
        if !matches!(first_error, IoError::Checksum { .. }) {
            return Err(first_error);
        }
        let _apply = shared.apply_lock.read().unwrap_or_else(|p| p.into_inner());
        read_blocks(shared, first_block, &mut buf, true)?;
    }
    let start = (offset % BLOCK_BYTES) as usize;
    Ok(buf.freeze().slice(start..start + length as usize))
}

/// Fills `buf` with blocks starting at `first_block`.
fn read_blocks(
    shared: &Shared,
    first_block: u64,
    buf: &mut [u8],
    final_attempt: bool,
) -> Result<(), IoError> {
    let blocks = buf.len() as u64 / BLOCK_BYTES;
    let mut from_overlay = vec![false; blocks as usize];
    {
        let state = shared.lock();
        if let Some(reason) = &state.failed {
            return Err(IoError::Failed(reason.clone()));
        }
        if !state.overlay.is_empty() {
            for index in 0..blocks {
                if let Some(entry) = state.overlay.get(&(first_block + index)) {
                    let at = (index * BLOCK_BYTES) as usize;
                    let slot = &mut buf[at..at + BLOCK_BYTES as usize];
                    match &entry.data {
                        Some(data) => slot.copy_from_slice(data),
                        None => slot.fill(0),
                    }
                    from_overlay[index as usize] = true;
                }
            }
        }
    }
    // Runs of blocks not in the overlay, read with one call each.
    let mut ops = Vec::new();
    let mut rest = &mut buf[..];
    let mut consumed = 0u64;
    let mut index = 0u64;
    while index < blocks {
        if from_overlay[index as usize] {
            index += 1;
            continue;
        }
        let run_start = index;
        while index < blocks && !from_overlay[index as usize] {
            index += 1;
        }
        let skip = ((run_start - consumed) * BLOCK_BYTES) as usize;
        let take = ((index - run_start) * BLOCK_BYTES) as usize;
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
        let (run, tail) = tail.split_at_mut(take);
        rest = tail;
        consumed = index;
        ops.push(ReadOp {
            offset: (first_block + run_start) * BLOCK_BYTES,
            buf: run,
        });
    }
    if !ops.is_empty() {
        shared.data.read_many(&mut ops)?;
    }
    drop(ops);
    for index in 0..blocks {
        if from_overlay[index as usize] {
            continue;
        }
        let block = first_block + index;
        let at = (index * BLOCK_BYTES) as usize;
        let computed = block_crc(&buf[at..at + BLOCK_BYTES as usize]);
        let stored = shared.checksums.get(block);
        if computed != stored {
            if final_attempt {
                shared.stats.checksum_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("checksum mismatch in block {block}: stored {stored:#010x}, data {computed:#010x}");
            }
            return Err(IoError::Checksum {
                block,
                stored,
                computed,
            });
        }
    }
    Ok(())
}

/// See `Volume::verify_checksums`.
pub(super) fn verify_checksums(
    shared: &Shared,
    first_block: u64,
    blocks: u64,
) -> Result<(Vec<u32>, Vec<u32>), IoError> {
    // Hold the apply lock so no in-place write is half done while we look.
    let _apply = shared.apply_lock.read().unwrap_or_else(|p| p.into_inner());
    let overlay: Vec<Option<u32>> = {
        let state = shared.lock();
        (0..blocks)
            .map(|index| {
                state
                    .overlay
                    .get(&(first_block + index))
                    .map(|entry| match &entry.data {
                        Some(data) => block_crc(data),
                        None => crate::checksum::zero_block_crc(),
                    })
            })
            .collect()
    };
    let mut buf = vec![0u8; (blocks * BLOCK_BYTES) as usize];
    shared.data.read_at(first_block * BLOCK_BYTES, &mut buf)?;
    let mut stored = Vec::with_capacity(blocks as usize);
    let mut actual = Vec::with_capacity(blocks as usize);
    for (index, block) in buf.chunks(BLOCK_BYTES as usize).enumerate() {
        match overlay[index] {
            Some(crc) => {
                stored.push(crc);
                actual.push(crc);
            }
            None => {
                stored.push(shared.checksums.get(first_block + index as u64));
                actual.push(block_crc(block));
            }
        }
    }
    Ok((stored, actual))
}

/// A reader thread's body: serve queued reads until the volume closes.
pub(super) fn run(shared: Arc<Shared>) {
    loop {
        let job = {
            let mut queue = shared.reads.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(job) = queue.pop_front() {
                    break job;
                }
                let state = shared.lock();
                let stopping = state.closing || state.failed.is_some();
                drop(state);
                if stopping {
                    return;
                }
                queue = shared
                    .reads_wake
                    .wait(queue)
                    .unwrap_or_else(|p| p.into_inner());
            }
        };
        let result = read_now(&shared, job.offset, job.length);
        (job.done)(result);
    }
}
