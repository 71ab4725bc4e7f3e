//! Peer authentication: a challenge-response over a shared secret, run in the HELLO
//! exchange of every replication connection (FORMAT.md §9.1).
//!
//! Each side sends a fresh random challenge; each answers the other's with
//! `HMAC-SHA256(secret, transcript)`, where the transcript binds the protocol version,
//! the channel, the resource (UUID and name), both node ids, which side proves (so a
//! proof cannot be reflected back to its sender) and both challenges (so a proof
//! cannot be replayed on another connection). Proofs are compared in constant time.
//!
//! This module decides; it does no I/O and draws no randomness: the challenges come
//! from the driver (OS randomness in the daemon). A node without a secret talks only
//! to peers without one (the pre-authentication behaviour); a node with a secret
//! talks only to peers that prove they hold the same one.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::wire::{Channel, PROTOCOL_VERSION};

pub const CHALLENGE_BYTES: usize = 32;
pub const PROOF_BYTES: usize = 32;

/// A random value a side sends in its HELLO for the other to answer.
pub type Challenge = [u8; CHALLENGE_BYTES];
/// An HMAC-SHA256 answer to a challenge.
pub type Proof = [u8; PROOF_BYTES];

/// Longest secret accepted (a passphrase or a key file, not a document).
pub const MAX_SECRET_BYTES: usize = 4096;

/// The shared secret of a resource. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret of 1 to [`MAX_SECRET_BYTES`] bytes.
    pub fn new(bytes: Vec<u8>) -> Result<Secret, SecretError> {
        if bytes.is_empty() {
            return Err(SecretError::Empty);
        }
        if bytes.len() > MAX_SECRET_BYTES {
            return Err(SecretError::TooLong(bytes.len()));
        }
        Ok(Secret(bytes))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("the secret is empty")]
    Empty,
    #[error("the secret is {0} bytes, at most {MAX_SECRET_BYTES} are accepted")]
    TooLong(usize),
}

/// Which side of a connection computes a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prover {
    /// The node that opened the connection (the lower node id).
    Dialer,
    /// The node that accepted it.
    Acceptor,
}

/// Everything a proof is bound to: one connection's identities and challenges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transcript<'a> {
    pub resource: &'a str,
    pub resource_uuid: [u8; 16],
    pub channel: Channel,
    pub dialer_node_id: u32,
    pub acceptor_node_id: u32,
    pub dialer_challenge: Challenge,
    pub acceptor_challenge: Challenge,
}

/// Why authentication failed; the message is what both nodes log and status shows.
/// The messages name both nodes, so that they read the same in either node's log
/// (the refused side receives the refusing side's text in a REJECT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication failed: {with} has a secret configured, {without} has none (set the same `secret` or `secret-file` on both nodes)")]
    OneSecret { with: String, without: String },
    #[error("authentication failed: the proof from {prover} does not match the secret of {verifier} (the nodes have different secrets, or the connection is not from {prover})")]
    WrongProof { prover: String, verifier: String },
}

/// Whether a connection between `local` and `peer` authenticates: both hold a secret
/// (`Ok(true)`), neither does (`Ok(false)`); one alone is a refusal.
pub fn required(
    local: &str,
    local_secret: Option<&Secret>,
    peer: &str,
    peer_has_secret: bool,
) -> Result<bool, AuthError> {
    let one = |with: &str, without: &str| AuthError::OneSecret {
        with: with.to_string(),
        without: without.to_string(),
    };
    match (local_secret.is_some(), peer_has_secret) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(one(local, peer)),
        (false, true) => Err(one(peer, local)),
    }
}

fn mac(secret: &Secret, prover: Prover, transcript: &Transcript<'_>) -> Hmac<Sha256> {
    // HMAC takes keys of any length (longer ones are hashed first): this never fails.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&secret.0)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(b"replicad peer authentication\0");
    mac.update(&PROTOCOL_VERSION.to_le_bytes());
    mac.update(&[
        match prover {
            Prover::Dialer => 1,
            Prover::Acceptor => 2,
        },
        match transcript.channel {
            Channel::Data => 1,
            Channel::Meta => 2,
        },
    ]);
    mac.update(&transcript.resource_uuid);
    // Length-prefixed, so that no two transcripts hash the same byte string.
    mac.update(&(transcript.resource.len() as u64).to_le_bytes());
    mac.update(transcript.resource.as_bytes());
    mac.update(&transcript.dialer_node_id.to_le_bytes());
    mac.update(&transcript.acceptor_node_id.to_le_bytes());
    mac.update(&transcript.dialer_challenge);
    mac.update(&transcript.acceptor_challenge);
    mac
}

/// The proof `prover` sends for `transcript`.
pub fn prove(secret: &Secret, prover: Prover, transcript: &Transcript<'_>) -> Proof {
    mac(secret, prover, transcript)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `proof` is the one `prover` must send for `transcript` (compared in
/// constant time).
pub fn verify(secret: &Secret, prover: Prover, transcript: &Transcript<'_>, proof: &Proof) -> bool {
    mac(secret, prover, transcript).verify_slice(proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> Secret {
        Secret::new(text.as_bytes().to_vec()).expect("secret")
    }

    fn transcript() -> Transcript<'static> {
        Transcript {
            resource: "r0",
            resource_uuid: [7; 16],
            channel: Channel::Data,
            dialer_node_id: 0,
            acceptor_node_id: 1,
            dialer_challenge: [1; CHALLENGE_BYTES],
            acceptor_challenge: [2; CHALLENGE_BYTES],
        }
    }

    #[test]
    fn the_same_secret_verifies_both_ways() {
        let shared = secret("correct horse");
        for prover in [Prover::Dialer, Prover::Acceptor] {
            let proof = prove(&shared, prover, &transcript());
            assert!(verify(&shared, prover, &transcript(), &proof));
        }
    }

    #[test]
    fn another_secret_is_a_wrong_proof() {
        let proof = prove(&secret("correct horse"), Prover::Dialer, &transcript());
        assert!(!verify(
            &secret("battery staple"),
            Prover::Dialer,
            &transcript(),
            &proof
        ));
    }

    #[test]
    fn a_proof_is_bound_to_its_side_and_every_transcript_field() {
        let shared = secret("s");
        let proof = prove(&shared, Prover::Acceptor, &transcript());
        // Reflected: the acceptor's own proof sent back as the dialer's.
        assert!(!verify(&shared, Prover::Dialer, &transcript(), &proof));
        let base = transcript();
        let variants = [
            Transcript {
                resource: "r1",
                ..base
            },
            Transcript {
                resource_uuid: [8; 16],
                ..base
            },
            Transcript {
                channel: Channel::Meta,
                ..base
            },
            Transcript {
                dialer_node_id: 2,
                ..base
            },
            Transcript {
                acceptor_node_id: 0,
                ..base
            },
            Transcript {
                dialer_challenge: [9; CHALLENGE_BYTES],
                ..base
            },
            Transcript {
                acceptor_challenge: [9; CHALLENGE_BYTES],
                ..base
            },
        ];
        for (index, other) in variants.iter().enumerate() {
            assert!(
                !verify(&shared, Prover::Acceptor, other, &proof),
                "variant {index} accepted a proof of another transcript"
            );
        }
    }

    #[test]
    fn a_secret_on_one_side_only_is_refused_with_the_side_named() {
        let shared = secret("s");
        assert_eq!(required("alpha", Some(&shared), "beta", true), Ok(true));
        assert_eq!(required("alpha", None, "beta", false), Ok(false));
        let refusals = [
            required("alpha", Some(&shared), "beta", false),
            required("beta", None, "alpha", true),
        ];
        for refusal in refusals {
            assert_eq!(
                refusal.map_err(|error| error.to_string()),
                Err("authentication failed: alpha has a secret configured, beta has none (set the same `secret` or `secret-file` on both nodes)".to_string())
            );
        }
    }

    #[test]
    fn secrets_are_bounded_and_never_printed() {
        assert_eq!(Secret::new(Vec::new()), Err(SecretError::Empty));
        assert!(Secret::new(vec![1; MAX_SECRET_BYTES + 1]).is_err());
        assert_eq!(format!("{:?}", secret("hunter2")), "Secret(<redacted>)");
    }
}
