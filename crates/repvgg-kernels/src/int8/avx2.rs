//! The INT8 micro-kernel on AVX2: 4 rows x 16 columns of 32-bit sums in eight YMM registers;
//! each k group is `vpmaddubsw` (u8 x s8 products, pairs summed into 16 bits) then `vpmaddwd`
//! against ones (pairs of pairs into 32 bits). The 16-bit sums are exact only for weights in
//! [-64, 64], which the driver checks.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::{COLS_MAX, K_GROUP, MR_MAX, NR8, Store, requantize};

pub(super) const MR: usize = 4;

/// # Safety
/// The module's micro-kernel contract, for a span of one panel (weights in [-64, 64] included); AVX2 must run here.
#[allow(clippy::too_many_arguments)] // the contract's operands, one each
#[target_feature(enable = "avx2")]
pub(super) unsafe fn kernel(
    groups: usize,
    a: &[*const u8; MR_MAX],
    b: *const i8,
    _panel_stride: usize,
    offset: &[i32; COLS_MAX],
    c: *mut u8,
    ldc: usize,
    store: &Store,
) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    for g in 0..groups {
        let panel = b.wrapping_add(g * NR8 * K_GROUP);
        // SAFETY: group `g` of the panel is 64 readable bytes: columns 0-7, then 8-15.
        let w = unsafe {
            [
                _mm256_loadu_si256(panel as *const __m256i),
                _mm256_loadu_si256(panel.add(32) as *const __m256i),
            ]
        };
        for (row, sums) in acc.iter_mut().enumerate() {
            // SAFETY: row `row` of A holds `4 groups` bytes (the contract).
            let x = unsafe { std::ptr::read_unaligned(a[row].add(g * K_GROUP) as *const i32) };
            let x = _mm256_set1_epi32(x);
            for (sum, w) in sums.iter_mut().zip(w) {
                let pairs = _mm256_maddubs_epi16(x, w);
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
            }
        }
    }
    for (row, sums) in acc.iter().enumerate() {
        // SAFETY: row `row` of C holds the panel's 16 elements (the contract); AVX2 runs here.
        unsafe { super::avx2::finish_row(sums, offset, c, row * ldc, store) };
    }
}

/// Adds the offsets to one row's sums (two half-panels) and stores them as the epilogue says:
/// the finish the AVX2 and AVX-VNNI kernels share.
///
/// # Safety
/// Element `at` of C (u8 or i32, as `store` says) starts 16 writable elements; AVX2 must run
/// here.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn finish_row(
    sums: &[__m256i; 2],
    offset: &[i32; COLS_MAX],
    c: *mut u8,
    at: usize,
    store: &Store,
) {
    let mut totals = [0i32; NR8];
    for (half, sum) in sums.iter().enumerate() {
        // SAFETY: `offset` holds 48 i32 and `totals` 16; each half is 8 of them.
        unsafe {
            let offset = _mm256_loadu_si256(offset.as_ptr().add(8 * half) as *const __m256i);
            _mm256_storeu_si256(
                totals.as_mut_ptr().add(8 * half) as *mut __m256i,
                _mm256_add_epi32(*sum, offset),
            );
        }
    }
    match *store {
        Store::U8 { scale, zero, low } => {
            for (col, &sum) in totals.iter().enumerate() {
                // SAFETY: C's elements `at..at + 16` are writable (the caller's contract).
                unsafe { *c.add(at + col) = requantize(sum, scale[col], zero, low) };
            }
        }
        // SAFETY: as above, in i32 elements.
        Store::I32 => unsafe {
            std::ptr::copy_nonoverlapping(totals.as_ptr(), (c as *mut i32).add(at), NR8)
        },
    }
}
