//! The engine a weights file runs on: the float engine, or the INT8 one for a file that
//! `repvgg quantize` wrote (recognised from its metadata). Commands and the server hold one
//! of these so that neither needs to know which form a file is.

use repvgg_arch::ArchSpec;
use repvgg_checkpoint::Checkpoint;

use crate::{Engine, EngineError, EngineOptions, Int8Engine, Isa, Workspace};

pub enum Runner {
    Float(Engine, Workspace),
    Int8(Int8Engine),
}

impl Runner {
    /// The engine for `ckpt`: INT8 when the file is (its integers were read with it), else
    /// float.
    pub fn new(ckpt: &Checkpoint, bn_eps: f64, isa: Option<Isa>) -> Result<Runner, EngineError> {
        if let Some(model) = &ckpt.int8 {
            return Ok(Runner::Int8(Int8Engine::new(model, isa)?));
        }
        let options = EngineOptions {
            isa,
            ..Default::default()
        };
        Ok(Runner::Float(
            Engine::with_options(ckpt, bn_eps, options)?,
            Workspace::default(),
        ))
    }

    /// Logits `(n, classes)` for an NCHW batch of `spec().in_channels` channels on a non-empty
    /// map.
    pub fn forward(
        &mut self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f32>, EngineError> {
        match self {
            Runner::Float(engine, ws) => engine.forward(input, n, h, w, ws),
            Runner::Int8(engine) => engine.forward(input, n, h, w),
        }
    }

    pub fn spec(&self) -> &ArchSpec {
        match self {
            Runner::Float(engine, _) => engine.spec(),
            Runner::Int8(engine) => engine.spec(),
        }
    }

    /// The kernels in words, for the lines commands print.
    pub fn describe(&self) -> String {
        match self {
            Runner::Float(engine, _) => format!("fp32, {} kernels", engine.isa()),
            Runner::Int8(engine) => format!("int8, {} kernels", engine.kernels()),
        }
    }
}

/// The `k` most probable classes of softmax(`logits`), as (index, probability), most probable
/// first (ties by index). Softmax in f64, shifted by the maximum: what `predict` prints and the
/// server answers.
pub fn top_classes(logits: &[f32], k: usize) -> Vec<(usize, f64)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exp: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|i| (i, exp[i] / sum))
        .collect()
}
