//! `repvgg predict`: classify photos with a checkpoint, as the reference pipelines would.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use rand::SeedableRng;
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_data::EvalPreset;
use repvgg_engine::{Engine, Workspace};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    /// Resize the short side to 256 (bilinear), centre crop 224: the official code.
    Official,
    /// crop_pct 0.875 at 224, bilinear: timm's RepVGG configs.
    Timm,
    /// 320, crop_pct 1.0: timm's repvgg_d2se.
    D2se,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Weights in either form and any naming, .pth or .safetensors.
    #[arg(long)]
    weights: PathBuf,
    /// JPEG or PNG files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many classes to print per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Preprocessing [default: d2se for SE models, else official].
    #[arg(long)]
    preset: Option<PresetArg>,
    /// Class names, one per line (default: ImageNet-1k's for 1000-class models).
    #[arg(long)]
    labels: Option<PathBuf>,
    #[arg(long)]
    arch: Option<String>,
    #[arg(long, default_value_t = DEFAULT_BN_EPS)]
    bn_eps: f64,
    /// One JSON line per image: {"file", "top": [{"index", "label", "prob"}, ...]}.
    #[arg(long)]
    json: bool,
}

fn labels(path: Option<&Path>, classes: usize) -> Result<Vec<String>> {
    let names: Vec<String> = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            let names: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
            if names.len() != classes {
                bail!(
                    "{}: {} labels for a model with {classes} classes",
                    path.display(),
                    names.len()
                );
            }
            names
        }
        None if classes == 1000 => repvgg_data::imagenet_class_names()
            .into_iter()
            .map(String::from)
            .collect(),
        None => (0..classes).map(|k| k.to_string()).collect(),
    };
    Ok(names)
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
    let names = labels(args.labels.as_deref(), classes)?;
    let preset = match args.preset {
        Some(PresetArg::Official) => EvalPreset::Official,
        Some(PresetArg::Timm) => EvalPreset::Timm,
        Some(PresetArg::D2se) => EvalPreset::D2se,
        None if ckpt.spec.se => EvalPreset::D2se,
        None => EvalPreset::Official,
    };
    let pipeline = preset.pipeline();
    // Decode and preprocess everything first: a broken file stops the run before any output.
    let mut input = Vec::new();
    let mut size = (0, 0);
    for path in &args.images {
        let img = repvgg_data::decode_image(path)?;
        // Evaluation transforms draw no random numbers; the RNG only satisfies the signature.
        let (pixels, h, w) = pipeline.apply(&img, &mut rand::rngs::StdRng::seed_from_u64(0));
        size = (h, w);
        input.extend(pixels);
    }
    let engine = Engine::from_checkpoint(&ckpt, args.bn_eps)?;
    let n = args.images.len();
    let logits = engine.forward(&input, n, size.0, size.1, &mut Workspace::default());
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
