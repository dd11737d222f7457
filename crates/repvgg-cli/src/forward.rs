//! `repvgg forward`: a batch in (safetensors, or images preprocessed as the weights file
//! records), logits (and block outputs) out.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use repvgg_checkpoint::{DType, StateDict, Tensor as CkptTensor, write_safetensors};
use repvgg_engine::{Engine, EngineOptions, Isa, Workspace, nhwc_to_nchw};

use crate::load_checkpoint;
use crate::model_input::{InputArgs, image_batch, imagenet_fallback, is_image};

/// Reads the batch (N, C, H, W), of any float type, as f32: the tensor named `input`, or the
/// file's only tensor whatever its name.
fn read_input(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let mut names = st.names();
    names.sort();
    let name = match names[..] {
        [only] => only,
        _ if names.contains(&"input") => "input",
        _ => bail!(
            "{}: no tensor named 'input' among the {} it holds ({}); name the batch 'input' or \
             store it alone",
            path.display(),
            names.len(),
            names
                .iter()
                .take(8)
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let view = st
        .tensor(name)
        .with_context(|| format!("{}: cannot read tensor '{name}'", path.display()))?;
    let dtype = DType::from_safetensors(view.dtype())
        .filter(|d| d.is_float())
        .with_context(|| {
            format!(
                "{}: '{name}' has dtype {:?}; expected a float type",
                path.display(),
                view.dtype()
            )
        })?;
    let values = dtype.decode_floats(view.data()).expect("float dtype");
    if values.iter().any(|v| !v.is_finite()) {
        bail!(
            "{}: '{name}' contains NaN or infinite values",
            path.display()
        );
    }
    Ok((view.shape().to_vec(), values))
}

/// One `forward` run's arguments.
pub struct ForwardRun<'a> {
    pub weights: &'a Path,
    pub inputs: &'a [PathBuf],
    pub output: &'a Path,
    pub arch: Option<String>,
    pub features: bool,
    pub out_indices: Option<Vec<usize>>,
    pub bn_eps: f64,
    pub isa: Option<Isa>,
    pub preprocess: &'a InputArgs,
}

pub fn run(args: ForwardRun<'_>) -> Result<()> {
    let ForwardRun {
        weights,
        inputs,
        output,
        arch,
        features,
        out_indices,
        bn_eps,
        isa,
        preprocess,
    } = args;
    if let Some(bad) = out_indices.iter().flatten().find(|&&s| s > 4) {
        bail!("--out-indices: stage {bad} does not exist (stages are 0 to 4)");
    }
    crate::check_bn_eps(bn_eps)?;
    let ckpt = load_checkpoint(weights, arch)?;
    let images = inputs.iter().any(|p| is_image(p));
    let (shape, values, input) = if images {
        if let Some(other) = inputs.iter().find(|p| !is_image(p)) {
            bail!(
                "{}: --input takes one .safetensors batch or JPEG/PNG images, not both",
                other.display()
            );
        }
        let (p, source) = preprocess.resolve(&ckpt, imagenet_fallback(&ckpt))?;
        crate::require_rgb(&ckpt, weights)?;
        let [h, w] = p.size;
        crate::check_memory(
            &ckpt.spec,
            inputs.len(),
            h,
            w,
            false,
            &weights.display().to_string(),
        )?;
        eprintln!("input: {} ({source})", p.describe());
        let values = image_batch(inputs, &p)?;
        let shape = vec![inputs.len(), 3, p.size[0], p.size[1]];
        let name = format!("{} images", inputs.len());
        (shape, values, name)
    } else {
        if preprocess.any() {
            bail!("--preset, --size, --mean and --std apply to image inputs, not to a tensor");
        }
        let [path] = inputs else {
            bail!("--input: give one .safetensors batch, or JPEG/PNG images");
        };
        let (shape, values) = read_input(path)?;
        (shape, values, path.display().to_string())
    };
    let spec = &ckpt.spec;
    match shape[..] {
        [n, c, h, w] if n > 0 && c == spec.in_channels && h > 0 && w > 0 => {}
        _ => bail!(
            "{input}: the batch has shape {shape:?}; {} expects (N, {}, H, W), none of them 0",
            spec.name,
            spec.in_channels
        ),
    }
    let [n, _, h, w] = shape[..] else {
        unreachable!("checked above")
    };
    if !images {
        // Images were checked before they were decoded.
        crate::check_memory(spec, n, h, w, false, &input)?;
    }
    // A headless model ends with its pooled features instead of logits.
    let (key, width) = if spec.num_classes == 0 {
        ("pooled", spec.feature_width())
    } else {
        ("logits", spec.num_classes)
    };
    let shape = [n, spec.in_channels, h, w];
    if ckpt.int8.is_some() {
        if features || out_indices.is_some() {
            bail!(
                "{}: --features and --out-indices run the float engine; this is an INT8 model (its logits only)",
                weights.display()
            );
        }
        let mut runner = repvgg_engine::Runner::new(&ckpt, bn_eps, isa)?;
        let logits = runner.forward(&values, n, h, w)?;
        let mut out = StateDict::new();
        out.insert(key.to_string(), CkptTensor::new(vec![n, width], logits));
        write_safetensors(output, &out, None)?;
        eprintln!(
            "{} ({}, {}) on {input} {shape:?} -> {}: {key} [{n}, {width}]",
            weights.display(),
            spec.name,
            runner.describe(),
            output.display(),
        );
        return Ok(());
    }
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
    })?;
    out.insert(key.to_string(), CkptTensor::new(vec![n, width], logits));

    write_safetensors(output, &out, None)?;
    let features_note = if out.len() > 1 {
        format!(" and {} feature maps", out.len() - 1)
    } else {
        String::new()
    };
    eprintln!(
        "{} ({}, {} form, {} kernels) on {input} {shape:?} -> {}: {key} [{n}, {width}]{features_note}",
        weights.display(),
        spec.name,
        ckpt.form,
        engine.isa(),
        output.display(),
    );
    Ok(())
}
