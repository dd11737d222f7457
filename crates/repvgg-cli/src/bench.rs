//! `repvgg bench`: latency, throughput and memory of either form, measured in-process.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use repvgg_arch::{ArchSpec, Form};
use repvgg_burn::{RepVggTrain, default_device};
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_checkpoint::{Checkpoint, random};
use repvgg_engine::{Engine, EngineOptions, Isa, Lowering, Mode, Winograd, Workspace};
use repvgg_kernels::int8::Int8Kernels;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A variant or custom spec (seeded random weights) or a weights file.
    #[arg(long, default_value = "A0")]
    pub arch: String,
    /// A weights file to time (the same as giving it as --arch).
    #[arg(long, conflicts_with = "arch")]
    pub weights: Option<std::path::PathBuf>,
    /// train, deploy or both [default: deploy]. Not with --layers (deploy form only) or
    /// --train (the training form, by definition).
    #[arg(long, value_parser = ["train", "deploy", "both"])]
    pub form: Option<String>,
    /// Batch sizes, comma-separated [default: 1,8; with --train: 32].
    #[arg(long)]
    pub batch: Option<String>,
    /// Input size: 224, or HxW [default: the size a weights file records, else 224; with
    /// --train: 64].
    #[arg(long)]
    pub size: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed iterations per case.
    #[arg(long, default_value_t = 15)]
    pub iters: usize,
    /// Untimed iterations before timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// One JSON object per line and case.
    #[arg(long)]
    pub json: bool,
    /// Per-block time and GFLOP/s of the deploy form instead: each block's fastest of
    /// `--iters` profiled forwards, which discounts other tenants' bursts of load.
    #[arg(long)]
    pub layers: bool,
    /// Engine threading: latency (each layer split across threads), throughput (whole
    /// images per thread) or auto (throughput when the batch has an image per thread).
    #[arg(long, default_value = "auto", value_parser = ["auto", "latency", "throughput"])]
    pub mode: String,
    /// Winograd transform: auto (stride 1: F(4x4,3x3) unless the map is small or its
    /// transformed filters outweigh its tiles, then F(2x2,3x3); stride 2: F(2x2,3x3) on wide
    /// layers), f4, f2 or off (im2col or implicit GEMM for every layer).
    #[arg(long, default_value = "auto", value_parser = ["auto", "f4", "f2", "off"])]
    pub winograd: String,
    /// How other layers become matrix products: auto, im2col (patch copies) or implicit
    /// (nine per-tap products read straight from the input).
    #[arg(long, default_value = "auto", value_parser = ["auto", "im2col", "implicit"])]
    pub lowering: String,
    /// Cap the engine's instruction set (default: the best this machine has); the kernels
    /// of each set can then be timed side by side on one machine.
    #[arg(long)]
    pub isa: Option<crate::IsaArg>,
    /// The deploy form's arithmetic: fp32, or int8 on the INT8 engine (an INT8 file runs as
    /// it is; float weights are quantized first, calibrated on the random inputs, for timing).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "int8"])]
    pub precision: String,
    /// Weight bits when float weights are quantized for `--precision int8`: 8, or 7 to time
    /// the AVX2 kernels whose 16-bit sums need weights within 64 (what `quantize
    /// --weight-bits 7` writes for machines without VNNI) [default: 8]. An INT8 file keeps its
    /// own.
    #[arg(long, value_parser = clap::value_parser!(u8).range(7..=8))]
    pub weight_bits: Option<u8>,
    /// Run every INT8 layer on this kernel set instead of the best the machine has (amx,
    /// avx512-vnni, avx-vnni, avx2, avx2-i16 or portable), to time the sets side by side.
    #[arg(long, value_parser = int8_kernels_arg)]
    pub int8_kernels: Option<Int8Kernels>,
    /// Time a training step of the multi-branch form instead: forward in training mode,
    /// backward, SGD (momentum 0.9, weight decay 1e-4), label smoothing 0.1.
    #[arg(long)]
    pub train: bool,
}

fn int8_kernels_arg(name: &str) -> std::result::Result<Int8Kernels, String> {
    Int8Kernels::ALL
        .into_iter()
        .find(|k| k.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = Int8Kernels::ALL.iter().map(|k| k.name()).collect();
            format!("expected one of {}", names.join(", "))
        })
}

/// The INT8 engine to time: on the kernel set asked for, else the best for the weights.
fn int8_engine(
    model: &repvgg_checkpoint::quantized::QuantizedModel,
    options: &EngineOptions,
    kernels: Option<Int8Kernels>,
) -> Result<repvgg_engine::Int8Engine> {
    Ok(match kernels {
        Some(kernels) => repvgg_engine::Int8Engine::with_kernels(model, kernels)?,
        None => repvgg_engine::Int8Engine::new(model, options.isa)?,
    })
}

/// Weights to time: a checkpoint file, or seeded random ones for a named or custom spec.
fn weights(arch: &str) -> Result<Checkpoint> {
    if crate::is_checkpoint_path(arch) {
        return Ok(Checkpoint::load(Path::new(arch), None)?);
    }
    let spec = ArchSpec::parse(arch)?;
    let tensors = random::training_weights(&spec, 0);
    Ok(Checkpoint::from_state_dict(spec, Form::Train, tensors)?)
}

/// Resets the kernel's peak-RSS counter so each case reports its own peak (Linux).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The INT8 model to time: the file's own, or the float weights quantized with ranges from
/// `input` (min/max: the timing does not depend on the scales).
fn int8_model(
    ckpt: &Checkpoint,
    weight_bits: u8,
    options: &EngineOptions,
    input: &[f32],
    n: usize,
    h: usize,
    w: usize,
) -> Result<repvgg_checkpoint::quantized::QuantizedModel> {
    use repvgg_checkpoint::quantized::QuantizedModel;
    if let Some(model) = &ckpt.int8 {
        return Ok((**model).clone());
    }
    let deploy = ckpt.to_deploy(DEFAULT_BN_EPS)?;
    let engine = Engine::with_options(&deploy, DEFAULT_BN_EPS, *options)?;
    let mut calibrator =
        repvgg_engine::Calibrator::new(repvgg_engine::Calibration::MinMax, &engine);
    calibrator
        .observe(&engine, input, n, h, w)
        .map_err(anyhow::Error::msg)?;
    let limit = repvgg_checkpoint::quantized::weight_limit(weight_bits);
    QuantizedModel::quantize(&deploy, calibrator.activations(), "minmax", n, limit, &[])
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at]
}

pub fn run(mut args: BenchArgs) -> Result<()> {
    // A value given as --weights is a file, whatever it looks like.
    let ckpt = match &args.weights {
        Some(path) => Checkpoint::load(path, None)?,
        None => {
            if !crate::is_checkpoint_path(&args.arch) {
                // Random weights for a spec: what it needs is known before any is made.
                let spec = ArchSpec::parse(&args.arch)?;
                let size = args
                    .size
                    .as_deref()
                    .unwrap_or(if args.train { "64" } else { "224" });
                let (h, w) = crate::parse_size(size)?;
                let batches = args
                    .batch
                    .as_deref()
                    .unwrap_or(if args.train { "32" } else { "8" });
                let batch = batches
                    .split(',')
                    .filter_map(|b| b.trim().parse::<usize>().ok())
                    .max()
                    .unwrap_or(1);
                crate::check_memory(&spec, batch, h, w, true, &args.arch)?;
            }
            weights(&args.arch)?
        }
    };
    if let Some(path) = &args.weights {
        // What messages name.
        args.arch = path.display().to_string();
    }
    // A weights file is timed at the size it is fed, unless asked otherwise.
    let recorded = ckpt
        .preprocessing
        .as_ref()
        .map(|p| format!("{}x{}", p.size[0], p.size[1]));
    let size = args
        .size
        .clone()
        .or(recorded)
        .unwrap_or_else(|| if args.train { "64" } else { "224" }.into());
    let batch = args
        .batch
        .clone()
        .unwrap_or_else(|| if args.train { "32" } else { "1,8" }.into());
    let (h, w) = crate::parse_size(&size)?;
    let largest_batch = batch
        .split(',')
        .filter_map(|b| b.trim().parse::<usize>().ok())
        .max()
        .unwrap_or(1);
    crate::check_memory(&ckpt.spec, largest_batch, h, w, false, &args.arch)?;
    if let Some(form) = &args.form {
        if args.layers {
            bail!("--layers times the deploy form's blocks only; --form {form} does not apply");
        }
        if args.train {
            bail!("--train times the training form's step; --form {form} does not apply");
        }
    }
    let forms: Vec<Form> = match args.form.as_deref().unwrap_or("deploy") {
        "train" => vec![Form::Train],
        "deploy" => vec![Form::Deploy],
        "both" => vec![Form::Train, Form::Deploy],
        other => bail!("--form '{other}': expected train, deploy or both"),
    };
    let batches: Vec<usize> = batch
        .split(',')
        .map(|b| b.trim().parse::<usize>().ok().filter(|&b| b > 0))
        .collect::<Option<_>>()
        .with_context(|| format!("--batch '{batch}': expected sizes such as 1,8"))?;
    let mode = match args.mode.as_str() {
        "auto" => Mode::Auto,
        "latency" => Mode::Latency,
        "throughput" => Mode::Throughput,
        other => bail!("--mode '{other}': expected auto, latency or throughput"),
    };
    let winograd = match args.winograd.as_str() {
        "auto" => Winograd::Auto,
        "f4" => Winograd::F4,
        "f2" => Winograd::F2,
        "off" => Winograd::Off,
        other => bail!("--winograd '{other}': expected auto, f4, f2 or off"),
    };
    let lowering = match args.lowering.as_str() {
        "auto" => Lowering::Auto,
        "im2col" => Lowering::Im2col,
        "implicit" => Lowering::Implicit,
        other => bail!("--lowering '{other}': expected auto, im2col or implicit"),
    };
    let options = EngineOptions {
        mode,
        winograd,
        lowering,
        isa: args.isa.map(Into::into),
    };
    let engine_flags = args.isa.is_some()
        || args.mode != "auto"
        || args.winograd != "auto"
        || args.lowering != "auto";
    if engine_flags && (args.train || !forms.contains(&Form::Deploy)) {
        eprintln!(
            "note: --isa, --mode, --winograd and --lowering choose the engine's kernels, which only the deploy form runs; they change nothing here"
        );
    }
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    // Checked before any weights are made, and named in every result.
    let isa = Isa::capped(options.isa)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("cannot start the thread pool")?;
    let spec = ckpt.spec.clone();
    // An INT8 file runs as INT8 whatever --precision says.
    let int8 = args.precision == "int8" || ckpt.int8.is_some();
    if ckpt.int8.is_some() && args.precision == "fp32" {
        eprintln!("note: {} is an INT8 model; it is timed in INT8", args.arch);
    }
    if !int8 && args.weight_bits.is_some() {
        eprintln!("note: --weight-bits applies with --precision int8; timing fp32");
    }
    if !int8 && args.int8_kernels.is_some() {
        eprintln!("note: --int8-kernels applies with --precision int8; timing fp32");
    }
    if ckpt.int8.is_some() && args.weight_bits.is_some() {
        eprintln!(
            "note: --weight-bits applies to float weights quantized for timing; {} is timed with its own",
            args.arch
        );
    }
    let weight_bits = args.weight_bits.unwrap_or(8);
    if args.layers {
        let int8 = (args.precision == "int8" || ckpt.int8.is_some()).then_some(weight_bits);
        return pool.install(|| {
            layer_table(
                &ckpt,
                int8,
                args.int8_kernels,
                options,
                &batches,
                h,
                w,
                threads,
                args.iters,
            )
        });
    }
    if args.train {
        return pool.install(|| train_steps(&args, &ckpt, &batches, h, w, threads));
    }
    // Printed before the first result, once its kernels are known (an INT8 model's depend on
    // its weights: 7-bit ones take the faster AVX2 set).
    let mut header = !args.json;
    let mut print_header = |kernels: &str| {
        if !std::mem::take(&mut header) {
            return;
        }
        if forms.contains(&Form::Deploy) {
            println!("engine kernels: {kernels}");
        }
        println!(
            "{:<14} {:<7} {:>5} {:>9} {:>7} {:>10} {:>10} {:>10} {:>9} {:>11}",
            "arch",
            "form",
            "batch",
            "size",
            "threads",
            "median ms",
            "p90 ms",
            "images/s",
            "GFLOP/s",
            "peak RSS MB"
        );
    };
    for &form in &forms {
        for &batch in &batches {
            let mut rng = StdRng::seed_from_u64(1);
            let input: Vec<f32> = (0..batch * spec.in_channels * h * w)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            reset_peak_rss();
            // The kernels the case runs on, as the JSON names them.
            let mut kernels = isa.name().to_string();
            let times = pool.install(|| -> Result<Vec<f64>> {
                let mut run: Box<dyn FnMut()> = match form {
                    Form::Deploy if int8 => {
                        let model = int8_model(&ckpt, weight_bits, &options, &input, batch, h, w)?;
                        let engine = int8_engine(&model, &options, args.int8_kernels)?;
                        kernels = engine.kernels().name().to_string();
                        let input = input.clone();
                        engine.forward(&input, batch, h, w)?;
                        Box::new(move || {
                            let _ = std::hint::black_box(engine.forward(&input, batch, h, w));
                        })
                    }
                    Form::Deploy => {
                        let engine = Engine::with_options(&ckpt, DEFAULT_BN_EPS, options)?;
                        let mut ws = Workspace::default();
                        let input = input.clone();
                        engine.infer(&input, batch, h, w, &mut ws)?;
                        Box::new(move || {
                            let _ =
                                std::hint::black_box(engine.infer(&input, batch, h, w, &mut ws));
                        })
                    }
                    Form::Train => {
                        // The unconverted multi-branch model in eval mode, as trained.
                        let device = default_device();
                        let tensors = if ckpt.form == Form::Train {
                            &ckpt.tensors
                        } else {
                            bail!(
                                "{}: deploy-form weights cannot run the training form",
                                args.arch
                            )
                        };
                        let model =
                            RepVggTrain::from_state_dict(&spec, tensors, DEFAULT_BN_EPS, &device);
                        let x: Tensor<4> = Tensor::from_data(
                            TensorData::new(input.clone(), [batch, spec.in_channels, h, w]),
                            &device,
                        );
                        Box::new(move || {
                            let logits = model.forward(x.clone());
                            std::hint::black_box(logits.into_data());
                        })
                    }
                };
                for _ in 0..args.warmup {
                    run();
                }
                Ok((0..args.iters)
                    .map(|_| {
                        let start = Instant::now();
                        run();
                        start.elapsed().as_secs_f64()
                    })
                    .collect())
            })?;
            let mut sorted = times.clone();
            sorted.sort_by(f64::total_cmp);
            let median = percentile(&sorted, 0.5);
            let p90 = percentile(&sorted, 0.9);
            let images_per_s = batch as f64 / median;
            let gflops = 2.0 * spec.macs(form, h, w) as f64 * batch as f64 / median / 1e9;
            let rss = peak_rss_mb();
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "arch": spec.name, "form": form, "batch": batch, "size": [h, w],
                        "threads": threads, "median_ms": median * 1e3, "p90_ms": p90 * 1e3,
                        "images_per_s": images_per_s, "gflops": gflops, "peak_rss_mb": rss,
                        "iters": args.iters,
                        "isa": (form == Form::Deploy).then_some(kernels.as_str()),
                        "precision": if form == Form::Deploy && int8 { "int8" } else { "fp32" },
                    })
                );
            } else {
                print_header(&kernels);
                println!(
                    "{:<14} {:<7} {:>5} {:>9} {:>7} {:>10.2} {:>10.2} {:>10.1} {:>9.1} {:>11.0}",
                    spec.name,
                    if form == Form::Deploy && (args.precision == "int8" || ckpt.int8.is_some()) {
                        "int8".to_string()
                    } else {
                        form.to_string()
                    },
                    batch,
                    format!("{h}x{w}"),
                    threads,
                    median * 1e3,
                    p90 * 1e3,
                    images_per_s,
                    gflops,
                    rss
                );
            }
        }
    }
    Ok(())
}

/// Times whole training steps, as `bench/reference.py --train` does in PyTorch.
fn train_steps(
    args: &BenchArgs,
    ckpt: &Checkpoint,
    batches: &[usize],
    h: usize,
    w: usize,
    threads: usize,
) -> Result<()> {
    use burn::optim::GradientsParams;
    use repvgg_train::loss::{cross_entropy, soft_targets};
    use repvgg_train::sgd::Sgd;

    if ckpt.form != Form::Train {
        bail!("{}: training needs training-form weights", args.arch);
    }
    if ckpt.spec.num_classes == 0 {
        bail!(
            "{}: a headless model (0 classes) has no loss to train on",
            args.arch
        );
    }
    let spec = &ckpt.spec;
    let device = default_device().autodiff();
    for &batch in batches {
        let mut rng = StdRng::seed_from_u64(1);
        let input: Vec<f32> = (0..batch * spec.in_channels * h * w)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let labels: Vec<usize> = (0..batch)
            .map(|_| rng.random_range(0..spec.num_classes))
            .collect();
        let targets = soft_targets(&labels, spec.num_classes, 0.1, None);
        reset_peak_rss();
        let mut model = Some(RepVggTrain::from_state_dict(
            spec,
            &ckpt.tensors,
            DEFAULT_BN_EPS,
            &device,
        ));
        let mut sgd = Sgd::new(0.9, false, 1e-4, false);
        let mut step = || {
            let m = model.take().unwrap();
            let x: Tensor<4> = Tensor::from_data(
                TensorData::new(input.clone(), [batch, spec.in_channels, h, w]),
                &device,
            );
            let loss = cross_entropy(m.forward(x), &targets, &device);
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            let m = sgd.step(m, 0.01, grads);
            // Wait for the update to be computed (burn may defer work).
            std::hint::black_box(m.blocks[0].dense_conv.weight.val().into_data());
            model = Some(m);
        };
        for _ in 0..args.warmup {
            step();
        }
        let mut times: Vec<f64> = (0..args.iters)
            .map(|_| {
                let start = Instant::now();
                step();
                start.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let (median, p90) = (percentile(&times, 0.5), percentile(&times, 0.9));
        let row = serde_json::json!({
            "arch": spec.name, "form": "train-step", "batch": batch, "size": [h, w],
            "threads": threads, "median_ms": median * 1e3, "p90_ms": p90 * 1e3,
            "images_per_s": batch as f64 / median, "peak_rss_mb": peak_rss_mb(),
            "iters": args.iters,
        });
        if args.json {
            println!("{row}");
        } else {
            println!(
                "train step {} batch {batch} at {h}x{w}, {threads} threads: median {:.1} ms, p90 {:.1} ms, {:.1} images/s, peak RSS {:.0} MB",
                spec.name,
                median * 1e3,
                p90 * 1e3,
                batch as f64 / median,
                peak_rss_mb()
            );
        }
    }
    Ok(())
}

/// Per-block time and GFLOP/s of the engine, to see which layer shapes limit it.
#[allow(clippy::too_many_arguments)]
fn layer_table(
    ckpt: &Checkpoint,
    // INT8 with this many weight bits, or float.
    int8: Option<u8>,
    int8_kernels: Option<Int8Kernels>,
    options: EngineOptions,
    batches: &[usize],
    h: usize,
    w: usize,
    threads: usize,
    iters: usize,
) -> Result<()> {
    let engine = Engine::with_options(ckpt, DEFAULT_BN_EPS, options)?;
    for &batch in batches {
        let mut rng = StdRng::seed_from_u64(1);
        let input: Vec<f32> = (0..batch * ckpt.spec.in_channels * h * w)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let mut ws = Workspace::default();
        let (runs, kernels): (Vec<_>, String) = if let Some(weight_bits) = int8 {
            let model = int8_model(ckpt, weight_bits, &options, &input, batch, h, w)?;
            let engine = int8_engine(&model, &options, int8_kernels)?;
            let runs = (0..iters.max(1))
                .map(|_| engine.profile(&input, batch, h, w))
                .collect::<Result<_, _>>()?;
            (runs, format!("int8, {}", engine.kernels()))
        } else {
            let runs = (0..iters.max(1))
                .map(|_| engine.profile(&input, batch, h, w, &mut ws))
                .collect::<Result<_, _>>()?;
            (runs, format!("fp32, {}", engine.isa()))
        };
        println!("batch {batch}, {threads} threads, {h}x{w}, {kernels} kernels");
        println!(
            "{:<10} {:>6} {:>6} {:>6} {:>9} {:>9} {:>8}  method",
            "block", "in", "out", "stride", "out map", "ms", "GOP/s"
        );
        let mut total = 0.0;
        for (i, t) in runs[0].iter().enumerate() {
            let sec = runs
                .iter()
                .map(|r| r[i].seconds)
                .fold(f64::INFINITY, f64::min);
            total += sec;
            let (cin, cout, oh, ow) = t.shape;
            println!(
                "{:<10} {:>6} {:>6} {:>6} {:>9} {:>9.3} {:>8.1}  {}",
                t.name,
                cin,
                if t.groups > 1 {
                    format!("{cout}/g{}", t.groups)
                } else {
                    cout.to_string()
                },
                t.stride,
                format!("{oh}x{ow}"),
                sec * 1e3,
                2.0 * t.macs as f64 / sec / 1e9,
                t.method
            );
        }
        println!("total convs: {:.2} ms", total * 1e3);
    }
    Ok(())
}
