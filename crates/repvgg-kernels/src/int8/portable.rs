//! The INT8 micro-kernel in plain Rust: the contract's arithmetic, loop by loop.

use super::{COLS_MAX, K_GROUP, MR_MAX, NR8, Store, requantize};

pub(super) const MR: usize = 4;

/// # Safety
/// The module's micro-kernel contract, for a span of one panel.
#[allow(clippy::too_many_arguments)] // the contract's operands, one each
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
    let mut acc = [[0i32; NR8]; MR];
    for g in 0..groups {
        // SAFETY: the panel holds `groups` groups of 64 bytes (the contract).
        let panel = unsafe { std::slice::from_raw_parts(b.add(g * NR8 * K_GROUP), NR8 * K_GROUP) };
        for (row, sums) in acc.iter_mut().enumerate() {
            // SAFETY: row `row` of A holds `4 groups` bytes (the contract).
            let x = unsafe { std::slice::from_raw_parts(a[row].add(g * K_GROUP), K_GROUP) };
            for (sum, w) in sums.iter_mut().zip(panel.chunks_exact(K_GROUP)) {
                *sum += x
                    .iter()
                    .zip(w)
                    .map(|(&x, &w)| x as i32 * w as i32)
                    .sum::<i32>();
            }
        }
    }
    for (row, sums) in acc.iter().enumerate() {
        for (col, &sum) in sums.iter().enumerate() {
            let sum = sum + offset[col];
            match *store {
                // SAFETY: C holds `MR` rows of 16 elements at stride `ldc` (the contract).
                Store::U8 { scale, zero, low } => unsafe {
                    *c.add(row * ldc + col) = requantize(sum, scale[col], zero, low)
                },
                // SAFETY: as above, in i32 elements.
                Store::I32 => unsafe { *(c as *mut i32).add(row * ldc + col) = sum },
            }
        }
    }
}
