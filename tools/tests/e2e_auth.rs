//! Issue 13 item 9 on real daemons: peers authenticate with the resource's shared
//! secret (HMAC challenge-response in the HELLO exchange). A wrong or missing secret is
//! refused with a reason both daemons log and `replctl status` shows; the right one
//! replicates; and a stranger who opens connections claiming to be the peer neither
//! gets in nor disturbs the running session.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use engine::wire::{Channel, Frame, Hello, FRAME_HEADER_BYTES, PROTOCOL_VERSION};

const SHARED: &str = "the pair's own secret";

fn with_secret(line: &str) -> ClusterOptions {
    ClusterOptions {
        extra: line.to_string(),
        ..small_options(false)
    }
}

/// Waits until `name` refuses its peer with a last error of `kind` containing every
/// needle, the peer not connected; returns that error.
fn wait_refusal(cluster: &Cluster, name: &str, kind: &str, needles: &[&str]) -> String {
    let status = cluster.wait_status(
        name,
        "an authentication refusal",
        Duration::from_secs(20),
        |s| {
            s.peer.as_ref().is_some_and(|p| {
                p.connection != "Connected"
                    && p.last_error_kind.as_deref() == Some(kind)
                    && p.last_error
                        .as_deref()
                        .is_some_and(|e| needles.iter().all(|n| e.contains(n)))
            })
        },
    );
    let error = status
        .peer
        .and_then(|p| p.last_error)
        .expect("a last error");
    eprintln!("{name}: {error}");
    error
}

#[test]
fn p5_wrong_or_missing_secret_is_refused_and_the_right_one_replicates() {
    let mut cluster = Cluster::new(
        "auth-secrets",
        &["alpha", "beta"],
        with_secret(&format!("secret = \"{SHARED}\"")),
    );
    cluster.create_md_all();
    cluster.start("alpha");
    cluster.replctl_ok("alpha", &["promote", RESOURCE, "--force"]);
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0x5a 0 1M");

    // beta's copy of the config holds another secret.
    cluster.options = with_secret("secret = \"not the pair's secret\"");
    cluster.write_config();
    cluster.start("beta");
    for name in ["alpha", "beta"] {
        wait_refusal(
            &cluster,
            name,
            "auth-failed",
            &["authentication failed", "does not match the secret"],
        );
        cluster.wait_log(name, "authentication failed", Duration::from_secs(5));
    }
    let beta = cluster.status("beta");
    assert_eq!(beta.io.writes, 0, "beta applied writes: {beta:#?}");
    cluster.stop("beta");

    // beta has no secret at all: refused with the nodes named, on both sides (beta,
    // the accepting side, refuses alpha's HELLO; alpha reads beta's REJECT).
    cluster.options = small_options(false);
    cluster.write_config();
    cluster.start("beta");
    let needles = [
        "authentication failed",
        "alpha has a secret configured, beta has none",
    ];
    wait_refusal(&cluster, "beta", "auth-failed", &needles);
    wait_refusal(&cluster, "alpha", "refused-by-peer", &needles);
    cluster.wait_log(
        "alpha",
        "connection to beta refused",
        Duration::from_secs(5),
    );
    cluster.stop("beta");

    // The right secret, from a file next to the config (with the newline an editor
    // leaves): connects, resyncs, replicates.
    std::fs::write(cluster.dir.join("r0.secret"), format!("{SHARED}\n")).expect("secret file");
    cluster.options = with_secret("secret-file = \"r0.secret\"");
    cluster.write_config();
    cluster.start("beta");
    cluster.wait_peer_connection("beta", "Connected", Duration::from_secs(20));
    cluster.wait_in_sync(Duration::from_secs(60));
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0xa5 1M 1M");
    cluster.wait_in_sync(Duration::from_secs(60));
    cluster.assert_exports_identical("alpha", "beta");
    for name in ["alpha", "beta"] {
        let json = cluster.status_json(name);
        assert_eq!(json["peer"]["connection"], "Connected", "{name}: {json}");
        assert!(json["peer"]["last_error"].is_null(), "{name}: {json}");
    }
}

/// One connection of a stranger who knows everything but the secret.
struct Stranger {
    stream: TcpStream,
}

impl Stranger {
    fn connect(port: u16) -> Stranger {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Stranger { stream }
    }

    fn send(&mut self, frame: &Frame) {
        self.stream.write_all(&frame.encode_to_vec()).expect("send");
    }

    /// The next frame, or `None` once the daemon closed the connection.
    fn receive(&mut self) -> Option<Frame> {
        let mut head = [0u8; FRAME_HEADER_BYTES];
        self.stream.read_exact(&mut head).ok()?;
        let header = engine::wire::decode_header(&head).expect("header");
        let mut body = vec![0u8; header.body_bytes as usize];
        self.stream.read_exact(&mut body).expect("body");
        Some(engine::wire::decode_body(&header, bytes::Bytes::from(body)).expect("frame"))
    }

    fn hello(channel: Channel, authenticates: bool) -> Frame {
        Frame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            channel,
            resource_uuid: engine::volume::uuid_from_name(RESOURCE),
            node_id: 0,
            resource: RESOURCE.into(),
            node: "alpha".into(),
            authenticates,
            challenge: [0x42; 32],
            proof: [0; 32],
        })
    }
}

fn expect_reject(frame: Option<Frame>, needle: &str) {
    match frame {
        Some(Frame::Reject(reason)) => {
            assert!(
                reason.contains(needle),
                "REJECT without {needle:?}: {reason}"
            )
        }
        other => panic!("expected a REJECT mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn p5_a_stranger_without_the_secret_cannot_end_the_running_session() {
    let cluster = Cluster::pair(
        "auth-stranger",
        with_secret(&format!("secret = \"{SHARED}\"")),
    );
    let beta_port = cluster.node("beta").listen_port;
    let session_before = cluster.status_json("beta")["peer"].clone();

    for round in 0..3 {
        // A data and a meta connection that claim to be alpha and answer beta's
        // challenge with a made-up proof: once the listener paired such a pair and
        // replaced the running session with it.
        let mut data = Stranger::connect(beta_port);
        data.send(&Stranger::hello(Channel::Data, true));
        match data.receive() {
            Some(Frame::Hello(answer)) => assert!(answer.authenticates, "{answer:?}"),
            other => panic!("round {round}: expected beta's HELLO, got {other:?}"),
        }
        data.send(&Frame::Auth([0x99; 32]));
        expect_reject(data.receive(), "does not match the secret of beta");
        let mut meta = Stranger::connect(beta_port);
        meta.send(&Stranger::hello(Channel::Meta, true));
        assert!(matches!(meta.receive(), Some(Frame::Hello(_))));
        meta.send(&Frame::Auth([0x99; 32]));
        expect_reject(meta.receive(), "does not match the secret of beta");
        // One that claims to have no secret at all.
        let mut plain = Stranger::connect(beta_port);
        plain.send(&Stranger::hello(Channel::Data, false));
        expect_reject(
            plain.receive(),
            "beta has a secret configured, alpha has none",
        );
    }

    // Status tells the operator someone knocked; the session is the same one.
    let json = cluster.status_json("beta");
    assert_eq!(json["peer"]["connection"], "Connected", "{json}");
    assert_eq!(json["peer"]["last_error_kind"], "auth-failed", "{json}");
    cluster.wait_log(
        "beta",
        "refused a connection: authentication failed",
        Duration::from_secs(5),
    );
    eprintln!("before: {session_before}\nafter: {}", json["peer"]);
    for name in ["alpha", "beta"] {
        let log = std::fs::read_to_string(&cluster.node(name).log).unwrap_or_default();
        assert_eq!(
            log.matches("connection:Connected").count(),
            1,
            "{name}'s session was replaced or ended:\n{}",
            cluster.log_tail(name)
        );
    }
    // And it still replicates.
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0x77 0 1M");
    cluster.wait_in_sync(Duration::from_secs(30));
    cluster.assert_exports_identical("alpha", "beta");
}
