//! The README's shell blocks against the binary, so the docs cannot drift from it:
//!
//! - every `scabbard …` command line in a ```sh block of README.md and docs/cli.md must
//!   parse: it is run with `--help` appended, so clap checks the subcommand, every flag and
//!   every value (a duration without a unit, a misspelt overlap policy) without calling
//!   anything. Doc shorthand is read as a person would: `# comments`, `[optional]` parts,
//!   `a | b` alternatives of subcommands and redirections are left out;
//! - every block marked `<!-- runnable -->` (the line just before its fence) runs as one
//!   `bash -euo pipefail` script against a real `scabbard dev`, whose context is current,
//!   with `scabbard` on PATH. Only blocks that need nothing but `scabbard dev` are marked.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scabbard_tests::*;

const MARKER: &str = "<!-- runnable -->";

/// A ```sh block: its first line number, whether it is marked runnable, and its text.
struct Block {
    line: usize,
    runnable: bool,
    text: String,
}

fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut prev = "";
    let mut cur: Option<Block> = None;
    for (i, line) in doc.lines().enumerate() {
        match &mut cur {
            None if line.trim_start().starts_with("```sh") => {
                cur = Some(Block {
                    line: i + 1,
                    runnable: prev.trim() == MARKER,
                    text: String::new(),
                });
            }
            Some(_) if line.trim_start().starts_with("```") => out.extend(cur.take()),
            Some(b) => {
                b.text.push_str(line);
                b.text.push('\n');
            }
            None => {}
        }
        if !line.trim().is_empty() {
            prev = line;
        }
    }
    out
}

/// The `scabbard` command lines of a block, as argument lists (without `scabbard`):
/// continuation lines joined, comments, `[optional]` parts, `| alternatives` and
/// redirections removed; lines that only mention `scabbard` inside other commands are
/// skipped.
fn commands(block: &str) -> Vec<Vec<String>> {
    let joined = block.replace("\\\n", " ");
    let mut out = Vec::new();
    for line in joined.lines() {
        let line = match line.find(" #") {
            Some(i) => &line[..i],
            None => line,
        };
        // `A; B`: each part.
        for part in line.split(" ; ") {
            let words = match shlex::split(part.trim()) {
                Some(w) => w,
                None => continue,
            };
            // `VAR=value scabbard …` and `ID=$(scabbard …)` are not checked here.
            let Some(first) = words.first() else { continue };
            if first != "scabbard" {
                continue;
            }
            let mut args = Vec::new();
            let mut depth = 0i32;
            for w in &words[1..] {
                if matches!(w.as_str(), "|" | ">" | ">>" | "<" | "&&" | "||") {
                    break;
                }
                if w.starts_with('[') {
                    depth += 1;
                }
                let closes = w.ends_with(']');
                if depth == 0 {
                    // `h1.…`, `scbd_api_…`: an elided value, still a value.
                    args.push(if w.contains('…') {
                        "x".into()
                    } else {
                        w.clone()
                    });
                }
                if closes {
                    depth = (depth - 1).max(0);
                }
            }
            out.push(args);
        }
    }
    out
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn every_documented_scabbard_command_parses() -> anyhow::Result<()> {
    let mut checked = 0;
    let mut failures = Vec::new();
    for doc in ["README.md", "docs/cli.md"] {
        let text = std::fs::read_to_string(repo().join(doc))?;
        for b in blocks(&text) {
            for args in commands(&b.text) {
                // `--help` before a `--` (after it, it would be the task's argument).
                let mut args = args;
                let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
                args.insert(at, "--help".into());
                let out = Command::new(scabbard_bin())
                    .args(&args)
                    .env("SCABBARD_CONFIG_DIR", "/nonexistent")
                    .stdin(Stdio::null())
                    .output()?;
                checked += 1;
                if !out.status.success() {
                    failures.push(format!(
                        "{doc}:{}: scabbard {}\n{}",
                        b.line,
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
        }
    }
    assert!(checked > 40, "only {checked} commands found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// `scabbard dev` in `dir`, its context current in `config`; returns once it serves.
fn dev(dir: &Path, config: &Path) -> anyhow::Result<Proc> {
    let mut child = Command::new(scabbard_bin())
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--slots",
            "4",
            "--data-dir",
        ])
        .arg(dir.join("dev-data"))
        .env("SCABBARD_CONFIG_DIR", config)
        .env("SCABBARD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("stdout");
    let proc = Proc::new(child, "scabbard dev");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx.recv_timeout(end.saturating_duration_since(Instant::now()))?;
        if line.trim().starts_with("context:") {
            break;
        }
    }
    // Keep draining the banner.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Ok(proc)
}

#[test]
fn the_runnable_readme_blocks_pass_against_scabbard_dev() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(repo().join("README.md"))?;
    let runnable: Vec<Block> = blocks(&text).into_iter().filter(|b| b.runnable).collect();
    assert!(
        !runnable.is_empty(),
        "README.md has no block marked {MARKER}"
    );
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    let _dev = dev(dir.path(), &config)?;
    let bin_dir = scabbard_bin()
        .parent()
        .expect("the binary's directory")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work)?;
    // Until the dev worker is connected.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(scabbard_bin())
            .args(["agents", "list", "-o", "json"])
            .env("SCABBARD_CONFIG_DIR", &config)
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains("AGENT_STATUS_CONNECTED") {
            break;
        }
        assert!(Instant::now() < end, "the dev worker never connected");
        std::thread::sleep(Duration::from_millis(100));
    }
    for b in runnable {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &b.text])
            .current_dir(&work)
            .env("PATH", &path)
            .env("HOME", dir.path())
            .env("SCABBARD_CONFIG_DIR", &config)
            .env_remove("SCABBARD_TOKEN")
            .env_remove("SCABBARD_CONTROLLER")
            .env_remove("SCABBARD_CONTEXT")
            .stdin(Stdio::null())
            .output()?;
        assert!(
            out.status.success(),
            "README.md:{} failed ({:?}):\n{}\nstdout: {}\nstderr: {}",
            b.line,
            out.status.code(),
            b.text,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn doc_shorthand_is_read_as_a_person_would() {
    let cmds = commands(
        "scabbard breakers list [--all] ; scabbard breakers reset agent:<agent-id>\n\
         scabbard task list -o json | jq '.[].id'   # comment\n\
         scabbard schedule create --name n \\\n  --cron '0 2 * * *'\n\
         echo scabbard not-checked\n",
    );
    assert_eq!(
        cmds,
        vec![
            vec!["breakers", "list"],
            vec!["breakers", "reset", "agent:<agent-id>"],
            vec!["task", "list", "-o", "json"],
            vec!["schedule", "create", "--name", "n", "--cron", "0 2 * * *"],
        ]
    );
}
