//! `repvgg`: inspect, convert and run RepVGG models.

#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use repvgg_arch::{ArchSpec, Form, VARIANT_NAMES};
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_checkpoint::{Checkpoint, Naming};

mod bench;
mod demo;
mod eval;
mod forward;
mod predict;
mod train;

#[derive(Parser)]
#[command(
    name = "repvgg",
    version,
    about = "RepVGG toolkit: inspect, convert and run RepVGG models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe variants (parameters and MACs of both forms) or a checkpoint file.
    ///
    /// With no argument, prints the table of all published variants. With a variant name or
    /// custom spec, prints that one. With a file, reports its form, naming and architecture.
    Info {
        /// A variant (A0, RepVGG-B1g4, repvgg_d2se), a custom spec
        /// ("depths=1,2,2,1;widths=16,32,64,128;stem=16"), a spec .json, or a checkpoint.
        target: Option<String>,
        /// Input size for MAC counts: 224, or HxW such as 256x320.
        #[arg(long, default_value = "224")]
        size: String,
        /// Check a checkpoint against this architecture (reports every mismatching key).
        #[arg(long)]
        arch: Option<String>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert a training-form checkpoint to a deploy-form .safetensors file.
    Convert {
        /// Training-form checkpoint: .pth or .safetensors, official, timm or mmpretrain names.
        input: PathBuf,
        /// Output .safetensors file (written atomically).
        output: PathBuf,
        /// Require the checkpoint to be this architecture.
        #[arg(long)]
        arch: Option<String>,
        /// Key naming of the output.
        #[arg(long, default_value = "official")]
        naming: Naming,
        /// Batch-norm eps (state dicts do not record it; PyTorch's default is 1e-5).
        #[arg(long, default_value_t = DEFAULT_BN_EPS)]
        bn_eps: f64,
    },
    /// Run a model in inference mode on a batch of images stored as safetensors.
    Forward {
        /// Weights in either form and any naming, .pth or .safetensors.
        #[arg(long)]
        weights: PathBuf,
        /// A .safetensors file with tensor `input` of shape (N, 3, H, W).
        #[arg(long)]
        input: PathBuf,
        /// Output .safetensors: `logits` (N, classes), and `features.<block>` with --features.
        #[arg(long)]
        output: PathBuf,
        /// Require the weights to be this architecture.
        #[arg(long)]
        arch: Option<String>,
        /// Also write every block's output, in official block names (stage0, stage1.0, ...).
        #[arg(long)]
        features: bool,
        /// Also write the outputs of these stages (0..4) as `stages.<k>`, e.g. 1,2,3,4: the
        /// feature pyramid a detector or segmenter takes from a backbone.
        #[arg(long, value_delimiter = ',')]
        out_indices: Option<Vec<usize>>,
        /// Batch-norm eps for training-form weights.
        #[arg(long, default_value_t = DEFAULT_BN_EPS)]
        bn_eps: f64,
        /// Cap the engine's instruction set (default: the best this machine has).
        #[arg(long)]
        isa: Option<IsaArg>,
    },
    /// Time inference: median and p90 latency, images/s, GFLOP/s (2 x MACs / time), peak memory.
    ///
    /// The deploy form runs on the engine; the training form is the unconverted multi-branch
    /// model (burn, eval mode), so the gain of conversion is measured.
    Bench(bench::BenchArgs),
    /// Train the multi-branch form on a data set, then convert it and check both forms agree.
    Train(train::TrainArgs),
    /// Top-1/top-5, per-class accuracy and (optionally) the confusion matrix on a data set.
    Eval(eval::EvalArgs),
    /// Train a small RepVGG on Fashion-MNIST, convert it, verify, benchmark: the whole story.
    Demo(demo::DemoArgs),
    /// Classify JPEG/PNG photos: top-k classes with probabilities.
    Predict(predict::PredictArgs),
    /// Export the deploy-form graph as ONNX (weights in either form and any naming).
    ///
    /// Input `input`: float32 (N, 3, H, W), ImageNet-normalised; output `logits`: float32
    /// (N, classes). N is fixed (--batch) or symbolic (`batch`, with --dynamic-batch).
    Export {
        weights: PathBuf,
        /// Output .onnx file (written atomically).
        output: PathBuf,
        #[arg(long, default_value_t = 17)]
        opset: i64,
        /// A symbolic batch dimension, so any batch size runs.
        #[arg(long)]
        dynamic_batch: bool,
        /// The fixed batch size without --dynamic-batch.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Input size: 224, or HxW.
        #[arg(long, default_value = "224")]
        size: String,
        #[arg(long)]
        arch: Option<String>,
        #[arg(long, default_value_t = DEFAULT_BN_EPS)]
        bn_eps: f64,
    },
}

/// An instruction set for the engine's kernels (`--isa`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IsaArg {
    Portable,
    Avx2,
    Avx512,
}

impl From<IsaArg> for repvgg_engine::Isa {
    fn from(isa: IsaArg) -> Self {
        match isa {
            IsaArg::Portable => repvgg_engine::Isa::Portable,
            IsaArg::Avx2 => repvgg_engine::Isa::Avx2,
            IsaArg::Avx512 => repvgg_engine::Isa::Avx512,
        }
    }
}

fn main() -> ExitCode {
    // A closed pipe (`repvgg bench --json | head -1`) ends the program quietly, as it does
    // other command-line tools, rather than as a panic in `println!`.
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, as for every other error; --help has the details.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("{} (see repvgg --help)", first.trim_end());
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Info {
            target,
            size,
            arch,
            json,
        } => info(target, &size, arch, json),
        Command::Convert {
            input,
            output,
            arch,
            naming,
            bn_eps,
        } => convert(&input, &output, arch, naming, bn_eps),
        Command::Forward {
            weights,
            input,
            output,
            arch,
            features,
            out_indices,
            bn_eps,
            isa,
        } => forward::run(
            &weights,
            &input,
            &output,
            arch,
            features,
            out_indices,
            bn_eps,
            isa.map(Into::into),
        ),
        Command::Bench(args) => bench::run(args),
        Command::Train(args) => train::train(args),
        Command::Eval(args) => eval::eval(args),
        Command::Demo(args) => demo::demo(args),
        Command::Predict(args) => predict::run(args),
        Command::Export {
            weights,
            output,
            opset,
            dynamic_batch,
            batch,
            size,
            arch,
            bn_eps,
        } => export(
            &weights,
            &output,
            opset,
            dynamic_batch,
            batch,
            &size,
            arch,
            bn_eps,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn export(
    weights: &Path,
    output: &Path,
    opset: i64,
    dynamic_batch: bool,
    batch: usize,
    size: &str,
    arch: Option<String>,
    bn_eps: f64,
) -> Result<()> {
    check_bn_eps(bn_eps)?;
    let (height, width) = parse_size(size)?;
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let ckpt = load_checkpoint(weights, arch)?;
    let options = repvgg_onnx::ExportOptions {
        opset,
        dynamic_batch,
        batch,
        height,
        width,
    };
    let bytes = repvgg_onnx::export(&ckpt, bn_eps, options)
        .map_err(|e| anyhow::anyhow!("{}: {e}", weights.display()))?;
    repvgg_checkpoint::write_atomically(output, &bytes)?;
    eprintln!(
        "wrote {} ({} MB, opset {opset}, input (N, {}, {height}, {width}) with N {})",
        output.display(),
        bytes.len() / 1_000_000,
        ckpt.spec.in_channels,
        if dynamic_batch {
            "symbolic".to_string()
        } else {
            batch.to_string()
        }
    );
    Ok(())
}

pub fn parse_arch(arch: Option<String>) -> Result<Option<ArchSpec>> {
    arch.map(|a| ArchSpec::parse(&a))
        .transpose()
        .map_err(Into::into)
}

pub fn load_checkpoint(path: &Path, arch: Option<String>) -> Result<Checkpoint> {
    let arch = parse_arch(arch)?;
    Ok(Checkpoint::load(path, arch.as_ref())?)
}

pub fn parse_size(size: &str) -> Result<(usize, usize)> {
    let parse = |s: &str| s.trim().parse::<usize>().ok().filter(|&n| n > 0);
    match size.split_once(['x', 'X']) {
        Some((h, w)) => parse(h).zip(parse(w)),
        None => parse(size).map(|s| (s, s)),
    }
    .with_context(|| format!("--size '{size}': expected a positive size such as 224 or 256x320"))
}

fn millions(n: usize) -> String {
    format!("{:.3}M", n as f64 / 1e6)
}

fn giga(n: u64) -> String {
    format!("{:.3}G", n as f64 / 1e9)
}

fn spec_json(spec: &ArchSpec, h: usize, w: usize) -> serde_json::Value {
    serde_json::json!({
        "arch": spec,
        "params_train": spec.params(Form::Train),
        "params_deploy": spec.params(Form::Deploy),
        "macs_train": spec.macs(Form::Train, h, w),
        "macs_deploy": spec.macs(Form::Deploy, h, w),
        "input_size": [h, w],
    })
}

fn describe(spec: &ArchSpec) -> String {
    let groups = if spec.groups.is_empty() {
        "none".to_string()
    } else {
        spec.groups
            .iter()
            .map(|(l, g)| format!("{l}:{g}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "{}: stem {}, depths {:?}, widths {:?}, groups {}, SE {}, {} classes, {} input channels",
        spec.name,
        spec.stem_width,
        spec.depths,
        spec.widths,
        groups,
        if spec.se { "yes" } else { "no" },
        spec.num_classes,
        spec.in_channels
    )
}

/// Whether `info`'s argument names a checkpoint file (existing or not) rather than a variant.
pub fn is_checkpoint_path(target: &str) -> bool {
    let lower = target.to_ascii_lowercase();
    Path::new(target).is_file() && !lower.ends_with(".json")
        || [".pth", ".pt", ".bin", ".ckpt", ".safetensors"]
            .iter()
            .any(|ext| lower.ends_with(ext))
}

pub fn check_bn_eps(bn_eps: f64) -> Result<()> {
    if !(bn_eps.is_finite() && bn_eps > 0.0) {
        bail!("--bn-eps must be a positive number, got {bn_eps}");
    }
    Ok(())
}

fn info(target: Option<String>, size: &str, arch: Option<String>, json: bool) -> Result<()> {
    let (h, w) = parse_size(size)?;
    let Some(target) = target else {
        let specs: Vec<ArchSpec> = VARIANT_NAMES
            .iter()
            .map(|n| ArchSpec::named(n).unwrap())
            .collect();
        if json {
            for spec in &specs {
                println!("{}", spec_json(spec, h, w));
            }
            return Ok(());
        }
        println!(
            "{:<14} {:>12} {:>13} {:>12} {:>13}   (MACs at {h}x{w})",
            "variant", "params train", "params deploy", "MACs train", "MACs deploy"
        );
        for spec in &specs {
            println!(
                "{:<14} {:>12} {:>13} {:>12} {:>13}",
                spec.name,
                millions(spec.params(Form::Train)),
                millions(spec.params(Form::Deploy)),
                giga(spec.macs(Form::Train, h, w)),
                giga(spec.macs(Form::Deploy, h, w)),
            );
        }
        return Ok(());
    };

    let path = Path::new(&target);
    if !is_checkpoint_path(&target) {
        let spec = ArchSpec::parse(&target)?;
        if json {
            println!("{}", spec_json(&spec, h, w));
        } else {
            println!("{}", describe(&spec));
            println!(
                "params: train {} / deploy {}",
                millions(spec.params(Form::Train)),
                millions(spec.params(Form::Deploy))
            );
            println!(
                "MACs at {h}x{w}: train {} / deploy {}",
                giga(spec.macs(Form::Train, h, w)),
                giga(spec.macs(Form::Deploy, h, w))
            );
        }
        return Ok(());
    }

    let ckpt = load_checkpoint(path, arch)?;
    let spec = &ckpt.spec;
    if json {
        let mut value = spec_json(spec, h, w);
        let extra = serde_json::json!({
            "file": path.display().to_string(),
            "form": ckpt.form,
            "naming": ckpt.naming.to_string(),
            "dtype": format!("{:?}", ckpt.source_dtype),
            "tensors": ckpt.file_tensor_count,
        });
        value
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        println!("{value}");
        return Ok(());
    }
    println!("file: {}", path.display());
    println!("form: {}", ckpt.form);
    println!("naming: {}", ckpt.naming);
    println!("dtype: {:?}", ckpt.source_dtype);
    println!(
        "tensors: {} in file, {} weights used",
        ckpt.file_tensor_count,
        ckpt.tensors.len()
    );
    println!("architecture: {}", describe(spec));
    println!(
        "params: {} in this form ({} train / {} deploy)",
        millions(spec.params(ckpt.form)),
        millions(spec.params(Form::Train)),
        millions(spec.params(Form::Deploy))
    );
    println!(
        "MACs at {h}x{w}: train {} / deploy {}",
        giga(spec.macs(Form::Train, h, w)),
        giga(spec.macs(Form::Deploy, h, w))
    );
    Ok(())
}

fn convert(
    input: &Path,
    output: &Path,
    arch: Option<String>,
    naming: Naming,
    bn_eps: f64,
) -> Result<()> {
    let extension = output
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ["pth", "pt", "bin", "ckpt"].contains(&extension.as_str()) {
        bail!(
            "{}: only .safetensors can be written (PyTorch reads it with safetensors.torch.load_file)",
            output.display()
        );
    }
    check_bn_eps(bn_eps)?;
    let ckpt = load_checkpoint(input, arch)?;
    if ckpt.form == Form::Deploy {
        eprintln!(
            "{}: already in deploy form; rewriting it in {naming} naming",
            input.display()
        );
    }
    let deploy = ckpt.to_deploy(bn_eps)?;
    deploy.save_safetensors(output, naming)?;
    eprintln!(
        "{} ({}, {} form, {} naming) -> {} (deploy form, {naming} naming, {} tensors, {} params)",
        input.display(),
        ckpt.spec.name,
        ckpt.form,
        ckpt.naming,
        output.display(),
        deploy.tensors.len(),
        millions(deploy.spec.params(Form::Deploy)),
    );
    Ok(())
}
