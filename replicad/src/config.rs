//! The configuration file (TOML), copied unchanged to every node.
//!
//! ```toml
//! [resource.r0]
//! mode = "sync"                       # sync | semi-sync | async
//! secret-file = "r0.secret"           # or secret = "…": peers must hold the same
//! [resource.r0.nodes.alpha]
//! address = "10.0.0.1:7788"           # replication listener
//! disk = "/dev/loop0"                 # block device or image file
//! nbd = "127.0.0.1:10809"             # or "unix:/run/replicad/r0.nbd"
//! control = "/run/replicad/alpha.ctl" # optional
//! metrics = "127.0.0.1:9942"          # optional: Prometheus /metrics
//! [resource.r0.nodes.beta]
//! address = "10.0.0.2:7788"
//! disk = "/var/lib/replicad/r0.img"
//! nbd = "127.0.0.1:10809"
//! ```
//!
//! Every key is checked: unknown keys and bad values are errors that name the key
//! (serde + toml report the path and line). Each daemon picks its own section with
//! `--node` (default: the hostname).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::node::{OnIoError, ReadBalancing};
use serde::{Deserialize, Deserializer};

/// Default config path.
pub const DEFAULT_CONFIG: &str = "/etc/replicad/replicad.toml";

/// Errors loading or using a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("no resource named {0:?} in the config")]
    NoSuchResource(String),
    #[error(
        "node {node:?} is not part of any resource in the config (nodes: {known}); pass --node"
    )]
    NoSuchNode { node: String, known: String },
    #[error("node {node:?} is not part of resource {resource:?}")]
    UnknownNode { node: String, resource: String },
}

pub use engine::repl::Mode;

fn mode<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Mode, D::Error> {
    let text = String::deserialize(deserializer)?;
    Mode::parse(&text).ok_or_else(|| {
        serde::de::Error::custom(format!("{text:?} is not a mode (sync, semi-sync or async)"))
    })
}

fn on_io_error<'de, D: Deserializer<'de>>(deserializer: D) -> Result<OnIoError, D::Error> {
    let text = String::deserialize(deserializer)?;
    OnIoError::parse(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "{text:?} is not an on-io-error policy (detach or pass-on)"
        ))
    })
}

fn read_balancing<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ReadBalancing, D::Error> {
    let text = String::deserialize(deserializer)?;
    ReadBalancing::parse(&text).map_err(serde::de::Error::custom)
}

/// How the data area is accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoMode {
    /// O_DIRECT through io_uring for data; the journal through the page cache.
    #[default]
    Direct,
    /// Everything through the page cache (pread/pwrite).
    Buffered,
}

/// Where an NBD export listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Tcp(addr) => write!(f, "{addr}"),
            NbdAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl NbdAddress {
    /// The NBD URI a client uses for `export` on this address.
    pub fn uri(&self, export: &str) -> String {
        match self {
            NbdAddress::Tcp(addr) => format!("nbd://{addr}/{export}"),
            NbdAddress::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for NbdAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<NbdAddress, D::Error> {
        let text = String::deserialize(deserializer)?;
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(serde::de::Error::custom("unix socket path is empty"));
            }
            return Ok(NbdAddress::Unix(PathBuf::from(path)));
        }
        text.parse().map(NbdAddress::Tcp).map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is neither HOST:PORT (an IP address and port) nor unix:PATH"
            ))
        })
    }
}

/// A size like `128M`, `1G`, `4096` (bytes; K/M/G/T are powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, multiplier) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (text, 1u64),
        Some((index, _)) => {
            let unit = text[index..].trim_end_matches(['B', 'b', 'i']);
            let multiplier = match unit.to_ascii_uppercase().as_str() {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("{text:?} is not a size (use e.g. 512K, 128M, 1G)")),
            };
            (&text[..index], multiplier)
        }
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (use e.g. 512K, 128M, 1G)"))?;
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A duration like `2s`, `500ms`, `1m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not a duration (use e.g. 500ms, 2s, 1m)");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let value: u64 = text[..split].parse().map_err(|_| bad())?;
    match &text[split..] {
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value * 60)),
        _ => Err(bad()),
    }
}

fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Raw::Number(value)) => Ok(Some(value)),
        Some(Raw::Text(text)) => parse_size(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    match Option::<String>::deserialize(deserializer)? {
        None => Ok(None),
        Some(text) => parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// The text of a `secret` key. Its `Debug` never shows it (configs are logged).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretText(String);

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretText(<redacted>)")
    }
}

fn uuid<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<[u8; 16]>, D::Error> {
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(serde::de::Error::custom(format!(
            "{text:?} is not a UUID (32 hex digits)"
        )));
    }
    let mut uuid = [0u8; 16];
    for (index, byte) in uuid.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * index..2 * index + 2], 16)
            .map_err(serde::de::Error::custom)?;
    }
    Ok(Some(uuid))
}

/// Shell commands run on events (through `sh -c`, with `REPLICAD_*` variables set).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Hooks {
    /// After this node's role changed (`REPLICAD_ROLE` is the new role).
    pub role_change: Option<String>,
    /// When a split brain is detected.
    pub split_brain: Option<String>,
    /// When a resync finished.
    pub sync_done: Option<String>,
}

/// One node of a resource.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeConfig {
    /// Replication address, `IP:PORT`: where the peer connects.
    pub address: SocketAddr,
    /// Local bind address for replication when it differs from `address` (NAT, a
    /// port-forward or a test proxy in between). Default: `address`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Backing store: block device or image file.
    pub disk: PathBuf,
    /// `"internal"` (default) or the path of an external metadata file/device.
    #[serde(default)]
    pub meta_disk: Option<String>,
    /// NBD listener: `IP:PORT` or `unix:PATH`.
    pub nbd: NbdAddress,
    /// This node daemon's control socket (one per daemon).
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Prometheus metrics listener (`IP:PORT`), optional.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// The snapshot area: a directory on this node (created if missing) for the
    /// snapshots' catalog and copy-on-write logs. Without it, snapshots are refused.
    #[serde(default)]
    pub snapshot_dir: Option<PathBuf>,
}

/// The witness (tie-breaker) of a resource.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    pub address: SocketAddr,
}

/// One resource.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ResourceConfig {
    #[serde(default, deserialize_with = "mode")]
    pub mode: Mode,
    /// Resource UUID; by default derived from the resource's name.
    #[serde(default, deserialize_with = "uuid")]
    pub uuid: Option<[u8; 16]>,
    /// Shared secret: a peer must prove it holds the same one (HMAC challenge-response
    /// at every connection). Absent on both nodes: peers are not authenticated.
    #[serde(default)]
    pub secret: Option<SecretText>,
    /// File holding the shared secret (trailing newlines dropped); a relative path is
    /// relative to the config file's directory. Read when the daemon starts.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Journal ring size written by `create-md` (default 128M).
    #[serde(default, deserialize_with = "size")]
    pub journal_size: Option<u64>,
    /// Memory for the checksum table's cache (default 64M, which holds the table of
    /// 64 GiB of volume); the daemon's memory does not grow with the volume's size.
    #[serde(default, deserialize_with = "size")]
    pub checksum_cache: Option<u64>,
    /// Most bytes the snapshot area may take (all snapshots together); a snapshot that
    /// needs more is invalidated. Default 1 GiB.
    #[serde(default, deserialize_with = "size")]
    pub snapshot_area: Option<u64>,
    /// The peer is declared dead after this long without a sign of life (default 2s).
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    /// Heartbeat interval (default 500ms).
    #[serde(default, deserialize_with = "duration")]
    pub ping_interval: Option<Duration>,
    /// A peer that leaves a replicated write not durable, or a FLUSH unanswered, this
    /// long is disconnected and its blocks marked out of sync (default 42s: DRBD's
    /// timeout × ko-count). A sick spare then never hangs the Primary.
    #[serde(default, deserialize_with = "duration")]
    pub ko_timeout: Option<Duration>,
    /// What the node does when its disk fails (DRBD's `on-io-error`): `detach`
    /// (default: go Diskless; a Primary serves through its UpToDate peer) or
    /// `pass-on` (return EIO to the client, stay attached).
    #[serde(default, deserialize_with = "on_io_error")]
    pub on_io_error: OnIoError,
    /// Which replica serves the Primary's client reads (DRBD's `read-balancing`):
    /// `prefer-local` (default), `prefer-remote`, `round-robin`, `least-pending`,
    /// `striping-<size>` (32K … 1M) or `adaptive`. A peer serves a read only while
    /// it is UpToDate and holds the blocks' latest acknowledged data.
    #[serde(default, deserialize_with = "read_balancing")]
    pub read_balancing: ReadBalancing,
    /// Resync bandwidth cap in bytes per second; 0 or absent: unlimited.
    #[serde(default, deserialize_with = "size")]
    pub resync_rate: Option<u64>,
    /// Resync yields to application I/O (pauses while the volume is busy).
    #[serde(default)]
    pub resync_yield: bool,
    /// Compare block digests before sending resync data. Default: only for a resync
    /// after a primary crash (then most marked blocks match); otherwise it reads every
    /// out-of-sync block on both sides and pays only when most blocks already match.
    #[serde(default)]
    pub checksum_resync: Option<bool>,
    #[serde(default)]
    pub io: IoMode,
    #[serde(default)]
    pub hooks: Hooks,
    pub nodes: BTreeMap<String, NodeConfig>,
    #[serde(default)]
    pub witness: Option<WitnessConfig>,
}

impl NodeConfig {
    /// Where this node's replication listener binds.
    pub fn listen_address(&self) -> SocketAddr {
        self.listen.unwrap_or(self.address)
    }
}

impl ResourceConfig {
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(2))
    }

    pub fn ping_interval(&self) -> Duration {
        self.ping_interval.unwrap_or(Duration::from_millis(500))
    }

    pub fn ko_timeout(&self) -> Duration {
        self.ko_timeout.unwrap_or(Duration::from_secs(42))
    }

    /// Journal size for a store of `store_bytes`: the configured one, else an eighth
    /// of the store between 1 MiB and the default (128 MiB).
    pub fn journal_bytes_for(&self, store_bytes: u64) -> u64 {
        self.journal_size.unwrap_or_else(|| {
            (store_bytes / 8).clamp(1 << 20, engine::layout::DEFAULT_JOURNAL_BYTES) & !4095
        })
    }

    /// Bytes of the checksum table's cache.
    pub fn checksum_cache_bytes(&self) -> u64 {
        self.checksum_cache
            .unwrap_or(engine::checksum::DEFAULT_CACHE_BYTES)
    }

    /// Most bytes of the snapshot area.
    pub fn snapshot_area_bytes(&self) -> u64 {
        self.snapshot_area.unwrap_or(1 << 30)
    }

    /// Journal size when the store size is not at hand (in-flight limits).
    pub fn journal_bytes(&self) -> u64 {
        self.journal_size
            .unwrap_or(engine::layout::DEFAULT_JOURNAL_BYTES)
    }

    /// Node id: the node's index among the sorted node names.
    pub fn node_id(&self, node: &str) -> Option<u32> {
        self.nodes
            .keys()
            .position(|name| name == node)
            .map(|index| index as u32)
    }

    /// The other node of a two-node resource, if any.
    pub fn peer_of(&self, node: &str) -> Option<(&String, &NodeConfig)> {
        self.nodes.iter().find(|(name, _)| name.as_str() != node)
    }

    pub fn resource_uuid(&self, name: &str) -> [u8; 16] {
        self.uuid
            .unwrap_or_else(|| engine::volume::uuid_from_name(name))
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub resource: BTreeMap<String, ResourceConfig>,
    #[serde(skip)]
    pub path: PathBuf,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let mut config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: display.clone(),
            message: error.to_string().trim_end().to_string(),
        })?;
        config.path = path.to_path_buf();
        let invalid = |message: String| ConfigError::Invalid {
            path: display.clone(),
            message,
        };
        if config.resource.is_empty() {
            return Err(invalid("no [resource.NAME] section".into()));
        }
        for (name, resource) in &config.resource {
            if !valid_name(name) {
                return Err(invalid(format!(
                    "resource name {name:?}: use letters, digits, '-', '_', '.' (at most 63)"
                )));
            }
            if resource.nodes.is_empty() || resource.nodes.len() > 2 {
                return Err(invalid(format!(
                    "resource.{name}.nodes: needs one or two nodes, found {}",
                    resource.nodes.len()
                )));
            }
            for node in resource.nodes.keys() {
                if !valid_name(node) {
                    return Err(invalid(format!("resource.{name}.nodes.{node}: node names use letters, digits, '-', '_', '.'")));
                }
            }
            if let Some(journal) = resource.journal_size {
                if journal < engine::layout::MIN_DAEMON_JOURNAL_BYTES || journal % 4096 != 0 {
                    return Err(invalid(format!(
                        "resource.{name}.journal-size: {journal} must be a multiple of 4K and at least {}M",
                        engine::layout::MIN_DAEMON_JOURNAL_BYTES >> 20
                    )));
                }
            }
            if let Some(cache) = resource.checksum_cache {
                if cache < engine::checksum::MIN_CACHE_BYTES {
                    return Err(invalid(format!(
                        "resource.{name}.checksum-cache: {cache} is below the minimum of {}K",
                        engine::checksum::MIN_CACHE_BYTES >> 10
                    )));
                }
            }
            if resource.timeout() < Duration::from_millis(100)
                || resource.ping_interval() >= resource.timeout()
                || resource.ping_interval().is_zero()
            {
                return Err(invalid(format!("resource.{name}: ping-interval must be above zero and below timeout (at least 100ms)")));
            }
            if resource.secret.is_some() && resource.secret_file.is_some() {
                return Err(invalid(format!(
                    "resource.{name}: set either secret or secret-file, not both"
                )));
            }
            if let Some(SecretText(text)) = &resource.secret {
                if let Err(error) = engine::auth::Secret::new(text.clone().into_bytes()) {
                    return Err(invalid(format!("resource.{name}.secret: {error}")));
                }
            }
            if resource
                .secret_file
                .as_ref()
                .is_some_and(|file| file.as_os_str().is_empty())
            {
                return Err(invalid(format!("resource.{name}.secret-file: empty path")));
            }
            if resource.ko_timeout() < resource.timeout() {
                return Err(invalid(format!(
                    "resource.{name}.ko-timeout: must be at least the timeout ({} ms)",
                    resource.timeout().as_millis()
                )));
            }
            let nodes: Vec<_> = resource.nodes.values().collect();
            if nodes.len() == 2 && nodes[0].address == nodes[1].address {
                return Err(invalid(format!(
                    "resource.{name}: both nodes use replication address {}",
                    nodes[0].address
                )));
            }
        }
        Ok(config)
    }

    /// The resource named `name`.
    pub fn resource(&self, name: &str) -> Result<&ResourceConfig, ConfigError> {
        self.resource
            .get(name)
            .ok_or_else(|| ConfigError::NoSuchResource(name.to_string()))
    }

    /// The shared secret of resource `name` (reads `secret-file` now), if it has one.
    pub fn secret(&self, name: &str) -> Result<Option<engine::auth::Secret>, ConfigError> {
        let resource = self.resource(name)?;
        let (bytes, origin) = match (&resource.secret, &resource.secret_file) {
            (Some(SecretText(text)), _) => {
                (text.clone().into_bytes(), format!("resource.{name}.secret"))
            }
            (None, Some(file)) => {
                let path = match self.path.parent() {
                    Some(dir) if file.is_relative() => dir.join(file),
                    _ => file.clone(),
                };
                let mut bytes = std::fs::read(&path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                (
                    bytes,
                    format!("resource.{name}.secret-file {}", path.display()),
                )
            }
            (None, None) => return Ok(None),
        };
        engine::auth::Secret::new(bytes)
            .map(Some)
            .map_err(|error| ConfigError::Invalid {
                path: self.path.display().to_string(),
                message: format!("{origin}: {error}"),
            })
    }

    /// Names of the resources `node` takes part in.
    pub fn resources_of(&self, node: &str) -> Vec<String> {
        self.resource
            .iter()
            .filter(|(_, resource)| resource.nodes.contains_key(node))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Every node name that appears in the config.
    pub fn node_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .resource
            .values()
            .flat_map(|r| r.nodes.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Checks that `node` appears, and returns its control socket path: the one its
    /// sections name (they must agree), else `/run/replicad/NODE.ctl`.
    pub fn control_socket(&self, node: &str) -> Result<PathBuf, ConfigError> {
        let chosen = self.one_per_daemon(
            node,
            "control sockets",
            |n| n.control.as_ref(),
            |path| path.display().to_string(),
        )?;
        Ok(chosen.unwrap_or_else(|| PathBuf::from(format!("/run/replicad/{node}.ctl"))))
    }

    /// Checks that `node` appears, and returns where its daemon serves Prometheus
    /// metrics: the `metrics` address its sections name (they must agree), if any.
    pub fn metrics_address(&self, node: &str) -> Result<Option<SocketAddr>, ConfigError> {
        self.one_per_daemon(
            node,
            "metrics addresses",
            |n| n.metrics.as_ref(),
            ToString::to_string,
        )
    }

    /// The value of a per-daemon key of `node` (`get` reads it from a node section):
    /// every section of the node that sets it must set the same.
    fn one_per_daemon<T: Clone + PartialEq>(
        &self,
        node: &str,
        what: &str,
        get: impl Fn(&NodeConfig) -> Option<&T>,
        show: impl Fn(&T) -> String,
    ) -> Result<Option<T>, ConfigError> {
        let resources = self.resources_of(node);
        if resources.is_empty() {
            return Err(ConfigError::NoSuchNode {
                node: node.to_string(),
                known: self.node_names().join(", "),
            });
        }
        let mut chosen: Option<T> = None;
        for name in &resources {
            if let Some(value) = get(&self.resource[name].nodes[node]) {
                match &chosen {
                    Some(existing) if existing != value => {
                        return Err(ConfigError::Invalid {
                            path: self.path.display().to_string(),
                            message: format!(
                                "node {node} names two {what} ({} and {}); a daemon has one",
                                show(existing),
                                show(value)
                            ),
                        })
                    }
                    _ => chosen = Some(value.clone()),
                }
            }
        }
        Ok(chosen)
    }
}

/// This machine's hostname (the default `--node`).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the live buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end])
        .split('.')
        .next()
        .unwrap_or("localhost")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[resource.r0]
mode = "sync"
[resource.r0.nodes.alpha]
address = "10.0.0.1:7788"
disk = "/dev/loop0"
nbd = "127.0.0.1:10809"
control = "/run/replicad/alpha.ctl"
[resource.r0.nodes.beta]
address = "10.0.0.2:7788"
disk = "/var/lib/replicad/r0.img"
nbd = "unix:/run/replicad/r0.nbd"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn the_design_brief_example_parses() {
        let config = parse(GOOD).unwrap();
        let r0 = config.resource("r0").unwrap();
        assert_eq!(r0.mode, Mode::Sync);
        assert_eq!(r0.on_io_error, OnIoError::Detach, "the default policy");
        let pass_on = GOOD.replace("mode = \"sync\"", "on-io-error = \"pass-on\"");
        assert_eq!(
            parse(&pass_on).unwrap().resource("r0").unwrap().on_io_error,
            OnIoError::PassOn
        );
        assert_eq!(r0.read_balancing, ReadBalancing::PreferLocal, "the default");
        for (name, policy) in [
            ("adaptive", ReadBalancing::Adaptive),
            ("round-robin", ReadBalancing::RoundRobin),
            (
                "striping-64K",
                ReadBalancing::Striping {
                    stripe_bytes: 65536,
                },
            ),
        ] {
            let text = GOOD.replace("mode = \"sync\"", &format!("read-balancing = \"{name}\""));
            let config = parse(&text).unwrap();
            assert_eq!(config.resource("r0").unwrap().read_balancing, policy);
        }
        assert_eq!(r0.node_id("alpha"), Some(0));
        assert_eq!(r0.node_id("beta"), Some(1));
        assert_eq!(
            r0.nodes["beta"].nbd,
            NbdAddress::Unix("/run/replicad/r0.nbd".into())
        );
        assert_eq!(
            config.control_socket("alpha").unwrap(),
            PathBuf::from("/run/replicad/alpha.ctl")
        );
        assert_eq!(
            config.control_socket("beta").unwrap(),
            PathBuf::from("/run/replicad/beta.ctl")
        );
        assert!(matches!(
            config.control_socket("gamma"),
            Err(ConfigError::NoSuchNode { .. })
        ));
    }

    #[test]
    fn a_daemon_serves_metrics_on_one_address() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.metrics_address("alpha").unwrap(), None);
        let text = format!(
            "{GOOD}metrics = \"127.0.0.1:9942\"\n[resource.r1.nodes.beta]\naddress = \"10.0.0.2:7789\"\ndisk = \"/dev/loop1\"\nnbd = \"127.0.0.1:10810\"\nmetrics = \"127.0.0.1:9942\"\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(
            config.metrics_address("beta").unwrap(),
            Some("127.0.0.1:9942".parse().unwrap())
        );
        assert_eq!(config.metrics_address("alpha").unwrap(), None);
        let two = text.replacen("127.0.0.1:9942", "127.0.0.1:9943", 1);
        let error = parse(&two).unwrap().metrics_address("beta").unwrap_err();
        assert!(
            error.to_string().contains("two metrics addresses"),
            "{error}"
        );
        assert!(matches!(
            parse(GOOD).unwrap().metrics_address("gamma"),
            Err(ConfigError::NoSuchNode { .. })
        ));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let cases = [
            (
                GOOD.replace("mode = \"sync\"", "mode = \"sync\"\nspeed = 3"),
                "speed",
            ),
            (GOOD.replace("mode = \"sync\"", "mode = \"fast\""), "mode"),
            (
                GOOD.replace("mode = \"sync\"", "on-io-error = \"panic\""),
                "detach or pass-on",
            ),
            (
                GOOD.replace("mode = \"sync\"", "read-balancing = \"fastest\""),
                "read-balancing",
            ),
            (
                GOOD.replace("mode = \"sync\"", "read-balancing = \"striping-3K\""),
                "striping-<size> with a power of two from 32K to 1M",
            ),
            (GOOD.replace("10.0.0.1:7788", "not-an-address"), "address"),
            (GOOD.replace("127.0.0.1:10809", "localhost"), "nbd"),
            (
                GOOD.replace("mode = \"sync\"", "journal-size = \"12Q\""),
                "journal-size",
            ),
            (
                GOOD.replace("mode = \"sync\"", "timeout = \"soon\""),
                "timeout",
            ),
            (GOOD.replace("mode = \"sync\"", "uuid = \"xyz\""), "uuid"),
        ];
        for (text, key) in cases {
            let error = parse(&text).unwrap_err().to_string();
            assert!(
                error.contains(key),
                "error for {key} does not name it: {error}"
            );
        }
    }

    #[test]
    fn semantic_errors_are_reported() {
        assert!(parse("").is_err());
        let three = format!("{GOOD}\n[resource.r0.nodes.gamma]\naddress = \"10.0.0.3:7788\"\ndisk = \"/x\"\nnbd = \"127.0.0.1:1\"\n");
        assert!(parse(&three)
            .unwrap_err()
            .to_string()
            .contains("one or two nodes"));
        let small_journal = GOOD.replace("mode = \"sync\"", "journal-size = \"4K\"");
        assert!(parse(&small_journal)
            .unwrap_err()
            .to_string()
            .contains("journal-size"));
        let same_address = GOOD.replace("10.0.0.2:7788", "10.0.0.1:7788");
        assert!(parse(&same_address)
            .unwrap_err()
            .to_string()
            .contains("both nodes"));
    }

    #[test]
    fn the_secret_comes_from_the_config_or_a_file_next_to_it() {
        let with =
            |line: &str| GOOD.replace("mode = \"sync\"", &format!("mode = \"sync\"\n{line}"));
        let config = parse(&with("secret = \"hunter2\"")).unwrap();
        assert_eq!(
            config.secret("r0").unwrap(),
            Some(engine::auth::Secret::new(b"hunter2".to_vec()).unwrap())
        );
        assert!(
            !format!("{config:?}").contains("hunter2"),
            "the secret is logged"
        );
        assert_eq!(parse(GOOD).unwrap().secret("r0").unwrap(), None);

        let dir = std::env::temp_dir().join(format!("replicad-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("r0.secret"), "from a file\r\n").unwrap();
        let config = Config::parse(
            &with("secret-file = \"r0.secret\""),
            &dir.join("replicad.toml"),
        )
        .unwrap();
        assert_eq!(
            config.secret("r0").unwrap(),
            Some(engine::auth::Secret::new(b"from a file".to_vec()).unwrap())
        );
        std::fs::write(dir.join("r0.secret"), "\n").unwrap();
        let empty = config.secret("r0").unwrap_err().to_string();
        assert!(
            empty.contains("secret-file") && empty.contains("empty"),
            "{empty}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = config.secret("r0").unwrap_err().to_string();
        assert!(missing.contains("r0.secret"), "{missing}");

        for (line, needle) in [
            ("secret = \"\"", "secret: the secret is empty"),
            ("secret = \"a\"\nsecret-file = \"b\"", "not both"),
            ("secret = 7", "secret"),
        ] {
            let error = parse(&with(line)).unwrap_err().to_string();
            assert!(error.contains(needle), "{line}: {error}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("2").is_err());
    }
}
