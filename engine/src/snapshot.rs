//! Point-in-time snapshots: copy-on-write at block granularity, in a snapshot area
//! (a directory) beside the store.
//!
//! A snapshot is named by the sequence number of the last record it includes, its
//! **point**. Records are applied in place in sequence order, so once every record up
//! to the point is applied, the store holds the snapshot's image — until a later
//! record overwrites a block. Before the applier (or journal replay, or a resync
//! write) overwrites block `b` in place, every live snapshot that still needs `b`'s
//! old content gets a copy of it appended to its **COW log**, made durable
//! (fdatasync), and only then is the block overwritten. A snapshot's image is
//! therefore: its log's copy of a block where there is one, the store's block where
//! there is none.
//!
//! The same log is the snapshot's changed-block set: a block has an entry exactly when
//! it was overwritten after the point. Each entry records the sequence number of the
//! write that caused it (its *trigger*), so "changed between snapshot A and a later
//! snapshot B" is "entries of A with trigger ≤ B's point".
//!
//! Formats and the crash analysis: `docs/FORMAT.md` §16.
//!
//! Locking: `Snapshots` sits behind its own mutex. Lock order: the volume's state lock
//! (if held) before the snapshots lock, never the other way round. A reader of a
//! snapshot holds the volume's apply lock for reading while it looks a block up and
//! reads it in place, so the applier cannot overwrite it between the two.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checksum::block_crc;
use crate::BLOCK_BYTES;

/// Magic of a COW log entry ("RSNP" little-endian).
pub const ENTRY_MAGIC: u32 = 0x504e_5352;
/// Bytes of a COW log entry header.
pub const ENTRY_HEADER_BYTES: u64 = 32;
/// Bytes of one COW log entry: header and the preserved block.
pub const ENTRY_BYTES: u64 = ENTRY_HEADER_BYTES + BLOCK_BYTES;
/// The first line of a catalog.
const CATALOG_HEADER: &str = "replicad-snapshots 1";
/// Longest snapshot name.
pub const MAX_NAME_BYTES: usize = 64;

/// Where snapshots live and how much room they may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// The snapshot area: a directory holding the catalog and one COW log per snapshot.
    pub dir: PathBuf,
    /// The most bytes all COW logs together may hold. A snapshot that needs more is
    /// invalidated (its log deleted), never the volume.
    pub area_bytes: u64,
}

/// Errors of the snapshot commands. None of them changes anything.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("no snapshot area is configured for this volume (set snapshot-dir)")]
    NotConfigured,
    #[error(
        "invalid snapshot name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with . or -)"
    )]
    BadName(String),
    #[error("a snapshot named {0:?} exists already")]
    Exists(String),
    #[error("no snapshot named {0:?}")]
    NotFound(String),
    #[error("snapshot {name:?} is invalid: {reason}")]
    Invalid { name: String, reason: String },
    #[error("the store is Inconsistent (a resync target): a snapshot of it would not be a consistent image")]
    Inconsistent,
    #[error("records after {point} have already been applied here (up to {applied}): a snapshot at {point} cannot be taken any more")]
    PointPassed { point: u64, applied: u64 },
    #[error("snapshot {name:?} is not complete yet: it includes records up to {point}, applied here up to {applied}")]
    NotReady {
        name: String,
        point: u64,
        applied: u64,
    },
    #[error("snapshot area: {0}")]
    Io(String),
}

impl SnapshotError {
    /// A stable short name for scripts (`--json`).
    pub fn kind(&self) -> &'static str {
        match self {
            SnapshotError::NotConfigured => "not-configured",
            SnapshotError::BadName(_) => "bad-name",
            SnapshotError::Exists(_) => "exists",
            SnapshotError::NotFound(_) => "not-found",
            SnapshotError::Invalid { .. } => "invalid",
            SnapshotError::Inconsistent => "inconsistent",
            SnapshotError::PointPassed { .. } => "point-passed",
            SnapshotError::NotReady { .. } => "not-ready",
            SnapshotError::Io(_) => "io",
        }
    }
}

fn io_error(what: &str, path: &Path, error: std::io::Error) -> SnapshotError {
    SnapshotError::Io(format!("{what} {}: {error}", path.display()))
}

/// Checks a snapshot name: 1–64 bytes of `[A-Za-z0-9._-]`, not starting with `.` or `-`
/// (it becomes part of an NBD export name, `r0@NAME`, and of the catalog's lines).
pub fn check_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.to_string()))
    }
}

/// What `list` reports of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub id: u64,
    /// Sequence number of the last record the snapshot includes.
    pub point: u64,
    pub created_unix: u64,
    /// Blocks preserved in its COW log (blocks changed since the snapshot).
    pub preserved_blocks: u64,
    /// Bytes of its COW log.
    pub bytes: u64,
    /// `Some(reason)` once invalidated (the area was full, or its log was damaged).
    pub invalid: Option<String>,
}

/// One preserved block: where its old content is in the log, and why it was saved.
#[derive(Debug, Clone, Copy)]
struct Entry {
    slot: u64,
    crc: u32,
    trigger: u64,
}

#[derive(Debug)]
struct Snap {
    id: u64,
    name: String,
    point: u64,
    created_unix: u64,
    invalid: Option<String>,
    log: Option<Arc<File>>,
    map: BTreeMap<u64, Entry>,
    slots: u64,
}

impl Snap {
    fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            name: self.name.clone(),
            id: self.id,
            point: self.point,
            created_unix: self.created_unix,
            preserved_blocks: self.map.len() as u64,
            bytes: self.slots * ENTRY_BYTES,
            invalid: self.invalid.clone(),
        }
    }
}

/// Where a snapshot's block is to be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockSource {
    /// The store, in place.
    InPlace,
    /// The snapshot's log, slot `slot`, with the block's checksum.
    Log { slot: u64, crc: u32 },
}

/// Reads the current content of whole blocks (for copy-on-write).
pub(crate) type ReadOld<'a> = dyn FnMut(&[u64]) -> Result<Vec<Vec<u8>>, String> + 'a;

/// The snapshots of one volume (behind the volume's snapshots mutex).
#[derive(Debug)]
pub(crate) struct Snapshots {
    options: SnapshotOptions,
    data_blocks: u64,
    snaps: Vec<Snap>,
    next_id: u64,
    /// Invalidations and repairs not yet reported (taken by the daemon for events).
    events: Vec<String>,
}

/// Reads the preserved blocks of one snapshot's log (see [`Snapshots::sources`]).
#[derive(Debug, Clone)]
pub(crate) struct LogReader(Arc<File>);

impl LogReader {
    /// Reads slot `slot`'s block into `buf` (4096 bytes).
    pub(crate) fn read_slot(&self, slot: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.0
            .read_exact_at(buf, slot * ENTRY_BYTES + ENTRY_HEADER_BYTES)
            .map_err(|e| SnapshotError::Io(format!("reading a snapshot's log: {e}")))
    }
}

/// Encodes a COW log entry (`docs/FORMAT.md` §16).
pub fn encode_entry(block: u64, trigger: u64, data: &[u8]) -> Vec<u8> {
    let mut entry = vec![0u8; ENTRY_BYTES as usize];
    entry[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
    entry[8..16].copy_from_slice(&block.to_le_bytes());
    entry[16..24].copy_from_slice(&trigger.to_le_bytes());
    entry[24..28].copy_from_slice(&block_crc(data).to_le_bytes());
    entry[ENTRY_HEADER_BYTES as usize..].copy_from_slice(data);
    let crc = crc32fast::hash(&entry[8..ENTRY_HEADER_BYTES as usize]);
    entry[4..8].copy_from_slice(&crc.to_le_bytes());
    entry
}

/// Decodes a COW log entry header: `(block, trigger, data crc)`, or `None` if it is not
/// a valid header.
fn decode_entry_header(header: &[u8]) -> Option<(u64, u64, u32)> {
    let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
    let half = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or([0; 4]));
    if header.len() < ENTRY_HEADER_BYTES as usize || half(0) != ENTRY_MAGIC {
        return None;
    }
    if crc32fast::hash(&header[8..ENTRY_HEADER_BYTES as usize]) != half(4) {
        return None;
    }
    Some((word(8), word(16), half(24)))
}

fn log_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id}.cow"))
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("syncing directory", dir, e))
}

impl Snapshots {
    /// Opens (or creates) the snapshot area: reads the catalog, scans every log (a torn
    /// tail is cut off), deletes logs the catalog does not name.
    pub(crate) fn open(
        options: SnapshotOptions,
        data_blocks: u64,
    ) -> Result<Snapshots, SnapshotError> {
        fs::create_dir_all(&options.dir).map_err(|e| io_error("creating", &options.dir, e))?;
        let mut snapshots = Snapshots {
            options,
            data_blocks,
            snaps: Vec::new(),
            next_id: 1,
            events: Vec::new(),
        };
        let catalog = snapshots.options.dir.join("catalog");
        match fs::read_to_string(&catalog) {
            Ok(text) => snapshots.parse_catalog(&text).map_err(|why| {
                SnapshotError::Io(format!("catalog {} is damaged: {why}", catalog.display()))
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error("reading", &catalog, error)),
        }
        for index in 0..snapshots.snaps.len() {
            snapshots.load_log(index)?;
        }
        let known: Vec<PathBuf> = snapshots
            .snaps
            .iter()
            .map(|s| log_path(&snapshots.options.dir, s.id))
            .collect();
        if let Ok(entries) = fs::read_dir(&snapshots.options.dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let is_log = path.extension().is_some_and(|e| e == "cow");
                if is_log && !known.contains(&path) {
                    // A log whose snapshot was deleted, or never made it into the catalog.
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(snapshots)
    }

    fn parse_catalog(&mut self, text: &str) -> Result<(), String> {
        let mut lines: Vec<&str> = text.lines().collect();
        let crc_line = lines.pop().ok_or("empty")?;
        let body_len = text.len() - crc_line.len() - 1;
        let stored = crc_line
            .strip_prefix("crc ")
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .ok_or("no crc line")?;
        if crc32fast::hash(&text.as_bytes()[..body_len.min(text.len())]) != stored {
            return Err("crc mismatch".into());
        }
        if lines.first() != Some(&CATALOG_HEADER) {
            return Err("unknown header".into());
        }
        for line in &lines[1..] {
            let fields: Vec<&str> = line.splitn(6, ' ').collect();
            let [id, point, created, state, next_id_or_name, rest @ ..] = fields.as_slice() else {
                return Err(format!("bad line {line:?}"));
            };
            if *id == "next" {
                self.next_id = point.parse().map_err(|_| "bad next id")?;
                let _ = (created, state, next_id_or_name, rest);
                continue;
            }
            let parse = |s: &str| {
                s.parse::<u64>()
                    .map_err(|_| format!("bad number in {line:?}"))
            };
            let name = next_id_or_name.to_string();
            check_name(&name).map_err(|e| e.to_string())?;
            let invalid = match *state {
                "valid" => None,
                "invalid" => Some(rest.first().unwrap_or(&"invalidated").to_string()),
                _ => return Err(format!("bad state in {line:?}")),
            };
            let id = parse(id)?;
            self.next_id = self.next_id.max(id + 1);
            self.snaps.push(Snap {
                id,
                name,
                point: parse(point)?,
                created_unix: parse(created)?,
                invalid,
                log: None,
                map: BTreeMap::new(),
                slots: 0,
            });
        }
        Ok(())
    }

    fn catalog_text(&self) -> String {
        let mut text = format!("{CATALOG_HEADER}\n");
        // "next" keeps ids unique across deletes (a log file name is never reused).
        text.push_str(&format!("next {} 0 0 - -\n", self.next_id));
        for snap in &self.snaps {
            match &snap.invalid {
                None => text.push_str(&format!(
                    "{} {} {} valid {}\n",
                    snap.id, snap.point, snap.created_unix, snap.name
                )),
                Some(reason) => text.push_str(&format!(
                    "{} {} {} invalid {} {}\n",
                    snap.id,
                    snap.point,
                    snap.created_unix,
                    snap.name,
                    reason.replace('\n', " ")
                )),
            }
        }
        let crc = crc32fast::hash(text.as_bytes());
        text.push_str(&format!("crc {crc:08x}\n"));
        text
    }

    /// Writes the catalog atomically: a temporary file, fsync, rename, directory fsync.
    fn write_catalog(&self) -> Result<(), SnapshotError> {
        let dir = &self.options.dir;
        let tmp = dir.join("catalog.tmp");
        let mut file = File::create(&tmp).map_err(|e| io_error("creating", &tmp, e))?;
        file.write_all(self.catalog_text().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error("writing", &tmp, e))?;
        let catalog = dir.join("catalog");
        fs::rename(&tmp, &catalog).map_err(|e| io_error("renaming to", &catalog, e))?;
        sync_dir(dir)
    }

    /// Reads snapshot `index`'s log into its map; a torn or damaged tail is cut off
    /// (its in-place overwrite never happened: that waits for the entry's fdatasync).
    fn load_log(&mut self, index: usize) -> Result<(), SnapshotError> {
        if self.snaps[index].invalid.is_some() {
            return Ok(());
        }
        let path = log_path(&self.options.dir, self.snaps[index].id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_error("opening", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| io_error("reading", &path, e))?
            .len();
        let mut map = BTreeMap::new();
        let mut slot = 0u64;
        let mut header = [0u8; ENTRY_HEADER_BYTES as usize];
        while (slot + 1) * ENTRY_BYTES <= len {
            if file.read_exact_at(&mut header, slot * ENTRY_BYTES).is_err() {
                break;
            }
            let Some((block, trigger, crc)) = decode_entry_header(&header) else {
                break;
            };
            if block >= self.data_blocks || map.contains_key(&block) {
                break;
            }
            map.insert(block, Entry { slot, crc, trigger });
            slot += 1;
        }
        if slot * ENTRY_BYTES != len {
            file.set_len(slot * ENTRY_BYTES)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_error("truncating", &path, e))?;
        }
        let snap = &mut self.snaps[index];
        snap.map = map;
        snap.slots = slot;
        snap.log = Some(Arc::new(file));
        Ok(())
    }

    fn used_bytes(&self) -> u64 {
        self.snaps.iter().map(|s| s.slots * ENTRY_BYTES).sum()
    }

    pub(crate) fn area_bytes(&self) -> u64 {
        self.options.area_bytes
    }

    pub(crate) fn area_used_bytes(&self) -> u64 {
        self.used_bytes()
    }

    pub(crate) fn list(&self) -> Vec<SnapshotInfo> {
        self.snaps.iter().map(Snap::info).collect()
    }

    /// Points of the valid snapshots (the applier cuts its batches at them).
    pub(crate) fn points(&self) -> Vec<u64> {
        self.snaps
            .iter()
            .filter(|s| s.invalid.is_none())
            .map(|s| s.point)
            .collect()
    }

    pub(crate) fn take_events(&mut self) -> Vec<String> {
        std::mem::take(&mut self.events)
    }

    fn find(&self, name: &str) -> Result<&Snap, SnapshotError> {
        self.snaps
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| SnapshotError::NotFound(name.to_string()))
    }

    fn find_valid(&self, name: &str) -> Result<&Snap, SnapshotError> {
        let snap = self.find(name)?;
        match &snap.invalid {
            Some(reason) => Err(SnapshotError::Invalid {
                name: name.to_string(),
                reason: reason.clone(),
            }),
            None => Ok(snap),
        }
    }

    pub(crate) fn info(&self, name: &str) -> Result<SnapshotInfo, SnapshotError> {
        self.find(name).map(Snap::info)
    }

    /// Adds a snapshot at `point` and makes it durable in the catalog. The caller has
    /// checked that no record after `point` has been applied (or taken for applying).
    pub(crate) fn create(
        &mut self,
        name: &str,
        point: u64,
        created_unix: u64,
    ) -> Result<SnapshotInfo, SnapshotError> {
        check_name(name)?;
        if self.snaps.iter().any(|s| s.name == name) {
            return Err(SnapshotError::Exists(name.to_string()));
        }
        let id = self.next_id;
        let path = log_path(&self.options.dir, id);
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_error("creating", &path, e))?;
        self.next_id += 1;
        self.snaps.push(Snap {
            id,
            name: name.to_string(),
            point,
            created_unix,
            invalid: None,
            log: Some(Arc::new(log)),
            map: BTreeMap::new(),
            slots: 0,
        });
        if let Err(error) = self.write_catalog() {
            self.snaps.pop();
            let _ = fs::remove_file(&path);
            return Err(error);
        }
        Ok(self.snaps[self.snaps.len() - 1].info())
    }

    /// Deletes a snapshot: out of the catalog (durably) first, then its log.
    pub(crate) fn delete(&mut self, name: &str) -> Result<SnapshotInfo, SnapshotError> {
        let index = self
            .snaps
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| SnapshotError::NotFound(name.to_string()))?;
        let snap = self.snaps.remove(index);
        if let Err(error) = self.write_catalog() {
            self.snaps.insert(index, snap);
            return Err(error);
        }
        let _ = fs::remove_file(log_path(&self.options.dir, snap.id));
        Ok(snap.info())
    }

    /// Invalidates snapshot `index` (its log is dropped; it stays listed with the reason
    /// until deleted).
    fn invalidate(&mut self, index: usize, reason: String) {
        let snap = &mut self.snaps[index];
        tracing::warn!(snapshot = %snap.name, "snapshot invalidated: {reason}");
        self.events
            .push(format!("snapshot {} invalidated: {reason}", snap.name));
        snap.invalid = Some(reason);
        snap.log = None;
        snap.map.clear();
        let id = snap.id;
        snap.slots = 0;
        if let Err(error) = self.write_catalog() {
            tracing::error!("recording the invalidation of a snapshot: {error}");
        }
        let _ = fs::remove_file(log_path(&self.options.dir, id));
    }

    /// Which blocks of `blocks` (sorted, with the sequence number of the first write
    /// about to overwrite each) some valid snapshot still needs; `read_old` fills in
    /// their current content, and every such snapshot gets a copy in its log, made
    /// durable before this returns. A snapshot whose log cannot take the copies (area
    /// full, write error) is invalidated; the volume goes on.
    ///
    /// `trigger` of a block is the sequence number that overwrites it; `None` for a
    /// resync write, which every snapshot must preserve (its trigger is recorded as
    /// `resync_trigger`).
    pub(crate) fn preserve(
        &mut self,
        blocks: &[(u64, Option<u64>)],
        resync_trigger: u64,
        read_old: &mut ReadOld<'_>,
    ) {
        if self.snaps.iter().all(|s| s.invalid.is_some()) {
            return;
        }
        // Per snapshot, the blocks it needs.
        let mut needs: Vec<(usize, Vec<(u64, u64)>)> = Vec::new();
        let mut wanted: BTreeMap<u64, usize> = BTreeMap::new();
        for (index, snap) in self.snaps.iter().enumerate() {
            if snap.invalid.is_some() {
                continue;
            }
            let mut list = Vec::new();
            for &(block, trigger) in blocks {
                let overwrites = trigger.is_none_or(|seq| seq > snap.point);
                if overwrites && !snap.map.contains_key(&block) {
                    list.push((block, trigger.unwrap_or(resync_trigger)));
                    wanted.insert(block, 0);
                }
            }
            if !list.is_empty() {
                needs.push((index, list));
            }
        }
        if wanted.is_empty() {
            return;
        }
        let order: Vec<u64> = wanted.keys().copied().collect();
        let old = match read_old(&order) {
            Ok(old) if old.len() == order.len() => old,
            Ok(_) => {
                for (index, _) in needs {
                    self.invalidate(
                        index,
                        "reading blocks to preserve returned too little".into(),
                    );
                }
                return;
            }
            Err(why) => {
                for (index, _) in needs {
                    self.invalidate(index, format!("reading blocks to preserve failed: {why}"));
                }
                return;
            }
        };
        for (position, block) in order.iter().enumerate() {
            wanted.insert(*block, position);
        }
        for (index, list) in needs {
            let room = self.options.area_bytes.saturating_sub(self.used_bytes());
            let needed = list.len() as u64 * ENTRY_BYTES;
            if needed > room {
                let reason = format!(
                    "the snapshot area is full ({} of {} bytes used, {} more needed)",
                    self.used_bytes(),
                    self.options.area_bytes,
                    needed
                );
                self.invalidate(index, reason);
                continue;
            }
            let mut buf = Vec::with_capacity(needed as usize);
            for &(block, trigger) in &list {
                buf.extend_from_slice(&encode_entry(block, trigger, &old[wanted[&block]]));
            }
            let snap = &mut self.snaps[index];
            let Some(log) = &snap.log else { continue };
            let at = snap.slots * ENTRY_BYTES;
            let written = log.write_all_at(&buf, at).and_then(|()| log.sync_data());
            if let Err(error) = written {
                self.invalidate(index, format!("writing its log failed: {error}"));
                continue;
            }
            for (offset, &(block, trigger)) in list.iter().enumerate() {
                let data = &old[wanted[&block]];
                snap.map.insert(
                    block,
                    Entry {
                        slot: snap.slots + offset as u64,
                        crc: block_crc(data),
                        trigger,
                    },
                );
            }
            snap.slots += list.len() as u64;
        }
    }

    /// Where each block of `[first, first+count)` of snapshot `name` is read from, and
    /// a handle on its log for the preserved ones: reading needs no lock on the
    /// snapshots (a slot, once written, does not change while the snapshot lives).
    pub(crate) fn sources(
        &self,
        name: &str,
        first: u64,
        count: u64,
    ) -> Result<(u64, Vec<BlockSource>, LogReader), SnapshotError> {
        let snap = self.find_valid(name)?;
        let mut sources = vec![BlockSource::InPlace; count as usize];
        for (&block, entry) in snap.map.range(first..first + count) {
            sources[(block - first) as usize] = BlockSource::Log {
                slot: entry.slot,
                crc: entry.crc,
            };
        }
        let log = snap
            .log
            .clone()
            .ok_or_else(|| SnapshotError::Io("log not open".into()))?;
        Ok((snap.point, sources, LogReader(log)))
    }

    /// The point of valid snapshot `name`.
    pub(crate) fn point(&self, name: &str) -> Result<u64, SnapshotError> {
        self.find_valid(name).map(|s| s.point)
    }

    /// Blocks of `[first, first+count)` changed after snapshot `since` and — with
    /// `until` — no later than `until`'s point. Sorted.
    pub(crate) fn changed(
        &self,
        since: &str,
        until: Option<u64>,
        first: u64,
        count: u64,
    ) -> Result<Vec<u64>, SnapshotError> {
        let snap = self.find_valid(since)?;
        Ok(snap
            .map
            .range(first..first.saturating_add(count))
            .filter(|(_, entry)| until.is_none_or(|point| entry.trigger <= point))
            .map(|(&block, _)| block)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(dir: &Path) -> SnapshotOptions {
        SnapshotOptions {
            dir: dir.to_path_buf(),
            area_bytes: 64 * ENTRY_BYTES,
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "replicad-snap-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn old_blocks(blocks: &[u64]) -> Result<Vec<Vec<u8>>, String> {
        Ok(blocks
            .iter()
            .map(|&b| vec![b as u8; BLOCK_BYTES as usize])
            .collect())
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "nightly-2026.12.03", "A_b-c.d", &"x".repeat(64)] {
            check_name(good).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a b",
            "a/b",
            "a@b",
            &"x".repeat(65),
            "é",
        ] {
            assert_eq!(
                check_name(bad),
                Err(SnapshotError::BadName(bad.to_string()))
            );
        }
    }

    #[test]
    fn preserved_blocks_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempdir("reopen");
        let mut snaps = Snapshots::open(area(&dir), 100).unwrap();
        snaps.create("a", 10, 1).unwrap();
        snaps.preserve(&[(3, Some(11)), (4, Some(9))], 0, &mut old_blocks);
        snaps.preserve(&[(5, None)], 12, &mut old_blocks);
        assert_eq!(snaps.changed("a", None, 0, 100).unwrap(), vec![3, 5]);
        assert_eq!(snaps.changed("a", Some(11), 0, 100).unwrap(), vec![3]);
        drop(snaps);
        // A torn third entry.
        let log = log_path(&dir, 1);
        let file = OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all_at(&[0x52, 0x53, 0x4e], 2 * ENTRY_BYTES)
            .unwrap();
        let snaps = Snapshots::open(area(&dir), 100).unwrap();
        assert_eq!(snaps.changed("a", None, 0, 100).unwrap(), vec![3, 5]);
        assert_eq!(fs::metadata(&log).unwrap().len(), 2 * ENTRY_BYTES);
        let (_, sources, log) = snaps.sources("a", 3, 1).unwrap();
        let BlockSource::Log { slot, crc } = sources[0] else {
            panic!("not preserved")
        };
        let mut buf = vec![0u8; BLOCK_BYTES as usize];
        log.read_slot(slot, &mut buf).unwrap();
        assert_eq!(buf, vec![3u8; BLOCK_BYTES as usize]);
        assert_eq!(crc, block_crc(&buf));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_area_invalidates_the_snapshot_not_the_others() {
        let dir = tempdir("full");
        let mut snaps = Snapshots::open(area(&dir), 1000).unwrap();
        snaps.create("small", 5, 1).unwrap();
        snaps.create("big", 5, 1).unwrap();
        let first: Vec<(u64, Option<u64>)> = (0..30).map(|b| (b, Some(6))).collect();
        snaps.preserve(&first, 0, &mut old_blocks);
        assert_eq!(snaps.used_bytes(), 60 * ENTRY_BYTES);
        let more: Vec<(u64, Option<u64>)> = (30..40).map(|b| (b, Some(7))).collect();
        snaps.preserve(&more, 0, &mut old_blocks);
        // The first that needs room it cannot get goes; its space serves the other.
        let list = snaps.list();
        assert!(
            list[0].invalid.as_deref().unwrap().contains("full"),
            "{list:?}"
        );
        assert!(list[1].invalid.is_none(), "{list:?}");
        assert!(matches!(
            snaps.sources("small", 0, 1),
            Err(SnapshotError::Invalid { .. })
        ));
        assert_eq!(snaps.take_events().len(), 1);
        drop(snaps);
        let snaps = Snapshots::open(area(&dir), 1000).unwrap();
        assert!(snaps.list()[0].invalid.is_some());
        assert_eq!(snaps.changed("big", None, 0, 1000).unwrap().len(), 40);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_catalog_is_an_error_and_deleted_snapshots_leave_no_log() {
        let dir = tempdir("catalog");
        let mut snaps = Snapshots::open(area(&dir), 100).unwrap();
        snaps.create("a", 1, 1).unwrap();
        snaps.create("b", 2, 1).unwrap();
        assert_eq!(
            snaps.create("a", 3, 1),
            Err(SnapshotError::Exists("a".into()))
        );
        snaps.delete("a").unwrap();
        assert_eq!(snaps.delete("a"), Err(SnapshotError::NotFound("a".into())));
        drop(snaps);
        assert!(!log_path(&dir, 1).exists());
        let snaps = Snapshots::open(area(&dir), 100).unwrap();
        assert_eq!(snaps.list().len(), 1);
        assert_eq!(snaps.list()[0].id, 2);
        drop(snaps);
        let catalog = dir.join("catalog");
        let text = fs::read_to_string(&catalog)
            .unwrap()
            .replace("valid b", "valid c");
        fs::write(&catalog, text).unwrap();
        let error = Snapshots::open(area(&dir), 100).unwrap_err();
        assert!(error.to_string().contains("damaged"), "{error}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
