//! The README's first command, `replctl demo`, end to end: mirror, kill -9 the primary,
//! promote the spare, verify every acknowledged write, rejoin, compare. It must pass on
//! its own temp image files and leave nothing behind in the temp directory.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::run_with_timeout;

#[test]
fn p1_replctl_demo_loses_no_acknowledged_write_and_cleans_up() {
    let tmp =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let output = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_replctl"))
            .arg("demo")
            .env("TMPDIR", &tmp),
        Duration::from_secs(240),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "replctl demo failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let all = format!("{stdout}{stderr}");
    for expected in [", 0 lost,", "byte-identical", "demo passed"] {
        assert!(all.contains(expected), "no {expected:?} in:\n{all}");
    }
    // The cleanup check below means something only if the demo worked in `tmp`.
    let work_dir = format!("work directory {}", tmp.display());
    assert!(all.contains(&work_dir), "no {work_dir:?} in:\n{all}");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .expect("temp dir")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .collect();
    assert!(left.is_empty(), "replctl demo left {left:?} behind");
    std::fs::remove_dir(&tmp).expect("remove the empty temp dir");
}
