//! Ollama's model store routes: `DELETE /api/delete`, `POST /api/copy`, `POST /api/create` (from a
//! model or from uploaded blobs), `POST /api/push`, `HEAD`/`POST /api/blobs/:digest`, with Ollama's
//! status codes and progress lines. Blobs are checked against their digest and kept as sizes only, or,
//! with `EmulatorConfig::store`, written in Ollama's layout on disk.

use std::path::{Path as FilePath, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::Digest;

use super::{EmulatorState, digest_of, error, line, lock, normalize, parse_body};

/// The request's JSON and the name in its `field`, or the error Ollama would answer.
fn naming(body: &Bytes, field: &str) -> Result<(Value, String), Box<Response>> {
    let request = parse_body(body)?;
    let name = named(&request, field)?;
    Ok((request, name))
}

/// The name in `field` (or `name`, Ollama's older spelling), normalized.
fn named(request: &Value, field: &str) -> Result<String, Box<Response>> {
    request
        .get(field)
        .or_else(|| request.get("name"))
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .map(normalize)
        .ok_or_else(|| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                format!("{field} is required"),
            ))
        })
}

fn not_found(model: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("model '{model}' not found"))
}

/// Ollama's progress lines: streamed as NDJSON, or only the last one when `stream` is false.
fn progress(request: &Value, lines: Vec<Value>) -> Response {
    if request.get("stream").and_then(Value::as_bool) == Some(false) {
        return axum::Json(lines.last().cloned().unwrap_or(json!({}))).into_response();
    }
    let body: Vec<u8> = lines
        .iter()
        .flat_map(|value| line(value).to_vec())
        .collect();
    ([("content-type", "application/x-ndjson")], body).into_response()
}

pub(super) async fn delete(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    let (_, model) = match naming(&body, "model") {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    let mut models = lock(&state.models);
    let before = models.len();
    models.retain(|name| *name != model);
    if models.len() == before {
        return not_found(&model);
    }
    if let Some(root) = &state.config.store {
        let _ = std::fs::remove_file(manifest_path(root, &model));
    }
    StatusCode::OK.into_response()
}

pub(super) async fn copy(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    let (request, source) = match naming(&body, "source") {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    let destination = match named(&request, "destination") {
        Ok(destination) => destination,
        Err(response) => return *response,
    };
    let mut models = lock(&state.models);
    if !models.contains(&source) {
        return not_found(&source);
    }
    if let Some(root) = &state.config.store {
        let to = manifest_path(root, &destination);
        if let Some(parent) = to.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::copy(manifest_path(root, &source), to);
    }
    if !models.contains(&destination) {
        models.push(destination);
    }
    StatusCode::OK.into_response()
}

pub(super) async fn create(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    let (request, model) = match naming(&body, "model") {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    let mut lines = Vec::new();
    if let Some(from) = request.get("from").and_then(Value::as_str) {
        let from = normalize(from);
        if !state.has_model(&from) {
            return not_found(&from);
        }
        lines.push(json!({"status": format!("using existing layer sha256:{}", digest_of(&from))}));
    }
    if let Some(files) = request.get("files").and_then(Value::as_object) {
        let blobs = lock(&state.blobs);
        for digest in files.values() {
            let digest = digest.as_str().unwrap_or_default();
            let Some(size) = blobs.get(digest) else {
                return error(StatusCode::BAD_REQUEST, format!("missing blob {digest}"));
            };
            lines.push(json!({"status": format!("using existing layer {digest}")}));
            if let Some(root) = &state.config.store
                && let Err(why) = write_manifest(root, &model, digest, *size)
            {
                return error(StatusCode::INTERNAL_SERVER_ERROR, why.to_string());
            }
        }
    }
    lines.push(json!({"status": "writing manifest"}));
    lines.push(json!({"status": "success"}));
    {
        let mut models = lock(&state.models);
        if !models.contains(&model) {
            models.push(model);
        }
    }
    progress(&request, lines)
}

pub(super) async fn push(State(state): State<Arc<EmulatorState>>, body: Bytes) -> Response {
    let (request, model) = match naming(&body, "model") {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    if !state.has_model(&model) {
        return not_found(&model);
    }
    state.pushes.fetch_add(1, Ordering::Relaxed);
    let digest = format!("sha256:{}", digest_of(&model));
    let total = 4_096u64;
    progress(
        &request,
        vec![
            json!({"status": "retrieving manifest"}),
            json!({"status": format!("pushing {}", &digest[7..19]), "digest": digest, "total": total, "completed": total}),
            json!({"status": "pushing manifest"}),
            json!({"status": "success"}),
        ],
    )
}

pub(super) async fn blob_exists(
    State(state): State<Arc<EmulatorState>>,
    Path(digest): Path<String>,
) -> StatusCode {
    if lock(&state.blobs).contains_key(&digest) {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

pub(super) async fn blob_upload(
    State(state): State<Arc<EmulatorState>>,
    Path(digest): Path<String>,
    body: Bytes,
) -> Response {
    let actual = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
    if actual != digest {
        return error(
            StatusCode::BAD_REQUEST,
            format!("digest mismatch, expected \"{digest}\", got \"{actual}\""),
        );
    }
    if let Some(root) = &state.config.store
        && let Err(why) = write_blob(root, &digest, &body)
    {
        return error(StatusCode::INTERNAL_SERVER_ERROR, why.to_string());
    }
    lock(&state.blobs).insert(digest, body.len() as u64);
    StatusCode::CREATED.into_response()
}

/// A pulled model written into the store at `root`: a blob of `size` bytes made from its name, and its
/// manifest. The layer's digest and size, as the pull reports them.
pub(super) fn write_pulled(
    root: &FilePath,
    model: &str,
    size: u64,
) -> std::io::Result<(String, u64)> {
    let seed = sha2::Sha256::digest(model.as_bytes());
    let bytes: Vec<u8> = seed.iter().copied().cycle().take(size as usize).collect();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
    write_blob(root, &digest, &bytes)?;
    write_manifest(root, model, &digest, size)?;
    Ok((digest, size))
}

fn write_blob(root: &FilePath, digest: &str, bytes: &[u8]) -> std::io::Result<()> {
    let blobs = root.join("blobs");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(blobs.join(digest.replace(':', "-")), bytes)
}

/// `manifests/registry.ollama.ai/NAMESPACE/MODEL/TAG`, Ollama's place for a model's manifest.
fn manifest_path(root: &FilePath, model: &str) -> PathBuf {
    let (name, tag) = model.rsplit_once(':').unwrap_or((model, "latest"));
    let (namespace, name) = name.split_once('/').unwrap_or(("library", name));
    root.join("manifests")
        .join("registry.ollama.ai")
        .join(namespace)
        .join(name)
        .join(tag)
}

fn write_manifest(root: &FilePath, model: &str, digest: &str, size: u64) -> std::io::Result<()> {
    let path = manifest_path(root, model);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let manifest = json!({
        "schemaVersion": 2,
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": size}],
    });
    std::fs::write(path, manifest.to_string())
}
