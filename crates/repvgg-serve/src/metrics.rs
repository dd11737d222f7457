//! What `GET /metrics` reports, in the Prometheus text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub latency: Family<Route, Histogram>,
    pub batch_size: Histogram,
    pub engine_seconds: Histogram,
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

impl Metrics {
    pub fn new(max_batch: usize) -> Metrics {
        let mut registry = Registry::with_prefix("repvgg");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status code",
            requests.clone(),
        );
        let latency = Family::<Route, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to its response, by route",
            latency.clone(),
        );
        let batch_size = Histogram::new(
            (0..)
                .map(|k| (1u64 << k) as f64)
                .take_while(|&b| b < max_batch as f64)
                .chain([max_batch as f64]),
        );
        registry.register(
            "batch_size",
            "Images per engine call (dynamic batching packs requests together)",
            batch_size.clone(),
        );
        let engine_seconds = latency_histogram();
        registry.register(
            "engine_duration_seconds",
            "Time of one engine call",
            engine_seconds.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Requests waiting for the engine",
            queue_depth.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "Requests received and not yet answered",
            in_flight.clone(),
        );
        Metrics {
            in_flight,
            registry,
            requests,
            latency,
            batch_size,
            engine_seconds,
            queue_depth,
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
