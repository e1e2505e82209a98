//! The agent's side of the cluster: connect, prove the token, report every heartbeat, reconnect with backoff, say goodbye.
//!
//! A refusal that cannot heal by itself (wrong token, other protocol version)
//! ends the agent with an error that names the reason; anything else (the
//! coordinator restarting, the network dropping) is retried with capped,
//! jittered exponential backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use sollol_shared::BUILD_VERSION;
use sollol_shared::protocol::{
    AgentMessage, Auth, AuthReply, CoordinatorMessage, Hello, HelloReply, MAGIC, PROTOCOL_VERSION,
    Refusal,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::identity::{ClusterToken, NodeId};
use crate::cluster::mdns::Mdns;
use crate::cluster::secure::{self, Role};
use crate::cluster::wire::{self, FrameError, ProofSide};
use crate::telemetry::{self, Sampler};
use sollol_policy::backoff::Backoff;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A discovered coordinator that takes longer than this to prove the token is treated as one that stalls.
const DISCOVERED_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the coordinator at {address} refused this agent: {refusal}")]
    Refused { address: String, refusal: Refusal },
    #[error(
        "the coordinator at {address} could not prove it holds the cluster token: wrong address, or the agent's token is not this cluster's"
    )]
    CoordinatorUnverified { address: String },
    #[error("cannot resolve {address}: {reason}")]
    Resolve { address: String, reason: String },
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("connection to the coordinator at {address} lost: {reason}")]
    Lost { address: String, reason: String },
}

impl JoinError {
    /// Whether waiting and connecting again can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Refused { refusal, .. } => refusal.code.is_retryable(),
            Self::CoordinatorUnverified { .. } => false,
            Self::Resolve { .. } | Self::Connect { .. } | Self::Lost { .. } => true,
        }
    }
}

/// Everything the agent needs to join and report.
#[derive(Debug)]
pub struct JoinParams {
    /// Where the coordinator is.
    pub coordinator: Coordinator,
    pub token: ClusterToken,
    pub node_id: NodeId,
    pub node_name: String,
    pub heartbeat_interval: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// Where the agent looks for its coordinator.
#[derive(Debug)]
pub enum Coordinator {
    /// `agent.join`: these addresses only, each joined (several coordinators of one cluster); a refusal
    /// that cannot heal ends that address's loop, and the agent once every loop has ended.
    Fixed(Vec<String>),
    /// No `agent.join`: the seeds (names resolved at every attempt) and the coordinators mDNS finds,
    /// tried in turn; one that refuses this agent or cannot prove the token is left alone for a while.
    Discover {
        seeds: Vec<String>,
        mdns: Option<Arc<Mdns>>,
    },
}

/// How long a discovered coordinator that refused this agent (another cluster's) is not tried again.
const AVOID_FOR: Duration = Duration::from_secs(300);
/// How long one that accepted the connection and then stalled or dropped it before the handshake
/// ended is not tried again: an impostor that never proves the token must not hold the agent.
const AVOID_STALLED_FOR: Duration = Duration::from_secs(60);
/// How often the agent looks again when it knows no coordinator.
const LOOK_AGAIN: Duration = Duration::from_millis(500);

/// Picks the address to try next.
struct Finder<'a> {
    coordinator: &'a Coordinator,
    avoided: HashMap<String, Instant>,
    /// Addresses other loops of this agent follow (coordinators a joined one named).
    others_follow: Vec<String>,
    turn: usize,
    waiting_logged: bool,
}

impl<'a> Finder<'a> {
    fn new(coordinator: &'a Coordinator) -> Self {
        Self {
            coordinator,
            avoided: HashMap::new(),
            others_follow: Vec::new(),
            turn: 0,
            waiting_logged: false,
        }
    }

    /// A discovering loop leaves `addresses` to the loops following them (two links from one agent to
    /// one coordinator would close each other).
    fn leave_to_others(&mut self, addresses: Vec<String>) {
        self.others_follow = addresses;
    }

    fn candidates(&mut self) -> Vec<String> {
        let Coordinator::Discover { seeds, mdns } = self.coordinator else {
            return Vec::new();
        };
        let now = Instant::now();
        self.avoided.retain(|_, until| *until > now);
        let found = mdns
            .iter()
            .flat_map(|mdns| mdns.coordinators())
            .map(|address| address.to_string());
        let mut candidates: Vec<String> = seeds.iter().cloned().chain(found).collect();
        candidates.dedup();
        candidates.retain(|address| {
            !self.avoided.contains_key(address) && !self.others_follow.contains(address)
        });
        candidates
    }

    /// The addresses to try now, in turn order (a fixed address alone); waits while none is known.
    /// `None` on shutdown.
    async fn round(&mut self, shutdown: &CancellationToken) -> Option<Vec<String>> {
        if let Coordinator::Fixed(addresses) = self.coordinator {
            return Some(addresses.clone());
        }
        loop {
            let mut candidates = self.candidates();
            if !candidates.is_empty() {
                self.waiting_logged = false;
                self.turn = self.turn.wrapping_add(1);
                let turn = self.turn % candidates.len();
                candidates.rotate_left(turn);
                return Some(candidates);
            }
            if !self.waiting_logged {
                self.waiting_logged = true;
                let how = match self.coordinator {
                    Coordinator::Discover { mdns: Some(_), .. } => "listening for one over mDNS",
                    _ => "no discovery.seeds left to try",
                };
                tracing::info!("no coordinator known yet: {how}");
            }
            tokio::select! {
                () = tokio::time::sleep(LOOK_AGAIN) => {}
                () = shutdown.cancelled() => return None,
            }
        }
    }

    /// Records that joining at `address` failed with `error`; whether that ends the agent. A discovered
    /// address that is not this cluster's coordinator (refused, unverified, or never finished the
    /// handshake) is left alone for a while and dropped from the mDNS table; a fixed one ends the agent
    /// on a refusal that cannot heal and is retried otherwise.
    fn failed(&mut self, address: &str, error: &JoinError) -> bool {
        let Coordinator::Discover { mdns, .. } = self.coordinator else {
            return !error.is_retryable();
        };
        let avoid_for = match error {
            JoinError::Lost { .. } => AVOID_STALLED_FOR,
            error if !error.is_retryable() => AVOID_FOR,
            _ => return false,
        };
        tracing::warn!(%error, avoid_for_s = avoid_for.as_secs(), "not this agent's coordinator, or it did not finish the handshake: trying others");
        self.avoided
            .insert(address.to_owned(), Instant::now() + avoid_for);
        if let (Some(mdns), Ok(socket)) = (mdns, address.parse()) {
            mdns.forget(socket);
        }
        false
    }
}

type LinkReader = secure::SecureReader<tokio::net::tcp::OwnedReadHalf>;
type LinkWriter = secure::SecureWriter<OwnedWriteHalf>;

/// A coordinator that proved the token, and the encrypted link to it.
struct Joined {
    address: String,
    reader: LinkReader,
    writer: LinkWriter,
}

/// Handshakes with up to this many discovered coordinators at once: the first that proves the token wins.
const PARALLEL_TRIES: usize = 8;

/// Tries every address of a round, [`PARALLEL_TRIES`] at a time, until one proves the token; the last
/// error when none did, with whether it ends the agent. `Ok(None)` on shutdown.
async fn join_first(
    params: &JoinParams,
    finder: &mut Finder<'_>,
    shutdown: &CancellationToken,
) -> Result<Option<Joined>, (JoinError, bool)> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let Some(round) = finder.round(shutdown).await else {
        return Ok(None);
    };
    let handshake_timeout = match finder.coordinator {
        Coordinator::Fixed(_) => HANDSHAKE_TIMEOUT,
        Coordinator::Discover { .. } => DISCOVERED_HANDSHAKE_TIMEOUT,
    };
    let mut waiting = round.into_iter();
    let mut tries = FuturesUnordered::new();
    let mut last_error = None;
    loop {
        while tries.len() < PARALLEL_TRIES
            && let Some(address) = waiting.next()
        {
            tries.push(async move {
                let result = establish(params, &address, handshake_timeout).await;
                (address, result)
            });
        }
        let next = tokio::select! {
            next = tries.next() => next,
            () = shutdown.cancelled() => return Ok(None),
        };
        match next {
            Some((address, Ok((reader, writer)))) => {
                return Ok(Some(Joined {
                    address,
                    reader,
                    writer,
                }));
            }
            Some((address, Err(error))) => {
                if finder.failed(&address, &error) {
                    return Err((error, true));
                }
                last_error = Some(error);
            }
            None => {
                return Err((
                    last_error.unwrap_or_else(|| JoinError::Connect {
                        address: "(none)".to_owned(),
                        reason: "no coordinator to try".to_owned(),
                    }),
                    false,
                ));
            }
        }
    }
}

/// Runs until `shutdown` (Ok, after a goodbye) or a refusal that retrying cannot fix (Err). With
/// several fixed addresses, each is joined by a loop of its own, and this returns once all have ended
/// (the first error, if any). An agent given one address, or discovering, also joins the other
/// coordinators a joined coordinator names (a loop each, while the group lists them); one given
/// several addresses joins exactly those.
pub async fn run(
    params: JoinParams,
    sampler: Sampler,
    shutdown: CancellationToken,
) -> Result<(), JoinError> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let reporter = Reporter::new(sampler, params.heartbeat_interval);
    let follow =
        !matches!(&params.coordinator, Coordinator::Fixed(addresses) if addresses.len() > 1);
    let targets: Vec<Coordinator> = match &params.coordinator {
        Coordinator::Fixed(addresses) => addresses
            .iter()
            .map(|address| Coordinator::Fixed(vec![address.clone()]))
            .collect(),
        Coordinator::Discover { seeds, mdns } => vec![Coordinator::Discover {
            seeds: seeds.clone(),
            mdns: mdns.clone(),
        }],
    };
    let (told, mut heard) = mpsc::unbounded_channel();
    let shared = Shared {
        params: &params,
        reporter: &reporter,
        shutdown: &shutdown,
        told,
        following: Mutex::default(),
    };
    let shared = &shared;
    type Loop<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), JoinError>> + Send + 'a>>;
    let mut loops: FuturesUnordered<Loop<'_>> = FuturesUnordered::new();
    let mut next_loop = 0;
    for target in targets {
        loops.push(Box::pin(run_one(shared, target, next_loop, None)));
        next_loop += 1;
    }
    let mut first_error = None;
    loop {
        tokio::select! {
            ended = loops.next() => match ended {
                Some(Ok(())) => {}
                Some(Err(error)) => {
                    first_error.get_or_insert(error);
                }
                None => break,
            },
            Some(news) = heard.recv() => {
                for (address, give_up) in shared.hear(news, follow) {
                    let link = next_loop;
                    loops.push(Box::pin(async move {
                        // A named coordinator's refusal ends its loop only, never the agent.
                        let target = Coordinator::Fixed(vec![address]);
                        let _ = run_one(shared, target, link, Some(give_up)).await;
                        Ok(())
                    }));
                    next_loop += 1;
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// What a link tells the loop that started it.
#[derive(Debug)]
enum News {
    /// Loop `link`'s coordinator is `this`, and the other live coordinators are `others`.
    Told {
        link: usize,
        this: String,
        others: Vec<sollol_shared::protocol::CoordinatorAddress>,
    },
    /// Loop `link`'s session ended.
    Ended { link: usize },
}

/// Which coordinator each loop is linked to, and the loops started for coordinators named by others.
#[derive(Debug, Default)]
struct Following {
    /// Coordinator id -> the loop linked to it now.
    linked: HashMap<String, usize>,
    /// Coordinators named by a joined one: id -> (cluster address, what stops its loop).
    named: HashMap<String, (String, CancellationToken)>,
}

/// What every join loop of the agent shares.
struct Shared<'a> {
    params: &'a JoinParams,
    reporter: &'a Reporter,
    shutdown: &'a CancellationToken,
    told: mpsc::UnboundedSender<News>,
    following: Mutex<Following>,
}

impl Shared<'_> {
    /// Records `news`; the named coordinators to start a loop for (with `follow`), and their stops.
    fn hear(&self, news: News, follow: bool) -> Vec<(String, CancellationToken)> {
        let mut following = self
            .following
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match news {
            News::Ended { link } => {
                following.linked.retain(|_, linked| *linked != link);
                Vec::new()
            }
            News::Told { link, this, others } => {
                following.linked.retain(|_, linked| *linked != link);
                following.linked.insert(this.clone(), link);
                if !follow {
                    return Vec::new();
                }
                // A named coordinator the group no longer lists stops retrying (a linked one stays).
                let listed: std::collections::HashSet<&str> = others
                    .iter()
                    .map(|other| other.id.as_str())
                    .chain([this.as_str()])
                    .collect();
                let Following { linked, named } = &mut *following;
                named.retain(|id, (_, give_up)| {
                    let keep = listed.contains(id.as_str()) || linked.contains_key(id);
                    if !keep {
                        give_up.cancel();
                    }
                    keep
                });
                let mut start = Vec::new();
                for other in others {
                    if linked.contains_key(&other.id) || named.contains_key(&other.id) {
                        continue;
                    }
                    tracing::info!(coordinator = %other.address, id = %other.id, named_by = %this, "joining another coordinator of the cluster");
                    let give_up = self.shutdown.child_token();
                    named.insert(other.id, (other.address.clone(), give_up.clone()));
                    start.push((other.address, give_up));
                }
                start
            }
        }
    }

    /// The addresses other loops follow, which a discovering loop leaves to them.
    fn followed_addresses(&self) -> Vec<String> {
        self.following
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .named
            .values()
            .map(|(address, _)| address.clone())
            .collect()
    }
}

/// The reports of one agent, shared by its links to several coordinators: sampled at most once per
/// half heartbeat, whichever link asks first.
struct Reporter {
    sampler: Arc<Mutex<Sampler>>,
    last: tokio::sync::Mutex<Option<(Instant, sollol_shared::hardware::NodeReport)>>,
    fresh_for: Duration,
}

impl Reporter {
    fn new(sampler: Sampler, heartbeat: Duration) -> Self {
        Self {
            sampler: Arc::new(Mutex::new(sampler)),
            last: tokio::sync::Mutex::new(None),
            fresh_for: heartbeat / 2,
        }
    }

    async fn report(&self) -> sollol_shared::hardware::NodeReport {
        let mut last = self.last.lock().await;
        if let Some((at, report)) = last.as_ref()
            && at.elapsed() < self.fresh_for
        {
            return report.clone();
        }
        let report = sample(&self.sampler).await;
        *last = Some((Instant::now(), report.clone()));
        report
    }
}

/// Joins one target (a fixed address, or whichever coordinator discovery finds) until shutdown or a
/// refusal that retrying cannot fix; a named coordinator's loop also ends when `give_up` fires while
/// it is not connected.
async fn run_one(
    shared: &Shared<'_>,
    target: Coordinator,
    link: usize,
    give_up: Option<CancellationToken>,
) -> Result<(), JoinError> {
    let (params, shutdown) = (shared.params, shared.shutdown.clone());
    let give_up = give_up.unwrap_or_else(|| shutdown.clone());
    let mut backoff = Backoff::new(params.initial_backoff, params.max_backoff);
    let mut finder = Finder::new(&target);
    loop {
        finder.leave_to_others(shared.followed_addresses());
        let (result, fatal) = match join_first(params, &mut finder, &give_up).await {
            Ok(None) => return Ok(()),
            Ok(Some(joined)) => {
                backoff.reset();
                let address = joined.address.clone();
                let result = session(shared, link, joined, &shutdown).await;
                let _ = shared.told.send(News::Ended { link });
                let fatal = result
                    .as_ref()
                    .err()
                    .is_some_and(|error| finder.failed(&address, error));
                (result, fatal)
            }
            Err((error, fatal)) => (Err(error), fatal),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(error) if fatal => {
                tracing::error!(%error, "agent cannot join the cluster");
                return Err(error);
            }
            Err(error) => {
                let delay = backoff.next_delay(rand::rng().random::<f64>());
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "not connected to the coordinator");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = give_up.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// Connects to `address`, proves the token both ways and sets up the encrypted link.
async fn establish(
    params: &JoinParams,
    address: &str,
    handshake_timeout: Duration,
) -> Result<(LinkReader, LinkWriter), JoinError> {
    let lost = |reason: String| JoinError::Lost {
        address: address.to_owned(),
        reason,
    };
    let stream = connect(address).await?;
    let (mut reader, mut writer) = stream.into_split();
    let secured = async {
        let key = handshake(params, address, &mut reader, &mut writer).await?;
        // From here on every frame is encrypted and authenticated with a key only the two ends have.
        secure::establish(reader, writer, Role::Dialler, &key)
            .await
            .map_err(|error| lost(error.to_string()))
    };
    tokio::time::timeout(handshake_timeout, secured)
        .await
        .map_err(|_| lost("handshake timed out".to_owned()))?
}

/// Reports every heartbeat over the joined link until shutdown (a goodbye) or the link ends.
async fn session(
    shared: &Shared<'_>,
    link: usize,
    joined: Joined,
    shutdown: &CancellationToken,
) -> Result<(), JoinError> {
    let (params, reporter) = (shared.params, shared.reporter);
    let Joined {
        address,
        mut reader,
        mut writer,
    } = joined;
    let address = address.as_str();
    let lost = |reason: String| JoinError::Lost {
        address: address.to_owned(),
        reason,
    };
    tracing::info!(coordinator = %address, node = %params.node_name, id = %params.node_id, "joined the cluster");

    // Frames from the coordinator are read by their own task, so a heartbeat never interrupts a half-read frame.
    let (incoming_sender, mut incoming) = mpsc::channel(4);
    let read_task = tokio::spawn(async move {
        loop {
            let message = wire::read_message::<CoordinatorMessage, _>(&mut reader).await;
            let end = message.is_err();
            if incoming_sender.send(message).await.is_err() || end {
                break;
            }
        }
    });
    let result = async {
        let mut ticker = tokio::time::interval(params.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let report = reporter.report().await;
                    wire::write_message(&mut writer, &AgentMessage::Report(Box::new(report)))
                        .await
                        .map_err(|error| lost(error.to_string()))?;
                }
                message = incoming.recv() => match message {
                    Some(Ok(CoordinatorMessage::Closing { reason })) => return Err(lost(format!("the coordinator is closing ({reason})"))),
                    Some(Ok(CoordinatorMessage::Refused(refusal))) => return Err(JoinError::Refused { address: address.to_owned(), refusal }),
                    Some(Ok(CoordinatorMessage::Coordinators { this, others })) => {
                        let _ = shared.told.send(News::Told { link, this, others });
                    }
                    Some(Err(error)) => return Err(lost(error.to_string())),
                    None => return Err(lost("reader stopped".to_owned())),
                },
                () = shutdown.cancelled() => {
                    say_goodbye(&mut writer).await;
                    return Ok(());
                }
            }
        }
    }
    .await;
    read_task.abort();
    result
}

async fn connect(address: &str) -> Result<TcpStream, JoinError> {
    let resolved = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(address))
        .await
        .map_err(|_| JoinError::Resolve {
            address: address.to_owned(),
            reason: "timed out".to_owned(),
        })?
        .map_err(|error| JoinError::Resolve {
            address: address.to_owned(),
            reason: error.to_string(),
        })?;
    let mut last_error = "no addresses".to_owned();
    for candidate in resolved {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(candidate)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(error)) => last_error = format!("{candidate}: {error}"),
            Err(_) => last_error = format!("{candidate}: timed out"),
        }
    }
    Err(JoinError::Connect {
        address: address.to_owned(),
        reason: last_error,
    })
}

/// The challenge–response; on success, the key of the encrypted link that follows.
async fn handshake(
    params: &JoinParams,
    address: &str,
    reader: &mut tokio::net::tcp::OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
) -> Result<[u8; 32], JoinError> {
    let lost = |error: FrameError| JoinError::Lost {
        address: address.to_owned(),
        reason: error.to_string(),
    };
    writer
        .write_all(&MAGIC)
        .await
        .map_err(|error| lost(FrameError::Io(error)))?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        build_version: BUILD_VERSION.to_owned(),
        node_id: params.node_id.as_str().to_owned(),
        node_name: params.node_name.clone(),
        heartbeat_interval_ms: u64::try_from(params.heartbeat_interval.as_millis())
            .unwrap_or(u64::MAX),
    };
    wire::write_message(writer, &hello).await.map_err(lost)?;
    let challenge = match wire::read_message::<HelloReply, _>(reader)
        .await
        .map_err(lost)?
    {
        HelloReply::Challenge { nonce, .. } => nonce,
        HelloReply::Refused(refusal) => {
            return Err(JoinError::Refused {
                address: address.to_owned(),
                refusal,
            });
        }
    };
    let own_nonce = wire::nonce();
    let auth = Auth {
        proof: wire::proof(
            &params.token,
            ProofSide::Agent,
            &challenge,
            params.node_id.as_str(),
        ),
        nonce: own_nonce,
    };
    wire::write_message(writer, &auth).await.map_err(lost)?;
    match wire::read_message::<AuthReply, _>(reader)
        .await
        .map_err(lost)?
    {
        AuthReply::Welcome { proof } => {
            if wire::verify_proof(
                &params.token,
                ProofSide::Coordinator,
                &own_nonce,
                params.node_id.as_str(),
                &proof,
            ) {
                Ok(secure::link_key(
                    &params.token,
                    secure::CLUSTER_LINK,
                    &own_nonce,
                    &challenge,
                ))
            } else {
                Err(JoinError::CoordinatorUnverified {
                    address: address.to_owned(),
                })
            }
        }
        AuthReply::Refused(refusal) => Err(JoinError::Refused {
            address: address.to_owned(),
            refusal,
        }),
    }
}

/// Samples hardware off the async workers (procfs reads, NVML calls) and Ollama over HTTP, concurrently.
async fn sample(sampler: &Arc<Mutex<Sampler>>) -> sollol_shared::hardware::NodeReport {
    let (ollama_probe, stage_address, memory_limit) = {
        let sampler = sampler
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (
            sampler.ollama_probe(),
            sampler.stage_address.clone(),
            sampler.memory_limit,
        )
    };
    let blocking_sampler = Arc::clone(sampler);
    let hardware = tokio::task::spawn_blocking(move || match blocking_sampler.lock() {
        Ok(mut sampler) => sampler.hardware(),
        Err(poisoned) => poisoned.into_inner().hardware(),
    });
    let (hardware, ollama) = tokio::join!(hardware, ollama_probe.sample());
    telemetry::report(
        hardware.unwrap_or_default(),
        ollama,
        stage_address,
        memory_limit,
    )
}

async fn say_goodbye<W: tokio::io::AsyncWrite + Unpin>(writer: &mut W) {
    let goodbye = AgentMessage::Goodbye {
        reason: "agent shutting down".to_owned(),
    };
    let write = async {
        wire::write_message(writer, &goodbye).await?;
        writer.shutdown().await.map_err(FrameError::Io)
    };
    if tokio::time::timeout(GOODBYE_TIMEOUT, write).await.is_err() {
        tracing::warn!("goodbye to the coordinator timed out");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unverified(address: &str) -> JoinError {
        JoinError::CoordinatorUnverified {
            address: address.to_owned(),
        }
    }

    #[tokio::test]
    async fn discovered_coordinators_are_tried_together_and_one_of_another_cluster_is_avoided() {
        let coordinator = Coordinator::Discover {
            seeds: vec!["a.lan:11436".to_owned(), "10.0.0.2:11436".to_owned()],
            mdns: None,
        };
        let shutdown = CancellationToken::new();
        let mut finder = Finder::new(&coordinator);
        let round = finder.round(&shutdown).await.expect("the seeds");
        assert_eq!(round.len(), 2, "both seeds are tried");
        let again = finder.round(&shutdown).await.expect("the seeds");
        assert_ne!(
            round[0], again[0],
            "in turn, so no one address always goes first"
        );
        let (first, second) = (round[0].clone(), round[1].clone());

        // A connection refused is retried later; one that stalls the handshake, or another cluster's
        // coordinator, is skipped for a while, never fatal.
        let refused = JoinError::Connect {
            address: first.clone(),
            reason: "connection refused".to_owned(),
        };
        assert!(!finder.failed(&first, &refused));
        assert_eq!(
            finder.round(&shutdown).await.map(|round| round.len()),
            Some(2)
        );
        let stalled = JoinError::Lost {
            address: first.clone(),
            reason: "handshake timed out".to_owned(),
        };
        assert!(!finder.failed(&first, &stalled));
        for _ in 0..3 {
            assert_eq!(finder.round(&shutdown).await, Some(vec![second.clone()]));
        }

        // With every candidate avoided the finder waits (here until shut down).
        assert!(!finder.failed(&second, &unverified(&second)));
        shutdown.cancel();
        assert_eq!(finder.round(&shutdown).await, None);
    }

    #[tokio::test]
    async fn a_fixed_address_ends_the_agent_on_a_refusal_that_cannot_heal() {
        let coordinator = Coordinator::Fixed(vec!["10.0.0.1:11436".to_owned()]);
        let shutdown = CancellationToken::new();
        let mut finder = Finder::new(&coordinator);
        assert_eq!(
            finder.round(&shutdown).await,
            Some(vec!["10.0.0.1:11436".to_owned()])
        );
        let lost = JoinError::Lost {
            address: "10.0.0.1:11436".to_owned(),
            reason: "reset".to_owned(),
        };
        assert!(!finder.failed("10.0.0.1:11436", &lost));
        assert!(finder.failed("10.0.0.1:11436", &unverified("10.0.0.1:11436")));
    }

    #[tokio::test]
    async fn stalling_coordinators_do_not_keep_the_agent_from_the_real_one() {
        use tokio::net::TcpListener;
        // Impostors that accept and never answer, and closed ports: one round tries them all in about
        // one handshake timeout (one by one, eight impostors took eight), then avoids the impostors.
        let mut held = Vec::new();
        let mut seeds = Vec::new();
        for _ in 0..PARALLEL_TRIES {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            seeds.push(listener.local_addr().expect("address").to_string());
            held.push(listener);
        }
        for _ in 0..20 {
            let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            seeds.push(closed.local_addr().expect("address").to_string());
        }
        let coordinator = Coordinator::Discover { seeds, mdns: None };
        let params = JoinParams {
            coordinator,
            token: ClusterToken::parse(&"ab".repeat(32)).expect("token"),
            node_id: NodeId::generate(),
            node_name: "agent".to_owned(),
            heartbeat_interval: Duration::from_secs(1),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(200),
        };
        let shutdown = CancellationToken::new();
        let mut finder = Finder::new(&params.coordinator);
        let started = Instant::now();
        let failed = join_first(&params, &mut finder, &shutdown).await;
        assert!(matches!(failed, Err((_, false))), "no coordinator here");
        assert!(
            started.elapsed() < DISCOVERED_HANDSHAKE_TIMEOUT * 2,
            "{:?}: impostors are tried {PARALLEL_TRIES} at a time",
            started.elapsed()
        );
        // The impostors are avoided from now on: the next round holds only the closed ports.
        let round = finder.round(&shutdown).await.expect("round");
        assert_eq!(round.len(), 20);
        drop(held);
    }
}
