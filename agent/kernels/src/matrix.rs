//! The quantized matrix: a weight matrix in one of the [`Format`]s, applied to rows of activations.
//! Which kernel each group of rows goes through is decided here: one token's rows spread over the
//! threads; a prompt's in chunks of weight rows, token groups outside and rows inside, by sixteen
//! (two weight rows at once, or side by side), eight, four, three, two and one; and for a format whose
//! batches llama.cpp computes differently (Q4_K), in the runs of its batch (`batch_runs`).

use rayon::prelude::*;

use crate::quant::{Dots, Format, GROUP, Q41, Q80, WIDE_GROUP, quantize_rows};
use crate::simd::dispatch;

/// [`Format::dots`] of `weights` with the `N` activation rows from `first` of `quantized` (`per_row`
/// blocks each).
#[inline(always)]
fn dots_at<F: Format, I: Dots, const N: usize>(
    isa: I,
    weights: &[F::Block],
    quantized: &[F::Activation],
    per_row: usize,
    first: usize,
) -> [f32; N] {
    F::dots(
        isa,
        weights,
        std::array::from_fn(|index| {
            let token = first + index;
            &quantized[token * per_row..(token + 1) * per_row]
        }),
    )
}

/// [`Format::dots2`] of two weight rows with the `N` activation rows from `first`, in the first `N` of
/// `WIDE_GROUP` results per weight row.
#[inline(always)]
fn pairs_at<F: Format, I: Dots, const N: usize>(
    isa: I,
    weights: [&[F::Block]; 2],
    quantized: &[F::Activation],
    per_row: usize,
    first: usize,
) -> [[f32; WIDE_GROUP]; 2] {
    let results: [[f32; N]; 2] = F::dots2(
        isa,
        weights,
        std::array::from_fn(|index| {
            let token = first + index;
            &quantized[token * per_row..(token + 1) * per_row]
        }),
    );
    let mut out = [[0f32; WIDE_GROUP]; 2];
    for (out, results) in out.iter_mut().zip(results) {
        out[..N].copy_from_slice(&results);
    }
    out
}

/// A quantized weight matrix, `rows` × `columns`, row-major (a GGUF tensor of ggml dimensions
/// `[columns, rows]`).
#[derive(Debug)]
pub struct Matrix<F: Format> {
    rows: usize,
    columns: usize,
    blocks: Vec<F::Block>,
}

pub type Q41Matrix = Matrix<Q41>;
pub type Q80Matrix = Matrix<Q80>;

impl Matrix<Q80> {
    /// Row `row` dequantized (`value * scale`, as ggml's `get_rows`): a tied model's token embedding
    /// read from its output matrix instead of a second copy of the table.
    pub fn row(&self, row: usize) -> Option<Vec<f32>> {
        let per_row = self.columns / Q80::VALUES;
        let blocks = self.blocks.get(row * per_row..(row + 1) * per_row)?;
        let mut values = Vec::with_capacity(self.columns);
        for block in blocks {
            let scale = block.scale.to_f32();
            values.extend(block.values.iter().map(|value| f32::from(*value) * scale));
        }
        Some(values)
    }
}

impl<F: Format> Matrix<F> {
    /// `None` when `bytes` is not `rows` × `columns` of this format.
    pub fn from_gguf(bytes: &[u8], rows: usize, columns: usize) -> Option<Self> {
        if columns == 0 || !columns.is_multiple_of(F::VALUES) {
            return None;
        }
        let count = rows.checked_mul(columns / F::VALUES)?;
        if bytes.len() != count.checked_mul(F::BYTES)? {
            return None;
        }
        Some(Self {
            rows,
            columns,
            blocks: bytes.chunks_exact(F::BYTES).map(F::parse).collect(),
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
        self.forward_sequences(input, &[tokens])
    }

    /// [`Matrix::forward`] of rows that are each one token of a different sequence: every row is computed
    /// as that token alone would be (for the formats llama.cpp computes batches of one sequence
    /// differently), so a sequence's answer does not depend on what was batched with it.
    pub fn forward_independent(&self, input: &[f32], rows: usize) -> Vec<f32> {
        self.forward_sequences(input, &vec![1; rows])
    }

    /// [`Matrix::forward`] of the rows of several sequences, `sequences[i]` rows each, in turn: each
    /// sequence's rows computed as they would be alone.
    pub fn forward_sequences(&self, input: &[f32], sequences: &[usize]) -> Vec<f32> {
        dispatch!(isa => self.forward_with(isa, input, sequences))
    }

    /// [`Matrix::forward_sequences`] in the form `isa`; each thread's share of the rows runs with its
    /// features.
    pub(crate) fn forward_with<I: Dots>(
        &self,
        isa: I,
        input: &[f32],
        sequences: &[usize],
    ) -> Vec<f32> {
        let tokens: usize = sequences.iter().sum();
        let quantized = quantize_rows::<F, I>(isa, input);
        // The groups of rows a form takes side by side, laid out once for every chunk of the matrix:
        // for a format whose batches differ, the runs of its rows; for the others, each whole group
        // from the first row.
        let runs = if F::BATCH_DIFFERS && tokens > 1 {
            batch_runs(sequences, F::side_by_side(isa))
        } else {
            Vec::new()
        };
        let side_firsts: Vec<usize> = if F::BATCH_DIFFERS {
            runs.iter()
                .filter(|(_, run)| matches!(run, Run::Side(_)))
                .map(|(first, _)| *first)
                .collect()
        } else if F::side_by_side(isa) {
            (0..tokens / WIDE_GROUP)
                .map(|group| group * WIDE_GROUP)
                .collect()
        } else {
            Vec::new()
        };
        let per_row = self.columns / F::VALUES;
        let sides: Vec<Vec<F::Side>> = side_firsts
            .into_iter()
            .map(|first| {
                F::sides(std::array::from_fn(|index| {
                    let token = first + index;
                    &quantized[token * per_row..(token + 1) * per_row]
                }))
            })
            .collect();
        let mut output = vec![0f32; tokens * self.rows];
        if tokens == 1 {
            // Generation: the rows in a few pieces per thread, written in place.
            let pieces = rayon::current_num_threads() * 4;
            let chunk_rows = self.rows.div_ceil(pieces).max(16);
            output
                .par_chunks_mut(chunk_rows)
                .enumerate()
                .for_each(|(chunk, out)| {
                    isa.run(
                        #[inline(always)]
                        || self.one_token(isa, chunk * chunk_rows, &quantized, out),
                    );
                });
            return output;
        }
        // Rows in chunks, spread over the threads; each chunk computes every token for its rows and
        // writes them into each token's output row. At least 64 rows a chunk, fewer than 16 chunks a
        // thread (a 262 144-row output head made 4096 of 64 rows).
        let chunk_rows = self
            .rows
            .div_ceil(rayon::current_num_threads() * 16)
            .max(64);
        let mut pieces: Vec<Vec<&mut [f32]>> = (0..self.rows.div_ceil(chunk_rows))
            .map(|_| Vec::with_capacity(tokens))
            .collect();
        for token_row in output.chunks_mut(self.rows) {
            for (chunk, piece) in token_row.chunks_mut(chunk_rows).enumerate() {
                pieces[chunk].push(piece);
            }
        }
        pieces
            .into_par_iter()
            .enumerate()
            .for_each(|(chunk, mut outputs)| {
                let rows = chunk * chunk_rows..((chunk + 1) * chunk_rows).min(self.rows);
                let width = rows.len();
                let values = isa.run(
                    #[inline(always)]
                    || {
                        if F::BATCH_DIFFERS {
                            self.batch(isa, rows, &quantized, tokens, &runs, &sides)
                        } else {
                            self.tokens(isa, rows, &quantized, tokens, &sides)
                        }
                    },
                );
                for (out, values) in outputs.iter_mut().zip(values.chunks_exact(width)) {
                    out.copy_from_slice(values);
                }
            });
        output
    }

    /// Rows `first..first + out.len()` applied to one token's activations, into `out`.
    #[inline(always)]
    fn one_token<I: Dots>(
        &self,
        isa: I,
        first: usize,
        quantized: &[F::Activation],
        out: &mut [f32],
    ) {
        let per_row = self.columns / F::VALUES;
        let weights = |row: usize| &self.blocks[row * per_row..(row + 1) * per_row];
        let mut offset = 0;
        if F::pairs(isa, 1) {
            while offset + 2 <= out.len() {
                let row = first + offset;
                let [[one], [two]] = F::dots2(isa, [weights(row), weights(row + 1)], [quantized]);
                (out[offset], out[offset + 1]) = (one, two);
                offset += 2;
            }
        }
        for (offset, slot) in out.iter_mut().enumerate().skip(offset) {
            *slot = F::dot(isa, weights(first + offset), quantized);
        }
    }

    /// Rows `rows` applied to every one of `tokens` rows of activations: `tokens` rows of
    /// `rows.len()` values. Token groups outside, rows inside: a group's activations stay in the L1
    /// cache while the chunk's rows go past them (row by row, each weight row would stream the whole
    /// prompt's activations through the cache: 51 KB for 64 tokens of 640 values).
    #[inline(always)]
    fn tokens<I: Dots>(
        &self,
        isa: I,
        rows: std::ops::Range<usize>,
        quantized: &[F::Activation],
        tokens: usize,
        sides: &[Vec<F::Side>],
    ) -> Vec<f32> {
        let per_row = self.columns / F::VALUES;
        let (first, width) = (rows.start, rows.len());
        let activations = |token: usize| &quantized[token * per_row..(token + 1) * per_row];
        let weights = |row: usize| &self.blocks[row * per_row..(row + 1) * per_row];
        let mut out = vec![0f32; width * tokens];
        let mut token = 0;
        while token < tokens {
            let side = tokens - token >= WIDE_GROUP && F::side_by_side(isa);
            let count = match tokens - token {
                _ if side => WIDE_GROUP,
                left if left >= WIDE_GROUP && F::pairs(isa, left) => WIDE_GROUP,
                left if left >= GROUP => GROUP,
                4..GROUP => 4,
                // Three sequences decoding: one pass over the weights, not a pair and then one.
                3 => 3,
                2 => 2,
                _ => 1,
            };
            let mut paired = rows.start;
            if !side && F::pairs(isa, count) {
                while paired + 2 <= rows.end {
                    let pair = [weights(paired), weights(paired + 1)];
                    let results = match count {
                        WIDE_GROUP => {
                            pairs_at::<F, I, WIDE_GROUP>(isa, pair, quantized, per_row, token)
                        }
                        GROUP => pairs_at::<F, I, GROUP>(isa, pair, quantized, per_row, token),
                        4 => pairs_at::<F, I, 4>(isa, pair, quantized, per_row, token),
                        3 => pairs_at::<F, I, 3>(isa, pair, quantized, per_row, token),
                        2 => pairs_at::<F, I, 2>(isa, pair, quantized, per_row, token),
                        _ => pairs_at::<F, I, 1>(isa, pair, quantized, per_row, token),
                    };
                    for (offset, results) in results.iter().enumerate() {
                        for (index, value) in results[..count].iter().enumerate() {
                            out[(token + index) * width + paired + offset - first] = *value;
                        }
                    }
                    paired += 2;
                }
            }
            for row in paired..rows.end {
                let weights = weights(row);
                let mut results = [0f32; WIDE_GROUP];
                match count {
                    WIDE_GROUP if side => {
                        results = F::dots_side(isa, weights, &sides[token / WIDE_GROUP]);
                    }
                    WIDE_GROUP => {
                        for half in 0..2 {
                            let first = token + half * GROUP;
                            results[half * GROUP..(half + 1) * GROUP].copy_from_slice(&dots_at::<
                                F,
                                I,
                                GROUP,
                            >(
                                isa, weights, quantized, per_row, first,
                            ));
                        }
                    }
                    GROUP => results[..GROUP].copy_from_slice(&dots_at::<F, I, GROUP>(
                        isa, weights, quantized, per_row, token,
                    )),
                    4 => results[..4].copy_from_slice(&dots_at::<F, I, 4>(
                        isa, weights, quantized, per_row, token,
                    )),
                    3 => results[..3].copy_from_slice(&dots_at::<F, I, 3>(
                        isa, weights, quantized, per_row, token,
                    )),
                    2 => results[..2].copy_from_slice(&dots_at::<F, I, 2>(
                        isa, weights, quantized, per_row, token,
                    )),
                    _ => results[0] = F::dot(isa, weights, activations(token)),
                }
                for (index, value) in results[..count].iter().enumerate() {
                    out[(token + index) * width + row - first] = *value;
                }
            }
            token += count;
        }
        out
    }

    /// [`Matrix::tokens`] for a format whose batches differ ([`Format::BATCH_DIFFERS`]): each run of
    /// `runs` as llama.cpp computes it (`sides`: the activations of the runs taken side by side).
    #[inline(always)]
    fn batch<I: Dots>(
        &self,
        isa: I,
        rows: std::ops::Range<usize>,
        quantized: &[F::Activation],
        tokens: usize,
        runs: &[(usize, Run)],
        sides: &[Vec<F::Side>],
    ) -> Vec<f32> {
        let per_row = self.columns / F::VALUES;
        let (first, width) = (rows.start, rows.len());
        let activations = |token: usize| &quantized[token * per_row..(token + 1) * per_row];
        let mut out = vec![0f32; width * tokens];
        for &(token, run) in runs {
            let four = || std::array::from_fn(|index| activations(token + index));
            for row in rows.clone() {
                let weights = &self.blocks[row * per_row..(row + 1) * per_row];
                let mut results = [0f32; WIDE_GROUP];
                match run {
                    Run::Side(index) => results = F::dots_side(isa, weights, &sides[index]),
                    Run::Fours => {
                        results[..4].copy_from_slice(&F::batch_dots4(isa, weights, four()))
                    }
                    Run::Alone => {
                        results[..4].copy_from_slice(&F::batch_dots_alone4(isa, weights, four()));
                    }
                    Run::One => results[0] = F::batch_dot(isa, weights, activations(token), false),
                }
                for (index, value) in results[..run.rows()].iter().enumerate() {
                    out[(token + index) * width + row - first] = *value;
                }
            }
        }
        out
    }
}

/// How a run of a batch's rows goes through a format whose batches differ ([`Format::BATCH_DIFFERS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// `WIDE_GROUP` rows taken in fours, side by side: this entry of the sides.
    Side(usize),
    /// Four rows taken in fours.
    Fours,
    /// Four rows each computed alone (one row of each of four sequences, say).
    Alone,
    /// One row computed alone.
    One,
}

impl Run {
    fn rows(self) -> usize {
        match self {
            Run::Side(_) => WIDE_GROUP,
            Run::Fours | Run::Alone => 4,
            Run::One => 1,
        }
    }
}

/// The runs, from their first row, of a batch of `sequences` (their row counts): llama.cpp computes a
/// sequence's rows four at a time but for its last `rows % 4`, which it computes alone; `side_by_side`
/// where the form takes `WIDE_GROUP` rows in fours at once.
fn batch_runs(sequences: &[usize], side_by_side: bool) -> Vec<(usize, Run)> {
    let in_fours: Vec<bool> = sequences
        .iter()
        .flat_map(|rows| (0..*rows).map(move |row| row < rows - rows % 4))
        .collect();
    let all = |from: usize, count: usize, value: bool| {
        from + count <= in_fours.len() && in_fours[from..from + count].iter().all(|x| *x == value)
    };
    let (mut runs, mut token, mut sides) = (Vec::new(), 0, 0);
    while token < in_fours.len() {
        // A sequence's rows in fours start at its first row, so four in a row are one group.
        let run = if side_by_side && all(token, WIDE_GROUP, true) {
            sides += 1;
            Run::Side(sides - 1)
        } else if in_fours[token] {
            Run::Fours
        } else if all(token, 4, false) {
            Run::Alone
        } else {
            Run::One
        };
        runs.push((token, run));
        token += run.rows();
    }
    runs
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::quant::tests::{random_blocks, random_input};
    #[cfg(target_arch = "x86_64")]
    use crate::simd::{Avx2, Baseline};

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

    /// Whole matrix products, for one token (generation) and for batches that go by 16, 8, 4, 2 and 1 (rows
    /// in pairs and one left over, where the CPU has the 512-bit forms), equal in every form.
    #[test]
    fn the_forms_compute_equal_products() {
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = Avx2::detect(true) {
            let (rows, columns) = (71, 96);
            let q41 = Q41Matrix::from_gguf(&random_blocks(20, rows * 3, 3), rows, columns)
                .expect("Q4_1 matrix");
            let q80 = Q80Matrix::from_gguf(&random_blocks(34, rows * 3, 4), rows, columns)
                .expect("Q8_0 matrix");
            for tokens in [1, 2, 15, 23] {
                let input = random_input(tokens * columns, tokens as u32);
                let bits = |values: Vec<f32>| {
                    values
                        .iter()
                        .map(|value| value.to_bits())
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    bits(q41.forward_with(avx2, &input, &[tokens])),
                    bits(q41.forward_with(Baseline, &input, &[tokens])),
                    "Q4_1, {tokens} tokens"
                );
                assert_eq!(
                    bits(q80.forward_with(avx2, &input, &[tokens])),
                    bits(q80.forward_with(Baseline, &input, &[tokens])),
                    "Q8_0, {tokens} tokens"
                );
                // Without the 512-bit forms (the same where the CPU lacks them).
                assert_eq!(
                    bits(q80.forward_with(avx2.narrow(), &input, &[tokens])),
                    bits(q80.forward_with(Baseline, &input, &[tokens])),
                    "Q8_0 in AVX2 alone, {tokens} tokens"
                );
            }
        }
    }

    /// A batch's runs follow llama.cpp's fours: each sequence's rows four at a time from its first,
    /// its last `rows % 4` alone; sixteen rows in fours side by side where the form can, across
    /// sequences too (each four is still one sequence's).
    #[test]
    fn a_batch_runs_in_llama_cpp_fours() {
        use Run::*;
        assert_eq!(
            batch_runs(&[19], true),
            [(0, Side(0)), (16, One), (17, One), (18, One)]
        );
        assert_eq!(
            batch_runs(&[19], false),
            [
                (0, Fours),
                (4, Fours),
                (8, Fours),
                (12, Fours),
                (16, One),
                (17, One),
                (18, One)
            ]
        );
        assert_eq!(
            batch_runs(&[1, 1, 1, 1, 6], true),
            [(0, Alone), (4, Fours), (8, One), (9, One)]
        );
        assert_eq!(batch_runs(&[8, 8, 16], true), [(0, Side(0)), (16, Side(1))]);
        assert_eq!(
            batch_runs(&[8, 2, 8, 8], true),
            [(0, Fours), (4, Fours), (8, One), (9, One), (10, Side(0))]
        );
    }
}
