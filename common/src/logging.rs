//! `tracing` setup shared by the binaries: `RUST_LOG`-style filter, pretty or JSON output.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `json` selects one JSON object per line. Safe to call
/// more than once (later calls do nothing).
pub fn init(default_filter: &str, json: bool) {
    let filter =
        EnvFilter::try_from_env("SCABBARD_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
