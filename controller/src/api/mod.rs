//! Thin tonic services: each method checks its input's shape, calls the core (or the log
//! store) and maps the domain error to a `Status` through `scabbard_common::Error`.

mod admin;
mod agents;
mod guard;
mod logs;
mod projects;
mod tasks;
mod workflows;

pub use admin::AdminApi;
pub use agents::AgentApi;
pub use projects::ProjectApi;
pub use tasks::TaskApi;
pub use workflows::WorkflowApi;
