//! Measures this machine's INT8 multiply-accumulate peak with the instructions the INT8
//! engine is built on: 24 independent chains of `vpdpbusd` (AVX-512 VNNI; each adds 64 u8 x
//! s8 products, 128 ops, to 16 lanes), enough to cover its latency on every port that runs
//! it; and, where there is AMX, four independent `tdpbusd` chains (each a 16 x 64 by 64 x 16
//! tile product, 32,768 ops), the four sum tiles of the engine's AMX block; each on one
//! thread and on every thread at once. The per-layer GOP/s of `repvgg bench --layers
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

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    /// `ldtilecfg`'s operand, palette 1: tiles 0-7 of 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    /// `iterations` x 4 `tdpbusd` into four sum tiles from two A and two B tiles.
    ///
    /// # Safety
    /// AMX-INT8 must run here and the process must hold the tile data (what
    /// `Int8Kernels::Amx.is_available()` checks and asks for).
    pub unsafe fn chains(iterations: u64) {
        let config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
            rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        let operands = vec![1u8; 1024];
        // SAFETY: AMX runs and the tiles are ours (the caller's contract); the loads read
        // 16 rows of 64 bytes of `operands`; the loop touches no memory.
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) &config, options(nostack, readonly));
            asm!(
                "tileloadd tmm4, [{a} + {stride} * 1]",
                "tileloadd tmm5, [{a} + {stride} * 1]",
                "tileloadd tmm6, [{a} + {stride} * 1]",
                "tileloadd tmm7, [{a} + {stride} * 1]",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                a = in(reg) operands.as_ptr(),
                stride = in(reg) 64usize,
                options(nostack, readonly)
            );
            asm!(
                "2:",
                "tdpbusd tmm0, tmm4, tmm6",
                "tdpbusd tmm1, tmm4, tmm7",
                "tdpbusd tmm2, tmm5, tmm6",
                "tdpbusd tmm3, tmm5, tmm7",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iterations => _,
                options(nostack, nomem)
            );
            asm!("tilerelease", options(nostack, nomem));
        }
    }
}

/// GOP/s of `run` (which does `ops_per_thread` ops) on one thread and on every thread.
fn peak(ops_per_thread: f64, run: impl Fn() + Sync) -> (f64, f64, usize) {
    run();
    let start = Instant::now();
    run();
    let one = ops_per_thread / start.elapsed().as_secs_f64() / 1e9;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(&run);
        }
    });
    let all = threads as f64 * ops_per_thread / start.elapsed().as_secs_f64() / 1e9;
    (one, all, threads)
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    if repvgg_kernels::int8::Int8Kernels::Amx.is_available() {
        const TILE_ITERATIONS: u64 = 2_000_000;
        // 4 instructions x 16 x 16 x 64 MACs x 2 ops each.
        let ops = (TILE_ITERATIONS * 4 * 16 * 16 * 64 * 2) as f64;
        // SAFETY: checked above (which also asked Linux for the tile data).
        let (one, all, threads) = peak(ops, || unsafe { amx::chains(TILE_ITERATIONS) });
        println!(
            "tdpbusd (AMX) peak: {one:.0} GOP/s on one thread, {all:.0} GOP/s on {threads} threads"
        );
    }
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
        let ops = (ITERATIONS * 24 * 64 * 2) as f64;
        let (one, all, threads) = peak(ops, || {
            // SAFETY: AVX-512 F, BW and VNNI were detected above.
            std::hint::black_box(unsafe { vnni::chains(std::hint::black_box(ITERATIONS)) });
        });
        println!(
            "vpdpbusd (512-bit) peak: {one:.0} GOP/s on one thread, {all:.0} GOP/s on {threads} threads"
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("not x86-64: nothing to measure");
}
