//! Pulls served node to node: a node that lacks a model gets it from an agent that has it, over the
//! authenticated stage link (`StageRequest::Receive`, carried out by the target's agent: see
//! `distributed::stage::transfer`), so the registry is used at most once per model. The plan for each
//! target of a pull: the registry when no agent holds the model (the first such target pulls, the
//! others wait for it and copy from it), when the target has it already (Ollama's pull is then an
//! update check) or when the target has no agent; otherwise a copy from the holders, each tried in turn.
//! Copies report Ollama's progress lines, so `Progress` folds them with the registry pulls.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sollol_shared::layers::{MAX_LAYER_FRAME_BYTES, StageReply, StageRequest};
use sollol_shared::protocol::RefusalCode;
use tokio::sync::{mpsc, watch};

use super::progress::Event;
use super::upstream::{Call, ndjson};
use crate::cluster::identity::ClusterToken;
use crate::cluster::{Backend, ClusterView, wire};
use crate::distributed::stage::dial;
use crate::observability::{Observer, TransferId};

/// A copy whose target reports nothing for this long is given up (the target reports every 16 MiB, and
/// gives up a silent source after 30 s).
const REPORT_LIMIT: Duration = Duration::from_secs(120);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where one target of a pull gets the model.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum From {
    Registry,
    /// The target's own pull (it has the model: Ollama checks the registry for an update, the built-in
    /// engine says it is there); when that fails (the node's report was a heartbeat old and the file is
    /// gone), a copy from these holders.
    Refresh(Vec<String>),
    /// Copied from these agents' stages, in order.
    Peers(Vec<String>),
    /// Copied from target `index` once its registry pull ended.
    After(usize),
}

/// Each target's source.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) nodes: Vec<Arc<Backend>>,
    /// Each target's stage address (`None`: no agent, or it is not connected).
    stages: Vec<Option<String>>,
    from: Vec<From>,
    /// Node names by stage address, for progress lines.
    names: HashMap<String, String>,
}

impl Plan {
    /// Whether any target is served node to node.
    pub(super) fn copies(&self) -> bool {
        self.from.iter().any(|from| match from {
            From::Registry => false,
            From::Refresh(sources) => !sources.is_empty(),
            From::Peers(_) | From::After(_) => true,
        })
    }
}

/// The stage address of `backend`'s agent, when it is connected.
fn stage_of(view: &ClusterView, backend: &Backend) -> Option<String> {
    view.nodes
        .iter()
        .find(|node| node.id == backend.node_id && node.connected)
        .and_then(|node| node.stage_address.clone())
}

/// Where each of `targets` gets `model` (see the module's doc).
pub(super) fn plan(view: &ClusterView, model: &str, targets: Vec<Arc<Backend>>) -> Plan {
    let stages: Vec<Option<String>> = targets
        .iter()
        .map(|target| stage_of(view, target))
        .collect();
    let mut names = HashMap::new();
    let mut holders = Vec::new();
    for backend in &view.backends {
        if let Some(stage) = stage_of(view, backend) {
            names.insert(stage.clone(), backend.name.clone());
            let targeted = targets
                .iter()
                .any(|target| target.node_id == backend.node_id);
            if backend.has_model(model) && !targeted {
                holders.push(stage);
            }
        }
    }
    let mut puller = None;
    let from = targets
        .iter()
        .zip(&stages)
        .enumerate()
        .map(|(index, (target, stage))| {
            if stage.is_none() {
                From::Registry
            } else if target.has_model(model) {
                From::Refresh(holders.clone())
            } else if !holders.is_empty() {
                From::Peers(holders.clone())
            } else if let Some(first) = puller {
                From::After(first)
            } else {
                puller = Some(index);
                From::Registry
            }
        })
        .collect();
    Plan {
        nodes: targets,
        stages,
        from,
        names,
    }
}

/// Runs `plan`: registry pulls through `call`, copies through the targets' agents; every target's
/// lines and ending as they come.
pub(super) fn run(
    plan: Plan,
    call: &Call<'_>,
    token: &ClusterToken,
    observer: &Arc<Observer>,
    model: &str,
) -> mpsc::Receiver<Event> {
    let (sender, receiver) = mpsc::channel(64);
    // Each registry pull's end, for the targets that copy from it.
    let ends: Vec<watch::Sender<bool>> =
        plan.nodes.iter().map(|_| watch::channel(false).0).collect();
    let names = Arc::new(plan.names);
    let copy_to = |index: usize| Copy {
        token: token.clone(),
        target: plan.stages[index].clone().unwrap_or_default(),
        target_name: plan.nodes[index].name.clone(),
        model: model.to_owned(),
        names: Arc::clone(&names),
        observer: Arc::clone(observer),
    };
    for (index, from) in plan.from.into_iter().enumerate() {
        let sender = sender.clone();
        match from {
            From::Registry => {
                let pulled = call.follow_one(&plan.nodes[index], index, sender.clone());
                let end = ends[index].clone();
                tokio::spawn(async move {
                    let ended = pulled.await;
                    end.send_replace(true);
                    let _ = sender.send(Event::End(index, ended)).await;
                });
            }
            From::Refresh(sources) => {
                let copy = copy_to(index);
                let pulled = call.follow_one(&plan.nodes[index], index, sender.clone());
                let end = ends[index].clone();
                tokio::spawn(async move {
                    let mut ended = pulled.await;
                    if let Err(why) = &ended
                        && !sources.is_empty()
                    {
                        let note = json!({"status": format!("its own pull failed ({why}): copying from a node that has it")});
                        let _ = sender.send(Event::Line(index, ndjson(&note))).await;
                        ended = copy
                            .run(sources, index, &sender)
                            .await
                            .map_err(Failed::message);
                    }
                    end.send_replace(true);
                    let _ = sender.send(Event::End(index, ended)).await;
                });
            }
            From::Peers(sources) => {
                let copy = copy_to(index);
                let pull = call.follow_one(&plan.nodes[index], index, sender.clone());
                tokio::spawn(async move {
                    let ended = copy.or_pull(sources, index, &sender, pull).await;
                    let _ = sender.send(Event::End(index, ended)).await;
                });
            }
            From::After(first) => {
                let copy = copy_to(index);
                let pull = call.follow_one(&plan.nodes[index], index, sender.clone());
                let mut pulled = ends[first].subscribe();
                let source = plan.stages[first].clone().unwrap_or_default();
                let puller = plan.nodes[first].name.clone();
                tokio::spawn(async move {
                    let waiting = json!({"status": format!("waiting for {puller} to pull it from the registry")});
                    let _ = sender.send(Event::Line(index, ndjson(&waiting))).await;
                    let _ = pulled.wait_for(|ended| *ended).await;
                    let ended = copy.or_pull(vec![source], index, &sender, pull).await;
                    let _ = sender.send(Event::End(index, ended)).await;
                });
            }
        }
    }
    receiver
}

/// Why a copy failed.
enum Failed {
    /// No source gave the model (or the target's agent was not reached): the registry is worth a try.
    NoSource(String),
    /// The target cannot take it (no room, a failed write) or broke off: a pull would fail the same way.
    Final(String),
}

impl Failed {
    fn message(self) -> String {
        match self {
            Self::NoSource(why) | Self::Final(why) => why,
        }
    }
}

/// One copy: the target's agent told to receive `model`.
struct Copy {
    token: ClusterToken,
    /// The target's stage address and name.
    target: String,
    target_name: String,
    model: String,
    names: Arc<HashMap<String, String>>,
    observer: Arc<Observer>,
}

impl Copy {
    /// The copy from `sources`; when it fails (no source could give the model: an agent that cannot
    /// read its Ollama's store, a source gone), the target's own registry `pull`.
    async fn or_pull(
        &self,
        sources: Vec<String>,
        index: usize,
        sender: &mpsc::Sender<Event>,
        pull: impl Future<Output = Result<(), String>>,
    ) -> Result<(), String> {
        let why = match self.run(sources, index, sender).await {
            Ok(()) => return Ok(()),
            Err(Failed::Final(why)) => return Err(why),
            Err(Failed::NoSource(why)) => why,
        };
        tracing::info!(target = %self.target, model = %self.model, %why, "copying from a peer failed: pulling from the registry");
        let fallback = json!({"status": format!("no copy from another node ({why}): pulling from the registry")});
        let _ = sender.send(Event::Line(index, ndjson(&fallback))).await;
        pull.await
    }

    /// Asks the target to copy from `sources`; its reports as Ollama's progress lines, ending with
    /// `success`, or why it failed. The observer follows the copy (`transfer` events, metrics).
    async fn run(
        &self,
        sources: Vec<String>,
        index: usize,
        sender: &mpsc::Sender<Event>,
    ) -> Result<(), Failed> {
        let id = self
            .observer
            .transfer_started(&self.model, &self.target_name);
        let mut fetched = 0;
        let outcome = self.copy(sources, index, sender, &id, &mut fetched).await;
        let ended = match &outcome {
            Ok(()) => Ok(()),
            Err(Failed::NoSource(why) | Failed::Final(why)) => Err(why.clone()),
        };
        self.observer.transfer_ended(id, fetched, ended);
        outcome
    }

    /// [`Copy::run`]'s work, reported to the observer through `id`.
    async fn copy(
        &self,
        sources: Vec<String>,
        index: usize,
        sender: &mpsc::Sender<Event>,
        id: &TransferId,
        fetched: &mut u64,
    ) -> Result<(), Failed> {
        let (mut stream, _) = dial(&self.target, &self.token, HANDSHAKE_TIMEOUT)
            .await
            .map_err(|error| Failed::NoSource(error.to_string()))?;
        let request = StageRequest::Receive {
            model: self.model.clone(),
            sources,
        };
        wire::write_message(&mut stream, &request)
            .await
            .map_err(|error| Failed::NoSource(error.to_string()))?;
        loop {
            let reply = tokio::time::timeout(
                REPORT_LIMIT,
                wire::read_message_within::<StageReply, _>(&mut stream, MAX_LAYER_FRAME_BYTES),
            )
            .await
            .map_err(|_| {
                Failed::Final(format!("reported nothing for {} s", REPORT_LIMIT.as_secs()))
            })?
            .map_err(|error| Failed::Final(format!("the link to its agent broke off: {error}")))?;
            let line = match reply {
                StageReply::Receiving {
                    source,
                    digest,
                    done_bytes,
                    total_bytes,
                } => {
                    let source = self.name(&source);
                    self.observer
                        .transfer_progress(id, source, &digest, done_bytes, total_bytes);
                    json!({
                        "status": format!("copying {} from {source}", short(&digest)),
                        "digest": digest,
                        "total": total_bytes,
                        "completed": done_bytes,
                    })
                }
                StageReply::SourceFailed { source, message } => json!({
                    "status": format!("copying from {} failed ({message}): trying the next node that has it", self.name(&source)),
                }),
                StageReply::Received {
                    fetched_bytes: 0, ..
                } => json!({"status": "success"}),
                StageReply::Received {
                    digest,
                    bytes,
                    source,
                    fetched_bytes,
                    ..
                } => {
                    *fetched = fetched_bytes;
                    self.observer
                        .transfer_progress(id, self.name(&source), &digest, bytes, bytes);
                    let done = json!({
                        "status": format!("copying {} from {}", short(&digest), self.name(&source)),
                        "digest": digest,
                        "total": bytes,
                        "completed": bytes,
                    });
                    let _ = sender.send(Event::Line(index, ndjson(&done))).await;
                    json!({"status": "success"})
                }
                // No holder could give it: the registry may. Anything else (no room, a failed write)
                // would fail a pull the same way.
                StageReply::Refused(refusal) if refusal.code == RefusalCode::ModelMissing => {
                    return Err(Failed::NoSource(refusal.message));
                }
                StageReply::Refused(refusal) => return Err(Failed::Final(refusal.message)),
                other => return Err(Failed::Final(format!("unexpected answer {other:?}"))),
            };
            let finished = line["status"] == "success";
            if sender
                .send(Event::Line(index, ndjson(&line)))
                .await
                .is_err()
                || finished
            {
                return Ok(());
            }
        }
    }

    fn name<'a>(&'a self, stage: &'a str) -> &'a str {
        self.names.get(stage).map_or(stage, String::as_str)
    }
}

/// The first 12 hex digits of a digest, as Ollama's progress shows a layer.
fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}
