//! The serde shape of a workflow file: one struct per protocol message, field names as
//! the user writes them, unknown keys refused. Conversion to and from the protocol lives in
//! `convert`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::scalar;

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}
fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}
fn is_false(v: &bool) -> bool {
    !*v
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkflowDef {
    #[serde(
        default,
        deserialize_with = "scalar::string",
        skip_serializing_if = "String::is_empty"
    )]
    pub(crate) name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) failure_policy: Option<FailurePolicyDef>,
    #[serde(
        default,
        deserialize_with = "scalar::int",
        skip_serializing_if = "is_zero_i32"
    )]
    pub(crate) priority: i32,
    #[serde(
        default,
        deserialize_with = "scalar::string_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) concurrency: Option<ConcurrencyDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) default_retry: Option<RetryDef>,
    pub(crate) tasks: Vec<TaskDef>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FailurePolicyDef {
    FailFast,
    Continue,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FailureClassDef {
    ExitCode,
    Timeout,
    Infrastructure,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SharingDef {
    Shared,
    Private,
    Locked,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConcurrencyDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) key: String,
    #[serde(
        default,
        deserialize_with = "scalar::int",
        skip_serializing_if = "is_zero_u32"
    )]
    pub(crate) limit: u32,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryDef {
    #[serde(
        default,
        deserialize_with = "scalar::int",
        skip_serializing_if = "is_zero_u32"
    )]
    pub(crate) max_attempts: u32,
    #[serde(
        default,
        deserialize_with = "scalar::duration_ms",
        serialize_with = "scalar::ser_duration_ms",
        skip_serializing_if = "is_zero_u64"
    )]
    pub(crate) initial_backoff: u64,
    #[serde(
        default,
        deserialize_with = "scalar::duration_ms",
        serialize_with = "scalar::ser_duration_ms",
        skip_serializing_if = "is_zero_u64"
    )]
    pub(crate) max_backoff: u64,
    #[serde(
        default,
        deserialize_with = "scalar::float",
        skip_serializing_if = "is_zero_f64"
    )]
    pub(crate) multiplier: f64,
    #[serde(
        default,
        deserialize_with = "scalar::float",
        skip_serializing_if = "is_zero_f64"
    )]
    pub(crate) jitter: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) retry_on: Vec<FailureClassDef>,
    #[serde(
        default,
        deserialize_with = "scalar::ints",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) retry_exit_codes: Vec<i32>,
    #[serde(
        default,
        deserialize_with = "scalar::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) max_infra_retries: Option<u32>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TaskDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) name: String,
    #[serde(
        default,
        deserialize_with = "scalar::strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) depends_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) shell: Option<ShellDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) container: Option<ContainerDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dagger_call: Option<DaggerCallDef>,
    /// `Some(None)` for a bare `noop:`; `Some(Some(_))` for `noop: {}`.
    #[serde(
        default,
        deserialize_with = "scalar::present",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) noop: Option<Option<NoopDef>>,
    #[serde(
        default,
        deserialize_with = "scalar::string_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub(crate) env: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "scalar::string_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub(crate) secret_env: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "scalar::string_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) requirements: Option<RequirementsDef>,
    #[serde(
        default,
        deserialize_with = "scalar::int",
        skip_serializing_if = "is_zero_i32"
    )]
    pub(crate) priority: i32,
    #[serde(
        default,
        deserialize_with = "scalar::duration_ms",
        serialize_with = "scalar::ser_duration_ms",
        skip_serializing_if = "is_zero_u64"
    )]
    pub(crate) timeout: u64,
    #[serde(
        default,
        deserialize_with = "scalar::opt_int",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) max_infra_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) retry: Option<RetryDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) concurrency: Option<ConcurrencyDef>,
    #[serde(
        default,
        deserialize_with = "scalar::strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) breakers: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) outputs: Vec<OutputDef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) artifacts: Vec<ArtifactDef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) inputs: Vec<InputDef>,
    /// `true`/`false` once rendered; false skips the node.
    #[serde(
        default,
        deserialize_with = "scalar::string",
        skip_serializing_if = "String::is_empty"
    )]
    pub(crate) when: String,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ArtifactDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) name: String,
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) path: String,
    #[serde(
        default,
        deserialize_with = "scalar::boolean",
        skip_serializing_if = "is_false"
    )]
    pub(crate) optional: bool,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InputDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) from: String,
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) path: String,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GitDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) url: String,
    #[serde(
        default,
        deserialize_with = "scalar::string",
        skip_serializing_if = "String::is_empty"
    )]
    pub(crate) r#ref: String,
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) path: String,
    #[serde(
        default,
        deserialize_with = "scalar::boolean",
        skip_serializing_if = "is_false"
    )]
    pub(crate) keep_git_dir: bool,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) url: String,
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) path: String,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShellDef {
    #[serde(deserialize_with = "scalar::strings")]
    pub(crate) command: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoopDef {}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DaggerCallDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) module: String,
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) function: String,
    #[serde(
        default,
        deserialize_with = "scalar::strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) args: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ContainerDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) image: String,
    #[serde(
        default,
        deserialize_with = "scalar::string",
        skip_serializing_if = "String::is_empty"
    )]
    pub(crate) workdir: String,
    #[serde(
        default,
        deserialize_with = "scalar::string",
        skip_serializing_if = "String::is_empty"
    )]
    pub(crate) registry_auth: String,
    #[serde(default)]
    pub(crate) steps: Vec<StepDef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) secrets: Vec<SecretDef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) caches: Vec<CacheDef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) directories: Vec<DirectoryDef>,
    #[serde(
        default,
        deserialize_with = "scalar::strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) gpus: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) git: Vec<GitDef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) downloads: Vec<HttpDef>,
    #[serde(
        default,
        deserialize_with = "scalar::boolean",
        skip_serializing_if = "is_false"
    )]
    pub(crate) cache: bool,
    #[serde(
        default,
        deserialize_with = "scalar::string",
        skip_serializing_if = "String::is_empty"
    )]
    pub(crate) publish: String,
    #[serde(
        default,
        deserialize_with = "scalar::strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) entrypoint: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StepDef {
    #[serde(
        default,
        deserialize_with = "scalar::string",
        skip_serializing_if = "String::is_empty"
    )]
    pub(crate) name: String,
    #[serde(deserialize_with = "scalar::strings")]
    pub(crate) args: Vec<String>,
    #[serde(
        default,
        deserialize_with = "scalar::boolean",
        skip_serializing_if = "is_false"
    )]
    pub(crate) cache: bool,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SecretDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) env: String,
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) source: String,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) volume: String,
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sharing: Option<SharingDef>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DirectoryDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) host_path: String,
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) path: String,
    #[serde(
        default,
        deserialize_with = "scalar::strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) exclude: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequirementsDef {
    #[serde(
        default,
        deserialize_with = "scalar::strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub(crate) capabilities: Vec<String>,
    #[serde(
        default,
        deserialize_with = "scalar::string_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub(crate) labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutputDef {
    #[serde(deserialize_with = "scalar::string")]
    pub(crate) name: String,
    #[serde(
        default,
        deserialize_with = "scalar::opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) path: Option<String>,
    #[serde(
        default,
        deserialize_with = "scalar::boolean",
        skip_serializing_if = "is_false"
    )]
    pub(crate) last_stdout_line: bool,
    #[serde(
        default,
        deserialize_with = "scalar::opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) container_path: Option<String>,
    #[serde(
        default,
        deserialize_with = "scalar::opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) git_commit: Option<String>,
    #[serde(
        default,
        deserialize_with = "scalar::boolean",
        skip_serializing_if = "is_false"
    )]
    pub(crate) published: bool,
}
