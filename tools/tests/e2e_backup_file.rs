//! `replctl backup-file`, `backup-verify` and `restore` against real qemu-nbd servers:
//! pattern A written with qemu-io, a full backup, pattern B over part of it, an
//! incremental backup of the rewritten ranges, the chain restored into a second image
//! that starts out as garbage, and the images compared with `cmp`. A backup of another
//! volume is refused and leaves the target untouched.
//!
//! The servers are socket-activated (`tools::checker::servers`): a client may connect
//! as soon as a server is returned, so nothing polls or sleeps. Every command runs
//! with a timeout; the servers are killed when the test ends, even on failure.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{require_tool, run_ok, run_with_timeout, temp_dir, REPLCTL};
use tools::checker::servers::{Listen, ServerProcess};

const IMAGE_BYTES: u64 = 16 << 20;
/// Bound on each command of this test.
const PATIENCE: Duration = Duration::from_secs(60);

fn serve(image: &Path, export: &str, listen: Listen) -> ServerProcess {
    let image = image.to_str().expect("UTF-8 temp path");
    ServerProcess::qemu_nbd(&["-f", "raw", image], listen, export)
        .unwrap_or_else(|error| panic!("cannot start qemu-nbd: {error}"))
}

/// Runs qemu-io commands (`-c` each) against an NBD URI.
fn qemu_io(uri: &str, commands: &[&str]) {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for line in commands {
        command.args(["-c", line]);
    }
    command.arg(uri);
    let output = run_ok(&mut command, PATIENCE);
    assert!(
        !output.contains("error") && !output.contains("failed"),
        "qemu-io {commands:?}: {output}"
    );
}

fn replctl(args: &[&str]) -> std::process::Output {
    run_with_timeout(Command::new(REPLCTL).args(args), PATIENCE)
}

fn replctl_ok(args: &[&str]) -> String {
    run_ok(Command::new(REPLCTL).args(args), PATIENCE)
}

fn images_equal(a: &Path, b: &Path) -> bool {
    run_with_timeout(Command::new("cmp").arg(a).arg(b), PATIENCE)
        .status
        .success()
}

fn sparse_image(path: &Path) {
    let file = std::fs::File::create(path).expect("create image");
    file.set_len(IMAGE_BYTES).expect("size image");
}

#[test]
fn full_and_incremental_backups_restore_into_a_fresh_image() {
    require_tool("qemu-nbd", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
    let dir = temp_dir("e2e-backup-file");
    let source_image = dir.join("source.img");
    let target_image = dir.join("target.img");
    sparse_image(&source_image);
    sparse_image(&target_image);
    let full = dir.join("backup.0");
    let incr = dir.join("backup.1");
    let ranges = dir.join("ranges.json");
    let (full_s, incr_s, ranges_s) = (
        full.to_str().expect("path"),
        incr.to_str().expect("path"),
        ranges.to_str().expect("path"),
    );

    let source = serve(&source_image, "r0", Listen::Tcp);
    let source_uri = source.uri().to_owned();
    // Pattern A over the first 6 MiB and at 10 MiB; the rest of the image stays a hole.
    qemu_io(
        &source_uri,
        &["write -P 0xa5 0 6M", "write -P 0x3c 10M 1M", "flush"],
    );
    let output = replctl_ok(&[
        "backup-file",
        "--from",
        &source_uri,
        "--to",
        full_s,
        "--volume-id",
        "vol-a",
        "--snapshot",
        "nightly-0",
        "--seq",
        "700",
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_str(&output).expect("JSON summary");
    assert_eq!(summary["data_blocks"], 7 * 256, "{summary}");
    assert_eq!(summary["zero_blocks"], 9 * 256, "{summary}");

    // Pattern B: unaligned rewrites inside A and in the hole, and a zeroed range.
    qemu_io(
        &source_uri,
        &[
            "write -P 0x5b 1049088 66560",
            "write -P 0x77 12M 256k",
            "write -z 2M 128k",
            "flush",
        ],
    );
    std::fs::write(
        &ranges,
        "[[1049088, 66560], [12582912, 262144], [2097152, 131072]]",
    )
    .expect("ranges file");
    let output = replctl_ok(&[
        "backup-file",
        "--json",
        "--from",
        &source_uri,
        "--to",
        incr_s,
        "--volume-id",
        "vol-a",
        "--snapshot",
        "nightly-1",
        "--seq",
        "812",
        "--base",
        "nightly-0",
        "--base-seq",
        "700",
        "--ranges-from",
        ranges_s,
    ]);
    let summary: serde_json::Value = serde_json::from_str(&output).expect("JSON summary");
    assert_eq!(
        summary["meta"]["base"],
        serde_json::json!({"snapshot": "nightly-0", "seq": 700})
    );
    // 1 MiB + 512 for 65 KiB: blocks 256..=272; 12 MiB for 256 KiB: 64 blocks; the
    // zeroed 128 KiB: 32 zero blocks.
    assert_eq!(summary["data_blocks"], 17 + 64, "{summary}");
    assert_eq!(summary["zero_blocks"], 32, "{summary}");
    let verified = replctl_ok(&["backup-verify", incr_s]);
    assert!(
        verified.contains("incremental backup since 'nightly-0' (seq 700)"),
        "{verified}"
    );
    drop(source);

    let target = serve(&target_image, "r0", Listen::Unix);
    let target_uri = target.uri().to_owned();
    // Garbage everywhere, so that the zero extents must really be written.
    qemu_io(&target_uri, &["write -P 0xee 0 16M", "flush"]);
    let output = replctl_ok(&[
        "restore",
        "--to",
        &target_uri,
        "--volume-id",
        "vol-a",
        full_s,
        incr_s,
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_str(&output).expect("JSON summary");
    assert_eq!(summary["snapshot"], "nightly-1", "{summary}");
    assert!(
        images_equal(&source_image, &target_image),
        "the restored image differs from the source"
    );

    // A backup of another volume: refused by name, and nothing is written.
    let other = dir.join("other.bak");
    let other_image = dir.join("other.img");
    sparse_image(&other_image);
    let other_server = serve(&other_image, "r1", Listen::Tcp);
    qemu_io(other_server.uri(), &["write -P 0x11 0 1M"]);
    replctl_ok(&[
        "backup-file",
        "--from",
        other_server.uri(),
        "--to",
        other.to_str().expect("path"),
        "--volume-id",
        "vol-b",
        "--snapshot",
        "nightly-0",
        "--seq",
        "700",
    ]);
    drop(other_server);
    let refused = replctl(&[
        "restore",
        "--to",
        &target_uri,
        "--volume-id",
        "vol-a",
        other.to_str().expect("path"),
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is a backup of volume 'vol-b', target is volume 'vol-a'"),
        "{stderr}"
    );
    // Nor may it follow vol-a's full backup in a chain.
    let refused = replctl(&[
        "restore",
        "--to",
        &target_uri,
        full_s,
        other.to_str().expect("path"),
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("other.bak is a backup of volume 'vol-b', but")
            && stderr.contains("backup.0 is of volume 'vol-a'"),
        "{stderr}"
    );
    drop(target);
    assert!(
        images_equal(&source_image, &target_image),
        "a refused restore changed the target"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
