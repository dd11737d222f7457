//! The engine-backed training operations against burn's own: the same outputs and the same
//! gradients for every convolution the training form has (3x3 and 1x1, stride 1 and 2,
//! groups) and for batch norm with batch statistics. (`repvgg-train`'s `train_step` test holds
//! the whole step to PyTorch as well.)

use burn::tensor::module::batch_norm_train as burn_batch_norm_train;
use burn::tensor::{Device, Distribution, Tensor};
use repvgg_burn::layers::conv2d;
use repvgg_burn::training_ops;

fn device() -> Device {
    repvgg_burn::default_device().autodiff()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.inner().into_data().try_into_vec::<f32>().unwrap()
}

/// Worst difference relative to the larger tensor's largest magnitude.
fn relative_difference(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a
        .iter()
        .chain(b)
        .fold(1e-30f64, |m, &v| m.max(v.abs() as f64));
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).abs() / scale)
        .fold(0.0, f64::max)
}

/// Both are f32 with different summation orders over at most a few thousand terms: a few
/// 1e-7 of the scale. 1e-5 leaves room and still catches a wrong tap or channel (>1e-2).
const TOLERANCE: f64 = 1e-5;

#[test]
fn convolutions_and_their_gradients_match_burn() {
    let device = device();
    // (batch, in, size, out, kernel, stride, padding, groups)
    let cases = [
        (3, 8, 9, 8, 3, 1, 1, 1),
        (3, 8, 9, 16, 3, 2, 1, 1),
        (3, 8, 9, 8, 1, 1, 0, 1),
        (3, 8, 10, 16, 1, 2, 0, 1),
        (2, 8, 7, 8, 3, 1, 1, 4),
        (2, 12, 8, 12, 3, 2, 1, 2),
        (2, 3, 16, 8, 3, 2, 1, 1),
    ];
    for (batch, cin, size, cout, kernel, stride, padding, groups) in cases {
        let x: Tensor<4> = Tensor::random(
            [batch, cin, size, size + 1],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let w: Tensor<4> = Tensor::random(
            [cout, cin / groups, kernel, kernel],
            Distribution::Normal(0.0, 0.3),
            &device,
        );
        let dy_shape = {
            let conv = conv2d(w.clone(), None, stride, padding, groups);
            conv.forward(x.clone()).dims()
        };
        let upstream: Tensor<4> = Tensor::random(dy_shape, Distribution::Normal(0.0, 1.0), &device);

        let run = |fast: bool| {
            let x = x.clone().detach().require_grad();
            let conv = conv2d(
                w.clone().detach().require_grad(),
                None,
                stride,
                padding,
                groups,
            );
            let y = if fast {
                training_ops::conv2d(&conv, x.clone())
            } else {
                conv.forward(x.clone())
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let dx = x.grad(&grads).unwrap();
            let dw = conv.weight.val().grad(&grads).unwrap();
            (values(y), values(dx), values(dw))
        };
        let (ours, burns) = (run(true), run(false));
        let case = format!("{cin}->{cout} k{kernel} s{stride} g{groups}");
        for (what, a, b) in [
            ("output", &ours.0, &burns.0),
            ("input gradient", &ours.1, &burns.1),
            ("weight gradient", &ours.2, &burns.2),
        ] {
            let d = relative_difference(a, b);
            assert!(d < TOLERANCE, "{case} {what}: relative difference {d:e}");
        }
    }
}

#[test]
fn batch_norm_and_its_gradients_match_burn() {
    let device = device();
    for (batch, channels, h, w) in [(4, 6, 5, 7), (2, 3, 2, 2), (8, 16, 2, 2), (32, 4, 16, 16)] {
        // An offset mean, so a variance computed as E[x^2] - mean^2 would lose digits.
        let x: Tensor<4> = Tensor::random(
            [batch, channels, h, w],
            Distribution::Normal(3.0, 0.5),
            &device,
        );
        let gamma: Tensor<1> = Tensor::random([channels], Distribution::Normal(1.0, 0.2), &device);
        let beta: Tensor<1> = Tensor::random([channels], Distribution::Normal(0.0, 0.2), &device);
        let upstream: Tensor<4> = Tensor::random(
            [batch, channels, h, w],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let run = |fast: bool| {
            let x = x.clone().detach().require_grad();
            let gamma = gamma.clone().detach().require_grad();
            let beta = beta.clone().detach().require_grad();
            let (y, mean, var) = if fast {
                training_ops::batch_norm_train(x.clone(), gamma.clone(), beta.clone(), 1e-5)
                    .expect("the engine runs batch norm on flex")
            } else {
                let r = burn_batch_norm_train(x.clone(), gamma.clone(), beta.clone(), 1e-5);
                (r.output, r.mean, r.variance)
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            [
                values(y),
                values(mean),
                values(var),
                values(x.grad(&grads).unwrap()),
                values(gamma.grad(&grads).unwrap()),
                values(beta.grad(&grads).unwrap()),
            ]
        };
        let (ours, burns) = (run(true), run(false));
        let names = ["output", "mean", "variance", "dx", "dgamma", "dbeta"];
        for ((what, a), b) in names.iter().zip(&ours).zip(&burns) {
            let d = relative_difference(a, b);
            eprintln!("{batch}x{channels}x{h}x{w} {what}: {d:.1e}");
            assert!(
                d < TOLERANCE,
                "{batch}x{channels}x{h}x{w} {what}: relative difference {d:e}"
            );
        }
    }
}
