//! Framing and proofs of the agent ↔ coordinator protocol (types in `sollol_shared::protocol`).
//!
//! A frame is a 4-byte big-endian length and that many bytes of postcard. This
//! module owns the byte level only: it never decides whether a peer is welcome.

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;
use sollol_shared::group::{PEER_DIALLER_PROOF_CONTEXT, PEER_LISTENER_PROOF_CONTEXT};
use sollol_shared::layers::{LAYER_CLIENT_PROOF_CONTEXT, STAGE_PROOF_CONTEXT};
use sollol_shared::protocol::{
    AGENT_PROOF_CONTEXT, COORDINATOR_PROOF_CONTEXT, MAX_FRAME_BYTES, NONCE_BYTES,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::cluster::identity::ClusterToken;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed by peer")]
    Closed,
    #[error("frame of {length} bytes exceeds the limit of {limit} bytes")]
    TooLarge { length: u32, limit: u32 },
    #[error("malformed frame: {0}")]
    Malformed(postcard::Error),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame's payload.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, FrameError> {
    read_frame_within(reader, MAX_FRAME_BYTES).await
}

/// Reads one frame's payload of at most `limit` bytes.
pub async fn read_frame_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: u32,
) -> Result<Vec<u8>, FrameError> {
    let mut length = [0u8; 4];
    match reader.read_exact(&mut length).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(FrameError::Closed);
        }
        Err(error) => return Err(FrameError::Io(error)),
    }
    let length = u32::from_be_bytes(length);
    if length > limit {
        return Err(FrameError::TooLarge { length, limit });
    }
    // Read into spare capacity (no zeroing of a buffer about to be overwritten: frames of model bytes
    // are large).
    let mut payload = Vec::with_capacity(length as usize);
    (&mut *reader)
        .take(u64::from(length))
        .read_to_end(&mut payload)
        .await
        .map_err(FrameError::Io)?;
    if payload.len() < length as usize {
        return Err(FrameError::Closed);
    }
    Ok(payload)
}

/// Reads one frame and decodes it as `T`.
pub async fn read_message<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<T, FrameError> {
    read_message_within(reader, MAX_FRAME_BYTES).await
}

/// Reads one frame of at most `limit` bytes and decodes it as `T`.
pub async fn read_message_within<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: u32,
) -> Result<T, FrameError> {
    let payload = read_frame_within(reader, limit).await?;
    postcard::from_bytes(&payload).map_err(FrameError::Malformed)
}

/// Encodes `message` and writes it as one frame.
pub async fn write_message<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &T,
) -> Result<(), FrameError> {
    write_message_within(writer, message, MAX_FRAME_BYTES).await
}

/// Encodes `message` and writes it as one frame of at most `limit` bytes.
pub async fn write_message_within<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &T,
    limit: u32,
) -> Result<(), FrameError> {
    let payload = postcard::to_stdvec(message).map_err(FrameError::Malformed)?;
    let length = u32::try_from(payload.len())
        .ok()
        .filter(|length| *length <= limit)
        .ok_or(FrameError::TooLarge {
            length: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            limit,
        })?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&payload);
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

/// A fresh random nonce for the challenge–response.
pub fn nonce() -> [u8; NONCE_BYTES] {
    use rand::RngCore;
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

/// Which side a proof comes from; each side's proof uses its own context so one cannot be replayed as the other.
#[derive(Clone, Copy, Debug)]
pub enum ProofSide {
    Agent,
    Coordinator,
    /// Layer protocol: the stage answering a connection.
    Stage,
    /// Layer protocol: whoever dialled the stage (the coordinator or the previous stage).
    LayerClient,
    /// Coordinator group: a coordinator dialling another.
    PeerDialler,
    /// Coordinator group: the coordinator it dialled.
    PeerListener,
}

/// HMAC-SHA256(token, context ‖ nonce ‖ node id).
pub fn proof(
    token: &ClusterToken,
    side: ProofSide,
    nonce: &[u8; NONCE_BYTES],
    node_id: &str,
) -> [u8; 32] {
    mac(token, side, nonce, node_id)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a proof in constant time.
pub fn verify_proof(
    token: &ClusterToken,
    side: ProofSide,
    nonce: &[u8; NONCE_BYTES],
    node_id: &str,
    proof: &[u8; 32],
) -> bool {
    mac(token, side, nonce, node_id).verify_slice(proof).is_ok()
}

fn mac(
    token: &ClusterToken,
    side: ProofSide,
    nonce: &[u8; NONCE_BYTES],
    node_id: &str,
) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(match side {
        ProofSide::Agent => AGENT_PROOF_CONTEXT,
        ProofSide::Coordinator => COORDINATOR_PROOF_CONTEXT,
        ProofSide::Stage => STAGE_PROOF_CONTEXT,
        ProofSide::LayerClient => LAYER_CLIENT_PROOF_CONTEXT,
        ProofSide::PeerDialler => PEER_DIALLER_PROOF_CONTEXT,
        ProofSide::PeerListener => PEER_LISTENER_PROOF_CONTEXT,
    });
    mac.update(nonce);
    mac.update(node_id.as_bytes());
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> ClusterToken {
        ClusterToken::parse(text).expect("token")
    }

    #[test]
    fn proofs_bind_token_side_nonce_and_node() {
        let good = token("0123456789abcdef0123456789abcdef");
        let nonce = [7u8; NONCE_BYTES];
        let proof_a = proof(&good, ProofSide::Agent, &nonce, "node");
        assert!(verify_proof(
            &good,
            ProofSide::Agent,
            &nonce,
            "node",
            &proof_a
        ));
        assert!(!verify_proof(
            &token("0123456789abcdef0123456789abcdee"),
            ProofSide::Agent,
            &nonce,
            "node",
            &proof_a
        ));
        assert!(!verify_proof(
            &good,
            ProofSide::Coordinator,
            &nonce,
            "node",
            &proof_a
        ));
        assert!(!verify_proof(
            &good,
            ProofSide::Agent,
            &[8u8; NONCE_BYTES],
            "node",
            &proof_a
        ));
        assert!(!verify_proof(
            &good,
            ProofSide::Agent,
            &nonce,
            "other",
            &proof_a
        ));
    }

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        write_message(&mut client, &("hello".to_owned(), 42u32))
            .await
            .expect("write");
        let (text, number): (String, u32) = read_message(&mut server).await.expect("read");
        assert_eq!((text.as_str(), number), ("hello", 42));

        client
            .write_all(&(MAX_FRAME_BYTES + 1).to_be_bytes())
            .await
            .expect("write");
        match read_frame(&mut server).await {
            Err(FrameError::TooLarge { length, limit }) => {
                assert_eq!((length, limit), (MAX_FRAME_BYTES + 1, MAX_FRAME_BYTES));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }

        client.write_all(&3u32.to_be_bytes()).await.expect("write");
        client.write_all(&[0xff, 0xff, 0xff]).await.expect("write");
        assert!(matches!(
            read_message::<u64, _>(&mut server).await,
            Err(FrameError::Malformed(_))
        ));

        drop(client);
        assert!(matches!(
            read_frame(&mut server).await,
            Err(FrameError::Closed)
        ));
    }
}
