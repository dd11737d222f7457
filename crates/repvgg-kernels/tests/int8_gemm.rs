//! Every INT8 kernel set the machine has, bit for bit against plain integer loops: the sums
//! are exact integers, and the requantization is one float multiply, one add, a clamp and a
//! round to nearest even, which every kernel does alike, so no tolerance is needed or given.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use repvgg_kernels::int8::{Epilogue, Int8Kernels, PackedB8, Product8, gemm_u8s8};

struct Case {
    rows: usize,
    k: usize,
    n: usize,
    a_zero: u8,
    out_zero: u8,
    relu: bool,
    /// The largest |weight|: 127 (any INT8 weight) or 64 (what the AVX2 kernel takes).
    weight_range: i32,
}

/// The product the way the contract defines it, one element at a time.
fn reference(case: &Case, a: &[u8], b: &[i8], bias: &[i32], scale: &[f32]) -> (Vec<i32>, Vec<u8>) {
    let (rows, k, n) = (case.rows, case.k, case.n);
    let mut sums = vec![0i32; rows * n];
    let mut bytes = vec![0u8; rows * n];
    let low = if case.relu { case.out_zero as f32 } else { 0.0 };
    for r in 0..rows {
        for j in 0..n {
            let mut sum = bias[j];
            for t in 0..k {
                sum += (a[r * k + t] as i32 - case.a_zero as i32) * b[t * n + j] as i32;
            }
            sums[r * n + j] = sum;
            let v = sum as f32 * scale[j] + case.out_zero as f32;
            bytes[r * n + j] = v.clamp(low, 255.0).round_ties_even() as u8;
        }
    }
    (sums, bytes)
}

fn run_case(kernels: Int8Kernels, case: &Case, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (rows, k, n) = (case.rows, case.k, case.n);
    let a: Vec<u8> = (0..rows * k).map(|_| rng.random()).collect();
    let b: Vec<i8> = (0..k * n)
        .map(|_| rng.random_range(-case.weight_range..=case.weight_range) as i8)
        .collect();
    let bias: Vec<i32> = (0..n).map(|_| rng.random_range(-20_000..20_000)).collect();
    // Scales that put the outputs across the whole u8 range, some beyond it (clamped).
    let scale: Vec<f32> = (0..n)
        .map(|_| rng.random_range(0.5..4.0) / (k.max(1) as f32 * 128.0 * 40.0).sqrt())
        .collect();
    let (sums, bytes) = reference(case, &a, &b, &bias, &scale);

    // A with rows padded to what the set reads (whole groups, or whole tiles for AMX) and
    // more, the padding filled with junk: B's zero rows must cancel it.
    let lda = kernels.a_row_bytes(k) + 4;
    let mut padded = vec![0xA5u8; rows * lda];
    for r in 0..rows {
        padded[r * lda..r * lda + k].copy_from_slice(&a[r * k..(r + 1) * k]);
    }
    let packed = PackedB8::new(k, n, |t, j| b[t * n + j]);

    let mut out = vec![0u8; rows * n];
    let product = Product8 {
        rows,
        a: padded.as_ptr(),
        lda,
        a_zero: case.a_zero,
        b: &packed,
        bias: &bias,
        cols: 0..n,
        c: out.as_mut_ptr(),
        ldc: n,
        epilogue: Epilogue::U8 {
            scale: &scale,
            zero: case.out_zero,
            relu: case.relu,
        },
    };
    // SAFETY: A's rows hold `lda` >= the set's row bytes, C holds rows x n bytes.
    unsafe { gemm_u8s8(kernels, &product) };
    let what = format!("{kernels} rows {rows} k {k} n {n}");
    assert_eq!(out, bytes, "{what}: u8 outputs");
    // The variation in the outputs shows the case tests something.
    let distinct: std::collections::BTreeSet<u8> = bytes.iter().copied().collect();
    assert!(
        rows * n < 8 || distinct.len() > 4,
        "{what}: degenerate case"
    );

    let mut raw = vec![0i32; rows * n];
    let product = Product8 {
        c: raw.as_mut_ptr() as *mut u8,
        epilogue: Epilogue::I32,
        ..product
    };
    // SAFETY: as above, C holds rows x n i32.
    unsafe { gemm_u8s8(kernels, &product) };
    assert_eq!(raw, sums, "{what}: i32 sums");

    // The columns computed in two calls, split on a panel, give the same.
    if n > 16 {
        let mut split = vec![0u8; rows * n];
        for cols in [0..16, 16..n] {
            let part = Product8 {
                c: split.as_mut_ptr().wrapping_add(cols.start),
                cols,
                epilogue: Epilogue::U8 {
                    scale: &scale,
                    zero: case.out_zero,
                    relu: case.relu,
                },
                ..product
            };
            // SAFETY: C holds rows x n bytes; each call writes its columns.
            unsafe { gemm_u8s8(kernels, &part) };
        }
        assert_eq!(split, bytes, "{what}: split columns");

        // Into a wider C (ldc past n) with guard bytes around: nothing outside the asked
        // columns and rows changes.
        let ldc = n + 19;
        let mut wide = vec![0xEEu8; (rows + 1) * ldc];
        let cols = 16..n;
        let part = Product8 {
            c: wide.as_mut_ptr().wrapping_add(cols.start),
            cols: cols.clone(),
            ldc,
            epilogue: Epilogue::U8 {
                scale: &scale,
                zero: case.out_zero,
                relu: case.relu,
            },
            ..product
        };
        // SAFETY: C holds rows + 1 rows of ldc bytes; the call writes columns 16..n of `rows`.
        unsafe { gemm_u8s8(kernels, &part) };
        for r in 0..rows + 1 {
            for j in 0..ldc {
                let got = wide[r * ldc + j];
                if r < rows && cols.contains(&j) {
                    assert_eq!(got, bytes[r * n + j], "{what}: ({r}, {j})");
                } else {
                    assert_eq!(got, 0xEE, "{what}: wrote outside its block at ({r}, {j})");
                }
            }
        }
    }
}

const SHAPES: [(usize, usize, usize); 12] = [
    (1, 1, 1),
    (1, 27, 16),
    (3, 4, 17),
    (12, 72, 48),
    (13, 36, 8),
    (25, 576, 70),
    (5, 3, 33),
    (37, 1152, 64),
    (2, 4608, 16),
    // Several whole AMX blocks (32 rows x 32 columns) and a partial tile of k.
    (96, 300, 96),
    (64, 432, 48),
    // No k at all: the bias alone (AMX runs no pass of tiles).
    (40, 0, 20),
];

#[test]
fn every_kernel_set_matches_the_integer_reference() {
    let sets = Int8Kernels::available();
    eprintln!("INT8 kernel sets here: {sets:?}");
    for kernels in sets {
        for (i, &(rows, k, n)) in SHAPES.iter().enumerate() {
            for (relu, a_zero, out_zero) in [(false, 0, 0), (true, 128, 3), (false, 7, 128)] {
                let weight_range = if kernels == Int8Kernels::Avx2 {
                    64
                } else {
                    127
                };
                let case = Case {
                    rows,
                    k,
                    n,
                    a_zero,
                    out_zero,
                    relu,
                    weight_range,
                };
                run_case(kernels, &case, i as u64 * 31 + a_zero as u64);
            }
        }
    }
}

/// The AVX2 kernel's 16-bit pair sums are exact for weights within [-64, 64]: the extreme
/// case (255 x 64 twice, and 255 x -64 twice) must come out exactly.
#[test]
fn avx2_is_exact_at_the_edge_of_its_weight_range() {
    if !Int8Kernels::Avx2.is_available() {
        eprintln!("SKIPPED: no AVX2 here");
        return;
    }
    for w in [64i8, -64] {
        let (k, n) = (8, 16);
        let a = vec![255u8; k];
        let packed = PackedB8::new(k, n, |_, _| w);
        assert!(packed.fits_avx2());
        let mut raw = vec![0i32; n];
        let bias = vec![0i32; n];
        let product = Product8 {
            rows: 1,
            a: a.as_ptr(),
            lda: k,
            a_zero: 0,
            b: &packed,
            bias: &bias,
            cols: 0..n,
            c: raw.as_mut_ptr() as *mut u8,
            ldc: n,
            epilogue: Epilogue::I32,
        };
        // SAFETY: one row of 8 bytes (two groups), C one row of 16 i32.
        unsafe { gemm_u8s8(Int8Kernels::Avx2, &product) };
        assert!(raw.iter().all(|&v| v == 255 * w as i32 * 8), "{raw:?}");
    }
    assert!(!PackedB8::new(1, 1, |_, _| 65).fits_avx2());
    assert!(!PackedB8::new(1, 1, |_, _| -128).fits_avx2());
}

/// The AMX convolution read straight from a padded image, against a plain integer 3x3
/// convolution: exact sums, the same requantization; positions split mid-row across two
/// calls give the same; the padding columns are never stored (guard bytes after C stay).
#[test]
fn amx_conv3x3_from_the_image_matches_the_integer_reference() {
    if !Int8Kernels::Amx.is_available() {
        eprintln!("SKIPPED: no AMX here");
        return;
    }
    for (h, w, cin, cout, zero) in [
        (5usize, 7usize, 24usize, 40usize, 3u8),
        (14, 14, 64, 32, 128),
        (9, 30, 72, 20, 0),
        (3, 1, 8, 16, 9),
    ] {
        let mut rng = StdRng::seed_from_u64((h * w * cin) as u64);
        let image: Vec<u8> = (0..h * w * cin).map(|_| rng.random()).collect();
        let weights: Vec<i8> = (0..cout * cin * 9)
            .map(|_| rng.random_range(-127..=127) as i8)
            .collect();
        let bias: Vec<i32> = (0..cout)
            .map(|_| rng.random_range(-20_000..20_000))
            .collect();
        let scale: Vec<f32> = (0..cout)
            .map(|_| rng.random_range(0.5..4.0) / (9.0 * cin as f32 * 128.0 * 40.0).sqrt())
            .collect();
        let (out_zero, relu) = (5u8, true);
        // Reference: output (y, x, o), the image's zero point outside it.
        let at = |y: isize, x: isize, ci: usize| -> i32 {
            if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                zero as i32
            } else {
                image[(y as usize * w + x as usize) * cin + ci] as i32
            }
        };
        let weight = |o: usize, ci: usize, tap: usize| weights[(o * cin + ci) * 9 + tap] as i32;
        let mut expected = vec![0u8; h * w * cout];
        for y in 0..h {
            for x in 0..w {
                for o in 0..cout {
                    let mut sum = bias[o];
                    for tap in 0..9 {
                        let (yy, xx) = (
                            y as isize + tap as isize / 3 - 1,
                            x as isize + tap as isize % 3 - 1,
                        );
                        for ci in 0..cin {
                            sum += (at(yy, xx, ci) - zero as i32) * weight(o, ci, tap);
                        }
                    }
                    let v = sum as f32 * scale[o] + out_zero as f32;
                    expected[(y * w + x) * cout + o] =
                        v.clamp(out_zero as f32, 255.0).round_ties_even() as u8;
                }
            }
        }
        // The padded image, junk after it up to what the product may read.
        let pw = w + 2;
        let cinp = cin.div_ceil(64) * 64;
        let packed = PackedB8::new(repvgg_kernels::int8::conv3x3_k(cin), cout, |row, col| {
            let (tap, ci) = (row / cinp, row % cinp);
            if ci < cin {
                weights[(col * cin + ci) * 9 + tap]
            } else {
                0
            }
        });
        let mut padded = vec![zero; (h + 2) * pw * cin];
        for y in 0..h {
            for x in 0..w {
                let to = ((y + 1) * pw + x + 1) * cin;
                padded[to..to + cin].copy_from_slice(&image[(y * w + x) * cin..][..cin]);
            }
        }
        let total = (h - 1) * pw + w;
        let split = (total / 2).max(1);
        let whole: Vec<std::ops::Range<usize>> = std::iter::once(0..total).collect();
        for parts in [whole, vec![0..split, split..total]] {
            let guard = 64;
            let mut out = vec![0xEEu8; h * w * cout + guard];
            for range in parts {
                let product = repvgg_kernels::int8::Conv8 {
                    first: range.start,
                    positions: range.len(),
                    image: padded.as_ptr(),
                    channels: cin,
                    padded_width: pw,
                    a_zero: zero,
                    b: &packed,
                    bias: &bias,
                    cols: 0..cout,
                    c: out.as_mut_ptr(),
                    ldc: cout,
                    epilogue: Epilogue::U8 {
                        scale: &scale,
                        zero: out_zero,
                        relu,
                    },
                };
                let needed = product.image_bytes();
                if padded.len() < needed {
                    padded.resize(needed, 0xA5);
                }
                let product = repvgg_kernels::int8::Conv8 {
                    image: padded.as_ptr(),
                    ..product
                };
                // SAFETY: the image holds `image_bytes`; C holds h w pixels of cout bytes.
                unsafe { repvgg_kernels::int8::conv3x3_u8s8(&product) };
            }
            let what = format!("{h}x{w}x{cin} -> {cout}");
            assert_eq!(&out[..h * w * cout], &expected[..], "{what}");
            assert!(
                out[h * w * cout..].iter().all(|&g| g == 0xEE),
                "{what}: wrote past C"
            );
        }
    }
}

/// AMX takes a layer only where its 64-byte tiles of k do not mostly compute zeros: a stem's
/// reduction of 27 (three channels, nine taps) goes to VNNI's groups of four, a 48-channel
/// layer's 432 to AMX where the machine has it.
#[test]
fn amx_is_chosen_only_for_reductions_that_fill_its_tiles() {
    let cap = repvgg_kernels::Isa::best();
    let stem = Int8Kernels::best_for(cap, &PackedB8::new(27, 48, |_, _| 1));
    let wide = Int8Kernels::best_for(cap, &PackedB8::new(432, 48, |_, _| 1));
    assert_ne!(stem, Int8Kernels::Amx);
    assert_eq!(wide == Int8Kernels::Amx, Int8Kernels::Amx.is_available());
    if Int8Kernels::Avx512Vnni.is_available() {
        assert_eq!(stem, Int8Kernels::Avx512Vnni);
    }
}
