//! RepVGG checkpoints: read `.pth` and `.safetensors` in any of the three namings and either
//! form, check them against an architecture, convert them, and write them back.
//!
//! Loading normalises everything to one in-memory shape: official key names, `f32` tensors,
//! no `module.` prefix, no wrapper dicts, no `num_batches_tracked`. The naming, form and
//! architecture found in the file are reported alongside.
//!
//! ```no_run
//! use repvgg_checkpoint::{Checkpoint, Naming};
//! let ckpt = Checkpoint::load("RepVGG-A0-train.pth".as_ref(), None)?;
//! let deploy = ckpt.to_deploy(repvgg_checkpoint::convert::DEFAULT_BN_EPS)?;
//! deploy.save_safetensors("a0-deploy.safetensors".as_ref(), Naming::Timm)?;
//! # Ok::<(), repvgg_checkpoint::CheckpointError>(())
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use repvgg_arch::{ArchSpec, Form};

pub mod convert;
pub mod layout;
pub mod naming;
pub mod pickle;
pub mod pth;
pub mod random;
pub mod tensor;

pub use naming::Naming;
pub use tensor::{DType, StateDict, Tensor};

use pth::RawTensor;

/// Every failure names the file and says what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct CheckpointError {
    pub path: PathBuf,
    pub problem: String,
}

impl CheckpointError {
    pub fn new(path: &Path, problem: impl Into<String>) -> Self {
        CheckpointError {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

/// A loaded, checked checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Where it came from (for messages); empty for one made in memory.
    pub path: PathBuf,
    /// The naming the file used.
    pub naming: Naming,
    pub form: Form,
    /// The architecture: inferred from the shapes, or the one asked for and verified.
    pub spec: ArchSpec,
    /// Official naming, `f32`.
    pub tensors: StateDict,
    /// The element type of the file's floating-point tensors (the widest, if mixed).
    pub source_dtype: DType,
    /// Tensors in the file, `num_batches_tracked` included.
    pub file_tensor_count: usize,
}

impl Checkpoint {
    /// Reads, normalises and checks a checkpoint. With `arch`, the file must match that
    /// architecture exactly, and every mismatching key is reported.
    pub fn load(path: &Path, arch: Option<&ArchSpec>) -> Result<Checkpoint, CheckpointError> {
        let fail = |problem: String| CheckpointError::new(path, problem);
        let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let raw = read_raw(&bytes).map_err(fail)?;
        let file_tensor_count = raw.len();
        let (tensors, naming, source_dtype) = normalise(raw).map_err(fail)?;
        let form = layout::detect_form(&tensors).map_err(fail)?;
        let spec = match arch {
            Some(spec) => spec.clone(),
            None => layout::infer_spec(&tensors, form).map_err(fail)?,
        };
        let problems = layout::mismatches(&tensors, &spec, form, naming);
        if !problems.is_empty() {
            let what = if arch.is_some() {
                format!("does not match {} ({form} form)", spec.name)
            } else {
                format!("is not a consistent RepVGG {form}-form checkpoint")
            };
            return Err(fail(format!("{what}: {}", summarise(&problems))));
        }
        check_values(&tensors).map_err(fail)?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            naming,
            form,
            spec,
            tensors,
            source_dtype,
            file_tensor_count,
        })
    }

    /// A checkpoint made in memory (official naming), checked like a loaded one.
    pub fn from_state_dict(
        spec: ArchSpec,
        form: Form,
        tensors: StateDict,
    ) -> Result<Checkpoint, CheckpointError> {
        let fail = |problem: String| CheckpointError::new(Path::new("<memory>"), problem);
        let problems = layout::mismatches(&tensors, &spec, form, Naming::Official);
        if !problems.is_empty() {
            return Err(fail(format!(
                "does not match {}: {}",
                spec.name,
                summarise(&problems)
            )));
        }
        check_values(&tensors).map_err(fail)?;
        Ok(Checkpoint {
            path: PathBuf::from("<memory>"),
            naming: Naming::Official,
            form,
            spec,
            file_tensor_count: tensors.len(),
            tensors,
            source_dtype: DType::F32,
        })
    }

    /// The deploy form to read from: this checkpoint itself when it is one (borrowed, not
    /// copied: B3's is 450 MB), else its conversion.
    pub fn as_deploy(&self, bn_eps: f64) -> Result<Cow<'_, Checkpoint>, CheckpointError> {
        match self.form {
            Form::Deploy => Ok(Cow::Borrowed(self)),
            Form::Train => self.to_deploy(bn_eps).map(Cow::Owned),
        }
    }

    /// The equivalent deploy-form checkpoint (itself, if already deployed).
    pub fn to_deploy(&self, bn_eps: f64) -> Result<Checkpoint, CheckpointError> {
        if self.form == Form::Deploy {
            return Ok(self.clone());
        }
        let tensors = convert::to_deploy(&self.tensors, &self.spec, bn_eps)
            .map_err(|e| CheckpointError::new(&self.path, e))?;
        // Field by field: `..self.clone()` copied every training tensor only to drop them.
        Ok(Checkpoint {
            path: self.path.clone(),
            naming: self.naming,
            form: Form::Deploy,
            spec: self.spec.clone(),
            file_tensor_count: tensors.len(),
            tensors,
            source_dtype: DType::F32,
        })
    }

    /// Writes `f32` safetensors in the chosen naming, atomically (temp file + rename), with the
    /// architecture and form in the metadata.
    pub fn save_safetensors(&self, path: &Path, naming: Naming) -> Result<(), CheckpointError> {
        let fail = |problem: String| CheckpointError::new(path, problem);
        let renamed = naming::rename(&self.tensors, Naming::Official, naming).map_err(fail)?;
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("repvgg.form".to_string(), self.form.to_string()),
            ("repvgg.naming".to_string(), naming.to_string()),
            (
                "repvgg.arch".to_string(),
                serde_json::to_string(&self.spec).expect("spec serialises"),
            ),
        ]);
        write_safetensors(path, &renamed, Some(metadata))
    }
}

/// Writes `f32` tensors as safetensors, atomically. Every safetensors file this project
/// writes (checkpoints, `forward` outputs) goes through here.
pub fn write_safetensors(
    path: &Path,
    tensors: &StateDict,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), CheckpointError> {
    let fail = |problem: String| CheckpointError::new(path, problem);
    let views: Vec<(&String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(key, t)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice(&t.data),
            )
            .map(|view| (key, view))
            .map_err(|e| fail(format!("{key}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| fail(e.to_string()))?;
    write_atomically(path, &bytes)
}

/// All problems on one line: an error names every key that is wrong, not the first few.
fn summarise(problems: &[String]) -> String {
    problems.join("; ")
}

/// Writes to a temporary file beside `path`, syncs, then renames over it: a crash or a full
/// disk leaves either the old file or the new one, never half of one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let fail = |what: &str, e: std::io::Error| CheckpointError::new(path, format!("{what}: {e}"));
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(|e| fail("cannot create", e))?;
        file.write_all(bytes).map_err(|e| fail("cannot write", e))?;
        file.sync_all().map_err(|e| fail("cannot sync", e))?;
        std::fs::rename(&tmp, path).map_err(|e| fail("cannot rename into place", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Raw tensors from either file format, keyed as in the file.
fn read_raw(bytes: &[u8]) -> Result<Vec<(String, RawTensor)>, String> {
    // A safetensors file opens with its JSON header's length (u64, little-endian) and then the
    // header itself. That length can begin with any byte, 0x80 (a pickle's PROTO) included, so
    // it is recognised by its structure rather than by a magic byte.
    let looks_like_safetensors = bytes.len() >= 9
        && bytes[8] == b'{'
        && u64::from_le_bytes(bytes[..8].try_into().unwrap())
            .checked_add(8)
            .is_some_and(|end| end <= bytes.len() as u64);
    if !looks_like_safetensors && (bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"\x80")) {
        return pth::read_pth(bytes);
    }
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("neither a PyTorch checkpoint nor valid safetensors ({e})"))?;
    st.tensors()
        .into_iter()
        .map(|(key, view)| {
            let dtype = DType::from_safetensors(view.dtype())
                .ok_or_else(|| format!("'{key}' has unsupported dtype {:?}", view.dtype()))?;
            Ok((
                key,
                RawTensor {
                    dtype,
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                },
            ))
        })
        .collect()
}

/// Strips `module.`, drops `num_batches_tracked`, converts to `f32`, renames to official.
fn normalise(raw: Vec<(String, RawTensor)>) -> Result<(StateDict, Naming, DType), String> {
    let mut floats = Vec::new();
    let mut widest: Option<DType> = None;
    for (key, tensor) in raw {
        // DDP's `module.` and torch.compile's `_orig_mod.`, in either order.
        let mut key = key.as_str();
        while let Some(rest) = key
            .strip_prefix("module.")
            .or_else(|| key.strip_prefix("_orig_mod."))
        {
            key = rest;
        }
        let key = key.to_string();
        if key.ends_with("num_batches_tracked") {
            continue;
        }
        let converted = tensor.to_f32().ok_or_else(|| {
            format!(
                "'{key}' has dtype {:?}; RepVGG weights must be floating point",
                tensor.dtype
            )
        })?;
        if widest.is_none_or(|w| tensor.dtype.size() > w.size()) {
            widest = Some(tensor.dtype);
        }
        floats.push((key, converted));
    }
    let naming = Naming::detect(floats.iter().map(|(k, _)| k.as_str()))
        .ok_or("no RepVGG weights found (no keys in official, timm or mmpretrain naming)")?;
    let mut unexpected = Vec::new();
    let mut dict = StateDict::new();
    for (key, tensor) in floats {
        match naming.rename_key(&key, Naming::Official) {
            Some(official) => {
                dict.insert(official, tensor);
            }
            None => unexpected.push(format!("unexpected key '{key}'")),
        }
    }
    if !unexpected.is_empty() {
        return Err(format!("{naming} naming, but {}", summarise(&unexpected)));
    }
    Ok((dict, naming, widest.unwrap_or(DType::F32)))
}

/// Rejects NaN/infinite values and negative BN variances, which would silently poison every
/// output downstream.
fn check_values(tensors: &StateDict) -> Result<(), String> {
    let bad: Vec<String> = tensors
        .iter()
        .filter(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
        .map(|(k, _)| format!("'{k}'"))
        .collect();
    if !bad.is_empty() {
        return Err(format!("NaN or infinite values in {}", summarise(&bad)));
    }
    let negative: Vec<String> = tensors
        .iter()
        .filter(|(k, t)| k.ends_with("running_var") && t.data.iter().any(|&v| v < 0.0))
        .map(|(k, _)| format!("'{k}'"))
        .collect();
    if !negative.is_empty() {
        return Err(format!(
            "negative BN running variance in {}",
            summarise(&negative)
        ));
    }
    Ok(())
}
