//! `replctl bench` end to end: the real binary, real daemons, real loop devices (as
//! root) or image files. Smoke tests, not speed tests: no figure is compared with a
//! speed, only checked to be there. They check that the table is complete, that the
//! replicas are reported identical, and that nothing outlives the run (no loop device
//! backed by its files, no process naming its directory, no file), also after SIGINT.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A parent directory for one test's bench run, checked empty and removed on drop.
struct Parent(PathBuf);

impl Parent {
    fn new(test: &str) -> Parent {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("e2e-bench-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("test dir");
        Parent(path)
    }

    fn text(&self) -> &str {
        self.0.to_str().expect("UTF-8 test path")
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        // Anything a failed run left: loop devices backed by its files, then the files.
        if is_root() {
            for line in loop_devices_under(&self.0) {
                if let Some(device) = line.split(':').next() {
                    let _ = Command::new("losetup").arg("-d").arg(device).status();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Lines of `losetup -a` whose backing file lies below `dir`.
fn loop_devices_under(dir: &Path) -> Vec<String> {
    let output = run_ok(Command::new("losetup").arg("-a"), Duration::from_secs(30));
    let dir = dir.to_str().expect("UTF-8 test path");
    output
        .lines()
        .filter(|line| line.contains(dir))
        .map(str::to_string)
        .collect()
}

/// Command lines of running processes that mention `dir` (the daemons name their
/// config file below it).
fn processes_naming(dir: &Path) -> Vec<String> {
    let dir = dir.to_str().expect("UTF-8 test path");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let command = String::from_utf8_lossy(&raw).replace('\0', " ");
        // Our own test process does not name the directory; the bench and its
        // daemons do (the bench through --dir).
        if command.contains(dir) {
            found.push(format!("{}: {command}", name.to_string_lossy()));
        }
    }
    found
}

/// Waits (bounded) until no loop device, process or file of the run remains.
fn assert_nothing_left(parent: &Parent) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let loops = if is_root() {
            loop_devices_under(&parent.0)
        } else {
            Vec::new()
        };
        let processes = processes_naming(&parent.0);
        let files: Vec<PathBuf> = std::fs::read_dir(&parent.0)
            .expect("parent dir")
            .flatten()
            .map(|entry| entry.path())
            .collect();
        if loops.is_empty() && processes.is_empty() && files.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: loop devices {loops:?}, processes {processes:?}, files {files:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn number(value: &serde_json::Value, what: &str) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"))
}

/// Every cell is a positive number, except `-` (null) exactly where it does not apply.
fn assert_complete(table: &serde_json::Value, columns: &[serde_json::Value], applies: &[&str]) {
    let rows = table.as_array().expect("rows");
    let names: Vec<&str> = rows
        .iter()
        .map(|row| row["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "three rows expected: {names:?}");
    for row in rows {
        let name = row["name"].as_str().unwrap();
        let cells = row["cells"].as_array().expect("cells");
        assert_eq!(cells.len(), columns.len(), "{name}: one cell per column");
        for (cell, column) in cells.iter().zip(columns) {
            let key = column["key"].as_str().unwrap();
            let what = format!("{name} / {key}");
            if key == "rebuild_mib_s" && !applies.contains(&name) {
                assert!(cell.is_null(), "{what}: rebuild does not apply, got {cell}");
            } else {
                let value = number(cell, &what);
                assert!(
                    value.is_finite() && value > 0.0,
                    "{what}: expected a positive figure, got {value}"
                );
            }
        }
    }
}

#[test]
fn bench_json_table_is_complete_replicas_identical_nothing_left_behind() {
    let parent = Parent::new("smoke");
    let started = Instant::now();
    let output = run_with_timeout(
        Command::new(REPLCTL).args([
            "bench",
            "--size",
            "256M",
            "--runtime",
            "3s",
            "--json",
            "--dir",
            parent.text(),
        ]),
        Duration::from_secs(110),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "replctl bench failed ({}):\n{stderr}",
        output.status
    );
    eprintln!("replctl bench took {:?}:\n{stderr}", started.elapsed());
    // stdout is the report and nothing else.
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    });

    let columns = report["columns"].as_array().expect("columns").clone();
    let keys: Vec<&str> = columns.iter().map(|c| c["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "rw4k_qd32_iops",
            "rw4k_qd1_p50_us",
            "rw4k_qd1_p99_us",
            "sw1m_qd8_mib_s",
            "rr4k_qd32_iops",
            "rw4k_flush32_iops",
            "rebuild_mib_s"
        ]
    );
    assert_complete(&report["rows"], &columns, &["pair (sync)"]);
    assert_complete(&report["ratios"], &columns, &["pair/raw"]);
    let rows: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["name"].as_str().unwrap())
        .collect();
    assert_eq!(rows, ["raw", "standalone", "pair (sync)"]);

    // Every workload of every configuration ran, with requests in its window.
    for config in ["raw", "standalone", "pair"] {
        for workload in [
            "fill",
            "rw4k_qd32",
            "rw4k_qd1",
            "sw1m_qd8",
            "rr4k_qd32",
            "rw4k_flush32",
        ] {
            let measured = &report["workloads"][config][workload];
            let what = format!("{config}/{workload}");
            assert!(number(&measured["ops"], &what) > 0.0, "{what}: no requests");
        }
        let flushes = &report["workloads"][config]["rw4k_flush32"]["flushes"];
        assert!(number(flushes, config) > 0.0, "{config}: no flushes");
    }

    let volume_bytes = number(&report["volume_bytes"], "volume_bytes");
    let rebuild = &report["rebuild"];
    assert!(
        number(&rebuild["data_bytes_sent"], "rebuild data") >= volume_bytes,
        "the rebuild did not move the whole volume as data: {rebuild}"
    );
    assert!(number(&rebuild["raw_copy_mib_per_second"], "raw copy") > 0.0);
    assert!(number(&rebuild["ratio_to_raw_copy"], "rebuild ratio") > 0.0);

    let replicas = &report["replicas"];
    assert_eq!(replicas["identical"], true, "replicas: {replicas}");
    assert_eq!(replicas["verify_out_of_sync_blocks"], 0, "{replicas}");
    assert!(replicas["first_difference"].is_null(), "{replicas}");
    assert_eq!(
        number(&replicas["compared_bytes"], "compared bytes"),
        volume_bytes
    );

    let stores = report["stores"].as_str().unwrap_or_default();
    if is_root() {
        assert!(stores.contains("loop devices"), "stores: {stores}");
    } else {
        assert!(stores.contains("not root"), "stores: {stores}");
    }
    assert!(
        report["raw_method"]
            .as_str()
            .is_some_and(|m| m.contains("O_DIRECT")),
        "the raw row must say its method: {}",
        report["raw_method"]
    );
    assert_nothing_left(&parent);
}

#[test]
fn bench_cleans_up_on_sigint() {
    let parent = Parent::new("sigint");
    let mut child = Command::new(REPLCTL)
        .args([
            "bench",
            "--size",
            "64M",
            "--runtime",
            "1s",
            "--dir",
            parent.text(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start replctl bench");
    // Interrupt it once daemons run (and, as root, loop devices are attached).
    let waited = Instant::now();
    loop {
        let daemons = processes_naming(&parent.0)
            .into_iter()
            .filter(|command| command.contains("replicad"))
            .count();
        if daemons > 0 && (!is_root() || !loop_devices_under(&parent.0).is_empty()) {
            break;
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("replctl bench ended ({status}) before its daemons were seen");
        }
        if waited.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("no daemon of replctl bench within 90s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill with the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(45);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("replctl bench did not exit within 45s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = child
        .wait_with_output()
        .map(|output| String::from_utf8_lossy(&output.stderr).into_owned())
        .unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(130),
        "exit status after SIGINT: {status}\n{stderr}"
    );
    assert!(stderr.contains("SIGINT"), "stderr:\n{stderr}");
    assert_nothing_left(&parent);
}
