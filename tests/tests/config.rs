//! Shipped configs parse; bad configuration is refused up front with a non-zero exit.

use std::process::Command;

use scabbard_tests::scabbard_bin;

fn deploy(path: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../deploy/config/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn shipped_example_configs_parse() {
    let mut c =
        scabbard_controller::ControllerConfig::from_toml(&deploy("controller.toml")).unwrap();
    c.registration_token = "x".repeat(32);
    c.validate().unwrap();
    let w = scabbard_worker::WorkerConfig::from_toml(&deploy("worker.toml")).unwrap();
    w.validate().unwrap();
    assert_eq!(w.labels.get("os").map(String::as_str), Some("linux"));
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(scabbard_bin())
        .args(args)
        .env_remove("SCABBARD_REGISTRATION_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_controller_config_is_refused_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, err) = run(&[
        "controller",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--registration-token",
        "short",
    ]);
    assert!(!ok);
    assert!(err.contains("registration_token"), "{err}");

    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nheartbeat_ms = 5\n").unwrap();
    let (ok, err) = run(&["controller", "--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("heartbeat_ms"), "{err}");

    let (ok, err) = run(&[
        "controller",
        "--store",
        "zookeeper",
        "--registration-token",
        &"x".repeat(20),
    ]);
    assert!(!ok);
    assert!(err.contains("zookeeper"), "{err}");
}

#[test]
fn bad_worker_config_and_cli_input_are_refused() {
    let (ok, err) = run(&["worker", "--controller", "127.0.0.1:1", "--slots", "0"]);
    assert!(!ok);
    assert!(err.contains("slots"), "{err}");
    let (ok, err) = run(&["submit", "--controller", "127.0.0.1:1"]);
    assert!(!ok);
    assert!(err.contains("nothing to run"), "{err}");
    let (ok, err) = run(&["submit", "--timeout", "5parsecs", "--", "true"]);
    assert!(!ok);
    assert!(err.contains("parsecs"), "{err}");
}
