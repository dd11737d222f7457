//! ONNX export of RepVGG's deploy form: the plain graph the conversion produces.
//!
//! Graph (opset 11 and later):
//! - input `input`: float32 `(N, 3, H, W)`, N fixed or the symbolic `batch`;
//! - per block: `Conv` (3x3, pads 1, stride 1 or 2, groups) with the fused bias; for SE models
//!   `GlobalAveragePool -> Conv 1x1 -> Relu -> Conv 1x1 -> Sigmoid -> Mul`; then `Relu`;
//! - head: `GlobalAveragePool -> Flatten -> Gemm(transB = 1)`;
//! - output `logits`: float32 `(N, classes)` (a headless model, 0 classes: `pooled`,
//!   `(N, channels)`). Dilated stages export as `Conv` with `dilations` and matching pads.
//!
//! Weights are initializers under their official names (`stage1.0.rbr_reparam.weight`, ...).
//!
//! ```no_run
//! use repvgg_checkpoint::Checkpoint;
//! use repvgg_onnx::{ExportOptions, export};
//!
//! let ckpt = Checkpoint::load("RepVGG-A0-train.pth".as_ref(), None)?;
//! let options = ExportOptions { dynamic_batch: true, ..ExportOptions::default() };
//! std::fs::write("repvgg-a0.onnx", export(&ckpt, 1e-5, options)?)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod proto;

use prost::Message;
use repvgg_arch::Form;
use repvgg_checkpoint::Checkpoint;
use repvgg_checkpoint::layout::{self, HEAD, REPARAM, SE_DOWN, SE_UP};

use proto::*;

/// What the exported graph accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportOptions {
    pub opset: i64,
    /// A symbolic batch dimension (`batch`) instead of a fixed one.
    pub dynamic_batch: bool,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            opset: 17,
            dynamic_batch: false,
            batch: 1,
            height: 224,
            width: 224,
        }
    }
}

/// The oldest and newest opsets this exporter writes (every op it uses is unchanged over them).
pub const OPSETS: std::ops::RangeInclusive<i64> = 11..=21;

/// The IR version each opset shipped with (ONNX's versioning table).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=11 => 6,
        12..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: value,
        r#type: ATTRIBUTE_INT,
        ..Default::default()
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: values.to_vec(),
        r#type: ATTRIBUTE_INTS,
        ..Default::default()
    }
}

fn tensor_value(name: &str, dims: &[Dimension], doc: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: DATA_TYPE_FLOAT,
                shape: Some(TensorShapeProto { dim: dims.to_vec() }),
            }),
        }),
        doc_string: doc.into(),
    }
}

fn fixed(n: usize) -> Dimension {
    Dimension {
        value: Some(DimensionValue::DimValue(n as i64)),
    }
}

struct Builder<'a> {
    ckpt: &'a Checkpoint,
    graph: GraphProto,
}

impl Builder<'_> {
    fn node(
        &mut self,
        op: &str,
        name: String,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> String {
        let output = name.clone();
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            name,
            op_type: op.into(),
            attribute: attributes,
        });
        output
    }

    /// Adds the checkpoint tensor `key` as an initializer; returns its name.
    fn weight(&mut self, key: &str) -> String {
        let t = &self.ckpt.tensors[key];
        self.graph.initializer.push(TensorProto {
            dims: t.shape.iter().map(|&d| d as i64).collect(),
            data_type: DATA_TYPE_FLOAT,
            name: key.into(),
            raw_data: t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        key.into()
    }

    fn conv(
        &mut self,
        name: String,
        x: &str,
        prefix: &str,
        (stride, dilation, groups): (usize, usize, usize),
    ) -> String {
        let w = self.weight(&format!("{prefix}weight"));
        let b = self.weight(&format!("{prefix}bias"));
        let k = self.ckpt.tensors[&w].shape[2] as i64;
        let (d, pad) = (dilation as i64, dilation as i64 * (k / 2));
        self.node(
            "Conv",
            name,
            &[x, &w, &b],
            vec![
                ints("kernel_shape", &[k, k]),
                ints("pads", &[pad, pad, pad, pad]),
                ints("strides", &[stride as i64, stride as i64]),
                ints("dilations", &[d, d]),
                int("group", groups as i64),
            ],
        )
    }
}

/// Why a model cannot be exported as asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// An opset outside the range the graph is written for.
    #[error("opset {opset} is not supported ({reason})")]
    Opset { opset: i64, reason: String },
    /// The weights could not be converted to the deploy form.
    #[error(transparent)]
    Checkpoint(#[from] repvgg_checkpoint::CheckpointError),
}

/// The ONNX model bytes of a checkpoint's deploy form (training-form checkpoints are converted
/// with `bn_eps` first).
pub fn export(
    ckpt: &Checkpoint,
    bn_eps: f64,
    options: ExportOptions,
) -> Result<Vec<u8>, ExportError> {
    if !OPSETS.contains(&options.opset) {
        return Err(ExportError::Opset {
            opset: options.opset,
            reason: format!("use {} to {}", OPSETS.start(), OPSETS.end()),
        });
    }
    let deploy = ckpt.as_deploy(bn_eps)?;
    debug_assert_eq!(deploy.form, Form::Deploy);
    let spec = &deploy.spec;
    let mut b = Builder {
        ckpt: &deploy,
        graph: GraphProto {
            name: spec.name.clone(),
            doc_string: "RepVGG deploy form exported by repvgg-rs".into(),
            ..Default::default()
        },
    };
    let batch = if options.dynamic_batch {
        Dimension {
            value: Some(DimensionValue::DimParam("batch".into())),
        }
    } else {
        fixed(options.batch)
    };
    b.graph.input.push(tensor_value(
        "input",
        &[
            batch.clone(),
            fixed(spec.in_channels),
            fixed(options.height),
            fixed(options.width),
        ],
        "images, NCHW float32, normalised with the ImageNet mean/std",
    ));
    let mut x = "input".to_string();
    for block in spec.blocks() {
        let p = layout::prefix(&block);
        let name = block.name();
        let mut y = b.conv(
            format!("{name}.conv"),
            &x,
            &format!("{p}{REPARAM}"),
            (block.stride, block.dilation, block.groups),
        );
        if block.se_channels.is_some() {
            let pooled = b.node(
                "GlobalAveragePool",
                format!("{name}.se.pool"),
                &[&y],
                vec![],
            );
            let down = b.conv(
                format!("{name}.se.down"),
                &pooled,
                &format!("{p}{SE_DOWN}"),
                (1, 1, 1),
            );
            let act = b.node("Relu", format!("{name}.se.relu"), &[&down], vec![]);
            let up = b.conv(
                format!("{name}.se.up"),
                &act,
                &format!("{p}{SE_UP}"),
                (1, 1, 1),
            );
            let gate = b.node("Sigmoid", format!("{name}.se.gate"), &[&up], vec![]);
            y = b.node("Mul", format!("{name}.se.scale"), &[&y, &gate], vec![]);
            if block.qa {
                // QARepVGG with SE: its post-sum BN follows the gate.
                let bn = |b: &mut Builder, field: &str| b.weight(&format!("{p}bn.{field}"));
                let inputs =
                    ["weight", "bias", "running_mean", "running_var"].map(|f| bn(&mut b, f));
                y = b.node(
                    "BatchNormalization",
                    format!("{name}.post_bn"),
                    &[&y, &inputs[0], &inputs[1], &inputs[2], &inputs[3]],
                    vec![AttributeProto {
                        name: "epsilon".into(),
                        f: bn_eps as f32,
                        r#type: ATTRIBUTE_FLOAT,
                        ..Default::default()
                    }],
                );
            }
        }
        x = b.node("Relu", format!("{name}.relu"), &[&y], vec![]);
    }
    let pooled = b.node("GlobalAveragePool", "gap".into(), &[&x], vec![]);
    if spec.num_classes == 0 {
        // A headless backbone ends with its pooled features.
        b.node("Flatten", "pooled".into(), &[&pooled], vec![int("axis", 1)]);
        b.graph.output.push(tensor_value(
            "pooled",
            &[batch, fixed(spec.feature_width())],
            "globally pooled features",
        ));
    } else {
        let flat = b.node(
            "Flatten",
            "flatten".into(),
            &[&pooled],
            vec![int("axis", 1)],
        );
        let w = b.weight(&format!("{HEAD}weight"));
        let bias = b.weight(&format!("{HEAD}bias"));
        b.node(
            "Gemm",
            "logits".into(),
            &[&flat, &w, &bias],
            vec![int("transB", 1)],
        );
        b.graph.output.push(tensor_value(
            "logits",
            &[batch, fixed(spec.num_classes)],
            "class scores before softmax",
        ));
    }
    let model = ModelProto {
        ir_version: ir_version(options.opset),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: options.opset,
        }],
        producer_name: "repvgg-rs".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: String::new(),
        graph: Some(b.graph),
        // How to feed the model and what its outputs mean travel with the graph too, under
        // the weights file's own keys, for whoever serves it.
        metadata_props: [
            (
                repvgg_checkpoint::metadata::PREPROCESSING_KEY,
                ckpt.preprocessing
                    .as_ref()
                    .map(|p| serde_json::to_string(p).expect("serialises")),
            ),
            (
                repvgg_checkpoint::metadata::LABELS_KEY,
                ckpt.labels
                    .as_ref()
                    .map(|l| serde_json::to_string(l).expect("serialises")),
            ),
        ]
        .into_iter()
        .filter_map(|(key, value)| {
            value.map(|value| StringStringEntryProto {
                key: key.to_string(),
                value,
            })
        })
        .collect(),
    };
    Ok(model.encode_to_vec())
}

/// The ONNX model bytes of an INT8 model as a QDQ graph: every activation entering a block
/// (and the last block's output) passes QuantizeLinear / DequantizeLinear with its u8 scale
/// and zero point; each kernel is an INT8 initializer behind a per-channel DequantizeLinear,
/// each bias an INT32 one in the units of the sums (input scale x weight scale), as the INT8
/// engine rounds it; the pool and head stay float. ONNX Runtime fuses the pattern into
/// QLinearConv. Per-channel DequantizeLinear needs opset 13 or later.
pub fn export_qdq(
    model: &repvgg_checkpoint::quantized::QuantizedModel,
    options: ExportOptions,
) -> Result<Vec<u8>, ExportError> {
    if !(13..=*OPSETS.end()).contains(&options.opset) {
        return Err(ExportError::Opset {
            opset: options.opset,
            reason: format!(
                "an INT8 (QDQ) graph needs per-channel DequantizeLinear, opset 13 to {}",
                OPSETS.end()
            ),
        });
    }
    let spec = &model.spec;
    let acts = &model.info.activations;
    let mut graph = GraphProto {
        name: spec.name.clone(),
        doc_string: "RepVGG INT8 deploy form (QDQ) exported by repvgg-rs".into(),
        ..Default::default()
    };
    let init = |graph: &mut GraphProto, name: String, dims: &[usize], data_type, raw: Vec<u8>| {
        graph.initializer.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            name: name.clone(),
            raw_data: raw,
        });
        name
    };
    let floats = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let node = |graph: &mut GraphProto, op: &str, name: String, inputs: &[&str], attrs| {
        graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.clone()],
            name: name.clone(),
            op_type: op.into(),
            attribute: attrs,
        });
        name
    };
    let batch = if options.dynamic_batch {
        Dimension {
            value: Some(DimensionValue::DimParam("batch".into())),
        }
    } else {
        fixed(options.batch)
    };
    graph.input.push(tensor_value(
        "input",
        &[
            batch.clone(),
            fixed(spec.in_channels),
            fixed(options.height),
            fixed(options.width),
        ],
        "images, NCHW float32, preprocessed as the model records",
    ));
    // Q then DQ of a float activation with quantization `i`.
    let qdq = |graph: &mut GraphProto, x: &str, i: usize, name: &str| -> String {
        let q = acts[i];
        let scale = init(
            graph,
            format!("{name}.scale"),
            &[],
            DATA_TYPE_FLOAT,
            floats(&[q.scale]),
        );
        let zero = init(
            graph,
            format!("{name}.zero_point"),
            &[],
            DATA_TYPE_UINT8,
            vec![q.zero_point],
        );
        let quantized = node(
            graph,
            "QuantizeLinear",
            format!("{name}.q"),
            &[x, &scale, &zero],
            vec![],
        );
        node(
            graph,
            "DequantizeLinear",
            format!("{name}.dq"),
            &[&quantized, &scale, &zero],
            vec![],
        )
    };
    let mut x = "input".to_string();
    let is_int8 = |i: usize| model.convs[i].float_weight.is_none();
    for (i, (block, conv)) in spec.blocks().iter().zip(&model.convs).enumerate() {
        let name = block.name();
        // The INT8 engine quantizes a block's input when the block is INT8 or the one before
        // it was (a float block then reads its u8 output back); between float blocks, and
        // into a float first block, activations stay float.
        let x_dq = if is_int8(i) || (i > 0 && is_int8(i - 1)) {
            qdq(&mut graph, &x, i, &format!("{name}.input"))
        } else {
            x.clone()
        };
        let cout = block.out_channels;
        let d = block.dilation as i64;
        let conv_attributes = vec![
            ints("kernel_shape", &[3, 3]),
            ints("pads", &[d, d, d, d]),
            ints("strides", &[block.stride as i64, block.stride as i64]),
            ints("dilations", &[d, d]),
            int("group", block.groups as i64),
        ];
        if let Some(weight) = &conv.float_weight {
            let w_shape = [cout, block.in_channels / block.groups, 3, 3];
            let w = init(
                &mut graph,
                format!("{name}.weight"),
                &w_shape,
                DATA_TYPE_FLOAT,
                floats(weight),
            );
            let b = init(
                &mut graph,
                format!("{name}.bias"),
                &[cout],
                DATA_TYPE_FLOAT,
                floats(&conv.bias),
            );
            let y = node(
                &mut graph,
                "Conv",
                format!("{name}.conv"),
                &[&x_dq, &w, &b],
                conv_attributes,
            );
            x = node(&mut graph, "Relu", format!("{name}.relu"), &[&y], vec![]);
            continue;
        }
        let w_shape = [cout, block.in_channels / block.groups, 3, 3];
        let wq = init(
            &mut graph,
            format!("{name}.weight_quantized"),
            &w_shape,
            DATA_TYPE_INT8,
            conv.weight.iter().map(|&v| v as u8).collect(),
        );
        let ws = init(
            &mut graph,
            format!("{name}.weight_scale"),
            &[cout],
            DATA_TYPE_FLOAT,
            floats(&conv.weight_scale),
        );
        let wz = init(
            &mut graph,
            format!("{name}.weight_zero_point"),
            &[cout],
            DATA_TYPE_INT8,
            vec![0; cout],
        );
        let w = node(
            &mut graph,
            "DequantizeLinear",
            format!("{name}.weight"),
            &[&wq, &ws, &wz],
            vec![int("axis", 0)],
        );
        let unit: Vec<f32> = conv
            .weight_scale
            .iter()
            .map(|s| acts[i].scale * s)
            .collect();
        let bias_q: Vec<i32> = conv
            .bias
            .iter()
            .zip(&unit)
            .map(|(b, u)| {
                (*b as f64 / *u as f64)
                    .round()
                    .clamp(i32::MIN as f64 / 2.0, i32::MAX as f64 / 2.0) as i32
            })
            .collect();
        let bq = init(
            &mut graph,
            format!("{name}.bias_quantized"),
            &[cout],
            DATA_TYPE_INT32,
            bias_q.iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        let bs = init(
            &mut graph,
            format!("{name}.bias_scale"),
            &[cout],
            DATA_TYPE_FLOAT,
            floats(&unit),
        );
        let bz = init(
            &mut graph,
            format!("{name}.bias_zero_point"),
            &[cout],
            DATA_TYPE_INT32,
            vec![0; 4 * cout],
        );
        let b = node(
            &mut graph,
            "DequantizeLinear",
            format!("{name}.bias"),
            &[&bq, &bs, &bz],
            vec![int("axis", 0)],
        );
        let d = block.dilation as i64;
        let y = node(
            &mut graph,
            "Conv",
            format!("{name}.conv"),
            &[&x_dq, &w, &b],
            vec![
                ints("kernel_shape", &[3, 3]),
                ints("pads", &[d, d, d, d]),
                ints("strides", &[block.stride as i64, block.stride as i64]),
                ints("dilations", &[d, d]),
                int("group", block.groups as i64),
            ],
        );
        x = node(&mut graph, "Relu", format!("{name}.relu"), &[&y], vec![]);
    }
    let last = spec.blocks().len();
    let x = if is_int8(last - 1) {
        qdq(&mut graph, &x, last, "output")
    } else {
        x
    };
    let pooled = node(&mut graph, "GlobalAveragePool", "gap".into(), &[&x], vec![]);
    match &model.head {
        None => {
            node(
                &mut graph,
                "Flatten",
                "pooled".into(),
                &[&pooled],
                vec![int("axis", 1)],
            );
            graph.output.push(tensor_value(
                "pooled",
                &[batch, fixed(spec.feature_width())],
                "globally pooled features",
            ));
        }
        Some((w, bias)) => {
            let flat = node(
                &mut graph,
                "Flatten",
                "flatten".into(),
                &[&pooled],
                vec![int("axis", 1)],
            );
            let w = init(
                &mut graph,
                format!("{HEAD}weight"),
                &w.shape,
                DATA_TYPE_FLOAT,
                floats(&w.data),
            );
            let bias = init(
                &mut graph,
                format!("{HEAD}bias"),
                &bias.shape,
                DATA_TYPE_FLOAT,
                floats(&bias.data),
            );
            node(
                &mut graph,
                "Gemm",
                "logits".into(),
                &[&flat, &w, &bias],
                vec![int("transB", 1)],
            );
            graph.output.push(tensor_value(
                "logits",
                &[batch, fixed(spec.num_classes)],
                "class scores before softmax",
            ));
        }
    }
    let metadata = |key: &str, value: String| StringStringEntryProto {
        key: key.to_string(),
        value,
    };
    let mut metadata_props = vec![metadata(
        repvgg_checkpoint::quantized::QUANTIZATION_KEY,
        serde_json::to_string(&model.info).expect("serialises"),
    )];
    if let Some(p) = &model.preprocessing {
        metadata_props.push(metadata(
            repvgg_checkpoint::metadata::PREPROCESSING_KEY,
            serde_json::to_string(p).expect("serialises"),
        ));
    }
    if let Some(l) = &model.labels {
        metadata_props.push(metadata(
            repvgg_checkpoint::metadata::LABELS_KEY,
            serde_json::to_string(l).expect("serialises"),
        ));
    }
    let model = ModelProto {
        ir_version: ir_version(options.opset),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: options.opset,
        }],
        producer_name: "repvgg-rs".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: String::new(),
        graph: Some(graph),
        metadata_props,
    };
    Ok(model.encode_to_vec())
}
