//! What a weights file says about the model beyond its tensors: how to turn an image into its
//! input, and what its outputs mean. This is timm's `pretrained_cfg` for our files: without
//! it a model trained on 28x28 grey images with its data set's statistics would be fed
//! ImageNet's resize-256-crop-224 colour pipeline, and answer nonsense.
//!
//! Stored as JSON strings in the safetensors header, under [`PREPROCESSING_KEY`] and
//! [`LABELS_KEY`], beside `repvgg.arch`. Files from elsewhere (official, timm, mmpretrain
//! checkpoints) carry neither; their users fall back to the ImageNet presets.

use serde::{Deserialize, Serialize};

use crate::error::{CheckpointErrorKind, Problem};

pub const PREPROCESSING_KEY: &str = "repvgg.preprocessing";
pub const LABELS_KEY: &str = "repvgg.labels";

/// The longest input side any command or file may ask for: 16,384 pixels, where one image's
/// stem output (A0: 48 channels at half the side) is already 13 GB; a file that records more
/// is refused before anything is allocated.
pub const MAX_INPUT_SIDE: usize = 16_384;
/// The run state `repvgg-train` stores in its resumable checkpoints (JSON).
pub const RUN_STATE_KEY: &str = "repvgg_train_state";
/// Prefix of the optimizer's tensors in a training checkpoint: not model weights.
pub const OPTIMIZER_PREFIX: &str = "sgd_velocity.";

/// ImageNet's per-channel statistics, as every torchvision/timm RepVGG recipe uses.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How to turn a decoded image into the model's input, as the model was trained and evaluated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    /// The model's input (height, width) in pixels.
    pub size: [usize; 2],
    /// Trained on grey images repeated over three channels: colour input is made grey first,
    /// or the model sees colours it never learned.
    pub grey: bool,
    pub resize: Resize,
    pub interpolation: Interpolation,
    /// `(x / 255 - mean) / std`, per channel (R, G, B).
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The geometric rule from any image to `size`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum Resize {
    /// Resize the short side to `floor(size / crop_pct)`, crop the centre `size` x `size`:
    /// torchvision's Resize + CenterCrop, timm's `crop_pct` (0.875 turns 224 into 256).
    CenterCrop { crop_pct: f64 },
    /// Resize the whole image to `size`, aspect ratio not kept: models trained on a data set
    /// stored at one size (MNIST, CIFAR), whose own images pass through unchanged.
    Stretch,
}

/// The resampling filter. Bilinear only: it is what every RepVGG recipe evaluates with, and
/// ours reproduces Pillow's arithmetic exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Bilinear,
}

/// The evaluation preprocessing of each reference implementation (ImageNet statistics):
/// what files without metadata (the published checkpoints) are fed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageNetPreset {
    /// The official RepVGG code: resize the short side to 256 (bilinear), centre crop 224.
    Official,
    /// timm's `repvgg_*` config: crop_pct 0.875 at 224, bilinear (the same geometry).
    Timm,
    /// timm's `repvgg_d2se`: 320, crop_pct 1.0.
    D2se,
}

impl ImageNetPreset {
    pub fn preprocessing(self) -> Preprocessing {
        let (size, crop_pct) = match self {
            ImageNetPreset::Official | ImageNetPreset::Timm => (224, 0.875),
            ImageNetPreset::D2se => (320, 1.0),
        };
        Preprocessing {
            size: [size, size],
            grey: false,
            resize: Resize::CenterCrop { crop_pct },
            interpolation: Interpolation::Bilinear,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

impl Preprocessing {
    /// The short side before the centre crop, for [`Resize::CenterCrop`].
    pub fn resize_short_side(&self) -> Option<usize> {
        match self.resize {
            Resize::CenterCrop { crop_pct } => {
                Some((self.size[0] as f64 / crop_pct).floor() as usize)
            }
            Resize::Stretch => None,
        }
    }

    /// Whether the values make sense; the problem in words if not.
    pub fn validate(&self) -> Result<(), Problem> {
        if self.size.contains(&0) {
            return Err(Problem::new(
                CheckpointErrorKind::BadMetadata,
                format!("input size {:?} has a zero side", self.size),
            ));
        }
        if self.size.iter().any(|&side| side > MAX_INPUT_SIDE) {
            return Err(Problem::new(
                CheckpointErrorKind::BadMetadata,
                format!(
                    "input size {:?} has a side over {MAX_INPUT_SIDE} pixels",
                    self.size
                ),
            ));
        }
        if let Resize::CenterCrop { crop_pct } = self.resize {
            if !(crop_pct > 0.0 && crop_pct <= 1.0) {
                return Err(Problem::new(
                    CheckpointErrorKind::BadMetadata,
                    format!("crop_pct {crop_pct} is not in (0, 1]"),
                ));
            }
            if self.size[0] != self.size[1] {
                return Err(Problem::new(
                    CheckpointErrorKind::BadMetadata,
                    format!(
                        "a centre crop is square, but the input size is {}x{}",
                        self.size[0], self.size[1]
                    ),
                ));
            }
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            return Err(Problem::new(
                CheckpointErrorKind::BadMetadata,
                format!("mean {:?} is not finite", self.mean),
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Problem::new(
                CheckpointErrorKind::BadMetadata,
                format!("std {:?} must be positive", self.std),
            ));
        }
        Ok(())
    }

    /// One line for people: `28x28 grey, stretch, bilinear, mean [..] std [..]`.
    pub fn describe(&self) -> String {
        let geometry = match self.resize {
            Resize::CenterCrop { crop_pct } => format!(
                "short side to {} then centre crop (crop_pct {crop_pct})",
                self.resize_short_side().unwrap_or(0)
            ),
            Resize::Stretch => "resized whole (aspect not kept)".to_string(),
        };
        let round = |v: &[f32; 3]| v.map(|x| (x as f64 * 1e4).round() / 1e4);
        format!(
            "{}x{} {}, {geometry}, bilinear, mean {:?}, std {:?}",
            self.size[0],
            self.size[1],
            if self.grey {
                "grey (repeated over RGB)"
            } else {
                "RGB"
            },
            round(&self.mean),
            round(&self.std),
        )
    }
}

/// Checks class names against the model's class count.
pub fn validate_labels(labels: &[String], classes: usize) -> Result<(), Problem> {
    if labels.len() != classes {
        return Err(Problem::new(
            CheckpointErrorKind::BadMetadata,
            format!(
                "{} class names for a model with {classes} classes",
                labels.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_reproduce_the_reference_geometry() {
        // The official code resizes to 256 and crops 224; timm's d2se resizes to 320, crops 320.
        assert_eq!(
            ImageNetPreset::Official.preprocessing().resize_short_side(),
            Some(256)
        );
        assert_eq!(
            ImageNetPreset::D2se.preprocessing().resize_short_side(),
            Some(320)
        );
    }

    #[test]
    fn json_round_trips_and_rejects_unknown_fields() {
        let p = ImageNetPreset::Timm.preprocessing();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Preprocessing>(&json).unwrap(), p);
        let extra = json.replacen('{', "{\"crop\":1,", 1);
        assert!(serde_json::from_str::<Preprocessing>(&extra).is_err());
    }

    #[test]
    fn validation_names_the_bad_value() {
        let mut p = ImageNetPreset::Official.preprocessing();
        p.std[1] = 0.0;
        assert!(p.validate().unwrap_err().message.contains("std"));
        let mut p = ImageNetPreset::Official.preprocessing();
        p.size = [224, 200];
        assert!(p.validate().unwrap_err().message.contains("square"));
        assert!(validate_labels(&["a".into()], 2).is_err());
    }
}
