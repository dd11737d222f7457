//! `repvgg quantize`: post-training INT8. Weights symmetric per output channel; activations
//! per tensor, their ranges found by running the float model on calibration images fed as
//! the model records (or as `train` would have fed the data).

use std::path::{Path, PathBuf};

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
    #[arg(long, required_unless_present = "random")]
    weights: Option<PathBuf>,
    /// Quantize a variant or spec with seeded random weights instead (load tests:
    /// bench/serve_compare.sh), the same model as `export --random` and `serve --random`.
    #[arg(long, conflicts_with = "weights")]
    random: Option<String>,
    /// Calibration images: any data directory `train` reads (its training split is used).
    #[arg(long)]
    calib: PathBuf,
    /// Output INT8 .safetensors file (written atomically).
    #[arg(long, visible_alias = "output")]
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
    /// Weight bits: 8, or 7 so that AVX2 machines without VNNI run the faster of their two
    /// INT8 kernel sets (its 16-bit sums need weights within 64).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(7..=8))]
    weight_bits: u8,
    /// Blocks kept in float: `first`, `last`, or block names (stage0, stage4.0), comma
    /// separated. The stem's three input channels give INT8 little speed and some accuracy;
    /// the last block feeds the float head.
    #[arg(long, value_delimiter = ',')]
    fp32_layers: Vec<String>,
    /// Print each block's relative RMS error, INT8 model against float, on the first
    /// calibration batch (cumulative along the network: look where it jumps).
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
    let (ckpt, source_name) = match (&args.weights, &args.random) {
        (Some(path), _) => (
            crate::load_checkpoint(path, None)?,
            path.display().to_string(),
        ),
        (None, Some(spec)) => (crate::random_checkpoint(spec)?, format!("random {spec}")),
        (None, None) => bail!("give --weights (or --random SPEC)"),
    };
    crate::require_rgb(&ckpt, Path::new(&source_name))?;
    if ckpt.int8.is_some() {
        bail!("{source_name}: already an INT8 model; quantize its float original");
    }
    let deploy = ckpt.to_deploy(args.bn_eps)?;
    // Checked before minutes of calibration.
    let blocks = deploy.spec.blocks();
    let float_blocks = args
        .fp32_layers
        .iter()
        .map(|name| match name.trim() {
            "first" => Ok(0),
            "last" => Ok(blocks.len() - 1),
            other => blocks
                .iter()
                .position(|b| b.name() == other)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--fp32-layers {other}: expected first, last or a block name (stage0 .. {})",
                        blocks.last().map(|b| b.name()).unwrap_or_default()
                    )
                }),
        })
        .collect::<Result<Vec<usize>>>()?;
    repvgg_checkpoint::quantized::check_int8_widths(&deploy.spec, &float_blocks)
        .map_err(|e| anyhow::anyhow!("{source_name}: {e}: name it in --fp32-layers"))?;
    let calib = CalibrationImages::open(&args.calib)?;
    let fallback = match &calib {
        CalibrationImages::DataSet(data) => crate::eval::data_fallback(data),
        CalibrationImages::Files(_) => crate::model_input::imagenet_fallback(&ckpt),
    };
    let (preprocessing, source) = args.input.resolve(&ckpt, fallback)?;
    eprintln!("input: {} ({source})", preprocessing.describe());
    let pipeline = Pipeline::for_model(&preprocessing);
    let method = match args.method {
        MethodArg::Minmax => Calibration::MinMax,
        MethodArg::Percentile => Calibration::Percentile(args.percentile),
        MethodArg::Entropy => Calibration::Entropy,
    };
    let engine = Engine::from_checkpoint(&deploy, args.bn_eps)?;
    let mut calibrator = Calibrator::new(method, &engine);
    let mut first_batch: Option<(Vec<f32>, [usize; 4])> = None;
    let mut skipped = Vec::new();
    let total = calib.len();
    let count = args.samples.min(total);
    let indices: Vec<usize> = (0..count).map(|i| i * total / count).collect();
    for chunk in indices.chunks(args.batch) {
        let Some((images, shape)) = calib.batch(&pipeline, chunk, &mut skipped)? else {
            continue;
        };
        let [n, _, h, w] = shape;
        calibrator
            .observe(&engine, &images, n, h, w)
            .map_err(|e| anyhow::anyhow!("{source_name}: {e}"))?;
        first_batch.get_or_insert((images, shape));
    }
    if !skipped.is_empty() {
        eprintln!(
            "note: skipped {} unreadable image(s) in {}, first {}",
            skipped.len(),
            args.calib.display(),
            skipped[0]
        );
    }
    if calibrator.images() == 0 {
        bail!(
            "{}: none of its {total} images could be read; no calibration is possible",
            args.calib.display()
        );
    }
    let method_name = match args.method {
        MethodArg::Minmax => "minmax".to_string(),
        MethodArg::Percentile => format!("percentile {}", args.percentile),
        MethodArg::Entropy => "entropy".to_string(),
    };
    let limit = repvgg_checkpoint::quantized::weight_limit(args.weight_bits);

    let mut model = QuantizedModel::quantize(
        &deploy,
        calibrator.activations(),
        &method_name,
        calibrator.images(),
        limit,
        &float_blocks,
    )
    .map_err(|e| anyhow::anyhow!("{source_name}: {e}"))?;
    model.preprocessing = Some(preprocessing);
    let saturated = model.saturated_biases();
    if !saturated.is_empty() {
        eprintln!(
            "warning: the biases of {} exceed the 32-bit sums' range at these scales and will be clamped (their input's calibrated range is tiny against them); --report shows the damage",
            saturated.join(", ")
        );
    }
    model.save(&args.out)?;
    let int8 = Int8Engine::new(&model, None)?;
    eprintln!(
        "{source_name} -> {} (INT8: {}-bit weights per channel, u8 activations per tensor, {method_name} over {} images; in float: {}; runs here on {} kernels)",
        args.out.display(),
        args.weight_bits,
        calibrator.images(),
        if model.info.float_layers.is_empty() {
            "nothing".to_string()
        } else {
            model.info.float_layers.join(", ")
        },
        int8.kernels()
    );
    if args.weight_bits == 8 && !Int8Kernels::vnni_available() && Isa::best() >= Isa::Avx2 {
        eprintln!(
            "note: this machine has no VNNI, so 8-bit weights run on the AVX2 kernels of 16-bit operands; --weight-bits 7 lets the faster AVX2 set (about twice the products a second) run them"
        );
    }
    if args.report
        && let Some((images, shape)) = first_batch
    {
        report(&engine, &int8, &model, &images, shape)?;
    }
    Ok(())
}

/// Each block's relative RMS error, INT8 against float, on one calibration batch.
fn report(
    engine: &Engine,
    int8: &Int8Engine,
    model: &QuantizedModel,
    images: &[f32],
    [n, _, h, w]: [usize; 4],
) -> Result<()> {
    let mut float_outputs: Vec<Vec<f32>> = Vec::new();
    let mut scales = Vec::new();
    engine.forward_with(images, n, h, w, &mut Workspace::default(), |_, _, _, x| {
        float_outputs.push(x.to_vec())
    })?;
    let mut errors = Vec::new();
    int8.forward_with(images, n, h, w, |i, _, _, out| {
        let float = &float_outputs[i];
        let (mut diff, mut norm) = (0f64, 0f64);
        for (&q, &f) in out.to_f32().iter().zip(float) {
            let d = q as f64 - f as f64;
            diff += d * d;
            norm += f as f64 * f as f64;
        }
        errors.push((diff / norm.max(1e-30)).sqrt());
        scales.push(match out {
            repvgg_engine::BlockOutput::U8(_, quant) => format!("{:.6}", quant.scale),
            repvgg_engine::BlockOutput::F32(_) => "float".to_string(),
        });
    })?;
    println!("block          rel. RMS error   output scale");
    for ((b, error), scale) in model.spec.blocks().iter().zip(errors).zip(scales) {
        println!("{:<14} {:>14.4} {:>14}", b.name(), error, scale);
    }
    Ok(())
}

/// Where calibration images come from: a data set `train` reads (its training split), or any
/// tree of JPEG/PNG files (flat or in class folders: labels do not matter here), all used.
enum CalibrationImages {
    DataSet(repvgg_data::DataSplits),
    Files(Vec<PathBuf>),
}

impl CalibrationImages {
    fn open(dir: &std::path::Path) -> Result<CalibrationImages> {
        let has = |name: &str| dir.join(name).exists();
        let data_set = [
            "train-images-idx3-ubyte.gz",
            "train-images-idx3-ubyte",
            "data_batch_1.bin",
            "train.bin",
            "cifar-10-batches-bin",
            "cifar-100-binary",
        ]
        .iter()
        .any(|name| has(name));
        if data_set {
            return Ok(CalibrationImages::DataSet(open_data(dir, 0.1)?));
        }
        if !dir.is_dir() {
            bail!("{}: not a directory", dir.display());
        }
        let mut files = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            let entries = std::fs::read_dir(&d)
                .map_err(|e| anyhow::anyhow!("{}: cannot list: {e}", d.display()))?;
            for entry in entries {
                let path = entry
                    .map_err(|e| anyhow::anyhow!("{}: cannot list: {e}", d.display()))?
                    .path();
                if path.is_dir() {
                    pending.push(path);
                } else if crate::model_input::is_image(&path) {
                    files.push(path);
                }
            }
        }
        files.sort();
        if files.is_empty() {
            bail!(
                "{}: no JPEG/PNG images in it or its sub-folders (nor IDX or CIFAR files)",
                dir.display()
            );
        }
        Ok(CalibrationImages::Files(files))
    }

    fn len(&self) -> usize {
        match self {
            CalibrationImages::DataSet(data) => data.train.len(),
            CalibrationImages::Files(files) => files.len(),
        }
    }

    /// The images at `indices`, preprocessed, NCHW; an unreadable file is skipped and noted.
    #[allow(clippy::type_complexity)]
    fn batch(
        &self,
        pipeline: &Pipeline,
        indices: &[usize],
        skipped: &mut Vec<String>,
    ) -> Result<Option<(Vec<f32>, [usize; 4])>> {
        use rand::SeedableRng;
        match self {
            CalibrationImages::DataSet(data) => {
                let batch = pipeline.batch(data.train.as_ref(), indices, 0)?;
                Ok(Some((batch.images, batch.shape)))
            }
            CalibrationImages::Files(files) => {
                let mut images = Vec::new();
                let (mut n, mut size) = (0, (0, 0));
                for &i in indices {
                    match repvgg_data::decode_image(&files[i]) {
                        Ok(img) => {
                            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
                            let (pixels, h, w) = pipeline.apply(&img, &mut rng);
                            images.extend(pixels);
                            size = (h, w);
                            n += 1;
                        }
                        Err(e) => skipped.push(e.to_string()),
                    }
                }
                Ok((n > 0).then_some((images, [n, 3, size.0, size.1])))
            }
        }
    }
}
