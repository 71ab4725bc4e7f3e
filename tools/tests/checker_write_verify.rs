//! The write-verify checker end to end: the `replcheck` binary against nbdkit serving
//! an image file, a clean run, tampering behind the server's back, a server killed
//! with SIGKILL mid-run, and an error-injecting server.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tools::checker::log::WriteRecord;
use tools::checker::servers::{Listen, ServerError, ServerProcess, TempDir};
use tools::checker::{verify_export, Mode, RunLog, StopReason};
use tools::nbd_client::NbdClient;

/// Bound on any wait in these tests.
const PATIENCE: Duration = Duration::from_secs(60);

fn started(server: Result<ServerProcess, ServerError>) -> ServerProcess {
    server.unwrap_or_else(|error| panic!("cannot start the NBD server: {error}"))
}

struct Workspace {
    dir: TempDir,
    image: PathBuf,
}

impl Workspace {
    fn new(size_bytes: u64) -> Self {
        let dir = TempDir::new("replcheck-test").expect("temp dir");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(size_bytes))
            .expect("create the image");
        Workspace { dir, image }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("run.log")
    }

    fn serve(&self, listen: Listen) -> ServerProcess {
        let image = self.image.display().to_string();
        started(ServerProcess::nbdkit(&["file", &image], listen))
    }

    fn read_block(&self, block: u64) -> Vec<u8> {
        let mut data = vec![0u8; 4096];
        let file = std::fs::File::open(&self.image).expect("open image");
        file.read_exact_at(&mut data, block * 4096)
            .expect("read image");
        data
    }

    /// Overwrites a block of the image file behind the server's back.
    fn write_block(&self, block: u64, data: &[u8]) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.image)
            .expect("open image");
        file.write_all_at(data, block * 4096).expect("write image");
    }
}

fn replcheck_command(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_replcheck"));
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    command
}

async fn replcheck(args: &[&str]) -> Output {
    let output = replcheck_command(args).output();
    tokio::time::timeout(PATIENCE, output)
        .await
        .expect("replcheck finished in time")
        .expect("run replcheck")
}

/// `replcheck write --uri URI --log LOG EXTRA...`, not started yet.
fn write_command(uri: &str, log: &Path, extra: &[&str]) -> tokio::process::Command {
    let log = log.display().to_string();
    let mut args = vec!["write", "--uri", uri, "--log", &log];
    args.extend_from_slice(extra);
    replcheck_command(&args)
}

async fn replcheck_write(uri: &str, log: &Path, extra: &[&str]) -> Output {
    let output = write_command(uri, log, extra).output();
    tokio::time::timeout(PATIENCE, output)
        .await
        .expect("replcheck finished in time")
        .expect("run replcheck")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `replcheck verify --json`; returns the exit code and the report.
async fn verify_json(uri: &str, log: &Path, modes: &str) -> (i32, Value) {
    let log = log.display().to_string();
    let output = replcheck(&[
        "verify", "--uri", uri, "--log", &log, "--mode", modes, "--json",
    ])
    .await;
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!("verify printed no JSON ({error}): {}", text(&output.stderr))
    });
    (output.status.code().unwrap_or(-1), report)
}

/// Verifies under `modes` and expects a failure with the given counters, whose first
/// finding is of `kind` and names `block` in its field `block_field`.
async fn expect_violation(
    uri: &str,
    log: &Path,
    modes: &str,
    counters: &[(&str, u64)],
    kind: &str,
    block_field: &str,
    block: u64,
) -> Value {
    let (code, report) = verify_json(uri, log, modes).await;
    assert_eq!(code, 1, "{report}");
    for (name, value) in counters {
        assert_eq!(report[name].as_u64(), Some(*value), "{name}: {report}");
    }
    let finding = &report["findings"][0];
    assert_eq!(finding["kind"].as_str(), Some(kind), "{report}");
    assert_eq!(finding[block_field].as_u64(), Some(block), "{report}");
    report
}

/// Each block's last write in the log.
fn last_writes(log: &RunLog) -> HashMap<u64, &WriteRecord> {
    let mut last = HashMap::new();
    for write in &log.writes {
        let entry = last.entry(write.block).or_insert(write);
        if write.issued > entry.issued {
            *entry = write;
        }
    }
    last
}

#[tokio::test]
async fn a_clean_run_verifies_and_tampering_is_caught() {
    let workspace = Workspace::new(8 << 20);
    let server = workspace.serve(Listen::Unix);
    let log_path = workspace.log();
    let log_arg = log_path.display().to_string();
    let extra = [
        "--qd",
        "32",
        "--writes",
        "4000",
        "--blocks",
        "0..512",
        "--flush-every",
        "100",
        "--fua-every",
        "50",
        "--seed",
        "1",
    ];
    let output = replcheck_write(server.uri(), &log_path, &extra).await;
    let summary = text(&output.stdout);
    assert!(output.status.success(), "{summary}{}", text(&output.stderr));
    assert!(
        summary.contains("stop completed") && summary.contains("acked 4000"),
        "{summary}"
    );
    let log = RunLog::load(&log_path).expect("the log parses");
    assert_eq!(
        (log.end.stop, log.end.writes_acked, log.header.queue_depth),
        (StopReason::Completed, 4000, 32)
    );
    assert_eq!(log.end.flushes_acked, 40);

    let (code, report) = verify_json(server.uri(), &log_path, "acked,durable,prefix").await;
    assert_eq!(
        (code, &report["passed"]),
        (0, &Value::Bool(true)),
        "{report}"
    );
    assert_eq!(
        report["blocks_checked"], report["blocks"]["acked_present"],
        "{report}"
    );

    // Zero the block whose last write was acknowledged first: a lost acknowledged write,
    // and a prefix hole, since every other block shows writes issued after that ack.
    let last = last_writes(&log);
    let victim = last
        .values()
        .min_by_key(|write| write.acked)
        .expect("writes")
        .block;
    let original = workspace.read_block(victim);
    workspace.write_block(victim, &[0u8; 4096]);
    let counters = [("lost_acked", 1), ("unknown_data", 0)];
    let uri = server.uri();
    let report = expect_violation(
        uri,
        &log_path,
        "acked",
        &counters,
        "lost-write",
        "block",
        victim,
    )
    .await;
    assert_eq!(
        report["findings"][0]["observed"]["found"], "initial",
        "{report}"
    );
    let report = expect_violation(
        uri,
        &log_path,
        "prefix",
        &[],
        "prefix-hole",
        "missing_block",
        victim,
    )
    .await;
    assert!(report["prefix_violations"].as_u64() > Some(0), "{report}");
    workspace.write_block(victim, &original);
    assert_eq!(
        verify_json(uri, &log_path, "acked,prefix").await.0,
        0,
        "restored"
    );

    // Copy one block's content over another: data never written to the target.
    let mut blocks: Vec<u64> = last.keys().copied().collect();
    blocks.sort_unstable();
    let (source, target) = (blocks[0], blocks[1]);
    workspace.write_block(target, &workspace.read_block(source));
    let counters = [("unknown_data", 1), ("lost_acked", 0)];
    let report = expect_violation(
        uri,
        &log_path,
        "acked",
        &counters,
        "unknown-data",
        "block",
        target,
    )
    .await;
    let content = &report["findings"][0]["observed"]["content"];
    assert_eq!(content["content"], "misplaced", "{report}");
    assert_eq!(content["header_block"].as_u64(), Some(source), "{report}");

    // The human report names the verdict and the violation.
    let output = replcheck(&["verify", "--uri", server.uri(), "--log", &log_arg]).await;
    let human = text(&output.stdout);
    assert!(
        human.contains("FAIL") && human.contains(&format!("block {target} holds")),
        "{human}"
    );
}

#[tokio::test]
async fn a_server_killed_mid_write_leaves_a_complete_log_that_verifies() {
    let workspace = Workspace::new(16 << 20);
    let mut server = workspace.serve(Listen::Tcp);
    let log_path = workspace.log();
    let extra = [
        "--qd",
        "32",
        "--seconds",
        "120",
        "--flush-every",
        "200",
        "--progress-every",
        "1000",
    ];
    let mut writer = write_command(server.uri(), &log_path, &extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start replcheck write");
    // Forward stderr lines; kill the server once 3000 writes were acknowledged.
    let stderr = writer.stderr.take().expect("piped stderr");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let progressed = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.recv().await {
            let done = line.starts_with("progress: acked 3000 ");
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        progressed,
        Ok(true),
        "no progress line; stderr so far: {seen:?}"
    );
    server.kill().expect("kill -9 nbdkit");

    let output = tokio::time::timeout(Duration::from_secs(20), writer.wait_with_output())
        .await
        .expect("the writer exits promptly once the server is gone")
        .expect("wait for replcheck");
    let summary = text(&output.stdout);
    assert!(output.status.success(), "{summary}");
    assert!(summary.contains("stop server-disconnected"), "{summary}");
    let log = RunLog::load(&log_path).expect("a complete log");
    assert_eq!(log.end.stop, StopReason::ServerDisconnected);
    assert!(log.end.writes_acked >= 3000, "{:?}", log.end);

    // The file plugin writes through the page cache, which survives the kill: every
    // acknowledged write must be there, and what is visible must be a prefix.
    let restarted = workspace.serve(Listen::Tcp);
    let client = NbdClient::connect(restarted.uri())
        .await
        .expect("connect to the restarted server");
    let report = tokio::time::timeout(
        PATIENCE,
        verify_export(&client, &log, &[Mode::Acked, Mode::Prefix], 32, 5),
    )
    .await
    .expect("verified in time")
    .expect("verification ran");
    assert!(report.passed, "{report}");
    assert!(
        report.blocks_checked > 0 && report.lost_acked == 0,
        "{report}"
    );
}

#[tokio::test]
async fn an_error_reply_stops_the_writer_with_a_failure() {
    let server = started(ServerProcess::nbdkit(
        &[
            "--filter=error",
            "memory",
            "8M",
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
        ],
        Listen::Tcp,
    ));
    let dir = TempDir::new("replcheck-test").expect("temp dir");
    let log_path = dir.path().join("run.log");
    let output = replcheck_write(server.uri(), &log_path, &["--writes", "100"]).await;
    let summary = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{summary}{}",
        text(&output.stderr)
    );
    assert!(
        summary.contains("stop server-error") && summary.contains("EIO"),
        "{summary}"
    );
    let log = RunLog::load(&log_path).expect("the log is written even then");
    assert_eq!(
        (log.end.stop, log.end.writes_acked),
        (StopReason::ServerError, 0)
    );
    assert!(
        log.writes.iter().any(|write| write.errno == Some(5)),
        "{:?}",
        log.writes
    );
}

#[tokio::test]
async fn verify_refuses_an_incomplete_log() {
    let dir = TempDir::new("replcheck-test").expect("temp dir");
    let log_path = dir.path().join("run.log");
    let header = r#"{"t":"run","format":"replcheck-log","version":1,"run_id":"0000000000000001","seed":1,"block_size":4096,"export_size":4096,"first_block":0,"end_block":1,"queue_depth":1,"flush_every":null,"fua_every":null,"uri":"nbd://x","started_unix_ms":0}"#;
    std::fs::write(&log_path, format!("{header}\n")).expect("write the log");
    let log_arg = log_path.display().to_string();
    let output = replcheck(&["verify", "--uri", "nbd://127.0.0.1:1/", "--log", &log_arg]).await;
    assert_eq!(output.status.code(), Some(3));
    assert!(
        text(&output.stderr).contains("incomplete"),
        "{}",
        text(&output.stderr)
    );
}
