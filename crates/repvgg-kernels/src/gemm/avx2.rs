//! AVX2/FMA micro-kernels: 6 x 16 blocks in twelve YMM registers, and the same kernel for
//! the last 1-5 rows of a product.
#![cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{KernelSet, MR_MAX, NR, Panels, Start};

/// Rows of C per call of the full kernel.
const MR: usize = 6;
/// Reduction block: a B micro-panel of KC x NR floats is 16 KiB.
const KC: usize = 256;

pub(super) const KERNELS: KernelSet = KernelSet {
    mr: MR,
    kc: KC,
    spans: &[&[
        kernel::<1>,
        kernel::<2>,
        kernel::<3>,
        kernel::<4>,
        kernel::<5>,
        kernel::<MR>,
    ]],
    spread_ahead: false,
};

/// `H` rows of 16 accumulators' start: zero, the bias, or C's current values. (Inlined
/// into the `avx2` kernels, so it compiles with their features.)
#[inline(always)]
unsafe fn start_rows<const H: usize>(start: Start, c: *const f32, ldc: usize) -> [[__m256; 2]; H] {
    // Plain loops: a closure here (`array::from_fn`) need not inline, and outside the
    // kernel's `target_feature` the intrinsics become calls.
    // SAFETY: inlined into kernels compiled for AVX2, which run only where it exists; the
    // bias covers 16 values and, with Accumulate, C's H rows are readable (the contract).
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; H];
        match start {
            Start::Zero => {}
            Start::Bias(bias) => {
                acc = [[_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8))]; H];
            }
            Start::Accumulate => {
                for (i, row) in acc.iter_mut().enumerate() {
                    *row = [
                        _mm256_loadu_ps(c.add(i * ldc)),
                        _mm256_loadu_ps(c.add(i * ldc + 8)),
                    ];
                }
            }
        }
        acc
    }
}

/// One k step for `H` rows: `acc[i] += a[i][p] * b[p]`, b[p] being one 16-wide row of a
/// B panel. (Inlined into the `avx2` kernels, so it compiles with their features.)
#[inline(always)]
unsafe fn fma_rows<const H: usize>(
    acc: &mut [[__m256; 2]; H],
    a: &[*const f32; MR_MAX],
    b: *const f32,
    p: usize,
) {
    // SAFETY: AVX2 as above; B's panel row p holds 16 values and each A row k > p.
    unsafe {
        let (lo, hi) = (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)));
        for (row, a) in acc.iter_mut().zip(a) {
            let x = _mm256_broadcast_ss(&*a.add(p));
            row[0] = _mm256_fmadd_ps(x, lo, row[0]);
            row[1] = _mm256_fmadd_ps(x, hi, row[1]);
        }
    }
}

/// ReLU if asked, then `H` rows of 16 into C.
#[inline(always)]
unsafe fn store_rows<const H: usize>(acc: &[[__m256; 2]; H], c: *mut f32, ldc: usize, relu: bool) {
    // SAFETY: AVX2 as above; C's H rows are writable over 16 values (the contract).
    unsafe {
        let zero = _mm256_setzero_ps();
        for (i, row) in acc.iter().enumerate() {
            let (mut lo, mut hi) = (row[0], row[1]);
            if relu {
                lo = _mm256_max_ps(lo, zero);
                hi = _mm256_max_ps(hi, zero);
            }
            _mm256_storeu_ps(c.add(i * ldc), lo);
            _mm256_storeu_ps(c.add(i * ldc + 8), hi);
        }
    }
}

/// `H` rows (at most 6) against one panel. The full kernel (`H = 6`) holds twelve
/// accumulators, two B vectors and one broadcast: 15 of the 16 AVX registers. The edge
/// kernels (`H < 6`) let the last block of a product do only its own rows' work (49 rows, a
/// 7x7 map's, would otherwise cost 9 full blocks for 8.2).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn kernel<const H: usize>(
    k: usize,
    a: &[*const f32; MR_MAX],
    Panels { b, next, .. }: Panels,
    c: *mut f32,
    ldc: usize,
    start: Start,
    relu: bool,
) {
    // SAFETY: the module's contract, with H <= 6 and V = 1.
    unsafe {
        let mut acc = start_rows::<H>(start, c, ldc);
        // With few rows, each accumulator's chain of FMAs, not their number, sets the
        // pace (2H chains against a 4-cycle latency): up to three rows take even and odd
        // k into separate accumulators, summed before the store, which doubles the chains.
        let split = H <= 3;
        let mut odd = [[_mm256_setzero_ps(); 2]; H];
        let step = if split { 2 } else { 1 };
        let mut p = 0;
        while p + step <= k {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(p * NR) as *const i8);
            fma_rows(&mut acc, a, b.add(p * NR), p);
            if split {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add((p + 1) * NR) as *const i8);
                fma_rows(&mut odd, a, b.add((p + 1) * NR), p + 1);
            }
            p += step;
        }
        if p < k {
            fma_rows(&mut acc, a, b.add(p * NR), p);
        }
        if split {
            for i in 0..H {
                acc[i][0] = _mm256_add_ps(acc[i][0], odd[i][0]);
                acc[i][1] = _mm256_add_ps(acc[i][1], odd[i][1]);
            }
        }
        store_rows(&acc, c, ldc, relu);
    }
}
