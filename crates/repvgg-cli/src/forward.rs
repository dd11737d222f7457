//! `repvgg forward`: safetensors in, logits (and block outputs) out.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use repvgg_checkpoint::{DType, Tensor as CkptTensor, write_atomically};
use repvgg_engine::{Engine, Workspace, nhwc_to_nchw};

use crate::load_checkpoint;

/// Reads tensor `input` (N, C, H, W) of any float type, as f32.
fn read_input(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    // The tensor named `input`, or the only tensor in the file.
    let names = st.names();
    let name = if names.contains(&"input") || names.len() != 1 {
        "input"
    } else {
        names[0]
    };
    let view = st
        .tensor(name)
        .with_context(|| format!("{}: has no tensor named 'input'", path.display()))?;
    let dtype = match view.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        other => bail!(
            "{}: 'input' has dtype {other:?}; expected a float type",
            path.display()
        ),
    };
    let values = dtype.decode_floats(view.data()).expect("float dtype");
    if values.iter().any(|v| !v.is_finite()) {
        bail!(
            "{}: 'input' contains NaN or infinite values",
            path.display()
        );
    }
    Ok((view.shape().to_vec(), values))
}

pub fn run(
    weights: &Path,
    input: &Path,
    output: &Path,
    arch: Option<String>,
    features: bool,
    bn_eps: f64,
) -> Result<()> {
    crate::check_bn_eps(bn_eps)?;
    let ckpt = load_checkpoint(weights, arch)?;
    let (shape, values) = read_input(input)?;
    let spec = &ckpt.spec;
    match shape[..] {
        [n, c, h, w] if n > 0 && c == spec.in_channels && h > 0 && w > 0 => {}
        _ => bail!(
            "{}: 'input' has shape {shape:?}; {} expects (N, {}, H, W)",
            input.display(),
            spec.name,
            spec.in_channels
        ),
    }
    let [n, _, h, w] = shape[..] else {
        unreachable!("checked above")
    };
    // Training-form weights are converted in memory; the engine runs the plain network.
    let engine = Engine::from_checkpoint(&ckpt, bn_eps)?;
    let names: Vec<String> = spec.blocks().iter().map(|b| b.name()).collect();
    let mut out = HashMap::new();
    let mut ws = Workspace::default();
    let logits = engine.forward_with(&values, n, h, w, &mut ws, |i, fh, fw, nhwc| {
        if features {
            let c = nhwc.len() / (n * fh * fw);
            out.insert(
                format!("features.{}", names[i]),
                CkptTensor::new(vec![n, c, fh, fw], nhwc_to_nchw(nhwc, n, fh, fw)),
            );
        }
    });
    out.insert(
        "logits".to_string(),
        CkptTensor::new(vec![n, spec.num_classes], logits),
    );

    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = out
        .iter()
        .map(|(k, t)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice(&t.data),
            )
            .expect("shape matches data");
            (k.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, None).context("serialising outputs")?;
    write_atomically(output, &bytes)?;
    let features_note = if features {
        format!(" and {} block outputs", out.len() - 1)
    } else {
        String::new()
    };
    eprintln!(
        "{} ({}, {} form) on {} {:?} -> {}: logits [{n}, {}]{features_note}",
        weights.display(),
        spec.name,
        ckpt.form,
        input.display(),
        [n, spec.in_channels, h, w],
        output.display(),
        spec.num_classes,
    );
    Ok(())
}
