//! The training form's convolutions and batch norms on the CPU kernels of `repvgg-kernels`
//! (`repvgg_kernels::training`), as custom burn operations with their own backward passes.
//!
//! On burn's CPU backend (`flex`) a training step spends most of its time in convolutions and
//! batch norms. burn's convolution and its backward pass (a transposed convolution for the
//! input, another product for the weight) run well below the machine's speed, and its batch
//! norm permutes and copies its input several times. [`conv2d`] and [`batch_norm_train`] run
//! them on those kernels instead, on flex and on autodiff-over-flex; anywhere else (a GPU
//! backend, a convolution with bias, another dtype) burn's own operations run, with the same
//! results.

use std::borrow::Cow;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, Dispatch, Flex, TensorMetadata, backend_extension,
};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::{DType, Device, Tensor, TensorData};

use repvgg_kernels::Isa;
use repvgg_kernels::training::batch_norm;
use repvgg_kernels::training::conv::{self, ConvShape};

/// Why the kernels' shape errors cannot happen inside these operations: burn's operation
/// signatures have no error path, so [`conv2d`] and [`batch_norm_train`] check shapes before
/// dispatching here and leave anything inconsistent to burn's own operations.
const CHECKED: &str = "shapes checked before dispatch";

/// `conv.forward(x)`, on the kernels where it applies (see the module docs).
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    match fast_geometry(conv, &x) {
        Some((stride, padding)) => {
            let out = <Dispatch as TrainingOps>::nchw_conv2d(
                x.into_dispatch(),
                conv.weight.val().into_dispatch(),
                stride,
                padding,
                conv.groups,
            );
            Tensor::from_dispatch(out)
        }
        None => conv.forward(x),
    }
}

/// The stride and padding of a convolution the kernels run: on flex, f32, no bias, square
/// kernel, equal strides, no dilation, the same padding on every side.
fn fast_geometry(conv: &Conv2d, x: &Tensor<4>) -> Option<(usize, usize)> {
    let on_flex = on_flex(&x.device());
    let [kh, kw] = conv.kernel_size;
    let [sh, sw] = conv.stride;
    let padding = match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right)
            if top == left && left == bottom && bottom == right =>
        {
            top
        }
        PaddingConfig2d::Valid => 0,
        _ => return None,
    };
    // Shapes the kernels would refuse go to burn's own operation, which reports them its way:
    // past this check the kernels' shape errors cannot happen.
    let [batch, in_channels, height, width] = x.dims();
    let weight = conv.weight.dims();
    let shape = ConvShape {
        batch,
        in_channels,
        height,
        width,
        out_channels: weight[0],
        kernel: kh,
        stride: sh,
        padding,
        groups: conv.groups,
    };
    let consistent = shape.check().is_ok() && weight == shape.weight_dims();
    (on_flex
        && consistent
        && x.dtype() == DType::F32
        && conv.bias.is_none()
        && kh == kw
        && sh == sw
        && conv.dilation == [1, 1])
    .then_some((sh, padding))
}

/// Batch norm with batch statistics, as `burn::tensor::module::batch_norm_train`: the output,
/// then the batch's mean and biased variance per channel (detached). `None` where the kernels
/// do not run it (see the module docs).
pub fn batch_norm_train(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> Option<(Tensor<4>, Tensor<1>, Tensor<1>)> {
    let channels = x.dims()[1];
    // Mismatched parameters go to burn's own batch norm, which reports them its way.
    if !on_flex(&x.device())
        || x.dtype() != DType::F32
        || gamma.dims() != [channels]
        || beta.dims() != [channels]
    {
        return None;
    }
    let stats: Tensor<2> = Tensor::from_dispatch(<Dispatch as TrainingOps>::channel_stats(
        x.clone().detach().into_dispatch(),
    ));
    let output = Tensor::from_dispatch(<Dispatch as TrainingOps>::batch_norm_with_stats(
        x.into_dispatch(),
        stats.clone().into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    ));
    let mean = stats.clone().narrow(0, 0, 1).reshape([channels]);
    let variance = stats.narrow(0, 1, 1).reshape([channels]);
    Some((output, mean, variance))
}

fn on_flex(device: &Device) -> bool {
    device.clone().inner() == Device::flex()
}

/// Operations burn does not have in these forms.
#[backend_extension(Flex, Autodiff)]
pub trait TrainingOps: Backend {
    /// NCHW convolution without bias, square kernel.
    fn nchw_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> FloatTensor<Self>;

    /// `[2, C]`: per channel of an NCHW batch, the mean, then the biased variance. Not
    /// differentiable (batch norm's backward pass accounts for the statistics).
    fn channel_stats(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// Batch norm of `x` with the statistics `channel_stats(x)`, differentiable in x (the
    /// statistics' dependence on x included), gamma and beta.
    fn batch_norm_with_stats(
        x: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
}

impl TrainingOps for Flex {
    fn nchw_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> FlexTensor {
        let shape = conv_shape(&x, &weight, stride, padding, groups);
        let y = conv::forward(Isa::best(), &shape, &values(&x), &values(&weight)).expect(CHECKED);
        flex_tensor(y, &shape.output_dims())
    }

    fn channel_stats(x: FlexTensor) -> FlexTensor {
        let [batch, channels, _, _] = x.shape().dims();
        let stats = batch_norm::channel_stats(&values(&x), batch, channels).expect(CHECKED);
        flex_tensor(stats, &[2, channels])
    }

    fn batch_norm_with_stats(
        x: FlexTensor,
        stats: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
    ) -> FlexTensor {
        let dims: [usize; 4] = x.shape().dims();
        let y = batch_norm::batch_norm(
            &values(&x),
            dims[0],
            &values(&stats),
            &values(&gamma),
            &values(&beta),
            eps,
        )
        .expect(CHECKED);
        flex_tensor(y, &dims)
    }
}

impl<C: CheckpointStrategy> TrainingOps for Autodiff<Flex, C> {
    fn nchw_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct NchwConvBackward;

        impl Backward<Flex, 2> for NchwConvBackward {
            type State = (NodeId, NodeId, ConvShape);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_weight] = ops.parents;
                let out_grad = grads.consume::<Flex>(&ops.node);
                let (x_state, weight_state, shape) = ops.state;
                let out_grad = values(&out_grad);
                if let Some(node) = node_x {
                    let weight = checkpointer.retrieve_node_output::<FlexTensor>(weight_state);
                    let grad = conv::input_grad(Isa::best(), &shape, &values(&weight), &out_grad)
                        .expect(CHECKED);
                    grads.register::<Flex>(node.id, flex_tensor(grad, &shape.input_dims()));
                }
                if let Some(node) = node_weight {
                    let x = checkpointer.retrieve_node_output::<FlexTensor>(x_state);
                    let grad = conv::weight_grad(Isa::best(), &shape, &values(&x), &out_grad)
                        .expect(CHECKED);
                    grads.register::<Flex>(node.id, flex_tensor(grad, &shape.weight_dims()));
                }
            }
        }

        let shape = conv_shape(x.primitive(), weight.primitive(), stride, padding, groups);
        match NchwConvBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                let y = Flex::nchw_conv2d(
                    x.into_primitive(),
                    weight.into_primitive(),
                    stride,
                    padding,
                    groups,
                );
                prep.finish((x_state, weight_state, shape), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::nchw_conv2d(
                x.into_primitive(),
                weight.into_primitive(),
                stride,
                padding,
                groups,
            )),
        }
    }

    fn channel_stats(x: FloatTensor<Self>) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(Flex::channel_stats(x.into_primitive()))
    }

    fn batch_norm_with_stats(
        x: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct BatchNormBackward;

        impl Backward<Flex, 3> for BatchNormBackward {
            /// x, its statistics, gamma, eps.
            type State = (FlexTensor, FlexTensor, FlexTensor, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_gamma, node_beta] = ops.parents;
                let out_grad = grads.consume::<Flex>(&ops.node);
                let (x, stats, gamma, eps) = ops.state;
                let dims: [usize; 4] = x.shape().dims();
                let (dx, dgamma, dbeta) = batch_norm::batch_norm_grad(
                    &values(&x),
                    dims[0],
                    &values(&stats),
                    &values(&gamma),
                    eps,
                    &values(&out_grad),
                )
                .expect(CHECKED);
                let channels = [dims[1]];
                for (node, grad, shape) in [
                    (node_x, dx, &dims[..]),
                    (node_gamma, dgamma, &channels[..]),
                    (node_beta, dbeta, &channels[..]),
                ] {
                    if let Some(node) = node {
                        grads.register::<Flex>(node.id, flex_tensor(grad, shape));
                    }
                }
            }
        }

        let stats = stats.into_primitive();
        match BatchNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, gamma) = (x.into_primitive(), gamma.into_primitive());
                let y = Flex::batch_norm_with_stats(
                    x.clone(),
                    stats.clone(),
                    gamma.clone(),
                    beta.into_primitive(),
                    eps,
                );
                prep.finish((x, stats, gamma, eps), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::batch_norm_with_stats(
                x.into_primitive(),
                stats,
                gamma.into_primitive(),
                beta.into_primitive(),
                eps,
            )),
        }
    }
}

fn conv_shape(
    x: &FlexTensor,
    weight: &FlexTensor,
    stride: usize,
    padding: usize,
    groups: usize,
) -> ConvShape {
    let [batch, in_channels, height, width] = x.shape().dims();
    let [out_channels, _, kernel, _] = weight.shape().dims();
    ConvShape {
        batch,
        in_channels,
        height,
        width,
        out_channels,
        kernel,
        stride,
        padding,
        groups,
    }
}

/// A contiguous f32 flex tensor of these values and dimensions.
fn flex_tensor(values: Vec<f32>, dims: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, dims.to_vec()))
}

/// A flex tensor's f32 values in row-major order (copied only when it is a strided view).
fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(values) => Cow::Borrowed(values),
        None => Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("contiguous")
                .to_vec(),
        ),
    }
}
