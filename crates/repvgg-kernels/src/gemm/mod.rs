//! The matrix product every convolution runs on, `C = A B (+ bias) (then ReLU)`, written for
//! the shapes a convolution makes: A is row-major with any row stride (or any row pointers)
//! and is read in place (im2col patches, Winograd-transformed tiles, input pixels), B is a
//! weight matrix packed once ([`PackedB`]).
//!
//! Each call of a micro-kernel keeps a block of C in registers and, for every k, broadcasts
//! one value from each of its A rows against the vectors of one row of B's panels: with
//! AVX-512, 8 rows x up to 48 columns (three 16-column panels) in ZMM registers; with
//! AVX2/FMA, 6 x 16 in twelve YMM registers; elsewhere the same loop in portable Rust. The
//! reduction is cut into blocks so that the block's B micro-panels stay in L1 while the A
//! rows stream from L2.
//!
//! # The micro-kernel contract
//!
//! Every micro-kernel (`MicroKernel`) computes one block of C: `H` rows (the kernel's
//! height, at most `MR_MAX` = 8) by `16 V` columns (`V` adjacent panels of B), over `k`
//! reduction steps, and stores it. It relies on, and the driver ([`gemm`]) guarantees:
//! - `a[i]`, for `i < H`, is valid for `k` reads (rows past the block's last repeat it);
//! - `panels.b` and the `V - 1` panels after it (`panels.stride` floats apart) are each valid
//!   for `k * NR` reads; `panels.next` is only prefetched and may point anywhere;
//! - `c` is valid for writes, and with `Start::Accumulate` reads, of `H` rows at stride
//!   `ldc` of `16 V` values, that no other thread touches meanwhile;
//! - `Start::Bias` points at `16 V` readable values;
//! - the kernel's instruction set runs on this machine.
//!
//! It stores `max(0, x)` instead of `x` when asked for ReLU.

mod avx2;
mod avx512;
mod packed;
mod portable;

use std::ops::Range;

pub use packed::PackedB;

use crate::Isa;

/// Columns of a B panel: one AVX-512 vector, two AVX ones.
pub const NR: usize = 16;
/// The most rows a micro-kernel computes at once (the AVX-512 kernels').
pub(crate) const MR_MAX: usize = 8;

/// What a block of C starts from before the products are added.
#[derive(Clone, Copy)]
enum Start {
    Zero,
    /// One value per column (NR per panel of the block), the same for every row.
    Bias(*const f32),
    /// The values already in C (a later reduction block).
    Accumulate,
}

/// The B micro-panels of a block (one, or up to three adjacent ones for the AVX-512 kernels),
/// and the stretch of B the product reads next: the kernel asks for one cache line of it per
/// k step and panel, so that a B streamed from memory (weights too big for the caches)
/// arrives while the current panels are multiplied, not when they are needed.
///
/// Adjacent panels are `stride` floats apart, so that a kernel holds one pointer for them
/// all: with one pointer per panel, the 8 x 48 kernel's pointers outgrow the 16 general
/// registers and are reloaded from the stack every k step.
#[derive(Clone, Copy)]
struct Panels {
    b: *const f32,
    /// Only prefetched, never read: its k steps may run past the end of B (a shorter last
    /// reduction block, or the panels after the last), so the kernels offset it with
    /// `wrapping_add`.
    next: *const f32,
    /// Floats the prefetched address moves per k step: NR (a line per step), or less when
    /// several row blocks share the asking (see [`gemm`]).
    ahead_step: usize,
    stride: usize,
}

/// One micro-kernel: `(k, a, panels, c, ldc, start, relu)`; see the module's contract.
type MicroKernel = unsafe fn(
    k: usize,
    a: &[*const f32; MR_MAX],
    panels: Panels,
    c: *mut f32,
    ldc: usize,
    start: Start,
    relu: bool,
);

/// One instruction set's micro-kernels: `spans[s - 1][h - 1]` computes and stores the first
/// `h` of `mr` rows of a block of `s` adjacent panels (`16 s` columns). A set without edge
/// kernels holds only the full one (`spans[0] == [full]`), and its edge blocks go through a
/// scratch block; the widest span a product's columns allow is taken.
#[derive(Clone, Copy)]
struct KernelSet {
    mr: usize,
    /// Reduction block: the block's B micro-panels (`kc x 16` floats each) stay in L1.
    kc: usize,
    spans: &'static [&'static [MicroKernel]],
    /// Whether the kernels move their prefetch address by `Panels::ahead_step`.
    spread_ahead: bool,
}

impl KernelSet {
    fn of(isa: Isa) -> KernelSet {
        isa.assert_available();
        match isa {
            Isa::Portable => portable::KERNELS,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::KERNELS,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::KERNELS,
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no x86-64 instruction set is available off x86-64"),
        }
    }
}

/// Rows the micro-kernel of `isa` computes at once: row splits in multiples of it leave no
/// edge blocks but the last.
pub fn row_block(isa: Isa) -> usize {
    KernelSet::of(isa).mr
}

/// What C holds before a product is added to it.
#[derive(Clone, Copy)]
pub enum Init<'a> {
    Zero,
    /// Per column of B: must cover the product's columns.
    Bias(&'a [f32]),
    /// C's current values: a product accumulated onto an earlier one.
    Accumulate,
}

/// One product `C (init) += A[.., k] B[k, cols]`, then ReLU if asked.
///
/// Row `r` of A's slice starts at `a_row(r)` (see [`strided`] for evenly spaced rows): the
/// rows need not be evenly spaced, so a convolution can point them straight at the input
/// pixels of one tap (an implicit GEMM, with no im2col copy). `c` points at C's element
/// `(0, cols.start)`, rows `ldc` apart.
pub struct Product<'a, R> {
    pub rows: usize,
    pub a_row: R,
    pub b: &'a PackedB,
    /// The rows of B (the reduction) to multiply: all of them unless set.
    pub k: Range<usize>,
    /// The columns of B, and so of C; `cols.start` must be a multiple of [`NR`].
    pub cols: Range<usize>,
    pub c: *mut f32,
    pub ldc: usize,
    pub init: Init<'a>,
    pub relu: bool,
    /// The B of the product that follows (of the same shape): its first panels are asked
    /// for during this product's last ones, so that a chain of products (a Winograd task's,
    /// one per transform point) does not start each on a matrix in L3.
    pub then: Option<&'a PackedB>,
}

impl<'a, R: Fn(usize) -> *const f32> Product<'a, R> {
    /// `C = A B` over all of B's rows and columns, with no bias and no ReLU.
    pub fn new(rows: usize, a_row: R, b: &'a PackedB, c: *mut f32, ldc: usize) -> Self {
        Product {
            rows,
            a_row,
            b,
            k: 0..b.rows(),
            cols: 0..b.cols(),
            c,
            ldc,
            init: Init::Zero,
            relu: false,
            then: None,
        }
    }

    pub fn cols(self, cols: Range<usize>) -> Self {
        Product { cols, ..self }
    }

    pub fn k(self, k: Range<usize>) -> Self {
        Product { k, ..self }
    }

    pub fn init(self, init: Init<'a>) -> Self {
        Product { init, ..self }
    }

    /// Starts from `bias` (per column of B) rather than zero.
    pub fn bias(self, bias: &'a [f32]) -> Self {
        self.init(Init::Bias(bias))
    }

    pub fn relu(self, relu: bool) -> Self {
        Product { relu, ..self }
    }

    pub fn then(self, then: Option<&'a PackedB>) -> Self {
        Product { then, ..self }
    }
}

/// Rows of a row-major matrix at `a`, `lda` floats apart, for [`Product::a_row`].
pub fn strided(a: *const f32, lda: usize) -> impl Fn(usize) -> *const f32 {
    move |r| a.wrapping_add(r * lda)
}

/// Runs `product` with the micro-kernels of `isa`.
///
/// Panics if `isa` does not run on this machine, if `cols` does not start on a panel or
/// leaves B, if `k` leaves B, or if a bias is shorter than the columns: once per call.
///
/// # Safety
/// Each `a_row(r)`, for `r < rows`, must be valid for reads of `k.len()` values; `c` must be
/// valid for writes (and with [`Init::Accumulate`], reads) of `rows` rows at stride `ldc`
/// over `cols.len()` values, and no other thread may touch them meanwhile.
pub unsafe fn gemm<R: Fn(usize) -> *const f32>(isa: Isa, product: &Product<'_, R>) {
    let kernels = KernelSet::of(isa);
    let Product {
        rows,
        ref a_row,
        b,
        ref k,
        ref cols,
        c,
        ldc,
        init,
        relu,
        then,
    } = *product;
    let (k_range, cols) = (k.clone(), cols.clone());
    assert!(cols.start.is_multiple_of(NR) && cols.end <= b.n && k_range.end <= b.k);
    if let Init::Bias(bias) = init {
        assert!(bias.len() >= cols.end, "bias shorter than the columns");
    }
    if rows == 0 || cols.is_empty() {
        return;
    }
    let then = then
        .filter(|t| cols.start < t.cols() && t.rows() > 0)
        .map_or(std::ptr::null(), |t| t.panel_ptr(cols.start / NR, 0));
    let panels_end = cols.end.div_ceil(NR);
    let mut k0 = k_range.start;
    loop {
        let kc = kernels.kc.min(k_range.end - k0);
        let (first, last) = (k0 == k_range.start, k0 + kc == k_range.end);
        let offset = k0 - k_range.start;
        let mut panel = cols.start / NR;
        while panel < panels_end {
            let col = panel * NR;
            // As many whole panels at once as the machine has kernels for.
            let whole = (cols.end - col) / NR;
            let span = whole.clamp(1, kernels.spans.len());
            let set = kernels.spans[span - 1];
            let width = (span * NR).min(cols.end - col);
            let panel_b = b.panel_ptr(panel, k0);
            // What the row blocks ask for while they multiply these panels: the next panels,
            // or in the last ones the next reduction block's first, or the next product's.
            let next = if panel + span < panels_end {
                b.panel_ptr(panel + span, k0)
            } else if !last {
                b.panel_ptr(cols.start / NR, k0 + kc)
            } else if !then.is_null() {
                then
            } else if k_range.end < b.k {
                // A product over a stretch of B's rows (an implicit GEMM's tap) is followed
                // by one over the next stretch.
                b.panel_ptr(cols.start / NR, k_range.end)
            } else {
                panel_b
            };
            // A partial panel's bias is padded into a full one.
            let mut padded_bias = [0.0f32; NR];
            let start = match (first, init) {
                (false, _) | (true, Init::Accumulate) => Start::Accumulate,
                (true, Init::Zero) => Start::Zero,
                (true, Init::Bias(bias)) if width == span * NR => Start::Bias(bias[col..].as_ptr()),
                (true, Init::Bias(bias)) => {
                    padded_bias[..width].copy_from_slice(&bias[col..col + width]);
                    Start::Bias(padded_bias.as_ptr())
                }
            };
            let mr = kernels.mr;
            // The next panels are asked for over the first `spread` row blocks, a share each,
            // rather than all in the first: a product of few rows (a Winograd task's at
            // batch 1) otherwise leaves too little of a block's time to bring them from L3.
            // At most NR of them, so that each moves its address by at least a float a step.
            let spread = if kernels.spread_ahead {
                let blocks = rows.div_ceil(mr).min(NR);
                1 << blocks.ilog2()
            } else {
                1
            };
            for (row_block, r0) in (0..rows).step_by(mr).enumerate() {
                let height = mr.min(rows - r0);
                // Rows past the end repeat the last one; their results are not stored.
                let a_rows: [*const f32; MR_MAX] =
                    std::array::from_fn(|i| a_row(r0 + i.min(height - 1)).wrapping_add(offset));
                let c_block = c.wrapping_add(r0 * ldc + col - cols.start);
                let (ahead, ahead_step) = if row_block < spread {
                    (
                        next.wrapping_add(row_block * (kc / spread) * NR),
                        NR / spread,
                    )
                } else {
                    (panel_b, NR)
                };
                let panels = Panels {
                    b: panel_b,
                    next: ahead,
                    ahead_step,
                    stride: b.k * NR,
                };
                let relu = relu && last;
                if width == span * NR && (height == mr || set.len() == mr) {
                    let kernel = set[if set.len() == mr { height - 1 } else { 0 }];
                    // SAFETY: the caller's A rows cover k_range (so this block's kc values
                    // from `offset`) and C covers these rows and columns; the panels are
                    // inside B (asserted above); the kernel's set was checked by `of`.
                    unsafe { kernel(kc, &a_rows, panels, c_block, ldc, start, relu) };
                    continue;
                }
                // A partial panel goes through a full-size scratch block.
                let kernel = kernels.spans[0][kernels.spans[0].len() - 1];
                let mut block = [0.0f32; MR_MAX * NR];
                if let Start::Accumulate = start {
                    for i in 0..height {
                        // SAFETY: C's row i of this block holds `width` values; the scratch
                        // row holds NR >= width.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                c_block.add(i * ldc),
                                block[i * NR..].as_mut_ptr(),
                                width,
                            )
                        };
                    }
                }
                // SAFETY: as above, with C replaced by the scratch block of MR_MAX x NR.
                unsafe { kernel(kc, &a_rows, panels, block.as_mut_ptr(), NR, start, relu) };
                for i in 0..height {
                    // SAFETY: the caller's C covers `width` values of each of these rows.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            block[i * NR..].as_ptr(),
                            c_block.add(i * ldc),
                            width,
                        )
                    };
                }
            }
            panel += span;
        }
        k0 += kc;
        if last {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Every edge case of the blocking (partial rows, partial columns, pairs of panels and a
    /// last single one, several reduction blocks) against a plain f64 product, with every
    /// kernel set the machine runs.
    #[test]
    fn matches_a_plain_product() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut next = || rng.random_range(-0.5f32..0.5);
        for &(rows, k, n, lda_pad) in &[
            (1, 1, 1, 0),
            (7, 300, 40, 3),
            (12, 513, 32, 0),
            (5, 9, 17, 1),
            (13, 27, 48, 0),
            // Last blocks of 2, 3 and 4 rows.
            (8, 7, 33, 2),
            (9, 20, 16, 0),
            (16, 40, 32, 0),
            // Columns 48..100: three panels at once, then a partial one; a last row of 1.
            (25, 200, 100, 1),
            // Columns 80..160: three panels, then two; last row blocks of 6 (AVX-512) and
            // full ones (AVX2); two reduction blocks.
            (30, 400, 160, 0),
        ] {
            let lda = k + lda_pad;
            let a: Vec<f32> = (0..rows * lda).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let bias: Vec<f32> = (0..n).map(|_| next()).collect();
            let packed = PackedB::new(k, n, |r, j| b[r * n + j]);
            // The second half of the columns alone, as a thread's share would be.
            let first_col = (n / 2) / NR * NR;
            for (isa, relu) in Isa::available()
                .into_iter()
                .flat_map(|isa| [(isa, false), (isa, true)])
            {
                let mut c = vec![f32::NAN; rows * n];
                // In two halves of the reduction, as a convolution's taps are.
                let a_rest = |r: usize| a.as_ptr().wrapping_add(r * lda + k / 2);
                let out = c.as_mut_ptr().wrapping_add(first_col);
                let first_half = Product::new(rows, strided(a.as_ptr(), lda), &packed, out, n)
                    .k(0..k / 2)
                    .cols(first_col..n)
                    .bias(&bias);
                let second_half = Product::new(rows, a_rest, &packed, out, n)
                    .k(k / 2..k)
                    .cols(first_col..n)
                    .init(Init::Accumulate)
                    .relu(relu);
                // SAFETY: A has `rows` rows of lda >= k values (the second half's rows start
                // k / 2 in); C has `rows` rows of n values.
                unsafe {
                    gemm(isa, &first_half);
                    gemm(isa, &second_half);
                }
                for r in 0..rows {
                    for j in first_col..n {
                        let mut want = bias[j] as f64;
                        for p in 0..k {
                            want += a[r * lda + p] as f64 * b[p * n + j] as f64;
                        }
                        if relu {
                            want = want.max(0.0);
                        }
                        let got = c[r * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                            "{isa} rows {rows} k {k} n {n}: ({r}, {j}) {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
