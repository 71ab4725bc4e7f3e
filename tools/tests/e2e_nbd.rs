//! Issue 3 end to end on one node: a real `replicad` serves `r0` over NBD to real
//! clients (nbdinfo, qemu-io, qemu-img, nbdcopy, fio, ext4 through nbdfuse and a loop
//! device, the write-verify checker), and keeps what it acknowledged across a clean
//! restart and a `kill -9` (P1 on one node, multi-conn flushes).
//!
//! A `kill -9` loses what the daemon holds in its own memory, not what it handed to the
//! kernel: these tests prove that acknowledged data had left the daemon, and check the
//! counters that show a FLUSH reached the journal's fdatasync. Losing the page cache
//! (power loss) is out of their reach.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// nbdinfo
// ---------------------------------------------------------------------------------------

#[test]
fn nbdinfo_reports_export_r0_with_the_size_status_reports() {
    require_tool("nbdinfo", "libnbd-bin");
    let cluster = single_node("nbdinfo", ClusterOptions::default());
    let output = run_ok(
        Command::new("nbdinfo")
            .arg("--json")
            .arg(cluster.uri("alpha")),
        TOOL_TIMEOUT,
    );
    let info: serde_json::Value = serde_json::from_str(&output)
        .unwrap_or_else(|e| panic!("nbdinfo --json printed no JSON ({e}):\n{output}"));
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "r0", "{output}");

    // The size `replctl status --json` reports, from the CLI a user would run.
    let status: serde_json::Value =
        serde_json::from_str(&cluster.replctl_ok("alpha", &["status", RESOURCE, "--json"]))
            .expect("status --json is JSON");
    let size_bytes = status[0]["size_bytes"].as_u64().expect("size_bytes");
    assert!(size_bytes > 0 && size_bytes < ClusterOptions::default().image_bytes);
    assert_eq!(export["export-size"].as_u64(), Some(size_bytes), "{output}");
    assert_eq!(
        export["is_read_only"], false,
        "a Primary is writable: {output}"
    );
    assert_eq!(export["can_multi_conn"], true, "{output}");
    assert_eq!(export["can_flush"], true, "{output}");
    assert_eq!(export["can_fua"], true, "{output}");
}

// ---------------------------------------------------------------------------------------
// qemu-io
// ---------------------------------------------------------------------------------------

/// Runs `qemu-io -f raw URI -c …` and fails on any failed command (qemu-io reports some
/// failures, e.g. a pattern mismatch, only in its output).
fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut command = Command::new("qemu-io");
    command.arg("-f").arg("raw").arg(uri);
    for c in commands {
        command.arg("-c").arg(c);
    }
    let output = run_ok(&mut command, TOOL_TIMEOUT);
    for line in output.lines() {
        assert!(
            !line.contains("failed") && !line.contains("error"),
            "qemu-io {commands:?}: {line}\n{output}"
        );
    }
    output
}

fn qemu_io_round_trips(test: &str, unix_nbd: bool) {
    require_tool("qemu-io", "qemu-utils");
    let options = ClusterOptions {
        unix_nbd,
        ..ClusterOptions::default()
    };
    let cluster = single_node(test, options);
    let uri = cluster.uri("alpha");
    let size = cluster.status("alpha").size_bytes;
    // (offset, length, FUA): block-aligned, sub-block, straddling blocks, odd sizes,
    // the last byte of the export, a large write.
    // The ranges do not overlap, so each keeps its own pattern.
    let cases: [(u64, u64, bool); 10] = [
        (0, 4096, false),
        (8192, 4096, true),
        (16_385, 1, false),
        (20_479, 2, true),
        (45_113, 54_321, false),
        (MIB - 512, 1024, true),
        (3 * MIB + 7, 3 * 4096 + 5, false),
        (5 * MIB + 100, 100, true),
        (size - 1, 1, false),
        (8 * MIB, 4 * MIB, true),
    ];
    let write = |pattern: usize| -> Vec<String> {
        cases
            .iter()
            .enumerate()
            .map(|(index, &(offset, length, fua))| {
                let fua = if fua { " -f" } else { "" };
                format!(
                    "write{fua} -P {} {offset} {length}",
                    (pattern + index) % 250 + 1
                )
            })
            .collect()
    };
    let read = |pattern: usize| -> Vec<String> {
        cases
            .iter()
            .enumerate()
            .map(|(index, &(offset, length, _))| {
                format!("read -P {} {offset} {length}", (pattern + index) % 250 + 1)
            })
            .collect()
    };
    // Written by one process, read back by another: the data is on the server.
    qemu_io(&uri, &write(0));
    qemu_io(&uri, &read(0));
    // Overwrites, then bytes around the writes are untouched (still zero).
    qemu_io(&uri, &write(100));
    qemu_io(&uri, &read(100));
    qemu_io(
        &uri,
        &[
            "read -P 0 4096 4096".to_string(),
            "read -P 0 16384 1".to_string(),
            "read -P 0 16386 4093".to_string(),
            "read -P 0 20481 24632".to_string(),
            format!("read -P 0 {} {}", 12 * MIB, MIB),
        ],
    );
    // The checks above would catch a wrong pattern: qemu-io does report one.
    let mut wrong = Command::new("qemu-io");
    wrong.args(["-f", "raw", &uri, "-c", "read -P 77 0 4096"]);
    let output = run_with_timeout(&mut wrong, TOOL_TIMEOUT);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success() || text.contains("failed"),
        "qemu-io accepted a wrong pattern: {text}"
    );
    cluster.assert_no_panic_logged("alpha");
}

#[test]
fn qemu_io_reads_back_aligned_unaligned_and_fua_writes_over_tcp() {
    qemu_io_round_trips("qemu-io-tcp", false);
}

#[test]
fn qemu_io_reads_back_aligned_unaligned_and_fua_writes_over_a_unix_socket() {
    qemu_io_round_trips("qemu-io-unix", true);
}

// ---------------------------------------------------------------------------------------
// qemu-img convert and nbdcopy
// ---------------------------------------------------------------------------------------

fn write_random_file(path: &Path, seed: u64, length: u64) {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut rng = engine::rng::SplitMix64::new(seed);
    let mut chunk = vec![0u8; MIB as usize];
    for _ in 0..length / MIB {
        rng.fill(&mut chunk);
        file.write_all(&chunk).expect("write random data");
    }
    file.flush().expect("flush");
}

/// `cmp -n BYTES a b` must find them identical.
fn assert_same_prefix(a: &Path, b: &Path, bytes: u64) {
    let output = run_with_timeout(
        Command::new("cmp")
            .arg("-n")
            .arg(bytes.to_string())
            .arg(a)
            .arg(b),
        TOOL_TIMEOUT,
    );
    assert!(
        output.status.success(),
        "{} and {} differ in their first {bytes} bytes: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn qemu_img_and_nbdcopy_copy_256_mib_in_and_out_unchanged() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("nbdcopy", "libnbd-bin");
    require_tool("cmp", "diffutils");
    let options = ClusterOptions {
        image_bytes: 512 * MIB,
        journal: "64M",
        ..ClusterOptions::default()
    };
    let cluster = single_node("copy", options);
    let uri = cluster.uri("alpha");
    let size = cluster.status("alpha").size_bytes;
    let data_bytes = 256 * MIB;
    assert!(size >= data_bytes, "export of {size} bytes is too small");
    let copy_out_checked = |source: &Path, out: &Path| {
        let length = std::fs::metadata(out).expect("copied-out image").len();
        assert_eq!(length, size, "the copy out holds the whole export");
        assert_same_prefix(source, out, data_bytes);
        std::fs::remove_file(out).expect("remove copy");
    };

    // In with qemu-img, out with nbdcopy (which opens several connections: multi-conn).
    let source = cluster.dir.join("source-a.img");
    write_random_file(&source, 0xA, data_bytes);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&source)
            .arg(&uri),
        TOOL_TIMEOUT,
    );
    let out = cluster.dir.join("out-a.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out), TOOL_TIMEOUT);
    copy_out_checked(&source, &out);

    // Other data in with nbdcopy, out with qemu-img.
    let source_b = cluster.dir.join("source-b.img");
    write_random_file(&source_b, 0xB, data_bytes);
    run_ok(
        Command::new("nbdcopy").arg(&source_b).arg(&uri),
        TOOL_TIMEOUT,
    );
    let out = cluster.dir.join("out-b.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&out),
        TOOL_TIMEOUT,
    );
    copy_out_checked(&source_b, &out);
    cluster.assert_no_panic_logged("alpha");
}

// ---------------------------------------------------------------------------------------
// fio
// ---------------------------------------------------------------------------------------

#[test]
fn fio_nbd_random_writes_verify_with_crc32c() {
    require_tool("fio", "fio");
    let cluster = single_node("fio", ClusterOptions::default());
    let output = run_ok(
        Command::new("fio")
            .current_dir(&cluster.dir)
            .arg("--name=replicad")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", cluster.uri("alpha")))
            .args([
                "--rw=randwrite",
                "--bsrange=4k-64k",
                "--size=64m",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--exitall_on_error=1",
            ]),
        TOOL_TIMEOUT,
    );
    assert!(
        output.contains("err= 0"),
        "fio reported an error:\n{output}"
    );
    let status = cluster.status("alpha");
    assert!(
        status.io.write_bytes >= 64 * MIB,
        "fio's writes did not reach the volume: {:?}",
        status.io
    );
    assert!(
        status.io.read_bytes >= 64 * MIB,
        "fio did not verify: {:?}",
        status.io
    );
    cluster.assert_no_panic_logged("alpha");
}

// ---------------------------------------------------------------------------------------
// ext4 on nbdfuse + loop device
// ---------------------------------------------------------------------------------------

/// The export as a block device: nbdfuse, a loop device on its file and, when mounted,
/// the file system. Fields drop in declaration order, so teardown always goes umount,
/// `losetup -d`, fusermount, even when a test fails half-way.
struct Ext4Stack {
    mount: Option<Mount>,
    device: LoopDevice,
    _leftovers: LoopLeftovers,
    _fuse: NbdFuse,
    mount_dir: std::path::PathBuf,
}

impl Ext4Stack {
    fn open(cluster: &Cluster) -> Ext4Stack {
        let fuse = NbdFuse::mount(&cluster.dir.join("fuse"), &cluster.uri("alpha"));
        let leftovers = LoopLeftovers(fuse.file());
        // losetup makes the file durable first; had FLUSH hung, it would wait in
        // uninterruptible sleep, out of reach of every timeout. Check with one that has.
        let mut probe = RawNbd::open(cluster.node("alpha").nbd_port, RESOURCE);
        assert_eq!(probe.flush(), 0, "FLUSH failed");
        let device = LoopDevice::attach(&fuse.file());
        Ext4Stack {
            mount: None,
            device,
            _leftovers: leftovers,
            _fuse: fuse,
            mount_dir: cluster.dir.join("mnt"),
        }
    }

    fn mount(&mut self) -> &Path {
        self.mount = Some(Mount::new(&self.device.path, &self.mount_dir));
        &self.mount_dir
    }

    /// Syncs the file system and unmounts it.
    fn unmount(&mut self) {
        run_ok(
            Command::new("sync").arg("-f").arg(&self.mount_dir),
            TOOL_TIMEOUT,
        );
        let mount = self.mount.take().expect("mounted");
        run_ok(Command::new("umount").arg(&mount.dir), TOOL_TIMEOUT);
        std::mem::forget(mount);
    }

    /// `fsck.ext4 -n -f` must find the unmounted file system clean.
    fn assert_fsck_clean(&self) {
        let output = run_with_timeout(
            Command::new("fsck.ext4")
                .arg("-n")
                .arg("-f")
                .arg(&self.device.path),
            TOOL_TIMEOUT,
        );
        assert!(
            output.status.success(),
            "fsck.ext4 -n found problems ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Writes `count` files of various sizes (empty to 1 MiB, most small) under
/// `root/tree/batch-SEED`, in nested directories.
fn write_tree(root: &Path, seed: u64, count: usize) {
    let mut rng = engine::rng::SplitMix64::new(seed);
    let base = root.join("tree").join(format!("batch-{seed}"));
    for index in 0..count {
        let dir = base
            .join(format!("d{}", index % 7))
            .join(format!("e{}", index % 3));
        std::fs::create_dir_all(&dir).expect("create directory");
        let length = match rng.below(10) {
            0 => 0,
            1..=5 => rng.below(4096),
            6..=8 => rng.below(128 * 1024),
            _ => rng.below(MIB) + 1,
        };
        let mut data = vec![0u8; length as usize];
        rng.fill(&mut data);
        std::fs::write(dir.join(format!("f{index}.bin")), data).expect("write file");
    }
}

/// `sha256sum` of every file under `root/tree`, sorted by path.
fn manifest(root: &Path) -> String {
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && find tree -type f -print0 | sort -z | xargs -0 sha256sum")
            .arg("sh")
            .arg(root),
        TOOL_TIMEOUT,
    )
}

#[test]
fn ext4_files_and_fsck_survive_a_clean_restart_and_a_kill9() {
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("fsck.ext4", "e2fsprogs");
    require_tool("losetup", "mount");
    require_tool("fusermount3", "fuse3");
    require_tool("sha256sum", "coreutils");
    assert!(is_root(), "loop devices and mounts need root");
    let mut cluster = single_node("ext4", ClusterOptions::default());

    let mut stack = Ext4Stack::open(&cluster);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&stack.device.path),
        TOOL_TIMEOUT,
    );
    let root = stack.mount().to_path_buf();
    write_tree(&root, 1, 300);
    let mut expected = manifest(&root);
    assert_eq!(expected.lines().count(), 300);
    stack.unmount();
    stack.assert_fsck_clean();
    drop(stack);

    for (round, how) in [Restart::Clean, Restart::Kill9].into_iter().enumerate() {
        let status = cluster.restart_primary("alpha", how);
        eprintln!("after {how:?}: recovery {:?}", status.recovery);
        let mut stack = Ext4Stack::open(&cluster);
        stack.assert_fsck_clean();
        let root = stack.mount().to_path_buf();
        assert_eq!(
            manifest(&root),
            expected,
            "files changed across a {how:?} restart"
        );
        // New files and rewrites for the next restart to keep.
        write_tree(&root, 1, 50);
        write_tree(&root, 2 + round as u64, 100);
        expected = manifest(&root);
        stack.unmount();
        stack.assert_fsck_clean();
    }
    cluster.assert_no_panic_logged("alpha");
}

#[test]
fn flush_before_any_write_completes_after_start_and_after_restarts() {
    let mut cluster = single_node("flush-first", ClusterOptions::default());
    let port = cluster.node("alpha").nbd_port;
    // RawNbd's reads time out: a FLUSH that never completes fails here, not hangs.
    assert_eq!(RawNbd::open(port, RESOURCE).flush(), 0, "FLUSH after start");
    let mut client = RawNbd::open(port, RESOURCE);
    assert_eq!(client.write(0, &pattern_bytes(1, 4096), false), 0);
    assert_eq!(client.flush(), 0);
    drop(client);
    for how in [Restart::Clean, Restart::Kill9] {
        cluster.restart_primary("alpha", how);
        let mut client = RawNbd::open(port, RESOURCE);
        assert_eq!(client.flush(), 0, "FLUSH first after a {how:?} restart");
        assert_eq!(client.read(0, 4096), Ok(pattern_bytes(1, 4096)));
        assert_eq!(client.flush(), 0, "FLUSH after a read");
        assert_eq!(client.write(0, &pattern_bytes(1, 4096), true), 0);
        assert_eq!(client.flush(), 0, "FLUSH after a write");
    }
}

// ---------------------------------------------------------------------------------------
// P1 on one node
// ---------------------------------------------------------------------------------------

/// A number from the checker's summary line, e.g. `field("flushes issued 9, acked", …)`.
fn summary_number(summary: &str, after: &str) -> u64 {
    let start = summary
        .find(after)
        .unwrap_or_else(|| panic!("no {after:?} in {summary:?}"))
        + after.len();
    summary[start..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no number after {after:?} in {summary:?}"))
}

/// The flushes a checker run saw acknowledged.
fn flushes_acked(summary: &str) -> u64 {
    let flushes = summary
        .find("flushes issued")
        .unwrap_or_else(|| panic!("no flush count in {summary:?}"));
    summary_number(&summary[flushes..], ", acked")
}

fn checker_ok(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "replcheck write failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn p1_kill9_mid_write_keeps_every_write_acknowledged_before_a_flush() {
    let options = ClusterOptions {
        image_bytes: 128 * MIB,
        ..ClusterOptions::default()
    };
    let mut cluster = single_node("p1-kill9", options);
    let uri = cluster.uri("alpha");

    // A run that completes: every FLUSH the checker saw acknowledged went through the
    // volume's flush and the journal's fdatasync.
    let (finished_log, output) = checker_write(
        &cluster.dir,
        &uri,
        &[
            "--qd",
            "16",
            "--writes",
            "3000",
            "--flush-every",
            "8",
            "--blocks",
            "0..10000",
        ],
    );
    let summary = checker_ok(&output);
    let finished_flushes = flushes_acked(&summary);
    assert!(finished_flushes > 300, "too few flushes: {summary}");
    let io = cluster.status("alpha").io;
    assert!(
        io.flushes >= finished_flushes && io.journal_syncs > 0,
        "acknowledged FLUSHes did not reach the journal's fdatasync: {finished_flushes} flushes acked, {io:?}"
    );

    // A run killed in the middle, with writes and flushes in flight.
    let writes_before = io.writes;
    let dir = cluster.dir.clone();
    let writer = std::thread::spawn(move || {
        checker_write(
            &dir,
            &uri,
            &[
                "--qd",
                "32",
                "--seconds",
                "60",
                "--flush-every",
                "8",
                "--blocks",
                "10000..20000",
            ],
        )
    });
    cluster.wait_status(
        "alpha",
        "busy with the second run",
        Duration::from_secs(60),
        |s| s.io.writes >= writes_before + 2000,
    );
    cluster.kill9("alpha");
    let (killed_log, output) = writer.join().expect("checker thread");
    let summary = checker_ok(&output);
    assert!(
        summary_number(&summary, ", acked") > 0 && flushes_acked(&summary) > 0,
        "nothing of the killed run was acknowledged: {summary}"
    );

    let status = cluster.restart_primary("alpha", Restart::Kill9);
    let recovery = status.recovery.clone().unwrap_or_default();
    assert!(
        recovery.starts_with("crash recovery replayed"),
        "the engine did not run crash recovery after kill -9: {recovery:?}"
    );
    let uri = cluster.uri("alpha");
    for log in [&finished_log, &killed_log] {
        let (passed, report) = checker_verify(&uri, log, "durable,acked");
        assert!(
            passed,
            "writes lost across kill -9 ({recovery}):\n{report}\n{}",
            cluster.log_tail("alpha")
        );
    }
    eprintln!("p1 on one node: {recovery}");
    cluster.assert_no_panic_logged("alpha");
}

// ---------------------------------------------------------------------------------------
// Multi-conn
// ---------------------------------------------------------------------------------------

#[test]
fn multi_conn_flush_on_one_connection_keeps_another_connections_writes_across_kill9() {
    use replicad::nbd::proto;
    let mut cluster = single_node("multi-conn", ClusterOptions::default());
    let port = cluster.node("alpha").nbd_port;
    let mut writer = RawNbd::open(port, RESOURCE);
    let mut flusher = RawNbd::open(port, RESOURCE);
    for client in [&writer, &flusher] {
        assert_ne!(
            client.transmission_flags & proto::FLAG_CAN_MULTI_CONN,
            0,
            "the export does not advertise NBD_FLAG_CAN_MULTI_CONN"
        );
    }
    let syncs_before = cluster.status("alpha").io.journal_syncs;

    // Connection A: writes of various sizes, none with FUA, all acknowledged.
    let mut rng = engine::rng::SplitMix64::new(0x3C);
    // Disjoint, unaligned ranges of 512 bytes to 32 KiB, 256 KiB apart.
    let writes: Vec<(u64, Vec<u8>)> = (0..64u64)
        .map(|index| {
            let length = 512 * (1 + rng.below(64)) as usize;
            let offset = index * 256 * 1024 + rng.below(128 * 1024);
            (offset, pattern_bytes(index + 1, length))
        })
        .collect();
    assert!(writes
        .iter()
        .all(|(offset, data)| offset + data.len() as u64 <= writer.size_bytes));
    for (offset, data) in &writes {
        assert_eq!(writer.write(*offset, data, false), 0, "write at {offset}");
    }
    // Connection B: one FLUSH, which must cover A's completed writes.
    assert_eq!(flusher.flush(), 0, "flush on the second connection");
    let syncs_after = cluster.status("alpha").io.journal_syncs;
    assert!(
        syncs_after > syncs_before,
        "A's writes were never made durable: journal syncs {syncs_before} -> {syncs_after}"
    );

    // Killed while both connections are open.
    cluster.restart_primary("alpha", Restart::Kill9);
    drop((writer, flusher));
    let mut reader = RawNbd::open(port, RESOURCE);
    for (offset, data) in &writes {
        let read = reader
            .read(*offset, data.len() as u32)
            .unwrap_or_else(|e| panic!("read at {offset}: NBD error {e}"));
        assert!(
            &read == data,
            "connection A's write at {offset} ({} bytes) is gone after kill -9",
            data.len()
        );
    }
    cluster.assert_no_panic_logged("alpha");
}

// ---------------------------------------------------------------------------------------
// TRIM and WRITE_ZEROES longer than the maximum payload (32 MiB)
// ---------------------------------------------------------------------------------------

/// The maximum payload size the server advertises; TRIM and WRITE_ZEROES carry no
/// payload, so the NBD specification lets clients send longer ones.
const MAX_PAYLOAD: u64 = 32 * MIB;

/// The ranges cleared below: 33 MiB and 100 MiB at unaligned-to-a-MiB offsets, and the
/// whole export.
fn large_ranges(size: u64) -> [(u64, u64); 3] {
    [
        (5 * MIB + 8192, 33 * MIB),
        (60 * MIB + 4096, 100 * MIB),
        (0, size),
    ]
}

/// Writes 1 MiB of `pattern` just before `offset`, at the start, middle and end of the
/// range, and just after it (where the export has room): data that the operation must
/// clear inside the range and leave alone outside it.
fn fill_around(uri: &str, offset: u64, length: u64, size: u64, pattern: u8) {
    let end = offset + length;
    let mut commands = vec![
        format!("write -P {pattern} {offset} {MIB}"),
        format!("write -P {pattern} {} {MIB}", offset + length / 2),
        format!("write -P {pattern} {} {MIB}", end - MIB),
    ];
    if offset >= MIB {
        commands.push(format!("write -P {pattern} {} {MIB}", offset - MIB));
    }
    if end + MIB <= size {
        commands.push(format!("write -P {pattern} {end} {MIB}"));
    }
    qemu_io(uri, &commands);
}

/// The range reads back as zeroes and the MiB on either side still holds `pattern`.
fn assert_cleared(uri: &str, offset: u64, length: u64, size: u64, pattern: u8, what: &str) {
    let end = offset + length;
    let mut commands = vec![format!("read -P 0 {offset} {length}")];
    if offset >= MIB {
        commands.push(format!("read -P {pattern} {} {MIB}", offset - MIB));
    }
    if end + MIB <= size {
        commands.push(format!("read -P {pattern} {end} {MIB}"));
    }
    let mut qemu = Command::new("qemu-io");
    qemu.args(["-f", "raw", "-r", uri]);
    for command in &commands {
        qemu.arg("-c").arg(command);
    }
    let output = run_ok(&mut qemu, TOOL_TIMEOUT);
    assert!(
        !output.contains("failed") && !output.contains("error"),
        "{what}: {commands:?}:\n{output}"
    );
}

/// How many NBD write requests (writes, trims, write-zeroes) the node has taken.
fn write_requests(cluster: &Cluster) -> u64 {
    cluster.status("alpha").io.writes
}

/// Clears every range of [`large_ranges`] with `clear(offset, length)` and checks the
/// result; returns each range's length and the NBD requests it took.
fn clear_large_ranges(
    cluster: &Cluster,
    what: &str,
    clear: impl Fn(u64, u64) -> String,
) -> Vec<(u64, u64)> {
    let uri = cluster.uri("alpha");
    let size = cluster.status("alpha").size_bytes;
    let mut requests = Vec::new();
    for (index, (offset, length)) in large_ranges(size).into_iter().enumerate() {
        let pattern = 0x31 + index as u8;
        fill_around(&uri, offset, length, size, pattern);
        let before = write_requests(cluster);
        let output = clear(offset, length);
        requests.push((length, write_requests(cluster) - before));
        assert_cleared(
            &uri,
            offset,
            length,
            size,
            pattern,
            &format!("{what} of {length} bytes at {offset}: {output}"),
        );
    }
    cluster.assert_no_panic_logged("alpha");
    requests
}

#[test]
fn qemu_io_discard_and_write_zeroes_of_33_mib_100_mib_and_the_whole_export() {
    require_tool("qemu-io", "qemu-utils");
    let cluster = single_node("large-zero-qemu", ClusterOptions::default());
    let uri = cluster.uri("alpha");
    for (what, command) in [("discard", "discard"), ("write -z", "write -z")] {
        let requests = clear_large_ranges(&cluster, what, |offset, length| {
            qemu_io(&uri, &[format!("{command} {offset} {length}")])
        });
        eprintln!("qemu-io {what}: (bytes, NBD requests) {requests:?}");
        if what == "discard" {
            // qemu sends a discard as one request (it splits only write-zeroes at the
            // advertised maximum): each range crossed as one TRIM above 32 MiB.
            assert!(
                requests.iter().all(|&(_, count)| count == 1),
                "{requests:?}"
            );
        }
    }
}

#[test]
fn nbdfuse_punch_hole_and_zero_range_of_33_mib_100_mib_and_the_whole_export() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("fallocate", "util-linux");
    require_tool("fusermount3", "fuse3");
    assert!(is_root(), "FUSE mounts need root");
    let cluster = single_node("large-zero-libnbd", ClusterOptions::default());
    // libnbd turns fallocate on the FUSE file into one NBD_CMD_TRIM (punch hole) or
    // NBD_CMD_WRITE_ZEROES (zero range) of the whole length.
    let fuse = NbdFuse::mount(&cluster.dir.join("fuse"), &cluster.uri("alpha"));
    let file = fuse.file();
    for (what, mode) in [
        ("punch-hole", "--punch-hole"),
        ("zero-range", "--zero-range"),
    ] {
        let requests = clear_large_ranges(&cluster, what, |offset, length| {
            run_ok(
                Command::new("fallocate")
                    .arg(mode)
                    .arg("--offset")
                    .arg(offset.to_string())
                    .arg("--length")
                    .arg(length.to_string())
                    .arg(&file),
                TOOL_TIMEOUT,
            )
        });
        eprintln!("nbdfuse {what}: (bytes, NBD requests) {requests:?}");
        for (length, count) in requests {
            assert!(
                count < length.div_ceil(MAX_PAYLOAD),
                "{what}: {count} requests for {length} bytes: none above 32 MiB"
            );
        }
    }
    drop(fuse);
}

#[test]
fn mkfs_ext4_discards_the_whole_export_through_nbdfuse() {
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("fsck.ext4", "e2fsprogs");
    require_tool("fusermount3", "fuse3");
    assert!(is_root(), "FUSE mounts need root");
    let cluster = single_node("mkfs-discard", ClusterOptions::default());
    qemu_io(
        &cluster.uri("alpha"),
        &[format!("write -P 7 0 {}", 4 * MIB)],
    );
    let fuse = NbdFuse::mount(&cluster.dir.join("fuse"), &cluster.uri("alpha"));
    let output = run_with_timeout(
        Command::new("mkfs.ext4").arg("-F").arg(fuse.file()),
        TOOL_TIMEOUT,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "mkfs.ext4 failed:\n{text}");
    // mke2fs discards the whole file first (one punch hole: one large TRIM).
    assert!(
        text.contains("Discarding device blocks") && !text.contains("failed"),
        "mkfs.ext4 did not discard cleanly:\n{text}"
    );
    run_ok(
        Command::new("fsck.ext4")
            .arg("-n")
            .arg("-f")
            .arg(fuse.file()),
        TOOL_TIMEOUT,
    );
    drop(fuse);
    cluster.assert_no_panic_logged("alpha");
}

#[test]
fn raw_trim_and_write_zeroes_above_32_mib_and_out_of_range() {
    use replicad::nbd::proto::{self, CMD_FLAG_FUA, CMD_TRIM, CMD_WRITE_ZEROES};
    let cluster = single_node("large-zero-raw", ClusterOptions::default());
    let mut client = RawNbd::open(cluster.node("alpha").nbd_port, RESOURCE);
    let size = client.size_bytes;
    let mark = |client: &mut RawNbd, offset: u64, seed: u64| {
        assert_eq!(client.write(offset, &pattern_bytes(seed, 4096), false), 0);
    };
    let assert_zero = |client: &mut RawNbd, offset: u64, what: &str| {
        let data = client.read(offset, 4096).expect("read");
        assert!(data.iter().all(|&b| b == 0), "{what}: not zero at {offset}");
    };
    // Exact request shapes a library might not send: FUA or not, unaligned ends for
    // WRITE_ZEROES, one request each.
    let cases: [(u16, u16, u64, u64); 5] = [
        (CMD_TRIM, 0, 4 * MIB, 33 * MIB),
        (
            CMD_WRITE_ZEROES,
            CMD_FLAG_FUA,
            40 * MIB + 512,
            100 * MIB + 1000,
        ),
        (CMD_TRIM, CMD_FLAG_FUA, 0, size),
        (CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE, 0, size),
        (CMD_WRITE_ZEROES, 0, size - 33 * MIB - 1, 33 * MIB + 1),
    ];
    for (command, flags, offset, length) in cases {
        let what = format!("command {command} flags {flags} {length} bytes at {offset}");
        let end = offset + length;
        // Whole blocks inside the range, and the blocks just outside it.
        let first_inside = offset.next_multiple_of(4096);
        let last_inside = end / 4096 * 4096 - 4096;
        mark(&mut client, first_inside, 1);
        mark(&mut client, last_inside, 2);
        if offset >= 4096 {
            mark(&mut client, offset / 4096 * 4096 - 4096, 3);
        }
        if end + 4096 <= size {
            mark(&mut client, end.next_multiple_of(4096), 4);
        }
        let writes_before = cluster.status("alpha").io.writes;
        assert_eq!(
            client.call(command, flags, offset, length as u32),
            0,
            "{what}"
        );
        assert_eq!(
            cluster.status("alpha").io.writes,
            writes_before + 1,
            "{what}"
        );
        assert_zero(&mut client, first_inside, &what);
        assert_zero(&mut client, last_inside, &what);
        if offset >= 4096 {
            let before = offset / 4096 * 4096 - 4096;
            assert_eq!(
                client.read(before, 4096),
                Ok(pattern_bytes(3, 4096)),
                "{what}"
            );
        }
        if end + 4096 <= size {
            let after = end.next_multiple_of(4096);
            assert_eq!(
                client.read(after, 4096),
                Ok(pattern_bytes(4, 4096)),
                "{what}"
            );
        }
        if command == CMD_WRITE_ZEROES {
            // The partial edge blocks too: every byte of the range is zero.
            let head = client
                .read(offset, (first_inside - offset) as u32 + 1)
                .expect("read");
            assert!(head.iter().all(|&b| b == 0), "{what}: head");
            let tail = client
                .read(end - 1 - (end % 4096), (end % 4096) as u32 + 1)
                .expect("read");
            assert!(tail.iter().all(|&b| b == 0), "{what}: tail");
        }
    }

    // Out of range, however long: TRIM gets EINVAL, WRITE_ZEROES ENOSPC (as writes),
    // ends that overflow 64 bits included; nothing changes.
    mark(&mut client, 0, 5);
    mark(&mut client, size - 4096, 6);
    let writes_before = cluster.status("alpha").io.writes;
    let beyond: [(u64, u32); 6] = [
        (0, (size + 4096) as u32),
        (size - 32 * MIB, 33 * MIB as u32),
        (size, 33 * MIB as u32),
        (4096, u32::MAX),
        (u64::MAX - 100 * MIB + 1, 100 * MIB as u32),
        (u64::MAX, u32::MAX),
    ];
    for (offset, length) in beyond {
        for (command, expected) in [
            (CMD_TRIM, proto::NBD_EINVAL),
            (CMD_WRITE_ZEROES, proto::NBD_ENOSPC),
        ] {
            assert_eq!(
                client.call(command, 0, offset, length),
                expected,
                "command {command}: {length} bytes at {offset}"
            );
        }
    }
    assert_eq!(client.read(0, 4096), Ok(pattern_bytes(5, 4096)));
    assert_eq!(client.read(size - 4096, 4096), Ok(pattern_bytes(6, 4096)));
    assert_eq!(
        cluster.status("alpha").io.writes,
        writes_before,
        "a refused request reached the volume"
    );
    cluster.assert_no_panic_logged("alpha");
}

#[test]
fn large_trim_and_write_zeroes_reach_the_secondary() {
    require_tool("qemu-io", "qemu-utils");
    let cluster = Cluster::pair(
        "large-zero-pair",
        ClusterOptions {
            image_bytes: 160 * MIB,
            ..small_options(false)
        },
    );
    let uri = cluster.uri("alpha");
    let size = cluster.status("alpha").size_bytes;
    assert!(size > 125 * MIB, "export too small: {size}");
    qemu_io(&uri, &[format!("write -P 9 0 {size}")]);
    // Apart from each other: one TRIM of 40 MiB, write-zeroes of 35 MiB (qemu splits
    // it), and through libnbd one WRITE_ZEROES of 40 MiB with unaligned ends.
    qemu_io(
        &uri,
        &[
            format!("discard {MIB} {}", 40 * MIB),
            format!("write -z {} {}", 45 * MIB, 35 * MIB),
        ],
    );
    let fuse = NbdFuse::mount(&cluster.dir.join("fuse"), &uri);
    run_ok(
        Command::new("fallocate")
            .arg("--zero-range")
            .arg("--offset")
            .arg((size - 40 * MIB - 1000).to_string())
            .arg("--length")
            .arg((40 * MIB).to_string())
            .arg(fuse.file()),
        TOOL_TIMEOUT,
    );
    drop(fuse);
    assert_cleared(&uri, MIB, 40 * MIB, size, 9, "discard on the pair");
    assert_cleared(&uri, 45 * MIB, 35 * MIB, size, 9, "write -z on the pair");
    assert_cleared(
        &uri,
        size - 40 * MIB - 1000,
        40 * MIB,
        size,
        9,
        "zero range on the pair",
    );
    cluster.assert_exports_identical("alpha", "beta");
    cluster.assert_verify_clean("alpha");
}
