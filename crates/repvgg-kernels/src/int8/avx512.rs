//! The INT8 micro-kernels on AVX-512 VNNI: 8 rows x up to 48 columns (three panels) of 32-bit
//! sums in ZMM registers. Each k group loads a vector of weights per panel and broadcasts four
//! activation bytes per row; one `vpdpbusd` per row and panel adds four u8 x s8 products to
//! each lane exactly. Wider spans share each broadcast among more products: the 8 x 48 block
//! does 24 of them for 11 loads.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::{COLS_MAX, K_GROUP, MR_MAX, MicroKernel, NR8, Store};

pub(super) const MR: usize = 8;

/// The kernels by span: one, two or three panels.
pub(super) const SPANS: &[MicroKernel] = &[kernel::<1>, kernel::<2>, kernel::<3>];

/// # Safety
/// The module's micro-kernel contract for a span of `P` panels; AVX-512 F, BW and VNNI must
/// run here.
#[allow(clippy::too_many_arguments)] // the contract's operands, one each
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel<const P: usize>(
    groups: usize,
    a: &[*const u8; MR_MAX],
    b: *const i8,
    panel_stride: usize,
    offset: &[i32; COLS_MAX],
    c: *mut u8,
    ldc: usize,
    store: &Store,
) {
    let mut acc = [[_mm512_setzero_si512(); P]; MR];
    for g in 0..groups {
        let mut w = [_mm512_setzero_si512(); P];
        for (p, w) in w.iter_mut().enumerate() {
            // SAFETY: panel `p` of the span holds `groups` groups of 64 bytes (the contract).
            *w = unsafe {
                _mm512_loadu_si512(b.add(p * panel_stride + g * NR8 * K_GROUP) as *const _)
            };
        }
        for (row, sums) in acc.iter_mut().enumerate() {
            // SAFETY: row `row` of A holds `4 groups` bytes (the contract).
            let x = unsafe { std::ptr::read_unaligned(a[row].add(g * K_GROUP) as *const i32) };
            let x = _mm512_set1_epi32(x);
            for (sum, w) in sums.iter_mut().zip(&w) {
                *sum = _mm512_dpbusd_epi32(*sum, x, *w);
            }
        }
    }
    for p in 0..P {
        // SAFETY: `offset` holds 48 i32; panel `p`'s are 16 of them.
        let offset = unsafe { _mm512_loadu_si512(offset.as_ptr().add(p * NR8) as *const _) };
        match *store {
            Store::U8 { scale, zero, low } => {
                // SAFETY: `scale` holds 48 f32; panel `p`'s are 16 of them.
                let scale = unsafe { _mm512_loadu_ps(scale.as_ptr().add(p * NR8)) };
                for (row, sums) in acc.iter().enumerate() {
                    let bytes = requantize_16(_mm512_add_epi32(sums[p], offset), scale, zero, low);
                    // SAFETY: row `row` of C holds the span's 16 P bytes (the contract).
                    unsafe { _mm_storeu_si128(c.add(row * ldc + p * NR8) as *mut __m128i, bytes) };
                }
            }
            Store::I32 => {
                for (row, sums) in acc.iter().enumerate() {
                    // SAFETY: row `row` of C holds the span's 16 P i32 (the contract).
                    unsafe {
                        _mm512_storeu_si512(
                            (c as *mut i32).add(row * ldc + p * NR8) as *mut _,
                            _mm512_add_epi32(sums[p], offset),
                        )
                    };
                }
            }
        }
    }
}

/// The u8 epilogue of 16 sums (offset already added), as the module's contract defines it;
/// shared with the AMX kernels, which store the same bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) fn requantize_16(sums: __m512i, scale: __m512, zero: f32, low: f32) -> __m128i {
    let v = _mm512_add_ps(
        _mm512_mul_ps(_mm512_cvtepi32_ps(sums), scale),
        _mm512_set1_ps(zero),
    );
    let v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(low)), _mm512_set1_ps(255.0));
    // Rounds to nearest even (the default MXCSR mode), keeps the low bytes.
    _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v))
}
