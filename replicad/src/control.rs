//! The control socket: a unix socket speaking JSON lines.
//!
//! Each request is one JSON object on one line; each answer is one line
//! `{"ok":true,"result":...}` or `{"ok":false,"error":"one-line reason"}`. The
//! `events` request turns the connection into a stream of event lines. `replctl` is a
//! thin client of this socket ([`Client`]); the daemon implements [`Handler`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;

/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status {
        #[serde(default)]
        resource: Option<String>,
    },
    Promote {
        resource: String,
        #[serde(default)]
        force: bool,
    },
    Demote {
        resource: String,
    },
    Connect {
        resource: String,
        #[serde(default)]
        discard_my_data: bool,
    },
    Disconnect {
        resource: String,
    },
    Attach {
        resource: String,
    },
    Detach {
        resource: String,
    },
    PauseSync {
        resource: String,
    },
    ResumeSync {
        resource: String,
    },
    Verify {
        resource: String,
        #[serde(default)]
        repair: bool,
    },
    Invalidate {
        resource: String,
    },
    /// Start a new generation on both (connected, fresh) nodes, optionally without an
    /// initial sync (`clear_bitmap`: both stores are known to be identical, e.g. zeroes).
    NewCurrentUuid {
        resource: String,
        #[serde(default)]
        clear_bitmap: bool,
    },
    /// Take a snapshot of this node's store (`replctl snapshot create`).
    SnapshotCreate {
        resource: String,
        name: String,
        /// At the same point of the write order on every connected node (Primary only).
        #[serde(default)]
        all: bool,
    },
    SnapshotList {
        resource: String,
    },
    SnapshotDelete {
        resource: String,
        name: String,
    },
    /// Stream state changes, one line each.
    Events,
    /// Stop the daemon gracefully (as SIGTERM does).
    Shutdown,
}

/// One answer line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A stable name of the error's kind, for scripts and hooks to match on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl Response {
    pub fn ok(result: impl Serialize) -> Response {
        Response {
            ok: true,
            result: serde_json::to_value(result).ok(),
            error: None,
            kind: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        let message: String = message.into();
        // One line: the contract of replctl's stderr.
        Response {
            ok: false,
            result: None,
            error: Some(message.replace('\n', " ")),
            kind: None,
        }
    }

    /// A refusal or failure of kind `kind` (see [`Response::kind`]).
    pub fn error_of_kind(message: impl Into<String>, kind: &str) -> Response {
        Response {
            kind: Some(kind.to_string()),
            ..Response::error(message)
        }
    }
}

/// Per-resource status, as `replctl status --json` prints it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceStatus {
    pub name: String,
    pub node: String,
    pub role: String,
    pub disk: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_error: Option<String>,
    pub mode: String,
    pub size_bytes: u64,
    pub nbd: String,
    pub generation: GenerationStatus,
    pub out_of_sync_bytes: u64,
    pub io: IoStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerStatus>,
    /// Promotions of this node since the daemon started.
    #[serde(default)]
    pub promotions: u64,
    /// How long the last promotion took to give the resource a Primary again: from
    /// the loss of the Primary peer (or, when none was lost, from the request) to the
    /// promotion's completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_seconds: Option<f64>,
    /// The `read-balancing` policy of the resource.
    #[serde(default)]
    pub read_balancing: String,
}

/// Generation identifiers, in hex.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationStatus {
    pub current: String,
    pub bitmap: String,
    pub history: Vec<String>,
}

/// I/O counters since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoStatus {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub checksum_errors: u64,
    pub repaired_blocks: u64,
    /// Client reads served by this node's own store (the peer's are in
    /// [`PeerStatus::reads_served`]).
    #[serde(default)]
    pub reads_local: u64,
    pub journal_used_bytes: u64,
    /// The journal ring's size.
    #[serde(default)]
    pub journal_bytes: u64,
    pub journal_commits: u64,
    pub journal_syncs: u64,
    pub checkpoints: u64,
    /// The checksum table's page cache (absent without a disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum_cache: Option<ChecksumCacheStatus>,
}

/// The checksum table's page cache: lookups since the daemon started and what it
/// holds (`checksum-cache` in the config bounds it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumCacheStatus {
    /// Lookups that found their page in memory.
    pub hits: u64,
    /// Lookups that read their page from the store.
    pub misses: u64,
    /// Pages dropped to make room.
    pub evictions: u64,
    pub resident_bytes: u64,
    /// Changed pages not yet written back (at the next checkpoint).
    pub dirty_bytes: u64,
    /// The configured bound.
    pub limit_bytes: u64,
}

impl ChecksumCacheStatus {
    /// Hits per lookup (1 before the first lookup).
    pub fn hit_ratio(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 {
            1.0
        } else {
            self.hits as f64 / lookups as f64
        }
    }
}

/// The peer, as this node sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub address: String,
    pub connection: String,
    pub replication: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_disk: Option<String>,
    /// Records shipped and not yet acknowledged as received.
    pub in_flight: u64,
    /// Client writes waiting for the peer's acknowledgement.
    pub unacked: u64,
    /// Replication lag: record bytes shipped that the peer has not acknowledged as
    /// written (what a failover to the peer would lose now).
    #[serde(default)]
    pub lag_bytes: u64,
    /// How long ago the oldest of those records was shipped (0 when none).
    #[serde(default)]
    pub lag_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_rate_bytes: Option<u64>,
    /// Block bytes sent (source) or received (target) by resyncs since the daemon started.
    pub resync_bytes: u64,
    /// Blocks whose checksums already matched and were skipped by resyncs.
    pub resync_skipped_bytes: u64,
    /// Out-of-sync bytes still to resync.
    pub resync_remaining_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// What kind of error `last_error` is (`connection-lost`, `timeout`, `protocol`,
    /// `refused`, `refused-by-peer`, `local`, `storage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_kind: Option<String>,
    #[serde(default)]
    pub split_brain: bool,
    /// Blocks found different by the last verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_out_of_sync_blocks: Option<u64>,
    /// Client reads of this node the peer served (read balancing, a diskless
    /// Primary, a local read error).
    #[serde(default)]
    pub reads_served: u64,
    /// Reads balanced to the peer that it failed, answered late or lost with its
    /// connection: the local store served them.
    #[serde(default)]
    pub read_fallbacks: u64,
}

/// What the daemon does with requests.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> impl std::future::Future<Output = Response> + Send;
    /// Event lines for `events` subscribers.
    fn subscribe(&self) -> broadcast::Receiver<String>;
}

/// Serves the control socket (bound with [`bind`] at `path`) until `shutdown`
/// resolves, then removes the socket file.
pub async fn serve<H: Handler>(
    listener: UnixListener,
    path: &Path,
    handler: Arc<H>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    crate::accept_until(&listener, shutdown, "control socket", |stream| {
        let handler = handler.clone();
        async move {
            if let Err(error) = serve_connection(stream, handler).await {
                tracing::debug!("control connection ended: {error}");
            }
        }
    })
    .await;
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// Binds the control socket, replacing a stale file but never a live daemon's socket.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "another daemon is serving the control socket {}",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn serve_connection<H: Handler>(stream: UnixStream, handler: Arc<H>) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = AsyncBufReader::new(tokio::io::AsyncReadExt::take(reader, u64::MAX));
    let mut line = String::new();
    loop {
        line.clear();
        reader.get_mut().set_limit(MAX_REQUEST_BYTES);
        let n = reader.read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_REQUEST_BYTES {
            let response =
                Response::error(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
            write_line(&mut writer, &response).await?;
            return Ok(());
        }
        let request: Request = match serde_json::from_str(line.trim()) {
            Ok(request) => request,
            Err(error) => {
                write_line(
                    &mut writer,
                    &Response::error(format!("bad request: {error}")),
                )
                .await?;
                continue;
            }
        };
        if request == Request::Events {
            let mut events = handler.subscribe();
            write_line(&mut writer, &Response::ok("subscribed")).await?;
            loop {
                match events.recv().await {
                    Ok(event) => {
                        writer.write_all(event.as_bytes()).await?;
                        writer.write_all(b"\n").await?;
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        writer
                            .write_all(format!("(missed {missed} events)\n").as_bytes())
                            .await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                }
            }
        }
        let response = handler.handle(request).await;
        write_line(&mut writer, &response).await?;
    }
}

async fn write_line(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut text = serde_json::to_string(response)
        .unwrap_or_else(|_| r#"{"ok":false,"error":"unencodable response"}"#.into());
    text.push('\n');
    writer.write_all(text.as_bytes()).await
}

/// Errors of the blocking client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {path}: {source} (is replicad running for this node?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("daemon sent an unreadable answer: {0}")]
    BadAnswer(String),
    /// The daemon refused the request: its one-line reason, and the kind of error
    /// (see [`Response::kind`]) when it gave one.
    #[error("{message}")]
    Refused {
        message: String,
        kind: Option<String>,
    },
}

/// A blocking client (for `replctl` and tests).
pub struct Client {
    path: PathBuf,
    reader: BufReader<StdUnixStream>,
    writer: StdUnixStream,
}

impl Client {
    /// Connects with a timeout on every later read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let stream = StdUnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a request and returns its result, or the daemon's refusal.
    pub fn call(&mut self, request: &Request) -> Result<serde_json::Value, ClientError> {
        let mut line =
            serde_json::to_string(request).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let response = self.read_response()?;
        if response.ok {
            Ok(response.result.unwrap_or(serde_json::Value::Null))
        } else {
            Err(ClientError::Refused {
                message: response.error.unwrap_or_else(|| "refused".into()),
                kind: response.kind,
            })
        }
    }

    fn read_response(&mut self) -> Result<Response, ClientError> {
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(ClientError::BadAnswer(
                "daemon closed the connection".into(),
            ));
        }
        serde_json::from_str(&answer).map_err(|e| ClientError::BadAnswer(format!("{e}: {answer}")))
    }

    /// Status of one or all resources.
    pub fn status(&mut self, resource: Option<&str>) -> Result<Vec<ResourceStatus>, ClientError> {
        let value = self.call(&Request::Status {
            resource: resource.map(str::to_string),
        })?;
        serde_json::from_value(value).map_err(|e| ClientError::BadAnswer(e.to_string()))
    }

    /// Subscribes to events; then read lines with [`Client::next_event`].
    pub fn subscribe(&mut self) -> Result<(), ClientError> {
        self.call(&Request::Events).map(|_| ())
    }

    /// The next event line (blocks up to the client's timeout).
    pub fn next_event(&mut self) -> Result<Option<String>, ClientError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(line.trim_end().to_string())),
            Err(error) => Err(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_form() {
        let request = Request::Promote {
            resource: "r0".into(),
            force: true,
        };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(
            text,
            r#"{"command":"promote","resource":"r0","force":true}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"promote","resource":"r0"}"#).unwrap(),
            Request::Promote {
                resource: "r0".into(),
                force: false
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"command":"status","bogus":1}"#).is_err());
    }
}
