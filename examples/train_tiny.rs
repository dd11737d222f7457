//! Build a small RepVGG, train its multi-branch form for one epoch on the committed
//! Fashion-MNIST subset, convert it, and check the two forms agree on every test image.
//!
//!     cargo run -p repvgg-train --example train_tiny

use std::path::Path;

use repvgg_arch::ArchSpec;
use repvgg_train::{RunOptions, TrainConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fashion-mnist-subset");
    let data = repvgg_data::open_dir(&data_dir, 0.1)?;

    // Any variant or custom spec; this one is sized for 28x28 images.
    let arch = ArchSpec::parse("depths=1,1,1,1;widths=16,32,64,64;stem=16;classes=10")?;
    let config = TrainConfig {
        epochs: 1,
        batch_size: 64,
        ..TrainConfig::small_images(arch)
    };
    let out = std::env::temp_dir().join("repvgg-example-train");
    // The example's own scratch run: replaced each time (a real run in `out` is refused
    // without `overwrite` or `resume`).
    let options = RunOptions {
        progress: false,
        overwrite: true,
        ..RunOptions::default()
    };
    let mut trainer = Trainer::new(config, &data, &out, options)?;
    trainer.run()?;
    for epoch in trainer.history() {
        println!(
            "epoch {}: train loss {:.3}, validation accuracy {:.3}",
            epoch.epoch, epoch.train_loss, epoch.val_acc
        );
    }
    // Evaluates both forms, compares every prediction, writes deploy.safetensors.
    let report = trainer.finish()?;
    println!(
        "train form {:.3}, deploy form {:.3}, {} disagreements; deploy weights in {}",
        report.train_form.top1,
        report.deploy_form.top1,
        report.disagreements,
        report.deploy_path.display()
    );
    assert_eq!(report.disagreements, 0);
    Ok(())
}
