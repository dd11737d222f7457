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
use repvgg_engine::{Engine, Workspace};
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
    let mut x = image;
    for block in spec.blocks() {
        let b = train_block(dict, &block, DEFAULT_BN_EPS).unwrap();
        let params = |padding| Conv2dParams {
            stride: block.stride,
            padding,
            groups: block.groups,
        };
        let mut y = batch_norm(&conv2d(&x, &b.dense.0, None, params(1)), &b.dense.1);
        let (k1, bn1) = b.one_by_one.as_ref().unwrap();
        let one = batch_norm(&conv2d(&x, k1, None, params(0)), bn1);
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
        x = y;
    }
    let plane = x.height * x.width;
    let pooled: Vec<f64> = x
        .data
        .chunks_exact(plane)
        .map(|c| c.iter().sum::<f64>() / plane as f64)
        .collect();
    let (w, b) = (dict["linear.weight"].to_f64(), dict["linear.bias"].to_f64());
    (0..spec.num_classes)
        .map(|k| {
            b[k] + pooled
                .iter()
                .enumerate()
                .map(|(c, p)| p * w[k * pooled.len() + c])
                .sum::<f64>()
        })
        .collect()
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
        // The engine against the framework deploy model, its reference.
        let ckpt = Checkpoint::from_state_dict(spec.clone(), Form::Deploy, deploy_dict).unwrap();
        let engine = Engine::from_checkpoint(&ckpt, DEFAULT_BN_EPS).unwrap();
        let engine_logits: Vec<f64> = engine
            .forward(&pixels, 1, h, w, &mut Workspace::default())
            .iter()
            .map(|&v| v as f64)
            .collect();
        let engine_err = relative_error(&engine_logits, &deploy_logits);
        assert!(
            engine_err < TOLERANCE,
            "{name}: engine vs burn deploy {engine_err:e}"
        );

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
