//! AVX-512 micro-kernels: up to 8 rows x 48 columns (three 16-column panels) in ZMM
//! registers, one kernel per (rows, panels) shape.
#![cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{KernelSet, MR_MAX, NR, Panels, Start};

/// `kernel::<h, SPAN>` for h = 1, 2, ...
macro_rules! rows {
    ($span:literal; $($h:literal)*) => {
        &[$(kernel::<$h, $span>),*]
    };
}

/// Eight rows against up to three panels: 24 of the 32 ZMM registers hold an 8 x 48 block,
/// and each k step loads 3 B vectors and 8 broadcasts for 24 FMAs.
pub(super) const KERNELS: KernelSet = KernelSet {
    mr: MR_MAX,
    kc: KC,
    spans: &[
        rows!(1; 1 2 3 4 5 6 7 8),
        rows!(2; 1 2 3 4 5 6 7 8),
        rows!(3; 1 2 3 4 5 6 7 8),
    ],
    spread_ahead: true,
};

/// Reduction block: a 192-channel tap or Winograd point in one block. Its three
/// micro-panels then fill up to a 48 KiB L1 and partly come from L2, which costs less than
/// splitting the reduction (see bench/RESULTS.md).
const KC: usize = 256;

/// `H` rows against `V` adjacent panels of 16 columns: `H x V` accumulators (at most 24),
/// `V` B vectors and one broadcast.
/// With fewer than eight accumulators, their chains of FMAs (4 cycles each, two FMA
/// units) set the pace, so even and odd k go to separate accumulators, summed before the
/// store.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn kernel<const H: usize, const V: usize>(
    k: usize,
    a: &[*const f32; MR_MAX],
    panels: Panels,
    c: *mut f32,
    ldc: usize,
    start: Start,
    relu: bool,
) {
    // SAFETY: the module's contract, with H rows and V panels.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; H];
        match start {
            Start::Zero => {}
            Start::Bias(bias) => {
                for row in acc.iter_mut() {
                    for (v, lane) in row.iter_mut().enumerate() {
                        *lane = _mm512_loadu_ps(bias.add(v * NR));
                    }
                }
            }
            Start::Accumulate => {
                for (i, row) in acc.iter_mut().enumerate() {
                    for (v, lane) in row.iter_mut().enumerate() {
                        *lane = _mm512_loadu_ps(c.add(i * ldc + v * NR));
                    }
                }
            }
        }
        let split = H * V < 8;
        let mut odd = [[_mm512_setzero_ps(); V]; H];
        let step = if split { 2 } else { 1 };
        let mut p = 0;
        while p + step <= k {
            fma_step::<H, V>(&mut acc, a, panels, p);
            if split {
                fma_step::<H, V>(&mut odd, a, panels, p + 1);
            }
            p += step;
        }
        if p < k {
            fma_step::<H, V>(&mut acc, a, panels, p);
        }
        let zero = _mm512_setzero_ps();
        for (i, (row, odd_row)) in acc.iter().zip(&odd).enumerate() {
            for v in 0..V {
                let mut value = row[v];
                if split {
                    value = _mm512_add_ps(value, odd_row[v]);
                }
                if relu {
                    value = _mm512_max_ps(value, zero);
                }
                _mm512_storeu_ps(c.add(i * ldc + v * NR), value);
            }
        }
    }
}

/// One k step: `acc[i][v] += a[i][p] * b[v][p]`, asking for the next panels' line p.
/// (Inlined into the kernel, so it compiles with its features; index loops rather than
/// iterator closures, which need not inline.)
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn fma_step<const H: usize, const V: usize>(
    acc: &mut [[__m512; V]; H],
    a: &[*const f32; MR_MAX],
    Panels {
        b,
        next,
        ahead_step,
        stride,
    }: Panels,
    p: usize,
) {
    // SAFETY: inlined into the kernel, compiled for AVX-512 and run only where it exists;
    // each panel's row p and each A row's value p are inside them (the contract); the
    // prefetched address is never read.
    unsafe {
        let mut lanes = [_mm512_setzero_ps(); V];
        for v in 0..V {
            let ahead = next.wrapping_add(v * stride + p * ahead_step);
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            lanes[v] = _mm512_loadu_ps(b.add(v * stride + p * NR));
        }
        for (row, a) in acc.iter_mut().zip(a) {
            let x = _mm512_set1_ps(*a.add(p));
            for v in 0..V {
                row[v] = _mm512_fmadd_ps(x, lanes[v], row[v]);
            }
        }
    }
}
