//! The replication listener: accepts peers' connections on a node address, checks
//! each HELLO, pairs a peer's data and meta connections, and hands the pair to its
//! resource.
//!
//! A connection that sends garbage, a HELLO for an unknown resource, another protocol
//! version or a foreign resource UUID gets a REJECT frame with the reason (when it
//! spoke our framing at all) and is closed; the daemon serves on.
//!
//! When the resource has a secret, each connection must also prove it holds it (the
//! AUTH frame answering our challenge) before it is kept: an unauthenticated connection
//! never reaches the resource, so it can neither replace a running session nor take
//! the place of a peer's data connection waiting for its meta connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::wire::{Channel, Frame};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::wire_io::{self, read_frame, reject_and_linger, write_frames, LinkError};
use super::Connections;
use crate::resource::Resource;

/// Resources by name, and data connections waiting for their meta connection.
struct Router {
    resources: HashMap<String, Arc<Resource>>,
    pending_data: Mutex<HashMap<(String, String), TcpStream>>,
}

/// Accepts on `listener` until shutdown.
pub async fn run(
    listener: TcpListener,
    resources: HashMap<String, Arc<Resource>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let router = Arc::new(Router {
        resources,
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

async fn handle(router: &Router, mut stream: TcpStream) -> Result<(), LinkError> {
    stream
        .set_nodelay(true)
        .map_err(|error| LinkError::Lost(error.to_string()))?;
    let frame = tokio::time::timeout(wire_io::HELLO_TIMEOUT, read_frame(&mut stream))
        .await
        .map_err(|_| LinkError::HelloTimeout)??;
    let Frame::Hello(hello) = frame else {
        let reason = format!("expected HELLO, got {}", frame.name());
        reject_and_linger(&mut stream, &reason).await;
        return Err(LinkError::Identity(reason));
    };
    let Some(resource) = router.resources.get(&hello.resource) else {
        let reason = format!("no resource {:?} on this node", hello.resource);
        reject_and_linger(&mut stream, &reason).await;
        return Err(LinkError::Identity(reason));
    };
    let peer = resource.peer_by_name(&hello.node);
    let checked = match peer {
        Some((_, ref name, node_id)) => resource.identity().check(&hello, name, node_id),
        None => Err(LinkError::Identity(format!(
            "peer calls itself {} (id {}), which is not a node of resource {}",
            hello.node, hello.node_id, hello.resource
        ))),
    };
    if let Err(error) = checked {
        let reason = error.to_string();
        resource.refused_a_peer(peer.map(|(id, _, _)| id), &reason);
        reject_and_linger(&mut stream, &reason).await;
        return Err(error);
    }
    let Some((peer, name, _)) = peer else {
        return Ok(());
    };
    let (answer, pending_auth) = match resource.identity().answer(&hello, &name) {
        Ok(answer) => answer,
        Err(error) => {
            resource.auth_failed(peer, &error.to_string());
            reject_and_linger(&mut stream, &error.to_string()).await;
            return Err(error.into());
        }
    };
    if !resource.accepts(peer) {
        let reason =
            "this node is StandAlone (disconnected by the operator or after a split brain)"
                .to_string();
        reject_and_linger(&mut stream, &reason).await;
        return Err(LinkError::Refused(reason));
    }
    write_frames(&mut stream, &[Frame::Hello(answer)])
        .await
        .map_err(|error| LinkError::Lost(error.to_string()))?;
    if let Some(pending) = pending_auth {
        let frame = tokio::time::timeout(wire_io::HELLO_TIMEOUT, read_frame(&mut stream))
            .await
            .map_err(|_| LinkError::HelloTimeout)??;
        let checked = match frame {
            Frame::Auth(proof) => pending.check(resource.identity(), &proof),
            Frame::Reject(reason) => {
                // The dialer refused our proof (or our lack of a secret).
                resource.auth_failed(peer, &format!("{name} refused: {reason}"));
                return Err(LinkError::Refused(reason));
            }
            other => {
                let reason = format!("expected AUTH, got {}", other.name());
                reject_and_linger(&mut stream, &reason).await;
                return Err(LinkError::BadFrame(reason));
            }
        };
        if let Err(error) = checked {
            resource.auth_failed(peer, &error.to_string());
            reject_and_linger(&mut stream, &error.to_string()).await;
            return Err(error.into());
        }
    }
    let key = (hello.resource.clone(), name);
    match hello.channel {
        Channel::Data => {
            router
                .pending_data
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, stream);
        }
        Channel::Meta => {
            let data = router
                .pending_data
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            let Some(data) = data else {
                return Err(LinkError::Identity(
                    "meta connection without a data connection".into(),
                ));
            };
            // A new pair means the peer (re)connected: it replaces any current session.
            resource.incoming(peer, Connections { data, meta: stream });
        }
    }
    Ok(())
}
