//! Rotary position embeddings and causal self-attention over an f16 key/value cache.
//!
//! The attention computes what llama.cpp's CPU flash attention computes, in the same order, because
//! greedy decoding of small models goes through near ties (logit gaps of 0.01–0.02 on the reference
//! prompts) that any other rounding resolves differently: keys and values are stored as f16, each query
//! is rounded to f16, a key's score is the f16 dot product summed as ggml's 16-lane vector code sums it,
//! the softmax is online (running maximum and sum, one key at a time), and the weighted values are
//! accumulated in f16. A plain f32 softmax attention parts from llama.cpp on two of the four reference
//! prompts; this one follows it on all four.

use half::f16;
use rayon::prelude::*;

use crate::simd::{Isa, dispatch};

/// How rotary embeddings pair a head's dimensions: llama.cpp's "normal" (adjacent pairs) or "neox"
/// (first half with second half).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rope {
    Adjacent,
    Halves,
}

/// Head counts and width of a model's attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub query: usize,
    pub kv: usize,
    pub dim: usize,
}

impl Heads {
    fn kv_width(&self) -> usize {
        self.kv * self.dim
    }
}

/// The rotary angles' cosines and sines for every position of the context, computed as llama.cpp does
/// (theta starts at the position and is multiplied by `base^(-2/dim)` per pair, in f32).
#[derive(Debug)]
pub struct Rotary {
    style: Rope,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotary {
    pub fn new(style: Rope, dim: usize, base: f32, context: usize) -> Self {
        let half = dim / 2;
        let step = base.powf(-2.0 / dim as f32);
        let mut cos = Vec::with_capacity(context * half);
        let mut sin = Vec::with_capacity(context * half);
        for position in 0..context {
            let mut theta = position as f32;
            for _ in 0..half {
                cos.push(theta.cos());
                sin.push(theta.sin());
                theta *= step;
            }
        }
        Self {
            style,
            half,
            cos,
            sin,
        }
    }
}

/// Rotates `x`, laid out `[token][head][dim]` with `heads` heads, whose first token is at position
/// `start`, with the angles of `table`.
pub fn rotate(table: &Rotary, x: &mut [f32], heads: usize, start: usize) {
    dispatch!(isa => rotate_with(isa, table, x, heads, start));
}

/// [`rotate`] in the form `isa`.
fn rotate_with<I: Isa>(isa: I, table: &Rotary, x: &mut [f32], heads: usize, start: usize) {
    isa.run(
        #[inline(always)]
        || rotate_body(table, x, heads, start),
    );
}

#[inline(always)]
fn rotate_body(table: &Rotary, x: &mut [f32], heads: usize, start: usize) {
    let dim = table.half * 2;
    for (token, row) in x.chunks_exact_mut(heads * dim).enumerate() {
        let angles = (start + token) * table.half;
        let cos = &table.cos[angles..angles + table.half];
        let sin = &table.sin[angles..angles + table.half];
        for head in row.chunks_exact_mut(dim) {
            for pair in 0..table.half {
                let (first, second) = match table.style {
                    Rope::Adjacent => (2 * pair, 2 * pair + 1),
                    Rope::Halves => (pair, pair + table.half),
                };
                // Fused as ggml's compiled `rotate_pairs` fuses them.
                let (x0, x1) = (head[first], head[second]);
                head[first] = x0.mul_add(cos[pair], -(x1 * sin[pair]));
                head[second] = x0.mul_add(sin[pair], x1 * cos[pair]);
            }
        }
    }
}

/// The keys and values one layer has computed for one sequence, in f16, `[position][kv head][dim]`.
#[derive(Clone, Debug, Default)]
pub struct KvLayer {
    keys: Vec<f16>,
    values: Vec<f16>,
}

impl KvLayer {
    /// Positions held.
    pub fn len(&self, heads: &Heads) -> usize {
        self.keys.len() / heads.kv_width().max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Appends the keys and values of some tokens, each `[token][kv head][dim]`, rounded to f16.
    pub fn push(&mut self, keys: &[f32], values: &[f32]) {
        dispatch!(isa => self.push_with(isa, keys, values));
    }

    /// [`KvLayer::push`] in the form `isa`.
    fn push_with<I: Isa>(&mut self, isa: I, keys: &[f32], values: &[f32]) {
        debug_assert_eq!(keys.len(), values.len());
        for (into, from) in [(&mut self.keys, keys), (&mut self.values, values)] {
            let start = into.len();
            into.resize(start + from.len(), f16::ZERO);
            isa.to_f16_slice(from, &mut into[start..]);
        }
    }

    /// Forgets every position from `positions` on.
    pub fn truncate(&mut self, positions: usize, heads: &Heads) {
        self.keys.truncate(positions * heads.kv_width());
        self.values.truncate(positions * heads.kv_width());
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        (self.keys.len() + self.values.len()) * size_of::<f16>()
    }
}

/// Attention of `queries` (`[token][head][dim]`, rotated) for the last `tokens` positions of `cache`,
/// each over the cache up to and including its own position. Writes `[token][head][dim]` to `out`.
///
/// # Panics
/// When `queries` or `out` do not hold a whole number of tokens, or more tokens than the cache.
pub fn attend(cache: &KvLayer, heads: &Heads, queries: &[f32], out: &mut [f32]) {
    let scale = 1.0 / (heads.dim as f32).sqrt();
    attend_within(cache, heads, queries, out, usize::MAX, scale);
}

/// [`attend`] with a sliding window and the scores' scale given: each query sees only the last
/// `window` positions up to its own (llama.cpp's standard sliding-window mask: a key `window` or more
/// positions back is left out).
pub fn attend_within(
    cache: &KvLayer,
    heads: &Heads,
    queries: &[f32],
    out: &mut [f32],
    window: usize,
    scale: f32,
) {
    dispatch!(isa => attend_with(isa, cache, heads, queries, out, window, scale));
}

/// One sequence's part of [`attend_each`]: its cache, its queries, where its output goes.
pub type Attention<'a> = (&'a KvLayer, &'a [f32], &'a mut [f32]);

/// [`attend_within`] for several sequences at once (a decoding step of each), the sequences spread over
/// the threads when there are several (one alone spreads its heads where its context is long enough).
pub fn attend_each(work: Vec<Attention<'_>>, heads: &Heads, window: usize, scale: f32) {
    let attend = |(cache, queries, out): Attention<'_>| {
        attend_within(cache, heads, queries, out, window, scale);
    };
    if work.len() > 1 {
        work.into_par_iter().for_each(attend);
    } else {
        work.into_iter().for_each(attend);
    }
}

/// [`attend_within`] in the form `isa`; each row runs with its features.
fn attend_with<I: Isa>(
    isa: I,
    cache: &KvLayer,
    heads: &Heads,
    queries: &[f32],
    out: &mut [f32],
    window: usize,
    scale: f32,
) {
    let dim = heads.dim;
    let width = heads.query * dim;
    assert!(width > 0 && queries.len().is_multiple_of(width) && out.len() == queries.len());
    let tokens = queries.len() / width;
    let positions = cache.len(heads);
    assert!(
        tokens <= positions,
        "{tokens} queries for {positions} cached positions"
    );
    let first = positions - tokens;
    let group = heads.query / heads.kv.max(1);
    let row = |index: usize, out: &mut [f32], scratch: &mut Scratch| {
        let (token, head) = (index / heads.query, index % heads.query);
        let query = &queries[index * dim..(index + 1) * dim];
        isa.run(
            #[inline(always)]
            || {
                attend_row(
                    isa,
                    cache,
                    heads,
                    query,
                    head / group,
                    first + token + 1,
                    window,
                    scale,
                    out,
                    scratch,
                )
            },
        );
    };
    // Short contexts are not worth a hand-off to another thread: under 256 query heads' worth of
    // 64-value positions. One generated token's heads over a few dozen positions are worth it: on one
    // thread they were a tenth of SmolLM2's generation time, the other thread idle.
    if tokens * heads.query * positions * dim < 256 * 64 {
        let mut scratch = Scratch::new(dim);
        for (index, out) in out.chunks_exact_mut(dim).enumerate() {
            row(index, out, &mut scratch);
        }
    } else {
        out.par_chunks_exact_mut(dim).enumerate().for_each_init(
            || Scratch::new(dim),
            |scratch, (index, out)| row(index, out, scratch),
        );
    }
}

/// Buffers one query row needs, reused across rows: the query rounded to f16 precision, the weighted
/// values' sums (kept in f16, as ggml keeps them), and room for the portable form to work on f16 rows
/// as f32 (converted a row at a time, which vectorises).
struct Scratch {
    query: Vec<f32>,
    sums: Vec<f16>,
    half: Vec<f16>,
    first: Vec<f32>,
    second: Vec<f32>,
}

impl Scratch {
    fn new(dim: usize) -> Self {
        Self {
            query: vec![0.0; dim],
            sums: vec![f16::ZERO; dim],
            half: vec![f16::ZERO; dim],
            first: vec![0.0; dim],
            second: vec![0.0; dim],
        }
    }
}

/// One query head over the first `positions` cached positions of `kv_head`: ggml's
/// `flash_attn_ext_f16` for one row, the weighted values accumulated in f16.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_row<I: Isa>(
    isa: I,
    cache: &KvLayer,
    heads: &Heads,
    query: &[f32],
    kv_head: usize,
    positions: usize,
    window: usize,
    scale: f32,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    let dim = heads.dim;
    let Scratch {
        query: rounded,
        sums,
        half,
        first,
        second,
    } = scratch;
    isa.to_f16_slice(query, half);
    isa.to_f32_slice(half, rounded);
    sums.fill(f16::ZERO);
    let mut total = 0f32;
    let mut max = f32::NEG_INFINITY;
    for position in positions.saturating_sub(window)..positions {
        let at = (position * heads.kv + kv_head) * dim;
        let score = key_score(isa, &cache.keys[at..at + dim], rounded, first) * scale;
        let (old_scale, weight) = if score > max {
            let shrink = (max - score).exp();
            max = score;
            scale_sums(isa, sums, shrink, first);
            (shrink, 1.0)
        } else {
            (1.0, (score - max).exp())
        };
        add_weighted(
            isa,
            sums,
            &cache.values[at..at + dim],
            weight,
            [first, second],
        );
        total = total.mul_add(old_scale, weight);
    }
    let inverse = 1.0 / total;
    isa.to_f32_slice(sums, first);
    for (out, sum) in out.iter_mut().zip(first.iter()) {
        *out = sum * inverse;
    }
}

/// A cached key row's score against a rounded query ([`dot_f16`]); the AVX2 form converts the keys as
/// it loads them, the portable one into `work` first.
#[inline(always)]
fn key_score<I: Isa>(isa: I, keys: &[f16], query: &[f32], work: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2().is_some() {
        // SAFETY: an `Avx2` exists only where the CPU has the features it enables.
        #[allow(unsafe_code)]
        return unsafe { crate::vector::dot_f16(keys, query) };
    }
    isa.to_f32_slice(keys, work);
    dot_f16(work, query)
}

/// `sums = f16(sums * by)`, value by value.
#[inline(always)]
fn scale_sums<I: Isa>(isa: I, sums: &mut [f16], by: f32, work: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2().is_some() {
        // SAFETY: as in `key_score`.
        #[allow(unsafe_code)]
        return unsafe { crate::vector::scale_f16(sums, by) };
    }
    isa.to_f32_slice(sums, work);
    for value in work.iter_mut() {
        *value *= by;
    }
    isa.to_f16_slice(work, sums);
}

/// `sums = f16(values * weight + sums)`, value by value, the product fused (ggml's `ggml_vec_mad_f16`).
#[inline(always)]
fn add_weighted<I: Isa>(
    isa: I,
    sums: &mut [f16],
    values: &[f16],
    weight: f32,
    [work, converted]: [&mut [f32]; 2],
) {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2().is_some() {
        // SAFETY: as in `key_score`.
        #[allow(unsafe_code)]
        return unsafe { crate::vector::mad_f16(sums, values, weight) };
    }
    isa.to_f32_slice(sums, work);
    isa.to_f32_slice(values, converted);
    for (sum, value) in work.iter_mut().zip(converted.iter()) {
        *sum = value.mul_add(weight, *sum);
    }
    isa.to_f16_slice(work, sums);
}

/// Lanes of ggml's x86 vector registers for f32 (AVX-512) and the registers its f16 dot product uses.
const LANES: usize = 16;
const REGISTERS: usize = 4;

/// ggml's `ggml_vec_dot_f16` over f16 values held as f32: products summed per lane over four 16-lane
/// registers, the registers and lanes then summed pairwise, the tail (past a multiple of 64) added in f64.
#[inline(always)]
fn dot_f16(a: &[f32], b: &[f32]) -> f32 {
    const STEP: usize = LANES * REGISTERS;
    let whole = a.len() / STEP * STEP;
    let mut sums = [[0f32; LANES]; REGISTERS];
    for (a, b) in a[..whole]
        .chunks_exact(STEP)
        .zip(b[..whole].chunks_exact(STEP))
    {
        for (register, sum) in sums.iter_mut().enumerate() {
            for (lane, sum) in sum.iter_mut().enumerate() {
                let index = register * LANES + lane;
                *sum = a[index].mul_add(b[index], *sum);
            }
        }
    }
    let mut lanes = [0f32; LANES];
    for (lane, slot) in lanes.iter_mut().enumerate() {
        *slot = (sums[0][lane] + sums[2][lane]) + (sums[1][lane] + sums[3][lane]);
    }
    // The register's halves, quarters, then pairs, as `_mm512_reduce_add_ps` adds them.
    let eighths: [f32; 8] = std::array::from_fn(|lane| lanes[lane + 8] + lanes[lane]);
    let quarters: [f32; 4] = std::array::from_fn(|lane| eighths[lane + 4] + eighths[lane]);
    let mut total = f64::from((quarters[0] + quarters[2]) + (quarters[1] + quarters[3]));
    for (a, b) in a[whole..].iter().zip(&b[whole..]) {
        total += f64::from(a * b);
    }
    total as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::simd::{Avx2, Baseline};

    /// Rotation, the cache's rounding and attention (short contexts in one thread, long ones over the
    /// threads; head widths with and without a tail past 64) give the AVX2 forms' values bit for bit in
    /// the portable forms (where this CPU has AVX2).
    #[test]
    fn the_forms_compute_alike() {
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = Avx2::detect(true) {
            let bits = |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let value = |index: usize, salt: usize| {
                ((index * 7919 + salt * 104_729) % 2003) as f32 / 97.0 - 10.0
            };
            for (dim, tokens) in [(64, 3), (80, 40), (68, 5)] {
                let heads = Heads {
                    query: 4,
                    kv: 2,
                    dim,
                };
                let table = Rotary::new(Rope::Halves, dim, 10_000.0, tokens);
                let mut queries: Vec<f32> = (0..tokens * 4 * dim).map(|i| value(i, 1)).collect();
                let mut keys: Vec<f32> = (0..tokens * 2 * dim).map(|i| value(i, 2)).collect();
                let values: Vec<f32> = (0..tokens * 2 * dim).map(|i| value(i, 3)).collect();
                let (mut portable_queries, mut portable_keys) = (queries.clone(), keys.clone());
                rotate_with(avx2, &table, &mut queries, 4, 0);
                rotate_with(avx2, &table, &mut keys, 2, 0);
                rotate_with(Baseline, &table, &mut portable_queries, 4, 0);
                rotate_with(Baseline, &table, &mut portable_keys, 2, 0);
                assert_eq!(bits(&queries), bits(&portable_queries), "rotation");
                assert_eq!(bits(&keys), bits(&portable_keys), "rotation");
                let (mut cache, mut portable_cache) = (KvLayer::default(), KvLayer::default());
                cache.push_with(avx2, &keys, &values);
                portable_cache.push_with(Baseline, &keys, &values);
                assert_eq!(cache.keys, portable_cache.keys);
                assert_eq!(cache.values, portable_cache.values);
                let mut out = vec![0f32; queries.len()];
                let mut portable_out = vec![0f32; queries.len()];
                attend_with(avx2, &cache, &heads, &queries, &mut out, usize::MAX, 0.125);
                attend_with(
                    Baseline,
                    &cache,
                    &heads,
                    &queries,
                    &mut portable_out,
                    usize::MAX,
                    0.125,
                );
                assert_eq!(bits(&out), bits(&portable_out), "attention, dim {dim}");
            }
        }
    }

    /// Plain f32 softmax attention over the same f16-rounded inputs, for comparison.
    fn reference(keys: &[f32], values: &[f32], query: &[f32], positions: usize) -> Vec<f32> {
        let dim = query.len();
        let round = |x: f32| f16::from_f32(x).to_f32();
        let scores: Vec<f32> = (0..positions)
            .map(|position| {
                (0..dim)
                    .map(|d| round(keys[position * dim + d]) * round(query[d]))
                    .sum::<f32>()
                    / (dim as f32).sqrt()
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = scores.iter().map(|score| (score - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        (0..dim)
            .map(|d| {
                (0..positions)
                    .map(|position| weights[position] * round(values[position * dim + d]))
                    .sum::<f32>()
                    / total
            })
            .collect()
    }

    #[test]
    fn a_sliding_window_leaves_out_keys_that_far_back() {
        let heads = Heads {
            query: 1,
            kv: 1,
            dim: 64,
        };
        let value = |index: usize, salt: usize| ((index * 29 + salt * 13) % 19) as f32 / 5.0 - 1.7;
        let keys: Vec<f32> = (0..5 * 64).map(|index| value(index, 1)).collect();
        let values: Vec<f32> = (0..5 * 64).map(|index| value(index, 2)).collect();
        let query: Vec<f32> = (0..64).map(|index| value(index, 3)).collect();
        let mut cache = KvLayer::default();
        cache.push(&keys, &values);
        let mut out = vec![0f32; 64];
        // The last position (4) with a window of 2 sees positions 3 and 4 only.
        attend_within(&cache, &heads, &query, &mut out, 2, 0.125);
        let expected = reference(&keys[3 * 64..], &values[3 * 64..], &query, 2);
        for (ours, expected) in out.iter().zip(&expected) {
            assert!((ours - expected).abs() < 2e-3, "{ours} vs {expected}");
        }
        let mut everything = vec![0f32; 64];
        attend(&cache, &heads, &query, &mut everything);
        assert_ne!(out, everything);
    }

    #[test]
    fn attention_is_causal_softmax_attention() {
        let heads = Heads {
            query: 2,
            kv: 1,
            dim: 64,
        };
        let value = |index: usize, salt: usize| ((index * 31 + salt * 17) % 23) as f32 / 7.0 - 1.5;
        let tokens = 5;
        let keys: Vec<f32> = (0..tokens * 64).map(|index| value(index, 1)).collect();
        let values: Vec<f32> = (0..tokens * 64).map(|index| value(index, 2)).collect();
        let queries: Vec<f32> = (0..tokens * 2 * 64).map(|index| value(index, 3)).collect();
        let mut cache = KvLayer::default();
        cache.push(&keys, &values);
        assert_eq!(cache.len(&heads), tokens);
        let mut out = vec![0f32; queries.len()];
        attend(&cache, &heads, &queries, &mut out);
        for token in 0..tokens {
            for head in 0..2 {
                let at = (token * 2 + head) * 64;
                let expected = reference(&keys, &values, &queries[at..at + 64], token + 1);
                for (ours, expected) in out[at..at + 64].iter().zip(&expected) {
                    // Values are summed in f16: close to the f32 sum, not equal.
                    assert!((ours - expected).abs() < 4e-3, "{ours} vs {expected}");
                }
            }
        }
        // Decoding one more token gives what the batch would have given it.
        let mut longer = cache.clone();
        longer.truncate(tokens - 1, &heads);
        longer.push(&keys[(tokens - 1) * 64..], &values[(tokens - 1) * 64..]);
        let mut last = vec![0f32; 128];
        attend(&longer, &heads, &queries[(tokens - 1) * 128..], &mut last);
        assert_eq!(last, out[(tokens - 1) * 128..]);
    }

    #[test]
    fn dot_sums_every_product_including_the_tail() {
        for length in [1, 63, 64, 65, 200] {
            let a: Vec<f32> = (0..length).map(|i| i as f32 * 0.5).collect();
            let b: Vec<f32> = (0..length).map(|i| 1.0 - i as f32 * 0.01).collect();
            let exact: f64 = a
                .iter()
                .zip(&b)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let ours = f64::from(dot_f16(&a, &b));
            assert!(
                (ours - exact).abs() <= 1e-4 * exact.abs().max(1.0),
                "{length}: {ours} vs {exact}"
            );
        }
    }

    #[test]
    fn rotation_turns_pairs_by_position() {
        let table = Rotary::new(Rope::Adjacent, 4, 10_000.0, 8);
        let mut x = vec![1.0, 0.0, 1.0, 0.0];
        rotate(&table, &mut x, 1, 3);
        // Pair 0 turns by 3 radians; pair 1 by 3 * 10000^(-1/2).
        assert!((x[0] - 3f32.cos()).abs() < 1e-6 && (x[1] - 3f32.sin()).abs() < 1e-6);
        let angle = 3.0 * 10_000f32.powf(-0.5);
        assert!((x[2] - angle.cos()).abs() < 1e-6 && (x[3] - angle.sin()).abs() < 1e-6);
        let table = Rotary::new(Rope::Halves, 4, 10_000.0, 8);
        let mut x = vec![1.0, 1.0, 0.0, 0.0];
        rotate(&table, &mut x, 1, 3);
        assert!((x[0] - 3f32.cos()).abs() < 1e-6 && (x[2] - 3f32.sin()).abs() < 1e-6);
    }
}
