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
//! of every variant at 224) finishes that side with F(2x2) tiles (`Rim`) on F(4x4)'s own
//! transformed filters: a 14x14 map costs 484 products per channel pair instead of 16 padded
//! tiles' 576.
//!
//! F(2x2) only adds, subtracts and halves, so it rounds like a direct convolution. F(4x4) uses
//! the points 0, +-1, +-2 (Lavin & Gray 2016); its transforms scale by up to 8 and cost about
//! 2-4x F(2x2)'s rounding error, still well inside 1e-5 of the fp64 reference over a whole
//! network (see the engine's fixture and variant tests).

mod tiles;
mod tiling;

pub use tiles::{Layer, Task, run};
pub use tiling::tile_count;

use crate::gemm::{NR, PackedB};
use crate::simd::Vector;

/// Which Winograd algorithm F(m x m, 3x3) a layer uses (an output tile is m x m).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// F(2x2, 3x3): 4x4 input tiles.
    F2 = 0,
    /// F(4x4, 3x3): 6x6 input tiles.
    F4 = 1,
    /// F(2x2, 3x3) at stride 2, by phases: 5x5 input tiles, 25 points.
    Stride2F2 = 2,
}

impl Algorithm {
    /// Every algorithm, indexed by its discriminant.
    pub const ALL: [Algorithm; 3] = [Algorithm::F2, Algorithm::F4, Algorithm::Stride2F2];

    /// Output tile side.
    pub fn m(self) -> usize {
        match self {
            Algorithm::F2 | Algorithm::Stride2F2 => 2,
            Algorithm::F4 => 4,
        }
    }

    /// The convolution's stride.
    pub fn stride(self) -> usize {
        match self {
            Algorithm::F2 | Algorithm::F4 => 1,
            Algorithm::Stride2F2 => 2,
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

/// `U = G g G^T` for every (input channel, output channel) of each group, as one packed
/// `(cin_g, cout_g)` matrix per group and transform point: `[group * points + point]`.
/// `weights` are the layer's packed 3x3 filters, one `(9 cin_g, cout_g)` matrix per group with
/// row `tap * cin_g + c`, as [`PackedB`] holds them for the direct products.
pub fn transform_filters(algorithm: Algorithm, weights: &[PackedB]) -> Vec<PackedB> {
    match algorithm {
        Algorithm::F2 => filters(&F2_G, weights),
        Algorithm::F4 => filters(&F4_G, weights),
        Algorithm::Stride2F2 => filters(&STRIDE2_F2_G, weights),
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
