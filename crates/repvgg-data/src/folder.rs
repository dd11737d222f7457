//! ImageFolder: one sub-folder per class, JPEG/PNG files inside, as torchvision reads ImageNet.

use std::path::{Path, PathBuf};

use image::DynamicImage;

use crate::{DataError, DataErrorKind, Samples, fail};

/// Image files of a class-per-folder tree, decoded on demand.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    pub root: PathBuf,
    /// Class names, sorted: the label of class `k` is `k`, as in torchvision.
    pub class_names: Vec<String>,
    pub files: Vec<(PathBuf, usize)>,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| fail(dir, DataErrorKind::Io, format!("cannot list: {e}")))?;
    let mut paths = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(dir, DataErrorKind::Io, format!("cannot list: {e}")))?;
    paths.sort();
    Ok(paths)
}

impl ImageFolder {
    /// Reads the tree under `root`. A class folder without images is an error (a typo or a
    /// failed copy), not a class that silently never appears.
    pub fn open(root: &Path) -> Result<ImageFolder, DataError> {
        let mut class_names = Vec::new();
        let mut files = Vec::new();
        for dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
            let label = class_names.len();
            let before = files.len();
            for file in sorted_entries(&dir)? {
                if file.is_file() && is_image(&file) {
                    files.push((file, label));
                }
            }
            if files.len() == before {
                return Err(fail(
                    &dir,
                    DataErrorKind::Layout,
                    "class folder holds no .jpg/.jpeg/.png images",
                ));
            }
            class_names.push(dir.file_name().unwrap().to_string_lossy().into_owned());
        }
        if class_names.is_empty() {
            return Err(fail(
                root,
                DataErrorKind::Layout,
                "no class folders (expected one sub-folder of images per class)",
            ));
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            class_names,
            files,
        })
    }

    /// Splits off every `1/fraction`-th file of each class as validation data: deterministic,
    /// stratified, and independent of the file system's listing order.
    pub fn split(&self, val_fraction: f64) -> (ImageFolder, ImageFolder) {
        let mut train = ImageFolder {
            files: Vec::new(),
            ..self.clone()
        };
        let mut val = train.clone();
        let mut seen = vec![0usize; self.class_names.len()];
        for (path, label) in &self.files {
            let k = seen[*label];
            seen[*label] += 1;
            // Class member k goes to validation when the running share falls behind.
            let target = ((k + 1) as f64 * val_fraction).floor() as usize;
            let so_far = (k as f64 * val_fraction).floor() as usize;
            if target > so_far {
                val.files.push((path.clone(), *label));
            } else {
                train.files.push((path.clone(), *label));
            }
        }
        (train, val)
    }
}

impl Samples for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn classes(&self) -> usize {
        self.class_names.len()
    }

    fn label(&self, i: usize) -> usize {
        self.files[i].1
    }

    fn image(&self, i: usize) -> Result<DynamicImage, DataError> {
        decode_image(&self.files[i].0)
    }

    fn describe(&self, i: usize) -> String {
        self.files[i].0.display().to_string()
    }
}

/// Decodes a JPEG or PNG file; a broken or truncated file is an error naming it.
pub fn decode_image(path: &Path) -> Result<DynamicImage, DataError> {
    let bytes = std::fs::read(path)
        .map_err(|e| fail(path, DataErrorKind::Io, format!("cannot read: {e}")))?;
    decode_image_bytes(&bytes, path)
}

/// The most pixels (width x height) an image may declare: 64 megapixels, a 256 MB RGBA
/// buffer. Headers are checked against it before any pixel memory is committed, so a small
/// file that claims 100k x 100k pixels is refused rather than allocated.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 26;

/// The most one side of an image may exceed the other. Resizing keeps the aspect ratio, so a
/// 1 x 65,000 strip (a few KB as a JPEG) resized to a 256-pixel short side would need a 13 GB
/// buffer; no photograph is anywhere near this thin.
pub const MAX_ASPECT_RATIO: u32 = 64;

/// Decodes a JPEG or PNG held in memory (a request body, a file's bytes); `origin` names
/// where the bytes came from in the error.
pub fn decode_image_bytes(bytes: &[u8], origin: &Path) -> Result<DynamicImage, DataError> {
    let corrupt = |problem: String| fail(origin, DataErrorKind::Corrupt, problem);
    let format = image::guess_format(bytes)
        .ok()
        .filter(|f| matches!(f, image::ImageFormat::Jpeg | image::ImageFormat::Png))
        .ok_or_else(|| {
            fail(
                origin,
                DataErrorKind::Unsupported,
                "not a JPEG or PNG image (unrecognised contents)",
            )
        })?;
    // The JPEG decoder fills a cut-off scan with grey rather than failing; a JPEG must end
    // with its end-of-image marker (trailing padding after it is tolerated).
    if format == image::ImageFormat::Jpeg {
        let tail = &bytes[bytes.len().saturating_sub(4096)..];
        if !tail.windows(2).any(|w| w == [0xFF, 0xD9]) {
            return Err(corrupt("truncated JPEG (no end-of-image marker)".into()));
        }
    }
    let reader = || {
        let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(MAX_IMAGE_PIXELS * 4);
        reader.limits(limits);
        reader
    };
    let (width, height) = reader()
        .into_dimensions()
        .map_err(|e| corrupt(format!("not a readable image: {e}")))?;
    let too_large = |problem: String| fail(origin, DataErrorKind::TooLarge, problem);
    if width as u64 * height as u64 > MAX_IMAGE_PIXELS {
        return Err(too_large(format!(
            "{width}x{height} pixels is more than the {MAX_IMAGE_PIXELS} this reads"
        )));
    }
    if width.max(height) > width.min(height).saturating_mul(MAX_ASPECT_RATIO) {
        return Err(too_large(format!(
            "{width}x{height} pixels is more than {MAX_ASPECT_RATIO} times longer than wide \
             (resizing it would need an outsized buffer)"
        )));
    }
    reader()
        .decode()
        .map_err(|e| corrupt(format!("not a readable image: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG whose header declares `width` x `height` RGB pixels and whose data is empty: a
    /// few dozen bytes, as a hostile upload would send.
    fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = width.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, no interlace
        for (kind, data) in [(&b"IHDR"[..], &ihdr[..]), (b"IDAT", &[]), (b"IEND", &[])] {
            png.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut crc = flate2::Crc::new();
            crc.update(kind);
            crc.update(data);
            png.extend_from_slice(kind);
            png.extend_from_slice(data);
            png.extend_from_slice(&crc.sum().to_be_bytes());
        }
        png
    }

    #[test]
    fn a_header_claiming_huge_dimensions_is_refused_before_decoding() {
        let origin = Path::new("upload.png");
        let err = decode_image_bytes(&png_header(100_000, 100_000), origin).unwrap_err();
        assert_eq!(err.kind, DataErrorKind::TooLarge);
        assert!(err.problem.contains("100000x100000 pixels"), "{err}");
        assert!(err.to_string().starts_with("upload.png: "), "{err}");
        // 65,000 pixels of a 1-pixel strip: few pixels, but a resize would need gigabytes.
        let err = decode_image_bytes(&png_header(1, 65_000), origin).unwrap_err();
        assert_eq!(err.kind, DataErrorKind::TooLarge);
        assert!(err.problem.contains("longer than wide"), "{err}");
        // A small header passes the checks and fails later, for want of pixel data.
        let err = decode_image_bytes(&png_header(4, 4), origin).unwrap_err();
        assert_eq!(err.kind, DataErrorKind::Corrupt);
        assert!(err.problem.contains("not a readable image"), "{err}");
    }
}
