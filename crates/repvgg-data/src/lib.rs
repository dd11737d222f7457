//! Image-classification data in its real on-disk formats: IDX (MNIST, Fashion-MNIST; gzipped or
//! not) and CIFAR-10/100 binary batches. Everything loads into one [`Dataset`] of `u8` pixels,
//! NCHW, so that augmentation and batching downstream see a single shape of data.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Every failure names the file and says what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct DataError {
    pub path: PathBuf,
    pub problem: String,
}

fn fail(path: &Path, problem: impl Into<String>) -> DataError {
    DataError {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Labelled images, pixels `u8` in NCHW order.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u16>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `i`, CHW.
    pub fn image(&self, i: usize) -> &[u8] {
        let size = self.channels * self.height * self.width;
        &self.images[i * size..(i + 1) * size]
    }
}

/// Which half of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Reads a file, gunzipping it if it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| fail(path, format!("cannot read: {e}")))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| fail(path, format!("corrupt gzip data: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// An IDX array of unsigned bytes: its dimensions and data.
#[derive(Clone, Debug, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file of `u8` (type code 0x08), as MNIST and Fashion-MNIST ship them.
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let bytes = read_maybe_gz(path)?;
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(fail(path, "not an IDX file (bad magic number)"));
    }
    if bytes[2] != 0x08 {
        return Err(fail(
            path,
            format!(
                "IDX element type 0x{:02x}; only unsigned bytes (0x08) are supported",
                bytes[2]
            ),
        ));
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if rank == 0 || bytes.len() < header {
        return Err(fail(path, "IDX header is truncated"));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            fail(
                path,
                format!("IDX dimensions {dims:?} are impossibly large"),
            )
        })?;
    let body = &bytes[header..];
    if body.len() != count {
        return Err(fail(
            path,
            format!(
                "IDX header promises {dims:?} = {count} bytes, file has {} (truncated?)",
                body.len()
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: body.to_vec(),
    })
}

/// Finds `{prefix}-{kind}-ubyte` or `.gz` in `dir`.
fn idx_file(dir: &Path, prefix: &str, kind: &str) -> Result<PathBuf, DataError> {
    let plain = dir.join(format!("{prefix}-{kind}-ubyte"));
    let gz = dir.join(format!("{prefix}-{kind}-ubyte.gz"));
    [gz, plain.clone()]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| fail(&plain, "missing (neither it nor its .gz exists)"))
}

/// An MNIST-style directory: `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
/// Grey images keep one channel; models expand it to three.
pub fn load_idx_dir(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images_path = idx_file(dir, prefix, "images-idx3")?;
    let labels_path = idx_file(dir, prefix, "labels-idx1")?;
    let images = read_idx(&images_path)?;
    let labels = read_idx(&labels_path)?;
    let [n, height, width] = images.dims[..] else {
        return Err(fail(
            &images_path,
            format!("expected 3 dimensions (N, H, W), found {:?}", images.dims),
        ));
    };
    if labels.dims != [n] {
        return Err(fail(
            &labels_path,
            format!(
                "has {:?} labels, but the images file has {n} images",
                labels.dims
            ),
        ));
    }
    if n == 0 {
        return Err(fail(&images_path, "holds no images"));
    }
    let labels: Vec<u16> = labels.data.iter().map(|&l| l as u16).collect();
    let classes = *labels.iter().max().unwrap() as usize + 1;
    Ok(Dataset {
        images: images.data,
        labels,
        channels: 1,
        height,
        width,
        classes,
    })
}

/// CIFAR's binary batches: records of label byte(s) + 3072 bytes of 32x32 RGB, CHW.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cifar {
    /// One label byte per record, 10 classes.
    Ten,
    /// Coarse and fine label bytes per record; the fine label (100 classes) is used.
    Hundred,
}

pub fn load_cifar(files: &[PathBuf], kind: Cifar) -> Result<Dataset, DataError> {
    const PIXELS: usize = 3 * 32 * 32;
    let label_bytes = match kind {
        Cifar::Ten => 1,
        Cifar::Hundred => 2,
    };
    let record = label_bytes + PIXELS;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| fail(path, format!("cannot read: {e}")))?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            return Err(fail(
                path,
                format!(
                    "{} bytes is not a whole number of {record}-byte CIFAR records (truncated?)",
                    bytes.len()
                ),
            ));
        }
        for chunk in bytes.chunks_exact(record) {
            let label = chunk[label_bytes - 1] as u16;
            let limit = if kind == Cifar::Ten { 10 } else { 100 };
            if label >= limit {
                return Err(fail(
                    path,
                    format!("label {label} out of range for {limit} classes"),
                ));
            }
            labels.push(label);
            images.extend_from_slice(&chunk[label_bytes..]);
        }
    }
    Ok(Dataset {
        images,
        labels,
        channels: 3,
        height: 32,
        width: 32,
        classes: if kind == Cifar::Ten { 10 } else { 100 },
    })
}
