//! The model commands: `sollol models` (which node holds which model), `sollol pull` and `sollol rm`
//! (through the gateway's model management, so they go where a client's request would), with progress
//! bars on a terminal and plain lines otherwise.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use sollol_shared::api::{API_PREFIX, NodeList, ReplicaList, TransferList};
use sollol_shared::model_matrix::{ModelMatrix, Presence};

use super::EXIT_FAILURE;
use super::commands::{API_TIMEOUT, fail};
use super::render::{table, terminal_safe};
use crate::config::Config;
use crate::http_client::{HttpClient, error_chain};

/// How long the coordinator may take to answer a removal (it asks every node that holds the model).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the coordinator may take to start a pull's progress stream (the stream itself may take
/// hours).
const PULL_START_TIMEOUT: Duration = Duration::from_secs(120);

pub(super) async fn models(config: &Config, json: bool) -> ExitCode {
    let url = format!("{}{API_PREFIX}/nodes", config.coordinator_url);
    let client = HttpClient::default().with_key(config.api_key.as_deref());
    let transfers_url = format!("{}{API_PREFIX}/transfers", config.coordinator_url);
    let replicas_url = format!("{}{API_PREFIX}/replicas", config.coordinator_url);
    let (list, transfers, replicas) = tokio::join!(
        client.get_json::<NodeList>(&url, API_TIMEOUT),
        client.get_json::<TransferList>(&transfers_url, API_TIMEOUT),
        client.get_json::<ReplicaList>(&replicas_url, API_TIMEOUT)
    );
    match list {
        Ok(list) => {
            // Copies under way show as "copying N%", kept counts in their own column (an older
            // coordinator has neither list).
            let transfers = transfers.map(|list| list.transfers).unwrap_or_default();
            let replicas = replicas.map(|list| list.replicas).unwrap_or_default();
            let matrix = ModelMatrix::of(&list.nodes)
                .with_transfers(&transfers)
                .with_replicas(&replicas);
            if json {
                match serde_json::to_string_pretty(&matrix) {
                    Ok(text) => println!("{text}"),
                    Err(error) => return fail(&error),
                }
            } else {
                print!("{}", terminal_safe(&render_models(&matrix)));
            }
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

/// The matrix as a table: a row per model, a column per node, `loaded`, `yes`, `copying N%` or `-` in
/// each cell.
pub fn render_models(matrix: &ModelMatrix) -> String {
    if matrix.nodes.is_empty() {
        return "no node with a reachable Ollama is up\n".to_owned();
    }
    if matrix.models.is_empty() {
        return format!(
            "no models on {}: `sollol pull MODEL` puts one on the cluster\n",
            matrix.nodes.join(", ")
        );
    }
    // The copies the coordinator keeps, when it keeps any: `2`, `all`.
    let kept = matrix.models.iter().any(|row| row.wanted.is_some());
    let mut header = vec!["MODEL".to_owned(), "SIZE".to_owned()];
    if kept {
        header.push("KEEP".to_owned());
    }
    header.extend(matrix.nodes.iter().cloned());
    let mut rows = vec![header];
    for row in &matrix.models {
        let cells = row.on.iter().map(|presence| match presence {
            Presence::Loaded => "loaded".to_owned(),
            Presence::Present => "yes".to_owned(),
            Presence::Copying(percent) => format!("copying {percent}%"),
            Presence::Absent => "-".to_owned(),
        });
        let mut line = vec![row.model.clone(), size(row.size_bytes)];
        if kept {
            line.push(
                row.wanted
                    .map_or_else(|| "-".to_owned(), |count| count.to_string()),
            );
        }
        line.extend(cells);
        rows.push(line);
    }
    table(&rows)
}

fn size(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

/// Sends `{"model": MODEL}` to the gateway's model management (`nodes` as `X-Sollol-Nodes`) and
/// waits, at most `within`, for the answer's head; a failed answer becomes its error message.
async fn send(
    config: &Config,
    method: hyper::Method,
    path: &str,
    model: &str,
    nodes: Option<&str>,
    within: Duration,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", config.coordinator_url))
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if let Some(key) = &config.api_key {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    if let Some(nodes) = nodes {
        request = request.header("x-sollol-nodes", nodes);
    }
    let request = request
        .body(Full::new(Bytes::from(json!({"model": model}).to_string())))
        .map_err(|error| error.to_string())?;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let response = tokio::time::timeout(within, client.request(request))
        .await
        .map_err(|_| {
            format!(
                "no answer from {} within {} s",
                config.coordinator_url,
                within.as_secs()
            )
        })?
        .map_err(|error| {
            format!(
                "cannot reach {}: {}",
                config.coordinator_url,
                error_chain(&error)
            )
        })?;
    if !response.status().is_success() {
        return Err(failure(response).await);
    }
    Ok(response)
}

/// The `error` of an answer that is not a success, or its status and text.
async fn failure(response: hyper::Response<hyper::body::Incoming>) -> String {
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|value| value.get("error")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| {
            format!(
                "HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&body).trim()
            )
        })
}

fn nodes_of(response: &hyper::Response<hyper::body::Incoming>) -> String {
    response
        .headers()
        .get("x-sollol-node")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("?")
        .replace(',', ", ")
}

pub(super) async fn pull(config: &Config, model: &str, nodes: Option<&str>) -> ExitCode {
    let sent = send(
        config,
        hyper::Method::POST,
        "/api/pull",
        model,
        nodes,
        PULL_START_TIMEOUT,
    );
    let response = match sent.await {
        Ok(response) => response,
        Err(error) => return fail(&error),
    };
    let targets = nodes_of(&response);
    eprintln!("pulling {model} onto {targets}");
    let mut shown = Shown::new(std::io::stderr().is_terminal());
    let mut body = response.into_body();
    let mut pending: Vec<u8> = Vec::new();
    let mut last: Option<Value> = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(error)) => {
                shown.finish();
                return fail(&format!("the stream broke off: {}", error_chain(&error)));
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                pending.extend_from_slice(&data);
                while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    if let Ok(value) = serde_json::from_slice::<Value>(&line) {
                        shown.line(&value);
                        last = Some(value);
                    }
                }
            }
        }
    }
    shown.finish();
    match last {
        Some(value) if value["status"] == "success" => {
            println!("pulled {model} onto {targets}");
            ExitCode::SUCCESS
        }
        Some(value) if value.get("error").is_some() => {
            eprintln!(
                "error: {}",
                terminal_safe(value["error"].as_str().unwrap_or("failed"))
            );
            ExitCode::from(EXIT_FAILURE)
        }
        _ => fail(&"the pull's stream ended without success"),
    }
}

/// Progress as it is shown: a bar per layer on a terminal, else a line per step and per quarter of
/// each layer.
struct Shown {
    bars: Option<MultiProgress>,
    layers: HashMap<String, (ProgressBar, u64)>,
}

impl Shown {
    fn new(terminal: bool) -> Self {
        Self {
            bars: terminal.then(MultiProgress::new),
            layers: HashMap::new(),
        }
    }

    fn line(&mut self, value: &Value) {
        let status = value["status"].as_str().unwrap_or_default();
        let digest = value["digest"].as_str();
        let (total, completed) = (value["total"].as_u64(), value["completed"].as_u64());
        let (Some(digest), Some(total)) = (digest, total) else {
            if !status.is_empty() && status != "success" {
                self.say(&terminal_safe(status));
            }
            return;
        };
        let completed = completed.unwrap_or(0).min(total);
        let short: String = digest
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect();
        let bars = self.bars.clone();
        let (bar, quarter) = self.layers.entry(short.clone()).or_insert_with(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_message(format!("pulling {short}"));
            let bar = match &bars {
                Some(bars) => bars.add(bar),
                None => {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
                    bar
                }
            };
            (bar, 0)
        });
        bar.set_length(total);
        bar.set_position(completed);
        if self.bars.is_none() {
            let reached = completed * 4 / total.max(1);
            if reached > *quarter {
                *quarter = reached;
                eprintln!(
                    "pulling {short}: {}% of {}",
                    completed * 100 / total.max(1),
                    size(total)
                );
            }
        }
    }

    fn say(&self, text: &str) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    fn finish(&mut self) {
        for (bar, _) in self.layers.values() {
            bar.finish();
        }
    }
}

pub(super) async fn remove(config: &Config, model: &str, nodes: Option<&str>) -> ExitCode {
    let sent = send(
        config,
        hyper::Method::DELETE,
        "/api/delete",
        model,
        nodes,
        REMOVE_TIMEOUT,
    );
    match sent.await {
        Ok(response) => {
            println!("removed {model} from {}", nodes_of(&response));
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sollol_shared::model_matrix::ModelRow;

    #[test]
    fn the_matrix_has_a_column_per_node_and_a_row_per_model() {
        let matrix = ModelMatrix {
            nodes: vec!["gpu-1".to_owned(), "pi".to_owned()],
            models: vec![
                ModelRow {
                    model: "llama3.2:3b".to_owned(),
                    size_bytes: 2 * 1024 * 1024 * 1024,
                    on: vec![Presence::Loaded, Presence::Absent],
                    wanted: None,
                },
                ModelRow {
                    model: "smollm2:135m".to_owned(),
                    size_bytes: 270 * 1024 * 1024,
                    on: vec![Presence::Present, Presence::Copying(42)],
                    wanted: None,
                },
            ],
        };
        assert_eq!(
            render_models(&matrix),
            "MODEL         SIZE     gpu-1   pi\n\
             llama3.2:3b   2.0 GiB  loaded  -\n\
             smollm2:135m  270 MiB  yes     copying 42%\n"
        );
        assert!(render_models(&ModelMatrix::default()).starts_with("no node"));
        // With counts kept by the coordinator, a column says how many copies.
        let mut kept = matrix;
        kept.models[1].wanted = Some(sollol_shared::api::ReplicaCount::All);
        assert_eq!(
            render_models(&kept),
            "MODEL         SIZE     KEEP  gpu-1   pi\n\
             llama3.2:3b   2.0 GiB  -     loaded  -\n\
             smollm2:135m  270 MiB  all   yes     copying 42%\n"
        );
    }
}
