//! The cluster link between an agent and the coordinator seen by someone in the middle: a relay that
//! flips one bit after the handshake makes both sides drop the connection and the agent reconnect
//! cleanly; a recorded handshake replayed on a new connection is refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sollol::app::{self, AgentHandle, CoordinatorHandle};
use sollol::config::Config;
use sollol_shared::api::NodeStatus;
use sollol_shared::protocol::{HelloReply, MAGIC, RefusalCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn config(data_dir: &std::path::Path, name: &str) -> Config {
    let data_dir = data_dir.display().to_string();
    Config::from_pairs(&[
        ("data_dir", &data_dir),
        ("coordinator.gateway_bind", "127.0.0.1:0"),
        ("coordinator.cluster_bind", "127.0.0.1:0"),
        ("coordinator.handshake_timeout", "2s"),
        ("agent.name", name),
        ("agent.heartbeat_interval", "100ms"),
        ("agent.reconnect_initial_backoff", "50ms"),
        ("agent.reconnect_max_backoff", "200ms"),
        ("discovery.mdns", "false"),
    ])
    .expect("valid test config")
}

/// A TCP relay in front of the coordinator's cluster port: it passes bytes both ways, records what
/// the first connection's agent sent, and flips one bit of the agent's stream when told to.
struct Relay {
    address: std::net::SocketAddr,
    flip: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    recorded: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let relay = Self {
            address: listener.local_addr().expect("address"),
            flip: Arc::new(AtomicBool::new(false)),
            connections: Arc::new(AtomicUsize::new(0)),
            recorded: Arc::new(std::sync::Mutex::new(Vec::new())),
        };
        let (flip, connections, recorded) = (
            Arc::clone(&relay.flip),
            Arc::clone(&relay.connections),
            Arc::clone(&relay.recorded),
        );
        tokio::spawn(async move {
            while let Ok((agent, _)) = listener.accept().await {
                let first = connections.fetch_add(1, Ordering::SeqCst) == 0;
                let coordinator = TcpStream::connect(target).await.expect("connect");
                let (mut from_agent, mut to_agent) = agent.into_split();
                let (mut from_coordinator, mut to_coordinator) = coordinator.into_split();
                let (flip, recorded) = (Arc::clone(&flip), Arc::clone(&recorded));
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let read = match from_agent.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(read) => read,
                        };
                        if first {
                            recorded
                                .lock()
                                .expect("lock")
                                .extend_from_slice(&buffer[..read]);
                        }
                        if flip.swap(false, Ordering::SeqCst) {
                            buffer[read - 1] ^= 0x01;
                        }
                        if to_coordinator.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                    let _ = to_coordinator.shutdown().await;
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_coordinator, &mut to_agent).await;
                    let _ = to_agent.shutdown().await;
                });
            }
        });
        relay
    }
}

async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn status(coordinator: &CoordinatorHandle) -> Option<NodeStatus> {
    coordinator.view().nodes.first().map(|node| node.status)
}

/// A coordinator and one agent named `name` that has joined it, directly or through a [`Relay`].
struct Joined {
    coordinator: CoordinatorHandle,
    agent: AgentHandle,
    relay: Option<Relay>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn joined(name: &str, through_relay: bool) -> Joined {
    let coordinator_dir = tempfile::tempdir().expect("tempdir");
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let coordinator = app::start_coordinator(&config(coordinator_dir.path(), "c"))
        .await
        .expect("coordinator");
    let relay = match through_relay {
        true => Some(Relay::start(coordinator.cluster_address).await),
        false => None,
    };
    let join = relay
        .as_ref()
        .map_or(coordinator.cluster_address, |relay| relay.address);
    let agent = app::start_agent(
        &config(agent_dir.path(), name),
        join.to_string(),
        coordinator.token.clone(),
    )
    .await
    .expect("agent");
    wait_until("the agent to join", Duration::from_secs(5), || {
        status(&coordinator) == Some(NodeStatus::Up)
    })
    .await;
    Joined {
        coordinator,
        agent,
        relay,
        _dirs: (coordinator_dir, agent_dir),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_drops_the_link_and_the_agent_reconnects() {
    let Joined {
        coordinator,
        agent,
        relay,
        _dirs,
    } = joined("relayed", true).await;
    let relay = relay.expect("relay");
    let reports_before = coordinator.view().nodes[0].last_seen_ms;
    // One bit of the next report changes on its way.
    relay.flip.store(true, Ordering::SeqCst);
    wait_until("the relay to flip a bit", Duration::from_secs(5), || {
        !relay.flip.load(Ordering::SeqCst)
    })
    .await;
    // The coordinator dropped the connection (an event says why) and the agent came back on a new one.
    wait_until("the agent to reconnect", Duration::from_secs(10), || {
        relay.connections.load(Ordering::SeqCst) >= 2
            && status(&coordinator) == Some(NodeStatus::Up)
    })
    .await;
    let view = coordinator.view();
    let node = &view.nodes[0];
    let events = view.events.get(&node.id).cloned().unwrap_or_default();
    let dropped = events
        .iter()
        .find(|event| event.detail.contains("failed authentication"))
        .unwrap_or_else(|| panic!("no event names the altered record: {events:?}"));
    assert!(node.last_seen_ms >= reports_before, "{dropped:?}");
    assert_eq!(view.nodes.len(), 1, "the same node, not a new one");
    agent.stop(Duration::from_secs(5)).await.expect("stop");
    coordinator.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_handshake_is_refused() {
    let Joined {
        coordinator,
        agent,
        relay,
        _dirs,
    } = joined("recorded", true).await;
    let relay = relay.expect("relay");
    // The magic, the hello frame and the auth frame, exactly as the agent sent them.
    let recorded = relay.recorded.lock().expect("lock").clone();
    let frame_end = |at: usize| {
        at + 4 + u32::from_be_bytes(recorded[at..at + 4].try_into().expect("length")) as usize
    };
    let hello_end = frame_end(MAGIC.len());
    let auth_end = frame_end(hello_end);
    let mut replay = TcpStream::connect(coordinator.cluster_address)
        .await
        .expect("connect");
    replay
        .write_all(&recorded[..auth_end])
        .await
        .expect("replay");
    // The coordinator's challenge (a new nonce), then its refusal of the old proof.
    let mut answers = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), replay.read_to_end(&mut answers)).await;
    let challenge_end = 4 + u32::from_be_bytes(answers[..4].try_into().expect("length")) as usize;
    let refusal: HelloReply = postcard::from_bytes(&answers[challenge_end + 4..]).expect("refusal");
    match refusal {
        HelloReply::Refused(refusal) => assert_eq!(refusal.code, RefusalCode::BadToken),
        other => panic!("a replayed handshake was not refused: {other:?}"),
    }
    assert_eq!(coordinator.view().nodes.len(), 1, "nothing joined");
    agent.stop(Duration::from_secs(5)).await.expect("stop");
    coordinator.shutdown(Duration::from_secs(5)).await;
}

/// Strangers that connect and never finish a handshake take at most their own share of the cluster
/// port: the joined agent keeps reporting, and once they time out a new agent joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_in_their_handshake_do_not_displace_agents() {
    let late_dir = tempfile::tempdir().expect("tempdir");
    let Joined {
        coordinator,
        agent,
        _dirs,
        ..
    } = joined("joined", false).await;
    let mut strangers = Vec::new();
    for _ in 0..300 {
        if let Ok(stream) = TcpStream::connect(coordinator.cluster_address).await {
            strangers.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let summary: sollol_shared::api::ClusterSummary = sollol::http_client::HttpClient::default()
        .get_json(
            &format!(
                "http://{}/api/sollol/v1/cluster",
                coordinator.gateway_address
            ),
            Duration::from_secs(5),
        )
        .await
        .expect("summary");
    assert!(
        summary.cluster_connections <= 1 + 64,
        "{} connections held for 300 strangers",
        summary.cluster_connections
    );
    // The joined agent kept reporting throughout.
    let seen = coordinator.view().nodes[0].last_seen_ms;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(coordinator.view().nodes[0].last_seen_ms > seen);
    assert_eq!(status(&coordinator), Some(NodeStatus::Up));
    // After the handshake timeout (2 s here) the strangers are gone and a new agent joins.
    let late = app::start_agent(
        &config(late_dir.path(), "late"),
        coordinator.cluster_address.to_string(),
        coordinator.token.clone(),
    )
    .await
    .expect("late agent");
    wait_until("the late agent to join", Duration::from_secs(15), || {
        coordinator.view().nodes.len() == 2
            && coordinator
                .view()
                .nodes
                .iter()
                .all(|node| node.status == NodeStatus::Up)
    })
    .await;
    drop(strangers);
    late.stop(Duration::from_secs(5)).await.expect("stop");
    agent.stop(Duration::from_secs(5)).await.expect("stop");
    coordinator.shutdown(Duration::from_secs(5)).await;
}
