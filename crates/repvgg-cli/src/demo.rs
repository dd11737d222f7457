//! `repvgg demo`: train a small RepVGG on Fashion-MNIST, convert it, check both forms agree,
//! and compare their speed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use repvgg_data::DataKind;
use repvgg_train::{RunOptions, TrainConfig};

use crate::train::{arch_for, fit_batch, open_data, train_and_finish, warn_about_schedule};

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
    let mut config = TrainConfig::small_images(arch_for(DEMO_ARCH, &data, &dir)?);
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
    if !args.quiet {
        eprintln!(
            "demo: training {} ({} parameters) on {} ({} training, {} test images) for {} epoch{}",
            DEMO_ARCH,
            crate::count(config.arch.params(repvgg_arch::Form::Train) as u64),
            dir.display(),
            data.train.len(),
            data.test.len(),
            config.epochs,
            if config.epochs == 1 { "" } else { "s" }
        );
    }
    let options = RunOptions {
        resume: args.resume,
        overwrite,
        progress: !args.quiet,
        ..RunOptions::default()
    };
    train_and_finish(config, &data, &args.out, options, args.json)
}

pub const DEMO_EPOCHS: usize = 15;
