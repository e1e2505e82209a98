//! The coordinator's cluster port: accepts agents, runs the handshake, and relays their frames to the cluster task.
//!
//! Every connection is bounded: it must finish the handshake within the
//! handshake timeout, send a frame at least every few heartbeats, and keep each
//! frame under the size limit. A refused peer gets a [`Refusal`] that names
//! the reason before the connection closes; the listener keeps serving others.
//! This module decides who is welcome; it does not judge health.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sollol_shared::BUILD_VERSION;
use sollol_shared::protocol::{
    AgentMessage, Auth, AuthReply, CoordinatorAddress, CoordinatorMessage, Hello, HelloPrefix,
    HelloReply, MAGIC, PROTOCOL_VERSION, Refusal, RefusalCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::identity::{ClusterToken, NodeId, validate_node_name};
use crate::cluster::secure::{self, Role};
use crate::cluster::wire::{self, FrameError, ProofSide};
use crate::cluster::{ClusterEvent, ConnectionId};

/// How long a refusal may take to write before the connection is dropped anyway.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long telling an agent the coordinators may take before the link counts as stuck.
const TELL_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this much of a refused peer's input is read and discarded before closing.
const REFUSAL_DRAIN_BYTES: usize = 1024 * 1024;

/// Connections still in their handshake (not yet proven to hold the token) at once: past it, new
/// connections are closed, so strangers cannot take the places of joined agents.
const MAX_HANDSHAKING: u64 = 64;
/// Of those, from one remote address (loopback not limited).
const MAX_HANDSHAKING_PER_ADDRESS: usize = 8;

/// Shortest and longest heartbeat interval an agent may announce.
const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
const MAX_HEARTBEAT: Duration = Duration::from_secs(600);

/// What every connection task needs.
#[derive(Debug)]
pub struct Membership {
    pub token: ClusterToken,
    pub events: mpsc::Sender<ClusterEvent>,
    pub handshake_timeout: Duration,
    pub down_after_missed: u32,
    pub max_connections: u64,
    pub shutdown: CancellationToken,
    /// Open connections on the cluster port, for the API and tests.
    pub connections: Arc<AtomicU64>,
    /// Of those, the ones still in their handshake, in all and per remote address.
    handshaking: AtomicU64,
    handshaking_from: Arc<sollol_http::AddressCounts>,
    next_connection: AtomicU64,
    /// Where connections from other coordinators go (they start with the group's preamble).
    group: Option<Arc<crate::cluster::group::Links>>,
    /// This coordinator's id and the other live coordinators, told to every agent (it joins them too).
    coordinators: Option<(String, watch::Receiver<Arc<Vec<CoordinatorAddress>>>)>,
}

impl Membership {
    pub fn new(
        token: ClusterToken,
        events: mpsc::Sender<ClusterEvent>,
        handshake_timeout: Duration,
        down_after_missed: u32,
        max_connections: u64,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            token,
            events,
            handshake_timeout,
            down_after_missed,
            max_connections,
            shutdown,
            connections: Arc::new(AtomicU64::new(0)),
            handshaking: AtomicU64::new(0),
            handshaking_from: Arc::default(),
            next_connection: AtomicU64::new(1),
            group: None,
            coordinators: None,
        }
    }

    /// Hands connections from other coordinators to the group's links, and tells agents the group.
    pub fn with_group(mut self, group: &crate::cluster::group::Group) -> Self {
        self.group = Some(group.links());
        self.coordinators = Some((group.id().to_owned(), group.addresses()));
        self
    }
}

/// Accepts connections until shutdown; each runs in its own task on `tasks`.
pub async fn serve(listener: TcpListener, membership: Arc<Membership>, tasks: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = membership.shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and similar: wait a little instead of spinning.
                tracing::warn!(%error, "cluster port accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handshaking = membership.handshaking.load(Ordering::Relaxed);
        if handshaking >= MAX_HANDSHAKING {
            tracing::debug!(%peer, limit = MAX_HANDSHAKING, "too many cluster connections in their handshake; closing connection");
            continue;
        }
        let joined = membership
            .connections
            .load(Ordering::Relaxed)
            .saturating_sub(handshaking);
        if joined >= membership.max_connections {
            tracing::warn!(%peer, limit = membership.max_connections, "cluster port connection limit reached; closing connection");
            continue;
        }
        let Some(from) = sollol_http::AddressCounts::enter(
            &membership.handshaking_from,
            peer,
            MAX_HANDSHAKING_PER_ADDRESS,
        ) else {
            tracing::debug!(%peer, limit = MAX_HANDSHAKING_PER_ADDRESS, "too many handshakes from this address; closing connection");
            continue;
        };
        // Counted here, not in the task: a burst of connections must not all pass the check above.
        membership.handshaking.fetch_add(1, Ordering::Relaxed);
        let membership = Arc::clone(&membership);
        tasks.spawn(async move {
            let _guard = ConnectionGuard::new(&membership.connections);
            handle_connection(stream, peer, &membership, from).await;
        });
    }
}

struct ConnectionGuard<'a>(&'a AtomicU64);

impl<'a> ConnectionGuard<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }

    /// Takes over one count already added (by the accept loop, before the task started).
    fn adopt(counter: &'a AtomicU64) -> Self {
        Self(counter)
    }
}

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The group's new list of other coordinators; pending forever without a group or once it ended.
async fn group_changed(
    coordinators: &mut Option<(String, watch::Receiver<Arc<Vec<CoordinatorAddress>>>)>,
) -> Option<Arc<Vec<CoordinatorAddress>>> {
    let Some((_, others)) = coordinators else {
        return std::future::pending().await;
    };
    if others.changed().await.is_err() {
        return std::future::pending().await;
    }
    Some(Arc::clone(&others.borrow_and_update()))
}

/// Sends an agent the coordinators of the cluster; false when the link is gone or stuck.
async fn tell_coordinators<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    this: &str,
    others: &[CoordinatorAddress],
) -> bool {
    let message = CoordinatorMessage::Coordinators {
        this: this.to_owned(),
        others: others.to_vec(),
    };
    matches!(
        tokio::time::timeout(TELL_TIMEOUT, wire::write_message(writer, &message)).await,
        Ok(Ok(()))
    )
}

/// `from` counts the connection against its address until the handshake ends.
async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    membership: &Membership,
    from: sollol_http::Counted,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let handshaking = ConnectionGuard::adopt(&membership.handshaking);
    let handshake = tokio::time::timeout(
        membership.handshake_timeout,
        handshake(&mut reader, &mut writer, membership),
    );
    let (hello, key) = tokio::select! {
        result = handshake => match result {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(Rejection::Refuse(refusal))) => {
                tracing::warn!(%peer, code = ?refusal.code, reason = %refusal.message, "refused cluster connection");
                refuse(&mut reader, &mut writer, refusal).await;
                return;
            }
            Ok(Err(Rejection::Gone(reason))) => {
                tracing::debug!(%peer, %reason, "cluster connection ended during handshake");
                return;
            }
            Ok(Err(Rejection::Coordinator)) => {
                let Some(links) = membership.group.clone() else {
                    return;
                };
                // The group's own handshake has its own time limit; the link then lives as long as
                // both coordinators do.
                drop((handshaking, from));
                links.accept(reader, writer, peer).await;
                return;
            }
            Err(_) => {
                let refusal = Refusal {
                    code: RefusalCode::Timeout,
                    message: format!(
                        "handshake not finished within {} ms",
                        membership.handshake_timeout.as_millis()
                    ),
                };
                tracing::warn!(%peer, reason = %refusal.message, "refused cluster connection");
                refuse(&mut reader, &mut writer, refusal).await;
                return;
            }
        },
        () = membership.shutdown.cancelled() => {
            refuse(&mut reader, &mut writer, Refusal { code: RefusalCode::ShuttingDown, message: "coordinator is shutting down".into() }).await;
            return;
        }
    };

    // From here on every frame is encrypted and authenticated with a key only the two ends have.
    let secured = secure::establish(reader, writer, Role::Listener, &key);
    let (mut reader, mut writer) =
        match tokio::time::timeout(membership.handshake_timeout, secured).await {
            Ok(Ok(halves)) => halves,
            Ok(Err(error)) => {
                tracing::warn!(%peer, %error, "cluster link encryption failed");
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "cluster link encryption not finished in time");
                return;
            }
        };
    drop((handshaking, from));
    let connection: ConnectionId = membership.next_connection.fetch_add(1, Ordering::Relaxed);
    let node_id = hello.node_id.clone();
    let heartbeat = Duration::from_millis(hello.heartbeat_interval_ms);
    let closer = CancellationToken::new();
    let joined = ClusterEvent::Joined {
        hello,
        peer,
        connection,
        closer: closer.clone(),
    };
    if membership.events.send(joined).await.is_err() {
        return;
    }
    // A connection that stays silent for longer than a down node's would is dead: close it rather than leak it.
    let read_timeout = heartbeat.saturating_mul(membership.down_after_missed.saturating_add(1));
    let mut coordinators = membership.coordinators.clone();
    if let Some((this, others)) = &mut coordinators {
        let others = Arc::clone(&others.borrow_and_update());
        if !others.is_empty() && !tell_coordinators(&mut writer, this, &others).await {
            return;
        }
    }
    let reason = loop {
        let frame = tokio::select! {
            frame = tokio::time::timeout(read_timeout, wire::read_message::<AgentMessage, _>(&mut reader)) => frame,
            Some(others) = group_changed(&mut coordinators) => {
                let this = coordinators.as_ref().map_or("", |(this, _)| this.as_str());
                if !tell_coordinators(&mut writer, this, &others).await {
                    break "the agent did not take the coordinators' list".to_owned();
                }
                continue;
            }
            () = closer.cancelled() => return,
            () = membership.shutdown.cancelled() => {
                let closing = CoordinatorMessage::Closing { reason: "coordinator is shutting down".into() };
                let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, wire::write_message(&mut writer, &closing)).await;
                let _ = writer.shutdown().await;
                return;
            }
        };
        match frame {
            Ok(Ok(AgentMessage::Report(report))) => {
                let event = ClusterEvent::Report {
                    node_id: node_id.clone(),
                    connection,
                    report,
                };
                if membership.events.send(event).await.is_err() {
                    return;
                }
            }
            Ok(Ok(AgentMessage::Goodbye { reason })) => {
                let event = ClusterEvent::Goodbye {
                    node_id,
                    connection,
                    reason,
                };
                let _ = membership.events.send(event).await;
                return;
            }
            Ok(Err(FrameError::Closed)) => break "connection closed without goodbye".to_owned(),
            Ok(Err(error @ (FrameError::TooLarge { .. } | FrameError::Malformed(_)))) => {
                let refusal = Refusal {
                    code: refusal_code(&error),
                    message: error.to_string(),
                };
                tracing::warn!(%peer, node = %node_id, reason = %refusal.message, "closing agent connection");
                refuse(&mut reader, &mut writer, refusal).await;
                break error.to_string();
            }
            Ok(Err(error)) => break error.to_string(),
            Err(_) => break format!("no frame for {} ms", read_timeout.as_millis()),
        }
    };
    let event = ClusterEvent::Disconnected {
        node_id,
        connection,
        reason,
    };
    let _ = membership.events.send(event).await;
}

enum Rejection {
    /// Tell the peer why, then close.
    Refuse(Refusal),
    /// The peer went away; nothing to tell.
    Gone(String),
    /// Not an agent: another coordinator of the group (it sent the group's preamble).
    Coordinator,
}

impl From<FrameError> for Rejection {
    fn from(error: FrameError) -> Self {
        match error {
            FrameError::TooLarge { .. } | FrameError::Malformed(_) => Self::Refuse(Refusal {
                code: refusal_code(&error),
                message: error.to_string(),
            }),
            FrameError::Closed | FrameError::Io(_) => Self::Gone(error.to_string()),
        }
    }
}

fn refusal_code(error: &FrameError) -> RefusalCode {
    match error {
        FrameError::TooLarge { .. } => RefusalCode::FrameTooLarge,
        _ => RefusalCode::Malformed,
    }
}

fn malformed(message: String) -> Rejection {
    Rejection::Refuse(Refusal {
        code: RefusalCode::Malformed,
        message,
    })
}

/// The challenge–response; on success, the agent's hello and the key of the encrypted link.
async fn handshake(
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    membership: &Membership,
) -> Result<(Hello, [u8; 32]), Rejection> {
    let mut magic = [0u8; MAGIC.len()];
    reader
        .read_exact(&mut magic)
        .await
        .map_err(|error| Rejection::Gone(error.to_string()))?;
    if magic == sollol_shared::group::GROUP_MAGIC {
        return Err(Rejection::Coordinator);
    }
    if magic != MAGIC {
        return Err(Rejection::Refuse(Refusal {
            code: RefusalCode::BadMagic,
            message:
                "not a sollol agent: the connection did not start with the sollol protocol preamble"
                    .into(),
        }));
    }

    let payload = wire::read_frame(reader).await?;
    let (prefix, _rest): (HelloPrefix, _) = postcard::take_from_bytes(&payload)
        .map_err(|error| malformed(format!("malformed hello: {error}")))?;
    if prefix.protocol_version != PROTOCOL_VERSION {
        return Err(Rejection::Refuse(Refusal {
            code: RefusalCode::IncompatibleVersion,
            message: format!(
                "incompatible protocol version: the agent speaks protocol v{} (sollol {}), this coordinator speaks protocol v{} (sollol {}); run the same sollol version on both",
                prefix.protocol_version, prefix.build_version, PROTOCOL_VERSION, BUILD_VERSION
            ),
        }));
    }
    let hello: Hello = postcard::from_bytes(&payload)
        .map_err(|error| malformed(format!("malformed hello: {error}")))?;
    NodeId::parse(&hello.node_id)
        .map_err(|reason| malformed(format!("invalid node id: {reason}")))?;
    validate_node_name(&hello.node_name)
        .map_err(|reason| malformed(format!("invalid node name: {reason}")))?;
    let heartbeat = Duration::from_millis(hello.heartbeat_interval_ms);
    if !(MIN_HEARTBEAT..=MAX_HEARTBEAT).contains(&heartbeat) {
        return Err(malformed(format!(
            "heartbeat interval {} ms is outside {}..={} ms",
            hello.heartbeat_interval_ms,
            MIN_HEARTBEAT.as_millis(),
            MAX_HEARTBEAT.as_millis()
        )));
    }

    let challenge = wire::nonce();
    let reply = HelloReply::Challenge {
        protocol_version: PROTOCOL_VERSION,
        build_version: BUILD_VERSION.to_owned(),
        nonce: challenge,
    };
    wire::write_message(writer, &reply).await?;

    let auth: Auth = wire::read_message(reader).await?;
    if !wire::verify_proof(
        &membership.token,
        ProofSide::Agent,
        &challenge,
        &hello.node_id,
        &auth.proof,
    ) {
        return Err(Rejection::Refuse(Refusal {
            code: RefusalCode::BadToken,
            message: format!(
                "authentication failed: node {:?} does not hold this cluster's token (`sollol token` on the coordinator prints it)",
                hello.node_name
            ),
        }));
    }
    let proof = wire::proof(
        &membership.token,
        ProofSide::Coordinator,
        &auth.nonce,
        &hello.node_id,
    );
    wire::write_message(writer, &AuthReply::Welcome { proof }).await?;
    let key = secure::link_key(
        &membership.token,
        secure::CLUSTER_LINK,
        &auth.nonce,
        &challenge,
    );
    Ok((hello, key))
}

/// Sends a refusal and closes. Every reply enum has `Refused` as variant 0 with the same payload, so one encoding serves at any stage.
pub(crate) async fn refuse<R, W>(reader: &mut R, writer: &mut W, refusal: Refusal)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let write = async {
        wire::write_message(writer, &HelloReply::Refused(refusal)).await?;
        writer.shutdown().await.map_err(FrameError::Io)
    };
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write).await;
    // Closing a socket with unread input sends a reset, which can destroy the refusal before the peer reads it:
    // read and discard what the peer still sends, for a bounded time and amount.
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut drained = 0usize;
        while drained < REFUSAL_DRAIN_BYTES {
            match reader.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(read) => drained += read,
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, drain).await;
}
