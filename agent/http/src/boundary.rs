//! The browser boundary as an axum middleware: refuses a foreign `Origin` or (on a loopback server) a
//! foreign `Host` with 403 and Ollama's `{"error": ...}`, answers CORS preflights from allowed origins,
//! and marks their answers readable by the page, as Ollama does.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sollol_policy::browser::Boundary;

const ALLOWED_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS";
/// How long a browser may cache a preflight's answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";

/// Use as `axum::middleware::from_fn_with_state(Arc<Boundary>, guard)`.
pub async fn guard(
    State(boundary): State<Arc<Boundary>>,
    request: Request,
    next: Next,
) -> Response {
    let origin = match text(request.headers(), header::ORIGIN) {
        Ok(origin) => origin,
        Err(()) => return forbidden("the Origin header is not valid text".to_owned()),
    };
    // HTTP/1.1 clients send `Host`; a request in absolute form carries it in the URI instead.
    let host = match text(request.headers(), header::HOST) {
        Ok(host) => host.or_else(|| {
            request
                .uri()
                .authority()
                .map(|authority| authority.as_str().to_owned())
        }),
        Err(()) => return forbidden("the Host header is not valid text".to_owned()),
    };
    if let Err(refusal) = boundary.check(origin.as_deref(), host.as_deref()) {
        tracing::debug!(%refusal, "request from a browser refused");
        return forbidden(refusal.to_string());
    }
    let Some(origin) = origin.and_then(|origin| HeaderValue::from_str(&origin).ok()) else {
        return next.run(request).await;
    };
    if request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let requested_headers = request
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned();
        let mut answer = StatusCode::NO_CONTENT.into_response();
        let headers = answer.headers_mut();
        allow(headers, origin);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOWED_METHODS),
        );
        if let Some(requested) = requested_headers {
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
        }
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(PREFLIGHT_MAX_AGE),
        );
        return answer;
    }
    let mut response = next.run(request).await;
    allow(response.headers_mut(), origin);
    response
}

fn allow(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// The header's value as text; `Err` when it is there but not visible ASCII.
fn text(headers: &HeaderMap, name: header::HeaderName) -> Result<Option<String>, ()> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|text| Some(text.to_owned()))
            .map_err(|_| ()),
    }
}

fn forbidden(message: String) -> Response {
    (
        StatusCode::FORBIDDEN,
        axum::Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::post;

    /// One request through the router, as a connection would hand it over.
    async fn call(router: &Router, request: axum::http::Request<Body>) -> Response {
        use tower::ServiceExt;
        router.clone().oneshot(request).await.expect("infallible")
    }

    fn app() -> Router {
        let boundary = Arc::new(Boundary::new(
            std::net::IpAddr::from([127, 0, 0, 1]),
            &[],
            &[],
            "homelab",
        ));
        Router::new()
            .route("/api/generate", post(|| async { "ran" }))
            .layer(axum::middleware::from_fn_with_state(boundary, guard))
    }

    fn request(origin: Option<&str>, host: &str, method: Method) -> axum::http::Request<Body> {
        let mut builder = axum::http::Request::builder()
            .method(method)
            .uri("/api/generate")
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "text/plain");
        if let Some(origin) = origin {
            builder = builder.header(header::ORIGIN, origin);
        }
        builder.body(Body::from("{}")).expect("request")
    }

    #[tokio::test]
    async fn foreign_pages_are_refused_before_anything_runs() {
        let app = app();
        let refused = call(
            &app,
            request(Some("http://evil.example"), "localhost:11435", Method::POST),
        )
        .await;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let rebound = call(&app, request(None, "evil.example:11435", Method::POST)).await;
        assert_eq!(rebound.status(), StatusCode::FORBIDDEN);
        let plain = call(&app, request(None, "127.0.0.1:11435", Method::POST)).await;
        assert_eq!(plain.status(), StatusCode::OK);
        assert!(
            !plain
                .headers()
                .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        );
        let local = call(
            &app,
            request(
                Some("http://localhost:3000"),
                "127.0.0.1:11435",
                Method::POST,
            ),
        )
        .await;
        assert_eq!(local.status(), StatusCode::OK);
        assert_eq!(
            local.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "http://localhost:3000"
        );
    }

    #[tokio::test]
    async fn preflights_from_allowed_origins_are_answered() {
        let app = app();
        let mut preflight = request(
            Some("http://localhost:3000"),
            "127.0.0.1:11435",
            Method::OPTIONS,
        );
        preflight.headers_mut().insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("POST"),
        );
        preflight.headers_mut().insert(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            HeaderValue::from_static("content-type, authorization"),
        );
        let answer = call(&app, preflight).await;
        assert_eq!(answer.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            answer.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "content-type, authorization"
        );
        let mut foreign = request(
            Some("http://evil.example"),
            "127.0.0.1:11435",
            Method::OPTIONS,
        );
        foreign.headers_mut().insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("POST"),
        );
        assert_eq!(call(&app, foreign).await.status(), StatusCode::FORBIDDEN);
    }
}
