//! The INT8 micro-kernel on AVX-VNNI (the VEX-encoded `vpdpbusd` of processors without
//! AVX-512, Alder Lake and later): 6 rows x 16 columns of 32-bit sums in twelve YMM registers,
//! each k group one `vpdpbusd` per row and half-panel, exact for any INT8 weights (unlike AVX2's
//! 16-bit pair sums).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::{COLS_MAX, K_GROUP, MR_MAX, NR8, Store};

pub(super) const MR: usize = 6;

/// # Safety
/// The module's micro-kernel contract, for a span of one panel; AVX2 and AVX-VNNI must run
/// here.
#[allow(clippy::too_many_arguments)] // the contract's operands, one each
#[target_feature(enable = "avx2,avxvnni")]
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
                *sum = _mm256_dpbusd_avx_epi32(*sum, x, w);
            }
        }
    }
    for (row, sums) in acc.iter().enumerate() {
        // SAFETY: row `row` of C holds the panel's 16 elements (the contract); AVX2 runs here.
        unsafe { super::avx2::finish_row(sums, offset, c, row * ldc, store) };
    }
}
