//! Secrets through the recording mock: resolved first, carried by `setSecret` only, and
//! never in the log, the chunks or the result (the production log filter silences the
//! SDK's own query logging).

use std::sync::{Arc, Mutex};

use scabbard_common::proto;

use super::mock::{NONCE, after_step, assert_queries, first_step, output_size, run_mock, scratch};
use super::support::Script;
use super::*;
use crate::config::DaggerConfig;
use crate::executor::ExecOutcome;

/// Log output captured for the current thread (the production filter applied).
struct Captured {
    buf: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Captured {
    fn start(silenced: bool) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut filter = tracing_subscriber::EnvFilter::new("trace");
        if silenced {
            filter = scabbard_common::logging::silence_secrets(filter);
        }
        let writer = {
            let buf = buf.clone();
            move || SharedBuf(buf.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(writer)
            .finish();
        Self {
            buf,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
}

struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_are_resolved_first_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "file-s3cret\n").unwrap();
    let cfg = DaggerConfig {
        secrets: [(
            "deploy".to_string(),
            crate::config::SecretSource::File(key_file).into(),
        )]
        .into(),
        ..Default::default()
    };
    let mut spec = container_spec("alpine", &[&["sh", "-c", "use $KEY $TOKEN"]]);
    spec.secret_env.insert("TOKEN".into(), "env-s3cret".into());
    container_mut(&mut spec).secrets.push(proto::SecretRef {
        env: "KEY".into(),
        source: "deploy".into(),
    });
    let script = Script {
        stdout: [(1, "ok\n".to_string())].into(),
        ..Default::default()
    };
    let silenced = Captured::start(true);
    let ran = run_mock(&spec, &cfg, script, dir.path()).await;
    let logged = silenced.text();
    drop(silenced);
    let mut want = vec![
        r#"query{setSecret(name:"scabbard-source-deploy", plaintext:"file-s3cret"){id}}"#
            .to_string(),
        r#"query{setSecret(name:"scabbard-env-TOKEN", plaintext:"env-s3cret"){id}}"#.to_string(),
        scratch(1),
        first_step(
            &[r#"from(address:"alpine")"#],
            &[
                r#"withSecretVariable(name:"KEY", secret:"secret-1")"#,
                r#"withSecretVariable(name:"TOKEN", secret:"secret-2")"#,
                NONCE,
            ],
            r#"["sh","-c","use $KEY $TOKEN"]"#,
        ),
    ];
    want.extend(after_step(&ran.work, 1));
    want.push(output_size(1));
    assert_queries(&ran.queries, &want);
    assert_eq!(ran.outcome, ExecOutcome::succeeded());
    // The values travel in setSecret only, never as plain variables...
    for value in ["file-s3cret", "env-s3cret"] {
        let carrying: Vec<&String> = ran.queries.iter().filter(|q| q.contains(value)).collect();
        assert_eq!(carrying.len(), 1, "{value}: {carrying:?}");
        assert!(carrying[0].contains("setSecret"));
        // ...and are not in the log, the chunks or the result.
        assert!(!logged.contains(value), "{value} logged:\n{logged}");
        assert!(!format!("{:?}", ran.chunks).contains(value));
        assert!(!format!("{:?}", ran.outcome).contains(value));
    }
    assert!(
        logged.contains("dagger query") && logged.contains("plaintext:\"***\""),
        "{logged}"
    );
    // Without the production filter the SDK itself would log the plaintext.
    let unfiltered = Captured::start(false);
    let _ = run_mock(&spec, &cfg, Script::default(), dir.path()).await;
    assert!(
        unfiltered.text().contains("env-s3cret"),
        "the SDK no longer logs queries?"
    );
}
