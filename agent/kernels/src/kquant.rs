//! The formats of Ollama's Q4_K_M files besides Q8_0: Q4_K and Q6_K (super-blocks of 256 values with
//! 6- or 8-bit sub-block scales) and Q5_0 (which llama.cpp's quantizer falls back to for matrices whose
//! width is not a multiple of 256, as most of Gemma 3 270M's are). Each dot product is llama.cpp's x86
//! arithmetic for the type, operation for operation (see [`crate::quant`] for why):
//!
//! - Q4_K: activations quantized to Q8_K (`quantize_row_q8_K`: scale `max/-127` of the signed
//!   largest value, round half to even, sums of 16), each super-block's integer dot product (sub-block
//!   scales applied) and its minimums' integer term converted to f32 and accumulated with a fused
//!   multiply-add of the two scales' product, the minimums' total subtracted last: ggml's repacked
//!   `gemv_q4_K_8x8_q8_K`/`gemm_q4_K_8x8_q8_K`, which every AVX2 CPU runs for matrices of a multiple
//!   of 8 rows.
//! - Q6_K: `ggml_vec_dot_q6_K_q8_K` (AVX2): the integer products of four values per lane, scaled per
//!   16-value group, eight lanes, the offset of 32 taken off through the activation sums, each lane
//!   accumulated with a fused multiply-add of the scales' product, then `hsum_float_8`.
//! - Q5_0: `ggml_vec_dot_q5_0_q8_0` (AVX2): as Q8_0, on the 5-bit values less 16.
//!
//! All integer sums are exact (no 16-bit saturation can occur with these value ranges), so only where
//! a sum is converted to f32 and in what order the floats are added decides the result.

use half::f16;

use crate::matrix::Matrix;
use crate::quant::{
    Dots, Format, Q8Block, WIDE_GROUP, accumulate, each_row, quantize, sum_lanes, wide,
};
use crate::simd::Isa;

pub type Q50Matrix = Matrix<Q50>;
pub type Q4KMatrix = Matrix<Q4K>;
pub type Q6KMatrix = Matrix<Q6K>;

/// Values in a K-quant super-block.
const SUPER: usize = 256;
/// Lanes ggml's AVX2 code accumulates in.
const LANES: usize = 8;

/// Activations of one super-block quantized as ggml's Q8_K.
#[derive(Clone, Copy, Debug)]
pub struct Q8KBlock {
    pub(crate) scale: f32,
    pub(crate) values: [i8; SUPER],
    /// Sums of each 16 values.
    pub(crate) sums: [i16; 16],
}

/// ggml's `quantize_row_q8_K_ref` for one super-block: the value of largest magnitude (the first of
/// equals) sets the scale `1 / (-127 / max)`, values rounded half to even and capped at 127.
#[inline(always)]
pub(crate) fn quantize_k(values: &[f32]) -> Q8KBlock {
    let (mut max, mut largest) = (0f32, 0f32);
    for value in values {
        if value.abs() > largest {
            largest = value.abs();
            max = *value;
        }
    }
    let mut block = Q8KBlock {
        scale: 0.0,
        values: [0; SUPER],
        sums: [0; 16],
    };
    if largest == 0.0 {
        return block;
    }
    let inverse = -127.0 / max;
    for (slot, value) in block.values.iter_mut().zip(values) {
        *slot = (inverse * value).round_ties_even().min(127.0) as i8;
    }
    for (sum, group) in block.sums.iter_mut().zip(block.values.chunks_exact(16)) {
        for value in group {
            *sum += i16::from(*value);
        }
    }
    block.scale = 1.0 / inverse;
    block
}

/// Q5_0: f16 scale, 32 five-bit values (`scale * (value - 16)`), the fifth bits apart.
#[derive(Debug)]
pub struct Q50;

#[derive(Clone, Copy, Debug)]
pub struct Q50Block {
    pub(crate) scale: f16,
    /// Bit `i` is value `i`'s fifth bit.
    pub(crate) high: u32,
    /// Values 0..16 in the low nibbles, 16..32 in the high ones.
    pub(crate) low: [u8; 16],
}

#[allow(unsafe_code)]
impl Format for Q50 {
    type Block = Q50Block;
    type Activation = Q8Block;
    type Side = ();
    const BYTES: usize = 22;
    const VALUES: usize = 32;

    fn parse(block: &[u8]) -> Q50Block {
        let mut low = [0u8; 16];
        low.copy_from_slice(&block[6..22]);
        Q50Block {
            scale: f16::from_le_bytes([block[0], block[1]]),
            high: u32::from_le_bytes([block[2], block[3], block[4], block[5]]),
            low,
        }
    }

    #[inline(always)]
    fn quantize<I: Isa>(isa: I, values: &[f32]) -> Q8Block {
        quantize(isa, values)
    }

    #[inline(always)]
    #[cfg_attr(vector_kernels, allow(unused_variables))]
    fn dot<I: Dots>(isa: I, weights: &[Q50Block], activations: &[Q8Block]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if isa.avx2().is_some() {
            // SAFETY: an `Avx2` exists only where the CPU has the features these functions enable.
            return unsafe { crate::vector::q50_dot(weights, activations) };
        }
        #[cfg(vector_kernels)]
        return crate::vector::q50_dot(weights, activations);
        #[allow(unreachable_code)]
        q50_dot(isa, weights, activations)
    }

    #[inline(always)]
    #[cfg_attr(vector_kernels, allow(unused_variables))]
    fn dots<I: Dots, const N: usize>(
        isa: I,
        weights: &[Q50Block],
        activations: [&[Q8Block]; N],
    ) -> [f32; N] {
        #[cfg(target_arch = "x86_64")]
        if isa.avx2().is_some() {
            // SAFETY: as in `dot`.
            return unsafe { crate::vector::q50_dots(weights, activations) };
        }
        #[cfg(vector_kernels)]
        return crate::vector::q50_dots(weights, activations);
        #[allow(unreachable_code)]
        each_row(activations, |activations| {
            q50_dot(isa, weights, activations)
        })
    }

    #[inline(always)]
    fn pairs<I: Dots>(isa: I, tokens: usize) -> bool {
        // One token: unpacking two rows' blocks for one product each costs more than it saves.
        tokens > 1 && wide(isa)
    }

    #[inline(always)]
    fn dots2<I: Dots, const N: usize>(
        isa: I,
        weights: [&[Q50Block]; 2],
        activations: [&[Q8Block]; N],
    ) -> [[f32; N]; 2] {
        #[cfg(target_arch = "x86_64")]
        if wide(isa) {
            // SAFETY: a `Wide` exists only where the CPU has the features these functions enable.
            return unsafe { crate::vector::wide::q50_dots2(weights, activations) };
        }
        [
            Self::dots(isa, weights[0], activations),
            Self::dots(isa, weights[1], activations),
        ]
    }
}

/// ggml's `ggml_vec_dot_q5_0_q8_0` (AVX2), portable.
#[cfg_attr(vector_kernels, allow(dead_code))]
#[inline(always)]
pub(crate) fn q50_dot<I: Isa>(isa: I, weights: &[Q50Block], activations: &[Q8Block]) -> f32 {
    let mut lanes = [0f32; LANES];
    for (weight, activation) in weights.iter().zip(activations) {
        let scale = isa.to_f32(weight.scale) * activation.scale;
        let mut values = [0i8; 32];
        for index in 0..16 {
            let byte = weight.low[index];
            let low_fifth = ((weight.high >> index) << 4) as u8 & 0x10;
            let high_fifth = ((weight.high >> (index + 12)) as u8) & 0x10;
            values[index] = ((byte & 0x0F) | low_fifth) as i8 - 16;
            values[index + 16] = ((byte >> 4) | high_fifth) as i8 - 16;
        }
        accumulate(&mut lanes, scale, &values, &activation.values);
    }
    sum_lanes(&lanes)
}

/// Q4_K: a super-block of 256 four-bit values in eight sub-blocks of 32, each with a 6-bit scale and
/// minimum (`d * scale * value - dmin * min`).
#[derive(Debug)]
pub struct Q4K;

#[derive(Clone, Copy, Debug)]
pub struct Q4KBlock {
    pub(crate) d: f16,
    pub(crate) dmin: f16,
    /// The sub-blocks' scales and minimums, unpacked from the file's 12 bytes.
    pub(crate) scales: [u8; 8],
    pub(crate) mins: [u8; 8],
    /// Sub-blocks `2j` (low nibbles) and `2j + 1` (high nibbles) in bytes `32j..32j + 32`.
    pub(crate) values: [u8; 128],
}

/// One super-block of `WIDE_GROUP` rows of Q8_K activations side by side, as the side-by-side forms
/// read them (Q4_K with AVX2 or AVX-512 VNNI, Q6_K with VNNI): each run of four values of every row
/// together, so that one register holds the same four values of all the rows (or of eight, in 256 bits)
/// and one instruction multiplies them with four broadcast weights into each row's own lane.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct Q8KSide {
    /// `values[c][row]`: the row's values `4c..4c + 4`.
    pub(crate) values: [[[i8; 4]; WIDE_GROUP]; SUPER / 4],
    /// Each row's scale.
    pub(crate) scales: [f32; WIDE_GROUP],
    /// `sums[p][row]`: the row's sums over sub-blocks `2p` and `2p + 1` (32 values each, so 16 bits
    /// hold them): Q4_K's minimums.
    pub(crate) sums: [[[i16; 2]; WIDE_GROUP]; 4],
    /// `groups[k][row]`: the row's sums of 16 values `2k` and `2k + 1`: Q6_K's offsets.
    pub(crate) groups: [[[i16; 2]; WIDE_GROUP]; 8],
}

/// `rows` laid side by side, super-block by super-block.
fn lay_side_by_side(rows: [&[Q8KBlock]; WIDE_GROUP]) -> Vec<Q8KSide> {
    let blocks = rows.iter().map(|row| row.len()).min().unwrap_or(0);
    let mut sides = Vec::with_capacity(blocks);
    for index in 0..blocks {
        let mut side = Q8KSide {
            values: [[[0; 4]; WIDE_GROUP]; SUPER / 4],
            scales: [0.0; WIDE_GROUP],
            sums: [[[0; 2]; WIDE_GROUP]; 4],
            groups: [[[0; 2]; WIDE_GROUP]; 8],
        };
        for (row, activations) in rows.iter().enumerate() {
            let block = &activations[index];
            for (four, values) in side.values.iter_mut().zip(block.values.chunks_exact(4)) {
                four[row].copy_from_slice(values);
            }
            side.scales[row] = block.scale;
            for (pair, sums) in side.sums.iter_mut().enumerate() {
                let group = &block.sums[4 * pair..4 * pair + 4];
                sums[row] = [group[0] + group[1], group[2] + group[3]];
            }
            for (pair, groups) in side.groups.iter_mut().enumerate() {
                groups[row] = [block.sums[2 * pair], block.sums[2 * pair + 1]];
            }
        }
        sides.push(side);
    }
    sides
}

#[allow(unsafe_code)]
impl Format for Q4K {
    type Block = Q4KBlock;
    type Activation = Q8KBlock;
    type Side = Q8KSide;
    const BYTES: usize = 144;
    const VALUES: usize = SUPER;

    fn parse(block: &[u8]) -> Q4KBlock {
        let packed = &block[4..16];
        let (mut scales, mut mins) = ([0u8; 8], [0u8; 8]);
        // ggml's `get_scale_min_k4`.
        for index in 0..8 {
            (scales[index], mins[index]) = if index < 4 {
                (packed[index] & 63, packed[index + 4] & 63)
            } else {
                (
                    (packed[index + 4] & 0x0F) | ((packed[index - 4] >> 6) << 4),
                    (packed[index + 4] >> 4) | ((packed[index] >> 6) << 4),
                )
            };
        }
        let mut values = [0u8; 128];
        values.copy_from_slice(&block[16..144]);
        Q4KBlock {
            d: f16::from_le_bytes([block[0], block[1]]),
            dmin: f16::from_le_bytes([block[2], block[3]]),
            scales,
            mins,
            values,
        }
    }

    #[inline(always)]
    fn quantize<I: Isa>(_isa: I, values: &[f32]) -> Q8KBlock {
        quantize_k(values)
    }

    #[inline(always)]
    fn dot<I: Dots>(isa: I, weights: &[Q4KBlock], activations: &[Q8KBlock]) -> f32 {
        Self::batch_dot(isa, weights, activations, false)
    }

    const BATCH_DIFFERS: bool = true;

    #[inline(always)]
    #[cfg_attr(vector_kernels, allow(unused_variables))]
    fn batch_dot<I: Dots>(
        isa: I,
        weights: &[Q4KBlock],
        activations: &[Q8KBlock],
        in_fours: bool,
    ) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if isa.avx2().is_some() {
            // SAFETY: as in `Q50::dot`.
            return unsafe { crate::vector::q4k_dot(weights, activations, in_fours) };
        }
        #[cfg(vector_kernels)]
        return crate::vector::q4k_dot(weights, activations, in_fours);
        #[allow(unreachable_code)]
        q4k_dot(isa, weights, activations, in_fours)
    }

    #[inline(always)]
    fn batch_dots_alone4<I: Dots>(
        isa: I,
        weights: &[Q4KBlock],
        activations: [&[Q8KBlock]; 4],
    ) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if isa.avx2().is_some() {
            // SAFETY: as in `Q50::dot`.
            return unsafe { crate::vector::q4k_dots(weights, activations, false) };
        }
        each_row(activations, |activations| {
            Self::batch_dot(isa, weights, activations, false)
        })
    }

    #[inline(always)]
    fn side_by_side<I: Dots>(isa: I) -> bool {
        #[cfg(target_arch = "x86_64")]
        return isa.avx2().is_some();
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = isa;
            false
        }
    }

    fn sides(rows: [&[Q8KBlock]; WIDE_GROUP]) -> Vec<Q8KSide> {
        lay_side_by_side(rows)
    }

    #[inline(always)]
    fn dots_side<I: Dots>(isa: I, weights: &[Q4KBlock], sides: &[Q8KSide]) -> [f32; WIDE_GROUP] {
        #[cfg(target_arch = "x86_64")]
        if wide(isa) {
            // SAFETY: a `Wide` exists only where the CPU has the features this function enables.
            return unsafe { crate::vector::wide::q4k_dots_side(weights, sides) };
        }
        #[cfg(target_arch = "x86_64")]
        if isa.avx2().is_some() {
            // SAFETY: as in `Q50::dot`.
            return unsafe { crate::vector::q4k_dots_side(weights, sides) };
        }
        let _ = (isa, weights, sides);
        unreachable!("`Q4K::side_by_side` holds only for the AVX2 and 512-bit forms")
    }

    #[inline(always)]
    fn batch_dots4<I: Dots>(
        isa: I,
        weights: &[Q4KBlock],
        activations: [&[Q8KBlock]; 4],
    ) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if isa.avx2().is_some() {
            // SAFETY: as in `Q50::dot`.
            return unsafe { crate::vector::q4k_dots4(weights, activations) };
        }
        each_row(activations, |activations| {
            Self::batch_dot(isa, weights, activations, true)
        })
    }
}

/// The Q4_K dot product: one fused multiply-add per super-block (`gemv_q4_K_8x8_q8_K`, one token), or
/// one per pair of sub-blocks (`gemm_q4_K_8x8_q8_K`, the rows of a batch in fours).
#[cfg_attr(vector_kernels, allow(dead_code))]
#[inline(always)]
pub(crate) fn q4k_dot<I: Isa>(
    isa: I,
    weights: &[Q4KBlock],
    activations: &[Q8KBlock],
    per_pair: bool,
) -> f32 {
    q4k_accumulate(
        isa,
        weights,
        activations,
        per_pair,
        #[inline(always)]
        |weight, activation, pair| {
            let bytes = &weight.values[32 * pair..32 * pair + 32];
            let (mut low_nibbles, mut high_nibbles) = ([0u8; 32], [0u8; 32]);
            for (index, byte) in bytes.iter().enumerate() {
                low_nibbles[index] = byte & 0x0F;
                high_nibbles[index] = byte >> 4;
            }
            let values = &activation.values[64 * pair..64 * pair + 64];
            [
                dot32(&low_nibbles, &values[..32]),
                dot32(&high_nibbles, &values[32..]),
            ]
        },
    )
}

/// [`q4k_dot`]'s arithmetic around `pair_dots`, which gives sub-block pair `pair`'s two integer dot
/// products (low nibbles with the pair's first 32 activations, high nibbles with the next 32): the
/// sub-block scales and minimums applied, then the fused multiply-adds per super-block or per pair.
#[inline(always)]
pub(crate) fn q4k_accumulate<I: Isa>(
    isa: I,
    weights: &[Q4KBlock],
    activations: &[Q8KBlock],
    per_pair: bool,
    pair_dots: impl Fn(&Q4KBlock, &Q8KBlock, usize) -> [i32; 2],
) -> f32 {
    let (mut total, mut minimums) = (0f32, 0f32);
    for (weight, activation) in weights.iter().zip(activations) {
        let scale = isa.to_f32(weight.d) * activation.scale;
        let min_scale = isa.to_f32(weight.dmin) * activation.scale;
        let (mut sum, mut minimum) = (0i32, 0i32);
        for pair in 0..4 {
            let [low_sum, high_sum] = pair_dots(weight, activation, pair);
            let sums = &activation.sums[4 * pair..4 * pair + 4];
            let pair_sum = i32::from(weight.scales[2 * pair]) * low_sum
                + i32::from(weight.scales[2 * pair + 1]) * high_sum;
            let pair_minimum = i32::from(weight.mins[2 * pair])
                * (i32::from(sums[0]) + i32::from(sums[1]))
                + i32::from(weight.mins[2 * pair + 1]) * (i32::from(sums[2]) + i32::from(sums[3]));
            if per_pair {
                total = (pair_sum as f32).mul_add(scale, total);
                minimums = (pair_minimum as f32).mul_add(min_scale, minimums);
            } else {
                sum += pair_sum;
                minimum += pair_minimum;
            }
        }
        if !per_pair {
            total = (sum as f32).mul_add(scale, total);
            minimums = (minimum as f32).mul_add(min_scale, minimums);
        }
    }
    total - minimums
}

/// The integer dot product of 32 unsigned values below 64 and 32 activations (products fit 16 bits,
/// which the compiler turns into multiply-add instructions).
#[inline(always)]
fn dot32(values: &[u8; 32], activations: &[i8]) -> i32 {
    let mut products = [0i16; 32];
    for (product, (value, activation)) in products.iter_mut().zip(values.iter().zip(activations)) {
        *product = i16::from(*value) * i16::from(*activation);
    }
    // A plain loop: an iterator adapter the compiler kept out of line would lose the form's target
    // features.
    let mut sum = 0i32;
    for product in products {
        sum += i32::from(product);
    }
    sum
}

/// Q6_K: a super-block of 256 six-bit values (`d * scale * (value - 32)`) in sixteen groups of 16, each
/// with an 8-bit signed scale; low four bits and high two bits apart.
#[derive(Debug)]
pub struct Q6K;

#[derive(Clone, Copy, Debug)]
pub struct Q6KBlock {
    pub(crate) low: [u8; 128],
    pub(crate) high: [u8; 64],
    pub(crate) scales: [i8; 16],
    pub(crate) d: f16,
}

impl Q6KBlock {
    /// The 256 values (0..64, before the offset of 32) in order.
    #[inline(always)]
    fn unpack(&self) -> [u8; SUPER] {
        let mut values = [0u8; SUPER];
        for half in 0..2 {
            let low = &self.low[64 * half..64 * half + 64];
            let high = &self.high[32 * half..32 * half + 32];
            let out = &mut values[128 * half..128 * half + 128];
            for index in 0..32 {
                let bits = high[index];
                out[index] = (low[index] & 0x0F) | ((bits & 3) << 4);
                out[index + 32] = (low[index + 32] & 0x0F) | (((bits >> 2) & 3) << 4);
                out[index + 64] = (low[index] >> 4) | (((bits >> 4) & 3) << 4);
                out[index + 96] = (low[index + 32] >> 4) | (((bits >> 6) & 3) << 4);
            }
        }
        values
    }
}

#[allow(unsafe_code)]
impl Format for Q6K {
    type Block = Q6KBlock;
    type Activation = Q8KBlock;
    type Side = Q8KSide;
    const BYTES: usize = 210;
    const VALUES: usize = SUPER;

    fn parse(block: &[u8]) -> Q6KBlock {
        let (mut low, mut high, mut scales) = ([0u8; 128], [0u8; 64], [0i8; 16]);
        low.copy_from_slice(&block[..128]);
        high.copy_from_slice(&block[128..192]);
        for (scale, byte) in scales.iter_mut().zip(&block[192..208]) {
            *scale = *byte as i8;
        }
        Q6KBlock {
            low,
            high,
            scales,
            d: f16::from_le_bytes([block[208], block[209]]),
        }
    }

    #[inline(always)]
    fn quantize<I: Isa>(_isa: I, values: &[f32]) -> Q8KBlock {
        quantize_k(values)
    }

    #[inline(always)]
    #[cfg_attr(vector_kernels, allow(unused_variables))]
    fn dot<I: Dots>(isa: I, weights: &[Q6KBlock], activations: &[Q8KBlock]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if isa.avx2().is_some() {
            // SAFETY: as in `Q50::dot`.
            return unsafe { crate::vector::q6k_dot(weights, activations) };
        }
        #[cfg(vector_kernels)]
        return crate::vector::q6k_dot(weights, activations);
        #[allow(unreachable_code)]
        q6k_dot(isa, weights, activations)
    }

    #[inline(always)]
    fn dots<I: Dots, const N: usize>(
        isa: I,
        weights: &[Q6KBlock],
        activations: [&[Q8KBlock]; N],
    ) -> [f32; N] {
        #[cfg(target_arch = "x86_64")]
        if isa.avx2().is_some() {
            // SAFETY: as in `Q50::dot`.
            if wide(isa) {
                // SAFETY: a `Wide` exists only where the CPU has the features it enables.
                return unsafe { crate::vector::wide::q6k_dots(weights, activations) };
            }
            return unsafe { crate::vector::q6k_dots(weights, activations) };
        }
        each_row(activations, |activations| {
            Self::dot(isa, weights, activations)
        })
    }

    #[inline(always)]
    fn side_by_side<I: Dots>(isa: I) -> bool {
        wide(isa)
    }

    fn sides(rows: [&[Q8KBlock]; WIDE_GROUP]) -> Vec<Q8KSide> {
        lay_side_by_side(rows)
    }

    #[inline(always)]
    fn dots_side<I: Dots>(isa: I, weights: &[Q6KBlock], sides: &[Q8KSide]) -> [f32; WIDE_GROUP] {
        #[cfg(target_arch = "x86_64")]
        if wide(isa) {
            // SAFETY: a `Wide` exists only where the CPU has the features this function enables.
            return unsafe { crate::vector::wide::q6k_dots_side(weights, sides) };
        }
        let _ = (isa, weights, sides);
        unreachable!("`Q6K::side_by_side` holds only for the 512-bit form")
    }
}

/// ggml's `ggml_vec_dot_q6_K_q8_K` (AVX2), portable.
#[cfg_attr(vector_kernels, allow(dead_code))]
#[inline(always)]
pub(crate) fn q6k_dot<I: Isa>(isa: I, weights: &[Q6KBlock], activations: &[Q8KBlock]) -> f32 {
    let mut lanes = [0f32; LANES];
    for (weight, activation) in weights.iter().zip(activations) {
        let scale = activation.scale * isa.to_f32(weight.d);
        let values = weight.unpack();
        let mut sums = [0i32; LANES];
        // Lane `k` of each 32 values holds values `4k..4k + 4`, scaled by their group's scale.
        for (chunk, (values, activations)) in values
            .chunks_exact(32)
            .zip(activation.values.chunks_exact(32))
            .enumerate()
        {
            let mut products = [0i16; 32];
            for (product, (value, activation)) in
                products.iter_mut().zip(values.iter().zip(activations))
            {
                *product = i16::from(*value) * i16::from(*activation);
            }
            for (lane, sum) in sums.iter_mut().enumerate() {
                let quad = &products[4 * lane..4 * lane + 4];
                let products = (i32::from(quad[0]) + i32::from(quad[1]))
                    + (i32::from(quad[2]) + i32::from(quad[3]));
                *sum += i32::from(weight.scales[2 * chunk + lane / 4]) * products;
            }
        }
        for (lane, sum) in sums.iter_mut().enumerate() {
            *sum -= 32
                * (i32::from(activation.sums[2 * lane]) * i32::from(weight.scales[2 * lane])
                    + i32::from(activation.sums[2 * lane + 1])
                        * i32::from(weight.scales[2 * lane + 1]));
        }
        for (lane, sum) in lanes.iter_mut().zip(sums) {
            *lane = scale.mul_add(sum as f32, *lane);
        }
    }
    sum_lanes(&lanes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::tests::random_input;
    #[cfg(target_arch = "x86_64")]
    use crate::simd::Avx2;
    use crate::simd::Baseline;

    /// Deterministic pseudo-random bytes.
    fn bytes(count: usize, seed: u32) -> Vec<u8> {
        let mut state = seed.max(1);
        (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect()
    }

    /// `count` blocks of `F` with random bits and small, sane f16 scales at `scales`.
    fn blocks(size: usize, count: usize, scales: &[usize], seed: u32) -> Vec<u8> {
        let mut all = bytes(size * count, seed);
        for (index, block) in all.chunks_exact_mut(size).enumerate() {
            for (offset, at) in scales.iter().enumerate() {
                let value = 0.001 + ((index * 7 + offset * 3) % 11) as f32 / 2000.0;
                block[*at..*at + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes());
            }
        }
        all
    }

    /// ggml's reference dequantization of one block, written from its definition.
    fn dequantize_q4k(block: &[u8]) -> Vec<f32> {
        let parsed = Q4K::parse(block);
        let (d, dmin) = (parsed.d.to_f32(), parsed.dmin.to_f32());
        let mut out = vec![0f32; 256];
        for (index, slot) in out.iter_mut().enumerate() {
            let (pair, within) = (index / 64, index % 64);
            let byte = block[16 + 32 * pair + within % 32];
            let (nibble, sub) = if within < 32 {
                (byte & 0x0F, 2 * pair)
            } else {
                (byte >> 4, 2 * pair + 1)
            };
            *slot = d * f32::from(parsed.scales[sub]) * f32::from(nibble)
                - dmin * f32::from(parsed.mins[sub]);
        }
        out
    }

    fn dequantize_q6k(block: &[u8]) -> Vec<f32> {
        let d = f16::from_le_bytes([block[208], block[209]]).to_f32();
        let mut out = vec![0f32; 256];
        for half in 0..2 {
            let (low, high) = (&block[64 * half..], &block[128 + 32 * half..]);
            for index in 0..32 {
                let scale =
                    |offset: usize| f32::from(block[192 + 8 * half + index / 16 + offset] as i8);
                let values = [
                    (low[index] & 0xF) | ((high[index] & 3) << 4),
                    (low[index + 32] & 0xF) | (((high[index] >> 2) & 3) << 4),
                    (low[index] >> 4) | (((high[index] >> 4) & 3) << 4),
                    (low[index + 32] >> 4) | (((high[index] >> 6) & 3) << 4),
                ];
                for (quarter, value) in values.iter().enumerate() {
                    out[128 * half + 32 * quarter + index] =
                        d * scale(2 * quarter) * (f32::from(*value) - 32.0);
                }
            }
        }
        out
    }

    fn dequantize_q50(block: &[u8]) -> Vec<f32> {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        let mut out = vec![0f32; 32];
        for index in 0..16 {
            let byte = block[6 + index];
            let low = f32::from((byte & 0xF) | (((high >> index) & 1) << 4) as u8);
            let up = f32::from((byte >> 4) | (((high >> (index + 16)) & 1) << 4) as u8);
            out[index] = d * (low - 16.0);
            out[index + 16] = d * (up - 16.0);
        }
        out
    }

    /// The matrix against the dequantized weights in f64: close (activations are quantized), and the
    /// forms equal bit for bit.
    fn check<F: Format>(
        bytes: &[u8],
        rows: usize,
        columns: usize,
        dequantize: fn(&[u8]) -> Vec<f32>,
    ) {
        let matrix = Matrix::<F>::from_gguf(bytes, rows, columns).expect("matrix");
        let weights: Vec<f32> = bytes.chunks_exact(F::BYTES).flat_map(dequantize).collect();
        // 19 and 36: sixteen rows at a time where a form lays them side by side (Q4_K: rows in fours).
        for tokens in [1, 3, 9, 19, 36] {
            let x = random_input(tokens * columns, tokens as u32 + 5);
            let ours = matrix.forward(&x, tokens);
            for token in 0..tokens {
                for row in 0..rows {
                    let exact: f64 = (0..columns)
                        .map(|column| {
                            f64::from(weights[row * columns + column])
                                * f64::from(x[token * columns + column])
                        })
                        .sum();
                    let scale: f64 = (0..columns)
                        .map(|column| {
                            (f64::from(weights[row * columns + column])
                                * f64::from(x[token * columns + column]))
                            .abs()
                        })
                        .sum();
                    let got = f64::from(ours[token * rows + row]);
                    assert!(
                        (got - exact).abs() <= 0.02 * scale.max(1e-3),
                        "row {row}, token {token}: {got} vs {exact} (scale {scale})"
                    );
                }
            }
            let bits = |values: Vec<f32>| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let portable = bits(matrix.forward_with(Baseline, &x, &[tokens]));
            #[cfg(target_arch = "x86_64")]
            if let Some(avx2) = Avx2::detect(true) {
                assert_eq!(bits(matrix.forward_with(avx2, &x, &[tokens])), portable);
                assert_eq!(
                    bits(matrix.forward_with(avx2.narrow(), &x, &[tokens])),
                    portable
                );
            }
            assert_eq!(bits(ours), portable);
            // Rows of different sequences: each as that token alone.
            let alone: Vec<u32> = (0..tokens)
                .flat_map(|token| {
                    bits(matrix.forward(&x[token * columns..(token + 1) * columns], 1))
                })
                .collect();
            assert_eq!(bits(matrix.forward_independent(&x, tokens)), alone);
            // Two sequences in one batch: each as it would be alone.
            if tokens > 1 {
                let split = tokens / 2 + 1;
                let mut apart = bits(matrix.forward(&x[..split * columns], split));
                apart.extend(bits(matrix.forward(&x[split * columns..], tokens - split)));
                let together = bits(matrix.forward_sequences(&x, &[split, tokens - split]));
                // `forward` lays rows out token by token, so the two halves concatenate.
                assert_eq!(together, apart);
            }
        }
        assert!(Matrix::<F>::from_gguf(&bytes[1..], rows, columns).is_none());
    }

    /// Each dot product's vector form (AVX2, or NEON on aarch64) equals the portable one bit for bit,
    /// one row and several.
    #[test]
    fn the_vector_dots_equal_the_portable_ones() {
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = Avx2::detect(true) {
            check_vector_dots(avx2);
            check_vector_dots(avx2.narrow());
        }
        check_vector_dots(Baseline);
    }

    fn check_vector_dots<I: Dots>(isa: I) {
        let rows = |columns: usize, seed: u32| -> Vec<f32> { random_input(3 * columns, seed) };
        let q8 = |values: &[f32]| -> Vec<Q8Block> {
            values
                .chunks_exact(32)
                .map(|v| quantize(Baseline, v))
                .collect()
        };
        let q8k = |values: &[f32]| -> Vec<Q8KBlock> {
            values.chunks_exact(256).map(quantize_k).collect()
        };
        let bits = |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();

        let q50: Vec<Q50Block> = blocks(22, 8, &[0], 11)
            .chunks_exact(22)
            .map(Q50::parse)
            .collect();
        let x = q8(&rows(256, 1));
        let x: [&[Q8Block]; 3] = std::array::from_fn(|row| &x[8 * row..8 * row + 8]);
        let portable: Vec<f32> = x.iter().map(|x| q50_dot(Baseline, &q50, x)).collect();
        assert_eq!(bits(&[Q50::dot(isa, &q50, x[0])]), bits(&portable[..1]));
        assert_eq!(bits(&Q50::dots(isa, &q50, x)), bits(&portable));

        let q4k: Vec<Q4KBlock> = blocks(144, 3, &[0, 2], 12)
            .chunks_exact(144)
            .map(Q4K::parse)
            .collect();
        let q6k: Vec<Q6KBlock> = blocks(210, 3, &[208], 13)
            .chunks_exact(210)
            .map(Q6K::parse)
            .collect();
        let x = q8k(&rows(768, 2));
        let x: [&[Q8KBlock]; 3] = std::array::from_fn(|row| &x[3 * row..3 * row + 3]);
        for per_pair in [false, true] {
            assert_eq!(
                Q4K::batch_dot(isa, &q4k, x[1], per_pair).to_bits(),
                q4k_dot(Baseline, &q4k, x[1], per_pair).to_bits()
            );
        }
        let x16 = q8k(&rows(WIDE_GROUP * 768 / 3, 3));
        let x16: [&[Q8KBlock]; WIDE_GROUP] = std::array::from_fn(|row| &x16[3 * row..3 * row + 3]);
        if Q4K::side_by_side(isa) {
            let portable: Vec<f32> = x16
                .iter()
                .map(|x| q4k_dot(Baseline, &q4k, x, true))
                .collect();
            let side = Q4K::dots_side(isa, &q4k, &Q4K::sides(x16));
            assert_eq!(bits(&side), bits(&portable));
        }
        if Q6K::side_by_side(isa) {
            let x = x16;
            let portable: Vec<f32> = x.iter().map(|x| q6k_dot(Baseline, &q6k, x)).collect();
            let side = Q6K::dots_side(isa, &q6k, &Q6K::sides(x));
            assert_eq!(bits(&side), bits(&portable));
        }
        let portable: Vec<f32> = x.iter().map(|x| q6k_dot(Baseline, &q6k, x)).collect();
        assert_eq!(bits(&[Q6K::dot(isa, &q6k, x[2])]), bits(&portable[2..]));
        assert_eq!(bits(&Q6K::dots(isa, &q6k, x)), bits(&portable));
    }

    /// Activations quantized for the K-quants (256-value blocks) over the threads: the same blocks.
    #[test]
    fn quantizing_over_threads_changes_no_block() {
        crate::quant::tests::check_quantizing_over_threads::<Q4K>();
    }

    #[test]
    fn q4_k_computes_the_dequantized_product() {
        check::<Q4K>(&blocks(144, 24, &[0, 2], 1), 12, 512, dequantize_q4k);
    }

    #[test]
    fn q6_k_computes_the_dequantized_product() {
        check::<Q6K>(&blocks(210, 24, &[208], 2), 12, 512, dequantize_q6k);
    }

    #[test]
    fn q5_0_computes_the_dequantized_product() {
        check::<Q50>(&blocks(22, 44, &[0], 3), 11, 128, dequantize_q50);
    }

    #[test]
    fn q8_k_takes_the_signed_largest_value_and_rounds_half_to_even() {
        let mut values = [0f32; 256];
        values[0] = -2.0;
        values[1] = 1.0;
        let block = quantize_k(&values);
        // The first of equal magnitudes is -2: scale 1 / (127 / 2).
        assert_eq!(block.scale, 1.0 / (-127.0f32 / -2.0));
        assert_eq!(block.values[0], -127);
        assert_eq!(block.values[1], 64); // 63.5 rounds to even
        assert_eq!(block.sums[0], -127 + 64);
        assert_eq!(quantize_k(&[0.0; 256]).scale, 0.0);
    }
}
