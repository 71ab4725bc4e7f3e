//! Prometheus metrics of a real daemon pair: every scrape passes `promtool check
//! metrics`, and the series follow the state — role after a promotion, written bytes
//! after writes, replication lag while the link is slow, out-of-sync bytes after a
//! disconnect and writes (and back to zero after the resync), the failover duration
//! after the Primary dies. A real Prometheus server scrapes a daemon too.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: f64 = 1024.0 * 1024.0;

fn series(name: &str, labels: &str) -> String {
    format!("{name}{{resource=\"{RESOURCE}\"{labels}}}")
}

/// The value of `name{resource="r0"<labels>}` in a scrape (fails the test if absent).
fn value(text: &str, name: &str, labels: &str) -> f64 {
    let series = series(name, labels);
    metric(text, &series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn role(text: &str, role: &str) -> f64 {
    value(text, "replicad_resource_role", &format!(",role=\"{role}\""))
}

fn connection(text: &str, peer: &str, state: &str) -> f64 {
    value(
        text,
        "replicad_connection_state",
        &format!(",peer=\"{peer}\",state=\"{state}\""),
    )
}

fn of_peer(text: &str, name: &str, peer: &str) -> f64 {
    value(text, name, &format!(",peer=\"{peer}\""))
}

#[test]
fn metrics_follow_the_state_of_a_pair_and_pass_promtool() {
    // async: a write completes before the peer has it, so a slow link shows as lag.
    let options = ClusterOptions {
        mode: "async",
        timeout: "6s",
        metrics: true,
        ..small_options(true)
    };
    let mut cluster = Cluster::new("metrics-pair", &["alpha", "beta"], options);
    cluster.create_md_all();
    cluster.start_all();

    // Both Secondary and connected: no promotion yet, no failover to time.
    let text = cluster.wait_metrics(
        "alpha",
        "the peer connected",
        Duration::from_secs(30),
        |t| {
            metric(
                t,
                &series(
                    "replicad_connection_state",
                    ",peer=\"beta\",state=\"Connected\"",
                ),
            ) == Some(1.0)
        },
    );
    promtool_check(&text);
    assert_eq!(role(&text, "Secondary"), 1.0, "{text}");
    assert_eq!(role(&text, "Primary"), 0.0, "{text}");
    assert_eq!(connection(&text, "beta", "StandAlone"), 0.0, "{text}");
    assert_eq!(value(&text, "replicad_promotions_total", ""), 0.0);
    assert!(!text.contains("replicad_last_failover_seconds{"), "{text}");
    assert!(value(&text, "replicad_journal_size_bytes", "") > 0.0);

    // Promotion: the role series flip, the promotion is counted and timed.
    cluster.replctl_ok("alpha", &["promote", RESOURCE, "--force"]);
    cluster.wait_in_sync(Duration::from_secs(120));
    let text = cluster.scrape("alpha");
    promtool_check(&text);
    assert_eq!(role(&text, "Primary"), 1.0, "{text}");
    assert_eq!(role(&text, "Secondary"), 0.0, "{text}");
    assert_eq!(value(&text, "replicad_promotions_total", ""), 1.0);
    assert!(value(&text, "replicad_last_failover_seconds", "") >= 0.0);
    assert_eq!(
        value(&text, "replicad_device_state", ",state=\"UpToDate\""),
        1.0
    );
    assert_eq!(
        role(&cluster.scrape("beta"), "Secondary"),
        1.0,
        "beta stays Secondary"
    );
    let written = value(&text, "replicad_device_written_bytes_total", "");

    // Writes: the written-bytes counter grows by at least what was written.
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0x5a 0 1M");
    let text = cluster.scrape("alpha");
    promtool_check(&text);
    let now_written = value(&text, "replicad_device_written_bytes_total", "");
    assert!(
        now_written >= written + MIB,
        "written bytes went from {written} to {now_written} after a 1 MiB write"
    );
    let journal = value(&text, "replicad_journal_fill_ratio", "");
    assert!((0.0..=1.0).contains(&journal), "journal fill {journal}");

    // A slow link: a second each way. What alpha shipped waits two seconds for the
    // peer's ACK_WRITTEN; the lag shows its size and age meanwhile.
    let proxy = cluster.proxy.as_ref().expect("proxy");
    proxy.set_delay(Duration::from_secs(1));
    let uri = cluster.uri("alpha");
    let writer = std::thread::spawn(move || qemu_io(&uri, false, "write -P 0x6b 1M 256k"));
    let text = cluster.wait_metrics("alpha", "a replication lag", Duration::from_secs(30), |t| {
        metric(
            t,
            &series("replicad_replication_lag_bytes", ",peer=\"beta\""),
        )
        .is_some_and(|bytes| bytes >= 256.0 * 1024.0)
            && metric(
                t,
                &series("replicad_replication_lag_seconds", ",peer=\"beta\""),
            )
            .is_some_and(|seconds| seconds > 0.2)
    });
    promtool_check(&text);
    proxy.set_delay(Duration::ZERO);
    let (ok, output) = writer.join().expect("writer thread");
    assert!(ok, "qemu-io write: {output}");
    let text = cluster.wait_metrics("alpha", "the lag gone", Duration::from_secs(30), |t| {
        metric(
            t,
            &series("replicad_replication_lag_bytes", ",peer=\"beta\""),
        ) == Some(0.0)
            && metric(
                t,
                &series("replicad_replication_lag_seconds", ",peer=\"beta\""),
            ) == Some(0.0)
    });
    assert_eq!(
        of_peer(&text, "replicad_peerdevice_outofsync_bytes", "beta"),
        0.0
    );
    let resynced = of_peer(&text, "replicad_peerdevice_resync_bytes_total", "beta");

    // Disconnected, the Primary goes on writing: the peer misses those blocks.
    cluster.replctl_ok("alpha", &["disconnect", RESOURCE]);
    let text = cluster.wait_metrics("alpha", "StandAlone", Duration::from_secs(30), |t| {
        metric(
            t,
            &series(
                "replicad_connection_state",
                ",peer=\"beta\",state=\"StandAlone\"",
            ),
        ) == Some(1.0)
    });
    assert_eq!(connection(&text, "beta", "Connected"), 0.0, "{text}");
    qemu_io_ok(&cluster.uri("alpha"), false, "write -P 0x7c 4M 64k");
    let text = cluster.scrape("alpha");
    promtool_check(&text);
    let missed = of_peer(&text, "replicad_peerdevice_outofsync_bytes", "beta");
    assert!(
        missed >= 64.0 * 1024.0,
        "64 KiB written while disconnected, out of sync: {missed}"
    );
    assert_eq!(
        value(
            &text,
            "replicad_peerdevice_replication_state",
            ",peer=\"beta\",state=\"Off\""
        ),
        1.0
    );

    // Reconnected: the resync sends them and the gauge falls back to zero.
    cluster.replctl_ok("alpha", &["connect", RESOURCE]);
    let text = cluster.wait_metrics("alpha", "in sync again", Duration::from_secs(60), |t| {
        metric(
            t,
            &series("replicad_peerdevice_outofsync_bytes", ",peer=\"beta\""),
        ) == Some(0.0)
            && metric(
                t,
                &series(
                    "replicad_peerdevice_replication_state",
                    ",peer=\"beta\",state=\"Established\"",
                ),
            ) == Some(1.0)
    });
    promtool_check(&text);
    let now_resynced = of_peer(&text, "replicad_peerdevice_resync_bytes_total", "beta");
    assert!(
        now_resynced >= resynced + 64.0 * 1024.0,
        "resync bytes went from {resynced} to {now_resynced}"
    );

    // The Primary dies; beta is promoted: its failover is timed from the loss.
    cluster.kill9("alpha");
    cluster.wait_peer_lost("beta", Duration::from_secs(30));
    cluster.replctl_ok("beta", &["promote", RESOURCE, "--force"]);
    let text = cluster.scrape("beta");
    promtool_check(&text);
    assert_eq!(role(&text, "Primary"), 1.0, "{text}");
    assert_eq!(value(&text, "replicad_promotions_total", ""), 1.0);
    assert!(
        value(&text, "replicad_last_failover_seconds", "") > 0.0,
        "{text}"
    );
    assert_eq!(connection(&text, "alpha", "Connected"), 0.0, "{text}");
    cluster.assert_no_panic_logged("beta");
}

/// A promoted one-node resource that serves metrics.
fn metrics_single_node(test: &str) -> Cluster {
    let options = ClusterOptions {
        metrics: true,
        ..small_options(false)
    };
    single_node(test, options)
}

#[test]
fn the_metrics_listener_answers_only_metrics_and_survives_garbage() {
    let cluster = metrics_single_node("metrics-http");
    let address = cluster.metrics_address("alpha");
    let (code, _) = http_get(&address, "/").expect("GET /");
    assert_eq!(code, 404);
    // Garbage and a silent client: the daemon drops them and goes on serving.
    {
        use std::io::Write;
        let mut garbage = std::net::TcpStream::connect(&address).expect("connect");
        garbage
            .write_all(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
            .expect("send garbage");
        let _silent = std::net::TcpStream::connect(&address).expect("connect");
        let text = cluster.scrape("alpha");
        promtool_check(&text);
        assert_eq!(role(&text, "Primary"), 1.0, "{text}");
        // A one-node resource has no peer series.
        assert!(!text.contains("peer=\""), "{text}");
    }
    cluster.assert_no_panic_logged("alpha");
}

/// A Prometheus server, killed on drop.
struct PrometheusServer {
    child: Child,
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrometheusServer {
    fn start(dir: &Path, target: &str) -> (PrometheusServer, String) {
        require_tool("prometheus", "prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: replicad\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus.yml");
        let web = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        (PrometheusServer { child }, web)
    }
}

/// The first sample of an instant query `query` to the Prometheus at `web`, if any.
fn query(web: &str, query: &str) -> Option<f64> {
    let encoded: String = query
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' => (byte as char).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect();
    let (code, body) = http_get(web, &format!("/api/v1/query?query={encoded}")).ok()?;
    if code != 200 {
        return None;
    }
    let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
    answer["data"]["result"][0]["value"][1]
        .as_str()?
        .parse()
        .ok()
}

#[test]
fn a_real_prometheus_scrapes_the_daemon() {
    let cluster = metrics_single_node("metrics-prometheus");
    let (mut server, web) =
        PrometheusServer::start(&cluster.dir, &cluster.metrics_address("alpha"));
    let log = cluster.dir.join("prometheus.log");
    wait_until(
        "Prometheus to have scraped the daemon",
        Duration::from_secs(90),
        || {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "prometheus exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let up = query(&web, "up{job=\"replicad\"}")?;
            let primary = query(
                &web,
                "replicad_resource_role{job=\"replicad\",resource=\"r0\",role=\"Primary\"}",
            )?;
            (up == 1.0 && primary == 1.0).then_some(())
        },
    );
    // Prometheus stored every family the daemon serves (a one-node resource: no
    // peer series).
    let served = cluster.scrape("alpha").matches("# TYPE replicad_").count() as f64;
    let stored = wait_until(
        "Prometheus to store every family",
        Duration::from_secs(30),
        || {
            let stored = query(
                &web,
                "count(count by (__name__) ({job=\"replicad\",__name__=~\"replicad_.*\"}))",
            )?;
            (stored >= served).then_some(stored)
        },
    );
    assert_eq!(stored, served, "families stored by Prometheus vs served");
}
