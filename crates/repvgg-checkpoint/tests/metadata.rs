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

/// An INT8 file round-trips, reads as its dequantized weights, and a broken or float one is
/// an error naming the file and what is wrong.
#[test]
fn int8_files_round_trip_and_broken_ones_say_what_is_missing() {
    use repvgg_checkpoint::quantized::{ActivationQuant, QuantizedModel};
    let dir = tempfile::tempdir().unwrap();
    let deploy = Checkpoint::load(&fixture("tiny/deploy_official.safetensors"), None).unwrap();
    let blocks = deploy.spec.blocks().len();
    let acts = vec![ActivationQuant::covering(-2.0, 3.0); blocks + 1];
    let model = QuantizedModel::quantize(&deploy, acts, "minmax", 4, 127, &[]).unwrap();
    let path = dir.path().join("q.safetensors");
    model.save(&path).unwrap();
    let back = QuantizedModel::load(&path).unwrap();
    assert_eq!(back.convs, model.convs);
    assert_eq!(back.info, model.info);
    // Float commands see scale x q: within half a step of the float weights.
    let float = Checkpoint::load(&path, None).unwrap();
    assert!(float.quantization().is_some());
    for (key, t) in &deploy.tensors {
        let ours = &float.tensors[key];
        let max = t.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = t
            .data
            .iter()
            .zip(&ours.data)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= max / 127.0 * 0.5 + 1e-7, "{key}: {worst}");
    }
    // A missing scale names the tensor.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let views: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k != "stage1.0.rbr_reparam.weight_scale")
        .collect();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(
        &cut,
        safetensors::serialize(views, header.metadata().clone()).unwrap(),
    )
    .unwrap();
    for err in [
        QuantizedModel::load(&cut).unwrap_err().to_string(),
        Checkpoint::load(&cut, None).unwrap_err().to_string(),
    ] {
        assert!(
            err.contains("cut.safetensors") && err.contains("stage1.0.rbr_reparam.weight_scale"),
            "{err}"
        );
    }
    // A float file where INT8 is required.
    let err = QuantizedModel::load(&fixture("tiny/deploy_official.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an INT8 model file"), "{err}");
}

/// Blocks kept in float are stored in f32, named in the metadata, and read back as such.
#[test]
fn int8_files_keep_their_float_blocks() {
    use repvgg_checkpoint::quantized::{ActivationQuant, QuantizedModel};
    let dir = tempfile::tempdir().unwrap();
    let deploy = Checkpoint::load(&fixture("tiny/deploy_official.safetensors"), None).unwrap();
    let blocks = deploy.spec.blocks().len();
    let acts = vec![ActivationQuant::covering(-2.0, 3.0); blocks + 1];
    let model =
        QuantizedModel::quantize(&deploy, acts, "minmax", 4, 127, &[0, blocks - 1]).unwrap();
    assert_eq!(
        model.info.float_layers,
        ["stage0", "stage4.0", "linear"].map(String::from)
    );
    let path = dir.path().join("q.safetensors");
    model.save(&path).unwrap();
    let back = QuantizedModel::load(&path).unwrap();
    assert_eq!(back.convs, model.convs);
    assert_eq!(
        back.convs[0].float_weight.as_deref(),
        Some(deploy.tensors["stage0.rbr_reparam.weight"].data.as_slice())
    );
    // Read as float weights, the float blocks are exactly the originals.
    let float = Checkpoint::load(&path, None).unwrap();
    assert_eq!(
        float.tensors["stage0.rbr_reparam.weight"].data,
        deploy.tensors["stage0.rbr_reparam.weight"].data
    );
}
