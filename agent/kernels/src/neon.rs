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
    float32x4_t, int8x16_t, vadd_f32, vaddq_f32, vandq_u8, vcvtq_f32_s32, vdupq_n_f32, vdupq_n_u8,
    vfmaq_f32, vget_high_f32, vget_low_f32, vget_low_s8, vld1q_s8, vld1q_u8, vmull_high_s8,
    vmull_s8, vpaddlq_s16, vpaddq_s32, vpadds_f32, vreinterpretq_s8_u8, vshrq_n_u8,
};

use crate::quant::{Q8Block, Q41Block, Q80Block};

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
        // SAFETY: NEON is part of the aarch64 baseline; only registers are touched.
        unsafe {
            let scale = vdupq_n_f32(scale);
            let quads = |weights: int8x16_t, activations: int8x16_t| {
                let low = vpaddlq_s16(vmull_s8(vget_low_s8(weights), vget_low_s8(activations)));
                let high = vpaddlq_s16(vmull_high_s8(weights, activations));
                vcvtq_f32_s32(vpaddq_s32(low, high))
            };
            Self {
                low: vfmaq_f32(self.low, quads(weights[0], activations[0]), scale),
                high: vfmaq_f32(self.high, quads(weights[1], activations[1]), scale),
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
