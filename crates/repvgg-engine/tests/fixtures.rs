//! The engine against the fp64 outputs of the official code, on every fixture and both file
//! forms, with every instruction set this machine runs (portable, AVX2, AVX-512: each kernel
//! set end to end). Tolerance 1e-5 relative (max|diff| / max|ref|): f32 GEMMs accumulate
//! ~1e-6 over these depths; any indexing or packing mistake shows up as O(1).

use std::collections::HashMap;

use repvgg_checkpoint::Checkpoint;
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_engine::{
    Engine, EngineError, EngineOptions, Isa, Lowering, Mode, Winograd, Workspace, nhwc_to_nchw,
};
use repvgg_testing::{fixture, read_f64, widen};

const CONFIGS: [&str; 5] = ["tiny", "tiny_g2", "tiny_g4", "tiny_se", "tiny_nonsquare"];

fn io(config: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    read_f64(&fixture(config, "io.safetensors"))
}

/// f32 engine output against an f64 reference.
fn relative_error(ours: &[f32], reference: &[f64]) -> f64 {
    repvgg_testing::relative_error(&widen(ours), reference)
}

#[test]
fn engine_matches_the_fp64_reference_on_every_fixture_with_every_instruction_set() {
    println!("instruction sets: {:?}", Isa::available());
    for isa in Isa::available() {
        for config in CONFIGS {
            check_fixture(config, isa);
        }
    }
}

fn check_fixture(config: &str, isa: Isa) {
    {
        let reference = io(config);
        let (shape, input) = &reference["input"];
        let input: Vec<f32> = input.iter().map(|&v| v as f32).collect();
        let [n, _, h, w] = shape[..] else { panic!() };
        // With F4 or F2 asked for, and one thread (with more, small maps fall back to a
        // direct path to split output channels), every layer takes a Winograd path: F(4x4)
        // or F(2x2) at stride 1, F(2x2) by phases at stride 2 (groups, SE and non-square maps
        // included); every path must be exact.
        let pool = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        };
        let (one, two) = (pool(1), pool(2));
        for (file, winograd, lowering, pool) in [
            ("train_official.pth", Winograd::F4, Lowering::Auto, &one),
            (
                "deploy_timm.safetensors",
                Winograd::F2,
                Lowering::Auto,
                &one,
            ),
            ("train_official.pth", Winograd::Off, Lowering::Im2col, &two),
            (
                "deploy_timm.safetensors",
                Winograd::Off,
                Lowering::Implicit,
                &two,
            ),
            (
                "deploy_timm.safetensors",
                Winograd::Auto,
                Lowering::Auto,
                &two,
            ),
        ] {
            let label = format!("{isa}/{winograd:?}/{lowering:?}");
            let ckpt = Checkpoint::load(&fixture(config, file), None).unwrap();
            let engine = Engine::with_options(
                &ckpt,
                DEFAULT_BN_EPS,
                EngineOptions {
                    winograd,
                    lowering,
                    isa: Some(isa),
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(engine.isa(), isa);

            let names: Vec<String> = ckpt.spec.blocks().iter().map(|b| b.name()).collect();
            let mut ws = Workspace::default();
            let mut checked = 0;
            let mut logits = Vec::new();
            pool.install(|| {
                logits = engine
                    .forward_with(&input, n, h, w, &mut ws, |i, fh, fw, nhwc| {
                        let (_, want) = &reference[&format!("features.{}", names[i])];
                        let err = relative_error(&nhwc_to_nchw(nhwc, n, fh, fw), want);
                        assert!(err < 1e-5, "{config} {file} {label} {}: {err:e}", names[i]);
                        checked += 1;
                    })
                    .unwrap();
            });
            assert_eq!(checked, names.len());
            let key = if file.starts_with("train") {
                "logits_train_f64"
            } else {
                "logits_deploy_f64"
            };
            let err = relative_error(&logits, &reference[key].1);
            println!(
                "{config:15} {file:24} {label:22} threads={} {err:.2e}",
                pool.current_num_threads()
            );
            assert!(err < 1e-5, "{config} {file}: {err:e}");
            // A second call reuses the workspace.
            let mut again = Vec::new();
            pool.install(|| again = engine.forward(&input, n, h, w, &mut ws).unwrap());
            // forward() may take the throughput path (whole images per thread): same numbers
            // up to rounding.
            let err_again = relative_error(&again, &reference[key].1);
            assert!(err_again < 1e-5, "{config} {file} forward(): {err_again:e}");
        }
    }
}

/// A batch of zero images is a valid (if idle) call: no logits, and every stage reported
/// with no data, rather than a division by zero in the task split.
#[test]
fn an_empty_batch_gives_empty_outputs() {
    let ckpt = Checkpoint::load(&fixture("tiny", "deploy_timm.safetensors"), None).unwrap();
    let engine = Engine::from_checkpoint(&ckpt, DEFAULT_BN_EPS).unwrap();
    let logits = engine
        .forward(&[], 0, 16, 16, &mut Workspace::default())
        .unwrap();
    assert!(logits.is_empty());
    let stages = engine.forward_stages(&[], 0, 16, 16, &[1, 4]).unwrap();
    assert_eq!(stages.len(), 2);
    assert!(stages.iter().all(|s| s.data.is_empty()));
}

/// Throughput mode splits a batch between the threads, unevenly when it must (3 images on 2
/// threads: 2 + 1), each thread writing its images' logits into its share of the output; they
/// must match latency mode's, where the three images go through every layer together. Both
/// are f32 with different row blockings, hence 1e-5 relative rather than equality.
#[test]
fn throughput_mode_matches_latency_mode_on_an_uneven_batch() {
    let ckpt = Checkpoint::load(&fixture("tiny_se", "deploy_timm.safetensors"), None).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let (n, h, w) = (3, 24, 20);
    let input: Vec<f32> = (0..n * 3 * h * w)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let logits = |mode| {
        let options = EngineOptions {
            mode,
            ..Default::default()
        };
        let engine = Engine::with_options(&ckpt, DEFAULT_BN_EPS, options).unwrap();
        pool.install(|| {
            engine
                .forward(&input, n, h, w, &mut Workspace::default())
                .unwrap()
        })
    };
    let (latency, throughput) = (logits(Mode::Latency), logits(Mode::Throughput));
    assert_eq!(throughput.len(), latency.len());
    let err = relative_error(&throughput, &widen(&latency));
    println!("throughput vs latency, 3 images on 2 threads: {err:.2e}");
    assert!(err < 1e-5, "throughput vs latency: {err:e}");
}

/// A cap the machine lacks is an error that names what it has, not a crash; a cap it has is
/// what the engine runs.
#[test]
fn an_instruction_set_cap_is_checked_against_the_machine() {
    let ckpt = Checkpoint::load(&fixture("tiny", "deploy_timm.safetensors"), None).unwrap();
    for isa in Isa::ALL {
        let options = EngineOptions {
            isa: Some(isa),
            ..Default::default()
        };
        match Engine::with_options(&ckpt, DEFAULT_BN_EPS, options) {
            Ok(engine) => {
                assert!(isa.is_available());
                assert_eq!(engine.isa(), isa);
            }
            Err(EngineError::Isa(e)) => {
                assert!(!isa.is_available());
                assert!(e.to_string().contains("portable"), "{e}");
            }
            Err(e) => panic!("{isa}: {e}"),
        }
    }
    let engine = Engine::from_checkpoint(&ckpt, DEFAULT_BN_EPS).unwrap();
    assert_eq!(engine.isa(), Isa::best());
}
