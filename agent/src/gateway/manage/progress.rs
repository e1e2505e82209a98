//! One progress stream for a change made on several nodes at once: each node's NDJSON lines
//! (`{"status", "digest", "total", "completed"}`, Ollama's pull, create and push format) folded into
//! the lines a single Ollama would send, so `ollama pull` shows one honest bar per layer. Pure: the
//! caller feeds lines and node endings in, and sends out what comes back.

use std::collections::BTreeMap;

use hyper::body::Bytes;
use serde_json::{Value, json};

/// What a node's progress stream did: a line, or its end.
pub(super) enum Event {
    Line(usize, Bytes),
    End(usize, Result<(), String>),
}

/// What the nodes have reported so far.
#[derive(Debug)]
pub(super) struct Progress {
    nodes: Vec<String>,
    outcome: Vec<Option<Result<(), String>>>,
    /// Per layer digest: its size as the first node reported it, and each node's bytes done.
    layers: BTreeMap<String, (u64, Vec<u64>)>,
    /// Per status without a digest: how many nodes reached it.
    steps: BTreeMap<String, usize>,
}

impl Progress {
    pub(super) fn new(nodes: Vec<String>) -> Self {
        let count = nodes.len();
        Self {
            nodes,
            outcome: vec![None; count],
            layers: BTreeMap::new(),
            steps: BTreeMap::new(),
        }
    }

    /// Folds in one event; what to send the client, if anything.
    pub(super) fn apply(&mut self, event: Event) -> Option<Value> {
        match event {
            Event::Line(index, line) => self.line(index, &line),
            // A stream that ended without a `success` (or an `error`) line failed; a node's first
            // ending counts.
            Event::End(index, ended) => self.finished(
                index,
                ended.and(Err("its stream ended without success".to_owned())),
            ),
        }
    }

    /// Whether every node has ended, successfully or not.
    pub(super) fn done(&self) -> bool {
        self.outcome.iter().all(Option::is_some)
    }

    /// One line of node `index`'s stream; what to send the client (nothing for a blank line).
    pub(super) fn line(&mut self, index: usize, line: &[u8]) -> Option<Value> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        let Ok(value) = serde_json::from_slice::<Value>(line) else {
            return self.finished(index, Err("sent a line that is not JSON".to_owned()));
        };
        if let Some(error) = value.get("error") {
            let message = error
                .as_str()
                .map_or_else(|| error.to_string(), str::to_owned);
            return self.finished(index, Err(message));
        }
        let status = value.get("status").and_then(Value::as_str).unwrap_or("");
        if status == "success" {
            return self.finished(index, Ok(()));
        }
        let count = |field: &str| value.get(field).and_then(Value::as_u64);
        if let (Some(digest), Some(total)) =
            (value.get("digest").and_then(Value::as_str), count("total"))
        {
            let nodes = self.nodes.len();
            let (size, done) = self
                .layers
                .entry(digest.to_owned())
                .or_insert_with(|| (total, vec![0; nodes]));
            done[index] = count("completed").unwrap_or(0).min(*size);
            return Some(json!({
                "status": status,
                "digest": digest,
                "total": *size * nodes as u64,
                "completed": done.iter().sum::<u64>(),
            }));
        }
        let reached = self.steps.entry(status.to_owned()).or_default();
        *reached += 1;
        Some(json!({"status": format!("{status} ({reached} of {} nodes)", self.nodes.len())}))
    }

    /// Node `index`'s stream ended: with its success, or why it failed. A node's first ending counts.
    pub(super) fn finished(&mut self, index: usize, result: Result<(), String>) -> Option<Value> {
        if self.outcome[index].is_some() {
            return None;
        }
        let node = &self.nodes[index];
        let line = match &result {
            Ok(()) => json!({"status": format!("{node}: done")}),
            Err(error) => json!({"status": format!("{node}: failed: {error}")}),
        };
        self.outcome[index] = Some(result);
        Some(line)
    }

    /// The last line, once every node has ended: Ollama's `success` when all succeeded, else an
    /// `error` naming each failed node and the nodes that succeeded.
    pub(super) fn last(&self) -> Value {
        let mut failed = Vec::new();
        let mut succeeded = Vec::new();
        for (node, outcome) in self.nodes.iter().zip(&self.outcome) {
            match outcome {
                Some(Ok(())) => succeeded.push(node.as_str()),
                Some(Err(error)) => failed.push(format!("{node}: {error}")),
                None => failed.push(format!("{node}: its stream ended without success")),
            }
        }
        if failed.is_empty() {
            return json!({"status": "success"});
        }
        let mut message = format!("failed on {}", failed.join("; "));
        if !succeeded.is_empty() {
            message.push_str(&format!(" (done on {})", succeeded.join(", ")));
        }
        json!({"error": message})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_nodes() -> Progress {
        Progress::new(vec!["a".to_owned(), "b".to_owned()])
    }

    #[test]
    fn layers_add_up_over_the_nodes() {
        let mut progress = two_nodes();
        let layer = |completed: u64| {
            format!(
                r#"{{"status": "pulling 1234", "digest": "sha256:1234", "total": 100, "completed": {completed}}}"#
            )
        };
        assert_eq!(
            progress.line(0, layer(50).as_bytes()),
            Some(
                json!({"status": "pulling 1234", "digest": "sha256:1234", "total": 200, "completed": 50})
            )
        );
        let line = progress.line(1, layer(100).as_bytes()).expect("a line");
        assert_eq!(line["completed"], 150);
        let line = progress.line(0, layer(100).as_bytes()).expect("a line");
        assert_eq!(
            (line["completed"].as_u64(), line["total"].as_u64()),
            (Some(200), Some(200))
        );
        // A node cannot claim more than the layer's size.
        let line = progress.line(0, layer(999).as_bytes()).expect("a line");
        assert_eq!(line["completed"], 200);
    }

    #[test]
    fn steps_count_the_nodes_that_reached_them() {
        let mut progress = two_nodes();
        let step = br#"{"status": "pulling manifest"}"#;
        assert_eq!(
            progress.line(0, step),
            Some(json!({"status": "pulling manifest (1 of 2 nodes)"}))
        );
        assert_eq!(
            progress.line(1, step),
            Some(json!({"status": "pulling manifest (2 of 2 nodes)"}))
        );
        assert_eq!(progress.line(1, b"  "), None);
    }

    #[test]
    fn success_only_when_every_node_succeeded() {
        let mut progress = two_nodes();
        assert_eq!(
            progress.line(0, br#"{"status": "success"}"#),
            Some(json!({"status": "a: done"}))
        );
        assert!(progress.last().get("error").is_some(), "b has not ended");
        progress.line(1, br#"{"status": "success"}"#);
        assert_eq!(progress.last(), json!({"status": "success"}));
    }

    #[test]
    fn a_failed_node_is_named_with_the_nodes_that_succeeded() {
        let mut progress = two_nodes();
        progress.line(0, br#"{"status": "success"}"#);
        assert_eq!(
            progress.line(
                1,
                br#"{"error": "pull model manifest: file does not exist"}"#
            ),
            Some(json!({"status": "b: failed: pull model manifest: file does not exist"}))
        );
        // Only the first ending counts.
        assert_eq!(progress.finished(1, Ok(())), None);
        assert_eq!(
            progress.last(),
            json!({"error": "failed on b: pull model manifest: file does not exist (done on a)"})
        );
        let mut garbled = two_nodes();
        garbled.line(0, b"<html>");
        assert!(
            garbled.last()["error"]
                .as_str()
                .is_some_and(|error| error.contains("a: sent a line that is not JSON")),
            "{}",
            garbled.last()
        );
    }
}
