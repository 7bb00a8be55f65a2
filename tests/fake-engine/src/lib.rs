//! A behavioural model of the Dagger engine, for tests on machines where no real engine can
//! run: the `fake-dagger` binary stands in for the `dagger` CLI, and this library sets up
//! its world and reads what happened.
//!
//! # What it models
//!
//! `fake-dagger session` serves Dagger's GraphQL API (as dagger-sdk 0.21 speaks it) for one
//! session of a simulated engine whose state — exec cache, cache volumes, content store —
//! lives in a directory and persists across sessions, like a real engine's:
//!
//! - **Execs really run.** Each `withExec` runs its argv as a host process in a scratch root
//!   holding the container's files (a static busybox base plus the image's fixture files,
//!   the parent exec's result, added files and directories, mounted directories and cache
//!   volumes), chrooted with its own PID namespace, environment cleared to the container's.
//!   Their output streams live to the session's stderr.
//! - **Exec results are cached per op chain**, as BuildKit does: an identical chain never
//!   runs twice (in this or a later session), any difference — an env value, a file's
//!   content, an argument — runs again. Secret values and time never take part.
//! - **The outside world is read when an ID is resolved**: host directories and files, git
//!   refs (resolved to commits with the host's `git`), downloads, image fixtures.
//! - **Results leave for real**: `export` writes files on the host, `publish` writes an
//!   image tar to the fixtures' registry (with credentials checked).
//!
//! # What it does not model
//!
//! No real images (an image is busybox plus fixture files, and host binaries outside the
//! root are unreachable), no network (git and http come from fixture tables), no platforms,
//! entrypoints, services, modules, terminals or interactive sessions, no `/proc` in execs,
//! no BuildKit semantics beyond exec caching (no layer sharing, no lazy pulls, no pruning;
//! `PRIVATE` cache sharing behaves as `SHARED`; `LOCKED` holds the volume for the whole
//! exec). Cache-volume changes are copied back after the exec, last writer wins. Fields and
//! arguments it does not model are GraphQL errors naming them.
//!
//! See `docs/dagger.md` ("The fake engine") for the runner host and fixtures layout.

#![warn(missing_docs)]

mod cli;
mod container;
mod engine;
mod error;
mod eval;
mod exec;
pub mod fixtures;
mod fsutil;
mod glob;
mod object;
mod query;
pub mod records;
mod registry;
mod resolve;
mod server;
mod sources;
mod store;

pub use fixtures::{
    EngineState, Fixtures, LocalRepo, fake_dagger_bin, image_dir_name, runner_host,
};
pub use records::{ExecRecord, Push};

/// The `fake-dagger` binary's entry point: runs the command line `args` (program name
/// first) and returns the exit code.
pub fn fake_dagger_main(args: Vec<String>) -> i32 {
    cli::main(args)
}
