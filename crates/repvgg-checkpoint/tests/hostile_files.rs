//! Files whose metadata or tensors would break what runs after loading (an architecture that
//! cannot exist, a BN that does not fit its conv, class names that do not fit an INT8 model, an
//! input size no machine can hold) are refused at load with the file named and the kind of
//! problem: each of these once reached a panic or an abort further on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use repvgg_checkpoint::quantized::{ActivationQuant, QuantizedModel};
use repvgg_checkpoint::{Checkpoint, CheckpointErrorKind, ImageNetPreset, Naming};
use safetensors::{Dtype, tensor::TensorView};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel)
}

/// One tensor as (dtype, shape, bytes), editable before writing.
type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

/// A file's tensors and header metadata, to edit and write back.
fn read(path: &Path) -> (Vec<Entry>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let entries = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    (entries, header.metadata().clone().unwrap_or_default())
}

fn write(path: &Path, entries: &[Entry], metadata: HashMap<String, String>) {
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, Some(metadata)).unwrap()).unwrap();
}

/// The load error's kind and line, after checking the line names the file.
fn refused(path: &Path) -> (CheckpointErrorKind, String) {
    let err = Checkpoint::load(path, None).unwrap_err();
    let line = err.to_string();
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(line.contains(name.as_ref()), "{line}");
    (err.kind(), line)
}

#[test]
fn a_recorded_architecture_that_cannot_exist_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = Checkpoint::load(&fixture("tiny/deploy_official.safetensors"), None).unwrap();
    let saved = dir.path().join("saved.safetensors");
    deploy.save_safetensors(&saved, Naming::Official).unwrap();
    let (entries, metadata) = read(&saved);
    // Tensor shapes say nothing of strides or of in-channel counts checked elsewhere: each
    // of these once passed the shape check and divided by zero further on.
    for (field, value) in [
        ("strides", serde_json::json!([0, 2, 2, 2, 2])),
        ("groups", serde_json::json!({"1": 0})),
        ("depths", serde_json::json!([u64::MAX, 1, 1, 1])),
    ] {
        let mut arch: serde_json::Value = serde_json::from_str(&metadata["repvgg.arch"]).unwrap();
        arch[field] = value;
        let mut metadata = metadata.clone();
        metadata.insert("repvgg.arch".into(), arch.to_string());
        let path = dir.path().join(format!("bad_{field}.safetensors"));
        write(&path, &entries, metadata);
        let (kind, line) = refused(&path);
        assert_eq!(kind, CheckpointErrorKind::BadMetadata, "{line}");
        assert!(line.contains("architecture in the metadata"), "{line}");
    }
}

#[test]
fn a_post_sum_bn_that_does_not_fit_its_conv_is_refused_before_folding() {
    let dir = tempfile::tempdir().unwrap();
    let (mut entries, metadata) = read(&fixture("tiny/deploy_official.safetensors"));
    // stage0's conv has 8 outputs; a BN of 4 beside it (YOLOv6's deploy layout).
    for field in ["weight", "bias", "running_mean", "running_var"] {
        let values: Vec<u8> = [1.0f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
        entries.push((format!("stage0.bn.{field}"), Dtype::F32, vec![4], values));
    }
    let path = dir.path().join("post_bn.safetensors");
    write(&path, &entries, metadata);
    let (kind, line) = refused(&path);
    assert_eq!(kind, CheckpointErrorKind::ShapeMismatch, "{line}");
    assert!(line.contains("stage0.rbr_reparam.weight"), "{line}");
}

#[test]
fn int8_files_check_their_class_names_and_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let deploy = Checkpoint::load(&fixture("tiny/deploy_official.safetensors"), None).unwrap();
    let acts = vec![ActivationQuant::covering(-2.0, 3.0); deploy.spec.blocks().len() + 1];
    let model = QuantizedModel::quantize(&deploy, acts, "minmax", 4, 127, &[]).unwrap();
    let saved = dir.path().join("int8.safetensors");
    model.save(&saved).unwrap();
    let (entries, metadata) = read(&saved);

    let mut labels = metadata.clone();
    labels.insert("repvgg.labels".into(), r#"["only one"]"#.into());
    let path = dir.path().join("int8_labels.safetensors");
    write(&path, &entries, labels);
    let (kind, line) = refused(&path);
    assert_eq!(kind, CheckpointErrorKind::BadMetadata, "{line}");
    assert!(
        line.contains("1 class names for a model with 10 classes"),
        "{line}"
    );

    let mut preprocessing = ImageNetPreset::Official.preprocessing();
    preprocessing.size = [0, 224];
    let mut bad = metadata.clone();
    bad.insert(
        "repvgg.preprocessing".into(),
        serde_json::to_string(&preprocessing).unwrap(),
    );
    let path = dir.path().join("int8_size.safetensors");
    write(&path, &entries, bad);
    let (kind, line) = refused(&path);
    assert_eq!(kind, CheckpointErrorKind::BadMetadata, "{line}");
    assert!(line.contains("zero side"), "{line}");
}

#[test]
fn an_input_size_no_machine_can_hold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut ckpt = Checkpoint::load(&fixture("tiny/deploy_official.safetensors"), None).unwrap();
    let mut preprocessing = ImageNetPreset::Official.preprocessing();
    preprocessing.size = [1 << 32, 1 << 32];
    preprocessing.resize = repvgg_checkpoint::metadata::Resize::Stretch;
    ckpt.preprocessing = Some(preprocessing);
    let path = dir.path().join("huge_input.safetensors");
    ckpt.save_safetensors(&path, Naming::Official).unwrap();
    let (kind, line) = refused(&path);
    assert_eq!(kind, CheckpointErrorKind::BadMetadata, "{line}");
    assert!(line.contains("over 16384 pixels"), "{line}");
}

/// A checkpoint reaches the disk before it takes the destination's name, and the name before
/// the write returns: the file is synced before the rename, the directory after it, and until
/// the rename the destination still holds the previous file.
#[test]
fn checkpoints_are_synced_before_the_rename_and_the_directory_after() {
    use repvgg_checkpoint::WriteStep;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    std::fs::write(&path, b"previous").unwrap();
    let mut seen = Vec::new();
    repvgg_checkpoint::write_atomically_observed(&path, b"new contents", &mut |step| {
        seen.push((step, std::fs::read(&path).unwrap()));
    })
    .unwrap();
    let previous = b"previous".to_vec();
    let new = b"new contents".to_vec();
    let mut expected = vec![
        (WriteStep::Written, previous.clone()),
        (WriteStep::FileSynced, previous),
        (WriteStep::Renamed, new.clone()),
    ];
    if cfg!(unix) {
        expected.push((WriteStep::DirectorySynced, new));
    }
    assert_eq!(seen, expected);
}

/// INT8 sums are 32-bit: a block wider than they hold is refused, naming it and the way out,
/// rather than quantized into sums that wrap.
#[test]
fn int8_refuses_blocks_too_wide_for_its_sums() {
    use repvgg_checkpoint::quantized::MAX_INT8_INPUT_CHANNELS_PER_GROUP;
    let wide = MAX_INT8_INPUT_CHANNELS_PER_GROUP + 1;
    let spec = repvgg_arch::ArchSpec::parse(&format!("depths=1,1,1,1;widths=8,8,{wide},8;stem=8"))
        .unwrap();
    let tensors = repvgg_checkpoint::random::training_weights(&spec, 0);
    let deploy = Checkpoint::from_state_dict(spec, repvgg_arch::Form::Train, tensors)
        .unwrap()
        .to_deploy(1e-5)
        .unwrap();
    let blocks = deploy.spec.blocks().len();
    let acts = vec![ActivationQuant::covering(-2.0, 3.0); blocks + 1];
    let err = QuantizedModel::quantize(&deploy, acts.clone(), "minmax", 1, 127, &[]).unwrap_err();
    assert_eq!(err.kind, CheckpointErrorKind::Unsupported);
    assert!(
        err.message
            .contains(&format!("stage4.0 takes {wide} input channels")),
        "{err}"
    );
    // Kept in float, the block is no longer a problem.
    QuantizedModel::quantize(&deploy, acts, "minmax", 1, 127, &[blocks - 1]).unwrap();
}
