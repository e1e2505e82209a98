//! Which node holds which model: the matrix `sollol models` prints and the dashboard shows, read from
//! the nodes' own reports (`GET /api/sollol/v1/nodes`). Pure, so the CLI and the WASM dashboard build
//! the same matrix from the same list.

use serde::{Deserialize, Serialize};

use crate::api::{Node, NodeStatus};
use crate::model_name::normalize;

/// Models by node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMatrix {
    /// The up nodes whose Ollama answers, by name, in name order: the columns.
    pub nodes: Vec<String>,
    /// Every model any of them holds, in name order: the rows.
    pub models: Vec<ModelRow>,
}

/// One model and, per node (in the order of [`ModelMatrix::nodes`]), whether it is there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRow {
    pub model: String,
    /// The largest size any node reports for it.
    pub size_bytes: u64,
    pub on: Vec<Presence>,
}

/// A model on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Absent,
    Present,
    /// Present and loaded in memory.
    Loaded,
}

impl ModelMatrix {
    pub fn of(nodes: &[Node]) -> Self {
        let mut columns: Vec<&Node> = nodes
            .iter()
            .filter(|node| node.status == NodeStatus::Up)
            .filter(|node| node.ollama.as_ref().is_some_and(|ollama| ollama.reachable))
            .collect();
        columns.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        let mut rows: std::collections::BTreeMap<String, ModelRow> = Default::default();
        for (column, node) in columns.iter().enumerate() {
            let Some(ollama) = &node.ollama else { continue };
            for model in &ollama.models {
                let name = normalize(&model.name);
                let loaded = ollama
                    .loaded
                    .iter()
                    .any(|loaded| normalize(&loaded.name) == name);
                let row = rows.entry(name.clone()).or_insert_with(|| ModelRow {
                    model: name,
                    size_bytes: 0,
                    on: vec![Presence::Absent; columns.len()],
                });
                row.size_bytes = row.size_bytes.max(model.size_bytes);
                row.on[column] = if loaded {
                    Presence::Loaded
                } else {
                    Presence::Present
                };
            }
        }
        Self {
            nodes: columns.iter().map(|node| node.name.clone()).collect(),
            models: rows.into_values().collect(),
        }
    }
}
