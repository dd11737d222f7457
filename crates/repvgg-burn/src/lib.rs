//! RepVGG's two model forms on [burn](https://burn.dev).
//!
//! The training form ([`RepVggTrain`]) has the three branches with PyTorch-semantics batch norm
//! (batch statistics on an autodiff device, running statistics otherwise); the deploy form
//! ([`RepVggDeploy`]) is the plain 3x3-conv stack. Both are built from checked checkpoints
//! ([`repvgg_checkpoint::Checkpoint`]) and export back to official-named state dicts, so the
//! framework-free fusion in `repvgg-fuse` does every conversion.

pub mod layers;
pub mod model;

pub use model::{DeployBlock, RepVgg, RepVggDeploy, RepVggTrain, TrainBlock};

use burn::tensor::Device;

/// The one place that picks the compute device. The CPU backend is burn's `flex`; a GPU backend
/// is a feature switch here and nowhere else.
pub fn default_device() -> Device {
    Device::flex()
}
