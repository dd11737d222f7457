//! Running a task: a run of output tiles through the input transform, one product per
//! transform point, and the output transform.

use std::mem::MaybeUninit;

use super::tiling::Tiling;
use super::{Algorithm, F2, F4, Rim, Stride2F2, Transform};
use crate::Isa;
use crate::gemm::{self, PackedB, Product, strided};
use crate::simd::{Portable, Vector};
#[cfg(target_arch = "x86_64")]
use crate::simd::{avx::Avx, avx512::Avx512};

/// Parameters of one pad-1 layer (stride as its tile says).
pub struct Layer<'a> {
    pub algorithm: Algorithm,
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
    /// Output channels within the group; starts at a multiple of [`crate::gemm::NR`].
    pub cols: std::ops::Range<usize>,
    /// `(n, oh, ow, cout)`
    pub out: *mut f32,
}

/// Computes the task's output tiles with the vectors and micro-kernels of `isa`. `ring` is
/// the caller's scratch for the transformed tiles: grown as needed and kept, so that a thread
/// that runs task after task allocates once.
///
/// Panics if `isa` does not run on this machine.
///
/// # Safety
/// `task.out` must point to an `(n, oh, ow, cout)` buffer, and no other thread may write the
/// output positions of these tiles in these channels.
pub unsafe fn run(isa: Isa, layer: &Layer<'_>, task: &Task<'_>, ring: &mut Vec<f32>) {
    isa.assert_available();
    // SAFETY: the instruction set was checked just above; the caller upholds the rest.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => match layer.algorithm {
                Algorithm::F2 => tiles_avx512::<2, 4, F2>(layer, task, ring),
                Algorithm::F4 => tiles_avx512::<4, 6, F4>(layer, task, ring),
                Algorithm::Stride2F2 => tiles_avx512::<2, 5, Stride2F2>(layer, task, ring),
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => match layer.algorithm {
                Algorithm::F2 => tiles_avx2::<2, 4, F2>(layer, task, ring),
                Algorithm::F4 => tiles_avx2::<4, 6, F4>(layer, task, ring),
                Algorithm::Stride2F2 => tiles_avx2::<2, 5, Stride2F2>(layer, task, ring),
            },
            _ => match layer.algorithm {
                Algorithm::F2 => tiles_with::<2, 4, F2, Portable>(isa, layer, task, ring),
                Algorithm::F4 => tiles_with::<4, 6, F4, Portable>(isa, layer, task, ring),
                Algorithm::Stride2F2 => {
                    tiles_with::<2, 5, Stride2F2, Portable>(isa, layer, task, ring)
                }
            },
        }
    }
}

/// The same code with AVX vectors, compiled for AVX2 (its products on the AVX2 kernels).
///
/// # Safety
/// As [`run`], on a machine with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tiles_avx2<const M: usize, const A: usize, T: Transform<M, A>>(
    layer: &Layer<'_>,
    task: &Task<'_>,
    ring: &mut Vec<f32>,
) {
    // SAFETY: as this function's.
    unsafe { tiles_with::<M, A, T, Avx>(Isa::Avx2, layer, task, ring) }
}

/// The same code with AVX-512 vectors, sixteen channels a step.
///
/// # Safety
/// As [`run`], on a machine with AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tiles_avx512<const M: usize, const A: usize, T: Transform<M, A>>(
    layer: &Layer<'_>,
    task: &Task<'_>,
    ring: &mut Vec<f32>,
) {
    // SAFETY: as this function's.
    unsafe { tiles_with::<M, A, T, Avx512>(Isa::Avx512, layer, task, ring) }
}

/// A stride of at least `len` floats that is an odd number of cache lines, so that the points
/// a transform reads or writes together fall in different cache sets: at a multiple of 4 KiB
/// every point of a tile lands in the same L1 set.
fn skewed(len: usize) -> usize {
    let lines = len.div_ceil(16);
    16 * (lines | 1)
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
    isa: Isa,
    layer: &Layer<'_>,
    task: &Task<'_>,
    ring: &mut Vec<f32>,
) {
    let Layer {
        algorithm,
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
    let (cin_g, cout_g) = (cin / groups, cout / groups);
    let points = A * A;
    let (oh, ow) = ((h - 1) / T::STRIDE + 1, (w - 1) / T::STRIDE + 1);
    let tiling = Tiling::new(algorithm, input.len() / (h * w * cin), oh, ow);
    // The rim tiles' places index F(4x4)'s 6x6 grid of points; `Cut` gives rims to no other.
    debug_assert!(A == 6 || !(tiling.y.rim || tiling.x.rim));
    // Point-major, in one ring of `points + 1` slots: slot s holds one point's rows for every
    // tile of the task (row t at `t * row`). V[p] goes to slot p + 1; the product for point p
    // writes M[p] to slot p, whose V[p - 1] is dead by then. So V and M together take little
    // more than V alone (1.8 MB for 64 F(4x4) tiles at 192 channels, within a 2 MiB L2), and
    // each product reads and writes one contiguous block.
    let row = cin_g.max(ncols);
    let slot = skewed(count * row);
    // Slots start on a cache line (rows and slots are whole lines apart when the channels
    // are a multiple of 16), so that vector loads and stores of a row touch one line each.
    let ring = crate::line_aligned(ring, (points + 1) * slot, 0.0);
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
        // SAFETY: `tile_v` reaches the last slot's row t (`slot + t * row + points * slot` <=
        // the ring's length), the places the transform writes.
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
                let product = Product::new(
                    run.len(),
                    strided(
                        slots.wrapping_add((point + 1) * slot + run.start * row),
                        row,
                    ),
                    &u[group * points + point],
                    slots.wrapping_add(point * slot + run.start * row),
                    row,
                )
                .cols(cols.clone())
                .then(
                    u.get(group * points + point + 1)
                        .filter(|_| point + 1 < points),
                );
                gemm::gemm(isa, &product);
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
    use crate::winograd::{tile_count, transform_filters};

    /// Every transform, with every instruction set the machine runs, against a direct f64
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
            for algorithm in [Algorithm::F2, Algorithm::F4, Algorithm::Stride2F2] {
                let stride = algorithm.stride();
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
                let u = transform_filters(algorithm, &packed);
                let layer = Layer {
                    algorithm,
                    u: &u,
                    bias: &bias,
                    cin,
                    cout,
                    groups,
                    relu: false,
                };
                let total = tile_count(algorithm, n, oh, ow);
                for isa in Isa::available() {
                    let mut out = vec![f32::NAN; n * oh * ow * cout];
                    let mut ring = Vec::new();
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
                                // SAFETY: `out` is the whole (n, oh, ow, cout) map, written
                                // by one task at a time.
                                unsafe { run(isa, &layer, &task, &mut ring) };
                            }
                        }
                    }
                    let err = out
                        .iter()
                        .zip(&want)
                        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
                    assert!(
                        err < 1e-5 * scale,
                        "{algorithm:?} {isa} groups={groups}: {err:e} of {scale}"
                    );
                }
            }
        }
    }
}
