//! QARepVGG blocks against the float64 reference written from their equations
//! (`reference/make_qa_fixture.py`, fixtures/qa_tiny: grouped and identity blocks, odd map).
//!
//! Tolerance as for the RepVGG fixtures: 1e-5 relative on logits and block outputs (f32
//! arithmetic over ~10 layers lands near 1e-6; a wrong eps or a misplaced BN gives 1e-2 or
//! more); fused weights to 1e-6 of the reference formula's.

use std::collections::HashMap;

use burn::tensor::{Tensor, TensorData};
use repvgg_arch::{ArchSpec, Form};
use repvgg_burn::{RepVggTrain, default_device};
use repvgg_checkpoint::Checkpoint;
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_engine::{Engine, Workspace};
use repvgg_testing::{fixture, read_f64, relative_error};

fn io() -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    read_f64(&fixture("qa_tiny", "io.safetensors"))
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data()
        .try_into_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect()
}

#[test]
fn qa_blocks_are_read_run_and_converted_exactly() {
    let ckpt = Checkpoint::load(&fixture("qa_tiny", "train_official.safetensors"), None).unwrap();
    let spec = ArchSpec::from_json_file(&fixture("qa_tiny", "spec.json")).unwrap();
    assert_eq!(ckpt.form, Form::Train);
    assert!(ckpt.spec.qa, "QARepVGG inferred from the keys");
    assert_eq!(ckpt.spec.depths, spec.depths);
    assert_eq!(ckpt.spec.groups, spec.groups);
    let reference = io();
    let (shape, input) = &reference["input"];
    let (n, h, w) = (shape[0], shape[2], shape[3]);
    let input32: Vec<f32> = input.iter().map(|&v| v as f32).collect();

    // The training form on burn (eval mode), logits and every block's output.
    let device = default_device();
    let model = RepVggTrain::from_state_dict(&ckpt.spec, &ckpt.tensors, DEFAULT_BN_EPS, &device);
    let x: Tensor<4> = Tensor::from_data(TensorData::new(input32.clone(), shape.clone()), &device);
    let (logits, features) = model.forward_with_features(x);
    let err = relative_error(&values(logits), &reference["logits_train_f64"].1);
    println!("training form (burn): {err:.2e}");
    assert!(err < 1e-5, "{err:e}");
    for (name, out) in features {
        let err = relative_error(&values(out), &reference[&format!("features.{name}")].1);
        assert!(err < 1e-5, "{name}: {err:e}");
    }
    // Written back under the authors' names, unchanged.
    let back = model.state_dict();
    assert_eq!(
        back.keys().collect::<Vec<_>>(),
        ckpt.tensors.keys().collect::<Vec<_>>()
    );
    for (key, t) in &ckpt.tensors {
        assert_eq!(back[key].data, t.data, "{key}");
    }

    // The conversion against the reference formula, then the plain network on the engine.
    let deploy = ckpt.to_deploy(DEFAULT_BN_EPS).unwrap();
    let expected =
        Checkpoint::load(&fixture("qa_tiny", "deploy_official.safetensors"), None).unwrap();
    for (key, t) in &expected.tensors {
        let ours: Vec<f64> = deploy.tensors[key].data.iter().map(|&v| v as f64).collect();
        let theirs: Vec<f64> = t.data.iter().map(|&v| v as f64).collect();
        let err = relative_error(&ours, &theirs);
        assert!(err < 1e-6, "{key}: {err:e}");
    }
    let engine = Engine::from_checkpoint(&deploy, DEFAULT_BN_EPS).unwrap();
    let logits = engine
        .forward(&input32, n, h, w, &mut Workspace::default())
        .unwrap();
    let logits: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    let err = relative_error(&logits, &reference["logits_deploy_f64"].1);
    println!("deploy form (engine): {err:.2e}");
    assert!(err < 1e-5, "{err:e}");
}

/// YOLOv6's QARepVGG blocks deploy as `BN(rbr_reparam(x))`: the BN is folded on load, by
/// `W t`, `beta + (b - mean) t` with `t = gamma / sqrt(var + eps)`.
#[test]
fn a_post_bn_kept_beside_the_deployed_conv_is_folded_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let plain = Checkpoint::load(&fixture("qa_tiny", "deploy_official.safetensors"), None).unwrap();
    let mut tensors = plain.tensors.clone();
    let c = tensors["stage1.1.rbr_reparam.bias"].data.len();
    let (gamma, beta, mean, var) = (1.7f32, -0.3f32, 0.25f32, 0.6f32);
    for (field, value) in [
        ("weight", gamma),
        ("bias", beta),
        ("running_mean", mean),
        ("running_var", var),
    ] {
        tensors.insert(
            format!("stage1.1.bn.{field}"),
            repvgg_checkpoint::Tensor::new(vec![c], vec![value; c]),
        );
    }
    let path = dir.path().join("yolov6_style.safetensors");
    repvgg_checkpoint::write_safetensors(&path, &tensors, None).unwrap();
    let loaded = Checkpoint::load(&path, None).unwrap();
    assert!(!loaded.tensors.contains_key("stage1.1.bn.weight"));
    let t = gamma as f64 / (var as f64 + 1e-5).sqrt();
    let w = &plain.tensors["stage1.1.rbr_reparam.weight"].data;
    let ours = &loaded.tensors["stage1.1.rbr_reparam.weight"].data;
    for (a, b) in w.iter().zip(ours) {
        assert!((*a as f64 * t - *b as f64).abs() <= 1e-6 * (1.0 + b.abs() as f64));
    }
    let b0 = plain.tensors["stage1.1.rbr_reparam.bias"].data[0] as f64;
    let folded = loaded.tensors["stage1.1.rbr_reparam.bias"].data[0] as f64;
    assert!((beta as f64 + (b0 - mean as f64) * t - folded).abs() < 1e-5);
}

/// QARepVGG with SE, in the authors' order `ReLU(BN_post(SE(sum)))`: the BN follows the gate,
/// so the deploy form keeps it after SE (fixtures/qa_tiny_se, the same NumPy reference). The
/// authors' own conversion folds it into the conv anyway, which changes the function; ours
/// must not.
#[test]
fn qa_blocks_with_se_keep_their_post_bn_after_the_gate() {
    let ckpt =
        Checkpoint::load(&fixture("qa_tiny_se", "train_official.safetensors"), None).unwrap();
    assert!(ckpt.spec.qa && ckpt.spec.se);
    let reference = read_f64(&fixture("qa_tiny_se", "io.safetensors"));
    let (shape, input) = &reference["input"];
    let (n, h, w) = (shape[0], shape[2], shape[3]);
    let input32: Vec<f32> = input.iter().map(|&v| v as f32).collect();
    let device = default_device();
    let model = RepVggTrain::from_state_dict(&ckpt.spec, &ckpt.tensors, DEFAULT_BN_EPS, &device);
    let x: Tensor<4> = Tensor::from_data(TensorData::new(input32.clone(), shape.clone()), &device);
    let err = relative_error(
        &values(model.forward(x.clone())),
        &reference["logits_train_f64"].1,
    );
    assert!(err < 1e-5, "training form: {err:e}");
    let deploy = ckpt.to_deploy(DEFAULT_BN_EPS).unwrap();
    assert!(
        deploy.tensors.contains_key("stage1.0.bn.weight"),
        "the post BN is kept"
    );
    let expected =
        Checkpoint::load(&fixture("qa_tiny_se", "deploy_official.safetensors"), None).unwrap();
    for (key, t) in &expected.tensors {
        let ours: Vec<f64> = deploy.tensors[key].data.iter().map(|&v| v as f64).collect();
        let theirs: Vec<f64> = t.data.iter().map(|&v| v as f64).collect();
        assert!(relative_error(&ours, &theirs) < 1e-6, "{key}");
    }
    let engine = Engine::from_checkpoint(&deploy, DEFAULT_BN_EPS).unwrap();
    let logits: Vec<f64> = engine
        .forward(&input32, n, h, w, &mut Workspace::default())
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    let err = relative_error(&logits, &reference["logits_deploy_f64"].1);
    assert!(err < 1e-5, "engine: {err:e}");
    // burn's deploy form too, and the reference's deploy file read back as such.
    let plain =
        repvgg_burn::RepVggDeploy::from_state_dict(&expected.spec, &expected.tensors, &device);
    let err = relative_error(&values(plain.forward(x)), &reference["logits_deploy_f64"].1);
    assert!(err < 1e-5, "burn deploy form: {err:e}");
}
