//! A fresh network, initialised as PyTorch initialises the official model.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use repvgg_arch::{ArchSpec, Form};
use repvgg_checkpoint::layout::expected_tensors;
use repvgg_checkpoint::{StateDict, Tensor};

/// PyTorch's defaults for `nn.Conv2d`, `nn.Linear` and `nn.BatchNorm2d`: kernels and biases
/// uniform in `±1/sqrt(fan_in)` (kaiming-uniform with `a = sqrt(5)`), BN weight 1, bias 0,
/// running mean 0, running variance 1.
pub fn pytorch_default(spec: &ArchSpec, seed: u64) -> StateDict {
    let mut rng = StdRng::seed_from_u64(seed);
    let shapes = expected_tensors(spec, Form::Train);
    // A bias's fan-in is its layer's kernel's.
    let fan_in_of = |key: &str| -> usize {
        let kernel = key.replace(".bias", ".weight");
        shapes
            .iter()
            .find(|(k, _)| *k == kernel)
            .map(|(_, s)| s[1..].iter().product::<usize>())
            .unwrap_or(1)
    };
    shapes
        .iter()
        .map(|(key, shape)| {
            let n: usize = shape.iter().product();
            let is_bn = shape.len() == 1 && (key.contains(".bn.") || key.contains("rbr_identity."))
                || key.ends_with("running_mean")
                || key.ends_with("running_var");
            let data: Vec<f32> = if is_bn {
                let value = if key.ends_with(".weight") || key.ends_with("running_var") {
                    1.0
                } else {
                    0.0
                };
                vec![value; n]
            } else {
                let fan_in = if shape.len() > 1 {
                    shape[1..].iter().product()
                } else {
                    fan_in_of(key)
                };
                let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            (key.clone(), Tensor::new(shape.clone(), data))
        })
        .collect()
}
