//! Sets `cfg(vector_kernels)` where the target has the SIMD the quantized kernels are written for:
//! AVX2 and FMA on x86-64 (`src/avx2.rs`), NEON on aarch64 (`src/neon.rs`). Elsewhere (armv7, plain
//! x86-64) the portable forms in `src/quant.rs` run, with the same results bit for bit.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(vector_kernels)");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let has = |feature: &str| features.split(',').any(|enabled| enabled == feature);
    let vector = match arch.as_str() {
        "x86_64" => has("avx2") && has("fma"),
        "aarch64" => has("neon"),
        _ => false,
    };
    if vector {
        println!("cargo::rustc-cfg=vector_kernels");
    }
}
