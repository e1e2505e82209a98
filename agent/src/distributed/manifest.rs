//! Tensor manifests: the SHA-256 of each tensor of a model file, bound to the file's content digest.
//!
//! A stage holding a model file computes, in the one pass that computes the file's content digest, the
//! SHA-256 of its header (every byte before the first tensor) and of each tensor, in the order of the
//! file's tensor directory. The manifest's own digest (SHA-256 over a context string, the header's hash
//! and the tensors' hashes) goes into the plan beside the file digest: every holder must agree on both,
//! and a stage that fetches tensors checks the header and every tensor against the manifest the plan
//! named — never against hashes the sending peer computes as it sends, which would only prove the peer
//! sent what it read (a copy changed since its digest was taken, or a peer that lies, would pass).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};
use sollol_engine::gguf::Gguf;

/// Domain separation of a manifest's digest.
const CONTEXT: &[u8] = b"sollol tensor manifest v1\0";

/// A file's tensor hashes, in the order of its tensor directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorManifest {
    /// SHA-256 of the bytes before the first tensor.
    pub header: [u8; 32],
    pub tensors: Vec<[u8; 32]>,
}

impl TensorManifest {
    /// The digest a plan names: binds the header and every tensor.
    pub fn digest(&self) -> [u8; 32] {
        digest_of(&self.header, &self.tensors)
    }

    /// The hash of the tensor named `name` in `gguf` (the file this manifest describes).
    pub fn tensor(&self, gguf: &Gguf, name: &str) -> Option<[u8; 32]> {
        let index = gguf.tensors.iter().position(|tensor| tensor.name == name)?;
        self.tensors.get(index).copied()
    }

    /// The file's content digest (`sha256:…` of every byte) and its manifest, in one read of the file.
    pub fn read(path: &Path) -> std::io::Result<(String, Self)> {
        let mut file = std::fs::File::open(path)?;
        let length = file.metadata()?.len();
        let gguf = Gguf::read(std::io::BufReader::new(&file), length).map_err(|error| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, error.to_string())
        })?;
        let ranges: Vec<(u64, u64)> = gguf
            .tensors
            .iter()
            .map(|tensor| (tensor.offset, tensor.offset.saturating_add(tensor.size)))
            .collect();
        let header_end = ranges
            .iter()
            .map(|(start, _)| *start)
            .min()
            .unwrap_or(length);
        let mut order: Vec<usize> = (0..ranges.len()).collect();
        order.sort_by_key(|&index| ranges[index].0);

        let mut whole = Sha256::new();
        let mut header = Sha256::new();
        let mut tensors = vec![Sha256::new(); ranges.len()];
        // Tensors before `first_open` (in offset order) ended before the bytes read so far.
        let mut first_open = 0;
        let mut position = 0u64;
        let mut buffer = vec![0u8; 1 << 20];
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0))?;
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            let bytes = &buffer[..read];
            let end = position + read as u64;
            whole.update(bytes);
            if position < header_end {
                header.update(&bytes[..(header_end.min(end) - position) as usize]);
            }
            for &index in &order[first_open..] {
                let (start, stop) = ranges[index];
                if start >= end {
                    break;
                }
                let (from, to) = (start.max(position), stop.min(end));
                if from < to {
                    tensors[index]
                        .update(&bytes[(from - position) as usize..(to - position) as usize]);
                }
            }
            while first_open < order.len() && ranges[order[first_open]].1 <= end {
                first_open += 1;
            }
            position = end;
        }
        Ok((
            format!("sha256:{}", hex::encode(whole.finalize())),
            Self {
                header: header.finalize().into(),
                tensors: tensors
                    .into_iter()
                    .map(|hasher| hasher.finalize().into())
                    .collect(),
            },
        ))
    }
}

/// A manifest's digest from the header bytes a peer sent and the tensor hashes it listed.
pub fn digest_from_parts(header_bytes: &[u8], tensors: &[[u8; 32]]) -> [u8; 32] {
    digest_of(&Sha256::digest(header_bytes).into(), tensors)
}

fn digest_of(header: &[u8; 32], tensors: &[[u8; 32]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(CONTEXT);
    hasher.update(header);
    hasher.update((tensors.len() as u64).to_le_bytes());
    for tensor in tensors {
        hasher.update(tensor);
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_hashes_each_tensor_and_the_header_of_the_file_it_digests() {
        // The test model, fetched by scripts/fetch-model (scripts/test runs it first).
        let path = std::env::var_os("SOLLOL_TEST_MODEL").map_or_else(
            || {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            },
            std::path::PathBuf::from,
        );
        let (digest, manifest) = TensorManifest::read(&path).expect("read");
        assert_eq!(
            digest,
            sollol_engine::engine::content_digest(&path).expect("digest"),
            "the one pass gives the file's digest too"
        );
        let gguf = Gguf::open(&path).expect("gguf");
        let bytes = std::fs::read(&path).expect("bytes");
        assert_eq!(manifest.tensors.len(), gguf.tensors.len());
        for tensor in gguf.tensors.iter().step_by(7) {
            let start = tensor.offset as usize;
            let expected: [u8; 32] =
                Sha256::digest(&bytes[start..start + tensor.size as usize]).into();
            assert_eq!(
                manifest.tensor(&gguf, &tensor.name),
                Some(expected),
                "{}",
                tensor.name
            );
        }
        let (header, _) = sollol_engine::engine::header_bytes(&path).expect("header");
        assert_eq!(
            digest_from_parts(&header, &manifest.tensors),
            manifest.digest()
        );
        let mut other = manifest.clone();
        other.tensors.swap(0, 1);
        assert_ne!(other.digest(), manifest.digest(), "order is bound too");
    }
}
