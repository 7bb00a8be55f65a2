//! The `fake-dagger` command line: `session` (an engine session, as `dagger session` is
//! for the SDKs), `version`, and `call` (a stand-in for `dagger call`).
//!
//! `session` takes its engine from `_EXPERIMENTAL_DAGGER_RUNNER_HOST`, which must be
//! `fake://<engine state dir>[?fixtures=<fixtures dir>]` (absolute paths, `%XX` escapes
//! allowed); anything else is an error on stderr and exit code 1. It binds 127.0.0.1:0,
//! prints `{"port":N,"session_token":"…"}` on stdout, writes progress on stderr, and serves
//! until SIGTERM, SIGINT or EOF on stdin; then it kills its running execs (nothing is left
//! behind) and exits 0. Flags (`--label …`, `--workdir DIR`, …) are accepted; `--workdir`
//! is where relative host paths start.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, EngineConfig, Isolation};
use crate::resolve::ENGINE_VERSION;
use crate::server;

/// The variable that names the engine.
pub(crate) const RUNNER_HOST_ENV: &str = "_EXPERIMENTAL_DAGGER_RUNNER_HOST";

/// Runs the command line; returns the exit code.
pub(crate) fn main(args: Vec<String>) -> i32 {
    match args.get(1).map(String::as_str) {
        Some("session") => session(&args[2..]),
        Some("version" | "--version") => {
            println!("dagger {ENGINE_VERSION} (fake-dagger: a behavioural model for tests)");
            0
        }
        Some("call") => call(&args[2..]),
        _ => {
            eprintln!(
                "usage: fake-dagger session [flags] | version | call -m <module> <function> [args…]"
            );
            2
        }
    }
}

/// `call`: prints `call <args>`; exit code 3 if an argument contains `fail`.
fn call(args: &[String]) -> i32 {
    println!("call {}", args.join(" "));
    let host = std::env::var(RUNNER_HOST_ENV).unwrap_or_else(|_| "(none)".into());
    eprintln!("fake-dagger: call on runner host {host}");
    if args.iter().any(|a| a.contains("fail")) {
        3
    } else {
        0
    }
}

/// Parses `fake://<state>[?fixtures=<dir>]`.
pub(crate) fn parse_runner_host(text: &str) -> Result<EngineConfig, String> {
    let want = "expected fake://<engine state dir>[?fixtures=<fixtures dir>] with absolute paths";
    let rest = text
        .strip_prefix("fake://")
        .ok_or_else(|| format!("runner host {text:?} is not a fake engine: {want}"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| format!("runner host {text:?}: bad %-escape"))
    };
    let state = PathBuf::from(decode(path)?);
    if !state.is_absolute() {
        return Err(format!(
            "runner host {text:?}: the state dir must be absolute: {want}"
        ));
    }
    let mut fixtures = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("fixtures", value)) => {
                let dir = PathBuf::from(decode(value)?);
                if !dir.is_absolute() {
                    return Err(format!(
                        "runner host {text:?}: the fixtures dir must be absolute: {want}"
                    ));
                }
                fixtures = Some(dir);
            }
            _ => {
                return Err(format!(
                    "runner host {text:?}: unknown parameter {pair:?}: {want}"
                ));
            }
        }
    }
    Ok(EngineConfig { state, fixtures })
}

fn session(flags: &[String]) -> i32 {
    let config = match std::env::var(RUNNER_HOST_ENV) {
        Ok(text) => match parse_runner_host(&text) {
            Ok(c) => c,
            Err(why) => {
                eprintln!("fake-dagger: {why}");
                return 1;
            }
        },
        Err(_) => {
            eprintln!(
                "fake-dagger: {RUNNER_HOST_ENV} is not set; expected fake://<engine state dir>[?fixtures=<fixtures dir>]"
            );
            return 1;
        }
    };
    let mut host_cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    if let Some(i) = flags.iter().position(|f| f == "--workdir")
        && let Some(dir) = flags.get(i + 1)
    {
        host_cwd = host_cwd.join(dir);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fake-dagger: cannot start a runtime: {e}");
            return 1;
        }
    };
    let code = runtime.block_on(run_session(config, host_cwd));
    // Blocking threads (a stdin read) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

async fn run_session(config: EngineConfig, host_cwd: PathBuf) -> i32 {
    let shutdown = CancellationToken::new();
    let isolation = Isolation {
        unshare: find_program("unshare").unwrap_or_else(|| PathBuf::from("unshare")),
        root: std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0),
    };
    let engine = match Engine::new(
        &config,
        host_cwd,
        isolation,
        shutdown.clone(),
        tokio::runtime::Handle::current(),
    ) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!(
                "fake-dagger: cannot open the engine state {}: {e}",
                config.state.display()
            );
            return 1;
        }
    };
    let listener = match TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-dagger: cannot bind 127.0.0.1:0: {e}");
            return 1;
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let token = format!("{:032x}", rand::random::<u128>());
    // The trace context the session was started with (what a real engine's spans would
    // join), for tests to read in the task's log.
    if let Ok(tp) = std::env::var("TRACEPARENT") {
        let otlp = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
        engine.progress(&format!(
            "fake-dagger: session TRACEPARENT={tp} OTEL_EXPORTER_OTLP_ENDPOINT={otlp}"
        ));
    }
    engine.progress(&format!(
        "fake-dagger: session {} of engine {} (fixtures: {})",
        engine.session_id,
        config.state.display(),
        config
            .fixtures
            .as_deref()
            .map_or_else(|| "none".into(), |p| p.display().to_string())
    ));
    {
        let mut out = std::io::stdout().lock();
        let line = serde_json::json!({ "port": port, "session_token": token });
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return 1;
        }
    }
    tokio::spawn(watch_for_the_end(shutdown.clone()));
    server::serve(listener, engine.clone(), token, shutdown).await;
    engine.progress(&format!("fake-dagger: session {} ended", engine.session_id));
    0
}

/// Fires `shutdown` on SIGTERM, SIGINT or EOF on stdin.
async fn watch_for_the_end(shutdown: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        shutdown.cancel();
        return;
    };
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        () = stdin_closed => {}
    }
    shutdown.cancel();
}

/// `name` in `PATH` (or the usual system directories).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_hosts() {
        let c = parse_runner_host("fake:///var/engine?fixtures=/srv/fix%20tures").unwrap();
        assert_eq!(c.state, PathBuf::from("/var/engine"));
        assert_eq!(c.fixtures, Some(PathBuf::from("/srv/fix tures")));
        let c = parse_runner_host("fake:///var/engine").unwrap();
        assert_eq!(c.fixtures, None);
        for bad in [
            "tcp://engine:1234",
            "fake://relative/dir",
            "fake:///abs?fixtures=rel",
            "fake:///abs?other=1",
            "unix:///run/dagger/engine.sock",
        ] {
            assert!(parse_runner_host(bad).is_err(), "{bad}");
        }
    }
}
