//! Deliberately naive layer implementations (one image, CHW, loops straight from the
//! definitions) that tests use as ground truth in `f64`. Never used on a hot path.

use num_traits::Float;

use crate::{BatchNorm, Kernel};

/// One image, row-major `(channels, height, width)`.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureMap<T> {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<T>,
}

#[derive(Clone, Copy, Debug)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
    /// Spacing of the kernel taps (1: a plain convolution).
    pub dilation: usize,
}

/// Direct grouped convolution with zero padding.
pub fn conv2d<T: Float>(
    input: &FeatureMap<T>,
    kernel: &Kernel<T>,
    bias: Option<&[T]>,
    p: Conv2dParams,
) -> FeatureMap<T> {
    let Conv2dParams {
        stride,
        padding,
        groups,
        dilation,
    } = p;
    assert_eq!(
        input.channels,
        kernel.in_per_group * groups,
        "input channels"
    );
    let out_h = (input.height + 2 * padding - dilation * (kernel.height - 1) - 1) / stride + 1;
    let out_w = (input.width + 2 * padding - dilation * (kernel.width - 1) - 1) / stride + 1;
    let out_per_group = kernel.out_channels / groups;
    let mut data = Vec::with_capacity(kernel.out_channels * out_h * out_w);
    for o in 0..kernel.out_channels {
        let group = o / out_per_group;
        for oy in 0..out_h {
            for ox in 0..out_w {
                let mut acc = bias.map_or(T::zero(), |b| b[o]);
                for i in 0..kernel.in_per_group {
                    let c = group * kernel.in_per_group + i;
                    for ky in 0..kernel.height {
                        for kx in 0..kernel.width {
                            let y = (oy * stride + ky * dilation) as isize - padding as isize;
                            let x = (ox * stride + kx * dilation) as isize - padding as isize;
                            if y < 0
                                || x < 0
                                || y >= input.height as isize
                                || x >= input.width as isize
                            {
                                continue;
                            }
                            let v = input.data
                                [(c * input.height + y as usize) * input.width + x as usize];
                            let w = kernel.data[((o * kernel.in_per_group + i) * kernel.height
                                + ky)
                                * kernel.width
                                + kx];
                            acc = acc + v * w;
                        }
                    }
                }
                data.push(acc);
            }
        }
    }
    FeatureMap {
        channels: kernel.out_channels,
        height: out_h,
        width: out_w,
        data,
    }
}

/// Eval-mode batch norm.
pub fn batch_norm<T: Float>(input: &FeatureMap<T>, bn: &BatchNorm<T>) -> FeatureMap<T> {
    let plane = input.height * input.width;
    let data = input
        .data
        .chunks_exact(plane)
        .enumerate()
        .flat_map(|(c, values)| {
            let sigma = (bn.running_var[c] + bn.eps).sqrt();
            values
                .iter()
                .map(move |&v| (v - bn.running_mean[c]) / sigma * bn.gamma[c] + bn.beta[c])
        })
        .collect();
    FeatureMap { data, ..*input }
}
