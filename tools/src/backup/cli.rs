//! `replctl backup-file`, `replctl backup-verify` and `replctl restore`: thin
//! wrappers of [`super::write_backup`], [`super::verify`] and [`super::restore`] over
//! NBD URIs and paths.
//!
//! These are the low-level forms: the caller names the snapshot, its sequence number
//! and (for an incremental) the changed ranges. The daemon-level command that takes a
//! snapshot first and asks the daemon for the ranges is meant to call the same
//! functions with the same [`BackupFileArgs`] fields.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use super::{BackupMeta, BackupSummary, RawFileTarget, RestorePhase, RestoreSummary};
use crate::admin::human_bytes;
use crate::nbd_client::NbdClient;

/// `replctl backup-file`.
#[derive(Debug, Clone, clap::Args)]
pub struct BackupFileArgs {
    /// The export to read: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH
    /// (a snapshot export, so that the data does not change while it is read).
    #[arg(long, value_name = "URI")]
    pub from: String,
    /// The backup file to write (refused if it exists; written as FILE.tmp first).
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
    /// Identity of the volume, stored in the file and checked on restore.
    #[arg(long, value_name = "ID")]
    pub volume_id: String,
    /// Name of the snapshot being backed up.
    #[arg(long, value_name = "NAME")]
    pub snapshot: String,
    /// Sequence number of that snapshot.
    #[arg(long, value_name = "N")]
    pub seq: u64,
    /// Make an incremental backup based on this snapshot (the previous backup's).
    #[arg(long, value_name = "NAME", requires_all = ["base_seq", "ranges_from"])]
    pub base: Option<String>,
    /// Sequence number of the base snapshot.
    #[arg(long, value_name = "N", requires = "base")]
    pub base_seq: Option<u64>,
    /// JSON file listing the byte ranges changed since the base: [[offset, length], ...].
    #[arg(long, value_name = "FILE", requires = "base")]
    pub ranges_from: Option<PathBuf>,
    /// Creation time to record, in seconds since the epoch (default: now).
    #[arg(long, value_name = "SECS")]
    pub created_unix: Option<u64>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `replctl backup-verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct BackupVerifyArgs {
    /// The backup file to check (read to its end, every CRC checked).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `replctl restore`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// Where to restore: an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix://...) or the
    /// path of an image file or block device of exactly the volume's size.
    #[arg(long, value_name = "URI|PATH")]
    pub to: String,
    /// The chain: a full backup, then each incremental in order.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// Refuse backups of any other volume.
    #[arg(long, value_name = "ID")]
    pub volume_id: Option<String>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `replctl backup`.
#[derive(Debug, Clone, clap::Args)]
pub struct BackupArgs {
    /// The resource to back up (from this node: a Secondary keeps the backup's reads
    /// off the Primary).
    pub resource: String,
    /// The backup file to write (refused if it exists; written as FILE.tmp first).
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
    /// Make an incremental backup of the blocks changed since this snapshot (usually
    /// the one the previous backup was taken from; it must still exist).
    #[arg(long, value_name = "NAME")]
    pub since: Option<String>,
    /// Back up this existing snapshot instead of taking a new one
    /// (default: a new snapshot named backup-UNIXTIME).
    #[arg(long, value_name = "NAME")]
    pub snapshot: Option<String>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `replctl backup`: takes a snapshot through the daemon (or uses `--snapshot`),
/// reads it over NBD as `RESOURCE@NAME`, and — with `--since` — copies only the blocks
/// that the snapshot's `qemu:dirty-bitmap:SINCE` context marks changed.
pub fn backup_resource(
    args: &BackupArgs,
    control: &mut replicad::control::Client,
) -> anyhow::Result<()> {
    use replicad::control::Request;
    let status = control
        .status(Some(&args.resource))?
        .into_iter()
        .next()
        .with_context(|| format!("no resource {}", args.resource))?;
    let list = control.call(&Request::SnapshotList {
        resource: args.resource.clone(),
    })?;
    let point_of = |list: &serde_json::Value, name: &str| {
        list["snapshots"]
            .as_array()
            .and_then(|all| all.iter().find(|s| s["name"] == name))
            .filter(|s| s["valid"] == true)
            .and_then(|s| s["point"].as_u64())
    };
    let volume_id = list["volume_id"].as_str().unwrap_or_default().to_owned();
    let base = match &args.since {
        Some(since) => Some((
            since.clone(),
            point_of(&list, since).with_context(|| {
                format!(
                    "no valid snapshot {since:?} of {} to back up since",
                    args.resource
                )
            })?,
        )),
        None => None,
    };
    let snapshot = match &args.snapshot {
        Some(name) => name.clone(),
        None => {
            let name = format!(
                "backup-{}",
                SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs()
            );
            control.call(&Request::SnapshotCreate {
                resource: args.resource.clone(),
                name: name.clone(),
                all: false,
            })?;
            name
        }
    };
    let list = control.call(&Request::SnapshotList {
        resource: args.resource.clone(),
    })?;
    let seq = point_of(&list, &snapshot)
        .with_context(|| format!("no valid snapshot {snapshot:?} of {}", args.resource))?;
    if let Some((since, base_seq)) = &base {
        if *base_seq > seq {
            anyhow::bail!(
                "snapshot {since:?} (write {base_seq}) is newer than {snapshot:?} (write {seq})"
            );
        }
    }
    let mut uri: crate::nbd_client::NbdUri = status
        .nbd
        .parse()
        .with_context(|| format!("the daemon's NBD address {:?}", status.nbd))?;
    uri.export = format!("{}@{snapshot}", args.resource);
    let bar = progress_bar("backup")?;
    let summary = runtime()?.block_on(async {
        let options = crate::nbd_client::ConnectOptions {
            meta_contexts: base
                .iter()
                .map(|(since, _)| format!("qemu:dirty-bitmap:{since}"))
                .collect(),
            ..Default::default()
        };
        let client = NbdClient::connect_with(&uri, options)
            .await
            .with_context(|| format!("cannot open snapshot export {}", uri.export))?;
        let size = client.info().size_bytes;
        let ranges = match &base {
            Some(_) => Some(changed_ranges(&client, size).await?),
            None => None,
        };
        let meta = BackupMeta {
            volume_id,
            volume_bytes: size,
            snapshot: snapshot.clone(),
            snapshot_seq: seq,
            base: base.clone(),
            created_unix: SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        };
        let summary = super::write_backup(
            client.clone(),
            &meta,
            ranges.as_deref(),
            &args.to,
            |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            },
        )
        .await;
        let _ = client.disconnect().await;
        anyhow::Ok(summary?)
    })?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("wrote {}", describe(&summary));
    }
    Ok(())
}

/// The byte ranges the client's one selected context marks dirty, over the whole
/// export (asked in pieces of at most 1 GiB; the server may answer a prefix).
async fn changed_ranges(client: &NbdClient, size: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < size {
        let length = (size - at).min(1 << 30) as u32;
        let status = client.block_status(at, length).await?;
        let extents = &status
            .first()
            .context("the server answered block status without a context")?
            .extents;
        let mut covered = 0u64;
        for extent in extents {
            let start = at + covered;
            let length = u64::from(extent.length).min(size - start);
            if extent.flags & replicad::nbd::STATE_DIRTY != 0 {
                match ranges.last_mut() {
                    Some((offset, len)) if *offset + *len == start => *len += length,
                    _ => ranges.push((start, length)),
                }
            }
            covered += length;
            if start + length >= size {
                break;
            }
        }
        anyhow::ensure!(
            covered > 0,
            "the server's block status covered nothing at offset {at}"
        );
        at += covered;
    }
    Ok(ranges)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A byte progress bar on stderr when it is a terminal; hidden otherwise.
fn progress_bar(what: &str) -> anyhow::Result<indicatif::ProgressBar> {
    let bar = indicatif::ProgressBar::new(0);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .map_err(|error| anyhow::anyhow!(error.to_string()))?
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    Ok(bar)
}

fn parse_ranges(path: &Path) -> anyhow::Result<Vec<(u64, u64)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the ranges file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list of [offset, length] pairs",
            path.display()
        )
    })
}

fn describe(summary: &BackupSummary) -> String {
    let meta = &summary.meta;
    let kind = match &meta.base {
        None => "full backup".to_owned(),
        Some((base, base_seq)) => format!("incremental backup since '{base}' (seq {base_seq})"),
    };
    let totals = &summary.totals;
    format!(
        "{}: {kind} of volume '{}' ({}), snapshot '{}' (seq {}), created at unix time {}\n  {} extents: {} data, {} zero; file {}",
        summary.path.display(),
        meta.volume_id,
        human_bytes(meta.volume_bytes),
        meta.snapshot,
        meta.snapshot_seq,
        meta.created_unix,
        totals.extents,
        human_bytes(totals.data_blocks * super::BLOCK_BYTES),
        human_bytes(totals.zero_blocks * super::BLOCK_BYTES),
        human_bytes(totals.file_bytes),
    )
}

/// `replctl backup-file`.
pub fn backup_file(args: &BackupFileArgs) -> anyhow::Result<()> {
    let ranges = args.ranges_from.as_deref().map(parse_ranges).transpose()?;
    let created_unix = match args.created_unix {
        Some(secs) => secs,
        None => SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
    };
    let base = match (&args.base, args.base_seq) {
        (Some(name), Some(seq)) => Some((name.clone(), seq)),
        (None, None) => None,
        _ => anyhow::bail!("--base and --base-seq go together"),
    };
    let bar = progress_bar("backup")?;
    let summary = runtime()?.block_on(async {
        let client = NbdClient::connect(&args.from)
            .await
            .with_context(|| format!("cannot open {}", args.from))?;
        let meta = BackupMeta {
            volume_id: args.volume_id.clone(),
            volume_bytes: client.info().size_bytes,
            snapshot: args.snapshot.clone(),
            snapshot_seq: args.seq,
            base,
            created_unix,
        };
        let summary = super::write_backup(
            client.clone(),
            &meta,
            ranges.as_deref(),
            &args.to,
            |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            },
        )
        .await;
        let _ = client.disconnect().await;
        anyhow::Ok(summary?)
    })?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("wrote {}", describe(&summary));
    }
    Ok(())
}

/// `replctl backup-verify`.
pub fn backup_verify(args: &BackupVerifyArgs) -> anyhow::Result<()> {
    let summary = super::verify(&args.file)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{}\n  every CRC checked: OK", describe(&summary));
    }
    Ok(())
}

/// `replctl restore`.
pub fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let bar = progress_bar("verify")?;
    let progress = |phase, done, total| {
        let prefix = match phase {
            RestorePhase::Verify => "verify",
            RestorePhase::Write => "restore",
        };
        if bar.prefix() != prefix {
            bar.set_prefix(prefix);
            bar.reset();
        }
        bar.set_length(total);
        bar.set_position(done);
    };
    let expected = args.volume_id.as_deref();
    let summary: RestoreSummary = runtime()?.block_on(async {
        if args.to.starts_with("nbd") {
            let client = NbdClient::connect(&args.to)
                .await
                .with_context(|| format!("cannot open {}", args.to))?;
            if client.info().flags.read_only() {
                let _ = client.disconnect().await;
                anyhow::bail!("{} is a read-only export; nothing was written", args.to);
            }
            let restored = super::restore(&args.files, client.clone(), expected, progress).await;
            let _ = client.disconnect().await;
            anyhow::Ok(restored?)
        } else {
            let target = RawFileTarget::open(Path::new(&args.to))
                .with_context(|| format!("cannot open {} for writing", args.to))?;
            anyhow::Ok(super::restore(&args.files, target, expected, progress).await?)
        }
    })?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "restored volume '{}' to snapshot '{}' (seq {}) on {} from {} file{}: {} written, {} zeroed",
            summary.volume_id,
            summary.snapshot,
            summary.snapshot_seq,
            args.to,
            summary.files.len(),
            if summary.files.len() == 1 { "" } else { "s" },
            human_bytes(summary.data_bytes),
            human_bytes(summary.zero_bytes),
        );
    }
    Ok(())
}
