//! The replication listener: accepts peers' connections on a node address and hands
//! each (data, meta) pair to its resource's link after checking its HELLO.
//!
//! A connection that sends garbage, a HELLO for an unknown resource, another protocol
//! version or a foreign resource UUID gets a REJECT frame with the reason (when it
//! spoke our framing at all) and is closed; the daemon serves on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::wire::{Channel, Frame, Hello};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::session::{check_hello, our_hello, read_frame, reject_and_linger, write_frames};
use super::{Connections, Link};

/// Links by resource name, and half-open pairs waiting for their meta connection.
struct Router {
    links: HashMap<String, Arc<Link>>,
    pending_data: Mutex<HashMap<String, (TcpStream, Hello)>>,
}

/// Accepts on `listener` until shutdown.
pub async fn run(
    listener: TcpListener,
    links: HashMap<String, Arc<Link>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let router = Arc::new(Router {
        links,
        pending_data: Mutex::new(HashMap::new()),
    });
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, address)) => {
                    let router = router.clone();
                    tokio::spawn(async move {
                        if let Err(error) = handle(&router, stream).await {
                            tracing::warn!("replication connection from {address} refused: {error}");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!("replication accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Sends REJECT and lingers until the peer has read it (bounded).
async fn reject(stream: &mut TcpStream, reason: &str) {
    let (mut reader, mut writer) = stream.split();
    reject_and_linger(&mut reader, &mut writer, reason).await;
}

async fn handle(router: &Router, mut stream: TcpStream) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let frame = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut stream))
        .await
        .map_err(|_| "no HELLO within 5s".to_string())??;
    let Frame::Hello(hello) = frame else {
        let reason = format!("expected HELLO, got {}", frame.name());
        reject(&mut stream, &reason).await;
        return Err(reason);
    };
    let Some(link) = router.links.get(&hello.resource) else {
        let reason = format!("no resource {:?} on this node", hello.resource);
        reject(&mut stream, &reason).await;
        return Err(reason);
    };
    if let Err(reason) = check_hello(link, &hello) {
        link.lock().last_error = Some(format!("refused a peer: {reason}"));
        if let Some(resource) = link.resource() {
            resource.emit(&format!("refused a connection: {reason}"));
        }
        reject(&mut stream, &reason).await;
        return Err(reason);
    }
    if link.lock().standalone {
        let reason =
            "this node is StandAlone (disconnected by the operator or after a split brain)"
                .to_string();
        reject(&mut stream, &reason).await;
        return Err(reason);
    }
    let ours = our_hello(link, hello.channel).ok_or("shutting down")?;
    write_frames(&mut stream, &[Frame::Hello(ours)])
        .await
        .map_err(|e| e.to_string())?;
    match hello.channel {
        Channel::Data => {
            router
                .pending_data
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(hello.resource.clone(), (stream, hello));
        }
        Channel::Meta => {
            let data = router
                .pending_data
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&hello.resource);
            let Some((data, data_hello)) = data else {
                return Err("meta connection without a data connection".into());
            };
            // A new pair means the peer (re)connected: it replaces any current session.
            *link.incoming.lock().unwrap_or_else(|p| p.into_inner()) = Some(Connections {
                data,
                meta: stream,
                hello: data_hello,
            });
            if link.is_connected() {
                link.lock().last_error = Some("peer reconnected".into());
                link.session_kill.notify_one();
            }
            link.incoming_wake.notify_one();
        }
    }
    Ok(())
}
