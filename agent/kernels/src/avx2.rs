//! AVX2 forms of the quantized block dot products: the instructions ggml's x86 kernels use
//! (`maddubs` then `madd` for the eight four-product lanes, a fused multiply-add per block, `hsum`),
//! so the results are the portable forms' in [`crate::quant`] bit for bit, at vector speed.
//!
//! x86-64 builds target the baseline instruction set, so these are `target_feature` functions: callers
//! prove the CPU has AVX2, FMA and F16C with an [`crate::simd::Avx2`] before they call them.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use half::f16;

use crate::kquant::{Q4KBlock, Q6KBlock, Q8KBlock, Q8KSide, Q50Block};

// Two weight rows at a time in 512-bit registers, where the CPU has AVX-512 with VNNI (`simd`).
#[path = "avx512.rs"]
pub(crate) mod wide;
use crate::quant::{Q8Block, Q41Block, Q80Block, WIDE_GROUP};

/// ggml's `ggml_vec_dot_q4_1_q8_1`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q41_dot(weights: &[Q41Block], activations: &[Q8Block]) -> f32 {
    // SAFETY: the caller runs on a CPU with these features; the loads read the blocks' own fixed-size
    // arrays (16 and 32 bytes).
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let mut lanes = _mm256_setzero_ps();
        let mut minimums = 0f32;
        for (weight, activation) in weights.iter().zip(activations) {
            minimums = to_f32(weight.min).mul_add(activation.sum, minimums);
            let packed = _mm_loadu_si128(weight.values.as_ptr().cast());
            let nibbles =
                _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), mask);
            let values = _mm256_loadu_si256(activation.values.as_ptr().cast());
            lanes = accumulate(
                lanes,
                to_f32x8(weight.scale),
                activation.scale,
                nibbles,
                values,
            );
        }
        sum_lanes(lanes) + minimums
    }
}

/// [`q41_dot`] of one weight row with several activation rows, the weights unpacked once.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q41_dots<const N: usize>(
    weights: &[Q41Block],
    activations: [&[Q8Block]; N],
) -> [f32; N] {
    // SAFETY: as in `q41_dot`.
    unsafe {
        q41_dots_body(weights, activations, |unsigned, signed| {
            quads(unsigned, signed)
        })
    }
}

/// [`q41_dots`] with the eight four-product sums of a block's nibbles and a row's values from `quads`
/// (for the AVX-512 VNNI form, one `vpdpbusd`).
#[inline(always)]
pub(crate) unsafe fn q41_dots_body<const N: usize>(
    weights: &[Q41Block],
    activations: [&[Q8Block]; N],
    quads: impl Fn(__m256i, __m256i) -> __m256i,
) -> [f32; N] {
    // SAFETY: the caller runs with AVX2, FMA and F16C; the loads read the blocks' own arrays.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let mut lanes = [_mm256_setzero_ps(); N];
        let mut minimums = [0f32; N];
        for (index, weight) in weights.iter().enumerate() {
            let (scale, min) = (to_f32x8(weight.scale), to_f32(weight.min));
            let packed = _mm_loadu_si128(weight.values.as_ptr().cast());
            let nibbles =
                _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), mask);
            for (row, activations) in activations.iter().enumerate() {
                let activation = &activations[index];
                minimums[row] = min.mul_add(activation.sum, minimums[row]);
                let values = _mm256_loadu_si256(activation.values.as_ptr().cast());
                lanes[row] =
                    accumulate_quads(lanes[row], scale, activation.scale, quads(nibbles, values));
            }
        }
        std::array::from_fn(|row| sum_lanes(lanes[row]) + minimums[row])
    }
}

/// ggml's `ggml_vec_dot_q8_0_q8_0`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q80_dot(weights: &[Q80Block], activations: &[Q8Block]) -> f32 {
    // SAFETY: as in `q41_dot`.
    unsafe { q80_dots(weights, [activations])[0] }
}

/// [`q80_dot`] of one weight row with several activation rows, each weight block loaded once.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q80_dots<const N: usize>(
    weights: &[Q80Block],
    activations: [&[Q8Block]; N],
) -> [f32; N] {
    // SAFETY: as in `q41_dot`; the loads read 32-byte arrays.
    unsafe {
        let mut lanes = [_mm256_setzero_ps(); N];
        for (index, weight) in weights.iter().enumerate() {
            let x = _mm256_loadu_si256(weight.values.as_ptr().cast());
            accumulate_signed(&mut lanes, x, to_f32x8(weight.scale), &activations, index);
        }
        std::array::from_fn(|row| sum_lanes(lanes[row]))
    }
}

/// ggml's `ggml_vec_dot_q5_0_q8_0`: the fifth bits spread to bytes (`bytes_from_bits_32`), values
/// without theirs lowered by 16 (`0xF0` or-ed in), then as Q8_0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q50_dot(weights: &[Q50Block], activations: &[Q8Block]) -> f32 {
    // SAFETY: as in `q41_dot`.
    unsafe { q50_dots(weights, [activations])[0] }
}

/// [`q50_dot`] of one weight row with several activation rows, the weights unpacked once.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q50_dots<const N: usize>(
    weights: &[Q50Block],
    activations: [&[Q8Block]; N],
) -> [f32; N] {
    // SAFETY: as in `q41_dot`.
    unsafe {
        let mut lanes = [_mm256_setzero_ps(); N];
        for (index, weight) in weights.iter().enumerate() {
            let x = q50_values(weight);
            accumulate_signed(&mut lanes, x, to_f32x8(weight.scale), &activations, index);
        }
        std::array::from_fn(|row| sum_lanes(lanes[row]))
    }
}

/// A Q5_0 block's 32 values (-16..16) as signed bytes.
#[inline(always)]
pub(crate) unsafe fn q50_values(weight: &Q50Block) -> __m256i {
    // SAFETY: the caller runs with AVX2; the load reads the block's 16-byte array.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let spread = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let bit_mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        let ones = _mm256_set1_epi64x(-1);
        let offset = _mm256_set1_epi8(0xF0u8 as i8);
        let packed = _mm_loadu_si128(weight.low.as_ptr().cast());
        let nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), mask);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(weight.high as i32), spread);
        let set = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, bit_mask), ones);
        _mm256_or_si256(nibbles, _mm256_andnot_si256(set, offset))
    }
}

/// The Q4_K dot product of `crate::kquant` (ggml's repacked gemv, or gemm when `per_pair`): the integer
/// sums by `maddubs` and `madd` with the sub-blocks' scales, exact, then the same fused multiply-adds.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q4k_dot(
    weights: &[Q4KBlock],
    activations: &[Q8KBlock],
    per_pair: bool,
) -> f32 {
    // SAFETY: as in `q41_dot`.
    unsafe { q4k_dots(weights, [activations], per_pair)[0] }
}

/// [`q4k_dot`] of one weight row with several activation rows, each block's nibbles unpacked once.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q4k_dots<const N: usize>(
    weights: &[Q4KBlock],
    activations: [&[Q8KBlock]; N],
    per_pair: bool,
) -> [f32; N] {
    // SAFETY: as in `q41_dot`; the loads read 32 bytes within the blocks' 128- and 256-byte arrays.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let (mut total, mut minimums) = ([0f32; N], [0f32; N]);
        for (index, weight) in weights.iter().enumerate() {
            let mut nibbles = [_mm256_setzero_si256(); 8];
            let mut scales = [_mm256_setzero_si256(); 8];
            for pair in 0..4 {
                let bits = _mm256_loadu_si256(weight.values.as_ptr().add(32 * pair).cast());
                nibbles[2 * pair] = _mm256_and_si256(bits, mask);
                nibbles[2 * pair + 1] = _mm256_and_si256(_mm256_srli_epi16(bits, 4), mask);
                scales[2 * pair] = _mm256_set1_epi16(i16::from(weight.scales[2 * pair]));
                scales[2 * pair + 1] = _mm256_set1_epi16(i16::from(weight.scales[2 * pair + 1]));
            }
            let (d, dmin) = (to_f32(weight.d), to_f32(weight.dmin));
            for (row, activations) in activations.iter().enumerate() {
                let activation = &activations[index];
                let scale = d * activation.scale;
                let min_scale = dmin * activation.scale;
                let mut sums = _mm256_setzero_si256();
                let mut minimum = 0i32;
                for pair in 0..4 {
                    let x_low =
                        _mm256_loadu_si256(activation.values.as_ptr().add(64 * pair).cast());
                    let x_high =
                        _mm256_loadu_si256(activation.values.as_ptr().add(64 * pair + 32).cast());
                    let low = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(nibbles[2 * pair], x_low),
                        scales[2 * pair],
                    );
                    let high = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(nibbles[2 * pair + 1], x_high),
                        scales[2 * pair + 1],
                    );
                    let group = &activation.sums[4 * pair..4 * pair + 4];
                    let pair_minimum = i32::from(weight.mins[2 * pair])
                        * (i32::from(group[0]) + i32::from(group[1]))
                        + i32::from(weight.mins[2 * pair + 1])
                            * (i32::from(group[2]) + i32::from(group[3]));
                    if per_pair {
                        total[row] = (sum_i32(_mm256_add_epi32(low, high)) as f32)
                            .mul_add(scale, total[row]);
                        minimums[row] = (pair_minimum as f32).mul_add(min_scale, minimums[row]);
                    } else {
                        sums = _mm256_add_epi32(sums, _mm256_add_epi32(low, high));
                        minimum += pair_minimum;
                    }
                }
                if !per_pair {
                    total[row] = (sum_i32(sums) as f32).mul_add(scale, total[row]);
                    minimums[row] = (minimum as f32).mul_add(min_scale, minimums[row]);
                }
            }
        }
        std::array::from_fn(|row| total[row] - minimums[row])
    }
}

/// [`q4k_dots`] of four activation rows taken four at a time (`per_pair`): each pair of sub-blocks' four
/// integer sums reduced together and the four rows' floats accumulated side by side in one register
/// (lane `r` is row `r`'s chain of fused multiply-adds, in the same order), the minimums' terms alike.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q4k_dots4(weights: &[Q4KBlock], activations: [&[Q8KBlock]; 4]) -> [f32; 4] {
    for activations in &activations {
        assert!(activations.len() >= weights.len());
    }
    // SAFETY: as in `q41_dot`; every activation row holds a block for each weight block (checked
    // above), and the loads read 8, 16 or 32 bytes within the blocks' arrays.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let (mut total, mut minimums) = (_mm_setzero_ps(), _mm_setzero_ps());
        for (index, weight) in weights.iter().enumerate() {
            let rows: [&Q8KBlock; 4] =
                std::array::from_fn(|row| activations[row].get_unchecked(index));
            let row_scales = _mm_set_ps(rows[3].scale, rows[2].scale, rows[1].scale, rows[0].scale);
            let scale = _mm_mul_ps(_mm256_castps256_ps128(to_f32x8(weight.d)), row_scales);
            let min_scale = _mm_mul_ps(_mm256_castps256_ps128(to_f32x8(weight.dmin)), row_scales);
            // Each sub-block's minimum times the activations' sum over it (`madd` of the sums of 16
            // with each minimum twice), then the pairs' terms for the four rows, pair by pair.
            let mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(weight.mins.as_ptr().cast()));
            let mins = _mm256_set_m128i(
                _mm_unpackhi_epi16(mins, mins),
                _mm_unpacklo_epi16(mins, mins),
            );
            let terms: [__m256i; 4] = std::array::from_fn(|row| {
                _mm256_madd_epi16(_mm256_loadu_si256(rows[row].sums.as_ptr().cast()), mins)
            });
            for (pair, pair_minimums) in by_pair(terms).into_iter().enumerate() {
                let bits = _mm256_loadu_si256(weight.values.as_ptr().add(32 * pair).cast());
                let low_nibbles = _mm256_and_si256(bits, mask);
                let high_nibbles = _mm256_and_si256(_mm256_srli_epi16(bits, 4), mask);
                let low_scale = _mm256_set1_epi16(i16::from(weight.scales[2 * pair]));
                let high_scale = _mm256_set1_epi16(i16::from(weight.scales[2 * pair + 1]));
                let sums: [__m256i; 4] = std::array::from_fn(|row| {
                    let values = rows[row].values.as_ptr().add(64 * pair);
                    let low = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(low_nibbles, _mm256_loadu_si256(values.cast())),
                        low_scale,
                    );
                    let high = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(
                            high_nibbles,
                            _mm256_loadu_si256(values.add(32).cast()),
                        ),
                        high_scale,
                    );
                    _mm256_add_epi32(low, high)
                });
                total = _mm_fmadd_ps(_mm_cvtepi32_ps(row_sums(sums)), scale, total);
                minimums = _mm_fmadd_ps(_mm_cvtepi32_ps(pair_minimums), min_scale, minimums);
            }
        }
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), _mm_sub_ps(total, minimums));
        out
    }
}

/// [`q4k_dots4`] of the sixteen activation rows `sides` holds side by side, eight rows to a register:
/// bit for bit the same.
///
/// Each row has a 32-bit lane: `maddubs` of four broadcast nibbles with the same four values of each
/// row gives the row's two pair sums in its lane's halves; a sub-block's eight of them add up in 16 bits
/// without overflow (at most 8 × 2 × 15 × 128), and `madd` with the sub-block scale gives the row's
/// exact scaled sum. Then the four-row form's fused multiply-adds per pair, per lane.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q4k_dots_side(weights: &[Q4KBlock], sides: &[Q8KSide]) -> [f32; WIDE_GROUP] {
    assert!(sides.len() >= weights.len());
    // SAFETY: as in `q41_dot`; every side holds a block for each weight block (checked above), and the
    // loads read 32 bytes within the blocks' and the sides' arrays.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let mut total = [_mm256_setzero_ps(); 2];
        let mut minimums = [_mm256_setzero_ps(); 2];
        for (weight, side) in weights.iter().zip(sides) {
            let nibbles = q4k_nibbles(weight, mask);
            let (d, dmin) = (to_f32x8(weight.d), to_f32x8(weight.dmin));
            for half in 0..2 {
                let scales = _mm256_loadu_ps(side.scales.as_ptr().add(8 * half));
                let (scale, min_scale) = (_mm256_mul_ps(d, scales), _mm256_mul_ps(dmin, scales));
                for pair in 0..4 {
                    let mut sums = [_mm256_setzero_si256(); 2];
                    for (within, sum) in sums.iter_mut().enumerate() {
                        let sub_block = 2 * pair + within;
                        let mut pairs = _mm256_setzero_si256();
                        let rows = &side.values[8 * sub_block..8 * sub_block + 8];
                        for (values, four) in rows.iter().zip(nibbles[sub_block]) {
                            let values = _mm256_loadu_si256(values.as_ptr().add(8 * half).cast());
                            let four_weights = _mm256_set1_epi32(four as i32);
                            pairs =
                                _mm256_add_epi16(pairs, _mm256_maddubs_epi16(four_weights, values));
                        }
                        *sum = _mm256_madd_epi16(
                            pairs,
                            _mm256_set1_epi16(i16::from(weight.scales[sub_block])),
                        );
                    }
                    total[half] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(_mm256_add_epi32(sums[0], sums[1])),
                        scale,
                        total[half],
                    );
                    let mins = _mm256_set1_epi32(
                        i32::from(weight.mins[2 * pair])
                            | (i32::from(weight.mins[2 * pair + 1]) << 16),
                    );
                    let pair_minimums = _mm256_madd_epi16(
                        _mm256_loadu_si256(side.sums[pair].as_ptr().add(8 * half).cast()),
                        mins,
                    );
                    minimums[half] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(pair_minimums),
                        min_scale,
                        minimums[half],
                    );
                }
            }
        }
        let mut out = [0f32; WIDE_GROUP];
        for half in 0..2 {
            _mm256_storeu_ps(
                out.as_mut_ptr().add(8 * half),
                _mm256_sub_ps(total[half], minimums[half]),
            );
        }
        out
    }
}

/// A Q4_K block's nibbles as bytes, in the order of the values: sub-block `2p` (the low nibbles of
/// bytes `32p..32p + 32`) then `2p + 1` (their high nibbles), each as eight runs of four.
#[inline(always)]
pub(crate) unsafe fn q4k_nibbles(weight: &Q4KBlock, mask: __m256i) -> [[u32; 8]; 8] {
    // SAFETY: the caller runs with AVX2; the loads read 32 bytes of the block's 128-byte array.
    unsafe {
        let mut nibbles = [[0u32; 8]; 8];
        for pair in 0..4 {
            let bits = _mm256_loadu_si256(weight.values.as_ptr().add(32 * pair).cast());
            _mm256_storeu_si256(
                nibbles[2 * pair].as_mut_ptr().cast(),
                _mm256_and_si256(bits, mask),
            );
            _mm256_storeu_si256(
                nibbles[2 * pair + 1].as_mut_ptr().cast(),
                _mm256_and_si256(_mm256_srli_epi16(bits, 4), mask),
            );
        }
        nibbles
    }
}

/// The eight lanes of each of four rows summed: `[row 0, row 1, row 2, row 3]` (exact: integers).
#[inline(always)]
unsafe fn row_sums(rows: [__m256i; 4]) -> __m128i {
    // SAFETY: the caller runs with AVX2.
    unsafe {
        let halves = _mm256_hadd_epi32(
            _mm256_hadd_epi32(rows[0], rows[1]),
            _mm256_hadd_epi32(rows[2], rows[3]),
        );
        _mm_add_epi32(
            _mm256_castsi256_si128(halves),
            _mm256_extracti128_si256(halves, 1),
        )
    }
}

/// Four rows' eight sub-block terms, the pairs' sums (`2p` + `2p + 1`) regrouped by pair: element `p`
/// holds `[row 0, row 1, row 2, row 3]` of pair `p` (exact: integers).
#[inline(always)]
unsafe fn by_pair(rows: [__m256i; 4]) -> [__m128i; 4] {
    // SAFETY: the caller runs with AVX2.
    unsafe {
        // [r0 p0, r0 p1, r2 p0, r2 p1 | r0 p2, r0 p3, r2 p2, r2 p3], and rows 1 and 3 alike.
        let even = _mm256_hadd_epi32(rows[0], rows[2]);
        let odd = _mm256_hadd_epi32(rows[1], rows[3]);
        // [r0 p0, r1 p0, r0 p1, r1 p1 | ...p2, p3] and [r2 p0, r3 p0, r2 p1, r3 p1 | ...].
        let first = _mm256_unpacklo_epi32(even, odd);
        let second = _mm256_unpackhi_epi32(even, odd);
        // [p0 of rows 0..4 | p2 of rows 0..4] and [p1 | p3].
        let zero_two = _mm256_unpacklo_epi64(first, second);
        let one_three = _mm256_unpackhi_epi64(first, second);
        [
            _mm256_castsi256_si128(zero_two),
            _mm256_castsi256_si128(one_three),
            _mm256_extracti128_si256(zero_two, 1),
            _mm256_extracti128_si256(one_three, 1),
        ]
    }
}

/// ggml's `ggml_vec_dot_q6_K_q8_K` (AVX2).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q6k_dot(weights: &[Q6KBlock], activations: &[Q8KBlock]) -> f32 {
    // SAFETY: as in `q41_dot`.
    unsafe { q6k_dots(weights, [activations])[0] }
}

/// [`q6k_dot`] of one weight row with several activation rows, each block's values unpacked once.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q6k_dots<const N: usize>(
    weights: &[Q6KBlock],
    activations: [&[Q8KBlock]; N],
) -> [f32; N] {
    // SAFETY: as in `q41_dot`.
    unsafe { q6k_dots_body(weights, activations) }
}

/// [`q6k_dots`]'s body, for the forms that compile it with more registers (`crate::avx512`).
#[inline(always)]
pub(crate) unsafe fn q6k_dots_body<const N: usize>(
    weights: &[Q6KBlock],
    activations: [&[Q8KBlock]; N],
) -> [f32; N] {
    // SAFETY: as in `q41_dot`; the loads read 16 or 32 bytes within the blocks' arrays.
    unsafe {
        let mut lanes = [_mm256_setzero_ps(); N];
        for (index, weight) in weights.iter().enumerate() {
            let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(weight.scales.as_ptr().cast()));
            let values = q6k_values(weight);
            let mut scales = [_mm256_setzero_si256(); 8];
            for half in 0..2 {
                for quarter in 0..4 {
                    let group = 8 * half + 2 * quarter;
                    scales[4 * half + quarter] = _mm256_set_m128i(
                        _mm_set1_epi16(i16::from(weight.scales[group + 1])),
                        _mm_set1_epi16(i16::from(weight.scales[group])),
                    );
                }
            }
            let d = to_f32(weight.d);
            for (row, activations) in activations.iter().enumerate() {
                let activation = &activations[index];
                let sums16 = _mm256_loadu_si256(activation.sums.as_ptr().cast());
                let offset = _mm256_slli_epi32(_mm256_madd_epi16(sums16, scales16), 5);
                let mut sums = _mm256_setzero_si256();
                for half in 0..2 {
                    let mut products = [_mm256_setzero_si256(); 4];
                    for (quarter, product) in products.iter_mut().enumerate() {
                        let x = _mm256_loadu_si256(
                            activation
                                .values
                                .as_ptr()
                                .add(128 * half + 32 * quarter)
                                .cast(),
                        );
                        let chunk = 4 * half + quarter;
                        *product = _mm256_madd_epi16(
                            scales[chunk],
                            _mm256_maddubs_epi16(values[chunk], x),
                        );
                    }
                    sums = _mm256_add_epi32(sums, _mm256_add_epi32(products[0], products[1]));
                    sums = _mm256_add_epi32(sums, _mm256_add_epi32(products[2], products[3]));
                }
                let sums = _mm256_sub_epi32(sums, offset);
                lanes[row] = _mm256_fmadd_ps(
                    _mm256_set1_ps(activation.scale * d),
                    _mm256_cvtepi32_ps(sums),
                    lanes[row],
                );
            }
        }
        std::array::from_fn(|row| sum_lanes(lanes[row]))
    }
}

/// A Q6_K block's 256 values (0..64, before the offset of 32) as bytes, 32 per register in order.
#[inline(always)]
pub(crate) unsafe fn q6k_values(weight: &Q6KBlock) -> [__m256i; 8] {
    // SAFETY: the caller runs with AVX2; the loads read 32 bytes within the block's arrays.
    unsafe {
        let (m3, m15) = (_mm256_set1_epi8(3), _mm256_set1_epi8(15));
        let (m12, m48, m192) = (
            _mm256_set1_epi8(12),
            _mm256_set1_epi8(48),
            _mm256_set1_epi8(0xC0u8 as i8),
        );
        let mut values = [_mm256_setzero_si256(); 8];
        for half in 0..2 {
            let bits1 = _mm256_loadu_si256(weight.low.as_ptr().add(64 * half).cast());
            let bits2 = _mm256_loadu_si256(weight.low.as_ptr().add(64 * half + 32).cast());
            let high = _mm256_loadu_si256(weight.high.as_ptr().add(32 * half).cast());
            values[4 * half] = _mm256_or_si256(
                _mm256_and_si256(bits1, m15),
                _mm256_slli_epi16(_mm256_and_si256(high, m3), 4),
            );
            values[4 * half + 1] = _mm256_or_si256(
                _mm256_and_si256(bits2, m15),
                _mm256_slli_epi16(_mm256_and_si256(high, m12), 2),
            );
            values[4 * half + 2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(bits1, 4), m15),
                _mm256_and_si256(high, m48),
            );
            values[4 * half + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(bits2, 4), m15),
                _mm256_srli_epi16(_mm256_and_si256(high, m192), 2),
            );
        }
        values
    }
}

/// The eight 32-bit lanes' sum (exact: integers).
#[inline(always)]
unsafe fn sum_i32(lanes: __m256i) -> i32 {
    // SAFETY: the caller runs with AVX2.
    unsafe {
        let halves = _mm_add_epi32(
            _mm256_castsi256_si128(lanes),
            _mm256_extracti128_si256(lanes, 1),
        );
        let quarters = _mm_add_epi32(halves, _mm_unpackhi_epi64(halves, halves));
        _mm_cvtsi128_si32(_mm_add_epi32(
            quarters,
            _mm_shuffle_epi32(quarters, 0b10_11_00_01),
        ))
    }
}

/// A block's f16 scale or minimum as f32 (F16C), as `half` converts it.
///
/// Written out, because the intrinsics' form (`_mm_cvtph_ps` of `_mm_cvtsi32_si128`) is compiled to a
/// `vpinsrw` into whichever register the compiler picks, keeping its other lanes: often an
/// accumulator, which chains every block's conversion behind the previous block's multiply-add. A
/// 262 144-row Q8_0 head took 2.4 times as long at two tokens as at one that way. `vmovd` clears the
/// rest of the register, so the conversion depends on nothing but the value.
#[inline(always)]
pub(crate) unsafe fn to_f32(value: f16) -> f32 {
    let converted: __m128;
    // SAFETY: the caller runs with F16C (which implies AVX); the instructions touch only the named
    // registers.
    unsafe {
        std::arch::asm!(
            "vmovd {converted}, {bits:e}",
            "vcvtph2ps {converted}, {converted}",
            bits = in(reg) u32::from(value.to_bits()),
            converted = out(xmm_reg) converted,
            options(pure, nomem, nostack, preserves_flags),
        );
        _mm_cvtss_f32(converted)
    }
}

/// A block's f16 scale as f32 in all eight lanes: converted from a broadcast, which depends on nothing
/// else (see [`to_f32`]).
#[inline(always)]
pub(crate) unsafe fn to_f32x8(value: f16) -> __m256 {
    // SAFETY: the caller runs with AVX2 and F16C; only registers are touched.
    unsafe { _mm256_cvtph_ps(_mm_set1_epi16(value.to_bits() as i16)) }
}

/// `lanes + weight_scale * activation_scale * (eight sums of four byte products)`, fused after the
/// scales' product (`weight_scale`: eight copies; the product in each lane, as ggml's scalar one, with the
/// activation scale broadcast from memory).
#[inline(always)]
unsafe fn accumulate(
    lanes: __m256,
    weight_scale: __m256,
    activation_scale: f32,
    unsigned: __m256i,
    signed: __m256i,
) -> __m256 {
    // SAFETY: the caller runs with AVX2 and FMA.
    unsafe {
        accumulate_quads(
            lanes,
            weight_scale,
            activation_scale,
            quads(unsigned, signed),
        )
    }
}

/// The eight sums of four products of unsigned bytes `unsigned` with signed bytes `signed`, by
/// `maddubs` (no pair of products here reaches the 16-bit saturation) then `madd`.
#[inline(always)]
unsafe fn quads(unsigned: __m256i, signed: __m256i) -> __m256i {
    // SAFETY: the caller runs with AVX2.
    unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), _mm256_set1_epi16(1)) }
}

/// `lanes + weight_scale * activation_scale * quads`, as [`accumulate`] after its integer sums.
#[inline(always)]
unsafe fn accumulate_quads(
    lanes: __m256,
    weight_scale: __m256,
    activation_scale: f32,
    quads: __m256i,
) -> __m256 {
    // SAFETY: the caller runs with AVX2 and FMA.
    unsafe {
        let scale = _mm256_mul_ps(weight_scale, _mm256_set1_ps(activation_scale));
        _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(quads), lanes)
    }
}

/// Adds one block of signed byte weights `x` (scale `scale`) times block `index` of each row's
/// activations to that row's lanes. `maddubs` multiplies unsigned by signed bytes: |x| times y with x's
/// sign.
#[inline(always)]
unsafe fn accumulate_signed<const N: usize>(
    lanes: &mut [__m256; N],
    x: __m256i,
    scale: __m256,
    activations: &[&[Q8Block]; N],
    index: usize,
) {
    // SAFETY: the caller runs with AVX2 and FMA; the load reads a block's 32-byte array.
    unsafe {
        let magnitudes = _mm256_sign_epi8(x, x);
        for (lanes, activations) in lanes.iter_mut().zip(activations) {
            let activation = &activations[index];
            let y = _mm256_loadu_si256(activation.values.as_ptr().cast());
            *lanes = accumulate(
                *lanes,
                scale,
                activation.scale,
                magnitudes,
                _mm256_sign_epi8(y, x),
            );
        }
    }
}

/// ggml's `hsum_float_8`.
#[inline(always)]
pub(crate) unsafe fn sum_lanes(lanes: __m256) -> f32 {
    // SAFETY: the caller runs with AVX2.
    unsafe {
        let quarters = _mm_add_ps(
            _mm256_extractf128_ps(lanes, 1),
            _mm256_castps256_ps128(lanes),
        );
        let pairs = _mm_add_ps(quarters, _mm_movehl_ps(quarters, quarters));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
    }
}

/// Attention's f16 dot product of a cached key row with a query (f16 values held as f32), summed as
/// `crate::attention`'s portable form sums it (ggml's 16-lane registers, four of them: here each as two
/// 256-bit halves), the keys converted as they are loaded. `keys` and `query` have one length.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn dot_f16(keys: &[f16], query: &[f32]) -> f32 {
    assert_eq!(keys.len(), query.len());
    let whole = keys.len() / 64 * 64;
    // SAFETY: the caller runs with these features; every load reads within `..whole` of both slices.
    unsafe {
        let mut sums = [_mm256_setzero_ps(); 8];
        for step in (0..whole).step_by(64) {
            for (register, sum) in sums.iter_mut().enumerate() {
                let at = step + register * 8;
                let key = _mm256_cvtph_ps(_mm_loadu_si128(keys.as_ptr().add(at).cast()));
                *sum = _mm256_fmadd_ps(key, _mm256_loadu_ps(query.as_ptr().add(at)), *sum);
            }
        }
        // Register r's lanes 0-7 are `sums[2r]`, lanes 8-15 `sums[2r + 1]`.
        let half = |high: usize| {
            _mm256_add_ps(
                _mm256_add_ps(sums[high], sums[4 + high]),
                _mm256_add_ps(sums[2 + high], sums[6 + high]),
            )
        };
        let eighths = _mm256_add_ps(half(1), half(0));
        let quarters = _mm_add_ps(
            _mm256_extractf128_ps(eighths, 1),
            _mm256_castps256_ps128(eighths),
        );
        let pairs = _mm_add_ps(quarters, _mm_movehl_ps(quarters, quarters));
        let mut total = f64::from(_mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs))));
        for (key, query) in keys[whole..].iter().zip(&query[whole..]) {
            total += f64::from(to_f32(*key) * query);
        }
        total as f32
    }
}

/// `sums[i] = f16(values[i] * weight + sums[i])`, the product fused, for slices of one length.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn mad_f16(sums: &mut [f16], values: &[f16], weight: f32) {
    assert_eq!(sums.len(), values.len());
    let whole = sums.len() / 8 * 8;
    // SAFETY: the caller runs with these features; each chunk holds eight values (16 bytes).
    unsafe {
        let weights = _mm256_set1_ps(weight);
        for (sums, values) in sums[..whole]
            .chunks_exact_mut(8)
            .zip(values[..whole].chunks_exact(8))
        {
            let sum = _mm256_cvtph_ps(_mm_loadu_si128(sums.as_ptr().cast()));
            let value = _mm256_cvtph_ps(_mm_loadu_si128(values.as_ptr().cast()));
            let result = _mm256_fmadd_ps(value, weights, sum);
            _mm_storeu_si128(
                sums.as_mut_ptr().cast(),
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(result),
            );
        }
        for (sum, value) in sums[whole..].iter_mut().zip(&values[whole..]) {
            *sum = f16::from_f32(to_f32(*value).mul_add(weight, to_f32(*sum)));
        }
    }
}

/// `sums[i] = f16(sums[i] * by)`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn scale_f16(sums: &mut [f16], by: f32) {
    let whole = sums.len() / 8 * 8;
    // SAFETY: the caller runs with these features; each chunk holds eight values (16 bytes).
    unsafe {
        let factors = _mm256_set1_ps(by);
        for sums in sums[..whole].chunks_exact_mut(8) {
            let sum = _mm256_cvtph_ps(_mm_loadu_si128(sums.as_ptr().cast()));
            _mm_storeu_si128(
                sums.as_mut_ptr().cast(),
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(sum, factors)),
            );
        }
        for sum in &mut sums[whole..] {
            *sum = f16::from_f32(to_f32(*sum) * by);
        }
    }
}
