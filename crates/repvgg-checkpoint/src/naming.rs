//! The three state-dict namings in circulation, and lossless renaming between them.
//!
//! Every key splits into a block prefix and a part inside the block (or is a head key). The
//! official naming is the canonical one inside this project.

use std::fmt;
use std::str::FromStr;

use crate::error::{CheckpointErrorKind, Problem};
use crate::tensor::StateDict;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Naming {
    /// The authors' `repvgg.py`: `stage1.0.rbr_dense.conv.weight`.
    Official,
    /// timm's byobnet: `stages.0.0.conv_kxk.conv.weight`.
    Timm,
    /// MMPretrain: `backbone.stage_1.0.branch_3x3.conv.weight`.
    MmPretrain,
}

pub const ALL_NAMINGS: [Naming; 3] = [Naming::Official, Naming::Timm, Naming::MmPretrain];

impl fmt::Display for Naming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Naming::Official => "official",
            Naming::Timm => "timm",
            Naming::MmPretrain => "mmpretrain",
        })
    }
}

impl FromStr for Naming {
    type Err = Problem;
    fn from_str(s: &str) -> Result<Self, Problem> {
        match s.to_ascii_lowercase().as_str() {
            "official" => Ok(Naming::Official),
            "timm" => Ok(Naming::Timm),
            "mmpretrain" | "mmcls" | "mm" => Ok(Naming::MmPretrain),
            _ => Err(Problem::new(
                CheckpointErrorKind::Unsupported,
                format!("unknown naming '{s}' (expected official, timm or mmpretrain)"),
            )),
        }
    }
}

/// Parts inside a block: (official, timm, mmpretrain). Matched as key prefixes after the block.
const PARTS: &[[&str; 3]] = &[
    ["rbr_dense.conv.", "conv_kxk.conv.", "branch_3x3.conv."],
    ["rbr_dense.bn.", "conv_kxk.bn.", "branch_3x3.norm."],
    ["rbr_1x1.conv.", "conv_1x1.conv.", "branch_1x1.conv."],
    ["rbr_1x1.bn.", "conv_1x1.bn.", "branch_1x1.norm."],
    ["rbr_identity.", "identity.", "branch_norm."],
    ["rbr_reparam.", "reparam_conv.", "branch_reparam."],
    ["se.down.", "attn.fc1.", "se_layer.conv1.conv."],
    ["se.up.", "attn.fc2.", "se_layer.conv2.conv."],
];

/// QARepVGG's parts (the bias-free 1x1, the post-sum BN): the authors' code is the only one
/// with them, so they have only the official naming.
const QA_PARTS: [&str; 2] = ["rbr_1x1.weight", "bn."];

/// The classifier: (official, timm, mmpretrain).
const HEAD: [&str; 3] = ["linear.", "head.fc.", "head.fc."];

fn column(naming: Naming) -> usize {
    match naming {
        Naming::Official => 0,
        Naming::Timm => 1,
        Naming::MmPretrain => 2,
    }
}

/// A block position: stage 0..=4, index inside the stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId {
    pub stage: usize,
    pub index: usize,
}

impl Naming {
    /// The block's key prefix, trailing dot included.
    pub fn block_prefix(self, block: BlockId) -> String {
        match (self, block.stage) {
            (Naming::Official, 0) => "stage0.".into(),
            (Naming::Official, s) => format!("stage{s}.{}.", block.index),
            (Naming::Timm, 0) => "stem.".into(),
            (Naming::Timm, s) => format!("stages.{}.{}.", s - 1, block.index),
            (Naming::MmPretrain, 0) => "backbone.stem.".into(),
            (Naming::MmPretrain, s) => format!("backbone.stage_{s}.{}.", block.index),
        }
    }

    /// Splits a key into its block and the rest, if it belongs to a block.
    pub fn parse_block(self, key: &str) -> Option<(BlockId, &str)> {
        let stem = match self {
            Naming::Official => "stage0.",
            Naming::Timm => "stem.",
            Naming::MmPretrain => "backbone.stem.",
        };
        if let Some(rest) = key.strip_prefix(stem) {
            return Some((BlockId { stage: 0, index: 0 }, rest));
        }
        let (stage, rest) = match self {
            Naming::Official => {
                let rest = key.strip_prefix("stage")?;
                let (stage, rest) = rest.split_once('.')?;
                (
                    stage
                        .parse::<usize>()
                        .ok()
                        .filter(|&s| (1..=4).contains(&s))?,
                    rest,
                )
            }
            Naming::Timm => {
                let rest = key.strip_prefix("stages.")?;
                let (stage, rest) = rest.split_once('.')?;
                (stage.parse::<usize>().ok().filter(|&s| s < 4)? + 1, rest)
            }
            Naming::MmPretrain => {
                let rest = key.strip_prefix("backbone.stage_")?;
                let (stage, rest) = rest.split_once('.')?;
                (
                    stage
                        .parse::<usize>()
                        .ok()
                        .filter(|&s| (1..=4).contains(&s))?,
                    rest,
                )
            }
        };
        let (index, rest) = rest.split_once('.')?;
        Some((
            BlockId {
                stage,
                index: index.parse().ok()?,
            },
            rest,
        ))
    }

    /// Renames one key from this naming to `to`; `None` if the key is not a RepVGG key.
    pub fn rename_key(self, key: &str, to: Naming) -> Option<String> {
        let (from_col, to_col) = (column(self), column(to));
        if let Some(rest) = key.strip_prefix(HEAD[from_col]) {
            return Some(format!("{}{rest}", HEAD[to_col]));
        }
        let (block, rest) = self.parse_block(key)?;
        let Some(part) = PARTS.iter().find(|p| rest.starts_with(p[from_col])) else {
            let qa = QA_PARTS.iter().any(|p| rest.starts_with(p));
            return (qa && self == Naming::Official && to == Naming::Official)
                .then(|| key.to_string());
        };
        let tail = &rest[part[from_col].len()..];
        Some(format!("{}{}{tail}", to.block_prefix(block), part[to_col]))
    }

    /// Detects the naming from the keys (block keys decide; the head is shared by two).
    pub fn detect<'a>(keys: impl IntoIterator<Item = &'a str> + Clone) -> Option<Naming> {
        let mut best = None;
        let mut best_count = 0;
        for naming in ALL_NAMINGS {
            let count = keys
                .clone()
                .into_iter()
                .filter(|k| naming.parse_block(k).is_some())
                .count();
            if count > best_count {
                best = Some(naming);
                best_count = count;
            }
        }
        best
    }
}

/// Renames a whole state dict; fails on the first key that has no counterpart.
pub fn rename(dict: &StateDict, from: Naming, to: Naming) -> Result<StateDict, Problem> {
    dict.iter()
        .map(|(key, tensor)| {
            from.rename_key(key, to)
                .map(|k| (k, tensor.clone()))
                .ok_or_else(|| {
                    let qa = from == Naming::Official
                        && from
                            .parse_block(key)
                            .is_some_and(|(_, rest)| QA_PARTS.iter().any(|p| rest.starts_with(p)));
                    let message = if qa {
                        format!(
                            "'{key}' is a QARepVGG part, which only the authors' official naming has; write QARepVGG training weights in official naming"
                        )
                    } else {
                        format!("unexpected key '{key}' for {from} naming")
                    };
                    Problem::new(CheckpointErrorKind::UnexpectedKey, message).about(key)
                })
        })
        .collect()
}

/// The official name of a block's part, e.g. `part_key(block, "rbr_dense.bn.", "weight")`.
pub fn official_key(block: BlockId, part: &str, field: &str) -> String {
    format!("{}{part}{field}", Naming::Official.block_prefix(block))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_facts_table() {
        let key = "stage2.3.rbr_1x1.bn.running_var";
        assert_eq!(
            Naming::Official.rename_key(key, Naming::Timm).unwrap(),
            "stages.1.3.conv_1x1.bn.running_var"
        );
        assert_eq!(
            Naming::Official
                .rename_key(key, Naming::MmPretrain)
                .unwrap(),
            "backbone.stage_2.3.branch_1x1.norm.running_var"
        );
        assert_eq!(
            Naming::Official
                .rename_key("stage0.se.up.bias", Naming::MmPretrain)
                .unwrap(),
            "backbone.stem.se_layer.conv2.conv.bias"
        );
        assert_eq!(
            Naming::Timm
                .rename_key("stem.reparam_conv.weight", Naming::Official)
                .unwrap(),
            "stage0.rbr_reparam.weight"
        );
        assert_eq!(
            Naming::MmPretrain
                .rename_key("head.fc.bias", Naming::Official)
                .unwrap(),
            "linear.bias"
        );
        assert_eq!(Naming::Official.rename_key("fc.weight", Naming::Timm), None);
        assert_eq!(
            Naming::Official.rename_key("stage5.0.rbr_dense.conv.weight", Naming::Timm),
            None
        );
    }

    #[test]
    fn every_part_round_trips_through_every_naming() {
        for part in PARTS {
            for stage in 0..=4 {
                let block = BlockId {
                    stage,
                    index: if stage == 0 { 0 } else { 7 },
                };
                let key = official_key(block, part[0], "weight");
                for a in ALL_NAMINGS {
                    for b in ALL_NAMINGS {
                        let there = Naming::Official.rename_key(&key, a).unwrap();
                        let across = a.rename_key(&there, b).unwrap();
                        let back = b.rename_key(&across, Naming::Official).unwrap();
                        assert_eq!(back, key, "{a} -> {b}");
                        assert_eq!(Naming::detect([there.as_str()]), Some(a));
                    }
                }
            }
        }
    }
}
