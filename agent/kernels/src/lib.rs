//! sollol's own compute kernels for the inference engine (`agent/src/inference`).

mod activation;
mod attention;
mod quant;
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod simd;

pub use activation::{rms_norm, swiglu};
pub use attention::{Heads, KvLayer, Rope, Rotary, attend, rotate};
pub use quant::{Q41Matrix, Q80Matrix};
