//! The training objective: cross-entropy against smoothed (and optionally mixed) targets, plus
//! the optional equivalent-kernel L2 of the official code.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use repvgg_burn::RepVggTrain;

/// Target distributions `(n, classes)`: `1 - smoothing + smoothing / classes` on the label,
/// `smoothing / classes` elsewhere (PyTorch's `label_smoothing`); with mixup, the blend
/// `lambda * t(labels) + (1 - lambda) * t(partner labels)`.
pub fn soft_targets(
    labels: &[usize],
    classes: usize,
    smoothing: f64,
    mix: Option<(f64, &[usize])>,
) -> Vec<f32> {
    let off = smoothing / classes as f64;
    let on = 1.0 - smoothing;
    let mut t = vec![off as f32; labels.len() * classes];
    let (lambda, partners) = mix.unwrap_or((1.0, labels));
    for (i, (&a, &b)) in labels.iter().zip(partners).enumerate() {
        t[i * classes + a] += (on * lambda) as f32;
        t[i * classes + b] += (on * (1.0 - lambda)) as f32;
    }
    t
}

/// Mean over the batch of `-sum_k target_k * log softmax(logits)_k`.
pub fn cross_entropy(logits: Tensor<2>, targets: &[f32], device: &Device) -> Tensor<1> {
    let [n, k] = logits.dims();
    let targets: Tensor<2> = Tensor::from_data(TensorData::new(targets.to_vec(), [n, k]), device);
    (log_softmax(logits, 1) * targets)
        .sum()
        .mul_scalar(-1.0 / n as f64)
}

/// The official `get_custom_L2`, summed over blocks. For each block, with `K3`, `K1` the 3x3
/// and 1x1 kernels and `t = gamma / sqrt(running_var + eps)` of their BNs (held constant):
/// the L2 of `K3` outside its centre, plus the L2 of the equivalent centre
/// `K3[.., 1, 1] * t3 + K1 * t1`, normalised by `t3^2 + t1^2`.
pub fn custom_l2(model: &RepVggTrain) -> Tensor<1> {
    let mut total: Option<Tensor<1>> = None;
    for block in &model.blocks {
        let k3 = block.dense_conv.weight.val();
        let k1 = block.one_conv.weight.val();
        let scale = |bn: &repvgg_burn::layers::BatchNorm2d| {
            let device = k3.device();
            let var = bn.running_var.value().to_device(&device);
            let t = bn.gamma.val() / var.add_scalar(bn.eps).sqrt();
            let c = t.dims()[0];
            t.detach().reshape([c, 1, 1, 1])
        };
        let one_bn = block
            .one_bn
            .as_ref()
            .expect("custom L2 is refused for QARepVGG blocks (they have no 1x1 BN)");
        let (t3, t1) = (scale(&block.dense_bn), scale(one_bn));
        let [o, i, _, _] = k3.dims();
        let centre = k3.clone().slice([0..o, 0..i, 1..2, 1..2]);
        let circle = k3.powi_scalar(2).sum() - centre.clone().powi_scalar(2).sum();
        let equivalent = centre * t3.clone() + k1 * t1.clone();
        let normaliser = t3.powi_scalar(2) + t1.powi_scalar(2);
        let eq = (equivalent.powi_scalar(2) / normaliser).sum();
        let block_l2 = eq + circle;
        total = Some(match total {
            Some(t) => t + block_l2,
            None => block_l2,
        });
    }
    total.expect("a RepVGG has blocks")
}
