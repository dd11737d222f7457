//! The building blocks both model forms share.

use burn::module::{Flag, Module, Param, RunningState};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::module::{batch_norm, batch_norm_train};
use burn::tensor::{Device, Tensor, TensorData};

use repvgg_checkpoint::Tensor as CkptTensor;

use crate::training_ops;

/// A checkpoint tensor on a device.
pub fn to_device<const D: usize>(t: &CkptTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
}

/// A device tensor back as a checkpoint tensor.
pub fn from_device<const D: usize>(t: Tensor<D>) -> CkptTensor {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .try_into_vec::<f32>()
        .expect("model tensors are f32");
    CkptTensor::new(shape, data)
}

/// A convolution with PyTorch's symmetric zero padding.
pub fn conv2d(
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: usize,
    padding: usize,
    groups: usize,
) -> Conv2d {
    dilated_conv2d(weight, bias, stride, padding, 1, groups)
}

/// [`conv2d`] with its taps `dilation` apart.
pub fn dilated_conv2d(
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: usize,
    padding: usize,
    dilation: usize,
    groups: usize,
) -> Conv2d {
    let [_, _, kh, kw] = weight.dims();
    Conv2d {
        weight: Param::from_tensor(weight),
        bias: bias.map(Param::from_tensor),
        stride: [stride, stride],
        kernel_size: [kh, kw],
        dilation: [dilation, dilation],
        groups,
        padding: PaddingConfig2d::Explicit(padding, padding, padding, padding),
    }
}

/// Batch norm with PyTorch's semantics: in training mode it normalises with the batch's
/// biased variance but updates `running_var` with the unbiased one (n / (n - 1)), as
/// `torch.nn.BatchNorm2d` does. (burn's own `BatchNorm` stores the biased variance.)
#[derive(Module, Debug)]
pub struct BatchNorm2d {
    pub gamma: Param<Tensor<1>>,
    pub beta: Param<Tensor<1>>,
    pub running_mean: RunningState<Tensor<1>>,
    pub running_var: RunningState<Tensor<1>>,
    pub training: Param<Flag>,
    pub momentum: f64,
    pub eps: f64,
}

impl BatchNorm2d {
    pub fn new(
        gamma: Tensor<1>,
        beta: Tensor<1>,
        running_mean: Tensor<1>,
        running_var: Tensor<1>,
        eps: f64,
    ) -> Self {
        BatchNorm2d {
            gamma: Param::from_tensor(gamma),
            beta: Param::from_tensor(beta),
            running_mean: RunningState::new(running_mean),
            running_var: RunningState::new(running_var),
            training: Param::from_bool(true),
            momentum: 0.1,
            eps,
        }
    }

    /// Batch statistics on an autodiff device with training enabled; running statistics
    /// otherwise (`model.valid()`, or a plain device).
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        if input.device().is_autodiff() && self.training.is_enabled() {
            self.forward_train(input)
        } else {
            let device = input.device();
            batch_norm(
                input,
                self.gamma.val(),
                self.beta.val(),
                self.running_mean.value().to_device(&device),
                self.running_var.value().to_device(&device),
                self.eps,
            )
        }
    }

    fn forward_train(&self, input: Tensor<4>) -> Tensor<4> {
        let [n, _, h, w] = input.dims();
        let count = (n * h * w) as f64;
        let device = input.device();
        let (output, batch_mean, batch_var) = match training_ops::batch_norm_train(
            input.clone(),
            self.gamma.val(),
            self.beta.val(),
            self.eps,
        ) {
            Some(result) => result,
            None => {
                let r = batch_norm_train(input, self.gamma.val(), self.beta.val(), self.eps);
                (r.output, r.mean, r.variance)
            }
        };
        let unbiased = count / (count - 1.0).max(1.0);
        let m = self.momentum;
        let mean = self.running_mean.value_sync().to_device(&device);
        let var = self.running_var.value_sync().to_device(&device);
        self.running_mean.update(
            mean.mul_scalar(1.0 - m)
                .add(batch_mean.detach().mul_scalar(m))
                .detach(),
        );
        self.running_var.update(
            var.mul_scalar(1.0 - m)
                .add(batch_var.detach().mul_scalar(m * unbiased))
                .detach(),
        );
        output
    }
}

/// Squeeze-and-excitation as RepVGG-D2se uses it: global mean -> 1x1 conv (C -> C/16) -> ReLU
/// -> 1x1 conv (C/16 -> C) -> sigmoid -> channel scale. The mean is a true global mean (as in
/// timm); the official code's `avg_pool2d(kernel = width)` equals it on square maps only.
#[derive(Module, Debug)]
pub struct SqueezeExcite {
    pub down: Conv2d,
    pub up: Conv2d,
}

impl SqueezeExcite {
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let pooled = input.clone().mean_dim(3).mean_dim(2);
        let gate = sigmoid(self.up.forward(relu(self.down.forward(pooled))));
        input.mul(gate)
    }
}

/// Global average pool + linear, with PyTorch's `(classes, features)` weight layout kept.
#[derive(Module, Debug)]
pub struct Head {
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
}

impl Head {
    pub fn forward(&self, features: Tensor<4>) -> Tensor<2> {
        let pooled = global_pool(features);
        let classes = self.bias.dims()[0];
        pooled.matmul(self.weight.val().transpose()) + self.bias.val().reshape([1, classes])
    }
}

/// Global average pool to `(n, channels)`: a headless model's output.
pub fn global_pool(features: Tensor<4>) -> Tensor<2> {
    let [n, c, _, _] = features.dims();
    features.mean_dim(3).mean_dim(2).reshape([n, c])
}
