//! Each kind of broken checkpoint gives an error that names the file and the problem.

use std::path::{Path, PathBuf};

use repvgg_arch::ArchSpec;
use repvgg_checkpoint::{Checkpoint, CheckpointErrorKind};
use safetensors::{Dtype, tensor::TensorView};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel)
}

/// One tensor as (dtype, shape, bytes), editable before writing.
type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

fn entries(rel: &str) -> Vec<Entry> {
    let bytes = std::fs::read(fixture(rel)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<Entry> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write(dir: &Path, name: &str, entries: &[Entry]) -> PathBuf {
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

/// The error's line, after checking that it names the file and is of the expected kind.
fn error_for(path: &Path, arch: Option<&ArchSpec>, kind: CheckpointErrorKind) -> String {
    let err = Checkpoint::load(path, arch).unwrap_err();
    assert_eq!(err.kind(), kind, "{err}");
    let err = err.to_string();
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(name.as_ref()),
        "error does not name the file: {err}"
    );
    err
}

#[test]
fn truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    for rel in [
        "tiny/train_official.pth",
        "tiny/train_official.safetensors",
        "pth/legacy.pth",
    ] {
        let bytes = std::fs::read(fixture(rel)).unwrap();
        for keep in [10, bytes.len() / 2, bytes.len() - 7] {
            let path = dir
                .path()
                .join(format!("cut_{keep}_{}", rel.replace('/', "_")));
            std::fs::write(&path, &bytes[..keep]).unwrap();
            error_for(&path, None, CheckpointErrorKind::Corrupt);
        }
    }
    let empty = dir.path().join("empty.pth");
    std::fs::write(&empty, b"").unwrap();
    error_for(&empty, None, CheckpointErrorKind::Corrupt);
    let missing = dir.path().join("no_such_file.pth");
    assert!(error_for(&missing, None, CheckpointErrorKind::Io).contains("cannot read"));
}

#[test]
fn wrong_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = entries("tiny/deploy_official.safetensors");
    let target = e.iter_mut().find(|x| x.0 == "linear.bias").unwrap();
    target.1 = Dtype::I32;
    let path = write(dir.path(), "int_bias.safetensors", &e);
    let err = error_for(&path, None, CheckpointErrorKind::ShapeMismatch);
    assert!(err.contains("'linear.bias' has dtype I32"), "{err}");
}

#[test]
fn wrong_shape_missing_key_and_extra_key_are_all_listed() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ArchSpec::from_json_file(&fixture("tiny/spec.json")).unwrap();

    let mut e = entries("tiny/deploy_official.safetensors");
    let t = e
        .iter_mut()
        .find(|x| x.0 == "stage1.1.rbr_reparam.bias")
        .unwrap();
    t.2 = vec![4, 2];
    let path = write(dir.path(), "bad_shape.safetensors", &e);
    let err = error_for(&path, Some(&spec), CheckpointErrorKind::ArchMismatch);
    assert!(
        err.contains("'stage1.1.rbr_reparam.bias' has shape [4, 2], expected [8]"),
        "{err}"
    );

    let mut e = entries("tiny/train_official.safetensors");
    e.retain(|x| x.0 != "stage2.1.rbr_identity.running_var");
    let path = write(dir.path(), "missing.safetensors", &e);
    for arch in [None, Some(&spec)] {
        let err = error_for(&path, arch, CheckpointErrorKind::ArchMismatch);
        assert!(
            err.contains("missing key 'stage2.1.rbr_identity.running_var'"),
            "{err}"
        );
    }

    let mut e = entries("tiny/train_official.safetensors");
    let extra = e
        .iter()
        .find(|x| x.0 == "stage1.0.rbr_1x1.bn.weight")
        .unwrap()
        .clone();
    e.push((
        "stage1.0.rbr_identity.weight".into(),
        extra.1,
        extra.2,
        extra.3,
    ));
    e.push((
        "stage1.0.rbr_dense.bn.weight_extra".into(),
        Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    let path = write(dir.path(), "extra.safetensors", &e);
    let err = error_for(&path, Some(&spec), CheckpointErrorKind::ArchMismatch);
    assert!(
        err.contains("unexpected key 'stage1.0.rbr_identity.weight'"),
        "{err}"
    );
    assert!(
        err.contains("unexpected key 'stage1.0.rbr_dense.bn.weight_extra'"),
        "{err}"
    );

    let e = entries("tiny/train_official.safetensors");
    let mut e2 = e.clone();
    e2.push(("fc.weight".into(), Dtype::F32, vec![1], vec![0; 4]));
    let path = write(dir.path(), "foreign_key.safetensors", &e2);
    assert!(
        error_for(&path, None, CheckpointErrorKind::UnexpectedKey)
            .contains("unexpected key 'fc.weight'")
    );
}

#[test]
fn a_file_for_another_architecture_is_summarised_in_a_few_readable_lines() {
    let a0 = ArchSpec::named("A0").unwrap();
    let err = Checkpoint::load(&fixture("tiny_g2/train_timm.pth"), Some(&a0)).unwrap_err();
    assert_eq!(err.kind(), CheckpointErrorKind::ArchMismatch);
    let line = err.to_string();
    // First what the file holds against what was asked for, then counts and a few keys.
    assert!(
        line.contains("holds a custom RepVGG") && line.contains("not the requested RepVGG-A0"),
        "{line}"
    );
    assert!(
        line.contains("\n  missing: ") && line.contains("more"),
        "{line}"
    );
    assert!(line.lines().all(|l| l.len() < 400), "{line}");
    // The whole list, in the file's own (timm) naming, is in the details.
    let missing = err
        .details
        .iter()
        .filter(|p| p.contains("missing key"))
        .count();
    assert!(line.contains(&format!("{missing} missing")), "{line}");
    assert!(
        err.details
            .iter()
            .any(|p| p.contains("missing key 'stages.2.13.conv_kxk.conv.weight'")),
        "{:?}",
        err.details
    );
    assert!(
        err.details.iter().any(|p| {
            p.contains("unexpected key 'stages.0.0.conv_kxk.bn.weight'")
                || p.contains("'stages.0.0.conv_kxk.bn.weight' has shape")
        }),
        "{:?}",
        err.details
    );
    assert!(!err.details.iter().any(|p| p.contains("rbr_dense")));
}

#[test]
fn nan_and_negative_variance() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = entries("tiny/train_official.safetensors");
    let t = e
        .iter_mut()
        .find(|x| x.0 == "stage3.0.rbr_dense.conv.weight")
        .unwrap();
    t.3[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    let path = write(dir.path(), "nan.safetensors", &e);
    let err = error_for(&path, None, CheckpointErrorKind::BadValue);
    assert!(
        err.contains("NaN") && err.contains("stage3.0.rbr_dense.conv.weight"),
        "{err}"
    );

    let mut e = entries("tiny/train_official.safetensors");
    let t = e
        .iter_mut()
        .find(|x| x.0 == "stage0.rbr_1x1.bn.running_var")
        .unwrap();
    t.3[0..4].copy_from_slice(&(-1.0f32).to_le_bytes());
    let path = write(dir.path(), "negvar.safetensors", &e);
    assert!(
        error_for(&path, None, CheckpointErrorKind::BadValue)
            .contains("negative BN running variance")
    );
}

#[test]
fn not_a_checkpoint_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("photo.safetensors");
    std::fs::write(&path, b"\xff\xd8\xff\xe0 this is a jpeg").unwrap();
    assert!(
        error_for(&path, None, CheckpointErrorKind::Corrupt)
            .contains("neither a PyTorch checkpoint nor valid safetensors")
    );
}

#[test]
fn safetensors_whose_header_length_starts_with_0x80_are_not_mistaken_for_pickles() {
    let dir = tempfile::tempdir().unwrap();
    let e = entries("tiny/deploy_official.safetensors");
    let views: Vec<(String, TensorView<'_>)> = e
        .iter()
        .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let found = (0..512).find_map(|pad| {
        let metadata = std::collections::HashMap::from([("pad".to_string(), "x".repeat(pad))]);
        let bytes = safetensors::serialize(views.clone(), Some(metadata)).unwrap();
        (bytes[0] == 0x80).then_some(bytes)
    });
    let bytes = found.expect("some padding puts 0x80 first");
    let path = dir.path().join("starts_with_0x80.safetensors");
    std::fs::write(&path, bytes).unwrap();
    Checkpoint::load(&path, None).unwrap();
}

#[test]
fn zero_dimensional_tensors_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    for key in [
        "stage0.rbr_reparam.weight",
        "linear.weight",
        "stage1.0.rbr_reparam.bias",
    ] {
        let mut e = entries("tiny/deploy_official.safetensors");
        let t = e.iter_mut().find(|x| x.0 == key).unwrap();
        t.2 = vec![];
        t.3 = vec![0; 4];
        let path = write(dir.path(), &format!("scalar_{key}.safetensors"), &e);
        error_for(&path, None, CheckpointErrorKind::ArchMismatch);
    }
}

/// A legacy-format file whose pickle nests 200,000 lists deep: an error, not a stack overflow.
#[test]
fn deeply_nested_pickles_do_not_overflow_the_stack() {
    let depth = 200_000;
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."); // magic number
    bytes.extend_from_slice(b"\x80\x02M\xe9\x03."); // protocol version 1001
    bytes.extend_from_slice(b"\x80\x02}."); // system info
    bytes.extend_from_slice(b"\x80\x02");
    bytes.extend(std::iter::repeat_n(b']', depth));
    bytes.extend(std::iter::repeat_n(b'a', depth - 1));
    bytes.push(b'.');
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested.pth");
    std::fs::write(&path, &bytes).unwrap();
    let err = error_for(&path, None, CheckpointErrorKind::TooLarge);
    assert!(err.contains("legacy .pth"), "{err}");
}
