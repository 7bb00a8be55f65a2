//! The workflow definition file format: the YAML (or JSON, which is YAML too) a user writes
//! for `scabbard workflow submit -f`, and the `workflow:` body of a template. This module
//! owns the file shape, its reading into a [`proto::WorkflowSpec`] with errors that name
//! the field path (`tasks[2].retry.multiplier: ...`), and the way back ([`to_yaml`]).
//!
//! ```yaml
//! name: build-and-test
//! failure_policy: fail_fast          # or continue
//! default_retry: {max_attempts: 3, initial_backoff: 1s, retry_on: [exit_code]}
//! tasks:
//!   - name: build
//!     shell: {command: [sh, -c, make]}   # exactly one of shell / container / dagger_call / noop
//!     timeout: 10m                       # ms, s, m, h, d, combinations, or milliseconds
//!   - name: test
//!     depends_on: [build]
//!     container: {image: "golang:1.23", steps: [{args: [go, test, ./...]}]}
//! ```
//!
//! Unknown keys are refused everywhere. Text fields take any scalar and number fields take
//! text holding a number, so rendered template placeholders fit either. Only structure is
//! checked here; the controller checks names, references and cycles.

use std::fmt;

use crate::proto;

mod convert;
mod model;
mod scalar;

pub use scalar::{format_duration_ms, parse_duration_ms};
/// The YAML value tree ([`workflow_from_value`] takes one; templates render on it).
pub use serde_yaml_ng::{Mapping, Value};

/// A problem at one place of a workflow definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where: `tasks[2].retry.multiplier`; empty for the document itself.
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for FieldError {}

/// Reads a workflow file. Errors start with `origin` (a file name, `-` for stdin) and name
/// the field path and, for syntax and type errors, the line and column.
pub fn parse_workflow(
    text: &str,
    origin: &str,
) -> std::result::Result<proto::WorkflowSpec, String> {
    let def: model::WorkflowDef = serde_yaml_ng::from_str(text).map_err(|e| {
        // serde_yaml_ng already writes "path: message at line L column C".
        format!("{origin}: {e}")
    })?;
    convert::workflow(def).map_err(|e| format!("{origin}: {e}"))
}

/// Reads a workflow from a parsed YAML value (a rendered template body). Errors name the
/// field path within the value.
pub fn workflow_from_value(value: Value) -> std::result::Result<proto::WorkflowSpec, FieldError> {
    let def: model::WorkflowDef = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        FieldError {
            path: if path == "." { String::new() } else { path },
            message: e.into_inner().to_string(),
        }
    })?;
    convert::workflow(def)
}

/// Writes a workflow spec in the file format; [`parse_workflow`] reads it back to the same
/// spec (except `TaskSpec.name`, which the file format leaves to the controller).
pub fn to_yaml(spec: &proto::WorkflowSpec) -> String {
    let def = convert::from_workflow(spec);
    serde_yaml_ng::to_string(&def)
        .unwrap_or_else(|e| format!("# the workflow cannot be written as YAML: {e}\n"))
}

#[cfg(test)]
mod tests;
