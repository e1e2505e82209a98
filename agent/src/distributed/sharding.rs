//! Which models the coordinator distributes by itself: those that no node holding them has the memory
//! to serve whole (`distributed.auto`, with `model_sharding_enabled`). Pure decisions over the cluster
//! view, and the task that applies them to the distributed inference front.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sollol_shared::api::{Node, NodeStatus};
use tokio_util::sync::CancellationToken;

use super::front::{Front, offered_bytes};
use crate::cluster::SharedView;
use sollol_shared::model_name::normalize as normalize_model;

/// A model fits a node when the node offers its file size plus this share (KV cache, buffers).
const HEADROOM: f64 = 0.10;

/// An automatically distributed model goes back to being served whole only when a node offers this
/// share more than the model needs, so that memory readings near the line do not flip it back and forth.
const RETURN_HEADROOM: f64 = 0.50;

/// The models that up agents with stage ports hold and that none of the nodes holding them can serve
/// whole, each with why (for the distributed model's reasons). `headroom` is the share of a model's
/// size a node must offer beyond it.
pub fn too_large(nodes: &[Arc<Node>], headroom: f64) -> BTreeMap<String, String> {
    // Per model: its size, and the most a holder offers (or that one has it loaded: it fits there).
    let mut models: BTreeMap<String, (u64, u64, String, bool)> = BTreeMap::new();
    for node in nodes.iter().filter(|node| node.status == NodeStatus::Up) {
        let Some(ollama) = node.ollama.as_ref().filter(|ollama| ollama.reachable) else {
            continue;
        };
        let offered = offered_bytes(node).unwrap_or(0);
        for model in ollama.models.iter().filter(|model| model.size_bytes > 0) {
            let name = normalize_model(&model.name);
            let loaded = ollama
                .loaded
                .iter()
                .any(|loaded| normalize_model(&loaded.name) == name);
            let entry = models.entry(name).or_insert((0, 0, String::new(), false));
            entry.0 = entry.0.max(model.size_bytes);
            if offered >= entry.1 {
                entry.1 = offered;
                entry.2.clone_from(&node.name);
            }
            // Only sollol agents can be stages or sources.
            entry.3 |= node.stage_address.is_some();
            if loaded {
                entry.1 = u64::MAX;
            }
        }
    }
    models
        .into_iter()
        .filter(|(_, (size, best, _, staged))| {
            *staged && (*best as f64) < *size as f64 * (1.0 + headroom)
        })
        .map(|(name, (size, best, node, _))| {
            let why = format!(
                "automatic: no node that holds it has the memory ({} MiB and {:.0}% headroom; the most any offers is {} MiB, on {node})",
                size >> 20,
                headroom * 100.0,
                best >> 20
            );
            (name, why)
        })
        .collect()
}

/// Keeps the front's automatically distributed models in step with the cluster: distributes every model
/// [`too_large`] names, and serves whole again (removes from the front) one a node can now hold.
/// Models in `configured` (`distributed.models`) stay distributed.
pub async fn watch(
    front: Arc<Front>,
    view: SharedView,
    configured: Vec<String>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let nodes = view.load().nodes.clone();
        let serving: Vec<String> = front
            .models()
            .iter()
            .map(|model| model.pipeline.model.clone())
            .collect();
        for (model, why) in too_large(&nodes, HEADROOM) {
            if !serving.contains(&model) {
                tracing::info!(%model, %why, "distributing a model no node can hold");
                front.add(&model, why);
            }
        }
        let still = too_large(&nodes, RETURN_HEADROOM);
        for model in serving {
            if !configured.contains(&model) && !still.contains_key(&model) {
                tracing::info!(%model, "a node can hold the model now: served whole again");
                front.remove(&model);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sollol_shared::hardware::{HardwareReport, OllamaLoadedModel, OllamaModel, OllamaState};

    fn node(
        name: &str,
        available_mib: u64,
        limit_mib: Option<u64>,
        models: &[(&str, u64)],
    ) -> Arc<Node> {
        let mut hardware = HardwareReport::default();
        hardware.memory.available_bytes = available_mib << 20;
        Arc::new(Node {
            id: name.to_owned(),
            name: name.to_owned(),
            status: NodeStatus::Up,
            addresses: vec!["127.0.0.1:40000".to_owned()],
            build_version: String::new(),
            protocol_version: sollol_shared::protocol::PROTOCOL_VERSION,
            first_seen_ms: 0,
            last_seen_ms: 0,
            heartbeat_interval_ms: 2000,
            connected: true,
            hardware: Some(hardware),
            ollama: Some(OllamaState {
                url: "http://127.0.0.1:11434".to_owned(),
                reachable: true,
                error: None,
                version: Some("0.5.0".to_owned()),
                models: models
                    .iter()
                    .map(|(name, mib)| OllamaModel {
                        name: (*name).to_owned(),
                        size_bytes: mib << 20,
                        digest: String::new(),
                        family: None,
                        parameter_size: None,
                        quantization_level: None,
                    })
                    .collect(),
                loaded: Vec::new(),
            }),
            stage_address: Some("127.0.0.1:7703".to_owned()),
            memory_limit_bytes: limit_mib.map(|mib| mib << 20),
        })
    }

    #[test]
    fn a_model_is_distributed_only_when_no_holder_has_the_memory() {
        let nodes = [
            node("pi-a", 4000, Some(64), &[("big:latest", 94), ("small", 20)]),
            node("pi-b", 50, None, &[("big:latest", 94)]),
        ];
        let found = too_large(&nodes, HEADROOM);
        assert_eq!(found.keys().collect::<Vec<_>>(), ["big:latest"]);
        assert!(found["big:latest"].contains("the most any offers is 64 MiB, on pi-a"));

        // A holder with room serves it whole; one that has it loaded already does too.
        let roomy = [
            node("pi-a", 4000, Some(64), &[("big", 94)]),
            node("desk", 16000, None, &[("big", 94)]),
        ];
        assert!(too_large(&roomy, HEADROOM).is_empty());
        let mut loaded = (*node("pi-a", 10, None, &[("big", 94)])).clone();
        if let Some(ollama) = loaded.ollama.as_mut() {
            ollama.loaded.push(OllamaLoadedModel {
                name: "big:latest".to_owned(),
                size_bytes: 94 << 20,
                vram_bytes: 0,
                expires_at: None,
            });
        }
        assert!(too_large(&[Arc::new(loaded)], HEADROOM).is_empty());

        // Down nodes, plain Ollama nodes (no stage port) and the front's own listing (size 0) do not count.
        let mut plain = (*node("ollama-box", 10, None, &[("big", 94)])).clone();
        plain.stage_address = None;
        assert!(too_large(&[Arc::new(plain)], HEADROOM).is_empty());
        let mut down = (*node("pi-a", 10, None, &[("big", 94)])).clone();
        down.status = NodeStatus::Down;
        assert!(too_large(&[Arc::new(down)], HEADROOM).is_empty());
        assert!(too_large(&[node("front", 10, None, &[("big", 0)])], HEADROOM).is_empty());
    }

    #[test]
    fn going_back_to_whole_needs_more_room_than_going_distributed() {
        let nodes = [node("desk", 120, None, &[("big", 100)])];
        assert!(too_large(&nodes, HEADROOM).is_empty());
        assert!(too_large(&nodes, RETURN_HEADROOM).contains_key("big:latest"));
    }
}
