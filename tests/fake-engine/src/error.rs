//! The one failure type of the engine's resolvers, and its GraphQL shape.

use serde_json::{Value, json};

/// Why a field could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Failure {
    /// Anything but an exec's exit code: an unknown image, a missing path, an unsupported
    /// field, an I/O error of the engine.
    #[error("{0}")]
    Engine(String),
    /// An exec whose exit code its `expect` does not accept, shaped like Dagger's
    /// `ExecError`.
    #[error("process \"{}\" did not complete successfully: exit code: {exit_code}", cmd.join(" "))]
    Exec {
        cmd: Vec<String>,
        exit_code: i32,
        stdout: String,
        stderr: String,
    },
}

impl Failure {
    pub(crate) fn engine(message: impl Into<String>) -> Self {
        Failure::Engine(message.into())
    }

    /// The GraphQL error object, `path` being the response keys down to the failing field.
    pub(crate) fn to_graphql(&self, path: &[String]) -> Value {
        let mut error = json!({ "message": self.to_string(), "path": path });
        if let Failure::Exec {
            cmd,
            exit_code,
            stdout,
            stderr,
        } = self
        {
            error["extensions"] = json!({
                "_type": "EXEC_ERROR",
                "cmd": cmd,
                "exitCode": exit_code,
                "stdout": stdout,
                "stderr": stderr,
            });
        }
        error
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Engine(format!("fake engine: {e}"))
    }
}

/// Adds what the engine was doing to an I/O error.
pub(crate) trait Context<T> {
    fn context(self, doing: impl FnOnce() -> String) -> Result<T, Failure>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn context(self, doing: impl FnOnce() -> String) -> Result<T, Failure> {
        self.map_err(|e| Failure::Engine(format!("fake engine: {}: {e}", doing())))
    }
}
