//! The part of a model a stage holds: describing the node's copy of a model, loading a part from a
//! copy matched by digest (or fetching it), connecting to the next stage, and the file's header.

use std::sync::{Arc, PoisonError};
use std::time::Instant;

use sollol_shared::layers::{PartSpec, StageReply};
use sollol_shared::protocol::RefusalCode;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::{LoadedPart, Stage, dial, refusal, resident_bytes};
use sollol_engine::engine::{self, ModelFile};
use sollol_engine::gguf::Gguf;
use sollol_engine::model::{Model, Part, Shape};

impl Stage {
    /// Describes this node's copy of `model` (its digest and layers), or says it lacks one; either way
    /// with the memory it offers.
    pub(super) async fn describe(&self, model: &str) -> StageReply {
        let files = self.files().await;
        let wanted = sollol_shared::model_name::normalize(model);
        let Some(file) = files.iter().find(|file| file.name == wanted) else {
            tracing::info!(model = %wanted, has = %names(&files), "no copy of the model here: a plan can still fetch a part");
            return StageReply::Lacking {
                free_memory_bytes: self.offered_memory(),
            };
        };
        let (digest, manifest) = match self.copy_of(file).await {
            Ok(copy) => copy,
            Err(message) => return refusal(RefusalCode::ModelMissing, message),
        };
        let path = file.path.clone();
        let layers = tokio::task::spawn_blocking(move || -> Result<usize, String> {
            let gguf = Gguf::open(&path).map_err(|error| error.to_string())?;
            Ok(Shape::read(&gguf)
                .map_err(|error| error.to_string())?
                .layers)
        })
        .await
        .map_err(|error| error.to_string())
        .and_then(|layers| layers);
        match layers {
            Ok(layers) => StageReply::Described {
                digest,
                manifest: manifest.digest(),
                layers: u32::try_from(layers).unwrap_or(u32::MAX),
                file_bytes: file.size_bytes,
                free_memory_bytes: self.offered_memory(),
            },
            Err(message) => refusal(
                RefusalCode::BadRequest,
                format!("{wanted} on {}: {message}", self.settings.node_name),
            ),
        }
    }

    /// Loads `spec` (fetching what it lacks from `sources`, with [`StageReply::Fetching`] on `progress`)
    /// and connects to `next`.
    pub(super) async fn load(
        &self,
        spec: PartSpec,
        next: Option<String>,
        sources: Vec<String>,
        progress: &mpsc::Sender<StageReply>,
    ) -> StageReply {
        let started = Instant::now();
        let mut fetched_bytes = 0;
        let mut part = self.part.lock().await;
        if part.as_ref().is_none_or(|loaded| loaded.spec != spec) {
            let wanted = sollol_shared::model_name::normalize(&spec.model);
            let file = match self.find_copy(&wanted, &spec.digest).await {
                Ok(Some(file)) => file,
                Ok(None) => match self.partial_copy(&spec, &sources, progress).await {
                    Ok((file, fetched)) => {
                        fetched_bytes = fetched;
                        file
                    }
                    Err(message) => {
                        return refusal(
                            RefusalCode::ModelMissing,
                            format!(
                                "node {} has no copy of {wanted} ({}) and could not fetch its part: {message}",
                                self.settings.node_name, spec.digest
                            ),
                        );
                    }
                },
                Err(reply) => return reply,
            };
            // The old part's memory goes before the new one is read.
            *part = None;
            self.sequences
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            let load_spec = spec.clone();
            let path = file.path.clone();
            let loaded = tokio::task::spawn_blocking(move || -> Result<Model, String> {
                let gguf = Gguf::open(&path).map_err(|error| error.to_string())?;
                Model::load(
                    &path,
                    &gguf,
                    Part {
                        embed: load_spec.embed,
                        layers: load_spec.start as usize..load_spec.end as usize,
                        head: load_spec.head,
                    },
                )
                .map_err(|error| error.to_string())
            })
            .await
            .map_err(|error| error.to_string())
            .and_then(|model| model);
            match loaded {
                Ok(model) => {
                    tracing::info!(model = %wanted, layers = ?(spec.start..spec.end), embed = spec.embed, head = spec.head, "stage loaded its part");
                    *part = Some(Arc::new(LoadedPart { spec, file, model }));
                }
                Err(message) => {
                    return refusal(
                        RefusalCode::BadRequest,
                        format!(
                            "node {} cannot load {wanted}: {message}",
                            self.settings.node_name
                        ),
                    );
                }
            }
        }
        drop(part);
        if let Err(reply) = self.connect_next(next).await {
            return reply;
        }
        StageReply::Loaded {
            resident_bytes: resident_bytes(),
            load_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            fetched_bytes,
        }
    }

    /// Connects to the next stage at `next` (keeping the connection when it is there already), or drops
    /// the connection when this stage is the last; the refusal to answer when the next one is out of reach.
    async fn connect_next(&self, next: Option<String>) -> Result<(), StageReply> {
        let mut link = self.next.lock().await;
        match next {
            None => *link = None,
            Some(address) => {
                if link.as_ref().is_none_or(|(linked, _)| *linked != address) {
                    match dial(
                        &address,
                        &self.settings.token,
                        self.settings.handshake_timeout,
                    )
                    .await
                    {
                        Ok((stream, _)) => {
                            let (mut reader, writer) = stream.into_split();
                            // The next stage answers the coordinator, not us: drain whatever comes.
                            tokio::spawn(async move {
                                let mut sink = [0u8; 4096];
                                while matches!(reader.read(&mut sink).await, Ok(read) if read > 0) {
                                }
                            });
                            *link = Some((address, writer));
                        }
                        Err(error) => {
                            *link = None;
                            return Err(refusal(
                                RefusalCode::BadRequest,
                                format!(
                                    "node {} cannot reach the next stage: {error}",
                                    self.settings.node_name
                                ),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The header of the file with `digest` (any copy holding it), or of the loaded part's file.
    pub(super) async fn header(&self, digest: Option<String>) -> StageReply {
        let (path, tensors) = match digest {
            Some(digest) => match self.copy_holding(&digest, &[]).await {
                Some(holding) => holding,
                None => {
                    return refusal(
                        RefusalCode::ModelMissing,
                        format!("node {} has no copy of {digest}", self.settings.node_name),
                    );
                }
            },
            None => match self.part.lock().await.as_ref() {
                Some(part) => (part.file.path.clone(), Vec::new()),
                None => {
                    return refusal(
                        RefusalCode::BadRequest,
                        "no model part is loaded on this stage",
                    );
                }
            },
        };
        let read = tokio::task::spawn_blocking(move || engine::header_bytes(&path))
            .await
            .map_err(|error| error.to_string())
            .and_then(|read| read.map_err(|error| error.to_string()));
        match read {
            Ok((bytes, file_bytes)) => StageReply::Header {
                bytes,
                file_bytes,
                tensors,
            },
            Err(message) => refusal(RefusalCode::BadRequest, message),
        }
    }
}

/// The files' model names, for the logs.
fn names(files: &[ModelFile]) -> String {
    if files.is_empty() {
        return "none".to_owned();
    }
    files
        .iter()
        .map(|file| file.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
