//! What every crate's tests need to compare against the reference fixtures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `fixtures/` at the repository root.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// `fixtures/<config>/<file>`.
pub fn fixture(config: &str, file: &str) -> PathBuf {
    fixtures().join(config).join(file)
}

/// Every tensor of a safetensors file (f64, f32 or f16 values) as f64, with its shape.
pub fn read_f64(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(key, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{}: {key} has dtype {other:?}", path.display()),
            };
            (key, (view.shape().to_vec(), values))
        })
        .collect()
}

/// max |ours - reference| / max |reference|: the error measure every numeric test uses.
pub fn relative_error(ours: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "lengths differ");
    let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(
        scale.is_finite() && scale > 0.0,
        "degenerate reference scale {scale}"
    );
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// f32 values widened for [`relative_error`].
pub fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

/// A Python that can import `modules`: $REPVGG_PYTHON, or the venv `scripts/test` makes
/// (`.venv-ci`), or the reference one (`.venv-ref`).
///
/// Without one the calling test fails, so that a check that did not run is never reported as
/// passed; `REPVGG_SKIP_PYTHON=1` turns that into `None` (the test returns early, saying so
/// on stderr) for machines that cannot install Python packages.
pub fn python_with(modules: &[&str]) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let import = format!("import {}", modules.join(", "));
    let found = std::env::var_os("REPVGG_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            root.join(".venv-ci/bin/python"),
            root.join(".venv-ref/bin/python"),
        ])
        .find(|python| {
            std::process::Command::new(python)
                .args(["-c", &import])
                .output()
                .is_ok_and(|o| o.status.success())
        });
    if found.is_none() {
        assert!(
            std::env::var_os("REPVGG_SKIP_PYTHON").is_some(),
            "no Python can `{import}`: run `scripts/test` (it sets up .venv-ci from PyPI), point \
             REPVGG_PYTHON at a Python that can, or set REPVGG_SKIP_PYTHON=1 to skip this check"
        );
        eprintln!("SKIPPED (REPVGG_SKIP_PYTHON is set): no Python can `{import}`");
    }
    found
}

/// `reference/check_onnx.py MODEL INPUT EXPECTED`: onnx.checker plus ONNX Runtime against the
/// expected logits; returns its JSON report, panicking with its output on failure.
pub fn check_onnx(python: &Path, model: &Path, input: &Path, expected: &Path) -> serde_json::Value {
    check_onnx_within(python, model, input, expected, 1e-5)
}

/// [`check_onnx`] with another tolerance (max |ort - expected| / max |expected|).
pub fn check_onnx_within(
    python: &Path,
    model: &Path,
    input: &Path,
    expected: &Path,
    tolerance: f64,
) -> serde_json::Value {
    let script = fixtures().join("../reference/check_onnx.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .args([model, input, expected])
        .arg(tolerance.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {stdout} {}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}
