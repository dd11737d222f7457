//! One multi-branch training step against PyTorch: the loss, every gradient, two SGD steps
//! (momentum, weight-decay groups) with the BN running statistics, and the official custom L2.
//! Reference: `fixtures/tiny/train_step.*`, made in float64 by `reference/make_training_fixture.py`.

use burn::optim::GradientsParams;
use burn::tensor::Gradients;
use burn::tensor::{Tensor, TensorData};
use repvgg_burn::RepVggTrain;
use repvgg_checkpoint::Checkpoint;
use repvgg_testing::{fixture, read_f64, relative_error, widen};
use repvgg_train::loss::{cross_entropy, custom_l2, soft_targets};
use repvgg_train::sgd::Sgd;

/// Our f32 step against PyTorch's f64 one. Batch norm in training mode on a batch of 4 reduces
/// stage 4 to 4 values per channel, so its backward pass divides by small standard deviations
/// and amplifies f32 rounding (~1e-7) by up to a few hundred: 1e-4 relative to the tensor's
/// largest value bounds that with room, and is still 100x below any real mistake (a wrong
/// decay group or momentum rule changes updated weights by >1e-2 of the update).
const TOLERANCE: f64 = 1e-4;

fn block_name(b: &repvgg_burn::TrainBlock) -> String {
    if b.stage == 0 {
        "stage0".into()
    } else {
        format!("stage{}.{}", b.stage, b.index)
    }
}

/// Every parameter's gradient, by official name.
fn named_grads(model: &RepVggTrain, grads: &Gradients) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    let mut put = |name: String, t: Option<Tensor<1>>| {
        if let Some(t) = t {
            out.push((name, t.into_data().try_into_vec::<f32>().unwrap()));
        }
    };
    let flat4 = |t: Tensor<4>| t.reshape([-1]);
    for b in &model.blocks {
        let p = block_name(b);
        put(
            format!("{p}.rbr_dense.conv.weight"),
            b.dense_conv.weight.val().grad(grads).map(flat4),
        );
        put(
            format!("{p}.rbr_1x1.conv.weight"),
            b.one_conv.weight.val().grad(grads).map(flat4),
        );
        for (part, bn) in [
            ("rbr_dense.bn.", &b.dense_bn),
            ("rbr_1x1.bn.", b.one_bn.as_ref().unwrap()),
        ]
        .into_iter()
        .chain(b.identity.as_ref().map(|bn| ("rbr_identity.", bn)))
        {
            put(format!("{p}.{part}weight"), bn.gamma.val().grad(grads));
            put(format!("{p}.{part}bias"), bn.beta.val().grad(grads));
        }
    }
    put(
        "linear.weight".into(),
        model
            .head
            .as_ref()
            .unwrap()
            .weight
            .val()
            .grad(grads)
            .map(|t| t.reshape([-1])),
    );
    put(
        "linear.bias".into(),
        model.head.as_ref().unwrap().bias.val().grad(grads),
    );
    out
}

fn check(what: &str, ours: &[f32], reference: &[f64]) -> f64 {
    let err = relative_error(&widen(ours), reference);
    assert!(err < TOLERANCE, "{what}: relative error {err:.2e}");
    err
}

fn start() -> (RepVggTrain, burn::tensor::Device) {
    let ckpt = Checkpoint::load(&fixture("tiny", "train_official.safetensors"), None).unwrap();
    let device = repvgg_burn::default_device().autodiff();
    let model = RepVggTrain::from_state_dict(&ckpt.spec, &ckpt.tensors, 1e-5, &device);
    (model, device)
}

#[test]
fn two_sgd_steps_match_pytorch() {
    let reference = read_f64(&fixture("tiny", "train_step.safetensors"));
    let (shape, input) = &reference["input"];
    let input: Vec<f32> = input.iter().map(|&v| v as f32).collect();
    let labels: Vec<usize> = reference["labels"].1.iter().map(|&v| v as usize).collect();
    let targets = soft_targets(&labels, 10, 0.1, None);
    let (mut model, device) = start();
    let mut sgd = Sgd::new(0.9, false, 1e-4, false);
    let mut worst = 0f64;
    for step in 0..2 {
        let x: Tensor<4> = Tensor::from_data(
            TensorData::new(input.clone(), [shape[0], shape[1], shape[2], shape[3]]),
            &device,
        );
        let logits = model.forward(x);
        if step == 0 {
            let ours = logits
                .clone()
                .inner()
                .into_data()
                .try_into_vec::<f32>()
                .unwrap();
            worst = worst.max(check("logits0", &ours, &reference["logits0"].1));
        }
        let loss = cross_entropy(logits, &targets, &device);
        let value = loss.clone().into_scalar::<f32>();
        let expected = reference[&format!("loss{step}")].1[0];
        assert!(
            ((value as f64 - expected) / expected).abs() < 1e-5,
            "loss{step}: {value} vs {expected}"
        );
        let grads = loss.backward();
        if step == 0 {
            let named = named_grads(&model, &grads);
            assert_eq!(named.len(), 56, "every parameter has a gradient");
            for (name, grad) in &named {
                let key = format!("grad.{name}");
                worst = worst.max(check(&key, grad, &reference[&key].1));
            }
        }
        let grads = GradientsParams::from_grads(grads, &model);
        model = sgd.step(model, 0.1, grads);
        let state = model.state_dict();
        let prefix = format!("step{}.", step + 1);
        let mut compared = 0;
        for (key, (_, values)) in reference.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let name = &key[prefix.len()..];
            worst = worst.max(check(key, &state[name].data, values));
            compared += 1;
        }
        // 56 parameters and 2 running statistics for each of the 19 batch norms.
        assert_eq!(compared, 56 + 38);
    }
    eprintln!("worst relative error over logits, gradients and two steps: {worst:.2e}");
}

#[test]
fn custom_l2_and_its_gradient_match_the_official_code() {
    let reference = read_f64(&fixture("tiny", "train_step.safetensors"));
    let (model, _) = start();
    let l2 = custom_l2(&model);
    let value = l2.clone().into_scalar::<f32>() as f64;
    let expected = reference["custom_l2"].1[0];
    assert!(
        ((value - expected) / expected).abs() < 1e-5,
        "{value} vs {expected}"
    );
    let grads = l2.backward();
    let named = named_grads(&model, &grads);
    let mut compared = 0;
    for (name, grad) in &named {
        let key = format!("l2grad.{name}");
        match reference.get(&key) {
            Some((_, values)) => {
                check(&key, grad, values);
                compared += 1;
            }
            // Only the 3x3 and 1x1 kernels enter the custom L2 (the BN scales are held fixed).
            None => assert!(grad.iter().all(|&g| g == 0.0), "{name} has a gradient"),
        }
    }
    assert_eq!(compared, 16);
}
