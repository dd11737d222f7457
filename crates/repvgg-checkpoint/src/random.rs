//! Seeded random weights for any architecture: for benchmarks, tests and a fresh start.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use repvgg_arch::{ArchSpec, Form};

use crate::layout::expected_tensors;
use crate::tensor::{StateDict, Tensor};

/// Training-form weights with every BN statistic randomised (so that every branch's fusion is
/// exercised), scaled so activations neither explode nor vanish through 40 blocks.
pub fn training_weights(spec: &ArchSpec, seed: u64) -> StateDict {
    let mut rng = StdRng::seed_from_u64(seed);
    expected_tensors(spec, Form::Train)
        .into_iter()
        .map(|(key, shape)| {
            let n: usize = shape.iter().product();
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            let bound = (3.0 / fan_in as f32).sqrt() * 0.6;
            let (lo, hi) = match key.rsplit('.').next().unwrap_or("") {
                "running_var" => (0.5, 2.0),
                "running_mean" | "bias" => (-0.1, 0.1),
                "weight" if shape.len() == 1 => (0.5, 1.0),
                _ => (-bound, bound),
            };
            let data = (0..n).map(|_| rng.random_range(lo..hi)).collect();
            (key, Tensor::new(shape, data))
        })
        .collect()
}
