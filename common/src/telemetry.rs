//! OpenTelemetry traces: owns the process's tracing setup (the `tracing` subscriber with
//! its log output, plus a `tracing-opentelemetry` layer and a batching OTLP/gRPC exporter
//! when an endpoint is configured), and the W3C trace context helpers in [`context`].
//!
//! Configuration: the standard variables (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`, `OTEL_RESOURCE_ATTRIBUTES`) override the `[telemetry]`
//! section of a daemon's config file ([`TelemetryConfig`]).
//!
//! Off when no endpoint is configured: no exporter, no OpenTelemetry layer, and
//! [`enabled`] is false, so the hot paths (RPC layer, interceptor, dispatch) skip all trace
//! work behind one relaxed atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub mod context;

pub use context::{
    TraceParent, current, emit, inject_metadata, span_context_of, stable_span_id, traceparent_env,
};

/// `[telemetry]` in the controller's and the worker's config files. Every key is optional;
/// the `OTEL_*` variables override them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`. Unset: tracing is off.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of this process's spans (default `scabbard-<role>`).
    pub service_name: Option<String>,
    /// `always_on`, `always_off`, `traceidratio`, `parentbased_always_on` (default),
    /// `parentbased_always_off`, `parentbased_traceidratio`.
    pub sampler: Option<String>,
    /// The ratio of the `*traceidratio` samplers (0.0–1.0, default 1.0; a number or a
    /// string, as in `OTEL_TRACES_SAMPLER_ARG`).
    #[serde(default, deserialize_with = "number_or_string")]
    pub sampler_arg: Option<String>,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Arg {
        Number(f64),
        Text(String),
    }
    Ok(Some(match Arg::deserialize(d)? {
        Arg::Number(n) => n.to_string(),
        Arg::Text(t) => t,
    }))
}

impl TelemetryConfig {
    /// The endpoint traces go to: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else the config key; `None`: tracing is off.
    pub fn endpoint(&self) -> Option<String> {
        env_nonempty("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env_nonempty("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .or_else(|| self.otlp_endpoint.clone().filter(|e| !e.trim().is_empty()))
    }

    /// Checks the sampler settings (daemons refuse to start on a bad value).
    pub fn validate(&self) -> crate::Result<()> {
        self.sampler().map(|_| ())
    }

    fn sampler(&self) -> crate::Result<Sampler> {
        let name = env_nonempty("OTEL_TRACES_SAMPLER")
            .or_else(|| self.sampler.clone())
            .unwrap_or_else(|| "parentbased_always_on".into());
        let arg = env_nonempty("OTEL_TRACES_SAMPLER_ARG").or_else(|| self.sampler_arg.clone());
        let ratio = match arg {
            None => 1.0,
            Some(a) => a
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    crate::Error::invalid(format!(
                        "telemetry sampler_arg (OTEL_TRACES_SAMPLER_ARG) {a:?} is not a ratio between 0.0 and 1.0"
                    ))
                })?,
        };
        Ok(match name.trim() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatioBased(ratio),
            "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
            }
            other => {
                return Err(crate::Error::invalid(format!(
                    "telemetry sampler (OTEL_TRACES_SAMPLER) {other:?} is not one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                )));
            }
        })
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static TRACER: OnceLock<SdkTracer> = OnceLock::new();
static ENDPOINT: OnceLock<String> = OnceLock::new();

/// The OTLP endpoint this process exports to (`None`: tracing is off). Dagger sessions
/// get it so the engine's spans go to the same collector.
pub fn endpoint_in_use() -> Option<&'static str> {
    enabled()
        .then(|| ENDPOINT.get().map(String::as_str))
        .flatten()
}

/// Whether spans are exported by this process (an endpoint was configured at [`init`]).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The tracer of the exporting provider (`None` when tracing is off).
pub(crate) fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Keeps the exporter; [`Telemetry::shutdown`] (or drop) flushes the spans still queued.
/// Must be created and shut down while the Tokio runtime that exports runs.
#[must_use = "spans still queued are lost unless the guard is shut down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is queued and stops the exporter, waiting at most `bound` (a collector
    /// that does not answer must not hold a command's exit for long).
    pub fn shutdown_within(mut self, bound: Duration) {
        self.stop(bound);
    }

    /// [`shutdown_within`](Self::shutdown_within) 5 s.
    pub fn shutdown(self) {
        self.shutdown_within(Duration::from_secs(5));
    }

    fn stop(&mut self, bound: Duration) {
        if let Some(p) = self.provider.take() {
            ENABLED.store(false, Ordering::Relaxed);
            // Shutting down exports what is queued first.
            let _ = p.shutdown_with_timeout(bound);
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Targets whose spans never become OpenTelemetry spans: the exporter's own transport
/// (exporting would trace itself) and libraries' internals.
const NOT_TRACED: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "dagger_sdk",
    "reqwest",
];

/// Installs the global subscriber: logs on stderr (`json`: one object per line; the
/// `SCABBARD_LOG` filter, else `default_filter`), and, when an endpoint is configured,
/// the OpenTelemetry layer exporting to it. `default_service` names this process when
/// neither `OTEL_SERVICE_NAME` nor `cfg.service_name` does. Must run inside the Tokio
/// runtime (the exporter's channel lives on it). A bad sampler setting or endpoint
/// leaves tracing off with an error on stderr (daemons validate their config first).
pub fn init(
    default_filter: &str,
    json: bool,
    default_service: &str,
    cfg: &TelemetryConfig,
) -> Telemetry {
    install(default_filter, json, Some((default_service, cfg)))
}

/// [`init`]; `traced: None` installs the log output only, whatever the environment says.
pub(crate) fn install(
    default_filter: &str,
    json: bool,
    traced: Option<(&str, &TelemetryConfig)>,
) -> Telemetry {
    let filter =
        EnvFilter::try_from_env("SCABBARD_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let filter = crate::logging::silence_secrets(filter);
    let provider = match traced.and_then(|(service, cfg)| Some((service, cfg, cfg.endpoint()?))) {
        None => None,
        Some((default_service, cfg, endpoint)) => match provider(&endpoint, default_service, cfg) {
            Ok(p) => {
                let _ = ENDPOINT.set(endpoint);
                Some(p)
            }
            Err(e) => {
                eprintln!("error: tracing stays off: {e}");
                None
            }
        },
    };
    let otel = provider.as_ref().map(|p| {
        let tracer = p.tracer("scabbard");
        let _ = TRACER.set(tracer.clone());
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_error_records_to_exceptions(false)
            // Its own filter: spans are traced at info level whatever SCABBARD_LOG says
            // (the CLI logs only warnings, yet its command span belongs in the trace).
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                let target = meta.target();
                *meta.level() <= tracing::Level::INFO
                    && !NOT_TRACED.iter().any(|t| {
                        target
                            .strip_prefix(t)
                            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
                    })
            }))
    });
    let fmt = crate::logging::fmt_layer(json).with_filter(filter);
    // Without an endpoint the subscriber is the log layer alone (no `Option` layer either,
    // whose `None` would still take part in every callsite's interest).
    let installed = match otel {
        Some(otel) => tracing_subscriber::registry()
            .with(fmt)
            .with(otel)
            .try_init(),
        None => tracing_subscriber::registry().with(fmt).try_init(),
    }
    .is_ok();
    if installed && provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        ENABLED.store(true, Ordering::Relaxed);
    }
    Telemetry {
        provider: if installed { provider } else { None },
    }
}

fn provider(
    endpoint: &str,
    default_service: &str,
    cfg: &TelemetryConfig,
) -> crate::Result<SdkTracerProvider> {
    let sampler = cfg.sampler()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| crate::Error::invalid(format!("OTLP endpoint {endpoint:?}: {e}")))?;
    // The default resource reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if env_nonempty("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(
            cfg.service_name
                .clone()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| default_service.to_string()),
        );
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_id_generator(context::Ids::default())
        .with_resource(resource.build())
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_parses_with_a_numeric_or_textual_ratio() {
        for text in ["sampler_arg = 0.25", "sampler_arg = \"0.25\""] {
            let cfg: TelemetryConfig = parse(text);
            assert_eq!(cfg.sampler_arg.as_deref(), Some("0.25"));
        }
        let cfg: TelemetryConfig = parse("otlp_endpoint = \"http://c:4317\"");
        assert_eq!(cfg.otlp_endpoint.as_deref(), Some("http://c:4317"));
        assert_eq!(cfg.sampler_arg, None);
    }

    #[test]
    fn bad_sampler_settings_are_refused_with_the_key() {
        let cfg = TelemetryConfig {
            sampler: Some("sometimes".into()),
            ..Default::default()
        };
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("sampler") && e.contains("sometimes"), "{e}");
        let cfg = TelemetryConfig {
            sampler: Some("traceidratio".into()),
            sampler_arg: Some("2".into()),
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
    }

    fn parse(text: &str) -> TelemetryConfig {
        toml::from_str(text).expect("parses")
    }
}
