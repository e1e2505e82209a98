//! GGUF reader: header, metadata and tensor directory, bounds-checked against the file's length.
//!
//! Every length, count and offset a file claims is checked against what is
//! left of the file before anything is allocated or read, so a truncated or
//! hostile file is an error, never a panic, a huge allocation or a read out of
//! bounds. Tensor data is read later, one tensor at a time ([`Gguf::tensor_bytes`]).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};

const MAGIC: &[u8; 4] = b"GGUF";
/// More tensors or metadata entries than this is not a model.
const MAX_COUNT: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;
/// The longest string a header may hold (chat templates are kilobytes; tokens are bytes).
const MAX_STRING: u64 = 16 << 20;
const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (magic {0:?})")]
    Magic([u8; 4]),
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    Version(u32),
    #[error("the file is truncated or corrupt: {0}")]
    Corrupt(String),
    #[error("tensor {name:?} has type {ggml_type}, which this engine cannot read")]
    TensorType { name: String, ggml_type: u32 },
    #[error("no tensor named {0:?}")]
    MissingTensor(String),
    #[error("metadata {0:?} is missing or has the wrong type")]
    Metadata(String),
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer that fits a `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(value) => Some(u64::from(value)),
            Self::U16(value) => Some(u64::from(value)),
            Self::U32(value) => Some(u64::from(value)),
            Self::U64(value) => Some(value),
            Self::I8(value) => u64::try_from(value).ok(),
            Self::I16(value) => u64::try_from(value).ok(),
            Self::I32(value) => u64::try_from(value).ok(),
            Self::I64(value) => u64::try_from(value).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(value) => Some(f64::from(value)),
            Self::F64(value) => Some(value),
            _ => self.as_u64().map(|value| value as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(text) => Some(text),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(value) => Some(value),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(values) => Some(values),
            _ => None,
        }
    }
}

/// ggml's tensor types this engine reads: (id, name, elements per block, bytes per block).
const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (30, "BF16", 1, 2),
];

/// The name of a ggml type id, when this engine knows it.
pub fn type_name(ggml_type: u32) -> Option<&'static str> {
    TYPES
        .iter()
        .find(|(id, ..)| *id == ggml_type)
        .map(|(_, name, ..)| *name)
}

/// One tensor in the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// From the start of the file.
    pub offset: u64,
    pub size: u64,
}

/// A GGUF file's header, metadata and tensor directory.
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

/// Reads from a stream while counting what is left of the file.
struct Bounded<R> {
    reader: R,
    left: u64,
}

impl<R: Read> Bounded<R> {
    fn claim(&mut self, bytes: u64, what: &str) -> Result<(), GgufError> {
        if bytes > self.left {
            return Err(GgufError::Corrupt(format!(
                "{what} needs {bytes} bytes but only {} are left",
                self.left
            )));
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        self.claim(N as u64, what)?;
        let mut buffer = [0; N];
        self.reader.read_exact(&mut buffer)?;
        self.left -= N as u64;
        Ok(buffer)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let length = self.u64(what)?;
        if length > MAX_STRING {
            return Err(GgufError::Corrupt(format!(
                "{what} claims {length} bytes (at most {MAX_STRING})"
            )));
        }
        self.claim(length, what)?;
        // Memory grows with the bytes that actually arrive, not with what the length field claims
        // (the file's length may itself be a peer's claim).
        let mut buffer = Vec::with_capacity(length.min(1 << 16) as usize);
        (&mut self.reader).take(length).read_to_end(&mut buffer)?;
        if buffer.len() as u64 != length {
            return Err(GgufError::Corrupt(format!("{what} is cut short")));
        }
        self.left -= length;
        String::from_utf8(buffer).map_err(|_| GgufError::Corrupt(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, kind: u32, what: &str, depth: u32) -> Result<Value, GgufError> {
        Ok(match kind {
            0 => Value::U8(u8::from_le_bytes(self.bytes(what)?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.bytes(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes(what)?)),
            7 => match u8::from_le_bytes(self.bytes(what)?) {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => return Err(GgufError::Corrupt(format!("{what}: bool {other}"))),
            },
            8 => Value::String(self.string(what)?),
            9 if depth == 0 => {
                let element = self.u32(what)?;
                let count = self.u64(what)?;
                // Every element takes at least one byte, so the count is bounded by what is left.
                self.claim(count, what)?;
                let mut values =
                    Vec::with_capacity(usize::try_from(count.min(1 << 16)).unwrap_or(0));
                for _ in 0..count {
                    values.push(self.value(element, what, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.bytes(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes(what)?)),
            other => {
                return Err(GgufError::Corrupt(format!(
                    "{what}: unknown value type {other}"
                )));
            }
        })
    }
}

fn corrupt(what: &str) -> GgufError {
    GgufError::Corrupt(format!("{what} is too large"))
}

impl Gguf {
    /// Opens the GGUF file at `path` and reads its header, metadata and tensor directory.
    pub fn open(path: &std::path::Path) -> Result<Self, GgufError> {
        let file = std::fs::File::open(path).map_err(GgufError::Io)?;
        let length = file.metadata().map_err(GgufError::Io)?.len();
        Self::read(std::io::BufReader::new(file), length)
    }

    /// Reads the header, metadata and tensor directory of a file of `file_length` bytes.
    pub fn read(reader: impl Read, file_length: u64) -> Result<Self, GgufError> {
        let mut input = Bounded {
            reader,
            left: file_length,
        };
        let magic: [u8; 4] = input.bytes("the magic")?;
        if &magic != MAGIC {
            return Err(GgufError::Magic(magic));
        }
        let version = input.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let tensor_count = input.u64("the tensor count")?;
        let metadata_count = input.u64("the metadata count")?;
        if tensor_count > MAX_COUNT || metadata_count > MAX_COUNT {
            return Err(GgufError::Corrupt(format!(
                "{tensor_count} tensors and {metadata_count} metadata entries"
            )));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..metadata_count {
            let key = input.string("a metadata key")?;
            let kind = input.u32("a metadata type")?;
            let value = input.value(kind, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(usize::try_from(tensor_count).unwrap_or(0));
        for _ in 0..tensor_count {
            let name = input.string("a tensor name")?;
            let dim_count = input.u32(&name)?;
            if dim_count == 0 || dim_count > MAX_DIMS {
                return Err(GgufError::Corrupt(format!(
                    "tensor {name:?} has {dim_count} dimensions"
                )));
            }
            let mut dims = Vec::with_capacity(dim_count as usize);
            for _ in 0..dim_count {
                dims.push(input.u64(&name)?);
            }
            let ggml_type = input.u32(&name)?;
            let offset = input.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                size: 0,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
            return Err(GgufError::Corrupt(format!("alignment {alignment}")));
        }
        let header_end = file_length - input.left;
        let data_start = header_end.div_ceil(alignment) * alignment;
        for tensor in &mut tensors {
            let Some(&(_, _, block, block_bytes)) =
                TYPES.iter().find(|(id, ..)| *id == tensor.ggml_type)
            else {
                return Err(GgufError::TensorType {
                    name: tensor.name.clone(),
                    ggml_type: tensor.ggml_type,
                });
            };
            let elements = tensor
                .dims
                .iter()
                .try_fold(1u64, |product, dim| {
                    (*dim > 0).then(|| product.checked_mul(*dim)).flatten()
                })
                .filter(|elements| *elements <= 1 << 40)
                .ok_or_else(|| {
                    GgufError::Corrupt(format!(
                        "tensor {:?} has dimensions {:?}",
                        tensor.name, tensor.dims
                    ))
                })?;
            if tensor.dims[0] % block != 0 {
                return Err(GgufError::Corrupt(format!(
                    "tensor {:?}: rows of {} are not whole blocks of {block}",
                    tensor.name, tensor.dims[0]
                )));
            }
            tensor.size = elements / block * block_bytes;
            let start = data_start.checked_add(tensor.offset);
            let end = start.and_then(|start| start.checked_add(tensor.size));
            match (start, end) {
                (Some(start), Some(end))
                    if end <= file_length && tensor.offset % alignment == 0 =>
                {
                    tensor.offset = start;
                }
                _ => {
                    return Err(GgufError::Corrupt(format!(
                        "tensor {:?} ({} bytes at {}) lies outside the file",
                        tensor.name, tensor.size, tensor.offset
                    )));
                }
            }
        }
        Ok(Self {
            version,
            metadata,
            tensors,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|tensor| tensor.name == name)
    }

    /// The raw bytes of a tensor, read from the file the directory came from.
    pub fn tensor_bytes(
        &self,
        file: &mut (impl Read + Seek),
        name: &str,
    ) -> Result<(TensorInfo, Vec<u8>), GgufError> {
        let info = self
            .tensor(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_owned()))?
            .clone();
        file.seek(SeekFrom::Start(info.offset))?;
        let mut bytes = vec![0; usize::try_from(info.size).map_err(|_| corrupt(name))?];
        file.read_exact(&mut bytes)?;
        Ok((info, bytes))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| GgufError::Metadata(key.to_owned()))
    }

    pub fn f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| GgufError::Metadata(key.to_owned()))
    }

    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| GgufError::Metadata(key.to_owned()))
    }

    /// A string array (e.g. the vocabulary).
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.get(key)
            .and_then(Value::as_array)
            .and_then(|values| values.iter().map(Value::as_str).collect())
            .ok_or_else(|| GgufError::Metadata(key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid file: one metadata string and one F32 tensor of 8 values.
    fn tiny_file() -> Vec<u8> {
        let mut file = Vec::new();
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&3u32.to_le_bytes());
        file.extend_from_slice(&1u64.to_le_bytes());
        file.extend_from_slice(&1u64.to_le_bytes());
        let string = |file: &mut Vec<u8>, text: &str| {
            file.extend_from_slice(&(text.len() as u64).to_le_bytes());
            file.extend_from_slice(text.as_bytes());
        };
        string(&mut file, "general.architecture");
        file.extend_from_slice(&8u32.to_le_bytes());
        string(&mut file, "llama");
        string(&mut file, "w");
        file.extend_from_slice(&1u32.to_le_bytes());
        file.extend_from_slice(&8u64.to_le_bytes());
        file.extend_from_slice(&0u32.to_le_bytes());
        file.extend_from_slice(&0u64.to_le_bytes());
        while file.len() % 32 != 0 {
            file.push(0);
        }
        for index in 0..8u32 {
            file.extend_from_slice(&(index as f32).to_le_bytes());
        }
        file
    }

    fn read(bytes: &[u8]) -> Result<Gguf, GgufError> {
        Gguf::read(bytes, bytes.len() as u64)
    }

    #[test]
    fn reads_a_valid_file() {
        let file = tiny_file();
        let gguf = read(&file).expect("valid");
        assert_eq!(gguf.str("general.architecture").ok(), Some("llama"));
        let tensor = gguf.tensor("w").expect("tensor");
        assert_eq!((tensor.size, tensor.offset), (32, file.len() as u64 - 32));
        let (_, bytes) = gguf
            .tensor_bytes(&mut std::io::Cursor::new(&file), "w")
            .expect("bytes");
        assert_eq!(bytes[4..8], 1f32.to_le_bytes());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let file = tiny_file();
        for length in 0..file.len() {
            assert!(
                read(&file[..length]).is_err(),
                "a file cut at {length} bytes was accepted"
            );
        }
    }

    proptest::proptest! {
        /// Random corruption of a valid file (our bounded stand-in for a fuzzer): never a panic, and
        /// whatever is accepted stays inside the file.
        #[test]
        fn corrupted_files_never_panic(
            edits in proptest::collection::vec((0usize..200, proptest::num::u8::ANY), 1..8),
            cut in 0usize..240,
        ) {
            let mut file = tiny_file();
            for (position, byte) in edits {
                if let Some(slot) = file.get_mut(position) {
                    *slot = byte;
                }
            }
            file.truncate(cut.max(1));
            if let Ok(gguf) = read(&file) {
                for tensor in &gguf.tensors {
                    proptest::prop_assert!(tensor.offset + tensor.size <= file.len() as u64);
                }
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut file = MAGIC.to_vec();
            file.extend_from_slice(&3u32.to_le_bytes());
            file.extend_from_slice(&bytes);
            let _ = read(&file);
        }
    }

    #[test]
    fn hostile_headers_are_errors() {
        let mut wrong_magic = tiny_file();
        wrong_magic[0] = b'X';
        assert!(matches!(read(&wrong_magic), Err(GgufError::Magic(_))));
        let mut huge_count = tiny_file();
        huge_count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(read(&huge_count), Err(GgufError::Corrupt(_))));
        // The metadata key's length claims more bytes than the file has.
        let mut huge_string = tiny_file();
        huge_string[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(matches!(read(&huge_string), Err(GgufError::Corrupt(_))));
        // The tensor's offset points past the end.
        // Header, one metadata entry, then the tensor's name, dimension count, one dimension and type.
        let dims_at = 4 + 4 + 8 + 8 + (8 + 20) + 4 + (8 + 5) + (8 + 1) + 4;
        let offset_at = dims_at + 8 + 4;
        let mut far_offset = tiny_file();
        far_offset[offset_at..offset_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(read(&far_offset), Err(GgufError::Corrupt(_))));
        // Absurd dimensions.
        let mut huge_dims = tiny_file();
        huge_dims[dims_at..dims_at + 8].copy_from_slice(&(u64::MAX).to_le_bytes());
        assert!(matches!(read(&huge_dims), Err(GgufError::Corrupt(_))));
    }

    #[test]
    fn a_claimed_file_length_does_not_size_allocations() {
        // A peer sends 40 bytes of header and claims the file is 2^41 bytes long, with a key of
        // 2^40 bytes, and then of 1 MiB: neither may allocate more than what arrives.
        for claimed in [1u64 << 40, 1 << 20] {
            let mut header = tiny_file();
            header[24..32].copy_from_slice(&claimed.to_le_bytes());
            header.truncate(40);
            let result = Gguf::read(std::io::Cursor::new(&header), 1 << 41);
            assert!(matches!(result, Err(GgufError::Corrupt(_))), "{result:?}");
        }
    }
}
