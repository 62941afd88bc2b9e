//! Prometheus metrics through OpenTelemetry: build info, snapshot and
//! sandbox gauges, and a latency histogram per RPC.

use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Histogram, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

use crate::core::Runtime;
use crate::core::sandboxes::metrics::HostSample;

pub struct Metrics {
    /// gRPC methods served (`package.Service.Method`): the only `rpc`
    /// labels besides REST's matched routes, `/healthz`, `/metrics` and
    /// `unknown`, so junk paths cannot grow new series.
    known_grpc: std::collections::HashSet<String>,
    registry: prometheus::Registry,
    _provider: SdkMeterProvider,
    latency: Histogram<f64>,
}

impl Metrics {
    /// `sandbox_cap`: sandboxes reported with a `sandbox` label (0 = none).
    pub fn new(rt: Arc<Runtime>, sandbox_cap: usize) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let exporter =
            opentelemetry_prometheus::exporter().with_registry(registry.clone()).without_target_info().build()?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("forkd");
        let latency = meter
            .f64_histogram("forkd_request_duration")
            .with_unit("s")
            .with_description("Latency of each RPC, gRPC or REST, through auth, audit and dispatch")
            .with_boundaries(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0,
            ])
            .build();
        meter
            .u64_observable_gauge("forkd_build_info")
            .with_description("Build of the running daemon")
            .with_callback(|o| o.observe(1, &[KeyValue::new("version", forkd_api::VERSION)]))
            .build();
        let r1 = rt.clone();
        meter
            .u64_observable_gauge("forkd_snapshots_total")
            .with_description("Snapshots in the store")
            .with_callback(move |o| o.observe(r1.snapshot_count() as u64, &[]))
            .build();
        let r2 = rt.clone();
        meter
            .u64_observable_gauge("forkd_sandboxes_active")
            .with_description("Live sandboxes")
            .with_callback(move |o| o.observe(r2.live_sandbox_count_now() as u64, &[]))
            .build();
        let r3 = rt.clone();
        meter
            .u64_observable_gauge("forkd_sandboxes")
            .with_description("Listed sandboxes by state")
            .with_callback(move |o| {
                for (state, n) in r3.sandbox_states_now() {
                    o.observe(n, &[KeyValue::new("state", state)]);
                }
            })
            .build();
        let r5 = rt.clone();
        meter
            .u64_observable_counter("forkd_admission_refused")
            .with_description(
                "Requests refused because the host could not take them (RESOURCE_EXHAUSTED), by the check that refused",
            )
            .with_callback(move |o| {
                for (reason, n) in r5.admission.refusals() {
                    o.observe(n, &[KeyValue::new("reason", reason)]);
                }
            })
            .build();
        if sandbox_cap > 0 {
            per_sandbox(&meter, &rt, sandbox_cap);
        }
        let r4 = rt;
        meter
            .u64_observable_gauge("forkd_pool_vmms")
            .with_description("VMMs started ahead of time and waiting for a spawn, by snapshot")
            .with_callback(move |o| {
                for (tag, n) in r4.pool_sizes() {
                    o.observe(n as u64, &[KeyValue::new("snapshot", tag)]);
                }
            })
            .build();
        meter
            .u64_observable_gauge("forkd_operations_in_flight")
            .with_description(
                "Operations that change the host (fork, delete, branch, compact, …) running now, callers gone or not",
            )
            .with_callback(|o| o.observe(crate::core::operations::in_flight() as u64, &[]))
            .build();
        meter
            .u64_observable_counter("forkd_orphans_reaped")
            .with_description("Orphaned VMMs, work dirs, cgroups and ledger entries removed by the reconciler")
            .with_callback(|o| o.observe(crate::core::reconcile::orphans_reaped_total(), &[]))
            .build();
        Ok(Self { known_grpc: known_grpc_methods()?, registry, _provider: provider, latency })
    }

    /// Whether `rpc` (`package.Service.Method`) is a method this daemon serves.
    pub fn is_known_grpc(&self, rpc: &str) -> bool {
        self.known_grpc.contains(rpc)
    }

    /// Records one request; `rpc` must be a known name or "unknown".
    pub fn record_request(&self, rpc: &str, protocol: &'static str, code: String, secs: f64) {
        self.latency.record(
            secs,
            &[KeyValue::new("rpc", rpc.to_string()), KeyValue::new("protocol", protocol), KeyValue::new("code", code)],
        );
    }

    pub fn render(&self) -> String {
        let mut buf = vec![];
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

type Samples = Arc<Vec<(String, HostSample)>>;

/// The host samples one scrape reads: its four per-sandbox gauges are
/// observed back to back, and each VMM's /proc files are read once for all.
struct ScrapeSamples {
    rt: Arc<Runtime>,
    cap: usize,
    last: std::sync::Mutex<Option<(std::time::Instant, Samples)>>,
}

impl ScrapeSamples {
    /// Samples newer than this are the same scrape's.
    const FRESH: std::time::Duration = std::time::Duration::from_secs(1);

    fn get(&self) -> Samples {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, s)) = last.as_ref()
            && at.elapsed() < Self::FRESH
        {
            return s.clone();
        }
        let s: Samples = Arc::new(self.rt.sandbox_samples_now(self.cap));
        *last = Some((std::time::Instant::now(), s.clone()));
        s
    }
}

/// Series with a `sandbox` label, for at most `cap` sandboxes (by id), so
/// their number stays bounded whatever runs.
fn per_sandbox(meter: &opentelemetry::metrics::Meter, rt: &Arc<Runtime>, cap: usize) {
    type Pick = fn(&HostSample) -> f64;
    let samples = Arc::new(ScrapeSamples { rt: rt.clone(), cap, last: Default::default() });
    let gauges: [(&'static str, &'static str, Pick); 4] = [
        ("forkd_sandbox_cpu_seconds", "CPU time the sandbox's VMM has used", |s| s.cpu_time_us as f64 / 1e6),
        ("forkd_sandbox_vmm_rss_bytes", "Resident memory of the sandbox's VMM", |s| s.rss_bytes as f64),
        ("forkd_sandbox_vmm_pss_bytes", "Proportional memory of the sandbox's VMM", |s| s.pss_bytes as f64),
        ("forkd_sandbox_commands", "Commands run in the sandbox (exec, eval, processes)", |s| s.exec_count as f64),
    ];
    for (name, help, pick) in gauges {
        let samples = samples.clone();
        meter
            .f64_observable_gauge(name)
            .with_description(help)
            .with_callback(move |o| {
                for (id, s) in samples.get().iter() {
                    o.observe(pick(s), &[KeyValue::new("sandbox", id.clone())]);
                }
            })
            .build();
    }
}

/// Every method of forkd's services, health and reflection.
fn known_grpc_methods() -> anyhow::Result<std::collections::HashSet<String>> {
    let mut out = std::collections::HashSet::new();
    for set in [forkd_api::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
        let pool = prost_reflect::DescriptorPool::decode(set)?;
        for svc in pool.services() {
            for m in svc.methods() {
                out.insert(format!("{}.{}", svc.full_name(), m.name()));
            }
        }
    }
    for v in ["v1", "v1alpha"] {
        out.insert(format!("grpc.reflection.{v}.ServerReflection.ServerReflectionInfo"));
    }
    Ok(out)
}
