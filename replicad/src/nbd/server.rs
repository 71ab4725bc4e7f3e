//! The tokio driver of the NBD server: listeners, connections, shutdown.
//!
//! [`serve`] accepts connections on a TCP or unix listener until its `shutdown` future
//! completes. Each connection runs the handshake under a timeout, then the transmission
//! phase (see `transmission.rs`) with a reader task, a writer task and a task per request.
//!
//! Graceful shutdown: the listener is closed at once; connections still haggling options
//! are closed (or answered `NBD_REP_ERR_SHUTDOWN` if an option is already in); connections
//! in transmission stop reading requests, let the requests in flight finish and write
//! their replies, then close. Connections still open after
//! [`ServerConfig::shutdown_grace`] (a client that does not read its replies, an export
//! that never completes) are closed without waiting further.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tracing::{debug, error, info, warn, Instrument};

use super::handshake::{self, HandshakeError, Outcome};
use super::transmission::{self, End};
use super::{proto, ExportSet};

/// Request bytes are read from the socket through a buffer of this size, so that many
/// small requests arrive with one system call.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// How long the accept loop pauses after an accept error such as `EMFILE`, which would
/// otherwise repeat at once.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A listening socket: TCP or unix.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Listener {
        Listener::Tcp(listener)
    }
}

impl From<UnixListener> for Listener {
    fn from(listener: UnixListener) -> Listener {
        Listener::Unix(listener)
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok((Stream::Tcp(stream), peer.to_string()))
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                Ok((Stream::Unix(stream), "unix".to_owned()))
            }
        }
    }
}

/// Limits and timeouts of a server. Every field bounds a resource a client could
/// otherwise exhaust.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Requests per connection between parsing and the end of their reply's write.
    pub max_in_flight_requests: usize,
    /// Payload bytes (write data, read data) per connection in flight. At least
    /// [`proto::MAX_PAYLOAD_BYTES`], so that the largest request fits.
    pub max_in_flight_payload_bytes: u32,
    /// The longest a client may take from connecting to entering transmission.
    pub handshake_timeout: Duration,
    /// How long shutdown waits for connections to drain before closing them. Export
    /// operations already started are never cancelled: past this grace period their
    /// connections close, but the operations run on in the background.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_connections: 256,
            max_in_flight_requests: 512,
            max_in_flight_payload_bytes: 2 * proto::MAX_PAYLOAD_BYTES,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl ServerConfig {
    fn validate(&self) -> io::Result<()> {
        let invalid = |message: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, message));
        if self.max_connections == 0 {
            return invalid("max_connections must be at least 1");
        }
        if self.max_in_flight_requests == 0 {
            return invalid("max_in_flight_requests must be at least 1");
        }
        if self.max_in_flight_payload_bytes < proto::MAX_PAYLOAD_BYTES {
            return invalid("max_in_flight_payload_bytes must hold the largest request (32 MiB)");
        }
        Ok(())
    }
}

/// Serves `exports` on `listener` with the default [`ServerConfig`] until `shutdown`
/// completes, then shuts down gracefully (see the module documentation). Returns once
/// every connection is closed.
pub async fn serve<S: ExportSet>(
    listener: impl Into<Listener>,
    exports: Arc<S>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve_with_config(listener, exports, ServerConfig::default(), shutdown).await
}

/// [`serve`] with explicit limits. Fails at once if the configuration is invalid.
pub async fn serve_with_config<S: ExportSet>(
    listener: impl Into<Listener>,
    exports: Arc<S>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    config.validate()?;
    let listener = listener.into();
    let config = Arc::new(config);
    let (stop_sender, stop_receiver) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut connection_id: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                report_panic(joined);
            }
            accepted = listener.accept(), if connections.len() < config.max_connections => {
                match accepted {
                    Ok((stream, peer)) => {
                        connection_id += 1;
                        let span = tracing::debug_span!("nbd", connection = connection_id, %peer);
                        connections.spawn(
                            handle_connection(stream, Arc::clone(&exports), Arc::clone(&config), stop_receiver.clone())
                                .instrument(span),
                        );
                    }
                    Err(error) => {
                        warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                }
            }
        }
    }
    drop(listener);
    info!(
        connections = connections.len(),
        "NBD server shutting down; draining connections"
    );
    // Ignored if no connection is listening: there is nothing to stop.
    let _ = stop_sender.send(true);
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while let Some(joined) = connections.join_next().await {
            report_panic(joined);
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = connections.len(),
            "connections still open after the shutdown grace period; closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

fn report_panic(joined: Result<(), JoinError>) {
    if let Err(join_error) = joined {
        if join_error.is_panic() {
            error!(%join_error, "NBD connection task panicked");
        }
    }
}

/// Completes once `stop` says true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// A task handle that aborts the task when dropped, so that a connection's writer task
/// does not outlive its connection task.
pub(crate) struct AbortOnDrop<T>(pub JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    pub(crate) async fn join(mut self) -> Result<T, JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn handle_connection<S: ExportSet>(
    stream: Stream,
    exports: Arc<S>,
    config: Arc<ServerConfig>,
    stop: watch::Receiver<bool>,
) {
    debug!("connected");
    match stream {
        Stream::Tcp(stream) => {
            // The NBD spec asks both ends to disable Nagle's algorithm.
            if let Err(error) = stream.set_nodelay(true) {
                warn!(%error, "cannot set TCP_NODELAY");
            }
            let (reader, writer) = stream.into_split();
            run_connection(reader, writer, &*exports, &config, stop).await;
        }
        Stream::Unix(stream) => {
            let (reader, writer) = stream.into_split();
            run_connection(reader, writer, &*exports, &config, stop).await;
        }
    }
}

async fn run_connection<R, W, S>(
    reader: R,
    mut writer: W,
    exports: &S,
    config: &ServerConfig,
    mut stop: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    S: ExportSet,
{
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let negotiated = tokio::time::timeout(
        config.handshake_timeout,
        handshake::negotiate(&mut reader, &mut writer, exports, &mut stop),
    )
    .await;
    let session = match negotiated {
        Err(_elapsed) => {
            warn!(timeout = ?config.handshake_timeout, "handshake timed out");
            return;
        }
        Ok(Err(HandshakeError::Io(error))) => {
            debug!(%error, "connection lost during the handshake");
            return;
        }
        Ok(Err(error)) => {
            warn!(error = %error_chain(&error), "handshake failed");
            return;
        }
        Ok(Ok(Outcome::Closed)) => {
            debug!("closed during the handshake");
            return;
        }
        Ok(Ok(Outcome::Transmission(session))) => session,
    };
    debug!(
        export = %session.name,
        flags = format_args!("{:#x}", session.transmission_flags),
        "transmission phase"
    );
    let name = session.name.clone();
    match transmission::run(reader, writer, session, config, stop).await {
        Ok(End::Refused) => warn!("connection closed after an oversized request"),
        Ok(End::Unservable) => warn!(
            export = %name,
            "client disconnected: the export's disk is no longer UpToDate or Outdated"
        ),
        Ok(end) => debug!(?end, "disconnected"),
        Err(error) => warn!(error = %error_chain(&error), "connection ended"),
    }
}

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A server running in its own task, stopped by [`ServerHandle::shutdown`] or by dropping
/// the handle (which shuts it down gracefully in the background).
#[derive(Debug)]
pub struct ServerHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

/// Spawns [`serve_with_config`] on the current tokio runtime.
pub fn spawn<S: ExportSet>(
    listener: impl Into<Listener>,
    exports: Arc<S>,
    config: ServerConfig,
) -> ServerHandle {
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        // Completes when the handle says stop or is dropped.
        let _ = stopped.await;
    };
    let task = tokio::spawn(serve_with_config(
        listener.into(),
        exports,
        config,
        shutdown,
    ));
    ServerHandle {
        stop: Some(stop),
        task: Some(task),
    }
}

impl ServerHandle {
    /// Shuts the server down gracefully and waits until every connection is closed.
    pub async fn shutdown(mut self) -> io::Result<()> {
        drop(self.stop.take());
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        // Dropping the sender starts the graceful shutdown; the task finishes on its own.
        drop(self.stop.take());
    }
}
