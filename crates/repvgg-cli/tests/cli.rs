//! The `repvgg` binary end to end, on fixtures made by the official code and timm.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use repvgg_testing::relative_error;

fn fixture(rel: &str) -> PathBuf {
    repvgg_testing::fixtures().join(rel)
}

fn repvgg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_repvgg"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = repvgg(args);
    assert!(
        out.status.success(),
        "repvgg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its one-line error.
fn fails(args: &[&str]) -> String {
    let out = repvgg(args);
    assert!(!out.status.success(), "repvgg {args:?} should have failed");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "error should be one line: {err}"
    );
    assert!(err.starts_with("error: "), "{err}");
    err
}

/// Runs a command that must fail; returns its error, which may run over several lines (a
/// summary line, then details).
fn error_text(args: &[&str]) -> String {
    let out = repvgg(args);
    assert!(!out.status.success(), "repvgg {args:?} should have failed");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: "), "{err}");
    err
}

/// Runs a command clap refuses; returns clap's message (several lines: the problem, the
/// subcommand's usage, a pointer to --help).
fn usage_error(args: &[&str]) -> String {
    let out = repvgg(args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "repvgg {args:?} should be refused"
    );
    String::from_utf8(out.stderr).unwrap()
}

/// Values only, by key.
fn read_f64(path: &Path) -> std::collections::HashMap<String, Vec<f64>> {
    repvgg_testing::read_f64(path)
        .into_iter()
        .map(|(k, (_, v))| (k, v))
        .collect()
}

#[test]
fn info_prints_the_variant_table() {
    let table = ok(&["info"]);
    let a0 = table.lines().find(|l| l.starts_with("RepVGG-A0 ")).unwrap();
    for figure in ["9.109M", "8.309M", "1.513G", "1.361G"] {
        assert!(a0.contains(figure), "{a0}");
    }
    assert_eq!(table.lines().count(), 15, "header + 14 variants");
    let d2se = table
        .lines()
        .find(|l| l.starts_with("RepVGG-D2se"))
        .unwrap();
    assert!(
        d2se.contains("133.335M") && d2se.contains("32.830G"),
        "{d2se}"
    );

    let one = ok(&["info", "repvgg_b1g4", "--size", "320"]);
    assert!(
        one.contains("RepVGG-B1g4") && one.contains("MACs at 320x320"),
        "{one}"
    );
    let json: serde_json::Value =
        serde_json::from_str(ok(&["info", "B1g4", "--json"]).trim()).unwrap();
    let deploy_millions = json["params_deploy"].as_f64().unwrap() / 1e6;
    assert_eq!((deploy_millions * 1000.0).round() / 1000.0, 36.125);
}

#[test]
fn info_describes_checkpoints() {
    let text = ok(&["info", fixture("tiny_g2/train_timm.pth").to_str().unwrap()]);
    assert!(
        text.contains("form: train") && text.contains("naming: timm"),
        "{text}"
    );
    assert!(
        text.contains("depths [2, 2, 4, 1]") && text.contains("groups 2:2,4:2,6:2,8:2"),
        "{text}"
    );
    let text = ok(&[
        "info",
        fixture("tiny_se/deploy_official.safetensors")
            .to_str()
            .unwrap(),
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(json["form"], "deploy");
    assert_eq!(json["arch"]["se"], true);
    assert_eq!(json["tensors"], 44);
}

#[test]
fn convert_matches_the_references_deploy_weights_in_every_naming() {
    let dir = tempfile::tempdir().unwrap();
    for config in ["tiny_g4", "tiny_se"] {
        let reference = read_f64(&fixture(&format!("{config}/deploy_official.safetensors")));
        for (naming, source) in [
            ("official", "train_timm.pth"),
            ("timm", "train_official.safetensors"),
            ("mmpretrain", "train_official.pth"),
        ] {
            let out = dir.path().join(format!("{config}_{naming}.safetensors"));
            let input = fixture(&format!("{config}/{source}"));
            ok(&[
                "convert",
                input.to_str().unwrap(),
                out.to_str().unwrap(),
                "--naming",
                naming,
            ]);
            // Read back through our loader, which renames to official.
            let info = ok(&["info", out.to_str().unwrap()]);
            assert!(
                info.contains(&format!("naming: {naming}")) && info.contains("form: deploy"),
                "{info}"
            );
            if naming == "official" {
                let ours = read_f64(&out);
                for (key, want) in &reference {
                    let err = relative_error(&ours[key], want);
                    assert!(err < 1e-6, "{config} {key}: {err:e}");
                }
            }
        }
    }
    // Checked against a named architecture: a mismatch lists the keys.
    let err = error_text(&[
        "convert",
        fixture("tiny/train_official.pth").to_str().unwrap(),
        dir.path().join("x.safetensors").to_str().unwrap(),
        "--arch",
        "A0",
    ]);
    assert!(
        err.contains("not the requested RepVGG-A0") && err.contains("train_official.pth"),
        "{err}"
    );
}

#[test]
fn forward_matches_the_fp64_reference_for_every_fixture_and_form() {
    let dir = tempfile::tempdir().unwrap();
    for config in ["tiny", "tiny_g2", "tiny_g4", "tiny_se", "tiny_nonsquare"] {
        let io = fixture(&format!("{config}/io.safetensors"));
        let reference = read_f64(&io);
        for weights in [
            "train_official.pth",
            "train_timm.safetensors",
            "deploy_timm.pth",
            "deploy_official.safetensors",
        ] {
            let out = dir
                .path()
                .join(format!("{config}_{weights}.out.safetensors"));
            let w = fixture(&format!("{config}/{weights}"));
            ok(&[
                "forward",
                "--weights",
                w.to_str().unwrap(),
                "--input",
                io.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--features",
            ]);
            let got = read_f64(&out);
            let key = if weights.starts_with("train") {
                "logits_train_f64"
            } else {
                "logits_deploy_f64"
            };
            let err = relative_error(&got["logits"], &reference[key]);
            println!("{config:15} {weights:28} logits relative error {err:.2e}");
            assert!(err < 1e-5, "{config} {weights}: {err:e}");
            let features: Vec<&String> =
                got.keys().filter(|k| k.starts_with("features.")).collect();
            assert!(!features.is_empty());
            for key in features {
                let err = relative_error(&got[key], &reference[key]);
                assert!(err < 1e-5, "{config} {weights} {key}: {err:e}");
            }
        }
    }
}

#[test]
fn bad_input_gives_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let err = fails(&["info", "B9"]);
    assert!(err.contains("unknown variant 'B9'"), "{err}");
    let err = fails(&["info", "no/such/model.pth"]);
    assert!(err.contains("no/such/model.pth: cannot read"), "{err}");
    let err = usage_error(&["convert", "--naming", "keras", "a.pth", "b.safetensors"]);
    assert!(
        err.contains("keras") && err.contains("official, timm or mmpretrain"),
        "{err}"
    );
    let io = fixture("tiny/io.safetensors");
    let err = fails(&[
        "forward",
        "--weights",
        fixture("tiny/train_official.pth").to_str().unwrap(),
        "--input",
        io.to_str().unwrap(),
        "--output",
        &d("eps.safetensors"),
        "--bn-eps",
        "0",
    ]);
    assert!(err.contains("--bn-eps must be a positive number"), "{err}");

    let cut = d("cut.pth");
    let bytes = std::fs::read(fixture("tiny/train_official.pth")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let err = fails(&["convert", &cut, &d("o.safetensors")]);
    assert!(err.contains("cut.pth"), "{err}");

    let err = fails(&[
        "convert",
        fixture("tiny/train_official.pth").to_str().unwrap(),
        &d("o.pth"),
    ]);
    assert!(err.contains("only .safetensors can be written"), "{err}");

    let weights = fixture("tiny/deploy_official.pth");
    let weights = weights.to_str().unwrap();
    let err = fails(&[
        "forward",
        "--weights",
        weights,
        "--input",
        weights,
        "--output",
        &d("y.safetensors"),
    ]);
    assert!(
        err.contains("deploy_official.pth") && err.contains("not a valid safetensors"),
        "{err}"
    );
    // Wrong input channels: the error names the input file and the expected layout.
    let grey = d("grey.safetensors");
    let pixels = vec![0u8; 4 * 16 * 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 1, 16, 16], &pixels)
            .unwrap();
    std::fs::write(
        &grey,
        safetensors::serialize([("input", view)], None).unwrap(),
    )
    .unwrap();
    let err = fails(&[
        "forward",
        "--weights",
        weights,
        "--input",
        &grey,
        "--output",
        &d("y.safetensors"),
    ]);
    assert!(
        err.contains("grey.safetensors") && err.contains("expects (N, 3, H, W)"),
        "{err}"
    );
    let forbidden = fixture("pth/forbidden_global.pth");
    let io = fixture("tiny/io.safetensors");
    let err = fails(&[
        "forward",
        "--weights",
        forbidden.to_str().unwrap(),
        "--input",
        io.to_str().unwrap(),
        "--output",
        &d("z.safetensors"),
    ]);
    assert!(err.contains("posix.system"), "{err}");
    assert!(
        !dir.path().join("z.safetensors").exists(),
        "no output on failure"
    );
}

/// `demo --data` on the committed subset: trains, converts, verifies and reports in one JSON
/// line; `eval` on the weights it wrote reproduces the accuracy it reported.
#[test]
fn demo_trains_converts_and_eval_agrees() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("demo");
    let stdout = ok(&[
        "demo",
        "--data",
        fixture("fashion-mnist-subset").to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--epochs",
        "2",
        "--quiet",
        "--json",
    ]);
    let line = stdout.lines().last().unwrap();
    let report: serde_json::Value = serde_json::from_str(line).unwrap();
    for key in [
        "test_accuracy",
        "deploy_test_accuracy",
        "predictions_agree",
        "train_seconds",
        "deploy_speedup",
    ] {
        assert!(report.get(key).is_some(), "{key} missing from {line}");
    }
    assert_eq!(report["predictions_agree"], true);
    let accuracy = report["test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.5, "{accuracy}");
    assert_eq!(report["deploy_test_accuracy"].as_f64().unwrap(), accuracy);
    // The INT8 form beside the two float ones (500 test images: 3 points is 15 of them).
    let int8 = report["int8_test_accuracy"].as_f64().unwrap();
    assert!(
        (int8 - accuracy).abs() <= 0.03,
        "int8 {int8} against {accuracy}"
    );
    for file in [
        "metrics.csv",
        "curves.png",
        "checkpoint.safetensors",
        "deploy.safetensors",
        "int8.safetensors",
    ] {
        assert!(out_dir.join(file).is_file(), "{file} not written");
    }
    let eval = ok(&[
        "eval",
        "--weights",
        out_dir.join("deploy.safetensors").to_str().unwrap(),
        "--data",
        fixture("fashion-mnist-subset").to_str().unwrap(),
        "--json",
        "--confusion",
    ]);
    let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    assert_eq!(eval["images"], 500);
    assert!((eval["top1"].as_f64().unwrap() - accuracy).abs() < 1e-12);
    let confusion = eval["confusion"].as_array().unwrap();
    let total: u64 = confusion
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
        .sum();
    assert_eq!(total, 500);
}

#[test]
fn train_stops_and_resumes_from_the_command_line() {
    let out = tempfile::tempdir().unwrap();
    let data = fixture("fashion-mnist-subset");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--arch",
            "depths=1,1,1,1;widths=8,8,16,16;stem=8",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
            "--epochs",
            "1",
            "--batch",
            "100",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        repvgg(&a)
    };
    let first = run(&["--stop-after-steps", "3"]);
    assert!(first.status.success());
    assert!(String::from_utf8_lossy(&first.stderr).contains("--resume"));
    assert!(!out.path().join("deploy.safetensors").exists());
    // Other settings on resume are refused, naming the checkpoint.
    let mut changed = args(&["--resume", "--lr", "0.05"]);
    changed.push("--json".into());
    let changed: Vec<&str> = changed.iter().map(|s| s.as_str()).collect();
    let err = String::from_utf8(repvgg(&changed).stderr).unwrap();
    assert!(
        err.contains("checkpoint.safetensors") && err.contains("different settings"),
        "{err}"
    );
    let done = run(&["--resume", "--json"]);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    // 2,000 images at batch 100: 20 steps an epoch; stopped after 3.
    assert!(
        stderr.contains(
            "after 3 steps (0 of 1 epochs done): continuing epoch 1 of 1 at step 4 of 20"
        ),
        "{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8(done.stdout).unwrap().trim()).unwrap();
    assert_eq!(report["predictions_agree"], true);
    assert!(out.path().join("deploy.safetensors").is_file());
}

#[test]
fn training_bad_data_gives_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails(&[
        "train",
        "--arch",
        "A0",
        "--data",
        dir.path().join("missing").to_str().unwrap(),
    ]);
    assert!(
        err.contains("missing") && err.contains("not a directory"),
        "{err}"
    );
    // A truncated IDX file.
    let gz = std::fs::read(fixture("fashion-mnist-subset/t10k-labels-idx1-ubyte.gz")).unwrap();
    for name in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
    ] {
        std::fs::copy(
            fixture("fashion-mnist-subset").join(name),
            dir.path().join(name),
        )
        .unwrap();
    }
    std::fs::write(
        dir.path().join("t10k-labels-idx1-ubyte.gz"),
        &gz[..gz.len() / 2],
    )
    .unwrap();
    let err = fails(&["demo", "--data", dir.path().to_str().unwrap(), "--quiet"]);
    assert!(err.contains("t10k-labels-idx1-ubyte.gz"), "{err}");
    let err = fails(&[
        "train",
        "--arch",
        "Z9",
        "--data",
        dir.path().to_str().unwrap(),
    ]);
    assert!(err.contains("Z9"), "{err}");
}

/// Without VNNI (here: capped at AVX2), 8-bit weights run on AVX2's 16-bit-operand set and
/// 7-bit ones on its faster set; the table's first line names the set that ran.
#[cfg(target_arch = "x86_64")]
#[test]
fn bench_names_the_int8_kernels_it_ran() {
    if !std::arch::is_x86_feature_detected!("avx2") || !std::arch::is_x86_feature_detected!("fma") {
        eprintln!("SKIPPED: no AVX2 here");
        return;
    }
    // AVX-VNNI (256-bit) is within the AVX2 cap and takes any weights.
    let expected = if std::arch::is_x86_feature_detected!("avxvnni") {
        [("8", "avx-vnni"), ("7", "avx-vnni")]
    } else {
        [("8", "avx2-i16"), ("7", "avx2")]
    };
    for (bits, kernels) in expected {
        let out = ok(&[
            "bench",
            "--arch",
            "depths=1,1,1,1;widths=8,8,16,16;stem=8;classes=10",
            "--size",
            "32",
            "--batch",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--precision",
            "int8",
            "--isa",
            "avx2",
            "--weight-bits",
            bits,
        ]);
        assert!(
            out.lines().next() == Some(&format!("engine kernels: {kernels}")),
            "{bits}-bit weights: {out}"
        );
    } // Weight bits mean nothing to a float timing: said, not silently dropped.
    let (_, err) = ok_with_stderr(&[
        "bench",
        "--arch",
        "depths=1,1,1,1;widths=8,8,16,16;stem=8;classes=10",
        "--size",
        "32",
        "--batch",
        "1",
        "--iters",
        "1",
        "--weight-bits",
        "7",
    ]);
    assert!(
        err.contains("--weight-bits applies with --precision int8"),
        "{err}"
    );
}

/// `bench --layers` says how each block ran, since both engines choose per layer: the INT8
/// engine leaves reductions too short for AMX's tiles (the stem's 27, 8 channels' 72) to
/// AVX-512 VNNI.
#[test]
fn bench_layers_name_how_each_block_ran() {
    use repvgg_kernels::int8::Int8Kernels;
    let arch = "depths=1,1,1,1;widths=8,8,16,16;stem=8;classes=10";
    let rows = |precision: &str| -> Vec<(String, String)> {
        let out = ok(&[
            "bench",
            "--arch",
            arch,
            "--size",
            "32",
            "--batch",
            "1",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--layers",
            "--precision",
            precision,
        ]);
        let rows: Vec<(String, String)> = out
            .lines()
            .filter(|l| l.starts_with("stage"))
            .map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                (fields[0].to_string(), fields[7..].join(" "))
            })
            .collect();
        assert_eq!(rows.len(), 5, "{out}");
        rows
    };
    let schemes = [
        "winograd F(2x2)",
        "winograd F(4x4)",
        "winograd F(2x2) s2",
        "im2col",
        "implicit",
    ];
    for (block, method) in rows("fp32") {
        assert!(schemes.contains(&method.as_str()), "{block}: {method}");
    }
    let int8 = rows("int8");
    for (block, method) in &int8 {
        assert!(
            Int8Kernels::ALL.iter().any(|k| k.name() == method),
            "{block}: {method}"
        );
    }
    let method = |block: &str| &int8.iter().find(|(b, _)| b == block).unwrap().1;
    if Int8Kernels::Amx.is_available() {
        assert_eq!(method("stage0"), "avx512-vnni");
        assert_eq!(method("stage1.0"), "avx512-vnni");
        assert_eq!(method("stage4.0"), "amx");
    } else {
        assert_ne!(method("stage0"), "amx");
    }
}

#[test]
fn bench_times_a_training_step() {
    let out = ok(&[
        "bench",
        "--train",
        "--arch",
        "depths=1,1,1,1;widths=8,8,16,16;stem=8;classes=10",
        "--size",
        "32",
        "--batch",
        "4",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--json",
    ]);
    let row: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(row["form"], "train-step");
    assert!(row["images_per_s"].as_f64().unwrap() > 0.0);
}

/// `predict` with a 1000-class model made by the official code gives the reference top-5 (the
/// reference pipeline's preprocessing, the same weights, PyTorch in float64).
#[test]
fn predict_gives_the_reference_top5_on_real_photos() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("photos/expected.json")).unwrap())
            .unwrap();
    let weights = fixture("photos/tiny1000_train_official.safetensors");
    for preset in ["official", "timm", "d2se"] {
        let photos = [fixture("photos/chelsea.png"), fixture("photos/rocket.jpg")];
        let mut args = vec![
            "predict",
            "--weights",
            weights.to_str().unwrap(),
            "--preset",
            preset,
            "--json",
        ];
        args.extend(photos.iter().map(|p| p.to_str().unwrap()));
        let out = ok(&args);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        for (line, photo) in lines.iter().zip(["chelsea.png", "rocket.jpg"]) {
            let reference = &expected["photos"][photo]["presets"][preset]["top5"];
            let ours: Vec<u64> = line["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["index"].as_u64().unwrap())
                .collect();
            let theirs: Vec<u64> = reference
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["index"].as_u64().unwrap())
                .collect();
            assert_eq!(ours, theirs, "{photo} {preset}");
            for (o, t) in line["top"]
                .as_array()
                .unwrap()
                .iter()
                .zip(reference.as_array().unwrap())
            {
                assert_eq!(o["label"], t["label"]);
                let (p, q) = (o["prob"].as_f64().unwrap(), t["prob"].as_f64().unwrap());
                assert!((p - q).abs() / q < 1e-3, "{photo} {preset}: {p} vs {q}");
            }
        }
    }
    // A broken image is reported in its own line and does not stop the others; the run then
    // fails, counting it.
    let out = repvgg(&[
        "predict",
        "--weights",
        weights.to_str().unwrap(),
        "--json",
        fixture("photos/broken.jpg").to_str().unwrap(),
        fixture("photos/rocket.jpg").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines[0]["file"].as_str().unwrap().ends_with("broken.jpg"));
    assert!(
        lines[0]["error"]
            .as_str()
            .unwrap()
            .contains("truncated JPEG")
    );
    assert_eq!(lines[1]["top"].as_array().unwrap().len(), 5);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim(),
        "error: 1 of 2 images could not be read (each is named in its line)"
    );
}

/// Exported graphs pass `onnx.checker` and agree with `repvgg forward` in ONNX Runtime within
/// 1e-5 relative (f32 throughout; the two runtimes sum in different orders), at the exported
/// batch size and, with --dynamic-batch, at another one.
#[test]
fn export_agrees_with_forward_in_onnxruntime() {
    let Some(python) = repvgg_testing::python_with(&["onnx", "onnxruntime", "safetensors"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for config in ["tiny", "tiny_g2", "tiny_g4", "tiny_se", "tiny_nonsquare"] {
        for form in ["train_timm.pth", "deploy_official.safetensors"] {
            let weights = fixture(&format!("{config}/{form}"));
            let input = fixture(&format!("{config}/io.safetensors"));
            let logits = dir
                .path()
                .join(format!("{config}_{form}_logits.safetensors"));
            ok(&[
                "forward",
                "--weights",
                weights.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--output",
                logits.to_str().unwrap(),
            ]);
            let (shape, _) = &repvgg_testing::read_f64(&input)["input"];
            let (n, h, w) = (shape[0], shape[2], shape[3]);
            let size = format!("{h}x{w}");
            for dynamic in [false, true] {
                let model = dir.path().join(format!("{config}_{form}_{dynamic}.onnx"));
                // The dynamic graph has a symbolic batch; both run at the fixture's batch.
                let batch = n.to_string();
                let mut args = vec![
                    "export",
                    weights.to_str().unwrap(),
                    model.to_str().unwrap(),
                    "--size",
                    &size,
                ];
                if dynamic {
                    args.push("--dynamic-batch");
                } else {
                    args.extend(["--batch", &batch]);
                }
                ok(&args);
                let result = repvgg_testing::check_onnx(&python, &model, &input, &logits);
                eprintln!("{config} {form} dynamic={dynamic}: {result}");
            }
        }
    }
}

/// `--out-indices` writes stage outputs: the last block of each stage, as `--features` shows.
#[test]
fn forward_writes_the_stage_outputs_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    ok(&[
        "forward",
        "--weights",
        fixture("tiny/train_timm.pth").to_str().unwrap(),
        "--input",
        fixture("tiny/io.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--features",
        "--out-indices",
        "1,4",
    ]);
    let t = read_f64(&out);
    // tiny has two blocks in stage 1 and one in stage 4.
    assert_eq!(t["stages.1"], t["features.stage1.1"]);
    assert_eq!(t["stages.4"], t["features.stage4.0"]);
    assert!(!t.contains_key("stages.2"));
    let err = fails(&[
        "forward",
        "--weights",
        fixture("tiny/train_timm.pth").to_str().unwrap(),
        "--input",
        fixture("tiny/io.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--out-indices",
        "5",
    ]);
    assert!(err.contains("stage 5"), "{err}");
}

/// `--isa` runs the engine on the kernels asked for: each set this machine has gives the
/// reference logits (to 1e-5, as the other forward tests), one it lacks is a one-line error.
#[test]
fn forward_runs_every_instruction_set_the_machine_has() {
    use repvgg_engine::Isa;
    let dir = tempfile::tempdir().unwrap();
    let io = fixture("tiny_se/io.safetensors");
    let reference = read_f64(&io);
    let weights = fixture("tiny_se/train_official.pth");
    for isa in Isa::ALL {
        let out = dir.path().join(format!("{isa}.safetensors"));
        let args = [
            "forward",
            "--weights",
            weights.to_str().unwrap(),
            "--input",
            io.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--isa",
            isa.name(),
        ];
        if !isa.is_available() {
            let err = fails(&args);
            assert!(err.contains("not available on this machine"), "{err}");
            continue;
        }
        let run = repvgg(&args);
        assert!(run.status.success(), "{isa}: {run:?}");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(stderr.contains(&format!("{isa} kernels")), "{stderr}");
        let err = relative_error(&read_f64(&out)["logits"], &reference["logits_train_f64"]);
        println!("--isa {isa}: logits relative error {err:.2e}");
        assert!(err < 1e-5, "{isa}: {err:e}");
    }
    let err = usage_error(&["bench", "--isa", "sse9"]);
    assert!(
        err.contains("--isa") && err.contains("possible values: portable, avx2, avx512"),
        "{err}"
    );
}

/// Runs a command that must succeed; returns (stdout, stderr).
fn ok_with_stderr(args: &[&str]) -> (String, String) {
    let out = repvgg(args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "repvgg {args:?} failed: {stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

const TINY: &str = "depths=1,1,1,1;widths=8,8,16,16;stem=8";

/// Writes Fashion-MNIST subset images of trousers (class 1) and bags (class 8) as PNG class
/// folders `trouser/` and `bag/` under `root`: `per_class` of each, from the training or the
/// test split.
fn write_named_folder(root: &Path, per_class: usize, test_split: bool) {
    let data = repvgg_data::open_dir(&fixture("fashion-mnist-subset"), 0.1).unwrap();
    let samples = if test_split { &data.test } else { &data.train };
    for (label, name) in [(1, "trouser"), (8, "bag")] {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let picked = (0..samples.len()).filter(|&i| samples.label(i) == label);
        for (k, i) in picked.take(per_class).enumerate() {
            let img = samples.image(i).unwrap();
            img.save(dir.join(format!("{k:03}.png"))).unwrap();
        }
    }
}

fn png_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// `train` says first what it trains on and at which size, and an image folder of small images
/// (Fashion-MNIST's 28x28) under the default ImageNet preset is told that its images are
/// upscaled to 224 crops and which `--size` would train near theirs; at that size, no note.
#[test]
fn train_says_its_input_size_and_notes_upscaled_small_images() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("folders");
    write_named_folder(&data.join("train"), 4, false);
    write_named_folder(&data.join("val"), 2, true);
    let out = dir.path().join("run");
    let (data, out) = (data.to_str().unwrap(), out.to_str().unwrap());
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--arch",
            TINY,
            "--data",
            data,
            "--out",
            out,
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--stop-after-steps",
            "1",
            "--overwrite",
        ];
        args.extend(extra);
        ok_with_stderr(&args).1
    };
    let err = run(&[]);
    assert!(
        err.contains("train: training") && err.contains("(8 training, 4 evaluation images)"),
        "{err}"
    );
    assert!(err.contains("at 224x224"), "{err}");
    assert!(
        err.contains("are upscaled to 224x224 crops; --size 28 trains near their own size"),
        "{err}"
    );
    let err = run(&["--size", "28"]);
    assert!(err.contains("at 28x28"), "{err}");
    assert!(!err.contains("upscaled"), "{err}");
}

/// Issue 19's newcomer path: a model trained on named class folders records its
/// preprocessing and class names, so that `predict` with no flags answers in folder names and
/// agrees with `eval`; every command takes the training checkpoint as a weights file.
#[test]
fn a_model_trained_on_named_folders_carries_its_preprocessing_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("folders");
    write_named_folder(&data.join("train"), 16, false);
    write_named_folder(&data.join("val"), 8, true);
    let out = dir.path().join("run");
    let (s, o) = (|p: &Path| p.to_str().unwrap().to_string(), out.clone());
    let train_args = [
        "train",
        "--arch",
        TINY,
        "--data",
        &s(&data),
        "--out",
        &s(&o),
        "--epochs",
        "4",
        "--warmup-epochs",
        "0",
        "--batch",
        "8",
        "--size",
        "32",
        "--quiet",
    ];
    ok(&train_args);
    let deploy = s(&out.join("deploy.safetensors"));
    let checkpoint = s(&out.join("checkpoint.safetensors"));

    // info shows what travels with the weights.
    let text = ok(&["info", &deploy]);
    assert!(text.contains("class names: bag, trouser"), "{text}");
    assert!(
        text.contains("preprocessing: 32x32 RGB, short side to 36 then centre crop"),
        "{text}"
    );
    let text = ok(&["info", "--weights", &checkpoint]);
    assert!(
        text.contains("training checkpoint: 4 of 4 epochs done") && text.contains("optimizer"),
        "{text}"
    );

    // predict with no preprocessing flags: folder names, and eval's accuracy on the same images.
    let images: Vec<PathBuf> = ["bag", "trouser"]
        .iter()
        .flat_map(|c| png_files(&data.join("val").join(c)))
        .collect();
    let image_args: Vec<String> = images.iter().map(|p| s(p)).collect();
    let predict = |weights: &str| -> Vec<(String, usize)> {
        let mut args = vec!["predict", "--weights", weights, "--top", "1", "--json"];
        args.extend(image_args.iter().map(|a| a.as_str()));
        ok(&args)
            .lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let top = &v["top"][0];
                (
                    top["label"].as_str().unwrap().to_string(),
                    top["index"].as_u64().unwrap() as usize,
                )
            })
            .collect()
    };
    let from_deploy = predict(&deploy);
    assert_eq!(from_deploy.len(), 16);
    let truth: Vec<&str> = images
        .iter()
        .map(|p| p.parent().unwrap().file_name().unwrap().to_str().unwrap())
        .collect();
    assert!(
        from_deploy
            .iter()
            .all(|(l, _)| l == "bag" || l == "trouser")
    );
    let correct = from_deploy
        .iter()
        .zip(&truth)
        .filter(|((label, _), t)| label == *t)
        .count();
    let eval: serde_json::Value = serde_json::from_str(
        ok(&["eval", "--weights", &deploy, "--data", &s(&data), "--json"]).trim(),
    )
    .unwrap();
    assert_eq!(eval["images"], 16);
    assert!(
        (eval["top1"].as_f64().unwrap() - correct as f64 / 16.0).abs() < 1e-12,
        "eval {} against predict {correct}/16",
        eval["top1"]
    );
    // The training checkpoint is a weights file: the same answers, the same accuracy.
    assert_eq!(predict(&checkpoint), from_deploy);
    let eval_ckpt: serde_json::Value = serde_json::from_str(
        ok(&[
            "eval",
            "--weights",
            &checkpoint,
            "--data",
            &s(&data),
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(eval_ckpt["top1"], eval["top1"]);
    // forward on the images agrees with predict's classes.
    let logits = s(&dir.path().join("logits.safetensors"));
    let mut args = vec!["forward", "--weights", &checkpoint, "--output", &logits];
    for image in &image_args {
        args.extend(["--input", image.as_str()]);
    }
    ok(&args);
    let rows = &read_f64(Path::new(&logits))["logits"];
    for (row, (_, index)) in rows.chunks_exact(2).zip(&from_deploy) {
        let argmax = if row[1] > row[0] { 1 } else { 0 };
        assert_eq!(argmax, *index);
    }
    // convert and export take the checkpoint and carry the metadata over.
    let converted = s(&dir.path().join("converted.safetensors"));
    ok(&["convert", "--weights", &checkpoint, &converted]);
    assert!(ok(&["info", &converted]).contains("class names: bag, trouser"));
    let onnx = dir.path().join("model.onnx");
    let (_, stderr) = ok_with_stderr(&["export", "--weights", &checkpoint, &s(&onnx)]);
    assert!(stderr.contains("input (N, 3, 32, 32)"), "{stderr}");
    let bytes = std::fs::read(&onnx).unwrap();
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"repvgg.labels") && has(b"repvgg.preprocessing"));

    // export --size re-sizes the recorded preprocessing too.
    let onnx48 = dir.path().join("model48.onnx");
    ok(&[
        "export",
        "--weights",
        &checkpoint,
        &s(&onnx48),
        "--size",
        "48",
    ]);
    let bytes = std::fs::read(&onnx48).unwrap();
    let needle = b"\"size\":[48,48]";
    assert!(bytes.windows(needle.len()).any(|w| w == needle));
    // convert sets what a file records.
    let names = dir.path().join("names.txt");
    std::fs::write(&names, "handbag\nslacks\n").unwrap();
    let relabelled = s(&dir.path().join("relabelled.safetensors"));
    ok(&[
        "convert",
        "--weights",
        &deploy,
        &relabelled,
        "--labels",
        &s(&names),
        "--resize",
        "stretch",
        "--size",
        "40x30",
        "--grey",
        "--mean",
        "0.5",
        "--std",
        "0.25",
    ]);
    let text = ok(&["info", &relabelled]);
    assert!(
        text.contains("class names: handbag, slacks")
            && text.contains("preprocessing: 40x30 grey (repeated over RGB), resized whole")
            && text.contains("mean [0.5, 0.5, 0.5], std [0.25, 0.25, 0.25]"),
        "{text}"
    );
    // bench times a weights file at the size it is fed.
    let row: serde_json::Value = serde_json::from_str(
        ok(&[
            "bench",
            "--weights",
            &deploy,
            "--batch",
            "1",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(row["size"], serde_json::json!([32, 32]));

    // train never destroys: the same --out again is refused, naming the files and the way out.
    let err = fails(&train_args);
    assert!(
        err.contains("checkpoint.safetensors")
            && err.contains("--overwrite")
            && err.contains("--resume"),
        "{err}"
    );
    // --resume says where it resumed; a finished run is re-checked, not retrained.
    let mut resume = train_args.to_vec();
    resume.push("--resume");
    let (_, stderr) = ok_with_stderr(&resume);
    assert!(
        stderr.contains("after 16 steps (4 of 4 epochs done)"),
        "{stderr}"
    );
    // --overwrite starts afresh, and no file of the old run is left beside the new one.
    let mut overwrite = train_args.to_vec();
    overwrite.extend(["--overwrite", "--stop-after-steps", "1"]);
    ok(&overwrite);
    assert!(out.join("checkpoint.safetensors").is_file());
    assert!(!out.join("deploy.safetensors").exists() && !out.join("metrics.csv").exists());
    // --resume with nothing to resume is an error.
    let empty = s(&dir.path().join("empty"));
    let mut nothing = train_args.to_vec();
    nothing[6] = &empty;
    nothing.push("--resume");
    let err = fails(&nothing);
    assert!(err.contains("no checkpoint to resume from"), "{err}");
}

/// `predict` on the demo model with Fashion-MNIST PNGs agrees with `eval` on the same images,
/// with no preprocessing flags (issue 19: it used to answer "Bag" for everything).
#[test]
fn predict_on_the_demo_model_agrees_with_eval() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let subset = fixture("fashion-mnist-subset");
    ok(&[
        "demo",
        "--data",
        subset.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
        "--quiet",
    ]);
    let deploy = out.join("deploy.safetensors");
    let eval: serde_json::Value = serde_json::from_str(
        ok(&[
            "eval",
            "--weights",
            deploy.to_str().unwrap(),
            "--data",
            subset.to_str().unwrap(),
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    let data = repvgg_data::open_dir(&subset, 0.1).unwrap();
    let pngs = dir.path().join("pngs");
    std::fs::create_dir_all(&pngs).unwrap();
    let mut args: Vec<String> = [
        "predict",
        "--weights",
        deploy.to_str().unwrap(),
        "--top",
        "1",
        "--json",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    for i in 0..data.test.len() {
        let path = pngs.join(format!("{i:03}.png"));
        data.test.image(i).unwrap().save(&path).unwrap();
        args.push(path.to_str().unwrap().to_string());
    }
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let names = data.class_names.clone().unwrap();
    assert_eq!(names[9], "Ankle boot");
    let mut correct = 0;
    let mut answered = std::collections::BTreeSet::new();
    for (i, line) in ok(&args).lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let label = v["top"][0]["label"].as_str().unwrap().to_string();
        correct += usize::from(label == names[data.test.label(i)]);
        answered.insert(label);
    }
    assert_eq!(eval["images"], 500);
    assert!(
        (eval["top1"].as_f64().unwrap() - correct as f64 / 500.0).abs() < 1e-12,
        "eval {} against predict {correct}/500",
        eval["top1"]
    );
    assert!(answered.len() > 3, "one class for everything: {answered:?}");
    // A colour copy of a grey image (R = G = B) is made grey again for this grey model:
    // the same answer to the last digit.
    let grey = pngs.join("000.png");
    let colour = pngs.join("colour.png");
    image::open(&grey).unwrap().to_rgb8().save(&colour).unwrap();
    let answer = |p: &Path| {
        ok(&[
            "predict",
            "--weights",
            deploy.to_str().unwrap(),
            "--json",
            p.to_str().unwrap(),
        ])
    };
    let (a, b) = (answer(&grey), answer(&colour));
    let top = |s: &str| serde_json::from_str::<serde_json::Value>(s.trim()).unwrap()["top"].clone();
    assert_eq!(top(&a), top(&b));
    // Flags that change the preprocessing say so.
    let (_, stderr) = ok_with_stderr(&[
        "eval",
        "--weights",
        deploy.to_str().unwrap(),
        "--data",
        subset.to_str().unwrap(),
        "--normalize",
        "imagenet",
    ]);
    assert!(stderr.contains("(as the flags set)"), "{stderr}");
    // Running the demo again replaces its own previous run.
    let (_, stderr) = ok_with_stderr(&[
        "demo",
        "--data",
        subset.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
    ]);
    assert!(
        stderr.contains("replacing the previous demo run"),
        "{stderr}"
    );
}

/// Small data sets get defaults that fit, warnings where a setting cannot do what it says,
/// and errors that name the numbers and the flag to change.
#[test]
fn small_data_gets_fitting_defaults_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("twenty");
    write_named_folder(&data, 10, false);
    let data = data.to_str().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let (_, stderr) = ok_with_stderr(&[
        "train",
        "--arch",
        TINY,
        "--data",
        data,
        "--out",
        out,
        "--size",
        "32",
        "--epochs",
        "2",
        "--stop-after-steps",
        "1",
    ]);
    assert!(
        stderr.contains("18 training images") && stderr.contains("--batch 16"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warm-up (5 epochs)") && stderr.contains("--warmup-epochs"),
        "{stderr}"
    );

    let other = dir.path().join("other");
    let other = other.to_str().unwrap();
    let err = fails(&[
        "train", "--arch", TINY, "--data", data, "--out", other, "--batch", "256",
    ]);
    assert!(
        err.contains("--batch 256 is more than the 18 training images"),
        "{err}"
    );
    let err = fails(&[
        "train",
        "--arch",
        TINY,
        "--data",
        data,
        "--out",
        other,
        "--val-fraction",
        "0",
    ]);
    assert!(
        err.contains("--val-fraction 0") && err.contains("(0, 1)"),
        "{err}"
    );
    let ten = format!("{TINY};classes=10");
    let err = fails(&["train", "--arch", &ten, "--data", data, "--out", other]);
    assert!(err.contains("10 classes") && err.contains("has 2"), "{err}");
    // A 10-class model evaluated on a 2-class folder.
    let err = fails(&[
        "eval",
        "--weights",
        fixture("tiny/deploy_official.safetensors")
            .to_str()
            .unwrap(),
        "--data",
        data,
    ]);
    assert!(err.contains("2 classes") && err.contains("has 10"), "{err}");
}

/// Usage errors are clap's own: what is missing or wrong, the allowed values, a suggestion
/// for a typo, and the subcommand's usage.
#[test]
fn usage_errors_keep_what_clap_knows() {
    let err = usage_error(&["forward"]);
    assert!(
        err.contains("--weights <WEIGHTS>") && err.contains("--output <OUTPUT>"),
        "{err}"
    );
    assert!(err.contains("Usage: repvgg forward"), "{err}");
    let err = usage_error(&["train", "--arch", "A0", "--data", "x", "--normalize", "foo"]);
    assert!(err.contains("possible values: imagenet, dataset"), "{err}");
    let err = usage_error(&["eval", "--confussion"]);
    assert!(err.contains("--confusion"), "{err}");
    assert!(err.contains("Usage: repvgg eval"), "{err}");
    let err = usage_error(&[
        "export",
        "--dynamic-batch",
        "--batch",
        "4",
        "a.pth",
        "b.onnx",
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
    // convert/export positionals clap cannot declare still get clap's rendering.
    let err = usage_error(&["convert", "--weights", "w.pth"]);
    assert!(
        err.contains("no output file given") && err.contains("Usage: repvgg convert"),
        "{err}"
    );
    let err = usage_error(&["export", "w.pth", "--opset", "9"]);
    assert!(err.contains("11..=21") || err.contains("11..22"), "{err}");
    let err = usage_error(&["bench", "--mode", "fast"]);
    assert!(
        err.contains("possible values: auto, latency, throughput"),
        "{err}"
    );
}

/// A file for another architecture: one readable line (detected against requested, counts,
/// a few keys), and the whole list with --verbose.
#[test]
fn mismatch_errors_are_readable_and_verbose_lists_all() {
    let dir = tempfile::tempdir().unwrap();
    let weights = fixture("tiny/train_official.pth");
    let output = dir.path().join("x.safetensors");
    let args = [
        "convert",
        weights.to_str().unwrap(),
        output.to_str().unwrap(),
        "--arch",
        "A0",
    ];
    let err = error_text(&args);
    let lines: Vec<&str> = err.lines().collect();
    // The first line: what the file holds against what was asked for, and the counts.
    assert!(
        lines[0].contains("holds a custom RepVGG")
            && lines[0].contains("not the requested RepVGG-A0")
            && lines[0].contains("196 missing, 94 mis-shaped keys"),
        "{err}"
    );
    // Then a line per kind with its first keys, and where the rest is.
    assert!(lines[1].starts_with("  missing: ") && lines[1].contains("and 193 more"));
    assert!(lines[2].starts_with("  mis-shaped: ") && lines[2].contains("and 91 more"));
    assert!(lines[3].contains("--verbose lists all 290"), "{err}");
    assert!(lines.iter().all(|l| l.len() < 400), "{err}");
    let mut verbose = args.to_vec();
    verbose.push("--verbose");
    let out = repvgg(&verbose);
    let all = String::from_utf8(out.stderr).unwrap();
    let listed = all.lines().filter(|l| l.starts_with("  ")).count();
    assert!(listed > 100, "{listed} lines: {all}");
    assert!(
        all.contains(
            "'stage0.rbr_dense.conv.weight' has shape [8, 3, 3, 3], expected [48, 3, 3, 3]"
        ),
        "{all}"
    );
}

#[test]
fn loose_ends_are_tied() {
    // One way to name the weights; the output is still needed.
    let err = usage_error(&[
        "convert",
        "--weights",
        fixture("tiny/train_official.pth").to_str().unwrap(),
    ]);
    assert!(err.contains("no output file given"), "{err}");
    // A tiny model's MACs in a unit that shows them.
    let text = ok(&["info", TINY, "--size", "32"]);
    assert!(
        !text.contains("0.000G") && !text.contains("0.001G"),
        "{text}"
    );
    // bench says when --form cannot apply.
    let err = fails(&["bench", "--layers", "--form", "train", "--arch", TINY]);
    assert!(err.contains("--form train does not apply"), "{err}");
    // forward's input rule: `input`, or the only tensor; otherwise the names it found.
    let dir = tempfile::tempdir().unwrap();
    let two = dir.path().join("two.safetensors");
    let pixels = vec![0u8; 4 * 3 * 8 * 8];
    let view = || {
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 3, 8, 8], &pixels)
            .unwrap()
    };
    std::fs::write(
        &two,
        safetensors::serialize([("images", view()), ("masks", view())], None).unwrap(),
    )
    .unwrap();
    let weights = fixture("tiny/deploy_official.safetensors");
    let y = dir.path().join("y.safetensors");
    let args = |input: &Path| {
        vec![
            "forward".to_string(),
            "--weights".into(),
            weights.to_str().unwrap().into(),
            "--input".into(),
            input.to_str().unwrap().into(),
            "--output".into(),
            y.to_str().unwrap().into(),
        ]
    };
    let a = args(&two);
    let err = fails(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(err.contains("'images', 'masks'"), "{err}");
    let one = dir.path().join("one.safetensors");
    std::fs::write(
        &one,
        safetensors::serialize([("batch", view())], None).unwrap(),
    )
    .unwrap();
    let a = args(&one);
    ok(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    // Export's size message in a readable unit.
    let onnx = dir.path().join("tiny.onnx");
    let (_, stderr) =
        ok_with_stderr(&["export", weights.to_str().unwrap(), onnx.to_str().unwrap()]);
    assert!(
        stderr.contains(" KB,") && !stderr.contains("0 MB"),
        "{stderr}"
    );
}

/// `quantize` on the demo model: INT8 keeps its accuracy, the file says what it is, and
/// every command reads it; the wrong file in the wrong place is a clear error.
#[test]
fn quantize_keeps_the_demo_models_accuracy_and_every_command_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let subset = fixture("fashion-mnist-subset");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(&[
        "demo",
        "--data",
        &s(&subset),
        "--out",
        &s(&out),
        "--epochs",
        "2",
        "--quiet",
    ]);
    let deploy = s(&out.join("deploy.safetensors"));
    let top1 = |weights: &str| -> f64 {
        let json = ok(&[
            "eval",
            "--weights",
            weights,
            "--data",
            &s(&subset),
            "--json",
        ]);
        serde_json::from_str::<serde_json::Value>(json.trim()).unwrap()["top1"]
            .as_f64()
            .unwrap()
    };
    let float = top1(&deploy);
    for method in ["minmax", "percentile", "entropy"] {
        let q = s(&dir.path().join(format!("{method}.safetensors")));
        ok(&[
            "quantize",
            "--weights",
            &deploy,
            "--calib",
            &s(&subset),
            "--out",
            &q,
            "--samples",
            "256",
            "--method",
            method,
        ]);
        let int8 = top1(&q);
        eprintln!("{method}: fp32 {float:.4}, int8 {int8:.4}");
        // 500 test images: 2 points is 10 of them, far more than 8-bit rounding moves.
        assert!(
            (int8 - float).abs() <= 0.02,
            "{method}: {int8} against {float}"
        );
    }
    let q = s(&dir.path().join("percentile.safetensors"));
    let text = ok(&["info", &q]);
    assert!(
        text.contains("quantization: INT8") && text.contains("class names: T-shirt/top"),
        "{text}"
    );
    let (stdout, _) = ok_with_stderr(&[
        "quantize",
        "--weights",
        &deploy,
        "--calib",
        &s(&subset),
        "--out",
        &s(&dir.path().join("r.safetensors")),
        "--samples",
        "64",
        "--report",
    ]);
    assert!(
        stdout.contains("rel. RMS error") && stdout.contains("stage4.0"),
        "{stdout}"
    );
    let row: serde_json::Value = serde_json::from_str(
        ok(&[
            "bench",
            "--weights",
            &q,
            "--batch",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(
        row["precision"], "int8",
        "an INT8 file is timed as int8: {row}"
    );
    // Wrong files in the wrong places.
    let err = fails(&[
        "quantize",
        "--weights",
        &q,
        "--calib",
        &s(&subset),
        "--out",
        "x.safetensors",
    ]);
    assert!(err.contains("already an INT8 model"), "{err}");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = fails(&[
        "quantize",
        "--weights",
        &deploy,
        "--calib",
        &s(&empty),
        "--out",
        "x.safetensors",
    ]);
    assert!(
        err.contains("empty") && err.contains("no JPEG/PNG images"),
        "{err}"
    );
    // A flat folder of images (what a user of a published model brings), one of them broken:
    // used, the broken one skipped and counted.
    let flat = dir.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    let data = repvgg_data::open_dir(&subset, 0.1).unwrap();
    for i in 0..12 {
        data.test
            .image(i)
            .unwrap()
            .save(flat.join(format!("{i:02}.png")))
            .unwrap();
    }
    std::fs::write(flat.join("broken.png"), b"not a png").unwrap();
    let (_, stderr) = ok_with_stderr(&[
        "quantize",
        "--weights",
        &deploy,
        "--calib",
        &s(&flat),
        "--out",
        &s(&dir.path().join("flat.safetensors")),
    ]);
    assert!(
        stderr.contains("skipped 1 unreadable") && stderr.contains("over 12 images"),
        "{stderr}"
    );
    let io = fixture("tiny/io.safetensors");
    let err = fails(&[
        "forward",
        "--weights",
        &q,
        "--input",
        &s(&io),
        "--output",
        &s(&dir.path().join("f.safetensors")),
        "--features",
    ]);
    assert!(err.contains("INT8 model"), "{err}");

    // Blocks kept in float: named in the file, run beside the INT8 ones.
    let ends = s(&dir.path().join("ends.safetensors"));
    ok(&[
        "quantize",
        "--weights",
        &deploy,
        "--calib",
        &s(&subset),
        "--out",
        &ends,
        "--samples",
        "64",
        "--fp32-layers",
        "first,last",
    ]);
    let text = ok(&["info", &ends]);
    assert!(text.contains("float: stage0, stage4.0, linear"), "{text}");
    assert!((top1(&ends) - float).abs() <= 0.02);
    let err = fails(&[
        "quantize",
        "--weights",
        &deploy,
        "--calib",
        &s(&subset),
        "--out",
        &ends,
        "--fp32-layers",
        "stage9",
    ]);
    assert!(err.contains("--fp32-layers stage9"), "{err}");

    // The QDQ export in ONNX Runtime against the INT8 engine, on images in the calibrated
    // range. ORT fuses the pattern into QLinearConv and requantizes with its own product of
    // the scales, adding the zero point after rounding: a tie could land an activation one
    // step away, which moves the logits by well under 0.1%; a wrong scale, zero point or bias
    // moves them by percents. (Here they agree to 1e-7.)
    let Some(python) = repvgg_testing::python_with(&["onnx", "onnxruntime", "safetensors"]) else {
        return;
    };
    let input = dir.path().join("x.safetensors");
    let values: Vec<f32> = (0..4 * 3 * 28 * 28)
        .map(|i| ((i / 3) as f32 * 0.37).sin() * 1.3 + 0.4)
        .collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![4, 3, 28, 28],
        bytemuck_bytes(&values),
    )
    .unwrap();
    std::fs::write(
        &input,
        safetensors::serialize([("input", view)], None).unwrap(),
    )
    .unwrap();
    let logits = dir.path().join("int8_logits.safetensors");
    ok(&[
        "forward",
        "--weights",
        &q,
        "--input",
        &s(&input),
        "--output",
        &s(&logits),
    ]);
    let onnx = dir.path().join("int8.onnx");
    ok(&["export", "--weights", &q, &s(&onnx), "--batch", "4"]);
    let result = repvgg_testing::check_onnx_within(&python, &onnx, &input, &logits, 1e-3);
    eprintln!("QDQ in ONNX Runtime against the INT8 engine: {result}");
    let err = fails(&["export", "--weights", &q, &s(&onnx), "--opset", "12"]);
    assert!(err.contains("opset 13"), "{err}");
    // With float ends: ORT's float convs and ours sum in other orders, so an INT8 input can
    // round one step the other way; 1% of the largest logit bounds that, not a wrong graph.
    let ends_logits = dir.path().join("ends_logits.safetensors");
    ok(&[
        "forward",
        "--weights",
        &ends,
        "--input",
        &s(&input),
        "--output",
        &s(&ends_logits),
    ]);
    let ends_onnx = dir.path().join("ends.onnx");
    ok(&["export", "--weights", &ends, &s(&ends_onnx), "--batch", "4"]);
    let result = repvgg_testing::check_onnx_within(&python, &ends_onnx, &input, &ends_logits, 1e-2);
    eprintln!("QDQ with float ends in ONNX Runtime against the INT8 engine: {result}");
}

fn bytemuck_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, values.len() * 4) }
}

/// `quantize --random` (the load tests' INT8 model, as `serve --random` serves float ones):
/// seeded, so two runs write the same file, which every command reads as INT8; a folder of
/// photos is calibration enough; `--random` and `--weights` exclude each other.
#[test]
fn quantize_takes_seeded_random_weights() {
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib");
    std::fs::create_dir(&calib).unwrap();
    for photo in ["chelsea.png", "rocket.jpg"] {
        std::fs::copy(fixture(&format!("photos/{photo}")), calib.join(photo)).unwrap();
    }
    let spec = "depths=1,1,1,1;widths=8,8,16,16;stem=8;classes=10";
    let calib = calib.to_str().unwrap();
    let outs: Vec<String> = ["a", "b"]
        .iter()
        .map(|name| {
            let out = dir.path().join(format!("{name}.safetensors"));
            let out = out.to_str().unwrap().to_string();
            let text = ok(&[
                "quantize", "--random", spec, "--calib", calib, "--out", &out, "--size", "32",
            ]);
            assert!(text.is_empty() || !text.contains("error"), "{text}");
            out
        })
        .collect();
    // The same tensors and metadata (the header's key order is a hash map's, so the bytes
    // themselves may differ).
    let contents = |path: &str| {
        let bytes = std::fs::read(path).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, Vec<u8>)> = file
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.data().to_vec()))
            .collect();
        tensors.sort();
        let metadata: std::collections::BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        (tensors, metadata)
    };
    assert!(
        contents(&outs[0]) == contents(&outs[1]),
        "the same seed gives the same model"
    );
    let info = ok(&["info", &outs[0]]);
    assert!(info.contains("INT8"), "{info}");
    let err = usage_error(&[
        "quantize",
        "--random",
        spec,
        "--weights",
        &outs[0],
        "--calib",
        calib,
        "--out",
        &outs[1],
    ]);
    assert!(
        err.contains("--random") && err.contains("--weights"),
        "{err}"
    );
}

/// QARepVGG blocks through the command line: described, trained (both forms agree after the
/// conversion), quantized, and refused where they do not apply.
#[test]
fn qarepvgg_blocks_train_convert_and_quantize() {
    let text = ok(&["info", "QARepVGG-A0"]);
    assert!(
        text.contains("QARepVGG-A0") && text.contains("QA yes"),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qa");
    let subset = fixture("fashion-mnist-subset");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let stdout = ok(&[
        "train",
        "--arch",
        &format!("{TINY};qa"),
        "--data",
        &s(&subset),
        "--out",
        &s(&out),
        "--epochs",
        "1",
        "--batch",
        "100",
        "--quiet",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["predictions_agree"], true, "{report}");
    let text = ok(&["info", &s(&out.join("train.safetensors"))]);
    assert!(
        text.contains("QA yes") && text.contains("form: train"),
        "{text}"
    );
    let q = s(&dir.path().join("q.safetensors"));
    ok(&[
        "quantize",
        "--weights",
        &s(&out.join("checkpoint.safetensors")),
        "--calib",
        &s(&subset),
        "--out",
        &q,
        "--samples",
        "128",
    ]);
    assert!(ok(&["info", &q]).contains("quantization: INT8"));
    let err = fails(&[
        "train",
        "--arch",
        &format!("{TINY};qa"),
        "--data",
        &s(&subset),
        "--out",
        &s(&dir.path().join("l2")),
        "--custom-l2",
    ]);
    assert!(
        err.contains("--custom-l2") && err.contains("QARepVGG"),
        "{err}"
    );
    let text = ok(&["info", "depths=1,1,1,1;widths=16,16,32,32;stem=16;qa;se"]);
    assert!(text.contains("SE yes, QA yes"), "{text}");
    // With SE, the post-sum BN stays after the gate: in ONNX Runtime as in the engine.
    if let Some(python) = repvgg_testing::python_with(&["onnx", "onnxruntime", "safetensors"]) {
        let weights = fixture("qa_tiny_se/train_official.safetensors");
        let input = fixture("qa_tiny_se/io.safetensors");
        let logits = dir.path().join("se_logits.safetensors");
        ok(&[
            "forward",
            "--weights",
            &s(&weights),
            "--input",
            &s(&input),
            "--output",
            &s(&logits),
        ]);
        let onnx = dir.path().join("qa_se.onnx");
        ok(&[
            "export",
            "--weights",
            &s(&weights),
            &s(&onnx),
            "--size",
            "32",
            "--batch",
            "2",
        ]);
        let result = repvgg_testing::check_onnx(&python, &onnx, &input, &logits);
        eprintln!("QARepVGG with SE in ONNX Runtime: {result}");
    }
    // Converted, they are plain RepVGG deploy weights: any naming.
    ok(&[
        "convert",
        "--weights",
        &s(&out.join("train.safetensors")),
        &s(&dir.path().join("t.safetensors")),
        "--naming",
        "timm",
    ]);
}

/// `predict` over a folder: --recursive finds nested images, --output writes one line per
/// image (an unreadable one included, as an error), and a re-run after a kill (the file cut
/// mid-line) classifies only what is missing and ends with the same lines as an uninterrupted
/// run. Probabilities agree with the one-call path to 1e-6 relative (batches of 5 instead of
/// one of 13 split the work across threads differently).
#[test]
fn predict_over_a_folder_resumes() {
    let weights = fixture("photos/tiny1000_train_official.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let mut expected_files = Vec::new();
    for (k, sub) in ["a", "b/c"].iter().enumerate() {
        std::fs::create_dir_all(root.join(sub)).unwrap();
        for i in 0..6 {
            let (src, ext) = if (i + k) % 2 == 0 {
                ("chelsea.png", "png")
            } else {
                ("rocket.jpg", "jpg")
            };
            let path = root.join(sub).join(format!("img{i}.{ext}"));
            std::fs::copy(fixture(&format!("photos/{src}")), &path).unwrap();
            expected_files.push(path);
        }
    }
    let broken = root.join("a/zz_broken.jpg");
    std::fs::copy(fixture("photos/broken.jpg"), &broken).unwrap();
    expected_files.push(broken.clone());
    let w = weights.to_str().unwrap();
    let r = root.to_str().unwrap();

    let err = error_text(&["predict", "--weights", w, r]);
    assert!(err.contains("--recursive"), "{err}");

    let out = dir.path().join("preds.jsonl");
    let o = out.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["predict", "--weights", w, "--recursive", "--batch", "5", r];
        args.extend(extra);
        repvgg(&args)
    };
    let first = run(&["--output", o]);
    assert!(!first.status.success(), "the broken image is counted");
    let full = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<serde_json::Value> = full
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 13);
    let mut files: Vec<String> = lines
        .iter()
        .map(|l| l["file"].as_str().unwrap().to_string())
        .collect();
    files.sort();
    let mut wanted: Vec<String> = expected_files
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    wanted.sort();
    assert_eq!(files, wanted);

    // The same images named one by one, in one call.
    let mut args = vec!["predict", "--weights", w, "--json"];
    let listed: Vec<String> = lines
        .iter()
        .map(|l| l["file"].as_str().unwrap().to_string())
        .collect();
    args.extend(listed.iter().map(String::as_str));
    let single = repvgg(&args);
    for (ours, theirs) in lines
        .iter()
        .zip(String::from_utf8(single.stdout).unwrap().lines())
    {
        let theirs: serde_json::Value = serde_json::from_str(theirs).unwrap();
        assert_eq!(ours["file"], theirs["file"]);
        assert_eq!(ours["error"], theirs["error"]);
        if let Some(top) = ours["top"].as_array() {
            for (a, b) in top.iter().zip(theirs["top"].as_array().unwrap()) {
                assert_eq!(a["index"], b["index"]);
                let (p, q) = (a["prob"].as_f64().unwrap(), b["prob"].as_f64().unwrap());
                assert!((p - q).abs() <= 1e-6 * q, "{p} vs {q}");
            }
        }
    }

    // A kill after four lines and part of the fifth.
    let cut: usize = full.lines().take(4).map(|l| l.len() + 1).sum::<usize>() + 10;
    std::fs::write(&out, &full[..cut]).unwrap();
    let resumed = run(&["--output", o]);
    let note = String::from_utf8(resumed.stderr).unwrap();
    assert!(
        note.contains("4 of the 13 images are already there"),
        "{note}"
    );
    // The resumed lines come from batches cut elsewhere: the same answers to 1e-6.
    let again = std::fs::read_to_string(&out).unwrap();
    assert!(
        again.starts_with(&full[..cut - 10]),
        "the first four lines are kept"
    );
    let by_file = |text: &str| -> std::collections::BTreeMap<String, serde_json::Value> {
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["file"].as_str().unwrap().to_string(), v)
            })
            .collect()
    };
    let (a, b) = (by_file(&again), by_file(&full));
    assert_eq!(again.lines().count(), 13);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (file, ours) in &a {
        let theirs = &b[file];
        assert_eq!(ours["error"], theirs["error"]);
        for (x, y) in ours["top"]
            .as_array()
            .into_iter()
            .flatten()
            .zip(theirs["top"].as_array().into_iter().flatten())
        {
            assert_eq!(x["index"], y["index"]);
            let (p, q) = (x["prob"].as_f64().unwrap(), y["prob"].as_f64().unwrap());
            assert!((p - q).abs() <= 1e-6 * q, "{file}: {p} vs {q}");
        }
    }

    // The disk fills after about two lines: the run fails naming the output, and a run with
    // room again completes it from what was written.
    #[cfg(unix)]
    {
        std::fs::remove_file(&out).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_repvgg"));
        command.args([
            "predict",
            "--weights",
            w,
            "--recursive",
            "--batch",
            "5",
            r,
            "--output",
            o,
        ]);
        let room = full
            .lines()
            .take(2)
            .map(|l| l.len() as u64 + 1)
            .sum::<u64>()
            + 20;
        limit_file_size(&mut command, room);
        let failed = command.output().unwrap();
        assert!(!failed.status.success());
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(err.contains(o) && err.contains("cannot write"), "{err}");
        assert!(std::fs::metadata(&out).unwrap().len() <= room);
        run(&["--output", o]);
        let after = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            by_file(&after).keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>()
        );
        assert_eq!(after.lines().count(), 13);
    }

    // CSV: a header, then one row per image.
    let csv_out = dir.path().join("preds.csv");
    run(&["--output", csv_out.to_str().unwrap(), "--top", "2"]);
    let text = std::fs::read_to_string(&csv_out).unwrap();
    let mut rows = text.lines();
    assert_eq!(
        rows.next().unwrap(),
        "file,error,index_1,label_1,prob_1,index_2,label_2,prob_2"
    );
    assert_eq!(rows.count(), 13);
}

/// A spec, batch or size that cannot fit is refused before anything is allocated, with the
/// memory it needs and the memory the machine has (36 TB of weights fit nowhere; a batch of a
/// million A0 images at 224 needs 6 TB of activations).
#[test]
fn specs_that_cannot_fit_are_refused_before_allocating() {
    let err = fails(&[
        "bench",
        "--arch",
        "depths=1,1,1,1;widths=8,8,1000000,1000000;stem=8;classes=10",
    ]);
    assert!(err.contains("needs about"), "{err}");
    assert!(err.contains("training-form weights"), "{err}");
    assert!(err.contains("GB available"), "{err}");
    let err = fails(&["bench", "--arch", "A0", "--batch", "1000000"]);
    assert!(
        err.contains("batch 1000000 at 224x224 needs about"),
        "{err}"
    );
    let err = fails(&[
        "serve",
        "--random",
        "depths=1,1,1,1;widths=8,8,1000000,1000000;stem=8",
    ]);
    assert!(err.contains("needs about"), "{err}");
    // Batches whose activations fit nowhere, for each command that runs them: refused
    // before any image is read or any weight packed.
    let weights = fixture("tiny/deploy_official.safetensors");
    let w = weights.to_str().unwrap();
    let photo = fixture("photos/rocket.jpg");
    let p = photo.to_str().unwrap();
    let err = fails(&[
        "predict",
        "--weights",
        w,
        "--size",
        "16384",
        "--batch",
        "64",
        p,
    ]);
    assert!(err.contains("batch 64 at 16384x16384 needs about"), "{err}");
    let data = fixture("fashion-mnist-subset");
    let d = data.to_str().unwrap();
    let err = fails(&[
        "eval",
        "--weights",
        w,
        "--data",
        d,
        "--size",
        "16384",
        "--batch",
        "64",
    ]);
    assert!(err.contains("batch 64 at 16384x16384 needs about"), "{err}");
    // Training keeps every block's maps for the backward pass: far more than a forward.
    let dir = tempfile::tempdir().unwrap();
    for split in ["train", "val"] {
        for class in ["a", "b"] {
            let folder = dir.path().join("photos").join(split).join(class);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..2 {
                std::fs::copy(&photo, folder.join(format!("{i}.jpg"))).unwrap();
            }
        }
    }
    let photos = dir.path().join("photos");
    let out = dir.path().join("run");
    let err = fails(&[
        "train",
        "--arch",
        "A0",
        "--data",
        photos.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--size",
        "8192",
        "--batch",
        "4",
    ]);
    assert!(err.contains("training batches of 4 at 8192x8192"), "{err}");
    assert!(err.contains("lower --batch"), "{err}");
}

/// The disk filling up, as far as `command` can tell: no file it writes may grow past
/// `bytes` (RLIMIT_FSIZE), and write(2) past it fails with EFBIG instead of raising SIGXFSZ.
#[cfg(unix)]
fn limit_file_size(command: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls (signal, setrlimit) run.
    unsafe {
        command.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A write that fails partway (the disk full: here the file-size limit set below the
/// output's size) fails the command with an error naming the file, and leaves the previous
/// file intact and no temporary file behind.
#[cfg(unix)]
#[test]
fn a_failed_write_keeps_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("deploy.safetensors");
    let out_s = out.to_str().unwrap();
    let small = fixture("tiny/train_official.safetensors");
    ok(&["convert", small.to_str().unwrap(), out_s]);
    let before = std::fs::read(&out).unwrap();
    let big = fixture("tiny_se/train_official.safetensors");
    let mut command = Command::new(env!("CARGO_BIN_EXE_repvgg"));
    command.args(["convert", big.to_str().unwrap(), out_s]);
    limit_file_size(&mut command, 16 * 1024);
    let result = command.output().unwrap();
    assert!(!result.status.success());
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(out_s) && err.contains("cannot write"), "{err}");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        before,
        "the previous file changed"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("deploy.safetensors")]);
}

/// The disk filling up while training writes a checkpoint: the run stops with an error naming
/// the checkpoint, the previous checkpoint is intact, no temporary file is left, and the run
/// resumes from it once there is room.
#[cfg(unix)]
#[test]
fn training_that_runs_out_of_disk_keeps_its_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = fixture("fashion-mnist-subset");
    let out = dir.path().join("run");
    let train = |extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_repvgg"));
        command
            .args(["train", "--arch", "depths=1,1,1,1;widths=8,8,16,16;stem=8"])
            .args(["--data", data.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .args(["--epochs", "2", "--batch", "100", "--checkpoint-every", "3"])
            .arg("--quiet")
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    };
    // A first run stopped once its first checkpoint is on disk.
    let checkpoint = out.join("checkpoint.safetensors");
    let mut child = train(&[]).spawn().unwrap();
    let started = std::time::Instant::now();
    while !checkpoint.is_file() {
        assert!(started.elapsed() < std::time::Duration::from_secs(120));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    let before = std::fs::read(&checkpoint).unwrap();
    // Resumed with no file allowed to reach the checkpoint's size: its next write fails.
    let mut resumed = train(&["--resume"]);
    limit_file_size(&mut resumed, before.len() as u64 / 2);
    let failed = resumed.output().unwrap();
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(err.contains("error: "), "{err:?}");
    assert!(
        err.contains("checkpoint.safetensors") && err.contains("cannot write"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&checkpoint).unwrap(),
        before,
        "the checkpoint changed"
    );
    let temporary: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".tmp"))
        .collect();
    assert!(temporary.is_empty(), "{temporary:?}");
    let done = train(&["--resume"]).output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(out.join("train.safetensors").is_file());
}

/// Training killed with SIGKILL at three moments drawn (seeded) over an uninterrupted run's
/// duration, resumed each time from its last checkpoint, ends with training weights identical
/// bit for bit to the uninterrupted run's.
#[cfg(unix)]
#[test]
fn training_killed_at_random_moments_resumes_to_the_same_weights() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let data = fixture("fashion-mnist-subset");
    let train = |out: &Path, extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_repvgg"));
        command
            .args(["train", "--arch", "depths=1,1,1,1;widths=8,8,16,16;stem=8"])
            .args([
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args([
                "--epochs",
                "2",
                "--batch",
                "100",
                "--checkpoint-every",
                "3",
                "--quiet",
            ])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    };
    let reference = dir.path().join("reference");
    let started = std::time::Instant::now();
    let out = train(&reference, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let duration = started.elapsed();

    let killed = dir.path().join("killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let again = |out: &Path| -> Vec<&str> {
        if out.join("checkpoint.safetensors").is_file() {
            vec!["--resume"]
        } else if out.exists() {
            vec!["--overwrite"]
        } else {
            vec![]
        }
    };
    for _ in 0..3 {
        let at = duration.mul_f64(rng.random_range(0.1..0.9));
        let how = again(&killed);
        eprintln!(
            "run after {:?}: {how:?}, killed at {at:?} of {duration:?}",
            started.elapsed()
        );
        let mut child = train(&killed, &how).spawn().unwrap();
        std::thread::sleep(at);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    let last = train(&killed, &again(&killed)).output().unwrap();
    assert!(
        last.status.success(),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );
    let tensors = |path: PathBuf| -> Vec<(String, Vec<u8>)> {
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut named: Vec<(String, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.data().to_vec()))
            .collect();
        named.sort();
        named
    };
    let (a, b) = (
        tensors(reference.join("train.safetensors")),
        tensors(killed.join("train.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x == y, "{name} differs after kills and resumes");
    }
}

/// Image commands make RGB: a model that takes one channel is refused before any image is
/// read, with the way to feed it (tensors through forward), instead of failing mid-batch.
#[test]
fn image_commands_refuse_models_that_do_not_take_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let spec = repvgg_arch::ArchSpec::parse("depths=1,1,1,1;widths=8,8,8,8;stem=8;in=1;classes=4")
        .unwrap();
    let tensors = repvgg_checkpoint::random::training_weights(&spec, 0);
    let weights = dir.path().join("grey.safetensors");
    repvgg_checkpoint::Checkpoint::from_state_dict(spec, repvgg_arch::Form::Train, tensors)
        .unwrap()
        .save_safetensors(&weights, repvgg_checkpoint::Naming::Official)
        .unwrap();
    let w = weights.to_str().unwrap();
    let photo = fixture("photos/rocket.jpg");
    let p = photo.to_str().unwrap();
    let data = fixture("fashion-mnist-subset");
    let out = dir.path().join("out.safetensors");
    for args in [
        vec!["predict", "--weights", w, p],
        vec!["eval", "--weights", w, "--data", data.to_str().unwrap()],
        vec![
            "forward",
            "--weights",
            w,
            "--input",
            p,
            "--output",
            out.to_str().unwrap(),
        ],
    ] {
        let err = fails(&args);
        assert!(
            err.contains("grey.safetensors") && err.contains("takes 1 input channels"),
            "{args:?}: {err}"
        );
    }
}
