//! Loaders on real data: the committed Fashion-MNIST subset (`reference/make_fashion_subset.py`).

use std::io::Write;
use std::path::{Path, PathBuf};

use repvgg_data::{Cifar, Split, load_cifar, load_idx_dir, read_idx};

fn subset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/fashion-mnist-subset")
}

#[test]
fn fashion_mnist_subset_loads_in_both_splits() {
    let train = load_idx_dir(&subset(), Split::Train).unwrap();
    let test = load_idx_dir(&subset(), Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (2000, 500));
    assert_eq!(
        (train.channels, train.height, train.width, train.classes),
        (1, 28, 28, 10)
    );
    // Every class is present in the first 2,000 images, roughly balanced.
    let mut counts = [0usize; 10];
    train.labels.iter().for_each(|&l| counts[l as usize] += 1);
    assert!(
        counts.iter().all(|&c| (150..=250).contains(&c)),
        "{counts:?}"
    );
    // Real photos of clothes on black: dark borders, bright middles, the full byte range used.
    let first = train.pixels(0);
    assert_eq!(first[0], 0);
    assert_eq!(*train.images.iter().max().unwrap(), 255);
    let mean = train.images.iter().map(|&p| p as f64).sum::<f64>() / train.images.len() as f64;
    assert!((60.0..85.0).contains(&mean), "mean pixel {mean}");
}

#[test]
fn plain_and_gzipped_idx_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        let gz = std::fs::read(subset().join(format!("{name}.gz"))).unwrap();
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut plain)
            .unwrap();
        std::fs::write(dir.path().join(name), plain).unwrap();
    }
    let plain = load_idx_dir(dir.path(), Split::Test).unwrap();
    assert_eq!(plain, load_idx_dir(&subset(), Split::Test).unwrap());
}

#[test]
fn broken_idx_files_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let gz = std::fs::read(subset().join("t10k-images-idx3-ubyte.gz")).unwrap();
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut plain)
        .unwrap();
    let cut = dir.path().join("cut-images-idx3-ubyte");
    std::fs::write(&cut, &plain[..plain.len() - 100]).unwrap();
    let err = read_idx(&cut).unwrap_err().to_string();
    assert!(
        err.contains("cut-images-idx3-ubyte") && err.contains("truncated"),
        "{err}"
    );

    let bad_gz = dir.path().join("bad.gz");
    std::fs::write(&bad_gz, &gz[..gz.len() / 2]).unwrap();
    let err = read_idx(&bad_gz).unwrap_err().to_string();
    assert!(err.contains("bad.gz") && err.contains("gzip"), "{err}");

    let err = load_idx_dir(dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("missing"),
        "{err}"
    );

    // Labels and images that disagree in count.
    std::fs::copy(
        subset().join("t10k-images-idx3-ubyte.gz"),
        dir.path().join("t10k-images-idx3-ubyte.gz"),
    )
    .unwrap();
    std::fs::copy(
        subset().join("train-labels-idx1-ubyte.gz"),
        dir.path().join("t10k-labels-idx1-ubyte.gz"),
    )
    .unwrap();
    let err = load_idx_dir(dir.path(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("t10k-labels-idx1-ubyte.gz") && err.contains("500 images"),
        "{err}"
    );
}

/// IDX files describe themselves: one that declares images of zero rows (and so holds no
/// pixels) is refused at load, not divided by later in a resize.
#[test]
fn idx_images_without_pixels_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let idx = |dims: &[u32], body: &[u8]| {
        let mut bytes = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            bytes.extend_from_slice(&d.to_be_bytes());
        }
        bytes.extend_from_slice(body);
        bytes
    };
    std::fs::write(
        dir.path().join("t10k-images-idx3-ubyte"),
        idx(&[3, 0, 28], &[]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("t10k-labels-idx1-ubyte"),
        idx(&[3], &[0, 1, 2]),
    )
    .unwrap();
    let err = load_idx_dir(dir.path(), Split::Test).unwrap_err();
    assert_eq!(err.kind, repvgg_data::DataErrorKind::Corrupt);
    assert!(
        err.to_string().contains("t10k-images-idx3-ubyte") && err.problem.contains("0x28"),
        "{err}"
    );
}

/// A CIFAR-10 batch made here from real Fashion-MNIST pixels (grey, padded to 32x32, three
/// equal channels), and a CIFAR-100 one with coarse + fine labels.
#[test]
fn cifar_batches_round_trip_real_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let source = load_idx_dir(&subset(), Split::Test).unwrap();
    let mut expected = Vec::new();
    let mut ten = Vec::new();
    let mut hundred = Vec::new();
    for i in 0..20 {
        let mut image = vec![0u8; 3 * 32 * 32];
        for c in 0..3 {
            for y in 0..28 {
                let row = &source.pixels(i)[y * 28..(y + 1) * 28];
                image[c * 1024 + (y + 2) * 32 + 2..c * 1024 + (y + 2) * 32 + 30]
                    .copy_from_slice(row);
            }
        }
        let label = source.labels[i] as u8;
        ten.push(label);
        ten.extend_from_slice(&image);
        hundred.extend_from_slice(&[label / 2, label * 9]);
        hundred.extend_from_slice(&image);
        expected.push((label, image));
    }
    let (a, b) = (
        dir.path().join("data_batch_1.bin"),
        dir.path().join("data_batch_2.bin"),
    );
    std::fs::write(&a, &ten[..10 * 3073]).unwrap();
    std::fs::write(&b, &ten[10 * 3073..]).unwrap();
    let set = load_cifar(&[a, b], Cifar::Ten).unwrap();
    assert_eq!(
        (set.len(), set.channels, set.height, set.classes),
        (20, 3, 32, 10)
    );
    for (i, (label, image)) in expected.iter().enumerate() {
        assert_eq!(set.labels[i], *label as u16);
        assert_eq!(set.pixels(i), image.as_slice());
    }
    let c100 = dir.path().join("train.bin");
    std::fs::write(&c100, &hundred).unwrap();
    let set = load_cifar(std::slice::from_ref(&c100), Cifar::Hundred).unwrap();
    assert_eq!(set.labels[3], expected[3].0 as u16 * 9);

    // A truncated batch is refused by name.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&c100)
        .unwrap();
    f.write_all(&[1, 2, 3]).unwrap();
    let err = load_cifar(&[c100], Cifar::Hundred).unwrap_err().to_string();
    assert!(
        err.contains("train.bin") && err.contains("truncated"),
        "{err}"
    );
}
