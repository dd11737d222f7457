//! Preprocessing and class names travel with the weights: written into the safetensors
//! header, read back, carried through conversion, and checked on load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use repvgg_checkpoint::metadata::{Interpolation, Resize};
use repvgg_checkpoint::{Checkpoint, ImageNetPreset, Naming, Preprocessing};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel)
}

fn grey_28() -> Preprocessing {
    Preprocessing {
        size: [28, 28],
        grey: true,
        resize: Resize::Stretch,
        interpolation: Interpolation::Bilinear,
        mean: [0.286; 3],
        std: [0.353; 3],
    }
}

#[test]
fn preprocessing_and_labels_survive_saving_and_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let mut ckpt = Checkpoint::load(&fixture("tiny/train_official.pth"), None).unwrap();
    assert_eq!(ckpt.preprocessing, None, "published files carry none");
    let classes = ckpt.spec.num_classes;
    ckpt.preprocessing = Some(grey_28());
    ckpt.labels = Some((0..classes).map(|k| format!("class {k}")).collect());
    let path = dir.path().join("train.safetensors");
    ckpt.save_safetensors(&path, Naming::Timm).unwrap();
    let back = Checkpoint::load(&path, None).unwrap();
    assert_eq!(back.preprocessing, ckpt.preprocessing);
    assert_eq!(back.labels, ckpt.labels);
    assert_eq!(back.spec, ckpt.spec, "the recorded architecture is used");

    let deploy = back.to_deploy(1e-5).unwrap();
    let path = dir.path().join("deploy.safetensors");
    deploy.save_safetensors(&path, Naming::Official).unwrap();
    let back = Checkpoint::load(&path, None).unwrap();
    assert_eq!(back.preprocessing, Some(grey_28()));
    assert_eq!(back.labels.unwrap()[1], "class 1");
}

/// Rewrites `path` with extra header metadata.
fn with_metadata(path: &Path, out: &Path, extra: &[(&str, &str)]) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let metadata: HashMap<String, String> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let views: Vec<_> = st.tensors();
    std::fs::write(out, safetensors::serialize(views, Some(metadata)).unwrap()).unwrap();
}

#[test]
fn metadata_that_does_not_fit_the_model_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixture("tiny/deploy_official.safetensors");
    let bad = dir.path().join("labels.safetensors");
    with_metadata(&source, &bad, &[("repvgg.labels", r#"["only one"]"#)]);
    let err = Checkpoint::load(&bad, None).unwrap_err().to_string();
    assert!(
        err.contains("labels.safetensors") && err.contains("1 class names for a model with"),
        "{err}"
    );

    let mut p = ImageNetPreset::Official.preprocessing();
    p.std = [0.0; 3];
    let json = serde_json::to_string(&p).unwrap();
    let bad = dir.path().join("std.safetensors");
    with_metadata(&source, &bad, &[("repvgg.preprocessing", &json)]);
    let err = Checkpoint::load(&bad, None).unwrap_err().to_string();
    assert!(
        err.contains("std.safetensors") && err.contains("std"),
        "{err}"
    );
}
