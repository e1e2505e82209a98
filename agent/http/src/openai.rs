//! OpenAI's error shape on the OpenAI-compatible routes: `{"error": {"message", "type", "param",
//! "code"}}`, as Ollama answers there and as the OpenAI clients read (given Ollama's `{"error": "..."}`
//! they show only "Error code: 400"). A layer over `/v1/...` routes that rewrites an error answer
//! whose `error` is a string; one already in OpenAI's shape (a node's, passed through) is left alone.

use axum::body::{Body, to_bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::{Value, json};

/// Error bodies larger than this are passed through as they are.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The layer: `axum::middleware::from_fn(sollol_http::openai::errors)`.
pub async fn errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || !is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_ERROR_BODY).await else {
        // Too large or broken: nothing sensible to rewrite.
        return Response::from_parts(parts, Body::empty());
    };
    let rewritten = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|value| {
            value
                .get("error")?
                .as_str()
                .map(|message| openai_error(status, message))
        });
    let Some(rewritten) = rewritten else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let body = serde_json::to_vec(&rewritten).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// [`errors`] on requests under `/v1/` only, for a server whose other routes are Ollama's: the
/// outermost layer, so refusals of the layers inside it (keys, rate limits, the browser boundary) are
/// reshaped too.
pub async fn errors_under_v1(request: Request, next: Next) -> Response {
    if request.uri().path().starts_with("/v1/") {
        errors(request, next).await
    } else {
        next.run(request).await
    }
}

/// OpenAI's error object for `status` (the types Ollama uses: 400 invalid request, 404 not found,
/// anything else an API error).
pub fn openai_error(status: StatusCode, message: &str) -> Value {
    let kind = match status {
        StatusCode::BAD_REQUEST => "invalid_request_error",
        StatusCode::NOT_FOUND => "not_found_error",
        _ => "api_error",
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn answer(router: Router, path: &str) -> (StatusCode, Value) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let body = to_bytes(response.into_body(), 1 << 20).await.expect("body");
        (status, serde_json::from_slice(&body).expect("json"))
    }

    #[tokio::test]
    async fn ollama_errors_become_openai_errors_and_others_pass() {
        let router = Router::new()
            .route(
                "/ollama",
                get(|| async { (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "no"}))) }),
            )
            .route(
                "/openai",
                get(|| async {
                    (
                        StatusCode::NOT_FOUND,
                        axum::Json(json!({"error": {"message": "gone", "type": "x"}})),
                    )
                }),
            )
            .route(
                "/fine",
                get(|| async { axum::Json(json!({"error": "not an error: status 200"})) }),
            )
            .layer(axum::middleware::from_fn(errors));
        let (status, body) = answer(router.clone(), "/ollama").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body,
            json!({"error": {"message": "no", "type": "invalid_request_error", "param": null, "code": null}})
        );
        let (_, body) = answer(router.clone(), "/openai").await;
        assert_eq!(body, json!({"error": {"message": "gone", "type": "x"}}));
        let (_, body) = answer(router, "/fine").await;
        assert_eq!(body, json!({"error": "not an error: status 200"}));
    }
}
