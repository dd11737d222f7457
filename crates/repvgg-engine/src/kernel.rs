//! The engine's matrix product, `C = A B (+ bias) (then ReLU)`, written for the shapes a
//! convolution makes: A is row-major with any row stride and is read in place (im2col patches,
//! Winograd-transformed tiles), B is a weight matrix packed once at load.
//!
//! Each call of the micro-kernel keeps a block of C in registers and, for every k, broadcasts
//! one value from each of its A rows against the vectors of one row of B's panels: with
//! AVX-512, 8 rows x 48 columns (three 16-column panels) in 24 of the 32 ZMM registers; with
//! AVX2/FMA, 6 x 16 in twelve YMM registers. The reduction is cut into blocks so that the
//! block's B micro-panels stay in L1 while the A rows stream from L2. The kernels are chosen
//! at run time; other machines run the same loop in portable Rust.

/// Rows of C per micro-kernel call of the AVX2 and portable kernels.
const MR: usize = 6;
/// Columns of a B panel: one AVX-512 vector, two AVX ones.
pub const NR: usize = 16;
/// Reduction block: a B micro-panel of KC x NR floats is 16 KiB.
const KC: usize = 256;

/// A `k x n` matrix packed as `[panel][k][NR]`, each panel holding NR columns, the last
/// padded with zeros. The default is an empty matrix, to be filled with
/// [`PackedB::refill_rows`].
#[derive(Default)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs the matrix whose element (row, col) is `at(row, col)`.
    pub fn new(k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> PackedB {
        let mut packed = PackedB::default();
        packed.refill_rows(k, n, |row, cols, lanes| {
            for (lane, value) in lanes.iter_mut().enumerate() {
                *value = at(row, cols.start + lane);
            }
        });
        packed
    }

    /// Packs a new `k x n` matrix into this one's storage (so a loop that packs one slice of
    /// its operand after another allocates once), `fill(row, cols, lanes)` writing a panel's
    /// stretch of one row at a time (`lanes[i]` is column `cols.start + i`), so a caller whose
    /// rows are contiguous in memory can copy them.
    pub fn refill_rows(
        &mut self,
        k: usize,
        n: usize,
        fill: impl Fn(usize, std::ops::Range<usize>, &mut [f32]),
    ) {
        let panels = n.div_ceil(NR);
        (self.k, self.n) = (k, n);
        self.data.resize(panels * k * NR, 0.0);
        self.data.truncate(panels * k * NR);
        if k == 0 {
            return;
        }
        for (panel, block) in self.data.chunks_exact_mut(k * NR).enumerate() {
            let cols = panel * NR..(panel * NR + NR).min(n);
            let width = cols.len();
            for (row, lanes) in block.chunks_exact_mut(NR).enumerate() {
                fill(row, cols.clone(), &mut lanes[..width]);
                // Lanes past the last column are multiplied but never stored; zero keeps
                // them finite.
                lanes[width..].fill(0.0);
            }
        }
    }

    /// A `k x n` matrix of zeros, to be written panel row by panel row.
    pub fn zeros(k: usize, n: usize) -> PackedB {
        PackedB {
            k,
            n,
            data: vec![0.0; n.div_ceil(NR) * k * NR],
        }
    }

    /// Rows of the matrix (its `k`).
    pub fn rows(&self) -> usize {
        self.k
    }

    /// Columns of the matrix (its `n`).
    pub fn cols(&self) -> usize {
        self.n
    }

    /// Row `row` of panel `panel`: columns `panel * NR..` (zero past the last).
    pub fn panel_row(&self, panel: usize, row: usize) -> &[f32] {
        let at = (panel * self.k + row) * NR;
        &self.data[at..at + NR]
    }

    /// As [`PackedB::panel_row`], to write. Lanes past the last column must stay zero.
    pub fn panel_row_mut(&mut self, panel: usize, row: usize) -> &mut [f32] {
        let at = (panel * self.k + row) * NR;
        &mut self.data[at..at + NR]
    }
}

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
/// all: with one per panel, the 8 x 48 kernel's pointers outgrew the 16 general registers
/// and were reloaded from the stack every k step (151 against 171 GFLOP/s on operands in L1).
#[derive(Clone, Copy)]
struct Panels {
    b: *const f32,
    /// Only prefetched, never read: its k steps may run past the end of B (a shorter last
    /// reduction block, or the panels after the last), so the kernels offset it with
    /// `wrapping_add`.
    next: *const f32,
    /// Floats the prefetched address moves per k step: NR (a line per step), or less when
    /// several row blocks share the asking (see `gemm_with`).
    ahead_step: usize,
    stride: usize,
}

/// The most rows a micro-kernel computes at once (the AVX-512 kernels').
const MR_MAX: usize = 8;

type MicroKernel = unsafe fn(
    k: usize,
    a: &[*const f32; MR_MAX],
    panels: Panels,
    c: *mut f32,
    ldc: usize,
    Start,
    bool,
);

/// The machine's micro-kernels: `spans[s - 1][h - 1]` computes and stores the first `h` of
/// `mr` rows of a block of `s` adjacent panels (`16 s` columns). A set without edge kernels
/// holds only the full one (`spans[0] == [full]`), and its edge blocks go through a scratch
/// block; the widest span a product's columns allow is taken.
#[derive(Clone, Copy)]
struct Kernels {
    mr: usize,
    /// Reduction block: the block's B micro-panels (`kc x 16` floats each) stay in L1.
    kc: usize,
    spans: &'static [&'static [MicroKernel]],
    /// Whether the kernels move their prefetch address by `Panels::ahead_step`.
    spread_ahead: bool,
}

const PORTABLE: Kernels = Kernels {
    mr: MR,
    kc: KC,
    spans: &[&[portable_kernel]],
    spread_ahead: false,
};

#[cfg(target_arch = "x86_64")]
const AVX2: Kernels = Kernels {
    mr: MR,
    kc: KC,
    spans: &[&[
        avx2::edge_kernel::<1>,
        avx2::edge_kernel::<2>,
        avx2::edge_kernel::<3>,
        avx2::edge_kernel::<4>,
        avx2::edge_kernel::<5>,
        avx2::kernel,
    ]],
    spread_ahead: false,
};

/// `avx512::kernel::<h, SPAN>` for h = 1, 2, ...
#[cfg(target_arch = "x86_64")]
macro_rules! avx512_rows {
    ($span:literal; $($h:literal)*) => {
        &[$(avx512::kernel::<$h, $span>),*]
    };
}

/// Eight rows against up to three panels: 24 of the 32 ZMM registers hold an 8 x 48 block,
/// and each k step loads 3 B vectors and 8 broadcasts for 24 FMAs.
#[cfg(target_arch = "x86_64")]
const AVX512: Kernels = Kernels {
    mr: MR_MAX,
    kc: KC_AVX512,
    spans: &[
        avx512_rows!(1; 1 2 3 4 5 6 7 8),
        avx512_rows!(2; 1 2 3 4 5 6 7 8),
        avx512_rows!(3; 1 2 3 4 5 6 7 8),
    ],
    spread_ahead: true,
};

/// Reduction block of the AVX-512 kernels: a 192-channel tap or Winograd point in one block.
/// Its three micro-panels then fill up to a 48 KiB L1 and partly come from L2, but splitting
/// the reduction costs more: 154 GFLOP/s at 256 against 138 at 128 on a 192^3 product.
const KC_AVX512: usize = 256;

/// Rows the machine's micro-kernel computes at once: row splits in multiples of it leave no
/// edge blocks but the last.
pub fn row_block() -> usize {
    micro_kernel().mr
}

/// The fastest kernels this machine runs: AVX-512, AVX2/FMA, or portable Rust.
fn micro_kernel() -> Kernels {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return AVX512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return AVX2;
        }
    }
    PORTABLE
}

/// `C[r][j] = bias[j] + sum_p A[r][p] B[p][j]` for rows `0..rows` and columns `cols` of B,
/// then ReLU if asked.
///
/// `cols.start` must be a multiple of [`NR`]; `c` points at C's element (0, `cols.start`).
/// `bias`, when given, is indexed by B's column and must cover `cols`.
///
/// # Safety
/// `a` must be valid for `rows` rows of `b`'s k values at row stride `lda`; `c` must be valid
/// for writes of `rows` rows at row stride `ldc` over B's columns `cols`, and no other thread
/// may touch them meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    rows: usize,
    a: *const f32,
    lda: usize,
    b: &PackedB,
    cols: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    bias: Option<&[f32]>,
    relu: bool,
) {
    let init = bias.map_or(Init::Zero, Init::Bias);
    let a_row = |r: usize| unsafe { a.add(r * lda) };
    unsafe { gemm_rows(rows, a_row, b, 0..b.k, cols, c, ldc, init, relu) }
}

/// As [`gemm`] with no bias or ReLU, asking during its last panels for the first ones of
/// `then`, the B of the product that follows (of the same shape): a Winograd task's products,
/// one per transform point, each start on a matrix that is in L3.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_then(
    rows: usize,
    a: *const f32,
    lda: usize,
    b: &PackedB,
    cols: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    then: Option<&PackedB>,
) {
    let a_row = |r: usize| unsafe { a.add(r * lda) };
    let then = then
        .filter(|t| cols.start < t.cols() && t.rows() > 0)
        .map_or(std::ptr::null(), |t| {
            t.panel_row(cols.start / NR, 0).as_ptr()
        });
    unsafe {
        gemm_with(
            micro_kernel(),
            rows,
            a_row,
            b,
            0..b.k,
            cols,
            c,
            ldc,
            Init::Zero,
            false,
            then,
        )
    }
}

/// What C holds before a product is added to it.
#[derive(Clone, Copy)]
pub enum Init<'a> {
    Zero,
    /// Per column of B.
    Bias(&'a [f32]),
    /// C's current values: a product accumulated onto an earlier one.
    Accumulate,
}

/// `C (init) += A[.., k_range] B[k_range, cols]`, where row r of A's slice starts at
/// `a_row(r)`: the rows need not be evenly spaced, so a convolution can point them straight at
/// the input pixels of one tap (an implicit GEMM, with no im2col copy).
///
/// # Safety
/// As [`gemm`], with each `a_row(r)` valid for `k_range.len()` values.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows(
    rows: usize,
    a_row: impl Fn(usize) -> *const f32,
    b: &PackedB,
    k_range: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    init: Init<'_>,
    relu: bool,
) {
    unsafe {
        gemm_with(
            micro_kernel(),
            rows,
            a_row,
            b,
            k_range,
            cols,
            c,
            ldc,
            init,
            relu,
            std::ptr::null(),
        )
    }
}

/// The product; `then`, when not null, is where the next product's B starts (see
/// [`gemm_then`]).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_with(
    kernels: Kernels,
    rows: usize,
    a_row: impl Fn(usize) -> *const f32,
    b: &PackedB,
    k_range: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    init: Init<'_>,
    relu: bool,
    then: *const f32,
) {
    // Once per call, against a full product: cheap enough to keep in release builds.
    assert!(cols.start.is_multiple_of(NR) && cols.end <= b.n && k_range.end <= b.k);
    if let Init::Bias(bias) = init {
        assert!(bias.len() >= cols.end, "bias shorter than the columns");
    }
    let k = b.k;
    if rows == 0 || cols.is_empty() {
        return;
    }
    let panels_end = cols.end.div_ceil(NR);
    let mut k0 = k_range.start;
    loop {
        let kc = kernels.kc.min(k_range.end - k0);
        let (first, last) = (k0 == k_range.start, k0 + kc == k_range.end);
        let offset = k0 - k_range.start;
        let panel_at =
            |panel: usize, row: usize| unsafe { b.data.as_ptr().add((panel * k + row) * NR) };
        let mut panel = cols.start / NR;
        while panel < panels_end {
            let col = panel * NR;
            // As many whole panels at once as the machine has kernels for.
            let whole = (cols.end - col) / NR;
            let span = whole.clamp(1, kernels.spans.len());
            let set = kernels.spans[span - 1];
            let width = (span * NR).min(cols.end - col);
            let panel_b = panel_at(panel, k0);
            // What the row blocks ask for while they multiply these panels: the next panels,
            // the next reduction block's first, or the next product's.
            let next = if panel + span < panels_end {
                panel_at(panel + span, k0)
            } else if !last {
                panel_at(cols.start / NR, k0 + kc)
            } else if !then.is_null() {
                then
            } else if k_range.end < k {
                // A product over a stretch of B's rows (an implicit GEMM's tap) is followed
                // by one over the next stretch.
                panel_at(cols.start / NR, k_range.end)
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
            // rather than all in the first: a product of few rows (25, a Winograd task's at
            // batch 1) otherwise leaves a quarter of a block's time to bring 36 KiB from L3.
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
                    std::array::from_fn(|i| unsafe { a_row(r0 + i.min(height - 1)).add(offset) });
                let c_block = unsafe { c.add(r0 * ldc + col - cols.start) };
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
                    stride: k * NR,
                };
                let relu = relu && last;
                if width == span * NR && (height == mr || set.len() == mr) {
                    let kernel = set[if set.len() == mr { height - 1 } else { 0 }];
                    unsafe { kernel(kc, &a_rows, panels, c_block, ldc, start, relu) };
                    continue;
                }
                // A partial panel goes through a full-size scratch block.
                let kernel = kernels.spans[0][kernels.spans[0].len() - 1];
                let mut block = [0.0f32; MR_MAX * NR];
                if let Start::Accumulate = start {
                    for i in 0..height {
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                c_block.add(i * ldc),
                                block[i * NR..].as_mut_ptr(),
                                width,
                            )
                        };
                    }
                }
                unsafe { kernel(kc, &a_rows, panels, block.as_mut_ptr(), NR, start, relu) };
                for i in 0..height {
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

/// The micro-kernel in plain Rust, for machines without AVX2/FMA.
unsafe fn portable_kernel(
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
                row.copy_from_slice(unsafe { std::slice::from_raw_parts(bias, NR) })
            }
            Start::Accumulate => {
                row.copy_from_slice(unsafe { std::slice::from_raw_parts(c.add(i * ldc), NR) })
            }
        }
    }
    for p in 0..k {
        let b_row = unsafe { std::slice::from_raw_parts(b.add(p * NR), NR) };
        for (i, row) in acc.iter_mut().enumerate() {
            let a_value = unsafe { *a[i].add(p) };
            for (value, &b_value) in row.iter_mut().zip(b_row) {
                // Not `mul_add`: without FMA hardware that is a slow library call.
                *value += a_value * b_value;
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let out = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), NR) };
        for (o, &v) in out.iter_mut().zip(row) {
            *o = if relu { v.max(0.0) } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{MR, MR_MAX, NR, Panels, Start};

    /// `H` rows of 16 accumulators' start: zero, the bias, or C's current values. (Inlined
    /// into the `avx2` kernels, so it compiles with their features.)
    #[inline(always)]
    unsafe fn start_rows<const H: usize>(
        start: Start,
        c: *const f32,
        ldc: usize,
    ) -> [[__m256; 2]; H] {
        // Plain loops: a closure here (`array::from_fn`) need not inline, and outside the
        // kernel's `target_feature` the intrinsics become calls.
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
    unsafe fn store_rows<const H: usize>(
        acc: &[[__m256; 2]; H],
        c: *mut f32,
        ldc: usize,
        relu: bool,
    ) {
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

    /// Twelve accumulators (6 rows x 2 vectors), two B vectors and one broadcast: 15 of the
    /// 16 AVX registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel(
        k: usize,
        a: &[*const f32; MR_MAX],
        Panels { b, next, .. }: Panels,
        c: *mut f32,
        ldc: usize,
        start: Start,
        relu: bool,
    ) {
        unsafe {
            let mut acc = start_rows::<MR>(start, c, ldc);
            for p in 0..k {
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(p * NR) as *const i8);
                fma_rows(&mut acc, a, b.add(p * NR), p);
            }
            store_rows(&acc, c, ldc, relu);
        }
    }

    /// The kernel for the last `H < MR` rows of a product, so an edge block does only its own
    /// rows' work (49 rows, a 7x7 map's, would otherwise cost 9 full blocks for 8.2).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn edge_kernel<const H: usize>(
        k: usize,
        a: &[*const f32; MR_MAX],
        Panels { b, next, .. }: Panels,
        c: *mut f32,
        ldc: usize,
        start: Start,
        relu: bool,
    ) {
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
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{MR_MAX, NR, Panels, Start};

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
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Every kernel set this machine runs (portable, AVX2, AVX-512).
    fn available_kernels() -> Vec<Kernels> {
        let mut sets = vec![PORTABLE];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                sets.push(AVX2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                sets.push(AVX512);
            }
        }
        sets
    }

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
            let kernels = available_kernels();
            // The second half of the columns alone, as a thread's share would be.
            let first_col = (n / 2) / NR * NR;
            for (kernel, relu) in kernels.into_iter().flat_map(|k| [(k, false), (k, true)]) {
                let mut c = vec![f32::NAN; rows * n];
                // In two halves of the reduction, as a convolution's taps are.
                let a_row = |r: usize| unsafe { a.as_ptr().add(r * lda) };
                let a_rest = |r: usize| unsafe { a.as_ptr().add(r * lda + k / 2) };
                unsafe {
                    gemm_with(
                        kernel,
                        rows,
                        a_row,
                        &packed,
                        0..k / 2,
                        first_col..n,
                        c.as_mut_ptr().add(first_col),
                        n,
                        Init::Bias(&bias),
                        false,
                        std::ptr::null(),
                    );
                    gemm_with(
                        kernel,
                        rows,
                        a_rest,
                        &packed,
                        k / 2..k,
                        first_col..n,
                        c.as_mut_ptr().add(first_col),
                        n,
                        Init::Accumulate,
                        relu,
                        std::ptr::null(),
                    );
                };
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
                            "rows {rows} k {k} n {n}: ({r}, {j}) {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
