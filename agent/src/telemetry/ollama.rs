//! The node's Ollama server: version, installed models (`/api/tags`) and loaded models (`/api/ps`).

use std::time::Duration;

use serde::Deserialize;
use sollol_shared::hardware::{OllamaLoadedModel, OllamaModel, OllamaState};

use crate::http_client::HttpClient;

/// Ollama's own default address, probed when no URL is configured.
pub const DEFAULT_OLLAMA_URL: &str = "http://127.0.0.1:11434";

const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Probes one Ollama URL.
#[derive(Clone, Debug)]
pub struct OllamaProbe {
    url: String,
    /// A configured URL is always reported, reachable or not; the default one only when it answers.
    configured: bool,
    client: HttpClient,
}

impl OllamaProbe {
    pub fn new(configured_url: Option<&str>) -> Self {
        Self {
            url: configured_url
                .unwrap_or(DEFAULT_OLLAMA_URL)
                .trim_end_matches('/')
                .to_owned(),
            configured: configured_url.is_some(),
            client: HttpClient::default(),
        }
    }

    /// A probe of a server the coordinator polls among many (a configured or scanned Ollama): one
    /// connection for a probe's three requests, closed until the next probe, so a thousand servers do
    /// not hold a thousand connections' buffers in the coordinator.
    pub fn remote(url: &str) -> Self {
        Self {
            client: HttpClient::with_idle_connections(1, Duration::from_millis(250)),
            ..Self::new(Some(url))
        }
    }

    pub async fn sample(&self) -> Option<OllamaState> {
        let version = self
            .client
            .get_json::<VersionBody>(&format!("{}/api/version", self.url), PROBE_TIMEOUT)
            .await;
        let version = match version {
            Ok(body) => body.version,
            Err(error) if self.configured => {
                return Some(OllamaState {
                    url: self.url.clone(),
                    reachable: false,
                    error: Some(error.to_string()),
                    version: None,
                    models: Vec::new(),
                    loaded: Vec::new(),
                });
            }
            Err(_) => return None,
        };
        let tags_url = format!("{}/api/tags", self.url);
        let ps_url = format!("{}/api/ps", self.url);
        // One after the other: one kept-alive connection per server (a coordinator probes many).
        let tags = self
            .client
            .get_json::<TagsBody>(&tags_url, PROBE_TIMEOUT)
            .await;
        let ps = self.client.get_json::<PsBody>(&ps_url, PROBE_TIMEOUT).await;
        let error = [tags.as_ref().err(), ps.as_ref().err()]
            .into_iter()
            .flatten()
            .map(ToString::to_string)
            .reduce(|first, second| format!("{first}; {second}"));
        Some(OllamaState {
            url: self.url.clone(),
            reachable: true,
            error,
            version: Some(version),
            models: tags
                .map(|body| body.models.into_iter().map(OllamaModel::from).collect())
                .unwrap_or_default(),
            loaded: ps
                .map(|body| {
                    body.models
                        .into_iter()
                        .map(OllamaLoadedModel::from)
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

#[derive(Deserialize)]
struct VersionBody {
    version: String,
}

#[derive(Deserialize)]
struct TagsBody {
    #[serde(default)]
    models: Vec<TagEntry>,
}

#[derive(Deserialize)]
struct TagEntry {
    name: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    details: Details,
}

#[derive(Default, Deserialize)]
struct Details {
    family: Option<String>,
    parameter_size: Option<String>,
    quantization_level: Option<String>,
}

#[derive(Deserialize)]
struct PsBody {
    #[serde(default)]
    models: Vec<PsEntry>,
}

#[derive(Deserialize)]
struct PsEntry {
    name: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    size_vram: u64,
    expires_at: Option<String>,
}

impl From<TagEntry> for OllamaModel {
    fn from(entry: TagEntry) -> Self {
        Self {
            name: entry.name,
            size_bytes: entry.size,
            digest: entry.digest,
            family: entry.details.family.filter(|text| !text.is_empty()),
            parameter_size: entry.details.parameter_size.filter(|text| !text.is_empty()),
            quantization_level: entry
                .details
                .quantization_level
                .filter(|text| !text.is_empty()),
        }
    }
}

impl From<PsEntry> for OllamaLoadedModel {
    fn from(entry: PsEntry) -> Self {
        Self {
            name: entry.name,
            size_bytes: entry.size,
            vram_bytes: entry.size_vram,
            expires_at: entry.expires_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_ollamas_own_json() {
        let tags: TagsBody = serde_json::from_str(r#"{"models":[{"name":"llama3.2:1b","model":"llama3.2:1b","modified_at":"2025-01-01T00:00:00Z","size":1321098329,"digest":"baf6a787fdff","details":{"parent_model":"","format":"gguf","family":"llama","families":["llama"],"parameter_size":"1.2B","quantization_level":"Q8_0"}}]}"#).expect("tags");
        let model = OllamaModel::from(tags.models.into_iter().next().expect("one"));
        assert_eq!(model.name, "llama3.2:1b");
        assert_eq!(model.size_bytes, 1_321_098_329);
        assert_eq!(model.quantization_level.as_deref(), Some("Q8_0"));
        let ps: PsBody = serde_json::from_str(r#"{"models":[{"name":"llama3.2:1b","model":"llama3.2:1b","size":2000,"digest":"x","details":{},"expires_at":"2025-01-01T00:05:00Z","size_vram":1500}]}"#).expect("ps");
        let loaded = OllamaLoadedModel::from(ps.models.into_iter().next().expect("one"));
        assert_eq!((loaded.size_bytes, loaded.vram_bytes), (2000, 1500));
    }

    #[tokio::test]
    async fn unreachable_default_is_absent_but_configured_is_reported() {
        // Port 9 on loopback: nothing listens there on a test machine, so the connection is refused.
        let default_like = OllamaProbe {
            url: "http://127.0.0.1:9".to_owned(),
            configured: false,
            client: HttpClient::default(),
        };
        assert_eq!(default_like.sample().await, None);
        let configured = OllamaProbe::new(Some("http://127.0.0.1:9"));
        let state = configured.sample().await.expect("reported");
        assert!(!state.reachable);
        assert!(state.error.expect("error").contains("127.0.0.1:9"));
    }
}
