//! Export a checkpoint's deploy form as ONNX, with a symbolic batch dimension.
//!
//!     cargo run -p repvgg-onnx --example export_onnx [-- CHECKPOINT OUT.onnx]

use std::path::PathBuf;

use repvgg_checkpoint::Checkpoint;
use repvgg_onnx::{ExportOptions, export};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Flags are cargo test's (`-- --nocapture`), not ours.
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with('-'));
    let weights = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny_g4/train_official.pth")
    });
    let out = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("repvgg-example.onnx"));
    let ckpt = Checkpoint::load(&weights, None)?;
    let options = ExportOptions {
        dynamic_batch: true,
        ..ExportOptions::default()
    };
    // Training-form weights are converted first; the graph is the plain 3x3-conv stack.
    let bytes = export(&ckpt, 1e-5, options)?;
    repvgg_checkpoint::write_atomically(&out, &bytes)?;
    println!(
        "{} -> {} ({} bytes): input `input` (batch, {}, 224, 224), output `logits` (batch, {})",
        weights.display(),
        out.display(),
        bytes.len(),
        ckpt.spec.in_channels,
        ckpt.spec.num_classes
    );
    Ok(())
}
