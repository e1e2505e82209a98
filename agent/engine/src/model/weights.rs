//! A model's weights as the forward pass uses them: matrices in our kernels' formats (or candle's for
//! the others), projections stacked when they share a format, the quantized token table, and the
//! loader that reads each from the GGUF file.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, ggml_file};
use candle_core::{Device, Module, Tensor};
use sollol_kernels::{Q4KMatrix, Q6KMatrix, Q41Matrix, Q50Matrix, Q80Matrix};

use super::ModelError;
use crate::gguf::{Gguf, GgufError, TensorInfo};

/// The token embedding table kept quantized; rows are dequantized as tokens need them (the table in
/// f32 would be the largest allocation of a small model).
#[derive(Debug)]
pub(super) struct Embeddings {
    pub(super) bytes: Vec<u8>,
    pub(super) dtype: GgmlDType,
    pub(super) rows: usize,
    pub(super) width: usize,
    pub(super) row_bytes: usize,
}

impl Embeddings {
    pub(super) fn row(&self, token: u32, device: &Device) -> Result<Tensor, ModelError> {
        let index = token as usize;
        if index >= self.rows {
            return Err(ModelError::Token(token));
        }
        let start = index * self.row_bytes;
        let row = &self.bytes[start..start + self.row_bytes];
        Ok(
            ggml_file::qtensor_from_ggml(self.dtype, row, vec![1, self.width], device)?
                .dequantize(device)?,
        )
    }
}

/// A weight matrix applied to activations: our kernels for Q4_1, Q8_0, Q5_0, Q4_K and Q6_K, candle's
/// quantized matmul for the other types.
#[derive(Debug)]
pub(super) enum Linear {
    Candle(QMatMul),
    Q41(Q41Matrix),
    Q80(Q80Matrix),
    Q50(Q50Matrix),
    Q4K(Q4KMatrix),
    Q6K(Q6KMatrix),
}

impl Linear {
    pub(super) fn columns(&self) -> usize {
        match self {
            Self::Candle(matmul) => match matmul {
                QMatMul::QTensor(tensor) => tensor.shape().dims().last().copied().unwrap_or(0),
                QMatMul::Tensor(tensor) | QMatMul::TensorF16(tensor) => {
                    tensor.dims().last().copied().unwrap_or(0)
                }
            },
            Self::Q41(matrix) => matrix.columns(),
            Self::Q80(matrix) => matrix.columns(),
            Self::Q50(matrix) => matrix.columns(),
            Self::Q4K(matrix) => matrix.columns(),
            Self::Q6K(matrix) => matrix.columns(),
        }
    }

    /// `x` holds `tokens` rows of `columns` values; returns `tokens` rows of the matrix's rows.
    /// `sequences`: how many of the rows belong to each sequence, in turn (each computed as alone).
    pub(super) fn forward(
        &self,
        x: &[f32],
        tokens: usize,
        sequences: &[usize],
    ) -> Result<Vec<f32>, ModelError> {
        let columns = self.columns();
        if x.len() != tokens * columns {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "{} activations for {tokens} rows of a matrix of {columns} columns",
                x.len()
            ))));
        }
        Ok(match self {
            Self::Candle(matmul) => {
                let input = Tensor::from_slice(x, (tokens, columns), &Device::Cpu)?;
                matmul.forward(&input)?.flatten_all()?.to_vec1::<f32>()?
            }
            Self::Q41(matrix) => matrix.forward_sequences(x, sequences),
            Self::Q80(matrix) => matrix.forward_sequences(x, sequences),
            Self::Q50(matrix) => matrix.forward_sequences(x, sequences),
            Self::Q4K(matrix) => matrix.forward_sequences(x, sequences),
            Self::Q6K(matrix) => matrix.forward_sequences(x, sequences),
        })
    }
}

/// Matrices applied to the same input: one quantized matmul over their rows stacked when they share a
/// type and a width (one pass over the input instead of several), else one each.
#[derive(Debug)]
pub(super) enum Projections {
    Stacked { matmul: Linear, outputs: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    /// Each matrix's output, `tokens` rows each.
    pub(super) fn forward(
        &self,
        x: &[f32],
        tokens: usize,
        sequences: &[usize],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        match self {
            Self::Stacked { matmul, outputs } => {
                let all = matmul.forward(x, tokens, sequences)?;
                let total: usize = outputs.iter().sum();
                let mut start = 0;
                let mut parts = Vec::with_capacity(outputs.len());
                for width in outputs {
                    // A copy per row (value by value, these copies took 3 % of a Gemma 3 prompt's time).
                    let mut part = Vec::with_capacity(tokens * width);
                    for row in all.chunks_exact(total) {
                        part.extend_from_slice(&row[start..start + width]);
                    }
                    parts.push(part);
                    start += width;
                }
                Ok(parts)
            }
            Self::Separate(matmuls) => matmuls
                .iter()
                .map(|matmul| matmul.forward(x, tokens, sequences))
                .collect(),
        }
    }
}

pub(super) fn dtype_of(info: &TensorInfo) -> Result<GgmlDType, ModelError> {
    Ok(match info.ggml_type {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        other => {
            return Err(ModelError::Gguf(GgufError::TensorType {
                name: info.name.clone(),
                ggml_type: other,
            }));
        }
    })
}

pub(super) struct Loader<'a> {
    pub(super) gguf: &'a Gguf,
    pub(super) file: std::fs::File,
    pub(super) device: Device,
}

impl Loader<'_> {
    pub(super) fn has(&self, name: &str) -> bool {
        self.gguf.tensor(name).is_some()
    }

    pub(super) fn qtensor(&mut self, name: &str) -> Result<QTensor, ModelError> {
        let (info, bytes) = self.gguf.tensor_bytes(&mut self.file, name)?;
        // candle wants the row-major shape: ggml's dimensions reversed.
        let dims: Vec<usize> = info
            .dims
            .iter()
            .rev()
            .map(|dim| usize::try_from(*dim).unwrap_or(usize::MAX))
            .collect();
        Ok(ggml_file::qtensor_from_ggml(
            dtype_of(&info)?,
            &bytes,
            dims,
            &self.device,
        )?)
    }

    pub(super) fn matmul(&mut self, name: &str) -> Result<Linear, ModelError> {
        let (info, bytes) = self.gguf.tensor_bytes(&mut self.file, name)?;
        self.linear(&info, &bytes, None)
    }

    /// A matrix from its GGUF bytes; `rows` overrides the row count (stacked matrices).
    pub(super) fn linear(
        &self,
        info: &TensorInfo,
        bytes: &[u8],
        rows: Option<usize>,
    ) -> Result<Linear, ModelError> {
        let columns = usize::try_from(info.dims[0]).unwrap_or(usize::MAX);
        let rows = rows.unwrap_or_else(|| {
            info.dims[1..]
                .iter()
                .map(|dim| usize::try_from(*dim).unwrap_or(usize::MAX))
                .product()
        });
        match dtype_of(info)? {
            GgmlDType::Q4_1 => {
                if let Some(matrix) = Q41Matrix::from_gguf(bytes, rows, columns) {
                    return Ok(Linear::Q41(matrix));
                }
            }
            GgmlDType::Q8_0 => {
                if let Some(matrix) = Q80Matrix::from_gguf(bytes, rows, columns) {
                    return Ok(Linear::Q80(matrix));
                }
            }
            GgmlDType::Q5_0 => {
                if let Some(matrix) = Q50Matrix::from_gguf(bytes, rows, columns) {
                    return Ok(Linear::Q50(matrix));
                }
            }
            GgmlDType::Q4K => {
                if let Some(matrix) = Q4KMatrix::from_gguf(bytes, rows, columns) {
                    return Ok(Linear::Q4K(matrix));
                }
            }
            GgmlDType::Q6K => {
                if let Some(matrix) = Q6KMatrix::from_gguf(bytes, rows, columns) {
                    return Ok(Linear::Q6K(matrix));
                }
            }
            _ => {}
        }
        let qtensor = ggml_file::qtensor_from_ggml(
            dtype_of(info)?,
            bytes,
            vec![rows, columns],
            &self.device,
        )?;
        Ok(Linear::Candle(QMatMul::from_qtensor(qtensor)?))
    }

    pub(super) fn projections(&mut self, names: &[&str]) -> Result<Projections, ModelError> {
        let infos: Vec<TensorInfo> = names
            .iter()
            .map(|name| {
                self.gguf
                    .tensor(name)
                    .cloned()
                    .ok_or_else(|| GgufError::MissingTensor((*name).to_owned()))
            })
            .collect::<Result<_, _>>()?;
        let stackable = infos.iter().all(|info| {
            info.dims.len() == 2
                && info.ggml_type == infos[0].ggml_type
                && info.dims[0] == infos[0].dims[0]
        });
        if !stackable {
            return Ok(Projections::Separate(
                names
                    .iter()
                    .map(|name| self.matmul(name))
                    .collect::<Result<_, _>>()?,
            ));
        }
        let mut bytes = Vec::new();
        let mut outputs = Vec::with_capacity(names.len());
        for name in names {
            let (info, tensor) = self.gguf.tensor_bytes(&mut self.file, name)?;
            bytes.extend_from_slice(&tensor);
            outputs.push(usize::try_from(info.dims[1]).unwrap_or(usize::MAX));
        }
        Ok(Projections::Stacked {
            matmul: self.linear(&infos[0], &bytes, Some(outputs.iter().sum()))?,
            outputs,
        })
    }

    /// A vector (norm weights, biases) as f32 values.
    pub(super) fn dense(&mut self, name: &str) -> Result<Vec<f32>, ModelError> {
        Ok(self
            .qtensor(name)?
            .dequantize(&self.device)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    pub(super) fn optional_dense(&mut self, name: &str) -> Result<Option<Vec<f32>>, ModelError> {
        if self.has(name) {
            self.dense(name).map(Some)
        } else {
            Ok(None)
        }
    }
}
