//! The node daemon: resources, NBD and replication listeners, the control socket, and
//! graceful shutdown (stop accepting, drain in-flight requests, flush, close stores).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{broadcast, watch};

use crate::config::{Config, NbdAddress};
use crate::control::{self, Handler, Request, Response};
use crate::nbd::{self, ExportSet};
use crate::peer;
use crate::resource::{Resource, ResourceError};
use crate::snapshots::{SnapshotExport, VolumeExport};

/// The resources served on one NBD address.
pub struct ExportGroup {
    resources: BTreeMap<String, Arc<Resource>>,
}

impl ExportSet for ExportGroup {
    type Export = VolumeExport;

    /// `RESOURCE` is the live volume (where this node serves it); `RESOURCE@NAME` a
    /// read-only snapshot (on any node with the disk attached).
    fn get(&self, name: &str) -> Option<Arc<VolumeExport>> {
        if let Some((resource, snapshot)) = name.split_once('@') {
            let resource = self.resources.get(resource)?;
            return SnapshotExport::open(resource.clone(), snapshot)
                .map(|export| Arc::new(VolumeExport::Snapshot(export)));
        }
        let resource = if name.is_empty() && self.resources.len() == 1 {
            self.resources.values().next()
        } else {
            self.resources.get(name)
        }?;
        resource
            .exportable()
            .then(|| Arc::new(VolumeExport::Live(resource.clone())))
    }

    fn names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (name, resource) in &self.resources {
            if resource.exportable() {
                names.push(name.clone());
            }
            names.extend(
                resource
                    .snapshot_names()
                    .into_iter()
                    .map(|snapshot| format!("{name}@{snapshot}")),
            );
        }
        names
    }
}

/// See the module documentation.
pub struct Daemon {
    pub node: String,
    pub config: Config,
    pub resources: BTreeMap<String, Arc<Resource>>,
    events: broadcast::Sender<String>,
    shutdown: watch::Sender<bool>,
}

impl Daemon {
    fn resource(&self, name: &str) -> Result<&Arc<Resource>, DaemonError> {
        self.resources
            .get(name)
            .ok_or_else(|| DaemonError::NoSuchResource {
                resource: name.to_string(),
                node: self.node.clone(),
            })
    }

    async fn dispatch(&self, request: Request) -> Result<serde_json::Value, DaemonError> {
        let text = |message: String| serde_json::Value::String(message);
        match request {
            Request::Status { resource } => {
                let statuses: Vec<_> = match resource {
                    Some(name) => vec![self.resource(&name)?.status()],
                    None => self.resources.values().map(|r| r.status()).collect(),
                };
                Ok(serde_json::to_value(statuses).unwrap_or_default())
            }
            Request::Promote { resource, force } => {
                Ok(text(self.resource(&resource)?.promote(force).await?))
            }
            Request::Demote { resource } => Ok(text(self.resource(&resource)?.demote().await?)),
            Request::Connect {
                resource,
                discard_my_data,
            } => Ok(text(self.resource(&resource)?.connect(discard_my_data)?)),
            Request::Disconnect { resource } => Ok(text(self.resource(&resource)?.disconnect()?)),
            Request::Attach { resource } => {
                let resource = self.resource(&resource)?;
                let report = resource.attach().await?;
                Ok(text(format!(
                    "{}: attached ({} journal records replayed)",
                    resource.name, report.records_replayed
                )))
            }
            Request::Detach { resource } => {
                let resource = self.resource(&resource)?;
                resource.detach().await?;
                Ok(text(format!("{}: detached, disk:Diskless", resource.name)))
            }
            Request::PauseSync { resource } => {
                Ok(text(self.resource(&resource)?.pause_sync(true)?))
            }
            Request::ResumeSync { resource } => {
                Ok(text(self.resource(&resource)?.pause_sync(false)?))
            }
            Request::Verify { resource, repair } => {
                let resource = self.resource(&resource)?;
                let blocks = resource.verify(repair).await?;
                let found = blocks.len() as u64;
                // The list is capped: a wholly different replica has millions.
                let listed: Vec<u64> = blocks.into_iter().take(10_000).collect();
                Ok(serde_json::json!({
                    "resource": resource.name,
                    "out_of_sync_blocks": found,
                    "out_of_sync_bytes": found * engine::BLOCK_BYTES,
                    "blocks": listed,
                    "repair": repair,
                }))
            }
            Request::Invalidate { resource } => {
                Ok(text(self.resource(&resource)?.invalidate().await?))
            }
            Request::NewCurrentUuid {
                resource,
                clear_bitmap,
            } => Ok(text(
                self.resource(&resource)?
                    .new_current_uuid(clear_bitmap)
                    .await?,
            )),
            Request::SnapshotCreate {
                resource,
                name,
                all,
            } => {
                let status = self
                    .resource(&resource)?
                    .snapshot_create(&name, all)
                    .await?;
                Ok(serde_json::to_value(status).unwrap_or_default())
            }
            Request::SnapshotList { resource } => {
                let list = self.resource(&resource)?.snapshot_list()?;
                Ok(serde_json::to_value(list).unwrap_or_default())
            }
            Request::SnapshotDelete { resource, name } => {
                let status = self.resource(&resource)?.snapshot_delete(&name)?;
                Ok(serde_json::to_value(status).unwrap_or_default())
            }
            Request::Events => Err(DaemonError::EventsAlone),
            Request::Shutdown => {
                let _ = self.shutdown.send(true);
                Ok(text(format!("node {} shutting down", self.node)))
            }
        }
    }
}

/// Why the daemon refused or failed a control request.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no resource {resource:?} on node {node}")]
    NoSuchResource { resource: String, node: String },
    #[error("events must be the only request on its connection")]
    EventsAlone,
    #[error(transparent)]
    Resource(#[from] ResourceError),
}

impl DaemonError {
    pub fn kind(&self) -> &'static str {
        match self {
            DaemonError::NoSuchResource { .. } => "no-such-resource",
            DaemonError::EventsAlone => "bad-request",
            DaemonError::Resource(error) => error.kind(),
        }
    }
}

impl From<engine::node::AdminError> for DaemonError {
    fn from(error: engine::node::AdminError) -> DaemonError {
        DaemonError::Resource(error.into())
    }
}

impl Handler for Daemon {
    async fn handle(&self, request: Request) -> Response {
        match self.dispatch(request).await {
            Ok(result) => Response::ok(result),
            Err(error) => Response::error_of_kind(error.to_string(), error.kind()),
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }
}

async fn bind_nbd(address: &NbdAddress) -> anyhow::Result<nbd::Listener> {
    Ok(match address {
        NbdAddress::Tcp(addr) => nbd::Listener::Tcp(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for NBD on {addr}"))?,
        ),
        NbdAddress::Unix(path) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    anyhow::bail!("NBD socket {} is in use by another server", path.display());
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            }
            nbd::Listener::Unix(
                UnixListener::bind(path)
                    .with_context(|| format!("cannot listen for NBD on {}", path.display()))?,
            )
        }
    })
}

/// Runs the daemon for `node` until SIGTERM, SIGINT or a `shutdown` request.
pub async fn run(config: Config, node: String) -> anyhow::Result<()> {
    let control_path = config.control_socket(&node)?;
    let metrics_address = config.metrics_address(&node)?;
    let (events, _) = broadcast::channel(1024);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut resources = BTreeMap::new();
    for name in config.resources_of(&node) {
        let resource_config = config.resource(&name)?;
        let secret = config.secret(&name)?;
        if secret.is_none() && resource_config.nodes.len() > 1 {
            tracing::warn!(
                "{name}: no secret configured: replication peers are not authenticated (set `secret-file`)"
            );
        }
        let resource = Resource::new(&name, &node, resource_config, secret, events.clone())?;
        resources.insert(name, resource);
    }
    // Attach every store (recovery runs now); a store that fails stays Diskless.
    crate::notify::status(&format!("attaching {} store(s)", resources.len()));
    for resource in resources.values() {
        if let Err(error) = resource.attach().await {
            tracing::error!(
                "{}: cannot attach {}: {error}",
                resource.name,
                resource.node_config.disk.display()
            );
        }
    }
    let daemon = Arc::new(Daemon {
        node: node.clone(),
        config: config.clone(),
        resources: resources.clone(),
        events,
        shutdown: shutdown_tx,
    });

    // NBD listeners, one per distinct address.
    let mut groups: Vec<(NbdAddress, BTreeMap<String, Arc<Resource>>)> = Vec::new();
    for (name, resource) in &resources {
        let address = resource.node_config.nbd.clone();
        match groups.iter_mut().find(|(a, _)| *a == address) {
            Some((_, group)) => {
                group.insert(name.clone(), resource.clone());
            }
            None => groups.push((address, BTreeMap::from([(name.clone(), resource.clone())]))),
        }
    }
    let mut nbd_servers = Vec::new();
    let mut unix_sockets = Vec::new();
    for (address, group) in groups {
        let listener = bind_nbd(&address).await?;
        if let NbdAddress::Unix(path) = &address {
            unix_sockets.push(path.clone());
        }
        let exports = Arc::new(ExportGroup { resources: group });
        let mut stop = shutdown_rx.clone();
        nbd_servers.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            if let Err(error) = nbd::serve(listener, exports, shutdown).await {
                tracing::error!("NBD server on {address} failed: {error}");
            }
        }));
    }

    // Replication listeners, one per distinct node address.
    let mut by_address: HashMap<SocketAddr, HashMap<String, Arc<Resource>>> = HashMap::new();
    for resource in resources.values() {
        if !resource.single_node() {
            by_address
                .entry(resource.node_config.listen_address())
                .or_default()
                .insert(resource.name.clone(), resource.clone());
        }
    }
    let mut background = Vec::new();
    for (address, group) in by_address {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen for replication on {address}"))?;
        background.push(tokio::spawn(peer::listener::run(
            listener,
            group,
            shutdown_rx.clone(),
        )));
    }
    for resource in resources.values() {
        background.push(tokio::spawn(resource.clone().run(shutdown_rx.clone())));
    }
    if let Some(address) = metrics_address {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen for metrics on {address}"))?;
        let mut stop = shutdown_rx.clone();
        let served = resources.values().cloned().collect();
        background.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            crate::metrics::serve(listener, served, shutdown).await;
        }));
        tracing::info!("serving Prometheus metrics on http://{address}/metrics");
    }

    // Control socket last: once it answers, everything else listens.
    let control_listener = control::bind(&control_path)
        .await
        .with_context(|| format!("cannot create control socket {}", control_path.display()))?;
    let control_daemon = daemon.clone();
    let mut control_stop = shutdown_rx.clone();
    let control_socket = control_path.clone();
    let control_task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = control_stop.wait_for(|stop| *stop).await;
        };
        if let Err(error) =
            control::serve(control_listener, &control_socket, control_daemon, shutdown).await
        {
            tracing::error!("control socket failed: {error}");
        }
    });
    tracing::info!(
        "replicad node {node} ready: {} resource(s), control socket {}",
        resources.len(),
        control_path.display()
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Ready only now: a SIGTERM sent as soon as READY=1 arrives finds its handler.
    crate::notify::ready(&format!(
        "node {node}: serving {} resource(s)",
        resources.len()
    ));
    let mut stop = shutdown_rx.clone();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = stop.wait_for(|stop| *stop) => tracing::info!("shutdown requested"),
    }
    crate::notify::stopping("stopping: draining NBD requests, then closing the stores");
    let _ = daemon.shutdown.send(true);
    // Drain NBD first (in-flight requests finish and reply), then stop replication.
    for server in nbd_servers {
        let _ = tokio::time::timeout(Duration::from_secs(40), server).await;
    }
    for task in background {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), control_task).await;
    let mut failures = Vec::new();
    for resource in resources.values() {
        if let Err(error) = resource.close_volume("daemon shutting down").await {
            failures.push(format!("{}: {error}", resource.name));
        }
    }
    for path in unix_sockets {
        let _ = std::fs::remove_file(path);
    }
    if !failures.is_empty() {
        anyhow::bail!("closing stores failed: {}", failures.join("; "));
    }
    tracing::info!("replicad node {node} stopped cleanly");
    Ok(())
}
