//! Times the training form's convolutions on the GEMM micro-kernels, layer by layer: forward,
//! input gradient and weight gradient of every convolution RepVGG-A0 has in
//! `repvgg bench --train`'s step (64x64, batch 32), on 2 threads, best of 5.
//!
//! ```text
//! cargo run --release -p repvgg-kernels --example training_conv_layers
//! ```

use repvgg_kernels::Isa;
use repvgg_kernels::training::conv::{self, ConvShape};
use std::time::Instant;

fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    // A0 at 64x64, batch 32: (in, size, out, kernel, stride, padding, layers of this shape)
    let layers = [
        (3, 64, 48, 3, 2, 1, 1),
        (3, 64, 48, 1, 2, 0, 1),
        (48, 32, 48, 3, 2, 1, 1),
        (48, 32, 48, 1, 2, 0, 1),
        (48, 16, 48, 3, 1, 1, 1),
        (48, 16, 48, 1, 1, 0, 1),
        (48, 16, 96, 3, 2, 1, 1),
        (96, 8, 96, 3, 1, 1, 3),
        (96, 8, 96, 1, 1, 0, 3),
        (96, 8, 192, 3, 2, 1, 1),
        (192, 4, 192, 3, 1, 1, 13),
        (192, 4, 192, 1, 1, 0, 13),
        (192, 4, 1280, 3, 2, 1, 1),
        (192, 4, 1280, 1, 2, 0, 1),
    ];
    let isa = Isa::best();
    println!("instruction set: {isa}");
    let mut totals = [0.0f64; 3];
    pool.install(|| {
        for (cin, h, cout, k, s, p, count) in layers {
            let shape = ConvShape { batch: 32, in_channels: cin, height: h, width: h, out_channels: cout, kernel: k, stride: s, padding: p, groups: 1 };
            let x = vec![0.5f32; shape.input_len()];
            let w = vec![0.1f32; shape.weight_len()];
            let dy = vec![0.2f32; shape.output_len()];
            let flops = 2.0 * shape.output_len() as f64 * (cin * k * k) as f64;
            let mut best = [f64::MAX; 3];
            for _ in 0..5 {
                let t = Instant::now(); std::hint::black_box(conv::forward(isa, &shape, &x, &w).unwrap()); best[0] = best[0].min(t.elapsed().as_secs_f64());
                let t = Instant::now(); std::hint::black_box(conv::input_grad(isa, &shape, &w, &dy).unwrap()); best[1] = best[1].min(t.elapsed().as_secs_f64());
                let t = Instant::now(); std::hint::black_box(conv::weight_grad(isa, &shape, &x, &dy).unwrap()); best[2] = best[2].min(t.elapsed().as_secs_f64());
            }
            for i in 0..3 { totals[i] += best[i] * count as f64; }
            println!("{cin:>4}->{cout:<5} {h:>2}px k{k} s{s} x{count:<2}  fwd {:6.2} ms {:5.0} GF/s | dx {:6.2} ms {:5.0} | dw {:6.2} ms {:5.0}",
                best[0]*1e3, flops/best[0]/1e9, best[1]*1e3, flops/best[1]/1e9, best[2]*1e3, flops/best[2]/1e9);
        }
    });
    println!(
        "totals ms: fwd {:.1} dx {:.1} dw {:.1}",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[2] * 1e3
    );
}
