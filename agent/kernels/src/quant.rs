//! Quantized matrices times f32 activations: Q4_1 (the hottest operation of Q4_1 models) and Q8_0 (their
//! tied output head), computed as llama.cpp's x86 kernels compute them.
//!
//! candle's Q4_1 dot product is its generic scalar one (three quarters of generation time in a profile),
//! and its sums are ordered differently from ggml's, which is enough to flip greedy decoding at the near
//! ties the reference prompts go through. These kernels reproduce ggml's arithmetic operation for
//! operation: activations quantized to 8 bits per block as `quantize_row_q8_1`/`_q8_0` do (scale
//! `max/127`, multiplier `127/max`, round half to even, the Q8_1 block sum `sum * scale` rounded to f16),
//! integer products summed four at a time into eight lanes, each lane accumulated with a fused
//! multiply-add of the two block scales' product, the lanes summed pairwise (`hsum_float_8`), and for
//! Q4_1 the minimums' term accumulated apart and added last. The compiler vectorises the integer part
//! (`i16` products summed into `i32`); rows are split over the threads.

use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::simd::Avx2;
use crate::simd::{Baseline, Isa, dispatch};

const BLOCK: usize = 32;
/// ggml sums a block's products four at a time into eight vector lanes.
const LANES: usize = 8;

/// Activations of one row quantized to 8-bit blocks (ggml's Q8_1; Q8_0 is the same without the sum).
#[derive(Clone, Copy, Debug)]
pub struct Q8Block {
    pub(crate) scale: f32,
    /// `sum(values) * scale` rounded to f16, as Q8_1 keeps it.
    pub(crate) sum: f32,
    pub(crate) values: [i8; BLOCK],
    /// `-128 *` the sum of each four values (a lane's): what the 512-bit forms take off a product with
    /// weights made unsigned by adding 128 (`avx512.rs`).
    #[cfg(target_arch = "x86_64")]
    pub(crate) offsets: [i32; LANES],
}

/// A weight block format.
pub trait Format: Send + Sync {
    type Block: Copy + Send + Sync + std::fmt::Debug;
    /// A block of activations quantized as ggml quantizes them for this format (its `vec_dot_type`).
    type Activation: Copy + Send + Sync + std::fmt::Debug;
    /// A block of `WIDE_GROUP` activation rows laid side by side, for a form that puts rows in a
    /// register's lanes ([`Format::sides`]); `()` for the formats without one.
    type Side: Send + Sync;
    /// Bytes of one block in a GGUF file.
    const BYTES: usize;
    /// Values in one block (of weights, and of activations).
    const VALUES: usize;
    fn parse(bytes: &[u8]) -> Self::Block;
    /// One block of activations (`VALUES` of them) quantized.
    fn quantize<I: Isa>(isa: I, values: &[f32]) -> Self::Activation;
    /// The dot product of one weight row and one quantized activation row.
    fn dot<I: Dots>(isa: I, weights: &[Self::Block], activations: &[Self::Activation]) -> f32;

    /// The dot products of one weight row with `N` activation rows (prompt tokens, or one token of
    /// each of several sequences): each equal to [`Format::dot`]'s, faster where a format unpacks its
    /// weights once for all of them.
    fn dots<I: Dots, const N: usize>(
        isa: I,
        weights: &[Self::Block],
        activations: [&[Self::Activation]; N],
    ) -> [f32; N] {
        each_row(activations, |activations| {
            Self::dot(isa, weights, activations)
        })
    }

    /// Whether form `isa` computes two weight rows at once ([`Format::dots2`]) faster than one by one,
    /// for `tokens` activation rows.
    fn pairs<I: Dots>(isa: I, tokens: usize) -> bool {
        let _ = (isa, tokens);
        false
    }

    /// [`Format::dots`] of two weight rows: faster where a form computes both at once.
    fn dots2<I: Dots, const N: usize>(
        isa: I,
        weights: [&[Self::Block]; 2],
        activations: [&[Self::Activation]; N],
    ) -> [[f32; N]; 2] {
        [
            Self::dots(isa, weights[0], activations),
            Self::dots(isa, weights[1], activations),
        ]
    }

    /// Whether llama.cpp computes a batch's rows differently from one token's: then each row of a batch
    /// goes through [`Format::batch_dot`], told whether it is among the rows taken in fours.
    const BATCH_DIFFERS: bool = false;

    /// The dot product of one row of a batch; `in_fours` for the rows llama.cpp's repacked kernels take
    /// four at a time (all but the last `rows % 4`).
    fn batch_dot<I: Dots>(
        isa: I,
        weights: &[Self::Block],
        activations: &[Self::Activation],
        in_fours: bool,
    ) -> f32 {
        let _ = in_fours;
        Self::dot(isa, weights, activations)
    }

    /// [`Format::batch_dot`] of four rows each computed alone (not among the rows taken in fours: one
    /// token of each of four sequences), faster where a format unpacks its weights once for them.
    fn batch_dots_alone4<I: Dots>(
        isa: I,
        weights: &[Self::Block],
        activations: [&[Self::Activation]; 4],
    ) -> [f32; 4] {
        each_row(activations, |activations| {
            Self::batch_dot(isa, weights, activations, false)
        })
    }

    /// Whether form `isa` computes `WIDE_GROUP` activation rows at once laid side by side, one in each
    /// lane of a register ([`Format::sides`], [`Format::dots_side`]). For a format whose batches differ,
    /// rows taken in fours.
    fn side_by_side<I: Dots>(isa: I) -> bool {
        let _ = isa;
        false
    }

    /// `WIDE_GROUP` activation rows laid side by side, block by block, for [`Format::dots_side`].
    fn sides(rows: [&[Self::Activation]; WIDE_GROUP]) -> Vec<Self::Side> {
        let _ = rows;
        unreachable!("only called where `Format::side_by_side` holds")
    }

    /// [`Format::dots`] of one weight row with the `WIDE_GROUP` rows [`Format::sides`] laid side by
    /// side; for a format whose batches differ, [`Format::batch_dots4`] of each four.
    fn dots_side<I: Dots>(
        isa: I,
        weights: &[Self::Block],
        sides: &[Self::Side],
    ) -> [f32; WIDE_GROUP] {
        let _ = (isa, weights, sides);
        unreachable!("only called where `Format::side_by_side` holds")
    }

    /// [`Format::batch_dot`] of four rows taken four at a time.
    fn batch_dots4<I: Dots>(
        isa: I,
        weights: &[Self::Block],
        activations: [&[Self::Activation]; 4],
    ) -> [f32; 4] {
        each_row(activations, |activations| {
            Self::batch_dot(isa, weights, activations, true)
        })
    }
}

/// `dot` of each of `N` activation rows. A plain loop: `array::map`'s closure is kept out of line,
/// without the form's target features.
#[inline(always)]
pub(crate) fn each_row<A, const N: usize>(
    rows: [&[A]; N],
    mut dot: impl FnMut(&[A]) -> f32,
) -> [f32; N] {
    let mut out = [0f32; N];
    for (slot, row) in out.iter_mut().zip(rows) {
        *slot = dot(row);
    }
    out
}

/// The block dot products of a form of the kernels ([`crate::simd`]): the portable ones below, NEON's
/// on aarch64, the AVX2 intrinsics where the CPU has them.
pub trait Dots: Isa {
    fn q41_dot(self, weights: &[Q41Block], activations: &[Q8Block]) -> f32;

    fn q41_dots<const N: usize>(
        self,
        weights: &[Q41Block],
        activations: [&[Q8Block]; N],
    ) -> [f32; N] {
        activations.map(|activations| self.q41_dot(weights, activations))
    }

    fn q80_dot(self, weights: &[Q80Block], activations: &[Q8Block]) -> f32;

    fn q80_dots<const N: usize>(
        self,
        weights: &[Q80Block],
        activations: [&[Q8Block]; N],
    ) -> [f32; N] {
        each_row(activations, |activations| {
            self.q80_dot(weights, activations)
        })
    }
}

impl Dots for Baseline {
    #[inline(always)]
    fn q41_dot(self, weights: &[Q41Block], activations: &[Q8Block]) -> f32 {
        #[cfg(vector_kernels)]
        return crate::vector::q41_dot(weights, activations);
        #[allow(unreachable_code)]
        q41_dot(self, weights, activations)
    }

    #[cfg(vector_kernels)]
    #[inline(always)]
    fn q41_dots<const N: usize>(
        self,
        weights: &[Q41Block],
        activations: [&[Q8Block]; N],
    ) -> [f32; N] {
        crate::vector::q41_dots(weights, activations)
    }

    #[inline(always)]
    fn q80_dot(self, weights: &[Q80Block], activations: &[Q8Block]) -> f32 {
        #[cfg(vector_kernels)]
        return crate::vector::q80_dot(weights, activations);
        #[allow(unreachable_code)]
        q80_dot(self, weights, activations)
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
impl Dots for Avx2 {
    #[inline(always)]
    fn q41_dot(self, weights: &[Q41Block], activations: &[Q8Block]) -> f32 {
        // SAFETY: an `Avx2` exists only where the CPU has the features these functions enable.
        unsafe { crate::vector::q41_dot(weights, activations) }
    }

    #[inline(always)]
    fn q41_dots<const N: usize>(
        self,
        weights: &[Q41Block],
        activations: [&[Q8Block]; N],
    ) -> [f32; N] {
        // SAFETY: as in `q41_dot`.
        unsafe { crate::vector::q41_dots(weights, activations) }
    }

    #[inline(always)]
    fn q80_dot(self, weights: &[Q80Block], activations: &[Q8Block]) -> f32 {
        // SAFETY: as in `q41_dot`.
        unsafe { crate::vector::q80_dot(weights, activations) }
    }

    #[inline(always)]
    fn q80_dots<const N: usize>(
        self,
        weights: &[Q80Block],
        activations: [&[Q8Block]; N],
    ) -> [f32; N] {
        // SAFETY: as in `q41_dot`.
        unsafe { crate::vector::q80_dots(weights, activations) }
    }
}

/// Whether form `isa` has the 512-bit kernels (`avx512.rs`).
#[inline(always)]
pub(crate) fn wide<I: Isa>(isa: I) -> bool {
    #[cfg(target_arch = "x86_64")]
    return isa.avx2().and_then(Avx2::wide).is_some();
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// Activation rows a weight row is applied to at once in prompt processing; what is left of a batch
/// goes by 4, then 2, then 1.
pub const GROUP: usize = 8;
/// Activation rows two weight rows are applied to at once where a form computes them in pairs (32
/// registers: the 512-bit forms), and rows a form puts side by side in a 512-bit register's lanes.
pub(crate) const WIDE_GROUP: usize = 16;

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

/// Q4_1: f16 scale, f16 minimum, 32 four-bit values (`scale * value + min`).
#[derive(Debug)]
pub struct Q41;

#[derive(Clone, Copy, Debug)]
pub struct Q41Block {
    // Kept f16 as in the file: generation streams every weight once per token, so bytes are time.
    pub(crate) scale: f16,
    pub(crate) min: f16,
    /// Values 0..16 in the low nibbles, 16..32 in the high ones, as in the file.
    pub(crate) values: [u8; 16],
}

impl Format for Q41 {
    type Block = Q41Block;
    type Activation = Q8Block;
    type Side = ();
    const BYTES: usize = 20;
    const VALUES: usize = BLOCK;

    fn parse(block: &[u8]) -> Q41Block {
        let mut values = [0u8; 16];
        values.copy_from_slice(&block[4..20]);
        Q41Block {
            scale: f16::from_le_bytes([block[0], block[1]]),
            min: f16::from_le_bytes([block[2], block[3]]),
            values,
        }
    }

    #[inline(always)]
    fn quantize<I: Isa>(isa: I, values: &[f32]) -> Q8Block {
        quantize(isa, values)
    }

    #[inline(always)]
    fn dot<I: Dots>(isa: I, weights: &[Q41Block], activations: &[Q8Block]) -> f32 {
        isa.q41_dot(weights, activations)
    }

    #[inline(always)]
    fn dots<I: Dots, const N: usize>(
        isa: I,
        weights: &[Q41Block],
        activations: [&[Q8Block]; N],
    ) -> [f32; N] {
        isa.q41_dots(weights, activations)
    }
}

/// ggml's `ggml_vec_dot_q4_1_q8_1` (AVX2), portable.
#[cfg_attr(vector_kernels, allow(dead_code))]
#[inline(always)]
fn q41_dot<I: Isa>(isa: I, weights: &[Q41Block], activations: &[Q8Block]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut minimums = 0f32;
    for (weight, activation) in weights.iter().zip(activations) {
        let scale = isa.to_f32(weight.scale) * activation.scale;
        minimums = isa.to_f32(weight.min).mul_add(activation.sum, minimums);
        let mut unpacked = [0i8; BLOCK];
        for (index, byte) in weight.values.iter().enumerate() {
            unpacked[index] = (byte & 0x0F) as i8;
            unpacked[index + 16] = (byte >> 4) as i8;
        }
        accumulate(&mut lanes, scale, &unpacked, &activation.values);
    }
    sum_lanes(&lanes) + minimums
}

/// Q8_0: f16 scale, 32 eight-bit values.
#[derive(Debug)]
pub struct Q80;

#[derive(Clone, Copy, Debug)]
pub struct Q80Block {
    pub(crate) scale: f16,
    pub(crate) values: [i8; BLOCK],
}

impl Format for Q80 {
    type Block = Q80Block;
    type Activation = Q8Block;
    type Side = ();
    const BYTES: usize = 34;
    const VALUES: usize = BLOCK;

    fn parse(block: &[u8]) -> Q80Block {
        let mut values = [0i8; BLOCK];
        for (slot, byte) in values.iter_mut().zip(&block[2..34]) {
            *slot = *byte as i8;
        }
        Q80Block {
            scale: f16::from_le_bytes([block[0], block[1]]),
            values,
        }
    }

    #[inline(always)]
    fn quantize<I: Isa>(isa: I, values: &[f32]) -> Q8Block {
        quantize(isa, values)
    }

    #[inline(always)]
    fn dot<I: Dots>(isa: I, weights: &[Q80Block], activations: &[Q8Block]) -> f32 {
        isa.q80_dot(weights, activations)
    }

    #[inline(always)]
    fn dots<I: Dots, const N: usize>(
        isa: I,
        weights: &[Q80Block],
        activations: [&[Q8Block]; N],
    ) -> [f32; N] {
        isa.q80_dots(weights, activations)
    }

    #[inline(always)]
    fn pairs<I: Dots>(isa: I, tokens: usize) -> bool {
        // Two rows at once pay off from eight activation rows: below, the AVX2 form is as fast on a
        // matrix in cache and faster on one read from memory (a 262 144-row output head: 15.0 ms for
        // four rows in pairs, 9.9 ms one by one; one row: slower too).
        tokens >= 8 && wide(isa)
    }

    #[inline(always)]
    #[allow(unsafe_code)]
    fn dots2<I: Dots, const N: usize>(
        isa: I,
        weights: [&[Q80Block]; 2],
        activations: [&[Q8Block]; N],
    ) -> [[f32; N]; 2] {
        #[cfg(target_arch = "x86_64")]
        if wide(isa) {
            // SAFETY: a `Wide` exists only where the CPU has the features these functions enable.
            return unsafe { crate::vector::wide::q80_dots2(weights, activations) };
        }
        [
            isa.q80_dots(weights[0], activations),
            isa.q80_dots(weights[1], activations),
        ]
    }
}

/// ggml's `ggml_vec_dot_q8_0_q8_0` (AVX2; llamafile's tinyBLAS sums the same way), portable.
#[cfg_attr(vector_kernels, allow(dead_code))]
#[inline(always)]
fn q80_dot<I: Isa>(isa: I, weights: &[Q80Block], activations: &[Q8Block]) -> f32 {
    let mut lanes = [0f32; LANES];
    for (weight, activation) in weights.iter().zip(activations) {
        let scale = isa.to_f32(weight.scale) * activation.scale;
        accumulate(&mut lanes, scale, &weight.values, &activation.values);
    }
    sum_lanes(&lanes)
}

/// Adds one block's products to the lanes: lane `k` gets `scale * (the sum of products 4k..4k+4)`, fused.
#[inline(always)]
pub(crate) fn accumulate(
    lanes: &mut [f32; LANES],
    scale: f32,
    weights: &[i8; BLOCK],
    activations: &[i8; BLOCK],
) {
    let mut products = [0i32; BLOCK];
    for (product, (weight, activation)) in products.iter_mut().zip(weights.iter().zip(activations))
    {
        *product = i32::from(i16::from(*weight) * i16::from(*activation));
    }
    let sums: [i32; LANES] = std::array::from_fn(|lane| {
        (products[4 * lane] + products[4 * lane + 1])
            + (products[4 * lane + 2] + products[4 * lane + 3])
    });
    for (lane, sum) in lanes.iter_mut().zip(sums) {
        *lane = scale.mul_add(sum as f32, *lane);
    }
}

/// ggml's `hsum_float_8`: the upper four lanes onto the lower, then pairs.
#[inline(always)]
pub(crate) fn sum_lanes(lanes: &[f32; LANES]) -> f32 {
    let quarters: [f32; 4] = std::array::from_fn(|lane| lanes[lane + 4] + lanes[lane]);
    (quarters[0] + quarters[2]) + (quarters[1] + quarters[3])
}

/// ggml's `quantize_row_q8_1` for one block (AVX2).
#[inline(always)]
pub(crate) fn quantize<I: Isa>(isa: I, values: &[f32]) -> Q8Block {
    let max = values.iter().fold(0f32, |max, value| max.max(value.abs()));
    let scale = max / 127.0;
    let multiplier = if max != 0.0 { 127.0 / max } else { 0.0 };
    let mut quantized = [0i8; BLOCK];
    let mut sum = 0i32;
    for (slot, value) in quantized.iter_mut().zip(values) {
        *slot = (value * multiplier).round_ties_even() as i8;
        sum += i32::from(*slot);
    }
    #[cfg(target_arch = "x86_64")]
    let mut offsets = [0i32; LANES];
    #[cfg(target_arch = "x86_64")]
    for (offset, quad) in offsets.iter_mut().zip(quantized.chunks_exact(4)) {
        let mut sum = 0i32;
        for value in quad {
            sum += i32::from(*value);
        }
        *offset = -128 * sum;
    }
    Q8Block {
        scale: isa.to_f32(isa.to_f16(scale)),
        sum: isa.to_f32(isa.to_f16(sum as f32 * scale)),
        values: quantized,
        #[cfg(target_arch = "x86_64")]
        offsets,
    }
}

/// `input`, rows of whole blocks, quantized block by block for `F`.
fn quantize_rows<F: Format, I: Isa>(isa: I, input: &[f32]) -> Vec<F::Activation> {
    isa.run(
        #[inline(always)]
        || {
            // A plain loop: an iterator adapter the compiler kept out of line would lose the form's
            // target features.
            let mut quantized = Vec::with_capacity(input.len() / F::VALUES);
            for block in input.chunks_exact(F::VALUES) {
                quantized.push(F::quantize(isa, block));
            }
            quantized
        },
    )
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
        let per_row = self.columns / BLOCK;
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
                2..4 => 2,
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
pub(crate) mod tests {
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

    /// Blocks of deterministic pseudo-random bytes with sane f16 scales.
    fn random_blocks(bytes_per_block: usize, count: usize, seed: u32) -> Vec<u8> {
        let mut state = seed;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let mut bytes = Vec::new();
        for _ in 0..count {
            let scale = (next() % 1000) as f32 / 20_000.0;
            bytes.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
            if bytes_per_block == 20 {
                bytes.extend_from_slice(&f16::from_f32(-scale * 8.0).to_le_bytes());
            }
            while bytes.len() % bytes_per_block != 0 {
                bytes.push(next() as u8);
            }
        }
        bytes
    }

    /// Deterministic pseudo-random activations around ±10.
    pub(crate) fn random_input(length: usize, seed: u32) -> Vec<f32> {
        let mut state = seed;
        (0..length)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (state >> 16) as f32 / 3000.0 - 10.0
            })
            .collect()
    }

    #[test]
    fn the_vector_dots_equal_the_portable_ones_bit_for_bit() {
        check_dots(Baseline);
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = Avx2::detect(true) {
            check_dots(avx2);
        }
    }

    /// `isa`'s quantization and dot products against the portable forms.
    fn check_dots<I: Dots>(isa: I) {
        let input = random_input(256, 7);
        let activations = quantize_rows::<Q41, _>(Baseline, &input);
        for (ours, portable) in quantize_rows::<Q41, _>(isa, &input)
            .iter()
            .zip(&activations)
        {
            assert_eq!(ours.scale.to_bits(), portable.scale.to_bits());
            assert_eq!(ours.sum.to_bits(), portable.sum.to_bits());
            assert_eq!(ours.values, portable.values);
        }
        let q41: Vec<Q41Block> = random_blocks(20, 8, 1)
            .chunks_exact(20)
            .map(Q41::parse)
            .collect();
        let q80: Vec<Q80Block> = random_blocks(34, 8, 2)
            .chunks_exact(34)
            .map(Q80::parse)
            .collect();
        assert_eq!(
            Q41::dot(isa, &q41, &activations).to_bits(),
            q41_dot(Baseline, &q41, &activations).to_bits()
        );
        let rows: [&[Q8Block]; GROUP] =
            std::array::from_fn(|index| &activations[index % 4..index % 4 + 4]);
        let grouped = Q41::dots(isa, &q41[..4], rows);
        for (index, result) in grouped.iter().enumerate() {
            assert_eq!(
                result.to_bits(),
                q41_dot(Baseline, &q41[..4], rows[index]).to_bits()
            );
        }
        let pair = Q41::dots(isa, &q41[..4], [rows[0], rows[1]]);
        assert_eq!(
            pair[1].to_bits(),
            q41_dot(Baseline, &q41[..4], rows[1]).to_bits()
        );
        assert_eq!(
            Q80::dot(isa, &q80, &activations).to_bits(),
            q80_dot(Baseline, &q80, &activations).to_bits()
        );
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

    #[test]
    fn activations_round_half_to_even_and_keep_the_q8_1_sum() {
        // max 127 so the multiplier is 1: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2.
        let mut values = [0f32; BLOCK];
        values[..4].copy_from_slice(&[127.0, 0.5, 1.5, -2.5]);
        let block = quantize(Baseline, &values);
        assert_eq!(block.values[..4], [127, 0, 2, -2]);
        assert_eq!(block.scale, 1.0);
        assert_eq!(block.sum, 127.0);
    }
}
