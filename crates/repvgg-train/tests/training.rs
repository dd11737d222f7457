//! Training on real data (the committed Fashion-MNIST subset): it learns, it resumes bit for
//! bit, and the converted model agrees with the trained one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use repvgg_arch::ArchSpec;
use repvgg_data::{DataKind, DataSplits, Dataset, Split, load_idx_dir};
use repvgg_train::{RunOptions, TrainConfig, Trainer};

fn subset_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fashion-mnist-subset")
}

fn head(data: Dataset, n: usize) -> Dataset {
    let size = data.channels * data.height * data.width;
    Dataset {
        images: data.images[..n * size].to_vec(),
        labels: data.labels[..n].to_vec(),
        ..data
    }
}

/// The first `train` / `test` images of the subset.
fn subset(train: usize, test: usize) -> DataSplits {
    let train = head(load_idx_dir(&subset_dir(), Split::Train).unwrap(), train);
    let test = head(load_idx_dir(&subset_dir(), Split::Test).unwrap(), test);
    DataSplits {
        kind: DataKind::Idx,
        native_size: Some((28, 28)),
        stats: Some(train.channel_stats()),
        train: Arc::new(train),
        test: Arc::new(test),
        grey: true,
        class_names: None,
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: false,
        ..RunOptions::default()
    }
}

/// The nearest-centroid classifier on raw pixels scores 67.8% on this subset's test images
/// (the baseline); a few epochs of a small RepVGG must beat it clearly.
#[test]
fn a_short_run_beats_the_nearest_centroid_baseline() {
    let data = subset(2000, 500);
    let arch = ArchSpec::parse("depths=1,2,2,1;widths=32,64,128,128;stem=32;classes=10").unwrap();
    let config = TrainConfig {
        epochs: 4,
        batch_size: 64,
        ..TrainConfig::small_images(arch)
    };
    let out = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(config, &data, out.path(), quiet()).unwrap();
    assert!(trainer.run().unwrap());
    let report = trainer.finish().unwrap();
    eprintln!(
        "test accuracy {:.4} (train form) / {:.4} (deploy form), history {:?}",
        report.train_form.top1,
        report.deploy_form.top1,
        trainer.history()
    );
    assert!(report.train_form.top1 > 0.75, "{}", report.train_form.top1);
    // The conversion is exact: the same prediction for every image.
    assert_eq!(report.disagreements, 0);
    assert_eq!(report.train_form.top1, report.deploy_form.top1);
    assert!(
        report.max_logit_rel_diff < 1e-5,
        "{}",
        report.max_logit_rel_diff
    );
    // The run left its artefacts: metrics per epoch, curves, both forms' weights.
    let csv = std::fs::read_to_string(out.path().join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 4);
    assert!(csv.starts_with("epoch,lr,train_loss,train_acc,val_loss,val_acc"));
    let png = image::open(out.path().join("curves.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1100, 450));
    for file in ["deploy.safetensors", "train.safetensors"] {
        repvgg_checkpoint::Checkpoint::load(&out.path().join(file), None).unwrap();
    }
}

fn small_config() -> TrainConfig {
    let arch = ArchSpec::parse("depths=1,1,1,1;widths=8,8,16,16;stem=8;classes=10").unwrap();
    TrainConfig {
        epochs: 2,
        batch_size: 32,
        // Exercise every optional part of the recipe, so that all of it must resume exactly.
        mixup_alpha: Some(0.2),
        custom_l2: true,
        nesterov: true,
        ..TrainConfig::small_images(arch)
    }
}

/// A run stopped anywhere (mid-epoch, right after an epoch) and resumed ends with exactly the
/// weights, running statistics and metrics of an uninterrupted run.
#[test]
fn an_interrupted_run_resumes_to_the_same_weights() {
    let data = subset(256, 64);
    let straight_dir = tempfile::tempdir().unwrap();
    let mut straight = Trainer::new(small_config(), &data, straight_dir.path(), quiet()).unwrap();
    assert!(straight.run().unwrap());
    assert_eq!(straight.global_step(), 16);

    let dir = tempfile::tempdir().unwrap();
    // Stopped at step 5 (mid-epoch 1), then at 11 (mid-epoch 2, after an epoch boundary),
    // each time with a fresh process-like Trainer built from the checkpoint.
    for stop in [Some(5), Some(11), None] {
        let options = RunOptions {
            resume: stop != Some(5),
            stop_after_steps: stop,
            ..quiet()
        };
        let mut trainer = Trainer::new(small_config(), &data, dir.path(), options).unwrap();
        let done = trainer.run().unwrap();
        assert_eq!(done, stop.is_none());
        if let Some(stop) = stop {
            assert_eq!(trainer.global_step(), stop);
            continue;
        }
        let ours = trainer.model().state_dict();
        let theirs = straight.model().state_dict();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>()
        );
        for (key, t) in &ours {
            assert_eq!(t.data, theirs[key].data, "{key} differs after resuming");
        }
        let metrics = |t: &Trainer| -> Vec<(f64, f64, f64, f64)> {
            t.history()
                .iter()
                .map(|r| (r.train_loss, r.train_acc, r.val_loss, r.val_acc))
                .collect()
        };
        assert_eq!(metrics(&trainer), metrics(&straight));
    }
}

#[test]
fn resuming_with_other_settings_is_refused() {
    let data = subset(64, 32);
    let dir = tempfile::tempdir().unwrap();
    let options = RunOptions {
        stop_after_steps: Some(1),
        ..quiet()
    };
    let mut first = Trainer::new(small_config(), &data, dir.path(), options).unwrap();
    assert!(!first.run().unwrap());
    let changed = TrainConfig {
        lr: 0.05,
        ..small_config()
    };
    let resume = RunOptions {
        resume: true,
        ..quiet()
    };
    let err = Trainer::new(changed, &data, dir.path(), resume)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("checkpoint.safetensors"), "{err}");
    assert!(err.contains("different settings"), "{err}");
    // The setting that differs is named with both values, not two JSON dumps.
    assert!(
        err.contains("--lr: 0.1 in the checkpoint, 0.05 now"),
        "{err}"
    );
    assert!(!err.contains("momentum"), "{err}");
}

#[test]
fn a_corrupt_checkpoint_is_an_error_naming_it() {
    let data = subset(64, 32);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("checkpoint.safetensors"),
        b"not a checkpoint",
    )
    .unwrap();
    let resume = RunOptions {
        resume: true,
        ..quiet()
    };
    let err = Trainer::new(small_config(), &data, dir.path(), resume)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("checkpoint.safetensors"), "{err}");
}

#[test]
fn a_diverging_run_stops_with_a_clear_error() {
    let data = subset(64, 32);
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        lr: 1e30,
        warmup_epochs: 0.0,
        custom_l2: false,
        mixup_alpha: None,
        ..small_config()
    };
    let mut trainer = Trainer::new(config, &data, dir.path(), quiet()).unwrap();
    let err = trainer.run().expect_err("diverges").to_string();
    assert!(err.contains("diverged"), "{err}");
}
