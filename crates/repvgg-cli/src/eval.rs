//! `repvgg eval`: accuracy of weights in either form, on the engine, on a data set's held-out
//! split.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use repvgg_checkpoint::Preprocessing;
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_checkpoint::metadata::{Interpolation, Resize};
use repvgg_data::{DataKind, DataSplits, IMAGENET_MEAN, IMAGENET_STD, Pipeline};

use repvgg_engine::Runner;

use crate::model_input::InputArgs;
use crate::train::{NormalizeArg, open_data};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Weights in either form (training-form weights, a training checkpoint included, are
    /// converted in memory).
    #[arg(long)]
    weights: PathBuf,
    /// Data directory, as for `train`; the held-out split is evaluated.
    #[arg(long)]
    data: PathBuf,
    /// Require the weights to be this architecture (a variant name or spec).
    #[arg(long)]
    arch: Option<String>,
    /// Evaluate the training split instead.
    #[arg(long)]
    train_split: bool,
    #[command(flatten)]
    input: InputArgs,
    /// Normalise with ImageNet's statistics or the data set's own (in-memory data sets)
    /// [default: what the weights file records; for files without it, the data set's for
    /// in-memory data, ImageNet's for image folders].
    #[arg(long)]
    normalize: Option<NormalizeArg>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Print the confusion matrix (rows: true class, columns: predicted).
    #[arg(long)]
    confusion: bool,
    /// Batch-norm eps for training-form weights (state dicts do not record it).
    #[arg(long, default_value_t = DEFAULT_BN_EPS)]
    bn_eps: f64,
    /// Share of each class held out when an image folder has no val/ (as in training).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// How `train` would have fed this data, for weights files that do not say.
pub(crate) fn data_fallback(data: &DataSplits) -> (Preprocessing, &'static str) {
    match data.kind {
        DataKind::ImageFolder => (
            repvgg_checkpoint::ImageNetPreset::Official.preprocessing(),
            "resize 256, crop 224, ImageNet statistics (train's default for image folders)",
        ),
        _ => {
            let (h, w) = data.native_size.unwrap_or((224, 224));
            let (mean, std) = data.stats.unwrap_or((IMAGENET_MEAN, IMAGENET_STD));
            (
                Preprocessing {
                    size: [h, w],
                    grey: data.grey,
                    resize: Resize::Stretch,
                    interpolation: Interpolation::Bilinear,
                    mean,
                    std,
                },
                "native size, the data set's statistics (train's default for it)",
            )
        }
    }
}

pub fn eval(args: EvalArgs) -> Result<()> {
    crate::check_bn_eps(args.bn_eps)?;
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let data = open_data(&args.data, args.val_fraction)?;
    let ckpt = crate::load_checkpoint(&args.weights, args.arch.clone())?;
    crate::require_rgb(&ckpt, &args.weights)?;
    let samples = if args.train_split {
        data.train.clone()
    } else {
        data.test.clone()
    };
    let classes = ckpt.spec.num_classes;
    let data_classes = data.train.classes().max(data.test.classes());
    if data_classes != classes {
        bail!(
            "{}: the data has {data_classes} classes but {} has {classes}",
            args.data.display(),
            args.weights.display()
        );
    }
    if let (Some(model), Some(folders)) = (&ckpt.labels, &data.class_names)
        && let Some(k) = model.iter().zip(folders).position(|(a, b)| a != b)
    {
        eprintln!(
            "warning: the model's class {k} is '{}' but the data's is '{}': class indices may not mean the same",
            model[k], folders[k]
        );
    }
    let (mut preprocessing, mut source) = args.input.resolve(&ckpt, data_fallback(&data))?;
    if args.normalize.is_some() {
        source = crate::model_input::Source::Flags;
    }
    match (args.normalize, data.stats) {
        (Some(NormalizeArg::Dataset), Some((mean, std))) => {
            (preprocessing.mean, preprocessing.std) = (mean, std)
        }
        (Some(NormalizeArg::Dataset), None) => {
            bail!("--normalize dataset needs an in-memory data set (IDX or CIFAR)")
        }
        (Some(NormalizeArg::Imagenet), _) => {
            (preprocessing.mean, preprocessing.std) = (IMAGENET_MEAN, IMAGENET_STD)
        }
        (None, _) => {}
    }
    let [h, w] = preprocessing.size;
    crate::check_memory(
        &ckpt.spec,
        args.batch,
        h,
        w,
        false,
        &args.weights.display().to_string(),
    )?;
    let mut runner = Runner::new(&ckpt, args.bn_eps, None)?;
    if !args.json {
        eprintln!("input: {} ({source})", preprocessing.describe());
        eprintln!("model: {}", runner.describe());
    }
    let pipeline = Pipeline::for_model(&preprocessing);
    let start = Instant::now();
    let run = repvgg_train::evaluate_with(samples, pipeline, args.batch, classes, |batch| {
        let [n, _, h, w] = batch.shape;
        Ok(runner.forward(&batch.images, n, h, w)?)
    })?;
    let e = &run.evaluation;
    if args.json {
        let mut value = serde_json::json!({
            "weights": args.weights,
            "class_names": data.class_names.clone().or_else(|| ckpt.labels.clone()),
            "images": e.count,
            "top1": e.top1,
            "top5": e.top5,
            "loss": e.loss,
            "per_class": e.per_class(),
            "images_per_s": run.images_per_s,
        });
        if args.confusion {
            value["confusion"] = serde_json::json!(e.confusion);
        }
        println!("{value}");
        return Ok(());
    }
    println!(
        "{} images: top-1 {:.4}, top-5 {:.4}, loss {:.4} ({:.1} s, model {:.0} img/s)",
        e.count,
        e.top1,
        e.top5,
        e.loss,
        start.elapsed().as_secs_f64(),
        run.images_per_s
    );
    let names = data.class_names.clone().or_else(|| ckpt.labels.clone());
    println!("per-class top-1:");
    for (k, acc) in e.per_class().iter().enumerate() {
        let name = names
            .as_ref()
            .and_then(|n| n.get(k).cloned())
            .unwrap_or_else(|| k.to_string());
        println!("  {name:>12}  {acc:.4}");
    }
    if args.confusion {
        println!("confusion (rows: true class, columns: predicted):");
        for row in &e.confusion {
            let cells: Vec<String> = row.iter().map(|c| format!("{c:>5}")).collect();
            println!("  {}", cells.join(""));
        }
    }
    Ok(())
}
