//! The model catalogue: which GGUF models exist on this machine and what their headers say.
//!
//! Models come from a models directory (`*.gguf`, named after the file) and
//! from Ollama's own store (manifests pointing at GGUF blobs). Nothing here loads weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::gguf::{Gguf, GgufError};

/// A model the engine can serve.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFile {
    /// Ollama-style `name:tag`.
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub modified: SystemTime,
    /// `sha256:...` for Ollama blobs, else a digest of the path and size.
    pub digest: String,
    /// From the file's header, read at discovery; `None` when the header does not read.
    pub details: Option<ModelDetails>,
}

/// What an Ollama `details` object says about a model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelDetails {
    pub family: String,
    pub parameter_size: String,
    pub quantization_level: String,
    pub chat_template: Option<String>,
    pub context_length: usize,
}

/// Finds GGUF models in `models_dir` and in Ollama's store under `ollama_dir`, sorted by name.
pub fn discover(models_dir: &Path, ollama_dir: Option<&Path>) -> Vec<ModelFile> {
    let mut found = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(models_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|extension| extension.to_str()) != Some("gguf") {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|stem| stem.to_str()) else {
                continue;
            };
            let name = if stem.contains(':') {
                stem.to_lowercase()
            } else {
                format!("{}:latest", stem.to_lowercase())
            };
            if let Some(file) = model_file(name, &path, None) {
                found.insert(file.name.clone(), file);
            }
        }
    }
    if let Some(ollama_dir) = ollama_dir {
        for file in ollama_models(ollama_dir) {
            found.entry(file.name.clone()).or_insert(file);
        }
    }
    found.into_values().collect()
}

fn model_file(name: String, path: &Path, digest: Option<String>) -> Option<ModelFile> {
    let metadata = std::fs::metadata(path).ok()?;
    if !metadata.is_file() {
        return None;
    }
    let digest = digest.unwrap_or_else(|| {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(format!("{}:{}", path.display(), metadata.len()));
        format!("sha256:{}", hex::encode(hash))
    });
    Some(ModelFile {
        name,
        path: path.to_owned(),
        size_bytes: metadata.len(),
        modified: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        digest,
        details: describe(path),
    })
}

/// Ollama's store: `manifests/<registry>/<namespace>/<model>/<tag>` JSON naming a model layer blob.
fn ollama_models(root: &Path) -> Vec<ModelFile> {
    let mut found = Vec::new();
    let manifests = root.join("manifests");
    let mut stack = vec![manifests.clone()];
    while let Some(directory) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(relative) = path.strip_prefix(&manifests) else {
                continue;
            };
            let parts: Vec<&str> = relative.iter().filter_map(|part| part.to_str()).collect();
            let [registry, namespace, model, tag] = parts.as_slice() else {
                continue;
            };
            let name = if *registry == "registry.ollama.ai" && *namespace == "library" {
                format!("{model}:{tag}")
            } else {
                format!("{registry}/{namespace}/{model}:{tag}")
            };
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(manifest) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let digest = manifest["layers"].as_array().and_then(|layers| {
                layers
                    .iter()
                    .find(|layer| layer["mediaType"] == "application/vnd.ollama.image.model")
                    .and_then(|layer| layer["digest"].as_str())
            });
            // A manifest's digest names a file: only `sha256:` and 64 hex digits may (CVE-2024-37032).
            let digest = digest.and_then(|digest| {
                sollol_shared::digest::Sha256Digest::parse(digest)
                    .inspect_err(|reason| tracing::warn!(manifest = %path.display(), %reason, "manifest skipped"))
                    .ok()
            });
            if let Some(digest) = digest {
                let blob = root.join("blobs").join(digest.file_stem());
                if let Some(file) = model_file(name, &blob, Some(digest.to_string())) {
                    found.push(file);
                }
            }
        }
    }
    found
}

/// `sha256:…` of the file's content (what distributed stages match their copies by).
pub fn content_digest(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// The GGUF file's bytes before its first tensor (header, metadata, tensor directory) and its length:
/// enough to read the tokenizer and template without the weights.
pub fn header_bytes(path: &Path) -> Result<(Vec<u8>, u64), GgufError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(GgufError::Io)?;
    let length = file.metadata().map_err(GgufError::Io)?.len();
    let gguf = Gguf::read(std::io::BufReader::new(&file), length)?;
    let end = gguf
        .tensors
        .iter()
        .map(|tensor| tensor.offset)
        .min()
        .unwrap_or(length);
    let mut bytes = Vec::new();
    std::io::BufReader::new(std::fs::File::open(path).map_err(GgufError::Io)?)
        .take(end)
        .read_to_end(&mut bytes)
        .map_err(GgufError::Io)?;
    Ok((bytes, length))
}

/// What the header of the GGUF at `path` says about the model, without loading it.
pub fn describe(path: &Path) -> Option<ModelDetails> {
    let gguf = Gguf::open(path).ok()?;
    let context = crate::model::Shape::read(&gguf).ok()?.context;
    Some(details_of(&gguf, context))
}

pub(crate) fn details_of(gguf: &Gguf, context_length: usize) -> ModelDetails {
    let architecture = gguf
        .str("general.architecture")
        .unwrap_or("unknown")
        .to_owned();
    let parameter_size = gguf
        .str("general.size_label")
        .map(str::to_owned)
        .unwrap_or_else(|_| {
            let parameters: u64 = gguf
                .tensors
                .iter()
                .map(|tensor| tensor.dims.iter().product::<u64>())
                .sum();
            if parameters >= 1_000_000_000 {
                format!("{:.1}B", parameters as f64 / 1e9)
            } else {
                format!("{}M", parameters / 1_000_000)
            }
        });
    let quantization_level = gguf
        .tensors
        .iter()
        .find(|tensor| tensor.name == "blk.0.attn_q.weight")
        .and_then(|tensor| crate::gguf::type_name(tensor.ggml_type))
        .unwrap_or("unknown")
        .to_owned();
    ModelDetails {
        family: architecture,
        parameter_size,
        quantization_level,
        chat_template: gguf.str("tokenizer.chat_template").ok().map(str::to_owned),
        context_length,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_found_in_a_directory_and_in_ollamas_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("Tiny-Model.gguf"), b"GGUF").expect("write");
        std::fs::write(dir.path().join("notes.txt"), b"x").expect("write");
        let store = dir.path().join("ollama");
        let manifest_dir = store.join("manifests/registry.ollama.ai/library/smollm2");
        std::fs::create_dir_all(&manifest_dir).expect("dirs");
        std::fs::create_dir_all(store.join("blobs")).expect("dirs");
        let hex = "ab".repeat(32);
        std::fs::write(store.join(format!("blobs/sha256-{hex}")), b"GGUF").expect("write");
        let manifest = |digest: &str| {
            format!(
                r#"{{"layers":[{{"mediaType":"application/vnd.ollama.image.model","digest":"{digest}"}}]}}"#
            )
        };
        std::fs::write(
            manifest_dir.join("135m"),
            manifest(&format!("sha256:{hex}")),
        )
        .expect("write");
        // A hostile manifest whose digest walks out of the blobs directory to a GGUF elsewhere.
        std::fs::write(store.join("outside.gguf"), b"GGUF").expect("write");
        std::fs::write(manifest_dir.join("evil"), manifest("../outside.gguf")).expect("write");
        let names: Vec<String> = discover(dir.path(), Some(&store))
            .into_iter()
            .map(|file| file.name)
            .collect();
        assert_eq!(names, ["smollm2:135m", "tiny-model:latest"]);
    }
}
