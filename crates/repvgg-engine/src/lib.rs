//! A CPU inference engine for deployed RepVGG: 3x3 conv + bias (+ SE) + ReLU, then pool and
//! linear, with no framework underneath.
//!
//! ```no_run
//! use repvgg_checkpoint::Checkpoint;
//! use repvgg_engine::{Engine, Workspace};
//!
//! // Either form: training-form weights are converted on load.
//! let ckpt = Checkpoint::load("RepVGG-A0-train.pth".as_ref(), None)?;
//! let engine = Engine::from_checkpoint(&ckpt, 1e-5)?;
//! let images = vec![0.0f32; 8 * 3 * 224 * 224]; // NCHW, ImageNet-normalised
//! let logits = engine.forward(&images, 8, 224, 224, &mut Workspace::default())?;
//! // Backbone use: the outputs of stages 1..4.
//! let pyramid = engine.forward_stages(&images, 8, 224, 224, &[1, 2, 3, 4])?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Activations are NHWC, so a 3x3 convolution is matrix products whose rows are output
//! positions, whose reduction runs over (tap, input channel) and whose columns are output
//! channels, all on the GEMM micro-kernels of `repvgg-kernels` against weights packed once at
//! load. Bias and ReLU are applied as each block of outputs leaves the registers.
//!
//! For each call of each layer the planner (`plan.rs`) picks a scheme and cuts the layer into
//! tasks; `layer.rs` runs them on the pool:
//! - Winograd for stride-1 layers of 8+ input channels per group (F(4x4, 3x3), or F(2x2, 3x3)
//!   on small maps) and for wide stride-2 layers (F(2x2, 3x3) by phases);
//! - im2col (`im2col.rs`): 3x3 patches copied into rows, one product per task;
//! - implicit GEMM (`implicit.rs`), where the weights are too big for L2: nine per-tap
//!   products reading rows straight from the input, so each slice of weights is read once.
//!
//! Threads split a layer's tasks (latency mode), or take whole images (throughput mode). The
//! instruction set is detected once ([`Isa::best`]) and can be capped
//! ([`EngineOptions::isa`]), so every kernel set runs end to end on one machine.
//!
//! Layout: `engine.rs` (the [`Engine`]), `options.rs`, `workspace.rs` (call and per-thread
//! memory), `plan.rs` (pure planning), `layer.rs` (executing a plan), `im2col.rs`,
//! `implicit.rs`, `se.rs`, `layout.rs` (NCHW/NHWC), `probe.rs` (the machine's caches),
//! `tuning.rs` (every tuning constant, each with its reason).

#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod calibration;
mod engine;
mod error;
mod im2col;
mod implicit;
mod int8;
mod layer;
mod layout;
mod options;
mod plan;
mod probe;
mod runner;
mod se;
pub mod tuning;
mod workspace;

pub use calibration::{Calibration, Calibrator};
pub use engine::Engine;
pub use error::{EngineError, check_input};
pub use int8::{BlockOutput, Int8Engine};
pub use layout::nhwc_to_nchw;
pub use options::{EngineOptions, Lowering, Mode, Winograd};
pub use probe::available_memory;
pub use repvgg_kernels::Isa;
pub use runner::{Runner, top_classes};
pub use workspace::Workspace;

/// A raw pointer to a u8 output that parallel tasks write through, each to its own block of
/// rows and columns.
#[derive(Clone, Copy)]
pub(crate) struct OutPtrU8(pub *mut u8);

// SAFETY: an address only; the INT8 layer's tasks write disjoint (rows x columns) blocks
// through it: rows split in runs, columns of a group in runs starting on 48-column spans.
unsafe impl Send for OutPtrU8 {}
// SAFETY: as for `Send`.
unsafe impl Sync for OutPtrU8 {}

impl OutPtrU8 {
    /// A method, so closures capture the whole `Send` wrapper.
    pub(crate) fn get(self) -> *mut u8 {
        self.0
    }
}

/// One block's share of a forward pass.
#[derive(Clone, Debug)]
pub struct LayerTiming {
    pub name: String,
    pub seconds: f64,
    pub macs: u64,
    pub stride: usize,
    pub groups: usize,
    /// (in channels, out channels, output height, output width)
    pub shape: (usize, usize, usize, usize),
    /// How the layer was computed: the float engine's scheme (`winograd F(4x4)`, `im2col`,
    /// ...) or the INT8 kernel set, since the engines choose per layer.
    pub method: &'static str,
}

/// One stage's output feature map, NCHW.
#[derive(Clone, Debug, PartialEq)]
pub struct StageFeatures {
    pub stage: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}
