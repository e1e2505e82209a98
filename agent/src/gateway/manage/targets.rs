//! Which nodes a model change goes to: the ones the client names (`X-Sollol-Node: NAME`,
//! `X-Sollol-Nodes: all | N | name,name`), or, when it names none, the route's own choice.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use sollol_policy::placement::{self, Site};

use crate::cluster::{Backend, ClusterView};
use crate::gateway::ApiError;
use crate::gateway::learning::Learned;

pub use crate::gateway::proxy::NODE_HEADER;
/// Request header for fanning a change out: `all`, a number of nodes placement picks, or names.
pub const NODES_HEADER: &str = "x-sollol-nodes";

/// What the client asked for.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Wanted {
    /// No header: the route decides.
    Unnamed,
    All,
    /// The best `N` nodes for a new copy.
    Count(usize),
    Named(Vec<String>),
}

impl Wanted {
    pub(super) fn of(headers: &HeaderMap) -> Result<Self, ApiError> {
        let text = |name: &str| {
            headers
                .get(name)
                .map(|value| {
                    value.to_str().map(str::trim).map_err(|_| {
                        ApiError::new(StatusCode::BAD_REQUEST, format!("{name} is not text"))
                    })
                })
                .transpose()
        };
        match (text(NODE_HEADER)?, text(NODES_HEADER)?) {
            (Some(_), Some(_)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "send X-Sollol-Node (one node) or X-Sollol-Nodes (several), not both",
            )),
            (None, None) => Ok(Self::Unnamed),
            (Some(""), None) | (None, Some("")) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "X-Sollol-Node and X-Sollol-Nodes must name at least one node",
            )),
            (Some(name), None) => Ok(Self::Named(vec![name.to_owned()])),
            (None, Some(list)) if list.eq_ignore_ascii_case("all") => Ok(Self::All),
            (None, Some(list)) => match list.parse::<usize>() {
                Ok(0) => Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "X-Sollol-Nodes: 0 nodes is no nodes: give a count of 1 or more, `all` or names",
                )),
                Ok(count) => Ok(Self::Count(count)),
                Err(_) => Ok(Self::Named(
                    list.split(',')
                        .map(str::trim)
                        .filter(|name| !name.is_empty())
                        .map(str::to_owned)
                        .collect(),
                )),
            },
        }
    }
}

/// The nodes that hold `model`, in the view's order.
pub(super) fn holders(view: &ClusterView, model: &str) -> Vec<Arc<Backend>> {
    view.backends
        .iter()
        .filter(|backend| backend.has_model(model))
        .cloned()
        .collect()
}

/// The `count` best nodes for a new copy of `model` (see `sollol_policy::placement`), with what the
/// gateway learned of each node's speed.
pub(super) fn placed(
    view: &ClusterView,
    learned: &Learned,
    model: &str,
    count: usize,
) -> Vec<Arc<Backend>> {
    // The model's size, as a node that has it reports it.
    let size = view
        .nodes
        .iter()
        .filter_map(|node| node.ollama.as_ref())
        .flat_map(|ollama| &ollama.models)
        .find(|known| sollol_shared::model_name::normalize(&known.name) == model)
        .map(|known| known.size_bytes);
    let sites: Vec<Site> = view
        .backends
        .iter()
        .map(|backend| Site {
            needed_disk: size,
            speed: learned
                .pair(&backend.node_id, model)
                .or_else(|| learned.node_stats(&backend.node_id, model))
                .map(|stats| stats.decode_tokens_per_second),
            ..site(view, backend, model)
        })
        .collect();
    placement::choose(&sites, count)
        .into_iter()
        .map(|index| Arc::clone(&view.backends[index]))
        .collect()
}

fn site(view: &ClusterView, backend: &Backend, model: &str) -> Site {
    let node = view.node(&backend.node_id);
    let hardware = node.and_then(|node| node.hardware.as_ref());
    let free_memory = hardware.map(|hardware| {
        let gpus: u64 = hardware
            .gpus
            .iter()
            .map(|gpu| gpu.vram_total_bytes.saturating_sub(gpu.vram_used_bytes))
            .sum();
        let ram = node
            .and_then(|node| node.memory_limit_bytes)
            .map_or(hardware.memory.available_bytes, |limit| {
                limit.min(hardware.memory.available_bytes)
            });
        gpus + ram
    });
    Site {
        holds_model: backend.has_model(model),
        free_memory,
        free_disk: hardware
            .and_then(|hardware| hardware.disk.as_ref())
            .map(|disk| disk.available_bytes),
        needed_disk: None,
        speed: None,
    }
}

/// The nodes the client named (`Named`, `All`, `Count`); `Unnamed` gives nothing, for the route to
/// decide. An unknown name is a 404 that lists the nodes there are.
pub(super) fn resolve(
    wanted: &Wanted,
    view: &ClusterView,
    learned: &Learned,
    model: &str,
) -> Result<Vec<Arc<Backend>>, ApiError> {
    let nodes = &view.backends;
    if nodes.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no node with a reachable Ollama is up",
        ));
    }
    match wanted {
        Wanted::Unnamed => Ok(Vec::new()),
        Wanted::All => Ok(nodes.clone()),
        Wanted::Count(count) if *count > nodes.len() => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "X-Sollol-Nodes asks for {count} nodes; {} can take models now",
                nodes.len()
            ),
        )),
        Wanted::Count(count) => Ok(placed(view, learned, model, *count)),
        Wanted::Named(names) => {
            let mut chosen: Vec<Arc<Backend>> = Vec::new();
            for name in names {
                let backend = nodes
                    .iter()
                    .find(|backend| backend.name == *name || backend.node_id == *name)
                    .ok_or_else(|| {
                        let known: Vec<&str> =
                            nodes.iter().map(|backend| backend.name.as_str()).collect();
                        ApiError::new(
                            StatusCode::NOT_FOUND,
                            format!(
                                "no node named {name:?} is up with a reachable Ollama (up: {})",
                                known.join(", ")
                            ),
                        )
                    })?;
                if !chosen.iter().any(|other| other.node_id == backend.node_id) {
                    chosen.push(Arc::clone(backend));
                }
            }
            Ok(chosen)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().expect("header value"));
        }
        headers
    }

    #[test]
    fn the_headers_name_one_several_all_or_a_count() {
        assert_eq!(Wanted::of(&headers(&[])).ok(), Some(Wanted::Unnamed));
        assert_eq!(
            Wanted::of(&headers(&[(NODE_HEADER, " gpu-1 ")])).ok(),
            Some(Wanted::Named(vec!["gpu-1".to_owned()]))
        );
        assert_eq!(
            Wanted::of(&headers(&[(NODES_HEADER, "a, b,,c")])).ok(),
            Some(Wanted::Named(vec!["a".into(), "b".into(), "c".into()]))
        );
        assert_eq!(
            Wanted::of(&headers(&[(NODES_HEADER, "ALL")])).ok(),
            Some(Wanted::All)
        );
        assert_eq!(
            Wanted::of(&headers(&[(NODES_HEADER, "2")])).ok(),
            Some(Wanted::Count(2))
        );
        for bad in [
            headers(&[(NODES_HEADER, "0")]),
            headers(&[(NODES_HEADER, " ")]),
            headers(&[(NODE_HEADER, "a"), (NODES_HEADER, "b")]),
        ] {
            assert!(Wanted::of(&bad).is_err(), "{bad:?}");
        }
    }
}
