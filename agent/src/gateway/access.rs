//! Who may call what: API keys and their scopes (inference, admin), the routes open to everyone, and
//! the dashboard's sign-in, whose session cookie stands in for a key. `authenticate` is the gateway's
//! middleware; the sessions themselves are kept by `session`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sollol_shared::api::API_PREFIX;

use super::proxy::ApiKeyName;
use super::session;
use super::{ApiError, GatewayState};
use crate::config::{ApiKey, KeyScope};

impl GatewayState {
    /// Digests of the configured API keys, as `api_keys` holds them.
    pub fn digest_keys(api_keys: &[ApiKey]) -> Vec<([u8; 32], String, KeyScope)> {
        api_keys
            .iter()
            .map(|key| (key_digest(&key.key), key.name.clone(), key.scope))
            .collect()
    }
}

/// Routes that change the cluster: only admin keys may call them when keys are on (Ollama's model
/// management, which the gateway forwards or refuses, planning distributed models, setting replicas).
fn changes_the_cluster(method: &axum::http::Method, path: &str) -> bool {
    matches!(
        path,
        "/api/pull" | "/api/delete" | "/api/copy" | "/api/create" | "/api/push"
    ) || path.starts_with("/api/blobs/")
        || (method == axum::http::Method::POST
            && path.starts_with(API_PREFIX)
            && path.ends_with("/plan"))
        || (method != axum::http::Method::GET
            && path.starts_with(&format!("{API_PREFIX}/replicas")))
}

/// Routes anyone may call, keys or not: liveness, the dashboard's static files (they hold no data)
/// and its sign-in.
fn is_public(path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/readyz" | "/dashboard")
        || path.starts_with("/dashboard/")
        || path == SESSION_PATH
}

pub(super) const SESSION_PATH: &str = "/api/sollol/v1/session";

impl GatewayState {
    /// The name and scope of a configured key. Comparing digests keeps the comparison's timing
    /// independent of how much of a key matched.
    fn key(&self, presented: &str) -> Option<(String, KeyScope)> {
        let digest = key_digest(presented);
        self.api_keys
            .iter()
            .find(|(known, ..)| *known == digest)
            .map(|(_, name, scope)| (name.clone(), *scope))
    }

    /// The signed-in dashboard session the request's cookie names, if any.
    fn session_of(&self, headers: &axum::http::HeaderMap) -> Option<(String, KeyScope)> {
        session_id(headers).and_then(|id| self.sessions.find(id))
    }
}

/// The session id a request's `Cookie` headers carry, if any.
fn session_id(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(session::cookie_value)
}

fn key_digest(key: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// With API keys configured, every non-public route needs `Authorization: Bearer KEY` or `X-API-Key: KEY`.
pub(super) async fn authenticate(
    State(state): State<Arc<GatewayState>>,
    mut request: Request,
    next: Next,
) -> Response {
    if state.api_keys.is_empty() || is_public(request.uri().path()) {
        return next.run(request).await;
    }
    let headers = request.headers();
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .or_else(|| {
            headers
                .get("x-api-key")
                .and_then(|value| value.to_str().ok())
        })
        .map(str::trim);
    let found = match presented {
        Some(key) => state.key(key),
        // The dashboard, signed in: its cookie (only ever sent by pages of this origin).
        None => state.session_of(headers),
    };
    match found {
        Some((name, KeyScope::Inference))
            if changes_the_cluster(request.method(), request.uri().path()) =>
        {
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "key {name:?} may generate and read but not change the cluster: use a key from coordinator.admin_keys"
                ),
            )
            .into_response()
        }
        Some((name, _)) => {
            request.extensions_mut().insert(ApiKeyName(name));
            next.run(request).await
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or invalid API key: send Authorization: Bearer KEY or X-API-Key: KEY",
        )
        .into_response(),
    }
}

/// `GET /api/sollol/v1/session`: whether keys are needed, and who this browser is signed in as.
pub(super) async fn session_status(
    State(state): State<Arc<GatewayState>>,
    headers: axum::http::HeaderMap,
) -> Json<sollol_shared::api::SessionStatus> {
    Json(sollol_shared::api::SessionStatus {
        keys_required: !state.api_keys.is_empty(),
        signed_in_as: state.session_of(&headers).map(|(name, _)| name),
    })
}

/// `POST /api/sollol/v1/session` with `{"key": KEY}`: a dashboard signs in; the answer sets the
/// session cookie. The key itself is not kept.
pub(super) async fn sign_in(
    State(state): State<Arc<GatewayState>>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(request) = serde_json::from_slice::<sollol_shared::api::SignIn>(&body) else {
        return ApiError::new(StatusCode::BAD_REQUEST, "send {\"key\": \"...\"}").into_response();
    };
    if state.api_keys.is_empty() {
        return Json(sollol_shared::api::SessionStatus {
            keys_required: false,
            signed_in_as: None,
        })
        .into_response();
    }
    let Some((name, scope)) = state.key(request.key.trim()) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "that is not one of this gateway's API keys",
        )
        .into_response();
    };
    let id = state.sessions.start(name.clone(), scope);
    let mut response = Json(sollol_shared::api::SessionStatus {
        keys_required: true,
        signed_in_as: Some(name),
    })
    .into_response();
    if let Ok(cookie) = axum::http::HeaderValue::from_str(&session::set_cookie(Some(&id))) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// `DELETE /api/sollol/v1/session`: signs this browser out.
pub(super) async fn sign_out(
    State(state): State<Arc<GatewayState>>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(id) = session_id(&headers) {
        state.sessions.end(id);
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(cookie) = axum::http::HeaderValue::from_str(&session::set_cookie(None)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}
