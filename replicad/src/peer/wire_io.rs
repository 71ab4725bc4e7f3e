//! Frames on a socket: reading one (checked before anything is allocated), writing a
//! batch in one vectored write, HELLO and its checks (identity, then authentication:
//! [`engine::auth`]), REJECT with a linger.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use engine::auth::{self, AuthError, Challenge, Prover, Secret, Transcript};
use engine::wire::{self, Channel, Frame, Hello, FRAME_HEADER_BYTES, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a connection could not be set up or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("connection lost mid-frame: {0}")]
    Truncated(String),
    #[error("bad frame from peer: {0}")]
    BadFrame(String),
    #[error("connecting to {address} timed out")]
    ConnectTimeout { address: String },
    #[error("connecting to {address}: {why}")]
    Connect { address: String, why: String },
    #[error("peer did not answer HELLO")]
    NoHello,
    #[error("no HELLO within {}s", HELLO_TIMEOUT.as_secs())]
    HelloTimeout,
    #[error("peer refused the connection: {0}")]
    Refused(String),
    #[error("peer answered HELLO with {0}")]
    UnexpectedFrame(&'static str),
    /// The peer's HELLO does not match the config (protocol, resource, node).
    #[error("{0}")]
    Identity(String),
    /// A secret on one side only, or a proof that does not match ours.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// How long the refusing side keeps a connection open for the peer to read its REJECT.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// A HELLO must arrive within this.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads one frame: header checked (magic, CRC, length limit) before the body is read.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Frame, LinkError> {
    let mut head = [0u8; FRAME_HEADER_BYTES];
    reader
        .read_exact(&mut head)
        .await
        .map_err(|error| LinkError::Lost(error.to_string()))?;
    let header =
        wire::decode_header(&head).map_err(|error| LinkError::BadFrame(error.to_string()))?;
    let mut body = BytesMut::new();
    crate::read_into::read_exact_into(reader, &mut body, header.body_bytes as usize)
        .await
        .map_err(|error| LinkError::Truncated(error.to_string()))?;
    wire::decode_body(&header, body.freeze())
        .map_err(|error| LinkError::BadFrame(error.to_string()))
}

/// Writes frames (gathered into vectored writes of up to 64 slices).
pub async fn write_frames<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frames: &[Frame],
) -> std::io::Result<()> {
    let mut parts: Vec<Bytes> = Vec::with_capacity(frames.len() * 3);
    for frame in frames {
        parts.extend(frame.encode());
    }
    let mut index = 0;
    let mut offset = 0;
    while index < parts.len() {
        let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&parts[index][offset..])
            .chain(parts[index + 1..].iter().map(|p| &p[..]))
            .take(64)
            .map(std::io::IoSlice::new)
            .collect();
        let mut written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "peer closed",
            ));
        }
        while written > 0 && index < parts.len() {
            let left = parts[index].len() - offset;
            if written >= left {
                written -= left;
                index += 1;
                offset = 0;
            } else {
                offset += written;
                written = 0;
            }
        }
    }
    writer.flush().await
}

/// Refuses a connection: sends REJECT with `reason`, then keeps the connection open
/// until the peer answers (any frame, typically its own REJECT) or closes, bounded by
/// [`REFUSAL_LINGER`]. Closing right after sending can lose what was sent: a proxy or
/// a reset drops bytes still on the way, and the peer would never learn the reason.
pub async fn reject_and_linger(stream: &mut TcpStream, reason: &str) {
    let (mut reader, mut writer) = stream.split();
    if write_frames(&mut writer, &[Frame::Reject(reason.to_string())])
        .await
        .is_ok()
    {
        let _ = tokio::time::timeout(REFUSAL_LINGER, read_frame(&mut reader)).await;
    }
}

/// Who we are, and whom we expect on the other side, for one resource.
#[derive(Debug, Clone)]
pub struct Identity {
    pub resource: String,
    pub uuid: [u8; 16],
    pub node: String,
    pub node_id: u32,
    /// The resource's shared secret: peers must prove they hold it.
    pub secret: Option<Secret>,
}

/// A fresh challenge from the OS's random source (never from a seeded generator: a
/// challenge must not be predictable from earlier ones).
pub fn fresh_challenge() -> Challenge {
    let mut challenge = [0u8; auth::CHALLENGE_BYTES];
    for chunk in challenge.chunks_mut(8) {
        chunk.copy_from_slice(&engine::rng::os_random_u64().to_le_bytes());
    }
    challenge
}

/// The acceptor's half of the authentication of one connection.
pub struct AcceptorAuth {
    secret: Secret,
    dialer: String,
    dialer_node_id: u32,
    channel: Channel,
    dialer_challenge: Challenge,
    challenge: Challenge,
}

impl AcceptorAuth {
    /// Checks the dialer's AUTH frame.
    pub fn check(&self, identity: &Identity, proof: &auth::Proof) -> Result<(), AuthError> {
        let transcript = identity.transcript(
            self.channel,
            self.dialer_node_id,
            identity.node_id,
            self.dialer_challenge,
            self.challenge,
        );
        if auth::verify(&self.secret, Prover::Dialer, &transcript, proof) {
            Ok(())
        } else {
            Err(AuthError::WrongProof {
                prover: self.dialer.clone(),
                verifier: identity.node.clone(),
            })
        }
    }
}

impl Identity {
    pub fn hello(&self, channel: Channel) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            channel,
            resource_uuid: self.uuid,
            node_id: self.node_id,
            resource: self.resource.clone(),
            node: self.node.clone(),
            authenticates: self.secret.is_some(),
            challenge: [0; auth::CHALLENGE_BYTES],
            proof: [0; auth::PROOF_BYTES],
        }
    }

    fn transcript(
        &self,
        channel: Channel,
        dialer_node_id: u32,
        acceptor_node_id: u32,
        dialer_challenge: Challenge,
        acceptor_challenge: Challenge,
    ) -> Transcript<'_> {
        Transcript {
            resource: &self.resource,
            resource_uuid: self.uuid,
            channel,
            dialer_node_id,
            acceptor_node_id,
            dialer_challenge,
            acceptor_challenge,
        }
    }

    /// The acceptor's answer to a checked HELLO of `peer`: our HELLO (with a proof
    /// and a challenge when both nodes authenticate) and, then, what checks the
    /// dialer's AUTH. A secret on one side only is refused here.
    pub fn answer(
        &self,
        hello: &Hello,
        peer: &str,
    ) -> Result<(Hello, Option<AcceptorAuth>), AuthError> {
        let mut answer = self.hello(hello.channel);
        let authenticate =
            auth::required(&self.node, self.secret.as_ref(), peer, hello.authenticates)?;
        let (true, Some(secret)) = (authenticate, &self.secret) else {
            return Ok((answer, None));
        };
        answer.challenge = fresh_challenge();
        let transcript = self.transcript(
            hello.channel,
            hello.node_id,
            self.node_id,
            hello.challenge,
            answer.challenge,
        );
        answer.proof = auth::prove(secret, Prover::Acceptor, &transcript);
        let pending = AcceptorAuth {
            secret: secret.clone(),
            dialer: peer.to_string(),
            dialer_node_id: hello.node_id,
            channel: hello.channel,
            dialer_challenge: hello.challenge,
            challenge: answer.challenge,
        };
        Ok((answer, Some(pending)))
    }

    /// The dialer's check of the acceptor's answer `reply` to our `sent` HELLO: the
    /// AUTH frame to send when both nodes authenticate.
    fn dialer_auth(
        &self,
        sent: &Hello,
        reply: &Hello,
        peer: &str,
    ) -> Result<Option<Frame>, AuthError> {
        let authenticate =
            auth::required(&self.node, self.secret.as_ref(), peer, reply.authenticates)?;
        let (true, Some(secret)) = (authenticate, &self.secret) else {
            return Ok(None);
        };
        let transcript = self.transcript(
            sent.channel,
            self.node_id,
            reply.node_id,
            sent.challenge,
            reply.challenge,
        );
        if !auth::verify(secret, Prover::Acceptor, &transcript, &reply.proof) {
            return Err(AuthError::WrongProof {
                prover: peer.to_string(),
                verifier: self.node.clone(),
            });
        }
        Ok(Some(Frame::Auth(auth::prove(
            secret,
            Prover::Dialer,
            &transcript,
        ))))
    }

    /// Checks a peer's HELLO against this resource and the expected peer.
    pub fn check(&self, hello: &Hello, peer: &str, peer_id: u32) -> Result<(), LinkError> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(LinkError::Identity(format!(
                "peer speaks replication protocol {}, this node speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            )));
        }
        if hello.resource != self.resource {
            return Err(LinkError::Identity(format!(
                "peer offers resource {:?}, expected {:?}",
                hello.resource, self.resource
            )));
        }
        if hello.resource_uuid != self.uuid {
            return Err(LinkError::Identity(format!(
                "peer's resource UUID {} differs from ours {} (a peer of another resource?)",
                engine::volume::format_uuid(&hello.resource_uuid),
                engine::volume::format_uuid(&self.uuid)
            )));
        }
        if hello.node != peer || hello.node_id != peer_id {
            return Err(LinkError::Identity(format!(
                "peer calls itself {} (id {}), expected {peer} (id {peer_id})",
                hello.node, hello.node_id
            )));
        }
        Ok(())
    }
}

/// Dials one channel: connect, send our HELLO, check the answer.
pub async fn dial_one(
    address: std::net::SocketAddr,
    identity: &Identity,
    peer: &str,
    peer_id: u32,
    channel: Channel,
) -> Result<TcpStream, LinkError> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| LinkError::ConnectTimeout {
            address: address.to_string(),
        })?
        .map_err(|error| LinkError::Connect {
            address: address.to_string(),
            why: error.to_string(),
        })?;
    stream
        .set_nodelay(true)
        .map_err(|error| LinkError::Lost(error.to_string()))?;
    let mut hello = identity.hello(channel);
    if identity.secret.is_some() {
        hello.challenge = fresh_challenge();
    }
    write_frames(&mut stream, &[Frame::Hello(hello.clone())])
        .await
        .map_err(|error| LinkError::Lost(error.to_string()))?;
    let reply = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream))
        .await
        .map_err(|_| LinkError::NoHello)??;
    let reply = match reply {
        Frame::Hello(reply) => reply,
        Frame::Reject(reason) => return Err(LinkError::Refused(reason)),
        other => return Err(LinkError::UnexpectedFrame(other.name())),
    };
    identity.check(&reply, peer, peer_id)?;
    match identity.dialer_auth(&hello, &reply, peer) {
        Ok(None) => Ok(stream),
        Ok(Some(auth)) => {
            write_frames(&mut stream, &[auth])
                .await
                .map_err(|error| LinkError::Lost(error.to_string()))?;
            Ok(stream)
        }
        Err(error) => {
            // The acceptor waits for our AUTH: it learns why it does not come.
            reject_and_linger(&mut stream, &error.to_string()).await;
            Err(LinkError::Auth(error))
        }
    }
}
