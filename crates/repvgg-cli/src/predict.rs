//! `repvgg predict`: classify photos with a checkpoint, as the reference pipelines would.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;

use crate::model_input::{InputArgs, class_names, image_batch, imagenet_fallback};

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Weights in either form and any naming, .pth or .safetensors (a training checkpoint
    /// too).
    #[arg(long)]
    weights: PathBuf,
    /// JPEG or PNG files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    #[command(flatten)]
    input: InputArgs,
    /// Class names, one per line [default: the weights file's; else ImageNet-1k's for
    /// 1000-class models; else the class indices].
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Require the weights to be this architecture (a variant name or spec).
    #[arg(long)]
    arch: Option<String>,
    /// Batch-norm eps for training-form weights (state dicts do not record it).
    #[arg(long, default_value_t = DEFAULT_BN_EPS)]
    bn_eps: f64,
    /// One JSON line per image: {"file", "top": [{"index", "label", "prob"}, ...]}.
    #[arg(long)]
    json: bool,
}

/// Softmax in f64 (stable: shifted by the maximum).
fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exp: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

pub fn run(args: PredictArgs) -> Result<()> {
    crate::check_bn_eps(args.bn_eps)?;
    if args.top == 0 {
        bail!("--top must be at least 1");
    }
    let ckpt = crate::load_checkpoint(&args.weights, args.arch.clone())?;
    let classes = ckpt.spec.num_classes;
    if classes == 0 {
        bail!(
            "{}: a headless model (no classifier) has no classes to predict",
            args.weights.display()
        );
    }
    let names = class_names(args.labels.as_deref(), &ckpt)?;
    let (preprocessing, source) = args.input.resolve(&ckpt, imagenet_fallback(&ckpt))?;
    let input = image_batch(&args.images, &preprocessing)?;
    if !args.json {
        eprintln!("input: {} ({source})", preprocessing.describe());
    }
    let mut runner = repvgg_engine::Runner::new(&ckpt, args.bn_eps, None)?;
    let n = args.images.len();
    let [h, w] = preprocessing.size;
    let logits = runner.forward(&input, n, h, w);
    for (path, row) in args.images.iter().zip(logits.chunks_exact(classes)) {
        let probs = softmax(row);
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let top = &order[..args.top.min(classes)];
        if args.json {
            let top: Vec<_> = top
                .iter()
                .map(|&k| serde_json::json!({"index": k, "label": names[k], "prob": probs[k]}))
                .collect();
            println!("{}", serde_json::json!({"file": path, "top": top}));
        } else {
            println!("{}", path.display());
            for (rank, &k) in top.iter().enumerate() {
                println!(
                    "  {:>2}. {:>6.2}%  {:>4}  {}",
                    rank + 1,
                    probs[k] * 100.0,
                    k,
                    names[k]
                );
            }
        }
    }
    Ok(())
}
