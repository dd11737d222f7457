//! Squeeze-and-excitation (RepVGG-D2se): a per-channel gate computed from the whole map, so
//! it runs after a layer's convolution and before its ReLU.

use crate::layout::channel_means_into;

pub(crate) struct SqueezeExcite {
    pub hidden: usize,
    /// `(hidden, C)` row-major.
    pub down: Vec<f32>,
    pub down_bias: Vec<f32>,
    /// `(C, hidden)` row-major.
    pub up: Vec<f32>,
    pub up_bias: Vec<f32>,
    /// QARepVGG's post-sum BN after the gate, as per-channel (scale, shift).
    pub post: Option<(Vec<f32>, Vec<f32>)>,
}

impl SqueezeExcite {
    /// Scales one NHWC image's `c` channels by `sigmoid(up(relu(down(mean))))`, then applies
    /// the block's ReLU. `scratch` holds the means, the bottleneck and the gate.
    pub fn apply(&self, image: &mut [f32], c: usize, scratch: &mut (Vec<f32>, Vec<f32>, Vec<f32>)) {
        let (pooled, hidden, gate) = scratch;
        pooled.resize(c, 0.0);
        channel_means_into(image, pooled);
        hidden.clear();
        hidden.extend(
            (0..self.hidden).map(|j| {
                (self.down_bias[j] + dot(&self.down[j * c..(j + 1) * c], pooled)).max(0.0)
            }),
        );
        gate.clear();
        gate.extend((0..c).map(|i| {
            let z = self.up_bias[i] + dot(&self.up[i * self.hidden..(i + 1) * self.hidden], hidden);
            1.0 / (1.0 + (-z).exp())
        }));
        // Scale (then QARepVGG's BN), then the block's ReLU, in one pass.
        match &self.post {
            None => {
                for pixel in image.chunks_exact_mut(c) {
                    pixel
                        .iter_mut()
                        .zip(gate.iter())
                        .for_each(|(v, g)| *v = (*v * g).max(0.0));
                }
            }
            Some((scale, shift)) => {
                for pixel in image.chunks_exact_mut(c) {
                    for (((v, g), s), t) in pixel.iter_mut().zip(gate.iter()).zip(scale).zip(shift)
                    {
                        *v = (*v * g * s + t).max(0.0);
                    }
                }
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
