//! The artifact store: files and directories tasks produce (packed as tar + zstd by the
//! worker) kept on this controller's disk or in an S3-compatible bucket, and the domain
//! side of `ArtifactService`.
//!
//! * [`config`]: the `[artifacts]` config section (backend, S3 settings, size limits);
//! * [`store`]: [`ArtifactStore`], the blob store behind `object_store` — atomic uploads
//!   (visible only once complete and checked), ranged reads, background deletes;
//! * [`serve`]: [`Artifacts`], what the tonic service calls: it asks the core who may do
//!   what (the core holds task state and records uploads durably) and moves the bytes
//!   itself, so the core never waits on the store.

pub mod config;
pub mod serve;
pub mod store;

#[cfg(test)]
mod tests;

pub use config::{ArtifactsConfig, S3Config};
pub use serve::Artifacts;
pub use store::{ArtifactStore, Expected};

use scabbard_common::{Error, Result};

/// Bytes of data per message, both ways (the protocol's chunk size).
pub const CHUNK_BYTES: usize = 1 << 20;

/// How long an upload may go without a message before it is dropped.
pub const UPLOAD_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Checks an artifact name as it appears in requests (`field` names it in errors): 1-128
/// letters, digits, `_`, `-` and `.`, not `.` or `..`.
pub fn check_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(format!("{field} is required")));
    }
    if name.len() > 128
        || name == "."
        || name == ".."
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(Error::invalid(format!(
            "{field} {name:?} is not an artifact name (1-128 letters, digits, '_', '-' or '.')"
        )));
    }
    Ok(())
}

/// Checks an id in a request (`field` names it in errors).
pub fn check_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(format!("{field} is required")));
    }
    if id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::invalid(format!(
            "{field} {id:?} is malformed (expected letters, digits, '-' or '_')"
        )));
    }
    Ok(())
}

/// A byte count for people: `5.0 GiB`, `300.0 MiB`, `512 B`.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}
