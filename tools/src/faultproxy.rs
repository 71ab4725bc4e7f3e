//! A fault-injecting TCP proxy for tests and demos: put it between two replicad nodes
//! to add latency, cut and heal the link, black-hole it (a silent partition), or flip
//! a bit in the stream. Runs its own small tokio runtime on a background thread;
//! controlled through a cheap, clonable [`FaultProxy`] handle.
//!
//! When either side of a proxied connection closes, bytes still queued in the proxy
//! (delayed, not yet forwarded) are dropped: the crash of a node also loses what was
//! "on the wire", the harshest version of the fault.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Default)]
struct Faults {
    /// One-way delay added to every chunk, in microseconds.
    delay_us: AtomicU64,
    /// Refuse and drop every connection.
    cut: AtomicBool,
    /// Keep connections open but forward nothing (a silent partition).
    blackhole: AtomicBool,
    /// Flip one bit this many bytes from now (counting forwarded bytes in both directions); 0 = off.
    corrupt_in: Mutex<Option<u64>>,
    forwarded: AtomicU64,
    connections: AtomicU64,
    changed: Notify,
}

/// Handle to a running proxy. Dropping the last handle stops it.
#[derive(Clone)]
pub struct FaultProxy {
    faults: Arc<Faults>,
    pub listen: SocketAddr,
    pub target: SocketAddr,
    _runtime: Arc<RuntimeGuard>,
}

struct RuntimeGuard {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl FaultProxy {
    /// Listens on `listen` and forwards each connection to `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> std::io::Result<FaultProxy> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("faultproxy")
            .build()?;
        let listener = runtime.block_on(TcpListener::bind(listen))?;
        let listen = listener.local_addr()?;
        let faults = Arc::new(Faults::default());
        runtime.spawn(accept_loop(listener, target, faults.clone()));
        Ok(FaultProxy {
            faults,
            listen,
            target,
            _runtime: Arc::new(RuntimeGuard {
                runtime: Some(runtime),
            }),
        })
    }

    /// Adds `delay` to every chunk in each direction (0 removes it).
    pub fn set_delay(&self, delay: Duration) {
        self.faults
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cuts every connection now and refuses new ones until [`FaultProxy::heal`].
    pub fn cut(&self) {
        self.faults.cut.store(true, Ordering::Relaxed);
        self.faults.changed.notify_waiters();
    }

    /// Forwards nothing (connections stay open: only timeouts can notice).
    pub fn blackhole(&self) {
        self.faults.blackhole.store(true, Ordering::Relaxed);
    }

    /// Ends a cut or black hole.
    pub fn heal(&self) {
        self.faults.cut.store(false, Ordering::Relaxed);
        self.faults.blackhole.store(false, Ordering::Relaxed);
        self.faults.changed.notify_waiters();
    }

    /// Flips one bit in the byte `after_bytes` from now (in whichever direction it falls).
    pub fn corrupt_after(&self, after_bytes: u64) {
        *self
            .faults
            .corrupt_in
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(after_bytes);
    }

    /// Bytes forwarded so far (both directions).
    pub fn forwarded_bytes(&self) -> u64 {
        self.faults.forwarded.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.faults.connections.load(Ordering::Relaxed)
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, faults: Arc<Faults>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if faults.cut.load(Ordering::Relaxed) {
            drop(client);
            continue;
        }
        faults.connections.fetch_add(1, Ordering::Relaxed);
        let faults = faults.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let stop = Arc::new(Notify::new());
            let one = tokio::spawn(pump(
                client_read,
                server_write,
                faults.clone(),
                stop.clone(),
            ));
            let two = tokio::spawn(pump(
                server_read,
                client_write,
                faults.clone(),
                stop.clone(),
            ));
            let _ = tokio::join!(one, two);
        });
    }
}

/// Moves bytes one way, honouring the faults. Ends (and ends its sibling) on close.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: Arc<Faults>,
    stop: Arc<Notify>,
) {
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if faults.cut.load(Ordering::Relaxed) {
            break;
        }
        let next_due = queue.front().map(|(due, _)| *due);
        let blackholed = faults.blackhole.load(Ordering::Relaxed);
        tokio::select! {
            _ = stop.notified() => break,
            _ = faults.changed.notified() => continue,
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    // The sender is gone: what it sent and we still hold dies with it.
                    queue.clear();
                    break;
                }
                Ok(n) => {
                    let mut chunk = buf[..n].to_vec();
                    {
                        let mut corrupt = faults.corrupt_in.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(after) = *corrupt {
                            if after < n as u64 {
                                chunk[after as usize] ^= 0x10;
                                *corrupt = None;
                            } else {
                                *corrupt = Some(after - n as u64);
                            }
                        }
                    }
                    let delay = Duration::from_micros(faults.delay_us.load(Ordering::Relaxed));
                    queue.push_back((Instant::now() + delay, chunk));
                }
            },
            _ = async {
                match next_due {
                    Some(due) if !blackholed => tokio::time::sleep_until(due).await,
                    _ => std::future::pending::<()>().await,
                }
            } => {
                if let Some((_, chunk)) = queue.pop_front() {
                    if to.write_all(&chunk).await.is_err() {
                        break;
                    }
                    faults.forwarded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
    // One sibling waits on `stop`: notify_one leaves a permit even if it is busy.
    stop.notify_one();
    let _ = to.shutdown().await;
}
