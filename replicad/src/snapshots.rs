//! Snapshots in the daemon: the operator's commands, and the read-only NBD exports
//! `RESOURCE@NAME` that serve them (see `engine::snapshot` for the mechanism).

use std::sync::Arc;

use bytes::Bytes;
use engine::snapshot::{SnapshotError, SnapshotInfo};
use serde::Serialize;

use crate::nbd::{Errno, Export, Extent, BASE_ALLOCATION, STATE_DIRTY};
use crate::resource::{Resource, ResourceError};

/// One snapshot as `replctl snapshot list --json` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStatus {
    pub name: String,
    /// NBD export name of its read-only image.
    pub export: String,
    /// Sequence number of the last write it includes.
    pub point: u64,
    pub created_unix: u64,
    /// Blocks changed since (copied to its log).
    pub changed_blocks: u64,
    pub bytes: u64,
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid_reason: Option<String>,
    /// NBD clients reading it now.
    pub readers: usize,
    /// What `--all` did on every node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `replctl snapshot list --json`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotList {
    pub resource: String,
    /// The resource's UUID (hex): what backups record as the volume's identity.
    pub volume_id: String,
    pub area_used_bytes: u64,
    pub area_bytes: u64,
    pub snapshots: Vec<SnapshotStatus>,
}

fn status(resource: &Resource, info: SnapshotInfo) -> SnapshotStatus {
    SnapshotStatus {
        export: format!("{}@{}", resource.name, info.name),
        readers: resource.snapshot_readers(&info.name),
        name: info.name,
        point: info.point,
        created_unix: info.created_unix,
        changed_blocks: info.preserved_blocks,
        bytes: info.bytes,
        valid: info.invalid.is_none(),
        invalid_reason: info.invalid,
        message: None,
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Resource {
    /// `replctl snapshot create`: a snapshot of this node's store as of the last write
    /// sequenced here (every write completed before the command is in it), made
    /// durable (journal flushed) before the answer. With `all` (on the Primary), at the
    /// same point of the write order on every connected node.
    pub async fn snapshot_create(
        &self,
        name: &str,
        all: bool,
    ) -> Result<SnapshotStatus, ResourceError> {
        let volume = self.volume().ok_or(ResourceError::NoDisk)?;
        let message = if all {
            let name = name.to_string();
            Some(
                self.admin_message(move |node, now, id| node.snapshot_all(now, id, name))
                    .await?,
            )
        } else {
            volume.create_snapshot(name, None, now_unix())?;
            None
        };
        let flushed = volume.clone();
        tokio::task::spawn_blocking(move || flushed.flush_blocking())
            .await
            .map_err(|e| ResourceError::Open(e.to_string()))?
            .map_err(|e| ResourceError::Snapshot(SnapshotError::Io(e.to_string())))?;
        let created = volume.snapshot_info(name)?;
        self.emit(&format!(
            "snapshot {} created at write {} (export {}@{})",
            created.name, created.point, self.name, created.name
        ));
        let mut status = status(self, created);
        status.message = message;
        Ok(status)
    }

    /// `replctl snapshot delete`: refused while an NBD client reads it.
    pub fn snapshot_delete(&self, name: &str) -> Result<SnapshotStatus, ResourceError> {
        let volume = self.volume().ok_or(ResourceError::NoDisk)?;
        volume.snapshot_info(name)?;
        let readers = self.snapshot_readers(name);
        if readers > 0 {
            return Err(ResourceError::SnapshotInUse {
                name: name.to_string(),
                readers,
            });
        }
        let deleted = volume.delete_snapshot(name)?;
        self.emit(&format!("snapshot {} deleted", deleted.name));
        Ok(status(self, deleted))
    }

    /// `replctl snapshot list`.
    pub fn snapshot_list(&self) -> Result<SnapshotList, ResourceError> {
        let volume = self.volume().ok_or(ResourceError::NoDisk)?;
        let (list, used, limit) = volume.list_snapshots()?;
        Ok(SnapshotList {
            resource: self.name.clone(),
            volume_id: self.uuid.iter().map(|b| format!("{b:02x}")).collect(),
            area_used_bytes: used,
            area_bytes: limit,
            snapshots: list.into_iter().map(|info| status(self, info)).collect(),
        })
    }

    /// Names of the valid snapshots (for `NBD_OPT_LIST`).
    pub fn snapshot_names(&self) -> Vec<String> {
        self.volume()
            .and_then(|v| v.list_snapshots().ok())
            .map(|(list, _, _)| {
                list.into_iter()
                    .filter(|s| s.invalid.is_none())
                    .map(|s| s.name)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The prefix of the dirty-bitmap contexts, as QEMU names them.
const DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";
/// Most bytes one block-status answer covers (the client asks again for the rest).
const STATUS_SPAN_BYTES: u64 = 1 << 30;

/// `qemu:dirty-bitmap:NAME` for each of `names`.
fn dirty_contexts(names: impl IntoIterator<Item = String>) -> Vec<String> {
    names
        .into_iter()
        .map(|name| format!("{DIRTY_BITMAP}{name}"))
        .collect()
}

/// Extents over `[offset, offset + length)` (capped at [`STATUS_SPAN_BYTES`]): dirty
/// where a block of `changed` (sorted) lies, clean elsewhere.
fn dirty_extents(offset: u64, length: u32, changed: &[u64]) -> Vec<Extent> {
    let block = engine::BLOCK_BYTES;
    let end = offset + u64::from(length).min(STATUS_SPAN_BYTES);
    let mut extents: Vec<Extent> = Vec::new();
    let mut push = |from: u64, to: u64, flags: u32| {
        if to <= from {
            return;
        }
        match extents.last_mut() {
            Some(last) if last.flags == flags => last.length += (to - from) as u32,
            _ => extents.push(Extent {
                length: (to - from) as u32,
                flags,
            }),
        }
    };
    let mut at = offset;
    for &b in changed {
        let (start, stop) = ((b * block).max(offset), ((b + 1) * block).min(end));
        if stop <= at || start >= end {
            continue;
        }
        push(at, start, 0);
        push(start.max(at), stop, STATE_DIRTY);
        at = stop;
    }
    push(at, end, 0);
    extents
}

/// The block range `[first, first + count)` a status request covers.
fn block_span(offset: u64, length: u32) -> (u64, u64) {
    let end = offset + u64::from(length).min(STATUS_SPAN_BYTES);
    let first = offset / engine::BLOCK_BYTES;
    (first, end.div_ceil(engine::BLOCK_BYTES) - first)
}

/// `qemu:dirty-bitmap:SINCE` over a range: blocks changed since snapshot `since`, up to
/// now (`until` None) or up to snapshot `until`.
fn dirty_status(
    resource: &Resource,
    context: &str,
    until: Option<&str>,
    offset: u64,
    length: u32,
) -> Result<Vec<Extent>, Errno> {
    let since = context.strip_prefix(DIRTY_BITMAP).ok_or(Errno::EINVAL)?;
    let volume = resource.volume().ok_or(Errno::EIO)?;
    let (first, count) = block_span(offset, length);
    let changed = volume
        .changed_blocks(since, until, first, count)
        .map_err(|error| {
            tracing::warn!(context, "block status failed: {error}");
            Errno::EINVAL
        })?;
    Ok(dirty_extents(offset, length, &changed))
}

/// Every valid snapshot, as its context on the live volume.
pub fn live_contexts(resource: &Resource) -> Vec<String> {
    dirty_contexts(resource.snapshot_names())
}

/// Block status of the live volume: `base:allocation` (all data) or the blocks
/// changed since a snapshot.
pub fn live_status(
    resource: &Resource,
    context: &str,
    offset: u64,
    length: u32,
) -> Result<Vec<Extent>, Errno> {
    if context == BASE_ALLOCATION {
        return Ok(vec![Extent { length, flags: 0 }]);
    }
    dirty_status(resource, context, None, offset, length)
}

/// The read-only export of one snapshot. Counts as a reader while it lives (the NBD
/// server holds it for the connection's lifetime).
pub struct SnapshotExport {
    resource: Arc<Resource>,
    name: String,
}

impl SnapshotExport {
    /// The export of `resource`'s snapshot `name`, if it exists and is valid.
    pub fn open(resource: Arc<Resource>, name: &str) -> Option<SnapshotExport> {
        let info = resource.volume()?.snapshot_info(name).ok()?;
        if info.invalid.is_some() {
            return None;
        }
        resource.add_snapshot_reader(name, 1);
        Some(SnapshotExport {
            resource,
            name: name.to_string(),
        })
    }
}

impl Drop for SnapshotExport {
    fn drop(&mut self) {
        self.resource.add_snapshot_reader(&self.name, -1);
    }
}

impl Export for SnapshotExport {
    fn size_bytes(&self) -> u64 {
        self.resource.size_bytes()
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read_only(&self) -> bool {
        true
    }

    /// `qemu:dirty-bitmap:A` for every snapshot A older than this one: the blocks
    /// changed between A and this snapshot (what an incremental backup copies).
    fn meta_contexts(&self) -> Vec<String> {
        let Some((list, _, _)) = self.resource.volume().and_then(|v| v.list_snapshots().ok())
        else {
            return Vec::new();
        };
        let Some(point) = list.iter().find(|s| s.name == self.name).map(|s| s.point) else {
            return Vec::new();
        };
        dirty_contexts(
            list.into_iter()
                .filter(|s| s.invalid.is_none() && s.name != self.name && s.point <= point)
                .map(|s| s.name),
        )
    }

    async fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u32,
    ) -> Result<Vec<Extent>, Errno> {
        if context == BASE_ALLOCATION {
            return Ok(vec![Extent { length, flags: 0 }]);
        }
        dirty_status(&self.resource, context, Some(&self.name), offset, length)
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, Errno> {
        let volume = self.resource.volume().ok_or(Errno::EIO)?;
        let name = self.name.clone();
        let failed = |error: &dyn std::fmt::Display| {
            tracing::warn!(snapshot = %self.name, "snapshot read failed: {error}");
            Errno::EIO
        };
        if volume.snapshot_readable(&name).map_err(|e| failed(&e))? {
            // The common case: batched with other reads on the volume's reader threads.
            let (sender, receiver) = tokio::sync::oneshot::channel();
            volume.read_snapshot_queued(
                &name,
                offset,
                u64::from(length),
                Box::new(move |result| drop(sender.send(result))),
            );
            return match receiver.await {
                Ok(result) => result.map_err(|e| failed(&e)),
                Err(_) => Err(Errno::EIO),
            };
        }
        // A Secondary's snapshot whose point is not applied yet: wait for it off the
        // runtime.
        let read = tokio::task::spawn_blocking(move || {
            volume.read_snapshot(&name, offset, u64::from(length))
        })
        .await
        .map_err(|_| Errno::EIO)?;
        read.map_err(|e| failed(&e))
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<(), Errno> {
        Err(Errno::EPERM)
    }

    async fn flush(&self) -> Result<(), Errno> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _length: u32, _fua: bool) -> Result<(), Errno> {
        Err(Errno::EPERM)
    }

    async fn write_zeroes(&self, _offset: u64, _length: u32, _fua: bool) -> Result<(), Errno> {
        Err(Errno::EPERM)
    }
}

/// What one NBD export name leads to: the live volume or a snapshot of it.
pub enum VolumeExport {
    Live(Arc<Resource>),
    Snapshot(SnapshotExport),
}

impl Export for VolumeExport {
    fn size_bytes(&self) -> u64 {
        match self {
            VolumeExport::Live(r) => r.size_bytes(),
            VolumeExport::Snapshot(s) => s.size_bytes(),
        }
    }

    fn is_writable(&self) -> bool {
        match self {
            VolumeExport::Live(r) => r.is_writable(),
            VolumeExport::Snapshot(s) => s.is_writable(),
        }
    }

    fn can_multi_conn(&self) -> bool {
        match self {
            VolumeExport::Live(r) => r.can_multi_conn(),
            VolumeExport::Snapshot(s) => s.can_multi_conn(),
        }
    }

    fn unservable(&self) -> impl std::future::Future<Output = ()> + Send {
        let live = match self {
            VolumeExport::Live(r) => Some(r.clone()),
            VolumeExport::Snapshot(_) => None,
        };
        async move {
            match live {
                Some(resource) => resource.unservable().await,
                None => std::future::pending().await,
            }
        }
    }

    fn minimum_block_size(&self) -> u32 {
        match self {
            VolumeExport::Live(r) => r.minimum_block_size(),
            VolumeExport::Snapshot(s) => s.minimum_block_size(),
        }
    }

    fn read_only(&self) -> bool {
        match self {
            VolumeExport::Live(r) => r.read_only(),
            VolumeExport::Snapshot(s) => s.read_only(),
        }
    }

    fn meta_contexts(&self) -> Vec<String> {
        match self {
            VolumeExport::Live(r) => live_contexts(r),
            VolumeExport::Snapshot(s) => s.meta_contexts(),
        }
    }

    async fn block_status(
        &self,
        context: &str,
        offset: u64,
        length: u32,
    ) -> Result<Vec<Extent>, Errno> {
        match self {
            VolumeExport::Live(r) => live_status(r, context, offset, length),
            VolumeExport::Snapshot(s) => s.block_status(context, offset, length).await,
        }
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, Errno> {
        match self {
            VolumeExport::Live(r) => r.read(offset, length).await,
            VolumeExport::Snapshot(s) => s.read(offset, length).await,
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), Errno> {
        match self {
            VolumeExport::Live(r) => r.write(offset, data, fua).await,
            VolumeExport::Snapshot(s) => s.write(offset, data, fua).await,
        }
    }

    async fn flush(&self) -> Result<(), Errno> {
        match self {
            VolumeExport::Live(r) => r.flush().await,
            VolumeExport::Snapshot(s) => s.flush().await,
        }
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), Errno> {
        match self {
            VolumeExport::Live(r) => r.trim(offset, length, fua).await,
            VolumeExport::Snapshot(s) => s.trim(offset, length, fua).await,
        }
    }

    async fn write_zeroes(&self, offset: u64, length: u32, fua: bool) -> Result<(), Errno> {
        match self {
            VolumeExport::Live(r) => r.write_zeroes(offset, length, fua).await,
            VolumeExport::Snapshot(s) => s.write_zeroes(offset, length, fua).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_extents_cover_the_range_exactly() {
        let ext = |pairs: &[(u32, u32)]| -> Vec<Extent> {
            pairs
                .iter()
                .map(|&(length, flags)| Extent { length, flags })
                .collect()
        };
        assert_eq!(dirty_extents(0, 40960, &[]), ext(&[(40960, 0)]));
        assert_eq!(
            dirty_extents(0, 40960, &[2, 3, 7]),
            ext(&[(8192, 0), (8192, 1), (12288, 0), (4096, 1), (8192, 0)])
        );
        // Unaligned start and end; changed blocks outside the range are ignored.
        assert_eq!(
            dirty_extents(5000, 10000, &[0, 1, 9]),
            ext(&[(3192, 1), (6808, 0)])
        );
        assert_eq!(dirty_extents(4096, 4096, &[1]), ext(&[(4096, 1)]));
        let total: u32 = dirty_extents(100, 1 << 20, &[3, 100, 200])
            .iter()
            .map(|e| e.length)
            .sum();
        assert_eq!(total, 1 << 20);
        assert_eq!(block_span(5000, 10000), (1, 3));
    }
}
