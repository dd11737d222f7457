//! Load a PyTorch checkpoint (any form, any naming), convert it to the deploy form, save it, and
//! run it on the engine. Light crates only: no training framework is compiled.
//!
//!     cargo run -p repvgg-engine --example convert_and_run [-- CHECKPOINT]

use std::path::PathBuf;

use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_checkpoint::{Checkpoint, Naming};
use repvgg_engine::{Engine, Workspace};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Flags are cargo test's (`-- --nocapture`), not ours.
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny_se/train_timm.pth")
        });
    // Form, naming and architecture are read from the file itself.
    let ckpt = Checkpoint::load(&path, None)?;
    println!(
        "{}: {} form, {:?} naming, {}",
        path.display(),
        ckpt.form,
        ckpt.naming,
        ckpt.spec.name
    );

    // Structural re-parameterization: one 3x3 conv + bias per block.
    let deploy = ckpt.to_deploy(DEFAULT_BN_EPS)?;
    let out = std::env::temp_dir().join("repvgg-example-deploy.safetensors");
    deploy.save_safetensors(&out, Naming::Official)?;
    println!("deploy weights: {}", out.display());

    // The fast path: a batch of two 64x64 images, NCHW.
    let engine = Engine::from_checkpoint(&deploy, DEFAULT_BN_EPS)?;
    let (n, h, w) = (2, 64, 64);
    let input: Vec<f32> = (0..n * 3 * h * w)
        .map(|i| (i % 17) as f32 / 17.0 - 0.5)
        .collect();
    let logits = engine.forward(&input, n, h, w, &mut Workspace::default())?;
    let classes = deploy.spec.num_classes;
    for (i, row) in logits.chunks_exact(classes).enumerate() {
        let best = (0..classes)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        println!("image {i}: class {best} (logit {:.3})", row[best]);
    }

    // The training form on the same input gives the same logits (to f32 rounding).
    let again = Engine::from_checkpoint(&ckpt, DEFAULT_BN_EPS)?.forward(
        &input,
        n,
        h,
        w,
        &mut Workspace::default(),
    )?;
    let diff = logits
        .iter()
        .zip(&again)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("max |difference| converting in memory instead: {diff:.1e}");
    Ok(())
}
