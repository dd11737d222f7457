//! Steady-state inference allocates nothing: once a workspace (and each pool thread's
//! scratch) has served a batch of a given shape, [`Engine::infer`] makes no heap allocation
//! (two windows of 5 calls in a row without one, within 200 calls),
//! on every path (Winograd F(4x4), F(2x2) and stride-2, im2col, implicit GEMM, SE, groups),
//! in latency and throughput mode. The allocator below counts every allocation in the
//! process, so this file holds one test: a second one running alongside would be counted.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use repvgg_checkpoint::Checkpoint;
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_engine::{Engine, EngineOptions, Lowering, Mode, Winograd, Workspace};
use repvgg_testing::fixture;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator with the caller's arguments, so it
// meets GlobalAlloc's contract as that one does; counting touches no allocated memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds this method's contract, which is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds this method's contract, which is System's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds this method's contract, which is System's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds this method's contract, which is System's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_inference_does_not_allocate() {
    let pools: Vec<_> = [1, 2]
        .map(|threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
        })
        .into();
    for config in ["tiny", "tiny_g2", "tiny_se"] {
        let ckpt = Checkpoint::load(&fixture(config, "deploy_timm.safetensors"), None).unwrap();
        for (winograd, lowering) in [
            (Winograd::Auto, Lowering::Auto),
            (Winograd::F4, Lowering::Auto),
            (Winograd::F2, Lowering::Auto),
            (Winograd::Off, Lowering::Implicit),
            (Winograd::Off, Lowering::Im2col),
        ] {
            for mode in [Mode::Latency, Mode::Auto] {
                let options = EngineOptions {
                    winograd,
                    lowering,
                    mode,
                    ..Default::default()
                };
                let engine = Engine::with_options(&ckpt, DEFAULT_BN_EPS, options).unwrap();
                for pool in &pools {
                    for n in [1, 4] {
                        let (h, w) = (40, 36);
                        let input: Vec<f32> = (0..n * 3 * h * w)
                            .map(|i| (i % 23) as f32 / 23.0 - 0.5)
                            .collect();
                        let label = format!(
                            "{config} {winograd:?}/{lowering:?} {mode:?} threads={} n={n}",
                            pool.current_num_threads()
                        );
                        pool.install(|| {
                            let mut ws = Workspace::default();
                            // Which thread runs which task varies between calls, and each
                            // thread's scratch grows the first time it runs a bigger one (on a
                            // loaded machine one thread may run them all for a while): calls
                            // must reach a window of 5 without an allocation, and stay there.
                            let mut clean_windows = 0;
                            for _ in 0..40 {
                                let before = ALLOCATIONS.load(Ordering::Relaxed);
                                for _ in 0..5 {
                                    std::hint::black_box(
                                        engine.infer(&input, n, h, w, &mut ws).unwrap(),
                                    );
                                }
                                let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
                                clean_windows = if allocations == 0 {
                                    clean_windows + 1
                                } else {
                                    0
                                };
                                if clean_windows == 2 {
                                    break;
                                }
                            }
                            assert_eq!(
                                clean_windows, 2,
                                "{label}: still allocating after 200 calls"
                            );
                        });
                    }
                }
            }
        }
    }
}
