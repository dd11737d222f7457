//! Image-classification data in its real on-disk formats: IDX (MNIST, Fashion-MNIST; gzipped or
//! not), CIFAR-10/100 binary batches and ImageFolder trees of JPEG/PNG files. Small formats load
//! into one in-memory [`Dataset`] of `u8` pixels; image folders decode on demand. Both are
//! [`Samples`], so augmentation and batching ([`transform`], [`loader`]) see one kind of data.
//!
//! ```no_run
//! use rand::SeedableRng;
//! use repvgg_checkpoint::ImageNetPreset;
//! use repvgg_data::{Pipeline, decode_image, open_dir};
//!
//! // A directory is recognised by its files (IDX, CIFAR binary, class folders).
//! let data = open_dir("/usr/share/datasets/fashion-mnist".as_ref(), 0.1)?;
//! println!("{} training images, {} classes", data.train.len(), data.train.classes());
//!
//! // The official evaluation preprocessing of a photo: resize 256, centre crop 224, normalise.
//! let photo = decode_image("cat.jpg".as_ref())?;
//! let mut rng = rand::rngs::StdRng::seed_from_u64(0);
//! let official = Pipeline::for_model(&ImageNetPreset::Official.preprocessing());
//! let (chw, h, w) = official.apply(&photo, &mut rng);
//! assert_eq!((chw.len(), h, w), (3 * 224 * 224, 224, 224));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod folder;
pub mod loader;
pub mod transform;

use std::io::Read;
use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage, RgbImage};

pub use folder::{
    ImageFolder, MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, decode_image, decode_image_bytes,
};
pub use loader::Loader;
pub use repvgg_checkpoint::metadata::{IMAGENET_MEAN, IMAGENET_STD};
pub use transform::{Batch, Pipeline, Transform};

/// The 1000 ImageNet-1k class names in class order, as timm prints them (from timm 1.0.31's
/// synset lists, Apache-2.0; see `imagenet_classes.NOTICE`).
pub fn imagenet_class_names() -> Vec<&'static str> {
    include_str!("imagenet_classes.txt").lines().collect()
}

/// Labelled images, however they are stored.
pub trait Samples: Sync + Send {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn classes(&self) -> usize;
    fn label(&self, i: usize) -> usize;
    /// Image `i`, grey (one channel) or RGB.
    fn image(&self, i: usize) -> Result<DynamicImage, DataError>;
    /// Where sample `i` comes from, for error messages.
    fn describe(&self, i: usize) -> String {
        format!("sample {i}")
    }
}

/// What is wrong, by kind, for callers that act on it (a server answers 400 for an image it
/// cannot decode, a training run stops on a missing file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DataErrorKind {
    /// Reading failed: a missing file or folder, permissions.
    Io,
    /// The bytes break their format: a truncated IDX or CIFAR file, a broken image.
    Corrupt,
    /// More than this reads, refused before allocating: an image's pixel count or aspect
    /// ratio, a gzip stream that expands without end.
    TooLarge,
    /// A valid file of a kind this does not read (an IDX of floats, a GIF).
    Unsupported,
    /// A data set laid out in a way that cannot be trained on: an empty class folder, train
    /// and val with different classes, too few images to hold some out.
    Layout,
    /// The loader's worker stopped without a batch or an error (a bug, reported rather than
    /// ending an epoch early in silence).
    Loader,
}

/// Every failure names the file and says what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct DataError {
    pub path: PathBuf,
    pub kind: DataErrorKind,
    pub problem: String,
}

fn fail(path: &Path, kind: DataErrorKind, problem: impl Into<String>) -> DataError {
    DataError {
        path: path.to_path_buf(),
        kind,
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
    pub fn pixels(&self, i: usize) -> &[u8] {
        let size = self.channels * self.height * self.width;
        &self.images[i * size..(i + 1) * size]
    }
}

impl Dataset {
    /// Per-channel mean and standard deviation of the pixels scaled to [0, 1] (grey data sets
    /// repeat theirs over three channels), for normalising with the data set's own statistics.
    pub fn channel_stats(&self) -> ([f32; 3], [f32; 3]) {
        let plane = self.height * self.width;
        let mut mean = [0f32; 3];
        let mut std = [0f32; 3];
        for c in 0..self.channels.min(3) {
            let (mut sum, mut sq) = (0f64, 0f64);
            for i in 0..self.len() {
                for &p in &self.pixels(i)[c * plane..(c + 1) * plane] {
                    let v = p as f64 / 255.0;
                    sum += v;
                    sq += v * v;
                }
            }
            let n = (self.len() * plane).max(1) as f64;
            let m = sum / n;
            mean[c] = m as f32;
            std[c] = (sq / n - m * m).max(1e-12).sqrt() as f32;
        }
        if self.channels == 1 {
            mean = [mean[0]; 3];
            std = [std[0]; 3];
        }
        (mean, std)
    }
}

impl Samples for Dataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn label(&self, i: usize) -> usize {
        self.labels[i] as usize
    }

    fn image(&self, i: usize) -> Result<DynamicImage, DataError> {
        let (h, w) = (self.height as u32, self.width as u32);
        let chw = self.pixels(i);
        Ok(if self.channels == 1 {
            DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, chw.to_vec()).unwrap())
        } else {
            let plane = self.height * self.width;
            let hwc: Vec<u8> = (0..plane)
                .flat_map(|p| (0..3).map(move |c| chw[c * plane + p]))
                .collect();
            DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, hwc).unwrap())
        })
    }
}

/// Which half of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// The most a gzipped data file may expand to: 768 MiB, half as much again as EMNIST's
/// largest images file, so that a small gzip bomb is refused instead of filling memory (and
/// the buffer, growing by doubling, never passes 1 GiB).
const MAX_GUNZIPPED_BYTES: u64 = 768 << 20;

/// Reads a file, gunzipping it if it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path)
        .map_err(|e| fail(path, DataErrorKind::Io, format!("cannot read: {e}")))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .take(MAX_GUNZIPPED_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| {
                fail(
                    path,
                    DataErrorKind::Corrupt,
                    format!("corrupt gzip data: {e}"),
                )
            })?;
        if out.len() as u64 > MAX_GUNZIPPED_BYTES {
            return Err(fail(
                path,
                DataErrorKind::TooLarge,
                format!("expands past {MAX_GUNZIPPED_BYTES} bytes when gunzipped (refusing it)"),
            ));
        }
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
        return Err(fail(
            path,
            DataErrorKind::Corrupt,
            "not an IDX file (bad magic number)",
        ));
    }
    if bytes[2] != 0x08 {
        return Err(fail(
            path,
            DataErrorKind::Unsupported,
            format!(
                "IDX element type 0x{:02x}; only unsigned bytes (0x08) are supported",
                bytes[2]
            ),
        ));
    }
    let rank = bytes[3] as usize;
    let header = 4 + 4 * rank;
    if rank == 0 || bytes.len() < header {
        return Err(fail(
            path,
            DataErrorKind::Corrupt,
            "IDX header is truncated",
        ));
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
                DataErrorKind::TooLarge,
                format!("IDX dimensions {dims:?} are impossibly large"),
            )
        })?;
    let body = &bytes[header..];
    if body.len() != count {
        return Err(fail(
            path,
            DataErrorKind::Corrupt,
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
        .ok_or_else(|| {
            fail(
                &plain,
                DataErrorKind::Io,
                "missing (neither it nor its .gz exists)",
            )
        })
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
            DataErrorKind::Corrupt,
            format!("expected 3 dimensions (N, H, W), found {:?}", images.dims),
        ));
    };
    if labels.dims != [n] {
        return Err(fail(
            &labels_path,
            DataErrorKind::Corrupt,
            format!(
                "has {:?} labels, but the images file has {n} images",
                labels.dims
            ),
        ));
    }
    if n == 0 {
        return Err(fail(
            &images_path,
            DataErrorKind::Corrupt,
            "holds no images",
        ));
    }
    if height == 0 || width == 0 {
        return Err(fail(
            &images_path,
            DataErrorKind::Corrupt,
            format!("images of {height}x{width} pixels hold nothing to learn from"),
        ));
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
        let bytes = std::fs::read(path)
            .map_err(|e| fail(path, DataErrorKind::Io, format!("cannot read: {e}")))?;
        if bytes.is_empty() || bytes.len() % record != 0 {
            return Err(fail(
                path,
                DataErrorKind::Corrupt,
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
                    DataErrorKind::Corrupt,
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

/// What kind of data a directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataKind {
    Idx,
    Cifar10,
    Cifar100,
    ImageFolder,
}

/// A training set and the held-out set it is measured on.
pub struct DataSplits {
    pub kind: DataKind,
    pub train: std::sync::Arc<dyn Samples>,
    pub test: std::sync::Arc<dyn Samples>,
    /// Stored image size for in-memory formats; `None` for image folders (sizes vary).
    pub native_size: Option<(usize, usize)>,
    /// Per-channel mean/std of the training images (in-memory formats only).
    pub stats: Option<([f32; 3], [f32; 3])>,
    /// Grey images (IDX): a model trained on them must be fed grey images.
    pub grey: bool,
    /// Class names in label order: an image folder's folder names, or the names a known data
    /// set ships with (see [`known_class_names`]); `None` when nothing says.
    pub class_names: Option<Vec<String>>,
}

impl DataSplits {
    fn in_memory(
        kind: DataKind,
        train: Dataset,
        test: Dataset,
        class_names: Option<Vec<String>>,
    ) -> DataSplits {
        let classes = train.classes.max(test.classes);
        DataSplits {
            kind,
            native_size: Some((train.height, train.width)),
            stats: Some(train.channel_stats()),
            grey: train.channels == 1,
            train: std::sync::Arc::new(train),
            test: std::sync::Arc::new(test),
            class_names: class_names.filter(|names| names.len() == classes),
        }
    }
}

const FASHION_MNIST: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];
const CIFAR10: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
/// CIFAR-100's fine labels in label order (the binary release's `fine_label_names.txt`).
const CIFAR100: &str = include_str!("cifar100_classes.txt");

/// The class names of a known data set in `dir`: the names file a CIFAR release ships
/// (`batches.meta.txt`, `fine_label_names.txt`), else the published list; for IDX data, which
/// records no names, Fashion-MNIST's or MNIST's digits when the directory is named after one.
pub fn known_class_names(dir: &Path, kind: DataKind) -> Option<Vec<String>> {
    let from_file = |name: &str| {
        std::fs::read_to_string(dir.join(name)).ok().map(|text| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
    };
    let list = |names: &[&str]| Some(names.iter().map(|n| n.to_string()).collect());
    match kind {
        DataKind::Cifar10 => from_file("batches.meta.txt").or_else(|| list(&CIFAR10)),
        DataKind::Cifar100 => from_file("fine_label_names.txt")
            .or_else(|| list(&CIFAR100.lines().collect::<Vec<_>>())),
        DataKind::Idx => {
            // The directory's own name only: a parent's says nothing about what is inside.
            let last = std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .file_name()
                .map(|n| n.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            let last = last.as_str();
            if last.contains("fashion") || last.contains("fmnist") {
                list(&FASHION_MNIST)
            } else if last == "mnist" || last.starts_with("mnist-") || last.starts_with("mnist_") {
                list(&["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"])
            } else {
                None
            }
        }
        DataKind::ImageFolder => None,
    }
}

/// Opens the data in `dir`, recognising its format by its files:
/// - IDX: `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`;
/// - CIFAR-10: `data_batch_{1..5}.bin` and `test_batch.bin` (in `dir` or `dir/cifar-10-batches-bin`);
/// - CIFAR-100: `train.bin` and `test.bin` (in `dir` or `dir/cifar-100-binary`);
/// - ImageFolder: `train/` and `val/` class trees, or one class tree of which every
///   `1/val_fraction`-th image per class is held out.
pub fn open_dir(dir: &Path, val_fraction: f64) -> Result<DataSplits, DataError> {
    if !dir.is_dir() {
        return Err(fail(dir, DataErrorKind::Io, "not a directory"));
    }
    let has = |d: &Path, name: &str| d.join(name).is_file();
    if has(dir, "train-images-idx3-ubyte.gz") || has(dir, "train-images-idx3-ubyte") {
        let train = load_idx_dir(dir, Split::Train)?;
        let test = load_idx_dir(dir, Split::Test)?;
        let names = known_class_names(dir, DataKind::Idx);
        return Ok(DataSplits::in_memory(DataKind::Idx, train, test, names));
    }
    for d in [dir.to_path_buf(), dir.join("cifar-10-batches-bin")] {
        if has(&d, "data_batch_1.bin") {
            let train: Vec<PathBuf> = (1..=5)
                .map(|k| d.join(format!("data_batch_{k}.bin")))
                .filter(|p| p.is_file())
                .collect();
            let train = load_cifar(&train, Cifar::Ten)?;
            let test = load_cifar(&[d.join("test_batch.bin")], Cifar::Ten)?;
            let names = known_class_names(&d, DataKind::Cifar10);
            return Ok(DataSplits::in_memory(DataKind::Cifar10, train, test, names));
        }
    }
    for d in [dir.to_path_buf(), dir.join("cifar-100-binary")] {
        if has(&d, "train.bin") && has(&d, "test.bin") {
            let train = load_cifar(&[d.join("train.bin")], Cifar::Hundred)?;
            let test = load_cifar(&[d.join("test.bin")], Cifar::Hundred)?;
            let names = known_class_names(&d, DataKind::Cifar100);
            return Ok(DataSplits::in_memory(
                DataKind::Cifar100,
                train,
                test,
                names,
            ));
        }
    }
    let (train, test) = if dir.join("train").is_dir() && dir.join("val").is_dir() {
        (
            ImageFolder::open(&dir.join("train"))?,
            ImageFolder::open(&dir.join("val"))?,
        )
    } else {
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            return Err(fail(
                dir,
                DataErrorKind::Layout,
                format!(
                    "--val-fraction {val_fraction}: an image folder without train/ and val/ \
                     sub-folders needs a held-out share in (0, 1), such as 0.1, to validate and \
                     evaluate on"
                ),
            ));
        }
        let all = ImageFolder::open(dir)?;
        let total = all.files.len();
        let (train, val) = all.split(val_fraction);
        if train.files.is_empty() || val.files.is_empty() {
            return Err(fail(
                dir,
                DataErrorKind::Layout,
                format!(
                    "{total} images are too few to hold out a share of {val_fraction} per class \
                     for validation and train on the rest; add images or change --val-fraction"
                ),
            ));
        }
        (train, val)
    };
    if train.class_names != test.class_names {
        return Err(fail(
            dir,
            DataErrorKind::Layout,
            "train and val class folders differ",
        ));
    }
    Ok(DataSplits {
        kind: DataKind::ImageFolder,
        class_names: Some(train.class_names.clone()),
        train: std::sync::Arc::new(train),
        test: std::sync::Arc::new(test),
        native_size: None,
        stats: None,
        grey: false,
    })
}
