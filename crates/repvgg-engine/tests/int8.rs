//! The INT8 engine on the reference fixtures, against two references:
//! - an integer model written here with plain loops from the quantization's definition
//!   (u8 activations, i8 per-channel weights, i32 sums, one float multiply and add per
//!   requantization): the engine must agree exactly on every activation, so its logits
//!   agree to float rounding of the (identical) float head, 1e-6 relative;
//! - the float engine: INT8 rounds each activation to half a step of its layer's scale, so the
//!   logits move by a few steps' worth; with min/max scales from the same images, we require
//!   the error within 5% of the largest logit (10% with 7-bit weights, rounded twice as
//!   coarsely; the fixtures reach 1-2% and 4-5%) and the same top-1 on most images.

use repvgg_checkpoint::Checkpoint;
use repvgg_checkpoint::quantized::{ActivationQuant, QuantizedModel};
use repvgg_engine::{Calibration, Calibrator, Engine, Int8Engine, Isa, Workspace};
use repvgg_kernels::int8::Int8Kernels;

fn fixture_batch(config: &str) -> (Vec<f32>, usize, usize, usize) {
    let io = repvgg_testing::read_f64(&repvgg_testing::fixture(config, "io.safetensors"));
    let (shape, values) = &io["input"];
    let (n, h, w) = (shape[0], shape[2], shape[3]);
    (values.iter().map(|&v| v as f32).collect(), n, h, w)
}

/// The quantized model computed with plain loops, NCHW float in, logits out.
fn integer_reference(
    model: &QuantizedModel,
    input: &[f32],
    n: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let acts = &model.info.activations;
    let c = model.spec.in_channels;
    // NHWC u8.
    let mut x: Vec<u8> = vec![0; n * h * w * c];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                x[(i * h * w + p) * c + ch] = acts[0].quantize(input[(i * c + ch) * h * w + p]);
            }
        }
    }
    let (mut h, mut w) = (h, w);
    for (l, (b, conv)) in model.spec.blocks().iter().zip(&model.convs).enumerate() {
        let (inq, outq): (ActivationQuant, ActivationQuant) = (acts[l], acts[l + 1]);
        let (s, d) = (b.stride, b.dilation);
        let (oh, ow) = ((h - 1) / s + 1, (w - 1) / s + 1);
        let (cin, cout, g) = (b.in_channels, b.out_channels, b.groups);
        let (cin_g, cout_g) = (cin / g, cout / g);
        let mut y = vec![0u8; n * oh * ow * cout];
        for i in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    for o in 0..cout {
                        let unit = inq.scale * conv.weight_scale[o];
                        let mut sum = (conv.bias[o] as f64 / unit as f64).round() as i32;
                        let group = o / cout_g;
                        for ci in 0..cin_g {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let iy = (oy * s + ky * d) as isize - d as isize;
                                    let ix = (ox * s + kx * d) as isize - d as isize;
                                    let q =
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize
                                        {
                                            inq.zero_point
                                        } else {
                                            x[((i * h + iy as usize) * w + ix as usize) * cin
                                                + group * cin_g
                                                + ci]
                                        };
                                    let wq = conv.weight[((o * cin_g + ci) * 3 + ky) * 3 + kx];
                                    sum += (q as i32 - inq.zero_point as i32) * wq as i32;
                                }
                            }
                        }
                        let v = sum as f32 * (unit / outq.scale) + outq.zero_point as f32;
                        y[((i * oh + oy) * ow + ox) * cout + o] =
                            v.clamp(outq.zero_point as f32, 255.0).round_ties_even() as u8;
                    }
                }
            }
        }
        x = y;
        (h, w) = (oh, ow);
    }
    let out = *acts.last().unwrap();
    let features = model.spec.feature_width();
    let (weight, bias) = model.head.as_ref().unwrap();
    let classes = bias.data.len();
    let mut logits = vec![0f32; n * classes];
    for i in 0..n {
        let pooled: Vec<f32> = (0..features)
            .map(|ch| {
                let sum: i64 = (0..h * w)
                    .map(|p| x[(i * h * w + p) * features + ch] as i64 - out.zero_point as i64)
                    .sum();
                out.scale * (sum as f64 / (h * w) as f64) as f32
            })
            .collect();
        for k in 0..classes {
            logits[i * classes + k] = bias.data[k]
                + (0..features)
                    .map(|ch| weight.data[k * features + ch] * pooled[ch])
                    .sum::<f32>();
        }
    }
    logits
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

#[test]
fn int8_agrees_with_the_integer_reference_and_stays_near_float() {
    for config in ["tiny", "tiny_g2", "tiny_nonsquare"] {
        let ckpt = Checkpoint::load(
            &repvgg_testing::fixture(config, "deploy_official.safetensors"),
            None,
        )
        .unwrap();
        let float = Engine::from_checkpoint(&ckpt, 1e-5).unwrap();
        let (input, n, h, w) = fixture_batch(config);
        let mut calibrator = Calibrator::new(Calibration::MinMax, &float);
        calibrator.observe(&float, &input, n, h, w).unwrap();
        let float_logits = float
            .forward(&input, n, h, w, &mut Workspace::default())
            .unwrap();
        // 8-bit weights, and the 7-bit ones the AVX2 kernel takes (so that it runs too); every
        // kernel set the machine has, forced, and every instruction-set cap.
        for limit in [127, 63] {
            let activations = calibrator.activations();
            let model =
                QuantizedModel::quantize(&ckpt, activations, "minmax", n, limit, &[]).unwrap();
            let reference = integer_reference(&model, &input, n, h, w);
            let classes = model.spec.num_classes;
            let mut engines: Vec<(String, Int8Engine)> = Vec::new();
            for kernels in Int8Kernels::available() {
                match Int8Engine::with_kernels(&model, kernels) {
                    Ok(engine) => engines.push((format!("forced {kernels}"), engine)),
                    Err(e) => assert!(
                        kernels == Int8Kernels::Avx2 && limit == 127,
                        "{kernels}: {e}"
                    ),
                }
            }
            for isa in Isa::available() {
                engines.push((
                    format!("cap {isa}"),
                    Int8Engine::new(&model, Some(isa)).unwrap(),
                ));
            }
            for (isa, engine) in engines {
                let ours = engine.forward(&input, n, h, w).unwrap();
                // The same batch with every layer split across the threads (forward takes whole
                // images per thread when the batch has one for each).
                let split = engine
                    .forward_with(&input, n, h, w, |_, _, _, _| {})
                    .unwrap();
                assert_eq!(split, ours, "{config} {isa}: the two threadings differ");
                let diff = ours
                    .iter()
                    .zip(&reference)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    diff <= 1e-6 * max_abs(&reference),
                    "{config} {isa} ({} kernels): {diff} from the integer reference",
                    engine.kernels()
                );
                let drift = ours
                    .iter()
                    .zip(&float_logits)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                // 7-bit weights are rounded twice as coarsely: twice the allowance.
                assert!(
                    drift <= 0.05 * (127.0 / limit as f32) * max_abs(&float_logits),
                    "{config} {isa}: INT8 {drift} from float (max logit {})",
                    max_abs(&float_logits)
                );
                eprintln!(
                    "{config} {isa} limit {limit} ({} kernels): drift from float {:.2e} of max logit",
                    engine.kernels(),
                    drift / max_abs(&float_logits)
                );
                let argmax = |v: &[f32]| {
                    v.iter()
                        .enumerate()
                        .fold(0, |b, (i, x)| if *x > v[b] { i } else { b })
                };
                let same = ours
                    .chunks_exact(classes)
                    .zip(float_logits.chunks_exact(classes))
                    .filter(|(a, b)| argmax(a) == argmax(b))
                    .count();
                assert!(same * 4 >= n * 3, "{config}: top-1 agrees on {same} of {n}");
            }
        }
    }
}

/// A layer with few positions and many channels (the last stage's shape) is split by
/// columns among threads, and a grouped one by groups; stride-1 layers of 64 and 128
/// channels are read straight from the image where the machine has AMX (tasks that cross
/// from one image to the next included); all still agree exactly.
#[test]
fn column_split_and_grouped_layers_agree_with_the_integer_reference() {
    use repvgg_arch::{ArchSpec, Form};
    for (spec, (n, h, w)) in [
        (
            "depths=1,1,1,1;widths=8,16,16,160;stem=8;classes=10",
            (2, 19, 23),
        ),
        (
            "depths=1,2,2,1;widths=16,32,64,96;stem=16;groups=2:2,4:4;classes=7",
            (2, 19, 23),
        ),
        // 10x10 and 5x5 maps: grids 12 and 7 wide, so tasks of 64 positions start mid-row,
        // and in the second image.
        (
            "depths=1,3,2,1;widths=16,64,128,64;stem=16;classes=5",
            (2, 40, 40),
        ),
    ] {
        let spec = ArchSpec::parse(spec).unwrap();
        let tensors = repvgg_checkpoint::random::training_weights(&spec, 3);
        let ckpt = Checkpoint::from_state_dict(spec, Form::Train, tensors)
            .unwrap()
            .to_deploy(1e-5)
            .unwrap();
        let float = Engine::from_checkpoint(&ckpt, 1e-5).unwrap();
        let input: Vec<f32> = (0..n * 3 * h * w)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let mut calibrator = Calibrator::new(Calibration::MinMax, &float);
        calibrator.observe(&float, &input, n, h, w).unwrap();
        let model =
            QuantizedModel::quantize(&ckpt, calibrator.activations(), "minmax", n, 127, &[])
                .unwrap();
        let reference = integer_reference(&model, &input, n, h, w);
        for isa in Isa::available() {
            let engine = Int8Engine::new(&model, Some(isa)).unwrap();
            let ours = engine.forward(&input, n, h, w).unwrap();
            // Layers split across threads, by rows and (the wide last stage) by columns.
            let split = engine
                .forward_with(&input, n, h, w, |_, _, _, _| {})
                .unwrap();
            assert_eq!(split, ours, "{isa}: the two threadings differ");
            let diff = ours
                .iter()
                .zip(&reference)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-5 * max_abs(&reference), "{isa}: {diff}");
        }
    }
}

/// Blocks kept in float (`quantize --fp32-layers first,last`): the stem reads the float input
/// directly and hands u8 to the next block; the last block reads u8 back and feeds the pool
/// in float. Closer to the float model than all-INT8, and both threadings agree.
#[test]
fn float_first_and_last_blocks_run_beside_int8_ones() {
    for config in ["tiny", "tiny_g2"] {
        let ckpt = Checkpoint::load(
            &repvgg_testing::fixture(config, "deploy_official.safetensors"),
            None,
        )
        .unwrap();
        let float = Engine::from_checkpoint(&ckpt, 1e-5).unwrap();
        let (input, n, h, w) = fixture_batch(config);
        let mut calibrator = Calibrator::new(Calibration::MinMax, &float);
        calibrator.observe(&float, &input, n, h, w).unwrap();
        let float_logits = float
            .forward(&input, n, h, w, &mut Workspace::default())
            .unwrap();
        let last = ckpt.spec.blocks().len() - 1;
        let drift = |float_blocks: &[usize]| {
            let model = QuantizedModel::quantize(
                &ckpt,
                calibrator.activations(),
                "minmax",
                n,
                127,
                float_blocks,
            )
            .unwrap();
            let engine = Int8Engine::new(&model, None).unwrap();
            let ours = engine.forward(&input, n, h, w).unwrap();
            let split = engine
                .forward_with(&input, n, h, w, |_, _, _, _| {})
                .unwrap();
            // Float layers plan by threading (their sums run in another order), so a float
            // block's output moves by float rounding, and an INT8 block after it may round an
            // input one step the other way: close, not equal.
            let apart = ours
                .iter()
                .zip(&split)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                apart <= 1e-3 * max_abs(&ours),
                "{config} {float_blocks:?}: threadings {apart} apart"
            );
            ours.iter()
                .zip(&float_logits)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / max_abs(&float_logits)
        };
        let all = drift(&[]);
        let mixed = drift(&[0, last]);
        let only_float = drift(&(0..=last).collect::<Vec<_>>());
        eprintln!(
            "{config}: drift all-INT8 {all:.2e}, float ends {mixed:.2e}, all float {only_float:.2e}"
        );
        assert!(mixed <= 0.05, "{config}: {mixed}");
        // Every block in float is the float model (the same float engine layers): f32 rounding.
        assert!(only_float <= 1e-5, "{config}: {only_float}");
    }
}

/// A batch that is not the shape the call describes is an error from both engines, never a
/// panic or a read past the input: too few or too many values, the wrong channel count, an
/// empty map, dimensions whose product overflows.
#[test]
fn wrong_input_shapes_are_errors() {
    let ckpt = Checkpoint::load(
        &repvgg_testing::fixture("tiny", "deploy_official.safetensors"),
        None,
    )
    .unwrap();
    let float = Engine::from_checkpoint(&ckpt, 1e-5).unwrap();
    let (input, n, h, w) = fixture_batch("tiny");
    let mut calibrator = Calibrator::new(Calibration::MinMax, &float);
    calibrator.observe(&float, &input, n, h, w).unwrap();
    let model =
        QuantizedModel::quantize(&ckpt, calibrator.activations(), "minmax", n, 127, &[]).unwrap();
    let int8 = Int8Engine::new(&model, None).unwrap();
    let one = 3 * h * w;
    let cases: [(&[f32], usize, usize, usize); 5] = [
        (&input[..input.len() - 1], n, h, w),
        (&input, n + 1, h, w),
        (&input[..one], 1, h * 3, w / 3 + 1),
        (&[], 1, 0, 0),
        (&input, usize::MAX / 2, h, w),
    ];
    for (values, n, h, w) in cases {
        let mut ws = Workspace::default();
        for err in [
            float.forward(values, n, h, w, &mut ws).unwrap_err(),
            int8.forward(values, n, h, w).unwrap_err(),
        ] {
            assert!(
                matches!(err, repvgg_engine::EngineError::Input { .. }),
                "{err}"
            );
            assert!(err.to_string().contains("is not a batch of"), "{err}");
        }
    }
}
