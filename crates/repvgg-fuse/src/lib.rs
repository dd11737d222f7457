//! Structural re-parameterization, one formula per function.
//!
//! A RepVGG training block computes `BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)`. In eval mode each
//! `BN(conv(x))` is itself a convolution with bias:
//!
//! ```text
//! sigma  = sqrt(running_var + eps)
//! W'     = W * gamma / sigma                 (per output channel)
//! b'     = beta - running_mean * gamma / sigma
//! ```
//!
//! The 1x1 kernel becomes a 3x3 kernel by zero padding, the identity becomes a 3x3 kernel of shape
//! `(C, C/g, 3, 3)` with a 1 at `[i, i mod (C/g), 1, 1]`, and since convolution is additive in its
//! kernel the three fused convolutions sum to one: `W = W3 + W1 + Wid`, `b = b3 + b1 + bid`.
//!
//! A QARepVGG block (Chu et al. 2023) computes `BN_post(BN(conv3x3(x)) + conv1x1(x) + x)`: the
//! 1x1 has no BN and no bias, the identity no BN. Its sum is one convolution with the 3x3's
//! fused bias, `W = W3' + W1 + Wid`, `b = b3'`, and the post-sum BN folds into it like any BN
//! after a biased convolution:
//!
//! ```text
//! W'' = W * gamma / sigma,   b'' = beta + (b - running_mean) * gamma / sigma
//! ```
//!
//! Everything works on plain row-major slices (OIHW kernels) in `f32` or `f64`, so the checkpoint
//! converter, the framework models and the tests share this one implementation.

use num_traits::Float;

pub mod reference;

/// A convolution kernel, row-major `(out_channels, in_channels / groups, height, width)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel<T> {
    pub out_channels: usize,
    pub in_per_group: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<T>,
}

impl<T: Float> Kernel<T> {
    pub fn zeros(out_channels: usize, in_per_group: usize, height: usize, width: usize) -> Self {
        Kernel {
            out_channels,
            in_per_group,
            height,
            width,
            data: vec![T::zero(); out_channels * in_per_group * height * width],
        }
    }

    pub fn shape(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_per_group,
            self.height,
            self.width,
        ]
    }

    fn index(&self, o: usize, i: usize, y: usize, x: usize) -> usize {
        ((o * self.in_per_group + i) * self.height + y) * self.width + x
    }

    fn per_out_channel(&self) -> usize {
        self.in_per_group * self.height * self.width
    }
}

/// An eval-mode batch norm: `y = (x - mean) / sqrt(var + eps) * gamma + beta`.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm<T> {
    pub gamma: Vec<T>,
    pub beta: Vec<T>,
    pub running_mean: Vec<T>,
    pub running_var: Vec<T>,
    /// Read per layer: most code uses 1e-5, YOLOv7's RepConv 1e-3.
    pub eps: T,
}

impl<T: Float> BatchNorm<T> {
    /// `gamma / sigma` per channel.
    pub fn scale(&self) -> Vec<T> {
        self.gamma
            .iter()
            .zip(&self.running_var)
            .map(|(&g, &v)| g / (v + self.eps).sqrt())
            .collect()
    }
}

/// A convolution with bias: the result of every fusion step.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvBias<T> {
    pub kernel: Kernel<T>,
    pub bias: Vec<T>,
}

/// `W' = W * gamma / sigma`, `b' = beta - mu * gamma / sigma`, scaling `kernel` in place.
pub fn fuse_conv_bn<T: Float>(mut kernel: Kernel<T>, bn: &BatchNorm<T>) -> ConvBias<T> {
    assert_eq!(
        bn.gamma.len(),
        kernel.out_channels,
        "BN width != kernel outputs"
    );
    let scale = bn.scale();
    let n = kernel.per_out_channel();
    for (w, &s) in kernel.data.chunks_exact_mut(n).zip(&scale) {
        w.iter_mut().for_each(|w| *w = *w * s);
    }
    let bias = bn
        .beta
        .iter()
        .zip(&bn.running_mean)
        .zip(&scale)
        .map(|((&beta, &mu), &s)| beta - mu * s)
        .collect();
    ConvBias { kernel, bias }
}

/// Zero-pads a 1x1 kernel to 3x3 (its weight at the centre), so that a pad-1 3x3 convolution
/// with it equals the pad-0 1x1 convolution.
pub fn pad_1x1_to_3x3<T: Float>(kernel: &Kernel<T>) -> Kernel<T> {
    assert_eq!((kernel.height, kernel.width), (1, 1), "not a 1x1 kernel");
    let mut padded = Kernel::zeros(kernel.out_channels, kernel.in_per_group, 3, 3);
    for o in 0..kernel.out_channels {
        for i in 0..kernel.in_per_group {
            let at = padded.index(o, i, 1, 1);
            padded.data[at] = kernel.data[kernel.index(o, i, 0, 0)];
        }
    }
    padded
}

/// The identity map as a grouped 3x3 kernel: shape `(C, C/g, 3, 3)`, 1 at `[i, i mod (C/g), 1, 1]`.
pub fn identity_kernel<T: Float>(channels: usize, groups: usize) -> Kernel<T> {
    assert!(
        channels.is_multiple_of(groups),
        "{channels} channels, {groups} groups"
    );
    let in_per_group = channels / groups;
    let mut kernel = Kernel::zeros(channels, in_per_group, 3, 3);
    for i in 0..channels {
        let at = kernel.index(i, i % in_per_group, 1, 1);
        kernel.data[at] = T::one();
    }
    kernel
}

/// `W = Wa + Wb`, `b = ba + bb`, summed into `a`'s storage: at B3's widths an f64 kernel is
/// up to 42 MB, and with a fresh one per step converting B3 took 1.8x as long.
pub fn add<T: Float>(mut a: ConvBias<T>, b: &ConvBias<T>) -> ConvBias<T> {
    assert_eq!(a.kernel.shape(), b.kernel.shape(), "kernel shapes differ");
    a.kernel
        .data
        .iter_mut()
        .zip(&b.kernel.data)
        .for_each(|(x, &y)| *x = *x + y);
    a.bias
        .iter_mut()
        .zip(&b.bias)
        .for_each(|(x, &y)| *x = *x + y);
    a
}

/// The branches of one training-form block, in eval mode.
#[derive(Clone, Debug)]
pub struct TrainBlock<T> {
    /// 3x3 conv (no bias) and its BN.
    pub dense: (Kernel<T>, BatchNorm<T>),
    /// 1x1 conv (no bias) and its BN; absent in ablations and some derived models.
    pub one_by_one: Option<(Kernel<T>, BatchNorm<T>)>,
    /// The identity branch's BN, present when in == out channels and stride 1.
    pub identity: Option<BatchNorm<T>>,
    pub groups: usize,
}

/// The whole block: `fuse(3x3, bn) + pad(fuse(1x1, bn)) + fuse(identity, bn)`.
pub fn fuse_block<T: Float>(block: &TrainBlock<T>) -> ConvBias<T> {
    let (dense_kernel, dense_bn) = &block.dense;
    let mut fused = fuse_conv_bn(dense_kernel.clone(), dense_bn);
    if let Some((kernel, bn)) = &block.one_by_one {
        let one_by_one = fuse_conv_bn(kernel.clone(), bn);
        let padded = ConvBias {
            kernel: pad_1x1_to_3x3(&one_by_one.kernel),
            bias: one_by_one.bias,
        };
        fused = add(fused, &padded);
    }
    if let Some(bn) = &block.identity {
        let identity = identity_kernel(dense_kernel.out_channels, block.groups);
        fused = add(fused, &fuse_conv_bn(identity, bn));
    }
    fused
}

/// A BN applied to the output of a convolution with bias, folded into it:
/// `W' = W * gamma / sigma`, `b' = beta + (b - mu) * gamma / sigma`.
pub fn fold_bn_after<T: Float>(conv: ConvBias<T>, bn: &BatchNorm<T>) -> ConvBias<T> {
    let ConvBias { kernel, bias } = conv;
    let mut folded = fuse_conv_bn(kernel, bn);
    let scale = bn.scale();
    for ((b, &before), &s) in folded.bias.iter_mut().zip(&bias).zip(&scale) {
        // fuse_conv_bn gave beta - mu * s; the conv's own bias passes through the BN too.
        *b = *b + before * s;
    }
    folded
}

/// The branches of one QARepVGG training block (the authors' `QARepVGGBlockV2`), in eval mode.
#[derive(Clone, Debug)]
pub struct QaTrainBlock<T> {
    /// 3x3 conv (no bias) and its BN.
    pub dense: (Kernel<T>, BatchNorm<T>),
    /// The bias-free 1x1 conv, no BN.
    pub one_by_one: Kernel<T>,
    /// Whether the identity (no BN) is summed: in == out channels and stride 1.
    pub identity: bool,
    /// The BN after the sum.
    pub post: BatchNorm<T>,
    pub groups: usize,
}

/// The QARepVGG block's branches without the post-sum BN: `fuse(3x3, bn) + pad(1x1) +
/// identity`. With SE the BN follows the SE gate and cannot be folded into the conv: the
/// deploy form keeps it after SE.
pub fn fuse_qa_branches<T: Float>(block: &QaTrainBlock<T>) -> ConvBias<T> {
    let (dense_kernel, dense_bn) = &block.dense;
    let mut sum = fuse_conv_bn(dense_kernel.clone(), dense_bn);
    let zero_bias = vec![T::zero(); dense_kernel.out_channels];
    let padded = ConvBias {
        kernel: pad_1x1_to_3x3(&block.one_by_one),
        bias: zero_bias.clone(),
    };
    sum = add(sum, &padded);
    if block.identity {
        let identity = ConvBias {
            kernel: identity_kernel(dense_kernel.out_channels, block.groups),
            bias: zero_bias,
        };
        sum = add(sum, &identity);
    }
    sum
}

/// The whole QARepVGG block (no SE): `fold(post, fuse_qa_branches(block))`.
pub fn fuse_qa_block<T: Float>(block: &QaTrainBlock<T>) -> ConvBias<T> {
    fold_bn_after(fuse_qa_branches(block), &block.post)
}

#[cfg(test)]
mod tests {
    use super::reference::{Conv2dParams, FeatureMap, batch_norm, conv2d};
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random_kernel(rng: &mut StdRng, o: usize, i: usize, k: usize) -> Kernel<f64> {
        Kernel {
            out_channels: o,
            in_per_group: i,
            height: k,
            width: k,
            data: (0..o * i * k * k)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
        }
    }

    fn random_bn(rng: &mut StdRng, c: usize, eps: f64) -> BatchNorm<f64> {
        BatchNorm {
            gamma: (0..c).map(|_| rng.random_range(0.5..1.5)).collect(),
            beta: (0..c).map(|_| rng.random_range(-0.5..0.5)).collect(),
            running_mean: (0..c).map(|_| rng.random_range(-0.5..0.5)).collect(),
            running_var: (0..c).map(|_| rng.random_range(0.1..2.0)).collect(),
            eps,
        }
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// The QARepVGG block, the same way: `BN_post(BN(conv3x3 x) + conv1x1 x + x)` by direct
    /// convolution against the one fused conv, f64 on both sides (1e-12 relative).
    #[test]
    fn fused_qa_block_equals_its_branches() {
        let mut rng = StdRng::seed_from_u64(11);
        for case in 0..60 {
            let groups = [1, 2, 4][case % 3];
            let per_group_in = rng.random_range(1..4);
            let in_channels = groups * per_group_in;
            let stride = if case % 4 == 0 { 2 } else { 1 };
            let out_channels = if stride == 1 && case % 2 == 0 {
                in_channels
            } else {
                groups * rng.random_range(1..4)
            };
            let identity = in_channels == out_channels && stride == 1;
            let eps = [1e-5, 1e-3, 0.1][case % 3];
            let (h, w) = (rng.random_range(1..9), rng.random_range(1..9));
            let input = FeatureMap {
                channels: in_channels,
                height: h,
                width: w,
                data: (0..in_channels * h * w)
                    .map(|_| rng.random_range(-2.0..2.0))
                    .collect(),
            };
            let block = QaTrainBlock {
                dense: (
                    random_kernel(&mut rng, out_channels, per_group_in, 3),
                    random_bn(&mut rng, out_channels, eps),
                ),
                one_by_one: random_kernel(&mut rng, out_channels, per_group_in, 1),
                identity,
                post: random_bn(&mut rng, out_channels, eps),
                groups,
            };
            let params = |padding| Conv2dParams {
                dilation: 1,
                stride,
                padding,
                groups,
            };
            let (k3, bn3) = &block.dense;
            let mut sum = batch_norm(&conv2d(&input, k3, None, params(1)), bn3);
            let one = conv2d(&input, &block.one_by_one, None, params(0));
            sum.data
                .iter_mut()
                .zip(&one.data)
                .for_each(|(e, o)| *e += o);
            if identity {
                sum.data
                    .iter_mut()
                    .zip(&input.data)
                    .for_each(|(e, x)| *e += x);
            }
            let expected = batch_norm(&sum, &block.post);
            let fused = fuse_qa_block(&block);
            let ours = conv2d(&input, &fused.kernel, Some(&fused.bias), params(1));
            let scale = expected.data.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
            let err = max_abs_diff(&ours.data, &expected.data) / scale;
            assert!(err < 1e-12, "case {case}: {err:e}");
        }
    }

    /// Property: for random shapes, groups, strides, eps and odd map sizes, the fused 3x3 conv
    /// equals the sum of the three eval-mode branches computed by direct convolution. Both sides
    /// are f64, so the only difference is rounding: 1e-12 relative.
    #[test]
    fn fused_block_equals_sum_of_branches() {
        let mut rng = StdRng::seed_from_u64(7);
        for case in 0..60 {
            let groups = [1, 2, 4][case % 3];
            let per_group_in = rng.random_range(1..4);
            let in_channels = groups * per_group_in;
            let stride = if case % 4 == 0 { 2 } else { 1 };
            let out_channels = if stride == 1 && case % 2 == 0 {
                in_channels
            } else {
                groups * rng.random_range(1..4)
            };
            let has_identity = in_channels == out_channels && stride == 1;
            let eps = [1e-5, 1e-3, 0.1][case % 3];
            let (h, w) = (rng.random_range(1..9), rng.random_range(1..9));
            let input = FeatureMap {
                channels: in_channels,
                height: h,
                width: w,
                data: (0..in_channels * h * w)
                    .map(|_| rng.random_range(-2.0..2.0))
                    .collect(),
            };
            let block = TrainBlock {
                dense: (
                    random_kernel(&mut rng, out_channels, per_group_in, 3),
                    random_bn(&mut rng, out_channels, eps),
                ),
                one_by_one: Some((
                    random_kernel(&mut rng, out_channels, per_group_in, 1),
                    random_bn(&mut rng, out_channels, eps),
                )),
                identity: has_identity.then(|| random_bn(&mut rng, in_channels, eps)),
                groups,
            };

            let params = |padding| Conv2dParams {
                dilation: 1,
                stride,
                padding,
                groups,
            };
            let (k3, bn3) = &block.dense;
            let (k1, bn1) = block.one_by_one.as_ref().unwrap();
            let mut expected = batch_norm(&conv2d(&input, k3, None, params(1)), bn3);
            let one = batch_norm(&conv2d(&input, k1, None, params(0)), bn1);
            expected
                .data
                .iter_mut()
                .zip(&one.data)
                .for_each(|(e, o)| *e += o);
            if let Some(bn) = &block.identity {
                let id = batch_norm(&input, bn);
                expected
                    .data
                    .iter_mut()
                    .zip(&id.data)
                    .for_each(|(e, o)| *e += o);
            }

            let fused = fuse_block(&block);
            let got = conv2d(&input, &fused.kernel, Some(&fused.bias), params(1));
            assert_eq!((got.height, got.width), (expected.height, expected.width));
            let scale = expected.data.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let err = max_abs_diff(&got.data, &expected.data) / scale;
            assert!(err < 1e-12, "case {case}: relative error {err}");
        }
    }

    #[test]
    fn identity_kernel_is_the_identity_for_every_grouping() {
        let mut rng = StdRng::seed_from_u64(3);
        for groups in [1, 2, 3, 6] {
            let c = 6;
            let input = FeatureMap {
                channels: c,
                height: 4,
                width: 5,
                data: (0..c * 20).map(|_| rng.random_range(-1.0..1.0)).collect(),
            };
            let kernel = identity_kernel::<f64>(c, groups);
            assert_eq!(kernel.shape(), [c, c / groups, 3, 3]);
            let params = Conv2dParams {
                dilation: 1,
                stride: 1,
                padding: 1,
                groups,
            };
            let out = conv2d(&input, &kernel, None, params);
            assert_eq!(out.data, input.data);
        }
    }

    #[test]
    fn conv_bn_fusion_follows_the_formula() {
        let kernel = Kernel {
            out_channels: 2,
            in_per_group: 1,
            height: 1,
            width: 1,
            data: vec![2.0f32, -3.0],
        };
        let bn = BatchNorm {
            gamma: vec![1.5, 0.5],
            beta: vec![0.25, -1.0],
            running_mean: vec![1.0, 2.0],
            running_var: vec![3.0, 0.0],
            eps: 1.0,
        };
        let fused = fuse_conv_bn(kernel.clone(), &bn);
        // sigma = [2, 1]; gamma/sigma = [0.75, 0.5]
        assert_eq!(fused.kernel.data, vec![1.5, -1.5]);
        assert_eq!(fused.bias, vec![0.25 - 0.75, -1.0 - 1.0]);
    }
}
