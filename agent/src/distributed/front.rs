//! The coordinator's distributed inference front: the models it serves through pipelines of agents'
//! stages. Each is a [`DistributedModel`], which the built-in engine holds as its
//! [`RemoteCompute`]: the engine tokenizes and streams, the pipeline computes. The gateway reads the
//! models' status from here; `sharding` adds and removes the automatic ones.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use sollol_engine::engine::Engine;
use sollol_engine::remote::{
    BoxFuture, RemoteCompute, RemoteError, RemoteGeneration, RemoteHeader,
};
use sollol_shared::api::{Node, NodeStatus};

use super::pipeline::{Candidate, Distributed, Timeouts};
use super::stage::offered_memory;
use crate::cluster::identity::ClusterToken;
use crate::cluster::{ClusterView, SharedView};

/// A model served through a pipeline of stages.
pub struct DistributedModel {
    pub pipeline: Arc<Distributed>,
    /// The agents that may hold stages now, best first.
    candidates: Box<dyn Fn() -> Vec<Candidate> + Send + Sync>,
}

impl std::fmt::Debug for DistributedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistributedModel")
            .field("model", &self.pipeline.model)
            .finish_non_exhaustive()
    }
}

impl DistributedModel {
    /// The agents that may hold its stages now, best first.
    pub fn candidates(&self) -> Vec<Candidate> {
        (self.candidates)()
    }
}

impl RemoteCompute for DistributedModel {
    fn model(&self) -> &str {
        &self.pipeline.model
    }

    fn prepare(&self) -> BoxFuture<'_, Result<RemoteHeader, RemoteError>> {
        Box::pin(async move {
            let pipeline = self.pipeline.pipeline(&self.candidates()).await?;
            let (bytes, file_bytes) = pipeline.header().await?;
            Ok(RemoteHeader {
                bytes,
                file_bytes,
                digest: pipeline.plan.digest.clone(),
            })
        })
    }

    fn generate<'a>(
        &'a self,
        generation: RemoteGeneration<'a>,
        on_token: &'a mut (dyn FnMut(u32) -> bool + Send),
    ) -> BoxFuture<'a, Result<bool, RemoteError>> {
        Box::pin(async move {
            let generated = self
                .pipeline
                .generate(|| self.candidates(), generation, on_token)
                .await?;
            Ok(generated.stopped)
        })
    }
}

/// The distributed models and the engine that serves them.
#[derive(Debug)]
pub struct Front {
    pub engine: Arc<Engine>,
    models: RwLock<BTreeMap<String, Arc<DistributedModel>>>,
    view: SharedView,
    max_stages: usize,
    token: ClusterToken,
}

impl Front {
    pub fn new(
        engine: Arc<Engine>,
        view: SharedView,
        max_stages: usize,
        token: ClusterToken,
    ) -> Self {
        Self {
            engine,
            models: RwLock::new(BTreeMap::new()),
            view,
            max_stages,
            token,
        }
    }

    /// Serves `model` through stages from now on, `why` being the first line of its plan's reasons; a
    /// no-op when it is served already.
    pub fn add(&self, model: &str, why: String) {
        let name = sollol_shared::model_name::normalize(model);
        let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
        if models.contains_key(&name) {
            return;
        }
        let view = Arc::clone(&self.view);
        let distributed = Arc::new(DistributedModel {
            pipeline: Arc::new(
                Distributed::new(
                    &name,
                    self.max_stages,
                    self.token.clone(),
                    Timeouts::default(),
                )
                .because(why),
            ),
            candidates: Box::new(move || stage_candidates(&view.load())),
        });
        self.engine
            .add_remote(Arc::clone(&distributed) as Arc<dyn RemoteCompute>);
        models.insert(name, distributed);
    }

    /// Stops serving `model` through stages (requests running on it finish).
    pub fn remove(&self, model: &str) {
        let name = sollol_shared::model_name::normalize(model);
        self.models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&name);
        self.engine.remove_remote(&name);
    }

    /// The distributed models, by name.
    pub fn models(&self) -> Vec<Arc<DistributedModel>> {
        self.models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

/// The memory `node` offers to models: what it has available, within its `engine.max_memory` (as its
/// stage counts it). Candidates are ranked by it here, and `sharding` judges by it what a node can hold.
pub fn offered_bytes(node: &Node) -> Option<u64> {
    let available = node.hardware.as_ref()?.memory.available_bytes;
    Some(offered_memory(available, node.memory_limit_bytes))
}

/// Agents that can hold a stage now: up, connected, with a stage port; most memory offered first
/// (what is available, within the node's `engine.max_memory`).
fn stage_candidates(view: &ClusterView) -> Vec<Candidate> {
    let mut nodes: Vec<_> = view
        .nodes
        .iter()
        .filter(|node| {
            node.status == NodeStatus::Up && node.connected && node.stage_address.is_some()
        })
        .collect();
    nodes.sort_by_key(|node| std::cmp::Reverse(offered_bytes(node).unwrap_or(0)));
    nodes
        .into_iter()
        .filter_map(|node| {
            Some(Candidate {
                node_id: node.id.clone(),
                name: node.name.clone(),
                address: node.stage_address.clone()?,
            })
        })
        .collect()
}
