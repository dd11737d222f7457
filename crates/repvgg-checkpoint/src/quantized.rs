//! INT8 deploy-form weights: what `repvgg quantize` writes and the INT8 engine runs.
//!
//! Each block's 3x3 kernel is stored as `i8` with one scale per output channel (symmetric,
//! `w = scale * q`), its bias as `f32`; the head stays `f32` (it is a small share of the work,
//! and the logits keep their float precision). The activations entering each block, and the
//! last block's output, are per-tensor `u8` with a scale and a zero point (`x = scale * (q -
//! zero)`), recorded in the metadata under [`QUANTIZATION_KEY`] with how they were calibrated.
//!
//! Commands that only read float weights get the dequantized weights (`scale * q`) from
//! [`crate::Checkpoint::load`], so every command reads the file; the INT8 engine reads it
//! with [`QuantizedModel::load`].

use std::collections::HashMap;
use std::path::Path;

use repvgg_arch::{ArchSpec, Form};
use serde::{Deserialize, Serialize};

use crate::error::{CheckpointErrorKind, Problem};
use crate::layout::{HEAD, REPARAM, prefix};
use crate::{CheckpointError, Preprocessing, StateDict, Tensor, metadata};

pub const QUANTIZATION_KEY: &str = "repvgg.quantization";
/// Per output channel scale of a block's INT8 kernel.
pub const WEIGHT_SCALE: &str = "weight_scale";

/// A per-tensor u8 quantization: `real = scale * (q - zero_point)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActivationQuant {
    pub scale: f32,
    pub zero_point: u8,
}

impl ActivationQuant {
    /// The quantization that covers `[min, max]` (widened to include 0, which must be exact:
    /// it is the convolution's padding and ReLU's floor).
    pub fn covering(min: f32, max: f32) -> ActivationQuant {
        let (min, max) = (min.min(0.0), max.max(0.0));
        // A range of (nearly) nothing, an activation that is always zero, gets the unit
        // range: a vanishing scale would blow up the next layer's bias in the sums' units.
        let span = if max - min > 1e-6 { max - min } else { 1.0 };
        let scale = span / 255.0;
        let zero_point = (-min / scale).round().clamp(0.0, 255.0) as u8;
        ActivationQuant { scale, zero_point }
    }

    /// Rounds to nearest, ties to even (as QuantizeLinear does).
    #[inline]
    pub fn quantize(self, x: f32) -> u8 {
        // max then min, not clamp: a NaN becomes 0 rather than passing through.
        #[allow(clippy::manual_clamp)]
        let v = (x / self.scale + self.zero_point as f32)
            .max(0.0)
            .min(255.0);
        // Adding 2^23 rounds a value in [0, 255] to an integer, ties to even, in the default
        // rounding mode (the same as `round_ties_even`, which without SSE4.1 in the build's
        // baseline is a library call per value), and leaves that integer in the low mantissa
        // bits: read there, it needs no float-to-integer conversion, so the loop vectorises.
        ((v + 8_388_608.0).to_bits() & 0xff) as u8
    }

    #[inline]
    pub fn dequantize(self, q: u8) -> f32 {
        self.scale * (q as f32 - self.zero_point as f32)
    }
}

/// What the metadata says about the quantization.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationInfo {
    /// How the activation ranges were found: `minmax` or `percentile`.
    pub method: String,
    /// Calibration images.
    pub samples: usize,
    /// The input of each block, in order, then the last block's output.
    pub activations: Vec<ActivationQuant>,
    /// Layers kept in float (the head, `linear`).
    pub float_layers: Vec<String>,
}

/// One block's INT8 3x3 convolution, or (`float_weight`) one kept in float.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedConv {
    /// `(out, in / groups, 3, 3)`; empty for a float block.
    pub weight: Vec<i8>,
    /// Empty for a float block.
    pub weight_scale: Vec<f32>,
    pub bias: Vec<f32>,
    /// The block's float kernel, `(out, in / groups, 3, 3)`, when it is kept in float
    /// (`quantize --fp32-layers`): the stem, whose three input channels give little to gain
    /// and much to lose, or the last block before the float head.
    pub float_weight: Option<Vec<f32>>,
}

/// An INT8 deploy-form model.
#[derive(Clone, Debug)]
pub struct QuantizedModel {
    pub spec: ArchSpec,
    pub info: QuantizationInfo,
    pub convs: Vec<QuantizedConv>,
    /// `linear.weight` and `linear.bias`, float; `None` when headless.
    pub head: Option<(Tensor, Tensor)>,
    pub preprocessing: Option<Preprocessing>,
    pub labels: Option<Vec<String>>,
}

/// The `limit` of [`QuantizedModel::quantize`] for `bits`-bit weights (2 to 8): 127 for 8, 63
/// for 7 (what the AVX2 kernels' 16-bit sums take).
pub fn weight_limit(bits: u8) -> i8 {
    assert!((2..=8).contains(&bits), "{bits}-bit weights");
    ((1i16 << (bits - 1)) - 1) as i8
}

impl QuantizedModel {
    /// Quantizes a deploy-form checkpoint's kernels (symmetric, per output channel, to
    /// `[-limit, limit]`: see [`weight_limit`]) with the activation ranges found by
    /// calibration.
    ///
    /// `float_blocks`: indices of blocks kept in float.
    pub fn quantize(
        deploy: &crate::Checkpoint,
        activations: Vec<ActivationQuant>,
        method: &str,
        samples: usize,
        limit: i8,
        float_blocks: &[usize],
    ) -> Result<QuantizedModel, Problem> {
        if deploy.form != Form::Deploy {
            return Err(Problem::new(
                CheckpointErrorKind::Unsupported,
                "quantization takes deploy-form weights",
            ));
        }
        if deploy.spec.se {
            return Err(Problem::new(
                CheckpointErrorKind::Unsupported,
                "INT8 for SE models (D2se) is not supported yet",
            ));
        }
        if activations
            .iter()
            .any(|a| !(a.scale.is_finite() && a.scale > 0.0))
        {
            return Err(Problem::new(
                CheckpointErrorKind::InvalidArgument,
                "an activation range is not finite",
            ));
        }
        let blocks = deploy.spec.blocks();
        if activations.len() != blocks.len() + 1 {
            return Err(Problem::new(
                CheckpointErrorKind::InvalidArgument,
                format!(
                    "{} activation ranges for {} blocks (one per block input, one for the output)",
                    activations.len(),
                    blocks.len()
                ),
            ));
        }
        if let Some(bad) = float_blocks.iter().find(|&&i| i >= blocks.len()) {
            return Err(Problem::new(
                CheckpointErrorKind::InvalidArgument,
                format!("block {bad} does not exist ({} blocks)", blocks.len()),
            ));
        }
        check_int8_widths(&deploy.spec, float_blocks)?;
        let convs = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let p = prefix(b);
                let weight = &deploy.tensors[&format!("{p}{REPARAM}weight")];
                let bias = deploy.tensors[&format!("{p}{REPARAM}bias")].data.clone();
                if float_blocks.contains(&i) {
                    return QuantizedConv {
                        weight: Vec::new(),
                        weight_scale: Vec::new(),
                        bias,
                        float_weight: Some(weight.data.clone()),
                    };
                }
                let per_channel = weight.data.len() / b.out_channels;
                let mut q = Vec::with_capacity(weight.data.len());
                let mut scales = Vec::with_capacity(b.out_channels);
                for channel in weight.data.chunks_exact(per_channel) {
                    let max = channel.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = if max > 0.0 { max / limit as f32 } else { 1.0 };
                    scales.push(scale);
                    q.extend(channel.iter().map(|v| {
                        (v / scale)
                            .round_ties_even()
                            .clamp(-(limit as f32), limit as f32) as i8
                    }));
                }
                QuantizedConv {
                    weight: q,
                    weight_scale: scales,
                    bias,
                    float_weight: None,
                }
            })
            .collect();
        let head = deploy
            .tensors
            .get(&format!("{HEAD}weight"))
            .zip(deploy.tensors.get(&format!("{HEAD}bias")))
            .map(|(w, b)| (w.clone(), b.clone()));
        Ok(QuantizedModel {
            spec: deploy.spec.clone(),
            info: QuantizationInfo {
                method: method.to_string(),
                samples,
                activations,
                float_layers: blocks
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| float_blocks.contains(i))
                    .map(|(_, b)| b.name())
                    .chain(head.is_some().then(|| "linear".to_string()))
                    .collect(),
            },
            convs,
            head,
            preprocessing: deploy.preprocessing.clone(),
            labels: deploy.labels.clone(),
        })
    }

    /// Blocks whose bias does not fit the 32-bit sums' units (input scale x weight scale)
    /// within 2^30, where the engine clamps it: their outputs will be wrong. A symptom of an
    /// activation range far smaller than the values that follow it.
    pub fn saturated_biases(&self) -> Vec<String> {
        let acts = &self.info.activations;
        self.spec
            .blocks()
            .iter()
            .zip(&self.convs)
            .enumerate()
            .filter(|(i, (_, conv))| {
                // (A float block's weight scales are empty: nothing to saturate.)
                conv.bias.iter().zip(&conv.weight_scale).any(|(b, s)| {
                    (*b as f64 / (acts[*i].scale as f64 * *s as f64)).abs() > (1u64 << 30) as f64
                })
            })
            .map(|(_, (b, _))| b.name())
            .collect()
    }

    /// The float weights this model stands for (`scale * q`): what float commands run.
    pub fn dequantized(&self) -> StateDict {
        let mut dict = StateDict::new();
        for (b, conv) in self.spec.blocks().iter().zip(&self.convs) {
            let p = prefix(b);
            let per_channel = conv.weight.len() / b.out_channels;
            let data: Vec<f32> = match &conv.float_weight {
                Some(w) => w.clone(),
                None => conv
                    .weight
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| q as f32 * conv.weight_scale[i / per_channel])
                    .collect(),
            };
            let shape = vec![b.out_channels, b.in_channels / b.groups, 3, 3];
            dict.insert(format!("{p}{REPARAM}weight"), Tensor::new(shape, data));
            dict.insert(
                format!("{p}{REPARAM}bias"),
                Tensor::new(vec![b.out_channels], conv.bias.clone()),
            );
        }
        if let Some((w, b)) = &self.head {
            dict.insert(format!("{HEAD}weight"), w.clone());
            dict.insert(format!("{HEAD}bias"), b.clone());
        }
        dict
    }

    /// Writes the model as safetensors, atomically.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let fail = |problem: Problem| CheckpointError::new(path, problem);
        let mut floats = StateDict::new();
        let mut ints: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (b, conv) in self.spec.blocks().iter().zip(&self.convs) {
            let p = prefix(b);
            let shape = vec![b.out_channels, b.in_channels / b.groups, 3, 3];
            if let Some(w) = &conv.float_weight {
                floats.insert(format!("{p}{REPARAM}weight"), Tensor::new(shape, w.clone()));
            } else {
                ints.push((
                    format!("{p}{REPARAM}weight"),
                    shape,
                    conv.weight.iter().map(|&q| q as u8).collect(),
                ));
                floats.insert(
                    format!("{p}{REPARAM}{WEIGHT_SCALE}"),
                    Tensor::new(vec![b.out_channels], conv.weight_scale.clone()),
                );
            }
            floats.insert(
                format!("{p}{REPARAM}bias"),
                Tensor::new(vec![b.out_channels], conv.bias.clone()),
            );
        }
        if let Some((w, b)) = &self.head {
            floats.insert(format!("{HEAD}weight"), w.clone());
            floats.insert(format!("{HEAD}bias"), b.clone());
        }
        let mut views = Vec::new();
        for (key, t) in &floats {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice(&t.data),
            )
            .map_err(|e| {
                fail(
                    Problem::new(CheckpointErrorKind::ShapeMismatch, format!("{key}: {e}"))
                        .about(key),
                )
            })?;
            views.push((key.clone(), view));
        }
        for (key, shape, bytes) in &ints {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::I8, shape.clone(), bytes)
                    .map_err(|e| {
                        fail(
                            Problem::new(CheckpointErrorKind::ShapeMismatch, format!("{key}: {e}"))
                                .about(key),
                        )
                    })?;
            views.push((key.clone(), view));
        }
        let mut meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("repvgg.form".to_string(), "deploy".to_string()),
            ("repvgg.naming".to_string(), "official".to_string()),
            ("repvgg.dtype".to_string(), "int8".to_string()),
            (
                "repvgg.arch".to_string(),
                serde_json::to_string(&self.spec).expect("spec serialises"),
            ),
            (
                QUANTIZATION_KEY.to_string(),
                serde_json::to_string(&self.info).expect("info serialises"),
            ),
        ]);
        if let Some(p) = &self.preprocessing {
            meta.insert(
                metadata::PREPROCESSING_KEY.to_string(),
                serde_json::to_string(p).expect("serialises"),
            );
        }
        if let Some(l) = &self.labels {
            meta.insert(
                metadata::LABELS_KEY.to_string(),
                serde_json::to_string(l).expect("serialises"),
            );
        }
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| {
            fail(Problem::new(
                CheckpointErrorKind::InvalidArgument,
                format!("cannot serialise: {e}"),
            ))
        })?;
        crate::write_atomically(path, &bytes)
    }

    /// Reads an INT8 file; an error names the file and what is missing or wrong.
    pub fn load(path: &Path) -> Result<QuantizedModel, CheckpointError> {
        let fail = |problem: Problem| CheckpointError::new(path, problem);
        let bytes = std::fs::read(path).map_err(|e| fail(Problem::io("cannot read", &e)))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            fail(Problem::corrupt(format!(
                "not a valid safetensors file ({e})"
            )))
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            fail(Problem::corrupt(format!(
                "unreadable safetensors header ({e})"
            )))
        })?;
        let meta = header.metadata().clone().unwrap_or_default();
        from_parts(&st, &meta).map_err(fail)
    }
}

/// Whether a safetensors header's metadata marks an INT8 file.
pub fn is_quantized(metadata: Option<&HashMap<String, String>>) -> bool {
    metadata.is_some_and(|m| m.contains_key(QUANTIZATION_KEY))
}

/// The most input channels per group an INT8 block may take. The engine's sums are i32: a
/// bias (clamped within 2^30), the zero-point correction and the products (at most 255 x 127
/// each, nine a channel) must stay inside it. The widest published layer takes 768.
pub const MAX_INT8_INPUT_CHANNELS_PER_GROUP: usize =
    (i32::MAX as usize - (1 << 30)) / (2 * 255 * 127 * 9);

/// Whether every block but `float_blocks` fits INT8's sums: callers check it before minutes of
/// calibration.
pub fn check_int8_widths(spec: &ArchSpec, float_blocks: &[usize]) -> Result<(), Problem> {
    for (i, block) in spec.blocks().iter().enumerate() {
        if !float_blocks.contains(&i) {
            fits_i32_sums(block)?;
        }
    }
    Ok(())
}

fn fits_i32_sums(block: &repvgg_arch::BlockSpec) -> Result<(), Problem> {
    let per_group = block.in_channels / block.groups;
    if per_group > MAX_INT8_INPUT_CHANNELS_PER_GROUP {
        return Err(Problem::new(
            CheckpointErrorKind::Unsupported,
            format!(
                "block {} takes {per_group} input channels per group; INT8's 32-bit sums hold \
                 at most {MAX_INT8_INPUT_CHANNELS_PER_GROUP} (keep it in float)",
                block.name()
            ),
        ));
    }
    Ok(())
}

/// Builds the model from a parsed file.
pub(crate) fn from_parts(
    st: &safetensors::SafeTensors<'_>,
    meta: &HashMap<String, String>,
) -> Result<QuantizedModel, Problem> {
    let get = |key: &str| {
        meta.get(key).ok_or_else(|| {
            Problem::new(
                CheckpointErrorKind::BadMetadata,
                format!("not an INT8 model file: no '{key}' in its metadata"),
            )
        })
    };
    let info: QuantizationInfo = serde_json::from_str(get(QUANTIZATION_KEY)?).map_err(|e| {
        Problem::new(
            CheckpointErrorKind::BadMetadata,
            format!("unreadable quantization metadata: {e}"),
        )
    })?;
    let spec: ArchSpec = serde_json::from_str(get("repvgg.arch")?).map_err(|e| {
        Problem::new(
            CheckpointErrorKind::BadMetadata,
            format!("unreadable architecture in the metadata: {e}"),
        )
    })?;
    spec.validate().map_err(|e| {
        Problem::new(
            CheckpointErrorKind::BadMetadata,
            format!("the metadata's architecture is impossible: {e}"),
        )
    })?;
    if spec.se {
        return Err(Problem::new(
            CheckpointErrorKind::Unsupported,
            "an INT8 model with SE blocks: not something this version writes or runs",
        ));
    }
    let blocks = spec.blocks();
    let names: Vec<String> = blocks.iter().map(|b| b.name()).collect();
    if let Some(other) = info
        .float_layers
        .iter()
        .find(|l| l.as_str() != "linear" && !names.contains(l))
    {
        return Err(Problem::new(
            CheckpointErrorKind::BadMetadata,
            format!(
                "the metadata keeps layer '{other}' in float, which is neither a block nor the head"
            ),
        ));
    }
    let float_blocks: Vec<usize> = (0..blocks.len())
        .filter(|&i| info.float_layers.contains(&names[i]))
        .collect();
    check_int8_widths(&spec, &float_blocks)?;
    if info.activations.len() != blocks.len() + 1 {
        return Err(Problem::new(
            CheckpointErrorKind::BadMetadata,
            format!(
                "the quantization metadata has {} activation scales for {} blocks (needs {})",
                info.activations.len(),
                blocks.len(),
                blocks.len() + 1
            ),
        ));
    }
    if let Some(bad) = info
        .activations
        .iter()
        .position(|a| !(a.scale.is_finite() && a.scale > 0.0))
    {
        return Err(Problem::new(
            CheckpointErrorKind::BadMetadata,
            format!(
                "activation scale {bad} is {}; scales must be positive",
                info.activations[bad].scale
            ),
        ));
    }
    let tensor = |key: &str, dtype: safetensors::Dtype, shape: &[usize]| {
        let view = st.tensor(key).map_err(|_| {
            Problem::new(
                CheckpointErrorKind::MissingKey,
                format!("missing tensor '{key}'"),
            )
            .about(key)
        })?;
        if view.dtype() != dtype || view.shape() != shape {
            return Err(Problem::new(
                CheckpointErrorKind::ShapeMismatch,
                format!(
                    "'{key}' is {:?} {:?}; expected {dtype:?} {shape:?}",
                    view.dtype(),
                    view.shape()
                ),
            )
            .about(key));
        }
        Ok(view.data().to_vec())
    };
    let floats = |bytes: Vec<u8>| -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    use safetensors::Dtype;
    let mut convs = Vec::with_capacity(blocks.len());
    for b in &blocks {
        let p = prefix(b);
        let shape = [b.out_channels, b.in_channels / b.groups, 3, 3];
        if info.float_layers.contains(&b.name()) {
            let weight = floats(tensor(&format!("{p}{REPARAM}weight"), Dtype::F32, &shape)?);
            let bias = floats(tensor(
                &format!("{p}{REPARAM}bias"),
                Dtype::F32,
                &[b.out_channels],
            )?);
            if weight.iter().chain(&bias).any(|v| !v.is_finite()) {
                return Err(Problem::new(
                    CheckpointErrorKind::BadValue,
                    format!("'{p}{REPARAM}' holds NaN or infinite values"),
                ));
            }
            convs.push(QuantizedConv {
                weight: Vec::new(),
                weight_scale: Vec::new(),
                bias,
                float_weight: Some(weight),
            });
            continue;
        }
        let weight = tensor(&format!("{p}{REPARAM}weight"), Dtype::I8, &shape)?
            .into_iter()
            .map(|v| v as i8)
            .collect();
        let weight_scale = floats(tensor(
            &format!("{p}{REPARAM}{WEIGHT_SCALE}"),
            Dtype::F32,
            &[b.out_channels],
        )?);
        if weight_scale.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Problem::new(
                CheckpointErrorKind::BadValue,
                format!("'{p}{REPARAM}{WEIGHT_SCALE}' holds a scale that is not positive"),
            ));
        }
        let bias = floats(tensor(
            &format!("{p}{REPARAM}bias"),
            Dtype::F32,
            &[b.out_channels],
        )?);
        if bias.iter().any(|v| !v.is_finite()) {
            return Err(Problem::new(
                CheckpointErrorKind::BadValue,
                format!("'{p}{REPARAM}bias' holds NaN or infinite values"),
            ));
        }
        convs.push(QuantizedConv {
            weight,
            weight_scale,
            bias,
            float_weight: None,
        });
    }
    let head = if spec.num_classes > 0 {
        let features = spec.feature_width();
        let w = floats(tensor(
            &format!("{HEAD}weight"),
            Dtype::F32,
            &[spec.num_classes, features],
        )?);
        let b = floats(tensor(
            &format!("{HEAD}bias"),
            Dtype::F32,
            &[spec.num_classes],
        )?);
        Some((
            Tensor::new(vec![spec.num_classes, features], w),
            Tensor::new(vec![spec.num_classes], b),
        ))
    } else {
        None
    };
    let preprocessing = meta
        .get(metadata::PREPROCESSING_KEY)
        .map(|j| serde_json::from_str(j))
        .transpose()
        .map_err(|e| {
            Problem::new(
                CheckpointErrorKind::BadMetadata,
                format!("unreadable preprocessing in the metadata: {e}"),
            )
        })?;
    let labels: Option<Vec<String>> = meta
        .get(metadata::LABELS_KEY)
        .map(|j| serde_json::from_str(j))
        .transpose()
        .map_err(|e| {
            Problem::new(
                CheckpointErrorKind::BadMetadata,
                format!("unreadable class names in the metadata: {e}"),
            )
        })?;
    if let Some(p) = &preprocessing {
        Preprocessing::validate(p).map_err(|e| {
            e.within("bad preprocessing in the metadata")
                .about(metadata::PREPROCESSING_KEY)
        })?;
    }
    if let Some(labels) = &labels {
        metadata::validate_labels(labels, spec.num_classes).map_err(|e| {
            e.within("the metadata's class names do not fit")
                .about(metadata::LABELS_KEY)
        })?;
    }
    Ok(QuantizedModel {
        spec,
        info,
        convs,
        head,
        preprocessing,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::{ActivationQuant, weight_limit};

    /// Symmetric `bits`-bit weights: 8 bits reach 127, 7 bits 63 (inside the AVX2 kernels'
    /// [-64, 64]).
    #[test]
    fn weight_limits_by_bits() {
        assert_eq!(weight_limit(8), 127);
        assert_eq!(weight_limit(7), 63);
        assert_eq!(weight_limit(2), 1);
    }

    /// The 2^23 trick rounds exactly as `round_ties_even` does, ties included, across the
    /// whole u8 range and past it (clamped).
    #[test]
    fn quantize_rounds_ties_to_even() {
        let q = ActivationQuant {
            scale: 1.0,
            zero_point: 0,
        };
        for i in -40..=1100 {
            let x = i as f32 * 0.25;
            let expected = x.round_ties_even().clamp(0.0, 255.0) as u8;
            assert_eq!(q.quantize(x), expected, "{x}");
        }
        assert_eq!(q.quantize(2.5), 2);
        assert_eq!(q.quantize(3.5), 4);
        assert_eq!(q.quantize(f32::NAN), 0, "NaN");
    }
}
