//! The README's two commands, as a new user meets them: the first (`replctl demo`)
//! on a fresh copy of the repository with nothing built, the second (the tests) the
//! one `.ci/run` runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::run_with_timeout;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tools package sits in the workspace")
        .to_path_buf()
}

/// The shell commands at the top of the README: the lines of its first `sh` block,
/// without their comments.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README starts with a ```sh block");
    block
        .lines()
        .map(|line| line.split(" #").next().unwrap_or("").trim().to_string())
        .filter(|line| !line.is_empty())
        .collect()
}

/// Copies the source tree (everything but build output and git data) into `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if matches!(name.as_ref(), "target" | ".git") || name.ends_with(".img") {
            continue;
        }
        let kind = entry.file_type().expect("file type");
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

#[test]
fn readme_has_exactly_two_commands_and_ci_runs_the_second() {
    let commands = readme_commands();
    assert_eq!(commands.len(), 2, "README commands: {commands:?}");
    assert!(
        commands[0].contains("replctl -- demo"),
        "the first command runs the demo: {commands:?}"
    );
    let ci = std::fs::read_to_string(workspace_root().join(".ci/run")).expect(".ci/run");
    assert!(
        ci.lines().any(|line| line.trim() == commands[1]),
        ".ci/run does not run the README's test command {:?}",
        commands[1]
    );
}

/// The first command exactly as written, in a fresh copy of the repository with an
/// empty target directory: nothing prebuilt, so `cargo run --bin replctl` builds only
/// `replctl`, and the demo must start its daemons without any other binary.
#[test]
fn readme_first_command_works_on_a_fresh_clone() {
    let command = readme_commands().remove(0);
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fresh-clone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let clone = tmp.join("replicad");
    copy_tree(&workspace_root(), &clone);
    let temp_files = tmp.join("tmp");
    std::fs::create_dir_all(&temp_files).expect("temp dir");
    // A clean environment: none of the test runner's cargo variables (which would point
    // cargo at the main target directory), only what finds the toolchain. Offline: the
    // registry cache already holds every dependency of the workspace.
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(&command)
        .current_dir(&clone)
        .env_clear()
        .env("TMPDIR", &temp_files)
        .env("CARGO_NET_OFFLINE", "true");
    for key in [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "LANG",
    ] {
        if let Some(value) = std::env::var_os(key) {
            shell.env(key, value);
        }
    }
    let output = run_with_timeout(&mut shell, Duration::from_secs(1500));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "`{command}` failed on a fresh copy ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("demo passed"),
        "`{command}` did not pass:\n{stdout}\n{stderr}"
    );
    assert!(
        !clone.join("target/release/replicad").exists(),
        "the command built the replicad binary too; the test no longer shows that \
         replctl alone suffices"
    );
    std::fs::remove_dir_all(&tmp).expect("remove the copy");
}
