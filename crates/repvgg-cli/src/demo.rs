//! `repvgg demo`: train a small RepVGG on Fashion-MNIST, convert it, check both forms agree,
//! and compare their speed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use repvgg_data::DataKind;
use repvgg_train::{RunOptions, TrainConfig};

use crate::train::{
    RunLabel, arch_for, fit_batch, open_data, train_and_finish, warn_about_schedule,
};

/// Whether `checkpoint` is a demo run's: the demo's network, whatever its data.
fn is_demo_run(checkpoint: &Path) -> bool {
    let Ok(ckpt) = repvgg_checkpoint::Checkpoint::load(checkpoint, None) else {
        return false;
    };
    let Ok(mut demo) = repvgg_arch::ArchSpec::parse(DEMO_ARCH) else {
        return false;
    };
    demo.num_classes = ckpt.spec.num_classes;
    demo.name = ckpt.spec.name.clone();
    demo.qa = ckpt.spec.qa;
    ckpt.run_state.is_some() && ckpt.spec == demo
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// An IDX data set directory ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]).
    /// Default: Fashion-MNIST from /usr/share/datasets/fashion-mnist, or the committed
    /// subset when that is not installed.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output directory; a previous demo run there is replaced (unless --resume).
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Passes over the training set [default: 15].
    #[arg(long)]
    epochs: Option<usize>,
    /// Continue an interrupted demo from OUT/checkpoint.safetensors.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Replace whatever run OUT holds (a previous demo run is replaced anyway).
    #[arg(long)]
    overwrite: bool,
    /// No progress bar or per-epoch lines.
    #[arg(long)]
    quiet: bool,
    /// QARepVGG blocks (quantization-friendly) instead of RepVGG's, to compare their INT8
    /// accuracy.
    #[arg(long)]
    qa: bool,
    /// End with one JSON line of results.
    #[arg(long)]
    json: bool,
}

/// The demo's network: RepVGG's shape (a stride-2 opening block per stage, 3x3 + 1x1 +
/// identity branches) sized for 28x28 images.
pub const DEMO_ARCH: &str = "depths=1,2,2,1;widths=16,32,64,128;stem=16";

fn default_demo_data() -> Result<PathBuf> {
    let installed = PathBuf::from("/usr/share/datasets/fashion-mnist");
    if installed.join("train-images-idx3-ubyte.gz").is_file() {
        return Ok(installed);
    }
    let candidates = [
        PathBuf::from("fixtures/fashion-mnist-subset"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fashion-mnist-subset"),
    ];
    let subset = candidates
        .into_iter()
        .find(|p| p.join("train-images-idx3-ubyte.gz").is_file())
        .context("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist) and the committed subset was not found; pass --data DIR")?;
    eprintln!(
        "Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist); using the committed 2,000-image subset at {}",
        subset.display()
    );
    Ok(subset)
}

pub fn demo(args: DemoArgs) -> Result<()> {
    let dir = match args.data {
        Some(dir) => dir,
        None => default_demo_data()?,
    };
    let data = open_data(&dir, 0.1)?;
    if data.kind != DataKind::Idx {
        bail!(
            "{}: the demo runs on IDX data ({{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]); use `repvgg train` for other formats",
            dir.display()
        );
    }
    let arch = if args.qa {
        format!("{DEMO_ARCH};qa")
    } else {
        DEMO_ARCH.to_string()
    };
    let mut config = TrainConfig::small_images(arch_for(&arch, &data, &dir)?);
    config.epochs = args.epochs.unwrap_or(DEMO_EPOCHS);
    config.batch_size = fit_batch(config.batch_size, data.train.len(), args.quiet);
    warn_about_schedule(&config, "raise --epochs");
    // The demo is a canned, seeded job: running it again redoes it. Any other run in OUT
    // (one without the demo's network) is kept and refused, as `train` refuses.
    let previous = args.out.join("checkpoint.safetensors");
    let replacing_demo = !args.resume && !args.overwrite && is_demo_run(&previous);
    let overwrite = args.overwrite || replacing_demo;
    if replacing_demo && !args.quiet {
        eprintln!(
            "demo: replacing the previous demo run in {} (--resume continues it instead)",
            args.out.display()
        );
    }
    let options = RunOptions {
        resume: args.resume,
        overwrite,
        progress: !args.quiet,
        ..RunOptions::default()
    };
    let label = RunLabel {
        who: "demo",
        arch: &arch,
        data_dir: &dir,
    };
    let Some(mut result) = train_and_finish(config, &data, &args.out, label, options)? else {
        return Ok(());
    };
    // The third form: the deployed model in INT8, calibrated on training images.
    let int8 = int8_line(&args.out, &data)?;
    if !args.quiet {
        eprintln!(
            "int8 form:     top-1 {:.4}, {:.0} img/s (INT8 engine, {} kernels; percentile calibration on {} training images)",
            int8.top1, int8.images_per_s, int8.kernels, int8.samples
        );
        eprintln!("int8 weights: {}", int8.path.display());
    }
    result["int8_test_accuracy"] = serde_json::json!(int8.top1);
    result["int8_images_per_s"] = serde_json::json!(int8.images_per_s);
    result["int8_weights"] = serde_json::json!(int8.path);
    if args.json {
        println!("{result}");
    }
    Ok(())
}

struct Int8Result {
    top1: f64,
    images_per_s: f64,
    kernels: String,
    samples: usize,
    path: PathBuf,
}

/// Quantizes `OUT/deploy.safetensors` to `OUT/int8.safetensors` and evaluates it.
fn int8_line(out: &Path, data: &repvgg_data::DataSplits) -> Result<Int8Result> {
    use repvgg_checkpoint::quantized::QuantizedModel;
    use repvgg_engine::{Calibration, Calibrator, Engine, Int8Engine};
    let deploy = repvgg_checkpoint::Checkpoint::load(&out.join("deploy.safetensors"), None)?;
    let preprocessing = deploy
        .preprocessing
        .clone()
        .context("the demo's weights record their preprocessing")?;
    let pipeline = repvgg_data::Pipeline::for_model(&preprocessing);
    let engine = Engine::from_checkpoint(&deploy, repvgg_checkpoint::convert::DEFAULT_BN_EPS)?;
    let mut calibrator = Calibrator::new(Calibration::Percentile(99.99), &engine);
    let count = 512.min(data.train.len());
    let indices: Vec<usize> = (0..count).map(|i| i * data.train.len() / count).collect();
    for chunk in indices.chunks(128) {
        let batch = pipeline.batch(data.train.as_ref(), chunk, 0)?;
        let [n, _, h, w] = batch.shape;
        calibrator
            .observe(&engine, &batch.images, n, h, w)
            .map_err(anyhow::Error::msg)?;
    }
    let model = QuantizedModel::quantize(
        &deploy,
        calibrator.activations(),
        "percentile 99.99",
        calibrator.images(),
        // 7-bit weights where the faster AVX2 INT8 kernels run them (no VNNI).
        repvgg_checkpoint::quantized::weight_limit(
            if repvgg_kernels::int8::Int8Kernels::vnni_available() {
                8
            } else {
                7
            },
        ),
        &[],
    )
    .map_err(anyhow::Error::msg)?;
    let path = out.join("int8.safetensors");
    model.save(&path)?;
    let int8 = Int8Engine::new(&model, None)?;
    let classes = model.spec.num_classes;
    let run = repvgg_train::evaluate_with(data.test.clone(), pipeline, 500, classes, |batch| {
        let [n, _, h, w] = batch.shape;
        Ok(int8.forward(&batch.images, n, h, w)?)
    })?;
    Ok(Int8Result {
        top1: run.evaluation.top1,
        images_per_s: run.images_per_s,
        kernels: int8.kernels().to_string(),
        samples: calibrator.images(),
        path,
    })
}

pub const DEMO_EPOCHS: usize = 15;
