use repvgg_kernels::Isa;
use repvgg_kernels::gemm::{PackedB, Product, gemm, strided};
use std::time::Instant;

fn main() {
    let isa = Isa::Avx512;
    for &(m, k, n, nb) in &[
        (256usize, 27usize, 48usize, 1usize),
        (12544, 27, 48, 1),
        (6272, 27, 48, 1),
        (3136, 432, 48, 1),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let bs: Vec<PackedB> = (0..nb)
            .map(|s| PackedB::new(k, n, |r, c| ((r + c + s) % 5) as f32 * 0.1))
            .collect();
        let bias = vec![0.5f32; n];
        let mut c = vec![0f32; m * n];
        let reps = (2e9 / (2.0 * (m * k * n * nb) as f64)).max(3.0) as usize;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..reps {
                for b in &bs {
                    let p = Product::new(m, strided(a.as_ptr(), k), b, c.as_mut_ptr(), n)
                        .bias(&bias)
                        .relu(true);
                    unsafe { gemm(isa, &p) };
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let gf = 2.0 * (m * k * n * nb * reps) as f64 / best / 1e9;
        println!("m {m:4} k {k:5} n {n:5} x{nb:2}: {gf:6.1} GFLOP/s");
    }
}
