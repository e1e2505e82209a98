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
    /// `agent.join`: this address only; a refusal that cannot heal ends the agent.
    Fixed(String),
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
    turn: usize,
    waiting_logged: bool,
}

impl<'a> Finder<'a> {
    fn new(coordinator: &'a Coordinator) -> Self {
        Self {
            coordinator,
            avoided: HashMap::new(),
            turn: 0,
            waiting_logged: false,
        }
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
        candidates.retain(|address| !self.avoided.contains_key(address));
        candidates
    }

    /// The next address to try; waits while none is known. `None` on shutdown.
    async fn next(&mut self, shutdown: &CancellationToken) -> Option<String> {
        if let Coordinator::Fixed(address) = self.coordinator {
            return Some(address.clone());
        }
        loop {
            let candidates = self.candidates();
            if !candidates.is_empty() {
                self.waiting_logged = false;
                self.turn = self.turn.wrapping_add(1);
                return Some(candidates[self.turn % candidates.len()].clone());
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

    /// A discovered address whose handshake never finished (stalled, dropped, malformed) is left alone
    /// for a while, like one that refused; a fixed address is retried with the usual backoff.
    fn handshake_failed(&mut self, address: &str, error: &JoinError) {
        if matches!(self.coordinator, Coordinator::Discover { .. })
            && matches!(error, JoinError::Lost { .. })
        {
            tracing::warn!(%error, avoid_for_s = AVOID_STALLED_FOR.as_secs(), "the coordinator did not finish the handshake: trying others");
            self.avoided
                .insert(address.to_owned(), Instant::now() + AVOID_STALLED_FOR);
        }
    }

    /// Whether `error` at `address` ends the agent; otherwise a discovered address it cannot heal at is
    /// avoided for a while.
    fn is_fatal(&mut self, address: &str, error: &JoinError) -> bool {
        if error.is_retryable() {
            return false;
        }
        match self.coordinator {
            Coordinator::Fixed(_) => true,
            Coordinator::Discover { .. } => {
                tracing::warn!(%error, avoid_for_s = AVOID_FOR.as_secs(), "not this agent's coordinator: trying others");
                self.avoided
                    .insert(address.to_owned(), Instant::now() + AVOID_FOR);
                false
            }
        }
    }
}

/// Runs until `shutdown` (Ok, after a goodbye) or a refusal that retrying cannot fix (Err).
pub async fn run(
    params: JoinParams,
    sampler: Sampler,
    shutdown: CancellationToken,
) -> Result<(), JoinError> {
    let sampler = Arc::new(Mutex::new(sampler));
    let mut backoff = Backoff::new(params.initial_backoff, params.max_backoff);
    let mut finder = Finder::new(&params.coordinator);
    loop {
        let Some(address) = finder.next(&shutdown).await else {
            return Ok(());
        };
        let mut welcomed = false;
        let result = session(&params, &address, &sampler, &shutdown, &mut welcomed).await;
        if welcomed {
            backoff.reset();
        } else if let Err(error) = &result {
            finder.handshake_failed(&address, error);
        }
        match result {
            Ok(()) => return Ok(()),
            Err(error) if finder.is_fatal(&address, &error) => {
                tracing::error!(%error, "agent cannot join the cluster");
                return Err(error);
            }
            Err(error) if !error.is_retryable() => {}
            Err(error) => {
                let delay = backoff.next_delay(rand::rng().random::<f64>());
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "not connected to the coordinator");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

async fn session(
    params: &JoinParams,
    address: &str,
    sampler: &Arc<Mutex<Sampler>>,
    shutdown: &CancellationToken,
    welcomed: &mut bool,
) -> Result<(), JoinError> {
    let lost = |reason: String| JoinError::Lost {
        address: address.to_owned(),
        reason,
    };
    let stream = tokio::select! {
        stream = connect(address) => stream?,
        () = shutdown.cancelled() => return Ok(()),
    };
    let (mut reader, mut writer) = stream.into_split();
    let secured = async {
        let key = handshake(params, address, &mut reader, &mut writer).await?;
        // From here on every frame is encrypted and authenticated with a key only the two ends have.
        secure::establish(reader, writer, Role::Dialler, &key)
            .await
            .map_err(|error| lost(error.to_string()))
    };
    let (mut reader, mut writer) = tokio::select! {
        result = tokio::time::timeout(HANDSHAKE_TIMEOUT, secured) => result.map_err(|_| lost("handshake timed out".to_owned()))??,
        () = shutdown.cancelled() => return Ok(()),
    };
    *welcomed = true;
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
                    let report = sample(sampler).await;
                    wire::write_message(&mut writer, &AgentMessage::Report(Box::new(report)))
                        .await
                        .map_err(|error| lost(error.to_string()))?;
                }
                message = incoming.recv() => match message {
                    Some(Ok(CoordinatorMessage::Closing { reason })) => return Err(lost(format!("the coordinator is closing ({reason})"))),
                    Some(Ok(CoordinatorMessage::Refused(refusal))) => return Err(JoinError::Refused { address: address.to_owned(), refusal }),
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
    async fn discovered_coordinators_are_tried_in_turn_and_one_of_another_cluster_is_avoided() {
        let coordinator = Coordinator::Discover {
            seeds: vec!["a.lan:11436".to_owned(), "10.0.0.2:11436".to_owned()],
            mdns: None,
        };
        let shutdown = CancellationToken::new();
        let mut finder = Finder::new(&coordinator);
        let first = finder.next(&shutdown).await.expect("a seed");
        let second = finder.next(&shutdown).await.expect("a seed");
        assert_ne!(first, second, "both seeds are tried");

        // A lost connection is retried later; another cluster's coordinator is skipped, not fatal.
        let lost = JoinError::Lost {
            address: first.clone(),
            reason: "reset".to_owned(),
        };
        assert!(!finder.is_fatal(&first, &lost));
        assert!(!finder.is_fatal(&first, &unverified(&first)));
        for _ in 0..3 {
            assert_eq!(
                finder.next(&shutdown).await.as_deref(),
                Some(second.as_str())
            );
        }

        // One that stalls the handshake is left alone like one that refuses.
        finder.handshake_failed(&second, &lost);
        let third_coordinator = Coordinator::Discover {
            seeds: vec![first.clone(), second.clone()],
            mdns: None,
        };
        let mut fresh = Finder::new(&third_coordinator);
        fresh.handshake_failed(&first, &lost);
        for _ in 0..3 {
            assert_eq!(
                fresh.next(&shutdown).await.as_deref(),
                Some(second.as_str())
            );
        }

        // With every candidate avoided the finder waits (here until shut down).
        assert!(!finder.is_fatal(&second, &unverified(&second)));
        shutdown.cancel();
        assert_eq!(finder.next(&shutdown).await, None);
    }

    #[tokio::test]
    async fn a_fixed_address_ends_the_agent_on_a_refusal_that_cannot_heal() {
        let coordinator = Coordinator::Fixed("10.0.0.1:11436".to_owned());
        let shutdown = CancellationToken::new();
        let mut finder = Finder::new(&coordinator);
        assert_eq!(
            finder.next(&shutdown).await.as_deref(),
            Some("10.0.0.1:11436")
        );
        assert!(finder.is_fatal("10.0.0.1:11436", &unverified("10.0.0.1:11436")));
    }
}
