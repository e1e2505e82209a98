//! The forwarded routes' handler, as a sequence of steps: parse → look in the response cache (when on)
//! → wait for capacity → decide → attempt with failover (and hedging) → relay → keep the answer in the
//! cache. Embedding batches leave the sequence after the wait, and come back to it to be kept.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, StreamExt};
use hyper::body::Bytes;
use rand::Rng;
use sollol_policy::routing::{self, Candidate, Choice, Decision, DecisionKind};
use sollol_shared::api::{CandidateCost, RoutingDecision};

use super::attempt::{Attempt, header_text};
use super::batch;
use super::request::{ApiKeyName, ParsedRequest, application};
use super::selection::Selection;
use super::unload;
use super::{Charge, DECISION_HEADER, NODE_HEADER, Proxy};
use crate::cluster::Backend;
use crate::gateway::{ApiError, GatewayState};
use crate::history::Outcome;

/// Candidates listed in `X-Sollol-Candidates` and the history, best first.
const EXPLAINED_CANDIDATES: usize = 8;
/// Added to a hedge's delay so ordinary jitter does not trigger it.
const HEDGE_MARGIN: Duration = Duration::from_millis(100);

/// `POST` on any forwarded route.
pub async fn forward(
    State(state): State<Arc<GatewayState>>,
    uri: Uri,
    headers: HeaderMap,
    key: Option<axum::Extension<ApiKeyName>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let key = key.as_ref().map(|key| key.0.0.as_str());
    let app = application(&headers, key);
    // Limited per application, and per key when keys are on (a key holder may name any application).
    let who: Arc<[String]> = key
        .map(|key| format!("key:{key}"))
        .into_iter()
        .chain([format!("app:{app}")])
        .collect();
    if let Err(wait) = state.proxy.quotas.admit(&who) {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "rate limit reached for {}: try again in {} s (coordinator.requests_per_minute, coordinator.tokens_per_minute)",
                who.join(" and "),
                sollol_policy::quota::retry_after_seconds(wait)
            ),
        )
        .retry_after(sollol_policy::quota::retry_after_seconds(wait))
        .into_response();
    }
    let charge = Charge {
        quotas: Arc::clone(&state.proxy.quotas),
        who,
    };
    match forward_inner(&state, uri.path(), &headers, &app, body, &charge).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn forward_inner(
    state: &GatewayState,
    path: &str,
    headers: &HeaderMap,
    app: &str,
    body: Result<Bytes, BytesRejection>,
    charge: &Charge,
) -> Result<Response, ApiError> {
    let proxy = &state.proxy;
    let request = ParsedRequest::parse(proxy.settings.default_strategy, path, headers, body)?;
    let Some((cache, key)) = proxy.cache.as_ref().and_then(|cache| {
        let view = state.view.load();
        let digest = view.model_digest(&request.model);
        cache.key_of(path, &request, digest).map(|key| (cache, key))
    }) else {
        return route(state, path, app, &request, charge).await;
    };
    // A hit touches no node: nothing is measured, so neither the learner nor the history hears of it
    // (`sollol_cache_hits_total` counts it), and no tokens are charged, none being generated.
    if let Some(answer) = cache.lookup(&key, Instant::now()) {
        return Ok(answer.into_response());
    }
    let response = route(state, path, app, &request, charge)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    Ok(cache.keep(key, response).await)
}

/// A parsed request's way through the cluster: wait for capacity, decide, attempt with failover.
async fn route(
    state: &GatewayState,
    path: &str,
    app: &str,
    request: &ParsedRequest,
    charge: &Charge,
) -> Result<Response, ApiError> {
    let proxy = &state.proxy;
    if let Some(nodes) = unload::everywhere(&state.view, request) {
        proxy.unloaded_on_purpose(&request.model);
        return unload::run(proxy, path, request, &nodes).await;
    }
    let selection = Selection {
        model: &request.model,
        requested_name: &request.requested_name,
        wanted_node: request.wanted_node.as_deref(),
        affine_node: request.conversation.and_then(|key| proxy.affinity.get(key)),
        strategy: request.strategy,
        shape: &request.shape,
    };
    let (view, candidates) = selection
        .wait_for_capacity(proxy, &state.view, request.priority)
        .await?;
    let (backends, candidates): (Vec<&Arc<Backend>>, Vec<Candidate>) = candidates
        .into_iter()
        .map(|(index, candidate)| (&view.backends[index], candidate))
        .unzip();
    if let Some(flavour) = batch::flavour(path)
        && request.inputs.is_some_and(|inputs| inputs > 1)
        && backends.len() > 1
    {
        return forward_batch(proxy, &backends, path, request, flavour).await;
    }
    let plan = Plan::decide(proxy, request, &candidates);
    proxy.calibrate_idle(
        request.kind.learns,
        &request.model,
        &plan.decision,
        &candidates,
        &backends,
    );
    if request.kind.learns {
        proxy.invest(&request.model, &plan.decision, &candidates, &backends);
    }
    if request.unloads {
        proxy.unloaded_on_purpose(&request.model);
    }
    announce(proxy, request, path, app, &candidates, &plan);
    Failover {
        proxy,
        request,
        path,
        app,
        charge,
        backends: &backends,
        candidates: &candidates,
        plan: &plan,
    }
    .run()
    .await
}

/// An embedding batch spread over every candidate, answered in one piece.
async fn forward_batch(
    proxy: &Proxy,
    backends: &[&Arc<Backend>],
    path: &str,
    request: &ParsedRequest,
    flavour: batch::Flavour,
) -> Result<Response, ApiError> {
    let answer = batch::run(
        proxy,
        backends,
        path,
        &request.body,
        flavour,
        request.origin.as_ref(),
    )
    .await
    .map_err(|failure| ApiError::new(StatusCode::BAD_GATEWAY, failure))?;
    let inputs = request.inputs.unwrap_or(0);
    let mut response = axum::Json(answer.body).into_response();
    let headers = response.headers_mut();
    headers.insert(NODE_HEADER, header_text(&answer.nodes.join(",")));
    headers.insert(
        DECISION_HEADER,
        header_text(&format!(
            "batch of {inputs} inputs in {} chunks over {} nodes, work stealing",
            answer.chunks,
            answer.nodes.len()
        )),
    );
    Ok(response)
}

/// The routing decision for a request and what follows from it: the candidates that explain it and the
/// order in which nodes are tried.
#[derive(Debug)]
struct Plan {
    decision: Decision,
    /// The best few candidates with their predicted cost, best first; every attempt shares them.
    explained: Arc<[CandidateCost]>,
    /// Indexes into the candidates, in the order they are tried (at most `max_attempts`).
    order: Vec<usize>,
}

impl Plan {
    fn decide(proxy: &Proxy, request: &ParsedRequest, candidates: &[Candidate]) -> Self {
        let decision = routing::choose(
            candidates,
            &request.shape,
            request.strategy,
            &proxy.settings.priors,
            rand::rng().random::<f64>(),
            proxy.round_robin.fetch_add(1, Ordering::Relaxed),
        );
        // The best few candidates explain a decision; all of them would cost time and history space on big clusters.
        let explained: Arc<[CandidateCost]> = decision
            .ranking
            .iter()
            .take(EXPLAINED_CANDIDATES)
            .map(|index| CandidateCost {
                node: candidates[*index].name.clone(),
                predicted_ms: decision.predicted[*index].as_millis() as u64,
            })
            .collect();
        let order = decision
            .ranking
            .iter()
            .copied()
            .take(proxy.settings.max_attempts.max(1))
            .collect();
        Self {
            decision,
            explained,
            order,
        }
    }

    /// How long the first node may take before the same request also goes to the next one: a few times
    /// its learned first-token time for a stream, else twice its predicted time. `None`: no hedging.
    fn hedge_delay(
        &self,
        candidates: &[Candidate],
        stream: bool,
        hedging: bool,
    ) -> Option<Duration> {
        hedging.then(|| {
            let first = self.order[0];
            let learned_first_token = candidates[first]
                .stats
                .map(|stats| stats.time_to_first_token);
            match (stream, learned_first_token) {
                (true, Some(first_token)) => first_token * 3 + HEDGE_MARGIN,
                _ => self.decision.predicted[first] * 2 + HEDGE_MARGIN,
            }
        })
    }
}

/// Tells the live feed where the request goes, if anyone listens.
fn announce(
    proxy: &Proxy,
    request: &ParsedRequest,
    path: &str,
    app: &str,
    candidates: &[Candidate],
    plan: &Plan,
) {
    if proxy.observer.wanted()
        && let Some(first) = plan.decision.first()
    {
        proxy.observer.routed(
            &request.model,
            path,
            app,
            &candidates[first].name,
            RoutingDecision {
                strategy: request.strategy.as_str().to_owned(),
                reason: plan.decision.reason.clone(),
                candidates: plan.explained.to_vec(),
            },
        );
    }
}

/// The attempts of one request: the planned nodes in order, the next one taking over when one fails
/// and, with hedging, joining a first one that is slow to answer.
struct Failover<'a> {
    proxy: &'a Proxy,
    request: &'a ParsedRequest,
    path: &'a str,
    app: &'a str,
    charge: &'a Charge,
    backends: &'a [&'a Arc<Backend>],
    candidates: &'a [Candidate],
    plan: &'a Plan,
}

impl Failover<'_> {
    /// The first answer, or 502 naming every node's failure.
    async fn run(self) -> Result<Response, ApiError> {
        let order = &self.plan.order;
        let hedge_after = self.plan.hedge_delay(
            self.candidates,
            self.request.stream,
            self.proxy.settings.hedging,
        );
        let mut failures: Vec<String> = Vec::new();
        let mut running = futures_util::stream::FuturesUnordered::new();
        running.push(self.attempt(
            0,
            self.plan.decision.kind,
            self.plan.decision.reason.clone(),
        ));
        let mut next = 1;
        let mut hedged = false;
        loop {
            let can_hedge = !hedged && running.len() == 1 && next < order.len();
            let hedge_timer = async {
                match hedge_after.filter(|_| can_hedge) {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                finished = running.next() => {
                    let Some((position, result)) = finished else { break };
                    match result {
                        // Dropping `running` cancels any other attempt still waiting for its node.
                        Ok(response) => {
                            if let Some(key) = self.request.conversation {
                                self.proxy.affinity.remember(key, &self.backends[order[position]].node_id);
                            }
                            return Ok(response);
                        }
                        Err(failure) => {
                            let backend = self.backends[order[position]];
                            tracing::warn!(node = %backend.name, model = %self.request.model, %failure, "node failed; trying the next one");
                            failures.push(format!("{}: {failure}", backend.name));
                            if running.is_empty() && next < order.len() {
                                let reason = format!("failover #{next} after: {}", failures.join("; "));
                                running.push(self.attempt(next, DecisionKind::Failover, reason));
                                next += 1;
                            }
                        }
                    }
                }
                () = hedge_timer => {
                    hedged = true;
                    let backup = &self.candidates[order[next]];
                    if backup.in_flight < backup.slots {
                        let reason = format!(
                            "hedged: {} had not answered after {} ms",
                            self.candidates[order[0]].name,
                            hedge_after.unwrap_or_default().as_millis()
                        );
                        running.push(self.attempt(next, DecisionKind::Hedge, reason));
                        next += 1;
                    }
                }
            }
            if running.is_empty() {
                break;
            }
        }
        Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("every node tried failed: {}", failures.join("; ")),
        ))
    }

    /// The attempt on the `position`th node of the order, labelled with how it came to be tried.
    fn attempt(
        &self,
        position: usize,
        kind: DecisionKind,
        reason: String,
    ) -> impl Future<Output = (usize, Result<Response, String>)> + '_ {
        let backend = self.backends[self.plan.order[position]];
        Attempt {
            proxy: self.proxy,
            backend,
            path: self.path,
            body: self.request.body.clone(),
            origin: self.request.origin.as_ref(),
            charge: self.charge.clone(),
            stream: self.request.stream,
            kind: self.request.kind,
            outcome: Outcome {
                node_id: backend.node_id.clone(),
                model: self.request.model.clone(),
                path: self.path.to_owned(),
                app: self.app.to_owned(),
                ok: false,
                time_to_first_byte: Duration::ZERO,
                total: Duration::ZERO,
                timings: None,
                choice: Choice::routed(self.request.strategy, kind),
                reason,
                candidates: Arc::clone(&self.plan.explained),
                concurrent: 0,
            },
        }
        .run()
        .map(move |result| (position, result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sollol_policy::routing::{PairStats, Priors, RequestShape, Strategy};

    #[test]
    fn hedges_wait_for_a_slow_first_answer() {
        let candidate = |name: &str, first_token_ms: Option<u64>| Candidate {
            node_id: name.to_owned(),
            name: name.to_owned(),
            in_flight: 0,
            slots: 1,
            model_loaded: true,
            stats: first_token_ms.map(|ms| PairStats {
                decode_tokens_per_second: 100.0,
                prompt_tokens_per_second: 1000.0,
                cold_load: None,
                time_to_first_token: Duration::from_millis(ms),
                samples: 3,
            }),
            served: 0,
            has_affinity: false,
            node_stats: None,
            calibrating: false,
            warming: None,
        };
        let plan = |candidates: &[Candidate]| {
            let decision = routing::choose(
                candidates,
                &RequestShape {
                    prompt_tokens: 100,
                    output_tokens: 100,
                },
                Strategy::RoundRobin,
                &Priors::default(),
                0.5,
                0,
            );
            Plan {
                order: decision.ranking.clone(),
                explained: Arc::from([]),
                decision,
            }
        };
        let measured = [candidate("a", Some(200)), candidate("b", Some(50))];
        let measured_plan = plan(&measured);
        // A stream waits three first tokens; a buffered answer twice the prediction (1.1 s here).
        assert_eq!(
            measured_plan.hedge_delay(&measured, true, true),
            Some(Duration::from_millis(700))
        );
        assert_eq!(
            measured_plan.hedge_delay(&measured, false, true),
            Some(Duration::from_millis(2300))
        );
        assert_eq!(measured_plan.hedge_delay(&measured, true, false), None);
        let unmeasured = [candidate("a", None), candidate("b", None)];
        assert_eq!(
            plan(&unmeasured).hedge_delay(&unmeasured, true, true),
            Some(Duration::from_millis(2300))
        );
    }
}
