//! The INT8 micro-kernel on AVX-512 VNNI: 12 rows x 16 columns of 32-bit sums in ZMM
//! registers, each k group one `vpdpbusd` per row (four u8 x s8 products added exactly).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::{K_GROUP, MR_MAX, NR8, Store};

pub(super) const MR: usize = 12;

/// # Safety
/// The module's micro-kernel contract; AVX-512 F, BW and VNNI must run here.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn kernel(
    groups: usize,
    a: &[*const u8; MR_MAX],
    b: *const i8,
    offset: &[i32; NR8],
    c: *mut u8,
    ldc: usize,
    store: Store,
) {
    let mut acc = [_mm512_setzero_si512(); MR];
    for g in 0..groups {
        // SAFETY: group `g` of the panel is 64 readable bytes (the contract).
        let w = unsafe { _mm512_loadu_si512(b.add(g * NR8 * K_GROUP) as *const _) };
        for (row, sum) in acc.iter_mut().enumerate() {
            // SAFETY: row `row` of A holds `4 groups` bytes (the contract).
            let x = unsafe { std::ptr::read_unaligned(a[row].add(g * K_GROUP) as *const i32) };
            *sum = _mm512_dpbusd_epi32(*sum, _mm512_set1_epi32(x), w);
        }
    }
    // SAFETY: `offset` is 16 i32.
    let offset = unsafe { _mm512_loadu_si512(offset.as_ptr() as *const _) };
    match store {
        Store::U8 { scale, zero, low } => {
            // SAFETY: `scale` is 16 f32.
            let scale = unsafe { _mm512_loadu_ps(scale.as_ptr()) };
            let (zero, low, high) = (
                _mm512_set1_ps(zero),
                _mm512_set1_ps(low),
                _mm512_set1_ps(255.0),
            );
            for (row, sum) in acc.iter().enumerate() {
                let v = _mm512_cvtepi32_ps(_mm512_add_epi32(*sum, offset));
                let v = _mm512_add_ps(_mm512_mul_ps(v, scale), zero);
                let v = _mm512_min_ps(_mm512_max_ps(v, low), high);
                // Rounds to nearest even (the default MXCSR mode), then keeps the low bytes.
                let bytes = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v));
                // SAFETY: row `row` of C holds 16 bytes (the contract).
                unsafe { _mm_storeu_si128(c.add(row * ldc) as *mut __m128i, bytes) };
            }
        }
        Store::I32 => {
            for (row, sum) in acc.iter().enumerate() {
                // SAFETY: row `row` of C holds 16 i32 (the contract).
                unsafe {
                    _mm512_storeu_si512(
                        (c as *mut i32).add(row * ldc) as *mut _,
                        _mm512_add_epi32(*sum, offset),
                    )
                };
            }
        }
    }
}
