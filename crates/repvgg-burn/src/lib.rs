//! RepVGG's two model forms on [burn](https://burn.dev).
//!
//! The training form ([`RepVggTrain`]) has the three branches with PyTorch-semantics batch norm
//! (batch statistics on an autodiff device, running statistics otherwise); the deploy form
//! ([`RepVggDeploy`]) is the plain 3x3-conv stack. Both are built from checked checkpoints
//! ([`repvgg_checkpoint::Checkpoint`]) and export back to official-named state dicts, so the
//! framework-free fusion in `repvgg-fuse` does every conversion.
//!
//! ```no_run
//! use burn::tensor::{Tensor, TensorData};
//! use repvgg_burn::{RepVgg, default_device};
//! use repvgg_checkpoint::Checkpoint;
//!
//! let ckpt = Checkpoint::load("RepVGG-B1g4-train.pth".as_ref(), None)?;
//! let device = default_device();
//! let model = RepVgg::from_checkpoint(&ckpt, 1e-5, &device);
//! let x: Tensor<4> = Tensor::from_data(TensorData::new(vec![0.0f32; 3 * 224 * 224], [1, 3, 224, 224]), &device);
//! let logits = model.forward(x.clone());
//! let stages = model.forward_stages(x, &[2, 3, 4]); // (stage, feature map) for a detector
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod layers;
pub mod model;
pub mod training_ops;

pub use model::{DeployBlock, RepVgg, RepVggDeploy, RepVggTrain, TrainBlock};

use burn::tensor::Device;

/// The one place that picks the compute device. The CPU backend is burn's `flex`; a GPU backend
/// is a feature switch here and nowhere else.
pub fn default_device() -> Device {
    Device::flex()
}

/// Where the framework model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// burn's `flex` CPU backend.
    #[default]
    Cpu,
    /// A GPU through burn's `wgpu` backend (Vulkan, Metal or DX12; on a machine without a GPU,
    /// Mesa's software Vulkan). Needs the `wgpu` cargo feature.
    Wgpu,
}

/// Why the framework side cannot run as asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BurnError {
    /// A backend this binary was built without.
    #[error(
        "this build has no GPU backend ({0:?}); rebuild with `cargo build --release -p repvgg-cli --features wgpu`"
    )]
    BackendNotBuilt(Backend),
}

/// The device of a backend, or why this build cannot provide it.
pub fn device(backend: Backend) -> Result<Device, BurnError> {
    match backend {
        Backend::Cpu => Ok(default_device()),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(not(feature = "wgpu"))]
        Backend::Wgpu => Err(BurnError::BackendNotBuilt(backend)),
    }
}
