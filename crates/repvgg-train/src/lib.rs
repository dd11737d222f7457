//! Training RepVGG's multi-branch form on burn, end to end: the paper's recipe, checkpoints that
//! resume bit for bit, metrics (CSV and PNG), and at the end the conversion to the plain form,
//! checked prediction by prediction.
//!
//! ```no_run
//! use repvgg_arch::ArchSpec;
//! use repvgg_train::{RunOptions, TrainConfig, Trainer};
//!
//! let data = repvgg_data::open_dir("/usr/share/datasets/fashion-mnist".as_ref(), 0.1)?;
//! let config = TrainConfig::small_images(ArchSpec::parse("A0;classes=10")?);
//! let mut trainer = Trainer::new(config, &data, "runs/a0".as_ref(), RunOptions::default())?;
//! let history = trainer.run()?;
//! let report = trainer.finish()?; // evaluates both forms and writes deploy.safetensors
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod init;
pub mod loss;
pub mod metrics;
pub mod plot;
pub mod schedule;
pub mod sgd;
mod trainer;

pub use metrics::Evaluation;
pub use trainer::{
    EvalRun, FinalReport, RUN_FILES, RunOptions, Trainer, evaluate_engine, evaluate_train_form,
    evaluate_with,
};

use repvgg_arch::ArchSpec;
use repvgg_checkpoint::Preprocessing;
use repvgg_checkpoint::metadata::{Interpolation, Resize};
use repvgg_data::{DataSplits, IMAGENET_MEAN, IMAGENET_STD, Pipeline, Transform};
use serde::{Deserialize, Serialize};

/// A training run's failure, naming the file involved where there is one.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] repvgg_data::DataError),
    #[error(transparent)]
    Checkpoint(#[from] repvgg_checkpoint::CheckpointError),
    #[error(transparent)]
    Engine(#[from] repvgg_engine::EngineError),
    #[error(transparent)]
    Backend(#[from] repvgg_burn::BurnError),
    #[error("{path}: {problem}")]
    File {
        path: std::path::PathBuf,
        problem: String,
    },
    #[error("{0}")]
    Config(String),
    /// The loss became NaN or infinite: the run stops rather than write garbage over its
    /// last good checkpoint.
    #[error(
        "training diverged at epoch {epoch}, step {step}: loss is {loss}; lower --lr (the last good checkpoint is kept)"
    )]
    Diverged {
        epoch: usize,
        step: usize,
        loss: f64,
    },
}

/// How images are augmented for training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    /// Small images at their native size: zero-pad, random crop back, horizontal flip.
    PadCropFlip { pad: usize },
    /// RandomResizedCrop to `size` + flip; evaluation resizes to `size / 0.875` and crops.
    RandomResizedCrop { size: usize },
    /// No augmentation.
    None,
}

/// Which per-channel statistics normalise the input.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    ImageNet,
    /// The training set's own mean and standard deviation (in-memory data sets).
    Dataset,
}

/// Everything that decides a run's result. Stored in every checkpoint; a resumed run must
/// present the same one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub arch: ArchSpec,
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (after warm-up), for batch `batch_size`.
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub label_smoothing: f64,
    /// Mixup's Beta(alpha, alpha); `None` is off.
    pub mixup_alpha: Option<f64>,
    /// The official equivalent-kernel L2 instead of plain decay on the 3x3 and 1x1 kernels.
    pub custom_l2: bool,
    pub augment: Augment,
    pub normalize: Normalize,
    pub seed: u64,
    pub bn_eps: f64,
}

impl TrainConfig {
    /// The paper's ImageNet recipe (section 4.1): 120 epochs, batch 256, cosine from 0.1,
    /// weight decay 1e-4, RandomResizedCrop 224 + flip; with 5 warm-up epochs and label
    /// smoothing 0.1 as in the official training code.
    pub fn imagenet_120(arch: ArchSpec) -> TrainConfig {
        TrainConfig {
            arch,
            epochs: 120,
            batch_size: 256,
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            warmup_epochs: 5.0,
            label_smoothing: 0.1,
            mixup_alpha: None,
            custom_l2: false,
            augment: Augment::RandomResizedCrop { size: 224 },
            normalize: Normalize::ImageNet,
            seed: 0,
            bn_eps: repvgg_checkpoint::convert::DEFAULT_BN_EPS,
        }
    }

    /// Small images (MNIST-, CIFAR-sized) at their native size: pad-and-crop + flip, the data
    /// set's own statistics, a short cosine schedule.
    pub fn small_images(arch: ArchSpec) -> TrainConfig {
        TrainConfig {
            epochs: 10,
            batch_size: 128,
            lr: 0.1,
            warmup_epochs: 1.0,
            weight_decay: 5e-4,
            augment: Augment::PadCropFlip { pad: 2 },
            normalize: Normalize::Dataset,
            ..TrainConfig::imagenet_120(arch)
        }
    }

    /// How the trained model is to be fed: the evaluation transform of this recipe on this
    /// data, as every weights file of the run records it.
    pub fn preprocessing(&self, data: &DataSplits) -> Preprocessing {
        let (mean, std) = match (self.normalize, data.stats) {
            (Normalize::Dataset, Some(stats)) => stats,
            _ => (IMAGENET_MEAN, IMAGENET_STD),
        };
        let (size, resize) = match self.augment {
            // The images' stored size; photos of any other size are resized to it.
            Augment::PadCropFlip { .. } | Augment::None => {
                let (h, w) = data.native_size.unwrap_or((224, 224));
                ([h, w], Resize::Stretch)
            }
            Augment::RandomResizedCrop { size } => {
                ([size, size], Resize::CenterCrop { crop_pct: 0.875 })
            }
        };
        Preprocessing {
            size,
            grey: data.grey,
            resize,
            interpolation: Interpolation::Bilinear,
            mean,
            std,
        }
    }

    /// The training and evaluation pipelines on `data`; evaluation is exactly what
    /// [`TrainConfig::preprocessing`] records, so `predict` later feeds the model the same.
    pub fn pipelines(&self, data: &DataSplits) -> (Pipeline, Pipeline) {
        let eval = Pipeline::for_model(&self.preprocessing(data));
        let transform = match self.augment {
            Augment::PadCropFlip { pad } => Transform::PadCropFlip { pad },
            Augment::None => Transform::Identity,
            Augment::RandomResizedCrop { size } => Transform::RandomResizedCrop { size },
        };
        (Pipeline { transform, ..eval }, eval)
    }
}

/// One row of `metrics.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub val_loss: f64,
    pub val_acc: f64,
    pub val_top5: f64,
    /// Wall time of the epoch's training steps (validation excluded).
    pub seconds: f64,
    pub images_per_s: f64,
    /// Time the training loop waited for data: how much the loader starved it.
    pub data_wait_s: f64,
}
