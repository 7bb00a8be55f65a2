//! The security model end to end: every bad credential gets its exact code, revocation
//! takes effect at once (a live agent stream drops within a second), registration-token
//! limits hold, and the bootstrap token is printed once. Projects, quotas and the audit log
//! are in `projects.rs`.

use std::time::{Duration, Instant};

use scabbard_common::client::{self, AdminServiceClient, AgentServiceClient, TaskServiceClient};
use scabbard_common::proto::{
    CreateTokenRequest, ListTasksRequest, ListTokensRequest, RegisterRequest, RevokeTokenRequest,
    RotateAgentTokenRequest, Scope, TokenKind, WatchTasksRequest, WhoAmIRequest,
};
use scabbard_tests::sec::*;
use scabbard_tests::*;
use tonic::Code;

#[tokio::test]
async fn each_bad_credential_gets_its_code() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let plain = client::connect(&c.addr()).await?;

    // Missing token.
    let mut t = TaskServiceClient::new(plain.clone());
    let (code, msg) = code_and_message(t.list(ListTasksRequest::default()).await);
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("authorization"), "{msg}");
    // Garbage and unknown tokens.
    for bad in [
        "nonsense",
        "scbd_api_0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let (code, msg) = code_and_message(
            tasks_as(&c, bad)
                .await?
                .list(ListTasksRequest::default())
                .await,
        );
        assert_eq!(code, Code::Unauthenticated, "{bad}: {msg}");
    }
    // A malformed header (not "Bearer …").
    let mut req = tonic::Request::new(ListTasksRequest::default());
    req.metadata_mut()
        .insert("authorization", "Basic Zm9vOmJhcg==".parse()?);
    assert_eq!(code_and_message(t.list(req).await).0, Code::Unauthenticated);

    // Expired.
    create_project(&c, "team-a", None).await?;
    let (_, short) = api_token(&c, "team-a", Scope::Read, 300).await?;
    let mut st = tasks_as(&c, &short).await?;
    st.list(ListTasksRequest::default()).await?;
    let (code, msg) = eventually(
        "the short-lived token to expire",
        Duration::from_secs(10),
        || {
            let mut st = st.clone();
            async move {
                match st.list(ListTasksRequest::default()).await {
                    Err(s) => Some((s.code(), s.message().to_string())),
                    Ok(_) => None,
                }
            }
        },
    )
    .await?;
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("expired"), "{msg}");

    // Revoked: refused on the very next call.
    let (id, secret) = api_token(&c, "team-a", Scope::Submit, 0).await?;
    let mut rt = tasks_as(&c, &secret).await?;
    rt.submit(noop_submit("")).await?;
    admin(&c)
        .await?
        .revoke_token(RevokeTokenRequest {
            id: id.clone(),
            reason: "leaked".into(),
        })
        .await?;
    let (code, msg) = code_and_message(rt.list(ListTasksRequest::default()).await);
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("revoked"), "{msg}");

    // Missing scope.
    let (_, reader) = api_token(&c, "team-a", Scope::Read, 0).await?;
    let mut r = tasks_as(&c, &reader).await?;
    r.list(ListTasksRequest::default()).await?;
    let (code, msg) = code_and_message(r.submit(noop_submit("")).await);
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("submit"), "{msg}");
    let (code, _) = code_and_message(
        AdminServiceClient::new(c.channel(&reader).await?)
            .create_token(CreateTokenRequest::default())
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);

    // Wrong kind: a registration token is not an API token, an API token is not an agent's.
    let reg = admin(&c)
        .await?
        .create_token(CreateTokenRequest {
            kind: TokenKind::Registration as i32,
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;
    assert!(reg.starts_with("scbd_reg_"));
    assert_eq!(
        code_and_message(
            tasks_as(&c, &reg)
                .await?
                .list(ListTasksRequest::default())
                .await
        )
        .0,
        Code::PermissionDenied
    );
    assert_eq!(
        code_and_message(
            AgentServiceClient::new(c.channel(ADMIN_TOKEN).await?)
                .rotate_token(RotateAgentTokenRequest {})
                .await
        )
        .0,
        Code::PermissionDenied
    );

    // Foreign project on submit.
    create_project(&c, "team-b", None).await?;
    let (_, a_submit) = api_token(&c, "team-a", Scope::Submit, 0).await?;
    let (code, msg) = code_and_message(
        tasks_as(&c, &a_submit)
            .await?
            .submit(noop_submit("team-b"))
            .await,
    );
    assert_eq!(code, Code::PermissionDenied);
    assert!(msg.contains("team-b"), "{msg}");

    // Health and reflection stay open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(plain);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn revoked_agent_token_drops_the_live_stream_within_a_second() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let dir = tempfile::tempdir()?;
    let mut w = Worker::start(&c.addr(), dir.path(), "w1", 1)?;
    let agent = wait_agent(&c.addr(), "the worker to connect", |a| {
        a.name == "w1" && a.status == 1
    })
    .await?;
    let mut adm = admin(&c).await?;
    let tokens = adm
        .list_tokens(ListTokensRequest {
            kind: TokenKind::Agent as i32,
            ..Default::default()
        })
        .await?
        .into_inner()
        .tokens;
    let tok = tokens
        .iter()
        .find(|t| t.agent_id == agent.id)
        .expect("agent token listed");
    assert!(tok.hint.starts_with("scbd_agent_"));
    let revoked_at = Instant::now();
    adm.revoke_token(RevokeTokenRequest {
        id: tok.id.clone(),
        reason: "host decommissioned".into(),
    })
    .await?;
    wait_agent(&c.addr(), "the agent's stream to drop", |a| {
        a.id == agent.id && a.status != 1
    })
    .await?;
    let took = revoked_at.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "stream dropped after {took:?}"
    );
    // The worker cannot come back with the revoked token.
    let token = w.agent_token().expect("worker identity");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.try_send(scabbard_common::proto::AgentMessage {
        msg: Some(scabbard_common::proto::agent_message::Msg::Hello(
            Default::default(),
        )),
    })?;
    let mut agents = AgentServiceClient::new(c.channel(&token).await?);
    let (code, msg) = code_and_message(
        agents
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await,
    );
    assert_eq!(code, Code::Unauthenticated, "{msg}");
    // The worker does not sneak back in by registering again: it stops, saying why.
    let waited = Instant::now();
    let status = tokio::task::spawn_blocking(move || w.proc.wait_exit(Duration::from_secs(20)))
        .await?
        .expect("worker status");
    // (wait_exit kills it at the deadline: make sure it exited by itself well before.)
    assert!(
        waited.elapsed() < Duration::from_secs(15),
        "the worker kept running"
    );
    assert!(!status.success());
    Ok(())
}

#[tokio::test]
async fn agent_tokens_rotate_and_registration_tokens_expire_and_run_out() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let mut adm = admin(&c).await?;
    let reg = adm
        .create_token(CreateTokenRequest {
            kind: TokenKind::Registration as i32,
            name: "two hosts".into(),
            max_uses: 2,
            ..Default::default()
        })
        .await?
        .into_inner();
    let info = reg.token.unwrap();
    assert!(
        info.expires_at_ms > 0,
        "registration tokens expire by default"
    );
    let mut agents = AgentServiceClient::new(client::connect(&c.addr()).await?);
    let register = |token: &str, name: &str| RegisterRequest {
        registration_token: token.into(),
        name: name.into(),
        capabilities: vec!["shell".into()],
        slots: 1,
        ..Default::default()
    };
    let a = agents
        .register(register(&reg.secret, "a"))
        .await?
        .into_inner();
    agents.register(register(&reg.secret, "b")).await?;
    let (code, msg) = code_and_message(agents.register(register(&reg.secret, "c")).await);
    assert_eq!(code, Code::Unauthenticated);
    assert!(msg.contains("used all 2"), "{msg}");
    let listed = adm
        .list_tokens(ListTokensRequest {
            kind: TokenKind::Registration as i32,
            ..Default::default()
        })
        .await?
        .into_inner()
        .tokens;
    assert_eq!(listed.iter().find(|t| t.id == info.id).unwrap().uses, 2);

    // Rotation: the new token works, the old one is refused.
    let mut rot = AgentServiceClient::new(c.channel(&a.agent_token).await?);
    let new = rot
        .rotate_token(RotateAgentTokenRequest {})
        .await?
        .into_inner()
        .agent_token;
    assert_ne!(new, a.agent_token);
    let (code, _) = code_and_message(rot.rotate_token(RotateAgentTokenRequest {}).await);
    assert_eq!(code, Code::Unauthenticated);
    AgentServiceClient::new(c.channel(&new).await?)
        .rotate_token(RotateAgentTokenRequest {})
        .await?;

    // A short-lived registration token stops working.
    let short = adm
        .create_token(CreateTokenRequest {
            kind: TokenKind::Registration as i32,
            ttl_ms: 200,
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret;
    let code = eventually(
        "the registration token to expire",
        Duration::from_secs(10),
        || {
            let mut agents = agents.clone();
            let r = register(&short, "late");
            async move { agents.register(r).await.err().map(|s| s.code()) }
        },
    )
    .await?;
    assert_eq!(code, Code::Unauthenticated);
    Ok(())
}

#[test]
fn first_start_prints_one_admin_token_and_later_starts_do_not() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    let start =
        || -> anyhow::Result<(std::process::Child, std::sync::mpsc::Receiver<String>, u16)> {
            let port = free_port();
            let mut child = std::process::Command::new(scabbard_bin())
                .args(["controller", "--listen", &format!("127.0.0.1:{port}")])
                .arg("--data-dir")
                .arg(dir.path())
                .env("SCABBARD_LOG", "warn")
                .env_remove("SCABBARD_BOOTSTRAP_TOKEN")
                .stdout(std::process::Stdio::piped())
                .spawn()?;
            let out = BufReader::new(child.stdout.take().unwrap());
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in out.lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
            Ok((child, rx, port))
        };
    let (mut first, rx, _) = start()?;
    // The banner ends with the login hint.
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.contains("scabbard login")) {
        lines.push(rx.recv_timeout(Duration::from_secs(20))?);
    }
    let tokens: Vec<&String> = lines
        .iter()
        .filter(|l| l.trim().starts_with("scbd_api_"))
        .collect();
    assert_eq!(tokens.len(), 1, "{lines:?}");
    // It works as an admin token.
    let token = tokens[0].trim().to_string();
    let port_line = lines
        .iter()
        .find(|l| l.starts_with("listening on "))
        .expect("listening line");
    let addr = port_line
        .trim_start_matches("listening on ")
        .trim()
        .to_string();
    rt.block_on(async {
        let ch = client::connect(&addr).await?;
        AdminServiceClient::new(with_token(ch, &token))
            .who_am_i(WhoAmIRequest {})
            .await?;
        anyhow::Ok(())
    })?;
    let _ = first.kill();
    let _ = first.wait();

    let (mut second, rx, port) = start()?;
    rt.block_on(eventually(
        "the restarted controller to serve",
        Duration::from_secs(20),
        || async move {
            let ch = client::connect(&format!("127.0.0.1:{port}")).await.ok()?;
            AdminServiceClient::new(with_token(ch, ADMIN_TOKEN))
                .cluster_status(scabbard_common::proto::ClusterStatusRequest {})
                .await
                .ok()
        },
    ))?;
    let later: Vec<String> = rx.try_iter().collect();
    assert!(later.iter().all(|l| !l.contains("scbd_api_")), "{later:?}");
    let _ = second.kill();
    let _ = second.wait();
    Ok(())
}

#[tokio::test]
async fn revoking_an_api_token_closes_its_open_watch() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let (id, secret) = api_token(&c, "default", Scope::Read, 0).await?;
    let mut events = tasks_as(&c, &secret)
        .await?
        .watch(WatchTasksRequest::default())
        .await?
        .into_inner();
    let revoked = Instant::now();
    admin(&c)
        .await?
        .revoke_token(RevokeTokenRequest {
            id,
            reason: "gone".into(),
        })
        .await?;
    let end = tokio::time::timeout(Duration::from_secs(1), events.message()).await?;
    let status = end.expect_err("the watch ends with an error");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(revoked.elapsed() < Duration::from_secs(1));
    Ok(())
}
