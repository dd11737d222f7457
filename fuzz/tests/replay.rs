//! Every fuzz target over its seeds (the fixture folders listed in `TARGETS`, and
//! `fuzz/corpus/NAME/`, where each finding is kept once fixed): on stable, in CI, each input
//! must return without a panic. Inputs are checked one by one so that a failure names its file.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_target_survives_its_corpus() {
    let mut failures = Vec::new();
    let mut counts = Vec::new();
    for (name, target, seed_dirs) in repvgg_fuzz::TARGETS {
        let mut inputs = files(&root().join("fuzz/corpus").join(name));
        for dir in *seed_dirs {
            inputs.extend(files(&root().join(dir)));
        }
        for input in &inputs {
            let data = std::fs::read(input).unwrap();
            let started = std::time::Instant::now();
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                failures.push(format!("{name}: {} panicked", input.display()));
            }
            // A hang detector, not a speed test: libFuzzer's limit is 1 s per input in an
            // optimised build; ten times that allows for this build and a loaded machine.
            let seconds = started.elapsed().as_secs_f64();
            if seconds > 10.0 {
                failures.push(format!("{name}: {} took {seconds:.1} s", input.display()));
            }
        }
        counts.push(format!("{name} {}", inputs.len()));
    }
    eprintln!("replayed: {}", counts.join(", "));
    assert!(failures.is_empty(), "panicked on:\n{}", failures.join("\n"));
}

/// Each target has something to replay: its own corpus or seed folders.
#[test]
fn every_target_has_seeds() {
    for (name, _, seed_dirs) in repvgg_fuzz::TARGETS {
        let own = files(&root().join("fuzz/corpus").join(name)).len();
        let seeds: usize = seed_dirs.iter().map(|d| files(&root().join(d)).len()).sum();
        assert!(own + seeds > 0, "{name} has no inputs to replay");
    }
}
