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
mod error;
pub mod layout;
pub mod metadata;
pub mod naming;
pub mod pickle;
pub mod pth;
pub mod quantized;
pub mod random;
pub mod tensor;

pub use error::{CheckpointError, CheckpointErrorKind, Problem};
pub use metadata::{ImageNetPreset, Preprocessing};
pub use naming::Naming;
pub use tensor::{DType, StateDict, Tensor};

use pth::RawTensor;

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
    /// How to feed the model, when the file says (ours do; published checkpoints do not).
    pub preprocessing: Option<Preprocessing>,
    /// Class names, one per output, when the file says.
    pub labels: Option<Vec<String>>,
    /// The run state of a resumable training checkpoint (`repvgg-train`'s JSON: configuration,
    /// epoch, step); its optimizer tensors are not loaded.
    pub run_state: Option<serde_json::Value>,
    /// For an INT8 file: the integer model itself, read once with the rest (the tensors here
    /// are its dequantized weights, for float commands).
    pub int8: Option<Box<quantized::QuantizedModel>>,
}

impl Checkpoint {
    /// Reads, normalises and checks a checkpoint. With `arch`, the file must match that
    /// architecture exactly, and every mismatching key is reported.
    pub fn load(path: &Path, arch: Option<&ArchSpec>) -> Result<Checkpoint, CheckpointError> {
        let bytes = std::fs::read(path)
            .map_err(|e| CheckpointError::new(path, Problem::io("cannot read", &e)))?;
        Checkpoint::from_bytes(path, &bytes, arch)
    }

    /// As [`Checkpoint::load`], on a file's contents already in memory; `path` names them in
    /// errors.
    pub fn from_bytes(
        path: &Path,
        bytes: &[u8],
        arch: Option<&ArchSpec>,
    ) -> Result<Checkpoint, CheckpointError> {
        let fail = |problem: Problem| CheckpointError::new(path, problem);
        if let Some(spec) = arch {
            spec.validate().map_err(|e| {
                fail(Problem::new(
                    CheckpointErrorKind::InvalidArgument,
                    format!("the architecture asked for: {e}"),
                ))
            })?;
        }
        let (mut raw, metadata) = read_raw(bytes).map_err(fail)?;
        if quantized::is_quantized(metadata.as_ref()) {
            return Checkpoint::from_quantized(path, bytes, arch, raw.len());
        }
        let file_tensor_count = raw.len();
        let meta = |key: &str| metadata.as_ref().and_then(|m| m.get(key));
        let unreadable = |key: &str, what: &str, e: serde_json::Error| {
            fail(
                Problem::new(
                    CheckpointErrorKind::BadMetadata,
                    format!("unreadable {what}: {e}"),
                )
                .about(key),
            )
        };
        let run_state = meta(metadata::RUN_STATE_KEY)
            .map(|json| serde_json::from_str::<serde_json::Value>(json))
            .transpose()
            .map_err(|e| unreadable(metadata::RUN_STATE_KEY, "training run state", e))?;
        if run_state.is_some() {
            // A resumable training checkpoint: the model's weights plus the optimizer's.
            raw.retain(|(key, _)| !key.starts_with(metadata::OPTIMIZER_PREFIX));
        }
        let recorded_arch = meta("repvgg.arch")
            .map(|json| {
                // Shapes cannot show a stride or a dilation, so a recorded spec is trusted
                // for them: it must at least be a network that can exist.
                serde_json::from_str::<ArchSpec>(json).and_then(|spec| {
                    spec.validate()
                        .map(|()| spec)
                        .map_err(serde::de::Error::custom)
                })
            })
            .transpose()
            .map_err(|e| unreadable("repvgg.arch", "architecture in the metadata", e))?;
        let preprocessing = meta(metadata::PREPROCESSING_KEY)
            .map(|json| serde_json::from_str::<Preprocessing>(json))
            .transpose()
            .map_err(|e| {
                unreadable(
                    metadata::PREPROCESSING_KEY,
                    "preprocessing in the metadata",
                    e,
                )
            })?;
        if let Some(p) = &preprocessing {
            p.validate().map_err(|e| {
                fail(
                    e.within("bad preprocessing in the metadata")
                        .about(metadata::PREPROCESSING_KEY),
                )
            })?;
        }
        let labels = meta(metadata::LABELS_KEY)
            .map(|json| serde_json::from_str::<Vec<String>>(json))
            .transpose()
            .map_err(|e| unreadable(metadata::LABELS_KEY, "class names in the metadata", e))?;
        let (tensors, naming, source_dtype) =
            normalise(raw).map_err(|(problem, details)| CheckpointError {
                path: path.to_path_buf(),
                problem,
                details,
            })?;
        let form = layout::detect_form(&tensors).map_err(fail)?;
        let mut tensors = tensors;
        if form == Form::Deploy {
            // YOLOv6's QARepVGG blocks deploy with their post-sum BN beside the conv.
            convert::fold_deployed_post_bn(&mut tensors, convert::DEFAULT_BN_EPS).map_err(fail)?;
        }
        // Asked for, or recorded by whoever wrote the file (it knows strides and dilations,
        // which shapes cannot tell), or read back from the shapes.
        let (spec, source) = match (arch, recorded_arch) {
            (Some(spec), _) => (spec.clone(), ArchSource::Requested),
            (None, Some(spec)) => (spec, ArchSource::Recorded),
            (None, None) => (
                layout::infer_spec(&tensors, form).map_err(fail)?,
                ArchSource::Inferred,
            ),
        };
        let problems = layout::mismatches(&tensors, &spec, form, naming);
        if !problems.is_empty() {
            let what = match source {
                ArchSource::Requested => {
                    let found = match layout::infer_spec(&tensors, form) {
                        Ok(found) => format!("holds {}", describe_briefly(&found)),
                        Err(_) => "holds no architecture we recognise".to_string(),
                    };
                    format!(
                        "{found} ({form} form, {naming} naming), not the requested {}",
                        describe_briefly(&spec)
                    )
                }
                ArchSource::Recorded => format!(
                    "does not match the architecture its metadata records ({})",
                    describe_briefly(&spec)
                ),
                ArchSource::Inferred => {
                    format!("is not a consistent RepVGG {form}-form checkpoint")
                }
            };
            return Err(CheckpointError {
                path: path.to_path_buf(),
                problem: Problem::new(
                    CheckpointErrorKind::ArchMismatch,
                    format!("{what}: {}", summarise_mismatches(&problems)),
                ),
                details: problems,
            });
        }
        if let Some(labels) = &labels {
            metadata::validate_labels(labels, spec.num_classes).map_err(|e| {
                fail(
                    e.within("the metadata's class names do not fit")
                        .about(metadata::LABELS_KEY),
                )
            })?;
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
            preprocessing,
            labels,
            run_state,
            int8: None,
        })
    }

    /// An INT8 file as the float weights it stands for.
    fn from_quantized(
        path: &Path,
        bytes: &[u8],
        arch: Option<&ArchSpec>,
        file_tensor_count: usize,
    ) -> Result<Checkpoint, CheckpointError> {
        let fail = |problem: Problem| CheckpointError::new(path, problem);
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
            fail(Problem::corrupt(format!(
                "not a valid safetensors file ({e})"
            )))
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
            fail(Problem::corrupt(format!(
                "unreadable safetensors header ({e})"
            )))
        })?;
        let meta = header.metadata().clone().unwrap_or_default();
        let model = quantized::from_parts(&st, &meta).map_err(fail)?;
        if let Some(spec) = arch {
            let problems =
                layout::mismatches(&model.dequantized(), spec, Form::Deploy, Naming::Official);
            if !problems.is_empty() {
                return Err(CheckpointError {
                    path: path.to_path_buf(),
                    problem: Problem::new(
                        CheckpointErrorKind::ArchMismatch,
                        format!(
                            "holds {} (INT8), not the requested {}: {}",
                            describe_briefly(&model.spec),
                            describe_briefly(spec),
                            summarise_mismatches(&problems)
                        ),
                    ),
                    details: problems,
                });
            }
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            naming: Naming::Official,
            form: Form::Deploy,
            tensors: model.dequantized(),
            spec: model.spec.clone(),
            source_dtype: DType::I8,
            file_tensor_count,
            preprocessing: model.preprocessing.clone(),
            labels: model.labels.clone(),
            run_state: None,
            int8: Some(Box::new(model)),
        })
    }

    /// A checkpoint made in memory (official naming), checked like a loaded one.
    pub fn from_state_dict(
        spec: ArchSpec,
        form: Form,
        tensors: StateDict,
    ) -> Result<Checkpoint, CheckpointError> {
        let fail = |problem: Problem| CheckpointError::new(Path::new("<memory>"), problem);
        let problems = layout::mismatches(&tensors, &spec, form, Naming::Official);
        if !problems.is_empty() {
            return Err(CheckpointError {
                path: PathBuf::from("<memory>"),
                problem: Problem::new(
                    CheckpointErrorKind::ArchMismatch,
                    format!(
                        "does not match {}: {}",
                        describe_briefly(&spec),
                        summarise_mismatches(&problems)
                    ),
                ),
                details: problems,
            });
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
            preprocessing: None,
            labels: None,
            run_state: None,
            int8: None,
        })
    }

    /// How an INT8 file was quantized; `None` for float weights.
    pub fn quantization(&self) -> Option<&quantized::QuantizationInfo> {
        self.int8.as_ref().map(|m| &m.info)
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
            preprocessing: self.preprocessing.clone(),
            labels: self.labels.clone(),
            run_state: None,
            int8: None,
        })
    }

    /// The safetensors metadata this checkpoint is written with: architecture, form, naming,
    /// and (when known) preprocessing and class names.
    pub fn metadata(&self, naming: Naming) -> HashMap<String, String> {
        let mut metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("repvgg.form".to_string(), self.form.to_string()),
            ("repvgg.naming".to_string(), naming.to_string()),
            (
                "repvgg.arch".to_string(),
                serde_json::to_string(&self.spec).expect("spec serialises"),
            ),
        ]);
        if let Some(p) = &self.preprocessing {
            metadata.insert(
                metadata::PREPROCESSING_KEY.to_string(),
                serde_json::to_string(p).expect("preprocessing serialises"),
            );
        }
        if let Some(labels) = &self.labels {
            metadata.insert(
                metadata::LABELS_KEY.to_string(),
                serde_json::to_string(labels).expect("labels serialise"),
            );
        }
        metadata
    }

    /// Writes `f32` safetensors in the chosen naming, atomically (temp file + rename), with
    /// [`Checkpoint::metadata`].
    pub fn save_safetensors(&self, path: &Path, naming: Naming) -> Result<(), CheckpointError> {
        let fail = |problem: Problem| CheckpointError::new(path, problem);
        let renamed = naming::rename(&self.tensors, Naming::Official, naming).map_err(fail)?;
        write_safetensors(path, &renamed, Some(self.metadata(naming)))
    }
}

/// Writes `f32` tensors as safetensors, atomically. Every safetensors file this project
/// writes (checkpoints, `forward` outputs) goes through here.
pub fn write_safetensors(
    path: &Path,
    tensors: &StateDict,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), CheckpointError> {
    let fail = |problem: Problem| CheckpointError::new(path, problem);
    let views: Vec<(&String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(key, t)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice(&t.data),
            )
            .map(|view| (key, view))
            .map_err(|e| {
                fail(
                    Problem::new(CheckpointErrorKind::ShapeMismatch, format!("{key}: {e}"))
                        .about(key),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| {
        fail(Problem::new(
            CheckpointErrorKind::InvalidArgument,
            format!("cannot serialise: {e}"),
        ))
    })?;
    write_atomically(path, &bytes)
}

/// Short lists on one line.
fn summarise(problems: &[String]) -> String {
    problems.join("; ")
}

/// Where the architecture a file is checked against came from.
enum ArchSource {
    Requested,
    Recorded,
    Inferred,
}

/// `RepVGG-A0 (1000 classes)`, or the layout of a custom one.
fn describe_briefly(spec: &ArchSpec) -> String {
    match spec.name.as_str() {
        "" | "custom" => format!(
            "a custom RepVGG (depths {:?}, widths {:?}, stem {}, {} classes)",
            spec.depths, spec.widths, spec.stem_width, spec.num_classes
        ),
        name => format!("{name} ({} classes)", spec.num_classes),
    }
}

/// How many keys are missing, unexpected and mis-shaped on the first line, then a line per
/// kind with its first few keys: a wrong architecture gives hundreds, and a 20 KB line helps
/// nobody. [`CheckpointError::details`] keeps the whole list.
fn summarise_mismatches(problems: &[String]) -> String {
    const SHOWN: usize = 3;
    let kinds = [
        ("missing", "missing key"),
        ("unexpected", "unexpected key"),
        ("mis-shaped", "has shape"),
    ];
    let mut counts = Vec::new();
    let mut lines = Vec::new();
    for (kind, marker) in kinds {
        let matching: Vec<&String> = problems.iter().filter(|p| p.contains(marker)).collect();
        if matching.is_empty() {
            continue;
        }
        counts.push(format!("{} {kind}", matching.len()));
        let shown: Vec<&str> = matching.iter().take(SHOWN).map(|p| p.as_str()).collect();
        let more = matching.len().saturating_sub(SHOWN);
        lines.push(format!(
            "\n  {kind}: {}{}",
            shown.join("; "),
            if more > 0 {
                format!("; and {more} more")
            } else {
                String::new()
            }
        ));
    }
    format!("{} keys{}", counts.join(", "), lines.concat())
}

/// Writes to a temporary file beside `path`, syncs, then renames over it: a crash or a full
/// disk leaves either the old file or the new one, never half of one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    write_atomically_observed(path, bytes, &mut |_| {})
}

/// The steps of [`write_atomically`], each reported once it has succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteStep {
    /// The bytes are in the temporary file.
    Written,
    /// The temporary file is on the disk (fsync).
    FileSynced,
    /// The temporary file has the destination's name.
    Renamed,
    /// The directory, and so the new name, is on the disk (fsync; Unix).
    DirectorySynced,
}

/// [`write_atomically`], calling `observe` after each step: how a test sees that the data is
/// synced before the rename and the directory after it.
pub fn write_atomically_observed(
    path: &Path,
    bytes: &[u8],
    observe: &mut dyn FnMut(WriteStep),
) -> Result<(), CheckpointError> {
    let fail = |what: &str, e: std::io::Error| CheckpointError::new(path, Problem::io(what, &e));
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
        observe(WriteStep::Written);
        file.sync_all().map_err(|e| fail("cannot sync", e))?;
        observe(WriteStep::FileSynced);
        std::fs::rename(&tmp, path).map_err(|e| fail("cannot rename into place", e))?;
        observe(WriteStep::Renamed);
        // The rename lives in the directory: synced too, so that after a crash the name
        // points at the new file, not at nothing.
        #[cfg(unix)]
        {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| fail("cannot sync its directory", e))?;
            observe(WriteStep::DirectorySynced);
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Raw tensors from either file format, keyed as in the file, with the safetensors header's
/// metadata (a `.pth` has none).
type RawFile = (Vec<(String, RawTensor)>, Option<HashMap<String, String>>);

fn read_raw(bytes: &[u8]) -> Result<RawFile, Problem> {
    // A safetensors file opens with its JSON header's length (u64, little-endian) and then the
    // header itself. That length can begin with any byte, 0x80 (a pickle's PROTO) included, so
    // it is recognised by its structure rather than by a magic byte.
    let looks_like_safetensors = bytes.len() >= 9
        && bytes[8] == b'{'
        && u64::from_le_bytes(bytes[..8].try_into().unwrap())
            .checked_add(8)
            .is_some_and(|end| end <= bytes.len() as u64);
    if !looks_like_safetensors && (bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"\x80")) {
        return Ok((pth::read_pth(bytes)?, None));
    }
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        Problem::corrupt(format!(
            "neither a PyTorch checkpoint nor valid safetensors ({e})"
        ))
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Problem::corrupt(format!("unreadable safetensors header ({e})")))?;
    let metadata = header.metadata().clone();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(key, view)| {
            let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| {
                Problem::new(
                    CheckpointErrorKind::ShapeMismatch,
                    format!("'{key}' has unsupported dtype {:?}", view.dtype()),
                )
                .about(&key)
            })?;
            Ok((
                key,
                RawTensor {
                    dtype,
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                },
            ))
        })
        .collect::<Result<_, Problem>>()?;
    Ok((tensors, metadata))
}

/// Strips `module.`, drops `num_batches_tracked`, converts to `f32`, renames to official.
/// An error comes as a line and, for a list of keys, the whole list.
fn normalise(
    raw: Vec<(String, RawTensor)>,
) -> Result<(StateDict, Naming, DType), (Problem, Vec<String>)> {
    let one = |problem: Problem| (problem, Vec::new());
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
            one(Problem::new(
                CheckpointErrorKind::ShapeMismatch,
                format!(
                    "'{key}' has dtype {:?}; RepVGG weights must be floating point",
                    tensor.dtype
                ),
            )
            .about(&key))
        })?;
        if widest.is_none_or(|w| tensor.dtype.size() > w.size()) {
            widest = Some(tensor.dtype);
        }
        floats.push((key, converted));
    }
    let naming = Naming::detect(floats.iter().map(|(k, _)| k.as_str())).ok_or_else(|| {
        one(Problem::new(
            CheckpointErrorKind::ArchMismatch,
            "no RepVGG weights found (no keys in official, timm or mmpretrain naming)",
        ))
    })?;
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
        let line = format!("{naming} naming, but {}", summarise_mismatches(&unexpected));
        return Err((
            Problem::new(CheckpointErrorKind::UnexpectedKey, line),
            unexpected,
        ));
    }
    Ok((dict, naming, widest.unwrap_or(DType::F32)))
}

/// Rejects NaN/infinite values and negative BN variances, which would silently poison every
/// output downstream.
fn check_values(tensors: &StateDict) -> Result<(), Problem> {
    let bad: Vec<String> = tensors
        .iter()
        .filter(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
        .map(|(k, _)| format!("'{k}'"))
        .collect();
    if !bad.is_empty() {
        return Err(Problem::new(
            CheckpointErrorKind::BadValue,
            format!("NaN or infinite values in {}", summarise(&bad)),
        ));
    }
    let negative: Vec<String> = tensors
        .iter()
        .filter(|(k, t)| k.ends_with("running_var") && t.data.iter().any(|&v| v < 0.0))
        .map(|(k, _)| format!("'{k}'"))
        .collect();
    if !negative.is_empty() {
        return Err(Problem::new(
            CheckpointErrorKind::BadValue,
            format!("negative BN running variance in {}", summarise(&negative)),
        ));
    }
    Ok(())
}
