//! From stored pixels to model input: the paper's augmentations, normalisation and batching.
//!
//! Every random choice comes from an RNG seeded by (run seed, epoch, position in the epoch), so a
//! batch is the same whichever thread makes it and whether or not the run was resumed.

use image::{DynamicImage, GenericImageView};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use repvgg_checkpoint::Preprocessing;
use repvgg_checkpoint::metadata::Resize;

use crate::{DataError, DataErrorKind, Samples};

/// The geometric part of a pipeline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Transform {
    /// The stored image as it is (small data sets evaluated at their native size).
    Identity,
    /// Zero-pad by `pad` on every side, crop back to the original size at a random offset,
    /// flip horizontally with probability 1/2: the CIFAR recipe.
    PadCropFlip { pad: usize },
    /// torchvision's RandomResizedCrop (scale 0.08..1, aspect 3/4..4/3) to `size`, then a
    /// horizontal flip with probability 1/2: the ImageNet recipe.
    RandomResizedCrop { size: usize },
    /// Resize the short side to `resize` (bilinear), crop the centre `crop` x `crop`: evaluation.
    ResizeCenterCrop { resize: usize, crop: usize },
    /// Resize the whole image to `height` x `width` (bilinear, aspect not kept); an image
    /// already that size is left as it is.
    Resize { height: usize, width: usize },
}

/// A transform followed by `(x / 255 - mean) / std`; grey images become three equal channels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pipeline {
    pub transform: Transform,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Make colour images grey first (ITU-R 601 luma, as Pillow's `convert("L")`), for models
    /// trained on grey data.
    pub grey: bool,
}

/// A batch, NCHW `f32`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<usize>,
    pub shape: [usize; 4],
}

/// A seed per (run, epoch, step) mixed so that nearby inputs give unrelated streams.
pub fn mix_seed(parts: &[u64]) -> u64 {
    // SplitMix64 finaliser over the parts.
    parts.iter().fold(0x9E37_79B9_7F4A_7C15u64, |acc, &p| {
        let mut z = acc ^ p.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// The order in which an epoch visits `n` samples.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(mix_seed(&[
        seed,
        epoch as u64,
        1,
    ])));
    order
}

/// torchvision's RandomResizedCrop box: ten tries at a random area and aspect ratio, then the
/// centre crop clamped to the allowed ratios. Returns (x, y, w, h).
fn random_resized_box(width: u32, height: u32, rng: &mut impl Rng) -> (u32, u32, u32, u32) {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(0.08..=1.0);
        let ratio = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * ratio).sqrt().round() as u32;
        let h = (target / ratio).sqrt().round() as u32;
        if 0 < w && w <= width && 0 < h && h <= height {
            let x = rng.random_range(0..=width - w);
            let y = rng.random_range(0..=height - h);
            return (x, y, w, h);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < 3.0 / 4.0 {
        (width, (width as f64 / (3.0 / 4.0)).round() as u32)
    } else if in_ratio > 4.0 / 3.0 {
        ((height as f64 * 4.0 / 3.0).round() as u32, height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// Resize so that the short side is `short`, keeping the aspect ratio (torchvision's rounding:
/// the long side is truncated).
pub fn resize_short_side(img: &DynamicImage, short: u32) -> DynamicImage {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return img.clone();
    }
    let (nw, nh) = if w <= h {
        (short, (short as u64 * h as u64 / w as u64) as u32)
    } else {
        ((short as u64 * w as u64 / h as u64) as u32, short)
    };
    resize_bilinear(img, nw, nh)
}

/// Fixed-point precision of Pillow's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output index along one axis: the first input index and the fixed-point weights of
/// the antialiased triangle filter (support grows with the downscale factor).
fn bilinear_coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (lo..hi)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filter_scale).abs();
                    (1.0 - t).max(0.0)
                })
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let v = w / total * (1u64 << PRECISION_BITS) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect();
            (lo, fixed)
        })
        .collect()
}

/// One separable pass over `rows` lines of `len` pixels, `channels` interleaved, reading with
/// `stride` between taps: 8-bit in, 8-bit out, rounded as Pillow rounds.
fn resample_axis(
    src: &[u8],
    coefficients: &[(usize, Vec<i32>)],
    sample: impl Fn(usize, usize) -> usize,
    lines: usize,
    channels: usize,
    out: &mut [u8],
    place: impl Fn(usize, usize) -> usize,
) {
    for line in 0..lines {
        for (i, (lo, weights)) in coefficients.iter().enumerate() {
            for c in 0..channels {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (k, &w) in weights.iter().enumerate() {
                    acc += src[sample(line, lo + k) * channels + c] as i64 * w as i64;
                }
                out[place(line, i) * channels + c] = (acc >> PRECISION_BITS).clamp(0, 255) as u8;
            }
        }
    }
}

/// Bilinear resize with Pillow's algorithm (antialiased triangle filter, horizontal pass then
/// vertical, 8-bit fixed point between and after), so that preprocessing matches the
/// torchvision/timm pipelines that resize PIL images. The `image` crate's triangle filter
/// differs from it by up to two grey levels (it keeps floats between passes).
pub fn resize_bilinear(img: &DynamicImage, width: u32, height: u32) -> DynamicImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = (width as usize, height as usize);
    let grey = img.color().channel_count() <= 2;
    let (src, channels) = if grey {
        (img.to_luma8().into_raw(), 1)
    } else {
        (img.to_rgb8().into_raw(), 3)
    };
    let mut horizontal = vec![0u8; h * nw * channels];
    resample_axis(
        &src,
        &bilinear_coefficients(w, nw),
        |y, x| y * w + x,
        h,
        channels,
        &mut horizontal,
        |y, x| y * nw + x,
    );
    let mut out = vec![0u8; nh * nw * channels];
    resample_axis(
        &horizontal,
        &bilinear_coefficients(h, nh),
        |x, y| y * nw + x,
        nw,
        channels,
        &mut out,
        |x, y| y * nw + x,
    );
    if grey {
        DynamicImage::ImageLuma8(image::GrayImage::from_raw(width, height, out).unwrap())
    } else {
        DynamicImage::ImageRgb8(image::RgbImage::from_raw(width, height, out).unwrap())
    }
}

/// Grey as Pillow's `convert("L")` and torchvision's `Grayscale` make it (ITU-R 601 weights,
/// Pillow's fixed-point rounding), not the `image` crate's Rec. 709 weights: a colour photo fed
/// to a grey model gets the pixels a PyTorch user would have trained on.
pub fn luma_601(img: &DynamicImage) -> DynamicImage {
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    let grey: Vec<u8> = rgb
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0.map(u32::from);
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
        })
        .collect();
    DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, grey).expect("w * h pixels"))
}

/// The centre `size` x `size` crop at torchvision's offsets: `round((side - size) / 2)` with
/// Python's rounding, half to even (79.5 -> 80, 80.5 -> 80).
pub fn center_crop(img: &DynamicImage, size: u32) -> DynamicImage {
    let (w, h) = img.dimensions();
    let x = ((w.saturating_sub(size)) as f64 / 2.0).round_ties_even() as u32;
    let y = ((h.saturating_sub(size)) as f64 / 2.0).round_ties_even() as u32;
    img.crop_imm(x, y, size.min(w), size.min(h))
}

impl Pipeline {
    /// The evaluation pipeline a model's weights file describes.
    pub fn for_model(preprocessing: &Preprocessing) -> Pipeline {
        let [height, width] = preprocessing.size;
        let transform = match preprocessing.resize {
            Resize::CenterCrop { .. } => Transform::ResizeCenterCrop {
                resize: preprocessing.resize_short_side().unwrap_or(height),
                crop: height,
            },
            Resize::Stretch => Transform::Resize { height, width },
        };
        Pipeline {
            transform,
            mean: preprocessing.mean,
            std: preprocessing.std,
            grey: preprocessing.grey,
        }
    }

    /// The output's (height, width) for stored images of `(height, width)`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.transform {
            Transform::Identity | Transform::PadCropFlip { .. } => (height, width),
            Transform::RandomResizedCrop { size } => (size, size),
            Transform::ResizeCenterCrop { crop, .. } => (crop, crop),
            Transform::Resize { height, width } => (height, width),
        }
    }

    /// One image as normalised CHW `f32`, three channels, with its (height, width).
    pub fn apply(&self, img: &DynamicImage, rng: &mut impl Rng) -> (Vec<f32>, usize, usize) {
        let grey;
        let img = if self.grey && img.color().channel_count() > 2 {
            grey = luma_601(img);
            &grey
        } else {
            img
        };
        let (w, h) = img.dimensions();
        let (img, flip): (std::borrow::Cow<DynamicImage>, bool) = match self.transform {
            Transform::Identity => (std::borrow::Cow::Borrowed(img), false),
            Transform::PadCropFlip { pad } => {
                let dx = rng.random_range(0..=2 * pad) as i64 - pad as i64;
                let dy = rng.random_range(0..=2 * pad) as i64 - pad as i64;
                let flip = rng.random_bool(0.5);
                return self.normalise_shifted(img, dx, dy, flip);
            }
            Transform::RandomResizedCrop { size } => {
                let (x, y, cw, ch) = random_resized_box(w, h, rng);
                let flip = rng.random_bool(0.5);
                let crop = img.crop_imm(x, y, cw, ch);
                let resized = resize_bilinear(&crop, size as u32, size as u32);
                (std::borrow::Cow::Owned(resized), flip)
            }
            Transform::ResizeCenterCrop { resize, crop } => {
                let resized = resize_short_side(img, resize as u32);
                (
                    std::borrow::Cow::Owned(center_crop(&resized, crop as u32)),
                    false,
                )
            }
            Transform::Resize { height, width } if (h as usize, w as usize) == (height, width) => {
                (std::borrow::Cow::Borrowed(img), false)
            }
            Transform::Resize { height, width } => (
                std::borrow::Cow::Owned(resize_bilinear(img, width as u32, height as u32)),
                false,
            ),
        };
        self.normalise_shifted(&img, 0, 0, flip)
    }

    /// Normalised output of `img` shifted by (dx, dy) with zeros (black) outside, optionally
    /// mirrored: pixel (y, x) of the result is source pixel (y + dy, x + dx).
    fn normalise_shifted(
        &self,
        img: &DynamicImage,
        dx: i64,
        dy: i64,
        flip: bool,
    ) -> (Vec<f32>, usize, usize) {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let grey;
        let rgb;
        let (pixels, channels): (&[u8], usize) = match img {
            DynamicImage::ImageLuma8(g) => (g.as_raw(), 1),
            DynamicImage::ImageRgb8(c) => (c.as_raw(), 3),
            other if other.color().channel_count() <= 2 => {
                grey = other.to_luma8();
                (grey.as_raw(), 1)
            }
            other => {
                rgb = other.to_rgb8();
                (rgb.as_raw(), 3)
            }
        };
        let mut out = vec![0f32; 3 * h * w];
        for c in 0..3 {
            let scale = 1.0 / (255.0 * self.std[c]);
            let offset = -self.mean[c] / self.std[c];
            let src_c = if channels == 1 { 0 } else { c };
            for y in 0..h {
                let sy = y as i64 + dy;
                for x in 0..w {
                    let xx = if flip { w - 1 - x } else { x };
                    let sx = xx as i64 + dx;
                    let value = if (0..h as i64).contains(&sy) && (0..w as i64).contains(&sx) {
                        pixels[(sy as usize * w + sx as usize) * channels + src_c] as f32
                    } else {
                        0.0
                    };
                    out[(c * h + y) * w + x] = value * scale + offset;
                }
            }
        }
        (out, h, w)
    }

    /// The samples at `indices`, transformed in parallel; `seed` fixes every random choice.
    pub fn batch(
        &self,
        samples: &dyn Samples,
        indices: &[usize],
        seed: u64,
    ) -> Result<Batch, DataError> {
        let images: Vec<(Vec<f32>, usize, usize)> = indices
            .par_iter()
            .enumerate()
            .map(|(k, &i)| {
                let mut rng = StdRng::seed_from_u64(mix_seed(&[seed, k as u64]));
                samples.image(i).map(|img| self.apply(&img, &mut rng))
            })
            .collect::<Result<_, _>>()?;
        let Some(&(_, h, w)) = images.first() else {
            return Ok(Batch {
                images: Vec::new(),
                labels: Vec::new(),
                shape: [0, 3, 0, 0],
            });
        };
        let mut flat = Vec::with_capacity(3 * h * w * images.len());
        for (k, (img, ih, iw)) in images.iter().enumerate() {
            if (*ih, *iw) != (h, w) {
                let i = indices[k];
                return Err(DataError {
                    path: samples.describe(i).into(),
                    kind: DataErrorKind::Layout,
                    problem: format!(
                        "image size differs from the batch's {h}x{w}; use a resizing transform"
                    ),
                });
            }
            flat.extend_from_slice(img);
        }
        Ok(Batch {
            images: flat,
            labels: indices.iter().map(|&i| samples.label(i)).collect(),
            shape: [indices.len(), 3, h, w],
        })
    }
}
