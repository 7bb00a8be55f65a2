//! `scabbard`: the one binary for operators and daemons. `main` only parses arguments,
//! sets up logging and dispatches; each command lives in `cmd/`.

#[macro_use]
mod printable;
mod args;
mod cmd;
mod credentials;
mod duration;
mod output;
mod progress;
mod render;
mod size;

use clap::Parser;

/// mimalloc: the control plane makes many small allocations across threads, where it is
/// markedly faster than glibc's malloc (see the benchmark in the README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse_from(args::legacy_output_dir(std::env::args_os().collect()));
    args::set_request_timeout(cli.timeout);
    render::set(cli.output);
    let daemon = matches!(
        cli.command,
        args::Command::Dev(_) | args::Command::Controller(_) | args::Command::Worker(_)
    );
    scabbard_common::logging::init(if daemon { "info" } else { "warn" }, cli.log_json);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(cmd::dispatch(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", printable::printable_text(&explain(&e)));
            std::process::ExitCode::from(1)
        }
    }
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
