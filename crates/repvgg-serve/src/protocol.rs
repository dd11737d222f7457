//! The Open Inference Protocol (KServe V2) as this server speaks it: the infer request in its
//! JSON form and in the binary tensor extension, and the response in both. Pure functions on
//! bytes, so that they are tested (and fuzzed) without a network.
//!
//! The model has one input, `input` FP32 `[N, C, H, W]`, and one output, `logits` FP32
//! `[N, classes]`. A binary request is `Inference-Header-Content-Length` bytes of JSON, then
//! the raw little-endian tensor data of every input whose `parameters.binary_data_size` is
//! set, in the order the inputs are listed.

use serde::Deserialize;
use serde_json::{Map, Value, json};

pub const INPUT_NAME: &str = "input";
pub const OUTPUT_NAME: &str = "logits";

/// Why a request cannot be served as sent: answered with 400 and this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RequestError(pub String);

fn bad(message: impl Into<String>) -> RequestError {
    RequestError(message.into())
}

/// A batch the model can take, checked against its input: `data` holds `n * c * h * w`
/// finite values.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub id: Option<String>,
    /// The model and version the body names, if it does (KServe's REST client names the
    /// model; its gRPC-shaped bodies and hand-written ones may name the version).
    pub model_name: Option<String>,
    pub model_version: Option<String>,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
    /// Whether the client asked for `logits` as binary data.
    pub binary_output: bool,
}

/// What a request must fit.
#[derive(Debug, Clone, Copy)]
pub struct InputContract {
    pub channels: usize,
    /// A size the model's metadata (or the server's flags) fixes; `None`: any size.
    pub size: Option<[usize; 2]>,
    /// The largest side accepted when the size is free (the engine's memory grows with it).
    pub max_side: usize,
    /// The most images one request may carry.
    pub max_batch: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    id: Option<String>,
    /// Not in the protocol's request, but KServe's Python client names the model in it.
    model_name: Option<String>,
    model_version: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<RawInput>,
    #[serde(default)]
    outputs: Vec<RawOutput>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<FlatNumbers>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// Tensor data as the protocol allows it: a flat array or arrays nested row-major, read
/// straight into `f32` without building a tree of JSON values first.
struct FlatNumbers(Vec<f32>);

impl<'de> Deserialize<'de> for FlatNumbers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(&'a mut Vec<f32>);
        impl<'de> serde::de::Visitor<'de> for Visitor<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("numbers, or arrays of them")
            }
            fn visit_f64<E>(self, v: f64) -> Result<(), E> {
                self.0.push(v as f32);
                Ok(())
            }
            fn visit_i64<E>(self, v: i64) -> Result<(), E> {
                self.0.push(v as f32);
                Ok(())
            }
            fn visit_u64<E>(self, v: u64) -> Result<(), E> {
                self.0.push(v as f32);
                Ok(())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                while seq.next_element_seed(Seed(self.0))?.is_some() {}
                Ok(())
            }
        }
        struct Seed<'a>(&'a mut Vec<f32>);
        impl<'de> serde::de::DeserializeSeed<'de> for Seed<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_any(Visitor(self.0))
            }
        }
        let mut values = Vec::new();
        d.deserialize_any(Visitor(&mut values))?;
        Ok(FlatNumbers(values))
    }
}

fn flag(parameters: &Map<String, Value>, key: &str) -> Result<bool, RequestError> {
    match parameters.get(key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(bad(format!(
            "parameters.{key} must be true or false, not {other}"
        ))),
    }
}

/// Parses an infer request body. `header_length` is the `Inference-Header-Content-Length`
/// header's value when the client sent one (the binary extension); without it the whole body
/// is JSON.
pub fn parse_infer(
    body: &[u8],
    header_length: Option<usize>,
    contract: &InputContract,
) -> Result<InferRequest, RequestError> {
    let (json_part, mut binary) = match header_length {
        Some(len) if len > body.len() => {
            return Err(bad(format!(
                "Inference-Header-Content-Length is {len} but the body has only {} bytes",
                body.len()
            )));
        }
        Some(len) => body.split_at(len),
        None => (body, &[][..]),
    };
    let raw: RawRequest = serde_json::from_slice(json_part)
        .map_err(|e| bad(format!("malformed infer request JSON: {e}")))?;
    let input = match &raw.inputs[..] {
        [one] => one,
        [] => {
            return Err(bad(format!(
                "no inputs; the model takes one, '{INPUT_NAME}'"
            )));
        }
        many => {
            return Err(bad(format!(
                "{} inputs; the model takes one, '{INPUT_NAME}'",
                many.len()
            )));
        }
    };
    if input.name != INPUT_NAME {
        return Err(bad(format!(
            "unknown input '{}'; the model's input is '{INPUT_NAME}'",
            input.name
        )));
    }
    if input.datatype != "FP32" {
        return Err(bad(format!(
            "input '{INPUT_NAME}' has datatype {}; the model takes FP32",
            input.datatype
        )));
    }
    let [n, c, h, w] = check_shape(&input.shape, contract)?;
    let count = n * c * h * w;
    if let Some(key) = shared_memory_key(&input.parameters) {
        return Err(bad(format!(
            "input '{INPUT_NAME}' asks for shared memory ({key}); this server takes tensors \
             in the request body only (JSON or binary data)"
        )));
    }
    let binary_size = match input.parameters.get("binary_data_size") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            bad(format!(
                "parameters.binary_data_size must be a byte count, not {v}"
            ))
        })? as usize),
    };
    let data = match (binary_size, &input.data) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "input 'input' has both JSON data and binary_data_size; send one",
            ));
        }
        (None, None) => return Err(bad("input 'input' has no data")),
        (None, Some(FlatNumbers(values))) => {
            if values.len() != count {
                return Err(bad(format!(
                    "input 'input' has {} values for shape {:?} ({count})",
                    values.len(),
                    input.shape
                )));
            }
            values.clone()
        }
        (Some(size), None) => {
            if header_length.is_none() {
                return Err(bad(
                    "binary_data_size without an Inference-Header-Content-Length header",
                ));
            }
            if size != count * 4 {
                return Err(bad(format!(
                    "binary_data_size {size} does not match shape {:?} of FP32 ({} bytes)",
                    input.shape,
                    count * 4
                )));
            }
            if binary.len() < size {
                return Err(bad(format!(
                    "binary data is {} bytes; binary_data_size says {size}",
                    binary.len()
                )));
            }
            let (mine, rest) = binary.split_at(size);
            binary = rest;
            little_endian_floats(mine)
        }
    };
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes after the tensors' binary data",
            binary.len()
        )));
    }
    if let Some(i) = first_non_finite(&data) {
        return Err(bad(format!(
            "input 'input' holds a NaN or infinite value (at flat index {i})"
        )));
    }
    let mut binary_output = flag(&raw.parameters, "binary_data_output")?;
    for output in &raw.outputs {
        if output.name != OUTPUT_NAME {
            return Err(bad(format!(
                "unknown output '{}'; the model's output is '{OUTPUT_NAME}'",
                output.name
            )));
        }
        // Answering logits where the client asked for class labels or a shared-memory
        // write would be a wrong answer its code cannot tell from a right one.
        if output.parameters.contains_key("classification") {
            return Err(bad(format!(
                "output '{OUTPUT_NAME}' asks for classification (class_count); this server \
                 answers logits only: take the top classes from them, or POST /v1/classify"
            )));
        }
        if let Some(key) = shared_memory_key(&output.parameters) {
            return Err(bad(format!(
                "output '{OUTPUT_NAME}' asks for shared memory ({key}); this server answers \
                 in the response body only (JSON or binary data)"
            )));
        }
        if output.parameters.contains_key("binary_data") {
            binary_output = flag(&output.parameters, "binary_data")?;
        }
    }
    Ok(InferRequest {
        id: raw.id,
        model_name: raw.model_name,
        model_version: raw.model_version,
        n,
        h,
        w,
        data,
        binary_output,
    })
}

/// The first parameter of the shared-memory extension (Triton's `shared_memory_region`,
/// `_byte_size`, `_offset`), which this server does not implement.
fn shared_memory_key(parameters: &Map<String, Value>) -> Option<&str> {
    parameters
        .keys()
        .map(String::as_str)
        .find(|key| key.starts_with("shared_memory_"))
}

/// The binary extension's FP32 data, which is little-endian: one copy on the machines we run
/// on, where converting value by value took several times as long for a 224x224 image.
fn little_endian_floats(bytes: &[u8]) -> Vec<f32> {
    let mut values = vec![0f32; bytes.len() / 4];
    bytemuck::cast_slice_mut::<f32, u8>(&mut values).copy_from_slice(bytes);
    if cfg!(target_endian = "big") {
        for v in &mut values {
            *v = f32::from_bits(u32::from_le(v.to_bits()));
        }
    }
    values
}

/// Where the first NaN or infinity is. Blocks are checked without an early exit, which the
/// compiler vectorises; only a failing block is searched value by value.
fn first_non_finite(values: &[f32]) -> Option<usize> {
    const BLOCK: usize = 256;
    values.chunks(BLOCK).enumerate().find_map(|(b, block)| {
        if block.iter().fold(true, |ok, v| ok & v.is_finite()) {
            None
        } else {
            block
                .iter()
                .position(|v| !v.is_finite())
                .map(|i| b * BLOCK + i)
        }
    })
}

fn check_shape(shape: &[i64], contract: &InputContract) -> Result<[usize; 4], RequestError> {
    let &[n, c, h, w] = shape else {
        return Err(bad(format!(
            "input 'input' has shape {shape:?}; expected 4 dimensions [N, {}, H, W]",
            contract.channels
        )));
    };
    if [n, c, h, w].iter().any(|&d| d < 1) {
        return Err(bad(format!(
            "input 'input' has shape {shape:?}; every dimension must be at least 1"
        )));
    }
    let [n, c, h, w] = [n, c, h, w].map(|d| usize::try_from(d).unwrap_or(usize::MAX));
    if c != contract.channels {
        return Err(bad(format!(
            "input 'input' has {c} channels; the model takes {}",
            contract.channels
        )));
    }
    if n > contract.max_batch {
        return Err(bad(format!(
            "input 'input' carries {n} images; this server takes at most {} per request \
             (--max-batch)",
            contract.max_batch
        )));
    }
    match contract.size {
        Some([fh, fw]) if [h, w] != [fh, fw] => {
            return Err(bad(format!(
                "input 'input' is {h}x{w}; this model takes {fh}x{fw}"
            )));
        }
        None if h.max(w) > contract.max_side => {
            return Err(bad(format!(
                "input 'input' is {h}x{w}; this server takes sides up to {}",
                contract.max_side
            )));
        }
        _ => {}
    }
    Ok([n, c, h, w])
}

/// The response body, and the `Inference-Header-Content-Length` for a binary one.
pub fn encode_infer_response(
    model: &str,
    id: Option<&str>,
    logits: &[f32],
    n: usize,
    binary: bool,
) -> (Vec<u8>, Option<usize>) {
    let classes = logits.len() / n.max(1);
    let mut output = json!({
        "name": OUTPUT_NAME,
        "datatype": "FP32",
        "shape": [n, classes],
    });
    if binary {
        output["parameters"] = json!({"binary_data_size": logits.len() * 4});
    } else {
        output["data"] = json!(logits);
    }
    let mut response = json!({
        "model_name": model,
        "model_version": MODEL_VERSION,
        "outputs": [output],
    });
    if let Some(id) = id {
        response["id"] = json!(id);
    }
    let mut body = serde_json::to_vec(&response).expect("JSON of plain values");
    if !binary {
        return (body, None);
    }
    let header = body.len();
    body.reserve(logits.len() * 4);
    for v in logits {
        body.extend_from_slice(&v.to_le_bytes());
    }
    (body, Some(header))
}

/// The one version of the model a server holds.
pub const MODEL_VERSION: &str = "1";

/// `GET /v2/models/NAME`: the model's inputs and outputs; `-1` where any size is taken.
pub fn model_metadata(
    name: &str,
    channels: usize,
    size: Option<[usize; 2]>,
    classes: usize,
) -> Value {
    let [h, w] = size.map_or([-1, -1], |s| s.map(|d| d as i64));
    json!({
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": "repvgg-rs",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, channels as i64, h, w]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, classes as i64]}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FREE: InputContract = InputContract {
        channels: 3,
        size: None,
        max_side: 64,
        max_batch: 4,
    };

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.5 - 3.0).collect()
    }

    #[test]
    fn json_nested_and_flat_data_read_the_same() {
        let flat = json!({"inputs": [{"name": "input", "shape": [1, 3, 1, 2], "datatype": "FP32",
            "data": values(6)}]});
        let nested = json!({"inputs": [{"name": "input", "shape": [1, 3, 1, 2], "datatype": "FP32",
            "data": [[[[-3.0, -2.5]], [[-2.0, -1.5]], [[-1, -0.5]]]]}]});
        let a = parse_infer(flat.to_string().as_bytes(), None, &FREE).unwrap();
        let b = parse_infer(nested.to_string().as_bytes(), None, &FREE).unwrap();
        assert_eq!(a.data, values(6));
        assert_eq!(a, b);
        assert_eq!((a.n, a.h, a.w, a.binary_output), (1, 1, 2, false));
    }

    /// KServe's client names the model in the body; the server checks it against the route.
    /// Any other field outside the protocol is still refused, so that a misspelt `outputs`
    /// does not pass unseen.
    #[test]
    fn a_body_may_name_its_model_but_nothing_else_unknown() {
        let named = json!({"model_name": "m", "model_version": "1", "inputs": [{"name": "input",
            "shape": [1, 3, 1, 1], "datatype": "FP32", "data": [1, 2, 3]}]});
        let request = parse_infer(named.to_string().as_bytes(), None, &FREE).unwrap();
        assert_eq!(request.model_name.as_deref(), Some("m"));
        assert_eq!(request.model_version.as_deref(), Some("1"));
        let misspelt = json!({"inputs": [{"name": "input", "shape": [1, 3, 1, 1],
            "datatype": "FP32", "data": [1, 2, 3]}], "output": [{"name": "logits"}]});
        assert!(error_of(misspelt).contains("unknown field `output`"));
    }

    /// Triton's client asks for class labels with `class_count` and for shared memory with
    /// `set_shared_memory`; neither may be answered with plain logits.
    #[test]
    fn extensions_this_server_lacks_are_refused_by_name() {
        let with = |input_parameters: Value, output_parameters: Value| {
            error_of(json!({"inputs": [{"name": "input", "shape": [1, 3, 1, 1],
                "datatype": "FP32", "data": [1, 2, 3], "parameters": input_parameters}],
                "outputs": [{"name": "logits", "parameters": output_parameters}]}))
        };
        let message = with(json!({}), json!({"classification": 3}));
        assert!(message.contains("classification"), "{message}");
        let message = with(json!({}), json!({"shared_memory_region": "out"}));
        assert!(message.contains("shared_memory_region"), "{message}");
        let message = with(
            json!({"shared_memory_region": "in", "shared_memory_byte_size": 12}),
            json!({}),
        );
        assert!(message.contains("shared memory"), "{message}");
    }

    #[test]
    fn binary_round_trip() {
        let header = json!({"id": "r1", "inputs": [{"name": "input", "shape": [2, 3, 2, 2],
            "datatype": "FP32", "parameters": {"binary_data_size": 96}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]})
        .to_string();
        let mut body = header.clone().into_bytes();
        for v in values(24) {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let request = parse_infer(&body, Some(header.len()), &FREE).unwrap();
        assert_eq!(request.data, values(24));
        assert!(request.binary_output);
        assert_eq!(request.id.as_deref(), Some("r1"));

        let logits = values(10);
        let (body, len) = encode_infer_response("m", Some("r1"), &logits, 2, true);
        let len = len.unwrap();
        let head: Value = serde_json::from_slice(&body[..len]).unwrap();
        assert_eq!(head["outputs"][0]["shape"], json!([2, 5]));
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 40);
        let back: Vec<f32> = body[len..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(back, logits);
    }

    fn error_of(body: Value) -> String {
        parse_infer(body.to_string().as_bytes(), None, &FREE)
            .unwrap_err()
            .0
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let input = |shape: Value, dtype: &str, data: Value| json!({"inputs": [{"name": "input", "shape": shape, "datatype": dtype, "data": data}]});
        assert!(error_of(input(json!([1, 3, 1, 1]), "INT64", json!([1, 2, 3]))).contains("INT64"));
        assert!(
            error_of(input(json!([1, 3, 1, 2]), "FP32", json!([1, 2, 3]))).contains("3 values")
        );
        assert!(error_of(input(json!([1, 1, 1, 1]), "FP32", json!([1]))).contains("1 channels"));
        assert!(
            error_of(input(json!([3, 1, 1]), "FP32", json!([1, 2, 3]))).contains("4 dimensions")
        );
        assert!(
            error_of(input(json!([5, 3, 1, 1]), "FP32", json!(values(15)))).contains("at most 4")
        );
        assert!(
            error_of(input(json!([1, 3, 65, 1]), "FP32", json!(values(195)))).contains("up to 64")
        );
        assert!(error_of(input(json!([1, 3, 0, 1]), "FP32", json!([]))).contains("at least 1"));
        assert!(
            error_of(input(json!([1, 3, 1, 1]), "FP32", json!(["a", "b", "c"])))
                .contains("malformed")
        );
        assert!(error_of(json!({"inputs": []})).contains("no inputs"));
        assert!(
            error_of(
                json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]})
            )
            .contains("unknown input 'x'")
        );
        assert!(
            parse_infer(b"{not json", None, &FREE)
                .unwrap_err()
                .0
                .contains("malformed")
        );
        assert!(
            parse_infer(b"{}", Some(10), &FREE)
                .unwrap_err()
                .0
                .contains("only 2 bytes")
        );
        let fixed = InputContract {
            size: Some([2, 2]),
            ..FREE
        };
        let body = input(json!([1, 3, 1, 1]), "FP32", json!([1, 2, 3])).to_string();
        assert!(
            parse_infer(body.as_bytes(), None, &fixed)
                .unwrap_err()
                .0
                .contains("takes 2x2")
        );
        // A NaN cannot be written in JSON; binary data can carry one.
        let header = json!({"inputs": [{"name": "input", "shape": [1, 3, 1, 1], "datatype": "FP32",
            "parameters": {"binary_data_size": 12}}]})
        .to_string();
        let mut body = header.clone().into_bytes();
        for v in [1.0f32, f32::NAN, 0.0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        assert!(
            parse_infer(&body, Some(header.len()), &FREE)
                .unwrap_err()
                .0
                .contains("NaN")
        );
        body.push(0);
        assert!(
            parse_infer(&body, Some(header.len()), &FREE)
                .unwrap_err()
                .0
                .contains("1 bytes after")
        );
    }

    #[test]
    fn the_first_non_finite_value_is_found_in_any_block() {
        let mut values = vec![0.5f32; 1000];
        assert_eq!(first_non_finite(&values), None);
        assert_eq!(first_non_finite(&[]), None);
        for (at, bad) in [
            (0, f32::NAN),
            (255, f32::INFINITY),
            (256, f32::NAN),
            (999, -f32::INFINITY),
        ] {
            values[at] = bad;
            // A later bad value does not hide an earlier one.
            values[999.min(at + 300)] = f32::NAN;
            assert_eq!(first_non_finite(&values), Some(at), "at {at}");
            values.fill(0.5);
        }
    }
}
