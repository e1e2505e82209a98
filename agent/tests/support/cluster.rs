//! A coordinator with agents in front of emulated Ollama nodes, in this process, on 127.0.0.1.

use std::time::{Duration, Instant};

use sollol::app::{self, AgentHandle, CoordinatorHandle};
use sollol::config::Config;
use sollol_ollama_emulator::{Emulator, EmulatorConfig};

/// A coordinator and one agent per emulated Ollama node, on loopback.
pub struct Cluster {
    pub coordinator: CoordinatorHandle,
    pub agents: Vec<AgentHandle>,
    pub emulators: Vec<Emulator>,
    /// The coordinator's data directory first, then each agent's.
    pub dirs: Vec<tempfile::TempDir>,
}

/// The test defaults for a coordinator or agent named `name`, with `extra` over them.
pub fn config(data_dir: &std::path::Path, name: &str, extra: &[(&'static str, &str)]) -> Config {
    let data_dir = data_dir.display().to_string();
    let mut pairs: Vec<(&'static str, &str)> = vec![
        ("data_dir", &data_dir),
        ("coordinator.gateway_bind", "127.0.0.1:0"),
        ("coordinator.cluster_bind", "127.0.0.1:0"),
        ("coordinator.max_request_body", "65536"),
        // Hedging races two nodes, which makes "which node answered" timing-dependent; its own test turns it on.
        ("coordinator.hedging", "false"),
        ("agent.name", name),
        ("agent.heartbeat_interval", "200ms"),
        // Tests stay on loopback: no mDNS on the machine's interfaces.
        ("discovery.mdns", "false"),
    ];
    pairs.extend_from_slice(extra);
    Config::from_pairs(&pairs).expect("valid test config")
}

/// A coordinator with `coordinator_pairs` over the test defaults, and one agent per emulated node.
pub async fn cluster_with(
    coordinator_pairs: &[(&'static str, &str)],
    nodes: &[EmulatorConfig],
) -> Cluster {
    let dirs = vec![tempfile::tempdir().expect("tempdir")];
    let coordinator =
        app::start_coordinator(&config(dirs[0].path(), "coordinator", coordinator_pairs))
            .await
            .expect("coordinator");
    let mut cluster = Cluster {
        coordinator,
        agents: Vec::new(),
        emulators: Vec::new(),
        dirs,
    };
    for node in nodes {
        cluster.add_node(node.clone()).await;
    }
    let started = Instant::now();
    while cluster.coordinator.view().backends.len() < nodes.len() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "backends never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster
}

impl Cluster {
    /// Starts an emulated Ollama node and an agent in front of it that joins the coordinator.
    pub async fn add_node(&mut self, node: EmulatorConfig) {
        let name = node.name.clone();
        let emulator = Emulator::start(node.clone()).await.expect("emulator");
        let dir = tempfile::tempdir().expect("tempdir");
        let url = emulator.url();
        // An agent reads its node's Ollama store, when the emulator keeps one, to copy models to others.
        let store = node.store.as_ref().map(|path| path.display().to_string());
        let mut pairs = vec![("agent.ollama_url", url.as_str())];
        if let Some(store) = &store {
            pairs.push(("engine.ollama_models", store));
        }
        let agent_config = config(dir.path(), &name, &pairs);
        self.agents.push(
            app::start_agent(
                &agent_config,
                self.coordinator.cluster_address.to_string(),
                self.coordinator.token.clone(),
            )
            .await
            .expect("agent"),
        );
        self.emulators.push(emulator);
        self.dirs.push(dir);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.coordinator.gateway_address)
    }

    pub async fn stop(self) {
        for agent in self.agents {
            agent
                .stop(Duration::from_secs(5))
                .await
                .expect("stop agent");
        }
        self.coordinator.shutdown(Duration::from_secs(5)).await;
    }
}
