//! The micro-kernel in plain Rust, for machines without AVX2/FMA.

use super::{KernelSet, MR_MAX, NR, Panels, Start};

/// Rows of C per call: six rows of 16 accumulators vectorise on SSE and NEON alike.
const MR: usize = 6;
/// Reduction block: a B micro-panel of KC x NR floats is 16 KiB.
const KC: usize = 256;

pub(super) const KERNELS: KernelSet = KernelSet {
    mr: MR,
    kc: KC,
    spans: &[&[kernel]],
    spread_ahead: false,
};

/// Computes a 6 x 16 block (the module's contract, with `H = 6`, `V = 1`).
unsafe fn kernel(
    k: usize,
    a: &[*const f32; MR_MAX],
    Panels { b, .. }: Panels,
    c: *mut f32,
    ldc: usize,
    start: Start,
    relu: bool,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for (i, row) in acc.iter_mut().enumerate() {
        match start {
            Start::Zero => {}
            Start::Bias(bias) => {
                // SAFETY: the contract's bias covers 16 values.
                let bias = unsafe { std::slice::from_raw_parts(bias, NR) };
                row.copy_from_slice(bias);
            }
            Start::Accumulate => {
                // SAFETY: with Accumulate, C's rows are readable over 16 values.
                let current = unsafe { std::slice::from_raw_parts(c.add(i * ldc), NR) };
                row.copy_from_slice(current);
            }
        }
    }
    for p in 0..k {
        // SAFETY: the panel holds k rows of NR values.
        let b_row = unsafe { std::slice::from_raw_parts(b.add(p * NR), NR) };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: each of the MR A rows holds k values.
            let a_value = unsafe { *a[i].add(p) };
            for (value, &b_value) in row.iter_mut().zip(b_row) {
                // Not `mul_add`: without FMA hardware that is a slow library call.
                *value += a_value * b_value;
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: C's MR rows are writable over 16 values, and this block's alone.
        let out = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), NR) };
        for (o, &v) in out.iter_mut().zip(row) {
            *o = if relu { v.max(0.0) } else { v };
        }
    }
}
