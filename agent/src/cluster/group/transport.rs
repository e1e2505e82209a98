//! chitchat's transport over the group's links: each gossip message is one encrypted frame on the link
//! to the peer, instead of a plain UDP datagram.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use tokio::sync::mpsc;

use super::link::Links;

/// Gossip messages from the links: the sender's address and the encoded message.
type Received = mpsc::Receiver<(SocketAddr, Vec<u8>)>;

pub struct LinkTransport {
    links: Arc<Links>,
    /// Taken by the one socket chitchat opens.
    received: Mutex<Option<Received>>,
}

impl LinkTransport {
    pub fn new(links: Arc<Links>, received: Received) -> Self {
        Self {
            links,
            received: Mutex::new(Some(received)),
        }
    }
}

#[async_trait::async_trait]
impl Transport for LinkTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let received = self
            .received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .ok_or_else(|| anyhow::anyhow!("the group's transport is open already"))?;
        Ok(Box::new(LinkSocket {
            links: Arc::clone(&self.links),
            received,
        }))
    }
}

struct LinkSocket {
    links: Arc<Links>,
    received: Received,
}

#[async_trait::async_trait]
impl Socket for LinkSocket {
    /// Never fails: chitchat stops for good on a send error, and a peer that is away is its
    /// failure detector's business.
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        self.links.send(to, message.serialize_to_vec());
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (from, bytes) = self
                .received
                .recv()
                .await
                .ok_or_else(|| anyhow::anyhow!("the group's links are closed"))?;
            match ChitchatMessage::deserialize(&mut bytes.as_slice()) {
                Ok(message) => return Ok((from, message)),
                Err(error) => {
                    tracing::warn!(%from, %error, "undecodable gossip from a coordinator");
                }
            }
        }
    }
}
