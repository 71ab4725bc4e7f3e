//! `replctl bench` and `benches/peers.sh` end to end: the real binaries, real daemons,
//! real peers (nbdkit, qemu-nbd, QEMU's mirror), real loop devices (as root) or image
//! files. Smoke tests, not speed tests: no figure is compared with a speed, only checked
//! to be there. They check that the tables are complete, that the replicas are reported
//! identical, and that nothing outlives the run (no loop device backed by its files, no
//! process naming its directory, no file), also after SIGINT.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A parent directory for one test's bench run, checked empty and removed on drop.
struct Parent(PathBuf, Loops);

/// Whether the run puts loop devices on its files (`replctl bench` as root). Only then
/// are they looked for: `losetup -a` opens every loop device, and a device open at the
/// moment a concurrent run detaches it is detached only later.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loops {
    Maybe,
    Never,
}

impl Parent {
    fn new(test: &str) -> Parent {
        Parent::with(test, Loops::Maybe)
    }

    fn with(test: &str, loops: Loops) -> Parent {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("e2e-bench-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("test dir");
        Parent(path, loops)
    }

    fn loops_possible(&self) -> bool {
        self.1 == Loops::Maybe && is_root()
    }

    fn text(&self) -> &str {
        self.0.to_str().expect("UTF-8 test path")
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        // Anything a failed run left: loop devices backed by its files, then the files.
        if self.loops_possible() {
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
        let loops = if parent.loops_possible() {
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

/// The report of a run that must have succeeded: stdout is one JSON document and nothing
/// else. Shows the run's stderr and how long it took.
fn json_report(what: &str, output: &std::process::Output, started: Instant) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stderr}",
        output.status
    );
    eprintln!("{what} took {:?}:\n{stderr}", started.elapsed());
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
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
    let report = json_report("replctl bench", &output, started);

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
    let child = Command::new(REPLCTL)
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
    let stderr = interrupt_when(child, "replctl bench", || {
        let daemons = processes_naming(&parent.0)
            .into_iter()
            .filter(|command| command.contains("replicad"))
            .count();
        daemons > 0 && (!is_root() || !loop_devices_under(&parent.0).is_empty())
    });
    assert!(stderr.contains("SIGINT"), "stderr:\n{stderr}");
    assert_nothing_left(&parent);
}

/// Waits (bounded) until `ready` holds, then sends SIGINT to `child` and waits (bounded)
/// for it to exit with status 130; its stderr.
fn interrupt_when(mut child: std::process::Child, what: &str, ready: impl Fn() -> bool) -> String {
    let waited = Instant::now();
    while !ready() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("{what} ended ({status}) before the moment to interrupt it");
        }
        if waited.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("{what}: the moment to interrupt it did not come within 90s");
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
            panic!("{what} did not exit within 45s of SIGINT");
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
        "{what}: exit status after SIGINT: {status}\n{stderr}"
    );
    stderr
}

// ---------------------------------------------------------------------------------
// benches/peers.sh
// ---------------------------------------------------------------------------------

/// `benches/peers.sh` of this checkout, with the freshly built replctl and `args`
/// (separated by spaces).
fn peers(parent: &Parent, args: &str) -> Command {
    for (tool, package) in [
        ("fio", "fio"),
        ("nbdkit", "nbdkit"),
        ("nbdinfo", "libnbd-bin"),
        ("qemu-storage-daemon", "qemu-utils"),
        ("python3", "python3"),
        ("setpriv", "util-linux"),
    ] {
        require_tool(tool, package);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/peers.sh");
    let mut command = Command::new(script);
    command
        .args(["--replctl", REPLCTL, "--dir", parent.text()])
        .args(args.split_whitespace());
    command
}

/// Runs peers.sh to the end; its JSON report.
fn peers_json(parent: &Parent, args: &str) -> serde_json::Value {
    let started = Instant::now();
    let output = run_with_timeout(&mut peers(parent, args), Duration::from_secs(150));
    json_report(&format!("peers.sh {args}"), &output, started)
}

/// A positive figure of `target`/`workload` in a peers.sh report.
fn figure(report: &serde_json::Value, target: &str, workload: &str, name: &str) -> f64 {
    let what = format!("{target} / {workload} / {name}");
    let value = number(&report["figures"][target][workload][name], &what);
    assert!(value.is_finite() && value > 0.0, "{what}: {value}");
    value
}

/// A positive ratio of `ours` against `baseline` in a peers.sh report.
fn ratio(report: &serde_json::Value, ours: &str, baseline: &str, key: &str) -> f64 {
    let what = format!("{ours} against {baseline}: {key}");
    let value = number(&report["ratios"][ours][baseline][key], &what);
    assert!(value.is_finite() && value > 0.0, "{what}: {value}");
    value
}

#[test]
fn peers_json_has_a_figure_and_a_ratio_for_each_target() {
    let parent = Parent::with("peers", Loops::Never);
    let report = peers_json(
        &parent,
        "--size 64M --runtime 1 --repeat 1 --targets nbdkit,ours,ours-pair \
         --workloads rw4k_qd32 --json",
    );
    for target in ["nbdkit", "ours", "ours-pair"] {
        for name in ["iops", "mib_s", "mean_us", "p50_us", "p99_us"] {
            figure(&report, target, "rw4k_qd32", name);
        }
        let samples = &report["figures"][target]["rw4k_qd32"]["samples"]["iops"];
        assert_eq!(samples.as_array().map(Vec::len), Some(1), "{samples}");
        let note = report["notes"][target].as_str().unwrap_or_default();
        assert!(!note.is_empty(), "no note says what {target} promises");
    }
    for ours in ["ours", "ours-pair"] {
        ratio(&report, ours, "nbdkit", "rw4k_qd32_iops");
    }
    assert!(
        report["notes"]["nbdkit"]
            .as_str()
            .is_some_and(|note| note.contains("page cache") && note.contains("not a like-for-like")),
        "the nbdkit row must say it is not a durable peer: {}",
        report["notes"]["nbdkit"]
    );
    assert_eq!(report["size_bytes"], 64 << 20);
    assert!(
        report["command"]
            .as_str()
            .is_some_and(|c| c.contains("--targets nbdkit,ours,ours-pair")),
        "the report names its command: {}",
        report["command"]
    );
    assert!(
        report["commit"].as_str().is_some_and(|c| !c.is_empty()),
        "the report names its commit"
    );
    assert_nothing_left(&parent);
}

/// The names of the fio outputs in `work`'s `fio` directory, in the order fio wrote them.
fn fio_outputs_in_order(work: &Path) -> Vec<String> {
    let mut outputs: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(work.join("fio"))
        .expect("fio outputs kept")
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".json"))
        .map(|entry| {
            let written = entry.metadata().and_then(|m| m.modified()).expect("mtime");
            (written, entry.file_name().to_string_lossy().into_owned())
        })
        .collect();
    outputs.sort();
    outputs.into_iter().map(|(_, name)| name).collect()
}

/// Two rounds over the raw device, QEMU's mirror and a pair, with the latency and flush
/// workloads: medians of two samples, rounds interleaved (round 1 of every target before
/// round 2 of any), the mirror set up, checked and torn down twice. (qemu-nbd runs
/// as the mirror's replica with the options of its own row.)
#[test]
fn peers_rounds_interleave_over_raw_mirror_and_pair() {
    let parent = Parent::with("peers-rounds", Loops::Never);
    let targets = ["raw", "mirror", "ours-pair"];
    let workloads = ["rw4k_qd1", "rw4k_flush32"];
    let report = peers_json(
        &parent,
        &format!(
            "--size 64M --runtime 1 --ramp 0 --repeat 2 --targets {} --workloads {} \
             --json --keep",
            targets.join(","),
            workloads.join(",")
        ),
    );
    // --keep: the work directory and fio's outputs stay.
    let work: Vec<PathBuf> = std::fs::read_dir(&parent.0)
        .expect("parent dir")
        .flatten()
        .map(|entry| entry.path())
        .collect();
    assert_eq!(work.len(), 1, "one work directory kept: {work:?}");
    let expected: Vec<String> = (1..=2)
        .flat_map(|round| {
            targets.iter().flat_map(move |target| {
                workloads.map(|workload| format!("{round}-{target}-{workload}.json"))
            })
        })
        .collect();
    assert_eq!(
        fio_outputs_in_order(&work[0]),
        expected,
        "each round goes over every target in turn"
    );
    std::fs::remove_dir_all(&work[0]).expect("remove the kept work directory");

    for target in targets {
        figure(&report, target, "rw4k_qd1", "p50_us");
        figure(&report, target, "rw4k_qd1", "p99_us");
        figure(&report, target, "rw4k_flush32", "iops");
        figure(&report, target, "rw4k_flush32", "flushes");
        let cell = &report["figures"][target]["rw4k_qd1"];
        let samples: Vec<f64> = cell["samples"]["p50_us"]
            .as_array()
            .expect("samples")
            .iter()
            .map(|v| number(v, "sample"))
            .collect();
        assert_eq!(samples.len(), 2, "{target}: one sample per round");
        let median = number(&cell["p50_us"], "median");
        assert!(
            (median - (samples[0] + samples[1]) / 2.0).abs() < 1e-6,
            "{target}: the median of two samples is their mean: {median} vs {samples:?}"
        );
    }
    for baseline in ["mirror", "raw"] {
        for key in ["rw4k_qd1_p50_us", "rw4k_qd1_p99_us", "rw4k_flush32_iops"] {
            ratio(&report, "ours-pair", baseline, key);
        }
    }
    assert!(
        report["ratios"]["ours"].is_null(),
        "no ours row, no ours ratios"
    );
    assert_nothing_left(&parent);
}

#[test]
fn peers_cleans_up_on_sigint() {
    let parent = Parent::with("peers-sigint", Loops::Never);
    let child = peers(
        &parent,
        "--size 64M --runtime 60 --targets mirror --workloads rw4k_qd32",
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start peers.sh");
    // Interrupt it while fio runs against the mirror: both QEMU processes and fio up.
    let stderr = interrupt_when(child, "peers.sh", || {
        let running = processes_naming(&parent.0);
        running
            .iter()
            .any(|p| p.contains("fio --name=mirror-rw4k_qd32"))
            && running.iter().any(|p| p.contains("qemu-storage-daemon"))
    });
    assert!(stderr.contains("interrupted"), "stderr:\n{stderr}");
    assert_nothing_left(&parent);
}
