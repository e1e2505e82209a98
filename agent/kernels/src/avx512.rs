//! The Q5_0 and Q8_0 dot products for CPUs with AVX-512 and VNNI: two weight rows at once, one in each
//! half of a 512-bit register, against each activation block broadcast to both halves. Each half is the
//! AVX2 form's eight lanes for its row, so the results are the AVX2 (and portable) forms' bit for bit:
//!
//! - the integer sums: `vpdpbusd` multiplies unsigned by signed bytes and adds each four products to a
//!   32-bit lane without saturating. The weights are made unsigned by adding 128, and the activation
//!   block's lanes start at `-128 *` their four values' sum (kept with the block), so each lane ends as
//!   the exact sum of its four signed products, as AVX2's `maddubs`/`madd` give it;
//! - the floats: each half's lanes converted and accumulated with a fused multiply-add of the two block
//!   scales' product, block after block, then summed as `hsum_float_8` sums them.
//!
//! One `vpdpbusd` does the work of AVX2's sign, `maddubs` and `madd` for two rows, and the activations
//! are broadcast from memory, which costs no arithmetic.
//!
//! Also here: the Q4_1 form for several activation rows with 256-bit VNNI (its nibbles are unsigned, so
//! `vpdpbusd` replaces `maddubs` and `madd` directly), and the K-quant forms with sixteen activation rows
//! side by side.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use half::f16;

use super::{q4k_nibbles, q6k_dots_body, q6k_values, q41_dots_body, q50_values, sum_lanes};
use crate::kquant::{Q4KBlock, Q6KBlock, Q8KBlock, Q8KSide, Q50Block};
use crate::quant::{Q8Block, Q41Block, Q80Block, WIDE_GROUP};

/// [`crate::vector::q41_dots`] with VNNI: the nibbles are unsigned already, so one `vpdpbusd` gives
/// each lane's four products as AVX2's `maddubs` and `madd` do in two instructions.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q41_dots<const N: usize>(
    weights: &[Q41Block],
    activations: [&[Q8Block]; N],
) -> [f32; N] {
    // SAFETY: the caller runs with these features.
    unsafe {
        q41_dots_body(
            weights,
            activations,
            #[inline(always)]
            |nibbles, values| _mm256_dpbusd_epi32(_mm256_setzero_si256(), nibbles, values),
        )
    }
}

/// [`crate::vector::q50_dots`] of two weight rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q50_dots2<const N: usize>(
    weights: [&[Q50Block]; 2],
    activations: [&[Q8Block]; N],
) -> [[f32; N]; 2] {
    // SAFETY: the caller runs with these features; `q50_values` reads the block's own arrays.
    unsafe {
        rows2(
            weights,
            activations,
            #[inline(always)]
            |block| (q50_values(block), block.scale),
        )
    }
}

/// [`crate::vector::q80_dots`] of two weight rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q80_dots2<const N: usize>(
    weights: [&[Q80Block]; 2],
    activations: [&[Q8Block]; N],
) -> [[f32; N]; 2] {
    // SAFETY: the caller runs with these features; the load reads the block's 32-byte array.
    unsafe {
        rows2(
            weights,
            activations,
            #[inline(always)]
            |block| {
                (
                    _mm256_loadu_si256(block.values.as_ptr().cast()),
                    block.scale,
                )
            },
        )
    }
}

/// Two weight rows of blocks whose signed values and scale `read` gives, against `N` activation rows.
#[inline(always)]
unsafe fn rows2<B, const N: usize>(
    weights: [&[B]; 2],
    activations: [&[Q8Block]; N],
    read: impl Fn(&B) -> (__m256i, f16),
) -> [[f32; N]; 2] {
    check_lengths(&weights, &activations);
    // SAFETY: the caller runs with AVX-512 F, BW, VL and VNNI, AVX2 and F16C; every activation row holds
    // a block for each weight block (checked above).
    unsafe {
        let flip = _mm256_set1_epi8(0x80u8 as i8);
        let mut lanes = [_mm512_setzero_ps(); N];
        for (index, (first, second)) in weights[0].iter().zip(weights[1]).enumerate() {
            let ((first, first_scale), (second, second_scale)) = (read(first), read(second));
            let unsigned = join(
                _mm256_xor_si256(first, flip),
                _mm256_xor_si256(second, flip),
            );
            let scales = join_ps(first_scale, second_scale);
            accumulate(&mut lanes, unsigned, scales, &activations, index);
        }
        split(lanes)
    }
}

/// The Q4_K products of one weight row with the sixteen activation rows `sides` holds side by side,
/// taken in fours (`per_pair`): [`crate::vector::q4k_dots4`]'s results for each four, bit for bit.
///
/// Each row has a lane: `vpdpbusd` of four weight values (the nibbles, unsigned already) broadcast to
/// every lane with the same four values of each row adds a sub-block's products to its row's lane
/// without any reduction across lanes. A pair of sub-blocks' exact integer sums are scaled by the
/// sub-block scales, converted, and accumulated by a fused multiply-add per lane in the four-row form's
/// order; the minimums' terms alike, from the rows' sums by `madd`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q4k_dots_side(weights: &[Q4KBlock], sides: &[Q8KSide]) -> [f32; WIDE_GROUP] {
    assert!(sides.len() >= weights.len());
    // SAFETY: the caller runs with these features; every side holds a block for each weight block
    // (checked above), the loads read 32 bytes of the block's 128-byte array, the sides' arrays are
    // 64-byte aligned (`repr(align(64))`) and 64 bytes per row of four values.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let (mut total, mut minimums) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for (weight, side) in weights.iter().zip(sides) {
            let nibbles = q4k_nibbles(weight, mask);
            let scales = _mm512_load_ps(side.scales.as_ptr());
            let scale = _mm512_mul_ps(to_f32x16(weight.d), scales);
            let min_scale = _mm512_mul_ps(to_f32x16(weight.dmin), scales);
            for pair in 0..4 {
                // Two chains per sub-block, so that four products are in flight.
                let mut chains = [_mm512_setzero_si512(); 4];
                for four in 0..8 {
                    for half in 0..2 {
                        let sub_block = 2 * pair + half;
                        let chain = &mut chains[2 * half + four % 2];
                        let values =
                            _mm512_load_si512(side.values[8 * sub_block + four].as_ptr().cast());
                        let four_weights = _mm512_set1_epi32(nibbles[sub_block][four] as i32);
                        *chain = _mm512_dpbusd_epi32(*chain, four_weights, values);
                    }
                }
                let low = _mm512_mullo_epi32(
                    _mm512_add_epi32(chains[0], chains[1]),
                    _mm512_set1_epi32(i32::from(weight.scales[2 * pair])),
                );
                let high = _mm512_mullo_epi32(
                    _mm512_add_epi32(chains[2], chains[3]),
                    _mm512_set1_epi32(i32::from(weight.scales[2 * pair + 1])),
                );
                total = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(_mm512_add_epi32(low, high)),
                    scale,
                    total,
                );
                let mins = _mm512_set1_epi32(
                    i32::from(weight.mins[2 * pair]) | (i32::from(weight.mins[2 * pair + 1]) << 16),
                );
                let pair_minimums =
                    _mm512_madd_epi16(_mm512_load_si512(side.sums[pair].as_ptr().cast()), mins);
                minimums = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pair_minimums), min_scale, minimums);
            }
        }
        let mut out = [0f32; WIDE_GROUP];
        _mm512_storeu_ps(out.as_mut_ptr(), _mm512_sub_ps(total, minimums));
        out
    }
}

/// The Q6_K products of one weight row with the sixteen activation rows `sides` holds side by side:
/// [`crate::vector::q6k_dots`]'s results, bit for bit.
///
/// Each row has a lane in each of eight registers, one per lane of the AVX2 form: `maddubs` of four
/// broadcast weight values with the same four values of each row, then `vpdpwssd` with the values'
/// group scale, adds exactly what the AVX2 form's `maddubs` and `madd` put in that lane. The lanes
/// start at minus the offset the AVX2 form takes off, are converted and accumulated by a fused
/// multiply-add per super-block, then summed in `hsum_float_8`'s order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q6k_dots_side(weights: &[Q6KBlock], sides: &[Q8KSide]) -> [f32; WIDE_GROUP] {
    assert!(sides.len() >= weights.len());
    // SAFETY: the caller runs with these features; every side holds a block for each weight block
    // (checked above), the loads read 32 bytes within the block's arrays, the sides' arrays are 64-byte
    // aligned (`repr(align(64))`) and 64 bytes per row of four values or pair of sums.
    unsafe {
        let mut lanes = [_mm512_setzero_ps(); 8];
        for (weight, side) in weights.iter().zip(sides) {
            let values = q6k_values(weight);
            let mut unpacked = [[0u32; 8]; 8];
            for (chunk, values) in values.into_iter().enumerate() {
                _mm256_storeu_si256(unpacked[chunk].as_mut_ptr().cast(), values);
            }
            let scale = _mm512_mul_ps(_mm512_load_ps(side.scales.as_ptr()), to_f32x16(weight.d));
            let pair = |first: usize| {
                (i32::from(weight.scales[first]) & 0xFFFF)
                    | (i32::from(weight.scales[first + 1]) << 16)
            };
            let mut sums: [__m512i; 8] = [_mm512_setzero_si512(); 8];
            for (lane, sum) in sums.iter_mut().enumerate() {
                let groups = _mm512_load_si512(side.groups[lane].as_ptr().cast());
                let offset = _mm512_slli_epi32(
                    _mm512_madd_epi16(groups, _mm512_set1_epi32(pair(2 * lane))),
                    5,
                );
                *sum = _mm512_sub_epi32(_mm512_setzero_si512(), offset);
            }
            for (chunk, unpacked) in unpacked.iter().enumerate() {
                // Chunk `4h + q` holds values `128h + 32q..`, scaled by group `8h + 2q` in its first
                // sixteen values and `8h + 2q + 1` in the rest.
                let group = 8 * (chunk / 4) + 2 * (chunk % 4);
                for (lane, sum) in sums.iter_mut().enumerate() {
                    let activations =
                        _mm512_load_si512(side.values[8 * chunk + lane].as_ptr().cast());
                    let products =
                        _mm512_maddubs_epi16(_mm512_set1_epi32(unpacked[lane] as i32), activations);
                    let group_scale = _mm512_set1_epi16(i16::from(weight.scales[group + lane / 4]));
                    *sum = _mm512_dpwssd_epi32(*sum, products, group_scale);
                }
            }
            for (lanes, sum) in lanes.iter_mut().zip(sums) {
                *lanes = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sum), *lanes);
            }
        }
        // `hsum_float_8`: the upper four lanes onto the lower, then pairs.
        let quarters: [__m512; 4] =
            std::array::from_fn(|lane| _mm512_add_ps(lanes[lane + 4], lanes[lane]));
        let total = _mm512_add_ps(
            _mm512_add_ps(quarters[0], quarters[2]),
            _mm512_add_ps(quarters[1], quarters[3]),
        );
        let mut out = [0f32; WIDE_GROUP];
        _mm512_storeu_ps(out.as_mut_ptr(), total);
        out
    }
}

/// [`crate::vector::q6k_dots`] itself (256-bit vectors), compiled with AVX-512's 32 vector registers:
/// eight rows' lanes and a block's unpacked values no longer spill to the stack.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q6k_dots<const N: usize>(
    weights: &[Q6KBlock],
    activations: [&[Q8KBlock]; N],
) -> [f32; N] {
    // SAFETY: the caller runs on a CPU with these features.
    unsafe { q6k_dots_body(weights, activations) }
}

/// Every activation row holds a block for each block of the weight rows, which have as many.
#[inline(always)]
fn check_lengths<W, A, const N: usize>(weights: &[&[W]; 2], activations: &[&[A]; N]) {
    assert_eq!(weights[0].len(), weights[1].len());
    for activations in activations {
        assert!(activations.len() >= weights[0].len());
    }
}

/// Adds block `index` of each activation row times the two rows' weight blocks (`unsigned`: the values
/// plus 128; `scales`: each row's weight scale, eight times) to that activation row's lanes.
#[inline(always)]
unsafe fn accumulate<const N: usize>(
    lanes: &mut [__m512; N],
    unsigned: __m512i,
    scales: __m512,
    activations: &[&[Q8Block]; N],
    index: usize,
) {
    // SAFETY: the caller runs with AVX-512 F and VNNI and has checked that every activation row holds
    // block `index`; the loads read that block's 32-byte arrays.
    unsafe {
        for (lanes, activations) in lanes.iter_mut().zip(activations) {
            let activation = activations.get_unchecked(index);
            let values =
                _mm512_broadcast_i64x4(_mm256_loadu_si256(activation.values.as_ptr().cast()));
            let offsets =
                _mm512_broadcast_i64x4(_mm256_loadu_si256(activation.offsets.as_ptr().cast()));
            let sums = _mm512_dpbusd_epi32(offsets, unsigned, values);
            let scale = _mm512_mul_ps(scales, _mm512_set1_ps(activation.scale));
            *lanes = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), *lanes);
        }
    }
}

/// `low` in the lower half, `high` in the upper.
#[inline(always)]
unsafe fn join(low: __m256i, high: __m256i) -> __m512i {
    // SAFETY: the caller runs with AVX-512 F.
    unsafe { _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1) }
}

/// `low` eight times, then `high` eight times, as f32: converted from broadcasts, which depend on
/// nothing else (see `avx2::to_f32`).
#[inline(always)]
unsafe fn join_ps(low: f16, high: f16) -> __m512 {
    // SAFETY: the caller runs with AVX-512 F.
    unsafe {
        _mm512_cvtph_ps(_mm256_set_m128i(
            _mm_set1_epi16(high.to_bits() as i16),
            _mm_set1_epi16(low.to_bits() as i16),
        ))
    }
}

/// A block's f16 scale as f32 in all sixteen lanes, converted from a broadcast.
#[inline(always)]
unsafe fn to_f32x16(value: f16) -> __m512 {
    // SAFETY: the caller runs with AVX-512 F.
    unsafe { _mm512_cvtph_ps(_mm256_set1_epi16(value.to_bits() as i16)) }
}

/// Each activation row's two results: the lower half's lanes summed for the first weight row, the
/// upper half's for the second.
#[inline(always)]
unsafe fn split<const N: usize>(lanes: [__m512; N]) -> [[f32; N]; 2] {
    // SAFETY: the caller runs with AVX-512 F and AVX2.
    unsafe {
        let mut out = [[0f32; N]; 2];
        for (row, lanes) in lanes.into_iter().enumerate() {
            out[0][row] = sum_lanes(_mm512_castps512_ps256(lanes));
            out[1][row] = sum_lanes(_mm256_castpd_ps(_mm512_extractf64x4_pd(
                _mm512_castps_pd(lanes),
                1,
            )));
        }
        out
    }
}
