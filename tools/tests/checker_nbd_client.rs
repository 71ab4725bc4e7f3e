//! The NBD client against real servers: nbdkit and qemu-nbd, over TCP and unix sockets.
//! A missing server binary fails the test with the package to install.

use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinSet;
use tools::checker::servers::{Listen, ServerError, ServerProcess, TempDir};
use tools::nbd_client::{CloseReason, ConnectOptions, NbdClient, NbdError, NbdUri, ZeroFlags};

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
/// Bound on any wait in these tests.
const PATIENCE: Duration = Duration::from_secs(20);

fn started(server: Result<ServerProcess, ServerError>) -> ServerProcess {
    server.unwrap_or_else(|error| panic!("cannot start the NBD server: {error}"))
}

fn image_file(dir: &TempDir, size_bytes: u64) -> String {
    let path = dir.path().join("disk.img");
    let file = std::fs::File::create(&path).expect("create image");
    file.set_len(size_bytes).expect("size image");
    path.display().to_string()
}

async fn connect(server: &ServerProcess) -> NbdClient {
    let client = tokio::time::timeout(PATIENCE, NbdClient::connect(server.uri())).await;
    client
        .expect("connect within the test's patience")
        .unwrap_or_else(|error| {
            panic!(
                "connect to {}: {error}\n{}",
                server.uri(),
                server.stderr_text()
            )
        })
}

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .expect("operation finished in time")
}

/// Writes one block of `byte` at `offset` and reads it back.
async fn write_and_read_back(client: &NbdClient, offset: u64, byte: u8) {
    let data = Bytes::from(vec![byte; 4096]);
    within(client.write(offset, data.clone(), false))
        .await
        .expect("write");
    assert_eq!(
        within(client.read(offset, 4096)).await.expect("read back"),
        data
    );
}

fn pattern(seed: u64, length: usize) -> Bytes {
    (0..length)
        .map(|index| (seed.wrapping_mul(31).wrapping_add(index as u64 * 7) % 251) as u8)
        .collect()
}

/// The conformance suite every server passes: pipelined writes and reads from many
/// tasks, FUA, flush, write-zeroes, trim, a large request, and a clean disconnect.
async fn conformance(server: &ServerProcess, size_bytes: u64) {
    let client = connect(server).await;
    let info = client.info().clone();
    assert_eq!(info.size_bytes, size_bytes);
    assert!(
        info.opened_with_go,
        "NBD_OPT_GO is what modern servers speak"
    );
    assert!(!info.flags.read_only());
    assert!(info.flags.can_flush() && info.flags.can_fua() && info.flags.can_write_zeroes());

    // 8 tasks x 32 blocks, all in flight together on one connection.
    let mut tasks = JoinSet::new();
    for task in 0..8u64 {
        let client = client.clone();
        tasks.spawn(async move {
            let mut writes = JoinSet::new();
            for index in 0..32u64 {
                let block = task * 32 + index;
                let client = client.clone();
                writes.spawn(async move {
                    client
                        .write(block * 4096, pattern(block, 4096), block % 5 == 0)
                        .await
                });
            }
            while let Some(result) = writes.join_next().await {
                result.expect("write task").expect("write");
            }
        });
    }
    while let Some(result) = within(tasks.join_next()).await {
        result.expect("writer task");
    }
    within(client.flush()).await.expect("flush");
    let mut reads = JoinSet::new();
    for block in 0..256u64 {
        let client = client.clone();
        reads.spawn(async move { (block, client.read(block * 4096, 4096).await) });
    }
    while let Some(result) = within(reads.join_next()).await {
        let (block, data) = result.expect("read task");
        assert_eq!(data.expect("read"), pattern(block, 4096), "block {block}");
    }

    within(client.write_zeroes(
        4096,
        8192,
        ZeroFlags {
            fua: true,
            no_hole: false,
        },
    ))
    .await
    .expect("write zeroes");
    assert_eq!(within(client.read(0, 16384)).await.expect("read"), {
        let mut expected = pattern(0, 4096).to_vec();
        expected.extend_from_slice(&[0u8; 8192]);
        expected.extend_from_slice(&pattern(3, 4096));
        expected
    });
    if info.flags.can_trim() {
        within(client.trim(8 * 4096, 4096, false))
            .await
            .expect("trim");
    }
    let large = pattern(99, 1 << 20);
    within(client.write(1 << 20, large.clone(), false))
        .await
        .expect("1 MiB write");
    assert_eq!(
        within(client.read(1 << 20, 1 << 20))
            .await
            .expect("1 MiB read"),
        large
    );

    within(client.disconnect()).await.expect("disconnect");
    let after = client.read(0, 4096).await;
    assert!(
        matches!(
            after,
            Err(NbdError::Disconnected {
                reason: CloseReason::ClientDisconnected
            })
        ),
        "{after:?}"
    );
}

#[tokio::test]
async fn nbdkit_memory_over_tcp_and_unix() {
    for listen in [Listen::Tcp, Listen::Unix] {
        let server = started(ServerProcess::nbdkit(&["memory", "16M"], listen));
        conformance(&server, 16 << 20).await;
    }
}

#[tokio::test]
async fn qemu_nbd_raw_image_over_tcp_and_unix() {
    for listen in [Listen::Tcp, Listen::Unix] {
        let dir = TempDir::new("nbd-client-test").expect("temp dir");
        let image = image_file(&dir, 16 << 20);
        let server = started(ServerProcess::qemu_nbd(
            &["-f", "raw", "--discard=unmap", &image],
            listen,
            "disk",
        ));
        conformance(&server, 16 << 20).await;
    }
}

#[tokio::test]
async fn read_only_exports_refuse_writes_with_eperm() {
    let dir = TempDir::new("nbd-client-test").expect("temp dir");
    let image = image_file(&dir, 1 << 20);
    // The spec says a server SHOULD answer EPERM; qemu-nbd answers EINVAL for every
    // request that fails its receive-time checks, read-only writes included.
    let servers = [
        (
            started(ServerProcess::nbdkit(&["-r", "memory", "1M"], Listen::Tcp)),
            &[EPERM][..],
        ),
        (
            started(ServerProcess::qemu_nbd(
                &["-r", "-f", "raw", &image],
                Listen::Unix,
                "ro",
            )),
            &[EPERM, EINVAL][..],
        ),
    ];
    for (server, expected) in &servers {
        let client = connect(server).await;
        assert!(client.info().flags.read_only());
        let refused = within(client.write(0, Bytes::from(vec![1u8; 4096]), false)).await;
        let errno = refused.as_ref().err().and_then(NbdError::errno);
        assert!(
            errno.is_some_and(|errno| expected.contains(&errno)),
            "{}: {refused:?}",
            server.uri()
        );
        // An error reply fails one request; the connection stays usable.
        assert_eq!(
            within(client.read(0, 512))
                .await
                .expect("read after the refusal"),
            vec![0u8; 512]
        );
    }
}

#[tokio::test]
async fn out_of_range_requests_get_error_replies_and_the_connection_survives() {
    let dir = TempDir::new("nbd-client-test").expect("temp dir");
    let image = image_file(&dir, 1 << 20);
    let servers = [
        started(ServerProcess::nbdkit(&["memory", "1M"], Listen::Tcp)),
        started(ServerProcess::qemu_nbd(
            &["-f", "raw", &image],
            Listen::Tcp,
            "disk",
        )),
    ];
    for server in &servers {
        let client = connect(server).await;
        let size = client.info().size_bytes;
        let read = within(client.read(size - 512, 4096)).await;
        assert!(
            read.as_ref().is_err_and(|error| error.errno().is_some()),
            "{}: {read:?}",
            server.uri()
        );
        let write = within(client.write(size, Bytes::from(vec![7u8; 4096]), false)).await;
        assert!(
            write.as_ref().is_err_and(|error| error.errno().is_some()),
            "{}: {write:?}",
            server.uri()
        );
        write_and_read_back(&client, 0, 7).await;
    }
}

#[tokio::test]
async fn an_unknown_export_is_refused() {
    let dir = TempDir::new("nbd-client-test").expect("temp dir");
    let image = image_file(&dir, 1 << 20);
    let server = started(ServerProcess::qemu_nbd(
        &["-f", "raw", &image],
        Listen::Unix,
        "disk",
    ));
    let mut uri: NbdUri = server.uri().parse().expect("uri");
    uri.export = "no-such-export".to_owned();
    let refused = within(NbdClient::connect_with(&uri, ConnectOptions::default())).await;
    assert!(
        matches!(refused, Err(NbdError::ExportRefused { .. })),
        "{refused:?}"
    );
}

#[tokio::test]
async fn old_newstyle_servers_get_nbd_opt_export_name() {
    // Mask 0: no fixed newstyle, so NBD_OPT_EXPORT_NAME and the 124 zero bytes.
    // Mask 1: fixed newstyle without NBD_FLAG_NO_ZEROES.
    for mask in ["--mask-handshake=0", "--mask-handshake=1"] {
        let server = started(ServerProcess::nbdkit(&[mask, "memory", "1M"], Listen::Tcp));
        let client = connect(&server).await;
        assert_eq!(client.info().opened_with_go, mask.ends_with('1'), "{mask}");
        write_and_read_back(&client, 4096, 3).await;
    }
}

#[tokio::test]
async fn a_dead_server_fails_every_pending_request_promptly() {
    // Reads wait 30 s inside the server, so they are pending when it dies.
    let mut server = started(ServerProcess::nbdkit(
        &["--filter=delay", "memory", "1M", "rdelay=30"],
        Listen::Tcp,
    ));
    let client = connect(&server).await;
    let mut reads = JoinSet::new();
    for block in 0..16u64 {
        let client = client.clone();
        reads.spawn(async move { client.read(block * 4096, 4096).await });
    }
    within(async {
        while client.in_flight() < 16 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    server.kill().expect("kill -9 nbdkit");
    let all_failed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut failed = 0;
        while let Some(result) = reads.join_next().await {
            let result = result.expect("read task");
            assert!(
                result.as_ref().is_err_and(NbdError::is_disconnect),
                "{result:?}"
            );
            failed += 1;
        }
        failed
    })
    .await;
    assert_eq!(
        all_failed.expect("pending requests failed within 5 s of the server's death"),
        16
    );
    let later = within(client.write(0, Bytes::from(vec![0u8; 4096]), false)).await;
    assert!(later.is_err_and(|error| error.is_disconnect()));
}

#[tokio::test]
async fn a_request_timeout_closes_the_connection() {
    let server = started(ServerProcess::nbdkit(
        &["--filter=delay", "memory", "1M", "rdelay=30"],
        Listen::Unix,
    ));
    let options = ConnectOptions {
        request_timeout: Some(Duration::from_millis(300)),
        ..ConnectOptions::default()
    };
    let uri: NbdUri = server.uri().parse().expect("uri");
    let client = within(NbdClient::connect_with(&uri, options))
        .await
        .expect("connect");
    let read = within(client.read(0, 4096)).await;
    assert!(matches!(read, Err(NbdError::Timeout { .. })), "{read:?}");
    let later = within(client.write(0, Bytes::from(vec![0u8; 4096]), false)).await;
    assert!(
        matches!(
            later,
            Err(NbdError::Disconnected {
                reason: CloseReason::RequestTimedOut
            })
        ),
        "{later:?}"
    );
}

#[tokio::test]
async fn connecting_fails_promptly() {
    // Nobody listens: refused at once.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let refused = within(NbdClient::connect(&format!("nbd://127.0.0.1:{port}/"))).await;
    assert!(
        matches!(refused, Err(NbdError::Connect { .. })),
        "{refused:?}"
    );

    // A listener that never speaks: the handshake is bounded by the connect timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let uri: NbdUri = format!(
        "nbd://127.0.0.1:{}/",
        silent.local_addr().expect("addr").port()
    )
    .parse()
    .expect("uri");
    let options = ConnectOptions {
        connect_timeout: Duration::from_millis(300),
        ..ConnectOptions::default()
    };
    let timed_out = within(NbdClient::connect_with(&uri, options)).await;
    assert!(
        matches!(timed_out, Err(NbdError::ConnectTimeout { .. })),
        "{timed_out:?}"
    );
}

#[test]
fn a_missing_server_binary_is_a_clear_error() {
    let missing = ServerProcess::start(
        "replcheck-no-such-server",
        "some-package",
        &[],
        Listen::Tcp,
        "",
    );
    let message = missing.expect_err("no such program").to_string();
    assert!(
        message.contains("not installed") && message.contains("some-package"),
        "{message}"
    );
}
