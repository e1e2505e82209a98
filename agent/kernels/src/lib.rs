//! sollol's own compute kernels for the inference engine (`agent/src/inference`).
//!
//! The kernel for the hottest operation of Q4_1 models: a Q4_1 matrix times f32 activations.
//!
//! candle's Q4_1 dot product is its generic scalar one (three quarters of generation time in a profile).
//! This one computes the same sums (activations quantized to Q8_1 exactly as ggml and candle do, integer
//! block sums, then the blocks' f32 sum in the same order), so its results equal candle's bit for bit,
//! but it keeps the block scales as f32 and is written so the compiler vectorises the integer part
//! (`i16` products summed into `i32`), and it splits the rows over two threads.

use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;
/// Bytes of one Q4_1 block in a GGUF file: f16 scale, f16 minimum, 16 bytes of 4-bit values.
const Q4_1_BYTES: usize = 20;

#[derive(Clone, Copy, Debug)]
struct Q41Block {
    scale: f32,
    min: f32,
    values: [u8; 16],
}

/// Activations of one row quantized to Q8_1 blocks.
#[derive(Clone, Copy, Debug)]
struct Q81Block {
    scale: f32,
    /// ggml keeps `sum(values) * scale` rounded to f16.
    sum: f32,
    values: [i8; BLOCK],
}

/// A Q4_1 weight matrix, `rows` × `columns`, row-major (a GGUF tensor of ggml dimensions `[columns, rows]`).
#[derive(Debug)]
pub struct Q41Matrix {
    rows: usize,
    columns: usize,
    blocks: Vec<Q41Block>,
}

impl Q41Matrix {
    /// `None` when `bytes` is not `rows` × `columns` of Q4_1.
    pub fn from_gguf(bytes: &[u8], rows: usize, columns: usize) -> Option<Self> {
        if columns == 0 || !columns.is_multiple_of(BLOCK) {
            return None;
        }
        let count = rows.checked_mul(columns / BLOCK)?;
        if bytes.len() != count.checked_mul(Q4_1_BYTES)? {
            return None;
        }
        let blocks = bytes
            .chunks_exact(Q4_1_BYTES)
            .map(|block| {
                let mut values = [0; 16];
                values.copy_from_slice(&block[4..]);
                Q41Block {
                    scale: f16::from_le_bytes([block[0], block[1]]).to_f32(),
                    min: f16::from_le_bytes([block[2], block[3]]).to_f32(),
                    values,
                }
            })
            .collect();
        Some(Self {
            rows,
            columns,
            blocks,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn columns(&self) -> usize {
        self.columns
    }

    /// `input` holds `tokens` rows of `columns` values; returns `tokens` rows of `rows` values.
    pub fn forward(&self, input: &[f32], tokens: usize) -> Vec<f32> {
        let per_row = self.columns / BLOCK;
        let quantized: Vec<Q81Block> = input.chunks_exact(BLOCK).map(quantize).collect();
        let mut output = vec![0f32; tokens * self.rows];
        // Rows in chunks, spread over the threads; each chunk computes every token for its rows.
        let chunk_rows = 64;
        let by_rows: Vec<Vec<f32>> = (0..self.rows.div_ceil(chunk_rows))
            .into_par_iter()
            .map(|chunk| {
                let first = chunk * chunk_rows;
                let last = (first + chunk_rows).min(self.rows);
                let mut out = Vec::with_capacity((last - first) * tokens);
                for token in 0..tokens {
                    let activations = &quantized[token * per_row..(token + 1) * per_row];
                    for row in first..last {
                        let weights = &self.blocks[row * per_row..(row + 1) * per_row];
                        out.push(dot(weights, activations));
                    }
                }
                out
            })
            .collect();
        for (chunk, values) in by_rows.iter().enumerate() {
            let first = chunk * chunk_rows;
            let width = values.len() / tokens.max(1);
            for token in 0..tokens {
                output[token * self.rows + first..token * self.rows + first + width]
                    .copy_from_slice(&values[token * width..(token + 1) * width]);
            }
        }
        output
    }
}

/// ggml's `quantize_row_q8_1` for one block.
fn quantize(values: &[f32]) -> Q81Block {
    let amax = values.iter().fold(0f32, |max, value| max.max(value.abs()));
    let scale = amax / 127.0;
    let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let mut quantized = [0i8; BLOCK];
    let mut sum = 0i32;
    for (slot, value) in quantized.iter_mut().zip(values) {
        *slot = (value * inverse).round() as i8;
        sum += i32::from(*slot);
    }
    let scale = f16::from_f32(scale);
    Q81Block {
        scale: scale.to_f32(),
        sum: (f16::from_f32(sum as f32) * scale).to_f32(),
        values: quantized,
    }
}

/// The dot product of one weight row and one quantized activation row, as ggml's `vec_dot_q4_1_q8_1`.
fn dot(weights: &[Q41Block], activations: &[Q81Block]) -> f32 {
    let mut total = 0f32;
    for (weight, activation) in weights.iter().zip(activations) {
        total +=
            block_sum(&weight.values, &activation.values) as f32 * weight.scale * activation.scale
                + weight.min * activation.sum;
    }
    total
}

#[inline]
fn block_sum(weights: &[u8; 16], activations: &[i8; BLOCK]) -> i32 {
    // Unpacked first, the dot product of two 32-byte arrays is a shape compilers vectorise well.
    let mut unpacked = [0i8; BLOCK];
    for index in 0..16 {
        unpacked[index] = (weights[index] & 0x0F) as i8;
        unpacked[index + 16] = (weights[index] >> 4) as i8;
    }
    unpacked
        .iter()
        .zip(activations)
        .map(|(weight, activation)| i32::from(i16::from(*weight) * i16::from(*activation)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q4_1 block in GGUF bytes.
    fn block(scale: f32, min: f32, nibbles: [u8; 32]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
        bytes.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        for index in 0..16 {
            bytes.push(nibbles[index] | (nibbles[index + 16] << 4));
        }
        bytes
    }

    #[test]
    fn matches_dequantised_arithmetic() {
        // Two rows of 64 columns: row r, column c holds scale * nibble + min.
        let nibble = |row: usize, column: usize| ((row * 7 + column * 3) % 16) as u8;
        let (scale, min) = (0.5f32, -2.0f32);
        let mut bytes = Vec::new();
        for row in 0..2 {
            for half in 0..2 {
                let mut nibbles = [0u8; 32];
                for (index, slot) in nibbles.iter_mut().enumerate() {
                    *slot = nibble(row, half * 32 + index);
                }
                bytes.extend(block(scale, min, nibbles));
            }
        }
        let matrix = Q41Matrix::from_gguf(&bytes, 2, 64).expect("matrix");
        let input: Vec<f32> = (0..128)
            .map(|index| ((index % 13) as f32 - 6.0) / 3.0)
            .collect();
        let output = matrix.forward(&input, 2);
        for token in 0..2 {
            for row in 0..2 {
                let exact: f32 = (0..64)
                    .map(|column| {
                        (scale * f32::from(nibble(row, column)) + min) * input[token * 64 + column]
                    })
                    .sum();
                let ours = output[token * 2 + row];
                // Activations are quantized to 8 bits: close, not equal.
                assert!(
                    (ours - exact).abs() < 0.05 * exact.abs().max(1.0),
                    "{ours} vs {exact}"
                );
            }
        }
        assert!(Q41Matrix::from_gguf(&bytes[1..], 2, 64).is_none());
    }
}
