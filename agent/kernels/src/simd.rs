//! Which forms of the kernels run, chosen once per process at run time, so that one x86-64 binary runs
//! on every x86-64 CPU and at vector speed on those with AVX2, FMA and F16C (Intel Haswell, AMD
//! Excavator and later): those get the AVX2 forms, every other CPU the portable ones. Where the CPU also
//! has AVX-512 with VNNI (Intel Ice Lake and Sapphire Rapids, AMD Zen 4 and later), a prompt's Q5_0 and
//! Q8_0 dot products take two weight rows at a time in 512-bit registers, its Q4_K and Q6_K ones
//! sixteen activation rows side by side, and Q4_1 for several rows uses VNNI (`avx512.rs`), same
//! results.
//! `SOLLOL_KERNELS=portable` forces the portable forms (for tests, and for a CPU that claims features it
//! does not have); `SOLLOL_KERNELS=avx2` stops at AVX2 (to measure what an AVX2-only CPU gets).
//!
//! Each kernel's body is written once, generic over an [`Isa`], and compiled once per form: plainly for
//! [`Baseline`], and inside a `#[target_feature(enable = "avx2,fma,f16c")]` function for [`Avx2`]
//! ([`Isa::run`]), where the compiler vectorises the same loops for the wider registers. Rust never fuses
//! a multiplication and an addition on its own (the bodies fuse with explicit `mul_add`, which is the
//! correctly rounded fused operation in both forms), so the two forms compute the same values bit for
//! bit; the tests compare them. The AVX2 form's quantized dot products are the hand-written intrinsics
//! of `avx2.rs`. On aarch64, NEON is part of the baseline and the dot products use it unconditionally
//! (`build.rs`); there is nothing to choose.

use std::sync::OnceLock;

use half::f16;
use half::slice::HalfFloatSliceExt;

/// The forms of the kernels a process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// Plain Rust for the target's baseline instruction set.
    Portable,
    /// x86-64 with AVX2, FMA and F16C, detected at start.
    Avx2,
    /// x86-64 with AVX2 and AVX-512 (F, BW, VL) with VNNI.
    Avx512Vnni,
    /// aarch64, whose baseline includes NEON.
    Neon,
}

impl Kernels {
    /// The forms this process runs: chosen on first use (the CPU's features and `SOLLOL_KERNELS`), then
    /// fixed.
    pub fn chosen() -> Self {
        match Level::chosen() {
            #[cfg(target_arch = "x86_64")]
            Level::Avx2(avx2) if avx2.wide().is_some() => Self::Avx512Vnni,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2(_) => Self::Avx2,
            Level::Baseline(_) if cfg!(all(vector_kernels, target_arch = "aarch64")) => Self::Neon,
            Level::Baseline(_) => Self::Portable,
        }
    }

    /// How `sollol version` names them.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512-vnni",
            Self::Neon => "neon",
        }
    }
}

/// The chosen form, holding the proof that its instructions may run.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Level {
    Baseline(Baseline),
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
}

impl Level {
    /// The form every dispatched kernel runs; detected once, then read from a static.
    pub(crate) fn chosen() -> Self {
        static CHOSEN: OnceLock<Level> = OnceLock::new();
        *CHOSEN.get_or_init(|| Self::choose(std::env::var("SOLLOL_KERNELS").ok().as_deref()))
    }

    /// `portable` forces the portable forms, `avx2` stops at AVX2; anything else (or nothing) takes the
    /// best the CPU has.
    fn choose(setting: Option<&str>) -> Self {
        let setting = setting.map(str::trim);
        if setting == Some("portable") {
            return Self::Baseline(Baseline);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = Avx2::detect(setting != Some("avx2")) {
            return Self::Avx2(avx2);
        }
        Self::Baseline(Baseline)
    }
}

/// Runs `$call` with `$isa` bound to the chosen form's [`Isa`]: the call is compiled once per form.
macro_rules! dispatch {
    ($isa:ident => $call:expr) => {
        match $crate::simd::Level::chosen() {
            #[cfg(target_arch = "x86_64")]
            $crate::simd::Level::Avx2($isa) => $call,
            $crate::simd::Level::Baseline($isa) => $call,
        }
    };
}
pub(crate) use dispatch;

/// What a form of the kernels provides: target features for the loops it runs, and conversions between
/// f16 and f32 (equal in every form: IEEE rounding to nearest, ties to even).
pub trait Isa: Copy + Send + Sync {
    /// Runs `work` compiled with this form's target features. `work` must be an `#[inline(always)]`
    /// closure: one the compiler keeps as a function of its own is compiled without them.
    fn run<R>(self, work: impl FnOnce() -> R) -> R;
    fn to_f32(self, value: f16) -> f32;
    fn to_f16(self, value: f32) -> f16;
    /// `into[i] = from[i]` as f32, for slices of one length.
    fn to_f32_slice(self, from: &[f16], into: &mut [f32]);
    /// `into[i] = from[i]` rounded to f16, for slices of one length.
    fn to_f16_slice(self, from: &[f32], into: &mut [f16]);
    /// The proof that AVX2, FMA and F16C may run, in the AVX2 form (a kernel with hand-written
    /// intrinsics takes them then; the branch is resolved when each form is compiled).
    #[cfg(target_arch = "x86_64")]
    fn avx2(self) -> Option<Avx2> {
        None
    }
}

/// The target's baseline instruction set: every CPU the binary was built for has it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Baseline;

impl Isa for Baseline {
    #[inline(always)]
    fn run<R>(self, work: impl FnOnce() -> R) -> R {
        work()
    }

    #[inline(always)]
    fn to_f32(self, value: f16) -> f32 {
        value.to_f32()
    }

    #[inline(always)]
    fn to_f16(self, value: f32) -> f16 {
        f16::from_f32(value)
    }

    #[inline(always)]
    fn to_f32_slice(self, from: &[f16], into: &mut [f32]) {
        from.convert_to_f32_slice(into);
    }

    #[inline(always)]
    fn to_f16_slice(self, from: &[f32], into: &mut [f16]) {
        into.convert_from_f32_slice(from);
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::Avx2;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::{
        _MM_FROUND_TO_NEAREST_INT, _mm_cvtph_ps, _mm_cvtps_ph, _mm_cvtsi32_si128,
        _mm_cvtsi128_si32, _mm_cvtss_f32, _mm_loadu_si128, _mm_set_ss, _mm_storeu_si128,
        _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps,
    };

    use half::f16;

    use super::Isa;

    /// Proof that the CPU has AVX2, FMA and F16C: only [`Avx2::detect`] makes one.
    #[derive(Clone, Copy, Debug)]
    pub struct Avx2 {
        wide: Option<Wide>,
    }

    /// Proof that the CPU also has AVX-512 F, BW and VL with VNNI (`vpdpbusd`).
    #[derive(Clone, Copy, Debug)]
    pub struct Wide(());

    impl Avx2 {
        /// `Some` where the CPU has AVX2, FMA and F16C (whatever `SOLLOL_KERNELS` says), with the
        /// 512-bit forms where it has them and `wide` allows.
        pub(crate) fn detect(wide: bool) -> Option<Self> {
            let has = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            let has_wide = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni");
            has.then_some(Self {
                wide: (wide && has_wide).then_some(Wide(())),
            })
        }

        /// The proof for the 512-bit forms, where they run.
        #[inline(always)]
        pub(crate) fn wide(self) -> Option<Wide> {
            self.wide
        }

        /// This form without the 512-bit kernels (for tests comparing them).
        #[cfg(test)]
        pub(crate) fn narrow(self) -> Self {
            Self { wide: None }
        }
    }

    impl Isa for Avx2 {
        #[inline(always)]
        fn avx2(self) -> Option<Avx2> {
            Some(self)
        }

        #[inline(always)]
        fn run<R>(self, work: impl FnOnce() -> R) -> R {
            #[target_feature(enable = "avx2,fma,f16c")]
            fn with_features<R>(work: impl FnOnce() -> R) -> R {
                work()
            }
            // SAFETY: an `Avx2` exists only where the CPU has these features.
            unsafe { with_features(work) }
        }

        #[inline(always)]
        fn to_f32(self, value: f16) -> f32 {
            // SAFETY: as in `run`.
            unsafe { to_f32(value) }
        }

        #[inline(always)]
        fn to_f16(self, value: f32) -> f16 {
            // SAFETY: as in `run`.
            unsafe { to_f16(value) }
        }

        #[inline(always)]
        fn to_f32_slice(self, from: &[f16], into: &mut [f32]) {
            // SAFETY: as in `run`.
            unsafe { to_f32_slice(from, into) }
        }

        #[inline(always)]
        fn to_f16_slice(self, from: &[f32], into: &mut [f16]) {
            // SAFETY: as in `run`.
            unsafe { to_f16_slice(from, into) }
        }
    }

    #[target_feature(enable = "f16c")]
    #[inline]
    fn to_f32(value: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(value.to_bits()))))
    }

    #[target_feature(enable = "f16c")]
    #[inline]
    fn to_f16(value: f32) -> f16 {
        let rounded = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(value));
        f16::from_bits(_mm_cvtsi128_si32(rounded) as u16)
    }

    /// Eight values at a time, as half's F16C path converts them; the rest one by one.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn to_f32_slice(from: &[f16], into: &mut [f32]) {
        assert_eq!(from.len(), into.len());
        let whole = from.len() / 8 * 8;
        for (from, into) in from[..whole]
            .chunks_exact(8)
            .zip(into[..whole].chunks_exact_mut(8))
        {
            // SAFETY: both chunks hold eight values: 16 bytes read, 32 written.
            unsafe {
                let values = _mm256_cvtph_ps(_mm_loadu_si128(from.as_ptr().cast()));
                _mm256_storeu_ps(into.as_mut_ptr(), values);
            }
        }
        for (from, into) in from[whole..].iter().zip(&mut into[whole..]) {
            *into = to_f32(*from);
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    fn to_f16_slice(from: &[f32], into: &mut [f16]) {
        assert_eq!(from.len(), into.len());
        let whole = from.len() / 8 * 8;
        for (from, into) in from[..whole]
            .chunks_exact(8)
            .zip(into[..whole].chunks_exact_mut(8))
        {
            // SAFETY: both chunks hold eight values: 32 bytes read, 16 written.
            unsafe {
                let values =
                    _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(from.as_ptr()));
                _mm_storeu_si128(into.as_mut_ptr().cast(), values);
            }
        }
        for (from, into) in from[whole..].iter().zip(&mut into[whole..]) {
            *into = to_f16(*from);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_is_forced_by_the_environment_setting() {
        assert!(matches!(
            Level::choose(Some("portable")),
            Level::Baseline(_)
        ));
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(
                matches!(Level::choose(None), Level::Avx2(_)),
                Avx2::detect(true).is_some()
            );
            if let Level::Avx2(avx2) = Level::choose(Some("avx2")) {
                assert!(avx2.wide().is_none());
            }
        }
    }

    /// Every f16 bit pattern, and f32 values around every f16 (ties included), convert alike in the
    /// forms.
    #[test]
    fn the_forms_convert_alike() {
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = Avx2::detect(true) {
            check_conversions(avx2);
        }
        check_conversions(Baseline);
    }

    fn check_conversions<I: Isa>(isa: I) {
        let halves: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut singles = vec![0f32; halves.len()];
        isa.to_f32_slice(&halves, &mut singles);
        let mut floats = Vec::new();
        for (half, single) in halves.iter().zip(&singles) {
            let expected = half.to_f32();
            assert!(
                expected.to_bits() == single.to_bits() || (expected.is_nan() && single.is_nan()),
                "{half:?}: {single} vs {expected}"
            );
            assert_eq!(isa.to_f32(*half).to_bits(), single.to_bits());
            if single.is_finite() {
                let bits = single.to_bits();
                floats.extend([
                    f32::from_bits(bits.wrapping_sub(1)),
                    *single,
                    f32::from_bits(bits + 1),
                    f32::from_bits(bits + 0x1000),
                ]);
            }
        }
        let mut rounded = vec![f16::ZERO; floats.len()];
        isa.to_f16_slice(&floats, &mut rounded);
        for (single, half) in floats.iter().zip(&rounded) {
            let expected = f16::from_f32(*single);
            assert!(
                expected.to_bits() == half.to_bits() || (expected.is_nan() && half.is_nan()),
                "{single}: {half} vs {expected}"
            );
            assert_eq!(isa.to_f16(*single).to_bits(), half.to_bits());
        }
    }
}
