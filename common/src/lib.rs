//! Pieces shared by the controller, the worker, the CLI and the tests: the generated
//! `scabbard.v1` protocol, the one error type (which carries its gRPC code), ids, time,
//! jittered backoff, the client library and logging setup.

pub mod artifact;
pub mod backoff;
pub mod client;
pub mod error;
pub mod logging;
pub mod private;
pub mod time;
pub mod tls;
pub mod wfdef;

pub use error::{Error, Result};

/// Generated protocol code for package `scabbard.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("scabbard.v1");
    // serde `Serialize`/`Deserialize` of every message and enum, following the proto3
    // JSON mapping (see `build.rs`): `serde_json::to_value(&task)`.
    include!(concat!(env!("OUT_DIR"), "/scabbard.v1.serde.rs"));

    /// Encoded file descriptor set of the protocol, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("scabbard_descriptor");
}

/// Final states: nothing moves a task out of them.
pub fn is_final(state: proto::TaskState) -> bool {
    use proto::TaskState::*;
    matches!(state, Succeeded | Failed | Cancelled | TimedOut)
}

/// Metadata key holding the leader's address on a redirect.
pub const LEADER_METADATA_KEY: &str = "x-scabbard-leader";
