//! Partial copies of a model file: a stage without the GGUF fetches just its part's tensors from a peer
//! and keeps them here, once, for later loads.
//!
//! A partial copy is a sparse file of the original's length under `MODELS_DIR/.partial/`, named by the
//! file's digest: the header (metadata, tokenizer, tensor directory) at the start and each fetched
//! tensor at its own offset, holes elsewhere, so the GGUF reader and the model loader read it as the
//! original. Beside it: the file's tensor manifest (its header's and each tensor's SHA-256, whose digest
//! the plan named), and the list of tensors present; a tensor is listed only once its bytes are written
//! and their SHA-256 matched the manifest.

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sollol_shared::digest::Sha256Digest;
use sollol_shared::layers::PartSpec;

use sollol_engine::gguf::Gguf;

use crate::distributed::manifest::TensorManifest;

/// The tensors a stage holding `part` reads.
pub fn tensor_names(gguf: &Gguf, part: &PartSpec) -> Vec<String> {
    let mut names: Vec<String> = gguf
        .tensors
        .iter()
        .filter(|tensor| {
            tensor
                .name
                .strip_prefix("blk.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|index| index.parse::<u32>().ok())
                .is_some_and(|index| (part.start..part.end).contains(&index))
        })
        .map(|tensor| tensor.name.clone())
        .collect();
    if part.embed {
        names.push("token_embd.weight".to_owned());
    }
    if part.head {
        names.push("output_norm.weight".to_owned());
        if gguf.tensor("output.weight").is_some() {
            names.push("output.weight".to_owned());
        } else if !part.embed {
            names.push("token_embd.weight".to_owned());
        }
    }
    names
}

/// A partial copy on disk.
#[derive(Debug)]
pub struct PartialCopy {
    pub path: PathBuf,
    /// The list of tensors present.
    present_path: PathBuf,
    present: BTreeSet<String>,
    /// The hashes every tensor is checked against.
    manifest: TensorManifest,
}

impl PartialCopy {
    /// The copy's file and manifest; the digest comes from the network, so it is checked before it
    /// names a file (a `../` or an absolute path must not write outside the models directory).
    fn paths(models_dir: &Path, digest: &str) -> std::io::Result<(PathBuf, PathBuf, PathBuf)> {
        let digest = Sha256Digest::parse(digest)
            .map_err(|reason| std::io::Error::new(std::io::ErrorKind::InvalidInput, reason))?;
        let directory = models_dir.join(".partial");
        let stem = digest.file_stem();
        Ok((
            directory.join(format!("{stem}.gguf")),
            directory.join(format!("{stem}.tensors.json")),
            directory.join(format!("{stem}.manifest")),
        ))
    }

    /// The partial copy of the file with `digest`, if one was started.
    pub fn open(models_dir: &Path, digest: &str) -> Option<Self> {
        let (path, present_path, manifest_path) = Self::paths(models_dir, digest).ok()?;
        let text = std::fs::read_to_string(&present_path).ok()?;
        let present: BTreeSet<String> = serde_json::from_str(&text).ok()?;
        let manifest = read_manifest(&std::fs::read(manifest_path).ok()?)?;
        path.is_file().then_some(Self {
            path,
            present_path,
            present,
            manifest,
        })
    }

    /// The manifest the copy's tensors were checked against.
    pub fn manifest(&self) -> &TensorManifest {
        &self.manifest
    }

    /// The SHA-256 of each tensor of the file, in the order of its tensor directory.
    pub fn tensors(&self) -> &[[u8; 32]] {
        &self.manifest.tensors
    }

    /// Starts a partial copy: a sparse file of `file_bytes` with `header` at its start, and the
    /// `manifest` its tensors will be checked against.
    pub fn create(
        models_dir: &Path,
        digest: &str,
        header: &[u8],
        file_bytes: u64,
        manifest: TensorManifest,
    ) -> std::io::Result<Self> {
        let (path, present_path, manifest_path) = Self::paths(models_dir, digest)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = std::fs::File::create(&path)?;
        file.set_len(file_bytes)?;
        file.write_all(header)?;
        file.sync_all()?;
        let mut bytes = manifest.header.to_vec();
        bytes.extend(manifest.tensors.iter().flatten());
        write_whole(&manifest_path, &bytes)?;
        let copy = Self {
            path,
            present_path,
            present: BTreeSet::new(),
            manifest,
        };
        copy.save()?;
        Ok(copy)
    }

    /// Names of `wanted` not in the copy yet.
    pub fn missing(&self, wanted: &[String]) -> Vec<String> {
        wanted
            .iter()
            .filter(|name| !self.present.contains(*name))
            .cloned()
            .collect()
    }

    /// Writes `bytes` at `offset` of the file.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).open(&self.path)?;
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(bytes)
    }

    /// Records verified tensors in the manifest (written whole, then renamed into place).
    pub fn mark(&mut self, names: impl IntoIterator<Item = String>) -> std::io::Result<()> {
        self.present.extend(names);
        self.save()
    }

    fn save(&self) -> std::io::Result<()> {
        write_whole(
            &self.present_path,
            &serde_json::to_vec(&self.present).map_err(std::io::Error::other)?,
        )
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place.
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

/// A manifest as [`PartialCopy::create`] wrote it: the header's hash, then each tensor's.
fn read_manifest(bytes: &[u8]) -> Option<TensorManifest> {
    if bytes.len() < 32 || !bytes.len().is_multiple_of(32) {
        return None;
    }
    let mut hashes = bytes
        .chunks_exact(32)
        .map(|chunk| <[u8; 32]>::try_from(chunk).ok());
    let header = hashes.next()??;
    Some(TensorManifest {
        header,
        tensors: hashes.collect::<Option<Vec<_>>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(byte: &str) -> String {
        format!("sha256:{}", byte.repeat(64))
    }

    #[test]
    fn a_partial_copy_remembers_what_it_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifest = TensorManifest {
            header: [1; 32],
            tensors: vec![[2; 32], [3; 32]],
        };
        let mut copy = PartialCopy::create(
            dir.path(),
            &digest("a"),
            b"GGUF-header",
            1 << 20,
            manifest.clone(),
        )
        .expect("create");
        assert_eq!(std::fs::metadata(&copy.path).expect("file").len(), 1 << 20);
        copy.write_at(4096, b"tensor").expect("write");
        copy.mark(["blk.0.attn_q.weight".to_owned()]).expect("mark");
        let again = PartialCopy::open(dir.path(), &digest("a")).expect("open");
        let wanted = [
            "blk.0.attn_q.weight".to_owned(),
            "blk.1.attn_q.weight".to_owned(),
        ];
        assert_eq!(again.missing(&wanted), ["blk.1.attn_q.weight"]);
        assert_eq!(again.manifest(), &manifest);
        let bytes = std::fs::read(&again.path).expect("read");
        assert_eq!(&bytes[..11], b"GGUF-header");
        assert_eq!(&bytes[4096..4102], b"tensor");
        assert!(PartialCopy::open(dir.path(), &digest("b")).is_none());
    }

    #[test]
    fn a_digest_from_the_network_never_names_a_path_outside() {
        let root = tempfile::tempdir().expect("tempdir");
        let models = root.path().join("models");
        std::fs::create_dir(&models).expect("models dir");
        for hostile in [
            "../../escaped".to_owned(),
            "sha256:../../escaped".to_owned(),
            format!("sha256:{}/../../escaped", "a".repeat(40)),
            root.path().join("escaped").display().to_string(),
        ] {
            let manifest = TensorManifest {
                header: [0; 32],
                tensors: Vec::new(),
            };
            let created = PartialCopy::create(&models, &hostile, b"GGUF", 16, manifest);
            assert!(created.is_err(), "{hostile}");
            assert!(PartialCopy::open(&models, &hostile).is_none(), "{hostile}");
        }
        let written: Vec<_> = walk(root.path());
        assert_eq!(written, [models], "nothing but the empty models dir");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
            found.push(entry.path());
            if entry.path().is_dir() {
                found.extend(walk(&entry.path()));
            }
        }
        found
    }
}
