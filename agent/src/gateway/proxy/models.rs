//! The model-list endpoints answered by the gateway itself from the cluster snapshot (or, for
//! `/api/ps`, by asking every node): `/api/tags`, `/api/ps`, `/api/version` and `/v1/models`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::{Value, json};

use super::relay::read_limited;
use crate::gateway::GatewayState;

/// How long `/api/ps` waits for each node.
const PS_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /api/tags`: every model on an up node, once.
pub async fn tags(State(state): State<Arc<GatewayState>>) -> Response {
    let view = state.view.load();
    let mut models: BTreeMap<String, Value> = BTreeMap::new();
    for node in &view.nodes {
        let Some(ollama) = node.ollama.as_ref().filter(|ollama| ollama.reachable) else {
            continue;
        };
        if !view
            .backends
            .iter()
            .any(|backend| backend.node_id == node.id)
        {
            continue;
        }
        for model in &ollama.models {
            models.entry(model.name.clone()).or_insert_with(|| {
                json!({
                    "name": model.name,
                    "model": model.name,
                    "size": model.size_bytes,
                    "digest": model.digest,
                    "details": {
                        "format": "gguf",
                        "family": model.family,
                        "parameter_size": model.parameter_size,
                        "quantization_level": model.quantization_level,
                    },
                })
            });
        }
    }
    axum::Json(json!({ "models": models.into_values().collect::<Vec<_>>() })).into_response()
}

/// `GET /api/ps`: loaded models on every up node, asked live (the heartbeat's copy can be a beat old);
/// each entry names its node. A node that does not answer in time contributes its last reported state.
pub async fn ps(State(state): State<Arc<GatewayState>>) -> Response {
    let view = state.view.load_full();
    let client = state.proxy.client();
    let asks = view.backends.iter().map(|backend| async move {
        let request = hyper::Request::get(format!("{}/api/ps", backend.base_url))
            .body(Full::new(Bytes::new()))
            .ok()?;
        let response = tokio::time::timeout(PS_TIMEOUT, client.request(request))
            .await
            .ok()?
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body =
            tokio::time::timeout(PS_TIMEOUT, read_limited(response.into_body(), 1024 * 1024))
                .await
                .ok()??;
        let value: Value = serde_json::from_slice(&body).ok()?;
        value.get("models").and_then(Value::as_array).cloned()
    });
    let answers = futures_util::future::join_all(asks).await;
    let mut models = Vec::new();
    for (backend, answer) in view.backends.iter().zip(answers) {
        let entries = match answer {
            Some(entries) => entries,
            None => view
                .node(&backend.node_id)
                .and_then(|node| node.ollama.as_ref())
                .map(|ollama| {
                    ollama
                        .loaded
                        .iter()
                        .map(|loaded| {
                            json!({
                                "name": loaded.name,
                                "model": loaded.name,
                                "size": loaded.size_bytes,
                                "size_vram": loaded.vram_bytes,
                                "expires_at": loaded.expires_at,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        for mut entry in entries {
            if let Some(fields) = entry.as_object_mut() {
                fields.insert("sollol_node".into(), json!(backend.name));
                fields.insert("sollol_node_id".into(), json!(backend.node_id));
            }
            models.push(entry);
        }
    }
    axum::Json(json!({ "models": models })).into_response()
}

/// `GET /api/version`: the oldest Ollama version among up nodes, so clients never assume a feature some node lacks.
pub async fn version(State(state): State<Arc<GatewayState>>) -> Response {
    let view = state.view.load();
    let oldest = view
        .nodes
        .iter()
        .filter(|node| {
            view.backends
                .iter()
                .any(|backend| backend.node_id == node.id)
        })
        .filter_map(|node| {
            node.ollama
                .as_ref()
                .and_then(|ollama| ollama.version.clone())
        })
        .min_by(|a, b| version_key(a).cmp(&version_key(b)));
    axum::Json(json!({ "version": oldest.unwrap_or_else(|| "0.0.0".to_owned()) })).into_response()
}

fn version_key(version: &str) -> Vec<u64> {
    version
        .split(['.', '-'])
        .map(|part| part.parse().unwrap_or(0))
        .collect()
}

/// `GET /v1/models`: every model on an up node, once, in OpenAI's shape.
pub async fn openai_models(State(state): State<Arc<GatewayState>>) -> Response {
    let view = state.view.load();
    let mut names: Vec<&str> = view
        .backends
        .iter()
        .flat_map(|backend| backend.models.iter().map(String::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();
    let data: Vec<Value> = names
        .into_iter()
        .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "library"}))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_key("0.9.6") < version_key("0.12.3"));
        assert!(version_key("0.12.3") < version_key("0.12.10"));
    }
}
