//! Every named variant, built from seeded random weights in Rust, at a small input.
//!
//! A0, B1g4 (grouped) and D2se (SE) run against an independent f64 reference: the naive
//! per-branch convolutions of `repvgg_fuse::reference`, with no fusion involved. All 14 check
//! the burn training form against the burn deploy form converted by `repvgg-checkpoint`.
//! Tolerance 1e-5 relative (max|diff| / max|ref|), as for the fixtures: f32 rounding through
//! ~30-40 layers stays near 1e-6.

use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use repvgg_arch::{ArchSpec, Form, VARIANT_NAMES};
use repvgg_burn::{RepVggDeploy, RepVggTrain, default_device};
use repvgg_checkpoint::Checkpoint;
use repvgg_checkpoint::StateDict;
use repvgg_checkpoint::convert::{DEFAULT_BN_EPS, to_deploy, train_block};
use repvgg_checkpoint::layout;
use repvgg_checkpoint::random::training_weights;
use repvgg_engine::{Engine, EngineOptions, Lowering, Winograd, Workspace};
use repvgg_fuse::Kernel;
use repvgg_fuse::reference::{Conv2dParams, FeatureMap, batch_norm, conv2d};

use repvgg_testing::relative_error;

const TOLERANCE: f64 = 1e-5;

fn kernel_of(dict: &StateDict, key: &str) -> Kernel<f64> {
    let t = &dict[key];
    Kernel {
        out_channels: t.shape[0],
        in_per_group: t.shape[1],
        height: t.shape[2],
        width: t.shape[3],
        data: t.to_f64(),
    }
}

/// The training form, branch by branch, in f64, one image.
fn reference_logits(spec: &ArchSpec, dict: &StateDict, image: FeatureMap<f64>) -> Vec<f64> {
    reference_run(spec, dict, image).0
}

/// Logits and every block's output (CHW), in f64.
fn reference_run(
    spec: &ArchSpec,
    dict: &StateDict,
    image: FeatureMap<f64>,
) -> (Vec<f64>, Vec<FeatureMap<f64>>) {
    let mut outputs = Vec::new();
    let mut x = image;
    for block in spec.blocks() {
        let b = train_block(dict, &block, DEFAULT_BN_EPS).unwrap();
        let params = |padding, dilation| Conv2dParams {
            stride: block.stride,
            padding,
            groups: block.groups,
            dilation,
        };
        let d = block.dilation;
        let mut y = batch_norm(&conv2d(&x, &b.dense.0, None, params(d, d)), &b.dense.1);
        let (k1, bn1) = b.one_by_one.as_ref().unwrap();
        let one = batch_norm(&conv2d(&x, k1, None, params(0, 1)), bn1);
        y.data.iter_mut().zip(&one.data).for_each(|(a, v)| *a += v);
        if let Some(bn) = &b.identity {
            let id = batch_norm(&x, bn);
            y.data.iter_mut().zip(&id.data).for_each(|(a, v)| *a += v);
        }
        if block.se_channels.is_some() {
            let p = layout::prefix(&block);
            let plane = y.height * y.width;
            let pooled = FeatureMap {
                channels: y.channels,
                height: 1,
                width: 1,
                data: y
                    .data
                    .chunks_exact(plane)
                    .map(|c| c.iter().sum::<f64>() / plane as f64)
                    .collect(),
            };
            let one_by_one = Conv2dParams {
                stride: 1,
                padding: 0,
                groups: 1,
                dilation: 1,
            };
            let down_bias = dict[&format!("{p}se.down.bias")].to_f64();
            let mut hidden = conv2d(
                &pooled,
                &kernel_of(dict, &format!("{p}se.down.weight")),
                Some(&down_bias),
                one_by_one,
            );
            hidden.data.iter_mut().for_each(|v| *v = v.max(0.0));
            let up_bias = dict[&format!("{p}se.up.bias")].to_f64();
            let gate = conv2d(
                &hidden,
                &kernel_of(dict, &format!("{p}se.up.weight")),
                Some(&up_bias),
                one_by_one,
            );
            for (channel, g) in y.data.chunks_exact_mut(plane).zip(&gate.data) {
                let s = 1.0 / (1.0 + (-g).exp());
                channel.iter_mut().for_each(|v| *v *= s);
            }
        }
        y.data.iter_mut().for_each(|v| *v = v.max(0.0));
        outputs.push(y.clone());
        x = y;
    }
    let plane = x.height * x.width;
    let pooled: Vec<f64> = x
        .data
        .chunks_exact(plane)
        .map(|c| c.iter().sum::<f64>() / plane as f64)
        .collect();
    if spec.num_classes == 0 {
        return (pooled, outputs);
    }
    let (w, b) = (dict["linear.weight"].to_f64(), dict["linear.bias"].to_f64());
    let logits = (0..spec.num_classes)
        .map(|k| {
            b[k] + pooled
                .iter()
                .enumerate()
                .map(|(c, p)| p * w[k * pooled.len() + c])
                .sum::<f64>()
        })
        .collect();
    (logits, outputs)
}

fn values(t: Tensor<2>) -> Vec<f64> {
    t.into_data()
        .try_into_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect()
}

#[test]
fn every_named_variant_converts_exactly_at_a_small_input() {
    let device = default_device();
    let (h, w) = (40, 48);
    let mut rng = StdRng::seed_from_u64(99);
    let pixels: Vec<f32> = (0..3 * h * w)
        .map(|_| rng.random_range(-1.5..1.5))
        .collect();
    let input: Tensor<4> =
        Tensor::from_data(TensorData::new(pixels.clone(), [1, 3, h, w]), &device);
    for (i, name) in VARIANT_NAMES.iter().enumerate() {
        let mut spec = ArchSpec::named(name).unwrap();
        spec.num_classes = 10;
        let train_dict = training_weights(&spec, i as u64);
        let train = RepVggTrain::from_state_dict(&spec, &train_dict, DEFAULT_BN_EPS, &device);
        let train_logits = values(train.forward(input.clone()));
        drop(train);
        let deploy_dict = to_deploy(&train_dict, &spec, DEFAULT_BN_EPS).unwrap();
        let deploy = RepVggDeploy::from_state_dict(&spec, &deploy_dict, &device);
        let deploy_logits = values(deploy.forward(input.clone()));
        drop(deploy);
        // The engine against the framework deploy model, its reference: the default paths,
        // and each Winograd transform and lowering forced on every layer it can take.
        let ckpt = Checkpoint::from_state_dict(spec.clone(), Form::Deploy, deploy_dict).unwrap();
        let mut engine_err = 0.0f64;
        for (winograd, lowering) in [
            (Winograd::Auto, Lowering::Auto),
            (Winograd::F4, Lowering::Implicit),
            (Winograd::F2, Lowering::Im2col),
        ] {
            let options = EngineOptions {
                winograd,
                lowering,
                ..Default::default()
            };
            let engine = Engine::with_options(&ckpt, DEFAULT_BN_EPS, options).unwrap();
            let engine_logits: Vec<f64> = engine
                .forward(&pixels, 1, h, w, &mut Workspace::default())
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect();
            let err = relative_error(&engine_logits, &deploy_logits);
            assert!(
                err < TOLERANCE,
                "{name} {winograd:?}/{lowering:?}: engine vs burn deploy {err:e}"
            );
            engine_err = engine_err.max(err);
        }

        let reference = if ["A0", "B1g4", "D2se"].contains(name) {
            let image = FeatureMap {
                channels: 3,
                height: h,
                width: w,
                data: pixels.iter().map(|&v| v as f64).collect(),
            };
            reference_logits(&spec, &train_dict, image)
        } else {
            // No independent f64 run for the large ones: the two forms must agree.
            train_logits.clone()
        };
        let train_err = relative_error(&train_logits, &reference);
        let deploy_err = relative_error(&deploy_logits, &reference);
        println!(
            "{name:5} train {train_err:.2e} deploy {deploy_err:.2e} engine-vs-deploy {engine_err:.2e}"
        );
        assert!(
            train_err < TOLERANCE && deploy_err < TOLERANCE,
            "{name}: train {train_err:e}, deploy {deploy_err:e}"
        );
    }
}

fn flat(t: Tensor<4>) -> Vec<f64> {
    t.into_data()
        .try_into_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect()
}

/// A PSPNet-style headless backbone (A0 with strides 2,2,2,1,1 and dilations 1,1,1,2,4): the
/// stage outputs of the training form, the converted deploy form and the engine all match the
/// f64 branch-by-branch reference, so the conversion stays exact with dilation.
#[test]
fn a_dilated_headless_backbone_converts_exactly() {
    let device = default_device();
    let spec = ArchSpec::parse("A0;strides=2,2,2,1,1;dilations=1,1,1,2,4;classes=0").unwrap();
    let (h, w) = (48, 40);
    let mut rng = StdRng::seed_from_u64(7);
    let pixels: Vec<f32> = (0..3 * h * w)
        .map(|_| rng.random_range(-1.5..1.5))
        .collect();
    let input: Tensor<4> =
        Tensor::from_data(TensorData::new(pixels.clone(), [1, 3, h, w]), &device);
    let train_dict = training_weights(&spec, 11);
    assert!(!train_dict.contains_key("linear.weight"), "headless");
    let image = FeatureMap {
        channels: 3,
        height: h,
        width: w,
        data: pixels.iter().map(|&v| v as f64).collect(),
    };
    let (pooled_ref, blocks_ref) = reference_run(&spec, &train_dict, image);
    // The reference output of each stage: its last block.
    let blocks = spec.blocks();
    let stage_ref = |stage: usize| {
        let last = blocks.iter().rposition(|b| b.stage == stage).unwrap();
        &blocks_ref[last]
    };
    let stages = [1, 2, 3, 4];
    let train = RepVggTrain::from_state_dict(&spec, &train_dict, DEFAULT_BN_EPS, &device);
    let deploy_dict = to_deploy(&train_dict, &spec, DEFAULT_BN_EPS).unwrap();
    let deploy = RepVggDeploy::from_state_dict(&spec, &deploy_dict, &device);
    let ckpt = Checkpoint::from_state_dict(spec.clone(), Form::Deploy, deploy_dict).unwrap();
    let engine = Engine::from_checkpoint(&ckpt, DEFAULT_BN_EPS).unwrap();
    let engine_out = engine.forward_stages(&pixels, 1, h, w, &stages).unwrap();
    for (form, outputs) in [
        ("train", train.forward_stages(input.clone(), &stages)),
        ("deploy", deploy.forward_stages(input.clone(), &stages)),
    ] {
        assert_eq!(outputs.iter().map(|o| o.0).collect::<Vec<_>>(), stages);
        for (stage, t) in outputs {
            let reference = stage_ref(stage);
            let [_, c, fh, fw] = t.dims();
            assert_eq!(
                (c, fh, fw),
                (reference.channels, reference.height, reference.width)
            );
            let err = relative_error(&flat(t), &reference.data);
            println!("{form} stage {stage} ({c}x{fh}x{fw}): {err:.2e}");
            assert!(err < TOLERANCE, "{form} stage {stage}: {err:e}");
        }
    }
    // Output strides 4, 8, 8, 8 at 48x40: the last two stages keep resolution.
    let sizes: Vec<_> = engine_out.iter().map(|f| (f.height, f.width)).collect();
    assert_eq!(sizes, [(12, 10), (6, 5), (6, 5), (6, 5)]);
    for f in &engine_out {
        let err = relative_error(
            &f.data.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &stage_ref(f.stage).data,
        );
        println!("engine stage {}: {err:.2e}", f.stage);
        assert!(err < TOLERANCE, "engine stage {}: {err:e}", f.stage);
    }
    // Headless: the forward pass ends with the pooled features.
    let pooled = values(deploy.forward(input));
    assert_eq!(pooled.len(), 1280);
    assert!(relative_error(&pooled, &pooled_ref) < TOLERANCE);
    let engine_pooled: Vec<f64> = engine
        .forward(&pixels, 1, h, w, &mut Workspace::default())
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    assert!(relative_error(&engine_pooled, &pooled_ref) < TOLERANCE);
}
