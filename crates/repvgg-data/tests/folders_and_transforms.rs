//! Image folders built at test time from real Fashion-MNIST pixels (PNG and JPEG), the
//! augmentations, and broken data.

use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage};
use rand::SeedableRng;
use rand::rngs::StdRng;
use repvgg_data::loader::EpochPlan;
use repvgg_data::transform::epoch_order;
use repvgg_data::{
    DataKind, IMAGENET_MEAN, IMAGENET_STD, Loader, Pipeline, Samples, Split, Transform,
    load_idx_dir, open_dir,
};

fn subset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fashion-mnist-subset")
}

fn plain(transform: Transform) -> Pipeline {
    Pipeline {
        transform,
        mean: [0.0; 3],
        std: [1.0; 3],
        grey: false,
    }
}

/// Writes the first `per_class` images of classes 0..3 as class folders, PNG for even
/// indices and JPEG for odd ones.
fn write_folder(root: &Path, per_class: usize) {
    let data = load_idx_dir(&subset(), Split::Test).unwrap();
    let mut written = [0usize; 3];
    for i in 0..data.len() {
        let label = data.labels[i] as usize;
        if label >= 3 || written[label] == per_class {
            continue;
        }
        let dir = root.join(format!("class_{label}"));
        std::fs::create_dir_all(&dir).unwrap();
        let img = GrayImage::from_raw(28, 28, data.pixels(i).to_vec()).unwrap();
        let ext = if written[label] % 2 == 0 {
            "png"
        } else {
            "jpg"
        };
        img.save(dir.join(format!("{:03}.{ext}", written[label])))
            .unwrap();
        written[label] += 1;
    }
}

#[test]
fn an_image_folder_loads_splits_and_decodes() {
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), 10);
    let data = open_dir(dir.path(), 0.2).unwrap();
    assert_eq!(data.kind, DataKind::ImageFolder);
    assert_eq!(
        data.class_names.as_deref().unwrap(),
        ["class_0", "class_1", "class_2"]
    );
    // 2 of every 10 per class held out, stratified.
    assert_eq!((data.train.len(), data.test.len()), (24, 6));
    assert_eq!(
        (0..6).map(|i| data.test.label(i)).collect::<Vec<_>>(),
        [0, 0, 1, 1, 2, 2]
    );
    // Grey PNGs decode to the stored pixels exactly; grey becomes three equal channels.
    let img = data.train.image(0).unwrap();
    assert_eq!((img.width(), img.height()), (28, 28));
    let pipeline = Pipeline {
        transform: Transform::ResizeCenterCrop {
            resize: 32,
            crop: 24,
        },
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
        grey: false,
    };
    let batch = pipeline.batch(data.test.as_ref(), &[0, 1, 2], 0).unwrap();
    assert_eq!(batch.shape, [3, 3, 24, 24]);
    let plane = 24 * 24;
    for p in 0..plane {
        let grey = (batch.images[p] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255.0;
        let green = (batch.images[plane + p] * IMAGENET_STD[1] + IMAGENET_MEAN[1]) * 255.0;
        assert!((grey - green).abs() < 1e-3);
    }
    // RandomResizedCrop always yields the asked size, whatever crop it draws.
    let rrc = plain(Transform::RandomResizedCrop { size: 20 });
    let batch = rrc
        .batch(data.train.as_ref(), &(0..24).collect::<Vec<_>>(), 3)
        .unwrap();
    assert_eq!(batch.shape, [24, 3, 20, 20]);
}

#[test]
fn broken_images_and_empty_classes_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), 4);
    // A truncated PNG.
    let victim = dir.path().join("class_1/000.png");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let data = open_dir(dir.path(), 0.25).unwrap();
    let all: Vec<usize> = (0..data.train.len()).collect();
    let err = plain(Transform::ResizeCenterCrop {
        resize: 28,
        crop: 28,
    })
    .batch(data.train.as_ref(), &all, 0)
    .unwrap_err()
    .to_string();
    assert!(err.contains("class_1") && err.contains("000.png"), "{err}");

    // An empty class folder.
    std::fs::create_dir(dir.path().join("class_9")).unwrap();
    let err = open_dir(dir.path(), 0.25).err().unwrap().to_string();
    assert!(err.contains("class_9") && err.contains("no .jpg"), "{err}");
}

#[test]
fn pad_crop_flip_shifts_and_mirrors_the_real_pixels() {
    let data = load_idx_dir(&subset(), Split::Test).unwrap();
    let img = Samples::image(&data, 0).unwrap();
    let DynamicImage::ImageLuma8(grey) = &img else {
        panic!("grey")
    };
    let pipeline = plain(Transform::PadCropFlip { pad: 4 });
    let mut seen_flip = [false; 2];
    for seed in 0..40 {
        let (out, h, w) = pipeline.apply(&img, &mut StdRng::seed_from_u64(seed));
        assert_eq!((h, w), (28, 28));
        // Find the shift and flip that explain the output: exactly one must.
        let mut explained = 0;
        for flip in [false, true] {
            for dy in -4i64..=4 {
                for dx in -4i64..=4 {
                    let matches = (0..28).all(|y| {
                        (0..28).all(|x| {
                            let xx = if flip { 27 - x } else { x } as i64 + dx;
                            let yy = y as i64 + dy;
                            let src = if (0..28).contains(&xx) && (0..28).contains(&yy) {
                                grey.get_pixel(xx as u32, yy as u32)[0] as f32 / 255.0
                            } else {
                                0.0
                            };
                            (out[y * 28 + x] - src).abs() < 1e-6
                        })
                    });
                    if matches {
                        explained += 1;
                        seen_flip[flip as usize] = true;
                    }
                }
            }
        }
        assert!(explained >= 1, "seed {seed}: no shift explains the output");
    }
    assert_eq!(seen_flip, [true, true]);
}

#[test]
fn epochs_are_shuffled_deterministically_and_batches_are_reproducible() {
    let a = epoch_order(1000, 7, 3);
    assert_eq!(a, epoch_order(1000, 7, 3));
    assert_ne!(a, epoch_order(1000, 7, 4));
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());

    let data: std::sync::Arc<dyn Samples> =
        std::sync::Arc::new(load_idx_dir(&subset(), Split::Test).unwrap());
    let pipeline = plain(Transform::PadCropFlip { pad: 2 });
    let plan = |first_step| EpochPlan {
        batch_size: 64,
        seed: 11,
        epoch: 2,
        first_step,
        training: true,
    };
    let all: Vec<_> = Loader::new(data.clone(), pipeline, plan(0))
        .map(Result::unwrap)
        .collect();
    assert_eq!(all.len(), 500 / 64);
    // Starting at step 3 (a resumed run) gives exactly batches 3.. of the full epoch.
    let resumed: Vec<_> = Loader::new(data, pipeline, plan(3))
        .map(Result::unwrap)
        .collect();
    assert_eq!(resumed, all[3..]);
}

#[test]
fn dataset_statistics_are_those_of_the_pixels() {
    let data = load_idx_dir(&subset(), Split::Train).unwrap();
    let (mean, std) = data.channel_stats();
    let values: Vec<f64> = data.images.iter().map(|&p| p as f64 / 255.0).collect();
    let m = values.iter().sum::<f64>() / values.len() as f64;
    let s = (values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / values.len() as f64).sqrt();
    assert!((mean[0] as f64 - m).abs() < 1e-5 && mean[0] == mean[2]);
    assert!((std[0] as f64 - s).abs() < 1e-5 && std[1] == std[0]);
    // Fashion-MNIST's published statistics are about 0.286 / 0.353.
    assert!(
        (0.25..0.32).contains(&m) && (0.32..0.38).contains(&s),
        "{m} {s}"
    );
}

#[test]
fn missing_and_unrecognised_data_directories_say_so() {
    let err = open_dir(Path::new("/nonexistent/data"), 0.1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("/nonexistent/data") && err.contains("not a directory"),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = open_dir(empty.path(), 0.1).err().unwrap().to_string();
    assert!(err.contains("no class folders"), "{err}");
}

/// What a weights file records becomes the pipeline `predict` uses: a grey model turns colour
/// input grey (Pillow's luma weights), and a stretch leaves images of the model's size as they
/// are and resizes others to it.
#[test]
fn a_model_pipeline_makes_colour_grey_and_stretches_to_size() {
    use repvgg_checkpoint::Preprocessing;
    use repvgg_checkpoint::metadata::{Interpolation, Resize};
    let p = Preprocessing {
        size: [4, 6],
        grey: true,
        resize: Resize::Stretch,
        interpolation: Interpolation::Bilinear,
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    let pipeline = Pipeline::for_model(&p);
    // One colour, (200, 100, 50): ITU-R 601 luma = (200*299 + 100*587 + 50*114) / 1000 = 124.
    let rgb = image::RgbImage::from_pixel(6, 4, image::Rgb([200, 100, 50]));
    let (out, h, w) = pipeline.apply(&DynamicImage::ImageRgb8(rgb), &mut StdRng::seed_from_u64(0));
    assert_eq!((h, w), (4, 6));
    assert!(
        out.iter().all(|&v| (v - 124.0 / 255.0).abs() < 1e-6),
        "{out:?}"
    );
    // A larger image is resized to the model's size.
    let big = GrayImage::from_pixel(12, 8, image::Luma([255]));
    let (out, h, w) = pipeline.apply(
        &DynamicImage::ImageLuma8(big),
        &mut StdRng::seed_from_u64(0),
    );
    assert_eq!((h, w, out.len()), (4, 6, 3 * 4 * 6));
    assert!(out.iter().all(|&v| (v - 1.0).abs() < 1e-6));
}

#[test]
fn known_data_sets_name_their_classes() {
    let data = open_dir(&subset(), 0.1).unwrap();
    let names = data.class_names.unwrap();
    assert_eq!(names.len(), 10);
    assert_eq!(
        (names[0].as_str(), names[9].as_str()),
        ("T-shirt/top", "Ankle boot")
    );
    assert!(data.grey);
    // IDX records no names: a directory that is not named after a known set gets none.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(subset()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    assert_eq!(open_dir(dir.path(), 0.1).unwrap().class_names, None);
    // A directory named mnist holds digits; a parent's name says nothing.
    let digits = dir.path().join("fashion-stuff").join("mnist");
    std::fs::create_dir_all(&digits).unwrap();
    for entry in std::fs::read_dir(subset()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, digits.join(path.file_name().unwrap())).unwrap();
    }
    let names = open_dir(&digits, 0.1).unwrap().class_names.unwrap();
    assert_eq!(names[3], "3");
}

#[test]
fn a_validation_share_outside_zero_to_one_is_refused_with_the_alternative() {
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), 4);
    for share in [0.0, 1.0, -0.5] {
        let err = open_dir(dir.path(), share).err().unwrap().to_string();
        assert!(
            err.contains("(0, 1)") && err.contains("val/"),
            "{share}: {err}"
        );
    }
}
