//! P5 on the replication port: a peer of another resource, another protocol version
//! or another size, garbage bytes, and frames with a flipped bit. Each must be refused
//! with a clear error (status `peer.last_error`, events, the log), change nothing, and
//! leave the daemons serving their NBD clients throughout: a checker writes through
//! the primary while the bad peer knocks, then every acknowledged write is verified on
//! both replicas and the replicas are compared.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Output;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use engine::rng::SplitMix64;
use engine::wire::{Frame, PROTOCOL_VERSION};

/// A checker writing through alpha in the background.
struct Load {
    writer: JoinHandle<(PathBuf, Output)>,
}

impl Load {
    fn start(cluster: &Cluster, seconds: u32) -> Load {
        let (dir, uri) = (cluster.dir.clone(), cluster.uri("alpha"));
        let writer = std::thread::spawn(move || {
            checker_write(
                &dir,
                &uri,
                &[
                    "--qd",
                    "8",
                    "--seconds",
                    &seconds.to_string(),
                    "--blocks",
                    "0..3000",
                ],
            )
        });
        Load { writer }
    }

    /// Waits for the checker; then the pair must be in sync, every acknowledged write
    /// on both replicas, and the replicas identical.
    fn finish_and_check(self, cluster: &Cluster) {
        let (log, output) = self.writer.join().expect("checker thread");
        assert!(
            output.status.success(),
            "the primary stopped serving its NBD client: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_in_sync(Duration::from_secs(60));
        for name in ["alpha", "beta"] {
            let (passed, report) = checker_verify(&cluster.uri(name), &log, "acked");
            assert!(passed, "verify against {name} failed:\n{report}");
        }
        cluster.assert_verify_clean("alpha");
        cluster.assert_exports_identical("alpha", "beta");
    }
}

/// The pair's session was never disturbed: still the first one, connected.
fn assert_still_connected(cluster: &Cluster) {
    for name in ["alpha", "beta"] {
        let peer = cluster.status(name).peer.expect("peer");
        assert_eq!(peer.connection, "Connected", "{name}: {peer:?}");
    }
    let log = std::fs::read_to_string(&cluster.node("alpha").log).unwrap_or_default();
    assert_eq!(
        log.matches("connection:Connected").count(),
        1,
        "the pair reconnected:\n{}",
        cluster.log_tail("alpha")
    );
}

fn log_of(cluster: &Cluster, name: &str) -> String {
    std::fs::read_to_string(&cluster.node(name).log).unwrap_or_default()
}

fn expect_reject(answer: Result<Option<Frame>, String>, needle: &str) -> String {
    match answer {
        Ok(Some(Frame::Reject(reason))) => {
            assert!(
                reason.contains(needle),
                "REJECT without {needle:?}: {reason}"
            );
            reason
        }
        other => panic!("expected a REJECT mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn p5_peer_of_another_resource_uuid_is_refused() {
    let cluster = Cluster::small_pair("bad-uuid", false);
    let load = Load::start(&cluster, 4);
    let beta_port = cluster.node("beta").listen_port;
    let events = EventLog::start(&cluster, "beta");

    // A real daemon configured for a resource r0 with another UUID dials beta.
    let mut impostor = Cluster::new(
        "bad-uuid-impostor",
        &["alpha", "beta"],
        ClusterOptions {
            extra: "uuid = \"0123456789abcdef0123456789abcdef\"".into(),
            ..small_options(false)
        },
    );
    impostor
        .nodes
        .get_mut("beta")
        .expect("beta")
        .replication_port = beta_port;
    impostor.write_config();
    impostor.replctl_ok("alpha", &["create-md", RESOURCE, "--zeroed"]);
    impostor.start("alpha");
    let refused = impostor.wait_status("alpha", "refused by beta", Duration::from_secs(15), |s| {
        s.peer.as_ref().is_some_and(|p| {
            p.connection != "Connected"
                && p.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("refused") && e.contains("UUID"))
        })
    });
    let json = cluster.status_json("beta");
    let last_error = json["peer"]["last_error"].as_str().unwrap_or_default();
    assert!(
        last_error.contains("refused a peer")
            && last_error.contains("resource UUID 01234567-89ab-cdef-0123-456789abcdef"),
        "beta's last_error: {json}"
    );
    events.wait_for("refused a connection", Duration::from_secs(5));

    // A raw HELLO for a resource beta does not have.
    let uuid = engine::volume::uuid_from_name("r9");
    let answer = raw_replication_exchange(
        beta_port,
        &hello_frame(PROTOCOL_VERSION, "r9", uuid, "alpha", 0),
    );
    expect_reject(answer, "no resource \"r9\"");
    cluster.wait_log(
        "beta",
        "no resource \"r9\" on this node",
        Duration::from_secs(5),
    );

    // The impostor can still serve its own users alone.
    impostor.replctl_ok("alpha", &["promote", RESOURCE, "--force"]);
    qemu_io_ok(&impostor.uri("alpha"), false, "write -P 0xee 0 64k");
    impostor.stop("alpha");
    eprintln!(
        "impostor's error: {:?}",
        refused.peer.and_then(|p| p.last_error)
    );
    assert_still_connected(&cluster);
    load.finish_and_check(&cluster);
}

#[test]
fn p5_peer_of_another_protocol_version_is_refused_both_ways() {
    let cluster = Cluster::small_pair("bad-version", false);
    let load = Load::start(&cluster, 3);
    let beta_port = cluster.node("beta").listen_port;
    let uuid = engine::volume::uuid_from_name(RESOURCE);

    // Accepting side: a HELLO of version 99 from "alpha" is refused with the reason.
    let answer = raw_replication_exchange(beta_port, &hello_frame(99, RESOURCE, uuid, "alpha", 0));
    expect_reject(answer, "protocol 99");
    let json = cluster.status_json("beta");
    assert!(
        json["peer"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("peer speaks replication protocol 99")),
        "{json}"
    );
    assert_still_connected(&cluster);
    load.finish_and_check(&cluster);

    // Dialing side: alpha alone dials a fake beta that answers HELLO with version 99.
    let mut lonely = Cluster::new(
        "bad-version-dialer",
        &["alpha", "beta"],
        small_options(false),
    );
    let fake = TcpListener::bind(("127.0.0.1", lonely.node("beta").listen_port)).expect("bind");
    // It answers alpha's first three attempts (alpha retries with back-off), and
    // returns how many bytes alpha sent after each bad HELLO before hanging up.
    let fake_beta = std::thread::spawn(move || {
        (0..3)
            .map(|_| {
                let (mut stream, _) = fake.accept().expect("alpha dials");
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let mut head = [0u8; engine::wire::FRAME_HEADER_BYTES];
                stream.read_exact(&mut head).expect("alpha's HELLO");
                let header = engine::wire::decode_header(&head).expect("header");
                let mut body = vec![0u8; header.body_bytes as usize];
                stream.read_exact(&mut body).expect("body");
                stream
                    .write_all(&hello_frame(99, RESOURCE, uuid, "beta", 1))
                    .expect("answer");
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).map(|_| rest.len()).ok()
            })
            .collect::<Vec<_>>()
    });
    lonely.replctl_ok("alpha", &["create-md", RESOURCE, "--zeroed"]);
    lonely.start("alpha");
    lonely.wait_status("alpha", "refusing beta", Duration::from_secs(15), |s| {
        s.peer.as_ref().is_some_and(|p| {
            p.last_error
                .as_deref()
                .is_some_and(|e| e.contains("peer speaks replication protocol 99"))
        })
    });
    let trailing = fake_beta.join().expect("fake beta");
    assert_eq!(
        trailing,
        vec![Some(0); 3],
        "alpha sent more after a bad HELLO"
    );
    lonely.replctl_ok("alpha", &["promote", RESOURCE, "--force"]);
    qemu_io_ok(&lonely.uri("alpha"), false, "write -P 0x99 0 64k");
    qemu_io_ok(&lonely.uri("alpha"), true, "read -P 0x99 0 64k");
}

#[test]
fn p5_peer_of_another_size_is_refused_and_nothing_is_applied() {
    let mut cluster = Cluster::new("bad-size", &["alpha", "beta"], small_options(false));
    // beta's store is larger: a mistake in a real deployment (the wrong disk).
    engine::volume::create_image_file(&cluster.node("beta").image, 80 << 20).expect("image");
    cluster.create_md_all();
    cluster.start_all();
    for name in ["alpha", "beta"] {
        let status = cluster.wait_status(name, "refusing its peer", Duration::from_secs(20), |s| {
            s.peer.as_ref().is_some_and(|p| {
                p.connection == "StandAlone"
                    && p.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("bytes, ours is") && e.contains("refusing"))
            })
        });
        eprintln!("{name}: {:?}", status.peer.and_then(|p| p.last_error));
    }
    // alpha serves alone; beta gets nothing of it.
    cluster.replctl_ok("alpha", &["promote", RESOURCE, "--force"]);
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0x5e 0 1M");
    qemu_io_ok(&cluster.uri("alpha"), true, "read -P 0x5e 0 1M");
    let beta = cluster.status("beta");
    assert_eq!(beta.role, "Secondary");
    assert_eq!(beta.io.writes, 0, "beta applied writes: {beta:#?}");
    assert!(beta.peer.is_some_and(|p| p.connection == "StandAlone"));
    // A never-synced (Inconsistent) Secondary exports nothing at all.
    assert_eq!(beta.disk, "Inconsistent");
    let (readable, text) = qemu_io(&cluster.uri("beta"), true, "read 0 4096");
    assert!(
        !readable,
        "an Inconsistent Secondary served a read:\n{text}"
    );
    let beta_size = beta.size_bytes;
    cluster.stop("beta");
    let data = cluster.data_area("beta", beta_size);
    assert!(
        data.iter().all(|&b| b == 0),
        "beta's data area changed although it refused its peer"
    );
}

#[test]
fn p5_garbage_on_the_replication_port_is_refused_and_the_daemon_serves_on() {
    let cluster = Cluster::small_pair("garbage", false);
    let load = Load::start(&cluster, 4);
    let beta_port = cluster.node("beta").listen_port;
    let mut rng = SplitMix64::new(std::process::id() as u64 ^ 0x6A5B);

    // Random bytes: not our framing at all; closed without an answer.
    for round in 0..8 {
        let mut garbage = vec![0u8; 24 + rng.below(8192) as usize];
        rng.fill(&mut garbage);
        let started = Instant::now();
        let answer = raw_replication_exchange(beta_port, &garbage);
        assert!(
            matches!(answer, Ok(None)),
            "garbage round {round}: expected the connection closed, got {answer:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Something that speaks HTTP to the port.
    let answer = raw_replication_exchange(beta_port, b"GET / HTTP/1.1\r\nHost: beta\r\n\r\n");
    assert!(matches!(answer, Ok(None)), "HTTP: {answer:?}");
    // Valid framing, but not a HELLO first.
    let answer = raw_replication_exchange(beta_port, &Frame::Ping(7).encode_to_vec());
    expect_reject(answer, "expected HELLO, got PING");
    // A HELLO whose body does not match its checksum.
    let uuid = engine::volume::uuid_from_name(RESOURCE);
    let mut hello = hello_frame(PROTOCOL_VERSION, RESOURCE, uuid, "alpha", 0);
    let last = hello.len() - 1;
    hello[last] ^= 0x01;
    let answer = raw_replication_exchange(beta_port, &hello);
    assert!(matches!(answer, Ok(None)), "corrupt HELLO: {answer:?}");
    // A header announcing a body that never comes: closed after the HELLO timeout.
    let started = Instant::now();
    let answer = raw_replication_exchange(beta_port, &hello[..engine::wire::FRAME_HEADER_BYTES]);
    assert!(matches!(answer, Ok(None)), "silent peer: {answer:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(10),
        "a silent half-HELLO was dropped after {waited:?}"
    );

    for needle in [
        "bad frame magic",
        "expected HELLO, got PING",
        "frame body checksum mismatch",
        "no HELLO within 5s",
    ] {
        cluster.wait_log("beta", needle, Duration::from_secs(5));
    }
    assert_still_connected(&cluster);
    qemu_io_ok(&cluster.uri("beta"), true, "read 0 1M");
    load.finish_and_check(&cluster);
}

#[test]
fn p5_flipped_bits_on_the_link_drop_the_connection_and_nothing_corrupt_is_applied() {
    let cluster = Cluster::small_pair("bitflip", true);
    let proxy = cluster.proxy.clone().expect("proxy");
    let mut rng = SplitMix64::new(std::process::id() as u64 ^ 0xF11B);
    let load = Load::start(&cluster, 8);
    let flips = 6u64;
    for flip in 0..flips {
        cluster.wait_in_sync(Duration::from_secs(30));
        let sessions = proxy.connections();
        // Far offsets land mostly in record data (the bulk of the bytes); near ones in
        // whatever passes next, often a small acknowledgement or its frame header.
        let after = if flip % 2 == 0 {
            rng.below(2 << 20)
        } else {
            rng.below(48)
        };
        proxy.corrupt_after(after);
        // Every byte on the link is covered by a checksum: the flip ends the session
        // and alpha reconnects (two new proxied connections).
        wait_until(
            &format!("a reconnect after flip {flip} ({after} bytes on)"),
            Duration::from_secs(30),
            || (proxy.connections() >= sessions + 2).then_some(()),
        );
    }
    let reports: Vec<String> = ["alpha", "beta"]
        .iter()
        .flat_map(|name| {
            log_of(&cluster, name)
                .lines()
                .filter(|line| line.contains("connection:Connecting (bad frame from peer"))
                .map(|line| format!("{name}: {}", &line[line.find("(bad").unwrap_or(0)..]))
                .collect::<Vec<_>>()
        })
        .collect();
    eprintln!("flipped bits detected:\n{}", reports.join("\n"));
    let detected = reports.len() as u64;
    assert!(
        detected >= flips,
        "{flips} flipped bits, {detected} detected:\n{}\n{}",
        cluster.log_tail("alpha"),
        cluster.log_tail("beta")
    );
    load.finish_and_check(&cluster);
    let mut cluster = cluster;
    cluster.stop_and_assert_data_areas_identical("alpha", "beta");
}
