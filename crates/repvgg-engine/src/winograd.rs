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
//! F(2x2) only adds, subtracts and halves, so it rounds like a direct convolution. F(4x4) uses
//! the points 0, +-1, +-2 (Lavin & Gray 2016); its transforms scale by up to 8 and cost about
//! 2-4x F(2x2)'s rounding error, still well inside 1e-5 of the fp64 reference over a whole
//! network (see the engine's fixture and variant tests).

use std::cell::RefCell;
use std::mem::MaybeUninit;

use crate::kernel::{self, PackedB};

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
    /// `B^T x`
    fn input<V: Vector>(x: [V; A]) -> [V; A];
    /// `A^T m`
    fn output<V: Vector>(m: [V; A]) -> [V; M];
}

struct F2;
struct F4;
struct Stride2F2;

impl Transform<2, 4> for F2 {
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
    #[inline(always)]
    fn input<V: Vector>([x0, x1, x2, x3, x4]: [V; 5]) -> [V; 5] {
        [x0.sub(x2), x2, x4.sub(x2), x1, x3]
    }
    #[inline(always)]
    fn output<V: Vector>([m0, m1, m2, m3, m4]: [V; 5]) -> [V; 2] {
        [m0.add(m1).add(m3), m1.add(m2).add(m4)]
    }
}

/// Channels per vector step of the transforms.
const LANES: usize = 8;

/// Eight channels operated on together: an AVX register, or a plain array elsewhere.
trait Vector: Copy {
    fn zero() -> Self;
    fn splat(x: f32) -> Self;
    /// The first `min(LANES, src.len())` values, zeros after.
    fn load(src: &[f32]) -> Self;
    /// Writes the first `min(LANES, dst.len())` values.
    fn store(self, dst: &mut [f32]);
    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    fn relu(self) -> Self;
}

#[derive(Clone, Copy)]
struct Portable([f32; LANES]);

impl Vector for Portable {
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

/// Output tiles per task: enough rows for the products to run at full speed.
const TILES_PER_TASK: usize = 128;
/// Output tiles per task when the threads share a layer: smaller tasks balance better, and at
/// batch 1 a 14x14 map's 49 tiles are split between the threads rather than its output
/// channels (A0 at batch 1 measured 4-17% faster than with 128, in four alternated runs).
const SHARED_TILES_PER_TASK: usize = 32;
/// Fewer tiles than this per task leave the products too few rows to run at full speed.
pub const MIN_TILES_PER_TASK: usize = 32;
/// Bytes of transformed tiles (V, or M) a task may hold: bounds the scratch of wide layers.
const SCRATCH_BYTES: usize = 8 << 20;

/// Tiles per task for a layer: [`TILES_PER_TASK`] (or [`SHARED_TILES_PER_TASK`] when the
/// layer is `shared` between threads), fewer for very wide layers.
pub fn tiles_per_task(tile: Tile, cin_g: usize, cout_g: usize, shared: bool) -> usize {
    let per_tile = tile.points() * cin_g.max(cout_g) * 4;
    let most = if shared {
        SHARED_TILES_PER_TASK
    } else {
        TILES_PER_TASK
    };
    (SCRATCH_BYTES / per_tile).clamp(MIN_TILES_PER_TASK, most)
}

/// Per-thread scratch, grown to the largest layer once and then reused.
#[derive(Default)]
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `U = G g G^T` for every (input channel, output channel) of each group, as one packed
/// `(cin_g, cout_g)` matrix per group and transform point: `[group * points + point]`.
pub fn transform_filters(
    tile: Tile,
    weight: &[f32],
    cout: usize,
    cin_g: usize,
    groups: usize,
) -> Vec<PackedB> {
    match tile {
        Tile::F2 => filters(&F2_G, weight, cout, cin_g, groups),
        Tile::F4 => filters(&F4_G, weight, cout, cin_g, groups),
        Tile::Stride2F2 => filters(&STRIDE2_F2_G, weight, cout, cin_g, groups),
    }
}

fn filters<const A: usize>(
    g: &[[f64; 3]; A],
    weight: &[f32],
    cout: usize,
    cin_g: usize,
    groups: usize,
) -> Vec<PackedB> {
    let cout_g = cout / groups;
    let points = A * A;
    // u[group][point][c][k]
    let mut u = vec![0.0f32; groups * points * cin_g * cout_g];
    for o in 0..cout {
        let (group, k) = (o / cout_g, o % cout_g);
        for c in 0..cin_g {
            let w = &weight[(o * cin_g + c) * 9..(o * cin_g + c + 1) * 9];
            // G w G^T, entry (i, j) = sum_{a,b} G[i][a] w[a][b] G[j][b]
            for i in 0..A {
                for j in 0..A {
                    let mut sum = 0.0f64;
                    for a in 0..3 {
                        for b in 0..3 {
                            sum += g[i][a] * w[a * 3 + b] as f64 * g[j][b];
                        }
                    }
                    u[((group * points + i * A + j) * cin_g + c) * cout_g + k] = sum as f32;
                }
            }
        }
    }
    (0..groups * points)
        .map(|matrix| {
            let at = |c: usize, k: usize| u[(matrix * cin_g + c) * cout_g + k];
            PackedB::new(cin_g, cout_g, at)
        })
        .collect()
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

/// Reads a fully written tile of possibly-uninitialised vectors.
///
/// # Safety
/// Every element must have been written.
#[inline(always)]
unsafe fn assume_init<V: Vector, const A: usize>(tile: &[[MaybeUninit<V>; A]; A]) -> [[V; A]; A] {
    // SAFETY: `MaybeUninit<V>` has `V`'s layout, and the caller wrote every element.
    unsafe { std::ptr::read(tile as *const [[MaybeUninit<V>; A]; A] as *const [[V; A]; A]) }
}

/// Applies a 1-D transform to every column of a tile, then to every row of the result.
///
/// Plain loops on purpose: `array::map` and `from_fn` call closures out of line, where the
/// AVX intrinsics would not be compiled for AVX and each would become a function call.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn two_d<V: Vector, const R: usize, const C: usize>(
    tile: &[[V; C]; C],
    f: fn([V; C]) -> [V; R],
) -> [[V; R]; R] {
    let mut columns = [[V::zero(); C]; R];
    for s in 0..C {
        let mut column = [V::zero(); C];
        for r in 0..C {
            column[r] = tile[r][s];
        }
        let column = f(column);
        for i in 0..R {
            columns[i][s] = column[i];
        }
    }
    let mut out = [[V::zero(); R]; R];
    for i in 0..R {
        out[i] = f(columns[i]);
    }
    out
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
        u,
        bias,
        cin,
        cout,
        groups,
        relu,
        ..
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
    let Scratch { v, m } = scratch;
    let (cin_g, cout_g) = (cin / groups, cout / groups);
    let points = A * A;
    let (oh, ow) = ((h - 1) / T::STRIDE + 1, (w - 1) / T::STRIDE + 1);
    let (tiles_y, tiles_x) = (oh.div_ceil(M), ow.div_ceil(M));
    // (image, first output row, first output column) of a tile.
    let locate = |t: usize| {
        let tile = first_tile + t;
        let image = tile / (tiles_y * tiles_x);
        let (ty, tx) = ((tile / tiles_x) % tiles_y, tile % tiles_x);
        (image, M * ty, M * tx)
    };
    // Tile-major layouts, V[t][point][c] and M[t][point][k], so that each transform reads and
    // writes one contiguous block per tile; the products read and write them at a row stride.
    let (row_v, row_m) = (points * cin_g, points * ncols);
    if v.len() < count * row_v {
        v.resize(count * row_v, 0.0);
    }
    if m.len() < count * row_m {
        m.resize(count * row_m, 0.0);
    }

    // Input transform: V[t][point][c] = (B^T d B)[point], LANES channels at a time.
    for t in 0..count {
        let (image, y0, x0) = locate(t);
        let tile_v = &mut v[t * row_v..(t + 1) * row_v];
        // Offsets of the tile's input pixels, None in the padding.
        let pixel: [[Option<usize>; A]; A] = std::array::from_fn(|r| {
            std::array::from_fn(|s| {
                let (iy, ix) = (
                    (T::STRIDE * y0 + r) as isize - 1,
                    (T::STRIDE * x0 + s) as isize - 1,
                );
                let inside = iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w;
                inside.then(|| ((image * h + iy as usize) * w + ix as usize) * cin + group * cin_g)
            })
        });
        for c0 in (0..cin_g).step_by(LANES) {
            let end = (c0 + LANES).min(cin_g);
            // Every element is written below; starting from zeros would cost a `memset` of
            // the whole tile per step.
            let mut d = [[MaybeUninit::<V>::uninit(); A]; A];
            for r in 0..A {
                for s in 0..A {
                    d[r][s].write(match pixel[r][s] {
                        Some(at) => V::load(&input[at + c0..at + end]),
                        None => V::zero(),
                    });
                }
            }
            // SAFETY: all A x A elements were written just above.
            let d = unsafe { assume_init(&d) };
            let transformed = two_d(&d, T::input);
            for (point, value) in transformed.iter().flatten().enumerate() {
                value.store(&mut tile_v[point * cin_g + c0..point * cin_g + end]);
            }
        }
    }

    // M[.][point] = V[.][point] (count x cin_g) * U[point] (cin_g x this task's columns).
    for point in 0..points {
        // SAFETY: V and M hold `count` rows of `points` blocks of cin_g and ncols values.
        unsafe {
            kernel::gemm(
                count,
                v.as_ptr().add(point * cin_g),
                row_v,
                &u[group * points + point],
                cols.clone(),
                m.as_mut_ptr().add(point * ncols),
                row_m,
                None,
                false,
            );
        }
    }

    // Output transform: y = A^T M A + bias, then ReLU, written where inside the map.
    let bias = &bias[group * cout_g + col0..group * cout_g + col0 + ncols];
    for t in 0..count {
        let (image, y0, x0) = locate(t);
        let tile_m = &m[t * row_m..(t + 1) * row_m];
        for k0 in (0..ncols).step_by(LANES) {
            let end = (k0 + LANES).min(ncols);
            let mut mt = [[MaybeUninit::<V>::uninit(); A]; A];
            for r in 0..A {
                for s in 0..A {
                    let at = (r * A + s) * ncols;
                    mt[r][s].write(V::load(&tile_m[at + k0..at + end]));
                }
            }
            // SAFETY: all A x A elements were written just above.
            let mt = unsafe { assume_init(&mt) };
            let b = V::load(&bias[k0..end]);
            let y = two_d(&mt, T::output);
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
                    // SAFETY: inside the map, in this group's channels: this task's alone.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out.add(
                                ((image * oh + oy) * ow + ox) * cout + group * cout_g + col0 + k0,
                            ),
                            end - k0,
                        )
                    };
                    value.store(dst);
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

    /// Every transform, with both the AVX and the portable vectors, against a direct f64
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
                let u = transform_filters(tile, &weight, cout, cin_g, groups);
                let layer = Layer {
                    tile,
                    u: &u,
                    bias: &bias,
                    cin,
                    cout,
                    groups,
                    relu: false,
                };
                let total = n * oh.div_ceil(tile.m()) * ow.div_ceil(tile.m());
                for portable in [false, true] {
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
                                unsafe {
                                    match (tile, portable) {
                                        (Tile::F2, true) => tiles_with::<2, 4, F2, Portable>(
                                            &layer,
                                            &task,
                                            &mut scratch,
                                        ),
                                        (Tile::F4, true) => tiles_with::<4, 6, F4, Portable>(
                                            &layer,
                                            &task,
                                            &mut scratch,
                                        ),
                                        (Tile::Stride2F2, true) => {
                                            tiles_with::<2, 5, Stride2F2, Portable>(
                                                &layer,
                                                &task,
                                                &mut scratch,
                                            )
                                        }
                                        _ => tiles(&layer, &task),
                                    }
                                }
                            }
                        }
                    }
                    let err = out
                        .iter()
                        .zip(&want)
                        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
                    assert!(
                        err < 1e-5 * scale,
                        "{tile:?} portable={portable} groups={groups}: {err:e} of {scale}"
                    );
                }
            }
        }
    }
}
