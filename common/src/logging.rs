//! `tracing` setup shared by the binaries: `RUST_LOG`-style filter, pretty or JSON output.

use tracing_subscriber::EnvFilter;

/// `filter` with the targets that may log secrets turned off, whatever it says: the Dagger
/// SDK logs every query's text at trace level, `setSecret` plaintexts included (the worker
/// logs its queries itself, secrets masked, under `scabbard_worker`).
pub fn silence_secrets(filter: EnvFilter) -> EnvFilter {
    match "dagger_sdk::querybuilder=off".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Installs the global subscriber. `json` selects one JSON object per line. Safe to call
/// more than once (later calls do nothing).
pub fn init(default_filter: &str, json: bool) {
    let filter =
        EnvFilter::try_from_env("SCABBARD_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let filter = silence_secrets(filter);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
