//! The coordinator's live cluster view: one task owns the node table and publishes an immutable snapshot on every change.
//!
//! Connection tasks send [`ClusterEvent`]s; readers (HTTP handlers, the
//! router) load the current [`ClusterView`] from an `ArcSwap` and never take a
//! lock. Health is judged by `sollol_policy::health::status` on every tick. This module
//! writes history records but never waits for them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use sollol_shared::api::{Node, NodeEvent, NodeEventKind, NodeStatus};
use sollol_shared::hardware::NodeReport;
use sollol_shared::protocol::Hello;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::history::{HistorySender, Record, Remembered};
use crate::telemetry::unix_ms;
use sollol_policy::health::{self, Liveness};

/// Events kept in memory per node for the API (the history keeps more).
pub const EVENTS_PER_NODE: usize = 50;

/// A node's row is written to the history at most this often while it only reports.
const PERSIST_REPORTS_EVERY: Duration = Duration::from_secs(10);

const ADDRESSES_KEPT: usize = 4;

/// Identifies one TCP connection, so a stale connection's events are ignored after the node reconnects.
pub type ConnectionId = u64;

/// What connection tasks tell the cluster task.
#[derive(Debug)]
pub enum ClusterEvent {
    /// A plain Ollama server from the configuration was probed (no agent runs there).
    Probed {
        node_id: String,
        url: String,
        /// Shown instead of the URL's `HOST:PORT` when set.
        name: Option<String>,
        ollama: Box<sollol_shared::hardware::OllamaState>,
        interval: Duration,
    },
    Joined {
        hello: Hello,
        peer: SocketAddr,
        connection: ConnectionId,
        /// Cancelled by the cluster task to close this connection (when the node connects again elsewhere).
        closer: CancellationToken,
    },
    Report {
        node_id: String,
        connection: ConnectionId,
        report: Box<NodeReport>,
    },
    Goodbye {
        node_id: String,
        connection: ConnectionId,
        reason: String,
    },
    Disconnected {
        node_id: String,
        connection: ConnectionId,
        reason: String,
    },
}

/// An immutable snapshot of every known node.
#[derive(Debug, Default)]
pub struct ClusterView {
    /// Sorted by name, then id.
    pub nodes: Vec<Arc<Node>>,
    /// Newest first, per node id (shared between snapshots until an event changes it).
    pub events: Arc<HashMap<String, Arc<Vec<NodeEvent>>>>,
    /// Ollama endpoints the gateway may send requests to: up nodes whose Ollama answers.
    pub backends: Vec<Arc<Backend>>,
}

/// An Ollama endpoint as the gateway sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub node_id: String,
    pub name: String,
    /// `http://HOST:PORT`, reachable from the coordinator.
    pub base_url: String,
    /// Installed models, `name:tag`.
    pub models: Vec<String>,
    /// Each installed model's content digest as the node reports it (`/api/tags`), in the order of
    /// `models`; empty when the node reports none.
    pub digests: Vec<String>,
    /// Models loaded in memory, as of `reported_ms`.
    pub loaded: Vec<String>,
    /// When the node's last report arrived (Unix milliseconds, coordinator clock).
    pub reported_ms: u64,
}

impl Backend {
    fn of(node: &Node) -> Option<Self> {
        let ollama = node.ollama.as_ref().filter(|ollama| ollama.reachable)?;
        if node.status != NodeStatus::Up {
            return None;
        }
        Some(Self {
            node_id: node.id.clone(),
            name: node.name.clone(),
            base_url: reachable_url(&ollama.url, node.addresses.first().map(String::as_str)),
            models: ollama
                .models
                .iter()
                .map(|model| normalize_model(&model.name))
                .collect(),
            digests: ollama
                .models
                .iter()
                .map(|model| model.digest.trim().to_owned())
                .collect(),
            loaded: ollama
                .loaded
                .iter()
                .map(|model| normalize_model(&model.name))
                .collect(),
            reported_ms: node.last_seen_ms,
        })
    }

    pub fn has_model(&self, model: &str) -> bool {
        self.models.iter().any(|name| name == model)
    }

    pub fn has_loaded(&self, model: &str) -> bool {
        self.loaded.iter().any(|name| name == model)
    }

    /// The digest the node reports for an installed model; `None` when it lacks the model or reports no digest.
    pub fn digest_of(&self, model: &str) -> Option<&str> {
        let index = self.models.iter().position(|name| name == model)?;
        self.digests
            .get(index)
            .map(String::as_str)
            .filter(|digest| !digest.is_empty())
    }
}

impl ClusterView {
    /// The model's content digest when every node that serves it reports the same one; `None` when no
    /// node has it, one reports none, or two disagree (then which copy answers is a matter of routing).
    pub fn model_digest(&self, model: &str) -> Option<&str> {
        let mut agreed = None;
        for backend in self
            .backends
            .iter()
            .filter(|backend| backend.has_model(model))
        {
            let digest = backend.digest_of(model)?;
            if agreed.is_some_and(|agreed| agreed != digest) {
                return None;
            }
            agreed = Some(digest);
        }
        agreed
    }
}

/// `llama3` means `llama3:latest`, as in Ollama.
pub fn normalize_model(name: &str) -> String {
    if name.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// Writes a node's row to the history unless it was written less than `PERSIST_REPORTS_EVERY` ago.
fn persist_throttled(history: &HistorySender, entry: &mut Entry, now: Instant) {
    let due = entry
        .last_persisted
        .is_none_or(|at| now.duration_since(at) >= PERSIST_REPORTS_EVERY);
    if due {
        entry.last_persisted = Some(now);
        history.record(Record::Node(Box::new((*entry.node).clone())));
    }
}

/// An agent reports its Ollama as it reaches it, often `http://127.0.0.1:11434`; from the coordinator the
/// same server is at the agent's own address. Loopback hosts are replaced by the address the agent connected from.
pub fn reachable_url(ollama_url: &str, agent_address: Option<&str>) -> String {
    let Some(rest) = ollama_url.strip_prefix("http://") else {
        return ollama_url.to_owned();
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => (host, Some(port)),
        _ => (authority, None),
    };
    let host_is_local = matches!(host, "localhost" | "0.0.0.0" | "[::1]" | "[::]")
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    let agent_ip = agent_address
        .and_then(|address| address.parse::<std::net::SocketAddr>().ok())
        .map(|address| address.ip())
        .filter(|ip| !ip.is_loopback());
    match (host_is_local, agent_ip) {
        (true, Some(ip)) => {
            let host = match ip {
                std::net::IpAddr::V4(ip) => ip.to_string(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            };
            match port {
                Some(port) => format!("http://{host}:{port}"),
                None => format!("http://{host}"),
            }
        }
        _ => format!("http://{authority}"),
    }
}

impl ClusterView {
    pub fn node(&self, id: &str) -> Option<&Arc<Node>> {
        self.nodes.iter().find(|node| node.id == id)
    }

    pub fn count(&self, status: NodeStatus) -> u32 {
        let count = self
            .nodes
            .iter()
            .filter(|node| node.status == status)
            .count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }
}

/// Shared read access to the current snapshot.
pub type SharedView = Arc<ArcSwap<ClusterView>>;

#[derive(Debug)]
struct Entry {
    node: Arc<Node>,
    last_report: Option<Instant>,
    connection: Option<(ConnectionId, CancellationToken)>,
    events: VecDeque<NodeEvent>,
    last_persisted: Option<Instant>,
    /// A plain Ollama URL from the configuration, probed by the coordinator; it has no agent connection.
    is_static: bool,
    /// Why the agent's last connection ended, for the event that reports it.
    lost_because: Option<String>,
    /// The node as routing sees it, built once per change of `node` (`None`: not built since).
    backend: Option<Option<Arc<Backend>>>,
}

impl Entry {
    fn new(node: Node, events: VecDeque<NodeEvent>, is_static: bool) -> Self {
        Self {
            node: Arc::new(node),
            last_report: None,
            connection: None,
            events,
            last_persisted: None,
            is_static,
            lost_because: None,
            backend: None,
        }
    }

    /// The node to change; its backend is built again at the next publish.
    fn node_mut(&mut self) -> &mut Node {
        self.backend = None;
        Arc::make_mut(&mut self.node)
    }

    fn backend(&mut self) -> Option<Arc<Backend>> {
        self.backend
            .get_or_insert_with(|| Backend::of(&self.node).map(Arc::new))
            .clone()
    }
}

/// Events handled before the snapshot is published again: a burst of reports (a thousand probed nodes)
/// costs one publish per batch, not one per report.
const EVENTS_PER_PUBLISH: usize = 1024;

/// Snapshots are published at most this often while reports stream in (a thousand nodes probed every
/// two seconds are 500 reports a second); routing never needs a report sooner than that.
const PUBLISH_GAP: Duration = Duration::from_millis(20);

/// Owns the node table; runs until `shutdown` is cancelled and every event sender is gone or the shutdown arrives.
#[derive(Debug)]
pub struct ClusterTask {
    entries: HashMap<String, Entry>,
    view: SharedView,
    history: HistorySender,
    down_after_missed: u32,
    /// Every node's events as last published, rebuilt only when an event is added.
    events: Arc<HashMap<String, Arc<Vec<NodeEvent>>>>,
    events_changed: bool,
    /// Something changed since the last publish.
    changed: bool,
    published_at: Instant,
    /// Node ids sorted by name, then id; `None` after a node was added or renamed.
    order: Option<Vec<String>>,
    /// How often health is judged again (from the nodes' heartbeats), as of the last publish.
    tick: Duration,
}

impl ClusterTask {
    pub fn new(remembered: Remembered, history: HistorySender, down_after_missed: u32) -> Self {
        let entries = remembered
            .nodes
            .into_iter()
            .map(|(node, events)| {
                let id = node.id.clone();
                // Static Ollama nodes are the ones without a protocol version.
                let is_static = node.protocol_version == 0;
                (
                    id,
                    Entry::new(node, events.into_iter().collect(), is_static),
                )
            })
            .collect();
        let mut task = Self {
            entries,
            view: Arc::new(ArcSwap::from_pointee(ClusterView::default())),
            history,
            down_after_missed,
            events: Arc::default(),
            events_changed: true,
            changed: true,
            published_at: Instant::now(),
            order: None,
            tick: Duration::from_millis(500),
        };
        task.publish();
        task
    }

    pub fn view(&self) -> SharedView {
        Arc::clone(&self.view)
    }

    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<ClusterEvent>,
        shutdown: CancellationToken,
    ) {
        loop {
            let publish_due = self.published_at + PUBLISH_GAP;
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => {
                        self.handle(event);
                        // Whatever else is already waiting goes into the same snapshot.
                        for _ in 1..EVENTS_PER_PUBLISH {
                            let Ok(event) = events.try_recv() else { break };
                            self.handle(event);
                        }
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(publish_due.into()), if self.changed => {}
                () = tokio::time::sleep(self.tick) => self.evaluate(),
                () = shutdown.cancelled() => break,
            }
            if self.changed && self.published_at.elapsed() >= PUBLISH_GAP {
                self.evaluate();
                self.publish();
            }
        }
        // Persist the final state so a restarted coordinator starts from it.
        for entry in self.entries.values() {
            self.history
                .record(Record::Node(Box::new((*entry.node).clone())));
        }
    }

    fn handle(&mut self, event: ClusterEvent) {
        let now = Instant::now();
        let now_ms = unix_ms(SystemTime::now());
        match event {
            ClusterEvent::Joined {
                hello,
                peer,
                connection,
                closer,
            } => self.joined(hello, peer, connection, closer, now, now_ms),
            ClusterEvent::Report {
                node_id,
                connection,
                report,
            } => {
                let history = self.history.clone();
                let Some(entry) = self.current(&node_id, connection) else {
                    return;
                };
                entry.last_report = Some(now);
                let node = entry.node_mut();
                node.last_seen_ms = now_ms;
                node.hardware = Some(report.hardware);
                node.ollama = report.ollama;
                node.memory_limit_bytes = report.memory_limit_bytes;
                // A stage bound to loopback or any address is reached where the agent connects from.
                node.stage_address = report.stage_address.map(|address| {
                    reachable_url(
                        &format!("http://{address}"),
                        node.addresses.first().map(String::as_str),
                    )
                    .trim_start_matches("http://")
                    .to_owned()
                });
                persist_throttled(&history, entry, now);
                // A report changes hardware figures even when no status changes.
                self.changed = true;
            }
            ClusterEvent::Goodbye {
                node_id,
                connection,
                reason,
            } => {
                let Some(entry) = self.current(&node_id, connection) else {
                    return;
                };
                entry.connection = None;
                let node = entry.node_mut();
                node.connected = false;
                node.last_seen_ms = now_ms;
                tracing::info!(node = %node.name, id = %node_id, %reason, "node left");
                self.transition(
                    &node_id,
                    NodeStatus::Left,
                    format!("said goodbye: {reason}"),
                    now_ms,
                );
            }
            ClusterEvent::Probed {
                node_id,
                url,
                name,
                ollama,
                interval,
            } => self.probed(node_id, url, name, *ollama, interval, now, now_ms),
            ClusterEvent::Disconnected {
                node_id,
                connection,
                reason,
            } => {
                let Some(entry) = self.current(&node_id, connection) else {
                    return;
                };
                entry.connection = None;
                entry.node_mut().connected = false;
                tracing::info!(id = %node_id, %reason, "node connection lost");
                entry.lost_because = Some(reason);
                self.changed = true;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn probed(
        &mut self,
        node_id: String,
        url: String,
        name: Option<String>,
        ollama: sollol_shared::hardware::OllamaState,
        interval: Duration,
        now: Instant,
        now_ms: u64,
    ) {
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        if !self.entries.contains_key(&node_id) {
            let node = Node {
                id: node_id.clone(),
                name: name.unwrap_or_else(|| url.trim_start_matches("http://").to_owned()),
                status: NodeStatus::Down,
                addresses: vec![url.clone()],
                build_version: String::new(),
                protocol_version: 0,
                first_seen_ms: now_ms,
                last_seen_ms: 0,
                heartbeat_interval_ms: interval_ms,
                connected: false,
                hardware: None,
                ollama: None,
                stage_address: None,
                memory_limit_bytes: None,
            };
            self.entries
                .insert(node_id.clone(), Entry::new(node, VecDeque::new(), true));
            self.order = None;
            tracing::info!(%url, "static Ollama node from the configuration");
            self.push_event(
                &node_id,
                NodeEventKind::Joined,
                format!("static Ollama node {url} (no agent)"),
                now_ms,
            );
        }
        let Some(entry) = self.entries.get_mut(&node_id) else {
            return;
        };
        if ollama.reachable {
            entry.last_report = Some(now);
        }
        let node = entry.node_mut();
        node.heartbeat_interval_ms = interval_ms;
        node.connected = ollama.reachable;
        if ollama.reachable {
            node.last_seen_ms = now_ms;
            if let Some(version) = &ollama.version {
                node.build_version = format!("ollama {version}");
            }
        }
        node.ollama = Some(ollama);
        persist_throttled(&self.history, entry, now);
        self.changed = true;
    }

    fn joined(
        &mut self,
        hello: Hello,
        peer: SocketAddr,
        connection: ConnectionId,
        closer: CancellationToken,
        now: Instant,
        now_ms: u64,
    ) {
        let peer_text = peer.to_string();
        let existing = self.entries.get_mut(&hello.node_id);
        let (kind, detail) = match existing {
            Some(entry) => {
                if let Some((_, old_closer)) = entry.connection.take() {
                    tracing::warn!(id = %hello.node_id, %peer, "node connected again; closing its previous connection");
                    old_closer.cancel();
                }
                entry.connection = Some((connection, closer));
                entry.last_report = Some(now);
                entry.last_persisted = Some(now);
                let node = entry.node_mut();
                if node.name != hello.node_name {
                    self.order = None;
                }
                node.name = hello.node_name.clone();
                node.build_version = hello.build_version.clone();
                node.protocol_version = hello.protocol_version;
                node.heartbeat_interval_ms = hello.heartbeat_interval_ms;
                node.last_seen_ms = now_ms;
                node.connected = true;
                node.addresses.retain(|address| address != &peer_text);
                node.addresses.insert(0, peer_text.clone());
                node.addresses.truncate(ADDRESSES_KEPT);
                (NodeEventKind::Up, format!("reconnected from {peer_text}"))
            }
            None => {
                let node = Node {
                    id: hello.node_id.clone(),
                    name: hello.node_name.clone(),
                    status: NodeStatus::Up,
                    addresses: vec![peer_text.clone()],
                    build_version: hello.build_version.clone(),
                    protocol_version: hello.protocol_version,
                    first_seen_ms: now_ms,
                    last_seen_ms: now_ms,
                    heartbeat_interval_ms: hello.heartbeat_interval_ms,
                    connected: true,
                    hardware: None,
                    ollama: None,
                    stage_address: None,
                    memory_limit_bytes: None,
                };
                let mut entry = Entry::new(node, VecDeque::new(), false);
                entry.last_report = Some(now);
                entry.connection = Some((connection, closer));
                entry.last_persisted = Some(now);
                self.entries.insert(hello.node_id.clone(), entry);
                self.order = None;
                (
                    NodeEventKind::Joined,
                    format!("joined from {peer_text} (sollol {})", hello.build_version),
                )
            }
        };
        tracing::info!(node = %hello.node_name, id = %hello.node_id, %peer, "node joined");
        if let Some(entry) = self.entries.get_mut(&hello.node_id) {
            entry.node_mut().status = NodeStatus::Up;
        }
        self.push_event(&hello.node_id, kind, detail, now_ms);
        self.persist(&hello.node_id);
        self.changed = true;
    }

    /// Re-judges every node's health and records what changed (a change is published).
    fn evaluate(&mut self) {
        let now = Instant::now();
        let now_ms = unix_ms(SystemTime::now());
        let mut changes = Vec::new();
        for (id, entry) in &self.entries {
            let liveness = Liveness {
                since_last_report: entry
                    .last_report
                    .map_or(Duration::MAX, |at| now.duration_since(at)),
                heartbeat_interval: Duration::from_millis(entry.node.heartbeat_interval_ms),
                connected: entry.connection.is_some() || (entry.is_static && entry.node.connected),
                left: entry.node.status == NodeStatus::Left,
            };
            let status = health::status(liveness, self.down_after_missed);
            if status != entry.node.status {
                let detail = match status {
                    NodeStatus::Up => "reporting again".to_owned(),
                    NodeStatus::Suspect if !liveness.connected => match &entry.lost_because {
                        Some(reason) => format!("connection lost: {reason}"),
                        None => "connection lost".to_owned(),
                    },
                    _ => format!(
                        "no report for {} ms (heartbeat every {} ms)",
                        liveness.since_last_report.as_millis(),
                        entry.node.heartbeat_interval_ms
                    ),
                };
                changes.push((id.clone(), status, detail));
            }
        }
        for (id, status, detail) in changes {
            match status {
                NodeStatus::Down => tracing::warn!(%id, %detail, "node down"),
                _ => tracing::info!(%id, status = status.as_str(), %detail, "node status changed"),
            }
            self.transition(&id, status, detail, now_ms);
        }
    }

    fn transition(&mut self, id: &str, status: NodeStatus, detail: String, now_ms: u64) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        entry.node_mut().status = status;
        let kind = match status {
            NodeStatus::Up => NodeEventKind::Up,
            NodeStatus::Suspect => NodeEventKind::Suspect,
            NodeStatus::Down => NodeEventKind::Down,
            NodeStatus::Left => NodeEventKind::Left,
        };
        self.push_event(id, kind, detail, now_ms);
        self.persist(id);
    }

    fn push_event(&mut self, id: &str, kind: NodeEventKind, detail: String, now_ms: u64) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        let event = NodeEvent {
            at_ms: now_ms,
            kind,
            detail,
        };
        entry.events.push_front(event.clone());
        entry.events.truncate(EVENTS_PER_NODE);
        Arc::make_mut(&mut self.events).insert(
            id.to_owned(),
            Arc::new(entry.events.iter().cloned().collect()),
        );
        self.events_changed = true;
        self.changed = true;
        self.history.record(Record::Event {
            node_id: id.to_owned(),
            event,
        });
    }

    fn persist(&self, id: &str) {
        if let Some(entry) = self.entries.get(id) {
            self.history
                .record(Record::Node(Box::new((*entry.node).clone())));
        }
    }

    /// The entry for `id` if `connection` is its current connection.
    fn current(&mut self, id: &str, connection: ConnectionId) -> Option<&mut Entry> {
        self.entries.get_mut(id).filter(
            |entry| matches!(&entry.connection, Some((current, _)) if *current == connection),
        )
    }

    /// Stores a new snapshot when something changed since the last one. Only changed nodes' backends
    /// are built again; the events map is shared until an event is added.
    fn publish(&mut self) {
        if !std::mem::take(&mut self.changed) {
            return;
        }
        let entries = &mut self.entries;
        let order = self.order.get_or_insert_with(|| {
            let mut order: Vec<(&str, &str)> = entries
                .values()
                .map(|entry| (entry.node.name.as_str(), entry.node.id.as_str()))
                .collect();
            order.sort_unstable();
            order.into_iter().map(|(_, id)| id.to_owned()).collect()
        });
        let mut nodes = Vec::with_capacity(order.len());
        let mut backends = Vec::new();
        for id in order.iter() {
            let Some(entry) = entries.get_mut(id) else {
                continue;
            };
            nodes.push(Arc::clone(&entry.node));
            backends.extend(entry.backend());
        }
        if std::mem::take(&mut self.events_changed) {
            // Nodes remembered with events but none added this run are filled in once.
            let events = Arc::make_mut(&mut self.events);
            for (id, entry) in &self.entries {
                if !events.contains_key(id) && !entry.events.is_empty() {
                    events.insert(id.clone(), Arc::new(entry.events.iter().cloned().collect()));
                }
            }
        }
        self.tick = self.tick_interval();
        self.published_at = Instant::now();
        self.view.store(Arc::new(ClusterView {
            nodes,
            events: Arc::clone(&self.events),
            backends,
        }));
    }

    /// A quarter of the shortest heartbeat interval, between 25 ms and 500 ms.
    fn tick_interval(&self) -> Duration {
        let shortest = self
            .entries
            .values()
            .filter(|entry| entry.node.status != NodeStatus::Left)
            .map(|entry| Duration::from_millis(entry.node.heartbeat_interval_ms))
            .min()
            .unwrap_or(Duration::from_secs(2));
        (shortest / 4).clamp(Duration::from_millis(25), Duration::from_millis(500))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model's digest counts only when every node that has the model reports the same one.
    #[test]
    fn a_models_digest_is_what_every_node_agrees_on() {
        fn check(reported: &[&[(&str, &str)]], expected: Option<&str>) {
            let view = ClusterView {
                backends: reported
                    .iter()
                    .enumerate()
                    .map(|(index, models)| {
                        Arc::new(Backend {
                            node_id: format!("n{index}"),
                            name: format!("n{index}"),
                            base_url: "http://127.0.0.1:1".to_owned(),
                            models: models.iter().map(|(name, _)| (*name).to_owned()).collect(),
                            digests: models
                                .iter()
                                .map(|(_, digest)| (*digest).to_owned())
                                .collect(),
                            loaded: Vec::new(),
                            reported_ms: 0,
                        })
                    })
                    .collect(),
                ..ClusterView::default()
            };
            assert_eq!(view.model_digest("m:1"), expected, "{reported:?}");
        }
        check(&[&[("m:1", "aaa")], &[("m:1", "aaa")]], Some("aaa"));
        check(&[&[("m:1", "aaa")], &[("other:1", "bbb")]], Some("aaa"));
        check(&[&[("m:1", "aaa")], &[("m:1", "bbb")]], None);
        check(&[&[("m:1", "aaa")], &[("m:1", "")]], None);
        check(&[&[("other:1", "bbb")]], None);
        check(&[], None);
    }

    #[test]
    fn ollama_urls_are_made_reachable_from_the_coordinator() {
        fn check(url: &str, agent: Option<&str>, expected: &str) {
            assert_eq!(reachable_url(url, agent), expected, "{url} via {agent:?}");
        }
        check(
            "http://127.0.0.1:11434",
            Some("192.0.2.7:50000"),
            "http://192.0.2.7:11434",
        );
        check(
            "http://localhost:11434",
            Some("192.0.2.7:50000"),
            "http://192.0.2.7:11434",
        );
        check(
            "http://127.0.0.1:11434",
            Some("127.0.0.1:50000"),
            "http://127.0.0.1:11434",
        );
        check("http://127.0.0.1:11434", None, "http://127.0.0.1:11434");
        check(
            "http://10.9.8.7:11434",
            Some("192.0.2.7:50000"),
            "http://10.9.8.7:11434",
        );
        check(
            "http://[::1]:11434",
            Some("[2001:db8::1]:5"),
            "http://[2001:db8::1]:11434",
        );
        check(
            "http://gpu-box:11434",
            Some("192.0.2.7:50000"),
            "http://gpu-box:11434",
        );
    }

    #[test]
    fn model_names_default_to_latest() {
        assert_eq!(normalize_model("llama3"), "llama3:latest");
        assert_eq!(normalize_model("smollm2:135m"), "smollm2:135m");
    }
}
