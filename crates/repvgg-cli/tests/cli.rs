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
    let err = fails(&[
        "convert",
        fixture("tiny/train_official.pth").to_str().unwrap(),
        dir.path().join("x.safetensors").to_str().unwrap(),
        "--arch",
        "A0",
    ]);
    assert!(
        err.contains("does not match RepVGG-A0") && err.contains("train_official.pth"),
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
    let err = fails(&["convert", "--naming", "keras", "a.pth", "b.safetensors"]);
    assert!(err.contains("keras"), "{err}");
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
