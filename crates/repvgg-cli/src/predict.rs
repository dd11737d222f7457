//! `repvgg predict`: classify photos with a checkpoint, as the reference pipelines would, from
//! a few files to folders of millions: images are decoded on a pool of threads while the
//! engine runs the previous batch, an unreadable image is reported in its own line, and a
//! re-run with the same `--output` picks up where a killed one stopped.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use rayon::prelude::*;
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_data::Pipeline;
use serde_json::{Value, json};

use crate::model_input::{InputArgs, class_names, imagenet_fallback, is_image};

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Weights in either form and any naming, .pth or .safetensors (a training checkpoint
    /// too).
    #[arg(long)]
    weights: PathBuf,
    /// JPEG or PNG files, and folders of them.
    #[arg(required = true, value_name = "DIR_OR_FILES")]
    images: Vec<PathBuf>,
    /// Look for images in the folders' sub-folders too.
    #[arg(long, short)]
    recursive: bool,
    /// Images per engine call.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    batch: u32,
    /// Write one line per image to this file, .jsonl or .csv, instead of printing; a re-run
    /// with the same file skips the images it already holds (resume after a kill).
    #[arg(long, short, visible_alias = "out")]
    output: Option<PathBuf>,
    /// How many classes to give per image.
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
    /// Print one JSON line per image: {"file", "top": [{"index", "label", "prob"}, ...]} (or
    /// {"file", "error"} for an unreadable one).
    #[arg(long)]
    json: bool,
}

/// Where the per-image lines go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    JsonLines,
    Csv,
}

/// The images named on the command line: files as given, folders listed (sorted, so runs and
/// resumes see one order).
fn collect_images(inputs: &[PathBuf], recursive: bool) -> Result<Vec<PathBuf>> {
    fn walk(
        dir: &Path,
        recursive: bool,
        out: &mut Vec<PathBuf>,
        skipped_dirs: &mut usize,
    ) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("{}: cannot list", dir.display()))?;
        entries.sort();
        for path in entries {
            if path.is_dir() {
                if recursive {
                    walk(&path, recursive, out, skipped_dirs)?;
                } else {
                    *skipped_dirs += 1;
                }
            } else if is_image(&path) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut images = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let before = images.len();
            let mut skipped_dirs = 0;
            walk(input, recursive, &mut images, &mut skipped_dirs)?;
            if images.len() == before {
                if skipped_dirs > 0 {
                    bail!(
                        "{}: no .jpg/.jpeg/.png images directly inside ({skipped_dirs} \
                         sub-folders: add --recursive to look in them)",
                        input.display()
                    );
                }
                bail!("{}: no .jpg/.jpeg/.png images", input.display());
            }
        } else if input.exists() {
            images.push(input.clone());
        } else {
            bail!("{}: no such file or folder", input.display());
        }
    }
    Ok(images)
}

/// The images an earlier run already wrote to `path`, after cutting off a last line that a
/// kill left unfinished.
fn already_written(path: &Path, format: Format) -> Result<std::collections::HashSet<String>> {
    let mut done = std::collections::HashSet::new();
    let Ok(file) = OpenOptions::new().read(true).write(true).open(path) else {
        return Ok(done);
    };
    let mut reader = BufReader::new(&file);
    let mut complete = 0u64;
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if read == 0 || !line.ends_with('\n') {
            break;
        }
        complete += read as u64;
        let text = line.trim_end();
        let file_name = match format {
            Format::JsonLines => serde_json::from_str::<Value>(text)
                .ok()
                .and_then(|v| v.get("file").and_then(Value::as_str).map(String::from)),
            _ => {
                let header = first;
                first = false;
                if header {
                    continue;
                }
                csv::ReaderBuilder::new()
                    .has_headers(false)
                    .from_reader(text.as_bytes())
                    .records()
                    .next()
                    .and_then(|r| r.ok())
                    .and_then(|r| r.get(0).map(String::from))
            }
        };
        let Some(name) = file_name else {
            bail!(
                "{}: line {} is not one this command writes; give another --output",
                path.display(),
                done.len() + 1
            );
        };
        done.insert(name);
    }
    file.set_len(complete).with_context(|| {
        format!(
            "{}: cannot cut off its unfinished last line",
            path.display()
        )
    })?;
    Ok(done)
}

/// One image's outcome: its top classes, or why it could not be read.
type Outcome = Result<Vec<(usize, f64)>, String>;

struct Writer {
    format: Format,
    out: Box<dyn Write>,
    csv: Option<csv::Writer<Box<dyn Write>>>,
    names: Vec<String>,
}

impl Writer {
    fn line(&mut self, path: &Path, outcome: &Outcome) -> Result<()> {
        let file = path.to_string_lossy();
        match (self.format, outcome) {
            (Format::Text, Ok(top)) => {
                writeln!(self.out, "{file}")?;
                for (rank, &(k, p)) in top.iter().enumerate() {
                    writeln!(
                        self.out,
                        "  {:>2}. {:>6.2}%  {:>4}  {}",
                        rank + 1,
                        p * 100.0,
                        k,
                        self.names[k]
                    )?;
                }
            }
            (Format::Text, Err(e)) => writeln!(self.out, "{file}\n  error: {e}")?,
            (Format::JsonLines, Ok(top)) => {
                let top: Vec<Value> = top
                    .iter()
                    .map(|&(k, p)| json!({"index": k, "label": self.names[k], "prob": p}))
                    .collect();
                writeln!(self.out, "{}", json!({"file": file, "top": top}))?;
            }
            (Format::JsonLines, Err(e)) => {
                writeln!(self.out, "{}", json!({"file": file, "error": e}))?
            }
            (Format::Csv, outcome) => {
                let csv = self.csv.as_mut().expect("a CSV writer for CSV output");
                let mut record = vec![file.to_string()];
                match outcome {
                    Ok(top) => {
                        record.push(String::new());
                        for &(k, p) in top {
                            record.extend([k.to_string(), self.names[k].clone(), p.to_string()]);
                        }
                    }
                    Err(e) => record.push(e.clone()),
                }
                csv.write_record(&record)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if let Some(csv) = &mut self.csv {
            csv.flush()?;
        }
        Ok(self.out.flush()?)
    }
}

pub fn run(args: PredictArgs) -> Result<()> {
    crate::check_bn_eps(args.bn_eps)?;
    if args.top == 0 {
        bail!("--top must be at least 1");
    }
    let format = match &args.output {
        None if args.json => Format::JsonLines,
        None => Format::Text,
        Some(path) => match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "json") => Format::JsonLines,
            Some("csv") => Format::Csv,
            _ => bail!(
                "--output {}: name a .jsonl or .csv file (the extension picks the format)",
                path.display()
            ),
        },
    };
    let mut images = collect_images(&args.images, args.recursive)?;
    let ckpt = crate::load_checkpoint(&args.weights, args.arch.clone())?;
    crate::require_rgb(&ckpt, &args.weights)?;
    let classes = ckpt.spec.num_classes;
    if classes == 0 {
        bail!(
            "{}: a headless model (no classifier) has no classes to predict",
            args.weights.display()
        );
    }
    let names = class_names(args.labels.as_deref(), &ckpt)?;
    let (preprocessing, source) = args.input.resolve(&ckpt, imagenet_fallback(&ckpt))?;
    let [h, w] = preprocessing.size;
    let batch = args.batch as usize;
    crate::check_memory(
        &ckpt.spec,
        batch,
        h,
        w,
        false,
        &args.weights.display().to_string(),
    )?;
    let quiet = format != Format::Text && args.output.is_none();
    if !quiet {
        eprintln!("input: {} ({source})", preprocessing.describe());
    }
    let total = images.len();
    let out: Box<dyn Write> = match &args.output {
        None => Box::new(std::io::stdout().lock()),
        Some(path) => {
            let done = already_written(path, format)?;
            if !done.is_empty() {
                images.retain(|p| !done.contains(p.to_string_lossy().as_ref()));
                if images.is_empty() {
                    eprintln!(
                        "{}: all {total} images are already there; nothing to classify",
                        path.display()
                    );
                    return Ok(());
                }
                eprintln!(
                    "{}: {} of the {total} images are already there; classifying the other {}",
                    path.display(),
                    total - images.len(),
                    images.len()
                );
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("{}: cannot open for writing", path.display()))?;
            Box::new(std::io::BufWriter::new(file))
        }
    };
    let fresh_csv = format == Format::Csv
        && args.output.as_deref().is_some_and(|p| {
            File::open(p)
                .and_then(|f| f.metadata())
                .map_or(true, |m| m.len() == 0)
        });
    let mut writer = Writer {
        format,
        csv: None,
        out,
        names,
    };
    if format == Format::Csv {
        let out = std::mem::replace(&mut writer.out, Box::new(std::io::sink()));
        let mut csv = csv::WriterBuilder::new().flexible(true).from_writer(out);
        if fresh_csv {
            let mut header = vec!["file".to_string(), "error".to_string()];
            for r in 1..=args.top.min(classes) {
                header.extend([
                    format!("index_{r}"),
                    format!("label_{r}"),
                    format!("prob_{r}"),
                ]);
            }
            csv.write_record(&header)?;
        }
        writer.csv = Some(csv);
    }

    let mut runner = repvgg_engine::Runner::new(&ckpt, args.bn_eps, None)?;
    let image_len = 3 * h * w;
    let pipeline = Pipeline::for_model(&preprocessing);
    let bar = if args.output.is_some() {
        let bar = indicatif::ProgressBar::new(images.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} images, {per_sec}, {eta} left",
            )
            .expect("a valid template"),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut unreadable = 0usize;
    // Decoding runs one batch ahead of the engine on a pool of its own.
    let (ready, batches) = sync_channel::<(Vec<PathBuf>, Vec<Result<Vec<f32>, String>>)>(1);
    let decode_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let decoder = {
        let chunks: Vec<Vec<PathBuf>> = images.chunks(batch).map(|c| c.to_vec()).collect();
        std::thread::spawn(move || -> Result<()> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(decode_threads)
                .build()?;
            for chunk in chunks {
                let decoded = pool.install(|| {
                    chunk
                        .par_iter()
                        .map(|path| {
                            use rand::SeedableRng;
                            let image = repvgg_data::decode_image(path).map_err(|e| e.problem)?;
                            // Evaluation transforms draw no random numbers.
                            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
                            Ok(pipeline.apply(&image, &mut rng).0)
                        })
                        .collect()
                });
                if ready.send((chunk, decoded)).is_err() {
                    break;
                }
            }
            Ok(())
        })
    };
    let cannot_write = || match &args.output {
        Some(p) => format!("{}: cannot write", p.display()),
        None => "cannot write to standard output".into(),
    };
    let mut input = Vec::with_capacity(batch * image_len);
    for (paths, decoded) in batches {
        input.clear();
        for pixels in decoded.iter().flatten() {
            input.extend_from_slice(pixels);
        }
        let n = input.len() / image_len;
        let logits = if n > 0 {
            runner.forward(&input, n, h, w)?
        } else {
            Vec::new()
        };
        let mut rows = logits.chunks_exact(classes);
        for (path, pixels) in paths.iter().zip(decoded) {
            let outcome: Outcome = match pixels {
                Ok(_) => Ok(repvgg_engine::top_classes(
                    rows.next().expect("a row per image"),
                    args.top,
                )),
                Err(e) => {
                    unreadable += 1;
                    Err(e)
                }
            };
            writer.line(path, &outcome).with_context(cannot_write)?;
        }
        writer.flush().with_context(cannot_write)?;
        bar.inc(paths.len() as u64);
    }
    decoder
        .join()
        .map_err(|_| anyhow::anyhow!("the image decoding thread failed"))??;
    bar.finish_and_clear();
    let done = images.len();
    if !quiet {
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "{done} images in {seconds:.1} s ({:.1} images/s, {}){}",
            done as f64 / seconds.max(1e-9),
            runner.describe(),
            match unreadable {
                0 => String::new(),
                k => format!("; {k} unreadable (each named in its line)"),
            }
        );
    }
    if unreadable > 0 {
        bail!("{unreadable} of {done} images could not be read (each is named in its line)");
    }
    Ok(())
}
