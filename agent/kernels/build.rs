//! Sets `cfg(vector_kernels)` on aarch64, whose baseline includes NEON: the quantized dot products then
//! use `src/neon.rs` unconditionally. x86-64 chooses its forms at run time instead (`src/simd.rs`: AVX2
//! where the CPU has it), and elsewhere (armv7) the portable forms in `src/quant.rs` run, with the same
//! results bit for bit.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(vector_kernels)");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let has = |feature: &str| features.split(',').any(|enabled| enabled == feature);
    if arch == "aarch64" && has("neon") {
        println!("cargo::rustc-cfg=vector_kernels");
    }
}
