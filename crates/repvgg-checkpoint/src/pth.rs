//! PyTorch `.pth` files: the zip layout `torch.save` has written since 1.6
//! (`<name>/data.pkl` + `<name>/data/<key>` storages) and the older "legacy" stream
//! (magic, protocol, sys info, pickle, storage keys, raw storages).

use std::collections::HashMap;
use std::io::{Cursor, Read};

use crate::error::{CheckpointErrorKind, Problem};
use crate::pickle::{TensorRef, Value, read_pickle};
use crate::tensor::{DType, Tensor};

/// The legacy format's magic number, the first pickle in such a file.
const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;

/// Parses `.pth` bytes into raw tensors (any dtype) keyed as in the file, after unwrapping
/// `state_dict`/`model` wrappers. Integer tensors are returned too: the caller decides.
pub fn read_pth(bytes: &[u8]) -> Result<Vec<(String, RawTensor)>, Problem> {
    let parse = || {
        if bytes.starts_with(b"PK\x03\x04") {
            read_zip(bytes)
        } else if bytes.starts_with(b"\x80") {
            read_legacy(bytes)
        } else {
            Err(Problem::corrupt(
                "not a PyTorch checkpoint (neither a zip archive nor a pickle stream)",
            ))
        }
    };
    // Pickled containers can nest as deep as the file is long (two bytes a level), and
    // building, walking and dropping them recurses. Parse on a thread whose stack is sized for
    // that, so a hostile file gives an error instead of overflowing the stack; only flat
    // tensors come back.
    let stack = bytes.len().saturating_mul(256).clamp(8 << 20, 1 << 30);
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(stack)
            .spawn_scoped(scope, parse)
            .map_err(|e| Problem::io("cannot start the parser thread", &e))?
            .join()
            .map_err(|_| {
                Problem::new(
                    CheckpointErrorKind::Internal,
                    "the pickle parser failed unexpectedly",
                )
            })?
    })
}

/// A tensor before conversion to `f32`: its dtype and contiguous little-endian bytes.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl RawTensor {
    /// `None` for integer tensors.
    pub fn to_f32(&self) -> Option<Tensor> {
        self.dtype
            .decode_floats(&self.bytes)
            .map(|data| Tensor::new(self.shape.clone(), data))
    }
}

fn read_zip(bytes: &[u8]) -> Result<Vec<(String, RawTensor)>, Problem> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| Problem::corrupt(format!("corrupt zip archive: {e}")))?;
    let pickle_name = archive
        .file_names()
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(str::to_owned)
        .ok_or_else(|| Problem::corrupt("zip archive has no data.pkl: not a torch.save file"))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_owned();
    if let Ok(mut entry) = archive.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        entry
            .read_to_string(&mut order)
            .map_err(|e| Problem::corrupt(format!("zip entry '{prefix}byteorder': {e}")))?;
        if order.trim() != "little" {
            return Err(Problem::new(
                CheckpointErrorKind::Unsupported,
                format!("storages are {order}-endian; only little-endian is supported"),
            ));
        }
    }
    let pickle = read_entry(&mut archive, &pickle_name, bytes.len())?;
    let (root, _) = read_pickle(&pickle)?;
    let mut storages = HashMap::new();
    collect_tensors(&root, |key| {
        if !storages.contains_key(key) {
            let data = read_entry(&mut archive, &format!("{prefix}data/{key}"), bytes.len())?;
            storages.insert(key.to_owned(), data);
        }
        Ok(())
    })?;
    materialize(root, &storages)
}

fn read_entry(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    name: &str,
    archive_len: usize,
) -> Result<Vec<u8>, Problem> {
    let mut entry = archive.by_name(name).map_err(|e| {
        Problem::corrupt(format!("zip entry '{name}' is missing or unreadable: {e}"))
    })?;
    // The declared size is untrusted: never reserve, nor read, more than the whole file
    // (torch.save stores entries uncompressed, so no honest entry is larger).
    let mut data = Vec::with_capacity((entry.size() as usize).min(archive_len));
    (&mut entry)
        .take(archive_len as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| Problem::corrupt(format!("zip entry '{name}' is corrupt: {e}")))?;
    if data.len() > archive_len {
        return Err(Problem::new(
            CheckpointErrorKind::TooLarge,
            format!("zip entry '{name}' expands past the size of the whole file (refusing it)"),
        ));
    }
    Ok(data)
}

fn read_legacy(bytes: &[u8]) -> Result<Vec<(String, RawTensor)>, Problem> {
    let mut pos = 0;
    let mut next = |what: &str| -> Result<Value, Problem> {
        let (value, used) =
            read_pickle(&bytes[pos..]).map_err(|e| e.within(&format!("legacy .pth, {what}")))?;
        pos += used;
        Ok(value)
    };
    if next("magic number")? != Value::Int(LEGACY_MAGIC) {
        return Err(Problem::corrupt(
            "a pickle stream, but not a torch.save file (wrong magic number)",
        ));
    }
    next("protocol version")?;
    next("system info")?;
    let root = next("state dict")?;
    let Value::List(keys) = next("storage keys")? else {
        return Err(Problem::corrupt(
            "legacy .pth: storage key list is not a list",
        ));
    };
    // Each storage follows as an 8-byte element count and its raw elements, in key order.
    let mut element_sizes = HashMap::new();
    collect_dtypes(&root, &mut element_sizes);
    let mut storages = HashMap::new();
    for key in keys {
        let Value::Str(key) = key else {
            return Err(Problem::corrupt(
                "legacy .pth: a storage key is not a string",
            ));
        };
        let size = *element_sizes.get(&key).ok_or_else(|| {
            Problem::corrupt(format!(
                "legacy .pth: storage '{key}' is not used by any tensor"
            ))
        })?;
        let count_bytes = bytes.get(pos..pos + 8).ok_or_else(|| {
            Problem::corrupt(format!("legacy .pth: file ends before storage '{key}'"))
        })?;
        let count = u64::from_le_bytes(count_bytes.try_into().unwrap()) as usize;
        let start = pos + 8;
        let end = count
            .checked_mul(size)
            .and_then(|n| start.checked_add(n))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| {
                Problem::corrupt(format!("legacy .pth: file ends inside storage '{key}'"))
            })?;
        storages.insert(key, bytes[start..end].to_vec());
        pos = end;
    }
    materialize(root, &storages)
}

fn collect_dtypes(value: &Value, out: &mut HashMap<String, usize>) {
    match value {
        Value::Tensor(t) => {
            out.insert(t.storage.key.clone(), t.storage.dtype.size());
        }
        Value::List(items) | Value::Tuple(items) => {
            items.iter().for_each(|v| collect_dtypes(v, out))
        }
        Value::Dict(items) => items.iter().for_each(|(_, v)| collect_dtypes(v, out)),
        _ => {}
    }
}

fn collect_tensors(
    value: &Value,
    mut visit: impl FnMut(&str) -> Result<(), Problem>,
) -> Result<(), Problem> {
    fn walk(
        value: &Value,
        visit: &mut dyn FnMut(&str) -> Result<(), Problem>,
    ) -> Result<(), Problem> {
        match value {
            Value::Tensor(t) => visit(&t.storage.key),
            Value::List(items) | Value::Tuple(items) => {
                items.iter().try_for_each(|v| walk(v, visit))
            }
            Value::Dict(items) => items.iter().try_for_each(|(_, v)| walk(v, visit)),
            _ => Ok(()),
        }
    }
    walk(value, &mut visit)
}

/// Finds the state dict inside the pickled object: the object itself, or its `state_dict`
/// or `model` entry (training scripts wrap weights with epoch counters and optimizer state).
fn state_dict_of(root: Value) -> Result<Vec<(Value, Value)>, Problem> {
    let Value::Dict(items) = root else {
        return Err(Problem::corrupt(format!(
            "the file holds a {}, not a state dict",
            root.kind()
        )));
    };
    for wrapper in ["state_dict", "model", "model_state_dict", "module"] {
        let inner = items
            .iter()
            .find(|(k, v)| *k == Value::Str(wrapper.into()) && matches!(v, Value::Dict(_)));
        if let Some((_, Value::Dict(inner))) = inner {
            return Ok(inner.clone());
        }
    }
    Ok(items)
}

fn materialize(
    root: Value,
    storages: &HashMap<String, Vec<u8>>,
) -> Result<Vec<(String, RawTensor)>, Problem> {
    let mut out = Vec::new();
    for (key, value) in state_dict_of(root)? {
        let Value::Str(key) = key else {
            return Err(Problem::corrupt(format!(
                "state dict key is a {}, not a string",
                key.kind()
            )));
        };
        match value {
            Value::Tensor(t) => {
                let storage = storages.get(&t.storage.key).ok_or_else(|| {
                    Problem::corrupt(format!("{key}: storage '{}' is missing", t.storage.key))
                        .about(&key)
                })?;
                out.push((
                    key.clone(),
                    gather(&t, storage).map_err(|e| e.within(&key).about(&key))?,
                ));
            }
            other => {
                return Err(Problem::corrupt(format!(
                    "state dict entry '{key}' holds a {}, not a tensor",
                    other.kind()
                )));
            }
        }
    }
    Ok(out)
}

/// Copies a strided view out of its storage into contiguous bytes.
fn gather(t: &TensorRef, storage: &[u8]) -> Result<RawTensor, Problem> {
    let size = t.storage.dtype.size();
    let too_large = || {
        Problem::new(
            CheckpointErrorKind::TooLarge,
            format!("tensor of shape {:?} is impossibly large", t.shape),
        )
    };
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(too_large)?;
    let total = numel.checked_mul(size).ok_or_else(too_large)?;
    // Views may repeat elements (stride 0), but never by more than a state dict could need.
    if total > storage.len().saturating_add(1 << 28) {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(total);
    if numel > 0 {
        // The furthest element the view touches must lie inside the storage.
        let last = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&n, &s)| {
                (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
            })
            .ok_or_else(too_large)?;
        if last
            .checked_add(1)
            .and_then(|n| n.checked_mul(size))
            .is_none_or(|end| end > storage.len())
        {
            return Err(Problem::corrupt(format!(
                "tensor of shape {:?} reaches element {last}, but its storage has {} (truncated file?)",
                t.shape,
                storage.len() / size
            )));
        }
        // Every index below is bounded by `last`, checked above.
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let at = t.offset
                + index
                    .iter()
                    .zip(&t.stride)
                    .map(|(&i, &s)| i * s)
                    .sum::<usize>();
            bytes.extend_from_slice(&storage[at * size..(at + 1) * size]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
    }
    Ok(RawTensor {
        dtype: t.storage.dtype,
        shape: t.shape.clone(),
        bytes,
    })
}
