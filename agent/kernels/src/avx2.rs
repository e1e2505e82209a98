//! AVX2 forms of the quantized block dot products: the instructions ggml's x86 kernels use
//! (`maddubs` then `madd` for the eight four-product lanes, a fused multiply-add per block, `hsum`),
//! so the results are the portable forms' in [`crate::quant`] bit for bit, at vector speed.
//!
//! x86-64 builds target the baseline instruction set, so these are `target_feature` functions: callers
//! prove the CPU has AVX2, FMA and F16C with an [`crate::simd::Avx2`] before they call them.
#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m256, __m256i, _mm_add_ps, _mm_add_ss, _mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32,
    _mm_loadu_si128, _mm_movehdup_ps, _mm_movehl_ps, _mm_srli_epi16, _mm256_and_si256,
    _mm256_andnot_si256, _mm256_castps256_ps128, _mm256_cmpeq_epi8, _mm256_cvtepi32_ps,
    _mm256_extractf128_ps, _mm256_fmadd_ps, _mm256_loadu_si256, _mm256_madd_epi16,
    _mm256_maddubs_epi16, _mm256_or_si256, _mm256_set_epi64x, _mm256_set_m128i, _mm256_set1_epi8,
    _mm256_set1_epi16, _mm256_set1_epi32, _mm256_set1_epi64x, _mm256_set1_ps, _mm256_setzero_ps,
    _mm256_shuffle_epi8, _mm256_sign_epi8,
};

use half::f16;

use crate::kquant::Q50Block;
use crate::quant::{Q8Block, Q41Block, Q80Block};

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
                to_f32(weight.scale) * activation.scale,
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
        let mask = _mm256_set1_epi8(0x0F);
        let mut lanes = [_mm256_setzero_ps(); N];
        let mut minimums = [0f32; N];
        for (index, weight) in weights.iter().enumerate() {
            let (scale, min) = (to_f32(weight.scale), to_f32(weight.min));
            let packed = _mm_loadu_si128(weight.values.as_ptr().cast());
            let nibbles =
                _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), mask);
            for (row, activations) in activations.iter().enumerate() {
                let activation = &activations[index];
                minimums[row] = min.mul_add(activation.sum, minimums[row]);
                let values = _mm256_loadu_si256(activation.values.as_ptr().cast());
                lanes[row] = accumulate(lanes[row], scale * activation.scale, nibbles, values);
            }
        }
        std::array::from_fn(|row| sum_lanes(lanes[row]) + minimums[row])
    }
}

/// ggml's `ggml_vec_dot_q8_0_q8_0`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q80_dot(weights: &[Q80Block], activations: &[Q8Block]) -> f32 {
    // SAFETY: as in `q41_dot`; the loads read 32-byte arrays.
    unsafe {
        let mut lanes = _mm256_setzero_ps();
        for (weight, activation) in weights.iter().zip(activations) {
            let x = _mm256_loadu_si256(weight.values.as_ptr().cast());
            let y = _mm256_loadu_si256(activation.values.as_ptr().cast());
            // `maddubs` multiplies unsigned by signed bytes: |x| times y with x's sign.
            let magnitudes = _mm256_sign_epi8(x, x);
            let signed = _mm256_sign_epi8(y, x);
            lanes = accumulate(
                lanes,
                to_f32(weight.scale) * activation.scale,
                magnitudes,
                signed,
            );
        }
        sum_lanes(lanes)
    }
}

/// ggml's `ggml_vec_dot_q5_0_q8_0`: the fifth bits spread to bytes (`bytes_from_bits_32`), values
/// without theirs lowered by 16 (`0xF0` or-ed in), then as Q8_0.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q50_dot(weights: &[Q50Block], activations: &[Q8Block]) -> f32 {
    // SAFETY: as in `q41_dot`; the loads read the blocks' 16- and 32-byte arrays.
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
        let mut lanes = _mm256_setzero_ps();
        for (weight, activation) in weights.iter().zip(activations) {
            let packed = _mm_loadu_si128(weight.low.as_ptr().cast());
            let nibbles =
                _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), mask);
            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(weight.high as i32), spread);
            let set = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, bit_mask), ones);
            let x = _mm256_or_si256(nibbles, _mm256_andnot_si256(set, offset));
            let y = _mm256_loadu_si256(activation.values.as_ptr().cast());
            lanes = accumulate(
                lanes,
                to_f32(weight.scale) * activation.scale,
                _mm256_sign_epi8(x, x),
                _mm256_sign_epi8(y, x),
            );
        }
        sum_lanes(lanes)
    }
}

/// A block's f16 scale or minimum as f32 (F16C), as `half` converts it.
#[inline(always)]
unsafe fn to_f32(value: f16) -> f32 {
    // SAFETY: the caller runs with F16C; only registers are touched.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(value.to_bits())))) }
}

/// `lanes + scale * (eight sums of four byte products)`, fused.
#[inline(always)]
unsafe fn accumulate(lanes: __m256, scale: f32, unsigned: __m256i, signed: __m256i) -> __m256 {
    // SAFETY: the caller runs with AVX2 and FMA.
    unsafe {
        let pairs = _mm256_maddubs_epi16(unsigned, signed);
        let quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
        _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(quads), lanes)
    }
}

/// ggml's `hsum_float_8`.
#[inline(always)]
unsafe fn sum_lanes(lanes: __m256) -> f32 {
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
