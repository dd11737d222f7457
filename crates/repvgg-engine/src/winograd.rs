//! Winograd F(m x m, 3x3) for 3x3 convolutions. At stride 1 an m x m output tile costs
//! `(m + 2)^2` multiplications per channel pair instead of `9 m^2`: 2.25x fewer for F(2x2),
//! 4x fewer for F(4x4); stride 2 has F(2x2) by phases, below.
//!
//! ```text
//! U = G g G^T        per filter, once at load, in f64 then rounded once
//! V = B^T d B        per (m+2) x (m+2) input tile and channel
//! M = sum_c U .* V   one matrix product over channels per transform point
//! y = A^T M A + bias per m x m output tile and channel
//! ```
//!
//! A stride-2 layer splits into its input's four phases (even/odd rows x even/odd columns),
//! each a stride-1 convolution with 2x2, 2x1, 1x2 or 1x1 of the taps. Along one axis, two
//! outputs from five inputs `x0..x4` (taps `g0 g1 g2`) take F(2,2) on the even phase and plain
//! products on the odd one, five multiplications instead of six:
//!
//! ```text
//! B^T x = [x0 - x2, x2, x4 - x2, x1, x3]    G g = [g0, g0 + g2, g2, g1, g1]
//! y0 = m0 + m1 + m3                         y1 = m1 + m2 + m4
//! ```
//!
//! so a 2x2 output tile costs 25 multiplications per channel pair instead of 36 (1.44x fewer),
//! with additions only.
//!
//! An F(4x4) layer whose side leaves 1 or 2 outputs past its last whole tile (14x14, stage 3
//! of every variant at 224) finishes that side with F(2x2) tiles ([`Rim`]) on F(4x4)'s own
//! transformed filters: a 14x14 map costs 484 products per channel pair instead of 16 padded
//! tiles' 576.
//!
//! F(2x2) only adds, subtracts and halves, so it rounds like a direct convolution. F(4x4) uses
//! the points 0, +-1, +-2 (Lavin & Gray 2016); its transforms scale by up to 8 and cost about
//! 2-4x F(2x2)'s rounding error, still well inside 1e-5 of the fp64 reference over a whole
//! network (see the engine's fixture and variant tests).

use std::cell::RefCell;
use std::mem::MaybeUninit;

use crate::kernel::{self, NR, PackedB};

/// Which Winograd transform a layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// F(2x2, 3x3): 4x4 input tiles.
    F2 = 0,
    /// F(4x4, 3x3): 6x6 input tiles.
    F4 = 1,
    /// F(2x2, 3x3) at stride 2, by phases: 5x5 input tiles, 25 points.
    Stride2F2 = 2,
}

impl Tile {
    /// Output tile side.
    pub fn m(self) -> usize {
        match self {
            Tile::F2 | Tile::Stride2F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// The convolution's stride.
    pub fn stride(self) -> usize {
        match self {
            Tile::F2 | Tile::F4 => 1,
            Tile::Stride2F2 => 2,
        }
    }

    /// Transform points: the input tile's side (`stride (m - 1) + 3`), squared.
    pub fn points(self) -> usize {
        let side = self.stride() * (self.m() - 1) + 3;
        side * side
    }
}

const F2_G: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];
const F4_G: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
/// `G` for stride 2: the even phase's F(2,2) filter transform `[g0, g0 + g2, g2]`, then the
/// odd phase's single tap, once per output.
const STRIDE2_F2_G: [[f64; 3]; 5] = [
    [1.0, 0.0, 0.0],
    [1.0, 0.0, 1.0],
    [0.0, 0.0, 1.0],
    [0.0, 1.0, 0.0],
    [0.0, 1.0, 0.0],
];
/// The 1-D transforms that, applied to every column and then every row of a tile, make
/// `B^T d B` and `A^T M A`. Written out rather than as matrix products, so that the zero and
/// unit coefficients cost nothing.
trait Transform<const M: usize, const A: usize> {
    /// The convolution's stride: tiles start `STRIDE * M` input pixels apart.
    const STRIDE: usize = 1;
    /// Where each point sits in the layer's row of points: its own index, but for [`Rim`].
    const PLACES: [usize; A];
    /// `B^T x`
    fn input<V: Vector>(x: [V; A]) -> [V; A];
    /// `A^T m`
    fn output<V: Vector>(m: [V; A]) -> [V; M];
}

struct F2;
struct F4;
struct Stride2F2;

impl Transform<2, 4> for F2 {
    const PLACES: [usize; 4] = [0, 1, 2, 3];
    #[inline(always)]
    fn input<V: Vector>([x0, x1, x2, x3]: [V; 4]) -> [V; 4] {
        [x0.sub(x2), x1.add(x2), x2.sub(x1), x1.sub(x3)]
    }
    #[inline(always)]
    fn output<V: Vector>([m0, m1, m2, m3]: [V; 4]) -> [V; 2] {
        [m0.add(m1).add(m2), m1.sub(m2).sub(m3)]
    }
}

impl Transform<4, 6> for F4 {
    const PLACES: [usize; 6] = [0, 1, 2, 3, 4, 5];
    #[inline(always)]
    fn input<V: Vector>([x0, x1, x2, x3, x4, x5]: [V; 6]) -> [V; 6] {
        let (four, five, two) = (V::splat(4.0), V::splat(5.0), V::splat(2.0));
        [
            x4.add(x0.mul(four)).sub(x2.mul(five)),
            x3.add(x4).sub(x1.add(x2).mul(four)),
            x4.sub(x3).add(x1.sub(x2).mul(four)),
            x4.sub(x2).add(x3.sub(x1).mul(two)),
            x4.sub(x2).add(x1.sub(x3).mul(two)),
            x5.add(x1.mul(four)).sub(x3.mul(five)),
        ]
    }
    #[inline(always)]
    fn output<V: Vector>([m0, m1, m2, m3, m4, m5]: [V; 6]) -> [V; 4] {
        let (sum12, diff12) = (m1.add(m2), m1.sub(m2));
        let (sum34, diff34) = (m3.add(m4), m3.sub(m4));
        [
            m0.add(sum12).add(sum34),
            diff12.add(diff34.mul(V::splat(2.0))),
            sum12.add(sum34.mul(V::splat(4.0))),
            diff12.add(diff34.mul(V::splat(8.0))).add(m5),
        ]
    }
}

impl Transform<2, 5> for Stride2F2 {
    const STRIDE: usize = 2;
    const PLACES: [usize; 5] = [0, 1, 2, 3, 4];
    #[inline(always)]
    fn input<V: Vector>([x0, x1, x2, x3, x4]: [V; 5]) -> [V; 5] {
        [x0.sub(x2), x2, x4.sub(x2), x1, x3]
    }
    #[inline(always)]
    fn output<V: Vector>([m0, m1, m2, m3, m4]: [V; 5]) -> [V; 2] {
        [m0.add(m1).add(m3), m1.add(m2).add(m4)]
    }
}

/// F(2,3) inside an F(4,3) layer, for the last 1 or 2 outputs of a side. F(2,3)'s filter
/// transform is F(4,3)'s at the points 0, 1, -1 and infinity, row by row scaled:
/// `G2 = diag(4, -3, -3, 1) G4[[0, 1, 2, 5]]`. So with the input transform scaled by the same
/// factors, `B2'^T = diag(4, -3, -3, 1) B2^T`, the products use the layer's F(4x4) filters at
/// those places and no second set is stored.
struct Rim;

impl Transform<2, 4> for Rim {
    const PLACES: [usize; 4] = [0, 1, 2, 5];
    #[inline(always)]
    fn input<V: Vector>(x: [V; 4]) -> [V; 4] {
        let [v0, v1, v2, v3] = F2::input(x);
        let (four, minus_three) = (V::splat(4.0), V::splat(-3.0));
        [v0.mul(four), v1.mul(minus_three), v2.mul(minus_three), v3]
    }
    #[inline(always)]
    fn output<V: Vector>(m: [V; 4]) -> [V; 2] {
        F2::output(m)
    }
}

/// Channels per vector step of the portable and AVX transforms.
const LANES: usize = 8;

/// Channels operated on together: an AVX-512 or AVX register, or a plain array elsewhere.
trait Vector: Copy {
    /// Channels per vector.
    const LANES: usize;
    fn zero() -> Self;
    fn splat(x: f32) -> Self;
    /// The first `min(Self::LANES, src.len())` values, zeros after.
    fn load(src: &[f32]) -> Self;
    /// Writes the first `min(Self::LANES, dst.len())` values.
    fn store(self, dst: &mut [f32]);
    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    fn relu(self) -> Self;
}

#[derive(Clone, Copy)]
struct Portable([f32; LANES]);

impl Vector for Portable {
    const LANES: usize = LANES;
    fn zero() -> Self {
        Portable([0.0; LANES])
    }
    fn splat(x: f32) -> Self {
        Portable([x; LANES])
    }
    fn load(src: &[f32]) -> Self {
        let mut v = [0.0; LANES];
        let n = src.len().min(LANES);
        v[..n].copy_from_slice(&src[..n]);
        Portable(v)
    }
    fn store(self, dst: &mut [f32]) {
        let n = dst.len().min(LANES);
        dst[..n].copy_from_slice(&self.0[..n]);
    }
    fn add(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] + o.0[i]))
    }
    fn sub(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] - o.0[i]))
    }
    fn mul(self, o: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] * o.0[i]))
    }
    fn relu(self) -> Self {
        Portable(self.0.map(|x| x.max(0.0)))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{LANES, Vector};

    /// Only made inside functions compiled with AVX2 enabled, on machines that have it.
    #[derive(Clone, Copy)]
    pub(super) struct Avx(__m256);

    impl Vector for Avx {
        const LANES: usize = LANES;
        #[inline(always)]
        fn zero() -> Self {
            unsafe { Avx(_mm256_setzero_ps()) }
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { Avx(_mm256_set1_ps(x)) }
        }
        #[inline(always)]
        fn load(src: &[f32]) -> Self {
            if src.len() >= LANES {
                unsafe { Avx(_mm256_loadu_ps(src.as_ptr())) }
            } else {
                let mut v = [0.0f32; LANES];
                v[..src.len()].copy_from_slice(src);
                unsafe { Avx(_mm256_loadu_ps(v.as_ptr())) }
            }
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            if dst.len() >= LANES {
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), self.0) }
            } else {
                let mut v = [0.0f32; LANES];
                unsafe { _mm256_storeu_ps(v.as_mut_ptr(), self.0) };
                let n = dst.len();
                dst.copy_from_slice(&v[..n]);
            }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Avx(_mm256_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { Avx(_mm256_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { Avx(_mm256_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn relu(self) -> Self {
            unsafe { Avx(_mm256_max_ps(self.0, _mm256_setzero_ps())) }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Vector;

    /// Only made inside functions compiled with AVX-512 enabled, on machines that have it.
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    /// The first `n` (at most 16) lanes.
    #[inline(always)]
    fn mask(n: usize) -> __mmask16 {
        if n >= 16 { !0 } else { (1u16 << n) - 1 }
    }

    impl Vector for Avx512 {
        const LANES: usize = 16;
        #[inline(always)]
        fn zero() -> Self {
            unsafe { Avx512(_mm512_setzero_ps()) }
        }
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { Avx512(_mm512_set1_ps(x)) }
        }
        #[inline(always)]
        fn load(src: &[f32]) -> Self {
            if src.len() >= 16 {
                unsafe { Avx512(_mm512_loadu_ps(src.as_ptr())) }
            } else {
                // SAFETY: the mask reads only the slice's values.
                unsafe { Avx512(_mm512_maskz_loadu_ps(mask(src.len()), src.as_ptr())) }
            }
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            if dst.len() >= 16 {
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), self.0) }
            } else {
                // SAFETY: the mask writes only the slice's values.
                unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask(dst.len()), self.0) }
            }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        fn relu(self) -> Self {
            unsafe { Avx512(_mm512_max_ps(self.0, _mm512_setzero_ps())) }
        }
    }
}

/// Output tiles per task: enough rows for the products to run at full speed.
const TILES_PER_TASK: usize = 128;
/// Output tiles per task when the threads share a layer: smaller tasks balance better, and at
/// batch 1 a 14x14 map's 49 tiles are split between the threads rather than its output
/// channels (A0 at batch 1 measured 4-17% faster than with 128, in four alternated runs).
const SHARED_TILES_PER_TASK: usize = 32;
/// Fewer tiles than this per task leave the products too few rows to run at full speed.
pub const MIN_TILES_PER_TASK: usize = 32;
/// Bytes of transformed tiles, over all transform points, a task may hold (its ring has one
/// point's slot more): bounds the scratch of wide layers.
const SCRATCH_BYTES: usize = 8 << 20;

/// Tiles per task for a layer: [`TILES_PER_TASK`] (or [`SHARED_TILES_PER_TASK`] when the
/// layer is `shared` between threads), fewer for very wide layers.
///
/// A task reads all of the group's transformed filters U once and keeps its tiles' V and M,
/// so fewer tiles per task re-read U more often while more spill V and M out of L2. Taking
/// about as many tiles as U has bytes per tile of V (that is, `min(cin_g, cout_g)` tiles)
/// balances the two: A0 at batch 4 on one thread, 48 channels: 48 tiles 12% faster than 128;
/// 192 channels: 128 tiles 15-20% faster than 32.
pub fn tiles_per_task(tile: Tile, cin_g: usize, cout_g: usize, shared: bool) -> usize {
    let per_tile = tile.points() * cin_g.max(cout_g) * 4;
    let most = if shared {
        SHARED_TILES_PER_TASK
    } else {
        TILES_PER_TASK.min(cin_g.min(cout_g))
    };
    (SCRATCH_BYTES / per_tile).min(most).max(MIN_TILES_PER_TASK)
}

/// A stride of at least `len` floats that is an odd number of cache lines, so that the points
/// a transform reads or writes together fall in different cache sets: at a multiple of 4 KiB
/// every point of a tile lands in the same L1 set.
fn skewed(len: usize) -> usize {
    let lines = len.div_ceil(16);
    16 * (lines | 1)
}

/// Per-thread scratch, grown to the largest layer once and then reused.
#[derive(Default)]
struct Scratch {
    /// The transformed tiles, V and M, in the slots of [`tiles_with`]'s ring.
    ring: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `U = G g G^T` for every (input channel, output channel) of each group, as one packed
/// `(cin_g, cout_g)` matrix per group and transform point: `[group * points + point]`.
/// `weights` are the layer's packed 3x3 filters, one `(9 cin_g, cout_g)` matrix per group with
/// row `tap * cin_g + c`, as [`PackedB`] holds them for the direct products.
pub fn transform_filters(tile: Tile, weights: &[PackedB]) -> Vec<PackedB> {
    match tile {
        Tile::F2 => filters(&F2_G, weights),
        Tile::F4 => filters(&F4_G, weights),
        Tile::Stride2F2 => filters(&STRIDE2_F2_G, weights),
    }
}

/// `U = G (g G^T)` for one input channel and a panel of 16 output channels at a time: the
/// filters are read once, in the order they are stored, and each point's matrix is written
/// row by row. In `f64`, rounded once at the end.
fn filters<const A: usize>(g: &[[f64; 3]; A], weights: &[PackedB]) -> Vec<PackedB> {
    let mut out = Vec::with_capacity(weights.len() * A * A);
    for packed in weights {
        let (cin_g, cout_g) = (packed.rows() / 9, packed.cols());
        let mut u: Vec<PackedB> = (0..A * A).map(|_| PackedB::zeros(cin_g, cout_g)).collect();
        for panel in 0..cout_g.div_ceil(NR) {
            for c in 0..cin_g {
                // g G^T, entry (a, j) = sum_b g[a][b] G[j][b], for each of the panel's lanes.
                let mut right = [[[0.0f64; NR]; A]; 3];
                for (a, right_row) in right.iter_mut().enumerate() {
                    for b in 0..3 {
                        let filter = packed.panel_row(panel, (a * 3 + b) * cin_g + c);
                        for (sum, g_row) in right_row.iter_mut().zip(g) {
                            for (s, &w) in sum.iter_mut().zip(filter) {
                                *s += g_row[b] * w as f64;
                            }
                        }
                    }
                }
                // G (g G^T), entry (i, j) = sum_a G[i][a] (g G^T)[a][j].
                for (i, g_row) in g.iter().enumerate() {
                    for j in 0..A {
                        let mut sum = [0.0f64; NR];
                        for (a, right_row) in right.iter().enumerate() {
                            for (s, &r) in sum.iter_mut().zip(&right_row[j]) {
                                *s += g_row[a] * r;
                            }
                        }
                        let lanes = u[i * A + j].panel_row_mut(panel, c);
                        for (lane, s) in lanes.iter_mut().zip(sum) {
                            *lane = s as f32;
                        }
                    }
                }
            }
        }
        out.extend(u);
    }
    out
}

/// Parameters of one pad-1 layer (stride as its tile says).
pub struct Layer<'a> {
    pub tile: Tile,
    pub u: &'a [PackedB],
    pub bias: &'a [f32],
    pub cin: usize,
    pub cout: usize,
    pub groups: usize,
    pub relu: bool,
}

/// One task: a run of tiles, in one group, for some of its output channels.
pub struct Task<'a> {
    /// `(n, h, w, cin)`
    pub input: &'a [f32],
    pub h: usize,
    pub w: usize,
    /// Over the whole batch, row-major over the output map's tiles.
    pub first_tile: usize,
    pub count: usize,
    pub group: usize,
    /// Output channels within the group; starts at a multiple of [`kernel::NR`].
    pub cols: std::ops::Range<usize>,
    /// `(n, oh, ow, cout)`
    pub out: *mut f32,
}

/// Computes the task's output tiles.
///
/// # Safety
/// `task.out` must point to an `(n, oh, ow, cout)` buffer, and no other thread may write the
/// output positions of these tiles in these channels.
pub unsafe fn tiles(layer: &Layer<'_>, task: &Task<'_>) {
    // The buffers leave the thread-local while in use, so that the hot loops are not inside a
    // closure (which would not be compiled with the AVX2 function's target features).
    let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 is present; the caller upholds the rest.
        unsafe {
            match layer.tile {
                Tile::F2 => tiles_avx512::<2, 4, F2>(layer, task, &mut scratch),
                Tile::F4 => tiles_avx512::<4, 6, F4>(layer, task, &mut scratch),
                Tile::Stride2F2 => tiles_avx512::<2, 5, Stride2F2>(layer, task, &mut scratch),
            }
        }
        SCRATCH.with(|s| *s.borrow_mut() = scratch);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; the caller upholds the rest.
        unsafe {
            match layer.tile {
                Tile::F2 => tiles_avx2::<2, 4, F2>(layer, task, &mut scratch),
                Tile::F4 => tiles_avx2::<4, 6, F4>(layer, task, &mut scratch),
                Tile::Stride2F2 => tiles_avx2::<2, 5, Stride2F2>(layer, task, &mut scratch),
            }
        }
        SCRATCH.with(|s| *s.borrow_mut() = scratch);
        return;
    }
    unsafe {
        match layer.tile {
            Tile::F2 => tiles_with::<2, 4, F2, Portable>(layer, task, &mut scratch),
            Tile::F4 => tiles_with::<4, 6, F4, Portable>(layer, task, &mut scratch),
            Tile::Stride2F2 => tiles_with::<2, 5, Stride2F2, Portable>(layer, task, &mut scratch),
        }
    }
    SCRATCH.with(|s| *s.borrow_mut() = scratch);
}

/// The same code with AVX vectors, compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tiles_avx2<const M: usize, const A: usize, T: Transform<M, A>>(
    layer: &Layer<'_>,
    task: &Task<'_>,
    scratch: &mut Scratch,
) {
    unsafe { tiles_with::<M, A, T, avx::Avx>(layer, task, scratch) }
}

/// The same code with AVX-512 vectors, sixteen channels a step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tiles_avx512<const M: usize, const A: usize, T: Transform<M, A>>(
    layer: &Layer<'_>,
    task: &Task<'_>,
    scratch: &mut Scratch,
) {
    unsafe { tiles_with::<M, A, T, avx512::Avx512>(layer, task, scratch) }
}

/// Reads a fully written tile of possibly-uninitialised vectors.
///
/// # Safety
/// Every element must have been written.
#[inline(always)]
unsafe fn assume_init<V: Vector, const R: usize, const C: usize>(
    tile: &[[MaybeUninit<V>; C]; R],
) -> [[V; C]; R] {
    // SAFETY: `MaybeUninit<V>` has `V`'s layout, and the caller wrote every element.
    unsafe { std::ptr::read(tile as *const [[MaybeUninit<V>; C]; R] as *const [[V; C]; R]) }
}

/// Applies a 1-D transform to every column of a tile (`down`, along the map's height), then
/// `across` to every row of the result.
///
/// Plain loops on purpose: `array::map` and `from_fn` call closures out of line, where the
/// AVX intrinsics would not be compiled for AVX and each would become a function call.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn two_d<V: Vector, const R: usize, const C: usize, const R2: usize, const C2: usize>(
    tile: &[[V; C]; R],
    down: fn([V; R]) -> [V; R2],
    across: fn([V; C]) -> [V; C2],
) -> [[V; C2]; R2] {
    let mut columns = [[V::zero(); C]; R2];
    for s in 0..C {
        let mut column = [V::zero(); R];
        for r in 0..R {
            column[r] = tile[r][s];
        }
        let column = down(column);
        for i in 0..R2 {
            columns[i][s] = column[i];
        }
    }
    let mut out = [[V::zero(); C2]; R2];
    for i in 0..R2 {
        out[i] = across(columns[i]);
    }
    out
}

/// How one side of the output map is cut into tiles: `main` tiles of the layer's transform,
/// then, for F(4x4) on a side that leaves 1 or 2 outputs, one F(2x2) tile (the `rim`) instead
/// of a padded F(4x4) one: a 14-pixel side costs 3 x 6 + 4 transform points, not 4 x 6.
#[derive(Clone, Copy)]
struct Cut {
    main: usize,
    rim: bool,
}

impl Cut {
    fn new(tile: Tile, side: usize) -> Cut {
        match tile {
            Tile::F4 if matches!(side % 4, 1 | 2) => Cut {
                main: side / 4,
                rim: true,
            },
            _ => Cut {
                main: side.div_ceil(tile.m()),
                rim: false,
            },
        }
    }

    fn tiles(self) -> usize {
        self.main + self.rim as usize
    }
}

/// Output tiles of a call with `n` images and an `oh x ow` output map: what [`Task`]s count.
pub fn tile_count(tile: Tile, n: usize, oh: usize, ow: usize) -> usize {
    n * Cut::new(tile, oh).tiles() * Cut::new(tile, ow).tiles()
}

/// A layer's tiles, numbered class by class (main rows and columns; the rim row; the rim
/// column; the corner), each image by image, so that the tiles that use a transform point
/// make at most two runs of rows for its product.
struct Tiling {
    /// `(first tile, tiles, rim row, rim column)`
    classes: [(usize, usize, bool, bool); 4],
    /// Tiles of each class per image, along y and x.
    sides: [(usize, usize); 4],
    y: Cut,
    x: Cut,
}

impl Tiling {
    fn new(tile: Tile, n: usize, oh: usize, ow: usize) -> Tiling {
        let (y, x) = (Cut::new(tile, oh), Cut::new(tile, ow));
        let (ry, rx) = (y.rim as usize, x.rim as usize);
        let sides = [(y.main, x.main), (ry, x.main), (y.main, rx), (ry, rx)];
        let mut first = 0;
        let classes = std::array::from_fn(|i| {
            let count = n * sides[i].0 * sides[i].1;
            first += count;
            (first - count, count, i % 2 == 1, i >= 2)
        });
        Tiling {
            classes,
            sides,
            y,
            x,
        }
    }

    /// `(class, image, first output row, first output column)` of tile `t`.
    fn locate(&self, t: usize, m: usize) -> (usize, usize, usize, usize) {
        let class = self.classes.iter().rposition(|c| c.0 <= t && c.1 > 0);
        let class = class.expect("tile numbers start at 0");
        let (first, _, rim_y, rim_x) = self.classes[class];
        let (tiles_y, tiles_x) = self.sides[class];
        let i = t - first;
        let image = i / (tiles_y * tiles_x);
        let (ty, tx) = ((i / tiles_x) % tiles_y, i % tiles_x);
        let y0 = if rim_y { m * self.y.main } else { m * ty };
        let x0 = if rim_x { m * self.x.main } else { m * tx };
        (class, image, y0, x0)
    }
}

/// What one tile's transforms need to know of the layer and the task.
struct Site<'a> {
    input: &'a [f32],
    h: usize,
    w: usize,
    cin: usize,
    /// First input channel of the group.
    c_first: usize,
    cin_g: usize,
    image: usize,
    y0: usize,
    x0: usize,
}

/// `V[point] = (B^T d B)[point]` for one tile, a vector of channels at a time, each point stored at
/// its place in the layer's `GRID x GRID` points (`tile_v[place * point_stride + c]`).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn input_tile<
    V: Vector,
    const GRID: usize,
    const MY: usize,
    const AY: usize,
    TY: Transform<MY, AY>,
    const MX: usize,
    const AX: usize,
    TX: Transform<MX, AX>,
>(
    site: &Site<'_>,
    tile_v: &mut [f32],
    point_stride: usize,
) {
    let Site {
        input,
        h,
        w,
        cin,
        c_first,
        cin_g,
        image,
        y0,
        x0,
    } = *site;
    // Offsets of the tile's input pixels, None in the padding.
    let pixel: [[Option<usize>; AX]; AY] = std::array::from_fn(|r| {
        std::array::from_fn(|s| {
            let (iy, ix) = (
                (TY::STRIDE * y0 + r) as isize - 1,
                (TX::STRIDE * x0 + s) as isize - 1,
            );
            let inside = iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w;
            inside.then(|| ((image * h + iy as usize) * w + ix as usize) * cin + c_first)
        })
    });
    for c0 in (0..cin_g).step_by(V::LANES) {
        let end = (c0 + V::LANES).min(cin_g);
        // Every element is written below; starting from zeros would cost a `memset` of the
        // whole tile per step.
        let mut d = [[MaybeUninit::<V>::uninit(); AX]; AY];
        for r in 0..AY {
            for s in 0..AX {
                d[r][s].write(match pixel[r][s] {
                    Some(at) => V::load(&input[at + c0..at + end]),
                    None => V::zero(),
                });
            }
        }
        // SAFETY: all AY x AX elements were written just above.
        let d = unsafe { assume_init(&d) };
        let transformed = two_d(&d, TY::input::<V>, TX::input::<V>);
        for (i, row) in transformed.iter().enumerate() {
            for (j, value) in row.iter().enumerate() {
                let at = (TY::PLACES[i] * GRID + TX::PLACES[j]) * point_stride;
                value.store(&mut tile_v[at + c0..at + end]);
            }
        }
    }
}

/// What one tile's output transform writes to.
struct Sink<'a> {
    /// `(n, oh, ow, cout)`
    out: *mut f32,
    oh: usize,
    ow: usize,
    cout: usize,
    /// Output channel of the task's first column.
    k_first: usize,
    /// The task's biases.
    bias: &'a [f32],
    relu: bool,
}

/// `y = A^T M A + bias` (then ReLU) for one tile, written where inside the map.
///
/// # Safety
/// `sink.out` must be valid for the map, and this tile's outputs in these channels this
/// task's alone.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn output_tile<
    V: Vector,
    const GRID: usize,
    const MY: usize,
    const AY: usize,
    TY: Transform<MY, AY>,
    const MX: usize,
    const AX: usize,
    TX: Transform<MX, AX>,
>(
    sink: &Sink<'_>,
    tile_m: &[f32],
    point_stride: usize,
    (image, y0, x0): (usize, usize, usize),
) {
    let Sink {
        out,
        oh,
        ow,
        cout,
        k_first,
        bias,
        relu,
    } = *sink;
    let ncols = bias.len();
    for k0 in (0..ncols).step_by(V::LANES) {
        let end = (k0 + V::LANES).min(ncols);
        let mut mt = [[MaybeUninit::<V>::uninit(); AX]; AY];
        for r in 0..AY {
            for s in 0..AX {
                let at = (TY::PLACES[r] * GRID + TX::PLACES[s]) * point_stride;
                mt[r][s].write(V::load(&tile_m[at + k0..at + end]));
            }
        }
        // SAFETY: all AY x AX elements were written just above.
        let mt = unsafe { assume_init(&mt) };
        let b = V::load(&bias[k0..end]);
        let y = two_d(&mt, TY::output::<V>, TX::output::<V>);
        for (dy, row) in y.iter().enumerate() {
            let oy = y0 + dy;
            if oy >= oh {
                break;
            }
            for (dx, &value) in row.iter().enumerate() {
                let ox = x0 + dx;
                if ox >= ow {
                    break;
                }
                let value = value.add(b);
                let value = if relu { value.relu() } else { value };
                // SAFETY: inside the map, in this task's channels: this task's alone.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out.add(((image * oh + oy) * ow + ox) * cout + k_first + k0),
                        end - k0,
                    )
                };
                value.store(dst);
            }
        }
    }
}

// Index loops over tile coordinates, as in the formulas.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn tiles_with<const M: usize, const A: usize, T: Transform<M, A>, V: Vector>(
    layer: &Layer<'_>,
    task: &Task<'_>,
    scratch: &mut Scratch,
) {
    let Layer {
        tile,
        u,
        bias,
        cin,
        cout,
        groups,
        relu,
    } = *layer;
    let Task {
        input,
        h,
        w,
        first_tile,
        count,
        group,
        ref cols,
        out,
    } = *task;
    let (col0, ncols) = (cols.start, cols.len());
    let Scratch { ring } = scratch;
    let (cin_g, cout_g) = (cin / groups, cout / groups);
    let points = A * A;
    let (oh, ow) = ((h - 1) / T::STRIDE + 1, (w - 1) / T::STRIDE + 1);
    let tiling = Tiling::new(tile, input.len() / (h * w * cin), oh, ow);
    // The rim tiles' places index F(4x4)'s 6x6 grid of points; `Cut` gives rims to no other.
    debug_assert!(A == 6 || !(tiling.y.rim || tiling.x.rim));
    // Point-major, in one ring of `points + 1` slots: slot s holds one point's rows for every
    // tile of the task (row t at `t * row`). V[p] goes to slot p + 1; the product for point p
    // writes M[p] to slot p, whose V[p - 1] is dead by then. So V and M together take little
    // more than V alone (1.8 MB for 64 F(4x4) tiles at 192 channels, within a 2 MiB L2), and
    // each product reads and writes one contiguous block.
    let row = cin_g.max(ncols);
    let slot = skewed(count * row);
    if ring.len() < (points + 1) * slot {
        ring.resize((points + 1) * slot, 0.0);
    }
    // Input transform. A class other than 0 exists only for F(4x4) (whose grid holds the rim's
    // places), so the rim variants below never run with another transform.
    for t in 0..count {
        let (class, image, y0, x0) = tiling.locate(first_tile + t, M);
        let site = Site {
            input,
            h,
            w,
            cin,
            c_first: group * cin_g,
            cin_g,
            image,
            y0,
            x0,
        };
        let tile_v = &mut ring[slot + t * row..];
        unsafe {
            match class {
                0 => input_tile::<V, A, M, A, T, M, A, T>(&site, tile_v, slot),
                1 => input_tile::<V, A, 2, 4, Rim, M, A, T>(&site, tile_v, slot),
                2 => input_tile::<V, A, M, A, T, 2, 4, Rim>(&site, tile_v, slot),
                _ => input_tile::<V, A, 2, 4, Rim, 2, 4, Rim>(&site, tile_v, slot),
            }
        }
    }

    // M[.][point] = V[.][point] (tiles x cin_g) * U[point] (cin_g x this task's columns), over
    // the runs of the task's tiles whose transforms have this point.
    let task_tiles = first_tile..first_tile + count;
    // The product reads one slot and writes another: both through this one pointer.
    let slots = ring.as_mut_ptr();
    for point in 0..points {
        let (py, px) = (point / A, point % A);
        let mut runs = [0..0, 0..0];
        let mut last = 0;
        for &(first, tiles, rim_y, rim_x) in &tiling.classes {
            let uses =
                (!rim_y || Rim::PLACES.contains(&py)) && (!rim_x || Rim::PLACES.contains(&px));
            let start = first.max(task_tiles.start);
            let end = (first + tiles).min(task_tiles.end);
            if !uses || start >= end {
                continue;
            }
            let run = start - first_tile..end - first_tile;
            if runs[last].end == run.start {
                runs[last].end = run.end;
            } else if runs[last].is_empty() {
                runs[last] = run;
            } else {
                last += 1;
                runs[last] = run;
            }
        }
        for run in runs.into_iter().filter(|run| !run.is_empty()) {
            // SAFETY: slots point + 1 (V) and point (M) hold `count` rows of `row` values.
            unsafe {
                kernel::gemm_then(
                    run.len(),
                    slots.add((point + 1) * slot + run.start * row),
                    row,
                    &u[group * points + point],
                    cols.clone(),
                    slots.add(point * slot + run.start * row),
                    row,
                    u.get(group * points + point + 1)
                        .filter(|_| point + 1 < points),
                );
            }
        }
    }

    // Output transform: y = A^T M A + bias, then ReLU, written where inside the map.
    let sink = Sink {
        out,
        oh,
        ow,
        cout,
        k_first: group * cout_g + col0,
        bias: &bias[group * cout_g + col0..group * cout_g + col0 + ncols],
        relu,
    };
    for t in 0..count {
        let (class, image, y0, x0) = tiling.locate(first_tile + t, M);
        let tile_m = &ring[t * row..];
        let at = (image, y0, x0);
        // SAFETY: tasks own disjoint (tiles, channels) blocks of the output.
        unsafe {
            match class {
                0 => output_tile::<V, A, M, A, T, M, A, T>(&sink, tile_m, slot, at),
                1 => output_tile::<V, A, 2, 4, Rim, M, A, T>(&sink, tile_m, slot, at),
                2 => output_tile::<V, A, M, A, T, 2, 4, Rim>(&sink, tile_m, slot, at),
                _ => output_tile::<V, A, 2, 4, Rim, 2, 4, Rim>(&sink, tile_m, slot, at),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The vector kinds this machine runs.
    fn available_vectors() -> Vec<&'static str> {
        let mut kinds = vec!["portable"];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                kinds.push("avx2");
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                kinds.push("avx512");
            }
        }
        kinds
    }

    /// [`tiles`] with the vectors named, whatever the machine's best.
    unsafe fn tiles_on(vectors: &str, layer: &Layer<'_>, task: &Task<'_>, scratch: &mut Scratch) {
        unsafe {
            match (vectors, layer.tile) {
                ("portable", Tile::F2) => tiles_with::<2, 4, F2, Portable>(layer, task, scratch),
                ("portable", Tile::F4) => tiles_with::<4, 6, F4, Portable>(layer, task, scratch),
                ("portable", Tile::Stride2F2) => {
                    tiles_with::<2, 5, Stride2F2, Portable>(layer, task, scratch)
                }
                #[cfg(target_arch = "x86_64")]
                ("avx2", Tile::F2) => tiles_avx2::<2, 4, F2>(layer, task, scratch),
                #[cfg(target_arch = "x86_64")]
                ("avx2", Tile::F4) => tiles_avx2::<4, 6, F4>(layer, task, scratch),
                #[cfg(target_arch = "x86_64")]
                ("avx2", Tile::Stride2F2) => tiles_avx2::<2, 5, Stride2F2>(layer, task, scratch),
                #[cfg(target_arch = "x86_64")]
                ("avx512", Tile::F2) => tiles_avx512::<2, 4, F2>(layer, task, scratch),
                #[cfg(target_arch = "x86_64")]
                ("avx512", Tile::F4) => tiles_avx512::<4, 6, F4>(layer, task, scratch),
                #[cfg(target_arch = "x86_64")]
                ("avx512", Tile::Stride2F2) => {
                    tiles_avx512::<2, 5, Stride2F2>(layer, task, scratch)
                }
                _ => unreachable!("no {vectors} vectors here"),
            }
        }
    }

    /// Every transform, with every vector kind the machine runs, against a direct f64
    /// convolution at its stride: odd map sizes (partial tiles), channel counts that are not
    /// multiples of 8 (partial lanes), groups, and a column split. Tolerance 1e-5 of the
    /// output's largest magnitude: F(4x4)'s transforms scale values by up to 8 before rounding.
    #[test]
    fn matches_a_direct_convolution() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut next = || rng.random_range(-0.5f32..0.5);
        let shapes = [
            (2, 7, 9, 12, 20, 1),
            (1, 10, 6, 16, 32, 2),
            (1, 12, 11, 8, 16, 1),
            (2, 14, 8, 8, 16, 1),
            (1, 2, 3, 8, 16, 1),
        ];
        for &(n, h, w, cin, cout, groups) in &shapes {
            let (cin_g, cout_g) = (cin / groups, cout / groups);
            let weight: Vec<f32> = (0..cout * cin_g * 9).map(|_| next()).collect();
            let bias: Vec<f32> = (0..cout).map(|_| next()).collect();
            let input: Vec<f32> = (0..n * h * w * cin).map(|_| next()).collect();
            for tile in [Tile::F2, Tile::F4, Tile::Stride2F2] {
                let stride = tile.stride();
                let (oh, ow) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
                let mut want = vec![0.0f64; n * oh * ow * cout];
                for (i, value) in want.iter_mut().enumerate() {
                    let o = i % cout;
                    let (image, y, x) = (
                        i / (oh * ow * cout),
                        (i / (ow * cout)) % oh,
                        (i / cout) % ow,
                    );
                    let group = o / cout_g;
                    let mut sum = bias[o] as f64;
                    for c in 0..cin_g {
                        for tap in 0..9 {
                            let iy = (y * stride + tap / 3) as isize - 1;
                            let ix = (x * stride + tap % 3) as isize - 1;
                            if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                continue;
                            }
                            let at = ((image * h + iy as usize) * w + ix as usize) * cin;
                            sum += input[at + group * cin_g + c] as f64
                                * weight[(o * cin_g + c) * 9 + tap] as f64;
                        }
                    }
                    *value = sum;
                }
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let packed: Vec<PackedB> = (0..groups)
                    .map(|group| {
                        PackedB::new(9 * cin_g, cout_g, |row, oc| {
                            let (tap, c) = (row / cin_g, row % cin_g);
                            weight[((group * cout_g + oc) * cin_g + c) * 9 + tap]
                        })
                    })
                    .collect();
                let u = transform_filters(tile, &packed);
                let layer = Layer {
                    tile,
                    u: &u,
                    bias: &bias,
                    cin,
                    cout,
                    groups,
                    relu: false,
                };
                let total = tile_count(tile, n, oh, ow);
                for &vectors in &available_vectors() {
                    let mut out = vec![f32::NAN; n * oh * ow * cout];
                    let mut scratch = Scratch::default();
                    for group in 0..groups {
                        // Two column blocks and two runs of tiles, as threads would share them.
                        for cols in [0..16.min(cout_g), 16.min(cout_g)..cout_g] {
                            for (first, count) in [(0, total / 2), (total / 2, total - total / 2)] {
                                let task = Task {
                                    input: &input,
                                    h,
                                    w,
                                    first_tile: first,
                                    count,
                                    group,
                                    cols: cols.clone(),
                                    out: out.as_mut_ptr(),
                                };
                                unsafe { tiles_on(vectors, &layer, &task, &mut scratch) };
                            }
                        }
                    }
                    let err = out
                        .iter()
                        .zip(&want)
                        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
                    assert!(
                        err < 1e-5 * scale,
                        "{tile:?} {vectors} groups={groups}: {err:e} of {scale}"
                    );
                }
            }
        }
    }
}
