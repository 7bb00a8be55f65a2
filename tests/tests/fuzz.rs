//! Malformed and oversized input on every method of every `scabbard.v1` service (taken
//! from the descriptor set, so new methods are covered without touching this test), with
//! no token, the admin token and an agent token: random bytes, garbage and truncated
//! protobuf, broken gRPC framing (bad compression flags, length prefixes that lie, several
//! messages to a unary method) and messages over `max_message_bytes`. Each call must end
//! with a gRPC status within a deadline (server-streaming methods may instead start their
//! stream); afterwards the controller still serves health checks and tasks.
//!
//! Calls go over raw HTTP/2 (`h2`) so the framing itself can be wrong; each uses its own
//! connection, so no connection-level protection of the server spills from one case into
//! the next.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;
use scabbard_common::client::{AgentServiceClient, TaskServiceClient};
use scabbard_common::proto::RegisterRequest;
use scabbard_tests::*;

/// `max_message_bytes` of the controller under test.
const MAX_MESSAGE: usize = 64 * 1024;
/// How long one call may take to answer before it counts as a hang.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// How long a started server stream is watched for its end before it is dropped.
const STREAM_GRACE: Duration = Duration::from_millis(100);
/// Random cases after the fixed ones.
const RANDOM_CASES: u32 = 2000;

/// A method, as found in the descriptor set.
#[derive(Debug, Clone)]
struct Method {
    path: String,
    server_streaming: bool,
}

/// Every method of every service of the `scabbard.v1` package.
fn methods() -> Vec<Method> {
    let set = prost_types::FileDescriptorSet::decode(scabbard_common::proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut out = Vec::new();
    for file in set.file {
        if file.package() != "scabbard.v1" {
            continue;
        }
        for svc in &file.service {
            for m in &svc.method {
                out.push(Method {
                    path: format!("/scabbard.v1.{}/{}", svc.name(), m.name()),
                    server_streaming: m.server_streaming(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// What the length prefix of a frame says.
#[derive(Debug, Clone)]
enum Len {
    /// The payload's length.
    Exact,
    /// Off by this much (more: the body ends early; less: trailing bytes).
    Off(i32),
    /// Any value (often far over the limit).
    Any(u32),
}

/// A request body.
#[derive(Debug, Clone)]
enum Body {
    /// No DATA frame at all.
    Nothing,
    /// Bytes that are not gRPC framing.
    Raw(Vec<u8>),
    /// One gRPC frame, possibly lying, with a `grpc-encoding` header.
    Frame {
        flag: u8,
        len: Len,
        payload: Vec<u8>,
        encoding: Option<&'static str>,
    },
    /// Several well-formed frames (more than one is wrong for unary methods).
    Frames(Vec<Vec<u8>>),
}

fn frame(flag: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(5 + payload.len());
    b.push(flag);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

impl Body {
    fn encode(&self) -> (Option<Vec<u8>>, Option<&'static str>) {
        match self {
            Body::Nothing => (None, None),
            Body::Raw(b) => (Some(b.clone()), None),
            Body::Frame {
                flag,
                len,
                payload,
                encoding,
            } => {
                let n = payload.len() as i64;
                let declared = match len {
                    Len::Exact => n,
                    Len::Off(d) => (n + i64::from(*d)).max(0),
                    Len::Any(v) => i64::from(*v),
                };
                let declared = u32::try_from(declared).unwrap_or(u32::MAX);
                (Some(frame(*flag, declared, payload)), *encoding)
            }
            Body::Frames(fs) => (
                Some(
                    fs.iter()
                        .flat_map(|p| frame(0, p.len() as u32, p))
                        .collect(),
                ),
                None,
            ),
        }
    }
}

/// How a call ended.
#[derive(Debug)]
enum Outcome {
    /// A gRPC status (code).
    Status(i32),
    /// A server stream started (HTTP 200, gRPC content type) and was still open.
    StreamOpen,
}

/// The token to send: `t`, except that the agent's `RotateToken` calls use an agent of
/// their own (`rotated`). RotateToken succeeds on any body that decodes (its request is
/// empty) and retires the token; the other agent methods keep seeing a valid one.
fn token_for<'a>(m: &Method, t: Option<&'a str>, rotated: &'a str) -> Option<&'a str> {
    match t {
        Some(t) if t != ADMIN_TOKEN && m.path.ends_with("/RotateToken") => Some(rotated),
        t => t,
    }
}

/// One raw gRPC call on a fresh HTTP/2 connection.
async fn call(
    addr: SocketAddr,
    method: &Method,
    token: Option<&str>,
    body: &Body,
) -> anyhow::Result<Outcome> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (client, conn) = h2::client::handshake(tcp).await?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = tokio::time::timeout(CALL_DEADLINE, exchange(client, addr, method, token, body))
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "no answer within {CALL_DEADLINE:?} (the controller hangs)"
            ))
        });
    conn.abort();
    result
}

async fn exchange(
    client: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    method: &Method,
    token: Option<&str>,
    body: &Body,
) -> anyhow::Result<Outcome> {
    let (data, encoding) = body.encode();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{}", method.path))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(e) = encoding {
        req = req.header("grpc-encoding", e);
    }
    let mut client = client.ready().await?;
    let (resp, mut send) = client.send_request(req.body(())?, data.is_none())?;
    if let Some(d) = data {
        // The server may answer (and reset the stream) before it read everything.
        let _ = send.send_data(Bytes::from(d), true);
    }
    let resp = resp.await?;
    anyhow::ensure!(
        resp.status() == http::StatusCode::OK,
        "HTTP status {} instead of a gRPC answer",
        resp.status()
    );
    if let Some(code) = grpc_status(resp.headers())? {
        return Ok(Outcome::Status(code)); // trailers-only answer
    }
    let mut body = resp.into_body();
    let rest = async {
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await?;
        anyhow::Ok(trailers)
    };
    if method.server_streaming {
        match tokio::time::timeout(STREAM_GRACE, rest).await {
            Err(_) => return Ok(Outcome::StreamOpen),
            Ok(t) => return status_of(t?),
        }
    }
    status_of(rest.await?)
}

fn status_of(trailers: Option<http::HeaderMap>) -> anyhow::Result<Outcome> {
    let trailers = trailers.ok_or_else(|| anyhow::anyhow!("the answer has no trailers"))?;
    grpc_status(&trailers)?
        .map(Outcome::Status)
        .ok_or_else(|| anyhow::anyhow!("trailers without grpc-status: {trailers:?}"))
}

fn grpc_status(h: &http::HeaderMap) -> anyhow::Result<Option<i32>> {
    let Some(v) = h.get("grpc-status") else {
        return Ok(None);
    };
    let code: i32 = v.to_str()?.parse()?;
    anyhow::ensure!((0..=16).contains(&code), "grpc-status {code} is not a code");
    Ok(Some(code))
}

/// Bytes that look like protobuf: tags with random field numbers and wire types, with
/// plausible or nonsensical contents, possibly cut short.
fn protobuf_like() -> impl Strategy<Value = Vec<u8>> {
    let field = (1u32..40, 0u32..8, prop::collection::vec(any::<u8>(), 0..24)).prop_map(
        |(num, wire, content)| {
            let mut b = Vec::new();
            prost::encoding::encode_varint(u64::from(num << 3 | wire), &mut b);
            match wire {
                0 => prost::encoding::encode_varint(
                    content
                        .iter()
                        .fold(0u64, |a, x| a.rotate_left(8) ^ u64::from(*x)),
                    &mut b,
                ),
                // Length-delimited: sometimes a lying length.
                2 => {
                    let len = content.first().map_or(content.len() as u64, |f| {
                        if f % 4 == 0 {
                            u64::from(*f) * 1000
                        } else {
                            content.len() as u64
                        }
                    });
                    prost::encoding::encode_varint(len, &mut b);
                    b.extend_from_slice(&content);
                }
                _ => b.extend_from_slice(&content),
            }
            b
        },
    );
    (
        prop::collection::vec(field, 0..8),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(fields, cut)| {
            let all: Vec<u8> = fields.concat();
            // Truncated at a random point half of the time.
            if all.is_empty() || cut.index(2) == 0 {
                all
            } else {
                let n = cut.index(all.len());
                all[..n].to_vec()
            }
        })
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        protobuf_like(),
        Just(Vec::new()),
    ]
}

fn body() -> impl Strategy<Value = Body> {
    let len = prop_oneof![
        3 => Just(Len::Exact),
        2 => (-8i32..64).prop_map(Len::Off),
        1 => any::<u32>().prop_map(Len::Any),
    ];
    let flag = prop_oneof![3 => Just(0u8), 2 => Just(1u8), 1 => any::<u8>()];
    let encoding = prop_oneof![
        4 => Just(None),
        1 => Just(Some("gzip")),
        1 => Just(Some("identity")),
        1 => Just(Some("snappy")),
    ];
    prop_oneof![
        1 => Just(Body::Nothing),
        3 => prop::collection::vec(any::<u8>(), 0..600).prop_map(Body::Raw),
        6 => (flag, len, payload(), encoding).prop_map(|(flag, len, payload, encoding)| {
            Body::Frame {
                flag,
                len,
                payload,
                encoding,
            }
        }),
        2 => prop::collection::vec(payload(), 2..4).prop_map(Body::Frames),
    ]
}

/// The same malformed bodies for every method, whatever the random part draws.
fn fixed_bodies() -> Vec<(&'static str, Body)> {
    let oversized = vec![0x0a; MAX_MESSAGE + 1];
    vec![
        ("no body", Body::Nothing),
        ("empty body", Body::Raw(vec![])),
        ("a cut frame header", Body::Raw(vec![0, 0, 0])),
        (
            "random bytes",
            Body::Raw(b"\xde\xad\xbe\xef not grpc at all".to_vec()),
        ),
        (
            "garbage protobuf",
            Body::Frame {
                flag: 0,
                len: Len::Exact,
                payload: vec![0xff; 32],
                encoding: None,
            },
        ),
        (
            "truncated protobuf",
            Body::Frame {
                flag: 0,
                len: Len::Exact,
                payload: vec![0x0a, 0x7f, b'x'],
                encoding: None,
            },
        ),
        (
            "compressed flag without grpc-encoding",
            Body::Frame {
                flag: 1,
                len: Len::Exact,
                payload: vec![1, 2, 3],
                encoding: None,
            },
        ),
        (
            "invalid compression flag",
            Body::Frame {
                flag: 7,
                len: Len::Exact,
                payload: vec![],
                encoding: None,
            },
        ),
        (
            "gzip flag on bytes that are not gzip",
            Body::Frame {
                flag: 1,
                len: Len::Exact,
                payload: b"not gzip".to_vec(),
                encoding: Some("gzip"),
            },
        ),
        (
            "unsupported grpc-encoding",
            Body::Frame {
                flag: 1,
                len: Len::Exact,
                payload: vec![],
                encoding: Some("snappy"),
            },
        ),
        (
            "length prefix larger than the body",
            Body::Frame {
                flag: 0,
                len: Len::Off(100),
                payload: vec![0x0a, 0x01, b'x'],
                encoding: None,
            },
        ),
        (
            "length prefix of 4 GiB",
            Body::Frame {
                flag: 0,
                len: Len::Any(u32::MAX),
                payload: vec![],
                encoding: None,
            },
        ),
        (
            "trailing bytes after the frame",
            Body::Frame {
                flag: 0,
                len: Len::Off(-2),
                payload: vec![0x0a, 0x01, b'x', 0xff, 0xff],
                encoding: None,
            },
        ),
        (
            "two messages",
            Body::Frames(vec![vec![], vec![0x0a, 0x01, b'x']]),
        ),
        (
            "a message over max_message_bytes",
            Body::Frame {
                flag: 0,
                len: Len::Exact,
                payload: oversized,
                encoding: None,
            },
        ),
    ]
}

#[test]
fn malformed_and_oversized_messages_get_statuses_and_the_controller_keeps_running()
-> anyhow::Result<()> {
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let opts = ControllerOpts {
        extra: vec!["--max-message-bytes".into(), MAX_MESSAGE.to_string()],
        ..Default::default()
    };
    let ctl = Controller::start(&dir.path().join("c"), free_port(), &opts)?;
    let addr = ctl.addr;

    let methods = methods();
    for svc in [
        "TaskService",
        "AgentService",
        "AdminService",
        "ProjectService",
    ] {
        assert!(
            methods
                .iter()
                .any(|m| m.path.starts_with(&format!("/scabbard.v1.{svc}/"))),
            "no {svc} methods in the descriptor set"
        );
    }
    let (agent_token, rotated_token) = rt.block_on(async {
        let mut tasks = tasks_client(&addr.to_string()).await?; // waits until it is up
        submit(&mut tasks, shell("true")).await?;
        let ch = scabbard_common::client::connect(&addr.to_string()).await?;
        let mut agents = AgentServiceClient::new(ch);
        let mut token = async |name: &str| {
            let r = agents
                .register(RegisterRequest {
                    registration_token: TOKEN.into(),
                    name: name.into(),
                    capabilities: vec!["shell".into()],
                    slots: 1,
                    ..Default::default()
                })
                .await?;
            anyhow::Ok(r.into_inner().agent_token)
        };
        anyhow::Ok((token("fuzz").await?, token("fuzz-rotated").await?))
    })?;
    let tokens: [Option<&str>; 3] = [None, Some(ADMIN_TOKEN), Some(&agent_token)];
    let rotated_token = rotated_token.as_str();

    // Every fixed case on every method with every credential, 16 at a time.
    let fixed = fixed_bodies();
    let mut cases = Vec::new();
    for m in &methods {
        for t in tokens {
            for (what, b) in &fixed {
                cases.push((m, t, *what, b));
            }
        }
    }
    let total_fixed = cases.len();
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let failures: Vec<String> = rt.block_on(async {
        futures::stream::iter(cases)
            .map(|(m, t, what, b)| async move {
                let r = call(addr, m, token_for(m, t, rotated_token), b).await;
                let who = match t {
                    None => "none",
                    Some(ADMIN_TOKEN) => "admin",
                    Some(_) => "agent",
                };
                (m, who, what, r)
            })
            .buffer_unordered(16)
            .filter_map(|(m, who, what, r)| {
                let out = match r {
                    Ok(o) => {
                        *codes.entry(format!("{o:?}")).or_default() += 1;
                        // The size limit holds where the body is read (past auth).
                        if what == "a message over max_message_bytes"
                            && who == "admin"
                            && m.path == "/scabbard.v1.TaskService/Submit"
                            && !matches!(o, Outcome::Status(11 | 8))
                        {
                            Some(format!("{} oversized: {o:?}", m.path))
                        } else {
                            None
                        }
                    }
                    Err(e) => Some(format!("{} ({what}, token: {who}): {e:#}", m.path)),
                };
                futures::future::ready(out)
            })
            .collect()
            .await
    });
    assert!(
        failures.is_empty(),
        "calls without a proper answer:\n{}",
        failures.join("\n")
    );

    // Random cases: any method, any credential, any body.
    let mut runner = TestRunner::new(Config {
        cases: RANDOM_CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let n = methods.len();
    let random_codes = std::sync::Mutex::new(std::collections::BTreeMap::<String, usize>::new());
    let strategy = (0..n, 0..tokens.len(), body());
    runner
        .run(&strategy, |(m, t, b)| {
            let o = rt
                .block_on(call(
                    addr,
                    &methods[m],
                    token_for(&methods[m], tokens[t], rotated_token),
                    &b,
                ))
                .map_err(|e| TestCaseError::fail(format!("{}: {e:#}", methods[m].path)))?;
            *random_codes
                .lock()
                .expect("codes")
                .entry(format!("{o:?}"))
                .or_default() += 1;
            Ok(())
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "{} methods, {total_fixed} fixed calls in {:.1}s, answers {codes:?}; {RANDOM_CASES} random, answers {:?}",
        methods.len(),
        started.elapsed().as_secs_f64(),
        random_codes.lock().expect("codes")
    );

    // Still alive and well: the process runs, health says SERVING, tasks work.
    assert!(pid_alive(ctl.proc.pid()), "the controller died");
    rt.block_on(async {
        let ch = scabbard_common::client::connect(&addr.to_string()).await?;
        let health = tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        assert_eq!(
            health.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
        let mut tasks: Tasks = TaskServiceClient::new(admin_channel(&addr.to_string()).await?);
        let id = submit(&mut tasks, shell("true")).await?;
        assert_eq!(get(&mut tasks, &id).await?.id, id);
        anyhow::Ok(())
    })?;
    Ok(())
}
