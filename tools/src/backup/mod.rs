//! Backup files of a volume or snapshot, and restoring a chain of them.
//!
//! A backup file (format in `docs/FORMAT.md` §15, code in [`format`]) is
//! self-describing: its header names the volume, the snapshot it holds and, for an
//! incremental backup, the snapshot it is based on. [`write_backup`] reads a
//! [`BackupSource`] (an NBD export of a snapshot, in production) and streams the file;
//! [`restore`] writes a chain — one full backup, then incrementals, each based on the
//! previous one — to a [`RestoreTarget`].
//!
//! Invariants and fault model:
//!
//! - **A file that looks complete is complete.** It is written as `FILE.tmp`, fsynced,
//!   renamed to `FILE`, and the directory fsynced; a crash leaves at most a `.tmp`
//!   file, and even that one has no trailer and reads as truncated.
//! - **Nothing is written to the target before the whole chain is known good**: the
//!   headers agree with each other, with the target and with the expected volume, and
//!   every file has been read to its end with every CRC checked. Only then are the
//!   files read a second time and written; the CRCs are checked again on that pass, so
//!   a file changed in between stops the restore (leaving the target partly written,
//!   which the error says).
//! - **Bounded memory**: at most [`IN_FLIGHT`] requests of at most 1 MiB each are in
//!   flight to the source or the target, and the file is read or written through
//!   bounded channels with back-pressure.
//! - Within one file, extents never overlap, so its writes may complete in any order;
//!   between files, every write of one file completes before the next file starts.

pub mod cli;
pub mod format;

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

pub use format::{read_header, BackupError, BackupMeta, Totals, BLOCK_BYTES};
use format::{Decoder, Encoder, Extent, MAX_DATA_EXTENT_BLOCKS};

use crate::nbd_client::{NbdClient, ZeroFlags};

/// Requests in flight to a source or target at once.
pub const IN_FLIGHT: usize = 32;
/// Largest read or write request: one data extent.
pub const MAX_IO_BYTES: u32 = MAX_DATA_EXTENT_BLOCKS * BLOCK_BYTES as u32;
/// Largest zeroing request (NBD servers may refuse more than 32 MiB per request).
pub const MAX_ZERO_BYTES: u64 = 32 << 20;

static ZEROES: [u8; MAX_IO_BYTES as usize] = [0; MAX_IO_BYTES as usize];

/// Where backup data is read from: a whole volume or snapshot.
pub trait BackupSource: Send + Sync {
    /// Size of the volume in bytes.
    fn size(&self) -> u64;
    /// Reads `len` bytes (at most [`MAX_IO_BYTES`]) at `offset`.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = anyhow::Result<Bytes>> + Send;
}

/// Where a chain of backups is restored to.
pub trait RestoreTarget: Send + Sync {
    /// Size of the target in bytes.
    fn size(&self) -> u64;
    /// Writes `data` (at most [`MAX_IO_BYTES`]) at `offset`.
    fn write(&self, offset: u64, data: Bytes) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Makes `len` bytes (at most [`MAX_ZERO_BYTES`]) at `offset` read back as zeroes.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

impl<T: BackupSource> BackupSource for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = anyhow::Result<Bytes>> + Send {
        (**self).read(offset, len)
    }
}

impl<T: RestoreTarget> RestoreTarget for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn write(&self, offset: u64, data: Bytes) -> impl Future<Output = anyhow::Result<()>> + Send {
        (**self).write(offset, data)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        (**self).write_zeroes(offset, len)
    }
    fn flush(&self) -> impl Future<Output = anyhow::Result<()>> + Send {
        (**self).flush()
    }
}

impl BackupSource for NbdClient {
    fn size(&self) -> u64 {
        self.info().size_bytes
    }
    async fn read(&self, offset: u64, len: u32) -> anyhow::Result<Bytes> {
        Ok(NbdClient::read(self, offset, len).await?)
    }
}

impl RestoreTarget for NbdClient {
    fn size(&self) -> u64 {
        self.info().size_bytes
    }
    async fn write(&self, offset: u64, data: Bytes) -> anyhow::Result<()> {
        Ok(NbdClient::write(self, offset, data, false).await?)
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> anyhow::Result<()> {
        let mut done = 0;
        while done < len {
            let piece = (len - done).min(MAX_ZERO_BYTES);
            if self.info().flags.can_write_zeroes() {
                // `piece` ≤ 32 MiB fits a u32.
                NbdClient::write_zeroes(self, offset + done, piece as u32, ZeroFlags::default())
                    .await?;
            } else {
                let mut written = 0;
                while written < piece {
                    let chunk = (piece - written).min(u64::from(MAX_IO_BYTES)) as usize;
                    let data = Bytes::from_static(&ZEROES[..chunk]);
                    NbdClient::write(self, offset + done + written, data, false).await?;
                    written += chunk as u64;
                }
            }
            done += piece;
        }
        Ok(())
    }
    async fn flush(&self) -> anyhow::Result<()> {
        if self.info().flags.can_flush() {
            NbdClient::flush(self).await?;
        }
        Ok(())
    }
}

/// A raw image file or block device as a restore target (positional writes,
/// fdatasync on flush).
#[derive(Debug, Clone)]
pub struct RawFileTarget {
    file: Arc<std::fs::File>,
    size_bytes: u64,
}

impl RawFileTarget {
    /// Opens an existing file or block device for writing; its size is its length.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::io::Seek;
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        // Seeking to the end works for block devices too, where metadata().len() is 0.
        let size_bytes = file.seek(std::io::SeekFrom::End(0))?;
        Ok(RawFileTarget {
            file: Arc::new(file),
            size_bytes,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&std::fs::File) -> std::io::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let file = Arc::clone(&self.file);
        Ok(tokio::task::spawn_blocking(move || work(&file)).await??)
    }
}

impl RestoreTarget for RawFileTarget {
    fn size(&self) -> u64 {
        self.size_bytes
    }
    async fn write(&self, offset: u64, data: Bytes) -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        self.blocking(move |file| file.write_all_at(&data, offset))
            .await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        self.blocking(move |file| {
            let mut done = 0;
            while done < len {
                let chunk = (len - done).min(ZEROES.len() as u64) as usize;
                file.write_all_at(&ZEROES[..chunk], offset + done)?;
                done += chunk as u64;
            }
            Ok(())
        })
        .await
    }
    async fn flush(&self) -> anyhow::Result<()> {
        self.blocking(|file| file.sync_data()).await
    }
}

/// What [`write_backup`] wrote, or [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupSummary {
    pub path: PathBuf,
    pub meta: BackupMeta,
    #[serde(flatten)]
    pub totals: Totals,
}

/// Merges byte ranges `(offset, length)` into sorted, disjoint block ranges
/// `(first_block, end_block)`, each widened to whole blocks.
fn block_ranges(ranges: &[(u64, u64)], volume_bytes: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut blocks = Vec::with_capacity(ranges.len());
    for &(offset, length) in ranges {
        let end = offset
            .checked_add(length)
            .filter(|end| *end <= volume_bytes)
            .ok_or_else(|| {
                format!("range of {length} bytes at {offset} goes beyond the volume of {volume_bytes} bytes")
            })?;
        if length > 0 {
            blocks.push((offset / BLOCK_BYTES, end.div_ceil(BLOCK_BYTES)));
        }
    }
    blocks.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(blocks.len());
    for (first, end) in blocks {
        match merged.last_mut() {
            Some(last) if first <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((first, end)),
        }
    }
    Ok(merged)
}

/// What the reading side hands the file-writing thread.
enum Piece {
    Data { offset_bytes: u64, data: Bytes },
    Zero { offset_bytes: u64, blocks: u64 },
    Finish,
}

/// The file-writing thread: `to.tmp`, fsync, rename, fsync of the directory. If the
/// channel closes without [`Piece::Finish`] (the reading side failed), the temporary
/// file is removed.
fn write_file(
    to: &Path,
    meta: &BackupMeta,
    mut pieces: mpsc::Receiver<Piece>,
) -> Result<Totals, BackupError> {
    let tmp = tmp_path(to);
    let io = |what| {
        let path = tmp.clone();
        move |source| BackupError::Io { path, what, source }
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("cannot create the temporary file"))?;
    let result = (|| {
        let mut encoder = Encoder::new(std::io::BufWriter::with_capacity(1 << 20, file), meta)
            .map_err(io("write failed"))?;
        loop {
            match pieces.blocking_recv() {
                Some(Piece::Data { offset_bytes, data }) => encoder
                    .data_extent(offset_bytes, &data)
                    .map_err(io("write failed"))?,
                Some(Piece::Zero {
                    offset_bytes,
                    blocks,
                }) => encoder
                    .zero_extent(offset_bytes, blocks)
                    .map_err(io("write failed"))?,
                Some(Piece::Finish) => break,
                None => return Err(BackupError::Internal("the backup was abandoned".into())),
            }
        }
        let (writer, totals) = encoder.finish().map_err(io("write failed"))?;
        let file = writer
            .into_inner()
            .map_err(|error| io("write failed")(error.into_error()))?;
        file.sync_all().map_err(io("fsync failed"))?;
        Ok(totals)
    })();
    let totals = match result {
        Ok(totals) => totals,
        Err(error) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(error);
        }
    };
    std::fs::rename(&tmp, to).map_err(io("cannot rename the temporary file into place"))?;
    let dir = match to.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| BackupError::Io {
            path: dir.to_owned(),
            what: "fsync of the directory failed",
            source,
        })?;
    Ok(totals)
}

fn tmp_path(to: &Path) -> PathBuf {
    let mut name = to.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Writes a backup of `source` to `to`: a full backup when `ranges` is `None` (then
/// `meta.base` must be `None`), else an incremental one holding the byte ranges
/// `(offset, length)` that changed since `meta.base` (widened to whole blocks; order
/// and overlaps do not matter). All-zero blocks are stored as zero extents, without
/// data. `progress(done, total)` is called in bytes of the volume. Refuses to
/// overwrite an existing `to`.
pub async fn write_backup<S>(
    source: S,
    meta: &BackupMeta,
    ranges: Option<&[(u64, u64)]>,
    to: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<BackupSummary, BackupError>
where
    S: BackupSource + Clone + 'static,
{
    let invalid = |reason: String| BackupError::InvalidMeta {
        path: to.to_owned(),
        reason,
    };
    meta.validate().map_err(invalid)?;
    if ranges.is_some() != meta.base.is_some() {
        return Err(invalid(
            "an incremental backup needs both a base snapshot and the changed ranges; a full backup neither"
                .to_owned(),
        ));
    }
    if source.size() != meta.volume_bytes {
        return Err(BackupError::SourceSize {
            path: to.to_owned(),
            source_bytes: source.size(),
            volume_bytes: meta.volume_bytes,
        });
    }
    let plan = match ranges {
        None => vec![(0, meta.volume_bytes / BLOCK_BYTES)],
        Some(ranges) => block_ranges(ranges, meta.volume_bytes).map_err(|reason| {
            BackupError::InvalidRanges {
                path: to.to_owned(),
                reason,
            }
        })?,
    };
    if to.exists() {
        return Err(BackupError::Exists {
            path: to.to_owned(),
        });
    }
    let total_bytes: u64 = plan
        .iter()
        .map(|(first, end)| (end - first) * BLOCK_BYTES)
        .sum();

    let (pieces, receiver) = mpsc::channel(IN_FLIGHT);
    let writer = {
        let to = to.to_owned();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || write_file(&to, &meta, receiver))
    };
    let read = read_into(source, &plan, to, &pieces, total_bytes, &mut progress).await;
    if read.is_ok() {
        // A send error means the writer has stopped; its result says why.
        let _ = pieces.send(Piece::Finish).await;
    }
    drop(pieces);
    let written = writer
        .await
        .map_err(|error| BackupError::Internal(error.to_string()))?;
    // When one side fails, the other reports only that it was left alone.
    let totals = match (read, written) {
        (Ok(()), Ok(totals)) => totals,
        (Err(BackupError::Internal(_)), Err(error)) | (Err(error), _) | (Ok(()), Err(error)) => {
            return Err(error)
        }
    };
    Ok(BackupSummary {
        path: to.to_owned(),
        meta: meta.clone(),
        totals,
    })
}

/// Reads the planned block ranges in requests of at most 1 MiB, [`IN_FLIGHT`] at a
/// time and in order, and hands their extents to the file writer.
async fn read_into<S>(
    source: S,
    plan: &[(u64, u64)],
    to: &Path,
    pieces: &mpsc::Sender<Piece>,
    total_bytes: u64,
    progress: &mut impl FnMut(u64, u64),
) -> Result<(), BackupError>
where
    S: BackupSource + Clone + 'static,
{
    let chunks = plan.iter().flat_map(|&(first, end)| {
        (first..end)
            .step_by(MAX_DATA_EXTENT_BLOCKS as usize)
            .map(move |block| (block, (end - block).min(u64::from(MAX_DATA_EXTENT_BLOCKS))))
    });
    let mut chunks = chunks;
    let mut window: VecDeque<(u64, u64, JoinHandle<anyhow::Result<Bytes>>)> = VecDeque::new();
    let outcome = read_window(
        &source,
        &mut chunks,
        &mut window,
        to,
        pieces,
        total_bytes,
        progress,
    )
    .await;
    // On an error, the reads still in flight are of no use.
    for (_, _, read) in window {
        read.abort();
    }
    outcome
}

/// The loop of [`read_into`]; `window` holds the reads in flight, in order.
async fn read_window<S>(
    source: &S,
    chunks: &mut impl Iterator<Item = (u64, u64)>,
    window: &mut VecDeque<(u64, u64, JoinHandle<anyhow::Result<Bytes>>)>,
    to: &Path,
    pieces: &mpsc::Sender<Piece>,
    total_bytes: u64,
    progress: &mut impl FnMut(u64, u64),
) -> Result<(), BackupError>
where
    S: BackupSource + Clone + 'static,
{
    let mut pending_zero: Option<(u64, u64)> = None;
    let mut done_bytes = 0;
    let writer_gone = || BackupError::Internal("the file writer stopped".into());
    progress(0, total_bytes);
    loop {
        while window.len() < IN_FLIGHT {
            let Some((block, blocks)) = chunks.next() else {
                break;
            };
            let offset = block * BLOCK_BYTES;
            let length = (blocks * BLOCK_BYTES) as u32;
            let reader = source.clone();
            window.push_back((
                offset,
                u64::from(length),
                tokio::spawn(async move { reader.read(offset, length).await }),
            ));
        }
        let Some((offset, length, read)) = window.pop_front() else {
            break;
        };
        let data = read
            .await
            .map_err(|error| BackupError::Internal(error.to_string()))?
            .map_err(|source| BackupError::Source {
                path: to.to_owned(),
                offset,
                source,
            })?;
        if data.len() as u64 != length {
            return Err(BackupError::ShortRead {
                path: to.to_owned(),
                offset,
                wanted: length,
                got: data.len() as u64,
            });
        }
        // Runs of zero and non-zero blocks; zero runs merge across requests.
        let mut run_start = 0usize;
        let block_bytes = BLOCK_BYTES as usize;
        let blocks = data.len() / block_bytes;
        while run_start < blocks {
            let is_zero = |index: usize| {
                data[index * block_bytes..(index + 1) * block_bytes]
                    .iter()
                    .all(|&byte| byte == 0)
            };
            let zero = is_zero(run_start);
            let mut run_end = run_start + 1;
            while run_end < blocks && is_zero(run_end) == zero {
                run_end += 1;
            }
            let run_offset = offset + (run_start * block_bytes) as u64;
            let run_blocks = (run_end - run_start) as u64;
            if zero {
                match &mut pending_zero {
                    Some((start, count)) if *start + *count * BLOCK_BYTES == run_offset => {
                        *count += run_blocks
                    }
                    _ => {
                        if let Some((offset_bytes, blocks)) = pending_zero.take() {
                            pieces
                                .send(Piece::Zero {
                                    offset_bytes,
                                    blocks,
                                })
                                .await
                                .map_err(|_| writer_gone())?;
                        }
                        pending_zero = Some((run_offset, run_blocks));
                    }
                }
            } else {
                if let Some((offset_bytes, blocks)) = pending_zero.take() {
                    pieces
                        .send(Piece::Zero {
                            offset_bytes,
                            blocks,
                        })
                        .await
                        .map_err(|_| writer_gone())?;
                }
                pieces
                    .send(Piece::Data {
                        offset_bytes: run_offset,
                        data: data.slice(run_start * block_bytes..run_end * block_bytes),
                    })
                    .await
                    .map_err(|_| writer_gone())?;
            }
            run_start = run_end;
        }
        done_bytes += length;
        progress(done_bytes, total_bytes);
    }
    if let Some((offset_bytes, blocks)) = pending_zero {
        pieces
            .send(Piece::Zero {
                offset_bytes,
                blocks,
            })
            .await
            .map_err(|_| writer_gone())?;
    }
    Ok(())
}

/// Reads the whole backup file at `path` and checks every CRC, the order of the
/// extents and the trailer.
pub fn verify(path: &Path) -> Result<BackupSummary, BackupError> {
    verify_with(path, |_| {})
}

/// [`verify`], calling `progress(bytes)` with the file bytes checked so far after
/// each extent.
pub fn verify_with(
    path: &Path,
    mut progress: impl FnMut(u64),
) -> Result<BackupSummary, BackupError> {
    let mut decoder = Decoder::open_path(path)?;
    while decoder.next_extent()?.is_some() {
        progress(decoder.position());
    }
    Ok(BackupSummary {
        path: path.to_owned(),
        meta: decoder.meta().clone(),
        totals: decoder.totals().clone(),
    })
}

/// Why a chain cannot be restored. Every variant but the target's and the changed
/// file's is found before anything is written.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no backup file given")]
    EmptyChain,
    #[error(transparent)]
    File(#[from] BackupError),
    #[error("{} is an incremental of '{base}' (seq {base_seq}); a chain must start with a full backup", path.display())]
    StartsWithIncremental {
        path: PathBuf,
        base: String,
        base_seq: u64,
    },
    #[error("{} is a full backup, but it follows {} in the chain; only the first file may be full", path.display(), previous.display())]
    FullAfterFirst { path: PathBuf, previous: PathBuf },
    #[error("{} is an incremental of '{base}' (seq {base_seq}) but the previous file {} is snapshot '{previous_snapshot}' (seq {previous_seq})", path.display(), previous.display())]
    WrongBase {
        path: PathBuf,
        base: String,
        base_seq: u64,
        previous: PathBuf,
        previous_snapshot: String,
        previous_seq: u64,
    },
    #[error("{} is a backup of volume '{volume}', but {} is of volume '{first_volume}'", path.display(), first.display())]
    MixedVolumes {
        path: PathBuf,
        volume: String,
        first: PathBuf,
        first_volume: String,
    },
    #[error("{} is a backup of a volume of {volume_bytes} bytes, but {} is of {first_bytes} bytes", path.display(), first.display())]
    MixedSizes {
        path: PathBuf,
        volume_bytes: u64,
        first: PathBuf,
        first_bytes: u64,
    },
    #[error("{} is a backup of volume '{volume}', target is volume '{expected}'", path.display())]
    WrongVolume {
        path: PathBuf,
        volume: String,
        expected: String,
    },
    #[error("the target has {target_bytes} bytes, the backed-up volume {volume_bytes}")]
    TargetSize {
        target_bytes: u64,
        volume_bytes: u64,
    },
    #[error("{} changed after it was verified; the target is partly restored", path.display())]
    Changed {
        path: PathBuf,
        #[source]
        source: BackupError,
    },
    #[error("{what} at byte {offset} of the target failed; the target is partly restored")]
    Target {
        what: &'static str,
        offset: u64,
        #[source]
        source: anyhow::Error,
    },
    #[error("restore task failed: {0}")]
    Internal(String),
}

/// Checks that `chain` (path and header of each file, in order) restores onto a
/// target of `target_bytes` bytes (and onto `expected_volume`, when given).
pub fn check_chain(
    chain: &[(PathBuf, BackupMeta)],
    expected_volume: Option<&str>,
    target_bytes: u64,
) -> Result<(), RestoreError> {
    let Some((first, first_meta)) = chain.first() else {
        return Err(RestoreError::EmptyChain);
    };
    if let Some((base, base_seq)) = &first_meta.base {
        return Err(RestoreError::StartsWithIncremental {
            path: first.clone(),
            base: base.clone(),
            base_seq: *base_seq,
        });
    }
    for (path, meta) in chain {
        if let Some(expected) = expected_volume {
            if meta.volume_id != expected {
                return Err(RestoreError::WrongVolume {
                    path: path.clone(),
                    volume: meta.volume_id.clone(),
                    expected: expected.to_owned(),
                });
            }
        }
        if meta.volume_id != first_meta.volume_id {
            return Err(RestoreError::MixedVolumes {
                path: path.clone(),
                volume: meta.volume_id.clone(),
                first: first.clone(),
                first_volume: first_meta.volume_id.clone(),
            });
        }
        if meta.volume_bytes != first_meta.volume_bytes {
            return Err(RestoreError::MixedSizes {
                path: path.clone(),
                volume_bytes: meta.volume_bytes,
                first: first.clone(),
                first_bytes: first_meta.volume_bytes,
            });
        }
    }
    for pair in chain.windows(2) {
        let [(previous, previous_meta), (path, meta)] = pair else {
            unreachable!("windows(2) yields pairs");
        };
        match &meta.base {
            None => {
                return Err(RestoreError::FullAfterFirst {
                    path: path.clone(),
                    previous: previous.clone(),
                })
            }
            Some((base, base_seq))
                if *base != previous_meta.snapshot || *base_seq != previous_meta.snapshot_seq =>
            {
                return Err(RestoreError::WrongBase {
                    path: path.clone(),
                    base: base.clone(),
                    base_seq: *base_seq,
                    previous: previous.clone(),
                    previous_snapshot: previous_meta.snapshot.clone(),
                    previous_seq: previous_meta.snapshot_seq,
                })
            }
            Some(_) => {}
        }
    }
    if target_bytes != first_meta.volume_bytes {
        return Err(RestoreError::TargetSize {
            target_bytes,
            volume_bytes: first_meta.volume_bytes,
        });
    }
    Ok(())
}

/// What [`restore`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreSummary {
    /// Each file of the chain, as verified.
    pub files: Vec<BackupSummary>,
    /// The volume and the snapshot the target now holds.
    pub volume_id: String,
    pub snapshot: String,
    pub snapshot_seq: u64,
    /// Bytes written with data, and bytes zeroed.
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// The two passes of a restore, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RestorePhase {
    /// Reading every file and checking every CRC; counted in file bytes.
    Verify,
    /// Writing to the target; counted in volume bytes.
    Write,
}

/// Restores `chain` (a full backup, then incrementals each based on the previous
/// file) to `target`. Everything is checked before the first write (see the module
/// documentation): the chain, the target's size, `expected_volume` when given, and
/// every CRC of every file. `progress(phase, done, total)` reports each pass.
pub async fn restore<T>(
    chain: &[PathBuf],
    target: T,
    expected_volume: Option<&str>,
    mut progress: impl FnMut(RestorePhase, u64, u64),
) -> Result<RestoreSummary, RestoreError>
where
    T: RestoreTarget + Clone + 'static,
{
    let mut headers = Vec::with_capacity(chain.len());
    let mut verify_total = 0;
    for path in chain {
        headers.push((path.clone(), read_header(path)?));
        verify_total += std::fs::metadata(path)
            .map_err(|source| BackupError::Io {
                path: path.clone(),
                what: "cannot stat the backup",
                source,
            })?
            .len();
    }
    check_chain(&headers, expected_volume, target.size())?;
    let mut files = Vec::with_capacity(chain.len());
    let mut verified_bytes = 0;
    progress(RestorePhase::Verify, 0, verify_total);
    for path in chain {
        let summary = verify_reporting(path, &mut |done| {
            progress(RestorePhase::Verify, verified_bytes + done, verify_total)
        })
        .await?;
        verified_bytes += summary.totals.file_bytes;
        files.push(summary);
    }
    // The headers read in full must still be the ones checked above.
    let verified: Vec<_> = files
        .iter()
        .map(|file| (file.path.clone(), file.meta.clone()))
        .collect();
    check_chain(&verified, expected_volume, target.size())?;

    let total_bytes: u64 = files
        .iter()
        .map(|file| (file.totals.data_blocks + file.totals.zero_blocks) * BLOCK_BYTES)
        .sum();
    let mut done_bytes = 0;
    let mut data_bytes = 0;
    let mut zero_bytes = 0;
    progress(RestorePhase::Write, 0, total_bytes);
    for path in chain {
        let (extents, receiver) = mpsc::channel(IN_FLIGHT);
        let reader = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || read_extents(&path, extents))
        };
        let written = write_extents(&target, receiver, &mut |bytes, zero| {
            done_bytes += bytes;
            if zero {
                zero_bytes += bytes;
            } else {
                data_bytes += bytes;
            }
            progress(RestorePhase::Write, done_bytes, total_bytes);
        })
        .await;
        let read = reader
            .await
            .map_err(|error| RestoreError::Internal(error.to_string()))?;
        written?;
        read.map_err(|source| RestoreError::Changed {
            path: path.clone(),
            source,
        })?;
    }
    target
        .flush()
        .await
        .map_err(|source| RestoreError::Target {
            what: "flush",
            offset: 0,
            source,
        })?;
    let last = &files[files.len() - 1].meta;
    Ok(RestoreSummary {
        volume_id: last.volume_id.clone(),
        snapshot: last.snapshot.clone(),
        snapshot_seq: last.snapshot_seq,
        files,
        data_bytes,
        zero_bytes,
    })
}

/// [`verify`] on a blocking thread, reporting the file bytes checked so far.
async fn verify_reporting(
    path: &Path,
    progress: &mut impl FnMut(u64),
) -> Result<BackupSummary, RestoreError> {
    let (position, mut checked) = watch::channel(0);
    let mut verifier = {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            verify_with(&path, |bytes| {
                position.send_replace(bytes);
            })
        })
    };
    let joined = loop {
        tokio::select! {
            joined = &mut verifier => break joined,
            changed = checked.changed() => match changed {
                Ok(()) => progress(*checked.borrow_and_update()),
                // The thread has finished: only its result is left.
                Err(_) => break (&mut verifier).await,
            },
        }
    };
    let summary = joined.map_err(|error| RestoreError::Internal(error.to_string()))??;
    progress(summary.totals.file_bytes);
    Ok(summary)
}

/// The file-reading thread of a restore: decodes (checking every CRC again) and
/// sends each extent; an error ends the stream early.
fn read_extents(path: &Path, extents: mpsc::Sender<Extent>) -> Result<(), BackupError> {
    let mut decoder = Decoder::open_path(path)?;
    while let Some(extent) = decoder.next_extent()? {
        if extents.blocking_send(extent).is_err() {
            // The writing side failed; its error is the one reported.
            return Ok(());
        }
    }
    Ok(())
}

/// Bytes one request wrote, and whether they were zeroes.
type WriteOutcome = Result<(u64, bool), RestoreError>;

/// Accounts for one completed request (if any was in flight).
fn finished(
    outcome: Option<Result<WriteOutcome, tokio::task::JoinError>>,
    done: &mut impl FnMut(u64, bool),
) -> Result<(), RestoreError> {
    if let Some(outcome) = outcome {
        let (bytes, zero) =
            outcome.map_err(|error| RestoreError::Internal(error.to_string()))??;
        done(bytes, zero);
    }
    Ok(())
}

/// Writes the extents of one file, [`IN_FLIGHT`] requests at a time, and waits for
/// all of them. `done(bytes, zero)` is called as each request completes.
async fn write_extents<T>(
    target: &T,
    mut extents: mpsc::Receiver<Extent>,
    done: &mut impl FnMut(u64, bool),
) -> Result<(), RestoreError>
where
    T: RestoreTarget + Clone + 'static,
{
    let mut in_flight: JoinSet<WriteOutcome> = JoinSet::new();
    while let Some(extent) = extents.recv().await {
        let requests: Vec<(u64, Option<Bytes>, u64)> = match extent {
            Extent::Data { offset_bytes, data } => {
                vec![(offset_bytes, Some(Bytes::from(data)), 0)]
            }
            Extent::Zero {
                offset_bytes,
                blocks,
            } => {
                let length = blocks * BLOCK_BYTES;
                (0..length)
                    .step_by(MAX_ZERO_BYTES as usize)
                    .map(|start| {
                        (
                            offset_bytes + start,
                            None,
                            (length - start).min(MAX_ZERO_BYTES),
                        )
                    })
                    .collect()
            }
        };
        for (offset, data, zero_length) in requests {
            while in_flight.len() >= IN_FLIGHT {
                finished(in_flight.join_next().await, done)?;
            }
            let target = target.clone();
            in_flight.spawn(async move {
                match data {
                    Some(data) => {
                        let length = data.len() as u64;
                        target.write(offset, data).await.map_err(|source| {
                            RestoreError::Target {
                                what: "write",
                                offset,
                                source,
                            }
                        })?;
                        Ok((length, false))
                    }
                    None => {
                        target
                            .write_zeroes(offset, zero_length)
                            .await
                            .map_err(|source| RestoreError::Target {
                                what: "zeroing",
                                offset,
                                source,
                            })?;
                        Ok((zero_length, true))
                    }
                }
            });
        }
    }
    while !in_flight.is_empty() {
        finished(in_flight.join_next().await, done)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
