//! The coordinator group: several coordinators of one cluster, each complete, telling each other what
//! routing needs.
//!
//! Membership and state exchange are chitchat's (Quickwit's scuttlebutt gossip: each coordinator
//! owns a key-value state that only it writes, anti-entropy spreads every change, phi-accrual failure
//! detection says who is alive). Its messages travel on this crate's links ([`link`]): the cluster
//! port, the token proved both ways, the shared configuration compared, then Noise-encrypted frames.
//! Each coordinator publishes its [`Figures`] (learned figures, in-flight counts, open breakers, running
//! loads) every [`GOSSIP_INTERVAL`]; [`Group::others`] is everyone else's, decoded, for routing.

pub mod figures;
pub mod link;
mod transport;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, spawn_chitchat};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sollol_policy::group::Figures;
use sollol_shared::api::{CoordinatorInfo, CoordinatorList, CoordinatorState};
use sollol_shared::group::ConfigPart;
use sollol_shared::protocol::CoordinatorAddress;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::identity::ClusterToken;
pub use link::Links;

/// How often a coordinator gossips (and so how stale another's in-flight counts can be, plus one
/// round trip).
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(100);
const META_NAME: &str = "meta.name";
const META_GATEWAY: &str = "meta.gateway";
const META_STARTED: &str = "meta.started";
/// Domain separation of the configuration digests from every other use of the token.
const CONFIG_CONTEXT: &[u8] = b"sollol/v1/shared-config";

/// Who this coordinator is and whom it looks for.
#[derive(Clone, Debug)]
pub struct GroupSettings {
    pub id: String,
    pub name: String,
    /// Where the others reach this coordinator's cluster port.
    pub cluster_address: SocketAddr,
    pub gateway_url: String,
    pub started_at_ms: u64,
    /// Other coordinators' cluster addresses (`coordinator.peers`).
    pub peers: Vec<String>,
    /// The configuration every coordinator must share: (section, canonical text).
    pub shared_config: Vec<(&'static str, String)>,
    pub handshake_timeout: Duration,
}

/// Another coordinator, as the gossip last showed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Peer {
    pub id: String,
    pub name: String,
    pub gateway_url: String,
    pub cluster_address: SocketAddr,
    pub started_at_ms: u64,
    pub alive: bool,
    pub figures: Figures,
}

/// Every other coordinator known, newest start of each, by id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Others {
    pub peers: Vec<Peer>,
}

impl Others {
    pub fn alive(&self) -> impl Iterator<Item = &Peer> {
        self.peers.iter().filter(|peer| peer.alive)
    }
}

/// A running group membership.
pub struct Group {
    settings: GroupSettings,
    handle: ChitchatHandle,
    links: Arc<Links>,
    others: watch::Receiver<Arc<Others>>,
    /// The live other coordinators' ids and cluster addresses, sorted; changes only when they do.
    addresses: watch::Receiver<Arc<Vec<CoordinatorAddress>>>,
    published: tokio::sync::Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("id", &self.settings.id)
            .finish_non_exhaustive()
    }
}

/// The shared configuration's sections as digests keyed with the token.
pub fn config_parts(token: &ClusterToken, sections: &[(&'static str, String)]) -> Vec<ConfigPart> {
    sections
        .iter()
        .map(|(name, text)| {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes())
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
            mac.update(CONFIG_CONTEXT);
            mac.update(name.as_bytes());
            mac.update(&[0]);
            mac.update(text.as_bytes());
            ConfigPart {
                name: (*name).to_owned(),
                digest: mac.finalize().into_bytes().into(),
            }
        })
        .collect()
}

impl Group {
    /// Starts gossiping; the others are found through `settings.peers` and [`Group::meet`].
    pub async fn start(
        settings: GroupSettings,
        token: &ClusterToken,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Arc<Self>, String> {
        let identity = link::Identity {
            id: settings.id.clone(),
            cluster_address: settings.cluster_address,
            config: config_parts(token, &settings.shared_config),
        };
        let (links, received) = Links::new(
            token.clone(),
            identity,
            settings.handshake_timeout,
            shutdown.clone(),
            tasks.clone(),
        );
        let links = Arc::new(links);
        let transport = transport::LinkTransport::new(Arc::clone(&links), received);
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(
                settings.id.clone(),
                settings.started_at_ms,
                settings.cluster_address,
            ),
            cluster_id: "sollol".to_owned(),
            gossip_interval: GOSSIP_INTERVAL,
            listen_addr: settings.cluster_address,
            seed_nodes: settings.peers.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: 8.0,
                sampling_window_size: 100,
                max_interval: Duration::from_secs(2),
                initial_interval: GOSSIP_INTERVAL * 2,
                dead_node_grace_period: Duration::from_secs(3600),
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let initial = vec![
            (META_NAME.to_owned(), settings.name.clone()),
            (META_GATEWAY.to_owned(), settings.gateway_url.clone()),
            (META_STARTED.to_owned(), settings.started_at_ms.to_string()),
        ];
        let handle = spawn_chitchat(config, initial, &transport)
            .await
            .map_err(|error| format!("the coordinator group did not start: {error}"))?;
        let (sender, others) = watch::channel(Arc::new(Others::default()));
        let (addresses_sender, addresses) = watch::channel(Arc::new(Vec::new()));
        tasks.spawn(follow_addresses(others.clone(), addresses_sender));
        let group = Arc::new(Self {
            settings,
            handle,
            links,
            others,
            addresses,
            published: tokio::sync::Mutex::default(),
        });
        tasks.spawn(Arc::clone(&group).watch(sender, shutdown));
        Ok(group)
    }

    /// The live other coordinators' ids and cluster addresses, for the agents (sorted; a new value
    /// only when they change, not with every gossip round's figures).
    pub fn addresses(&self) -> watch::Receiver<Arc<Vec<CoordinatorAddress>>> {
        self.addresses.clone()
    }

    pub fn id(&self) -> &str {
        &self.settings.id
    }

    /// The links, for the cluster port to hand coordinators' connections to.
    pub fn links(&self) -> Arc<Links> {
        Arc::clone(&self.links)
    }

    /// The other coordinators, as of the last gossip round.
    pub fn others(&self) -> watch::Receiver<Arc<Others>> {
        self.others.clone()
    }

    /// Gossips with a coordinator found some other way (mDNS).
    pub fn meet(&self, cluster_address: SocketAddr) {
        let _ = self.handle.gossip(cluster_address);
    }

    /// Whether this coordinator makes the group's background decisions: no live coordinator has a
    /// smaller id.
    pub fn leads(&self) -> bool {
        self.others
            .borrow()
            .alive()
            .all(|peer| peer.id > self.settings.id)
    }

    /// The cluster addresses of every live coordinator, this one first.
    pub fn cluster_addresses(&self) -> Vec<SocketAddr> {
        std::iter::once(self.settings.cluster_address)
            .chain(
                self.others
                    .borrow()
                    .alive()
                    .map(|peer| peer.cluster_address),
            )
            .collect()
    }

    /// Publishes this coordinator's figures: only the keys that changed are written.
    pub async fn publish(&self, figures: &Figures, known_nodes: &[String]) {
        let entries = figures::encode(figures, known_nodes);
        let mut published = self.published.lock().await;
        let changed: Vec<(&String, &String)> = entries
            .iter()
            .filter(|(key, value)| published.get(*key) != Some(*value))
            .collect();
        let removed: Vec<String> = published
            .keys()
            .filter(|key| !entries.contains_key(*key))
            .cloned()
            .collect();
        if changed.is_empty() && removed.is_empty() {
            return;
        }
        {
            let chitchat = self.handle.chitchat();
            let mut chitchat = chitchat.lock().await;
            let state = chitchat.self_node_state();
            for (key, value) in &changed {
                state.set(key.as_str(), value.as_str());
            }
            for key in &removed {
                state.delete(key);
            }
        }
        *published = entries;
    }

    /// This coordinator and every other one known or refused, for the API and the dashboard.
    pub fn coordinators(&self, in_flight: u32, learned_pairs: u32) -> CoordinatorList {
        let others = self.others.borrow().clone();
        let leads = self.leads();
        let mut coordinators = vec![CoordinatorInfo {
            id: self.settings.id.clone(),
            name: self.settings.name.clone(),
            gateway_url: self.settings.gateway_url.clone(),
            cluster_address: self.settings.cluster_address.to_string(),
            state: CoordinatorState::This,
            started_at_ms: self.settings.started_at_ms,
            leader: leads,
            in_flight,
            learned_pairs,
            detail: None,
        }];
        let leader = (!leads)
            .then(|| others.alive().map(|peer| peer.id.clone()).min())
            .flatten();
        for peer in &others.peers {
            coordinators.push(CoordinatorInfo {
                id: peer.id.clone(),
                name: peer.name.clone(),
                gateway_url: peer.gateway_url.clone(),
                cluster_address: peer.cluster_address.to_string(),
                state: if peer.alive {
                    CoordinatorState::Alive
                } else {
                    CoordinatorState::Down
                },
                started_at_ms: peer.started_at_ms,
                leader: leader.as_ref() == Some(&peer.id),
                in_flight: peer.figures.in_flight.values().sum(),
                learned_pairs: u32::try_from(peer.figures.pairs.len()).unwrap_or(u32::MAX),
                detail: None,
            });
        }
        for (address, refused) in self.links.refused() {
            let known = others
                .peers
                .iter()
                .any(|peer| peer.cluster_address == address && peer.alive);
            if known {
                continue;
            }
            coordinators.push(CoordinatorInfo {
                id: refused.coordinator_id.clone().unwrap_or_default(),
                name: String::new(),
                gateway_url: String::new(),
                cluster_address: address.to_string(),
                state: CoordinatorState::Refused,
                started_at_ms: 0,
                leader: false,
                in_flight: 0,
                learned_pairs: 0,
                detail: Some(refused.reason),
            });
        }
        CoordinatorList {
            this: self.settings.id.clone(),
            coordinators,
        }
    }

    /// Reads the others' state every gossip round and publishes it when something changed.
    async fn watch(
        self: Arc<Self>,
        sender: watch::Sender<Arc<Others>>,
        shutdown: CancellationToken,
    ) {
        let mut seen: Vec<(ChitchatId, u64, bool)> = Vec::new();
        let mut tick = tokio::time::interval(GOSSIP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let chitchat = self.handle.chitchat();
            let chitchat = chitchat.lock().await;
            let me = chitchat.self_chitchat_id().clone();
            let live: Vec<ChitchatId> = chitchat.live_nodes().cloned().collect();
            let now: Vec<(ChitchatId, u64, bool)> = chitchat
                .node_states()
                .iter()
                .filter(|(id, _)| **id != me)
                .map(|(id, state)| (id.clone(), state.max_version(), live.contains(id)))
                .collect();
            if now == seen {
                continue;
            }
            // Newest generation of each coordinator only: a restarted one leaves its old self behind
            // until the failure detector forgets it.
            let mut newest: BTreeMap<&str, &ChitchatId> = BTreeMap::new();
            for (id, _, _) in &now {
                let entry = newest.entry(id.node_id.as_str()).or_insert(id);
                if id.generation_id > entry.generation_id {
                    *entry = id;
                }
            }
            let peers = newest
                .values()
                .filter_map(|id| {
                    let state = chitchat.node_state(id)?;
                    Some(Peer {
                        id: id.node_id.clone(),
                        name: state.get(META_NAME).unwrap_or_default().to_owned(),
                        gateway_url: state.get(META_GATEWAY).unwrap_or_default().to_owned(),
                        cluster_address: id.gossip_advertise_addr,
                        started_at_ms: state
                            .get(META_STARTED)
                            .and_then(|text| text.parse().ok())
                            .unwrap_or(0),
                        alive: live.contains(id),
                        figures: figures::decode(state.key_values()),
                    })
                })
                .collect();
            drop(chitchat);
            seen = now;
            let _ = sender.send(Arc::new(Others { peers }));
        }
        let _ = self.handle.initiate_shutdown();
    }
}

/// Keeps `sender` at the live other coordinators' addresses; ends with the group.
async fn follow_addresses(
    mut others: watch::Receiver<Arc<Others>>,
    sender: watch::Sender<Arc<Vec<CoordinatorAddress>>>,
) {
    loop {
        let mut addresses: Vec<CoordinatorAddress> = others
            .borrow_and_update()
            .alive()
            .map(|peer| CoordinatorAddress {
                id: peer.id.clone(),
                address: peer.cluster_address.to_string(),
            })
            .collect();
        addresses.sort();
        sender.send_if_modified(|current| {
            let changed = **current != addresses;
            if changed {
                *current = Arc::new(addresses);
            }
            changed
        });
        if others.changed().await.is_err() {
            return;
        }
    }
}
