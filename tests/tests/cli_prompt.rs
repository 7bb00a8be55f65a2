//! `scabbard login` at a terminal: the token typed at its prompt is not echoed. The
//! terminal is a real pseudo-terminal (util-linux `script`, installed with the base
//! system; scripts/setup.sh), the controller a real process.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scabbard_tests::*;

#[test]
fn the_login_prompt_does_not_echo_the_token() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    let ctl = Controller::start(&dir.path().join("ctl"), 0, &ControllerOpts::default())?;
    let addr = ctl.addr.to_string();
    // Until the controller answers authenticated calls.
    let end = Instant::now() + Duration::from_secs(20);
    while !cli(&config)
        .args(["whoami", "--controller", &addr])
        .output()?
        .status
        .success()
    {
        assert!(Instant::now() < end, "the controller never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let login = format!("{} login --controller {addr}", scabbard_bin().display());
    let mut child = Command::new("script")
        .args(["-qec", &login, "/dev/null"])
        .env("SCABBARD_CONFIG_DIR", &config)
        .env_remove("SCABBARD_TOKEN")
        .env_remove("SCABBARD_CONTROLLER")
        .env_remove("SCABBARD_CONTEXT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("util-linux `script` is needed (scripts/setup.sh): {e}"))?;
    let mut out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    // Type the token once the prompt is up (echo is off by then).
    let mut seen = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("API token (input hidden):") {
        seen.extend(rx.recv_timeout(end.saturating_duration_since(Instant::now()))?);
    }
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(format!("{ADMIN_TOKEN}\n").as_bytes())?;
    let end = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("token saved in") {
        seen.extend(rx.recv_timeout(end.saturating_duration_since(Instant::now()))?);
    }
    drop(stdin);
    let _ = child.wait();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("logged in to"), "{text}");
    assert!(!text.contains(ADMIN_TOKEN), "the token was echoed: {text}");
    Ok(())
}
