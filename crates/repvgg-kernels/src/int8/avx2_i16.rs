//! The INT8 micro-kernel on AVX2 for weights of the whole INT8 range: 3 rows x 16 columns.
//! `vpmaddubsw`'s 16-bit pair sums overflow for weights past 64, so here both operands are
//! widened to 16 bits and `vpmaddwd` alone multiplies them, pairs summed straight into 32-bit
//! lanes, exact for any u8 x s8. A 16-byte quarter of a packed k group (four columns' four k)
//! widens to one YMM of 16 weights whose 32-bit lanes hold a column's k 0-1 and k 2-3; the row's
//! four activations widen and repeat to match, and the two lanes of a column are added at the
//! end. Half the products per instruction of the 7-bit set, and no VNNI needed: what an
//! AVX2-only processor runs an 8-bit-weight file on.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::{COLS_MAX, K_GROUP, MR_MAX, NR8, Store};

pub(super) const MR: usize = 3;

/// # Safety
/// The module's micro-kernel contract, for a span of one panel; AVX2 must run here.
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
    // Per row, per quarter of the panel (four columns): lanes (column, k 0-1), (column, k 2-3).
    let mut acc = [[_mm256_setzero_si256(); 4]; MR];
    for g in 0..groups {
        let panel = b.wrapping_add(g * NR8 * K_GROUP);
        let x: [__m256i; MR] = std::array::from_fn(|row| {
            // SAFETY: row `row` of A holds `4 groups` bytes (the contract).
            let bytes = unsafe { std::ptr::read_unaligned(a[row].add(g * K_GROUP) as *const i32) };
            // Four u8 to four i16 (64 bits), repeated in every 64-bit lane.
            _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(bytes)))
        });
        for quarter in 0..4 {
            // SAFETY: group `g` of the panel is 64 readable bytes, four quarters of 16.
            let w = unsafe {
                _mm256_cvtepi8_epi16(_mm_loadu_si128(panel.add(16 * quarter) as *const __m128i))
            };
            for (sums, x) in acc.iter_mut().zip(&x) {
                sums[quarter] = _mm256_add_epi32(sums[quarter], _mm256_madd_epi16(*x, w));
            }
        }
    }
    for (row, [q0, q1, q2, q3]) in acc.iter().enumerate() {
        // Adjacent lanes added: columns (0, 1, 4, 5 | 2, 3, 6, 7) of two quarters, then the
        // 64-bit pairs put in column order.
        let half = |a, b| _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(a, b));
        let sums = [half(*q0, *q1), half(*q2, *q3)];
        // SAFETY: row `row` of C holds the panel's 16 elements (the contract); AVX2 runs here.
        unsafe { super::avx2::finish_row(&sums, offset, c, row * ldc, store) };
    }
}
