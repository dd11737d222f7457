//! Measures this machine's INT8 multiply-accumulate peak with the instruction the INT8 engine
//! is built on: 24 independent chains of `vpdpbusd` (AVX-512 VNNI; each adds 64 u8 x s8
//! products, 128 ops, to 16 lanes), enough to cover its latency on every port that runs it,
//! on one thread and on every thread at once. The per-layer GOP/s of `repvgg bench --layers
//! --precision int8` are then a fraction of it.
//!
//! ```text
//! cargo run --release -p repvgg-kernels --example int8_peak
//! ```

use std::time::Instant;

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    /// `iterations` x 24 `vpdpbusd`; returns a value so nothing is optimised away.
    ///
    /// # Safety
    /// AVX-512 F, BW and VNNI must run here.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn chains(iterations: u64) -> i32 {
        // Opaque operands: nothing here may be folded at compile time.
        let a = _mm512_set1_epi32(std::hint::black_box(0x0101_0101));
        let b = _mm512_set1_epi32(std::hint::black_box(0x0102_0304));
        let mut acc = [_mm512_setzero_si512(); 24];
        for _ in 0..iterations {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        let mut sum = _mm512_setzero_si512();
        for x in acc {
            sum = _mm512_add_epi32(sum, x);
        }
        _mm512_reduce_add_epi32(sum)
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        let vnni = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni");
        if !vnni {
            println!("no AVX-512 VNNI here: nothing to measure");
            return;
        }
        const ITERATIONS: u64 = 20_000_000;
        // 24 instructions x 64 MACs x 2 ops each.
        let ops = |threads: u64| (threads * ITERATIONS * 24 * 64 * 2) as f64;
        let run = || {
            // SAFETY: AVX-512 F, BW and VNNI were detected above.
            std::hint::black_box(unsafe { vnni::chains(std::hint::black_box(ITERATIONS)) })
        };
        run();
        let start = Instant::now();
        run();
        let one = ops(1) / start.elapsed().as_secs_f64() / 1e9;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let start = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(run);
            }
        });
        let all = ops(threads) / start.elapsed().as_secs_f64() / 1e9;
        println!(
            "vpdpbusd (512-bit) peak: {one:.0} GOP/s on one thread, {all:.0} GOP/s on {threads} threads"
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("not x86-64: nothing to measure");
}
