//! Thin tonic services: each method checks its input's shape, calls the core (or the log
//! store) and maps the domain error to a `Status` through `scabbard_common::Error`.

mod admin;
mod agents;
mod artifacts;
mod guard;
mod list;
mod logs;
mod placement;
mod projects;
mod rerun;
mod schedules;
pub(crate) mod streams;
mod tasks;
mod templates;
pub(crate) mod workflows;

pub use admin::AdminApi;
pub use agents::AgentApi;
pub use artifacts::ArtifactApi;
pub use projects::ProjectApi;
pub use schedules::ScheduleApi;
pub use streams::StreamLimits;
pub use tasks::TaskApi;
pub use templates::TemplateApi;
pub use workflows::WorkflowApi;
