//! Row-wise operations between the matrix products: RMS normalisation and the SwiGLU gate, computed
//! as llama.cpp's CPU backend computes them (see [`crate::quant`] for why the rounding must match).

/// ggml's `rms_norm` followed by its multiplication by the norm's weights: the squares summed in f64,
/// `1/sqrt(mean + eps)` in f32, each value scaled, then weighted. `x` holds rows of `weights.len()`.
pub fn rms_norm(x: &[f32], weights: &[f32], epsilon: f32) -> Vec<f32> {
    let width = weights.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(width) {
        let sum: f64 = row.iter().map(|value| f64::from(value * value)).sum();
        let mean = (sum / width as f64) as f32;
        let scale = 1.0 / (mean + epsilon).sqrt();
        out.extend(
            row.iter()
                .zip(weights)
                .map(|(value, weight)| (value * scale) * weight),
        );
    }
    out
}

/// `silu(gate) * up`, element by element, as ggml's `ggml_vec_swiglu_f32` computes it on AVX-512: 16
/// values at a time through its vector `expf`, the rest (past a multiple of 16) through libm's.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    const VECTOR: usize = 16;
    let whole = gate.len() / VECTOR * VECTOR;
    let mut out: Vec<f32> = gate[..whole]
        .iter()
        .zip(&up[..whole])
        .map(|(x, g)| (x / (1.0 + vector_exp(-x))) * g)
        .collect();
    out.extend(
        gate[whole..]
            .iter()
            .zip(&up[whole..])
            .map(|(x, g)| (x / (1.0 + (-x).exp())) * g),
    );
    out
}

/// ggml's `ggml_v_expf` (AVX-512 form): `2^n * p(b)` with `n = round(x / ln 2)`, `b` the remainder and
/// `p` a degree-5 polynomial, all in fused multiply-adds; 0 or infinity past `|n| > 192`.
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
mod tests {
    use super::*;

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
