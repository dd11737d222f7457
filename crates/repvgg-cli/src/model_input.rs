//! What every command that feeds images to a model shares: the preprocessing (the weights
//! file's own, or a preset for files without one, with flags on top) and the class names.

use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use repvgg_checkpoint::metadata::Resize;
use repvgg_checkpoint::{Checkpoint, ImageNetPreset, Preprocessing};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    /// Short side to 256 (bilinear), centre crop 224, ImageNet mean/std: the official code.
    Official,
    /// crop_pct 0.875 at 224, bilinear, ImageNet mean/std: timm's RepVGG configs.
    Timm,
    /// 320, crop_pct 1.0, ImageNet mean/std: timm's repvgg_d2se.
    D2se,
}

impl From<PresetArg> for ImageNetPreset {
    fn from(p: PresetArg) -> Self {
        match p {
            PresetArg::Official => ImageNetPreset::Official,
            PresetArg::Timm => ImageNetPreset::Timm,
            PresetArg::D2se => ImageNetPreset::D2se,
        }
    }
}

/// Flags that override how images are fed to the model.
#[derive(Args, Debug, Default, Clone)]
pub struct InputArgs {
    /// Use a reference pipeline instead of the preprocessing the weights file records
    /// [default: the file's; for files that record none (published checkpoints): d2se for SE
    /// models, else official].
    #[arg(long)]
    pub preset: Option<PresetArg>,
    /// Model input size: 224, or HxW (centre-cropping models take square sizes) [default:
    /// the file's].
    #[arg(long)]
    pub size: Option<String>,
    /// Per-channel mean of pixel/255, as R,G,B (one value for all three) [default: the
    /// file's].
    #[arg(long)]
    pub mean: Option<String>,
    /// Per-channel standard deviation, as R,G,B or one value [default: the file's].
    #[arg(long)]
    pub std: Option<String>,
    /// How any image becomes the input size: crop (short side to size / crop-pct, centre
    /// crop) or stretch (the whole image resized) [default: the file's].
    #[arg(long)]
    pub resize: Option<ResizeArg>,
    /// The share of the short side the centre crop keeps, in (0, 1] [default: the file's, or
    /// 0.875].
    #[arg(long)]
    pub crop_pct: Option<f64>,
    /// Feed grey images (colour ones made grey, then repeated over RGB), as a model trained
    /// on grey data expects [default: the file's].
    #[arg(long, conflicts_with = "rgb")]
    pub grey: bool,
    /// Feed colour images as they are [default: the file's].
    #[arg(long)]
    pub rgb: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ResizeArg {
    /// Short side to size / crop-pct, then the centre size x size.
    Crop,
    /// The whole image to the input size, aspect ratio not kept.
    Stretch,
}

/// Where the preprocessing in use came from, for the one line commands print about it.
pub enum Source {
    /// The weights file's metadata.
    File,
    /// A preset, because the file records none.
    Fallback(&'static str),
    /// The file's or the fallback, changed by flags.
    Flags,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File => write!(f, "as the weights file records"),
            Source::Fallback(what) => write!(f, "{what}: the weights file records none"),
            Source::Flags => write!(f, "as the flags set"),
        }
    }
}

fn parse_triple(flag: &str, text: &str) -> Result<[f32; 3]> {
    let values: Vec<f32> = text
        .split(',')
        .map(|v| v.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .ok()
        .filter(|v: &Vec<f32>| v.iter().all(|x| x.is_finite()))
        .with_context(|| format!("{flag} '{text}': expected numbers such as 0.485,0.456,0.406"))?;
    match values[..] {
        [v] => Ok([v; 3]),
        [r, g, b] => Ok([r, g, b]),
        _ => bail!("{flag} '{text}': expected one value or three (R,G,B)"),
    }
}

impl InputArgs {
    pub fn any(&self) -> bool {
        self.preset.is_some()
            || self.size.is_some()
            || self.mean.is_some()
            || self.std.is_some()
            || self.resize.is_some()
            || self.crop_pct.is_some()
            || self.grey
            || self.rgb
    }

    /// The preprocessing for `ckpt`: a preset if asked, else the file's, else `fallback`;
    /// then `--size`, `--mean` and `--std` on top.
    pub fn resolve(
        &self,
        ckpt: &Checkpoint,
        fallback: (Preprocessing, &'static str),
    ) -> Result<(Preprocessing, Source)> {
        let (mut p, mut source) = match (self.preset, &ckpt.preprocessing) {
            (Some(preset), _) => (ImageNetPreset::from(preset).preprocessing(), Source::Flags),
            (None, Some(recorded)) => (recorded.clone(), Source::File),
            (None, None) => (fallback.0, Source::Fallback(fallback.1)),
        };
        match (self.resize, self.crop_pct) {
            (Some(ResizeArg::Stretch), Some(_)) => {
                bail!("--crop-pct applies to --resize crop, not stretch")
            }
            (Some(ResizeArg::Stretch), None) => {
                p.resize = Resize::Stretch;
                source = Source::Flags;
            }
            (Some(ResizeArg::Crop), pct) | (None, pct @ Some(_)) => {
                let keep = match p.resize {
                    Resize::CenterCrop { crop_pct } => crop_pct,
                    Resize::Stretch => 0.875,
                };
                p.resize = Resize::CenterCrop {
                    crop_pct: pct.unwrap_or(keep),
                };
                if p.size[0] != p.size[1] && self.size.is_none() {
                    p.size = [p.size[0]; 2];
                }
                source = Source::Flags;
            }
            (None, None) => {}
        }
        if self.grey || self.rgb {
            p.grey = self.grey;
            source = Source::Flags;
        }
        if let Some(size) = &self.size {
            let (h, w) = crate::parse_size(size)?;
            if matches!(p.resize, Resize::CenterCrop { .. }) && h != w {
                bail!(
                    "--size {size}: this model's preprocessing crops a square centre; give one size"
                );
            }
            p.size = [h, w];
            source = Source::Flags;
        }
        if let Some(mean) = &self.mean {
            p.mean = parse_triple("--mean", mean)?;
            source = Source::Flags;
        }
        if let Some(std) = &self.std {
            p.std = parse_triple("--std", std)?;
            source = Source::Flags;
        }
        p.validate()
            .map_err(|e| anyhow::anyhow!("preprocessing: {e}"))?;
        Ok((p, source))
    }
}

/// The preprocessing of files that record none: ImageNet's, as the reference code for the
/// published checkpoints evaluates them.
pub fn imagenet_fallback(ckpt: &Checkpoint) -> (Preprocessing, &'static str) {
    if ckpt.spec.se {
        (ImageNetPreset::D2se.preprocessing(), "the d2se preset")
    } else {
        (
            ImageNetPreset::Official.preprocessing(),
            "the official preset",
        )
    }
}

/// Class names from a file, one per line, checked against the model.
pub fn read_labels(path: &Path, classes: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if names.len() != classes {
        bail!(
            "{}: {} class names for a model with {classes} classes",
            path.display(),
            names.len()
        );
    }
    Ok(names)
}

/// The class names to print: `--labels`, else the file's, else ImageNet-1k's for a
/// 1000-class model, else the indices.
pub fn class_names(labels: Option<&Path>, ckpt: &Checkpoint) -> Result<Vec<String>> {
    let classes = ckpt.spec.num_classes;
    Ok(match (labels, &ckpt.labels) {
        (Some(path), _) => read_labels(path, classes)?,
        (None, Some(names)) => names.clone(),
        (None, None) if classes == 1000 => repvgg_data::imagenet_class_names()
            .into_iter()
            .map(String::from)
            .collect(),
        (None, None) => (0..classes).map(|k| k.to_string()).collect(),
    })
}

/// Whether a path names a JPEG or PNG image (by its extension).
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

/// Decodes and preprocesses images into one NCHW batch; a broken file stops everything before
/// any output, naming it.
pub fn image_batch(paths: &[std::path::PathBuf], p: &Preprocessing) -> Result<Vec<f32>> {
    use rand::SeedableRng;
    let pipeline = repvgg_data::Pipeline::for_model(p);
    let mut input = Vec::new();
    for path in paths {
        let img = repvgg_data::decode_image(path)?;
        // Evaluation transforms draw no random numbers; the RNG only satisfies the signature.
        let (pixels, _, _) = pipeline.apply(&img, &mut rand::rngs::StdRng::seed_from_u64(0));
        input.extend(pixels);
    }
    Ok(input)
}
