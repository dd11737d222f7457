//! RepVGG architectures as plain data.
//!
//! A network is five stages of blocks. Stage 0 is a single stride-2 block from the input
//! channels to `stem_width`; stages 1..4 have `depths[i]` blocks of width `widths[i]`, the first
//! of each with stride 2. Every block is counted by a global *layer index* (stage 0 is layer 0),
//! which is how the official code addresses grouped layers. A global average pool and a linear
//! head follow.
//!
//! Everything here is framework-free: the model forms, the checkpoint reader and the engine all
//! walk [`ArchSpec::blocks`] rather than re-deriving the layout.
//!
//! ```
//! use repvgg_arch::{ArchSpec, Form};
//!
//! let a0 = ArchSpec::parse("RepVGG-A0")?;
//! assert_eq!(a0.params(Form::Deploy), 8_309_384);
//! // Custom specs, fine-tuned heads, and dense-prediction backbones (headless, dilated).
//! let custom = ArchSpec::parse("depths=1,2,2,1;widths=16,32,64,128;stem=16;classes=10")?;
//! let backbone = ArchSpec::parse("A0;strides=2,2,2,1,1;dilations=1,1,1,2,4;classes=0")?;
//! assert_eq!(backbone.output_size(224, 224), (28, 28));
//! # Ok::<(), repvgg_arch::ArchError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The ratio of the squeeze-and-excitation bottleneck used by RepVGG-D2se (C -> C/16 -> C).
pub const SE_REDUCTION: usize = 16;

/// Which of the two equivalent forms of a network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    /// Multi-branch: 3x3 conv + BN, 1x1 conv + BN, identity BN.
    Train,
    /// Re-parameterized: one 3x3 conv with bias per block.
    Deploy,
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Form::Train => "train",
            Form::Deploy => "deploy",
        })
    }
}

/// Errors in naming or describing an architecture.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error(
        "unknown variant '{0}': expected one of {known} (or a custom spec such as \
         'depths=2,4,14,1;widths=48,96,192,1280;stem=48', or a .json spec file)",
        known = VARIANT_NAMES.join(", ")
    )]
    UnknownVariant(String),
    #[error("invalid architecture spec: {0}")]
    Invalid(String),
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
}

/// A complete description of one RepVGG network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchSpec {
    /// Display name: the variant ("RepVGG-A0") or "custom".
    #[serde(default = "custom_name")]
    pub name: String,
    /// Output channels of stage 0 (in JSON, optional: `min(64, widths[0])` as in the official code).
    #[serde(default, alias = "stem")]
    pub stem_width: usize,
    /// Blocks in stages 1..4.
    pub depths: [usize; 4],
    /// Output channels of stages 1..4.
    pub widths: [usize; 4],
    /// Groups of the 3x3 and 1x1 convolutions, by global layer index; absent layers use 1.
    #[serde(default)]
    pub groups: BTreeMap<usize, usize>,
    /// Squeeze-and-excitation before every block's ReLU (RepVGG-D2se).
    #[serde(default)]
    pub se: bool,
    /// QARepVGG blocks (Chu et al., AAAI 2023; the authors' `QARepVGGBlockV2`):
    /// `ReLU(BN(conv3x3_BN(x) + conv1x1(x) + x))`, a bias-free 1x1 without BN, an identity
    /// without BN and one BN after the sum, so that the fused kernel quantizes well. With SE,
    /// the authors' order: `ReLU(BN(SE(sum)))`, the BN kept after SE in the deploy form.
    #[serde(default)]
    pub qa: bool,
    /// Classes of the linear head; 0 makes a headless backbone (no `linear.*`; the forward pass
    /// ends with the globally pooled features).
    #[serde(default = "default_classes", alias = "classes")]
    pub num_classes: usize,
    #[serde(default = "default_in_channels", alias = "in")]
    pub in_channels: usize,
    /// Stride of the first block of stages 0..4 (2 everywhere in the paper). Dense-prediction
    /// backbones lower the last ones to 1 to keep resolution (PSPNet: 2,2,2,1,1).
    #[serde(default = "default_strides")]
    pub strides: [usize; 5],
    /// Dilation (and padding) of the 3x3 convolutions of stages 0..4; PSPNet style is
    /// 1,1,1,2,4. The 1x1 and identity branches sit on the kernel's centre tap, so the
    /// conversion is unchanged and stays exact.
    #[serde(default = "default_dilations")]
    pub dilations: [usize; 5],
}

fn default_strides() -> [usize; 5] {
    [2; 5]
}
fn default_dilations() -> [usize; 5] {
    [1; 5]
}

fn custom_name() -> String {
    "custom".to_string()
}
fn default_classes() -> usize {
    1000
}
fn default_in_channels() -> usize {
    3
}

/// One block of the network, with everything needed to build either form of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    /// 0 for the stem, 1..=4 for the stages.
    pub stage: usize,
    /// Position inside its stage.
    pub index: usize,
    /// Global layer index (stem = 0), the key of [`ArchSpec::groups`].
    pub layer: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub stride: usize,
    /// Dilation and padding of the 3x3 convolution.
    pub dilation: usize,
    pub groups: usize,
    /// Whether the training form has the identity (BN-only) branch.
    pub has_identity: bool,
    /// Bottleneck width of the SE module, if the block has one.
    pub se_channels: Option<usize>,
    /// A QARepVGG block (see [`ArchSpec::qa`]).
    pub qa: bool,
    /// Whether this block's output is its stage's output (what a backbone hands on).
    pub ends_stage: bool,
}

impl BlockSpec {
    /// The block's name in the official code's state dict (`stage0`, `stage2.3`), used as the
    /// canonical block name everywhere in this project.
    pub fn name(&self) -> String {
        if self.stage == 0 {
            "stage0".to_string()
        } else {
            format!("stage{}.{}", self.stage, self.index)
        }
    }

    /// Output height and width for an input of `h` x `w` (3x3/pad 1 and 1x1/pad 0 agree).
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        ((h - 1) / self.stride + 1, (w - 1) / self.stride + 1)
    }

    fn kernel_params(&self, k: usize) -> usize {
        self.out_channels * (self.in_channels / self.groups) * k * k
    }

    fn se_params(&self) -> usize {
        self.se_channels
            .map(|s| 2 * self.out_channels * s + s + self.out_channels)
            .unwrap_or(0)
    }

    /// Learnable parameters (BN running statistics excluded).
    pub fn params(&self, form: Form) -> usize {
        let per_branch = match form {
            Form::Deploy => self.kernel_params(3) + self.out_channels,
            // QARepVGG: the 3x3's BN and the post-sum BN; no BN on the 1x1 or the identity.
            Form::Train if self.qa => {
                self.kernel_params(3) + self.kernel_params(1) + 4 * self.out_channels
            }
            Form::Train => {
                let identity = if self.has_identity {
                    2 * self.in_channels
                } else {
                    0
                };
                self.kernel_params(3) + self.kernel_params(1) + 4 * self.out_channels + identity
            }
        };
        per_branch + self.se_params()
    }

    /// Multiply-accumulates of the block's convolutions for an `h` x `w` input.
    pub fn macs(&self, form: Form, h: usize, w: usize) -> u64 {
        let (oh, ow) = self.output_size(h, w);
        let positions = (oh * ow) as u64;
        let mut macs = positions * self.kernel_params(3) as u64;
        if form == Form::Train {
            macs += positions * self.kernel_params(1) as u64;
        }
        if let Some(s) = self.se_channels {
            macs += 2 * (self.out_channels * s) as u64;
        }
        macs
    }
}

/// Bytes a spec implies at a batch and input size ([`ArchSpec::memory_estimate`]): estimates
/// meant to say "this cannot fit" before trying, not to account for every allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The training-form weights in f32: what seeded random weights or a training-form file
    /// take.
    pub train_weights: u64,
    /// The deploy engine's weights with their packed and transformed copies.
    pub engine_weights: u64,
    /// A forward pass's feature maps and workspace.
    pub activations: u64,
    /// A training step's saved feature maps (every block's input, three branch outputs and
    /// their batch norms, the sum and the ReLU, kept for the backward pass) and as much again
    /// for gradients, plus the momentum buffers.
    pub training: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.train_weights
            .saturating_add(self.engine_weights)
            .saturating_add(self.activations)
    }
}

/// One published variant: (name, depths, a, b, groups, se).
type VariantRow = (&'static str, [usize; 4], f64, f64, usize, bool);

/// Width multipliers and depths of the named variants.
const VARIANT_TABLE: &[VariantRow] = &[
    ("A0", DEPTHS_A, 0.75, 2.5, 1, false),
    ("A1", DEPTHS_A, 1.0, 2.5, 1, false),
    ("A2", DEPTHS_A, 1.5, 2.75, 1, false),
    ("B0", DEPTHS_B, 1.0, 2.5, 1, false),
    ("B1", DEPTHS_B, 2.0, 4.0, 1, false),
    ("B1g2", DEPTHS_B, 2.0, 4.0, 2, false),
    ("B1g4", DEPTHS_B, 2.0, 4.0, 4, false),
    ("B2", DEPTHS_B, 2.5, 5.0, 1, false),
    ("B2g2", DEPTHS_B, 2.5, 5.0, 2, false),
    ("B2g4", DEPTHS_B, 2.5, 5.0, 4, false),
    ("B3", DEPTHS_B, 3.0, 5.0, 1, false),
    ("B3g2", DEPTHS_B, 3.0, 5.0, 2, false),
    ("B3g4", DEPTHS_B, 3.0, 5.0, 4, false),
    ("D2se", DEPTHS_D, 2.5, 5.0, 1, true),
];
const DEPTHS_A: [usize; 4] = [2, 4, 14, 1];
const DEPTHS_B: [usize; 4] = [4, 6, 16, 1];
const DEPTHS_D: [usize; 4] = [8, 14, 24, 1];

/// The 14 published variants, in the paper's order.
pub const VARIANT_NAMES: &[&str] = &[
    "A0", "A1", "A2", "B0", "B1", "B1g2", "B1g4", "B2", "B2g2", "B2g4", "B3", "B3g2", "B3g4",
    "D2se",
];

/// The official code's grouped layers for the g2/g4 variants: the even layers 2..=26.
fn official_group_map(groups: usize) -> BTreeMap<usize, usize> {
    if groups == 1 {
        return BTreeMap::new();
    }
    (2..=26).step_by(2).map(|layer| (layer, groups)).collect()
}

impl ArchSpec {
    /// A published variant. Accepts `A0`, `a0`, `RepVGG-A0` and `repvgg_a0`.
    pub fn named(name: &str) -> Result<ArchSpec, ArchError> {
        let lower = name.trim().to_ascii_lowercase();
        // QARepVGG-A0 (and the authors' QARepVGGV2-A0): the variant with QARepVGG blocks.
        let qa_bare = ["qarepvggv2-", "qarepvgg-", "qarepvgg_"]
            .iter()
            .find_map(|prefix| lower.strip_prefix(prefix));
        if let Some(bare) = qa_bare {
            let mut spec = ArchSpec::named(bare)?;
            spec.qa = true;
            spec.name = spec.name.replacen("RepVGG-", "QARepVGG-", 1);
            return Ok(spec);
        }
        let bare = lower
            .strip_prefix("repvgg-")
            .or_else(|| lower.strip_prefix("repvgg_"))
            .unwrap_or(&lower);
        let &(canonical, depths, a, b, groups, se) = VARIANT_TABLE
            .iter()
            .find(|row| row.0.to_ascii_lowercase() == bare)
            .ok_or_else(|| ArchError::UnknownVariant(name.to_string()))?;
        Ok(ArchSpec::from_multipliers(
            &format!("RepVGG-{canonical}"),
            depths,
            a,
            b,
            official_group_map(groups),
            se,
            1000,
        ))
    }

    /// The official constructor's rule: widths 64a, 128a, 256a, 512b; stem min(64, 64a).
    pub fn from_multipliers(
        name: &str,
        depths: [usize; 4],
        a: f64,
        b: f64,
        groups: BTreeMap<usize, usize>,
        se: bool,
        num_classes: usize,
    ) -> ArchSpec {
        let scaled = |base: f64, m: f64| (base * m) as usize;
        ArchSpec {
            name: name.to_string(),
            stem_width: 64.min(scaled(64.0, a)),
            depths,
            widths: [
                scaled(64.0, a),
                scaled(128.0, a),
                scaled(256.0, a),
                scaled(512.0, b),
            ],
            groups,
            se,
            qa: false,
            num_classes,
            in_channels: 3,
            strides: default_strides(),
            dilations: default_dilations(),
        }
    }

    /// Parses what a user types after `--arch`: a variant name, a path to a JSON spec, or a
    /// custom spec `depths=2,4,14,1;widths=48,96,192,1280;stem=48;groups=2:2,4:2;se;classes=10`.
    pub fn parse(text: &str) -> Result<ArchSpec, ArchError> {
        let text = text.trim();
        if text.ends_with(".json") || Path::new(text).is_file() {
            return ArchSpec::from_json_file(Path::new(text));
        }
        // "A0;classes=10": a named variant with fields overridden.
        if let Some((base, overrides)) = text.split_once(';')
            && !base.contains('=')
        {
            let mut spec = ArchSpec::named(base)?;
            spec.apply_overrides(overrides)?;
            spec.validate()?;
            return Ok(spec);
        }
        if text.contains('=') {
            return ArchSpec::parse_custom(text);
        }
        ArchSpec::named(text)
    }

    pub fn from_json_file(path: &Path) -> Result<ArchSpec, ArchError> {
        let file_error = |problem: String| ArchError::File {
            path: path.display().to_string(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        ArchSpec::from_json(&text).map_err(|e| match e {
            ArchError::File { problem, .. } => file_error(problem),
            other => file_error(other.to_string()),
        })
    }

    /// A spec from the text of a `.json` spec file.
    pub fn from_json(text: &str) -> Result<ArchSpec, ArchError> {
        let mut spec: ArchSpec = serde_json::from_str(text).map_err(|e| ArchError::File {
            path: "JSON".into(),
            problem: format!("not a valid architecture spec: {e}"),
        })?;
        if spec.stem_width == 0 {
            spec.stem_width = 64.min(spec.widths[0]);
        }
        spec.validate().map(|()| spec)
    }

    fn parse_custom(text: &str) -> Result<ArchSpec, ArchError> {
        let mut spec = ArchSpec {
            name: custom_name(),
            stem_width: 0,
            depths: [0; 4],
            widths: [0; 4],
            groups: BTreeMap::new(),
            se: false,
            qa: false,
            num_classes: default_classes(),
            in_channels: default_in_channels(),
            strides: default_strides(),
            dilations: default_dilations(),
        };
        let given = spec.apply_overrides(text)?;
        if !given.contains(&"depths") {
            return Err(ArchError::Invalid("missing depths=...".into()));
        }
        if !given.contains(&"widths") {
            return Err(ArchError::Invalid("missing widths=...".into()));
        }
        if !given.contains(&"stem") {
            spec.stem_width = 64.min(spec.widths[0]);
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Applies `key=value;...` fields; returns the keys given.
    fn apply_overrides(&mut self, text: &str) -> Result<Vec<&'static str>, ArchError> {
        let invalid = |msg: String| ArchError::Invalid(msg);
        let numbers = |value: &str| -> Result<Vec<usize>, ArchError> {
            value
                .split(',')
                .map(|n| {
                    n.trim()
                        .parse::<usize>()
                        .map_err(|_| invalid(format!("'{n}' is not a whole number in '{value}'")))
                })
                .collect()
        };
        let four = |key: &str, value: &str| -> Result<[usize; 4], ArchError> {
            numbers(value)?
                .try_into()
                .map_err(|_| invalid(format!("{key} needs exactly 4 numbers, got '{value}'")))
        };
        let five = |key: &str, value: &str| -> Result<[usize; 5], ArchError> {
            numbers(value)?.try_into().map_err(|_| {
                invalid(format!(
                    "{key} needs 5 numbers (stages 0 to 4), got '{value}'"
                ))
            })
        };
        let mut given = Vec::new();
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            let key: &'static str = match key.trim() {
                "depths" => {
                    self.depths = four(key, value)?;
                    "depths"
                }
                "widths" => {
                    self.widths = four(key, value)?;
                    "widths"
                }
                "stem" => {
                    self.stem_width = numbers(value)?[0];
                    "stem"
                }
                "classes" => {
                    self.num_classes = numbers(value)?[0];
                    "classes"
                }
                "in" => {
                    self.in_channels = numbers(value)?[0];
                    "in"
                }
                "se" => {
                    self.se = match value.trim() {
                        "" | "1" | "true" | "yes" => true,
                        "0" | "false" | "no" => false,
                        other => {
                            return Err(invalid(format!("se={other}: expected true or false")));
                        }
                    };
                    "se"
                }
                "qa" => {
                    self.qa = match value.trim() {
                        "" | "1" | "true" | "yes" => true,
                        "0" | "false" | "no" => false,
                        other => {
                            return Err(invalid(format!("qa={other}: expected true or false")));
                        }
                    };
                    if self.qa && self.name.starts_with("RepVGG-") {
                        self.name = self.name.replacen("RepVGG-", "QARepVGG-", 1);
                    }
                    "qa"
                }
                "name" => {
                    self.name = value.to_string();
                    "name"
                }
                "strides" => {
                    self.strides = five(key, value)?;
                    "strides"
                }
                "dilations" => {
                    self.dilations = five(key, value)?;
                    "dilations"
                }
                "groups" => {
                    for pair in value.split(',') {
                        let (layer, g) = pair.split_once(':').ok_or_else(|| {
                            invalid(format!("groups wants layer:groups, got '{pair}'"))
                        })?;
                        let layer = numbers(layer)?[0];
                        self.groups.insert(layer, numbers(g)?[0]);
                    }
                    "groups"
                }
                other => {
                    return Err(invalid(format!(
                        "unknown key '{other}' (known: depths, widths, stem, groups, se, classes, in, name, strides, dilations)"
                    )));
                }
            };
            given.push(key);
        }
        Ok(given)
    }

    /// Checks that every block can be built: positive sizes, channels divisible by groups,
    /// grouped layers that exist, and an SE bottleneck of at least one channel.
    pub fn validate(&self) -> Result<(), ArchError> {
        let invalid = |msg: String| Err(ArchError::Invalid(msg));
        if self.stem_width == 0 || self.widths.contains(&0) || self.in_channels == 0 {
            return invalid("widths and channels must be positive".into());
        }
        if self.depths.contains(&0) {
            return invalid(format!(
                "every stage needs at least one block: depths {:?}",
                self.depths
            ));
        }
        if self.strides.iter().any(|&s| !(1..=2).contains(&s)) {
            return invalid(format!("strides must be 1 or 2, got {:?}", self.strides));
        }
        if self.dilations.iter().any(|&d| !(1..=64).contains(&d)) {
            return invalid(format!(
                "dilations must be 1 to 64, got {:?}",
                self.dilations
            ));
        }
        // Bounds that no real network approaches, checked before anything is allocated.
        if self.depths.iter().any(|&d| d > 10_000)
            || self
                .widths
                .iter()
                .chain([&self.stem_width, &self.in_channels])
                .any(|&w| w > 1 << 20)
            || self.num_classes > 1 << 24
        {
            return invalid(format!(
                "sizes out of range: depths {:?}, widths {:?}, stem {}, {} classes",
                self.depths, self.widths, self.stem_width, self.num_classes
            ));
        }
        if self.groups.contains_key(&0) {
            return invalid("layer 0 (stage 0) is never grouped".into());
        }
        let layers = self.num_blocks();
        if let Some((&layer, _)) = self.groups.iter().find(|&(&l, _)| l >= layers) {
            return invalid(format!(
                "groups name layer {layer}, but the network has layers 0..{}",
                layers - 1
            ));
        }
        for block in self.blocks() {
            if block.groups == 0
                || !block.in_channels.is_multiple_of(block.groups)
                || !block.out_channels.is_multiple_of(block.groups)
            {
                return invalid(format!(
                    "{}: {} -> {} channels cannot be split into {} groups",
                    block.name(),
                    block.in_channels,
                    block.out_channels,
                    block.groups
                ));
            }
            if block.se_channels == Some(0) {
                return invalid(format!(
                    "{}: SE needs at least {SE_REDUCTION} channels, block has {}",
                    block.name(),
                    block.out_channels
                ));
            }
        }
        Ok(())
    }

    pub fn num_blocks(&self) -> usize {
        1 + self.depths.iter().sum::<usize>()
    }

    /// Width of the feature vector fed to the linear head.
    pub fn feature_width(&self) -> usize {
        self.widths[3]
    }

    /// All blocks in forward order, stem first.
    pub fn blocks(&self) -> Vec<BlockSpec> {
        let mut blocks = Vec::with_capacity(self.num_blocks());
        let mut push = |stage: usize, index: usize, layer, in_channels, out_channels| {
            let ends_stage = stage == 0 || index + 1 == self.depths[stage - 1];
            // The official code never groups stage 0, whatever the map says.
            let groups = if stage == 0 {
                1
            } else {
                self.groups.get(&layer).copied().unwrap_or(1)
            };
            blocks.push(BlockSpec {
                stage,
                index,
                layer,
                in_channels,
                out_channels,
                stride: if index == 0 { self.strides[stage] } else { 1 },
                dilation: self.dilations[stage],
                groups,
                // Where the paper's layout has it (not on a stage's first block, stride 2 there),
                // so that stride overrides keep checkpoints loadable.
                has_identity: in_channels == out_channels && index > 0,
                se_channels: self.se.then_some(out_channels / SE_REDUCTION),
                qa: self.qa,
                ends_stage,
            });
        };
        push(0, 0, 0, self.in_channels, self.stem_width);
        let mut layer = 1;
        let mut channels = self.stem_width;
        for (stage, (&depth, &width)) in self.depths.iter().zip(&self.widths).enumerate() {
            for index in 0..depth {
                push(stage + 1, index, layer, channels, width);
                channels = width;
                layer += 1;
            }
        }
        blocks
    }

    /// Learnable parameters of the whole network (BN running statistics excluded).
    pub fn params(&self, form: Form) -> usize {
        let head = self.feature_width() * self.num_classes + self.num_classes;
        self.blocks().iter().map(|b| b.params(form)).sum::<usize>() + head
    }

    /// Multiply-accumulates of convolutions and the linear head for an `h` x `w` input.
    pub fn macs(&self, form: Form, h: usize, w: usize) -> u64 {
        let (mut h, mut w) = (h, w);
        let mut total = 0;
        for block in self.blocks() {
            total += block.macs(form, h, w);
            (h, w) = block.output_size(h, w);
        }
        total + (self.feature_width() * self.num_classes) as u64
    }

    /// The memory running this spec implies, worked out from the spec alone so that a spec
    /// that cannot fit is refused before anything is allocated.
    pub fn memory_estimate(&self, batch: usize, h: usize, w: usize) -> MemoryEstimate {
        const F32: u64 = 4;
        let train_weights = (self.params(Form::Train) as u64).saturating_mul(F32);
        let deploy = (self.params(Form::Deploy) as u64).saturating_mul(F32);
        let (mut h, mut w) = (h, w);
        let mut largest = 0u64;
        let mut saved = 0u64;
        // Products in u64, saturating: a size no machine holds must still give a number.
        let map = |channels: usize, h: usize, w: usize| {
            (channels as u64)
                .saturating_mul(h as u64)
                .saturating_mul(w as u64)
        };
        for block in self.blocks() {
            let (oh, ow) = block.output_size(h, w);
            let (input, output) = (
                map(block.in_channels, h, w),
                map(block.out_channels, oh, ow),
            );
            largest = largest.max(input.saturating_add(output));
            saved = saved.saturating_add(input.saturating_add(output.saturating_mul(8)));
            (h, w) = (oh, ow);
        }
        MemoryEstimate {
            train_weights,
            // The fused kernels, their packed copy, and Winograd F(4x4)'s transformed filters
            // (36 values per 9).
            engine_weights: deploy.saturating_mul(6),
            // The largest block's input and output maps, and as much again for its workspace
            // (im2col rows or Winograd tiles).
            activations: largest.saturating_mul(batch as u64).saturating_mul(2 * F32),
            training: saved
                .saturating_mul(batch as u64)
                .saturating_mul(2 * F32)
                .saturating_add(train_weights.saturating_mul(2)),
        }
    }

    /// Spatial size of the last feature map (the input shrinks by 32 overall, rounding up).
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        self.blocks()
            .iter()
            .fold((h, w), |(h, w), b| b.output_size(h, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Params in millions and MACs in G at 224, both forms, from the facts table (which the
    /// official code and timm reproduce); printed to three decimals there.
    const TABLE: &[(&str, f64, f64, f64, f64)] = &[
        ("A0", 9.109, 8.309, 1.513, 1.361),
        ("A1", 14.092, 12.790, 2.626, 2.364),
        ("A2", 28.211, 25.500, 5.685, 5.117),
        ("B0", 15.818, 14.339, 3.397, 3.058),
        ("B1", 57.415, 51.829, 13.128, 11.815),
        ("B1g2", 45.782, 41.360, 9.788, 8.810),
        ("B1g4", 39.966, 36.125, 8.119, 7.307),
        ("B2", 89.022, 80.315, 20.418, 18.377),
        ("B2g2", 70.846, 63.957, 15.200, 13.680),
        ("B2g4", 61.758, 55.778, 12.591, 11.332),
        ("B3", 123.085, 110.961, 29.121, 26.209),
        ("B3g2", 96.912, 87.405, 21.606, 19.446),
        ("B3g4", 83.825, 75.627, 17.849, 16.064),
        ("D2se", 133.335, 120.388, 36.477, 32.830),
    ];

    #[test]
    fn all_variants_match_the_published_counts() {
        for &(name, p_train, p_deploy, m_train, m_deploy) in TABLE {
            let spec = ArchSpec::named(name).unwrap();
            spec.validate().unwrap();
            let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
            let got = [
                round3(spec.params(Form::Train) as f64 / 1e6),
                round3(spec.params(Form::Deploy) as f64 / 1e6),
                round3(spec.macs(Form::Train, 224, 224) as f64 / 1e9),
                round3(spec.macs(Form::Deploy, 224, 224) as f64 / 1e9),
            ];
            assert_eq!(got, [p_train, p_deploy, m_train, m_deploy], "{name}");
        }
    }

    #[test]
    fn names_are_accepted_in_every_spelling() {
        for spelling in ["A0", "a0", "RepVGG-A0", "repvgg_a0", " repvgg-a0 "] {
            assert_eq!(ArchSpec::named(spelling).unwrap().name, "RepVGG-A0");
        }
        assert_eq!(ArchSpec::named("b1G4").unwrap().name, "RepVGG-B1g4");
        let err = ArchSpec::named("A9").unwrap_err().to_string();
        assert!(
            err.contains("unknown variant 'A9'") && err.contains("D2se"),
            "{err}"
        );
    }

    #[test]
    fn a0_layout_follows_the_paper() {
        let a0 = ArchSpec::named("A0").unwrap();
        let blocks = a0.blocks();
        assert_eq!(blocks.len(), 22);
        assert_eq!((blocks[0].in_channels, blocks[0].out_channels), (3, 48));
        assert_eq!(blocks[21].out_channels, 1280);
        assert_eq!(blocks.iter().filter(|b| b.stride == 2).count(), 5);
        assert!(!blocks[1].has_identity && blocks[2].has_identity);
        assert_eq!(blocks[3].name(), "stage2.0");
        assert_eq!(a0.output_size(224, 224), (7, 7));
    }

    #[test]
    fn grouped_variants_group_even_layers() {
        let b1g4 = ArchSpec::named("B1g4").unwrap();
        let groups: Vec<usize> = b1g4.blocks().iter().map(|b| b.groups).collect();
        assert_eq!(groups[0], 1);
        assert_eq!(&groups[1..7], &[1, 4, 1, 4, 1, 4]);
        assert_eq!(
            groups[27], 1,
            "layer 27 (stage 4) is not in the official map"
        );
    }

    #[test]
    fn custom_specs_parse_and_validate() {
        let spec =
            ArchSpec::parse("depths=1,2,1,1;widths=16,32,64,128;stem=16;groups=2:2;se;classes=7")
                .unwrap();
        assert_eq!(spec.depths, [1, 2, 1, 1]);
        assert_eq!(spec.blocks()[2].groups, 2);
        assert!(spec.se && spec.num_classes == 7);
        assert!(ArchSpec::parse("depths=1,1,1;widths=8,8,8,8").is_err());
        let err = ArchSpec::parse("depths=1,1,1,1;widths=8,16,32,64;groups=1:3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be split into 3 groups"), "{err}");
        assert!(ArchSpec::parse("depths=1,1,1,1;widths=8,16,32,64;se").is_err());
        assert!(
            !ArchSpec::parse("depths=1,1,1,1;widths=16,16,16,16;se=false")
                .unwrap()
                .se
        );
        assert!(ArchSpec::parse("depths=1,1,1,1;widths=16,16,16,16;groups=0:2").is_err());
        assert!(ArchSpec::parse("depths=100000000000,1,1,1;widths=8,8,8,8").is_err());
        let tuned = ArchSpec::parse("RepVGG-B1g4;classes=10").unwrap();
        assert_eq!(
            (tuned.name.as_str(), tuned.num_classes),
            ("RepVGG-B1g4", 10)
        );
        assert_eq!(tuned.groups, ArchSpec::named("B1g4").unwrap().groups);
        assert!(ArchSpec::parse("A0;colour=red").is_err());
    }

    #[test]
    fn json_specs_accept_the_short_names_and_reject_unknown_fields() {
        let dir = std::env::temp_dir().join(format!("repvgg-arch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            r#"{"depths": [1,1,1,1], "widths": [16,16,32,32], "classes": 5}"#,
        )
        .unwrap();
        let spec = ArchSpec::from_json_file(&good).unwrap();
        assert_eq!((spec.stem_width, spec.num_classes), (16, 5));
        let bad = dir.join("bad.json");
        std::fs::write(
            &bad,
            r#"{"depths": [1,1,1,1], "widths": [16,16,32,32], "colour": 5}"#,
        )
        .unwrap();
        let err = ArchSpec::from_json_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains("colour"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn json_round_trip() {
        let spec = ArchSpec::named("B2g4").unwrap();
        let back: ArchSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(spec, back);
    }
}
