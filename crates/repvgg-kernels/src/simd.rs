//! Vectors of channels for code written once and compiled per instruction set: an AVX-512
//! or AVX register, or a plain array elsewhere.

/// Channels per vector step of the portable and AVX transforms.
const LANES: usize = 8;

/// Channels operated on together: an AVX-512 or AVX register, or a plain array elsewhere.
pub(crate) trait Vector: Copy {
    /// Channels per vector.
    const LANES: usize;
    fn zero() -> Self;
    fn splat(x: f32) -> Self;
    /// The first `min(Self::LANES, src.len())` values, zeros after.
    fn load(src: &[f32]) -> Self;
    /// Writes the first `min(Self::LANES, dst.len())` values.
    fn store(self, dst: &mut [f32]);
    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    fn relu(self) -> Self;
}

#[derive(Clone, Copy)]
pub(crate) struct Portable([f32; LANES]);

impl Vector for Portable {
    const LANES: usize = LANES;
    fn zero() -> Self {
        Portable([0.0; LANES])
    }
    fn splat(x: f32) -> Self {
        Portable([x; LANES])
    }
    fn load(src: &[f32]) -> Self {
        let mut v = [0.0; LANES];
        let n = src.len().min(LANES);
        v[..n].copy_from_slice(&src[..n]);
        Portable(v)
    }
    fn store(self, dst: &mut [f32]) {
        let n = dst.len().min(LANES);
        dst[..n].copy_from_slice(&self.0[..n]);
    }
    fn add(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] + o.0[i]))
    }
    fn sub(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] - o.0[i]))
    }
    fn mul(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] * o.0[i]))
    }
    fn relu(self) -> Self {
        Portable(self.0.map(|x| x.max(0.0)))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx {
    use std::arch::x86_64::*;

    use super::{LANES, Vector};

    /// Eight channels in a YMM register.
    ///
    /// Its methods execute AVX instructions, so they are called only from code compiled
    /// with AVX2 enabled (inlined into a `#[target_feature(enable = "avx2")]` function) that
    /// runs on a machine with it: the Winograd dispatch, behind [`crate::Isa::Avx2`] or
    /// better. Every `unsafe` block below relies on that.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx(__m256);

    impl Vector for Avx {
        const LANES: usize = LANES;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx(_mm256_setzero_ps()) }
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx(_mm256_set1_ps(x)) }
        }
        #[inline(always)]
        fn load(src: &[f32]) -> Self {
            if src.len() >= LANES {
                // SAFETY: the instruction set as the type says; src holds at least a vector.
                unsafe { Avx(_mm256_loadu_ps(src.as_ptr())) }
            } else {
                let mut v = [0.0f32; LANES];
                v[..src.len()].copy_from_slice(src);
                // SAFETY: the instruction set as the type says; v is a whole vector.
                unsafe { Avx(_mm256_loadu_ps(v.as_ptr())) }
            }
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            if dst.len() >= LANES {
                // SAFETY: the instruction set as the type says; dst holds at least a vector.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), self.0) }
            } else {
                let mut v = [0.0f32; LANES];
                // SAFETY: the instruction set as the type says; v is a whole vector.
                unsafe { _mm256_storeu_ps(v.as_mut_ptr(), self.0) };
                let n = dst.len();
                dst.copy_from_slice(&v[..n]);
            }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx(_mm256_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx(_mm256_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx(_mm256_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn relu(self) -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx(_mm256_max_ps(self.0, _mm256_setzero_ps())) }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::Vector;

    /// Sixteen channels in a ZMM register.
    ///
    /// Its methods execute AVX-512 instructions, so they are called only from code compiled
    /// with AVX-512 enabled that runs on a machine with it: the Winograd dispatch, behind
    /// [`crate::Isa::Avx512`]. Every `unsafe` block below relies on that.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512);

    /// The first `n` (at most 16) lanes.
    #[inline(always)]
    fn mask(n: usize) -> __mmask16 {
        if n >= 16 { !0 } else { (1u16 << n) - 1 }
    }

    impl Vector for Avx512 {
        const LANES: usize = 16;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx512(_mm512_setzero_ps()) }
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx512(_mm512_set1_ps(x)) }
        }
        #[inline(always)]
        fn load(src: &[f32]) -> Self {
            if src.len() >= 16 {
                // SAFETY: the instruction set as the type says; src holds at least a vector.
                unsafe { Avx512(_mm512_loadu_ps(src.as_ptr())) }
            } else {
                // SAFETY: the instruction set as the type says; the mask reads only the slice's values.
                unsafe { Avx512(_mm512_maskz_loadu_ps(mask(src.len()), src.as_ptr())) }
            }
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            if dst.len() >= 16 {
                // SAFETY: the instruction set as the type says; dst holds at least a vector.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), self.0) }
            } else {
                // SAFETY: the instruction set as the type says; the mask writes only the slice's values.
                unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask(dst.len()), self.0) }
            }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx512(_mm512_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx512(_mm512_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx512(_mm512_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn relu(self) -> Self {
            // SAFETY: the instruction set as the type says; no memory is touched.
            unsafe { Avx512(_mm512_max_ps(self.0, _mm512_setzero_ps())) }
        }
    }
}
