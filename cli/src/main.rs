//! `scabbard`: the one binary for operators and daemons. `main` only parses arguments,
//! sets up logging and dispatches; each command lives in `cmd/`.

#[macro_use]
mod printable;
mod args;
mod cmd;
mod credentials;
mod duration;
mod output;
mod size;

use clap::Parser;

/// mimalloc: the control plane makes many small allocations across threads, where it is
/// markedly faster than glibc's malloc (see the benchmark in the README).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
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
            eprintln!("error: {}", printable::printable_text(&format!("{e:#}")));
            std::process::ExitCode::from(1)
        }
    }
}
