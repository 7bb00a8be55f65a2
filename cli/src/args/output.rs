//! What `-o` means on the command line: the global output format (see
//! [`crate::render`]), the exit codes listed after `--help`, and the older `artifacts get
//! -o DIR` spelling, still read as `--output-dir DIR`.

/// The exit codes, shown after `scabbard --help` (docs/cli.md has the same list).
pub(crate) const EXIT_CODES: &str = "\
Exit codes: the work's outcome outside 64-78; 64-78 are the CLI's own failures.
  0    success (a waited-for task or workflow succeeded; `status`: healthy with a leader)
  1    a waited-for workflow did not succeed, or a waited-for task failed without an
       exit code of its own (cancelled, timed out, lost)
  N    `submit --wait/--follow`: the task's own exit code N (1-63, 80-255)
  64   usage error (bad flag or value, e.g. a duration without a unit)
  65   the controller refused the input (invalid argument, failed precondition, exists)
  66   not found
  69   controller unreachable or unavailable; `status`: no leader or unhealthy store
  70   other CLI failure (a local file, an internal error)
  75   try again later: rate limited after the retries, deadline (--timeout) passed
  77   no token, token refused, or permission denied
  78   local configuration (credentials or contexts file, unknown context)
  79   a waited-for task exited with a code in 64-78 (the code is printed)
  130  interrupted (Ctrl-C); the work keeps running unless --cancel-on-interrupt

Output: -o table|json|yaml (docs/cli.md). Completions: scabbard completion bash|zsh|fish.";

/// `artifacts get … -o DIR`, the spelling from before `-o` became the global output
/// format: there, a `-o` (or `-oDIR`, `-o=DIR`) whose value is not a format name is read
/// as `--output-dir DIR`. Everything else is left as it is.
pub(crate) fn legacy_output_dir(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let is_format = |v: &str| matches!(v, "table" | "text" | "json" | "yaml");
    // The subcommand: the first word that is neither a global option nor its value.
    let mut i = 1;
    while let Some(a) = args.get(i).and_then(|a| a.to_str()) {
        match a {
            "--timeout" | "-o" | "--output" => i += 2,
            _ if a.starts_with('-') && a != "--" => i += 1,
            _ => break,
        }
    }
    if args.get(i).is_none_or(|a| a != "artifacts") {
        return args;
    }
    if args.get(i + 1).is_none_or(|a| a != "get") {
        return args;
    }
    let mut k = i + 2;
    while k < args.len() {
        if args[k] == "--" {
            break;
        }
        let Some(a) = args[k].to_str().map(str::to_string) else {
            k += 1;
            continue;
        };
        if a == "-o" {
            if let Some(v) = args.get(k + 1).and_then(|v| v.to_str())
                && !is_format(v)
            {
                args[k] = "--output-dir".into();
            }
            k += 2;
            continue;
        }
        if let Some(v) = a.strip_prefix("-o")
            && !a.starts_with("--")
        {
            let v = v.strip_prefix('=').unwrap_or(v);
            if !is_format(v) {
                args[k] = format!("--output-dir={v}").into();
            }
        }
        k += 1;
    }
    args
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    use super::super::{ArtifactsCommand, Cli, Command};
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let args = legacy_output_dir(args.iter().map(|a| (*a).into()).collect());
        Cli::try_parse_from(args).expect("parses")
    }

    #[test]
    fn output_is_global_and_artifacts_get_keeps_its_dir() {
        use crate::render::Format;
        assert_eq!(
            parse(&["scabbard", "task", "list", "-o", "json"]).output,
            Format::Json
        );
        assert_eq!(
            parse(&["scabbard", "-o", "yaml", "status"]).output,
            Format::Yaml
        );
        assert_eq!(
            parse(&["scabbard", "status", "-o", "text"]).output,
            Format::Table
        );
        for spelling in [
            &["-o", "out/x"][..],
            &["-oout/x"],
            &["-o=out/x"],
            &["--output-dir", "out/x"],
            &["-d", "out/x"],
        ] {
            let mut args = vec!["scabbard", "artifacts", "get", "t1"];
            args.extend_from_slice(spelling);
            let cli = parse(&args);
            let Command::Artifacts(ArtifactsCommand::Get { dir, .. }) = cli.command else {
                panic!("not artifacts get");
            };
            assert_eq!(dir, PathBuf::from("out/x"), "{spelling:?}");
            assert_eq!(cli.output, crate::render::Format::Table);
        }
        let cli = parse(&[
            "scabbard",
            "artifacts",
            "get",
            "t1",
            "-d",
            "x",
            "-o",
            "json",
        ]);
        assert_eq!(cli.output, crate::render::Format::Json);
        assert!(Cli::try_parse_from(["scabbard", "task", "list", "-o", "xml"]).is_err());
        // Only the `artifacts get` subcommand, never words of a submitted command.
        let cli = parse(&[
            "scabbard",
            "--timeout",
            "5s",
            "artifacts",
            "get",
            "t1",
            "-o",
            "x",
        ]);
        assert!(matches!(
            cli.command,
            Command::Artifacts(ArtifactsCommand::Get { .. })
        ));
        let args = [
            "scabbard",
            "submit",
            "--",
            "echo",
            "artifacts",
            "get",
            "-o",
            "x",
        ];
        let cli = parse(&args);
        let Command::Submit(s) = cli.command else {
            panic!("not submit");
        };
        assert_eq!(s.command, ["echo", "artifacts", "get", "-o", "x"]);
    }
}
