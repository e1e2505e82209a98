//! Who exists besides agents: plain Ollama servers listed in the configuration, probed like an agent would.
//!
//! Each URL becomes a node whose id is derived from the URL, so it stays the
//! same across restarts. This module only probes and reports; the cluster task
//! judges health and routing decides.

use std::time::Duration;

use sha2::Digest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterEvent;
use crate::telemetry::ollama::OllamaProbe;

/// The node id of a static Ollama URL: 32 hex digits of its SHA-256.
pub fn static_node_id(url: &str) -> String {
    let digest = sha2::Sha256::digest(url.as_bytes());
    hex::encode(&digest[..16])
}

/// The cluster event for a probe of the Ollama server at `url` (a node without an agent), shown as
/// `name` when set.
pub fn probed(
    url: &str,
    name: Option<String>,
    ollama: sollol_shared::hardware::OllamaState,
    interval: Duration,
) -> ClusterEvent {
    ClusterEvent::Probed {
        node_id: static_node_id(url),
        url: url.to_owned(),
        name,
        ollama: Box::new(ollama),
        interval,
    }
}

/// Probes every URL (with the name to show, if not the URL) each `interval` until `shutdown`,
/// reporting to the cluster task.
pub async fn probe_static_nodes(
    urls: Vec<(String, Option<String>)>,
    interval: Duration,
    events: mpsc::Sender<ClusterEvent>,
    shutdown: CancellationToken,
) {
    let probes: Vec<(String, Option<String>, OllamaProbe)> = urls
        .into_iter()
        .map(|(url, name)| {
            let probe = OllamaProbe::new(Some(&url));
            (url, name, probe)
        })
        .collect();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let samples = futures_util::future::join_all(
            probes
                .iter()
                .map(|(url, name, probe)| async move { (url, name, probe.sample().await) }),
        )
        .await;
        for (url, name, sample) in samples {
            let Some(ollama) = sample else { continue };
            if events
                .send(probed(url, name.clone(), ollama, interval))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_ids_are_stable_node_ids() {
        let id = static_node_id("http://gpu-box:11434");
        assert_eq!(id, static_node_id("http://gpu-box:11434"));
        assert_ne!(id, static_node_id("http://gpu-box:11435"));
        assert!(crate::cluster::identity::NodeId::parse(&id).is_ok());
    }
}
