//! Evaluation preprocessing against the reference pipelines (torchvision's and timm's
//! transforms on PIL, `reference/make_predict_fixtures.py`), on CC0 photos.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use repvgg_checkpoint::ImageNetPreset;
use repvgg_data::{IMAGENET_MEAN, IMAGENET_STD, Pipeline, decode_image};

fn photos() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/photos")
}

/// Preprocessing resizes with Pillow's own algorithm (fixed point, same rounding), so on the
/// PNG photo every value equals the reference's exactly. The JPEG photo is decoded by a
/// different decoder than Pillow's libjpeg-turbo (the `image` crate's zune-jpeg; its IDCT and
/// colour conversion round differently): up to 2 levels on under 1% of values, which the
/// bound allows; a geometry error (a crop off by one pixel) moves edges by tens of levels.
#[test]
fn every_preset_matches_the_reference_pipeline() {
    for photo in ["chelsea.png", "rocket.jpg"] {
        let img = decode_image(&photos().join(photo)).unwrap();
        for (preset, name) in [
            (ImageNetPreset::Official, "official"),
            (ImageNetPreset::Timm, "timm"),
            (ImageNetPreset::D2se, "d2se"),
        ] {
            let stem = photo.split('.').next().unwrap();
            let expected = image::open(photos().join(format!("expected/{stem}_{name}.png")))
                .unwrap()
                .to_rgb8();
            let pipeline = Pipeline::for_model(&preset.preprocessing());
            let (ours, h, w) = pipeline.apply(&img, &mut StdRng::seed_from_u64(0));
            assert_eq!(
                (w as u32, h as u32),
                expected.dimensions(),
                "{photo} {name}"
            );
            let (mut worst, mut off) = (0f32, 0usize);
            for c in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        let level = (ours[(c * h + y) * w + x] * IMAGENET_STD[c]
                            + IMAGENET_MEAN[c])
                            * 255.0;
                        let diff = (level - expected.get_pixel(x as u32, y as u32)[c] as f32).abs();
                        worst = worst.max(diff);
                        off += (diff > 0.5) as usize;
                    }
                }
            }
            eprintln!(
                "{photo} {name}: max difference {worst:.3} levels, {:.2}% of values differ",
                100.0 * off as f64 / (3 * h * w) as f64
            );
            if photo.ends_with(".png") {
                // Exact up to the float rounding of normalising and undoing it here.
                assert!(worst < 1e-3, "{photo} {name}: {worst} levels");
            } else {
                assert!(worst <= 2.0 + 1e-3, "{photo} {name}: {worst} levels");
                assert!(off * 100 < 3 * h * w, "{photo} {name}: {off} values differ");
            }
        }
    }
}

#[test]
fn a_truncated_jpeg_is_an_error_naming_it() {
    let err = decode_image(&photos().join("broken.jpg"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.jpg"), "{err}");
}

#[test]
fn the_imagenet_class_names_are_the_thousand_in_order() {
    let names = repvgg_data::imagenet_class_names();
    assert_eq!(names.len(), 1000);
    assert_eq!(names[0], "tench, Tinca tinca");
    assert_eq!(names[281], "tabby, tabby cat");
    assert_eq!(names[504], "coffee mug");
}
