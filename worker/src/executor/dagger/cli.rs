//! Finding the `dagger` CLI and the environment its processes get.
//!
//! The CLI is, in order: `[dagger].cli`, the worker's `_EXPERIMENTAL_DAGGER_CLI_BIN`, then
//! `dagger` in `PATH`. It is checked here (an executable file), because the SDK skips a bad
//! `_EXPERIMENTAL_DAGGER_CLI_BIN` silently and goes on to download one. Nothing is ever
//! downloaded unless `offline = false`; then the SDK's downloader fetches the CLI version
//! it was built for into its cache, once.
//!
//! The CLI's processes get a cleared environment: what it needs to find its engine, its
//! configuration and the network ([`INHERITED`]), the configured runner host,
//! `DO_NOT_TRACK=1` when offline, and `DAGGER_NO_NAG=1`.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::DaggerConfig;

/// Variable through which the SDK and our code name a pre-installed CLI.
pub(super) const CLI_BIN_ENV: &str = "_EXPERIMENTAL_DAGGER_CLI_BIN";
/// Variable through which the CLI is told which engine to use.
pub(super) const RUNNER_HOST_ENV: &str = "_EXPERIMENTAL_DAGGER_RUNNER_HOST";
/// `PATH` for the CLI when the worker itself has none.
const FALLBACK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Variables of the worker's environment the CLI keeps: where its configuration, caches
/// and Docker are, and how to reach the network. Nothing else (tokens of the worker's own
/// environment stay out).
const INHERITED: &[&str] = &[
    "HOME",
    "USER",
    "LOGNAME",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_STATE_HOME",
    "DOCKER_HOST",
    "DOCKER_CONTEXT",
    "DOCKER_CONFIG",
    "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    RUNNER_HOST_ENV,
];

/// Finds the CLI without downloading anything; the error says what was tried.
pub(super) fn find_cli(cfg: &DaggerConfig) -> Result<PathBuf, String> {
    if let Some(cli) = &cfg.cli {
        return resolve(cli)
            .map_err(|why| format!("dagger CLI {} (dagger.cli): {why}", cli.display()));
    }
    if let Some(bin) = std::env::var_os(CLI_BIN_ENV).filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        return resolve(&bin)
            .map_err(|why| format!("dagger CLI {} ({CLI_BIN_ENV}): {why}", bin.display()));
    }
    resolve(Path::new("dagger")).map_err(|_| {
        "dagger CLI not found: no `dagger` in PATH; install it, or set dagger.cli in the \
         worker config (or _EXPERIMENTAL_DAGGER_CLI_BIN)"
            .to_string()
    })
}

/// Finds the CLI; when there is none and the worker is not offline, lets the SDK download
/// the version it was built for.
pub(super) async fn cli_path(cfg: &DaggerConfig) -> Result<PathBuf, String> {
    match find_cli(cfg) {
        Ok(path) => Ok(path),
        Err(why) if cfg.offline => Err(format!(
            "{why} (offline = true: the worker never downloads the CLI)"
        )),
        Err(why) => {
            let version = dagger_sdk::core::DAGGER_ENGINE_VERSION.to_string();
            tracing::info!(%why, %version, "downloading the dagger CLI (dagger.offline = false)");
            dagger_sdk::core::downloader::Downloader::new(version)
                .get_cli()
                .await
                .map_err(|e| format!("{why}; downloading it failed: {}", error_chain(&e)))
        }
    }
}

/// `program` as an executable file: a path with a `/` as it is, a bare name from `PATH`.
fn resolve(program: &Path) -> Result<PathBuf, String> {
    if program.components().count() > 1 || program.is_absolute() {
        return executable(program).map(|()| program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| FALLBACK_PATH.into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| executable(candidate).is_ok())
        .ok_or_else(|| format!("{} not found in PATH", program.display()))
}

fn executable(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err("is not a file".into()),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err("is not executable".into()),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("does not exist".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The environment of every CLI process (`dagger session`, `dagger call`).
pub(super) fn cli_env(cfg: &DaggerConfig) -> Vec<(String, OsString)> {
    let mut env: Vec<(String, OsString)> = vec![(
        "PATH".into(),
        std::env::var_os("PATH").unwrap_or_else(|| FALLBACK_PATH.into()),
    )];
    for name in INHERITED {
        if let Some(value) = std::env::var_os(name) {
            env.push(((*name).to_string(), value));
        }
    }
    if let Some(host) = &cfg.runner_host {
        env.retain(|(k, _)| k != RUNNER_HOST_ENV);
        env.push((RUNNER_HOST_ENV.into(), host.into()));
    }
    if cfg.offline {
        env.push(("DO_NOT_TRACK".into(), "1".into()));
    }
    // No Dagger Cloud sign-up hints in the task's log.
    env.push(("DAGGER_NO_NAG".into(), "1".into()));
    env
}

/// An error and its sources on one line.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string().trim().to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let message = s.to_string();
        let message = message.trim();
        if !message.is_empty() && !text.contains(message) {
            text.push_str(": ");
            text.push_str(message);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_cli_must_be_an_executable_file() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("dagger");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let cfg = DaggerConfig {
            cli: Some(script.clone()),
            ..Default::default()
        };
        let err = find_cli(&cfg).unwrap_err();
        assert!(
            err.contains("is not executable") && err.contains("dagger.cli"),
            "{err}"
        );
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_cli(&cfg).unwrap(), script);
        let cfg = DaggerConfig {
            cli: Some(dir.path().join("missing")),
            ..Default::default()
        };
        assert!(find_cli(&cfg).unwrap_err().contains("does not exist"));
    }

    #[tokio::test]
    async fn offline_never_downloads() {
        let cfg = DaggerConfig {
            cli: Some("/nonexistent/dagger".into()),
            ..Default::default()
        };
        let err = cli_path(&cfg).await.unwrap_err();
        assert!(err.contains("never downloads"), "{err}");
    }

    #[test]
    fn env_is_cleared_but_for_the_engine_and_network() {
        let cfg = DaggerConfig {
            runner_host: Some("tcp://engine:1234".into()),
            ..Default::default()
        };
        let env = cli_env(&cfg);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get(RUNNER_HOST_ENV), Some("tcp://engine:1234".into()));
        assert_eq!(get("DO_NOT_TRACK"), Some("1".into()));
        assert!(get("PATH").is_some());
        assert!(env.iter().all(|(k, _)| k == "PATH"
            || k == "DO_NOT_TRACK"
            || k == "DAGGER_NO_NAG"
            || INHERITED.contains(&k.as_str())));
    }
}
