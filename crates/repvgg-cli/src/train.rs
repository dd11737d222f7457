//! `repvgg train`, and what `eval` and `demo` share with it: opening data, the spec for it,
//! training to the end with the final checks.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use repvgg_arch::ArchSpec;
use repvgg_data::{DataKind, DataSplits};
use repvgg_train::{Augment, FinalReport, Normalize, RunOptions, TrainConfig, Trainer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// The paper's ImageNet recipe: 120 epochs, batch 256, lr 0.1, RandomResizedCrop 224.
    Imagenet,
    /// Small images at native size: 10 epochs, batch 128, pad-and-crop + flip.
    Small,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NormalizeArg {
    /// ImageNet's mean and std.
    Imagenet,
    /// The training set's own (IDX and CIFAR).
    Dataset,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Variant name or custom spec, e.g. A0 or "depths=1,2,2,1;widths=32,64,128,256;stem=32".
    /// The class count is taken from the data unless the spec sets one.
    #[arg(long)]
    arch: String,
    /// Data directory: IDX files, CIFAR binary batches, or class folders of JPEG/PNG images.
    #[arg(long)]
    data: PathBuf,
    /// Output directory: checkpoint, metrics.csv, curves.png, train/deploy weights.
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
    /// Starting recipe; every option below overrides it. Default: small for in-memory data
    /// sets, imagenet for image folders.
    #[arg(long)]
    preset: Option<Preset>,
    /// Passes over the training set [default: the preset's: 120 imagenet, 10 small].
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per step [default: the preset's (256 imagenet, 128 small), or the largest
    /// power of two that fits a smaller training set].
    #[arg(long)]
    batch: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Weight decay (RepVGG's groups: none on BN and biases) [default: the preset's: 1e-4
    /// imagenet, 5e-4 small].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Epochs of linear warm-up to the peak rate before the cosine decay [default: the
    /// preset's: 5 imagenet, 1 small].
    #[arg(long)]
    warmup_epochs: Option<f64>,
    /// Label smoothing of the targets, in [0, 1) [default: 0.1].
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Mixup with Beta(ALPHA, ALPHA).
    #[arg(long)]
    mixup: Option<f64>,
    /// The official equivalent-kernel L2 instead of plain decay on the 3x3 and 1x1 kernels.
    #[arg(long)]
    custom_l2: bool,
    /// Nesterov momentum instead of plain momentum (0.9 either way).
    #[arg(long)]
    nesterov: bool,
    /// Training crop for image folders (RandomResizedCrop size; evaluation crops the same).
    #[arg(long)]
    size: Option<usize>,
    /// Zero padding of pad-and-crop for small images.
    #[arg(long)]
    pad: Option<usize>,
    /// Turn augmentation off.
    #[arg(long)]
    no_augment: bool,
    /// Normalise with ImageNet's statistics or the training set's own [default: the data
    /// set's for in-memory data, ImageNet's for image folders].
    #[arg(long)]
    normalize: Option<NormalizeArg>,
    /// Class names, one per line, recorded in the weights [default: the image folders'
    /// names, or the known names of Fashion-MNIST, MNIST and CIFAR-10/100].
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Seed of the initial weights, the data order and every augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from OUT/checkpoint.safetensors (same settings required).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start afresh in an OUT that holds another run, replacing its files.
    #[arg(long)]
    overwrite: bool,
    /// Also checkpoint every N steps (always after each epoch).
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Stop after N steps in total, with a checkpoint (resume later with --resume).
    #[arg(long)]
    stop_after_steps: Option<usize>,
    /// Share of each class held out for validation when the image folder has no val/.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// No progress bar or per-epoch lines.
    #[arg(long)]
    quiet: bool,
    /// End with one JSON line of results.
    #[arg(long)]
    json: bool,
    /// cpu, or wgpu (a GPU through Vulkan; needs a build with --features wgpu).
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// burn's CPU backend with our kernels.
    Cpu,
    /// A GPU through Vulkan (a build with --features wgpu).
    Wgpu,
}

impl From<DeviceArg> for repvgg_burn::Backend {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Cpu => repvgg_burn::Backend::Cpu,
            DeviceArg::Wgpu => repvgg_burn::Backend::Wgpu,
        }
    }
}

pub(crate) fn open_data(dir: &Path, val_fraction: f64) -> Result<DataSplits> {
    let data = repvgg_data::open_dir(dir, val_fraction)?;
    Ok(data)
}

/// The spec, with the class count taken from the data when the spec leaves the default; a
/// spec that sets another count than the data has is refused, naming both.
pub(crate) fn arch_for(arch: &str, data: &DataSplits, dir: &Path) -> Result<ArchSpec> {
    let mut spec = ArchSpec::parse(arch)?;
    let classes = data.train.classes().max(data.test.classes());
    let says_classes = arch.contains("classes=") || arch.trim_start().starts_with('{');
    if !says_classes {
        spec.num_classes = classes;
    } else if spec.num_classes != classes {
        bail!(
            "--arch sets {} classes but {} has {classes}; leave classes= out to take the data's",
            spec.num_classes,
            dir.display()
        );
    }
    Ok(spec)
}

fn config_from(args: &TrainArgs, data: &DataSplits) -> Result<TrainConfig> {
    let arch = arch_for(&args.arch, data, &args.data)?;
    let preset = args.preset.unwrap_or(match data.kind {
        DataKind::ImageFolder => Preset::Imagenet,
        _ => Preset::Small,
    });
    let mut c = match preset {
        Preset::Imagenet => TrainConfig::imagenet_120(arch),
        Preset::Small => TrainConfig::small_images(arch),
    };
    if data.kind == DataKind::ImageFolder {
        if let Augment::PadCropFlip { .. } = c.augment {
            bail!(
                "--preset small needs an in-memory data set (IDX or CIFAR); image folders need resizing"
            );
        }
        if let Some(size) = args.size {
            c.augment = Augment::RandomResizedCrop { size };
        }
    } else if let Some(pad) = args.pad {
        c.augment = Augment::PadCropFlip { pad };
    }
    if args.no_augment {
        if data.kind == DataKind::ImageFolder {
            bail!("image folders need a resizing transform; --no-augment is for in-memory data");
        }
        c.augment = Augment::None;
    }
    c.epochs = args.epochs.unwrap_or(c.epochs);
    let images = data.train.len();
    c.batch_size = match args.batch {
        Some(0) => bail!("--batch must be at least 1"),
        Some(batch) if batch > images => bail!(
            "--batch {batch} is more than the {images} training images in {}; use --batch {} or less",
            args.data.display(),
            images
        ),
        Some(batch) => batch,
        None => fit_batch(c.batch_size, images, args.quiet),
    };
    c.lr = args.lr.unwrap_or(c.lr);
    c.weight_decay = args.weight_decay.unwrap_or(c.weight_decay);
    c.warmup_epochs = args.warmup_epochs.unwrap_or(c.warmup_epochs);
    c.label_smoothing = args.label_smoothing.unwrap_or(c.label_smoothing);
    c.mixup_alpha = args.mixup.or(c.mixup_alpha);
    c.custom_l2 |= args.custom_l2;
    c.nesterov |= args.nesterov;
    c.seed = args.seed;
    if let Some(n) = args.normalize {
        c.normalize = match n {
            NormalizeArg::Imagenet => Normalize::ImageNet,
            NormalizeArg::Dataset => Normalize::Dataset,
        };
    }
    if !(c.lr > 0.0 && c.lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    if !(0.0..1.0).contains(&c.label_smoothing) {
        bail!("--label-smoothing must be in [0, 1)");
    }
    if c.mixup_alpha.is_some_and(|a| !(a > 0.0 && a.is_finite())) {
        bail!("--mixup must be a positive alpha");
    }
    if c.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if !(c.warmup_epochs >= 0.0 && c.warmup_epochs.is_finite()) {
        bail!("--warmup-epochs must be zero or more");
    }
    warn_about_schedule(&c, "lower --warmup-epochs or raise --epochs");
    Ok(c)
}

/// The preset's batch, or for a training set smaller than it the largest power of two that
/// fits (an epoch must hold at least one full batch).
pub(crate) fn fit_batch(preset: usize, images: usize, quiet: bool) -> usize {
    if images >= preset {
        return preset;
    }
    let fitted = 1usize << (usize::BITS - 1 - images.max(1).leading_zeros());
    if !quiet {
        eprintln!(
            "note: {images} training images are fewer than the preset's batch of {preset}; using --batch {fitted}"
        );
    }
    fitted
}

/// Which command trains what on which data, for the run's first line.
pub(crate) struct RunLabel<'a> {
    pub who: &'a str,
    pub arch: &'a str,
    pub data_dir: &'a Path,
}

/// The run's first line, once its settings have passed every check: what trains on what, at
/// which input size, so that a surprise (an image folder's 28x28 images trained at the
/// ImageNet preset's 224) shows before the minutes go.
fn announce(label: &RunLabel, config: &TrainConfig, data: &DataSplits) {
    let [h, w] = config.preprocessing(data).size;
    let RunLabel {
        who,
        arch,
        data_dir,
    } = label;
    eprintln!(
        "{who}: training {arch} ({} parameters) on {} ({} training, {} evaluation images) for {} \
         epoch{} at {h}x{w}, batch {}, lr {}",
        crate::count(config.arch.params(repvgg_arch::Form::Train) as u64),
        data_dir.display(),
        data.train.len(),
        data.test.len(),
        config.epochs,
        if config.epochs == 1 { "" } else { "s" },
        config.batch_size,
        config.lr,
    );
}

/// An image folder whose images are at most half the training crop each way is upscaled
/// into it: the cost of a 224 crop for a 28-pixel image's information. Judged on the first
/// training image (one decode), as folders of one data set share a size.
fn note_small_images(config: &TrainConfig, data: &DataSplits, dir: &Path) {
    let Augment::RandomResizedCrop { size } = config.augment else {
        return;
    };
    if data.kind != DataKind::ImageFolder || data.train.is_empty() {
        return;
    }
    let Ok(image) = data.train.image(0) else {
        return;
    };
    let (w, h) = (image.width() as usize, image.height() as usize);
    if 2 * w <= size && 2 * h <= size {
        eprintln!(
            "note: images in {} are small ({} is {w}x{h}) and are upscaled to {size}x{size} \
             crops; --size {} trains near their own size, at a fraction of the cost",
            dir.display(),
            data.train.describe(0),
            w.max(h)
        );
    }
}

/// A warm-up as long as the run never reaches the peak rate: legal, but rarely meant.
pub(crate) fn warn_about_schedule(c: &TrainConfig, remedy: &str) {
    if c.warmup_epochs >= c.epochs as f64 {
        let epochs = |n: f64| {
            if n == 1.0 {
                "1 epoch".to_string()
            } else {
                format!("{n} epochs")
            }
        };
        eprintln!(
            "warning: the warm-up ({}) is not shorter than the run ({}), so the learning rate \
             never reaches its peak {}; {remedy}",
            epochs(c.warmup_epochs),
            epochs(c.epochs as f64),
            c.lr
        );
    }
}

fn print_final(report: &FinalReport, seconds: f64, history: &[repvgg_train::EpochRecord]) {
    let last = history.last();
    eprintln!(
        "trained in {seconds:.1} s ({:.1} s per epoch)",
        seconds / history.len().max(1) as f64
    );
    if let Some(last) = last {
        eprintln!(
            "final epoch: train acc {:.4}, validation acc {:.4}",
            last.train_acc, last.val_acc
        );
    }
    eprintln!(
        "training form: top-1 {:.4}, top-5 {:.4}, {:.0} img/s (burn, eval mode)",
        report.train_form.top1, report.train_form.top5, report.train_form_images_per_s
    );
    eprintln!(
        "deploy form:   top-1 {:.4}, top-5 {:.4}, {:.0} img/s (engine)",
        report.deploy_form.top1, report.deploy_form.top5, report.deploy_images_per_s
    );
    eprintln!(
        "predictions agree on {}/{} images (max logit difference {:.2e} relative); deploy/train speed {:.2}x",
        report.train_form.count - report.disagreements,
        report.train_form.count,
        report.max_logit_rel_diff,
        report.deploy_images_per_s / report.train_form_images_per_s
    );
    eprintln!("deploy weights: {}", report.deploy_path.display());
}

fn result_json(
    report: &FinalReport,
    seconds: f64,
    history: &[repvgg_train::EpochRecord],
    out: &Path,
) -> serde_json::Value {
    serde_json::json!({
        "test_accuracy": report.train_form.top1,
        "test_top5": report.train_form.top5,
        "deploy_test_accuracy": report.deploy_form.top1,
        "predictions_agree": report.disagreements == 0,
        "disagreements": report.disagreements,
        "max_logit_rel_diff": report.max_logit_rel_diff,
        "train_seconds": seconds,
        "epochs": history.len(),
        "seconds_per_epoch": seconds / history.len().max(1) as f64,
        "train_images_per_s": history.last().map(|r| r.images_per_s),
        "data_wait_s": history.iter().map(|r| r.data_wait_s).sum::<f64>(),
        "deploy_speedup": report.deploy_images_per_s / report.train_form_images_per_s,
        "deploy_weights": report.deploy_path,
        "curves": out.join("curves.png"),
        "metrics": out.join("metrics.csv"),
    })
}

/// Trains, converts and checks; returns the results as JSON (`None` when the run stopped
/// early, to be resumed).
pub(crate) fn train_and_finish(
    config: TrainConfig,
    data: &DataSplits,
    out: &Path,
    label: RunLabel,
    options: RunOptions,
) -> Result<Option<serde_json::Value>> {
    let quiet = !options.progress;
    let [h, w] = config.preprocessing(data).size;
    crate::check_training_memory(
        &config.arch,
        config.batch_size,
        h,
        w,
        &out.display().to_string(),
    )?;
    let mut trainer = Trainer::new(config, data, out, options)?;
    if !quiet {
        announce(&label, trainer.config(), data);
        note_small_images(trainer.config(), data, label.data_dir);
    }
    if let Some((epoch, step, global)) = trainer.resumed_at() {
        let epochs = trainer.config().epochs;
        let at = if epoch >= epochs {
            "the run is complete; checking both forms and rewriting the weights".to_string()
        } else {
            format!(
                "continuing epoch {} of {epochs} at step {} of {}",
                epoch + 1,
                step + 1,
                trainer.steps_per_epoch()
            )
        };
        eprintln!(
            "resumed {} after {global} steps ({epoch} of {epochs} epochs done): {at}",
            trainer.checkpoint_path().display()
        );
    }
    let done = trainer.run()?;
    let seconds: f64 = trainer.history().iter().map(|r| r.seconds).sum();
    if !done {
        eprintln!(
            "stopped after step {}; continue with --resume (checkpoint: {})",
            trainer.global_step(),
            trainer.checkpoint_path().display()
        );
        return Ok(None);
    }
    let report = trainer.finish()?;
    if !quiet {
        print_final(&report, seconds, trainer.history());
    }
    if report.disagreements > 0 {
        bail!(
            "the converted model disagrees with the training form on {} predictions",
            report.disagreements
        );
    }
    Ok(Some(result_json(&report, seconds, trainer.history(), out)))
}

pub fn train(args: TrainArgs) -> Result<()> {
    // A typo in the architecture, or an --out that holds a run, is reported before minutes
    // of data loading (the trainer checks the latter again).
    ArchSpec::parse(&args.arch)?;
    if !args.resume && !args.overwrite {
        let existing: Vec<&str> = repvgg_train::RUN_FILES
            .iter()
            .copied()
            .filter(|name| args.out.join(name).exists())
            .collect();
        if !existing.is_empty() {
            let resume = if args.out.join(repvgg_train::RUN_FILES[0]).is_file() {
                "continue it with --resume, "
            } else {
                ""
            };
            bail!(
                "{}: holds a training run ({}); {resume}replace it with --overwrite, or choose another --out",
                args.out.display(),
                existing.join(", ")
            );
        }
    }
    let mut data = open_data(&args.data, args.val_fraction)?;
    if data.class_names.is_none() && args.labels.is_none() && !args.quiet {
        eprintln!(
            "note: {} records no class names; the weights will name classes by index (--labels FILE names them)",
            args.data.display()
        );
    }
    let config = config_from(&args, &data)?;
    if let Some(path) = &args.labels {
        data.class_names = Some(crate::model_input::read_labels(
            path,
            config.arch.num_classes,
        )?);
    }
    let options = RunOptions {
        resume: args.resume,
        overwrite: args.overwrite,
        checkpoint_every: args.checkpoint_every,
        stop_after_steps: args.stop_after_steps,
        progress: !args.quiet,
        backend: args.device.into(),
        ..RunOptions::default()
    };
    let label = RunLabel {
        who: "train",
        arch: &args.arch,
        data_dir: &args.data,
    };
    let result = train_and_finish(config, &data, &args.out, label, options)?;
    if let (true, Some(result)) = (args.json, result) {
        println!("{result}");
    }
    Ok(())
}
