//! `repvgg bench-serve`: load on an inference server over loopback, the same client for any
//! server that speaks the V2 infer route (ours, or the Python one in `bench/`), bounded in
//! requests and time.
//!
//! Closed loop (`--concurrency C`): C clients, each sending its next request when the last is
//! answered. Open loop (`--rate R`): requests are due at R per second whatever the answers, and
//! latency counts from when each was due, so a server that falls behind shows it (no
//! coordinated omission); at most `--concurrency` are in flight.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// The server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// The model's name in /v2/models/NAME/infer.
    #[arg(long, default_value = "repvgg")]
    model: String,
    /// Input size of the infer requests.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Images per request.
    #[arg(long, default_value_t = 1)]
    images: usize,
    /// Send tensors as JSON numbers instead of binary data.
    #[arg(long)]
    json_tensors: bool,
    /// Classify this JPEG/PNG through POST /v1/classify instead of calling infer.
    #[arg(long)]
    classify: Option<PathBuf>,
    /// Clients in flight, one run per value: 1,8,64.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    concurrency: Vec<usize>,
    /// Open loop: requests due per second (one run per --concurrency value, which caps those
    /// in flight).
    #[arg(long)]
    rate: Option<f64>,
    /// Requests sent before each run is timed (at least one per client).
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Requests per run (after the warm-up).
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// A run stops after this many seconds even if requests remain.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Sample this process's resident memory during each run (the server's pid).
    #[arg(long)]
    server_pid: Option<u32>,
    /// A label for the lines (which server this is).
    #[arg(long, default_value = "")]
    label: String,
    /// One JSON line per run.
    #[arg(long)]
    json: bool,
}

struct Request {
    url: String,
    content_type: &'static str,
    header_length: Option<usize>,
    body: Vec<u8>,
}

fn build_request(args: &BenchServeArgs) -> Result<Request> {
    let base = args.url.trim_end_matches('/');
    if let Some(image) = &args.classify {
        let body =
            std::fs::read(image).with_context(|| format!("{}: cannot read", image.display()))?;
        return Ok(Request {
            url: format!("{base}/v1/classify"),
            content_type: "application/octet-stream",
            header_length: None,
            body,
        });
    }
    let count = args.images * 3 * args.size * args.size;
    // A fixed, not constant, image: values in [-2, 2] like normalised pixels.
    let data: Vec<f32> = (0..count)
        .map(|i| ((i * 7919 % 4001) as f32 / 1000.0) - 2.0)
        .collect();
    let shape = [args.images, 3, args.size, args.size];
    let url = format!("{base}/v2/models/{}/infer", args.model);
    if args.json_tensors {
        let body = json!({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
            "data": data}]});
        return Ok(Request {
            url,
            content_type: "application/json",
            header_length: None,
            body: body.to_string().into_bytes(),
        });
    }
    let header = json!({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
        "parameters": {"binary_data_size": count * 4}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]})
    .to_string();
    let mut body = header.clone().into_bytes();
    for v in data {
        body.extend_from_slice(&v.to_le_bytes());
    }
    Ok(Request {
        url,
        content_type: "application/octet-stream",
        header_length: Some(header.len()),
        body,
    })
}

/// One answer: its status (0: no HTTP answer at all) and latency.
type Sample = (u16, Duration);

/// The answer's status, or why there was no HTTP answer (no server, a reset, a timeout).
fn send(agent: &ureq::Agent, request: &Request) -> Result<u16, ureq::Error> {
    let mut call = agent
        .post(&request.url)
        .header("content-type", request.content_type);
    if let Some(len) = request.header_length {
        call = call.header("inference-header-content-length", len.to_string());
    }
    let mut response = call.send(&request.body[..])?;
    // The body is read in full, as a real client would.
    let _ = response
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec();
    Ok(response.status().as_u16())
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .max_idle_connections_per_host(1024)
        .max_idle_connections(1024)
        .build()
        .into()
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn run_level(
    args: &BenchServeArgs,
    request: &Arc<Request>,
    concurrency: usize,
) -> Result<serde_json::Value> {
    // Warm-up: every client's connection opened, the server's buffers grown.
    let agents: Vec<ureq::Agent> = (0..concurrency).map(|_| agent()).collect();
    let rounds = args.warmup.div_ceil(concurrency).max(1);
    // Each client's last warm-up outcome.
    let warmed: Vec<Result<u16, ureq::Error>> = std::thread::scope(|s| {
        let clients: Vec<_> = agents
            .iter()
            .map(|agent| {
                s.spawn(move || {
                    let mut last = send(agent, request);
                    for _ in 1..rounds {
                        last = send(agent, request);
                    }
                    last
                })
            })
            .collect();
        clients.into_iter().filter_map(|c| c.join().ok()).collect()
    });
    // A server that answered none of them is not there: say so rather than time it.
    if let [Err(e), rest @ ..] = &warmed[..]
        && rest.iter().all(Result::is_err)
    {
        bail!(
            "{}: no HTTP answer to the warm-up requests: {e}",
            request.url
        );
    }
    let samples = Arc::new(Mutex::new(Vec::<Sample>::with_capacity(args.requests)));
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(Mutex::new(None::<f64>));
    let started = Instant::now();
    let limit = Duration::from_secs_f64(args.duration);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::scope(|s| {
        if let Some(pid) = args.server_pid {
            let (stop, peak) = (stop.clone(), peak.clone());
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(mb) = rss_mb(pid) {
                        let mut p = peak.lock().unwrap();
                        *p = Some(p.map_or(mb, |q: f64| q.max(mb)));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        let workers: Vec<_> = agents
            .iter()
            .map(|agent| {
                let (samples, next, request) = (samples.clone(), next.clone(), request.clone());
                s.spawn(move || {
                    loop {
                        let k = next.fetch_add(1, Ordering::SeqCst);
                        if k >= args.requests || started.elapsed() > limit {
                            break;
                        }
                        // Open loop: request k is due at k / rate.
                        let due = match args.rate {
                            Some(rate) => {
                                // Checked at the start: rate is finite and positive.
                                let after = Duration::try_from_secs_f64(k as f64 / rate)
                                    .unwrap_or(Duration::MAX);
                                let due = started.checked_add(after).unwrap_or(started + limit);
                                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                    std::thread::sleep(wait);
                                }
                                due
                            }
                            None => Instant::now(),
                        };
                        let status = send(agent, &request).unwrap_or(0);
                        samples.lock().unwrap().push((status, due.elapsed()));
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let seconds = started.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for (status, _) in &samples {
        let key = if *status == 0 {
            "no answer".to_string()
        } else {
            status.to_string()
        };
        *statuses.entry(key).or_default() += 1;
    }
    let mut ok: Vec<f64> = samples
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, d)| d.as_secs_f64() * 1e3)
        .collect();
    ok.sort_by(f64::total_cmp);
    // None (JSON null) when no request succeeded: there is no latency to report.
    let quantile = |q: f64| {
        (!ok.is_empty()).then(|| ok[((ok.len() as f64 * q).ceil() as usize).clamp(1, ok.len()) - 1])
    };
    let images = if args.classify.is_some() {
        1
    } else {
        args.images
    };
    Ok(json!({
        "label": args.label,
        "concurrency": concurrency,
        "rate": args.rate,
        "requests": samples.len(),
        "seconds": seconds,
        "ok_per_s": ok.len() as f64 / seconds,
        "images_per_s": (ok.len() * images) as f64 / seconds,
        "p50_ms": quantile(0.5),
        "p99_ms": quantile(0.99),
        "statuses": statuses,
        "server_peak_rss_mb": *peak.lock().unwrap(),
    }))
}

/// A latency for the text line: "-" where none was measured.
fn milliseconds(value: &serde_json::Value) -> String {
    value
        .as_f64()
        .map_or("-".to_string(), |ms| format!("{ms:.1}"))
}

pub fn run(args: BenchServeArgs) -> Result<()> {
    if args.concurrency.contains(&0) || args.requests == 0 || args.images == 0 {
        bail!("--concurrency, --requests and --images must be at least 1");
    }
    // Past a day, or under one request a day, a run measures nothing: both also keep the
    // due times below in `Duration`'s range.
    const DAY: f64 = 86_400.0;
    if !(args.duration.is_finite() && args.duration > 0.0 && args.duration <= DAY) {
        bail!("--duration must be a number of seconds in (0, {DAY}]");
    }
    if args
        .rate
        .is_some_and(|r| !(r.is_finite() && r >= 1.0 / DAY))
    {
        bail!("--rate must be a positive number of requests per second (at least one a day)");
    }
    let request = Arc::new(build_request(&args)?);
    for &concurrency in &args.concurrency {
        let row = run_level(&args, &request, concurrency)?;
        if args.json {
            println!("{row}");
        } else {
            println!(
                "{}{} clients{}: {} requests in {:.1} s, {:.1} ok/s, p50 {} ms, p99 {} ms, \
                 statuses {}{}",
                if args.label.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", args.label)
                },
                concurrency,
                args.rate
                    .map_or(String::new(), |r| format!(" at {r}/s due")),
                row["requests"],
                row["seconds"].as_f64().unwrap_or(0.0),
                row["ok_per_s"].as_f64().unwrap_or(0.0),
                milliseconds(&row["p50_ms"]),
                milliseconds(&row["p99_ms"]),
                row["statuses"],
                row["server_peak_rss_mb"]
                    .as_f64()
                    .map_or(String::new(), |mb| format!(", server peak RSS {mb:.0} MB")),
            );
        }
    }
    Ok(())
}
