//! Daemon log lines written to a pipe or a file (journald, log collectors) carry no ANSI
//! colour codes: a real controller process with its stderr piped.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use scabbard_tests::*;

#[test]
fn controller_logs_to_a_pipe_have_no_colour_codes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(scabbard_bin())
        .args([
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--registration-token",
            TOKEN,
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("SCABBARD_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn controller")?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let serving = line.contains("controller serving");
                seen.push(line);
                if serving {
                    break Ok(());
                }
            }
            Err(_) => break Err(anyhow::anyhow!("no \"controller serving\" line in 30 s")),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result.with_context(|| format!("stderr so far: {seen:#?}"))?;
    if let Some(bad) = seen.iter().find(|l| l.contains('\u{1b}')) {
        bail!("a log line written to a pipe carries ANSI codes: {bad:?}");
    }
    assert!(
        seen.iter().any(|l| l.contains(" INFO ")),
        "plain level names: {seen:#?}"
    );
    Ok(())
}
