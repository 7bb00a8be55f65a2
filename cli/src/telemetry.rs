//! Tracing for the binary: which service a process is (`scabbard-controller`,
//! `scabbard-worker`, `scabbard-dev`, `scabbard-cli`), its `[telemetry]` settings (a
//! daemon's config file; the `OTEL_*` variables override them, and are all the CLI reads),
//! and the span a CLI command runs in (its RPCs carry it as `traceparent`).

use clap::ArgMatches;
use scabbard_common::telemetry::TelemetryConfig;

use crate::args::{Cli, Command};

/// The default service name and the `[telemetry]` section of the daemon's config file.
/// A config file that cannot be read or parsed gives the defaults here: the daemon's own
/// loading reports the error.
pub(crate) fn settings(cli: &Cli) -> (&'static str, TelemetryConfig) {
    let (service, file) = match &cli.command {
        Command::Controller(a) => ("scabbard-controller", a.config.as_deref()),
        Command::Worker(a) => ("scabbard-worker", a.config.as_deref()),
        Command::Dev(_) => ("scabbard-dev", None),
        _ => ("scabbard-cli", None),
    };
    let cfg = file
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|mut t| t.remove("telemetry"))
        .and_then(|v| v.try_into().ok())
        .unwrap_or_default();
    (service, cfg)
}

/// `scabbard task list` for the matches of `scabbard … task list …` (the span name).
pub(crate) fn command_name(m: &ArgMatches) -> String {
    let mut name = String::from("scabbard");
    let mut cur = m;
    while let Some((sub, next)) = cur.subcommand() {
        name.push(' ');
        name.push_str(sub);
        cur = next;
    }
    name
}
