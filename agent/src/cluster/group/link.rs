//! The links between coordinators: dialled on demand when gossip is sent to an address, accepted on the
//! cluster port (after [`GROUP_MAGIC`]), both proving the token and comparing the shared configuration
//! before anything else passes, then Noise-encrypted like the agents' links.
//!
//! Sending never waits: a message to an address without a link starts a dial and is dropped (gossip
//! sends again next round, as it would after a lost datagram), and a link whose queue is full drops it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sollol_shared::BUILD_VERSION;
use sollol_shared::group::{
    ConfigPart, GROUP_MAGIC, GROUP_PROTOCOL_VERSION, PeerAuth, PeerAuthReply, PeerFrame, PeerHello,
    PeerHelloReply, differing_parts,
};
use sollol_shared::protocol::{HelloPrefix, Refusal, RefusalCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::identity::{ClusterToken, NodeId};
use crate::cluster::secure::{self, Role, SecureReader, SecureWriter};
use crate::cluster::wire::{self, FrameError, ProofSide};

/// Messages queued per link; gossip beyond this is dropped, as a full socket buffer would.
const LINK_QUEUE: usize = 64;
/// A link that carries nothing for this long is dead (gossip flows every round on a live one).
const LINK_IDLE: Duration = Duration::from_secs(5);
/// How long after a failed dial an address is not dialled again.
const DIAL_AGAIN_AFTER: Duration = Duration::from_millis(500);
/// How long after a refusal (another configuration, another cluster) an address is not dialled again.
const DIAL_REFUSED_AGAIN_AFTER: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Who this coordinator is on the group's links.
#[derive(Clone, Debug)]
pub struct Identity {
    pub id: String,
    /// Where the others reach this coordinator's cluster port.
    pub cluster_address: SocketAddr,
    /// The shared configuration, keyed with the token.
    pub config: Vec<ConfigPart>,
}

/// A peer this coordinator will not gossip with, and why.
#[derive(Clone, Debug)]
pub struct Refused {
    pub coordinator_id: Option<String>,
    pub reason: String,
    pub at: Instant,
}

#[derive(Debug)]
struct Link {
    id: u64,
    sender: mpsc::Sender<Vec<u8>>,
}

#[derive(Debug)]
enum LinkError {
    Refused(Refusal),
    /// The listener is this coordinator itself (its own address among the peers).
    Itself,
    Failed(String),
}

impl From<FrameError> for LinkError {
    fn from(error: FrameError) -> Self {
        Self::Failed(error.to_string())
    }
}

impl From<std::io::Error> for LinkError {
    fn from(error: std::io::Error) -> Self {
        Self::Failed(error.to_string())
    }
}

/// Every link of this coordinator, by the address gossip knows the peer by.
#[derive(Debug)]
pub struct Links {
    token: ClusterToken,
    me: Identity,
    handshake_timeout: Duration,
    links: Mutex<HashMap<SocketAddr, Link>>,
    /// Addresses not to dial before the instant given.
    not_before: Mutex<HashMap<SocketAddr, Instant>>,
    /// Addresses that turned out to be this coordinator.
    itself: Mutex<Vec<SocketAddr>>,
    refused: Mutex<BTreeMap<SocketAddr, Refused>>,
    received: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    next_link: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Links {
    /// The links and the receiving end of every message they bring.
    pub fn new(
        token: ClusterToken,
        me: Identity,
        handshake_timeout: Duration,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> (Self, mpsc::Receiver<(SocketAddr, Vec<u8>)>) {
        let (received, receiver) = mpsc::channel(1024);
        let links = Self {
            token,
            me,
            handshake_timeout,
            links: Mutex::default(),
            not_before: Mutex::default(),
            itself: Mutex::default(),
            refused: Mutex::default(),
            received,
            next_link: AtomicU64::new(1),
            shutdown,
            tasks,
        };
        (links, receiver)
    }

    pub fn me(&self) -> &Identity {
        &self.me
    }

    /// Peers refused, by the address they were dialled or known at.
    pub fn refused(&self) -> Vec<(SocketAddr, Refused)> {
        lock(&self.refused)
            .iter()
            .map(|(address, refused)| (*address, refused.clone()))
            .collect()
    }

    /// Sends `bytes` to the coordinator at `to`, dialling it first if there is no link (this message is
    /// then dropped). Never waits.
    pub fn send(self: &std::sync::Arc<Self>, to: SocketAddr, bytes: Vec<u8>) {
        if to == self.me.cluster_address || lock(&self.itself).contains(&to) {
            return;
        }
        if let Some(link) = lock(&self.links).get(&to) {
            // Full: dropped like a datagram; closed: the link's task is about to unregister it.
            let _ = link.sender.try_send(bytes);
            return;
        }
        let now = Instant::now();
        {
            let mut not_before = lock(&self.not_before);
            if not_before.get(&to).is_some_and(|until| *until > now) {
                return;
            }
            not_before.insert(to, now + DIAL_AGAIN_AFTER);
        }
        let links = std::sync::Arc::clone(self);
        self.tasks.spawn(async move { links.dial(to).await });
    }

    async fn dial(self: std::sync::Arc<Self>, address: SocketAddr) {
        let attempt = async {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
                .await
                .map_err(|_| LinkError::Failed("connection timed out".to_owned()))??;
            let _ = stream.set_nodelay(true);
            let (mut reader, mut writer) = stream.into_split();
            let (peer, key) = self.dialler_handshake(&mut reader, &mut writer).await?;
            let (reader, writer) = secure::establish(reader, writer, Role::Dialler, &key).await?;
            Ok::<_, LinkError>((peer, reader, writer))
        };
        let result = tokio::select! {
            result = tokio::time::timeout(self.handshake_timeout, attempt) => result
                .unwrap_or_else(|_| Err(LinkError::Failed("handshake not finished in time".to_owned()))),
            () = self.shutdown.cancelled() => return,
        };
        match result {
            Ok(((coordinator_id, peer_address), reader, writer)) => {
                lock(&self.refused).remove(&address);
                tracing::info!(%address, coordinator = %coordinator_id, "linked to coordinator");
                let mut keys = vec![address];
                if peer_address != address {
                    keys.push(peer_address);
                }
                self.run(keys, coordinator_id, reader, writer).await;
            }
            Err(LinkError::Itself) => {
                tracing::debug!(%address, "this address is this coordinator's own cluster port");
                lock(&self.itself).push(address);
            }
            Err(LinkError::Refused(refusal)) => {
                self.record_refusal(address, None, &refusal);
                lock(&self.not_before).insert(address, Instant::now() + DIAL_REFUSED_AGAIN_AFTER);
            }
            Err(LinkError::Failed(reason)) => {
                tracing::debug!(%address, %reason, "no link to coordinator");
            }
        }
    }

    fn record_refusal(
        &self,
        address: SocketAddr,
        coordinator_id: Option<String>,
        refusal: &Refusal,
    ) {
        if refusal.code == RefusalCode::BadToken {
            // Another cluster's coordinator (found over mDNS, most likely): not ours, not a fault.
            tracing::debug!(%address, reason = %refusal.message, "not a coordinator of this cluster");
            return;
        }
        let mut refused = lock(&self.refused);
        let repeated = refused
            .get(&address)
            .is_some_and(|previous| previous.reason == refusal.message);
        if !repeated {
            tracing::error!(%address, reason = %refusal.message, "coordinators refuse to form a group");
        }
        refused.insert(
            address,
            Refused {
                coordinator_id,
                reason: refusal.message.clone(),
                at: Instant::now(),
            },
        );
    }

    /// The dialler's half of the handshake: the peer's id and cluster address, and the link key.
    async fn dialler_handshake(
        &self,
        reader: &mut OwnedReadHalf,
        writer: &mut OwnedWriteHalf,
    ) -> Result<((String, SocketAddr), [u8; 32]), LinkError> {
        writer.write_all(&GROUP_MAGIC).await?;
        let hello = PeerHello {
            protocol_version: GROUP_PROTOCOL_VERSION,
            build_version: BUILD_VERSION.to_owned(),
            coordinator_id: self.me.id.clone(),
            cluster_address: self.me.cluster_address.to_string(),
        };
        wire::write_message(writer, &hello).await?;
        let listener_nonce = match wire::read_message::<PeerHelloReply, _>(reader).await? {
            PeerHelloReply::Refused(refusal)
                if refusal.code == RefusalCode::BadRequest && refusal.message == ITSELF =>
            {
                return Err(LinkError::Itself);
            }
            PeerHelloReply::Refused(refusal) => return Err(LinkError::Refused(refusal)),
            PeerHelloReply::Challenge { nonce, .. } => nonce,
        };
        let nonce = wire::nonce();
        let auth = PeerAuth {
            proof: wire::proof(
                &self.token,
                ProofSide::PeerDialler,
                &listener_nonce,
                &self.me.id,
            ),
            nonce,
            config: self.me.config.clone(),
        };
        wire::write_message(writer, &auth).await?;
        let (proof, peer_id, peer_address, config) =
            match wire::read_message::<PeerAuthReply, _>(reader).await? {
                PeerAuthReply::Refused(refusal) => return Err(LinkError::Refused(refusal)),
                PeerAuthReply::Welcome {
                    proof,
                    coordinator_id,
                    cluster_address,
                    config,
                } => (proof, coordinator_id, cluster_address, config),
            };
        if !wire::verify_proof(
            &self.token,
            ProofSide::PeerListener,
            &nonce,
            &self.me.id,
            &proof,
        ) {
            return Err(LinkError::Refused(Refusal {
                code: RefusalCode::BadToken,
                message: "the coordinator there does not hold this cluster's token".to_owned(),
            }));
        }
        let differing = differing_parts(&self.me.config, &config);
        if !differing.is_empty() {
            return Err(LinkError::Refused(config_refusal(&peer_id, &differing)));
        }
        NodeId::parse(&peer_id).map_err(LinkError::Failed)?;
        let peer_address: SocketAddr = peer_address
            .parse()
            .map_err(|_| LinkError::Failed(format!("bad cluster address {peer_address:?}")))?;
        let key = secure::link_key(&self.token, secure::GROUP_LINK, &nonce, &listener_nonce);
        Ok(((peer_id, peer_address), key))
    }

    /// Serves a coordinator that dialled this one's cluster port (its [`GROUP_MAGIC`] already read).
    pub async fn accept(
        self: std::sync::Arc<Self>,
        mut reader: OwnedReadHalf,
        mut writer: OwnedWriteHalf,
        from: SocketAddr,
    ) {
        let handshake = tokio::time::timeout(
            self.handshake_timeout,
            self.listener_handshake(&mut reader, &mut writer, from),
        );
        let accepted = tokio::select! {
            result = handshake => result.unwrap_or_else(|_| Err(LinkError::Failed("handshake not finished in time".to_owned()))),
            () = self.shutdown.cancelled() => return,
        };
        let ((peer_id, peer_address), key) = match accepted {
            Ok(accepted) => accepted,
            Err(LinkError::Refused(refusal)) => {
                tracing::debug!(%from, reason = %refusal.message, "refused coordinator link");
                // Every reply enum starts with the same `Refused`: the agents' refusal reads the same.
                crate::cluster::membership::refuse(&mut reader, &mut writer, refusal).await;
                return;
            }
            Err(LinkError::Itself | LinkError::Failed(_)) => return,
        };
        let secured = secure::establish(reader, writer, Role::Listener, &key);
        let Ok(Ok((reader, writer))) = tokio::time::timeout(self.handshake_timeout, secured).await
        else {
            return;
        };
        lock(&self.refused).remove(&peer_address);
        tracing::info!(address = %peer_address, coordinator = %peer_id, "coordinator linked to this one");
        self.run(vec![peer_address], peer_id, reader, writer).await;
    }

    async fn listener_handshake(
        &self,
        reader: &mut OwnedReadHalf,
        writer: &mut OwnedWriteHalf,
        from: SocketAddr,
    ) -> Result<((String, SocketAddr), [u8; 32]), LinkError> {
        let payload = wire::read_frame(reader).await?;
        let (prefix, _): (HelloPrefix, _) =
            postcard::take_from_bytes(&payload).map_err(|error| {
                refusal(RefusalCode::Malformed, format!("malformed hello: {error}"))
            })?;
        if prefix.protocol_version != GROUP_PROTOCOL_VERSION {
            return Err(refusal(
                RefusalCode::IncompatibleVersion,
                format!(
                    "incompatible coordinator group protocol: v{} (sollol {}) here, v{} (sollol {}) there; run the same sollol version on every coordinator",
                    GROUP_PROTOCOL_VERSION,
                    BUILD_VERSION,
                    prefix.protocol_version,
                    prefix.build_version
                ),
            ));
        }
        let hello: PeerHello = postcard::from_bytes(&payload).map_err(|error| {
            refusal(RefusalCode::Malformed, format!("malformed hello: {error}"))
        })?;
        if hello.coordinator_id == self.me.id {
            return Err(refusal(RefusalCode::BadRequest, ITSELF.to_owned()));
        }
        NodeId::parse(&hello.coordinator_id).map_err(|reason| {
            refusal(
                RefusalCode::Malformed,
                format!("invalid coordinator id: {reason}"),
            )
        })?;
        let peer_address: SocketAddr = hello.cluster_address.parse().map_err(|_| {
            refusal(
                RefusalCode::Malformed,
                format!("invalid cluster address {:?}", hello.cluster_address),
            )
        })?;
        let challenge = wire::nonce();
        wire::write_message(
            writer,
            &PeerHelloReply::Challenge {
                protocol_version: GROUP_PROTOCOL_VERSION,
                build_version: BUILD_VERSION.to_owned(),
                nonce: challenge,
            },
        )
        .await?;
        let auth: PeerAuth = wire::read_message(reader).await?;
        if !wire::verify_proof(
            &self.token,
            ProofSide::PeerDialler,
            &challenge,
            &hello.coordinator_id,
            &auth.proof,
        ) {
            return Err(refusal(
                RefusalCode::BadToken,
                "authentication failed: that coordinator does not hold this cluster's token"
                    .to_owned(),
            ));
        }
        let differing = differing_parts(&self.me.config, &auth.config);
        if !differing.is_empty() {
            let refused = config_refusal(&self.me.id, &differing);
            let own_view = config_refusal(&hello.coordinator_id, &differing);
            self.record_refusal(peer_address, Some(hello.coordinator_id.clone()), &own_view);
            tracing::debug!(%from, "coordinator refused: configuration differs");
            return Err(LinkError::Refused(refused));
        }
        let welcome = PeerAuthReply::Welcome {
            proof: wire::proof(
                &self.token,
                ProofSide::PeerListener,
                &auth.nonce,
                &hello.coordinator_id,
            ),
            coordinator_id: self.me.id.clone(),
            cluster_address: self.me.cluster_address.to_string(),
            config: self.me.config.clone(),
        };
        wire::write_message(writer, &welcome).await?;
        let key = secure::link_key(&self.token, secure::GROUP_LINK, &auth.nonce, &challenge);
        Ok(((hello.coordinator_id, peer_address), key))
    }

    /// Carries gossip both ways until the link breaks, goes quiet or the coordinator stops; registered
    /// under `keys` meanwhile.
    async fn run<R, W>(
        &self,
        keys: Vec<SocketAddr>,
        coordinator_id: String,
        mut reader: SecureReader<R>,
        mut writer: SecureWriter<W>,
    ) where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        let (sender, mut outgoing) = mpsc::channel::<Vec<u8>>(LINK_QUEUE);
        {
            let mut links = lock(&self.links);
            for key in &keys {
                links.insert(
                    *key,
                    Link {
                        id,
                        sender: sender.clone(),
                    },
                );
            }
        }
        drop(sender);
        let from = *keys.last().unwrap_or(&self.me.cluster_address);
        let send = async {
            while let Some(bytes) = outgoing.recv().await {
                if wire::write_message(&mut writer, &PeerFrame::Gossip(bytes))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        };
        let receive = async {
            loop {
                let frame = tokio::time::timeout(
                    LINK_IDLE,
                    wire::read_message::<PeerFrame, _>(&mut reader),
                )
                .await;
                match frame {
                    Ok(Ok(PeerFrame::Gossip(bytes))) => {
                        if self.received.send((from, bytes)).await.is_err() {
                            return "the group stopped".to_owned();
                        }
                    }
                    Ok(Ok(PeerFrame::Closing { reason })) => return reason,
                    Ok(Err(error)) => return error.to_string(),
                    Err(_) => return format!("nothing for {} s", LINK_IDLE.as_secs()),
                }
            }
        };
        let reason = tokio::select! {
            () = send => "sending failed".to_owned(),
            reason = receive => reason,
            () = self.shutdown.cancelled() => {
                let closing = PeerFrame::Closing { reason: "coordinator is shutting down".to_owned() };
                let _ = tokio::time::timeout(Duration::from_millis(200), wire::write_message(&mut writer, &closing)).await;
                "this coordinator is shutting down".to_owned()
            }
        };
        tracing::info!(coordinator = %coordinator_id, %reason, "coordinator link closed");
        let mut links = lock(&self.links);
        for key in &keys {
            if links.get(key).is_some_and(|link| link.id == id) {
                links.remove(key);
            }
        }
    }
}

/// The refusal a coordinator sends (and logs) when the shared configuration differs.
fn config_refusal(other_id: &str, differing: &[String]) -> Refusal {
    Refusal {
        code: RefusalCode::ConfigDiffers,
        message: format!(
            "configuration differs from coordinator {other_id}'s in: {}; every coordinator of a cluster needs the same values there (compare `sollol print-config` on both)",
            differing.join(", ")
        ),
    }
}

const ITSELF: &str = "that is this coordinator itself";

fn refusal(code: RefusalCode, message: String) -> LinkError {
    LinkError::Refused(Refusal { code, message })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
