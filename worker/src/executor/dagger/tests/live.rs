//! A container task on a real Dagger engine. Skipped unless `DAGGER_LIVE=1`.
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
    let mut spec = container_spec("alpine:3.20", &[&["echo", "hello"]]);
    spec.outputs.push(scabbard_common::proto::OutputSpec {
        name: "greeting".into(),
        source: Some(scabbard_common::proto::output_spec::Source::LastStdoutLine(
            true,
        )),
    });
    let (tx, mut rx) = mpsc::channel(64);
    let collector = tokio::spawn(async move {
        let mut chunks = Vec::new();
        while let Some(c) = rx.recv().await {
            chunks.push(c);
        }
        chunks
    });
    let outcome = exec
        .run(ctx(dir.path()), &spec, tx, CancellationToken::new())
        .await;
    let chunks = collector.await.unwrap();
    println!("{}", text(&chunks, OutStream::System));
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
    assert_eq!(text(&chunks, OutStream::Stdout), "hello\n");
    assert_eq!(outcome.outputs["greeting"], "hello");
}
