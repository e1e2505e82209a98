//! The block formats of quantized matrices ([`Format`], the trait `crate::matrix` drives) and the first
//! two: Q4_1 (the hottest operation of Q4_1 models) and Q8_0 (their tied output head), computed as
//! llama.cpp's x86 kernels compute them.
//!
//! candle's Q4_1 dot product is its generic scalar one (three quarters of generation time in a profile),
//! and its sums are ordered differently from ggml's, which is enough to flip greedy decoding at the near
//! ties the reference prompts go through. These kernels reproduce ggml's arithmetic operation for
//! operation: activations quantized to 8 bits per block as `quantize_row_q8_1`/`_q8_0` do (scale
//! `max/127`, multiplier `127/max`, round half to even, the Q8_1 block sum `sum * scale` rounded to f16),
//! integer products summed four at a time into eight lanes, each lane accumulated with a fused
//! multiply-add of the two block scales' product, the lanes summed pairwise (`hsum_float_8`), and for
//! Q4_1 the minimums' term accumulated apart and added last. The compiler vectorises the integer part
//! (`i16` products summed into `i32`).

use half::f16;
use rayon::prelude::*;

use crate::activation::spread;
#[cfg(target_arch = "x86_64")]
use crate::simd::Avx2;
use crate::simd::{Baseline, Isa};

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
        // SAFETY: as in `q41_dot`; a `Wide` exists only where the CPU has the 512-bit forms' features.
        unsafe {
            if self.wide().is_some() {
                crate::vector::wide::q41_dots(weights, activations)
            } else {
                crate::vector::q41_dots(weights, activations)
            }
        }
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
/// goes by 4, then 3, 2 or 1.
pub(crate) const GROUP: usize = 8;
/// Activation rows two weight rows are applied to at once where a form computes them in pairs (32
/// registers: the 512-bit forms), and rows a form puts side by side in a 512-bit register's lanes.
pub(crate) const WIDE_GROUP: usize = 16;

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
        // Two rows at once pay off from eight activation rows. Below, the pair form is faster on a
        // matrix in cache (2048 x 640: 46 against 66 us for four rows) but much slower on one read
        // from memory, as Gemma 3's 262 144-row output head is, the one Q8_0 matrix of the models
        // served (14.7 ms against 6.2 for four rows, 10.3 against 3.6 for one).
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
pub(crate) fn quantize_rows<F: Format, I: Isa>(isa: I, input: &[f32]) -> Vec<F::Activation> {
    let quantize = |input: &[f32]| {
        isa.run(
            #[inline(always)]
            || {
                // A plain loop: an iterator adapter the compiler kept out of line would lose the
                // form's target features.
                let mut quantized = Vec::with_capacity(input.len() / F::VALUES);
                for block in input.chunks_exact(F::VALUES) {
                    quantized.push(F::quantize(isa, block));
                }
                quantized
            },
        )
    };
    match spread(input.len(), F::VALUES) {
        Some(size) => {
            let pieces: Vec<Vec<F::Activation>> = input.par_chunks(size).map(quantize).collect();
            pieces.concat()
        }
        None => quantize(input),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Blocks of deterministic pseudo-random bytes with sane f16 scales.
    pub(crate) fn random_blocks(bytes_per_block: usize, count: usize, seed: u32) -> Vec<u8> {
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

    /// A prompt's activations quantized in pieces over the threads are the blocks one thread makes.
    #[test]
    fn quantizing_over_threads_changes_no_block() {
        check_quantizing_over_threads::<Q41>();
        check_quantizing_over_threads::<Q80>();
    }

    /// [`quantize_rows`] for `F` gives the same blocks with one thread and with three.
    pub(crate) fn check_quantizing_over_threads<F: Format>() {
        use crate::activation::tests::pool;
        // 37 rows of 768: past the spreading threshold, in pieces that end mid-row.
        let input: Vec<f32> = (0..37 * 768)
            .map(|index| ((index * 7919) % 4001) as f32 / 97.0 - 20.0)
            .collect();
        let blocks = |threads: rayon::ThreadPool| {
            threads.install(|| format!("{:?}", quantize_rows::<F, _>(Baseline, &input)))
        };
        assert_eq!(blocks(pool(1)), blocks(pool(3)));
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
