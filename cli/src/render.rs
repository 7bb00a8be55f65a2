//! The output format chosen with the global `-o/--output table|json|yaml`, and printing
//! resources in it. JSON is the proto3 JSON mapping of the protocol messages (the serde
//! impls `scabbard-common` generates with `pbjson-build`): lowerCamelCase field names,
//! enums by name, 64-bit integers as strings, every field present. One resource is one
//! object, a list is one array, and a stream (`--wait`, `--follow`, `--watch`) is one
//! compact object per line (JSON Lines). YAML is the same value as YAML (a stream: one
//! document per event, each starting with `---`). See docs/cli.md.

use std::io::Write;
use std::sync::OnceLock;

use anyhow::Result;
use serde::Serialize;

/// `-o/--output`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum Format {
    /// Tables and text for people (control characters escaped).
    #[default]
    #[value(alias = "text")]
    Table,
    /// The proto3 JSON mapping; streams as JSON Lines.
    Json,
    /// The same value as YAML; streams as `---` documents.
    Yaml,
}

static FORMAT: OnceLock<Format> = OnceLock::new();

/// Records the global `-o` (once, from `main`).
pub(crate) fn set(f: Format) {
    let _ = FORMAT.set(f);
}

/// The format chosen with `-o` (table by default).
pub(crate) fn format() -> Format {
    FORMAT.get().copied().unwrap_or_default()
}

/// Whether a machine-readable format was asked for.
pub(crate) fn structured() -> bool {
    format() != Format::Table
}

/// Prints `value` (a message, or a slice of them for a list) in the chosen format, or
/// calls `table` in table format.
pub(crate) fn show<T: Serialize + ?Sized>(value: &T, table: impl FnOnce()) -> Result<()> {
    match format() {
        Format::Table => {
            table();
            Ok(())
        }
        Format::Json => {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, value)?;
            writeln!(out)?;
            Ok(())
        }
        Format::Yaml => {
            let text = serde_yaml_ng::to_string(&serde_json::to_value(value)?)?;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            Ok(())
        }
    }
}

/// Prints one event of a stream: a JSON line, or a YAML document; flushed at once so a
/// reader sees each event as it happens. Does nothing in table format.
pub(crate) fn event<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match format() {
        Format::Table => return Ok(()),
        Format::Json => {
            serde_json::to_writer(&mut out, value)?;
            writeln!(out)?;
        }
        Format::Yaml => {
            let text = serde_yaml_ng::to_string(&serde_json::to_value(value)?)?;
            write!(out, "---\n{text}")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Where a list stopped short of its end (no `--all`): the next page token, on stderr in
/// every format, so stdout stays one table, array or document.
pub(crate) fn next_page(token: &str) {
    eprintln!(
        "next page: --page-token {}",
        crate::printable::printable(token)
    );
}

/// A list's items, fetched page by page from `first` (a page token; empty: the start):
/// every page with `all`, else that one.
pub(crate) async fn pages<T, F, Fut>(all: bool, first: String, mut page: F) -> Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String)>>,
{
    let mut items = Vec::new();
    let mut token = first;
    loop {
        let (got, next) = page(token).await?;
        items.extend(got);
        if next.is_empty() {
            break;
        }
        if !all {
            next_page(&next);
            break;
        }
        token = next;
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use scabbard_common::proto::{Task, TaskState};

    #[test]
    fn tasks_follow_the_proto_json_mapping() {
        let t = Task {
            id: "01J".into(),
            state: TaskState::Running as i32,
            created_at_ms: 1_700_000_000_000,
            ..Default::default()
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["id"], "01J");
        assert_eq!(v["state"], "TASK_STATE_RUNNING");
        // int64 as a string; every field present, defaults included.
        assert_eq!(v["createdAtMs"], "1700000000000");
        assert_eq!(v["agentId"], "");
        let back: Task = serde_json::from_value(v).unwrap();
        assert_eq!(back, t);
        // YAML escapes control characters as JSON does.
        let y =
            serde_yaml_ng::to_string(&serde_json::json!({"name": "\u{1b}[31mred\u{7}"})).unwrap();
        assert!(!y.contains('\u{1b}') && !y.contains('\u{7}'), "{y}");
    }
}
