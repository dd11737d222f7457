//! `repvgg demo`: train a small RepVGG on Fashion-MNIST, convert it, check both forms agree,
//! and compare their speed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use repvgg_data::DataKind;
use repvgg_train::{RunOptions, TrainConfig};

use crate::train::{arch_for, open_data, train_and_finish};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// An IDX data set directory ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]).
    /// Default: Fashion-MNIST from /usr/share/datasets/fashion-mnist, or the committed
    /// subset when that is not installed.
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    #[arg(long)]
    epochs: Option<usize>,
    /// Continue an interrupted demo from OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    quiet: bool,
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
    let mut config = TrainConfig::small_images(arch_for(DEMO_ARCH, &data)?);
    config.epochs = args.epochs.unwrap_or(DEMO_EPOCHS);
    config.batch_size = config.batch_size.min(data.train.len());
    if !args.quiet {
        eprintln!(
            "demo: training {} ({} parameters) on {} ({} training, {} test images) for {} epochs",
            DEMO_ARCH,
            config.arch.params(repvgg_arch::Form::Train),
            dir.display(),
            data.train.len(),
            data.test.len(),
            config.epochs
        );
    }
    let options = RunOptions {
        resume: args.resume,
        progress: !args.quiet,
        ..RunOptions::default()
    };
    train_and_finish(config, &data, &args.out, options, args.json)
}

pub const DEMO_EPOCHS: usize = 15;
