//! sollol's own compute kernels for the inference engine (`agent/engine`, package `sollol-engine`).

mod activation;
mod attention;
mod kquant;
mod matrix;
mod quant;
mod simd;
// The quantized dot products in SIMD: AVX2 on x86-64, chosen at run time where the CPU has it
// (`simd`); NEON on aarch64, where `build.rs` sets `cfg(vector_kernels)`.
#[cfg(target_arch = "x86_64")]
#[path = "avx2.rs"]
mod vector;
#[cfg(all(vector_kernels, target_arch = "aarch64"))]
#[path = "neon.rs"]
mod vector;

pub use activation::{geglu, rms_norm, swiglu};
pub use attention::{
    Attention, Heads, KvLayer, Rope, Rotary, attend, attend_each, attend_within, rotate,
};
pub use kquant::{Q4KMatrix, Q6KMatrix, Q50Matrix};
pub use matrix::{Q41Matrix, Q80Matrix};
pub use simd::Kernels;
