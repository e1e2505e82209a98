//! Unloading a model everywhere: Ollama's load-only request with `keep_alive: 0` (what Open WebUI's
//! "unload" and `ollama stop` send) goes to every node that has the model loaded, not to the one node
//! routing would pick, or the model would stay loaded on the others.

use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;

use super::attempt::header_text;
use super::relay::read_limited;
use super::request::ParsedRequest;
use super::{DECISION_HEADER, NODE_HEADER, Proxy, post_json};
use crate::cluster::{Backend, SharedView};
use crate::gateway::ApiError;
use crate::http_client::error_chain;

/// The largest answer read from a node (a load-only answer is a few hundred bytes).
const ANSWER_LIMIT: usize = 64 * 1024;

/// The nodes that report `model` loaded, when the request only unloads it and names no node, and more
/// than one node has it loaded; `None` when routing should handle the request as usual.
pub(super) fn everywhere(view: &SharedView, request: &ParsedRequest) -> Option<Vec<Arc<Backend>>> {
    if !request.only_unloads || request.wanted_node.is_some() {
        return None;
    }
    let holders: Vec<Arc<Backend>> = view
        .load()
        .backends
        .iter()
        .filter(|backend| backend.has_loaded(&request.model))
        .cloned()
        .collect();
    (holders.len() > 1).then_some(holders)
}

/// The request sent to each of `nodes` at once; the first node's answer, with every node named.
pub(super) async fn run(
    proxy: &Proxy,
    path: &str,
    request: &ParsedRequest,
    nodes: &[Arc<Backend>],
) -> Result<Response, ApiError> {
    let answers = join_all(nodes.iter().map(|node| async move {
        let upstream = post_json(
            format!("{}{path}", node.base_url),
            request.body.clone(),
            request.origin.as_ref(),
        )?;
        let answer = tokio::time::timeout(
            proxy.settings.response_timeout,
            proxy.client().request(upstream),
        )
        .await
        .map_err(|_| "no answer in time".to_owned())?
        .map_err(|error| error_chain(&error))?;
        let status = answer.status();
        let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
        let body = read_limited(answer.into_body(), ANSWER_LIMIT)
            .await
            .unwrap_or_default();
        Ok::<_, String>((status, content_type, body))
    }))
    .await;
    let names: Vec<&str> = nodes.iter().map(|node| node.name.as_str()).collect();
    let mut failures = Vec::new();
    let mut first = None;
    for (node, answer) in nodes.iter().zip(answers) {
        match answer {
            Ok((status, content_type, body)) if status.is_success() => {
                first.get_or_insert((status, content_type, body));
            }
            Ok((status, _, body)) => failures.push(format!(
                "{}: HTTP {}: {}",
                node.name,
                status.as_u16(),
                String::from_utf8_lossy(&body).trim()
            )),
            Err(error) => failures.push(format!("{}: {error}", node.name)),
        }
    }
    let Some((status, content_type, body)) = first.filter(|_| failures.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "unloading on every node that has the model loaded failed on {}",
                failures.join("; ")
            ),
        ));
    };
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json; charset=utf-8")),
    );
    headers.insert(NODE_HEADER, header_text(&names.join(",")));
    headers.insert(
        DECISION_HEADER,
        header_text(&format!(
            "unload on every node that has the model loaded: {}",
            names.join(", ")
        )),
    );
    Ok(response)
}
