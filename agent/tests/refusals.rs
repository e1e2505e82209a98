//! The cluster port under bad input: every bad peer gets a clear refusal, and the coordinator keeps serving the others.

use std::time::{Duration, Instant};

use serde::Serialize;
use sollol::app::{self, CoordinatorHandle};
use sollol::cluster::identity::ClusterToken;
use sollol::cluster::join::JoinError;
use sollol::config::Config;
use sollol::http_client::HttpClient;
use sollol_shared::BUILD_VERSION;
use sollol_shared::api::{ClusterSummary, NodeStatus};
use sollol_shared::protocol::{
    HelloReply, MAGIC, MAX_FRAME_BYTES, PROTOCOL_VERSION, Refusal, RefusalCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(data_dir: &std::path::Path, name: &str) -> Config {
    let data_dir = data_dir.display().to_string();
    Config::from_pairs(&[
        ("data_dir", &data_dir),
        ("coordinator.gateway_bind", "127.0.0.1:0"),
        ("coordinator.cluster_bind", "127.0.0.1:0"),
        ("coordinator.handshake_timeout", "500ms"),
        ("agent.name", name),
        ("agent.heartbeat_interval", "200ms"),
        ("agent.reconnect_initial_backoff", "50ms"),
        ("agent.reconnect_max_backoff", "300ms"),
        ("discovery.mdns", "false"),
    ])
    .expect("valid test config")
}

/// Sends `bytes` on a fresh connection and reads the refusal frame that comes back.
async fn refusal_for(coordinator: &CoordinatorHandle, bytes: &[u8]) -> Refusal {
    let mut stream = TcpStream::connect(coordinator.cluster_address)
        .await
        .expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_refusal(&mut stream).await
}

async fn read_refusal(stream: &mut TcpStream) -> Refusal {
    let read = async {
        let mut length = [0u8; 4];
        stream
            .read_exact(&mut length)
            .await
            .expect("refusal length");
        let mut payload = vec![0u8; u32::from_be_bytes(length) as usize];
        stream
            .read_exact(&mut payload)
            .await
            .expect("refusal payload");
        // The connection is closed after the refusal.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("read to end");
        assert!(rest.is_empty(), "nothing follows a refusal");
        payload
    };
    let payload = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("refusal in time");
    match postcard::from_bytes::<HelloReply>(&payload).expect("a refusal frame") {
        HelloReply::Refused(refusal) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn frame<T: Serialize>(message: &T) -> Vec<u8> {
    let payload = postcard::to_stdvec(message).expect("encode");
    let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&payload);
    bytes
}

fn with_magic(rest: &[u8]) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(rest);
    bytes
}

async fn summary(coordinator: &CoordinatorHandle) -> ClusterSummary {
    HttpClient::default()
        .get_json(
            &format!(
                "http://{}/api/sollol/v1/cluster",
                coordinator.gateway_address
            ),
            Duration::from_secs(5),
        )
        .await
        .expect("cluster summary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_good_ones_keep_working() {
    let coordinator_dir = tempfile::tempdir().expect("tempdir");
    let agent_dir = tempfile::tempdir().expect("tempdir");
    let coordinator = app::start_coordinator(&config(coordinator_dir.path(), "c"))
        .await
        .expect("coordinator");
    let good = app::start_agent(
        &config(agent_dir.path(), "good"),
        coordinator.cluster_address.to_string(),
        coordinator.token.clone(),
    )
    .await
    .expect("agent");
    let started = Instant::now();
    while coordinator.view().nodes.first().map(|node| node.status) != Some(NodeStatus::Up) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "good agent never joined"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Garbage bytes: an HTTP request sent to the cluster port.
    let refusal = refusal_for(&coordinator, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(refusal.code, RefusalCode::BadMagic);
    assert!(
        refusal.message.contains("not a sollol agent"),
        "{}",
        refusal.message
    );

    // A hello from a future protocol version: both versions are named.
    #[derive(Serialize)]
    struct FutureHello {
        protocol_version: u32,
        build_version: String,
        something_new: Vec<u64>,
    }
    let future = FutureHello {
        protocol_version: PROTOCOL_VERSION + 1,
        build_version: "9.9.9".into(),
        something_new: vec![1, 2, 3],
    };
    let refusal = refusal_for(&coordinator, &with_magic(&frame(&future))).await;
    assert_eq!(refusal.code, RefusalCode::IncompatibleVersion);
    for expected in [
        format!("protocol v{}", PROTOCOL_VERSION + 1),
        "sollol 9.9.9".to_owned(),
        format!("protocol v{PROTOCOL_VERSION}"),
        format!("sollol {BUILD_VERSION}"),
    ] {
        assert!(
            refusal.message.contains(&expected),
            "{:?} lacks {expected:?}",
            refusal.message
        );
    }

    // An oversized frame: refused from its length alone.
    let refusal = refusal_for(
        &coordinator,
        &with_magic(&(MAX_FRAME_BYTES + 1).to_be_bytes()),
    )
    .await;
    assert_eq!(refusal.code, RefusalCode::FrameTooLarge);
    assert!(
        refusal.message.contains(&MAX_FRAME_BYTES.to_string()),
        "{}",
        refusal.message
    );

    // A frame that is not a hello.
    let refusal = refusal_for(&coordinator, &with_magic(&[0, 0, 0, 3, 0xff, 0xff, 0xff])).await;
    assert_eq!(refusal.code, RefusalCode::Malformed);

    // A peer that connects and says nothing is cut off at the handshake timeout.
    let mut silent = TcpStream::connect(coordinator.cluster_address)
        .await
        .expect("connect");
    let waited = Instant::now();
    let refusal = read_refusal(&mut silent).await;
    assert_eq!(refusal.code, RefusalCode::Timeout);
    assert!(
        waited.elapsed() >= Duration::from_millis(400),
        "cut off after {:?}",
        waited.elapsed()
    );

    // A wrong token: the agent stops with an error that says so, and does not retry.
    let wrong_dir = tempfile::tempdir().expect("tempdir");
    let mut wrong = app::start_agent(
        &config(wrong_dir.path(), "intruder"),
        coordinator.cluster_address.to_string(),
        ClusterToken::generate(),
    )
    .await
    .expect("agent starts");
    let error = tokio::time::timeout(Duration::from_secs(5), wrong.finished())
        .await
        .expect("wrong-token agent gives up")
        .expect_err("refused");
    match &error {
        JoinError::Refused { refusal, .. } => assert_eq!(refusal.code, RefusalCode::BadToken),
        other => panic!("expected a token refusal, got {other}"),
    }
    assert!(
        error
            .to_string()
            .contains("does not hold this cluster's token"),
        "{error}"
    );

    // A burst of garbage connections at once.
    let burst: Vec<_> = (0..40)
        .map(|index| {
            let address = coordinator.cluster_address;
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(address).await.expect("connect");
                let _ = stream.write_all(&[index as u8; 64]).await;
                let mut sink = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink))
                    .await;
            })
        })
        .collect();
    for task in burst {
        task.await.expect("burst task");
    }

    // The good agent is still up, its node list unchanged, and every refused connection is gone.
    let started = Instant::now();
    loop {
        let summary = summary(&coordinator).await;
        if summary.cluster_connections == 1 {
            assert_eq!((summary.nodes_total, summary.nodes_up), (1, 1));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "connections leaked: {summary:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        coordinator.view().nodes.len(),
        1,
        "no refused peer became a node"
    );
    good.stop(Duration::from_secs(5)).await.expect("stop");
    coordinator.shutdown(Duration::from_secs(5)).await;
}
