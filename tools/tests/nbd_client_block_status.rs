//! The NBD client with structured replies and metadata contexts: against replicad's own
//! server (a memory export with a dirty bitmap), qemu-nbd (which answers sparse reads
//! with `OFFSET_HOLE` chunks and serves qcow2 dirty bitmaps) and nbdkit. A missing server
//! binary fails its test. Every wait is bounded.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use replicad::nbd::{self, ExportMap, MemoryExport, ServerConfig, ServerHandle};
use tools::checker::servers::{Listen, ServerProcess, TempDir};
use tools::nbd_client::{
    list_exports, ConnectOptions, ContextStatus, Extent, NbdClient, NbdError, NbdUri,
};

const PATIENCE: Duration = Duration::from_secs(20);
const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;
const BITMAP_CONTEXT: &str = "qemu:dirty-bitmap:nightly";
const EINVAL: u32 = 22;

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("operation finished in time")
}

/// A 1 MiB export `r0` with data in [0, 8 KiB) and [512 KiB, 516 KiB), dirty in
/// [64 KiB, 128 KiB); a second, read-only export `ro`.
async fn serve() -> (Arc<MemoryExport>, String, ServerHandle) {
    let export =
        MemoryExport::new(MIB as usize).with_dirty_bitmap("nightly", vec![(64 << 10, 64 << 10)]);
    export.fill(0, &[0x11; 8 << 10]);
    export.fill(512 << 10, &[0x22; 4 << 10]);
    let export = Arc::new(export);
    let mut exports = ExportMap::new();
    exports.insert("r0", Arc::clone(&export));
    exports.insert(
        "ro",
        Arc::new(MemoryExport::new(MIB as usize).with_read_only(true)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let handle = nbd::spawn(listener, Arc::new(exports), ServerConfig::default());
    (export, format!("nbd://127.0.0.1:{port}"), handle)
}

async fn connect(uri: &str, contexts: &[&str]) -> NbdClient {
    let options = ConnectOptions {
        meta_contexts: contexts.iter().map(|name| (*name).to_owned()).collect(),
        ..ConnectOptions::default()
    };
    let uri: NbdUri = uri.parse().expect("uri");
    within(NbdClient::connect_with(&uri, options))
        .await
        .expect("connect")
}

fn extents(list: &[(u32, u32)]) -> Vec<Extent> {
    list.iter()
        .map(|&(length, flags)| Extent { length, flags })
        .collect()
}

fn status(context: &str, list: &[(u32, u32)]) -> ContextStatus {
    ContextStatus {
        context: context.to_owned(),
        extents: extents(list),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_of_both_contexts_against_replicad() {
    let (export, base, server) = serve().await;
    let client = connect(
        &format!("{base}/r0"),
        &[BITMAP_CONTEXT, "base:allocation", "base:nope"],
    )
    .await;
    let info = client.info();
    assert!(info.structured_replies);
    let names: Vec<&str> = info.meta_contexts.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["base:allocation", BITMAP_CONTEXT],
        "unknown names are not selected"
    );

    let zero = nbd::STATE_ZERO;
    let answer = within(client.block_status(0, MIB))
        .await
        .expect("block status");
    assert_eq!(
        answer,
        [
            status(
                "base:allocation",
                &[
                    (8 * KIB, 0),
                    (504 * KIB, zero),
                    (4 * KIB, 0),
                    (508 * KIB, zero)
                ]
            ),
            status(
                BITMAP_CONTEXT,
                &[(64 * KIB, 0), (64 * KIB, 1), (896 * KIB, 0)]
            ),
        ]
    );
    let one = within(client.block_status_req_one(u64::from(4 * KIB), 128 * KIB))
        .await
        .expect("block status");
    assert_eq!(
        one,
        [
            status("base:allocation", &[(4 * KIB, 0)]),
            status(BITMAP_CONTEXT, &[(60 * KIB, 0)]),
        ]
    );
    // Out of range: the server's EINVAL, and the connection goes on.
    let beyond = within(client.block_status(MIB as u64 - 512, 1024)).await;
    assert_eq!(
        beyond.as_ref().map_err(NbdError::errno).err(),
        Some(Some(EINVAL)),
        "{beyond:?}"
    );

    // Structured reads: small, large (written from the export's buffer) and failed.
    let small = within(client.read(4090, 12)).await.expect("read");
    assert_eq!(small, export.snapshot()[4090..4102]);
    let large = within(client.read(0, MIB)).await.expect("read");
    assert!(large == export.snapshot(), "large read differs");
    assert_eq!(
        within(client.read(0, 0)).await.expect("empty read").len(),
        0
    );
    let failed = within(client.read(MIB as u64, 1)).await;
    assert_eq!(
        failed.as_ref().map_err(NbdError::errno).err(),
        Some(Some(EINVAL)),
        "{failed:?}"
    );
    within(client.write(0, Bytes::from_static(b"abc"), true))
        .await
        .expect("write");
    assert_eq!(&within(client.read(0, 3)).await.expect("read")[..], b"abc");
    within(client.disconnect()).await.expect("disconnect");
    within(server.shutdown()).await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_read_only_and_no_contexts() {
    let (_export, base, server) = serve().await;
    assert_eq!(
        within(list_exports(&base)).await.expect("list"),
        ["r0", "ro"]
    );

    let read_only = connect(&format!("{base}/ro"), &[]).await;
    assert!(read_only.info().flags.read_only());
    assert!(!read_only.info().structured_replies);
    let refused = within(read_only.write(0, Bytes::from_static(b"x"), false)).await;
    assert_eq!(
        refused.as_ref().map_err(NbdError::errno).err(),
        Some(Some(1)),
        "{refused:?}"
    );
    // Without contexts there is no block status.
    let unsupported = within(read_only.block_status(0, 512)).await;
    assert!(
        matches!(unsupported, Err(NbdError::Unsupported(_))),
        "{unsupported:?}"
    );
    within(read_only.disconnect()).await.expect("disconnect");

    // Structured replies without contexts.
    let options = ConnectOptions {
        structured_replies: true,
        ..ConnectOptions::default()
    };
    let uri: NbdUri = format!("{base}/r0").parse().expect("uri");
    let client = within(NbdClient::connect_with(&uri, options))
        .await
        .expect("connect");
    assert!(client.info().structured_replies);
    assert!(client.info().meta_contexts.is_empty());
    assert_eq!(
        within(client.read(0, 4)).await.expect("read")[..],
        [0x11; 4]
    );
    within(client.disconnect()).await.expect("disconnect");
    within(server.shutdown()).await.expect("shutdown");
}

#[tokio::test]
async fn sparse_reads_and_block_status_from_qemu_nbd() {
    let dir = TempDir::new("nbd-client-sparse").expect("temp dir");
    let path = dir.path().join("sparse.img");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::File::create(&path).expect("create image");
        file.set_len(4 << 20).expect("size image");
        file.seek(SeekFrom::Start(1 << 20)).expect("seek");
        file.write_all(&[0x5a; 64 << 10]).expect("write data");
    }
    let image = path.display().to_string();
    let server = ServerProcess::qemu_nbd(&["-f", "raw", &image], Listen::Unix, "disk")
        .unwrap_or_else(|error| panic!("cannot start qemu-nbd: {error}"));
    let client = connect(server.uri(), &["base:allocation"]).await;
    // A read across hole, data, hole: qemu-nbd sends OFFSET_HOLE and OFFSET_DATA chunks.
    let read = within(client.read((1 << 20) - 8192, 80 << 10))
        .await
        .expect("read");
    let mut expected = vec![0u8; 80 << 10];
    expected[8192..8192 + (64 << 10)].fill(0x5a);
    assert!(read == expected, "sparse read differs");
    let answer = within(client.block_status(0, 4 << 20))
        .await
        .expect("block status");
    assert_eq!(answer.len(), 1);
    let data_start: u32 = answer[0]
        .extents
        .iter()
        .take_while(|extent| extent.flags & nbd::STATE_HOLE != 0)
        .map(|extent| extent.length)
        .sum();
    assert_eq!(data_start, 1 << 20, "{answer:?}");
    within(client.disconnect()).await.expect("disconnect");
}

#[tokio::test]
async fn dirty_bitmap_of_qemu_nbd() {
    let dir = TempDir::new("nbd-client-bitmap").expect("temp dir");
    let image = dir.path().join("disk.qcow2").display().to_string();
    let qemu = |program: &str, args: &[&str]| {
        let output = std::process::Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|error| panic!("cannot run {program}: {error} (install qemu-utils)"));
        assert!(
            output.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", &image, "4M"]);
    qemu("qemu-img", &["bitmap", "--add", &image, "b0"]);
    // Written after the bitmap was added: dirty in its 64 KiB granularity.
    qemu("qemu-io", &["-f", "qcow2", "-c", "write 1M 4k", &image]);
    let server =
        ServerProcess::qemu_nbd(&["-f", "qcow2", "-B", "b0", &image], Listen::Unix, "disk")
            .unwrap_or_else(|error| panic!("cannot start qemu-nbd: {error}"));
    let client = connect(server.uri(), &["qemu:dirty-bitmap:b0"]).await;
    assert_eq!(client.info().meta_contexts.len(), 1);
    let mut dirty = Vec::new();
    let mut offset = 0u64;
    // The server may answer less than asked: walk the whole export.
    while offset < 4 << 20 {
        let length = u32::try_from((4u64 << 20) - offset).expect("fits");
        let answer = within(client.block_status(offset, length))
            .await
            .expect("block status");
        for extent in &answer[0].extents {
            if extent.flags & 1 != 0 {
                dirty.push((offset, extent.length));
            }
            offset += u64::from(extent.length);
        }
    }
    assert_eq!(dirty, [(1 << 20, 64 << 10)]);
    within(client.disconnect()).await.expect("disconnect");
}

#[tokio::test]
async fn structured_reads_errors_and_block_status_from_nbdkit() {
    let server = ServerProcess::nbdkit(&["memory", "1M"], Listen::Unix)
        .unwrap_or_else(|error| panic!("cannot start nbdkit: {error}"));
    let client = connect(server.uri(), &["base:allocation"]).await;
    assert!(client.info().structured_replies);
    let data = Bytes::from(vec![0xc3; 4096]);
    within(client.write(64 << 10, data.clone(), false))
        .await
        .expect("write");
    assert_eq!(
        within(client.read(64 << 10, 4096)).await.expect("read"),
        data
    );
    // nbdkit answers an out-of-range read with an error chunk; the connection goes on.
    let beyond = within(client.read(u64::from(MIB) - 1, 2)).await;
    assert!(matches!(beyond, Err(NbdError::Server { .. })), "{beyond:?}");
    let answer = within(client.block_status(0, MIB))
        .await
        .expect("block status");
    let mut offset = 0u64;
    let mut written_flags = None;
    for extent in &answer[0].extents {
        if (offset..offset + u64::from(extent.length)).contains(&(64 << 10)) {
            written_flags = Some(extent.flags);
        }
        offset += u64::from(extent.length);
    }
    assert_eq!(
        written_flags.map(|flags| flags & nbd::STATE_HOLE),
        Some(0),
        "{answer:?}"
    );
    within(client.disconnect()).await.expect("disconnect");
}
