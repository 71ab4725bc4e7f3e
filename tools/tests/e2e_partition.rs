//! Every fault ends in a defined state: real network partitions. Each node's daemon
//! runs in its own network namespace (`ip netns exec`), the two joined by a veth
//! pair; nftables in the primary's namespace drops the traffic (all of it, or only
//! the data connection's). The clients (the write-verify checker, qemu-io) reach the
//! exports over unix sockets from outside the namespaces. Each scenario ends with a
//! failover and the checker's verification: no acknowledged write lost.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

/// Small stores, NBD on unix sockets (reachable from outside the namespaces).
fn partition_options(extra: &str) -> ClusterOptions {
    ClusterOptions {
        image_bytes: 64 << 20,
        journal: "8M",
        unix_nbd: true,
        extra: extra.into(),
        ..ClusterOptions::default()
    }
}

/// alpha in the first namespace, beta in the second; alpha Primary, both in sync
/// (zeroed stores: no initial sync).
fn namespaced_pair(test: &str, options: ClusterOptions) -> (NetnsPair, Cluster) {
    let net = NetnsPair::create();
    let mut cluster = Cluster::new(test, &["alpha", "beta"], options);
    net.place(&mut cluster, "alpha", 0);
    net.place(&mut cluster, "beta", 1);
    cluster.start_fresh_pair_in_sync();
    (net, cluster)
}

/// `replctl status --json` of `name`: the peer is not Connected and carries a last
/// error kind; returns that kind.
fn peer_error_kind_in_cli_status(cluster: &Cluster, name: &str) -> String {
    let status = cluster.status_json(name);
    let peer = &status["peer"];
    assert_ne!(
        peer["connection"], "Connected",
        "{name} still sees its peer Connected across the partition: {status:#}"
    );
    let kind = peer["last_error_kind"]
        .as_str()
        .unwrap_or_else(|| panic!("{name}'s status --json has no last_error_kind: {status:#}"))
        .to_string();
    eprintln!(
        "{name} during the partition: connection {} replication {} last_error_kind {kind} ({})\n{}",
        peer["connection"],
        peer["replication"],
        peer["last_error"],
        cluster.replctl_ok(name, &["status", RESOURCE])
    );
    kind
}

/// The whole link fails: the primary notices the silence within `timeout`, goes on
/// alone in a new generation (the checker's writes complete, none hangs), both sides
/// show the peer lost with its error kind. Healed, the pair reconnects by itself and
/// resyncs what was marked; after a failover the spare holds every acknowledged write.
#[test]
fn full_partition_primary_goes_on_alone_then_resyncs_and_fails_over() {
    require_tool("qemu-io", "qemu-utils");
    let (net, mut cluster) = namespaced_pair("part-full", partition_options(""));
    let before = cluster.status("alpha");

    let writer = checker_in_background(&cluster, 32, "8", "0..10000");
    cluster.wait_writes_beyond("alpha", before.io.writes + 1000, Duration::from_secs(30));
    let beta_ip = &net.ips[1];
    let cut = Instant::now();
    net.drop_traffic(
        0,
        &[format!("ip saddr {beta_ip}")],
        &[format!("ip daddr {beta_ip}")],
    );
    cluster.wait_peer_lost("alpha", Duration::from_secs(20));
    eprintln!("alpha dropped its peer {:?} after the cut", cut.elapsed());

    // Writes go on without the peer, in a new generation, their blocks marked.
    let alone = cluster.status("alpha");
    cluster.wait_writes_beyond("alpha", alone.io.writes + 100, Duration::from_secs(20));
    let alone = cluster.wait_status(
        "alpha",
        "in a new generation with blocks marked",
        Duration::from_secs(20),
        |s| s.generation.current != before.generation.current && s.out_of_sync_bytes > 0,
    );
    assert_eq!(alone.role, "Primary");
    assert_eq!(alone.disk, "UpToDate");

    // What the operator sees on both sides while the partition holds: the peer lost
    // for silence (alpha, the dialer, then shows its failing dials instead).
    cluster.wait_peer_lost("beta", Duration::from_secs(20));
    let dialer_kinds = ["timeout", "connection-lost"];
    let kind = peer_error_kind_in_cli_status(&cluster, "alpha");
    assert!(dialer_kinds.contains(&kind.as_str()), "alpha: {kind}");
    assert_eq!(peer_error_kind_in_cli_status(&cluster, "beta"), "timeout");

    let (log, output) = writer.join().expect("checker thread");
    assert_checker_ran_out_its_time(&cluster, &output, "across the partition");
    // The partition still holds: nobody reconnected through it.
    let kind = peer_error_kind_in_cli_status(&cluster, "alpha");
    assert!(dialer_kinds.contains(&kind.as_str()), "alpha: {kind}");
    assert_eq!(peer_error_kind_in_cli_status(&cluster, "beta"), "timeout");

    net.heal(0);
    fail_over_and_verify(&mut cluster, &log, "after a full partition");
    cluster.assert_no_panic_logged("alpha");
    cluster.assert_no_panic_logged("beta");
}

/// The data connection and the meta connection of the current session, as seen in
/// namespace `side` (the heavier of the two is data: records travel on it). Call it
/// after bulk writes, so the difference is unmistakable.
fn session_connections(net: &NetnsPair, side: usize) -> [(SocketAddr, SocketAddr, u64); 2] {
    let mut connections = net.tcp_connections(side);
    assert_eq!(
        connections.len(),
        2,
        "expected the session's two connections in {}: {connections:?}",
        net.names[side]
    );
    connections.sort_by_key(|c| std::cmp::Reverse(c.2));
    let (data, meta) = (connections[0], connections[1]);
    assert!(
        data.2 >= 4 << 20 && meta.2 < data.2 / 8,
        "cannot tell the data connection from the meta connection: {connections:?}"
    );
    [data, meta]
}

/// Only the data connection black-holes (its packets dropped both ways) while the
/// meta connection keeps carrying pings: the silence watchdog never fires. The
/// primary's writes wait for the peer at most `ko-timeout`, then the peer is dropped
/// as `peer-too-slow` and the writes go on. The stuck connection is abandoned: the
/// new session's connections take new ports (as a flow hashed onto a dead path of an
/// ECMP or bonded link would), so the pair reconnects and resyncs; after healing and a
/// failover the spare holds every acknowledged write.
#[test]
fn data_only_partition_drops_the_peer_after_ko_timeout_then_resyncs_and_fails_over() {
    require_tool("qemu-io", "qemu-utils");
    let (net, mut cluster) = namespaced_pair("part-data", partition_options("ko-timeout = \"3s\""));
    // Bulk bytes through the data connection, so that ss tells it apart.
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0x5a 0 8M");
    cluster.wait_in_sync(Duration::from_secs(30));
    let [data, meta] = session_connections(&net, 0);
    eprintln!("data connection {data:?}, meta connection {meta:?}");
    let before = cluster.status("alpha");
    // An error from before (beta not yet listening when alpha first dialed) stays
    // shown until the next one.
    let earlier_error = before.peer.as_ref().and_then(|p| p.last_error.clone());

    let writer = checker_in_background(&cluster, 32, "10", "0..10000");
    cluster.wait_writes_beyond("alpha", before.io.writes + 1000, Duration::from_secs(30));
    let (local, peer) = (data.0, data.1);
    let cut = Instant::now();
    net.drop_traffic(
        0,
        &[format!(
            "ip saddr {} tcp sport {} tcp dport {}",
            peer.ip(),
            peer.port(),
            local.port()
        )],
        &[format!(
            "ip daddr {} tcp sport {} tcp dport {}",
            peer.ip(),
            local.port(),
            peer.port()
        )],
    );
    let dropped = cluster.wait_status(
        "alpha",
        "rid of the peer whose data link black-holes",
        Duration::from_secs(30),
        |s| {
            s.peer.as_ref().is_some_and(|p| {
                p.last_error_kind.as_deref() == Some("peer-too-slow")
                    || (p.last_error.is_some() && p.last_error != earlier_error)
            })
        },
    );
    eprintln!(
        "alpha dropped its peer {:?} after the cut: {:?}",
        cut.elapsed(),
        dropped.peer.as_ref().and_then(|p| p.last_error.clone())
    );
    let kind = dropped
        .peer
        .as_ref()
        .and_then(|p| p.last_error_kind.clone());
    assert_eq!(
        kind.as_deref(),
        Some("peer-too-slow"),
        "the peer must be dropped by ko-timeout (pings kept flowing), not for silence: {dropped:#?}\n{}",
        cluster.log_tail("alpha")
    );
    cluster.wait_writes_beyond("alpha", dropped.io.writes + 100, Duration::from_secs(20));
    let status = cluster.status_json("alpha");
    eprintln!(
        "alpha after the drop: connection {} last_error_kind {}",
        status["peer"]["connection"], status["peer"]["last_error_kind"]
    );
    let (log, output) = writer.join().expect("checker thread");
    assert_checker_ran_out_its_time(&cluster, &output, "while the data link black-holed");

    // The new session does not use the black-holed flow.
    cluster.wait_in_sync(Duration::from_secs(60));
    let now = net.tcp_connections(0);
    assert!(
        now.iter().all(|c| c.0 != local || c.1 != peer),
        "the stuck data connection is still established: {now:?}"
    );

    net.heal(0);
    fail_over_and_verify(&mut cluster, &log, "after a data-only partition");
    cluster.assert_no_panic_logged("alpha");
    cluster.assert_no_panic_logged("beta");
}

/// The data link black-holes for good while small packets pass: every packet
/// between the nodes longer than 1000 bytes is dropped (a path MTU black hole: a
/// tunnel or jumbo-frame mismatch that drops big frames without an ICMP error).
/// HELLOs, pings and acknowledgements pass; records and resync data never arrive,
/// on every new connection too. Under writes the primary drops the peer every
/// `ko-timeout` and the writes go on (none hangs). Once the writes stop, what is left
/// is the resync of the marked blocks, which cannot progress either: that must end
/// in a defined state too — the stalled session dropped with an error (and retried),
/// not a pair that shows `Connected`/`SyncSource` forever with nothing moving.
/// Healed, the pair resyncs and the spare holds every acknowledged write.
#[test]
fn bulk_black_hole_a_stalled_resync_is_noticed_not_shown_connected_forever() {
    require_tool("qemu-io", "qemu-utils");
    let (net, mut cluster) = namespaced_pair("part-bulk", partition_options("ko-timeout = \"3s\""));
    let events = EventLog::start(&cluster, "alpha");
    let before = cluster.status("alpha");

    let writer = checker_in_background(&cluster, 32, "8", "0..10000");
    cluster.wait_writes_beyond("alpha", before.io.writes + 1000, Duration::from_secs(30));
    let beta_ip = &net.ips[1];
    net.drop_traffic(
        0,
        &[format!("ip saddr {beta_ip} meta length > 1000")],
        &[format!("ip daddr {beta_ip} meta length > 1000")],
    );
    events.wait_for("(ko-timeout)", Duration::from_secs(30));
    let (log, output) = writer.join().expect("checker thread");
    assert_checker_ran_out_its_time(&cluster, &output, "while big packets were black-holed");

    // No more writes: once the pair has reconnected, only the resync is left, and it
    // cannot move. Within a few ko-timeouts the stalled session must end (an event),
    // not sit there.
    cluster.wait_status(
        "alpha",
        "reconnected as resync source",
        Duration::from_secs(30),
        |s| {
            s.peer
                .as_ref()
                .is_some_and(|p| p.connection == "Connected" && p.replication == "SyncSource")
        },
    );
    let seen = events.text().lines().count();
    let idle = Instant::now();
    let mut samples = Vec::new();
    let noticed = loop {
        let text = events.text();
        if let Some(line) = text
            .lines()
            .skip(seen)
            .find(|line| line.contains("connection:Connecting"))
        {
            break Some(line.to_string());
        }
        if idle.elapsed() > Duration::from_secs(20) {
            break None;
        }
        let status = cluster.status("alpha");
        if let Some(peer) = &status.peer {
            samples.push(format!(
                "{:>4.1}s {} {} peer-disk {:?} remaining {} B resynced {} B",
                idle.elapsed().as_secs_f64(),
                peer.connection,
                peer.replication,
                peer.peer_disk,
                peer.resync_remaining_bytes,
                peer.resync_bytes
            ));
        }
        std::thread::sleep(Duration::from_millis(1000));
    };
    assert!(
        noticed.is_some(),
        "the resync stalled behind the black hole for 20 s and nothing noticed: the pair \
         still shows it as running, with no error; alpha's peer once a second:\n{}\nevents:\n{}\n{}",
        samples.join("\n"),
        events.text(),
        cluster.log_tail("alpha")
    );
    eprintln!(
        "the stalled session ended after {:?}: {}\nevents:\n{}",
        idle.elapsed(),
        noticed.unwrap_or_default(),
        events.text()
    );

    net.heal(0);
    fail_over_and_verify(&mut cluster, &log, "after a bulk black hole");
    cluster.assert_no_panic_logged("alpha");
    cluster.assert_no_panic_logged("beta");
}
