//! The node's copies of models: its model files and their content digests and tensor manifests (computed
//! once per path and length), the full copy matching a plan's digest, and a file (full or partial)
//! holding given tensors.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError};

use sollol_shared::layers::StageReply;
use sollol_shared::protocol::RefusalCode;

use super::{Stage, refusal};
use crate::distributed::manifest::TensorManifest;
use crate::distributed::partial::PartialCopy;
use sollol_engine::engine::{self, ModelFile};

impl Stage {
    /// The models this node has, with their content digests computed on demand.
    pub(super) async fn files(&self) -> Vec<ModelFile> {
        let models_dir = self.settings.models_dir.clone();
        let store = self.settings.ollama_store.clone();
        tokio::task::spawn_blocking(move || engine::discover(&models_dir, store.as_deref()))
            .await
            .unwrap_or_default()
    }

    /// `file`'s content digest.
    pub(super) async fn digest_of(&self, file: &ModelFile) -> Result<String, String> {
        self.copy_of(file).await.map(|(digest, _)| digest)
    }

    /// `file`'s content digest and tensor manifest, computed together once per path, length and
    /// modification time.
    pub(super) async fn copy_of(
        &self,
        file: &ModelFile,
    ) -> Result<(String, Arc<TensorManifest>), String> {
        let key = (file.path.clone(), file.size_bytes, file.modified);
        if let Some(known) = self
            .digests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(known.clone());
        }
        let path = file.path.clone();
        let (digest, manifest) = tokio::task::spawn_blocking(move || TensorManifest::read(&path))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| format!("cannot read {}: {error}", file.path.display()))?;
        let known = (digest, Arc::new(manifest));
        self.digests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, known.clone());
        Ok(known)
    }

    /// The local full copy of `wanted` with `digest`: `Ok(None)` when there is none, a refusal when the
    /// file named like the model has other content.
    pub(super) async fn find_copy(
        &self,
        wanted: &str,
        digest: &str,
    ) -> Result<Option<ModelFile>, StageReply> {
        let files = self.files().await;
        let mut named_digest = None;
        // The file named like the model first, then any file with the same content.
        let mut ordered: Vec<&ModelFile> = files.iter().filter(|f| f.name == wanted).collect();
        ordered.extend(files.iter().filter(|f| f.name != wanted));
        for file in ordered {
            match self.digest_of(file).await {
                Ok(found) if found == digest => return Ok(Some(file.clone())),
                Ok(found) if file.name == wanted => named_digest = Some(found),
                _ => {}
            }
        }
        match named_digest {
            Some(found) => Err(refusal(
                RefusalCode::DigestMismatch,
                format!(
                    "node {}'s copy of {wanted} is {found}, the plan needs {digest}",
                    self.settings.node_name
                ),
            )),
            None => Ok(None),
        }
    }

    /// A file holding the tensors `names` of the file with `digest` (a full copy, or a partial one that
    /// has them all), with the file's tensor hashes.
    pub(super) async fn copy_holding(
        &self,
        digest: &str,
        names: &[String],
    ) -> Option<(PathBuf, Vec<[u8; 32]>)> {
        for file in self.files().await {
            if let Ok((found, manifest)) = self.copy_of(&file).await
                && found == digest
            {
                return Some((file.path, manifest.tensors.clone()));
            }
        }
        PartialCopy::open(&self.settings.models_dir, digest)
            .filter(|copy| copy.missing(names).is_empty())
            .map(|copy| (copy.path.clone(), copy.tensors().to_vec()))
    }
}
