//! TLS and mutual TLS end to end through the real `scabbard` binary: a worker with a
//! client certificate from the controller's client CA joins and runs a task; one without a
//! certificate, with a certificate from another CA, or with a certificate issued to
//! another name is refused; a plaintext client to the TLS port fails cleanly (and the
//! controller keeps serving); the CLI talks TLS.
//!
//! Certificates come from `scabbard_common::tls::generate_dev_pki` (a second call makes
//! the "other" CA).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use scabbard_common::client::{
    self, AdminServiceClient, AgentServiceClient, ClientOptions, TaskServiceClient,
};
use scabbard_common::proto::{ListAgentsRequest, RegisterRequest, TaskState};
use scabbard_common::tls::{DevPki, generate_dev_pki};
use scabbard_tests::*;
use tonic::Code;

/// A controller serving TLS with `pki`'s server certificate, verifying client
/// certificates against `pki`'s CA and (with `require`) demanding one from workers.
fn tls_controller(dir: &Path, pki: &DevPki, require: bool) -> Result<Controller> {
    let mut extra = vec![
        "--tls-cert".to_string(),
        pki.server_cert.display().to_string(),
        "--tls-key".into(),
        pki.server_key.display().to_string(),
        "--tls-client-ca".into(),
        pki.ca_cert.display().to_string(),
    ];
    if require {
        extra.push("--require-worker-client-cert".into());
    }
    Controller::start(
        &dir.join("controller"),
        free_port(),
        &ControllerOpts {
            extra,
            ..ControllerOpts::default()
        },
    )
}

/// Client options trusting `pki`'s CA, with an optional client identity.
fn opts(pki: &DevPki, identity: Option<(&Path, &Path)>) -> ClientOptions {
    ClientOptions {
        ca_cert: Some(pki.ca_cert.clone()),
        client_cert: identity.map(|(c, _)| c.to_path_buf()),
        client_key: identity.map(|(_, k)| k.to_path_buf()),
        ..ClientOptions::default()
    }
}

/// An admin channel over TLS, retrying until the controller answers.
async fn admin_tls(addr: &str, pki: &DevPki) -> Result<client::AuthedChannel> {
    let o = opts(pki, None);
    let ch = eventually(
        "the TLS controller to accept connections",
        Duration::from_secs(20),
        || {
            let o = o.clone();
            async move {
                let ch = client::connect_with(addr, &o).await.ok()?;
                // Serving (not just bound): a cheap authenticated call succeeds.
                AdminServiceClient::new(with_token(ch.clone(), ADMIN_TOKEN))
                    .list_agents(ListAgentsRequest {})
                    .await
                    .ok()?;
                Some(ch)
            }
        },
    )
    .await?;
    Ok(with_token(ch, ADMIN_TOKEN))
}

async fn agent_names(admin: &client::AuthedChannel) -> Result<Vec<String>> {
    Ok(AdminServiceClient::new(admin.clone())
        .list_agents(ListAgentsRequest {})
        .await?
        .into_inner()
        .agents
        .into_iter()
        .map(|a| a.name)
        .collect())
}

/// A worker process whose log lines (stderr) the test can wait on; killed on drop.
struct TlsWorker {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl TlsWorker {
    /// Starts a worker named `name` (`None`: no `--name`, the certificate names it).
    fn start(addr: &str, dir: &Path, name: Option<&str>, tls_flags: &[String]) -> Result<Self> {
        let mut child = Command::new(scabbard_bin())
            .args([
                "worker",
                "--controller",
                addr,
                "--registration-token",
                TOKEN,
            ])
            .args(name.map(|n| ["--name", n]).into_iter().flatten())
            .args(["--slots", "2"])
            .arg("--data-dir")
            .arg(dir)
            .args(tls_flags)
            .env("SCABBARD_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn worker")?;
        let stderr = child.stderr.take().context("stderr")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let tag = name.unwrap_or("worker").to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                eprintln!("[{tag}] {line}");
                sink.lock().expect("lines").push(line);
            }
        });
        Ok(Self { child, lines })
    }

    /// Waits (with a deadline) for a log line containing every one of `parts`.
    async fn wait_log(&self, what: &str, parts: &[&str]) -> Result<String> {
        eventually(what, Duration::from_secs(30), || async {
            self.lines
                .lock()
                .expect("lines")
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .cloned()
        })
        .await
    }

    /// Waits (up to 30 s) for the worker to exit; its exit code.
    async fn wait_exit(&mut self, what: &str) -> Result<Option<i32>> {
        let child = std::sync::Mutex::new(&mut self.child);
        let status = eventually(what, Duration::from_secs(30), || async {
            child.lock().expect("child").try_wait().ok().flatten()
        })
        .await?;
        Ok(status.code())
    }
}

impl Drop for TlsWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn flags(pki: &DevPki, identity: Option<(&Path, &Path)>) -> Vec<String> {
    let mut f = vec!["--ca-cert".to_string(), pki.ca_cert.display().to_string()];
    if let Some((c, k)) = identity {
        f.extend([
            "--client-cert".to_string(),
            c.display().to_string(),
            "--client-key".into(),
            k.display().to_string(),
        ]);
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_worker_with_a_valid_certificate_joins_and_runs_a_task() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = generate_dev_pki(&dir.path().join("tls"), "tls-worker", &[])?;
    let ctl = tls_controller(dir.path(), &pki, true)?;
    let addr = ctl.addr.to_string();
    let admin = admin_tls(&addr, &pki).await?;

    let _w = TlsWorker::start(
        &addr,
        &dir.path().join("worker"),
        Some("tls-worker"),
        &flags(&pki, Some((&pki.worker_cert, &pki.worker_key))),
    )?;
    eventually(
        "the mTLS worker to join",
        Duration::from_secs(30),
        || async {
            agent_names(&admin)
                .await
                .ok()?
                .contains(&"tls-worker".to_string())
                .then_some(())
        },
    )
    .await?;

    // Without --name, a worker is named after its certificate (and so passes the check).
    let (cert2, key2) = pki.issue_client_cert("tls-worker-2")?;
    let _w2 = TlsWorker::start(
        &addr,
        &dir.path().join("worker2"),
        None,
        &flags(&pki, Some((&cert2, &key2))),
    )?;
    eventually(
        "the worker named by its certificate to join",
        Duration::from_secs(30),
        || async {
            agent_names(&admin)
                .await
                .ok()?
                .contains(&"tls-worker-2".to_string())
                .then_some(())
        },
    )
    .await?;

    let mut tasks = Tasks::new(admin.clone());
    let id = submit(&mut tasks, shell("echo hello over tls")).await?;
    let t = wait_state(&mut tasks, &id, None, Duration::from_secs(30)).await?;
    assert_eq!(t.state(), TaskState::Succeeded, "{t:?}");
    let log = logs(&mut tasks, &id, 0, false).await?;
    assert!(log.contains("hello over tls"), "log: {log:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_without_a_client_certificate_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = generate_dev_pki(&dir.path().join("tls"), "tls-worker", &[])?;
    let ctl = tls_controller(dir.path(), &pki, true)?;
    let addr = ctl.addr.to_string();
    let admin = admin_tls(&addr, &pki).await?;

    // A real worker speaking TLS but holding no client certificate.
    let mut w = TlsWorker::start(
        &addr,
        &dir.path().join("worker"),
        Some("no-cert"),
        &flags(&pki, None),
    )?;
    let line = w
        .wait_log(
            "the worker to report the refusal",
            &["client certificate", "--client-cert"],
        )
        .await?;
    assert!(line.contains("mutual TLS"), "{line}");
    // A permanent refusal: after a few tries the worker stops, non-zero, saying why.
    let code = w.wait_exit("the refused worker to stop").await?;
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}");
    w.wait_log("the worker to say it stops", &["the worker stops"])
        .await?;
    assert!(agent_names(&admin).await?.is_empty(), "no agent registered");
    assert!(
        !dir.path().join("worker/identity").exists(),
        "the worker got no identity"
    );

    // The same refusal seen directly, with its code.
    let ch = client::connect_with(&addr, &opts(&pki, None)).await?;
    let (code, msg) = code_and_message(
        AgentServiceClient::new(ch)
            .register(register_request("no-cert"))
            .await,
    );
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    assert!(msg.contains("client certificate"), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_with_a_certificate_from_another_ca_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = generate_dev_pki(&dir.path().join("tls"), "tls-worker", &[])?;
    let rogue = generate_dev_pki(&dir.path().join("rogue"), "tls-worker", &[])?;
    let ctl = tls_controller(dir.path(), &pki, true)?;
    let addr = ctl.addr.to_string();
    let admin = admin_tls(&addr, &pki).await?;

    // Trusts the right server CA, but its own certificate comes from another CA: the
    // handshake refuses it.
    let identity = Some((rogue.worker_cert.as_path(), rogue.worker_key.as_path()));
    // Directly: the connection is refused and the error says why.
    let r = async {
        let ch = client::connect_with(&addr, &opts(&pki, identity)).await?;
        AgentServiceClient::new(ch)
            .register(register_request("tls-worker"))
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    let e = r.expect_err("a certificate from another CA is refused");
    assert!(
        e.to_string().contains("refusing the client certificate"),
        "refused at the handshake, and the error says so: {e:#}"
    );
    // A real worker with that certificate never joins.
    let mut w = TlsWorker::start(
        &addr,
        &dir.path().join("worker"),
        Some("tls-worker"),
        &flags(&pki, identity),
    )?;
    let line = w
        .wait_log(
            "the worker to report the refused handshake",
            &["the controller refused this worker"],
        )
        .await?;
    assert!(
        line.contains("refusing the client certificate"),
        "the error says why: {line}"
    );
    assert!(
        !w.lines
            .lock()
            .expect("lines")
            .iter()
            .any(|l| l.contains("connection lost")),
        "no connection was ever up, so none was lost"
    );
    let code = w.wait_exit("the refused worker to stop").await?;
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}");
    assert!(agent_names(&admin).await?.is_empty(), "no agent registered");

    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_issued_to_another_agent_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = generate_dev_pki(&dir.path().join("tls"), "tls-worker", &[])?;
    let (cert, key) = pki.issue_client_cert("someone-else")?;
    let ctl = tls_controller(dir.path(), &pki, true)?;
    let addr = ctl.addr.to_string();
    let admin = admin_tls(&addr, &pki).await?;

    let ch = client::connect_with(&addr, &opts(&pki, Some((&cert, &key)))).await?;
    let (code, msg) = code_and_message(
        AgentServiceClient::new(ch.clone())
            .register(register_request("tls-worker"))
            .await,
    );
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(
        msg.contains("CN=someone-else") && msg.contains("tls-worker"),
        "{msg}"
    );
    // Under its own name the same certificate is accepted.
    AgentServiceClient::new(ch)
        .register(register_request("someone-else"))
        .await?;
    assert_eq!(agent_names(&admin).await?, vec!["someone-else".to_string()]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_client_to_the_tls_port_fails_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = generate_dev_pki(&dir.path().join("tls"), "tls-worker", &[])?;
    let ctl = tls_controller(dir.path(), &pki, false)?;
    let addr = ctl.addr.to_string();
    let admin = admin_tls(&addr, &pki).await?;

    for _ in 0..3 {
        let attempt = async {
            let ch = client::connect(&addr).await?;
            AdminServiceClient::new(with_token(ch, ADMIN_TOKEN))
                .list_agents(ListAgentsRequest {})
                .await
                .map_err(anyhow::Error::from)
        };
        let r = tokio::time::timeout(Duration::from_secs(15), attempt)
            .await
            .context("a plaintext client to the TLS port must fail promptly, not hang")?;
        let e = r.expect_err("plaintext to a TLS port must fail");
        eprintln!("plaintext client error (expected): {e:#}");
    }
    // Through the client library's leader lookup the error carries a hint.
    let e = client::connect_leader(&addr)
        .await
        .expect_err("plaintext to a TLS port must fail");
    assert!(e.to_string().contains("--ca-cert"), "{e}");
    // A bad plaintext address form is refused up front when TLS is configured.
    let e = client::connect_with(&format!("http://{addr}"), &opts(&pki, None))
        .await
        .expect_err("http:// with a CA is refused");
    assert!(e.to_string().contains("plaintext"), "{e}");

    // The controller keeps serving TLS clients.
    assert!(agent_names(&admin).await?.is_empty());
    let fresh = admin_tls(&addr, &pki).await?;
    agent_names(&fresh).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_talks_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = generate_dev_pki(&dir.path().join("tls"), "tls-worker", &[])?;
    let ctl = tls_controller(dir.path(), &pki, false)?;
    let addr = ctl.addr.to_string();
    admin_tls(&addr, &pki).await?;

    let config_dir = dir.path().join("cli");
    let out = cli(&config_dir)
        .args(["status", "--controller", &addr, "--ca-cert"])
        .arg(&pki.ca_cert)
        .output()?;
    assert!(
        out.status.success(),
        "status over TLS: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&addr),
        "status names the controller: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Without the CA the CLI fails with an error that says what to do.
    let out = cli(&config_dir)
        .args(["status", "--controller", &addr])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--ca-cert") && !err.contains("panicked"),
        "{err}"
    );
    Ok(())
}

fn register_request(name: &str) -> RegisterRequest {
    RegisterRequest {
        registration_token: TOKEN.into(),
        name: name.into(),
        slots: 1,
        version: "test".into(),
        ..Default::default()
    }
}

/// A TLS controller on etcd (`etcd` endpoints), forwarding to the leader when `peer_ca`.
fn tls_etcd_controller(dir: &Path, pki: &DevPki, etcd: &str, peer_ca: bool) -> Result<Controller> {
    let mut extra = vec![
        "--tls-cert".to_string(),
        pki.server_cert.display().to_string(),
        "--tls-key".into(),
        pki.server_key.display().to_string(),
        "--store".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        etcd.into(),
        "--logs-dir".into(),
        dir.parent()
            .context("parent")?
            .join("shared-logs")
            .display()
            .to_string(),
    ];
    if peer_ca {
        extra.extend(["--tls-peer-ca".into(), pki.ca_cert.display().to_string()]);
    }
    Controller::start(
        dir,
        free_port(),
        &ControllerOpts {
            extra,
            ..ControllerOpts::default()
        },
    )
}

/// Whether the controller at `addr` (reached directly over TLS) leads.
async fn leads(addr: &str, pki: &DevPki) -> bool {
    let Ok(ch) = client::connect_with(addr, &opts(pki, None)).await else {
        return false;
    };
    AdminServiceClient::new(with_token(ch, ADMIN_TOKEN))
        .cluster_status(scabbard_common::proto::ClusterStatusRequest {})
        .await
        .is_ok_and(|s| s.get_ref().answered_by_leader && s.get_ref().store_healthy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_follower_with_the_peer_ca_forwards_and_one_without_redirects() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = generate_dev_pki(&dir.path().join("tls"), "tls-worker", &[])?;
    let etcd = scabbard_tests::etcd::EtcdServer::start()?;
    let a = tls_etcd_controller(&dir.path().join("a"), &pki, &etcd.endpoints(), true)?;
    let b = tls_etcd_controller(&dir.path().join("b"), &pki, &etcd.endpoints(), true)?;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let leader = eventually("a TLS leader", Duration::from_secs(30), || {
        let (a_addr, b_addr, pki) = (a_addr.clone(), b_addr.clone(), &pki);
        async move {
            if leads(&a_addr, pki).await {
                Some(a_addr)
            } else if leads(&b_addr, pki).await {
                Some(b_addr)
            } else {
                None
            }
        }
    })
    .await?;
    let follower = if leader == a_addr { b_addr } else { a_addr };
    // Started once a leader is known, so it follows.
    let c = tls_etcd_controller(&dir.path().join("c"), &pki, &etcd.endpoints(), false)?;
    let no_peer = c.addr.to_string();

    // Straight to the follower (no redirect following): submit, get, list and watch work.
    let ch = client::connect_with(&follower, &opts(&pki, None)).await?;
    let mut tasks = TaskServiceClient::new(with_token(ch, ADMIN_TOKEN));
    let id = eventually(
        "a submit through the TLS follower",
        Duration::from_secs(20),
        || {
            let mut t = tasks.clone();
            async move { submit(&mut t, shell("true")).await.ok() }
        },
    )
    .await?;
    assert_eq!(get(&mut tasks, &id).await?.id, id);
    let listed = tasks
        .list(scabbard_common::proto::ListTasksRequest::default())
        .await?
        .into_inner();
    assert!(listed.tasks.iter().any(|t| t.id == id), "{listed:?}");
    let mut watch = tasks
        .watch(scabbard_common::proto::WatchTasksRequest {
            ids: vec![id.clone()],
            send_initial: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .context("a watch event through the follower")??
        .context("the forwarded watch ended")?;
    assert_eq!(ev.task.map(|t| t.id), Some(id.clone()));

    // Without the peer CA the follower redirects, naming the leader.
    let ch = client::connect_with(&no_peer, &opts(&pki, None)).await?;
    let tasks = TaskServiceClient::new(with_token(ch, ADMIN_TOKEN));
    let st = eventually(
        "the follower without a peer CA to redirect",
        Duration::from_secs(20),
        || {
            let mut t = tasks.clone();
            async move {
                match get(&mut t, "nonexistent").await {
                    Err(e) => e
                        .downcast::<tonic::Status>()
                        .ok()
                        .filter(|s| s.code() == Code::Unavailable),
                    Ok(_) => None,
                }
            }
        },
    )
    .await?;
    assert_eq!(
        st.metadata()
            .get(scabbard_common::LEADER_METADATA_KEY)
            .and_then(|v| v.to_str().ok()),
        Some(leader.as_str()),
        "{st:?}"
    );
    drop((a, b, c));
    Ok(())
}
