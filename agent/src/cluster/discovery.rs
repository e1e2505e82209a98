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
/// reporting to the cluster task. The probes are spread evenly over the interval, so a thousand
/// servers make a steady trickle of requests rather than a burst every interval.
pub async fn probe_static_nodes(
    urls: Vec<(String, Option<String>)>,
    interval: Duration,
    events: mpsc::Sender<ClusterEvent>,
    shutdown: CancellationToken,
) {
    let count = u32::try_from(urls.len()).unwrap_or(u32::MAX).max(1);
    let loops = urls.into_iter().zip(0u32..).map(|((url, name), index)| {
        let offset = interval / count * index;
        probe_loop(
            url,
            name,
            offset,
            interval,
            events.clone(),
            shutdown.clone(),
        )
    });
    futures_util::future::join_all(loops).await;
}

/// Probes one URL every `interval`, the first time after `offset`.
async fn probe_loop(
    url: String,
    name: Option<String>,
    offset: Duration,
    interval: Duration,
    events: mpsc::Sender<ClusterEvent>,
    shutdown: CancellationToken,
) {
    let probe = OllamaProbe::remote(&url);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(ollama) = probe.sample().await else {
            continue;
        };
        if events
            .send(probed(&url, name.clone(), ollama, interval))
            .await
            .is_err()
        {
            return;
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
