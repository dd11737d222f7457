//! `repvgg serve`: a RepVGG model behind HTTP.
//!
//! - The Open Inference Protocol (KServe V2, as Triton, KServe and MLServer speak it), JSON
//!   and binary tensors, so their clients work unchanged.
//! - `POST /v1/classify`: JPEG or PNG bodies, preprocessed as the model's file records, answered
//!   with the top classes.
//! - Dynamic batching on an engine thread of its own ([`batcher`]), a bounded queue (503 with
//!   `Retry-After` when full), a body limit (413), a per-request deadline (504), Prometheus
//!   metrics, and a drain of accepted requests on SIGTERM or Ctrl-C.
//!
//! The server keeps no state between requests: N replicas behind a load balancer serve N
//! times the load.

pub mod batcher;
pub mod metrics;
pub mod protocol;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{
    DefaultBodyLimit, FromRequest, MatchedPath, Multipart, Path, Query, Request, State,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use repvgg_checkpoint::Preprocessing;
use repvgg_data::Pipeline;
use repvgg_engine::Runner;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use batcher::{BatchPolicy, Batcher, Job, JobError, SubmitError};
use metrics::{Metrics, Route, RouteStatus};
use protocol::{InputContract, MODEL_VERSION};

/// The model a server holds, with what it needs to answer for it.
pub struct ServedModel {
    /// The name in `/v2/models/NAME`.
    pub name: String,
    pub runner: Runner,
    /// How `/v1/classify` turns an image into the model's input.
    pub preprocessing: Preprocessing,
    /// One name per class.
    pub labels: Vec<String>,
    /// The size `infer` requests must have, when the model's metadata or the flags fix one.
    pub fixed_size: Option<[usize; 2]>,
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// Engine threads.
    pub threads: usize,
    pub batch: BatchPolicy,
    /// How long a request may take, queue included, before it is answered 504.
    pub timeout: Duration,
    /// The largest request body, in bytes (413 above it).
    pub max_body: usize,
    /// The largest image side an `infer` request may have when the model's size is free.
    pub max_side: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the model '{0}' has no classifier (a headless model): nothing to serve as logits")]
    Headless(String),
}

struct AppState {
    name: String,
    classes: usize,
    contract: InputContract,
    pipeline: Pipeline,
    image_size: [usize; 2],
    labels: Vec<String>,
    batcher: Batcher,
    metrics: Arc<Metrics>,
    timeout: Duration,
    draining: AtomicBool,
}

/// An error answer: the status and a message, as `{"error": "..."}` (the V2 error shape).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, axum::Json(json!({"error": self.message}))).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// An extractor's rejection (body too large, unreadable body, bad query) as our error shape.
fn rejected(rejection: impl IntoResponse + std::fmt::Display) -> ApiError {
    let message = rejection.to_string();
    let status = rejection.into_response().status();
    ApiError::new(status, message)
}

/// Binds `options.addr`, calls `on_listening` with the address bound (port 0 picks one), and
/// serves until SIGTERM or Ctrl-C; then answers every request already accepted and returns.
pub fn serve(
    model: ServedModel,
    options: ServeOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("repvgg-http")
        .build()?;
    runtime.block_on(serve_async(model, options, on_listening, shutdown_signal()))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

/// [`serve`] inside a runtime, stopping when `shutdown` completes.
pub async fn serve_async(
    model: ServedModel,
    options: ServeOptions,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let spec = model.runner.spec().clone();
    if spec.num_classes == 0 {
        return Err(ServeError::Headless(model.name));
    }
    let metrics = Arc::new(Metrics::new(options.batch.max_batch));
    let (batcher, engine_thread) = Batcher::start(
        model.runner,
        options.threads,
        options.batch,
        metrics.clone(),
    )?;
    let state = Arc::new(AppState {
        name: model.name,
        classes: spec.num_classes,
        contract: InputContract {
            channels: spec.in_channels,
            size: model.fixed_size,
            max_side: options.max_side,
            max_batch: options.batch.max_batch,
        },
        pipeline: Pipeline::for_model(&model.preprocessing),
        image_size: model.preprocessing.size,
        labels: model.labels,
        batcher,
        metrics: metrics.clone(),
        timeout: options.timeout,
        draining: AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind(options.addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: options.addr,
            source,
        })?;
    on_listening(listener.local_addr()?);
    let app = router(state.clone(), options.max_body);
    let drain_state = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            drain_state.draining.store(true, Ordering::SeqCst);
        })
        .await?;
    // Every handler has answered; the engine thread ends once the last `Batcher` is gone.
    drop(state);
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    Ok(())
}

fn router(state: Arc<AppState>, max_body: usize) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
        .route("/v1/classify", post(classify))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(
            max_body,
            refuse_large_bodies,
        ))
        .route_layer(middleware::from_fn_with_state(metrics, track))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
            },
        ))
        .with_state(state)
}

async fn track(
    State(metrics): State<Arc<Metrics>>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = matched.map_or_else(|| "other".to_string(), |m| m.as_str().to_string());
    let started = Instant::now();
    metrics.in_flight.inc();
    let response = next.run(request).await;
    metrics.in_flight.dec();
    metrics
        .requests
        .get_or_create(&RouteStatus {
            route: route.clone(),
            status: response.status().as_u16().to_string(),
        })
        .inc();
    metrics
        .latency
        .get_or_create(&Route { route })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// A body whose Content-Length is over the limit is refused before any of it is read: a
/// client that waits for `100 Continue` (curl does for large bodies) never sends it. Bodies of
/// unannounced length are cut at the limit while read ([`DefaultBodyLimit`]).
async fn refuse_large_bodies(
    State(max_body): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(length) if length > max_body as u64 => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is {length} bytes, over this server's length limit of {max_body} \
                 bytes (--max-body-mb)"
            ),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}

async fn wrong_method(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} does not take {}",
            request.uri().path(),
            request.method()
        ),
    )
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {} {}", request.method(), request.uri().path()),
    )
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "repvgg-rs",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
    .into_response()
}

async fn live() -> Response {
    axum::Json(json!({"live": true})).into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let ready = !state.draining.load(Ordering::SeqCst);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(json!({"ready": ready}))).into_response()
}

/// Checks the `{name}` (and `{version}`) of a model route.
fn check_model(state: &AppState, params: &HashMap<String, String>) -> Result<(), ApiError> {
    let name = params.get("name").map(String::as_str).unwrap_or("");
    if name != state.name {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "unknown model '{name}'; this server serves '{}'",
                state.name
            ),
        ));
    }
    match params.get("version") {
        Some(v) if v != MODEL_VERSION => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("model '{name}' has no version '{v}'; its one version is '{MODEL_VERSION}'"),
        )),
        _ => Ok(()),
    }
}

/// A body that names a model (KServe's client names it) must name the one its route does:
/// such a request was meant for another model, and this one's logits would look like an
/// answer. (KServe's own server routes by the path and ignores the body's name.)
fn check_named_model(state: &AppState, request: &protocol::InferRequest) -> Result<(), ApiError> {
    if let Some(name) = request.model_name.as_deref().filter(|n| *n != state.name) {
        return Err(ApiError::bad_request(format!(
            "the body names model '{name}' but the route names '{}'",
            state.name
        )));
    }
    if let Some(version) = request
        .model_version
        .as_deref()
        .filter(|v| !v.is_empty() && *v != MODEL_VERSION)
    {
        return Err(ApiError::bad_request(format!(
            "the body names version '{version}' of model '{}', whose one version is \
             '{MODEL_VERSION}'",
            state.name
        )));
    }
    Ok(())
}

async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    check_model(&state, &params)?;
    Ok(axum::Json(protocol::model_metadata(
        &state.name,
        state.contract.channels,
        state.contract.size,
        state.classes,
    ))
    .into_response())
}

async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    check_model(&state, &params)?;
    let ready = !state.draining.load(Ordering::SeqCst);
    Ok(axum::Json(json!({"name": state.name, "ready": ready})).into_response())
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Queues `n` images and waits for their logits, within the request's deadline.
async fn run_batch(
    state: &AppState,
    arrival: batcher::Arrival,
    input: Vec<f32>,
    n: usize,
    h: usize,
    w: usize,
    deadline: Instant,
) -> Result<Vec<f32>, ApiError> {
    let (reply, answer) = oneshot::channel();
    let job = Job {
        input,
        n,
        h,
        w,
        deadline,
        reply,
    };
    state.batcher.submit(job, arrival).map_err(|e| match e {
        SubmitError::Full(_) => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("overloaded: {e}; retry later"),
            retry_after: Some(1),
        },
        SubmitError::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        SubmitError::Input(_) => ApiError::bad_request(e.to_string()),
    })?;
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, answer).await {
        Err(_) | Ok(Ok(Err(JobError::Expired))) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no answer within the request deadline ({} ms, --timeout-ms)",
                state.timeout.as_millis()
            ),
        )),
        Ok(Ok(Ok(logits))) => Ok(logits),
        Ok(Ok(Err(e @ JobError::Engine(_)))) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the engine stopped before answering",
        )),
    }
}

/// Infer requests whose JSON is at most this long, and whose body at most
/// [`INLINE_PARSE_BYTES`], are parsed on the runtime's thread (tens of microseconds at most).
const INLINE_PARSE_JSON_BYTES: usize = 64 << 10;
/// See [`INLINE_PARSE_JSON_BYTES`]: four 224x224 images of binary data.
const INLINE_PARSE_BYTES: usize = 4 * 3 * 224 * 224 * 4 + (64 << 10);

async fn infer(
    State(state): State<Arc<AppState>>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let deadline = Instant::now() + state.timeout;
    let arrival = state.batcher.arriving();
    check_model(&state, &params)?;
    let body = body.map_err(rejected)?;
    let header_length = match headers.get("inference-header-content-length") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "Inference-Header-Content-Length must be a byte count, not {v:?}"
                    ))
                })?,
        ),
    };
    let contract = state.contract;
    let json_bytes = header_length.unwrap_or(body.len());
    let request = if json_bytes <= INLINE_PARSE_JSON_BYTES && body.len() <= INLINE_PARSE_BYTES {
        // A binary request is a short JSON header and one copy of its tensor: handing it to
        // another thread and back would cost more than parsing it here.
        protocol::parse_infer(&body, header_length, &contract)
    } else {
        // Parsing a large JSON body is CPU work: off the runtime's threads.
        tokio::task::spawn_blocking(move || protocol::parse_infer(&body, header_length, &contract))
            .await
            .map_err(|_| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "request parsing failed")
            })?
    }
    .map_err(|e| ApiError::bad_request(e.0))?;
    check_named_model(&state, &request)?;
    let n = request.n;
    let logits = run_batch(
        &state,
        arrival,
        request.data,
        n,
        request.h,
        request.w,
        deadline,
    )
    .await?;
    let (body, header_length) = protocol::encode_infer_response(
        &state.name,
        request.id.as_deref(),
        &logits,
        n,
        request.binary_output,
    );
    Ok(match header_length {
        Some(len) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                ),
                (
                    header::HeaderName::from_static("inference-header-content-length"),
                    HeaderValue::from(len),
                ),
            ],
            body,
        )
            .into_response(),
        None => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
    })
}

#[derive(Deserialize)]
struct ClassifyQuery {
    top: Option<usize>,
}

/// Top-k classes of softmax(logits) with their labels, as `predict --json` prints them.
pub fn top_classes(logits: &[f32], k: usize, labels: &[String]) -> serde_json::Value {
    repvgg_engine::top_classes(logits, k)
        .into_iter()
        .map(|(i, p)| json!({"index": i, "label": labels.get(i), "prob": p}))
        .collect()
}

async fn classify(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ClassifyQuery>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let deadline = Instant::now() + state.timeout;
    let arrival = state.batcher.arriving();
    let Query(query) = query.map_err(rejected)?;
    let top = query.top.unwrap_or(5);
    if top == 0 {
        return Err(ApiError::bad_request("top must be at least 1"));
    }
    if state.contract.channels != 3 {
        return Err(ApiError::bad_request(format!(
            "this model takes {} input channels and /v1/classify makes RGB images; send \
             tensors to /v2/models/{}/infer",
            state.contract.channels, state.name
        )));
    }
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    // (file name, bytes); a plain body has no name.
    let mut images: Vec<(Option<String>, Bytes)> = Vec::new();
    if multipart {
        let mut form = Multipart::from_request(request, &())
            .await
            .map_err(rejected)?;
        while let Some(field) = form.next_field().await.map_err(rejected)? {
            let name = field
                .file_name()
                .or(field.name())
                .map(String::from)
                .unwrap_or_else(|| format!("part {}", images.len() + 1));
            let bytes = field.bytes().await.map_err(rejected)?;
            images.push((Some(name), bytes));
        }
        if images.is_empty() {
            return Err(ApiError::bad_request("the multipart body holds no images"));
        }
    } else {
        let bytes = Bytes::from_request(request, &()).await.map_err(rejected)?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request(
                "empty body: send a JPEG or PNG image (or several as multipart/form-data)",
            ));
        }
        images.push((None, bytes));
    }
    let max_batch = state.contract.max_batch;
    if images.len() > max_batch {
        return Err(ApiError::bad_request(format!(
            "{} images; this server takes at most {max_batch} per request (--max-batch)",
            images.len()
        )));
    }
    let n = images.len();
    let names: Vec<Option<String>> = images.iter().map(|(name, _)| name.clone()).collect();
    let worker_state = state.clone();
    let input = tokio::task::spawn_blocking(move || {
        use rand::SeedableRng;
        let mut input = Vec::new();
        for (name, bytes) in &images {
            let origin = match name {
                Some(name) => format!("image '{name}'"),
                None => "the body".to_string(),
            };
            let image = repvgg_data::decode_image_bytes(bytes, std::path::Path::new(&origin))
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            // Evaluation transforms draw no random numbers.
            let (pixels, _, _) = worker_state
                .pipeline
                .apply(&image, &mut rand::rngs::StdRng::seed_from_u64(0));
            input.extend(pixels);
        }
        Ok::<_, ApiError>(input)
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "image decoding failed"))??;
    let [h, w] = state.image_size;
    let logits = run_batch(&state, arrival, input, n, h, w, deadline).await?;
    let k = top.min(state.classes);
    let answers: Vec<serde_json::Value> = logits
        .chunks_exact(state.classes)
        .zip(&names)
        .map(|(row, name)| {
            let top = top_classes(row, k, &state.labels);
            match name {
                Some(name) => json!({"file": name, "top": top}),
                None => json!({"top": top}),
            }
        })
        .collect();
    Ok(if multipart {
        axum::Json(serde_json::Value::Array(answers)).into_response()
    } else {
        axum::Json(answers.into_iter().next().expect("one image")).into_response()
    })
}
