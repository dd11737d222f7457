//! Checks reading, naming detection, architecture inference and conversion against files made
//! by the official RepVGG code and timm (`reference/make_fixtures.py`).

use std::path::{Path, PathBuf};

use repvgg_arch::{ArchSpec, Form};
use repvgg_checkpoint::convert::DEFAULT_BN_EPS;
use repvgg_checkpoint::{Checkpoint, DType, Naming, StateDict};

const CONFIGS: [&str; 5] = ["tiny", "tiny_g2", "tiny_g4", "tiny_se", "tiny_nonsquare"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn load(path: &Path) -> Checkpoint {
    Checkpoint::load(path, None).unwrap_or_else(|e| panic!("{e}"))
}

fn spec_of(config: &str) -> ArchSpec {
    ArchSpec::from_json_file(&fixtures().join(config).join("spec.json")).unwrap()
}

/// max |a - b| / max |b| over a tensor.
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let scale = b
        .iter()
        .fold(0f64, |m, &v| m.max(v.abs() as f64))
        .max(1e-30);
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    diff / scale
}

fn assert_same_tensors(a: &StateDict, b: &StateDict, what: &str) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: keys"
    );
    for (key, t) in a {
        assert_eq!(t, &b[key], "{what}: {key}");
    }
}

#[test]
fn every_fixture_loads_with_the_right_naming_form_and_architecture() {
    for config in CONFIGS {
        let spec = spec_of(config);
        for form in ["train", "deploy"] {
            for (naming, expected) in [("official", Naming::Official), ("timm", Naming::Timm)] {
                let mut loaded = Vec::new();
                for ext in ["pth", "safetensors"] {
                    let path = fixtures()
                        .join(config)
                        .join(format!("{form}_{naming}.{ext}"));
                    let ckpt = load(&path);
                    assert_eq!(ckpt.naming, expected, "{}", path.display());
                    assert_eq!(ckpt.form.to_string(), form, "{}", path.display());
                    let mut inferred = ckpt.spec.clone();
                    inferred.name = spec.name.clone();
                    assert_eq!(inferred, spec, "{}", path.display());
                    // Given explicitly, the same spec must be accepted too.
                    Checkpoint::load(&path, Some(&spec)).unwrap();
                    loaded.push(ckpt.tensors);
                }
                assert_same_tensors(
                    &loaded[0],
                    &loaded[1],
                    &format!("{config} {form} {naming}: pth vs safetensors"),
                );
            }
            // Both references hold the same weights under their own names.
            let official = load(
                &fixtures()
                    .join(config)
                    .join(format!("{form}_official.safetensors")),
            );
            let timm = load(
                &fixtures()
                    .join(config)
                    .join(format!("{form}_timm.safetensors")),
            );
            assert_same_tensors(
                &official.tensors,
                &timm.tensors,
                &format!("{config} {form}: official vs timm"),
            );
        }
    }
}

/// Our f64 fusion rounded to f32 against the reference's own f32 conversion: the two differ
/// only by the reference's f32 rounding, about 1e-7 relative; 1e-6 leaves room for that and no
/// more (a wrong eps or a misplaced identity element gives 1e-3 or worse).
#[test]
fn conversion_matches_the_references_own_deploy_weights() {
    for config in CONFIGS {
        let train = load(&fixtures().join(config).join("train_official.safetensors"));
        let converted = train.to_deploy(DEFAULT_BN_EPS).unwrap();
        assert_eq!(converted.form, Form::Deploy);
        for reference_file in ["deploy_official.safetensors", "deploy_timm.pth"] {
            let reference = load(&fixtures().join(config).join(reference_file));
            assert_eq!(
                converted.tensors.keys().collect::<Vec<_>>(),
                reference.tensors.keys().collect::<Vec<_>>()
            );
            let worst = reference
                .tensors
                .iter()
                .map(|(key, t)| relative_error(&converted.tensors[key].data, &t.data))
                .fold(0.0, f64::max);
            assert!(
                worst < 1e-6,
                "{config} vs {reference_file}: fused weights off by {worst:e}"
            );
        }
    }
}

#[test]
fn renaming_is_lossless_through_every_naming() {
    let dir = tempfile::tempdir().unwrap();
    for config in ["tiny_se", "tiny_g2"] {
        for form in ["train", "deploy"] {
            let original = load(
                &fixtures()
                    .join(config)
                    .join(format!("{form}_official.safetensors")),
            );
            for naming in [Naming::Timm, Naming::MmPretrain, Naming::Official] {
                let path = dir
                    .path()
                    .join(format!("{config}_{form}_{naming}.safetensors"));
                original.save_safetensors(&path, naming).unwrap();
                let back = load(&path);
                assert_eq!(back.naming, naming);
                assert_same_tensors(
                    &back.tensors,
                    &original.tensors,
                    &format!("{config} via {naming}"),
                );
            }
            // Our timm-named file holds exactly the keys timm's own file does.
            if form == "deploy" {
                let ours = dir.path().join(format!("{config}_{form}_timm.safetensors"));
                let theirs = fixtures().join(config).join("deploy_timm.safetensors");
                let keys = |p: &Path| {
                    let bytes = std::fs::read(p).unwrap();
                    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                    let mut names: Vec<String> =
                        st.names().into_iter().map(str::to_owned).collect();
                    names.sort();
                    names
                };
                assert_eq!(keys(&ours), keys(&theirs));
            }
        }
    }
}

#[test]
fn wrappers_prefixes_dtypes_and_layouts_are_read() {
    let pth = fixtures().join("pth");
    let reference = load(&fixtures().join("tiny/train_official.safetensors"));
    for file in ["wrapped.pth", "model_key.pth", "legacy.pth"] {
        let ckpt = load(&pth.join(file));
        assert_same_tensors(&ckpt.tensors, &reference.tensors, file);
    }
    for (file, dtype, tolerance) in [
        ("f16.pth", DType::F16, 1e-3),
        ("f16.safetensors", DType::F16, 1e-3),
        ("bf16.pth", DType::BF16, 1e-2),
        ("bf16.safetensors", DType::BF16, 1e-2),
        ("f64.pth", DType::F64, 0.0),
        ("f64.safetensors", DType::F64, 0.0),
    ] {
        let ckpt = load(&pth.join(file));
        assert_eq!(ckpt.source_dtype, dtype, "{file}");
        for (key, t) in &reference.tensors {
            let err = relative_error(&ckpt.tensors[key].data, &t.data);
            assert!(err <= tolerance, "{file} {key}: {err:e}");
        }
    }
}

#[test]
fn strided_views_are_gathered_like_torch_does() {
    let pth = fixtures().join("pth");
    let bytes = std::fs::read(pth.join("noncontiguous.pth")).unwrap();
    let got = repvgg_checkpoint::pth::read_pth(&bytes).unwrap();
    let bytes = std::fs::read(pth.join("noncontiguous_expected.safetensors")).unwrap();
    let expected = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(got.len(), expected.len());
    for (key, raw) in got {
        let view = expected.tensor(&key).unwrap();
        assert_eq!(raw.shape, view.shape(), "{key}");
        assert_eq!(raw.bytes, view.data(), "{key}");
    }
}

#[test]
fn a_forbidden_global_is_refused_by_name() {
    let path = fixtures().join("pth/forbidden_global.pth");
    let err = Checkpoint::load(&path, None).unwrap_err().to_string();
    assert!(err.contains("forbidden_global.pth"), "{err}");
    assert!(err.contains("posix.system"), "{err}");
}
