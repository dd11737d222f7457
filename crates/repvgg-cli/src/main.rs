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
mod bench_serve;
mod demo;
mod eval;
mod forward;
mod model_input;
mod predict;
mod quantize;
mod serve;
mod train;

use model_input::{InputArgs, imagenet_fallback, read_labels};

#[derive(Parser)]
#[command(
    name = "repvgg",
    version,
    about = "RepVGG toolkit: train the multi-branch form, convert it to the plain one, and run, \
             evaluate, benchmark and export models",
    long_about = "RepVGG toolkit.\n\n\
        info      describe variants, specs and weights files\n\
        convert   turn training-form weights into the deploy form\n\
        forward   run a model on a batch (safetensors or images)\n\
        bench     time inference or a training step\n\
        train     train the multi-branch form on a data set\n\
        eval      accuracy on a data set's held-out split\n\
        predict   classify JPEG/PNG images\n\
        quantize  post-training INT8 from calibration images\n\
        serve     an HTTP server: KServe V2 inference, image classification, metrics\n\
        bench-serve  load a server over loopback: throughput, p50/p99 latency\n\
        export    write the deploy-form graph as ONNX\n\
        demo      the quick start: train, convert, verify and time on Fashion-MNIST\n\n\
        Weights files written here record how to feed the model and its class names; \
        `repvgg info FILE` shows them."
)]
struct Cli {
    /// On a weights file that does not match, list every mismatching key.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe variants (parameters and MACs of both forms) or a weights file.
    ///
    /// With no argument, prints the table of all published variants. With a variant name or
    /// custom spec, prints that one. With a file, reports its form, naming, architecture,
    /// preprocessing and class names, and for a training checkpoint where the run stands.
    Info {
        /// A variant (A0, RepVGG-B1g4, repvgg_d2se), a custom spec
        /// ("depths=1,2,2,1;widths=16,32,64,128;stem=16"), a spec .json, or a weights file.
        target: Option<String>,
        /// A weights file (the same as giving it as the argument).
        #[arg(long, conflicts_with = "target")]
        weights: Option<PathBuf>,
        /// Input size for MAC counts: 224, or HxW such as 256x320 [default: a weights file's
        /// input size, else 224].
        #[arg(long)]
        size: Option<String>,
        /// Check a weights file against this architecture (a variant name or spec).
        #[arg(long)]
        arch: Option<String>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert training-form weights to a deploy-form .safetensors file.
    ///
    /// The preprocessing and class names the input records are carried over; the flags below
    /// set or change them (for published checkpoints, which record none).
    Convert {
        /// Training-form weights (or give them with --weights).
        #[arg(value_name = "IN")]
        first: Option<PathBuf>,
        /// Output .safetensors file (written atomically).
        #[arg(value_name = "OUT")]
        second: Option<PathBuf>,
        /// Training-form weights: .pth or .safetensors, official, timm or mmpretrain names, or
        /// a training checkpoint.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Require the weights to be this architecture (a variant name or spec).
        #[arg(long)]
        arch: Option<String>,
        /// Key naming of the output.
        #[arg(long, default_value = "official")]
        naming: Naming,
        /// Batch-norm eps (state dicts do not record it; PyTorch's default is 1e-5).
        #[arg(long, default_value_t = DEFAULT_BN_EPS)]
        bn_eps: f64,
        /// Record these class names (one per line) in the output.
        #[arg(long)]
        labels: Option<PathBuf>,
        #[command(flatten)]
        input: InputArgs,
    },
    /// Run a model in inference mode on a batch: safetensors tensor or JPEG/PNG images.
    Forward {
        /// Weights in either form and any naming, .pth or .safetensors (a training checkpoint
        /// too).
        #[arg(long)]
        weights: PathBuf,
        /// A .safetensors file holding the batch (N, 3, H, W), already preprocessed: the
        /// tensor named `input`, or the file's only tensor. Or one or more JPEG/PNG images
        /// (repeat --input), preprocessed as the weights file records.
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        /// Output .safetensors: `logits` (N, classes), and `features.<block>` with --features.
        #[arg(long)]
        output: PathBuf,
        /// Require the weights to be this architecture (a variant name or spec).
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
        #[command(flatten)]
        preprocess: InputArgs,
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
    /// Classify JPEG/PNG images: top-k classes with probabilities.
    Predict(predict::PredictArgs),
    /// Post-training INT8: calibrate activation ranges on images, write an INT8 model.
    ///
    /// The file it writes is read by every command: eval, predict and forward run it on the
    /// INT8 engine; the others see its dequantized weights.
    Quantize(quantize::QuantizeArgs),
    /// Serve a model over HTTP: the Open Inference Protocol (KServe V2), /v1/classify for
    /// JPEG/PNG bodies, dynamic batching, Prometheus metrics at /metrics.
    ///
    /// Stops on SIGTERM or Ctrl-C after answering every request it accepted.
    Serve(serve::ServeArgs),
    /// Load an inference server over loopback: throughput and p50/p99 latency at each
    /// concurrency, closed loop or at a fixed arrival rate (bench/serve_compare.sh).
    BenchServe(bench_serve::BenchServeArgs),
    /// Export the deploy-form graph as ONNX (weights in either form and any naming).
    ///
    /// Input `input`: float32 (N, 3, H, W), preprocessed as the weights file records (its
    /// `repvgg.preprocessing` is copied into the ONNX metadata); output `logits`: float32
    /// (N, classes). N is fixed (--batch) or symbolic (`batch`, with --dynamic-batch).
    Export {
        /// Weights in either form (or give them with --weights).
        #[arg(value_name = "IN")]
        first: Option<PathBuf>,
        /// Output .onnx file (written atomically).
        #[arg(value_name = "OUT")]
        second: Option<PathBuf>,
        /// Weights in either form and any naming, .pth or .safetensors.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Export a variant or spec with seeded random weights instead (timing and deployment
        /// tests; `bench/compare_int8.sh` uses it): `export --random A0 OUT`.
        #[arg(long, conflicts_with = "weights")]
        random: Option<String>,
        /// ONNX opset, 11 to 21.
        #[arg(long, default_value_t = 17, value_parser = clap::value_parser!(i64).range(11..=21))]
        opset: i64,
        /// A symbolic batch dimension, so any batch size runs.
        #[arg(long, conflicts_with = "batch")]
        dynamic_batch: bool,
        /// The fixed batch size [default: 1].
        #[arg(long)]
        batch: Option<usize>,
        /// Input size: 224, or HxW [default: the weights file's input size, else 224].
        #[arg(long)]
        size: Option<String>,
        /// Require the weights to be this architecture (a variant name or spec).
        #[arg(long)]
        arch: Option<String>,
        /// Batch-norm eps for training-form weights.
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
        Err(e) => {
            // clap's own rendering: what is missing or wrong, the allowed values, "did you
            // mean", and the subcommand's usage. --help and --version come this way too.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let verbose = cli.verbose;
    let result = match cli.command {
        Command::Info {
            target,
            weights,
            size,
            arch,
            json,
        } => match weights {
            // A value given as --weights is a file, whatever it looks like.
            Some(weights) => info_file(&weights, size, arch, json),
            None => info(target, size, arch, json),
        },
        Command::Convert {
            first,
            second,
            weights,
            arch,
            naming,
            bn_eps,
            labels,
            input,
        } => weights_and_output(weights, first, second, "convert").and_then(|(weights, output)| {
            convert(&weights, &output, arch, naming, bn_eps, labels, &input)
        }),
        Command::Forward {
            weights,
            input,
            output,
            arch,
            features,
            out_indices,
            bn_eps,
            isa,
            preprocess,
        } => forward::run(forward::ForwardRun {
            weights: &weights,
            inputs: &input,
            output: &output,
            arch,
            features,
            out_indices,
            bn_eps,
            isa: isa.map(Into::into),
            preprocess: &preprocess,
        }),
        Command::Bench(args) => bench::run(args),
        Command::Train(args) => train::train(args),
        Command::Eval(args) => eval::eval(args),
        Command::Demo(args) => demo::demo(args),
        Command::Predict(args) => predict::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Serve(args) => serve::run(args),
        Command::BenchServe(args) => bench_serve::run(args),
        Command::Export {
            first,
            second,
            weights,
            random,
            opset,
            dynamic_batch,
            batch,
            size,
            arch,
            bn_eps,
        } => {
            let paths = match (random, first, second) {
                (Some(spec), Some(out), None) => Ok((Source::Random(spec), out)),
                (Some(_), _, _) => {
                    usage_error("export", "with --random, give only the output file (OUT)")
                }
                (None, first, second) => weights_and_output(weights, first, second, "export")
                    .map(|(w, out)| (Source::File(w), out)),
            };
            paths.and_then(|(source, output)| {
                export(
                    &source,
                    &output,
                    opset,
                    dynamic_batch,
                    batch,
                    size,
                    arch,
                    bn_eps,
                )
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A long list of mismatching keys is summarised in the line; --verbose has it all.
            let details = e
                .chain()
                .find_map(|c| c.downcast_ref::<repvgg_checkpoint::CheckpointError>())
                .map(|c| c.details.clone())
                .unwrap_or_default();
            eprintln!("error: {e:#}");
            if !details.is_empty() && !verbose {
                eprintln!("  (--verbose lists all {})", details.len());
            }
            if verbose {
                for line in details {
                    eprintln!("  {line}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

/// The weights and output of `convert` and `export`: `--weights W OUT` or the older `W OUT`.
fn weights_and_output(
    weights: Option<PathBuf>,
    first: Option<PathBuf>,
    second: Option<PathBuf>,
    command: &str,
) -> Result<(PathBuf, PathBuf)> {
    match (weights, first, second) {
        (Some(w), Some(out), None) => Ok((w, out)),
        (None, Some(w), Some(out)) => Ok((w, out)),
        (Some(_), Some(_), Some(_)) => {
            usage_error(command, "with --weights, give only the output file (OUT)")
        }
        (None, Some(_), None) | (Some(_), None, None) => {
            usage_error(command, "no output file given (OUT)")
        }
        _ => usage_error(
            command,
            "the weights (IN or --weights) and the output file (OUT) are required",
        ),
    }
}

/// Stops with clap's rendering of a usage error for `command` (exit status 2), for rules
/// clap's declarations cannot express.
fn usage_error(command: &str, message: &str) -> ! {
    use clap::CommandFactory;
    let mut cli = Cli::command();
    cli.build();
    let sub = cli
        .find_subcommand_mut(command)
        .expect("a subcommand of ours");
    sub.error(clap::error::ErrorKind::MissingRequiredArgument, message)
        .exit()
}

/// Where `export` takes its weights from.
enum Source {
    File(PathBuf),
    /// A variant or spec with seeded random weights.
    Random(String),
}

/// Refuses `spec` at `batch` x `h` x `w` when the memory it implies
/// ([`ArchSpec::memory_estimate`]) is over what this machine has available, before anything
/// is built: an oversized custom spec otherwise aborts the process partway through allocating.
/// `with_train_weights`: the training-form weights are still to be made (random weights).
pub fn check_memory(
    spec: &ArchSpec,
    batch: usize,
    h: usize,
    w: usize,
    with_train_weights: bool,
    what: &str,
) -> Result<()> {
    let estimate = spec.memory_estimate(batch, h, w);
    let train = if with_train_weights {
        estimate.train_weights
    } else {
        0
    };
    let need = train
        .saturating_add(estimate.engine_weights)
        .saturating_add(estimate.activations);
    require_memory(need, || {
        format!(
            "{what}: batch {batch} at {h}x{w} needs about {:.1} GB ({}engine weights {:.1} GB, \
             activations {:.1} GB)",
            gb(need),
            if with_train_weights {
                format!("training-form weights {:.1} GB, ", gb(train))
            } else {
                String::new()
            },
            gb(estimate.engine_weights),
            gb(estimate.activations),
        )
    })
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

/// Refuses, with `what` needs and what the machine has, when `need` bytes exceed the memory
/// available (where the machine says; elsewhere nothing is refused).
fn require_memory(need: u64, what: impl FnOnce() -> String) -> Result<()> {
    match repvgg_engine::available_memory() {
        Some(available) if need > available => bail!(
            "{}; this machine has {:.1} GB available",
            what(),
            gb(available)
        ),
        _ => Ok(()),
    }
}

/// Image commands make RGB inputs: a model that takes another number of channels is refused
/// before any image is read (`forward --input` feeds it tensors).
pub fn require_rgb(ckpt: &Checkpoint, weights: &Path) -> Result<()> {
    if ckpt.spec.in_channels != 3 {
        bail!(
            "{}: the model takes {} input channels, and images give 3 (RGB); feed it tensors \
             with `repvgg forward --input BATCH.safetensors`",
            weights.display(),
            ckpt.spec.in_channels
        );
    }
    Ok(())
}

/// As [`check_memory`], for a training step: the feature maps kept for the backward pass,
/// their gradients, the weights and the momentum.
pub fn check_training_memory(
    spec: &ArchSpec,
    batch: usize,
    h: usize,
    w: usize,
    what: &str,
) -> Result<()> {
    let need = spec.memory_estimate(batch, h, w).training;
    require_memory(need, || {
        format!(
            "{what}: training batches of {batch} at {h}x{w} need about {:.1} GB (saved feature \
             maps, their gradients, weights and momentum; lower --batch)",
            gb(need)
        )
    })
}

/// A variant or spec with seeded random weights (seed 0): the same model for `export
/// --random`, `serve --random` and `bench --arch`, so timings of one can be set beside another.
pub fn random_checkpoint(spec: &str) -> Result<Checkpoint> {
    let text = spec;
    let spec = ArchSpec::parse(spec)?;
    check_memory(&spec, 1, 224, 224, true, text)?;
    let tensors = repvgg_checkpoint::random::training_weights(&spec, 0);
    Ok(Checkpoint::from_state_dict(spec, Form::Train, tensors)?)
}

#[allow(clippy::too_many_arguments)]
fn export(
    source: &Source,
    output: &Path,
    opset: i64,
    dynamic_batch: bool,
    batch: Option<usize>,
    size: Option<String>,
    arch: Option<String>,
    bn_eps: f64,
) -> Result<()> {
    check_bn_eps(bn_eps)?;
    if batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    let (mut ckpt, weights) = match source {
        Source::File(path) => (load_checkpoint(path, arch)?, path.clone()),
        Source::Random(spec) => (random_checkpoint(spec)?, PathBuf::from("<random weights>")),
    };
    let weights = weights.as_path();
    let (height, width) = match (&size, &ckpt.preprocessing) {
        (Some(size), _) => parse_size(size)?,
        (None, Some(p)) => (p.size[0], p.size[1]),
        (None, None) => (224, 224),
    };
    // The metadata copied into the graph describes the input the graph takes.
    if let Some(p) = &mut ckpt.preprocessing
        && p.size != [height, width]
    {
        let crops = matches!(
            p.resize,
            repvgg_checkpoint::metadata::Resize::CenterCrop { .. }
        );
        if crops && height != width {
            bail!(
                "--size {height}x{width}: this model's preprocessing crops a square centre; give one size"
            );
        }
        p.size = [height, width];
    }
    let options = repvgg_onnx::ExportOptions {
        opset,
        dynamic_batch,
        batch: batch.unwrap_or(1),
        height,
        width,
    };
    let bytes = if let Some(model) = &ckpt.int8 {
        // An INT8 file exports as a QDQ graph of its integers, not of its dequantized weights
        // (with the preprocessing as resized above).
        let mut model = (**model).clone();
        model.preprocessing = ckpt.preprocessing.clone();
        repvgg_onnx::export_qdq(&model, options)
    } else {
        repvgg_onnx::export(&ckpt, bn_eps, options)
    }
    .map_err(|e| match e {
        repvgg_onnx::ExportError::Checkpoint(e) => anyhow::Error::from(e),
        e => anyhow::anyhow!("{}: {e}", weights.display()),
    })?;
    repvgg_checkpoint::write_atomically(output, &bytes)?;
    eprintln!(
        "wrote {} ({}, opset {opset}, input (N, {}, {height}, {width}) with N {})",
        output.display(),
        bytes_human(bytes.len() as u64),
        ckpt.spec.in_channels,
        if dynamic_batch {
            "symbolic".to_string()
        } else {
            options.batch.to_string()
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
    let max = repvgg_checkpoint::metadata::MAX_INPUT_SIDE;
    let parse = |s: &str| {
        s.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0 && n <= max)
    };
    match size.split_once(['x', 'X']) {
        Some((h, w)) => parse(h).zip(parse(w)),
        None => parse(size).map(|s| (s, s)),
    }
    .with_context(|| {
        format!(
            "--size '{size}': expected a positive size such as 224 or 256x320, at most {max} a side"
        )
    })
}

/// A count in the unit that keeps it readable: 9.109M, 1.361G, 48.128K (never 0.001G).
pub fn count(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.3}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.3}M", n as f64 / 1e6),
        _ => format!("{:.3}G", n as f64 / 1e9),
    }
}

fn millions(n: usize) -> String {
    count(n as u64)
}

fn giga(n: u64) -> String {
    count(n)
}

/// A file size in KB, MB or GB (decimal, one decimal place).
pub fn bytes_human(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} bytes"),
        1_000..1_000_000 => format!("{:.1} KB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
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
        "{}: stem {}, depths {:?}, widths {:?}, groups {}, SE {}, QA {}, {} classes, {} input channels",
        spec.name,
        spec.stem_width,
        spec.depths,
        spec.widths,
        groups,
        if spec.se { "yes" } else { "no" },
        if spec.qa { "yes" } else { "no" },
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

fn info_file(path: &Path, size: Option<String>, arch: Option<String>, json: bool) -> Result<()> {
    let (h, w) = parse_size(size.as_deref().unwrap_or("224"))?;
    describe_file(path, size.is_some(), (h, w), arch, json)
}

fn info(
    target: Option<String>,
    size: Option<String>,
    arch: Option<String>,
    json: bool,
) -> Result<()> {
    let (h, w) = parse_size(size.as_deref().unwrap_or("224"))?;
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

    describe_file(path, size.is_some(), (h, w), arch, json)
}

/// `info` on a weights file.
fn describe_file(
    path: &Path,
    size_given: bool,
    (h, w): (usize, usize),
    arch: Option<String>,
    json: bool,
) -> Result<()> {
    let ckpt = load_checkpoint(path, arch)?;
    let spec = &ckpt.spec;
    // MACs at the size the model is fed, unless asked otherwise.
    let (h, w) = match (size_given, &ckpt.preprocessing) {
        (false, Some(p)) => (p.size[0], p.size[1]),
        _ => (h, w),
    };
    let run = ckpt.run_state.as_ref().map(run_summary);
    if json {
        let mut value = spec_json(spec, h, w);
        let extra = serde_json::json!({
            "file": path.display().to_string(),
            "form": ckpt.form,
            "naming": ckpt.naming.to_string(),
            "dtype": format!("{:?}", ckpt.source_dtype),
            "tensors": ckpt.file_tensor_count,
            "preprocessing": ckpt.preprocessing,
            "labels": ckpt.labels,
            "training_run": ckpt.run_state,
            "quantization": ckpt.quantization(),
        });
        value
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        println!("{value}");
        return Ok(());
    }
    println!("file: {}", path.display());
    if let Some(run) = &run {
        println!("training checkpoint: {run}");
    }
    println!("form: {}", ckpt.form);
    if let Some(q) = ckpt.quantization() {
        println!(
            "quantization: INT8 (s8 weights per output channel, u8 activations per tensor), {} over {} images; float: {}",
            q.method,
            q.samples,
            if q.float_layers.is_empty() {
                "nothing".to_string()
            } else {
                q.float_layers.join(", ")
            }
        );
    }
    println!("naming: {}", ckpt.naming);
    println!("dtype: {:?}", ckpt.source_dtype);
    let ignored = if run.is_some() {
        " (the rest is optimizer state, ignored)"
    } else {
        ""
    };
    println!(
        "tensors: {} in file, {} weights used{ignored}",
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
    match &ckpt.preprocessing {
        Some(p) => println!("preprocessing: {}", p.describe()),
        None => println!(
            "preprocessing: not recorded (predict uses {}; eval feeds a data set as train would have; convert --preset, --size, --mean, --std records one)",
            imagenet_fallback(&ckpt).1
        ),
    }
    match &ckpt.labels {
        Some(labels) => {
            const SHOWN: usize = 10;
            let more = labels.len().saturating_sub(SHOWN);
            let shown: Vec<&str> = labels.iter().take(SHOWN).map(String::as_str).collect();
            println!(
                "class names: {}{}",
                shown.join(", "),
                if more > 0 {
                    format!(", ... ({more} more)")
                } else {
                    String::new()
                }
            );
        }
        None => println!("class names: not recorded"),
    }
    Ok(())
}

/// Where a training checkpoint's run stands, from its run state: "epoch 3 of 15 done, ...".
fn run_summary(state: &serde_json::Value) -> String {
    let position = &state["position"];
    let config = &state["config"];
    let epochs = config["epochs"].as_u64().unwrap_or(0);
    let done = position["epoch"].as_u64().unwrap_or(0);
    let step = position["step"].as_u64().unwrap_or(0);
    let global = position["global_step"].as_u64().unwrap_or(0);
    let last = position["history"]
        .as_array()
        .and_then(|h| h.last())
        .and_then(|r| r["val_acc"].as_f64())
        .map(|acc| format!(", last validation accuracy {acc:.4}"))
        .unwrap_or_default();
    let at = if step > 0 {
        format!(" and {step} steps into epoch {}", done + 1)
    } else {
        String::new()
    };
    format!(
        "{done} of {epochs} epochs done{at} ({global} steps{last}); batch {}, lr {}, seed {}",
        config["batch_size"], config["lr"], config["seed"]
    )
}

#[allow(clippy::too_many_arguments)]
fn convert(
    input: &Path,
    output: &Path,
    arch: Option<String>,
    naming: Naming,
    bn_eps: f64,
    labels: Option<PathBuf>,
    preprocess: &InputArgs,
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
    let mut deploy = ckpt.to_deploy(bn_eps)?;
    if preprocess.any() {
        let (p, _) = preprocess.resolve(&ckpt, imagenet_fallback(&ckpt))?;
        deploy.preprocessing = Some(p);
    }
    if let Some(path) = &labels {
        deploy.labels = Some(read_labels(path, deploy.spec.num_classes)?);
    }
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
    match &deploy.preprocessing {
        Some(p) => eprintln!("preprocessing recorded: {}", p.describe()),
        None => eprintln!(
            "no preprocessing recorded (the input had none); users get the ImageNet presets"
        ),
    }
    if let Some(labels) = &deploy.labels {
        eprintln!("class names recorded: {}", labels.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every option of every command says what it does in --help.
    #[test]
    fn every_option_has_a_help_line() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "repvgg", &mut missing);
        assert!(missing.is_empty(), "no help line: {missing:?}");
        Cli::command().debug_assert();
    }

    /// The top-level help names every job.
    #[test]
    fn the_description_names_every_command() {
        let cmd = Cli::command();
        let about = cmd.get_long_about().unwrap().to_string();
        // A line of its own per command, opening with its name.
        for sub in cmd.get_subcommands() {
            let name = sub.get_name();
            let listed = about
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{name} ")));
            assert!(name == "help" || listed, "{name} missing from:\n{about}");
        }
    }

    #[test]
    fn counts_and_sizes_keep_a_readable_unit() {
        assert_eq!(count(1_361_000_000), "1.361G");
        assert_eq!(count(1_234_567), "1.235M");
        assert_eq!(count(48_128), "48.128K");
        assert_eq!(count(12), "12");
        assert_eq!(bytes_human(800_000), "800.0 KB");
        assert_eq!(bytes_human(33_400_000), "33.4 MB");
    }
}
