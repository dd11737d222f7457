//! The fuzz targets: one function per path by which bytes from outside reach the library
//! (weights files, pickles, spec strings and files, data set files, images, the server's
//! requests) and one that builds the engine from an arbitrary small checkpoint. Each must
//! return, whatever its input: an `Err` is a pass, a panic, a hang or an allocation above the
//! fuzzer's limit is a finding.
//!
//! `cargo +nightly fuzz run NAME` drives them under libFuzzer (fuzz/fuzz_targets/, the
//! `libfuzzer` feature); `cargo test -p repvgg-fuzz` replays every seed and every kept finding
//! on stable (tests/replay.rs).

use std::io::Write;
use std::path::Path;

use repvgg_arch::{ArchSpec, Form};
use repvgg_checkpoint::{Checkpoint, ImageNetPreset};

/// A target: its name, its function, and the folders its seeds come from (relative to the
/// repository root, besides its own `fuzz/corpus/NAME`, where findings are kept).
pub type Target = (&'static str, fn(&[u8]), &'static [&'static str]);

pub const TARGETS: &[Target] = &[
    (
        "checkpoint_bytes",
        checkpoint_bytes,
        &[
            "fixtures/tiny",
            "fixtures/pth",
            "fixtures/qa_tiny",
            "fixtures/tiny_se",
        ],
    ),
    ("pickle", pickle, &[]),
    ("spec_string", spec_string, &[]),
    (
        "spec_json",
        spec_json,
        &["fixtures/tiny", "fixtures/tiny_g2", "fixtures/tiny_se"],
    ),
    ("idx_reader", idx_reader, &["fixtures/fashion-mnist-subset"]),
    ("cifar_reader", cifar_reader, &[]),
    ("image_preprocess", image_preprocess, &["fixtures/photos"]),
    ("engine_small", engine_small, &[]),
    ("v2_infer_request", v2_infer_request, &["fixtures/serve"]),
    ("image_folder", image_folder, &[]),
];

/// A weights file's bytes: safetensors or `.pth` (zip or legacy), then naming, form and
/// architecture detection, metadata, INT8 models.
pub fn checkpoint_bytes(data: &[u8]) {
    let _ = Checkpoint::from_bytes(Path::new("fuzz-input"), data, None);
}

/// The pickle interpreter alone.
pub fn pickle(data: &[u8]) {
    let _ = repvgg_checkpoint::pickle::read_pickle(data);
}

/// What every command does with a spec it accepted.
fn use_spec(spec: &ArchSpec) {
    let _ = spec.name;
    let _ = spec.params(Form::Train);
    let _ = spec.params(Form::Deploy);
    let _ = spec.macs(Form::Train, 224, 224);
    let _ = spec.output_size(224, 224);
    let _ = spec.memory_estimate(8, 224, 224);
}

/// `--arch` strings: variant names and custom specs.
pub fn spec_string(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(spec) = ArchSpec::parse(text)
    {
        use_spec(&spec);
    }
}

/// `.json` spec files.
pub fn spec_json(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(spec) = ArchSpec::from_json(text)
    {
        use_spec(&spec);
    }
}

fn temp_file(data: &[u8], name: &str) -> Option<(tempfile::TempDir, std::path::PathBuf)> {
    let dir = tempfile::tempdir().ok()?;
    let path = dir.path().join(name);
    std::fs::File::create(&path).ok()?.write_all(data).ok()?;
    Some((dir, path))
}

/// IDX files, gzipped or not (MNIST and Fashion-MNIST's format).
pub fn idx_reader(data: &[u8]) {
    if let Some((_dir, path)) = temp_file(data, "images-idx3-ubyte") {
        let _ = repvgg_data::read_idx(&path);
    }
}

/// CIFAR-10 and CIFAR-100 binary batches.
pub fn cifar_reader(data: &[u8]) {
    if let Some((_dir, path)) = temp_file(data, "data_batch_1.bin") {
        let _ = repvgg_data::load_cifar(std::slice::from_ref(&path), repvgg_data::Cifar::Ten);
        let _ = repvgg_data::load_cifar(&[path], repvgg_data::Cifar::Hundred);
    }
}

/// Image decoding and every preset's evaluation pipeline.
pub fn image_preprocess(data: &[u8]) {
    use rand::SeedableRng;
    let Ok(image) = repvgg_data::decode_image_bytes(data, std::path::Path::new("fuzz input"))
    else {
        return;
    };
    for preset in [ImageNetPreset::Official, ImageNetPreset::Timm] {
        let mut p = preset.preprocessing();
        p.size = [32, 32];
        let pipeline = repvgg_data::Pipeline::for_model(&p);
        let _ = pipeline.apply(&image, &mut rand::rngs::StdRng::seed_from_u64(0));
        p.grey = true;
        p.resize = repvgg_checkpoint::metadata::Resize::Stretch;
        let pipeline = repvgg_data::Pipeline::for_model(&p);
        let _ = pipeline.apply(&image, &mut rand::rngs::StdRng::seed_from_u64(0));
    }
}

/// The engine built from an arbitrary small checkpoint (the bytes choose the architecture,
/// the weights and the input) and run once, in float and, for specs it takes, in INT8.
pub fn engine_small(data: &[u8]) {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0) as usize;
    let spec_text = format!(
        "depths={},{},{},{};widths={},{},{},{};stem={};classes={}{}{}",
        1 + byte(0) % 2,
        1 + byte(1) % 2,
        1 + byte(2) % 2,
        1 + byte(3) % 2,
        1 + byte(4) % 16,
        1 + byte(5) % 16,
        1 + byte(6) % 16,
        1 + byte(7) % 16,
        1 + byte(8) % 16,
        byte(9) % 12,
        if byte(10) % 4 == 0 { ";se" } else { "" },
        match byte(11) % 4 {
            0 => ";groups=2:2",
            1 => ";qa",
            _ => "",
        },
    );
    let Ok(spec) = ArchSpec::parse(&spec_text) else {
        return;
    };
    let mut tensors = repvgg_checkpoint::random::training_weights(&spec, byte(12) as u64);
    // The rest of the bytes overwrite weights: any value, NaN and infinity included.
    let mut values = data.get(16..).unwrap_or(&[]).chunks_exact(4);
    'fill: for (_, tensor) in tensors.iter_mut() {
        for v in tensor.data.iter_mut() {
            match values.next() {
                Some(b) => *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                None => break 'fill,
            }
        }
    }
    let Ok(ckpt) = Checkpoint::from_state_dict(spec, Form::Train, tensors) else {
        return;
    };
    let (h, w) = (1 + byte(13) % 40, 1 + byte(14) % 40);
    let n = 1 + byte(15) % 3;
    let input: Vec<f32> = (0..n * 3 * h * w)
        .map(|i| ((i * 31 % 17) as f32 - 8.0) / 4.0)
        .collect();
    if let Ok(engine) = repvgg_engine::Engine::from_checkpoint(&ckpt, 1e-5) {
        let mut ws = repvgg_engine::Workspace::default();
        let _ = engine.forward(&input, n, h, w, &mut ws);
    }
}

/// The server's V2 infer request parsing, JSON and binary.
pub fn v2_infer_request(data: &[u8]) {
    use repvgg_serve::protocol::{InputContract, parse_infer};
    let contract = InputContract {
        channels: 3,
        size: None,
        max_side: 64,
        max_batch: 8,
    };
    let _ = parse_infer(data, None, &contract);
    // The first two bytes as a binary header length.
    if data.len() >= 2 {
        let header = u16::from_le_bytes([data[0], data[1]]) as usize;
        let _ = parse_infer(&data[2..], Some(header), &contract);
        let fixed = InputContract {
            size: Some([4, 4]),
            ..contract
        };
        let _ = parse_infer(&data[2..], Some(header), &fixed);
    }
}

/// The data-set folder walk (`open_dir`: ImageFolder trees, IDX and CIFAR folders) over a tree
/// the bytes describe: each entry is a kind byte (a folder to enter, a folder to leave, or a
/// file, whose contents follow as a length byte and bytes) and a name.
pub fn image_folder(data: &[u8]) {
    let Ok(root) = tempfile::tempdir() else {
        return;
    };
    let mut dir = root.path().to_path_buf();
    let mut bytes = data.iter().copied();
    let mut entries = 0;
    while let Some(kind) = bytes.next() {
        entries += 1;
        if entries > 64 {
            break;
        }
        let name: String = bytes
            .by_ref()
            .take(1 + (kind as usize >> 4) % 8)
            .map(|b| ['a', 'b', '0', '.', '_', 'x', 'g', 'p'][b as usize % 8])
            .collect();
        let name = match kind % 4 {
            0 | 1 => name,
            2 => format!("{name}.png"),
            _ => format!("{name}.jpg"),
        };
        if name.starts_with('.') {
            continue;
        }
        match kind % 4 {
            0 => {
                dir = dir.join(&name);
                if std::fs::create_dir_all(&dir).is_err() {
                    return;
                }
            }
            1 => {
                if dir != root.path() {
                    dir.pop();
                }
            }
            _ => {
                let len = bytes.next().unwrap_or(0) as usize;
                let contents: Vec<u8> = bytes.by_ref().take(len).collect();
                let _ = std::fs::write(dir.join(&name), contents);
            }
        }
    }
    if let Ok(splits) = repvgg_data::open_dir(root.path(), 0.2) {
        let _ = splits;
    }
}
