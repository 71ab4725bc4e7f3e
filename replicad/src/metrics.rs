//! Prometheus metrics: with `metrics = "IP:PORT"` in its node section, a daemon serves
//! `GET /metrics` there in the Prometheus text format (0.0.4), one set of series per
//! resource it runs.
//!
//! Every value is read at scrape time from the same status `replctl status --json`
//! shows ([`Resource::status`]), so the two never disagree. Names follow
//! drbd-reactor's exporter where they mean the same (`…_resource_role`,
//! `…_device_written_bytes_total`, `…_peerdevice_outofsync_bytes`,
//! `…_connection_state`); state gauges are drbd-reactor's "enums" form, one series per
//! possible value, 1 for the current one. [`METRICS`] lists them all (docs/OPERATIONS.md
//! documents each; a test keeps the two in step).

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use engine::repl::{ConnectionState, DiskState, ReplicationState, Role};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::control::{PeerStatus, ResourceStatus};
use crate::resource::Resource;

/// One exported metric family. Counters get `_total` appended by the encoder.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: MetricType,
    pub help: &'static str,
}

impl Metric {
    /// The name as it appears in the exposition (`_total` on counters).
    pub fn exposed_name(&self) -> String {
        match self.kind {
            MetricType::Counter => format!("{}_total", self.name),
            _ => self.name.to_string(),
        }
    }
}

const fn gauge(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: MetricType::Gauge,
        help,
    }
}

const fn counter(name: &'static str, help: &'static str) -> Metric {
    Metric {
        name,
        kind: MetricType::Counter,
        help,
    }
}

const ROLE: Metric = gauge(
    "replicad_resource_role",
    "Role of this node for the resource: 1 for the current role",
);
const DEVICE_STATE: Metric = gauge(
    "replicad_device_state",
    "Disk state of this node's store: 1 for the current state",
);
const SIZE: Metric = gauge(
    "replicad_device_size_bytes",
    "Size of the exported device in bytes",
);
const READ: Metric = counter(
    "replicad_device_read_bytes",
    "Bytes read by clients since the daemon started",
);
const WRITTEN: Metric = counter(
    "replicad_device_written_bytes",
    "Bytes written by clients since the daemon started",
);
const CHECKSUM_ERRORS: Metric = counter(
    "replicad_device_checksum_errors",
    "Blocks whose stored checksum did not match on read, since the daemon started",
);
const REPAIRED: Metric = counter(
    "replicad_device_repaired_bytes",
    "Bytes of blocks repaired from the peer (after a checksum error or by verify --repair) since the daemon started",
);
const READS_LOCAL: Metric = counter(
    "replicad_device_reads_local",
    "Client reads served by this node's own store since the daemon started",
);
const JOURNAL_USED: Metric = gauge(
    "replicad_journal_used_bytes",
    "Bytes of the journal ring holding records not yet checkpointed",
);
const JOURNAL_SIZE: Metric = gauge(
    "replicad_journal_size_bytes",
    "Size of the journal ring in bytes",
);
const JOURNAL_FILL: Metric = gauge(
    "replicad_journal_fill_ratio",
    "Fraction of the journal ring in use (used / size)",
);
const CACHE_HITS: Metric = counter(
    "replicad_checksum_cache_hits",
    "Checksum-table lookups that found their page in the cache, since the daemon started",
);
const CACHE_MISSES: Metric = counter(
    "replicad_checksum_cache_misses",
    "Checksum-table lookups that read their page from the store, since the daemon started",
);
const CACHE_EVICTIONS: Metric = counter(
    "replicad_checksum_cache_evictions",
    "Checksum-table pages dropped from the cache to make room, since the daemon started",
);
const CACHE_RESIDENT: Metric = gauge(
    "replicad_checksum_cache_resident_bytes",
    "Bytes of checksum-table pages held in the cache",
);
const CACHE_LIMIT: Metric = gauge(
    "replicad_checksum_cache_limit_bytes",
    "The configured bound of the checksum-table cache (checksum-cache)",
);
const PROMOTIONS: Metric = counter(
    "replicad_promotions",
    "Promotions of this node to Primary since the daemon started",
);
const LAST_FAILOVER: Metric = gauge(
    "replicad_last_failover_seconds",
    "Duration of the last promotion of this node: from the loss of the Primary peer (or the promote request when none was lost) to Primary; absent before the first",
);
const CONNECTION_STATE: Metric = gauge(
    "replicad_connection_state",
    "Connection state to the peer: 1 for the current state",
);
const REPLICATION_STATE: Metric = gauge(
    "replicad_peerdevice_replication_state",
    "Replication state with the peer: 1 for the current state",
);
const OUT_OF_SYNC: Metric = gauge(
    "replicad_peerdevice_outofsync_bytes",
    "Bytes marked out of sync with the peer (to resync)",
);
const LAG_BYTES: Metric = gauge(
    "replicad_replication_lag_bytes",
    "Record bytes shipped to the connected peer and not yet acknowledged as written: what a failover to the peer would lose now",
);
const LAG_SECONDS: Metric = gauge(
    "replicad_replication_lag_seconds",
    "Age of the oldest record shipped to the connected peer and not yet acknowledged as written (0 when none)",
);
const RESYNC: Metric = counter(
    "replicad_peerdevice_resync_bytes",
    "Block bytes sent (sync source) or received (sync target) by resyncs since the daemon started",
);
const RESYNC_SKIPPED: Metric = counter(
    "replicad_peerdevice_resync_skipped_bytes",
    "Block bytes a resync skipped because their checksums already matched, since the daemon started",
);
const RESYNC_RATE: Metric = gauge(
    "replicad_peerdevice_resync_rate_bytes_per_second",
    "Average rate of the resync in progress (0 when none runs)",
);
const READS_SERVED: Metric = counter(
    "replicad_peerdevice_reads_served",
    "Client reads of this node served by the peer since the daemon started (read balancing, a diskless Primary, a local read error)",
);
const READ_FALLBACKS: Metric = counter(
    "replicad_peerdevice_read_fallbacks",
    "Client reads balanced to the peer that it failed, answered too late or lost with its connection, served by the local store instead",
);

/// Every metric family served, in exposition order.
pub const METRICS: &[Metric] = &[
    ROLE,
    DEVICE_STATE,
    SIZE,
    READ,
    WRITTEN,
    CHECKSUM_ERRORS,
    REPAIRED,
    READS_LOCAL,
    JOURNAL_USED,
    JOURNAL_SIZE,
    JOURNAL_FILL,
    CACHE_HITS,
    CACHE_MISSES,
    CACHE_EVICTIONS,
    CACHE_RESIDENT,
    CACHE_LIMIT,
    PROMOTIONS,
    LAST_FAILOVER,
    CONNECTION_STATE,
    REPLICATION_STATE,
    OUT_OF_SYNC,
    LAG_BYTES,
    LAG_SECONDS,
    RESYNC,
    RESYNC_SKIPPED,
    RESYNC_RATE,
    READS_SERVED,
    READ_FALLBACKS,
];

type Labels = Vec<(&'static str, String)>;

/// A sample's value: a gauge of a whole number (bytes, states), a gauge of a
/// fraction (seconds, ratios), or a counter.
#[derive(Debug, Clone, Copy)]
enum Value {
    Whole(u64),
    Gauge(f64),
    Counter(u64),
}

impl Value {
    fn encode(self, encoder: MetricEncoder) -> fmt::Result {
        match self {
            Value::Whole(value) => ConstGauge::new(value).encode(encoder),
            Value::Gauge(value) => ConstGauge::new(value).encode(encoder),
            Value::Counter(value) => ConstCounter::new(value).encode(encoder),
        }
    }
}

/// The samples of one scrape, grouped by family (a family's samples must be
/// consecutive in the exposition).
#[derive(Debug, Default)]
struct Samples(Vec<(Metric, Vec<(Labels, Value)>)>);

impl Samples {
    fn push(&mut self, metric: Metric, labels: Labels, value: Value) {
        match self
            .0
            .iter_mut()
            .find(|(known, _)| known.name == metric.name)
        {
            Some((_, samples)) => samples.push((labels, value)),
            None => self.0.push((metric, vec![(labels, value)])),
        }
    }

    fn gauge(&mut self, metric: Metric, labels: &Labels, value: f64) {
        self.push(metric, labels.clone(), Value::Gauge(value));
    }

    fn whole(&mut self, metric: Metric, labels: &Labels, value: u64) {
        self.push(metric, labels.clone(), Value::Whole(value));
    }

    fn counter(&mut self, metric: Metric, labels: &Labels, value: u64) {
        self.push(metric, labels.clone(), Value::Counter(value));
    }

    /// One series per possible value of a state (`label` = its name), 1 for `current`.
    fn state(
        &mut self,
        metric: Metric,
        labels: &Labels,
        label: &'static str,
        names: &[&'static str],
        current: &str,
    ) {
        for &name in names {
            let mut labels = labels.clone();
            labels.push((label, name.to_string()));
            self.push(metric, labels, Value::Whole(u64::from(name == current)));
        }
    }

    fn add_resource(&mut self, status: &ResourceStatus) {
        let labels: Labels = vec![("resource", status.name.clone())];
        let roles: Vec<_> = Role::ALL.iter().map(|role| role.name()).collect();
        self.state(ROLE, &labels, "role", &roles, &status.role);
        let disks: Vec<_> = DiskState::ALL.iter().map(|disk| disk.name()).collect();
        self.state(DEVICE_STATE, &labels, "state", &disks, &status.disk);
        self.whole(SIZE, &labels, status.size_bytes);
        let io = &status.io;
        self.counter(READ, &labels, io.read_bytes);
        self.counter(WRITTEN, &labels, io.write_bytes);
        self.counter(CHECKSUM_ERRORS, &labels, io.checksum_errors);
        self.counter(
            REPAIRED,
            &labels,
            io.repaired_blocks.saturating_mul(engine::BLOCK_BYTES),
        );
        self.counter(READS_LOCAL, &labels, io.reads_local);
        self.whole(JOURNAL_USED, &labels, io.journal_used_bytes);
        self.whole(JOURNAL_SIZE, &labels, io.journal_bytes);
        let fill = if io.journal_bytes == 0 {
            0.0
        } else {
            io.journal_used_bytes as f64 / io.journal_bytes as f64
        };
        self.gauge(JOURNAL_FILL, &labels, fill);
        if let Some(cache) = &io.checksum_cache {
            self.counter(CACHE_HITS, &labels, cache.hits);
            self.counter(CACHE_MISSES, &labels, cache.misses);
            self.counter(CACHE_EVICTIONS, &labels, cache.evictions);
            self.whole(CACHE_RESIDENT, &labels, cache.resident_bytes);
            self.whole(CACHE_LIMIT, &labels, cache.limit_bytes);
        }
        self.counter(PROMOTIONS, &labels, status.promotions);
        if let Some(seconds) = status.last_failover_seconds {
            self.gauge(LAST_FAILOVER, &labels, seconds);
        }
        if let Some(peer) = &status.peer {
            self.add_peer(status, peer);
        }
    }

    fn add_peer(&mut self, status: &ResourceStatus, peer: &PeerStatus) {
        let labels: Labels = vec![
            ("resource", status.name.clone()),
            ("peer", peer.name.clone()),
        ];
        let connections: Vec<_> = ConnectionState::ALL.iter().map(|c| c.name()).collect();
        self.state(
            CONNECTION_STATE,
            &labels,
            "state",
            &connections,
            &peer.connection,
        );
        let replications: Vec<_> = ReplicationState::ALL.iter().map(|r| r.name()).collect();
        self.state(
            REPLICATION_STATE,
            &labels,
            "state",
            &replications,
            &peer.replication,
        );
        self.whole(OUT_OF_SYNC, &labels, status.out_of_sync_bytes);
        self.whole(LAG_BYTES, &labels, peer.lag_bytes);
        self.gauge(LAG_SECONDS, &labels, peer.lag_seconds);
        self.counter(RESYNC, &labels, peer.resync_bytes);
        self.counter(RESYNC_SKIPPED, &labels, peer.resync_skipped_bytes);
        self.whole(RESYNC_RATE, &labels, peer.resync_rate_bytes.unwrap_or(0));
        self.counter(READS_SERVED, &labels, peer.reads_served);
        self.counter(READ_FALLBACKS, &labels, peer.read_fallbacks);
    }
}

impl Collector for Samples {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        for (metric, samples) in &self.0 {
            let mut family =
                encoder.encode_descriptor(metric.name, metric.help, None, metric.kind)?;
            for (labels, value) in samples {
                value.encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// The exposition of `statuses` in the Prometheus text format.
pub fn render(statuses: &[ResourceStatus]) -> String {
    let mut samples = Samples::default();
    for status in statuses {
        samples.add_resource(status);
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(samples));
    let mut text = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a family
    // above, and a scrape then gets what was encoded before it.
    if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
        tracing::error!("metrics encoding failed: {error}");
    }
    text
}

/// A client that sends no complete request head within this long is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn answer(
    request: &Request<hyper::body::Incoming>,
    resources: &[Arc<Resource>],
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if request.uri().path() != "/metrics" {
        return respond(
            StatusCode::NOT_FOUND,
            TEXT,
            "replicad serves /metrics\n".into(),
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "GET /metrics\n".into(),
        );
    }
    let statuses: Vec<ResourceStatus> = resources.iter().map(|r| r.status()).collect();
    respond(
        StatusCode::OK,
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        render(&statuses),
    )
}

/// Serves `GET /metrics` for `resources` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    resources: Vec<Arc<Resource>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let resources = Arc::new(resources);
    crate::accept_until(&listener, shutdown, "metrics listener", |stream| {
        let resources = resources.clone();
        async move {
            let service = hyper::service::service_fn(move |request| {
                let response = answer(&request, &resources);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!("metrics connection ended: {error}");
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::IoStatus;

    fn status() -> ResourceStatus {
        ResourceStatus {
            name: "r0".into(),
            node: "alpha".into(),
            role: "Primary".into(),
            disk: "UpToDate".into(),
            size_bytes: 1 << 30,
            out_of_sync_bytes: 8192,
            io: IoStatus {
                write_bytes: 12_288,
                repaired_blocks: 2,
                reads_local: 70,
                journal_used_bytes: 1 << 20,
                journal_bytes: 4 << 20,
                checksum_cache: Some(crate::control::ChecksumCacheStatus {
                    hits: 99,
                    misses: 1,
                    resident_bytes: 4096,
                    limit_bytes: 64 << 20,
                    ..Default::default()
                }),
                ..IoStatus::default()
            },
            promotions: 1,
            last_failover_seconds: Some(3.25),
            peer: Some(PeerStatus {
                name: "beta".into(),
                connection: "Connected".into(),
                replication: "SyncSource".into(),
                lag_bytes: 4160,
                lag_seconds: 0.5,
                resync_rate_bytes: Some(1_000_000),
                reads_served: 30,
                read_fallbacks: 1,
                ..PeerStatus::default()
            }),
            ..ResourceStatus::default()
        }
    }

    #[test]
    fn a_status_renders_as_labelled_series() {
        let text = render(&[status()]);
        for line in [
            "# TYPE replicad_resource_role gauge",
            "replicad_resource_role{resource=\"r0\",role=\"Primary\"} 1",
            "replicad_resource_role{resource=\"r0\",role=\"Secondary\"} 0",
            "replicad_device_state{resource=\"r0\",state=\"UpToDate\"} 1",
            "# TYPE replicad_device_written_bytes_total counter",
            "replicad_device_written_bytes_total{resource=\"r0\"} 12288",
            "replicad_device_repaired_bytes_total{resource=\"r0\"} 8192",
            "replicad_journal_fill_ratio{resource=\"r0\"} 0.25",
            "replicad_checksum_cache_hits_total{resource=\"r0\"} 99",
            "replicad_checksum_cache_misses_total{resource=\"r0\"} 1",
            "replicad_checksum_cache_resident_bytes{resource=\"r0\"} 4096",
            "replicad_checksum_cache_limit_bytes{resource=\"r0\"} 67108864",
            "replicad_promotions_total{resource=\"r0\"} 1",
            "replicad_last_failover_seconds{resource=\"r0\"} 3.25",
            "replicad_connection_state{resource=\"r0\",peer=\"beta\",state=\"Connected\"} 1",
            "replicad_connection_state{resource=\"r0\",peer=\"beta\",state=\"StandAlone\"} 0",
            "replicad_peerdevice_replication_state{resource=\"r0\",peer=\"beta\",state=\"SyncSource\"} 1",
            "replicad_peerdevice_outofsync_bytes{resource=\"r0\",peer=\"beta\"} 8192",
            "replicad_replication_lag_bytes{resource=\"r0\",peer=\"beta\"} 4160",
            "replicad_replication_lag_seconds{resource=\"r0\",peer=\"beta\"} 0.5",
            "replicad_peerdevice_resync_rate_bytes_per_second{resource=\"r0\",peer=\"beta\"} 1000000",
            "replicad_device_reads_local_total{resource=\"r0\"} 70",
            "replicad_peerdevice_reads_served_total{resource=\"r0\",peer=\"beta\"} 30",
            "replicad_peerdevice_read_fallbacks_total{resource=\"r0\",peer=\"beta\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // Each family's HELP and TYPE appear once, however many resources.
        let two = render(&[
            status(),
            ResourceStatus {
                name: "r1".into(),
                ..status()
            },
        ]);
        assert_eq!(
            two.matches("# TYPE replicad_resource_role gauge").count(),
            1
        );
        assert_eq!(two.matches("replicad_resource_role{").count(), 4);
    }

    #[test]
    fn optional_series_are_absent_rather_than_made_up() {
        let mut status = status();
        status.peer = None;
        status.last_failover_seconds = None;
        status.io.checksum_cache = None;
        let text = render(&[status]);
        assert!(
            !text.contains("replicad_checksum_cache_hits_total{"),
            "{text}"
        );
        assert!(!text.contains("replicad_last_failover_seconds"), "{text}");
        assert!(!text.contains("peer=\""), "{text}");
        assert!(
            text.contains("replicad_device_written_bytes_total"),
            "{text}"
        );
    }

    #[test]
    fn every_metric_is_documented_in_operations_md() {
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/OPERATIONS.md"
        ))
        .expect("docs/OPERATIONS.md");
        for metric in METRICS {
            let name = format!("`{}`", metric.exposed_name());
            assert!(
                docs.lines()
                    .any(|line| line.starts_with('|') && line.contains(&name)),
                "{name} has no row in the metrics table of docs/OPERATIONS.md"
            );
        }
    }
}
