//! Measures the INT8 product alone (no patch copies, no threads) on the shapes of A0's layers
//! at batch 1, one task's worth at a time, so that its GOP/s can be set beside the peak of
//! `int8_peak` and the per-layer figures of `repvgg bench --layers --precision int8`.
//!
//! ```text
//! cargo run --release -p repvgg-kernels --example int8_gemm
//! ```

use std::time::Instant;

use repvgg_kernels::int8::{Epilogue, Int8Kernels, PackedB8, Product8, gemm_u8s8};

fn main() {
    for kernels in Int8Kernels::available() {
        if kernels != Int8Kernels::Portable {
            measure(kernels);
        }
    }
}

fn measure(kernels: Int8Kernels) {
    println!("{kernels} kernels, one thread");
    // The 7-bit AVX2 set takes weights in [-64, 64]; the others any INT8 weight.
    let limit = if kernels == Int8Kernels::Avx2 {
        129
    } else {
        255
    };
    // (rows, cols, k): a task's rows of a layer, its columns, 9 x input channels.
    for (rows, cols, k) in [
        (48usize, 48usize, 432usize),
        (48, 96, 864),
        (48, 96, 1728),
        (48, 192, 1728),
        (196, 192, 1728),
        (48, 1280, 1728),
        // AMX tasks: whole 32-row blocks; B0's 256-channel stage 3.
        (64, 192, 1728),
        (64, 128, 2304),
        (128, 256, 2304),
        (196, 256, 2304),
    ] {
        let lda = kernels.a_row_bytes(k);
        let a: Vec<u8> = (0..rows * lda).map(|i| (i * 7 % 251) as u8).collect();
        let b = PackedB8::new(k, cols, |r, c| {
            (((r * 3 + c * 5) % limit) as i32 - (limit / 2) as i32) as i8
        });
        let bias = vec![0i32; cols];
        let scale = vec![1e-4f32; cols];
        let mut c = vec![0u8; rows * cols];
        let product = Product8 {
            rows,
            a: a.as_ptr(),
            lda,
            a_zero: 3,
            b: &b,
            bias: &bias,
            cols: 0..cols,
            c: c.as_mut_ptr(),
            ldc: cols,
            epilogue: Epilogue::U8 {
                scale: &scale,
                zero: 3,
                relu: true,
            },
        };
        let ops = 2.0 * (rows * cols * k) as f64;
        let reps = (4e9 / ops).ceil() as usize;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..reps {
                // SAFETY: A rows hold the set's row bytes; C is rows x cols u8, ours alone.
                unsafe { gemm_u8s8(kernels, &product) };
            }
            best = best.min(start.elapsed().as_secs_f64() / reps as f64);
        }
        std::hint::black_box(&c);
        println!(
            "rows {rows:4} cols {cols:5} k {k:5}: {:8.1} us  {:6.0} GOP/s",
            best * 1e6,
            ops / best / 1e9
        );
    }
}
