//! Pieces shared by the controller, the worker, the CLI and the tests: the generated
//! `scabbard.v1` protocol, the one error type (which carries its gRPC code), ids, time,
//! jittered backoff, the client library, logging and tracing setup.

pub mod artifact;
pub mod audit_actions;
pub mod backoff;
pub mod client;
pub mod error;
pub mod logging;
pub mod metrics_http;
pub mod private;
pub mod telemetry;
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

#[cfg(test)]
mod json_mapping_tests {
    use super::proto::{LogChunk, SubmitTaskRequest, task_spec::Kind};

    /// What an HTTP client would send: the proto3 JSON mapping, oneofs by their field name.
    #[test]
    fn requests_parse_from_the_proto3_json_mapping() {
        let req: SubmitTaskRequest = serde_json::from_str(
            r#"{"spec": {"name": "build", "shell": {"command": ["make", "test"]},
                "timeoutMs": "60000", "labels": {"team": "ci"}}, "project": "web"}"#,
        )
        .expect("parses");
        let spec = req.spec.expect("spec");
        assert_eq!(spec.timeout_ms, 60_000);
        assert!(matches!(spec.kind, Some(Kind::Shell(ref s)) if s.command == ["make", "test"]));
        // Unknown fields are refused, naming them.
        let e = serde_json::from_str::<SubmitTaskRequest>(r#"{"spek": {}}"#).unwrap_err();
        assert!(e.to_string().contains("spek"), "{e}");
        // Bytes are base64; enums by name.
        let c = LogChunk {
            data: b"hi\n".to_vec(),
            stream: super::proto::LogStream::Stdout as i32,
            ..Default::default()
        };
        let v = serde_json::to_value(&c).expect("serializes");
        assert_eq!(v["data"], "aGkK");
        assert_eq!(v["stream"], "LOG_STREAM_STDOUT");
        assert_eq!(v["seq"], "0");
    }
}
