//! The gateway's side of the coordinator group: publishes this coordinator's figures every gossip
//! round, takes the other live coordinators' load for routing, meets coordinators mDNS finds, and
//! answers `/api/sollol/v1/coordinators` and `/api/sollol/v1/learned`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use sollol_policy::group::PeerLoad;
use sollol_shared::api::{CoordinatorList, LearnedList, LearnedPair};
use tokio_util::sync::CancellationToken;

use super::GatewayState;
use crate::cluster::group::GOSSIP_INTERVAL;

/// How often the coordinators mDNS found are greeted.
const MEET_EVERY: Duration = Duration::from_secs(2);

/// Runs until `shutdown`.
pub async fn share(state: Arc<GatewayState>, shutdown: CancellationToken) {
    let mut others = state.group.others();
    let mut publish = tokio::time::interval(GOSSIP_INTERVAL);
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut meet = tokio::time::interval(MEET_EVERY);
    meet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = publish.tick() => {
                // Alone (no other coordinator ever heard of): nobody to tell, nothing to encode. A
                // coordinator that appears gets everything at the next tick.
                if others.borrow().peers.is_empty() {
                    continue;
                }
                let known: Vec<String> = state
                    .view
                    .load()
                    .backends
                    .iter()
                    .map(|backend| backend.node_id.to_string())
                    .collect();
                state.group.publish(&state.proxy.figures(), &known).await;
            }
            changed = others.changed() => {
                if changed.is_err() {
                    break;
                }
                let current = others.borrow_and_update().clone();
                state
                    .proxy
                    .set_peer_load(PeerLoad::of(current.alive().map(|peer| &peer.figures)));
            }
            _ = meet.tick() => {
                if let Some(Ok(mdns)) = &state.mdns {
                    for address in mdns.coordinators() {
                        state.group.meet(address);
                    }
                }
            }
            () = shutdown.cancelled() => break,
        }
    }
}

/// `GET /api/sollol/v1/coordinators`
pub async fn coordinators(State(state): State<Arc<GatewayState>>) -> Json<CoordinatorList> {
    let in_flight = state.proxy.in_flight().values().sum();
    let learned = state.proxy.learner().snapshot();
    let pairs = u32::try_from(learned.own.len()).unwrap_or(u32::MAX);
    Json(state.group.coordinators(in_flight, pairs))
}

/// `GET /api/sollol/v1/learned`
pub async fn learned(State(state): State<Arc<GatewayState>>) -> Json<LearnedList> {
    let learned = state.proxy.learner().snapshot();
    let mut pairs: Vec<LearnedPair> = learned
        .pairs
        .iter()
        .map(|((node_id, model), stats)| LearnedPair {
            node_id: node_id.clone(),
            model: model.clone(),
            decode_tokens_per_second: stats.decode_tokens_per_second,
            prompt_tokens_per_second: stats.prompt_tokens_per_second,
            time_to_first_token_ms: stats.time_to_first_token.as_secs_f64() * 1000.0,
            cold_load_ms: stats.cold_load.map(|cold| cold.as_secs_f64() * 1000.0),
            samples: stats.samples,
            coordinators: learned
                .merged_from
                .get(&(node_id.clone(), model.clone()))
                .copied()
                .unwrap_or(1),
        })
        .collect();
    pairs.sort_by(|a, b| (&a.node_id, &a.model).cmp(&(&b.node_id, &b.model)));
    Json(LearnedList { pairs })
}
