//! Which tensors a network has (official naming), and the architecture read back from them.

use std::collections::{BTreeMap, BTreeSet};

use repvgg_arch::{ArchSpec, BlockSpec, Form, VARIANT_NAMES};

use crate::error::{CheckpointErrorKind, Problem};
use crate::naming::{BlockId, Naming};
use crate::tensor::StateDict;

pub const DENSE_CONV: &str = "rbr_dense.conv.";
pub const DENSE_BN: &str = "rbr_dense.bn.";
pub const ONE_CONV: &str = "rbr_1x1.conv.";
pub const ONE_BN: &str = "rbr_1x1.bn.";
pub const IDENTITY_BN: &str = "rbr_identity.";
/// QARepVGG's bias-free 1x1 convolution (no BN).
pub const QA_ONE_CONV: &str = "rbr_1x1.";
/// QARepVGG's BN after the branches' sum.
pub const QA_POST_BN: &str = "bn.";
pub const REPARAM: &str = "rbr_reparam.";
pub const SE_DOWN: &str = "se.down.";
pub const SE_UP: &str = "se.up.";
pub const HEAD: &str = "linear.";
pub const BN_FIELDS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

pub fn block_id(block: &BlockSpec) -> BlockId {
    BlockId {
        stage: block.stage,
        index: block.index,
    }
}

/// `stage1.0.` for a block.
pub fn prefix(block: &BlockSpec) -> String {
    Naming::Official.block_prefix(block_id(block))
}

/// Every tensor of the network in the given form, with its shape, in official naming.
pub fn expected_tensors(spec: &ArchSpec, form: Form) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for block in spec.blocks() {
        let p = prefix(&block);
        let (o, i) = (block.out_channels, block.in_channels / block.groups);
        let mut bn = |part: &str, c: usize| {
            for field in BN_FIELDS {
                out.push((format!("{p}{part}{field}"), vec![c]));
            }
        };
        match form {
            Form::Train if block.qa => {
                bn(DENSE_BN, o);
                bn(QA_POST_BN, o);
                out.push((format!("{p}{DENSE_CONV}weight"), vec![o, i, 3, 3]));
                out.push((format!("{p}{QA_ONE_CONV}weight"), vec![o, i, 1, 1]));
            }
            Form::Train => {
                bn(DENSE_BN, o);
                bn(ONE_BN, o);
                if block.has_identity {
                    bn(IDENTITY_BN, block.in_channels);
                }
                out.push((format!("{p}{DENSE_CONV}weight"), vec![o, i, 3, 3]));
                out.push((format!("{p}{ONE_CONV}weight"), vec![o, i, 1, 1]));
            }
            Form::Deploy => {
                // QARepVGG with SE: the post-sum BN follows the SE gate, so it stays.
                if block.qa && block.se_channels.is_some() {
                    bn(QA_POST_BN, o);
                }
                out.push((format!("{p}{REPARAM}weight"), vec![o, i, 3, 3]));
                out.push((format!("{p}{REPARAM}bias"), vec![o]));
            }
        }
        if let Some(s) = block.se_channels {
            out.push((format!("{p}{SE_DOWN}weight"), vec![s, o, 1, 1]));
            out.push((format!("{p}{SE_DOWN}bias"), vec![s]));
            out.push((format!("{p}{SE_UP}weight"), vec![o, s, 1, 1]));
            out.push((format!("{p}{SE_UP}bias"), vec![o]));
        }
    }
    if spec.num_classes > 0 {
        out.push((
            format!("{HEAD}weight"),
            vec![spec.num_classes, spec.feature_width()],
        ));
        out.push((format!("{HEAD}bias"), vec![spec.num_classes]));
    }
    out
}

/// Every difference between a state dict (official naming) and what `spec` needs: missing
/// keys, unexpected keys and wrong shapes, one line each, keys spelled in `naming` (the file's).
pub fn mismatches(tensors: &StateDict, spec: &ArchSpec, form: Form, naming: Naming) -> Vec<String> {
    let expected = expected_tensors(spec, form);
    let mut problems = Vec::new();
    let spell = |key: &str| {
        Naming::Official
            .rename_key(key, naming)
            .unwrap_or_else(|| key.to_string())
    };
    let known: BTreeSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    for (key, shape) in &expected {
        match tensors.get(key) {
            None => problems.push(format!(
                "missing key '{}' (expected shape {shape:?})",
                spell(key)
            )),
            Some(t) if &t.shape != shape => problems.push(format!(
                "'{}' has shape {:?}, expected {shape:?}",
                spell(key),
                t.shape
            )),
            Some(_) => {}
        }
    }
    for key in tensors.keys().filter(|k| !known.contains(k.as_str())) {
        problems.push(format!("unexpected key '{}'", spell(key)));
    }
    problems
}

/// Detects the form from the keys.
pub fn detect_form(tensors: &StateDict) -> Result<Form, Problem> {
    let has = |part: &str| tensors.keys().any(|k| k.contains(&format!(".{part}")));
    match (has(REPARAM), has(DENSE_CONV) || has(DENSE_BN)) {
        (true, false) => Ok(Form::Deploy),
        (false, true) => Ok(Form::Train),
        (true, true) => Err(Problem::new(
            CheckpointErrorKind::ArchMismatch,
            "mixes training-form (rbr_dense) and deploy-form (rbr_reparam) blocks",
        )),
        (false, false) => Err(Problem::new(
            CheckpointErrorKind::ArchMismatch,
            "has neither training-form nor deploy-form block weights",
        )),
    }
}

/// Reads the architecture back from tensor shapes. Tolerates missing tensors where another
/// one tells the same thing, so that [`mismatches`] can then name what is missing.
pub fn infer_spec(tensors: &StateDict, form: Form) -> Result<ArchSpec, Problem> {
    let mut blocks: BTreeMap<BlockId, ()> = BTreeMap::new();
    for key in tensors.keys() {
        if let Some((id, _)) = Naming::Official.parse_block(key) {
            blocks.insert(id, ());
        }
    }
    let mut depths = [0usize; 4];
    for id in blocks.keys().filter(|id| id.stage > 0) {
        depths[id.stage - 1] = depths[id.stage - 1].max(id.index.saturating_add(1));
    }
    if !blocks.contains_key(&BlockId { stage: 0, index: 0 }) {
        return Err(Problem::new(
            CheckpointErrorKind::ArchMismatch,
            "has no stage 0 (stem) weights",
        ));
    }
    if let Some(stage) = depths.iter().position(|&d| d == 0) {
        return Err(Problem::new(
            CheckpointErrorKind::ArchMismatch,
            format!("has no weights for stage {}", stage + 1),
        ));
    }
    let shape_of = |id: BlockId, parts: &[&str]| {
        parts.iter().find_map(|part| {
            let key = format!("{}{part}", Naming::Official.block_prefix(id));
            tensors.get(&key).map(|t| t.shape.clone())
        })
    };
    let kernel_parts: &[&str] = match form {
        Form::Train => &[
            "rbr_dense.conv.weight",
            "rbr_1x1.conv.weight",
            "rbr_1x1.weight",
        ],
        Form::Deploy => &["rbr_reparam.weight"],
    };
    let width_parts: &[&str] = match form {
        Form::Train => &[
            "rbr_dense.conv.weight",
            "rbr_dense.bn.weight",
            "rbr_1x1.conv.weight",
            "rbr_1x1.bn.weight",
            "rbr_1x1.weight",
            "bn.weight",
        ],
        Form::Deploy => &["rbr_reparam.weight", "rbr_reparam.bias"],
    };

    let mut widths_seen = Vec::new();
    let mut groups = BTreeMap::new();
    let mut in_channels = None;
    let mut previous_width = None;
    let mut layer = 0;
    for stage in 0..=4 {
        let count = if stage == 0 { 1 } else { depths[stage - 1] };
        for index in 0..count {
            let id = BlockId { stage, index };
            let name = Naming::Official.block_prefix(id);
            let width = shape_of(id, width_parts)
                .and_then(|s| s.first().copied())
                .ok_or_else(|| {
                    Problem::new(
                        CheckpointErrorKind::ArchMismatch,
                        format!(
                            "cannot tell the width of block {}",
                            name.trim_end_matches('.')
                        ),
                    )
                })?;
            if let Some(kernel) = shape_of(id, kernel_parts) {
                if kernel.len() != 4 || kernel[1] == 0 {
                    return Err(Problem::new(
                        CheckpointErrorKind::ArchMismatch,
                        format!("{name}: kernel has shape {kernel:?}"),
                    ));
                }
                match previous_width {
                    None => in_channels = Some(kernel[1]),
                    Some(prev) if prev % kernel[1] == 0 => {
                        if prev / kernel[1] > 1 {
                            groups.insert(layer, prev / kernel[1]);
                        }
                    }
                    Some(prev) => {
                        return Err(Problem::new(
                            CheckpointErrorKind::ArchMismatch,
                            format!(
                                "{name}: kernel takes {} input channels per group, but the previous block gives {prev}",
                                kernel[1]
                            ),
                        ));
                    }
                }
            }
            widths_seen.push(width);
            previous_width = Some(width);
            layer += 1;
        }
    }
    let stage_width = |stage: usize| {
        let first: usize = 1 + depths[..stage - 1].iter().sum::<usize>();
        widths_seen[first]
    };
    let head = tensors
        .get("linear.weight")
        .or_else(|| tensors.get("linear.bias"));
    // No classifier: a headless backbone (0 classes).
    let num_classes = head.and_then(|t| t.shape.first().copied()).unwrap_or(0);
    let mut spec = ArchSpec {
        name: "custom".into(),
        stem_width: widths_seen[0],
        depths,
        widths: [
            stage_width(1),
            stage_width(2),
            stage_width(3),
            stage_width(4),
        ],
        groups,
        se: tensors.keys().any(|k| k.contains(".se.")),
        // QARepVGG: a bias-free 1x1 without BN (`rbr_1x1.weight`), and a BN after the sum.
        // (Deployed, only a QARepVGG with SE keeps its block-level BN, after the gate.)
        qa: tensors.keys().any(|k| {
            k.ends_with(&format!(".{QA_ONE_CONV}weight"))
                || Naming::Official
                    .parse_block(k)
                    .is_some_and(|(_, rest)| rest.starts_with(QA_POST_BN))
        }),
        num_classes,
        in_channels: in_channels.ok_or_else(|| {
            Problem::new(
                CheckpointErrorKind::ArchMismatch,
                "cannot tell the input channels of stage 0",
            )
        })?,
        strides: [2; 5],
        dilations: [1; 5],
    };
    spec.name = variant_name(&spec).unwrap_or_else(|| "custom".into());
    spec.validate().map_err(|e| {
        Problem::new(
            CheckpointErrorKind::ArchMismatch,
            format!("describes an impossible network: {e}"),
        )
    })?;
    Ok(spec)
}

/// The published variant with this layout (any number of classes), if there is one.
pub fn variant_name(spec: &ArchSpec) -> Option<String> {
    VARIANT_NAMES.iter().find_map(|name| {
        let mut named = ArchSpec::named(name).ok()?;
        named.num_classes = spec.num_classes;
        named.name = spec.name.clone();
        (named == *spec).then(|| ArchSpec::named(name).unwrap().name)
    })
}
