//! The training loop, its checkpoints, and the conversion and checks at the end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Beta, Distribution};
use repvgg_arch::Form;
use repvgg_burn::RepVggTrain;
use repvgg_burn::layers::{from_device, to_device};
use repvgg_checkpoint::metadata::{OPTIMIZER_PREFIX, RUN_STATE_KEY};
use repvgg_checkpoint::{Checkpoint, Naming, Preprocessing, StateDict};
use repvgg_data::loader::EpochPlan;
use repvgg_data::transform::mix_seed;
use repvgg_data::{Batch, DataSplits, Loader, Pipeline, Samples};
use repvgg_engine::{Engine, Workspace};
use serde::{Deserialize, Serialize};

use crate::loss::{cross_entropy, custom_l2, soft_targets};
use crate::metrics::Evaluation;
use crate::schedule::CosineWithWarmup;
use crate::sgd::Sgd;
use crate::{EpochRecord, TrainConfig, TrainError};

/// How a run is driven (none of it changes the result).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Continue from `OUT/checkpoint.safetensors` (an error if there is none).
    pub resume: bool,
    /// Start afresh in an `OUT` that holds another run's files, replacing them. Without it
    /// (or `resume`) such an `OUT` is refused: a typo must not destroy a week of training.
    pub overwrite: bool,
    /// Also checkpoint every this many steps (always at the end of each epoch).
    pub checkpoint_every: Option<usize>,
    /// Stop (with a checkpoint) after this many steps in total: for tests and time-boxed runs.
    pub stop_after_steps: Option<usize>,
    pub progress: bool,
    pub eval_batch: usize,
    pub backend: repvgg_burn::Backend,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            resume: false,
            overwrite: false,
            checkpoint_every: None,
            stop_after_steps: None,
            progress: true,
            eval_batch: 500,
            backend: repvgg_burn::Backend::Cpu,
        }
    }
}

/// Sums over the steps of the epoch in progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct EpochTotals {
    loss: f64,
    correct: usize,
    seen: usize,
    seconds: f64,
    data_wait_s: f64,
}

/// Where a run stands; stored in every checkpoint next to the weights.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Position {
    epoch: usize,
    /// The next step within `epoch`.
    step: usize,
    global_step: usize,
    totals: EpochTotals,
    history: Vec<EpochRecord>,
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    config: TrainConfig,
    position: Position,
}

/// The files a run writes into its output directory (`int8.safetensors`: the demo's INT8
/// model).
pub const RUN_FILES: [&str; 6] = [
    "checkpoint.safetensors",
    "metrics.csv",
    "curves.png",
    "train.safetensors",
    "deploy.safetensors",
    "int8.safetensors",
];

/// What `finish` found: both forms evaluated on the held-out set.
#[derive(Clone, Debug)]
pub struct FinalReport {
    pub train_form: Evaluation,
    pub deploy_form: Evaluation,
    /// Predictions on which the two forms differ (the conversion is exact, so: none).
    pub disagreements: usize,
    /// max |logit difference| / max |train-form logit|.
    pub max_logit_rel_diff: f64,
    pub train_form_images_per_s: f64,
    pub deploy_images_per_s: f64,
    pub deploy_path: PathBuf,
}

/// A training run writing into one output directory.
pub struct Trainer<'a> {
    config: TrainConfig,
    data: &'a DataSplits,
    out: PathBuf,
    options: RunOptions,
    device: Device,
    model: Option<RepVggTrain>,
    sgd: Sgd,
    position: Position,
    train_pipeline: Pipeline,
    eval_pipeline: Pipeline,
    /// What every weights file of the run records, so that the model is fed as it was trained.
    preprocessing: Preprocessing,
    labels: Option<Vec<String>>,
    /// Where a resumed run picked up: (epoch, step within it, global step).
    resumed_at: Option<(usize, usize, usize)>,
}

pub(crate) fn file_error(path: &Path, problem: impl Into<String>) -> TrainError {
    TrainError::File {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

impl<'a> Trainer<'a> {
    /// A new run, or the continuation of the one in `out` with `options.resume`.
    pub fn new(
        config: TrainConfig,
        data: &'a DataSplits,
        out: &Path,
        options: RunOptions,
    ) -> Result<Trainer<'a>, TrainError> {
        config
            .arch
            .validate()
            .map_err(|e| TrainError::Config(e.to_string()))?;
        let data_classes = data.train.classes().max(data.test.classes());
        if config.arch.num_classes != data_classes {
            return Err(TrainError::Config(format!(
                "the model has {} classes but the data has {data_classes}; leave classes= out \
                 of the architecture to take the data's count",
                config.arch.num_classes
            )));
        }
        if config.batch_size == 0 || data.train.len() < config.batch_size {
            return Err(TrainError::Config(format!(
                "batch size {} with {} training images: an epoch would have no full batch; \
                 use --batch {} or less",
                config.batch_size,
                data.train.len(),
                data.train.len()
            )));
        }
        if config.custom_l2 && config.arch.qa {
            return Err(TrainError::Config(
                "--custom-l2 is RepVGG's; QARepVGG blocks train with plain weight decay on every kernel, as their authors do".into(),
            ));
        }
        if config.arch.in_channels != 3 {
            return Err(TrainError::Config(
                "training feeds 3-channel images (grey ones are expanded); use in=3".into(),
            ));
        }
        let checkpoint = out.join(RUN_FILES[0]);
        if options.resume && !checkpoint.is_file() {
            return Err(file_error(
                &checkpoint,
                "no checkpoint to resume from; train without --resume to start the run",
            ));
        }
        if !options.resume && !options.overwrite {
            let existing: Vec<&str> = RUN_FILES
                .iter()
                .copied()
                .filter(|name| out.join(name).exists())
                .collect();
            if !existing.is_empty() {
                let resume = if checkpoint.is_file() {
                    "continue it with --resume, "
                } else {
                    ""
                };
                return Err(file_error(
                    out,
                    format!(
                        "holds a training run ({}); {resume}replace it with --overwrite, or \
                         choose another --out",
                        existing.join(", ")
                    ),
                ));
            }
        }
        if options.overwrite && !options.resume {
            // Replacing means replacing: none of the old run's files may sit beside the new
            // one's (a finished run's deploy weights next to an unfinished checkpoint).
            for name in RUN_FILES {
                let path = out.join(name);
                if path.exists() {
                    std::fs::remove_file(&path)
                        .map_err(|e| file_error(&path, format!("cannot remove: {e}")))?;
                }
            }
        }
        std::fs::create_dir_all(out)
            .map_err(|e| file_error(out, format!("cannot create the output directory: {e}")))?;
        let preprocessing = config.preprocessing(data);
        let labels = data.class_names.clone();
        let (train_pipeline, eval_pipeline) = config.pipelines(data);
        let device = repvgg_burn::device(options.backend)?.autodiff();
        let mut trainer = Trainer {
            sgd: Sgd::new(
                config.momentum,
                config.nesterov,
                config.weight_decay,
                config.custom_l2,
            ),
            config,
            data,
            out: out.to_path_buf(),
            options,
            device,
            model: None,
            position: Position::default(),
            train_pipeline,
            eval_pipeline,
            preprocessing,
            labels,
            resumed_at: None,
        };
        if trainer.options.resume {
            trainer.load_checkpoint(&checkpoint)?;
            let p = &trainer.position;
            trainer.resumed_at = Some((p.epoch, p.step, p.global_step));
        } else {
            let weights = crate::init::pytorch_default(&trainer.config.arch, trainer.config.seed);
            trainer.model = Some(RepVggTrain::from_state_dict(
                &trainer.config.arch,
                &weights,
                trainer.config.bn_eps,
                &trainer.device,
            ));
        }
        Ok(trainer)
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.out.join("checkpoint.safetensors")
    }

    /// Where a resumed run picked up: (epochs completed, next step within the epoch, steps
    /// completed in all).
    pub fn resumed_at(&self) -> Option<(usize, usize, usize)> {
        self.resumed_at
    }

    /// Steps in one epoch (the last partial batch is dropped).
    pub fn steps_per_epoch(&self) -> usize {
        self.data.train.len() / self.config.batch_size
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn history(&self) -> &[EpochRecord] {
        &self.position.history
    }

    /// Steps completed so far, over all epochs.
    pub fn global_step(&self) -> usize {
        self.position.global_step
    }

    pub fn model(&self) -> &RepVggTrain {
        self.model
            .as_ref()
            .expect("the model is present between steps")
    }

    fn schedule(&self) -> CosineWithWarmup {
        let per_epoch = self.steps_per_epoch();
        CosineWithWarmup {
            base: self.config.lr,
            warmup_steps: (self.config.warmup_epochs * per_epoch as f64).round() as usize,
            total_steps: self.config.epochs * per_epoch,
        }
    }

    /// Trains until the configured epochs are done (or `stop_after_steps`); returns whether
    /// the run is complete.
    pub fn run(&mut self) -> Result<bool, TrainError> {
        let per_epoch = self.steps_per_epoch();
        let schedule = self.schedule();
        while self.position.epoch < self.config.epochs {
            let epoch = self.position.epoch;
            let plan = EpochPlan {
                batch_size: self.config.batch_size,
                seed: self.config.seed,
                epoch,
                first_step: self.position.step,
                training: true,
            };
            let mut loader = Loader::new(self.data.train.clone(), self.train_pipeline, plan);
            let bar = self.progress_bar(per_epoch as u64, epoch);
            bar.set_position(self.position.step as u64);
            let mut waited_before = loader.waited;
            let mut started = Instant::now();
            while let Some(batch) = loader.next() {
                let batch = batch?;
                let lr = schedule.lr(self.position.global_step);
                let (loss, correct) = self.step(&batch, lr)?;
                let totals = &mut self.position.totals;
                totals.loss += loss * batch.labels.len() as f64;
                totals.correct += correct;
                totals.seen += batch.labels.len();
                totals.seconds += started.elapsed().as_secs_f64();
                totals.data_wait_s += (loader.waited - waited_before).as_secs_f64();
                waited_before = loader.waited;
                started = Instant::now();
                self.position.step += 1;
                self.position.global_step += 1;
                bar.set_position(self.position.step as u64);
                bar.set_message(format!(
                    "loss {:.4}  acc {:.3}  {:.0} img/s  lr {lr:.4}",
                    totals.loss / totals.seen as f64,
                    totals.correct as f64 / totals.seen as f64,
                    totals.seen as f64 / totals.seconds.max(1e-9),
                ));
                let stop = self
                    .options
                    .stop_after_steps
                    .is_some_and(|n| self.position.global_step >= n);
                let periodic = self
                    .options
                    .checkpoint_every
                    .is_some_and(|n| n > 0 && self.position.global_step.is_multiple_of(n));
                if (stop || periodic) && self.position.step < per_epoch {
                    self.save_checkpoint()?;
                }
                if stop && self.position.step < per_epoch {
                    bar.abandon();
                    return Ok(false);
                }
                if self.position.step == per_epoch {
                    break;
                }
            }
            drop(loader);
            bar.finish_and_clear();
            self.end_epoch(schedule.lr(self.position.global_step.saturating_sub(1)))?;
            if self
                .options
                .stop_after_steps
                .is_some_and(|n| self.position.global_step >= n)
                && self.position.epoch < self.config.epochs
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn progress_bar(&self, steps: u64, epoch: usize) -> ProgressBar {
        if !self.options.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(steps);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}  eta {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, self.config.epochs));
        bar
    }

    /// One SGD step on `batch`; returns the batch's loss and the number classified right.
    fn step(&mut self, batch: &Batch, lr: f64) -> Result<(f64, usize), TrainError> {
        let classes = self.config.arch.num_classes;
        let n = batch.labels.len();
        let mut images = batch.images.clone();
        let partners: Vec<usize> = batch.labels.iter().rev().cloned().collect();
        let mix = self.config.mixup_alpha.filter(|&a| a > 0.0).map(|alpha| {
            // Mixup pairs each image with the batch's mirror image, with one Beta draw per
            // batch, seeded by the batch's position so that a resumed run draws the same.
            let seed = mix_seed(&[
                self.config.seed,
                self.position.epoch as u64,
                self.position.step as u64,
                7,
            ]);
            let lambda = Beta::new(alpha, alpha)
                .expect("alpha > 0")
                .sample(&mut StdRng::seed_from_u64(seed));
            let size = images.len() / n;
            let original = &batch.images;
            for i in 0..n {
                let j = n - 1 - i;
                for k in 0..size {
                    images[i * size + k] = (lambda as f32) * original[i * size + k]
                        + (1.0 - lambda as f32) * original[j * size + k];
                }
            }
            lambda
        });
        let targets = soft_targets(
            &batch.labels,
            classes,
            self.config.label_smoothing,
            mix.map(|l| (l, partners.as_slice())),
        );
        let model = self
            .model
            .take()
            .expect("the model is present between steps");
        let x: Tensor<4> = Tensor::from_data(TensorData::new(images, batch.shape), &self.device);
        let logits = model.forward(x);
        let mut loss = cross_entropy(logits.clone(), &targets, &self.device);
        if self.config.custom_l2 {
            loss = loss + custom_l2(&model).mul_scalar(self.config.weight_decay * 0.5);
        }
        let loss_value = loss.clone().into_scalar::<f32>() as f64;
        if !loss_value.is_finite() {
            self.model = Some(model);
            return Err(TrainError::Diverged {
                epoch: self.position.epoch + 1,
                step: self.position.step + 1,
                loss: loss_value,
            });
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        self.model = Some(self.sgd.step(model, lr, grads));
        let logits: Vec<f32> = logits
            .inner()
            .into_data()
            .try_into_vec::<f32>()
            .expect("logits are f32");
        let correct = logits
            .chunks_exact(classes)
            .zip(&batch.labels)
            .filter(|(row, label)| crate::metrics::argmax(row) == **label)
            .count();
        Ok((loss_value, correct))
    }

    fn end_epoch(&mut self, lr: f64) -> Result<(), TrainError> {
        let val = evaluate_train_form(
            self.model(),
            self.data.test.clone(),
            self.eval_pipeline,
            self.options.eval_batch,
        )?;
        let totals = std::mem::take(&mut self.position.totals);
        let record = EpochRecord {
            epoch: self.position.epoch + 1,
            lr,
            train_loss: totals.loss / totals.seen.max(1) as f64,
            train_acc: totals.correct as f64 / totals.seen.max(1) as f64,
            val_loss: val.evaluation.loss,
            val_acc: val.evaluation.top1,
            val_top5: val.evaluation.top5,
            seconds: totals.seconds,
            images_per_s: totals.seen as f64 / totals.seconds.max(1e-9),
            data_wait_s: totals.data_wait_s,
        };
        if self.options.progress {
            eprintln!(
                "epoch {}/{}: train loss {:.4} acc {:.4} | val loss {:.4} acc {:.4} | {:.1} s, {:.0} img/s, data wait {:.2} s",
                record.epoch,
                self.config.epochs,
                record.train_loss,
                record.train_acc,
                record.val_loss,
                record.val_acc,
                record.seconds,
                record.images_per_s,
                record.data_wait_s
            );
        }
        self.position.history.push(record);
        self.position.epoch += 1;
        self.position.step = 0;
        self.save_checkpoint()?;
        self.write_metrics()
    }

    /// `metrics.csv` and `curves.png`, rewritten whole (and atomically) after every epoch.
    fn write_metrics(&self) -> Result<(), TrainError> {
        let csv_path = self.out.join("metrics.csv");
        let mut writer = csv::Writer::from_writer(Vec::new());
        for record in &self.position.history {
            writer
                .serialize(record)
                .map_err(|e| file_error(&csv_path, e.to_string()))?;
        }
        let bytes = writer
            .into_inner()
            .map_err(|e| file_error(&csv_path, e.to_string()))?;
        repvgg_checkpoint::write_atomically(&csv_path, &bytes)?;
        let png = self.out.join("curves.png");
        crate::plot::draw_curves(&png, &self.position.history)
    }

    /// The model's weights as a checkpoint that knows how it is fed.
    fn trained_weights(&self) -> Result<Checkpoint, TrainError> {
        let mut trained = Checkpoint::from_state_dict(
            self.config.arch.clone(),
            Form::Train,
            self.model().state_dict(),
        )?;
        trained.preprocessing = Some(self.preprocessing.clone());
        trained.labels = self.labels.clone();
        Ok(trained)
    }

    /// The model's weights (a weights file any command reads), the optimizer's velocities
    /// and the run state, in one file.
    fn save_checkpoint(&self) -> Result<(), TrainError> {
        let weights = self.trained_weights()?;
        let mut metadata: HashMap<String, String> = weights.metadata(Naming::Official);
        let mut tensors = weights.tensors;
        for (path, v) in &self.sgd.velocity {
            tensors.insert(format!("{OPTIMIZER_PREFIX}{path}"), from_device(v.clone()));
        }
        let state = SavedState {
            config: self.config.clone(),
            position: self.position.clone(),
        };
        metadata.insert(
            RUN_STATE_KEY.to_string(),
            serde_json::to_string(&state).expect("the state serialises"),
        );
        repvgg_checkpoint::write_safetensors(&self.checkpoint_path(), &tensors, Some(metadata))?;
        Ok(())
    }

    fn load_checkpoint(&mut self, path: &Path) -> Result<(), TrainError> {
        let bytes =
            std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
        let fail = |problem: String| file_error(path, problem);
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| fail(format!("not a training checkpoint: {e}")))?;
        let state: SavedState = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(RUN_STATE_KEY))
            .ok_or_else(|| fail("not a training checkpoint (no run state)".into()))
            .and_then(|json| {
                serde_json::from_str(json).map_err(|e| fail(format!("bad run state: {e}")))
            })?;
        if state.config != self.config {
            return Err(fail(config_difference(&state.config, &self.config)));
        }
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| fail(format!("corrupt: {e}")))?;
        let mut weights = StateDict::new();
        let mut velocity = std::collections::BTreeMap::new();
        for (name, view) in file.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(fail(format!("{name}: expected f32")));
            }
            let data = repvgg_checkpoint::DType::F32
                .decode_floats(view.data())
                .ok_or_else(|| fail(format!("{name}: unreadable f32 data")))?;
            let tensor = repvgg_checkpoint::Tensor::new(view.shape().to_vec(), data);
            match name.strip_prefix(OPTIMIZER_PREFIX) {
                Some(param) => {
                    velocity.insert(
                        param.to_string(),
                        to_device(&tensor, &self.device.clone().inner()),
                    );
                }
                None => {
                    weights.insert(name, tensor);
                }
            }
        }
        let checked = Checkpoint::from_state_dict(self.config.arch.clone(), Form::Train, weights)
            .map_err(|e| fail(e.problem.message))?;
        self.model = Some(RepVggTrain::from_state_dict(
            &self.config.arch,
            &checked.tensors,
            self.config.bn_eps,
            &self.device,
        ));
        self.sgd.velocity = velocity;
        self.position = state.position;
        Ok(())
    }

    /// Evaluates the trained multi-branch form, converts it, evaluates the deployed form on the
    /// engine, compares every prediction, and writes `train.safetensors` and
    /// `deploy.safetensors` (official naming).
    pub fn finish(&self) -> Result<FinalReport, TrainError> {
        let trained = self.trained_weights()?;
        trained.save_safetensors(&self.out.join("train.safetensors"), Naming::Official)?;
        let deploy = trained.to_deploy(self.config.bn_eps)?;
        let deploy_path = self.out.join("deploy.safetensors");
        deploy.save_safetensors(&deploy_path, Naming::Official)?;

        let test = self.data.test.clone();
        let batch = self.options.eval_batch;
        let train_run = evaluate_train_form(self.model(), test.clone(), self.eval_pipeline, batch)?;
        let engine = Engine::from_checkpoint(&deploy, self.config.bn_eps)?;
        let deploy_run = evaluate_engine(&engine, test, self.eval_pipeline, batch)?;
        let disagreements = train_run
            .evaluation
            .predictions
            .iter()
            .zip(&deploy_run.evaluation.predictions)
            .filter(|(a, b)| a != b)
            .count();
        let max_ref = train_run.logits.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let max_diff = train_run
            .logits
            .iter()
            .zip(&deploy_run.logits)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
        Ok(FinalReport {
            train_form_images_per_s: train_run.images_per_s,
            deploy_images_per_s: deploy_run.images_per_s,
            train_form: train_run.evaluation,
            deploy_form: deploy_run.evaluation,
            disagreements,
            max_logit_rel_diff: max_diff / max_ref.max(1e-30),
            deploy_path,
        })
    }
}

/// Why a checkpoint's run cannot be continued with this configuration, naming each setting
/// that differs.
fn config_difference(saved: &TrainConfig, now: &TrainConfig) -> String {
    fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    flatten(&name, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let fields = |c: &TrainConfig| {
        let mut out = Vec::new();
        flatten("", &serde_json::to_value(c).expect("serialises"), &mut out);
        out
    };
    // The command-line flag behind each setting, so the message says what to type.
    let flag = |field: &str| -> String {
        let top = field.split('.').next().unwrap_or(field);
        match top {
            "arch" => "--arch".into(),
            "batch_size" => "--batch".into(),
            "mixup_alpha" => "--mixup".into(),
            "augment" => "the augmentation (--size, --pad, --no-augment, --preset)".into(),
            "momentum" | "bn_eps" => format!("{top} (fixed by the recipe)"),
            other => format!("--{}", other.replace('_', "-")),
        }
    };
    let (before, after) = (fields(saved), fields(now));
    let mut differences = Vec::new();
    for (name, old) in &before {
        let new = after
            .iter()
            .find(|(n, _)| n == name)
            .map_or("(unset)", |(_, v)| v.as_str());
        if new != old {
            differences.push(format!(
                "{}: {old} in the checkpoint, {new} now",
                flag(name)
            ));
        }
    }
    for (name, new) in &after {
        if !before.iter().any(|(n, _)| n == name) {
            differences.push(format!(
                "{}: unset in the checkpoint, {new} now",
                flag(name)
            ));
        }
    }
    differences.dedup();
    let only_epochs = differences.len() == 1 && saved.epochs != now.epochs;
    let advice = if only_epochs {
        "the cosine schedule's length is set by the epoch count, so a run cannot be lengthened \
         or shortened midway; resume with the same --epochs, or start a new run in another --out"
    } else {
        "resume with the same settings, or start a new run in another --out"
    };
    format!(
        "was written by a run with different settings: {}; {advice}",
        differences.join("; ")
    )
}

/// Logits and metrics of one pass over a data set, with the model's own speed (forward time
/// only, data preparation excluded).
pub struct EvalRun {
    pub evaluation: Evaluation,
    pub logits: Vec<f32>,
    pub images_per_s: f64,
}

/// One pass over `samples` with any model (`forward` takes a batch, returns its logits).
pub fn evaluate_with(
    samples: Arc<dyn Samples>,
    pipeline: Pipeline,
    batch_size: usize,
    classes: usize,
    mut forward: impl FnMut(&Batch) -> Result<Vec<f32>, TrainError>,
) -> Result<EvalRun, TrainError> {
    let plan = EpochPlan {
        batch_size,
        seed: 0,
        epoch: 0,
        first_step: 0,
        training: false,
    };
    let mut logits = Vec::with_capacity(samples.len() * classes);
    let mut labels = Vec::with_capacity(samples.len());
    let mut seconds = 0.0;
    for batch in Loader::new(samples.clone(), pipeline, plan) {
        let batch = batch?;
        let start = Instant::now();
        logits.extend(forward(&batch)?);
        seconds += start.elapsed().as_secs_f64();
        labels.extend_from_slice(&batch.labels);
    }
    Ok(EvalRun {
        evaluation: Evaluation::from_logits(&logits, &labels, classes),
        images_per_s: labels.len() as f64 / seconds.max(1e-9),
        logits,
    })
}

/// The multi-branch form in evaluation mode (running statistics), on burn.
pub fn evaluate_train_form(
    model: &RepVggTrain,
    samples: Arc<dyn Samples>,
    pipeline: Pipeline,
    batch_size: usize,
) -> Result<EvalRun, TrainError> {
    use burn::module::Module;
    let model = model.valid();
    let device = model.blocks[0].dense_conv.weight.val().device();
    let classes = model
        .head
        .as_ref()
        .map(|head| head.bias.dims()[0])
        .ok_or_else(|| TrainError::Config("a headless model has no classes to evaluate".into()))?;
    evaluate_with(samples, pipeline, batch_size, classes, |batch| {
        let x: Tensor<4> =
            Tensor::from_data(TensorData::new(batch.images.clone(), batch.shape), &device);
        Ok(model
            .forward(x)
            .into_data()
            .try_into_vec::<f32>()
            .expect("logits are f32"))
    })
}

/// The deployed form on the engine.
pub fn evaluate_engine(
    engine: &Engine,
    samples: Arc<dyn Samples>,
    pipeline: Pipeline,
    batch_size: usize,
) -> Result<EvalRun, TrainError> {
    let mut workspace = Workspace::default();
    let classes = engine.spec().num_classes;
    evaluate_with(samples, pipeline, batch_size, classes, |batch| {
        let [n, _, h, w] = batch.shape;
        Ok(engine.forward(&batch.images, n, h, w, &mut workspace)?)
    })
}
