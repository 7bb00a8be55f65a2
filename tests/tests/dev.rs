//! `scabbard dev` as a user starts it: one process, a controller and a worker. Its shell
//! tasks run with the dev data dir (the admin token, the store, the worker's identity) and
//! the CLI's credentials out of sight: a task that goes looking for the admin token finds
//! nothing, and the token is in no task's log.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scabbard_tests::*;

#[tokio::test]
async fn dev_keeps_the_admin_token_out_of_its_tasks_reach() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config_dir = dir.path().join("config");
    let data_dir = dir.path().join("dev-data");
    // User templates through the environment, as the docs say.
    let templates = dir.path().join("templates");
    std::fs::create_dir_all(&templates)?;
    std::fs::write(
        templates.join("hello.yaml"),
        "name: dev-hello\nversion: 1\nworkflow:\n  tasks:\n    - {name: hi, shell: {command: [echo, hi]}}\n",
    )?;
    let mut child = Command::new(scabbard_bin())
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .env("SCABBARD_CONFIG_DIR", &config_dir)
        .env("SCABBARD_TEMPLATES_DIR", &templates)
        .env("SCABBARD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("stdout");
    let mut proc = Proc::from_child(child, "scabbard dev");
    // Read the banner: the address and the admin token.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let (mut addr, mut token, mut saved, mut http) = (None, None, false, None);
    let end = Instant::now() + Duration::from_secs(60);
    while addr.is_none() || token.is_none() || !saved || http.is_none() {
        let left = end.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left)?;
        if let Some(a) = line.trim().strip_prefix("gRPC address:") {
            addr = Some(a.trim().to_string());
        }
        if let Some(t) = line.trim().strip_prefix("admin token:") {
            token = Some(t.trim().to_string());
        }
        saved |= line.trim().starts_with("saved for");
        // "HTTP API:     http://127.0.0.1:PORT/api/v1 (OpenAPI: ...)"
        if let Some(u) = line.trim().strip_prefix("HTTP API:") {
            http = u.split_whitespace().next().map(str::to_string);
        }
    }
    let (addr, token) = (addr.unwrap(), token.unwrap());
    assert!(token.starts_with("scbd_api_"), "{token}");
    // The HTTP API is on by default and answers with the admin token.
    let http = http.unwrap();
    let hostport = http
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .expect("an http:// URL");
    // dev prints the banner once the HTTP API accepts; retried anyway.
    let mut s = eventually(
        "the dev HTTP API to accept",
        Duration::from_secs(20),
        || async { std::net::TcpStream::connect(hostport).ok() },
    )
    .await?;
    use std::io::{Read, Write};
    write!(
        s,
        "GET /api/v1/whoami HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let creds = std::fs::read_to_string(config_dir.join("credentials.toml"))?;
    assert!(creds.contains(&token), "the CLI has the token saved");

    // Authenticate with the dev token itself (it is the cluster's admin).
    let ch = scabbard_common::client::connect(&addr).await?;
    let listed = scabbard_common::proto::template_service_client::TemplateServiceClient::new(
        with_token(ch.clone(), &token),
    )
    .list(scabbard_common::proto::ListTemplatesRequest {})
    .await?
    .into_inner();
    assert!(
        listed.templates.iter().any(|t| t.name == "dev-hello"),
        "SCABBARD_TEMPLATES_DIR's template is loaded: {:?}",
        listed.templates.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
    let mut tasks_dev = scabbard_common::client::TaskServiceClient::new(with_token(ch, &token));
    let script = format!(
        "cat {data}/admin.token; ls -la {data}; cat {config}/credentials.toml; \
         grep -rl scbd_api_ {data} {config} 2>/dev/null; echo looked",
        data = data_dir.display(),
        config = config_dir.display(),
    );
    let id = tasks_dev
        .submit(scabbard_common::proto::SubmitTaskRequest {
            spec: Some(shell(&script)),
            ..Default::default()
        })
        .await?
        .into_inner()
        .task
        .unwrap()
        .id;
    let t = wait_state(&mut tasks_dev, &id, None, Duration::from_secs(60)).await?;
    let log = logs(&mut tasks_dev, &id, 0, false).await?;
    assert!(log.contains("looked"), "{t:?}\n{log}");
    assert!(
        !log.contains(&token),
        "the task read the admin token:\n{log}"
    );
    assert!(!log.contains("scbd_api_"), "{log}");
    proc.terminate(Duration::from_secs(20));
    Ok(())
}
