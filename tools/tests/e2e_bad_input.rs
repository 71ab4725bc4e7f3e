//! P5 end to end: bad input gets a clear error and changes nothing.
//!
//! Each NBD test starts a real one-node `replicad`, connects a well-behaved *witness*
//! client that writes a known pattern, then attacks the daemon with a raw socket that
//! speaks (or breaks) the NBD protocol by hand. Every attack gets the answer the NBD
//! specification prescribes or a closed connection; meanwhile and afterwards the daemon
//! runs, answers `status`, serves the witness and new clients, no refused request reached
//! the volume (its write counter did not move) and the pattern is unchanged.
//!
//! The last tests cover the command line: a bad config file and a missing daemon.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use replicad::nbd::proto;

const PATTERN_OFFSET: u64 = 1 << 20;
const PATTERN_BYTES: usize = 1 << 20;
const MIB: u32 = 1 << 20;

/// A well-behaved client that keeps checking it is served.
struct Witness {
    client: RawNbd,
    pattern: Vec<u8>,
}

impl Witness {
    fn start(port: u16) -> Witness {
        let mut client = RawNbd::open(port, RESOURCE);
        let pattern = pattern_bytes(0x5A, PATTERN_BYTES);
        assert_eq!(client.write(PATTERN_OFFSET, &pattern, false), 0);
        assert_eq!(client.flush(), 0);
        Witness { client, pattern }
    }

    /// Reads the pattern back on the witness's own connection.
    fn check(&mut self, when: &str) {
        assert_pattern(&mut self.client, &self.pattern, when);
    }
}

fn assert_pattern(client: &mut RawNbd, pattern: &[u8], when: &str) {
    let data = client
        .read(PATTERN_OFFSET, pattern.len() as u32)
        .unwrap_or_else(|error| panic!("reading the pattern {when}: NBD error {error}"));
    assert!(data == pattern, "the pattern changed {when}");
}

/// Runs `attack` against a fresh one-node daemon (given its NBD port and the witness),
/// then checks that nothing was harmed.
fn survives(test: &str, attack: impl FnOnce(u16, &mut Witness)) {
    let mut cluster = single_node(test, ClusterOptions::default());
    let port = cluster.node("alpha").nbd_port;
    let mut witness = Witness::start(port);
    let before = cluster.status("alpha").io;

    attack(port, &mut witness);

    assert!(
        cluster.is_running("alpha"),
        "replicad died:\n{}",
        cluster.log_tail("alpha")
    );
    let status: serde_json::Value =
        serde_json::from_str(&cluster.replctl_ok("alpha", &["status", RESOURCE, "--json"]))
            .expect("status --json is JSON");
    assert_eq!(status[0]["role"], "Primary");
    assert_eq!(status[0]["disk"], "UpToDate");
    let after = cluster.status("alpha").io;
    assert_eq!(
        (after.writes, after.write_bytes),
        (before.writes, before.write_bytes),
        "a refused request reached the volume"
    );
    witness.check("after the attack");
    let mut fresh = RawNbd::open(port, RESOURCE);
    assert_pattern(&mut fresh, &witness.pattern, "on a new connection");
    cluster.assert_no_panic_logged("alpha");
}

/// A raw client past the greeting that sent valid client flags.
fn haggling(port: u16) -> RawNbd {
    let mut client = RawNbd::greeted(port);
    client.send(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes());
    client
}

fn option_header(option: u32, length: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    proto::OptionHeader { option, length }.encode(&mut bytes);
    bytes
}

fn request_header(command: u16, offset: u64, length: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    proto::RequestHeader {
        flags: 0,
        command,
        cookie: 99,
        offset,
        length,
    }
    .encode(&mut bytes);
    bytes
}

// ---------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------

#[test]
fn p5_bad_client_flags_and_bad_magic_close_only_that_connection() {
    survives("bad-magic", |port, witness| {
        // Unknown client flags: the spec says the server MUST close the connection.
        let mut bad = RawNbd::greeted(port);
        bad.send(&0xFFFF_FFFFu32.to_be_bytes());
        assert_eq!(bad.expect_closed(), b"", "unknown client flags");
        witness.check("after unknown client flags");

        // A client that does not speak fixed newstyle.
        let mut bad = RawNbd::greeted(port);
        bad.send(&0u32.to_be_bytes());
        assert_eq!(
            bad.expect_closed(),
            b"",
            "client flags without fixed newstyle"
        );

        // An option with the wrong magic.
        let mut bad = haggling(port);
        let mut header = option_header(proto::OPT_GO, 0);
        header[..8].copy_from_slice(b"IHAVEOPS");
        bad.send(&header);
        assert_eq!(bad.expect_closed(), b"", "wrong option magic");
        witness.check("after a wrong option magic");

        // A request with the wrong magic in the transmission phase.
        let mut bad = RawNbd::open(port, RESOURCE);
        let mut header = request_header(proto::CMD_WRITE, PATTERN_OFFSET, 4096);
        header[..4].copy_from_slice(&0xDEAD_BEEFu32.to_be_bytes());
        header.extend_from_slice(&[0xEE; 4096]);
        bad.send(&header);
        assert_eq!(bad.expect_closed(), b"", "wrong request magic");
        witness.check("after a wrong request magic");
    });
}

#[test]
fn p5_truncated_handshakes_are_closed_and_harm_nothing() {
    survives("truncated-handshake", |port, witness| {
        // Connect and close at once, without reading the greeting.
        drop(RawNbd::connect(port));
        // Half the client flags, then close.
        let mut bad = RawNbd::greeted(port);
        bad.send(&[0, 0]);
        drop(bad);
        // Half an option header, then close.
        let mut bad = haggling(port);
        bad.send(&option_header(proto::OPT_GO, 0)[..8]);
        drop(bad);
        // An option announcing more data than comes, then close.
        let mut bad = haggling(port);
        let mut message = option_header(proto::OPT_GO, 20);
        message.extend_from_slice(&[0, 0, 0, 2, b'r']);
        bad.send(&message);
        drop(bad);
        // Half a request header in the transmission phase, then close.
        let mut bad = RawNbd::open(port, RESOURCE);
        bad.send(&request_header(proto::CMD_READ, 0, 4096)[..10]);
        drop(bad);
        witness.check("after truncated handshakes");

        // A handshake stuck half-way does not hold anyone else up.
        let mut stuck = RawNbd::greeted(port);
        stuck.send(&[0, 0]);
        let mut stuck_option = haggling(port);
        stuck_option.send(&option_header(proto::OPT_GO, 20)[..10]);
        witness.check("while two handshakes hang half-way");
        let mut fresh = RawNbd::open(port, RESOURCE);
        assert_pattern(
            &mut fresh,
            &witness.pattern,
            "on a new connection while two handshakes hang",
        );
    });
}

#[test]
fn p5_absurd_option_length_closes_the_connection() {
    survives("absurd-option", |port, witness| {
        for option in [proto::OPT_GO, proto::OPT_LIST, 0xDEAD] {
            let mut bad = haggling(port);
            bad.send(&option_header(option, 0xFFFF_FFF0));
            assert_eq!(
                bad.expect_closed(),
                b"",
                "option {option:#x} announcing 0xFFFF_FFF0 bytes"
            );
            witness.check("after an absurd option length");
        }
        // Malformed option data of a sane length gets NBD_REP_ERR_INVALID, and haggling
        // goes on: the same connection then enters transmission.
        let mut client = haggling(port);
        let mut message = option_header(proto::OPT_GO, 6);
        message.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xF0, 0, 0]);
        client.send(&message);
        let reply = client.read_exactly(proto::OPTION_REPLY_HEADER_BYTES);
        let reply = proto::OptionReplyHeader::parse(&reply).expect("option reply");
        assert_eq!(reply.reply_type, proto::REP_ERR_INVALID, "{reply:?}");
        client.read_exactly(reply.length as usize);
        client.go(RESOURCE).expect("GO after an invalid option");
        assert_pattern(
            &mut client,
            &witness.pattern,
            "after an invalid option on the same connection",
        );
    });
}

// ---------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------

#[test]
fn p5_unknown_commands_and_flags_get_einval_and_the_connection_goes_on() {
    survives("unknown-command", |port, witness| {
        let mut client = RawNbd::open(port, RESOURCE);
        // Unknown commands, and ones this server does not advertise.
        for command in [0x55, 0xFFFF, proto::CMD_CACHE, proto::CMD_BLOCK_STATUS] {
            assert_eq!(
                client.call(command, 0, PATTERN_OFFSET, 4096),
                proto::NBD_EINVAL,
                "command {command:#x}"
            );
        }
        // Known commands with flags they do not take; a refused write's payload is
        // skipped, so the stream stays in step.
        assert_eq!(
            client.call(proto::CMD_READ, proto::CMD_FLAG_DF, PATTERN_OFFSET, 4096),
            proto::NBD_EINVAL
        );
        let cookie = client.request(
            proto::CMD_WRITE,
            proto::CMD_FLAG_NO_HOLE,
            PATTERN_OFFSET,
            4096,
            &[0xEE; 4096],
        );
        assert_eq!(client.reply(cookie), proto::NBD_EINVAL);
        // FLUSH with arguments.
        assert_eq!(
            client.call(proto::CMD_FLUSH, 0, PATTERN_OFFSET, 4096),
            proto::NBD_EINVAL
        );
        witness.check("after unknown commands");
        assert_pattern(&mut client, &witness.pattern, "on the same connection");
    });
}

#[test]
fn p5_requests_beyond_the_end_get_einval_or_enospc() {
    survives("beyond-end", |port, witness| {
        let mut client = RawNbd::open(port, RESOURCE);
        let size = client.size_bytes;
        let tail_before = client.read(size - 4096, 4096).expect("read the tail");
        // Reads and trims beyond the end: EINVAL; writes: ENOSPC (the spec's answers),
        // including offsets whose end overflows 64 bits.
        for (offset, length) in [(size - 512, 1024), (size, 1), (u64::MAX - 10, 4096)] {
            assert_eq!(
                client.read(offset, length),
                Err(proto::NBD_EINVAL),
                "read {length} at {offset}"
            );
            assert_eq!(
                client.call(proto::CMD_TRIM, 0, offset, length),
                proto::NBD_EINVAL,
                "trim {length} at {offset}"
            );
            assert_eq!(
                client.call(proto::CMD_WRITE_ZEROES, 0, offset, length),
                proto::NBD_ENOSPC,
                "write-zeroes {length} at {offset}"
            );
            let payload = vec![0xEE; length as usize];
            assert_eq!(
                client.write(offset, &payload, true),
                proto::NBD_ENOSPC,
                "write {length} at {offset}"
            );
            witness.check("after requests beyond the end");
        }
        // The part of a refused write that was in range was not written either.
        assert_eq!(client.read(size - 4096, 4096), Ok(tail_before));
        assert!(
            client.read(size - 1, 1).is_ok(),
            "the last byte is readable"
        );
        assert_pattern(&mut client, &witness.pattern, "on the same connection");
    });
}

#[test]
fn p5_requests_above_32_mib_are_refused() {
    survives("above-32mib", |port, witness| {
        let mut client = RawNbd::open(port, RESOURCE);
        // 32 MiB is allowed; a read above it is refused and the connection goes on.
        assert!(client.read(0, 32 * MIB).is_ok(), "a 32 MiB read");
        for length in [32 * MIB + 1, u32::MAX] {
            assert_eq!(
                client.read(0, length),
                Err(proto::NBD_EINVAL),
                "read of {length}"
            );
        }
        assert_pattern(&mut client, &witness.pattern, "after oversized reads");
        // A write above it announces a payload too large to skip: EINVAL, then the
        // server closes the connection without reading the payload.
        let cookie = client.request(proto::CMD_WRITE, 0, PATTERN_OFFSET, 32 * MIB + 4096, &[]);
        assert_eq!(client.reply(cookie), proto::NBD_EINVAL);
        assert_eq!(client.expect_closed(), b"", "after an oversized write");
        witness.check("after an oversized write");
    });
}

#[test]
fn p5_client_disconnecting_mid_write_changes_nothing() {
    survives("mid-write", |port, witness| {
        // Half of a 1 MiB write over the pattern, then the client closes its side:
        // the server notices and closes too.
        let mut client = RawNbd::open(port, RESOURCE);
        let mut message = request_header(proto::CMD_WRITE, PATTERN_OFFSET, MIB);
        message.extend_from_slice(&vec![0xEE; MIB as usize / 2]);
        client.send(&message);
        client
            .stream
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        assert_eq!(client.expect_closed(), b"", "after a half write");
        witness.check("after a client left mid-write");

        // The same with FUA and the socket simply dropped, after full writes elsewhere
        // are already in flight on the connection.
        let mut client = RawNbd::open(port, RESOURCE);
        let mut message = request_header(proto::CMD_WRITE, PATTERN_OFFSET, MIB);
        message[4..6].copy_from_slice(&proto::CMD_FLAG_FUA.to_be_bytes());
        message.extend_from_slice(&vec![0xEE; MIB as usize - 1]);
        client.send(&message);
        drop(client);
        witness.check("after a client dropped mid-write");
    });
}

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

/// A directory for tests that need no cluster.
fn scratch_dir(test: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("e2e-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Runs a binary; returns (exit code, stdout, stderr).
fn run(program: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = run_with_timeout(Command::new(program).args(args), Duration::from_secs(30));
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A valid one-node config body with `replace` substituted for `line`.
fn config_with(dir: &std::path::Path, line: &str, replace: &str) -> String {
    let valid = format!(
        "[resource.r0]\nmode = \"sync\"\njournal-size = \"16M\"\ntimeout = \"2s\"\nping-interval = \"200ms\"\n\
         [resource.r0.nodes.alpha]\naddress = \"127.0.0.1:7788\"\ndisk = \"{}\"\nnbd = \"127.0.0.1:10809\"\ncontrol = \"{}\"\n",
        dir.join("alpha.img").display(),
        dir.join("alpha.ctl").display()
    );
    assert!(valid.contains(line), "no line {line:?} in the config");
    valid.replace(line, replace)
}

#[test]
fn p5_bad_config_gives_a_one_line_error_naming_the_key_and_exit_1() {
    let dir = scratch_dir("bad-config");
    // (line of a valid config, its bad replacement, what the error must name)
    let cases = [
        ("mode = \"sync\"", "mode = \"fast\"", "mode"),
        ("mode = \"sync\"", "mode = \"sync\"\nspeed = 3", "speed"),
        (
            "journal-size = \"16M\"",
            "journal-size = \"16Q\"",
            "journal-size",
        ),
        (
            "journal-size = \"16M\"",
            "journal-size = \"4K\"",
            "journal-size",
        ),
        ("timeout = \"2s\"", "timeout = \"2 weeks\"", "timeout"),
        (
            "ping-interval = \"200ms\"",
            "ping-interval = \"5s\"",
            "ping-interval",
        ),
        ("nbd = \"127.0.0.1:10809\"", "nbd = \"localhost\"", "nbd"),
        (
            "address = \"127.0.0.1:7788\"",
            "address = \"127.0.0.1\"",
            "address",
        ),
        ("disk = ", "disc = ", "disk"),
    ];
    for (index, (line, replace, key)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad-{index}.toml"));
        std::fs::write(&path, config_with(&dir, line, replace)).expect("write config");
        let path = path.to_str().expect("utf-8 path");
        for program in [REPLICAD, REPLCTL] {
            let args: &[&str] = if program == REPLICAD {
                &["--config", path, "--node", "alpha"]
            } else {
                &["--config", path, "--node", "alpha", "status"]
            };
            let (code, _, stderr) = run(program, args);
            let name = std::path::Path::new(program)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(program);
            assert_eq!(code, Some(1), "{name} with {replace:?}: {stderr}");
            let message = stderr.trim_end();
            assert!(
                !message.is_empty() && !message.contains('\n'),
                "{name} with {replace:?}: the error is not one line:\n{stderr}"
            );
            assert!(
                message.contains(key),
                "{name} with {replace:?}: the error does not name {key:?}: {message}"
            );
        }
    }
    // A config file that does not exist.
    let missing = dir.join("missing.toml");
    let (code, _, stderr) = run(
        REPLICAD,
        &["--config", missing.to_str().expect("utf-8 path")],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.trim_end().lines().count() == 1 && stderr.contains("missing.toml"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replctl_without_a_daemon_says_so_and_exits_1() {
    let dir = scratch_dir("no-daemon");
    let path = dir.join("replicad.toml");
    std::fs::write(
        &path,
        config_with(&dir, "mode = \"sync\"", "mode = \"sync\""),
    )
    .unwrap();
    let path = path.to_str().expect("utf-8 path");
    for command in [
        &["status"][..],
        &["status", "r0", "--json"],
        &["promote", "r0"],
    ] {
        let mut args = vec!["--config", path, "--node", "alpha", "--timeout", "5"];
        args.extend_from_slice(command);
        let (code, stdout, stderr) = run(REPLCTL, &args);
        assert_eq!(code, Some(1), "replctl {command:?}: {stdout}{stderr}");
        let message = stderr.trim_end();
        assert!(
            !message.contains('\n') && message.contains("alpha.ctl"),
            "replctl {command:?} does not name the control socket it tried: {stderr}"
        );
        assert!(
            message.to_lowercase().contains("running"),
            "replctl {command:?} does not say the daemon is not running: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replctl_and_replicad_version_and_help_work() {
    let (code, stdout, stderr) = run(REPLCTL, &["--version"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("replctl "), "{stdout}");
    let (code, stdout, stderr) = run(REPLICAD, &["--version"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("replicad "), "{stdout}");
    let (code, stdout, stderr) = run(REPLCTL, &["status", "--help"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("--json") && stdout.contains("Usage"),
        "{stdout}"
    );
    // A usage error is exit code 2.
    let (code, _, stderr) = run(REPLCTL, &["no-such-command"]);
    assert_eq!(code, Some(2), "{stderr}");
}
