//! NEON forms of the quantized block dot products for aarch64 boards (Raspberry Pi 4/5, Jetson, …):
//! the same eight four-product lanes, fused multiply-adds and final sum as the portable forms in
//! [`crate::quant`] (and the AVX2 ones), so results are theirs bit for bit.
//!
//! Per 16 bytes: `vmull_s8` widens the byte products to i16 (|127 × 128| fits), two pairwise widening
//! adds make four sums of four products in i32, exact; those become f32 and are fused-multiply-added
//! with the block's scale. Only the baseline aarch64 instruction set is used (no `dotprod`), so this
//! runs on every ARMv8-A core. Compiled only for aarch64, where NEON is always present.
#![allow(unsafe_code)]

use std::arch::aarch64::{
    float32x4_t, int8x16_t, int32x4_t, vadd_f32, vaddq_f32, vaddq_s32, vaddvq_s32, vandq_u8,
    vcombine_u8, vcvtq_f32_s32, vdup_n_u8, vdupq_n_f32, vdupq_n_s32, vdupq_n_u8, vfmaq_f32,
    vget_high_f32, vget_low_f32, vget_low_s8, vld1q_s8, vld1q_s32, vld1q_u8, vmull_high_s8,
    vmull_s8, vmulq_n_s32, vorrq_u8, vpaddlq_s16, vpaddq_s32, vpadds_f32, vreinterpretq_s8_u8,
    vshlq_n_u8, vshrq_n_u8, vsubq_s8, vsubq_s32, vtstq_u8,
};

use crate::kquant::{Q4KBlock, Q6KBlock, Q8KBlock, Q50Block, q4k_accumulate};
use crate::quant::{Q8Block, Q41Block, Q80Block};
use crate::simd::Baseline;

/// Lanes 0..4 and 4..8 of the portable form.
#[derive(Clone, Copy)]
struct Lanes {
    low: float32x4_t,
    high: float32x4_t,
}

impl Lanes {
    fn zero() -> Self {
        // SAFETY: NEON is part of the aarch64 baseline.
        unsafe {
            Self {
                low: vdupq_n_f32(0.0),
                high: vdupq_n_f32(0.0),
            }
        }
    }

    /// `lanes + scale * (sums of four products)` for the block's first and second 16 values, fused.
    #[inline(always)]
    fn accumulate(self, scale: f32, weights: [int8x16_t; 2], activations: [int8x16_t; 2]) -> Self {
        self.add_sums(
            scale,
            [
                quads(weights[0], activations[0]),
                quads(weights[1], activations[1]),
            ],
        )
    }

    /// `lanes + scale * sums` (eight exact integer lanes), fused.
    #[inline(always)]
    fn add_sums(self, scale: f32, sums: [int32x4_t; 2]) -> Self {
        // SAFETY: NEON is part of the aarch64 baseline; only registers are touched.
        unsafe {
            let scale = vdupq_n_f32(scale);
            Self {
                low: vfmaq_f32(self.low, vcvtq_f32_s32(sums[0]), scale),
                high: vfmaq_f32(self.high, vcvtq_f32_s32(sums[1]), scale),
            }
        }
    }

    /// The portable form's order: the upper four lanes onto the lower, then pairs.
    #[inline(always)]
    fn sum(self) -> f32 {
        // SAFETY: NEON is part of the aarch64 baseline; only registers are touched.
        unsafe {
            let quarters = vaddq_f32(self.high, self.low);
            vpadds_f32(vadd_f32(vget_low_f32(quarters), vget_high_f32(quarters)))
        }
    }
}

/// The sums of each four products of 16 signed bytes (`|values| <= 128`), exact.
#[inline(always)]
fn quads(weights: int8x16_t, activations: int8x16_t) -> int32x4_t {
    // SAFETY: NEON is part of the aarch64 baseline; only registers are touched.
    unsafe {
        let low = vpaddlq_s16(vmull_s8(vget_low_s8(weights), vget_low_s8(activations)));
        let high = vpaddlq_s16(vmull_high_s8(weights, activations));
        vpaddq_s32(low, high)
    }
}

/// The sum of 32 products of bytes (values below 128), exact.
#[inline(always)]
fn dot32(weights: [int8x16_t; 2], activations: &[i8]) -> i32 {
    // SAFETY: the loads read 32 bytes of `activations`, which the callers' slices hold.
    unsafe {
        assert!(activations.len() >= 32);
        let first = quads(weights[0], vld1q_s8(activations.as_ptr()));
        let second = quads(weights[1], vld1q_s8(activations.as_ptr().add(16)));
        vaddvq_s32(vaddq_s32(first, second))
    }
}

/// The 32 activation values as two vectors.
#[inline(always)]
fn load(activation: &Q8Block) -> [int8x16_t; 2] {
    // SAFETY: both loads read within the block's 32-byte array.
    unsafe {
        [
            vld1q_s8(activation.values.as_ptr()),
            vld1q_s8(activation.values.as_ptr().add(16)),
        ]
    }
}

/// A Q4_1 block's nibbles: values 0..16 from the low halves, 16..32 from the high ones.
#[inline(always)]
fn nibbles(weight: &Q41Block) -> [int8x16_t; 2] {
    // SAFETY: the load reads the block's 16-byte array.
    unsafe {
        let packed = vld1q_u8(weight.values.as_ptr());
        [
            vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(0x0F))),
            vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed)),
        ]
    }
}

/// ggml's `ggml_vec_dot_q4_1_q8_1`.
pub(crate) fn q41_dot(weights: &[Q41Block], activations: &[Q8Block]) -> f32 {
    let mut lanes = Lanes::zero();
    let mut minimums = 0f32;
    for (weight, activation) in weights.iter().zip(activations) {
        minimums = weight.min.to_f32().mul_add(activation.sum, minimums);
        lanes = lanes.accumulate(
            weight.scale.to_f32() * activation.scale,
            nibbles(weight),
            load(activation),
        );
    }
    lanes.sum() + minimums
}

/// [`q41_dot`] of one weight row with several activation rows, the weights unpacked once.
pub(crate) fn q41_dots<const N: usize>(
    weights: &[Q41Block],
    activations: [&[Q8Block]; N],
) -> [f32; N] {
    let mut lanes = [Lanes::zero(); N];
    let mut minimums = [0f32; N];
    for (index, weight) in weights.iter().enumerate() {
        let (scale, min) = (weight.scale.to_f32(), weight.min.to_f32());
        let unpacked = nibbles(weight);
        for (row, activations) in activations.iter().enumerate() {
            let activation = &activations[index];
            minimums[row] = min.mul_add(activation.sum, minimums[row]);
            lanes[row] =
                lanes[row].accumulate(scale * activation.scale, unpacked, load(activation));
        }
    }
    std::array::from_fn(|row| lanes[row].sum() + minimums[row])
}

/// ggml's `ggml_vec_dot_q8_0_q8_0`.
pub(crate) fn q80_dot(weights: &[Q80Block], activations: &[Q8Block]) -> f32 {
    let mut lanes = Lanes::zero();
    for (weight, activation) in weights.iter().zip(activations) {
        // SAFETY: both loads read within the block's 32-byte array.
        let values = unsafe {
            [
                vld1q_s8(weight.values.as_ptr()),
                vld1q_s8(weight.values.as_ptr().add(16)),
            ]
        };
        lanes = lanes.accumulate(
            weight.scale.to_f32() * activation.scale,
            values,
            load(activation),
        );
    }
    lanes.sum()
}

/// A Q5_0 block's 32 values (-16..16) as signed bytes: each fifth bit tested into its byte.
#[inline(always)]
fn q50_values(weight: &Q50Block) -> [int8x16_t; 2] {
    // SAFETY: the load reads the block's 16-byte array; the rest is registers.
    unsafe {
        let packed = vld1q_u8(weight.low.as_ptr());
        let bits = vld1q_u8([1u8, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128].as_ptr());
        let high = weight.high.to_le_bytes();
        let fifth = |first: u8, second: u8| {
            let spread = vcombine_u8(vdup_n_u8(first), vdup_n_u8(second));
            vandq_u8(vtstq_u8(spread, bits), vdupq_n_u8(0x10))
        };
        let low = vorrq_u8(vandq_u8(packed, vdupq_n_u8(0x0F)), fifth(high[0], high[1]));
        let upper = vorrq_u8(vshrq_n_u8::<4>(packed), fifth(high[2], high[3]));
        let sixteen = vreinterpretq_s8_u8(vdupq_n_u8(16));
        [
            vsubq_s8(vreinterpretq_s8_u8(low), sixteen),
            vsubq_s8(vreinterpretq_s8_u8(upper), sixteen),
        ]
    }
}

/// ggml's `ggml_vec_dot_q5_0_q8_0` (its AVX2 arithmetic, as the portable form).
pub(crate) fn q50_dot(weights: &[Q50Block], activations: &[Q8Block]) -> f32 {
    q50_dots(weights, [activations])[0]
}

/// [`q50_dot`] of one weight row with several activation rows, the weights unpacked once.
pub(crate) fn q50_dots<const N: usize>(
    weights: &[Q50Block],
    activations: [&[Q8Block]; N],
) -> [f32; N] {
    let mut lanes = [Lanes::zero(); N];
    for (index, weight) in weights.iter().enumerate() {
        let scale = weight.scale.to_f32();
        let values = q50_values(weight);
        for (row, activations) in activations.iter().enumerate() {
            let activation = &activations[index];
            lanes[row] = lanes[row].accumulate(scale * activation.scale, values, load(activation));
        }
    }
    std::array::from_fn(|row| lanes[row].sum())
}

/// The Q4_K dot product of [`crate::kquant`] (ggml's repacked gemv, or gemm when `per_pair`), each
/// pair's integer dot products by widening byte products.
pub(crate) fn q4k_dot(weights: &[Q4KBlock], activations: &[Q8KBlock], per_pair: bool) -> f32 {
    q4k_accumulate(
        Baseline,
        weights,
        activations,
        per_pair,
        #[inline(always)]
        |weight, activation, pair| {
            // SAFETY: the loads read 32 bytes within the block's 128-byte array.
            let (low, high) = unsafe {
                let first = vld1q_u8(weight.values.as_ptr().add(32 * pair));
                let second = vld1q_u8(weight.values.as_ptr().add(32 * pair + 16));
                let mask = vdupq_n_u8(0x0F);
                (
                    [
                        vreinterpretq_s8_u8(vandq_u8(first, mask)),
                        vreinterpretq_s8_u8(vandq_u8(second, mask)),
                    ],
                    [
                        vreinterpretq_s8_u8(vshrq_n_u8::<4>(first)),
                        vreinterpretq_s8_u8(vshrq_n_u8::<4>(second)),
                    ],
                )
            };
            let values = &activation.values[64 * pair..64 * pair + 64];
            [dot32(low, &values[..32]), dot32(high, &values[32..])]
        },
    )
}

/// ggml's `ggml_vec_dot_q6_K_q8_K` (its AVX2 arithmetic, as the portable form): eight lanes of four
/// products, each scaled by its 16-value group's scale, the offset of 32 through the activation sums.
pub(crate) fn q6k_dot(weights: &[Q6KBlock], activations: &[Q8KBlock]) -> f32 {
    let mut lanes = Lanes::zero();
    for (weight, activation) in weights.iter().zip(activations) {
        // SAFETY: the loads read 16 bytes within the block's and the activations' arrays; the rest is
        // registers.
        let sums = unsafe {
            let (low_mask, high_mask) = (vdupq_n_u8(0x0F), vdupq_n_u8(3));
            let mut sums = [vdupq_n_s32(0); 2];
            for half in 0..2 {
                for (part, sum) in sums.iter_mut().enumerate() {
                    let at = 16 * part;
                    let low_a = vld1q_u8(weight.low.as_ptr().add(64 * half + at));
                    let low_b = vld1q_u8(weight.low.as_ptr().add(64 * half + 32 + at));
                    let high = vld1q_u8(weight.high.as_ptr().add(32 * half + at));
                    // Chunks 4*half + 0..4 of 32 values; this part is values `at..at + 16` of each.
                    let chunks = [
                        vorrq_u8(
                            vandq_u8(low_a, low_mask),
                            vshlq_n_u8::<4>(vandq_u8(high, high_mask)),
                        ),
                        vorrq_u8(
                            vandq_u8(low_b, low_mask),
                            vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<2>(high), high_mask)),
                        ),
                        vorrq_u8(
                            vshrq_n_u8::<4>(low_a),
                            vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<4>(high), high_mask)),
                        ),
                        vorrq_u8(
                            vshrq_n_u8::<4>(low_b),
                            vshlq_n_u8::<4>(vshrq_n_u8::<6>(high)),
                        ),
                    ];
                    for (quarter, values) in chunks.into_iter().enumerate() {
                        let chunk = 4 * half + quarter;
                        let x = vld1q_s8(activation.values.as_ptr().add(32 * chunk + at));
                        let products = quads(vreinterpretq_s8_u8(values), x);
                        let group = 2 * chunk + part;
                        *sum =
                            vaddq_s32(*sum, vmulq_n_s32(products, i32::from(weight.scales[group])));
                    }
                }
            }
            sums
        };
        // ggml's offset of 32: lane `k` gives back 32 times groups 2k's and 2k+1's activation sums
        // times their scales.
        let mut offsets = [0i32; 8];
        for (lane, offset) in offsets.iter_mut().enumerate() {
            *offset = 32
                * (i32::from(activation.sums[2 * lane]) * i32::from(weight.scales[2 * lane])
                    + i32::from(activation.sums[2 * lane + 1])
                        * i32::from(weight.scales[2 * lane + 1]));
        }
        // SAFETY: the loads read the 8-value array; the rest is registers.
        let sums = unsafe {
            [
                vsubq_s32(sums[0], vld1q_s32(offsets.as_ptr())),
                vsubq_s32(sums[1], vld1q_s32(offsets.as_ptr().add(4))),
            ]
        };
        lanes = lanes.add_sums(activation.scale * weight.d.to_f32(), sums);
    }
    lanes.sum()
}
