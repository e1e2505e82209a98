//! Row-wise operations between the matrix products: RMS normalisation and the SwiGLU gate, computed
//! as llama.cpp's CPU backend computes them (see [`crate::quant`] for why the rounding must match).
//! Each is compiled once per form of the kernels ([`crate::simd`]).

use half::f16;
use rayon::prelude::*;

use crate::simd::{Isa, dispatch};

/// Values from which a row-wise operation spreads over the threads (a prompt's rows): below, handing
/// work to another thread costs more than it saves.
const SPREAD_FROM: usize = 16 * 1024;

/// The size of the pieces (a multiple of `unit` values) to spread `len` values over the threads in, two
/// a thread; `None` when they are too few to be worth it, or there is one thread.
pub(crate) fn spread(len: usize, unit: usize) -> Option<usize> {
    let threads = rayon::current_num_threads();
    (len >= SPREAD_FROM && threads > 1)
        .then(|| len.div_ceil(threads * 2).div_ceil(unit).max(1) * unit)
}

/// `out` filled by `body(first, piece)` for its pieces of `unit`-value multiples (`first`: the index of
/// the piece's first value), spread over the threads when there are enough values.
fn in_pieces(out: &mut [f32], unit: usize, body: impl Fn(usize, &mut [f32]) + Sync) {
    match spread(out.len(), unit) {
        Some(size) => out
            .par_chunks_mut(size)
            .enumerate()
            .for_each(|(index, piece)| body(index * size, piece)),
        None => body(0, out),
    }
}

/// ggml's `rms_norm` followed by its multiplication by the norm's weights: the squares summed in f64,
/// `1/sqrt(mean + eps)` in f32, each value scaled, then weighted. `x` holds rows of `weights.len()`.
pub fn rms_norm(x: &[f32], weights: &[f32], epsilon: f32) -> Vec<f32> {
    dispatch!(isa => rms_norm_with(isa, x, weights, epsilon))
}

/// [`rms_norm`] in the form `isa`.
fn rms_norm_with<I: Isa>(isa: I, x: &[f32], weights: &[f32], epsilon: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    in_pieces(&mut out, weights.len().max(1), |first, out| {
        let x = &x[first..first + out.len()];
        isa.run(
            #[inline(always)]
            || rms_norm_body(x, weights, epsilon, out),
        );
    });
    out
}

// The bodies are plain loops into buffers allocated up front: an iterator adapter the compiler kept out
// of line would be compiled without the form's target features.
#[inline(always)]
fn rms_norm_body(x: &[f32], weights: &[f32], epsilon: f32, out: &mut [f32]) {
    let width = weights.len();
    for (row, out) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let mut sum = 0f64;
        for value in row {
            sum += f64::from(value * value);
        }
        let mean = (sum / width as f64) as f32;
        let scale = 1.0 / (mean + epsilon).sqrt();
        for ((out, value), weight) in out.iter_mut().zip(row).zip(weights) {
            *out = (value * scale) * weight;
        }
    }
}

/// `silu(gate) * up`, element by element, as ggml's `ggml_vec_swiglu_f32` computes it on AVX-512: 16
/// values at a time through its vector `expf`, the rest (past a multiple of 16) through libm's.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    dispatch!(isa => swiglu_with(isa, gate, up))
}

/// [`swiglu`] in the form `isa`, in pieces of whole 16-value vectors but the last, so that the values
/// past the last multiple of 16 (libm's exponential) are the whole slice's.
fn swiglu_with<I: Isa>(isa: I, gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len().min(up.len())];
    in_pieces(&mut out, VECTOR, |first, out| {
        let range = first..first + out.len();
        let (gate, up) = (&gate[range.clone()], &up[range]);
        isa.run(
            #[inline(always)]
            || swiglu_body(gate, up, out),
        );
    });
    out
}

/// Values in the vector registers of the AVX-512 `ggml_vec_swiglu_f32`.
const VECTOR: usize = 16;

#[inline(always)]
fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let length = out.len();
    let whole = length / VECTOR * VECTOR;
    for ((out, x), g) in out[..whole]
        .iter_mut()
        .zip(&gate[..whole])
        .zip(&up[..whole])
    {
        *out = (x / (1.0 + vector_exp(-x))) * g;
    }
    for ((out, x), g) in out[whole..]
        .iter_mut()
        .zip(&gate[whole..length])
        .zip(&up[whole..length])
    {
        *out = (x / (1.0 + (-x).exp())) * g;
    }
}

/// `gelu(gate) * up`, element by element, as ggml's `ggml_vec_geglu_f32` computes it: GELU (tanh form)
/// read from a table over every f16 input, the gate rounded to f16 to index it; gates at or below -10
/// give 0, at or above 10 the gate itself. (The table is 64 K entries, built once.)
pub fn geglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    dispatch!(isa => geglu_with(isa, gate, up))
}

/// [`geglu`] in the form `isa`: the gates rounded to f16 a slice at a time (F16C in the AVX2 form).
fn geglu_with<I: Isa>(isa: I, gate: &[f32], up: &[f32]) -> Vec<f32> {
    let table = gelu_table();
    let mut out = vec![0f32; gate.len().min(up.len())];
    in_pieces(&mut out, 1, |first, out| {
        let range = first..first + out.len();
        let (gate, up) = (&gate[range.clone()], &up[range]);
        isa.run(
            #[inline(always)]
            || geglu_body(isa, table, gate, up, out),
        );
    });
    out
}

#[inline(always)]
fn geglu_body<I: Isa>(isa: I, table: &[f32], gate: &[f32], up: &[f32], out: &mut [f32]) {
    const CHUNK: usize = 64;
    let mut halves = [f16::ZERO; CHUNK];
    for ((out, gate), up) in out
        .chunks_mut(CHUNK)
        .zip(gate.chunks(CHUNK))
        .zip(up.chunks(CHUNK))
    {
        let halves = &mut halves[..out.len()];
        isa.to_f16_slice(gate, halves);
        for (((out, x), g), half) in out.iter_mut().zip(gate).zip(up).zip(halves.iter()) {
            *out = if *x <= -10.0 {
                0.0
            } else if *x >= 10.0 {
                x * g
            } else {
                table[usize::from(half.to_bits())] * g
            };
        }
    }
}

/// ggml's `ggml_table_gelu_f16`: `gelu_f32` of every f16 value, rounded to f16. `gelu_f32` is
/// `0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))`, the inner `1 + a x * x` fused as GCC contracts
/// it for the native builds.
/// Kept as f32 (the f16 values converted once): a lookup is then one load.
fn gelu_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const COEFFICIENT: f32 = 0.044715;
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        (0..=u16::MAX)
            .map(|bits| {
                let x = f16::from_bits(bits).to_f32();
                let inner = (SQRT_2_OVER_PI * x) * (COEFFICIENT * x).mul_add(x, 1.0);
                f16::from_f32((0.5 * x) * (1.0 + inner.tanh())).to_f32()
            })
            .collect()
    })
}

/// ggml's `ggml_v_expf` (AVX-512 form): `2^n * p(b)` with `n = round(x / ln 2)`, `b` the remainder and
/// `p` a degree-5 polynomial, all in fused multiply-adds; 0 or infinity past `|n| > 192`.
#[inline(always)]
fn vector_exp(x: f32) -> f32 {
    let bits = f32::from_bits;
    let round = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let z = x.mul_add(bits(0x3fb8_aa3b), round);
    let n = z - round;
    let b = (-n).mul_add(bits(0x35bf_be8e), (-n).mul_add(bits(0x3f31_7200), x));
    let u = b * b;
    let j = bits(0x3c07_2010)
        .mul_add(b, bits(0x3d2b_9f17))
        .mul_add(u, bits(0x3e2a_af33).mul_add(b, bits(0x3eff_fedb)))
        .mul_add(u, bits(0x3f7f_fff6).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    // `_mm512_scalef_ps`: j * 2^n rounded once (in f64 the product is exact).
    let power = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    (f64::from(j) * power) as f32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::simd::{Avx2, Baseline};

    /// The AVX2 forms give the portable forms' values bit for bit (where this CPU has AVX2).
    #[test]
    fn the_forms_compute_alike() {
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = Avx2::detect(true) {
            let bits = |values: Vec<f32>| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            // Widths past a multiple of 16 and of the vector registers; values wide enough for every
            // branch of the exponential (0 and infinity included).
            for width in [1, 7, 16, 40, 576] {
                let x: Vec<f32> = (0..width * 3)
                    .map(|index| ((index * 7919) % 4001) as f32 / 10.0 - 200.0)
                    .collect();
                let y: Vec<f32> = x.iter().rev().map(|value| value * 0.37 + 0.5).collect();
                let weights = &y[..width];
                assert_eq!(
                    bits(rms_norm_with(avx2, &x, weights, 1e-5)),
                    bits(rms_norm_with(Baseline, &x, weights, 1e-5)),
                    "rms_norm, width {width}"
                );
                assert_eq!(
                    bits(swiglu_with(avx2, &x, &y)),
                    bits(swiglu_with(Baseline, &x, &y)),
                    "swiglu, width {width}"
                );
                assert_eq!(
                    bits(geglu_with(avx2, &x, &y)),
                    bits(geglu_with(Baseline, &x, &y)),
                    "geglu, width {width}"
                );
            }
        }
    }

    /// A pool of `threads` threads, to run a kernel with as many as a test needs.
    pub(crate) fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool")
    }

    /// A prompt's rows spread over the threads (pieces of whole rows, and of whole 16-value vectors for
    /// SwiGLU, whose values past the last multiple of 16 take libm's exponential) give the values one
    /// thread gives, bit for bit.
    #[test]
    fn spreading_rows_over_threads_changes_no_value() {
        let (one, three) = (pool(1), pool(3));
        let bits = |values: Vec<f32>| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        // 41 rows of 576 and 40 x 576 + 7 values: past the spreading threshold, pieces of unequal
        // rows, a tail past a multiple of 16.
        for length in [41 * 576, 40 * 576 + 7] {
            // Gates where the two exponentials differ in the last bits.
            let x: Vec<f32> = (0..length)
                .map(|index| ((index * 7919) % 4001) as f32 / 250.0 - 8.0)
                .collect();
            let y: Vec<f32> = x.iter().rev().map(|value| value * 0.37 + 0.5).collect();
            assert!(three.install(|| spread(length, 576)).is_some());
            let both = |work: &(dyn Fn() -> Vec<f32> + Sync)| {
                (bits(one.install(work)), bits(three.install(work)))
            };
            let (alone, spread) = both(&|| swiglu(&x, &y));
            assert_eq!(alone, spread, "swiglu of {length}");
            let (alone, spread) = both(&|| geglu(&x, &y));
            assert_eq!(alone, spread, "geglu of {length}");
            if length % 576 == 0 {
                let (alone, spread) = both(&|| rms_norm(&x, &y[..576], 1e-6));
                assert_eq!(alone, spread, "rms_norm of {length}");
            }
        }
    }

    #[test]
    fn geglu_is_gelu_times_up_at_f16_precision() {
        let gate: Vec<f32> = (0..200).map(|index| index as f32 * 0.13 - 13.0).collect();
        let up = vec![2.0f32; 200];
        for (ours, x) in geglu(&gate, &up).iter().zip(&gate) {
            let exact = 0.5 * x * (1.0 + (0.797_884_6 * x * (1.0 + 0.044715 * x * x)).tanh()) * 2.0;
            let expected = if *x <= -10.0 { 0.0 } else { exact };
            assert!(
                (ours - expected).abs() <= 2e-3 * expected.abs() + 1e-3,
                "gelu({x}): {ours} vs {expected}"
            );
        }
    }

    #[test]
    fn vector_exp_is_within_two_ulps_of_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (vector_exp(x), x.exp());
            let ulps = (ours.to_bits() as i64 - libm.to_bits() as i64).abs();
            assert!(ulps <= 2, "exp({x}): {ours} vs {libm}");
            x += 0.0137;
        }
        assert_eq!(vector_exp(-200.0), 0.0);
        assert_eq!(vector_exp(200.0), f32::INFINITY);
    }

    #[test]
    fn swiglu_and_norm_compute_their_formulas() {
        let gate: Vec<f32> = (0..40).map(|index| index as f32 * 0.3 - 6.0).collect();
        let up: Vec<f32> = (0..40).map(|index| 1.0 + index as f32 * 0.01).collect();
        for ((ours, x), g) in swiglu(&gate, &up).iter().zip(&gate).zip(&up) {
            let exact = x / (1.0 + (-x).exp()) * g;
            assert!(
                (ours - exact).abs() <= 1e-6 * exact.abs().max(1.0),
                "{ours} vs {exact}"
            );
        }
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let out = rms_norm(&x, &[1.0, 2.0], 0.0);
        // Row [3, 4]: mean square 12.5.
        let scale = 1.0 / 12.5f32.sqrt();
        assert_eq!(out[..2], [3.0 * scale, 4.0 * scale * 2.0]);
        assert!(
            out[2..].iter().all(|value| value.is_nan()),
            "0/0 as ggml gives it"
        );
    }
}
