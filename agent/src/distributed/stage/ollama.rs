//! Handing a copied model to the node's Ollama: the blob uploaded (`POST /api/blobs/:digest`, streamed
//! from the file), then the model created from it (`POST /api/create` with `files`), as Ollama's own
//! clients create a model from a GGUF.

use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sollol_shared::digest::Sha256Digest;
use tokio::io::AsyncReadExt;

use crate::http_client::error_chain;

/// How long Ollama may take to answer once the upload is sent (it hashes the blob again), and to create
/// the model.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether the Ollama at `url` has `model` (`POST /api/show` answers 200).
pub(super) async fn has(url: &str, model: &str) -> bool {
    let client: Client<HttpConnector, Body> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let Ok(request) = hyper::Request::post(format!("{url}/api/show"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"model": model}).to_string()))
    else {
        return false;
    };
    exchange(&client, request).await.is_ok()
}

/// Uploads the file at `path` (content `digest`) to the Ollama at `url` and creates `model` from it.
pub(super) async fn install(
    url: &str,
    model: &str,
    digest: &Sha256Digest,
    path: &Path,
) -> Result<(), String> {
    let client: Client<HttpConnector, Body> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|error| error.to_string())?;
    let length = file
        .metadata()
        .await
        .map_err(|error| error.to_string())?
        .len();
    let chunks = futures_util::stream::unfold(file, |mut file| async move {
        let mut buffer = vec![0u8; 1 << 20];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((
                    Ok::<_, std::io::Error>(hyper::body::Bytes::from(buffer)),
                    file,
                ))
            }
            Err(error) => Some((Err(error), file)),
        }
    });
    let upload = hyper::Request::post(format!("{url}/api/blobs/{digest}"))
        .header(hyper::header::CONTENT_LENGTH, length)
        .body(Body::from_stream(chunks))
        .map_err(|error| error.to_string())?;
    exchange(&client, upload).await?;
    let create = json!({
        "model": model,
        "files": { "model.gguf": digest.as_str() },
        "stream": false,
    });
    let create = hyper::Request::post(format!("{url}/api/create"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Body::from(create.to_string()))
        .map_err(|error| error.to_string())?;
    let answer = exchange(&client, create).await?;
    match serde_json::from_slice::<Value>(&answer)
        .ok()
        .and_then(|value| value.get("error")?.as_str().map(str::to_owned))
    {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Sends `request`; the body of a 2xx answer, else the error Ollama gave.
async fn exchange(
    client: &Client<HttpConnector, Body>,
    request: hyper::Request<Body>,
) -> Result<hyper::body::Bytes, String> {
    let path = request.uri().path().to_owned();
    let answered = async {
        let answer = client
            .request(request)
            .await
            .map_err(|error| error_chain(&error))?;
        let status = answer.status();
        let body = answer
            .into_body()
            .collect()
            .await
            .map_err(|error| error_chain(&error))?
            .to_bytes();
        if status.is_success() {
            return Ok(body);
        }
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|value| value.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
        Err(format!("{path} answered {}: {message}", status.as_u16()))
    };
    tokio::time::timeout(ANSWER_TIMEOUT, answered)
        .await
        .map_err(|_| {
            format!(
                "{path} did not answer within {} s",
                ANSWER_TIMEOUT.as_secs()
            )
        })?
}
