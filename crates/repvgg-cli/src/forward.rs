//! `repvgg forward`: safetensors in, logits (and block outputs) out.

use std::path::Path;

use anyhow::{Context, Result, bail};
use repvgg_checkpoint::{DType, StateDict, Tensor as CkptTensor, write_safetensors};
use repvgg_engine::{Engine, EngineOptions, Isa, Workspace, nhwc_to_nchw};

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
    let dtype = DType::from_safetensors(view.dtype())
        .filter(|d| d.is_float())
        .with_context(|| {
            format!(
                "{}: 'input' has dtype {:?}; expected a float type",
                path.display(),
                view.dtype()
            )
        })?;
    let values = dtype.decode_floats(view.data()).expect("float dtype");
    if values.iter().any(|v| !v.is_finite()) {
        bail!(
            "{}: 'input' contains NaN or infinite values",
            path.display()
        );
    }
    Ok((view.shape().to_vec(), values))
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    weights: &Path,
    input: &Path,
    output: &Path,
    arch: Option<String>,
    features: bool,
    out_indices: Option<Vec<usize>>,
    bn_eps: f64,
    isa: Option<Isa>,
) -> Result<()> {
    if let Some(bad) = out_indices.iter().flatten().find(|&&s| s > 4) {
        bail!("--out-indices: stage {bad} does not exist (stages are 0 to 4)");
    }
    crate::check_bn_eps(bn_eps)?;
    let ckpt = load_checkpoint(weights, arch)?;
    let (shape, values) = read_input(input)?;
    let spec = &ckpt.spec;
    match shape[..] {
        [n, c, h, w] if n > 0 && c == spec.in_channels && h > 0 && w > 0 => {}
        _ => bail!(
            "{}: 'input' has shape {shape:?}; {} expects (N, {}, H, W), none of them 0",
            input.display(),
            spec.name,
            spec.in_channels
        ),
    }
    let [n, _, h, w] = shape[..] else {
        unreachable!("checked above")
    };
    // Training-form weights are converted in memory; the engine runs the plain network.
    let options = EngineOptions {
        isa,
        ..Default::default()
    };
    let engine = Engine::with_options(&ckpt, bn_eps, options)?;
    let names: Vec<String> = spec.blocks().iter().map(|b| b.name()).collect();
    let mut out = StateDict::new();
    let mut ws = Workspace::default();
    let blocks = spec.blocks();
    let logits = engine.forward_with(&values, n, h, w, &mut ws, |i, fh, fw, nhwc| {
        let c = nhwc.len() / (n * fh * fw);
        let wanted_stage = out_indices
            .as_ref()
            .is_some_and(|stages| blocks[i].ends_stage && stages.contains(&blocks[i].stage));
        if wanted_stage {
            out.insert(
                format!("stages.{}", blocks[i].stage),
                CkptTensor::new(vec![n, c, fh, fw], nhwc_to_nchw(nhwc, n, fh, fw)),
            );
        }
        if features {
            out.insert(
                format!("features.{}", names[i]),
                CkptTensor::new(vec![n, c, fh, fw], nhwc_to_nchw(nhwc, n, fh, fw)),
            );
        }
    });
    // A headless model ends with its pooled features instead of logits.
    let (key, width) = if spec.num_classes == 0 {
        ("pooled", spec.feature_width())
    } else {
        ("logits", spec.num_classes)
    };
    out.insert(key.to_string(), CkptTensor::new(vec![n, width], logits));

    write_safetensors(output, &out, None)?;
    let features_note = if out.len() > 1 {
        format!(" and {} feature maps", out.len() - 1)
    } else {
        String::new()
    };
    eprintln!(
        "{} ({}, {} form, {} kernels) on {} {:?} -> {}: {key} [{n}, {width}]{features_note}",
        weights.display(),
        spec.name,
        ckpt.form,
        engine.isa(),
        input.display(),
        [n, spec.in_channels, h, w],
        output.display(),
    );
    Ok(())
}
