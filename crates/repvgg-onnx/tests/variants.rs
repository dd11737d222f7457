//! Every named variant (and a dilated headless backbone), exported and run by ONNX Runtime,
//! against the engine.

use std::collections::HashMap;

use repvgg_arch::{ArchSpec, Form, VARIANT_NAMES};
use repvgg_checkpoint::{Checkpoint, StateDict, Tensor, random, write_safetensors};
use repvgg_engine::{Engine, Workspace};
use repvgg_onnx::{ExportOptions, export};

/// All 14 variants at 32x40 (small input, full-size weights: up to 130M parameters), batch 3,
/// exported with a symbolic batch for batch 1. The tolerance is 1e-5 relative: both runtimes
/// compute in f32 and sum in different orders over up to 2,560-channel reductions.
#[test]
fn every_named_variant_exports_and_agrees_in_onnxruntime() {
    let Some(python) = repvgg_testing::python_with(&["onnx", "onnxruntime", "safetensors"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (n, h, w) = (3, 32, 40);
    let input: Vec<f32> = (0..n * 3 * h * w)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let input_path = dir.path().join("input.safetensors");
    write_safetensors(
        &input_path,
        &StateDict::from([("input".into(), Tensor::new(vec![n, 3, h, w], input.clone()))]),
        None,
    )
    .unwrap();
    // The 14 variants, and a dilated PSPNet-style backbone with a headless twin.
    let specs = VARIANT_NAMES.iter().map(|n| n.to_string()).chain([
        "A0;strides=2,2,2,1,1;dilations=1,1,1,2,4;classes=10".to_string(),
        "A0;strides=2,2,2,1,1;dilations=1,1,1,2,4;classes=0".to_string(),
    ]);
    for name in specs {
        let spec = ArchSpec::parse(&name).unwrap();
        let ckpt = Checkpoint::from_state_dict(
            spec.clone(),
            Form::Train,
            random::training_weights(&spec, 5),
        )
        .unwrap();
        let options = ExportOptions {
            dynamic_batch: true,
            height: h,
            width: w,
            ..ExportOptions::default()
        };
        // Converted once for both (B3: 3.7 s a conversion); exporting training checkpoints
        // is covered by the CLI test, on the fixtures of both forms.
        let deploy = ckpt.to_deploy(1e-5).unwrap();
        let model = dir.path().join("model.onnx");
        std::fs::write(&model, export(&deploy, 1e-5, options).unwrap()).unwrap();
        let engine = Engine::from_checkpoint(&deploy, 1e-5).unwrap();
        let logits = engine
            .forward(&input, n, h, w, &mut Workspace::default())
            .unwrap();
        let expected = dir.path().join("expected.safetensors");
        // check_onnx.py compares the graph's first output with tensor `logits`; a headless
        // graph's output is the pooled features.
        let width = if spec.num_classes == 0 {
            spec.feature_width()
        } else {
            spec.num_classes
        };
        let tensors = HashMap::from([("logits".to_string(), Tensor::new(vec![n, width], logits))]);
        write_safetensors(&expected, &tensors.into_iter().collect(), None).unwrap();
        let report = repvgg_testing::check_onnx(&python, &model, &input_path, &expected);
        eprintln!("{name}: {report}");
    }
}
