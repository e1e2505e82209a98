//! The page's state: the signals in [`Store`], the route, and what fills them — the JSON API's
//! snapshots and statistics, a node's detail, and the live Server-Sent Events stream.

use std::collections::{BTreeMap, VecDeque};

use leptos::prelude::*;
use serde::de::DeserializeOwned;
use sollol_shared::api::{
    API_PREFIX, ClusterSummary, CoordinatorList, DistributedList, DistributedModel, LiveEvent,
    Node, NodeDetail, NodeList, ReplicaList, ReplicaStatus, RequestEntry, RequestList,
    SessionStatus, SignIn, Stats, StatsWindow, Transfer, TransferList, TransferState,
};
use wasm_bindgen::JsCast;
use wasm_bindgen::closure::Closure;
use wasm_bindgen_futures::JsFuture;

/// Finished requests kept in the live feed.
const FEED_LENGTH: usize = 40;
/// How often statistics and the summary are re-read.
pub(crate) const STATS_EVERY_MS: u64 = 5000;
/// How often a node's page re-reads its detail.
pub(crate) const DETAIL_EVERY_MS: u64 = 3000;
/// Delay before a closed event stream is opened again.
const RECONNECT_MS: i32 = 3000;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Connection {
    Connecting,
    Live,
    Lost(String),
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Route {
    Overview,
    Models,
    Node(String),
}

impl Route {
    pub(crate) fn from_hash(hash: &str) -> Self {
        let path = hash.trim_start_matches('#');
        if path == "/models" {
            return Self::Models;
        }
        match path.strip_prefix("/node/") {
            Some(id) if !id.is_empty() => Self::Node(id.to_owned()),
            _ => Self::Overview,
        }
    }
}

/// Whether this browser may read the API: keys off, signed in, or not yet.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Access {
    Checking,
    /// Keys are off, or this browser holds a session (as the key named here).
    Granted(Option<String>),
    /// The gateway needs a key and this browser has no session.
    SignInNeeded,
}

/// Everything the page shows; every field is a signal, so the store is `Copy`.
#[derive(Clone, Copy)]
pub(crate) struct Store {
    pub(crate) summary: RwSignal<Option<ClusterSummary>>,
    /// `None` until the first node list arrives.
    pub(crate) nodes: RwSignal<Option<Vec<Node>>>,
    pub(crate) loads: RwSignal<BTreeMap<String, u32>>,
    pub(crate) feed: RwSignal<VecDeque<RequestEntry>>,
    /// Requests finished since this page opened, from the live stream.
    pub(crate) finished_live: RwSignal<u64>,
    pub(crate) stats: RwSignal<Option<Stats>>,
    /// Models served split across agents, with their pipelines (empty when none).
    pub(crate) distributed: RwSignal<Vec<DistributedModel>>,
    pub(crate) window: RwSignal<StatsWindow>,
    pub(crate) connection: RwSignal<Connection>,
    /// The last failed API read, cleared by the next good one.
    pub(crate) error: RwSignal<Option<String>>,
    pub(crate) route: RwSignal<Route>,
    pub(crate) detail: RwSignal<Option<NodeDetail>>,
    /// Browser time, advanced every second so "last seen" ages.
    pub(crate) now_ms: RwSignal<f64>,
    pub(crate) access: RwSignal<Access>,
    /// Models being copied between nodes (finished ones leave), from the snapshot and `transfer` events.
    pub(crate) transfers: RwSignal<Vec<Transfer>>,
    /// The copy counts the coordinator keeps (`models.replicas`), re-read with the statistics.
    pub(crate) replicas: RwSignal<Vec<ReplicaStatus>>,
    /// The coordinators of the cluster, re-read with the statistics.
    pub(crate) coordinators: RwSignal<Option<CoordinatorList>>,
}

impl Store {
    pub(crate) fn new() -> Self {
        Self {
            summary: RwSignal::new(None),
            nodes: RwSignal::new(None),
            loads: RwSignal::new(BTreeMap::new()),
            feed: RwSignal::new(VecDeque::new()),
            finished_live: RwSignal::new(0),
            stats: RwSignal::new(None),
            distributed: RwSignal::new(Vec::new()),
            window: RwSignal::new(StatsWindow::FiveMinutes),
            connection: RwSignal::new(Connection::Connecting),
            error: RwSignal::new(None),
            route: RwSignal::new(Route::from_hash(&location_hash())),
            detail: RwSignal::new(None),
            now_ms: RwSignal::new(js_sys::Date::now()),
            access: RwSignal::new(Access::Checking),
            transfers: RwSignal::new(Vec::new()),
            replicas: RwSignal::new(Vec::new()),
            coordinators: RwSignal::new(None),
        }
    }

    fn apply(self, event: LiveEvent) {
        match event {
            LiveEvent::Node { node, load } => {
                self.loads.update(|loads| {
                    loads.insert(node.id.clone(), load.in_flight);
                });
                self.nodes.update(|nodes| {
                    let nodes = nodes.get_or_insert_with(Vec::new);
                    match nodes.iter_mut().find(|known| known.id == node.id) {
                        Some(known) => *known = node,
                        None => {
                            nodes.push(node);
                            nodes.sort_by(|a, b| a.name.cmp(&b.name));
                        }
                    }
                });
            }
            LiveEvent::Finished { request } => {
                self.finished_live.update(|count| *count += 1);
                self.feed.update(|feed| {
                    feed.push_front(request);
                    feed.truncate(FEED_LENGTH);
                });
            }
            LiveEvent::Transfer { transfer } => self.transfers.update(|transfers| {
                transfers.retain(|known| {
                    (known.model.as_str(), known.target.as_str())
                        != (transfer.model.as_str(), transfer.target.as_str())
                });
                if transfer.state == TransferState::Copying {
                    transfers.push(transfer);
                }
            }),
            LiveEvent::Routed { .. } => {}
            LiveEvent::Lagged { .. } => load_snapshot(self),
        }
    }
}

pub(crate) fn location_hash() -> String {
    web_sys::window()
        .and_then(|window| window.location().hash().ok())
        .unwrap_or_default()
}

/// Asks whether the gateway needs a key and whether this browser holds a session, then calls `start`
/// once the API may be read.
pub(crate) fn check_access(store: Store, start: impl FnOnce() + 'static) {
    leptos::task::spawn_local(async move {
        match get_json::<SessionStatus>(&format!("{API_PREFIX}/session")).await {
            Ok(status) if status.keys_required && status.signed_in_as.is_none() => {
                store.access.set(Access::SignInNeeded);
            }
            Ok(status) => {
                store.access.set(Access::Granted(status.signed_in_as));
                start();
            }
            // An older coordinator without sessions: read as before.
            Err(_) => {
                store.access.set(Access::Granted(None));
                start();
            }
        }
    });
}

/// Signs in with `key`: the gateway answers with a session cookie (`HttpOnly`, this origin only), so
/// the key itself is kept nowhere in the page.
pub(crate) async fn sign_in(key: &str) -> Result<(), String> {
    let window = web_sys::window().ok_or("no window")?;
    let body = serde_json::to_string(&SignIn {
        key: key.to_owned(),
    })
    .map_err(|error| error.to_string())?;
    let init = web_sys::RequestInit::new();
    init.set_method("POST");
    init.set_body(&wasm_bindgen::JsValue::from_str(&body));
    let response =
        JsFuture::from(window.fetch_with_str_and_init(&format!("{API_PREFIX}/session"), &init))
            .await
            .map_err(|_| "network error".to_owned())?;
    let response: web_sys::Response = response
        .dyn_into()
        .map_err(|_| "not a response".to_owned())?;
    match response.status() {
        200 => Ok(()),
        401 => Err("That is not one of this gateway's API keys.".to_owned()),
        status => Err(format!("The gateway answered HTTP {status}.")),
    }
}

pub(crate) fn load_snapshot(store: Store) {
    leptos::task::spawn_local(async move {
        let summary = get_json::<ClusterSummary>(&format!("{API_PREFIX}/cluster")).await;
        let nodes = get_json::<NodeList>(&format!("{API_PREFIX}/nodes")).await;
        let recent =
            get_json::<RequestList>(&format!("{API_PREFIX}/requests?limit={FEED_LENGTH}")).await;
        match (summary, nodes) {
            (Ok(summary), Ok(list)) => {
                store.summary.set(Some(summary));
                store.loads.set(
                    list.load
                        .into_iter()
                        .map(|(id, load)| (id, load.in_flight))
                        .collect(),
                );
                store.nodes.set(Some(list.nodes));
                store.error.set(None);
            }
            (Err(error), _) | (_, Err(error)) => store.error.set(Some(error)),
        }
        if let Ok(recent) = recent {
            store.feed.set(recent.requests.into_iter().collect());
        }
        load_replicas(store).await;
        if let Ok(list) = get_json::<TransferList>(&format!("{API_PREFIX}/transfers")).await {
            let copying = list.transfers.into_iter();
            store.transfers.set(
                copying
                    .filter(|transfer| transfer.state == TransferState::Copying)
                    .collect(),
            );
        }
    });
}

async fn load_replicas(store: Store) {
    if let Ok(list) = get_json::<ReplicaList>(&format!("{API_PREFIX}/replicas")).await {
        store.replicas.set(list.replicas);
    }
}

pub(crate) fn load_stats(store: Store) {
    leptos::task::spawn_local(async move {
        load_replicas(store).await;
        let window = store.window.get_untracked();
        match get_json::<Stats>(&format!("{API_PREFIX}/stats?window={}", window.as_str())).await {
            Ok(stats) if stats.window == store.window.get_untracked() => {
                store.stats.set(Some(stats));
                store.error.set(None);
            }
            Ok(_) => {}
            Err(error) => store.error.set(Some(error)),
        }
        if let Ok(summary) = get_json::<ClusterSummary>(&format!("{API_PREFIX}/cluster")).await {
            store.summary.set(Some(summary));
        }
        if let Ok(list) = get_json::<DistributedList>(&format!("{API_PREFIX}/distributed")).await {
            store.distributed.set(list.models);
        }
        if let Ok(list) = get_json::<CoordinatorList>(&format!("{API_PREFIX}/coordinators")).await {
            store.coordinators.set(Some(list));
        }
    });
}

pub(crate) fn load_detail(store: Store, id: String) {
    leptos::task::spawn_local(async move {
        match get_json::<NodeDetail>(&format!("{API_PREFIX}/nodes/{id}")).await {
            Ok(detail) if store.route.get_untracked() == Route::Node(id) => {
                store.detail.set(Some(detail))
            }
            Ok(_) => {}
            Err(error) => store.error.set(Some(error)),
        }
    });
}

/// Opens the live event stream. The browser retries a dropped stream by itself; one it gave up on is
/// opened again after `RECONNECT_MS`.
pub(crate) fn connect_live(store: Store) {
    let Ok(source) = web_sys::EventSource::new(&format!("{API_PREFIX}/events")) else {
        store.connection.set(Connection::Lost(
            "this browser has no EventSource".to_owned(),
        ));
        return;
    };
    let on_open = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| {
        store.connection.set(Connection::Live);
        load_snapshot(store);
        load_stats(store);
    });
    source.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    on_open.forget();
    let watched = source.clone();
    let on_error = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| {
        store.connection.set(Connection::Lost(
            "the live connection to the coordinator dropped".to_owned(),
        ));
        if watched.ready_state() == web_sys::EventSource::CLOSED {
            let retry = Closure::once_into_js(move || connect_live(store));
            if let Some(window) = web_sys::window() {
                let _ = window.set_timeout_with_callback_and_timeout_and_arguments_0(
                    retry.unchecked_ref(),
                    RECONNECT_MS,
                );
            }
        }
    });
    source.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    on_error.forget();
    for name in ["node", "routed", "finished", "lagged"] {
        let listener = Closure::<dyn FnMut(web_sys::MessageEvent)>::new(
            move |message: web_sys::MessageEvent| {
                let Some(data) = message.data().as_string() else {
                    return;
                };
                if let Ok(event) = serde_json::from_str::<LiveEvent>(&data) {
                    store.apply(event);
                }
            },
        );
        let _ = source.add_event_listener_with_callback(name, listener.as_ref().unchecked_ref());
        listener.forget();
    }
}

async fn get_json<T: DeserializeOwned>(path: &str) -> Result<T, String> {
    let window = web_sys::window().ok_or("no window")?;
    let response = JsFuture::from(window.fetch_with_str(path))
        .await
        .map_err(|_| "network error".to_owned())?;
    let response: web_sys::Response = response
        .dyn_into()
        .map_err(|_| "not a response".to_owned())?;
    if !response.ok() {
        return Err(format!("HTTP {} from {path}", response.status()));
    }
    let text = JsFuture::from(response.text().map_err(|_| "unreadable body".to_owned())?)
        .await
        .map_err(|_| "unreadable body".to_owned())?;
    let text = text.as_string().ok_or("body is not text")?;
    serde_json::from_str(&text).map_err(|error| format!("unexpected JSON from {path}: {error}"))
}
