//! Which node holds which model: the matrix `sollol models` prints and the dashboard shows, read from
//! the nodes' own reports (`GET /api/sollol/v1/nodes`). Pure, so the CLI and the WASM dashboard build
//! the same matrix from the same list.

use serde::{Deserialize, Serialize};

use crate::api::{Node, NodeStatus, ReplicaCount, ReplicaStatus, Transfer, TransferState};
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
    /// How many copies the coordinator keeps (`models.replicas`), if it keeps any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wanted: Option<ReplicaCount>,
}

/// A model on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Absent,
    Present,
    /// Present and loaded in memory.
    Loaded,
    /// Being copied there from another node: percent done.
    Copying(u8),
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
                    wanted: None,
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

    /// The index of `model`'s row, added in name order (with `size_bytes`, on no node) when it has none.
    fn row(&mut self, model: String, size_bytes: u64) -> usize {
        if let Some(index) = self.models.iter().position(|row| row.model == model) {
            return index;
        }
        let at = self.models.partition_point(|row| row.model < model);
        let row = ModelRow {
            model,
            size_bytes,
            on: vec![Presence::Absent; self.nodes.len()],
            wanted: None,
        };
        self.models.insert(at, row);
        at
    }

    /// The same matrix with the copy counts the coordinator keeps; a model kept but on no node yet gets a
    /// row.
    pub fn with_replicas(mut self, replicas: &[ReplicaStatus]) -> Self {
        for kept in replicas {
            let name = normalize(&kept.model);
            let index = self.row(name, 0);
            self.models[index].wanted = Some(kept.wanted);
        }
        self
    }

    /// The same matrix with the copies under way shown where the model is not there yet.
    pub fn with_transfers(mut self, transfers: &[Transfer]) -> Self {
        for transfer in transfers {
            if transfer.state != TransferState::Copying {
                continue;
            }
            let Some(column) = self.nodes.iter().position(|node| *node == transfer.target) else {
                continue;
            };
            let name = normalize(&transfer.model);
            let index = self.row(name, transfer.total_bytes);
            let cell = &mut self.models[index].on[column];
            if *cell == Presence::Absent {
                let percent = (transfer.done_bytes.saturating_mul(100))
                    .checked_div(transfer.total_bytes)
                    .unwrap_or(0)
                    .min(99);
                *cell = Presence::Copying(percent as u8);
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copying(model: &str, target: &str, done: u64, state: TransferState) -> Transfer {
        Transfer {
            started_ms: 0,
            model: model.to_owned(),
            digest: String::new(),
            source: "a".to_owned(),
            target: target.to_owned(),
            done_bytes: done,
            total_bytes: 200,
            state,
            duration_ms: 0,
            error: None,
        }
    }

    #[test]
    fn copies_under_way_show_where_the_model_is_not_yet() {
        let matrix = ModelMatrix {
            nodes: vec!["a".to_owned(), "b".to_owned()],
            models: vec![ModelRow {
                model: "m:latest".to_owned(),
                size_bytes: 200,
                on: vec![Presence::Present, Presence::Absent],
                wanted: None,
            }],
        };
        let shown = matrix.with_transfers(&[
            copying("m", "b", 50, TransferState::Copying),
            // A node that already lists it, an unknown node and a finished copy change nothing.
            copying("m", "a", 10, TransferState::Copying),
            copying("m", "z", 10, TransferState::Copying),
            copying("other:1b", "a", 200, TransferState::Done),
            // A model no node lists yet gets a row, in order.
            copying("aaa:1b", "b", 0, TransferState::Copying),
        ]);
        assert_eq!(shown.models.len(), 2);
        assert_eq!(shown.models[0].model, "aaa:1b");
        assert_eq!(shown.models[0].on, [Presence::Absent, Presence::Copying(0)]);
        assert_eq!(
            shown.models[1].on,
            [Presence::Present, Presence::Copying(25)]
        );
        let kept = |model: &str, wanted| ReplicaStatus {
            model: model.to_owned(),
            wanted,
            holders: Vec::new(),
            origin: "config".to_owned(),
            last_error: None,
        };
        let shown = shown.with_replicas(&[
            kept("m", ReplicaCount::All),
            kept("zzz:1b", ReplicaCount::Nodes(2)),
        ]);
        assert_eq!(shown.models[1].wanted, Some(ReplicaCount::All));
        assert_eq!(shown.models[2].model, "zzz:1b");
        assert_eq!(shown.models[2].on, [Presence::Absent, Presence::Absent]);
    }
}
