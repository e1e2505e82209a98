//! Stages that lack the model file: fetching just a part's tensors from a peer into a partial copy
//! ([`crate::distributed::partial`]), and serving tensors to such stages.

use std::path::Path;

use sollol_shared::layers::{MAX_LAYER_FRAME_BYTES, PartSpec, StageReply, StageRequest};
use sollol_shared::protocol::RefusalCode;
use tokio::sync::mpsc;

use super::{Stage, dial, refusal};
use crate::cluster::wire;
use crate::distributed::manifest::{self, TensorManifest};
use crate::distributed::partial::{self, PartialCopy};
use sollol_engine::engine::ModelFile;
use sollol_engine::gguf::Gguf;

/// Bytes between two [`StageReply::Fetching`] reports.
const PROGRESS_EVERY: u64 = 4 << 20;

impl Stage {
    /// The part's tensors from the partial copy, fetching what it lacks from the first of `sources`
    /// that answers; the bytes fetched.
    pub(super) async fn partial_copy(
        &self,
        spec: &PartSpec,
        sources: &[String],
        progress: &mpsc::Sender<StageReply>,
    ) -> Result<(ModelFile, u64), String> {
        let models_dir = self.settings.models_dir.clone();
        let mut failures = Vec::new();
        let existing = PartialCopy::open(&models_dir, &spec.digest);
        if let Some(copy) = &existing
            && copy.manifest().digest() == spec.manifest
            && let Ok(names) = partial_names(&copy.path, spec)
            && copy.missing(&names).is_empty()
        {
            return Ok((self.partial_file(spec, &copy.path), 0));
        }
        for source in sources {
            match self.fetch(spec, source, progress).await {
                Ok(result) => return Ok(result),
                Err(message) => {
                    tracing::warn!(%source, %message, "fetching tensors from a peer failed");
                    failures.push(format!("{source}: {message}"));
                }
            }
        }
        Err(if failures.is_empty() {
            "no peer holding the file was named".to_owned()
        } else {
            failures.join("; ")
        })
    }

    fn partial_file(&self, spec: &PartSpec, path: &Path) -> ModelFile {
        ModelFile {
            name: sollol_shared::model_name::normalize(&spec.model),
            path: path.to_owned(),
            size_bytes: std::fs::metadata(path).map_or(0, |metadata| metadata.len()),
            modified: std::time::SystemTime::now(),
            digest: spec.digest.clone(),
            details: None,
        }
    }

    async fn fetch(
        &self,
        spec: &PartSpec,
        source: &str,
        progress: &mpsc::Sender<StageReply>,
    ) -> Result<(ModelFile, u64), String> {
        let (mut stream, peer) = dial(
            source,
            &self.settings.token,
            self.settings.handshake_timeout,
        )
        .await
        .map_err(|error| error.to_string())?;
        let request = StageRequest::Header {
            digest: Some(spec.digest.clone()),
        };
        wire::write_message(&mut stream, &request)
            .await
            .map_err(|error| error.to_string())?;
        let (header, file_bytes, tensors) =
            match wire::read_message_within::<StageReply, _>(&mut stream, MAX_LAYER_FRAME_BYTES)
                .await
                .map_err(|error| error.to_string())?
            {
                StageReply::Header {
                    bytes,
                    file_bytes,
                    tensors,
                } => (bytes, file_bytes, tensors),
                StageReply::Refused(refusal) => return Err(refusal.message),
                other => return Err(format!("unexpected answer {other:?}")),
            };
        // The header and the tensor hashes are what the plan's manifest names, or nothing is fetched.
        if manifest::digest_from_parts(&header, &tensors) != spec.manifest {
            return Err(format!(
                "the header and tensor hashes {} sent do not match the plan's manifest",
                peer.node_name
            ));
        }
        let manifest = TensorManifest {
            header: sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(
                &header,
            ))
            .into(),
            tensors,
        };
        let gguf = Gguf::read(std::io::Cursor::new(&header), file_bytes)
            .map_err(|error| error.to_string())?;
        if manifest.tensors.len() != gguf.tensors.len() {
            return Err(format!(
                "{} listed {} tensor hashes for {} tensors",
                peer.node_name,
                manifest.tensors.len(),
                gguf.tensors.len()
            ));
        }
        let names = partial::tensor_names(&gguf, spec);
        let models_dir = self.settings.models_dir.clone();
        let mut copy = match PartialCopy::open(&models_dir, &spec.digest) {
            Some(copy) if copy.manifest() == &manifest => copy,
            _ => PartialCopy::create(&models_dir, &spec.digest, &header, file_bytes, manifest)
                .map_err(|error| format!("cannot start a partial copy: {error}"))?,
        };
        let missing = copy.missing(&names);
        wire::write_message(
            &mut stream,
            &StageRequest::Tensors {
                digest: spec.digest.clone(),
                names: missing.clone(),
            },
        )
        .await
        .map_err(|error| error.to_string())?;
        let total_bytes: u64 = missing
            .iter()
            .filter_map(|name| gguf.tensor(name))
            .map(|info| info.size)
            .sum();
        let (mut fetched, mut reported) = (0u64, 0u64);
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        // The tensor being received and how many of its bytes came: chunks arrive in order, one tensor
        // at a time, or the fetch ends.
        let mut receiving: Option<(String, u64)> = None;
        loop {
            match wire::read_message_within::<StageReply, _>(&mut stream, MAX_LAYER_FRAME_BYTES)
                .await
                .map_err(|error| error.to_string())?
            {
                StageReply::TensorChunk {
                    name,
                    offset,
                    size,
                    bytes,
                    last,
                } => {
                    let expected_offset = match &receiving {
                        Some((current, received)) if *current == name => *received,
                        Some(_) => u64::MAX,
                        None => 0,
                    };
                    let end = offset.checked_add(bytes.len() as u64);
                    let info = gguf
                        .tensor(&name)
                        .filter(|info| {
                            info.size == size
                                && offset == expected_offset
                                && end.is_some_and(|end| end <= size && (end == size) == last)
                                && missing.contains(&name)
                        })
                        .ok_or_else(|| {
                            format!(
                                "{} sent a piece of tensor {name:?} that does not fit the file or comes out of order",
                                peer.node_name
                            )
                        })?;
                    copy.write_at(info.offset + offset, &bytes)
                        .map_err(|error| format!("cannot write the partial copy: {error}"))?;
                    sha2::Digest::update(&mut hasher, &bytes);
                    fetched += bytes.len() as u64;
                    // Every few MiB, and at the end.
                    if fetched - reported >= PROGRESS_EVERY || fetched == total_bytes {
                        reported = fetched;
                        let _ = progress
                            .send(StageReply::Fetching {
                                done_bytes: fetched,
                                total_bytes,
                            })
                            .await;
                    }
                    if last {
                        receiving = None;
                        let got: [u8; 32] = sha2::Digest::finalize_reset(&mut hasher).into();
                        if Some(got) != copy.manifest().tensor(&gguf, &name) {
                            return Err(format!(
                                "tensor {name:?} from {} does not match the plan's manifest",
                                peer.node_name
                            ));
                        }
                        copy.mark([name]).map_err(|error| error.to_string())?;
                    } else {
                        receiving = Some((name, end.unwrap_or(u64::MAX)));
                    }
                }
                StageReply::TensorsSent => break,
                StageReply::Refused(refusal) => return Err(refusal.message),
                other => return Err(format!("unexpected answer {other:?}")),
            }
        }
        let still = copy.missing(&names);
        if !still.is_empty() {
            return Err(format!(
                "{} did not send {} tensors",
                peer.node_name,
                still.len()
            ));
        }
        tracing::info!(peer = %peer.node_name, bytes = fetched, tensors = missing.len(), "fetched this stage's tensors from a peer");
        Ok((self.partial_file(spec, &copy.path), fetched))
    }

    /// Streams `names` of the file with `digest` in chunks, in order, each tensor's last chunk marked.
    pub(super) async fn send_tensors(
        &self,
        digest: &str,
        names: &[String],
        replies: &mpsc::Sender<StageReply>,
    ) {
        const CHUNK: u64 = 8 << 20;
        let Some((path, _)) = self.copy_holding(digest, names).await else {
            let _ = replies
                .send(refusal(
                    RefusalCode::ModelMissing,
                    format!(
                        "node {} has no copy of {digest} holding those tensors",
                        self.settings.node_name
                    ),
                ))
                .await;
            return;
        };
        let (sender, mut chunks) = mpsc::channel::<Result<StageReply, String>>(2);
        let names = names.to_vec();
        // File reads on a blocking thread, frames sent as they come (two chunks in flight at most).
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek};
            let read = || -> Result<(), String> {
                let mut file = std::fs::File::open(&path).map_err(|error| error.to_string())?;
                let length = file.metadata().map_err(|error| error.to_string())?.len();
                let gguf = Gguf::read(std::io::BufReader::new(&file), length)
                    .map_err(|error| error.to_string())?;
                for name in names {
                    let info = gguf
                        .tensor(&name)
                        .ok_or_else(|| format!("no tensor {name:?} in the file"))?;
                    let mut offset = 0;
                    file.seek(std::io::SeekFrom::Start(info.offset))
                        .map_err(|error| error.to_string())?;
                    loop {
                        let take = (info.size - offset).min(CHUNK);
                        let mut bytes = vec![0u8; take as usize];
                        file.read_exact(&mut bytes)
                            .map_err(|error| error.to_string())?;
                        let last = offset + take == info.size;
                        let chunk = StageReply::TensorChunk {
                            name: name.clone(),
                            offset,
                            size: info.size,
                            bytes,
                            last,
                        };
                        if sender.blocking_send(Ok(chunk)).is_err() {
                            return Ok(());
                        }
                        offset += take;
                        if last {
                            break;
                        }
                    }
                }
                Ok(())
            };
            if let Err(message) = read() {
                let _ = sender.blocking_send(Err(message));
            }
        });
        while let Some(chunk) = chunks.recv().await {
            let reply = chunk.unwrap_or_else(|message| refusal(RefusalCode::BadRequest, message));
            let refused = matches!(reply, StageReply::Refused(_));
            if replies.send(reply).await.is_err() || refused {
                return;
            }
        }
        let _ = replies.send(StageReply::TensorsSent).await;
    }
}

/// The tensors `spec` needs, read from the partial copy's own header.
fn partial_names(path: &Path, spec: &PartSpec) -> Result<Vec<String>, String> {
    let gguf = Gguf::open(path).map_err(|error| error.to_string())?;
    Ok(partial::tensor_names(&gguf, spec))
}
