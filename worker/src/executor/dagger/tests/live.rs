//! A container task on a real Dagger engine, run twice: its step really runs both times
//! (honest caching), writes `$SCABBARD_OUTPUT` and leaves an artifact. Skipped unless
//! `DAGGER_LIVE=1`.
//!
//! Run it on a host with the `dagger` CLI in `PATH` (or `_EXPERIMENTAL_DAGGER_CLI_BIN` set)
//! and an engine it can reach (Docker for the default engine container, or
//! `_EXPERIMENTAL_DAGGER_RUNNER_HOST` set), able to pull `alpine:3.20`:
//!
//! ```text
//! DAGGER_LIVE=1 cargo test --workspace --lib dagger::tests::live -- --nocapture
//! ```

use scabbard_common::proto::Outcome;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::super::DaggerExecutor;
use super::*;
use crate::config::DaggerConfig;
use crate::executor::Executor;

#[tokio::test]
async fn echo_hello_on_a_real_engine() {
    if std::env::var("DAGGER_LIVE").as_deref() != Ok("1") {
        println!("skipped: set DAGGER_LIVE=1 to run against a real Dagger engine");
        return;
    }
    let exec = DaggerExecutor::new(DaggerConfig {
        probe_timeout_ms: 300_000,
        session_start_timeout_ms: 300_000,
        ..Default::default()
    });
    assert!(
        exec.probe().await,
        "the engine does not answer (see the log)"
    );
    let dir = tempfile::tempdir().unwrap();
    // A step whose result differs on every run: the two attempts must not share it.
    let mut spec = container_spec(
        "alpine:3.20",
        &[&[
            "sh",
            "-c",
            "echo hello; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /out.txt; \
             echo nonce=$(cat /out.txt) >> $SCABBARD_OUTPUT",
        ]],
    );
    spec.outputs.push(scabbard_common::proto::OutputSpec {
        name: "greeting".into(),
        source: Some(scabbard_common::proto::output_spec::Source::LastStdoutLine(
            true,
        )),
    });
    spec.artifacts.push(scabbard_common::proto::ArtifactSpec {
        name: "nonce".into(),
        path: "/out.txt".into(),
        optional: false,
    });
    let mut nonces = Vec::new();
    for fencing_token in [1, 2] {
        let mut c = ctx(dir.path());
        c.fencing_token = fencing_token;
        c.artifact_dir = dir.path().join(format!("artifacts-{fencing_token}"));
        let (tx, mut rx) = mpsc::channel(64);
        let collector = tokio::spawn(async move {
            let mut chunks = Vec::new();
            while let Some(c) = rx.recv().await {
                chunks.push(c);
            }
            chunks
        });
        let outcome = exec
            .run(c.clone(), &spec, tx, CancellationToken::new())
            .await;
        let chunks = collector.await.unwrap();
        println!("{}", text(&chunks, OutStream::System));
        assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
        assert_eq!(text(&chunks, OutStream::Stdout), "hello\n");
        assert_eq!(outcome.outputs["greeting"], "hello");
        let nonce = outcome.outputs["nonce"].clone();
        assert_eq!(
            std::fs::read_to_string(c.artifact_dir.join("nonce")).unwrap(),
            nonce
        );
        nonces.push(nonce);
    }
    assert_ne!(
        nonces[0], nonces[1],
        "the second attempt was served from the cache"
    );
}
