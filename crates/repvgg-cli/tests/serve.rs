//! `repvgg serve` over loopback with a real HTTP client: every route, the V2 JSON and binary
//! forms against `repvgg forward` (also from Triton's and KServe's own clients), classify
//! against `predict`, the 400/404/413/503/504
//! answers, draining on SIGTERM, and 64 clients at once.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn fixture(rel: &str) -> PathBuf {
    repvgg_testing::fixtures().join(rel)
}

fn repvgg_ok(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_repvgg"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "repvgg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A `repvgg serve` process on a free loopback port, killed when dropped.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(weights: &Path, extra: &[&str]) -> Server {
        let mut args = vec!["--weights", weights.to_str().unwrap()];
        args.extend(extra);
        Server::start_with(&args)
    }

    fn start_with(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_repvgg"))
            .arg("serve")
            .args(["--addr", "127.0.0.1:0", "--threads", "2"])
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let mut base = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            log.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(addr) = line.strip_prefix("listening on ") {
                base = Some(addr.to_string());
                break;
            }
        }
        let base = base.unwrap_or_else(|| panic!("serve did not start: {}", log.lock().unwrap()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        Server { child, base, log }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// (status, headers we look at, body)
struct Reply {
    status: u16,
    retry_after: Option<String>,
    header_length: Option<usize>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

fn reply(mut response: ureq::http::Response<ureq::Body>) -> Reply {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let retry_after = header("retry-after");
    let header_length = header("inference-header-content-length").map(|v| v.parse().unwrap());
    Reply {
        status: response.status().as_u16(),
        retry_after,
        header_length,
        body: response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap(),
    }
}

fn get(url: &str) -> Reply {
    reply(agent().get(url).call().unwrap())
}

fn post(url: &str, content_type: &str, body: &[u8], headers: &[(&str, String)]) -> Reply {
    let mut request = agent().post(url).header("content-type", content_type);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    reply(request.send(body).unwrap())
}

fn infer_json(url: &str, shape: [usize; 4], data: &[f32]) -> Reply {
    let body = json!({"id": "t", "inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
        "data": data}]});
    post(url, "application/json", body.to_string().as_bytes(), &[])
}

fn infer_binary(url: &str, shape: [usize; 4], data: &[f32]) -> Reply {
    let header = json!({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
        "parameters": {"binary_data_size": data.len() * 4}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]})
    .to_string();
    let mut body = header.clone().into_bytes();
    for v in data {
        body.extend_from_slice(&v.to_le_bytes());
    }
    post(
        url,
        "application/octet-stream",
        &body,
        &[("inference-header-content-length", header.len().to_string())],
    )
}

fn logits_of(reply: &Reply) -> Vec<f32> {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    match reply.header_length {
        Some(len) => reply.body[len..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        None => reply.json()["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect(),
    }
}

/// `input` (N, 3, H, W) as tensor `input` of `dir/batch.safetensors`.
fn write_batch(dir: &Path, shape: [usize; 4], input: &[f32]) -> PathBuf {
    let path = dir.join("batch.safetensors");
    let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
            .unwrap();
    safetensors::serialize_to_file([("input", view)], None, &path).unwrap();
    path
}

/// `repvgg forward`'s logits for `input` (N, 3, H, W).
fn forward_logits(weights: &Path, dir: &Path, shape: [usize; 4], input: &[f32]) -> Vec<f32> {
    let path = write_batch(dir, shape, input);
    let out = dir.join("logits.safetensors");
    repvgg_ok(&[
        "forward",
        "--weights",
        weights.to_str().unwrap(),
        "--input",
        path.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let (_, logits) = &repvgg_testing::read_f64(&out)["logits"];
    logits.iter().map(|&v| v as f32).collect()
}

/// Deterministic inputs that differ per `seed`.
fn pattern(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
        .collect()
}

fn relative(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    repvgg_testing::relative_error(
        &repvgg_testing::widen(ours),
        &repvgg_testing::widen(reference),
    )
}

/// The V2 routes, JSON and binary infer against `repvgg forward` (the same engine: the
/// tolerance, 1e-6 relative, only allows for a different split of the batch across threads),
/// and the model's metadata.
#[test]
fn v2_routes_and_infer_match_forward() {
    let weights = fixture("tiny/train_official.safetensors");
    let server = Server::start(&weights, &["--name", "tiny"]);
    assert_eq!(get(&server.url("/v2/health/live")).json()["live"], true);
    assert_eq!(get(&server.url("/v2/health/ready")).json()["ready"], true);
    assert_eq!(
        get(&server.url("/v2/models/tiny/ready")).json()["ready"],
        true
    );
    let meta = get(&server.url("/v2/models/tiny")).json();
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 3, -1, -1]));
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, 10]));
    assert_eq!(get(&server.url("/v2/models/tiny/versions/1")).json(), meta);
    assert_eq!(get(&server.url("/v2/models/other")).status, 404);
    assert_eq!(get(&server.url("/v2/models/tiny/versions/2")).status, 404);
    assert!(
        get(&server.url("/v2")).json()["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );

    let dir = tempfile::tempdir().unwrap();
    for shape in [[1, 3, 32, 32], [3, 3, 40, 24]] {
        let input = pattern(shape.iter().product(), shape[0]);
        let reference = forward_logits(&weights, dir.path(), shape, &input);
        let json = infer_json(&server.url("/v2/models/tiny/infer"), shape, &input);
        assert_eq!(json.json()["outputs"][0]["shape"], json!([shape[0], 10]));
        assert_eq!(json.json()["id"], "t");
        let binary = infer_binary(
            &server.url("/v2/models/tiny/versions/1/infer"),
            shape,
            &input,
        );
        assert!(binary.header_length.is_some());
        for (form, reply) in [("json", &json), ("binary", &binary)] {
            let err = relative(&logits_of(reply), &reference);
            assert!(err < 1e-6, "{form} {shape:?}: {err:e}");
        }
    }
    let metrics = String::from_utf8(get(&server.url("/metrics")).body).unwrap();
    for line in [
        "repvgg_http_requests_total{route=\"/v2/models/{name}/infer\",status=\"200\"} 2",
        "repvgg_http_requests_total{route=\"/v2/models/{name}/versions/{version}/infer\",status=\"200\"} 2",
        "repvgg_batch_size_count 4",
        "repvgg_queue_depth 0",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    assert!(metrics.contains("repvgg_http_request_duration_seconds_bucket"));
}

/// NVIDIA's Triton HTTP client, unchanged (`reference/triton_client.py`), gets from the server
/// what `repvgg forward` computes, with binary tensors, with JSON ones and with no output named
/// (1e-6 relative, as above), reads the readiness routes and metadata, and is told why an FP16
/// tensor and a request for class labels are refused.
#[test]
fn triton_client_works_unchanged() {
    let Some(python) = repvgg_testing::python_with(&["tritonclient.http", "numpy", "safetensors"])
    else {
        return;
    };
    let weights = fixture("tiny/train_official.safetensors");
    let server = Server::start(&weights, &["--name", "tiny"]);
    let dir = tempfile::tempdir().unwrap();
    let shape = [2, 3, 32, 32];
    let input = pattern(shape.iter().product(), 7);
    let reference = forward_logits(&weights, dir.path(), shape, &input);
    let batch = write_batch(dir.path(), shape, &input);
    let answers = dir.path().join("triton.safetensors");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../reference/triton_client.py");
    let out = Command::new(python)
        .arg(script)
        .args([&server.base, "tiny"])
        .arg(&batch)
        .arg(&answers)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "triton_client.py: {}\nserver: {}",
        String::from_utf8_lossy(&out.stderr),
        server.log.lock().unwrap()
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["live"], true);
    assert_eq!(report["ready"], true);
    assert_eq!(report["model_ready"], true);
    assert_eq!(report["metadata"]["name"], "tiny");
    assert_eq!(report["metadata"]["outputs"][0]["shape"], json!([-1, 10]));
    assert_eq!(report["fp16"]["status"], "400");
    let message = report["fp16"]["message"].as_str().unwrap();
    assert!(
        message.contains("FP16") && message.contains("FP32"),
        "{message}"
    );
    assert_eq!(report["class_count"]["status"], "400");
    let message = report["class_count"]["message"].as_str().unwrap();
    assert!(message.contains("classification"), "{message}");
    let logits = repvgg_testing::read_f64(&answers);
    for form in ["logits_binary", "logits_json", "logits_default"] {
        let (got_shape, got) = &logits[form];
        assert_eq!(got_shape, &vec![2, 10], "{form}");
        let err = repvgg_testing::relative_error(got, &repvgg_testing::widen(&reference));
        assert!(err < 1e-6, "{form}: {err:e}");
    }
}

/// The requests KServe's own Python client writes (recorded by
/// `reference/make_serve_fixtures.py`; they name the model in the body), JSON and binary, get
/// what `repvgg forward` computes (1e-6 relative, as above); a body that names another model
/// than its route gets 400 naming both.
#[test]
fn kserve_client_requests_are_answered() {
    let weights = fixture("tiny/train_official.safetensors");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(fixture("serve/kserve_infer.meta.json")).unwrap())
            .unwrap();
    let json_body = std::fs::read(fixture("serve/kserve_infer.json")).unwrap();
    let binary_body = std::fs::read(fixture("serve/kserve_infer.bin")).unwrap();
    let header_length = meta["binary_header_length"].as_u64().unwrap() as usize;
    let shape: [usize; 4] = serde_json::from_value(meta["shape"].clone()).unwrap();
    let sent: Value = serde_json::from_slice(&json_body).unwrap();
    assert_eq!(sent["model_name"], "tiny");
    let input: Vec<f32> = sent["inputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let binary_values: Vec<f32> = binary_body[header_length..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(
        binary_values, input,
        "the two recorded forms carry one tensor"
    );

    let dir = tempfile::tempdir().unwrap();
    let reference = forward_logits(&weights, dir.path(), shape, &input);
    let server = Server::start(&weights, &["--name", "tiny"]);
    let url = server.url("/v2/models/tiny/infer");
    let as_json = post(&url, "application/json", &json_body, &[]);
    let as_binary = post(
        &url,
        "application/octet-stream",
        &binary_body,
        &[("inference-header-content-length", header_length.to_string())],
    );
    for (form, reply) in [("json", &as_json), ("binary", &as_binary)] {
        let err = relative(&logits_of(reply), &reference);
        assert!(err < 1e-6, "{form}: {err:e}");
    }
    assert_eq!(as_json.json()["id"], sent["id"]);

    let other = Server::start(&weights, &["--name", "other"]);
    let refused = post(
        &other.url("/v2/models/other/infer"),
        "application/json",
        &json_body,
        &[],
    );
    assert_eq!(refused.status, 400);
    let message = refused.json()["error"].as_str().unwrap().to_string();
    assert!(
        message.contains("'tiny'") && message.contains("'other'"),
        "{message}"
    );
    let mut versioned = sent.clone();
    versioned["model_version"] = json!("2");
    let refused = post(
        &url,
        "application/json",
        versioned.to_string().as_bytes(),
        &[],
    );
    assert_eq!(refused.status, 400);
    let message = refused.json()["error"].as_str().unwrap().to_string();
    assert!(message.contains("version '2'"), "{message}");
    versioned["model_version"] = json!("1");
    let err = relative(
        &logits_of(&post(
            &url,
            "application/json",
            versioned.to_string().as_bytes(),
            &[],
        )),
        &reference,
    );
    assert!(err < 1e-6, "version 1: {err:e}");
}

fn multipart(files: &[(&str, Vec<u8>)]) -> (String, Vec<u8>) {
    let boundary = "repvgg-test-boundary-7d1f";
    let mut body = Vec::new();
    for (name, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; \
                 filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// /v1/classify answers as `predict --json` does, for one image in the body and for several
/// as multipart; the probabilities agree to 1e-9 relative (the same logits, softmax in f64).
#[test]
fn classify_agrees_with_predict() {
    let weights = fixture("photos/tiny1000_train_official.safetensors");
    let photos = ["chelsea.png", "rocket.jpg"];
    let paths: Vec<PathBuf> = photos
        .iter()
        .map(|p| fixture(&format!("photos/{p}")))
        .collect();
    let mut args = vec!["predict", "--weights", weights.to_str().unwrap(), "--json"];
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    let predicted: Vec<Value> = repvgg_ok(&args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let server = Server::start(&weights, &[]);
    let same = |ours: &Value, theirs: &Value| {
        let (ours, theirs) = (ours.as_array().unwrap(), theirs.as_array().unwrap());
        assert_eq!(ours.len(), 5);
        for (o, t) in ours.iter().zip(theirs) {
            assert_eq!(o["index"], t["index"]);
            assert_eq!(o["label"], t["label"]);
            let (p, q) = (o["prob"].as_f64().unwrap(), t["prob"].as_f64().unwrap());
            assert!((p - q).abs() <= 1e-9 * q, "{p} vs {q}");
        }
    };
    let files: Vec<(&str, Vec<u8>)> = photos
        .iter()
        .zip(&paths)
        .map(|(name, path)| (*name, std::fs::read(path).unwrap()))
        .collect();
    let (content_type, body) = multipart(&files);
    let answer = post(&server.url("/v1/classify"), &content_type, &body, &[]).json();
    for (k, photo) in photos.iter().enumerate() {
        assert_eq!(answer[k]["file"], *photo);
        same(&answer[k]["top"], &predicted[k]["top"]);
    }
    let one = post(
        &server.url("/v1/classify?top=3"),
        "image/jpeg",
        &files[1].1,
        &[],
    )
    .json();
    assert_eq!(one["top"].as_array().unwrap().len(), 3);
    let mut three = predicted[1]["top"].clone();
    three.as_array_mut().unwrap().truncate(3);
    let one_top = one["top"].as_array().unwrap();
    for (o, t) in one_top.iter().zip(three.as_array().unwrap()) {
        assert_eq!((&o["index"], &o["label"]), (&t["index"], &t["label"]));
    }
}

/// Every malformed request gets its status and a message naming the problem.
#[test]
fn bad_requests_get_400_404_413() {
    let weights = fixture("photos/tiny1000_train_official.safetensors");
    let server = Server::start(&weights, &["--max-body-mb", "1", "--max-batch", "2"]);
    let infer = server.url("/v2/models/repvgg/infer");
    let cases: Vec<(Reply, u16, &str)> = vec![
        (
            post(&infer, "application/json", b"{\"inputs\": [", &[]),
            400,
            "malformed",
        ),
        (
            infer_json(&infer, [1, 3, 2, 2], &[0.0; 11]),
            400,
            "11 values",
        ),
        (
            infer_json(&infer, [1, 1, 2, 2], &[0.0; 4]),
            400,
            "1 channels",
        ),
        (
            infer_json(&infer, [3, 3, 1, 1], &[0.0; 9]),
            400,
            "at most 2",
        ),
        (
            post(
                &infer,
                "application/json",
                json!({"inputs": [{"name": "input", "shape": [1, 3, 1, 1], "datatype": "FP64",
                    "data": [1, 2, 3]}]})
                .to_string()
                .as_bytes(),
                &[],
            ),
            400,
            "FP64",
        ),
        (
            post(
                &infer,
                "application/octet-stream",
                b"{}",
                &[("inference-header-content-length", "99".into())],
            ),
            400,
            "only 2 bytes",
        ),
        (
            infer_json(
                &server.url("/v2/models/nope/infer"),
                [1, 3, 1, 1],
                &[0.0; 3],
            ),
            404,
            "unknown model 'nope'",
        ),
        (
            post(
                &server.url("/v1/classify"),
                "image/jpeg",
                b"not an image",
                &[],
            ),
            400,
            "not a JPEG or PNG",
        ),
        (
            post(
                &server.url("/v1/classify"),
                "image/jpeg",
                &std::fs::read(fixture("photos/broken.jpg")).unwrap(),
                &[],
            ),
            400,
            "truncated JPEG",
        ),
        // A 1 x 5,000 strip: a few hundred bytes, but a resize to a 256-pixel short side
        // would need a 3.8 GB buffer.
        (
            post(&server.url("/v1/classify"), "image/png", &strip_png(), &[]),
            400,
            "longer than wide",
        ),
        (get(&server.url("/v3/nothing")), 404, "no route"),
    ];
    for (k, (reply, status, text)) in cases.iter().enumerate() {
        let body = String::from_utf8_lossy(&reply.body);
        assert_eq!(reply.status, *status, "case {k}: {body}");
        assert!(body.contains(text), "case {k}: {body}");
    }
    // Bodies over --max-body-mb: refused from the Content-Length alone, before they are read
    // (a client still sending would see the connection close, so the test sends headers only).
    for path in ["/v1/classify", "/v2/models/repvgg/infer"] {
        let answer = headers_only(&server.base, path, 2 << 20);
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.contains("length limit"), "{path}: {answer}");
    }
    // The server is still there, and still right.
    assert_eq!(get(&server.url("/v2/health/ready")).status, 200);
}

fn strip_png() -> Vec<u8> {
    let mut png = Vec::new();
    image::GrayImage::new(1, 5_000)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// A POST that announces `length` bytes and sends none; the answer as text.
fn headers_only(base: &str, path: &str, length: usize) -> String {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {length}\r\n\r\n"
    )
    .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// Sends `count` slow requests at once; returns their statuses (and Retry-After values).
fn burst(url: &str, count: usize, side: usize) -> Vec<(u16, Option<String>)> {
    let threads: Vec<_> = (0..count)
        .map(|k| {
            let url = url.to_string();
            std::thread::spawn(move || {
                let reply = infer_binary(&url, [1, 3, side, side], &pattern(3 * side * side, k));
                (reply.status, reply.retry_after)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// A full queue answers 503 with Retry-After at once instead of queueing without bound; a
/// request past its deadline gets 504; nothing else goes wrong.
#[test]
fn overload_gets_503_and_deadline_504() {
    let weights = fixture("photos/tiny1000_train_official.safetensors");
    // A0 at 448, one image at a time: sixteen at once cannot all fit in one running and one
    // waiting.
    let server = Server::start_with(&["--random", "A0", "--queue", "1", "--max-batch", "1"]);
    let infer = server.url("/v2/models/repvgg/infer");
    let statuses = burst(&infer, 16, 448);
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<_> = statuses.iter().filter(|(s, _)| *s == 503).collect();
    assert_eq!(ok + refused.len(), 16, "{statuses:?}");
    assert!(ok >= 2 && !refused.is_empty(), "{statuses:?}");
    assert!(refused.iter().all(|(_, r)| r.as_deref() == Some("1")));
    drop(server);

    let server = Server::start(&weights, &["--timeout-ms", "1", "--max-side", "1024"]);
    let reply = infer_binary(
        &server.url("/v2/models/repvgg/infer"),
        [1, 3, 1024, 1024],
        &pattern(3 << 20, 1),
    );
    assert_eq!(
        reply.status,
        504,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert!(String::from_utf8_lossy(&reply.body).contains("deadline"));
}

/// SIGTERM while requests wait: every accepted request is answered, then the process exits 0.
/// Sixteen A0 requests one at a time (--max-batch 1) keep the engine busy after the signal.
#[cfg(unix)]
#[test]
fn sigterm_drains_accepted_requests() {
    let mut server = Server::start_with(&["--random", "A0", "--max-batch", "1"]);
    let infer = server.url("/v2/models/repvgg/infer");
    // Each client's outcome: the status, or the connection error of a request the server
    // never accepted (one that had not connected when the listener closed).
    let clients = std::thread::spawn(move || {
        let threads: Vec<_> = (0..16)
            .map(|k| {
                let url = infer.clone();
                std::thread::spawn(move || {
                    let data = pattern(3 * 224 * 224, k);
                    let header = json!({"inputs": [{"name": "input", "shape": [1, 3, 224, 224],
                        "datatype": "FP32", "parameters": {"binary_data_size": data.len() * 4}}]})
                    .to_string();
                    let mut body = header.clone().into_bytes();
                    body.extend(data.iter().flat_map(|v| v.to_le_bytes()));
                    agent()
                        .post(&url)
                        .header("inference-header-content-length", header.len().to_string())
                        .send(&body[..])
                        .map(|r| r.status().as_u16())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    });
    // Wait until the server holds at least twelve of them (the /metrics request is one more).
    let metrics = server.url("/metrics");
    let started = Instant::now();
    loop {
        let text = String::from_utf8(get(&metrics).body).unwrap();
        let in_flight: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("repvgg_http_requests_in_flight "))
            .unwrap()
            .parse()
            .unwrap();
        if in_flight >= 13.0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{text}");
        std::thread::sleep(Duration::from_millis(2));
    }
    let pid = server.child.id() as i32;
    // SAFETY: kill(2) on the child's pid, which this test owns and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let outcomes = clients.join().unwrap();
    let answered = outcomes.iter().filter(|o| **o == Ok(200)).count();
    // The twelve or more the server held were all answered; any other was refused at connect
    // or closed before its request was read (the client's write then fails: a broken pipe),
    // never half-served.
    assert!(answered >= 12, "{outcomes:?}");
    for outcome in &outcomes {
        match outcome {
            Ok(200) => {}
            Err(e) if e.contains("refused") || e.contains("reset") || e.contains("Broken pipe") => {
            }
            other => panic!("a request was lost or failed: {other:?} in {outcomes:?}"),
        }
    }
    let status = server.child.wait().unwrap();
    assert!(
        status.success(),
        "{status:?}: {}",
        server.log.lock().unwrap()
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(server.log.lock().unwrap().contains("stopped"));
}

/// 64 clients at once, each with its own input: each gets its own logits (checked against
/// `repvgg forward` on all 64 as one batch, 1e-5 relative: the server batches them
/// differently, so threads split the work differently), while batches of several form.
#[test]
fn sixty_four_clients_get_their_own_answers() {
    let weights = fixture("tiny/train_official.safetensors");
    let server = Server::start(&weights, &["--max-batch", "8", "--max-wait-ms", "20"]);
    let shape = [1, 3, 24, 24];
    let image = 3 * 24 * 24;
    let inputs: Vec<Vec<f32>> = (0..64).map(|k| pattern(image, k)).collect();
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<f32> = inputs.concat();
    let reference = forward_logits(&weights, dir.path(), [64, 3, 24, 24], &all);
    let barrier = Arc::new(std::sync::Barrier::new(64));
    let threads: Vec<_> = inputs
        .into_iter()
        .enumerate()
        .map(|(k, input)| {
            let url = server.url("/v2/models/repvgg/infer");
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let reply = if k % 2 == 0 {
                    infer_json(&url, shape, &input)
                } else {
                    infer_binary(&url, shape, &input)
                };
                logits_of(&reply)
            })
        })
        .collect();
    for (k, thread) in threads.into_iter().enumerate() {
        let logits = thread.join().unwrap();
        let err = relative(&logits, &reference[k * 10..(k + 1) * 10]);
        assert!(err < 1e-5, "client {k}: {err:e}");
    }
    let metrics = String::from_utf8(get(&server.url("/metrics")).body).unwrap();
    let batches: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("repvgg_batch_size_count "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        batches < 64.0,
        "no request was batched with another:\n{metrics}"
    );
}

/// On a model that takes one channel, an RGB image sent to /v1/classify is refused (it once
/// failed every request batched with it); the tensors route still answers.
#[test]
fn classify_refuses_models_that_do_not_take_rgb() {
    let server = Server::start_with(&[
        "--random",
        "depths=1,1,1,1;widths=8,8,8,8;stem=8;in=1;classes=4",
    ]);
    let photo = std::fs::read(fixture("photos/rocket.jpg")).unwrap();
    let reply = post(&server.url("/v1/classify"), "image/jpeg", &photo, &[]);
    let message = String::from_utf8_lossy(&reply.body);
    assert_eq!(reply.status, 400, "{message}");
    assert!(message.contains("takes 1 input channels"), "{message}");
    let reply = infer_json(
        &server.url("/v2/models/repvgg/infer"),
        [1, 1, 16, 16],
        &[0.5; 256],
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
}

/// `bench-serve` against a live server: the requests it counts and the statuses they got; a
/// level where no request succeeded reports no latency (null, "-"), not NaN or zero.
#[test]
fn bench_serve_counts_statuses_and_reports_latency_only_for_successes() {
    let spec = "depths=1,1,1,1;widths=8,8,8,8;stem=8;classes=4";
    let run = |server: &Server, json: bool| {
        let mut args = vec![
            "bench-serve",
            "--url",
            &server.base,
            "--size",
            "32",
            "--concurrency",
            "2",
            "--requests",
            "6",
        ];
        if json {
            args.push("--json");
        }
        repvgg_ok(&args)
    };
    let served = Server::start_with(&["--random", spec]);
    let row: Value = serde_json::from_str(run(&served, true).trim()).unwrap();
    assert_eq!(row["requests"], 6, "{row}");
    assert_eq!(row["statuses"]["200"], 6, "{row}");
    assert!(row["p50_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{row}");
    assert!(row["p99_ms"].as_f64() >= row["p50_ms"].as_f64(), "{row}");

    // Another model's name: every request gets 404.
    let elsewhere = Server::start_with(&["--random", spec, "--name", "other"]);
    let row: Value = serde_json::from_str(run(&elsewhere, true).trim()).unwrap();
    assert_eq!(row["statuses"]["404"], 6, "{row}");
    assert!(row["p50_ms"].is_null() && row["p99_ms"].is_null(), "{row}");
    assert_eq!(row["ok_per_s"], 0.0, "{row}");
    let text = run(&elsewhere, false);
    assert!(text.contains("p50 - ms, p99 - ms"), "{text}");

    // Nothing listening: an error naming the URL, not a run of unanswered requests.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = Command::new(env!("CARGO_BIN_EXE_repvgg"))
        .args([
            "bench-serve",
            "--url",
            &url,
            "--concurrency",
            "1",
            "--requests",
            "2",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("{url}/v2/models/repvgg/infer: no HTTP answer")),
        "{err}"
    );
}
