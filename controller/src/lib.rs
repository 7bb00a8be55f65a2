//! The Scabbard controller: registers agents, holds their session streams, keeps the task
//! state machine and the run queue, and persists everything in the store before it is
//! acknowledged.
//!
//! Layout: [`api`] (thin tonic services) → [`core`] (the actor owning live state) →
//! [`store`] (etcd-like store interface and backends); [`session`] runs one actor per
//! agent stream; [`logstore`] keeps task logs; [`artifacts`] keeps artifacts (local disk
//! or S3) and moves their bytes; [`server`] wires it all to a listener.

pub mod api;
pub mod artifacts;
pub mod audit;
pub mod auth;
pub mod config;
pub mod config_view;
pub mod core;
pub mod forward;
pub mod http;
pub mod leader;
pub mod limits;
pub mod listener;
pub mod logstore;
pub mod membership;
pub mod metrics;
pub mod process;
pub(crate) mod resolve;
pub(crate) mod retention;
pub mod rpc_trace;
pub mod schedules;
pub mod sealed;
pub mod server;
mod session;
pub mod store;
pub mod templates;
pub mod tls;
pub mod workflow;

pub use config::ControllerConfig;
pub use server::{RunningController, run, serve, spawn};
