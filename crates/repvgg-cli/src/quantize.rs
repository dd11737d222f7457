//! `repvgg quantize`: post-training INT8. Weights symmetric per output channel; activations
//! per tensor, their ranges found by running the float model on calibration images fed as
//! the model records (or as `train` would have fed the data).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_checkpoint::quantized::QuantizedModel;
use repvgg_data::Pipeline;
use repvgg_engine::{Calibration, Calibrator, Engine, Int8Engine, Isa, Workspace};
use repvgg_kernels::int8::Int8Kernels;

use crate::model_input::InputArgs;
use crate::train::open_data;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// The largest value seen.
    Minmax,
    /// The --percentile of the values seen (outliers do not stretch the scale).
    Percentile,
    /// The range whose 8-bit copy of the values' histogram diverges least (KL) from it.
    Entropy,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Float weights in either form and any naming (a training checkpoint too).
    #[arg(long)]
    weights: PathBuf,
    /// Calibration images: any data directory `train` reads (its training split is used).
    #[arg(long)]
    calib: PathBuf,
    /// Output INT8 .safetensors file (written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Calibration images, spread evenly over the split.
    #[arg(long, default_value_t = 512)]
    samples: usize,
    /// How activation ranges are chosen.
    #[arg(long, default_value = "percentile")]
    method: MethodArg,
    /// The percentile for --method percentile.
    #[arg(long, default_value_t = 99.99)]
    percentile: f64,
    /// Weight bits: 8, or 7 so that AVX2 machines without VNNI run the INT8 kernels (their
    /// 16-bit sums need weights within 64) [default: 8].
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(7..=8))]
    weight_bits: u8,
    /// Print each block's error of INT8 against float on the calibration images.
    #[arg(long)]
    report: bool,
    #[command(flatten)]
    input: InputArgs,
    /// Images per calibration batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Batch-norm eps for training-form weights (state dicts do not record it).
    #[arg(long, default_value_t = DEFAULT_BN_EPS)]
    bn_eps: f64,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    crate::check_bn_eps(args.bn_eps)?;
    if args.samples == 0 || args.batch == 0 {
        bail!("--samples and --batch must be at least 1");
    }
    if !(args.percentile > 50.0 && args.percentile <= 100.0) {
        bail!(
            "--percentile {}: expected a value in (50, 100]",
            args.percentile
        );
    }
    let ckpt = crate::load_checkpoint(&args.weights, None)?;
    if ckpt.quantization.is_some() {
        bail!(
            "{}: already an INT8 model; quantize its float original",
            args.weights.display()
        );
    }
    let deploy = ckpt.to_deploy(args.bn_eps)?;
    let data = open_data(&args.calib, 0.1)?;
    let (preprocessing, source) = args
        .input
        .resolve(&ckpt, crate::eval::data_fallback(&data))?;
    eprintln!("input: {} ({source})", preprocessing.describe());
    let pipeline = Pipeline::for_model(&preprocessing);
    let samples = data.train.clone();
    let count = args.samples.min(samples.len());
    let indices: Vec<usize> = (0..count).map(|i| i * samples.len() / count).collect();
    let method = match args.method {
        MethodArg::Minmax => Calibration::MinMax,
        MethodArg::Percentile => Calibration::Percentile(args.percentile),
        MethodArg::Entropy => Calibration::Entropy,
    };
    let engine = Engine::from_checkpoint(&deploy, args.bn_eps)?;
    let mut calibrator = Calibrator::new(method, &engine);
    let mut first_batch = None;
    for chunk in indices.chunks(args.batch) {
        let batch = pipeline.batch(samples.as_ref(), chunk, 0)?;
        let [n, _, h, w] = batch.shape;
        calibrator.observe(&engine, &batch.images, n, h, w);
        first_batch.get_or_insert(batch);
    }
    let method_name = match args.method {
        MethodArg::Minmax => "minmax".to_string(),
        MethodArg::Percentile => format!("percentile {}", args.percentile),
        MethodArg::Entropy => "entropy".to_string(),
    };
    let limit = if args.weight_bits == 8 { 127 } else { 63 };
    let mut model = QuantizedModel::quantize(
        &deploy,
        calibrator.activations(),
        &method_name,
        calibrator.images(),
        limit,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", args.weights.display()))?;
    model.preprocessing = Some(preprocessing);
    model.save(&args.out)?;
    let int8 = Int8Engine::new(&model, None)?;
    eprintln!(
        "{} -> {} (INT8: {}-bit weights per channel, u8 activations per tensor, {method_name} over {} images; the head stays float; runs here on {} kernels)",
        args.weights.display(),
        args.out.display(),
        args.weight_bits,
        calibrator.images(),
        int8.kernels()
    );
    let vnni = Int8Kernels::Avx512Vnni.is_available() || Int8Kernels::AvxVnni.is_available();
    if args.weight_bits == 8 && !vnni && Isa::best() >= Isa::Avx2 {
        eprintln!(
            "note: this machine has no VNNI, so 8-bit weights run on the portable kernels; --weight-bits 7 lets the AVX2 kernels run them"
        );
    }
    if args.report
        && let Some(batch) = first_batch
    {
        report(&engine, &int8, &model, &batch);
    }
    Ok(())
}

/// Each block's relative RMS error, INT8 against float, on one calibration batch.
fn report(engine: &Engine, int8: &Int8Engine, model: &QuantizedModel, batch: &repvgg_data::Batch) {
    let [n, _, h, w] = batch.shape;
    let mut float_outputs: Vec<Vec<f32>> = Vec::new();
    engine.forward_with(
        &batch.images,
        n,
        h,
        w,
        &mut Workspace::default(),
        |_, _, _, x| float_outputs.push(x.to_vec()),
    );
    let mut errors = Vec::new();
    int8.forward_with(&batch.images, n, h, w, |i, _, _, q, quant| {
        let float = &float_outputs[i];
        let (mut diff, mut norm) = (0f64, 0f64);
        for (&q, &f) in q.iter().zip(float) {
            let d = quant.dequantize(q) as f64 - f as f64;
            diff += d * d;
            norm += f as f64 * f as f64;
        }
        errors.push(((diff / norm.max(1e-30)).sqrt(), quant));
    });
    println!("block          rel. RMS error   output scale");
    for (b, (error, quant)) in model.spec.blocks().iter().zip(errors) {
        println!("{:<14} {:>14.4} {:>14.6}", b.name(), error, quant.scale);
    }
}
