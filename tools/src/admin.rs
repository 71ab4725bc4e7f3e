//! Commands that work on a store directly, and the status renderer.

use std::path::Path;

use engine::volume::{format_uuid, read_superblock, CreateOptions};
use engine::Volume;
use replicad::config::{Config, ConfigError};
use replicad::control::ResourceStatus;
use replicad::resource::{lock_store, open_stores};

/// Human-readable bytes (IEC).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.2}{}", UNITS[unit])
    }
}

/// `replctl create-md RES`: fresh metadata on this node's store.
pub fn create_md(
    config_path: &Path,
    node: &str,
    resource: &str,
    force: bool,
    zeroed: bool,
) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let resource_config = config.resource(resource)?;
    let node_config = resource_config.nodes.get(node).ok_or_else(|| {
        anyhow::anyhow!("node {node} is not part of resource {resource} (pass --node)")
    })?;
    let _lock = lock_store(&node_config.disk).map_err(anyhow::Error::msg)?;
    let (data, meta) = open_stores(node_config, resource_config.io).map_err(anyhow::Error::msg)?;
    let options = CreateOptions {
        resource_uuid: resource_config.resource_uuid(resource),
        node_id: resource_config.node_id(node).unwrap_or(0),
        node_name: node.to_string(),
        journal_bytes: resource_config.journal_bytes_for(data.size_bytes()),
        force,
        assume_zeroed: zeroed,
    };
    let bar = indicatif::ProgressBar::new(data.size_bytes());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "checksumming {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .map_err(|e| anyhow::anyhow!(e.to_string()))?
        .progress_chars("=> "),
    );
    if zeroed {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let superblock = Volume::create(&data, &meta, &options, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .map_err(|error| anyhow::anyhow!("{}: {error}", node_config.disk.display()))?;
    bar.finish_and_clear();
    let geometry = superblock.geometry;
    println!(
        "{resource}: metadata written on {} for node {node}: {} usable, journal {}, resource uuid {}",
        node_config.disk.display(),
        human_bytes(geometry.data_bytes),
        human_bytes(geometry.journal_bytes),
        format_uuid(&superblock.resource_uuid)
    );
    Ok(())
}

/// `replctl dump-md RES`: the superblock, read straight from the store.
pub fn dump_md(config_path: &Path, node: &str, resource: &str, json: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let resource_config = config.resource(resource)?;
    let node_config = resource_config.nodes.get(node).ok_or_else(|| {
        anyhow::anyhow!("node {node} is not part of resource {resource} (pass --node)")
    })?;
    let (data, meta) =
        open_stores(node_config, replicad::config::IoMode::Buffered).map_err(anyhow::Error::msg)?;
    let loaded = read_superblock(&data, &meta)?;
    let sb = &loaded.superblock;
    let value = serde_json::json!({
        "resource_uuid": format_uuid(&sb.resource_uuid),
        "node_id": sb.node_id,
        "node_name": sb.node_name,
        "sequence": sb.sequence,
        "copy": if loaded.copy == 0 { "A" } else { "B" },
        "other_copy_error": loaded.other_copy_error.map(|e| e.to_string()),
        "data_bytes": sb.geometry.data_bytes,
        "journal_bytes": sb.geometry.journal_bytes,
        "disk_state": format!("{:?}", sb.disk_state),
        "generation": {
            "current": format!("{:016X}", sb.generations.current),
            "bitmap": format!("{:016X}", sb.generations.bitmap),
            "history": sb.generations.history.iter().map(|h| format!("{h:016X}")).collect::<Vec<_>>(),
        },
        "checkpoint_seq": sb.checkpoint_seq,
        "clean": sb.flags & engine::superblock::flags::CLEAN != 0,
        "was_primary": sb.flags & engine::superblock::flags::PRIMARY != 0,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else if let serde_json::Value::Object(map) = value {
        for (key, value) in map {
            println!("{key}: {value}");
        }
    }
    Ok(())
}

/// The DRBD-like status tree.
pub fn render_status(status: &ResourceStatus) -> String {
    let mut out = format!("{} role:{}\n", status.name, status.role);
    out.push_str(&format!("  disk:{}", status.disk));
    if status.size_bytes > 0 {
        out.push_str(&format!(
            " size:{} mode:{}",
            human_bytes(status.size_bytes),
            status.mode
        ));
    }
    if status.out_of_sync_bytes > 0 {
        out.push_str(&format!(
            " out-of-sync:{}",
            human_bytes(status.out_of_sync_bytes)
        ));
    }
    out.push('\n');
    if let Some(error) = &status.disk_error {
        out.push_str(&format!("    error: {error}\n"));
    }
    if let Some(peer) = &status.peer {
        out.push_str(&format!(
            "  {} role:{} connection:{}\n",
            peer.name,
            peer.role.as_deref().unwrap_or("Unknown"),
            peer.connection
        ));
        if peer.connection == "Connected" {
            out.push_str(&format!(
                "    replication:{} peer-disk:{}",
                peer.replication,
                peer.peer_disk.as_deref().unwrap_or("DUnknown")
            ));
            if let Some(done) = peer.done_percent {
                out.push_str(&format!(" done:{done:.2}"));
            }
            if let Some(eta) = peer.eta_seconds {
                out.push_str(&format!(" eta:{eta}s"));
            }
            if let Some(rate) = peer.resync_rate_bytes {
                out.push_str(&format!(" rate:{}/s", human_bytes(rate)));
            }
            out.push('\n');
            out.push_str(&format!(
                "    in-flight:{} unacked:{} lag:{} ({:.1}s)\n",
                peer.in_flight,
                peer.unacked,
                human_bytes(peer.lag_bytes),
                peer.lag_seconds
            ));
        }
        if peer.split_brain {
            out.push_str("    SPLIT BRAIN: resolve with `replctl connect RES --discard-my-data` on the node whose changes to drop\n");
        }
        if let Some(error) = peer
            .last_error
            .as_ref()
            .filter(|_| peer.connection != "Connected")
        {
            out.push_str(&format!("    last error: {error}\n"));
        }
    }
    let io = &status.io;
    out.push_str(&format!(
        "  io: reads:{} ({}) writes:{} ({}) flushes:{} checksum-errors:{} repaired:{}\n",
        io.reads,
        human_bytes(io.read_bytes),
        io.writes,
        human_bytes(io.write_bytes),
        io.flushes,
        io.checksum_errors,
        io.repaired_blocks
    ));
    if let Some(cache) = &io.checksum_cache {
        out.push_str(&format!(
            "  checksum cache: {} of {}, hit rate {:.1} % ({} lookups)\n",
            human_bytes(cache.resident_bytes),
            human_bytes(cache.limit_bytes),
            cache.hit_ratio() * 100.0,
            cache.hits + cache.misses
        ));
    }
    let served_by_peer = status.peer.as_ref().map_or(0, |peer| peer.reads_served);
    let balancing = !status.read_balancing.is_empty() && status.read_balancing != "prefer-local";
    if balancing || served_by_peer > 0 {
        out.push_str(&format!(
            "  reads: balancing:{} local:{}",
            status.read_balancing, io.reads_local
        ));
        if let Some(peer) = &status.peer {
            out.push_str(&format!(
                " {}:{} fallbacks:{}",
                peer.name, peer.reads_served, peer.read_fallbacks
            ));
        }
        out.push('\n');
    }
    out
}

/// An error of `replicad` or `replctl` as the one line the CLI contract asks for. A
/// config file that does not parse is named with the line and the dotted key at fault
/// (`line 2: resource.r0.mode: "fast" is not a mode …`), without the source excerpt the
/// TOML parser draws over several lines.
pub fn error_line(error: &anyhow::Error) -> String {
    if let Some(ConfigError::Parse { path, message }) = error.downcast_ref::<ConfigError>() {
        return format!("config {path}: {}", describe_toml_error(path, message));
    }
    // The error and its causes, skipping a cause the message above it already quotes.
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    one_line(&text)
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Turns the parser's "TOML parse error at line L, column C", excerpt and reason into
/// "line L: KEY: reason", the key read from the file at `path`.
fn describe_toml_error(path: &str, message: &str) -> String {
    let lines: Vec<&str> = message.lines().collect();
    let line_number = lines
        .first()
        .and_then(|first| first.strip_prefix("TOML parse error at line "))
        .and_then(|rest| rest.split(',').next())
        .and_then(|number| number.trim().parse::<usize>().ok());
    let Some(line_number) = line_number else {
        return one_line(message);
    };
    // The reason follows the excerpt, whose last line holds the carets.
    let reason_start = lines
        .iter()
        .rposition(|line| line.trim_start().starts_with('|') && line.contains('^'))
        .map_or(1, |caret| caret + 1);
    let reason = one_line(&lines[reason_start.min(lines.len())..].join("\n"));
    let key = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml_key_at(&text, line_number));
    match key {
        Some(key) => format!("line {line_number}: {key}: {reason}"),
        None => format!("line {line_number}: {reason}"),
    }
}

/// The dotted key set on line `line_number` (1-based) of a TOML text: its table's name
/// and the line's key, or the table's name when the line is a table header.
fn toml_key_at(text: &str, line_number: usize) -> Option<String> {
    let mut table = String::new();
    for (index, line) in text.lines().enumerate().take(line_number) {
        let line = line.trim();
        let here = index + 1 == line_number;
        if line.starts_with('[') {
            table = line
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            if here {
                return Some(table);
            }
        } else if here {
            let key = line.split('=').next().unwrap_or_default().trim();
            if key.is_empty() || key.starts_with('#') {
                return (!table.is_empty()).then_some(table);
            }
            let key = key.trim_matches('"');
            return Some(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
    }
    None
}

/// Renders the answer of a `replctl snapshot` command (`verb`: created, deleted, list).
pub fn render_snapshots(verb: &str, value: &serde_json::Value) -> String {
    let line = |s: &serde_json::Value| {
        let state = match s["invalid_reason"].as_str() {
            Some(reason) => format!("INVALID: {reason}"),
            None => "valid".to_string(),
        };
        format!(
            "{:<24} export {:<32} write {:>10}  changed {:>10}  {}  readers {}  {}\n",
            s["name"].as_str().unwrap_or("?"),
            s["export"].as_str().unwrap_or("?"),
            s["point"].as_u64().unwrap_or(0),
            human_bytes(s["changed_blocks"].as_u64().unwrap_or(0) * engine::BLOCK_BYTES),
            human_bytes(s["bytes"].as_u64().unwrap_or(0)),
            s["readers"].as_u64().unwrap_or(0),
            state,
        )
    };
    if let Some(message) = value["message"].as_str() {
        return format!("{message}\n");
    }
    if verb != "list" {
        return format!(
            "snapshot {} {verb} (export {}, write {})\n",
            value["name"].as_str().unwrap_or("?"),
            value["export"].as_str().unwrap_or("?"),
            value["point"].as_u64().unwrap_or(0)
        );
    }
    let mut out = format!(
        "{}: snapshot area {} of {} used\n",
        value["resource"].as_str().unwrap_or("?"),
        human_bytes(value["area_used_bytes"].as_u64().unwrap_or(0)),
        human_bytes(value["area_bytes"].as_u64().unwrap_or(0)),
    );
    match value["snapshots"].as_array() {
        Some(list) if !list.is_empty() => list.iter().for_each(|s| out.push_str(&line(s))),
        _ => out.push_str("  (no snapshots)\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_keys_by_line() {
        let text = "top = 1\n[resource.r0]\nmode = \"fast\"\n\n[resource.r0.nodes.alpha]\n  \"disk\" = 3\n# note\n";
        let cases = [
            (1, Some("top")),
            (2, Some("resource.r0")),
            (3, Some("resource.r0.mode")),
            (5, Some("resource.r0.nodes.alpha")),
            (6, Some("resource.r0.nodes.alpha.disk")),
            (7, Some("resource.r0.nodes.alpha")),
            (9, None),
        ];
        for (line, expected) in cases {
            assert_eq!(toml_key_at(text, line).as_deref(), expected, "line {line}");
        }
    }

    #[test]
    fn toml_errors_become_one_line() {
        let message = "TOML parse error at line 3, column 8\n  |\n3 | mode = \"fast\"\n  |        ^^^^^^\n\"fast\" is not a mode (sync, semi-sync or async)\n";
        let described = describe_toml_error("/nonexistent/replicad.toml", message);
        assert_eq!(
            described,
            "line 3: \"fast\" is not a mode (sync, semi-sync or async)"
        );
        assert_eq!(describe_toml_error("x", "odd\n  text\n"), "odd text");
    }
}
