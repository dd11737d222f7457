//! `repvgg eval`: accuracy of weights in either form, on the engine, on a data set's held-out
//! split.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_data::{DataKind, Pipeline, Transform};
use repvgg_engine::Engine;

use crate::train::{NormalizeArg, open_data};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Weights in either form (training-form weights are converted in memory).
    #[arg(long)]
    weights: PathBuf,
    /// Data directory, as for `train`; the held-out split is evaluated.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    arch: Option<String>,
    /// Evaluate the training split instead.
    #[arg(long)]
    train_split: bool,
    /// Normalisation used in training. Default: the data set's statistics for in-memory data
    /// sets, ImageNet's for image folders.
    #[arg(long)]
    normalize: Option<NormalizeArg>,
    /// Crop size for image folders (resize to size/0.875, centre crop).
    #[arg(long, default_value_t = 224)]
    size: usize,
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Print the confusion matrix (rows: true class, columns: predicted).
    #[arg(long)]
    confusion: bool,
    #[arg(long, default_value_t = DEFAULT_BN_EPS)]
    bn_eps: f64,
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    #[arg(long)]
    json: bool,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    crate::check_bn_eps(args.bn_eps)?;
    let data = open_data(&args.data, args.val_fraction)?;
    let ckpt = crate::load_checkpoint(&args.weights, args.arch.clone())?;
    let engine = Engine::from_checkpoint(&ckpt, args.bn_eps)?;
    let samples = if args.train_split {
        data.train.clone()
    } else {
        data.test.clone()
    };
    let classes = ckpt.spec.num_classes;
    if samples.classes() > classes {
        bail!(
            "{}: the data has {} classes but the model only {classes}",
            args.data.display(),
            samples.classes()
        );
    }
    let normalize = args.normalize.unwrap_or(match data.kind {
        DataKind::ImageFolder => NormalizeArg::Imagenet,
        _ => NormalizeArg::Dataset,
    });
    let (mean, std) = match (normalize, data.stats) {
        (NormalizeArg::Dataset, Some(stats)) => stats,
        (NormalizeArg::Dataset, None) => {
            bail!("--normalize dataset needs an in-memory data set (IDX or CIFAR)")
        }
        _ => (repvgg_data::IMAGENET_MEAN, repvgg_data::IMAGENET_STD),
    };
    let transform = match data.kind {
        DataKind::ImageFolder => Transform::ResizeCenterCrop {
            resize: (args.size as f64 / 0.875).floor() as usize,
            crop: args.size,
        },
        _ => Transform::Identity,
    };
    let pipeline = Pipeline {
        transform,
        mean,
        std,
    };
    let start = Instant::now();
    let run = repvgg_train::evaluate_engine(&engine, samples, pipeline, args.batch)?;
    let e = &run.evaluation;
    if args.json {
        let mut value = serde_json::json!({
            "weights": args.weights,
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
    let names = data.class_names.clone();
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
