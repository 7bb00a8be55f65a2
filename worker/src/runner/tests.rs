//! Tests of the runner with a real shell executor: what reaches the controller.

use std::sync::Arc;
use std::time::Duration;

use scabbard_common::proto::{self, AgentMessage, agent_message, output_spec::Source};
use tokio::sync::mpsc;

use super::{Runner, RunnerParts};
use crate::artifacts::{ArtifactCache, Artifacts};
use crate::executor::{Executor, ShellExecutor};
use crate::link::ControllerLink;
use crate::spool::Spool;

/// A runner with `executors`, its files under `dir`, its artifact calls going to `store`
/// (an address; nothing listens on port 1).
async fn runner(
    dir: &std::path::Path,
    executors: Vec<Arc<dyn Executor>>,
    outbox: mpsc::Sender<AgentMessage>,
    store: &str,
) -> Arc<Runner> {
    let spool = Arc::new(Spool::open(&dir.join("spool")).unwrap());
    let link = Arc::new(ControllerLink::new(
        store,
        scabbard_common::client::ClientOptions::default(),
    ));
    link.set_token("scbd_agent_test");
    let cache = ArtifactCache::open(&dir.join("artifact-cache"), 1 << 30)
        .await
        .unwrap();
    Arc::new(Runner::new(RunnerParts {
        spool,
        executors,
        work_root: dir.join("work"),
        default_timeout: Duration::from_secs(30),
        slots: 1,
        outbox,
        agent_name: "host-1".into(),
        artifacts: Arc::new(Artifacts::new(cache, link)),
    }))
}

/// Starts one attempt of `spec` and returns its log chunks and its result.
async fn run_attempt(spec: proto::TaskSpec) -> (Vec<proto::AgentLogChunk>, proto::TaskResult) {
    let dir = tempfile::tempdir().unwrap();
    run_attempt_in(dir.path(), "127.0.0.1:1", spec).await
}

/// [`run_attempt`] with the worker's files under `dir` and artifacts at `store`.
async fn run_attempt_in(
    dir: &std::path::Path,
    store: &str,
    spec: proto::TaskSpec,
) -> (Vec<proto::AgentLogChunk>, proto::TaskResult) {
    let (outbox, mut rx) = mpsc::channel(64);
    let executors: Vec<Arc<dyn Executor>> = vec![Arc::new(ShellExecutor::new())];
    let runner = runner(dir, executors, outbox, store).await;
    runner.set_agent_id("agent-1");
    let assign = proto::Assign {
        project: String::new(),
        task_id: "task-1".into(),
        fencing_token: 1,
        attempt: 1,
        spec: Some(spec),
        traceparent: String::new(),
        tracestate: String::new(),
    };
    assert_eq!(runner.start(assign), Ok(true));
    let mut chunks = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("attempt finished in time")
            .expect("outbox open");
        match msg {
            AgentMessage {
                msg: Some(agent_message::Msg::Log(chunk)),
            } => chunks.push(chunk),
            AgentMessage {
                msg: Some(agent_message::Msg::Finished(f)),
            } => return (chunks, f.result.expect("a result")),
            other => panic!("unexpected message {other:?}"),
        }
    }
}

#[tokio::test]
async fn secrets_written_to_outputs_come_back_masked() {
    let script = r#"
        echo "token=$TOKEN" >> "$SCABBARD_OUTPUT"
        echo "$TOKEN=as a key" >> "$SCABBARD_OUTPUT"
        printf 'multi<<EOF\nbefore\n%s after\nEOF\n' "$TOKEN" >> "$SCABBARD_OUTPUT"
        echo "agent=$SCABBARD_AGENT_ID/$SCABBARD_AGENT_NAME" >> "$SCABBARD_OUTPUT"
        printf '%s.big=%s\n' "$TOKEN" "$(head -c 20000 /dev/zero | tr '\0' x)" >> "$SCABBARD_OUTPUT"
        echo "encoded=$(printf %s "$TOKEN" | base64)" >> "$SCABBARD_OUTPUT"
        echo "inside=$(printf 'x:%s' "$TOKEN" | base64)" >> "$SCABBARD_OUTPUT"
        echo "last $TOKEN"
    "#;
    let spec = proto::TaskSpec {
        kind: Some(proto::task_spec::Kind::Shell(proto::ShellTask {
            command: vec!["sh".into(), "-c".into(), script.into()],
        })),
        secret_env: [("TOKEN".to_string(), "s3cr3t-value".to_string())].into(),
        outputs: vec![proto::OutputSpec {
            name: "line".into(),
            source: Some(Source::LastStdoutLine(true)),
        }],
        ..Default::default()
    };
    let (chunks, result) = run_attempt(spec).await;
    assert_eq!(
        result.outcome,
        proto::Outcome::Succeeded as i32,
        "{result:?}"
    );
    let outputs: Vec<(&str, &str)> = {
        let mut o: Vec<_> = result
            .outputs
            .iter()
            .filter(|(k, _)| *k != "inside")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        o.sort_unstable();
        o
    };
    // Its base64 inside a longer encoded value: the part made of the secret is masked.
    let inside = &result.outputs["inside"];
    assert!(inside.contains("***"), "{inside}");
    assert_eq!(
        outputs,
        [
            // The secret was used as a key: masked too.
            ("***", "as a key"),
            ("agent", "agent-1/host-1"),
            // Its base64 is masked like the secret itself.
            ("encoded", "***"),
            ("line", "last ***"),
            ("multi", "before\n*** after"),
            ("token", "***"),
        ]
    );
    let log: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
    let log = String::from_utf8_lossy(&log);
    assert!(!log.contains("s3cr3t"), "{log}");
    // The system line about the dropped value names its key, masked.
    assert!(
        log.contains("output '***.big' (line 8) is 20000 bytes"),
        "{log}"
    );
    assert!(!format!("{result:?}").contains("s3cr3t"));
    // The log names each masked output.
    for name in ["***", "encoded", "inside", "line", "multi", "token"] {
        assert!(
            log.contains(&format!("output {name:?} contained a secret")),
            "{name}: {log}"
        );
    }
    assert!(!log.contains("output \"agent\" contained"), "{log}");
}

/// An executor whose availability the test switches (it also offers `gpu`).
struct Switchable(std::sync::atomic::AtomicBool);

#[async_trait::async_trait]
impl Executor for Switchable {
    fn capability(&self) -> &'static str {
        "dagger"
    }

    fn available(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn extra_capabilities(&self) -> Vec<&'static str> {
        vec!["gpu"]
    }

    async fn run(
        &self,
        _ctx: crate::executor::ExecContext,
        _spec: &proto::TaskSpec,
        _out: mpsc::Sender<crate::executor::OutputChunk>,
        _cancel: tokio_util::sync::CancellationToken,
    ) -> crate::executor::ExecOutcome {
        crate::executor::ExecOutcome::succeeded()
    }
}

#[tokio::test]
async fn unavailable_executors_are_not_advertised_and_refuse_work() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _rx) = mpsc::channel(64);
    let dagger = Arc::new(Switchable(false.into()));
    let executors: Vec<Arc<dyn Executor>> = vec![Arc::new(ShellExecutor::new()), dagger.clone()];
    let runner = runner(dir.path(), executors, outbox, "127.0.0.1:1").await;
    assert_eq!(runner.capabilities(), ["shell"]);
    let assign = proto::Assign {
        project: String::new(),
        task_id: "task-1".into(),
        fencing_token: 1,
        attempt: 1,
        spec: Some(proto::TaskSpec {
            kind: Some(proto::task_spec::Kind::Container(
                proto::ContainerTask::default(),
            )),
            ..Default::default()
        }),
        traceparent: String::new(),
        tracestate: String::new(),
    };
    let refused = runner.start(assign.clone()).unwrap_err();
    assert!(refused.contains("not available"), "{refused}");
    dagger.0.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(runner.capabilities(), ["dagger", "gpu", "shell"]);
    assert_eq!(runner.start(assign), Ok(true));
}

#[tokio::test]
async fn inputs_arrive_and_artifacts_are_uploaded_before_the_result() {
    use crate::artifacts::fake::{FakeStore, serve};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FakeStore::default());
    let addr = serve(store.clone()).await;
    // The producer's directory artifact, as the controller would have stored it.
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("lib")).unwrap();
    std::fs::write(src.join("lib/data.txt"), "from the producer\n").unwrap();
    let archive = dir.path().join("dist.tar.zst");
    scabbard_common::artifact::pack(&src, &archive).unwrap();
    let input = store.put(
        "producer",
        "dist",
        proto::ArtifactKind::Directory,
        std::fs::read(&archive).unwrap(),
    );
    let script = r#"
        set -e
        test "$(cat in/dist/lib/data.txt)" = "from the producer"
        echo changed > in/dist/lib/data.txt
        mkdir -p out/site && echo page > out/site/index.html
        printf summary > summary.txt
    "#;
    let spec = proto::TaskSpec {
        kind: Some(proto::task_spec::Kind::Shell(proto::ShellTask {
            command: vec!["sh".into(), "-c".into(), script.into()],
        })),
        inputs: vec![proto::ArtifactInput {
            from: "${{ tasks.producer.artifacts.dist }}".into(),
            path: "in/dist".into(),
            artifact: Some(input.clone()),
        }],
        artifacts: vec![
            proto::ArtifactSpec {
                name: "site".into(),
                path: "out/site".into(),
                optional: false,
            },
            proto::ArtifactSpec {
                name: "summary".into(),
                path: "summary.txt".into(),
                optional: false,
            },
            proto::ArtifactSpec {
                name: "extra".into(),
                path: "not/there".into(),
                optional: true,
            },
        ],
        ..Default::default()
    };
    let (chunks, result) = run_attempt_in(dir.path(), &addr, spec).await;
    assert_eq!(
        result.outcome,
        proto::Outcome::Succeeded as i32,
        "{result:?}"
    );
    let names: Vec<&str> = result.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["site", "summary"]);
    for r in &result.artifacts {
        let (stored, _) = store.get("task-1", &r.name).expect("uploaded");
        assert_eq!(&stored, r);
        assert_eq!(r.fencing_token, 1);
    }
    let log: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("input in/dist (producer/dist)"), "{log}");
    assert!(log.contains("artifact site: "), "{log}");
    assert!(log.contains("optional artifact extra"), "{log}");
    // The cached input is intact although the task changed its copy.
    let cached = dir
        .path()
        .join("artifact-cache")
        .join(&input.sha256)
        .join("content/lib/data.txt");
    assert_eq!(
        std::fs::read_to_string(cached).unwrap(),
        "from the producer\n"
    );
    // Nothing is left in the work root: neither the work dir nor the artifact dir.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("work"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A tmpfs of `bytes` mounted at `dir` (as root), unmounted when dropped; `None` where
/// this process may not mount.
struct TinyDisk(std::path::PathBuf);

impl TinyDisk {
    fn mount(dir: &std::path::Path, bytes: usize) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "scabbard-test",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_spool_that_cannot_be_written_fails_the_attempt_visibly() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_disk) = TinyDisk::mount(&dir.path().join("spool"), 64 << 10) else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    // Far more output than the spool can hold, then a long sleep that only a stop ends.
    let spec = proto::TaskSpec {
        kind: Some(proto::task_spec::Kind::Shell(proto::ShellTask {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                "head -c 400000 /dev/zero | tr '\\0' a; sleep 30".into(),
            ],
        })),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let (chunks, result) = run_attempt_in(dir.path(), "127.0.0.1:1", spec).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the task was not stopped"
    );
    assert_eq!(result.outcome, proto::Outcome::Failed as i32, "{result:?}");
    assert_eq!(
        result.error_class,
        proto::ErrorClass::Infrastructure as i32,
        "{result:?}"
    );
    assert!(
        result.message.contains("cannot spool"),
        "{}",
        result.message
    );
    // The controller hears the reason in the log too (those chunks went out unspooled).
    let system: String = chunks
        .iter()
        .filter(|c| c.stream == proto::LogStream::System as i32)
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect();
    assert!(system.contains("cannot spool"), "{system}");
    // Sequence numbers stay gapless, so the controller keeps every chunk it received.
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.seq, i as u64);
    }
}

/// The result of the attempt `token` of `task-1`, skipping its log chunks.
async fn result_of(rx: &mut mpsc::Receiver<AgentMessage>, token: u64) -> proto::TaskResult {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("attempt finished in time")
            .expect("outbox open");
        if let Some(agent_message::Msg::Finished(f)) = msg.msg
            && f.fencing_token == token
        {
            return f.result.expect("a result");
        }
    }
}

#[tokio::test]
async fn a_cancel_that_comes_before_its_assign_ends_that_attempt_only() {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, mut rx) = mpsc::channel(64);
    let executors: Vec<Arc<dyn Executor>> = vec![Arc::new(ShellExecutor::new())];
    let runner = runner(dir.path(), executors, outbox, "127.0.0.1:1").await;
    let assign = |token: u64, script: &str| proto::Assign {
        task_id: "task-1".into(),
        fencing_token: token,
        attempt: token as u32,
        spec: Some(proto::TaskSpec {
            kind: Some(proto::task_spec::Kind::Shell(proto::ShellTask {
                command: vec!["sh".into(), "-c".into(), script.into()],
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    // The cancel of attempt 1 arrives first: attempt 1 starts cancelled and ends at once.
    runner.cancel(&("task-1".into(), 1));
    assert_eq!(runner.start(assign(1, "sleep 300")), Ok(true));
    let r = result_of(&mut rx, 1).await;
    assert_eq!(r.outcome, proto::Outcome::Cancelled as i32, "{r:?}");
    // It was used up, and fenced by its token: attempt 2 of the same task runs normally.
    runner.forget(&("task-1".into(), 1));
    assert_eq!(runner.start(assign(2, "echo fine")), Ok(true));
    let r = result_of(&mut rx, 2).await;
    assert_eq!(r.outcome, proto::Outcome::Succeeded as i32, "{r:?}");
}
