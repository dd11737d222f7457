//! `repvgg serve`: the model behind HTTP (see the repvgg-serve crate for the routes).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_serve::batcher::BatchPolicy;
use repvgg_serve::{ServeOptions, ServedModel};

use crate::model_input::{InputArgs, class_names, imagenet_fallback};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Weights in either form and any naming, .pth or .safetensors (an INT8 file runs on the
    /// INT8 engine).
    #[arg(long, required_unless_present = "random")]
    weights: Option<PathBuf>,
    /// Serve a variant or spec with seeded random weights instead (load tests:
    /// bench/serve_compare.sh), the same model as `export --random`.
    #[arg(long, conflicts_with = "weights")]
    random: Option<String>,
    /// The model's name in the V2 routes: /v2/models/NAME/infer.
    #[arg(long, default_value = "repvgg")]
    name: String,
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// The most images one engine call packs together (and one request may carry); 1 turns
    /// dynamic batching off.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    max_batch: u32,
    /// How long a batch is held open for requests on their way (it runs at once when none
    /// is).
    #[arg(long, default_value_t = 5)]
    max_wait_ms: u64,
    /// Engine threads [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,
    /// Requests that may wait for the engine; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    queue: u32,
    /// A request not answered within this, queue included, gets 504.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// The largest request body in MiB (413 above it).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_body_mb: u64,
    /// The largest image side an infer request may have, when the model's size is free (its
    /// memory grows with the square of it).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(32..=8192))]
    max_side: u32,
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
}

pub fn run(args: ServeArgs) -> Result<()> {
    crate::check_bn_eps(args.bn_eps)?;
    if args.name.is_empty()
        || !args
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!(
            "--name '{}': use letters, digits, '-', '_' and '.' (it goes in URLs)",
            args.name
        );
    }
    let (ckpt, source_name) = match (&args.weights, &args.random) {
        (Some(path), _) => (
            crate::load_checkpoint(path, args.arch.clone())?,
            path.display().to_string(),
        ),
        (None, Some(spec)) => (crate::random_checkpoint(spec)?, format!("random {spec}")),
        (None, None) => bail!("give --weights (or --random SPEC)"),
    };
    if ckpt.spec.num_classes == 0 {
        bail!("{source_name}: a headless model (no classifier) has no logits to serve");
    }
    let labels = class_names(args.labels.as_deref(), &ckpt)?;
    let (preprocessing, source) = args.input.resolve(&ckpt, imagenet_fallback(&ckpt))?;
    // The size is part of the model when its file records one, or the flags set it.
    let fixed_size =
        (ckpt.preprocessing.is_some() || args.input.size.is_some()).then_some(preprocessing.size);
    // The largest batch the server may be handed, before the engine is built.
    let [h, w] = fixed_size.unwrap_or([args.max_side as usize; 2]);
    crate::check_memory(
        &ckpt.spec,
        args.max_batch as usize,
        h,
        w,
        false,
        &source_name,
    )?;
    let runner = repvgg_engine::Runner::new(&ckpt, args.bn_eps, None)?;
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t as usize,
    );
    let describe = runner.describe();
    let model = ServedModel {
        name: args.name.clone(),
        runner,
        preprocessing: preprocessing.clone(),
        labels,
        fixed_size,
    };
    let options = ServeOptions {
        addr: args.addr,
        threads,
        batch: BatchPolicy {
            max_batch: args.max_batch as usize,
            max_wait: Duration::from_millis(args.max_wait_ms),
            queue: args.queue as usize,
        },
        timeout: Duration::from_millis(args.timeout_ms),
        max_body: (args.max_body_mb * 1024 * 1024) as usize,
        max_side: args.max_side as usize,
    };
    let name = args.name.clone();
    let size = match fixed_size {
        Some([h, w]) => format!("{h}x{w}"),
        None => format!("any size up to {}", args.max_side),
    };
    let classes = ckpt.spec.num_classes;
    repvgg_serve::serve(model, options.clone(), move |addr| {
        // A closed stderr must not take the server down: these lines are best effort.
        let mut log = std::io::stderr().lock();
        let _ = writeln!(log, "listening on http://{addr}");
        let _ = writeln!(
            log,
            "  model '{name}': {classes} classes, {describe}, {threads} engine threads; \
             infer input FP32 [N, 3, H, W] at {size}"
        );
        let _ = writeln!(
            log,
            "  classify input: {} ({source})",
            preprocessing.describe()
        );
        let _ = writeln!(
            log,
            "  batching: up to {} images, {} ms wait; queue {} requests; deadline {} ms",
            options.batch.max_batch,
            options.batch.max_wait.as_millis(),
            options.batch.queue,
            options.timeout.as_millis()
        );
        let _ = writeln!(
            log,
            "  routes: POST /v2/models/{name}/infer, POST /v1/classify, GET /v2/models/{name}, \
             /v2/health/live, /v2/health/ready, /metrics"
        );
    })?;
    let _ = writeln!(
        std::io::stderr(),
        "stopped: every accepted request was answered"
    );
    Ok(())
}
