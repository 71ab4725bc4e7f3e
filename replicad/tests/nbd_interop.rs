//! Interoperability of the NBD server with real clients: nbdinfo, qemu-io, qemu-img,
//! nbdcopy, fio, nbdfuse; with structured replies, metadata contexts (`nbdinfo --map`,
//! `qemu-img map`) and read-only exports.
//!
//! The server runs in-process on a memory export: these tests prove protocol
//! conformance, not the replicated volume behind it. Every client is a real process,
//! killed if the test ends early; every wait has a timeout. A missing tool fails its test
//! with the package to install.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use replicad::nbd::{self, ExportMap, MemoryExport, ServerConfig, ServerHandle};
use tokio::net::{TcpListener, UnixListener};
use tokio::process::Command;

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
const EXPORT_NAME: &str = "r0";
const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let seed = engine::rng::os_random_u64();
        let path = std::env::temp_dir().join(format!(
            "replicad-{label}-{}-{seed:016x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("create temporary directory");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One export served on a TCP port and on a unix socket.
struct Fixture {
    export: Arc<MemoryExport>,
    tcp_uri: String,
    unix_uri: String,
    servers: Vec<ServerHandle>,
    dir: TempDir,
}

impl Fixture {
    async fn start(export: MemoryExport) -> Fixture {
        let export = Arc::new(export);
        let exports = Arc::new(ExportMap::single(EXPORT_NAME, Arc::clone(&export)));
        let dir = TempDir::new("nbd-interop");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let port = tcp.local_addr().expect("local address").port();
        let socket = dir.path().join("nbd.sock");
        let unix = UnixListener::bind(&socket).expect("bind unix socket");
        let servers = vec![
            nbd::spawn(tcp, Arc::clone(&exports), ServerConfig::default()),
            nbd::spawn(unix, exports, ServerConfig::default()),
        ];
        Fixture {
            export,
            tcp_uri: format!("nbd://127.0.0.1:{port}/{EXPORT_NAME}"),
            unix_uri: format!("nbd+unix:///{EXPORT_NAME}?socket={}", socket.display()),
            servers,
            dir,
        }
    }

    /// Shuts both servers down; fails if they do not drain in time.
    async fn stop(self) {
        for server in self.servers {
            tokio::time::timeout(Duration::from_secs(30), server.shutdown())
                .await
                .expect("server shutdown timed out")
                .expect("server shutdown");
        }
    }
}

/// Runs a tool to completion and returns its output; fails on a missing tool, a timeout
/// or a non-zero exit. Tools run in the system's temporary directory, so that files they
/// leave behind (fio's verify state) stay out of the source tree.
async fn run(program: &str, args: &[&str]) -> Output {
    let child = Command::new(program)
        .args(args)
        .current_dir(std::env::temp_dir())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run {program}: {error}. The NBD interop tests need the Debian packages \
                 libnbd-bin, nbdkit, fio and qemu-utils"
            )
        });
    let output = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {TOOL_TIMEOUT:?}"))
        .expect("wait for tool");
    assert!(
        output.status.success(),
        "{program} {args:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    output
}

/// Runs qemu-io commands against `uri` and fails on any failed command or pattern
/// mismatch (qemu-io reports some failures only on its output).
async fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(uri);
    let output = run("qemu-io", &args).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for failure in ["Pattern verification failed", "failed:", "error"] {
        assert!(
            !text.contains(failure),
            "qemu-io {commands:?} reported {failure:?}:\n{text}"
        );
    }
    text
}

fn json_field<'a>(json: &'a serde_json::Value, field: &str) -> &'a serde_json::Value {
    &json["exports"][0][field]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_shows_name_size_and_flags() {
    // An odd size proves the exact size is reported, not a rounded one.
    let size = 3 * MIB + 512 + 3;
    let fixture = Fixture::start(MemoryExport::new(size)).await;
    for uri in [&fixture.tcp_uri, &fixture.unix_uri] {
        let output = run("nbdinfo", &["--json", uri]).await;
        let json: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("nbdinfo prints JSON");
        assert_eq!(json_field(&json, "export-name"), EXPORT_NAME, "{json}");
        assert_eq!(json_field(&json, "export-size"), size as u64, "{json}");
        assert_eq!(json_field(&json, "is_read_only"), false, "{json}");
        assert_eq!(json_field(&json, "can_multi_conn"), true, "{json}");
        assert_eq!(json_field(&json, "can_flush"), true, "{json}");
        assert_eq!(json_field(&json, "can_fua"), true, "{json}");
        assert_eq!(json_field(&json, "can_trim"), true, "{json}");
        assert_eq!(json_field(&json, "can_zero"), true, "{json}");
        assert_eq!(json_field(&json, "block_size_minimum"), 1, "{json}");
        assert_eq!(json_field(&json, "block_size_preferred"), 4096, "{json}");
        assert_eq!(
            json_field(&json, "block_size_maximum"),
            32 * MIB as u64,
            "{json}"
        );
    }
    let listing = run("nbdinfo", &["--list", "--json", &fixture.tcp_uri]).await;
    let json: serde_json::Value = serde_json::from_slice(&listing.stdout).expect("JSON list");
    assert_eq!(json_field(&json, "export-name"), EXPORT_NAME, "{json}");
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_sees_a_read_only_export_without_multi_conn() {
    let export = MemoryExport::with_options(MIB, false, 512);
    export.set_writable(false);
    let fixture = Fixture::start(export).await;
    let output = run("nbdinfo", &["--json", &fixture.tcp_uri]).await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json_field(&json, "is_read_only"), true, "{json}");
    assert_eq!(json_field(&json, "can_multi_conn"), false, "{json}");
    assert_eq!(json_field(&json, "block_size_minimum"), 512, "{json}");
    fixture.stop().await;
}

/// Aligned and unaligned writes, FUA, write-zeroes, discard and flush, each read back
/// through qemu-io and checked against the export's memory.
async fn qemu_io_patterns(uri_of: impl Fn(&Fixture) -> &str) {
    let fixture = Fixture::start(MemoryExport::new(4 * MIB)).await;
    let uri = uri_of(&fixture);
    qemu_io(
        uri,
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 4097 1000",
            "write -f -P 0x11 1M 4k",
            "write -f -P 0x22 1049599 3",
            "write -P 0x33 2M 64k",
            "write -z 2M 8k",
            "discard 3M 64k",
            "flush",
        ],
    )
    .await;
    qemu_io(
        uri,
        &[
            "read -P 0xab 0 4097",
            "read -P 0xcd 4097 1000",
            "read -P 0xab 5097 60439",
            "read -P 0x11 1M 1023",
            "read -P 0x22 1049599 3",
            "read -P 0x11 1049602 3070",
            "read -P 0 2M 8k",
            "read -P 0x33 2105344 56k",
            "read -P 0 4194303 1",
        ],
    )
    .await;
    let memory = fixture.export.snapshot();
    assert!(memory[..4097].iter().all(|&b| b == 0xab));
    assert!(memory[4097..5097].iter().all(|&b| b == 0xcd));
    assert!(memory[MIB..MIB + 1023].iter().all(|&b| b == 0x11));
    assert!(memory[MIB + 1023..MIB + 1026].iter().all(|&b| b == 0x22));
    assert!(memory[2 * MIB..2 * MIB + 8 * KIB].iter().all(|&b| b == 0));
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_over_tcp() {
    qemu_io_patterns(|fixture| &fixture.tcp_uri).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_over_unix_socket() {
    qemu_io_patterns(|fixture| &fixture.unix_uri).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_honours_a_512_byte_minimum_block_size() {
    // qemu asks for the block size constraints and does read-modify-write itself, so
    // unaligned I/O still works and the server only ever sees aligned requests.
    let fixture = Fixture::start(MemoryExport::with_options(MIB, true, 512)).await;
    qemu_io(
        &fixture.tcp_uri,
        &[
            "write -P 0x5a 100 1000",
            "read -P 0x5a 100 1000",
            "read -P 0 0 100",
        ],
    )
    .await;
    let memory = fixture.export.snapshot();
    assert!(memory[100..1100].iter().all(|&b| b == 0x5a));
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_qemu_io_clients_at_once() {
    let fixture = Fixture::start(MemoryExport::new(4 * MIB)).await;
    let first = qemu_io(
        &fixture.tcp_uri,
        &[
            "write -P 0x61 0 1M",
            "read -P 0x61 0 1M",
            "write -P 0x62 0 4k",
        ],
    );
    let second = qemu_io(
        &fixture.unix_uri,
        &[
            "write -P 0x71 2M 1M",
            "read -P 0x71 2M 1M",
            "write -P 0x72 2M 4k",
        ],
    );
    tokio::join!(first, second);
    qemu_io(
        &fixture.tcp_uri,
        &[
            "read -P 0x62 0 4k",
            "read -P 0x61 4k 1020k",
            "read -P 0x72 2M 4k",
            "read -P 0x71 2052k 1020k",
        ],
    )
    .await;
    fixture.stop().await;
}

/// Writes `size` bytes of seeded random data to `path` and returns them.
fn random_file(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    engine::rng::SplitMix64::new(seed).fill(&mut data);
    std::fs::write(path, &data).expect("write random file");
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_64_mib_of_random_data() {
    let size = 64 * MIB;
    let fixture = Fixture::start(MemoryExport::new(size)).await;
    let source = fixture.dir.path().join("source.img");
    let copy = fixture.dir.path().join("copy.img");
    let data = random_file(&source, size, 0x006e_6264_636f_7079);

    let source_arg = source.to_str().expect("UTF-8 path");
    let copy_arg = copy.to_str().expect("UTF-8 path");
    run("nbdcopy", &[source_arg, &fixture.tcp_uri]).await;
    assert!(
        fixture.export.snapshot() == data,
        "export differs from the source after nbdcopy"
    );
    run("nbdcopy", &[&fixture.unix_uri, copy_arg]).await;
    run("cmp", &[source_arg, copy_arg]).await;
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify() {
    let fixture = Fixture::start(MemoryExport::new(16 * MIB)).await;
    let uri_arg = format!("--uri={}", fixture.tcp_uri);
    let output = run(
        "fio",
        &[
            "--name=nbd-verify",
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    )
    .await;
    // fio's nbd engine prints a line of its own before the JSON document.
    let stdout = &output.stdout;
    let start = stdout.iter().position(|&b| b == b'{').unwrap_or(0);
    let json: serde_json::Value =
        serde_json::from_slice(&stdout[start..]).expect("fio prints JSON");
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{json}");
    assert_eq!(job["write"]["io_bytes"], 16 * MIB as u64, "{job}");
    // The verify phase reads everything back.
    assert_eq!(job["read"]["io_bytes"], 16 * MIB as u64, "{job}");
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_info_convert_and_compare() {
    let size = 8 * MIB;
    let fixture = Fixture::start(MemoryExport::new(size)).await;
    let output = run(
        "qemu-img",
        &["info", "--output=json", "-f", "raw", &fixture.tcp_uri],
    )
    .await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json["virtual-size"], size as u64, "{json}");

    let source = fixture.dir.path().join("source.img");
    let data = random_file(&source, size, 0x0071_656d_7569_6d67);
    let source_arg = source.to_str().expect("UTF-8 path");
    let convert = ["convert", "-n", "-f", "raw", "-O", "raw", source_arg];
    run("qemu-img", &[&convert[..], &[&fixture.unix_uri]].concat()).await;
    assert!(
        fixture.export.snapshot() == data,
        "export differs after qemu-img convert"
    );
    // Exits non-zero if the images differ.
    let compare = ["compare", "-f", "raw", "-F", "raw", source_arg];
    run("qemu-img", &[&compare[..], &[&fixture.tcp_uri]].concat()).await;
    fixture.stop().await;
}

/// An nbdfuse mount, unmounted (and its process killed) when dropped.
struct FuseMount {
    mountpoint: PathBuf,
    process: tokio::process::Child,
}

impl FuseMount {
    /// Mounts `uri` as the file `nbd` in `mountpoint` and waits until nbdfuse says it is
    /// ready by writing its pid file.
    async fn mount(uri: &str, mountpoint: PathBuf, pidfile: &Path) -> FuseMount {
        std::fs::create_dir_all(&mountpoint).expect("create mountpoint");
        let process = Command::new("nbdfuse")
            .arg("-P")
            .arg(pidfile)
            .arg(&mountpoint)
            .arg(uri)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot run nbdfuse: {error}. Install the Debian package libnbd-bin")
            });
        let mut mount = FuseMount {
            mountpoint,
            process,
        };
        // nbdfuse has no other readiness signal than the pid file.
        tokio::time::timeout(TOOL_TIMEOUT, async {
            while !pidfile.exists() {
                if let Ok(Some(status)) = mount.process.try_wait() {
                    panic!("nbdfuse exited with {status} before it was ready");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("nbdfuse did not become ready");
        mount
    }

    fn file(&self) -> PathBuf {
        self.mountpoint.join("nbd")
    }

    /// Unmounts and waits for nbdfuse to exit cleanly.
    async fn unmount(mut self) {
        run(
            "fusermount3",
            &["-u", self.mountpoint.to_str().expect("UTF-8 path")],
        )
        .await;
        let status = tokio::time::timeout(TOOL_TIMEOUT, self.process.wait())
            .await
            .expect("nbdfuse did not exit after unmount")
            .expect("wait for nbdfuse");
        assert!(status.success(), "nbdfuse exited with {status}");
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        // Harmless if already unmounted; keeps a failed test from leaving a mount behind.
        let _ = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mountpoint)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdfuse_exposes_the_export_as_a_file() {
    use std::io::{Read, Seek, SeekFrom, Write};

    let size = 4 * MIB;
    let fixture = Fixture::start(MemoryExport::new(size)).await;
    let mount = FuseMount::mount(
        &fixture.tcp_uri,
        fixture.dir.path().join("mnt"),
        &fixture.dir.path().join("nbdfuse.pid"),
    )
    .await;
    let path = mount.file();
    let written: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    let expected = written.clone();
    // File I/O on the FUSE mount blocks; keep it off the runtime's workers.
    let contents = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the nbdfuse file");
        assert_eq!(file.metadata().expect("metadata").len(), size as u64);
        file.seek(SeekFrom::Start(12_345)).expect("seek");
        file.write_all(&written).expect("write");
        file.sync_all().expect("fsync");
        let mut contents = Vec::new();
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.read_to_end(&mut contents).expect("read");
        contents
    });
    let contents = tokio::time::timeout(TOOL_TIMEOUT, contents)
        .await
        .expect("file I/O on the nbdfuse mount timed out")
        .expect("file I/O");
    assert_eq!(contents.len(), size);
    assert!(
        contents[12_345..112_345] == expected[..],
        "read back differs"
    );
    assert!(contents[..12_345].iter().all(|&b| b == 0));
    assert!(fixture.export.snapshot()[12_345..112_345] == expected[..]);
    mount.unmount().await;
    fixture.stop().await;
}

// ---------------------------------------------------------------------------------------
// Structured replies, metadata contexts and block status
// ---------------------------------------------------------------------------------------

const BITMAP: &str = "nightly";

/// A 4 MiB export with data in [0, 64 KiB) and [1 MiB, 1 MiB + 4 KiB), zeroes elsewhere,
/// and a dirty bitmap dirty in [64 KiB, 192 KiB) and [2 MiB, 2 MiB + 4 KiB).
fn mapped_export() -> MemoryExport {
    let export = MemoryExport::new(4 * MIB).with_dirty_bitmap(
        BITMAP,
        vec![
            (2 * MIB as u64, 4 * KIB as u64),
            (64 * KIB as u64, 128 * KIB as u64),
        ],
    );
    export.fill(0, &[0x5a; 64 * KIB]);
    export.fill(MIB, &[0xa5; 4 * KIB]);
    export
}

/// `nbdinfo --map[=CONTEXT] --json` as (offset, length, type) triples.
async fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u64)> {
    let map = match context {
        Some(context) => format!("--map={context}"),
        None => "--map".to_owned(),
    };
    let output = run("nbdinfo", &[&map, "--json", uri]).await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "nbdinfo {map} prints JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    json.as_array()
        .unwrap_or_else(|| panic!("nbdinfo {map} prints an array: {json}"))
        .iter()
        .map(|entry| {
            let field = |name: &str| {
                entry[name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{name} in {entry}"))
            };
            (field("offset"), field("length"), field("type"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_contexts_and_maps_allocation_and_a_dirty_bitmap() {
    let fixture = Fixture::start(mapped_export()).await;
    let context = format!("qemu:dirty-bitmap:{BITMAP}");
    let output = run("nbdinfo", &["--json", &fixture.tcp_uri]).await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(
        json_field(&json, "contexts"),
        &serde_json::json!(["base:allocation", context]),
        "{json}"
    );
    let listing = run("nbdinfo", &["--list", "--json", &fixture.unix_uri]).await;
    let json: serde_json::Value = serde_json::from_slice(&listing.stdout).expect("JSON list");
    assert_eq!(json_field(&json, "export-name"), EXPORT_NAME, "{json}");
    assert_eq!(
        json_field(&json, "contexts"),
        &serde_json::json!(["base:allocation", context]),
        "{json}"
    );

    // base:allocation: type 2 is NBD_STATE_ZERO, 0 is data.
    let (kib, mib) = (KIB as u64, MIB as u64);
    assert_eq!(
        nbdinfo_map(&fixture.tcp_uri, None).await,
        [
            (0, 64 * kib, 0),
            (64 * kib, mib - 64 * kib, 2),
            (mib, 4 * kib, 0),
            (mib + 4 * kib, 3 * mib - 4 * kib, 2),
        ]
    );
    // The dirty bitmap shows exactly the dirty ranges (type 1 is dirty).
    assert_eq!(
        nbdinfo_map(&fixture.unix_uri, Some(&context)).await,
        [
            (0, 64 * kib, 0),
            (64 * kib, 128 * kib, 1),
            (192 * kib, 2 * mib - 192 * kib, 0),
            (2 * mib, 4 * kib, 1),
            (2 * mib + 4 * kib, 2 * mib - 4 * kib, 0),
        ]
    );
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_sees_data_and_zeroes() {
    let fixture = Fixture::start(mapped_export()).await;
    let output = run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &fixture.tcp_uri],
    )
    .await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let map: Vec<(u64, u64, bool, bool)> = json
        .as_array()
        .unwrap_or_else(|| panic!("qemu-img map prints an array: {json}"))
        .iter()
        .map(|entry| {
            (
                entry["start"].as_u64().expect("start"),
                entry["length"].as_u64().expect("length"),
                entry["data"].as_bool().expect("data"),
                entry["zero"].as_bool().expect("zero"),
            )
        })
        .collect();
    let (kib, mib) = (KIB as u64, MIB as u64);
    assert_eq!(
        map,
        [
            (0, 64 * kib, true, false),
            (64 * kib, mib - 64 * kib, true, true),
            (mib, 4 * kib, true, false),
            (mib + 4 * kib, 3 * mib - 4 * kib, true, true),
        ],
        "{json}"
    );
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_copies_a_mostly_zero_export_with_block_status() {
    let fixture = Fixture::start(mapped_export()).await;
    let copy = fixture.dir.path().join("copy.img");
    let copy_arg = copy.to_str().expect("UTF-8 path");
    // nbdcopy asks base:allocation and skips what reads as zeroes.
    run("nbdcopy", &[&fixture.tcp_uri, copy_arg]).await;
    let copied = std::fs::read(&copy).expect("read copy");
    assert!(
        copied == fixture.export.snapshot(),
        "copy differs from the export"
    );
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_is_advertised_and_refuses_writes() {
    let export = MemoryExport::new(MIB).with_read_only(true);
    export.fill(0, &[0x42; 4 * KIB]);
    let fixture = Fixture::start(export).await;
    let output = run("nbdinfo", &["--json", &fixture.tcp_uri]).await;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(json_field(&json, "is_read_only"), true, "{json}");
    // qemu-io refuses to write: qemu sees NBD_FLAG_READ_ONLY and will not open the image
    // for writing ("Permission denied"); the server's own EPERM is checked in
    // nbd_conformance.rs. The data stays and no write reached the export.
    let child = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x99 0 4k", &fixture.tcp_uri])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run qemu-io");
    let output = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .expect("qemu-io finishes")
        .expect("wait for qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !output.status.success() || text.contains("failed"),
        "qemu-io wrote to a read-only export:\n{text}"
    );
    assert!(
        text.contains("Permission denied") || text.contains("Operation not permitted"),
        "qemu-io gave another reason:\n{text}"
    );
    let read = run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x42 0 4k",
            &fixture.tcp_uri,
        ],
    )
    .await;
    let text = String::from_utf8_lossy(&read.stdout);
    assert!(
        text.contains("read 4096/4096 bytes") && !text.contains("Pattern verification failed"),
        "{text}"
    );
    assert_eq!(fixture.export.mutation_count(), 0);
    fixture.stop().await;
}
