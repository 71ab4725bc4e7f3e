//! The io_uring backend: a batch of reads or writes runs concurrently in the kernel.
//!
//! A backend owns a small pool of rings (`RINGS`), each behind its own mutex. A call
//! takes one ring (a free one if any, so threads do not queue behind each other),
//! submits its own operations, waits until **every** operation it submitted has
//! completed, and only then releases the ring and returns. That is the whole safety
//! argument for handing the caller's buffers to the kernel: they are borrowed for the
//! duration of the call, and no operation outlives the call. Consequences:
//!
//! * A ring's completion queue is empty whenever its lock is free, so a completion can
//!   never be attributed to the wrong call.
//! * `Drop` has nothing to drain: no operation is in flight once the last call returned.
//! * A call never has more operations queued than its ring holds (`depth`), so the
//!   completion queue cannot overflow; longer batches are fed through a window of
//!   `depth` slots, a new operation starting as soon as one completes.
//! * When an operation fails, no new operation starts, but every one already submitted
//!   is still reaped before the call returns with the first error.
//! * A panic while a ring's lock is held aborts the process (`AbortOnUnwind`):
//!   unwinding would free buffers the kernel may still write into.
//!
//! Short transfers are continued from where they stopped; a transfer of zero bytes is an
//! error (`UnexpectedEof`, `WriteZero`), never a success. Under O_DIRECT, buffers whose
//! address is not aligned go through an [`AlignedBuf`] bounce buffer, one piece of at
//! most `MAX_BOUNCE_BYTES` at a time, so bounce memory stays bounded by
//! `depth * MAX_BOUNCE_BYTES`.
//!
//! If the kernel refuses submissions for good (an `io_uring_enter` error other than
//! EINTR/EAGAIN/EBUSY), the operations it already accepted are still waited for, then
//! the ring is marked *broken* and never entered again: entries it did not consume stay
//! in the submission queue forever, never submitted, so their buffers are never touched.
//! Every later call fails.

use std::fmt;
use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use io_uring::{opcode, squeue, types, EnterFlags, IoUring};

use super::store::{open_error, Store};
use super::{check_batch, AlignedBuf, Backend, BackendError, ReadOp, WriteOp};

/// Submission queue entries per ring (the completion queue gets twice as many).
const RING_ENTRIES: u32 = 128;
/// Rings per backend: how many calls (from different threads) run at the same time.
/// With one ring, four threads doing single writes under O_DIRECT reached a third of
/// what `pread` reached; see `examples/backend_speed.rs`.
const RINGS: usize = 4;
/// Largest transfer of one submission; longer requests continue in further pieces.
/// A multiple of every alignment, and it fits the `u32` length of an SQE.
const MAX_PIECE_BYTES: usize = 1 << 30;
/// Largest bounce buffer of one submission under O_DIRECT.
const MAX_BOUNCE_BYTES: usize = 256 << 10;
/// How often one request is resubmitted after EINTR or EAGAIN before it fails.
const MAX_RETRIES_PER_REQUEST: u32 = 16;
/// How often `io_uring_enter` may fail with EAGAIN/EBUSY, with nothing in the kernel to
/// wait for, before the call gives up.
const MAX_ENTER_STALLS: u32 = 1024;
/// Index of the store in the ring's registered file table.
const STORE: types::Fixed = types::Fixed(0);

const _: () = assert!(MAX_PIECE_BYTES % 4096 == 0 && MAX_PIECE_BYTES <= u32::MAX as usize);
const _: () = assert!(MAX_BOUNCE_BYTES % 4096 == 0 && MAX_BOUNCE_BYTES <= MAX_PIECE_BYTES);

/// A store reached through io_uring; O_DIRECT when asked and allowed.
#[derive(Debug)]
pub struct UringBackend {
    // Declared before `store` so the rings (and their registered file references) go first.
    rings: Box<[Mutex<Ring>]>,
    /// Where the next call starts looking for a free ring.
    next_ring: AtomicUsize,
    store: Store,
}

impl UringBackend {
    /// Opens `path` read-write. With `direct`, tries O_DIRECT and falls back to buffered
    /// I/O where the file system refuses it. Fails with the kernel's errno (ENOSYS,
    /// EPERM) where io_uring is unavailable, so [`super::open`] can fall back to `pread`.
    pub fn open(path: &Path, direct: bool) -> Result<UringBackend, BackendError> {
        let store = Store::open(path, direct)?;
        UringBackend::with_store(store).map_err(|source| open_error(path, source))
    }

    /// Sets up the rings for an open store.
    fn with_store(store: Store) -> io::Result<UringBackend> {
        let rings = (0..RINGS)
            .map(|_| Ring::new(&store.file).map(Mutex::new))
            .collect::<io::Result<Box<[_]>>>()?;
        Ok(UringBackend {
            rings,
            next_ring: AtomicUsize::new(0),
            store,
        })
    }

    /// Runs `requests` on a ring and maps a failure to the error of its operation.
    fn run(&self, requests: &[Request<'_>]) -> Result<(), BackendError> {
        let bounce_alignment = self.store.direct.then_some(self.store.alignment);
        let Err(failure) = self.take_ring().run(requests, bounce_alignment) else {
            return Ok(());
        };
        let request = &requests[failure.request];
        let source = failure.source;
        Err(match request.action {
            Action::Read => BackendError::Read {
                offset: request.offset,
                len: request.len,
                source,
            },
            Action::Write => BackendError::Write {
                offset: request.offset,
                len: request.len,
                source,
            },
            Action::Fsync => BackendError::Flush { source },
        })
    }

    /// A ring for one call: the first free one from a rotating start, else (all busy)
    /// waits for the one at the start.
    fn take_ring(&self) -> MutexGuard<'_, Ring> {
        // A panic while a ring's lock is held aborts the process (AbortOnUnwind), so a
        // lock is only ever poisoned by a panic outside a batch and its ring is consistent.
        let start = self.next_ring.fetch_add(1, Ordering::Relaxed);
        for step in 0..self.rings.len() {
            let ring = &self.rings[(start + step) % self.rings.len()];
            match ring.try_lock() {
                Ok(guard) => return guard,
                Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.rings[start % self.rings.len()]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Backend for UringBackend {
    fn size_bytes(&self) -> u64 {
        self.store.size_bytes
    }

    fn alignment(&self) -> usize {
        self.store.alignment
    }

    fn kind(&self) -> &'static str {
        "io_uring"
    }

    fn is_direct(&self) -> bool {
        self.store.direct
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.read_many(&mut [ReadOp { offset, buf }])
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        self.write_many(&[WriteOp { offset, buf }])
    }

    fn read_many(&self, ops: &mut [ReadOp<'_>]) -> Result<(), BackendError> {
        self.store.check_latch()?;
        let ranges = ops.iter().map(ReadOp::range);
        check_batch("read", ranges, self.store.size_bytes, self.store.alignment)?;
        let requests: Vec<Request<'_>> = ops
            .iter_mut()
            .filter(|op| !op.buf.is_empty())
            .map(|op| Request::read(op.offset, op.buf))
            .collect();
        self.run(&requests)
    }

    fn write_many(&self, ops: &[WriteOp<'_>]) -> Result<(), BackendError> {
        self.store.check_latch()?;
        let ranges = ops.iter().map(WriteOp::range);
        check_batch("write", ranges, self.store.size_bytes, self.store.alignment)?;
        let requests: Vec<Request<'_>> = ops
            .iter()
            .filter(|op| !op.buf.is_empty())
            .map(|op| Request::write(op.offset, op.buf))
            .collect();
        self.run(&requests)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.store.write_zeroes(self, offset, len)
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.store.is_hole(offset, len)
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.store.flush_with(|| self.run(&[Request::fsync()]))
    }
}

/// What one request of a batch does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Read,
    Write,
    /// `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`: fdatasync of the whole store.
    Fsync,
}

/// One request of a batch: `action` on `[offset, offset + len)` of the store, with the
/// caller's memory at `addr`. The lifetime ties the request to the caller's buffer;
/// for writes the memory is only ever read.
struct Request<'a> {
    action: Action,
    offset: u64,
    addr: *mut u8,
    len: usize,
    _buffer: PhantomData<&'a mut [u8]>,
}

impl<'a> Request<'a> {
    fn read(offset: u64, buf: &'a mut [u8]) -> Request<'a> {
        Request {
            action: Action::Read,
            offset,
            addr: buf.as_mut_ptr(),
            len: buf.len(),
            _buffer: PhantomData,
        }
    }

    fn write(offset: u64, buf: &'a [u8]) -> Request<'a> {
        Request {
            action: Action::Write,
            offset,
            // Only IORING_OP_WRITE and the bounce copy use this pointer; both only read.
            addr: buf.as_ptr().cast_mut(),
            len: buf.len(),
            _buffer: PhantomData,
        }
    }

    fn fsync() -> Request<'static> {
        Request {
            action: Action::Fsync,
            offset: 0,
            addr: std::ptr::null_mut(),
            len: 0,
            _buffer: PhantomData,
        }
    }
}

/// The first failure of a batch: which request, and why.
#[derive(Debug)]
struct BatchFailure {
    request: usize,
    source: io::Error,
}

/// An in-flight table entry: the request a slot works on and what the kernel holds.
#[derive(Debug)]
struct Slot {
    request: usize,
    /// Bytes of the request already transferred.
    done_bytes: usize,
    /// Bytes asked for by the submission in flight.
    piece_bytes: usize,
    /// Aligned copy of the piece in flight, under O_DIRECT with unaligned memory. It is
    /// owned here until the piece's completion has been reaped.
    bounce: Option<AlignedBuf>,
    retries: u32,
}

/// What a completion means for its slot.
enum Step {
    Finished,
    Continue,
    Failed(io::Error),
}

/// Aborts the process if dropped during a panic. Alive while a batch runs: unwinding
/// then would return borrowed buffers to the caller (or free bounce buffers) while the
/// kernel may still write into them.
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("replicad: panic while io_uring operations were in flight; aborting");
            std::process::abort();
        }
    }
}

/// The ring and its bookkeeping; only reached through the backend's mutex.
struct Ring {
    uring: IoUring,
    /// Most operations a call keeps queued or in flight at once.
    depth: usize,
    /// Set after a fatal `io_uring_enter` error; see the module documentation.
    broken: bool,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("depth", &self.depth)
            .field("broken", &self.broken)
            .finish()
    }
}

fn errno_of(error: &io::Error) -> i32 {
    error.raw_os_error().unwrap_or(0)
}

fn broken_ring_error() -> io::Error {
    io::Error::other("io_uring instance unusable after an earlier submission failure")
}

impl Ring {
    /// Creates a ring and registers `file` as fixed file 0.
    fn new(file: &File) -> io::Result<Ring> {
        let uring = IoUring::new(RING_ENTRIES)?;
        uring.submitter().register_files(&[file.as_raw_fd()])?;
        let params = uring.params();
        let depth = params.sq_entries().min(params.cq_entries()) as usize;
        Ok(Ring {
            uring,
            depth,
            broken: false,
        })
    }

    /// Runs every request and returns once none is queued or in flight; see the module
    /// documentation. `bounce_alignment` is the O_DIRECT alignment, if any.
    fn run(
        &mut self,
        requests: &[Request<'_>],
        bounce_alignment: Option<usize>,
    ) -> Result<(), BatchFailure> {
        let _abort_on_unwind = AbortOnUnwind;
        if requests.is_empty() {
            return Ok(());
        }
        if self.broken {
            return Err(BatchFailure {
                request: 0,
                source: broken_ring_error(),
            });
        }
        debug_assert!(self.uring.completion().is_empty(), "stale completions");
        let slot_count = self.depth.min(requests.len());
        let mut slots: Vec<Option<Slot>> = (0..slot_count).map(|_| None).collect();
        let mut free_slots: Vec<usize> = (0..slot_count).rev().collect();
        // Entries prepared but not yet pushed; their slots count as active.
        let mut pending: Vec<squeue::Entry> = Vec::with_capacity(slot_count);
        let mut active = 0usize;
        let mut next_request = 0usize;
        let mut failure: Option<BatchFailure> = None;
        let mut stalls = 0u32;

        loop {
            if failure.is_none() {
                while next_request < requests.len() {
                    let Some(index) = free_slots.pop() else { break };
                    let mut slot = Slot {
                        request: next_request,
                        done_bytes: 0,
                        piece_bytes: 0,
                        bounce: None,
                        retries: 0,
                    };
                    pending.push(prepare(index, &mut slot, requests, bounce_alignment));
                    slots[index] = Some(slot);
                    active += 1;
                    next_request += 1;
                }
            } else {
                // After a failure nothing new reaches the kernel: release what waits.
                for entry in pending.drain(..) {
                    let index = entry.get_user_data() as usize;
                    slots[index] = None;
                    free_slots.push(index);
                    active -= 1;
                }
            }
            if !pending.is_empty() {
                let mut submission = self.uring.submission();
                for entry in pending.drain(..) {
                    // SAFETY: the entry points into a caller buffer borrowed for the whole
                    // call or into the bounce buffer owned by its slot; this call reaps
                    // its completion (or, on a broken ring, never submits it) before either
                    // is released.
                    if unsafe { submission.push(&entry) }.is_err() {
                        // Cannot happen (active <= depth <= queue size); hand the slot back.
                        let index = entry.get_user_data() as usize;
                        let request = slots[index].take().map_or(0, |slot| slot.request);
                        free_slots.push(index);
                        active -= 1;
                        failure.get_or_insert(BatchFailure {
                            request,
                            source: io::Error::other("io_uring submission queue full"),
                        });
                    }
                }
            }
            if active == 0 {
                break;
            }
            let queued = self.uring.submission().len();
            let in_kernel = active - queued;
            if self.broken {
                if in_kernel == 0 {
                    break;
                }
                self.wait_for_completion();
            } else {
                // While requests wait for a slot, wake at the first completion to refill
                // the window; otherwise wait for everything at once (one syscall). The
                // kernel skips the wait if it could not take every queued entry, so this
                // never waits for completions that cannot come.
                let want = if failure.is_none() && next_request < requests.len() {
                    1
                } else {
                    active
                };
                match self.uring.submit_and_wait(want) {
                    Ok(_) => stalls = 0,
                    Err(error) if errno_of(&error) == libc::EINTR => {}
                    Err(error)
                        if matches!(errno_of(&error), libc::EAGAIN | libc::EBUSY)
                            && stalls < MAX_ENTER_STALLS =>
                    {
                        // Short of kernel resources: let completions free some, then retry.
                        stalls += 1;
                        if in_kernel > 0 {
                            self.wait_for_completion();
                        } else {
                            std::thread::yield_now();
                        }
                    }
                    Err(error) => {
                        tracing::error!("io_uring_enter failed, ring unusable: {error}");
                        self.broken = true;
                        let request = slots.iter().flatten().next().map_or(0, |s| s.request);
                        failure.get_or_insert(BatchFailure {
                            request,
                            source: error,
                        });
                    }
                }
            }
            for completion in self.uring.completion() {
                let index = completion.user_data() as usize;
                let Some(slot) = slots.get_mut(index).and_then(Option::as_mut) else {
                    tracing::error!("io_uring completion for unknown slot {index}; ignored");
                    continue;
                };
                let step = complete(slot, requests, completion.result());
                match step {
                    Step::Continue if failure.is_none() => {
                        pending.push(prepare(index, slot, requests, bounce_alignment));
                        continue;
                    }
                    Step::Failed(source) => {
                        failure.get_or_insert(BatchFailure {
                            request: slot.request,
                            source,
                        });
                    }
                    Step::Continue | Step::Finished => {}
                }
                slots[index] = None;
                free_slots.push(index);
                active -= 1;
            }
        }
        match failure {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// Blocks until at least one completion is available, submitting nothing.
    fn wait_for_completion(&self) {
        loop {
            // SAFETY: no submissions (to_submit = 0) and no argument pointer: this only
            // waits for completions of operations the kernel already holds.
            let result = unsafe {
                self.uring.submitter().enter::<libc::sigset_t>(
                    0,
                    1,
                    EnterFlags::GETEVENTS.bits(),
                    None,
                )
            };
            match result {
                Ok(_) => return,
                Err(error) if matches!(errno_of(&error), libc::EINTR | libc::EAGAIN) => {}
                Err(error) => {
                    // Returning now would free memory the kernel may still write into.
                    eprintln!("replicad: cannot wait for io_uring completions ({error}); aborting");
                    std::process::abort();
                }
            }
        }
    }
}

/// Builds the submission for the next piece of `slot`'s request; user data = slot index.
fn prepare(
    index: usize,
    slot: &mut Slot,
    requests: &[Request<'_>],
    bounce_alignment: Option<usize>,
) -> squeue::Entry {
    let request = &requests[slot.request];
    let entry = match request.action {
        Action::Fsync => opcode::Fsync::new(STORE)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Action::Read | Action::Write => {
            debug_assert!(slot.done_bytes < request.len);
            let remaining = request.len - slot.done_bytes;
            // SAFETY: done_bytes < len, so the pointer stays inside the caller's buffer.
            let caller = unsafe { request.addr.add(slot.done_bytes) };
            let bounce_alignment =
                bounce_alignment.filter(|&alignment| caller as usize % alignment != 0);
            let (target, piece_bytes) = match bounce_alignment {
                Some(alignment) => {
                    let piece_bytes = remaining.min(MAX_BOUNCE_BYTES);
                    let mut bounce = if request.action == Action::Write {
                        // SAFETY: [caller, caller + piece_bytes) lies inside the caller's
                        // buffer, which this call borrows and nobody writes meanwhile.
                        let source = unsafe { std::slice::from_raw_parts(caller, piece_bytes) };
                        AlignedBuf::copy_from(source, alignment)
                    } else {
                        AlignedBuf::zeroed(piece_bytes, alignment)
                    };
                    let target = bounce.as_mut_ptr();
                    slot.bounce = Some(bounce);
                    (target, piece_bytes)
                }
                None => {
                    slot.bounce = None;
                    (caller, remaining.min(MAX_PIECE_BYTES))
                }
            };
            slot.piece_bytes = piece_bytes;
            // The range was checked against the store size, so this cannot overflow.
            let offset = request.offset + slot.done_bytes as u64;
            // MAX_PIECE_BYTES fits in u32 (checked at compile time).
            let len = piece_bytes as u32;
            if request.action == Action::Read {
                opcode::Read::new(STORE, target, len).offset(offset).build()
            } else {
                opcode::Write::new(STORE, target, len)
                    .offset(offset)
                    .build()
            }
        }
    };
    entry.user_data(index as u64)
}

/// Interprets the completion `result` of `slot`'s piece in flight. This is the only
/// place a completion's result is read.
fn complete(slot: &mut Slot, requests: &[Request<'_>], result: i32) -> Step {
    let request = &requests[slot.request];
    if result < 0 {
        // The kernel reports failures as a negated errno.
        let errno = -result;
        if matches!(errno, libc::EINTR | libc::EAGAIN) && slot.retries < MAX_RETRIES_PER_REQUEST {
            slot.retries += 1;
            return Step::Continue;
        }
        return Step::Failed(io::Error::from_raw_os_error(errno));
    }
    if request.action == Action::Fsync {
        return Step::Finished;
    }
    let transferred = result as usize;
    if transferred > slot.piece_bytes {
        return Step::Failed(io::Error::other(format!(
            "io_uring reported {transferred} bytes for a transfer of {}",
            slot.piece_bytes
        )));
    }
    if transferred == 0 {
        return Step::Failed(match request.action {
            Action::Read => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "store ended before the read was complete",
            ),
            _ => io::Error::new(io::ErrorKind::WriteZero, "store accepted no bytes"),
        });
    }
    if let (Action::Read, Some(bounce)) = (request.action, &slot.bounce) {
        // SAFETY: the piece lies inside the caller's buffer, borrowed mutably by this call;
        // the kernel is done with the bounce buffer (its completion is being handled).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bounce.as_ptr(),
                request.addr.add(slot.done_bytes),
                transferred,
            );
        }
    }
    slot.bounce = None;
    slot.done_bytes += transferred;
    slot.retries = 0;
    if slot.done_bytes == request.len {
        Step::Finished
    } else {
        Step::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary image beside the test binary, in the target directory (O_DIRECT
    /// needs a real file system; the system temp dir may be tmpfs). Removed on drop.
    struct TempImage {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
    }

    impl TempImage {
        fn new(name: &str, size_bytes: u64) -> TempImage {
            let exe = std::env::current_exe().unwrap();
            let dir = exe
                .parent()
                .unwrap()
                .join(format!("uring-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("store.img");
            File::create(&path).unwrap().set_len(size_bytes).unwrap();
            TempImage { dir, path }
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Reads into `buffers` of 4 KiB from consecutive blocks, starting at 0.
    fn consecutive_reads(buffers: &mut [Vec<u8>]) -> Vec<ReadOp<'_>> {
        buffers
            .iter_mut()
            .enumerate()
            .map(|(index, buf)| ReadOp {
                offset: index as u64 * 4096,
                buf,
            })
            .collect()
    }

    #[test]
    fn reads_past_a_shrunken_file_fail_and_leave_the_ring_clean() {
        let image = TempImage::new("shrunk", 1 << 20);
        let path = &image.path;
        let backend = UringBackend::open(path, false).unwrap();
        let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        backend.write_at(0, &pattern).unwrap();
        // Someone shrinks the store behind our back: reads beyond the new end see EOF.
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(512 << 10)
            .unwrap();
        let mut buffers = vec![vec![0u8; 4096]; 256];
        let mut ops = consecutive_reads(&mut buffers);
        let error = backend.read_many(&mut ops).unwrap_err();
        assert!(
            matches!(&error, BackendError::Read { offset, source, .. }
                if *offset >= 512 << 10 && source.kind() == io::ErrorKind::UnexpectedEof),
            "{error:?}"
        );
        // Every completion of the failed batch was reaped: the next call sees only its own.
        let mut first = vec![0u8; 8192];
        backend.read_at(0, &mut first).unwrap();
        assert_eq!(first, pattern[..8192]);
        backend.flush().unwrap();
    }

    #[test]
    fn kernel_errors_fail_the_batch_with_their_errno() {
        let image = TempImage::new("ebadf", 1 << 20);
        let path = &image.path;
        // Reads through a write-only descriptor and writes through a read-only one are
        // refused by the kernel (-EBADF in the completion), after our own checks pass.
        let write_only = File::options().write(true).open(path).unwrap();
        let backend =
            UringBackend::with_store(Store::from_file(write_only, false).unwrap()).unwrap();
        let mut buffers = vec![vec![0u8; 4096]; 200];
        let mut ops = consecutive_reads(&mut buffers);
        let error = backend.read_many(&mut ops).unwrap_err();
        assert!(matches!(error, BackendError::Read { .. }), "{error:?}");
        assert_eq!(error.errno(), libc::EBADF, "{error:?}");
        // The ring is clean and usable: writes through this descriptor work.
        backend.write_at(0, &[7u8; 4096]).unwrap();
        backend.flush().unwrap();

        let read_only = File::open(path).unwrap();
        let backend =
            UringBackend::with_store(Store::from_file(read_only, false).unwrap()).unwrap();
        let data = vec![9u8; 4096];
        let ops: Vec<WriteOp<'_>> = (0..200)
            .map(|index| WriteOp {
                offset: index * 4096,
                buf: &data,
            })
            .collect();
        let error = backend.write_many(&ops).unwrap_err();
        assert!(matches!(error, BackendError::Write { .. }), "{error:?}");
        assert_eq!(error.errno(), libc::EBADF, "{error:?}");
        let mut back = vec![0u8; 4096];
        backend.read_at(0, &mut back).unwrap();
        assert_eq!(back, [7u8; 4096], "the failed batch wrote nothing");
    }

    #[test]
    fn requests_larger_than_one_piece_and_bounce_complete() {
        // An unaligned buffer under O_DIRECT bounces in pieces of MAX_BOUNCE_BYTES.
        let image = TempImage::new("pieces", 4 << 20);
        let path = &image.path;
        let backend = UringBackend::open(path, true).unwrap();
        assert!(
            backend.is_direct(),
            "the target directory must allow O_DIRECT"
        );
        let len = 3 * MAX_BOUNCE_BYTES + 4096;
        let mut source = vec![0u8; len + 1];
        for (index, byte) in source.iter_mut().enumerate() {
            *byte = (index % 253) as u8;
        }
        backend.write_at(4096, &source[1..]).unwrap();
        let mut target = vec![0u8; len + 1];
        backend.read_at(4096, &mut target[1..]).unwrap();
        assert!(target[1..] == source[1..]);
    }
}
