//! Prometheus metrics for `/metrics`: per-app requests, errors, latency, instantiate time and
//! compiles.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels for per-app series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    /// App name.
    pub app: String,
}

/// Labels for request outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// App name.
    pub app: String,
    /// HTTP status code.
    pub status: u16,
}

/// Labels for errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// App name.
    pub app: String,
    /// `trap`, `timeout`, `body_too_large`, `no_response`.
    pub kind: &'static str,
}

/// Labels for calls by name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    /// App name.
    pub app: String,
    /// Function name.
    pub function: String,
    /// `wasm` or `python`.
    pub engine: &'static str,
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~84 s.
    Histogram::new(exponential_buckets(1e-5, 2.0, 24))
}

/// All server metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests served, by app and status.
    pub requests: Family<StatusLabels, Counter>,
    /// Failed requests, by app and kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Time from request arrival to response headers.
    pub latency: Family<AppLabels, Histogram, fn() -> Histogram>,
    /// `Store::new` plus instantiation.
    pub instantiate: Family<AppLabels, Histogram, fn() -> Histogram>,
    /// Components compiled from source (not loaded from the compiled cache).
    pub compiles: Family<AppLabels, Counter>,
    /// Components loaded from the compiled cache.
    pub cache_loads: Family<AppLabels, Counter>,
    /// Calls by name (API, web endpoints, schedules, calls between functions).
    pub calls: Family<FunctionLabels, Counter>,
    /// Calls that ended in an error.
    pub call_errors: Family<FunctionLabels, Counter>,
    /// Time a call took, queueing included.
    pub call_duration: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    /// Containers started for Python functions (each is a cold start).
    pub cold_starts: Family<FunctionLabels, Counter>,
    /// GPUs held by a function's containers now.
    pub gpus: Family<FunctionLabels, Gauge>,
    /// Call records dropped because the history writer fell behind.
    pub call_records_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lode");
        let requests = Family::<StatusLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let latency = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let instantiate = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let compiles = Family::<AppLabels, Counter>::default();
        let cache_loads = Family::<AppLabels, Counter>::default();
        let calls = Family::<FunctionLabels, Counter>::default();
        let call_errors = Family::<FunctionLabels, Counter>::default();
        let call_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let cold_starts = Family::<FunctionLabels, Counter>::default();
        let gpus = Family::<FunctionLabels, Gauge>::default();
        let call_records_dropped = Counter::default();
        registry.register(
            "call_records_dropped",
            "Call records not kept because the history writer fell behind",
            call_records_dropped.clone(),
        );
        registry.register("function_calls", "Calls by name", calls.clone());
        registry.register(
            "function_call_errors",
            "Calls by name that ended in an error",
            call_errors.clone(),
        );
        registry.register(
            "function_call_duration_seconds",
            "Time a call by name took, queueing included",
            call_duration.clone(),
        );
        registry.register(
            "function_cold_starts",
            "Function containers started",
            cold_starts.clone(),
        );
        registry.register(
            "function_gpus",
            "GPUs held by a function's containers",
            gpus.clone(),
        );
        registry.register(
            "http_requests",
            "Public HTTP requests served",
            requests.clone(),
        );
        registry.register(
            "http_errors",
            "Public HTTP requests that failed",
            errors.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request arrival to response headers",
            latency.clone(),
        );
        registry.register(
            "instantiate_duration_seconds",
            "Store creation plus component instantiation",
            instantiate.clone(),
        );
        registry.register(
            "component_compiles",
            "Components compiled to native code",
            compiles.clone(),
        );
        registry.register(
            "component_cache_loads",
            "Components loaded from the compiled cache without compiling",
            cache_loads.clone(),
        );
        Self {
            registry,
            requests,
            errors,
            latency,
            instantiate,
            compiles,
            cache_loads,
            calls,
            call_errors,
            call_duration,
            cold_starts,
            gpus,
            call_records_dropped,
        }
    }
}

impl Metrics {
    /// Adds the memory snapshots' counters: saved, restored from, and failed.
    pub fn register_snapshots(&mut self, taken: &Counter, restored: &Counter, failed: &Counter) {
        self.registry.register(
            "memory_snapshots_taken",
            "Function containers saved after their module loaded",
            taken.clone(),
        );
        self.registry.register(
            "memory_snapshots_restored",
            "Function containers started from a memory snapshot",
            restored.clone(),
        );
        self.registry.register(
            "memory_snapshot_failures",
            "Snapshots that could not be saved or restored (the container started without)",
            failed.clone(),
        );
    }
}

/// One app's hot-path series, looked up once at deploy rather than on every request.
#[derive(Clone)]
pub struct AppSeries {
    /// Time to response headers.
    pub latency: Histogram,
    /// Store creation plus instantiation.
    pub instantiate: Histogram,
    /// Requests answered 200.
    pub ok: Counter,
}

/// One function's call series, looked up once at deploy for Wasm functions, whose calls are
/// too quick to hash labels on each.
#[derive(Clone)]
pub struct FunctionSeries {
    /// Calls.
    pub calls: Counter,
    /// Calls that ended in an error.
    pub errors: Counter,
    /// Time a call took.
    pub duration: Histogram,
}

impl FunctionSeries {
    /// Counts one call that took `elapsed` and failed or not.
    pub fn observe(&self, elapsed: std::time::Duration, failed: bool) {
        self.calls.inc();
        self.duration.observe(elapsed.as_secs_f64());
        if failed {
            self.errors.inc();
        }
    }
}

impl Metrics {
    /// The call series of `app/function` on `engine`.
    pub fn function_series(
        &self,
        app: &str,
        function: &str,
        engine: &'static str,
    ) -> FunctionSeries {
        let labels = FunctionLabels {
            app: app.to_string(),
            function: function.to_string(),
            engine,
        };
        FunctionSeries {
            calls: self.calls.get_or_create(&labels).clone(),
            errors: self.call_errors.get_or_create(&labels).clone(),
            duration: self.call_duration.get_or_create(&labels).clone(),
        }
    }

    /// The hot-path series for `app`.
    pub fn app_series(&self, app: &str) -> AppSeries {
        let labels = Self::app(app);
        AppSeries {
            latency: self.latency.get_or_create(&labels).clone(),
            instantiate: self.instantiate.get_or_create(&labels).clone(),
            ok: self
                .requests
                .get_or_create(&StatusLabels {
                    app: app.to_string(),
                    status: 200,
                })
                .clone(),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Labels for `app`.
    pub fn app(app: &str) -> AppLabels {
        AppLabels {
            app: app.to_string(),
        }
    }
}
