//! Log output shared by the binaries: `RUST_LOG`-style filter (`SCABBARD_LOG`), text or
//! JSON lines on stderr. While a traced span is active (tracing on, see
//! [`crate::telemetry`]) every line carries its `trace_id` and `span_id`.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{Format, Full, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, format::DefaultFields};
use tracing_subscriber::registry::LookupSpan;

/// `filter` with the targets that may log secrets turned off, whatever it says: the Dagger
/// SDK logs every query's text at trace level, `setSecret` plaintexts included (the worker
/// logs its queries itself, secrets masked, under `scabbard_worker`).
pub fn silence_secrets(filter: EnvFilter) -> EnvFilter {
    match "dagger_sdk::querybuilder=off".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Installs the global subscriber without tracing (tools and tests). `json` selects one
/// JSON object per line. Safe to call more than once (later calls do nothing).
pub fn init(default_filter: &str, json: bool) {
    // Logs only: the guard holds nothing.
    let _ = crate::telemetry::install(default_filter, json, None);
}

/// Whether text log lines get ANSI colours: only when stderr is a terminal and `NO_COLOR`
/// is unset (files, pipes and journald get plain text).
pub fn ansi_colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The log layer: text or JSON lines on stderr, with trace ids.
pub(crate) fn fmt_layer<S>(json: bool) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    if json {
        Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .fmt_fields(JsonFields::new())
                .event_format(WithTraceIds(Format::default().json()))
                .with_writer(std::io::stderr),
        )
    } else {
        Box::new(
            tracing_subscriber::fmt::layer()
                .fmt_fields(DefaultFields::new())
                .event_format(WithTraceIds(Format::<Full>::default()))
                .with_ansi(ansi_colours())
                .with_writer(std::io::stderr),
        )
    }
}

/// An event format adding `trace_id`/`span_id` of the active traced span.
struct WithTraceIds<F>(F);

/// The active span's ids (only while tracing is on).
fn trace_ids() -> Option<(String, String)> {
    if !crate::telemetry::enabled() {
        return None;
    }
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

impl<S, N> FormatEvent<S, N> for WithTraceIds<Format<Full>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some((trace, span)) = trace_ids() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.strip_suffix('\n').unwrap_or(&line);
        writeln!(writer, "{body} trace_id={trace} span_id={span}")
    }
}

impl<S, N> FormatEvent<S, N> for WithTraceIds<Format<Json>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some((trace, span)) = trace_ids() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace}\",\"span_id\":\"{span}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}
