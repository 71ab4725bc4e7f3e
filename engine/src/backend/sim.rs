//! An in-memory backend that knows what a power cut leaves behind.
//!
//! It keeps a *live* image (what reads see) and a *durable* image (what survived the
//! last `flush`), plus the writes issued since. [`SimBackend::power_cut`] builds a
//! post-crash image: the durable image plus any subset of the unflushed writes, each
//! possibly torn at sector granularity — exactly the freedom a volatile disk cache has.
//! A crash point (`crash_after_ops`) makes the N-th write or flush and everything after
//! it fail, so a test can crash a workload at every write and flush point.
//! Read and write faults (EIO) can be planted on byte ranges, and writes to a range can
//! be held at a gate (a slow disk, frozen mid-operation for a test to look at).

use std::io;
use std::ops::Range;
use std::sync::{Condvar, Mutex};

use super::{check_range, Backend, BackendError};
use crate::rng::SplitMix64;

/// Sector size at which unflushed writes may tear.
pub const SIM_SECTOR_BYTES: usize = 512;

#[derive(Debug, Default)]
struct SimState {
    live: Vec<u8>,
    durable: Vec<u8>,
    unflushed: Vec<(u64, Vec<u8>)>,
    ops: u64,
    crash_after_ops: Option<u64>,
    crashed: bool,
    read_faults: Vec<Range<u64>>,
    write_faults: Vec<Range<u64>>,
    flushes: u64,
    /// Writes overlapping this range wait until it is lifted.
    held: Option<Range<u64>>,
    /// Writes waiting at the gate now.
    writes_waiting: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct SimBackend {
    size_bytes: u64,
    state: Mutex<SimState>,
    gate: Condvar,
}

fn crashed_error() -> io::Error {
    io::Error::other("simulated power cut")
}

fn fault_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn overlaps(faults: &[Range<u64>], offset: u64, len: u64) -> bool {
    faults
        .iter()
        .any(|fault| fault.start < offset + len && offset < fault.end)
}

impl SimBackend {
    /// A zero-filled store of `size_bytes` (rounded down to 4 KiB).
    pub fn new(size_bytes: u64) -> SimBackend {
        SimBackend::from_image(vec![0; (size_bytes & !4095) as usize])
    }

    /// A store whose live and durable contents are `image`.
    pub fn from_image(image: Vec<u8>) -> SimBackend {
        let size_bytes = image.len() as u64 & !4095;
        SimBackend {
            size_bytes,
            state: Mutex::new(SimState {
                durable: image.clone(),
                live: image,
                ..SimState::default()
            }),
            gate: Condvar::new(),
        }
    }

    /// Writes overlapping `range` wait from now on, until [`SimBackend::release_writes`].
    pub fn hold_writes(&self, range: Range<u64>) {
        self.lock().held = Some(range);
    }

    /// Lets held writes go on.
    pub fn release_writes(&self) {
        self.lock().held = None;
        self.gate.notify_all();
    }

    /// Waits (at most `timeout`) until a write waits at the gate; false on timeout.
    pub fn wait_for_held_write(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut state = self.lock();
        while state.writes_waiting == 0 {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .gate
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        // A poisoned lock only means a test thread panicked; the data is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// From now on, the write or flush with index `ops` (counting from 0 since the
    /// store was made) and every later call fail as if the power went.
    pub fn crash_after_ops(&self, ops: u64) {
        self.lock().crash_after_ops = Some(ops);
    }

    /// Number of writes and flushes issued so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Number of successful flushes so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    /// Whether the crash point was reached.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// What reads return now.
    pub fn live_image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// What survived the last flush.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The image a power cut leaves: durable contents plus, for each unflushed write
    /// in issue order, each of its sectors kept or lost at random (seeded).
    pub fn power_cut(&self, seed: u64) -> Vec<u8> {
        let state = self.lock();
        let mut rng = SplitMix64::new(seed);
        let mut image = state.durable.clone();
        for (offset, data) in &state.unflushed {
            // A third of writes land whole, a third are lost, a third tear.
            let mode = rng.next_u64() % 3;
            for (index, sector) in data.chunks(SIM_SECTOR_BYTES).enumerate() {
                let keep = match mode {
                    0 => true,
                    1 => false,
                    _ => rng.next_u64() % 2 == 0,
                };
                if keep {
                    let start = *offset as usize + index * SIM_SECTOR_BYTES;
                    image[start..start + sector.len()].copy_from_slice(sector);
                }
            }
        }
        image
    }

    /// Reads overlapping `range` fail with EIO from now on.
    pub fn fail_reads(&self, range: Range<u64>) {
        self.lock().read_faults.push(range);
    }

    /// Writes overlapping `range` fail with EIO from now on.
    pub fn fail_writes(&self, range: Range<u64>) {
        self.lock().write_faults.push(range);
    }

    /// Removes every planted read and write fault.
    pub fn clear_faults(&self) {
        let mut state = self.lock();
        state.read_faults.clear();
        state.write_faults.clear();
    }

    /// Flips bits (XOR with `mask`) at `offset` in both images: silent corruption.
    pub fn corrupt(&self, offset: u64, mask: u8) {
        let mut state = self.lock();
        state.live[offset as usize] ^= mask;
        state.durable[offset as usize] ^= mask;
    }

    /// Counts one write or flush; fails once the crash point is reached.
    fn count_op(state: &mut SimState) -> Result<(), io::Error> {
        if state.crashed {
            return Err(crashed_error());
        }
        let index = state.ops;
        state.ops += 1;
        if state.crash_after_ops.is_some_and(|limit| index >= limit) {
            state.crashed = true;
            return Err(crashed_error());
        }
        Ok(())
    }
}

impl Backend for SimBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn alignment(&self) -> usize {
        SIM_SECTOR_BYTES
    }

    fn kind(&self) -> &'static str {
        "sim"
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        check_range(
            "read",
            offset,
            buf.len() as u64,
            self.size_bytes,
            SIM_SECTOR_BYTES,
        )?;
        let state = self.lock();
        let read_error = |source| BackendError::Read {
            offset,
            len: buf.len(),
            source,
        };
        if state.crashed {
            return Err(read_error(crashed_error()));
        }
        if overlaps(&state.read_faults, offset, buf.len() as u64) {
            return Err(read_error(fault_error()));
        }
        let start = offset as usize;
        buf.copy_from_slice(&state.live[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        check_range(
            "write",
            offset,
            buf.len() as u64,
            self.size_bytes,
            SIM_SECTOR_BYTES,
        )?;
        let mut state = self.lock();
        while state
            .held
            .as_ref()
            .is_some_and(|held| overlaps(std::slice::from_ref(held), offset, buf.len() as u64))
        {
            state.writes_waiting += 1;
            self.gate.notify_all();
            state = self
                .gate
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.writes_waiting -= 1;
        }
        let write_error = |source| BackendError::Write {
            offset,
            len: buf.len(),
            source,
        };
        if overlaps(&state.write_faults, offset, buf.len() as u64) {
            return Err(write_error(fault_error()));
        }
        if state.crashed {
            return Err(write_error(crashed_error()));
        }
        if SimBackend::count_op(&mut state).is_err() {
            // The write that hits the crash point was in flight: it may land, tear or vanish.
            state.unflushed.push((offset, buf.to_vec()));
            return Err(write_error(crashed_error()));
        }
        let start = offset as usize;
        state.live[start..start + buf.len()].copy_from_slice(buf);
        state.unflushed.push((offset, buf.to_vec()));
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        let mut state = self.lock();
        SimBackend::count_op(&mut state).map_err(|source| BackendError::Flush { source })?;
        let unflushed = std::mem::take(&mut state.unflushed);
        for (offset, data) in unflushed {
            let start = offset as usize;
            state.durable[start..start + data.len()].copy_from_slice(&data);
        }
        state.flushes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_cut_keeps_flushed_data_and_only_written_sectors() {
        let sim = SimBackend::new(8192);
        sim.write_at(0, &[1; 4096]).unwrap();
        sim.flush().unwrap();
        sim.write_at(4096, &[2; 4096]).unwrap();
        for seed in 0..32 {
            let image = sim.power_cut(seed);
            assert!(image[..4096].iter().all(|&b| b == 1));
            assert!(image[4096..].iter().all(|&b| b == 0 || b == 2));
        }
    }

    #[test]
    fn crash_point_fails_that_op_and_all_later_ones() {
        let sim = SimBackend::new(8192);
        sim.crash_after_ops(1);
        sim.write_at(0, &[1; 512]).unwrap();
        assert!(sim.write_at(512, &[2; 512]).is_err());
        assert!(sim.flush().is_err());
        assert!(sim.crashed());
        assert_eq!(
            sim.live_image()[512],
            0,
            "the crashing write never became visible"
        );
    }
}
