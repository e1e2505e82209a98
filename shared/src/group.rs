//! The coordinator group's link: how coordinators of one cluster connect to each other.
//!
//! Coordinators dial each other's cluster port. A connection starts with [`GROUP_MAGIC`] (where an
//! agent sends [`crate::protocol::MAGIC`]), then the same length-prefixed postcard frames:
//!
//! ```text
//! dialler                                  listener
//!   GROUP_MAGIC, PeerHello           ->
//!                                    <-    PeerHelloReply::Challenge(nonce_l)     (or Refused)
//!   PeerAuth(proof_d, nonce_d, config) ->
//!                                    <-    PeerAuthReply::Welcome(proof_l, config) (or Refused)
//!   PeerFrame ...                    <->   PeerFrame ...   (Noise-encrypted, as the agent link)
//! ```
//!
//! Each side proves the token with an HMAC over the other's nonce, as agents do. The configuration
//! that must agree across coordinators travels only after the dialler's proof, as keyed digests per
//! section ([`ConfigPart`]): a stranger learns nothing, and a peer whose sections differ is refused
//! with their names ([`crate::protocol::RefusalCode::ConfigDiffers`]). Once welcomed, the link carries
//! the membership library's gossip messages ([`PeerFrame::Gossip`]) in both directions.
//!
//! The compatibility rules of [`crate::protocol`] hold here too: every hello starts with
//! `(protocol_version, build_version)` and `Refused` is variant 0 of every reply.

use serde::{Deserialize, Serialize};

use crate::protocol::{NONCE_BYTES, Refusal};

/// The version of this link's protocol.
pub const GROUP_PROTOCOL_VERSION: u32 = 1;

/// The first bytes a coordinator dialling another sends, before any frame.
pub const GROUP_MAGIC: [u8; 8] = *b"SOLLOL\x00\x02";

/// Domain separation of the dialler's proof: HMAC(token, context ‖ listener nonce ‖ dialler id).
pub const PEER_DIALLER_PROOF_CONTEXT: &[u8] = b"sollol/v1/peer-dialler-proof";
/// Domain separation of the listener's proof: HMAC(token, context ‖ dialler nonce ‖ dialler id).
pub const PEER_LISTENER_PROOF_CONTEXT: &[u8] = b"sollol/v1/peer-listener-proof";

/// The dialler's first frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHello {
    pub protocol_version: u32,
    pub build_version: String,
    /// The dialler's coordinator id (its node id).
    pub coordinator_id: String,
    /// Where the others reach the dialler's cluster port, `HOST:PORT`.
    pub cluster_address: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerHelloReply {
    Refused(Refusal),
    Challenge {
        protocol_version: u32,
        build_version: String,
        nonce: [u8; NONCE_BYTES],
    },
}

/// One section of the configuration every coordinator must share, as a digest keyed with the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigPart {
    /// The section's name as the configuration reference writes it, e.g. `models.replicas`.
    pub name: String,
    pub digest: [u8; 32],
}

/// The dialler's second frame: its proof over the listener's nonce, its own nonce, its shared
/// configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAuth {
    pub proof: [u8; 32],
    pub nonce: [u8; NONCE_BYTES],
    pub config: Vec<ConfigPart>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerAuthReply {
    Refused(Refusal),
    Welcome {
        proof: [u8; 32],
        /// The listener's coordinator id.
        coordinator_id: String,
        /// Where the others reach the listener's cluster port.
        cluster_address: String,
        config: Vec<ConfigPart>,
    },
}

/// What a welcomed link carries, both ways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// One message of the membership library, in its own encoding.
    Gossip(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The sender is shutting down.
    Closing { reason: String },
}

/// The sections whose digests differ between two lists (either side's names, in order, once).
pub fn differing_parts(ours: &[ConfigPart], theirs: &[ConfigPart]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for part in ours {
        let same = theirs
            .iter()
            .any(|other| other.name == part.name && other.digest == part.digest);
        if !same && !names.contains(&part.name) {
            names.push(part.name.clone());
        }
    }
    for part in theirs {
        if !ours.iter().any(|other| other.name == part.name) && !names.contains(&part.name) {
            names.push(part.name.clone());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str, byte: u8) -> ConfigPart {
        ConfigPart {
            name: name.to_owned(),
            digest: [byte; 32],
        }
    }

    #[test]
    fn differing_parts_names_each_section_once() {
        let ours = vec![
            part("keys", 1),
            part("models.replicas", 2),
            part("nodes", 3),
        ];
        let theirs = vec![
            part("keys", 1),
            part("models.replicas", 9),
            part("extra", 4),
        ];
        assert_eq!(
            differing_parts(&ours, &theirs),
            ["models.replicas", "nodes", "extra"]
        );
        assert!(differing_parts(&ours, &ours).is_empty());
    }

    #[test]
    fn a_gossip_frame_is_a_postcard_byte_string() {
        let frame = PeerFrame::Gossip(vec![1, 2, 3]);
        let bytes = postcard::to_stdvec(&frame).expect("encode");
        assert_eq!(bytes, [0, 3, 1, 2, 3]);
        assert_eq!(
            postcard::from_bytes::<PeerFrame>(&bytes).expect("decode"),
            frame
        );
    }
}
