//! The layer protocol's authenticated, versioned handshake: the client side ([`dial`]) and the stage's
//! side of it.

use std::time::Duration;

use sollol_shared::layers::{
    LAYER_MAGIC, LAYER_PROTOCOL_VERSION, LayerAuth, LayerChallenge, LayerHello, LayerWelcome,
};
use sollol_shared::protocol::{Refusal, RefusalCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cluster::secure::{self, Role, SecureTcp};

use super::Stage;
use crate::cluster::identity::ClusterToken;
use crate::cluster::wire::{self, ProofSide};

/// Handshake frames are small; only requests may be large.
const HANDSHAKE_FRAME_BYTES: u32 = 64 * 1024;

/// Who answered a [`dial`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePeer {
    pub node_id: String,
    pub node_name: String,
    pub build_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot connect to the stage at {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("the stage at {address} refused: {refusal}")]
    Refused { address: String, refusal: Refusal },
    #[error("the stage at {address} did not prove it holds the cluster token")]
    BadProof { address: String },
    #[error("the handshake with the stage at {address} failed: {message}")]
    Handshake { address: String, message: String },
}

/// Connects to the stage at `address` and completes the authenticated, versioned handshake.
pub async fn dial(
    address: &str,
    token: &ClusterToken,
    timeout: Duration,
) -> Result<(SecureTcp, StagePeer), DialError> {
    let failed = |message: String| DialError::Handshake {
        address: address.to_owned(),
        message,
    };
    let exchange = async {
        let mut stream =
            TcpStream::connect(address)
                .await
                .map_err(|source| DialError::Connect {
                    address: address.to_owned(),
                    source,
                })?;
        stream.set_nodelay(true).ok();
        stream
            .write_all(&LAYER_MAGIC)
            .await
            .map_err(|error| failed(error.to_string()))?;
        let nonce = wire::nonce();
        let hello = LayerHello {
            protocol_version: LAYER_PROTOCOL_VERSION,
            build_version: sollol_shared::BUILD_VERSION.to_owned(),
            nonce,
        };
        wire::write_message(&mut stream, &hello)
            .await
            .map_err(|error| failed(error.to_string()))?;
        let challenge: LayerChallenge =
            wire::read_message_within(&mut stream, HANDSHAKE_FRAME_BYTES)
                .await
                .map_err(|error| failed(error.to_string()))?;
        let (peer, stage_nonce) = match challenge {
            LayerChallenge::Refused(refusal) => {
                return Err(DialError::Refused {
                    address: address.to_owned(),
                    refusal,
                });
            }
            LayerChallenge::Challenge {
                build_version,
                node_id,
                node_name,
                nonce: stage_nonce,
                proof,
                ..
            } => {
                if !wire::verify_proof(token, ProofSide::Stage, &nonce, "", &proof) {
                    return Err(DialError::BadProof {
                        address: address.to_owned(),
                    });
                }
                (
                    StagePeer {
                        node_id,
                        node_name,
                        build_version,
                    },
                    stage_nonce,
                )
            }
        };
        let auth = LayerAuth {
            proof: wire::proof(token, ProofSide::LayerClient, &stage_nonce, ""),
        };
        wire::write_message(&mut stream, &auth)
            .await
            .map_err(|error| failed(error.to_string()))?;
        match wire::read_message_within(&mut stream, HANDSHAKE_FRAME_BYTES)
            .await
            .map_err(|error| failed(error.to_string()))?
        {
            LayerWelcome::Welcome => {
                // From here on every frame is encrypted and authenticated.
                let key = secure::link_key(token, secure::LAYER_LINK, &nonce, &stage_nonce);
                let stream = secure::secure_tcp(stream, Role::Dialler, &key)
                    .await
                    .map_err(|error| failed(error.to_string()))?;
                Ok((stream, peer))
            }
            LayerWelcome::Refused(refusal) => Err(DialError::Refused {
                address: address.to_owned(),
                refusal,
            }),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(failed(format!("no answer within {timeout:?}"))))
}

impl Stage {
    /// The stage's side of the handshake; on success, the key of the encrypted link that follows.
    pub(super) async fn handshake(&self, stream: &mut TcpStream) -> Result<[u8; 32], String> {
        let mut magic = [0u8; 8];
        stream
            .read_exact(&mut magic)
            .await
            .map_err(|error| error.to_string())?;
        if magic != LAYER_MAGIC {
            return Err("not a sollol layer client".to_owned());
        }
        let hello: LayerHello = wire::read_message_within(stream, HANDSHAKE_FRAME_BYTES)
            .await
            .map_err(|error| error.to_string())?;
        if hello.protocol_version != LAYER_PROTOCOL_VERSION {
            let message = format!(
                "version mismatch: this stage ({}) speaks layer protocol v{LAYER_PROTOCOL_VERSION} (sollol {}), the peer v{} (sollol {})",
                self.settings.node_name,
                sollol_shared::BUILD_VERSION,
                hello.protocol_version,
                hello.build_version
            );
            let reply = LayerChallenge::Refused(Refusal {
                code: RefusalCode::IncompatibleVersion,
                message: message.clone(),
            });
            let _ = wire::write_message(stream, &reply).await;
            return Err(message);
        }
        let nonce = wire::nonce();
        let challenge = LayerChallenge::Challenge {
            protocol_version: LAYER_PROTOCOL_VERSION,
            build_version: sollol_shared::BUILD_VERSION.to_owned(),
            node_id: self.settings.node_id.clone(),
            node_name: self.settings.node_name.clone(),
            nonce,
            proof: wire::proof(&self.settings.token, ProofSide::Stage, &hello.nonce, ""),
        };
        wire::write_message(stream, &challenge)
            .await
            .map_err(|error| error.to_string())?;
        let auth: LayerAuth = wire::read_message_within(stream, HANDSHAKE_FRAME_BYTES)
            .await
            .map_err(|error| error.to_string())?;
        if !wire::verify_proof(
            &self.settings.token,
            ProofSide::LayerClient,
            &nonce,
            "",
            &auth.proof,
        ) {
            let reply = LayerWelcome::Refused(Refusal {
                code: RefusalCode::BadToken,
                message: "the peer holds another cluster token".to_owned(),
            });
            let _ = wire::write_message(stream, &reply).await;
            return Err("bad token".to_owned());
        }
        wire::write_message(stream, &LayerWelcome::Welcome)
            .await
            .map_err(|error| error.to_string())?;
        Ok(secure::link_key(
            &self.settings.token,
            secure::LAYER_LINK,
            &hello.nonce,
            &nonce,
        ))
    }
}
