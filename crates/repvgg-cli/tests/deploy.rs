//! The container and Kubernetes files in deploy/ checked without Docker or a cluster (images
//! cannot be pulled here): the Dockerfile's instructions and stages, the manifest's YAML and
//! objects, and that the arguments both hand to `repvgg serve` start a server whose probe
//! routes answer.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Starts `repvgg serve ARGS` with the weights swapped for a fixture and a free port, GETs
/// each path, and returns their status codes.
fn serve_and_probe(args: &[String], paths: &[&str]) -> Vec<u16> {
    let weights = repvgg_testing::fixtures().join("tiny/deploy_official.safetensors");
    let args: Vec<String> = args
        .iter()
        .map(|a| match a.split_once('=') {
            Some(("--weights", _)) => format!("--weights={}", weights.display()),
            Some(("--addr", _)) => "--addr=127.0.0.1:0".into(),
            _ => a.clone(),
        })
        .collect();
    let mut args = args.into_iter();
    let mut fixed = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--weights" => {
                args.next();
                fixed.push(format!("--weights={}", weights.display()));
            }
            "--addr" => {
                args.next();
                fixed.push("--addr=127.0.0.1:0".into());
            }
            _ => fixed.push(a),
        }
    }
    // The manifest's arguments leave the address to the image's entry point: without one the
    // server would take 8080 here, which something else on the machine may hold.
    if !fixed.iter().any(|a| a.starts_with("--addr")) {
        fixed.push("--addr=127.0.0.1:0".into());
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_repvgg"))
        .args(&fixed)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut base = None;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if let Some(addr) = line.strip_prefix("listening on ") {
            base = Some(addr.to_string());
            break;
        }
    }
    // Keep reading what the server prints, as a terminal or a log collector would.
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    let Some(base) = base else {
        let _ = child.kill();
        panic!("repvgg {fixed:?} did not start:\n{log}");
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let statuses = paths
        .iter()
        .map(|p| {
            agent
                .get(format!("{base}{p}"))
                .call()
                .unwrap()
                .status()
                .as_u16()
        })
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    statuses
}

#[test]
fn dockerfile_is_well_formed_and_its_command_serves() {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    // Instructions, with continuation lines joined.
    let joined = text.replace("\\\n", " ");
    let instructions: Vec<(&str, &str)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once(' ').unwrap_or((l, "")))
        .collect();
    const KNOWN: &[&str] = &[
        "FROM",
        "RUN",
        "COPY",
        "ADD",
        "WORKDIR",
        "ENV",
        "ARG",
        "USER",
        "EXPOSE",
        "ENTRYPOINT",
        "CMD",
        "LABEL",
        "VOLUME",
        "HEALTHCHECK",
        "STOPSIGNAL",
        "SHELL",
    ];
    let mut stages = Vec::new();
    for (instruction, rest) in &instructions {
        assert!(
            KNOWN.contains(instruction),
            "unknown instruction {instruction}"
        );
        match *instruction {
            "FROM" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if let [_, as_, name] = words[..] {
                    assert!(as_.eq_ignore_ascii_case("AS"));
                    stages.push(name.to_string());
                }
            }
            "COPY" => {
                if let Some(stage) = rest.strip_prefix("--from=") {
                    let stage = stage.split_whitespace().next().unwrap();
                    assert!(
                        stages.iter().any(|s| s == stage),
                        "COPY from unknown stage {stage}"
                    );
                }
            }
            _ => {}
        }
    }
    assert_eq!(instructions[0].0, "FROM");
    // The toolchain image is the workspace's Rust version.
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        instructions[0].1.starts_with(&format!("rust:{version}")),
        "{}",
        instructions[0].1
    );
    // ENTRYPOINT and CMD in exec (JSON) form; together they start a server.
    let exec = |name: &str| -> Vec<String> {
        let (_, json) = instructions.iter().find(|(i, _)| *i == name).unwrap();
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{name} is not a JSON array: {e}"))
    };
    let mut command = exec("ENTRYPOINT");
    command.extend(exec("CMD"));
    assert_eq!(command[0], "repvgg");
    let exposed: u16 = instructions
        .iter()
        .find(|(i, _)| *i == "EXPOSE")
        .unwrap()
        .1
        .trim()
        .parse()
        .unwrap();
    assert!(command.iter().any(|a| a.ends_with(&format!(":{exposed}"))));
    assert_eq!(
        serve_and_probe(&command[1..], &["/v2/health/live", "/v2/health/ready"]),
        [200, 200]
    );
}

#[test]
fn kubernetes_manifest_is_valid_and_its_probes_answer() {
    let Some(python) = repvgg_testing::python_with(&["yaml"]) else {
        return;
    };
    let manifest = root().join("deploy/kubernetes.yaml");
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Deployment", "Service"]);
    let (deployment, service) = (&docs[0], &docs[1]);
    for doc in &docs {
        assert!(doc["apiVersion"].is_string() && doc["metadata"]["name"].is_string());
    }
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&service["spec"]["selector"], labels);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let port = &container["ports"][0];
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port["name"]);
    assert_eq!(port["containerPort"], 8080, "the Dockerfile's EXPOSE");
    let probe = |kind: &str| {
        let get = &container[kind]["httpGet"];
        assert_eq!(get["port"], port["name"], "{kind}");
        get["path"].as_str().unwrap().to_string()
    };
    let (ready, live) = (probe("readinessProbe"), probe("livenessProbe"));
    let mut args = vec!["serve".to_string()];
    args.extend(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string()),
    );
    assert_eq!(serve_and_probe(&args, &[&ready, &live]), [200, 200]);
}
