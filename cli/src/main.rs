//! `scabbard`: the one binary for operators and daemons. `main` only parses arguments,
//! sets up logging and dispatches; each command lives in `cmd/`.

#[macro_use]
mod printable;
mod args;
mod cmd;
mod contexts;
mod credentials;
mod duration;
mod exit;
mod interrupt;
mod output;
mod progress;
mod render;
mod retry;
mod size;
mod telemetry;

use clap::{CommandFactory, FromArgMatches};
use tracing::Instrument;

/// mimalloc: the control plane makes many small allocations across threads, where it is
/// markedly faster than glibc's malloc (see the benchmark in the README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let matches = args::Cli::command()
        .try_get_matches_from(args::legacy_output_dir(std::env::args_os().collect()))
        .unwrap_or_else(|e| usage_exit(e));
    let cli = args::Cli::from_arg_matches(&matches).unwrap_or_else(|e| usage_exit(e));
    args::set_request_timeout(cli.timeout);
    contexts::set_selected(cli.context.clone());
    interrupt::set_cancel_on_interrupt(cli.cancel_on_interrupt);
    render::set(cli.output);
    let daemon = matches!(
        cli.command,
        args::Command::Dev(_) | args::Command::Controller(_) | args::Command::Worker(_)
    );
    // A controller process starts no user work: see `scabbard_controller::process`.
    if matches!(cli.command, args::Command::Controller(_)) {
        scabbard_controller::process::disable_transparent_huge_pages();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::from(exit::SOFTWARE);
        }
    };
    // Logging, and tracing when an OTLP endpoint is configured (the exporter lives on
    // the runtime).
    let (service, telemetry_cfg) = telemetry::settings(&cli);
    let traces = {
        let _rt = rt.enter();
        scabbard_common::telemetry::init(
            if daemon { "info" } else { "warn" },
            cli.log_json,
            service,
            &telemetry_cfg,
        )
    };
    // A command runs in one span, the root of its trace (daemons have none: their spans
    // are per call and per task).
    let command = if daemon || !scabbard_common::telemetry::enabled() {
        tracing::Span::none()
    } else {
        let name = telemetry::command_name(&matches);
        tracing::info_span!("cli", otel.name = %name, otel.kind = "client")
    };
    let result = rt.block_on(cmd::dispatch(cli).instrument(command));
    // A short-lived command's spans are exported before it exits (a daemon's too); an
    // unresponsive collector holds a command for at most 2 s.
    traces.shutdown_within(std::time::Duration::from_secs(if daemon { 5 } else { 2 }));
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", printable::printable_text(&explain(&e)));
            std::process::ExitCode::from(exit::of_error(&e))
        }
    }
}

/// Prints a clap error (or `--help`/`--version`) and exits: 0 for help and version,
/// [`exit::USAGE`] for a usage error.
fn usage_exit(e: clap::Error) -> ! {
    let _ = e.print();
    std::process::exit(if e.use_stderr() {
        i32::from(exit::USAGE)
    } else {
        0
    })
}

/// The error's text; a call past `--timeout` says so plainly (tonic reports it as a
/// cancelled call with the message "Timeout expired").
fn explain(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    match args::request_timeout() {
        Some(t)
            if text.contains(scabbard_common::client::TIMEOUT_MESSAGE)
                || text.contains("did not answer within") =>
        {
            format!(
                "deadline exceeded: the controller did not answer within {} (--timeout); it may be frozen or overloaded ({text})",
                humantime_ms(t)
            )
        }
        _ => text,
    }
}

fn humantime_ms(t: std::time::Duration) -> String {
    if t.subsec_millis() == 0 {
        format!("{}s", t.as_secs())
    } else {
        format!("{}ms", t.as_millis())
    }
}
