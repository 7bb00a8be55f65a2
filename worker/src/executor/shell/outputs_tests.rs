//! Tests of shell task outputs against real processes: the `$SCABBARD_OUTPUT` file, declared
//! `path` and `last_stdout_line` outputs, and what becomes of the attempt when they break
//! their bounds or are missing.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use scabbard_common::proto::{self, ErrorClass, Outcome, output_spec::Source};
use tokio_util::sync::CancellationToken;

use super::tests::{run, spec, text};
use crate::executor::{ExecOutcome, OutStream, OutputChunk};

fn output(name: &str, source: Source) -> proto::OutputSpec {
    proto::OutputSpec {
        name: name.into(),
        source: Some(source),
    }
}

fn path_output(name: &str, path: &str) -> proto::OutputSpec {
    output(name, Source::Path(path.into()))
}

fn last_line_output(name: &str) -> proto::OutputSpec {
    output(name, Source::LastStdoutLine(true))
}

/// Runs `script` with `sh -c` and the given declared outputs.
async fn run_script(
    script: &str,
    outputs: Vec<proto::OutputSpec>,
    root: &Path,
) -> (ExecOutcome, Vec<OutputChunk>) {
    let mut spec = spec(&["sh", "-c", script]);
    spec.outputs = outputs;
    run(&spec, root, CancellationToken::new()).await
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn key_value_and_multi_line_outputs_come_back_and_later_keys_win() {
    let root = tempfile::tempdir().unwrap();
    let script = r#"
        echo "version=1.0" >> "$SCABBARD_OUTPUT"
        echo "image.tag=app:v1-rc" >> "$SCABBARD_OUTPUT"
        printf 'notes<<EOF\nfirst line\n\nthird=line\nEOF\n' >> "$SCABBARD_OUTPUT"
        echo "version=1.2.3" >> "$SCABBARD_OUTPUT"
    "#;
    let (outcome, chunks) = run_script(script, vec![], root.path()).await;
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
    assert_eq!(
        outcome.outputs,
        map(&[
            ("version", "1.2.3"),
            ("image.tag", "app:v1-rc"),
            ("notes", "first line\n\nthird=line"),
        ])
    );
    assert_eq!(text(&chunks, OutStream::System), "");
}

#[tokio::test]
async fn an_oversize_output_file_is_bounded_and_explained() {
    let root = tempfile::tempdir().unwrap();
    // 300 keys, one value of 20000 bytes, then one line that takes the file past 64 KiB.
    let script = r#"
        for i in $(seq 300); do echo "k$i=v$i"; done >> "$SCABBARD_OUTPUT"
        printf 'big=%s\n' "$(head -c 20000 /dev/zero | tr '\0' x)" >> "$SCABBARD_OUTPUT"
        printf 'huge=%s\n' "$(head -c 70000 /dev/zero | tr '\0' y)" >> "$SCABBARD_OUTPUT"
    "#;
    let (outcome, chunks) = run_script(script, vec![], root.path()).await;
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
    assert_eq!(outcome.outputs.len(), 256);
    assert_eq!(outcome.outputs["k256"], "v256");
    assert!(!outcome.outputs.contains_key("k257"));
    assert!(!outcome.outputs.contains_key("big"));
    assert!(!outcome.outputs.contains_key("huge"));
    let system = text(&chunks, OutStream::System);
    assert!(
        system.contains("more than the 64 KiB limit: only its first"),
        "{system}"
    );
    assert!(
        system.contains("output 'k257' (line 257) is beyond the limit of 256 outputs: dropped"),
        "{system}"
    );
    // Notes are bounded too: 44 dropped keys, the big value and the file size.
    assert!(system.contains("more problems not shown"), "{system}");
    assert!(system.lines().count() <= 17, "{system}");
}

#[tokio::test]
async fn an_oversize_value_is_dropped_with_a_note() {
    let root = tempfile::tempdir().unwrap();
    let script = r#"
        echo "big=small" >> "$SCABBARD_OUTPUT"
        printf 'big=%s\n' "$(head -c 20000 /dev/zero | tr '\0' x)" >> "$SCABBARD_OUTPUT"
        echo "ok=1" >> "$SCABBARD_OUTPUT"
    "#;
    let (outcome, chunks) = run_script(script, vec![], root.path()).await;
    assert_eq!(outcome.outcome, Outcome::Succeeded);
    // The oversize write replaces nothing: the key is gone rather than stale.
    assert_eq!(outcome.outputs, map(&[("ok", "1")]));
    assert_eq!(
        text(&chunks, OutStream::System),
        "$SCABBARD_OUTPUT: output 'big' (line 2) is 20000 bytes, more than the 16 KiB limit: dropped\n"
    );
}

#[tokio::test]
async fn a_declared_path_output_is_read_and_wins_over_the_file() {
    let root = tempfile::tempdir().unwrap();
    let script = r#"
        mkdir out
        echo 1.2.3 > out/version
        printf 'no newline' > plain
        echo "version=from-file" >> "$SCABBARD_OUTPUT"
        ln -s out/version link
    "#;
    let outputs = vec![
        path_output("version", "out/version"),
        path_output("plain", "./plain"),
        path_output("linked", "link"),
    ];
    let (outcome, _) = run_script(script, outputs, root.path()).await;
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
    assert_eq!(
        outcome.outputs,
        map(&[
            ("version", "1.2.3"),
            ("plain", "no newline"),
            ("linked", "1.2.3")
        ])
    );
}

#[tokio::test]
async fn a_path_leaving_the_working_directory_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "host data\n").unwrap();
    let script = format!(
        "ln -s '{}' leak; echo ran > marker",
        outside.path().join("secret").display()
    );
    let (outcome, _) = run_script(&script, vec![path_output("v", "leak")], root.path()).await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.error_class, ErrorClass::User);
    assert_eq!(
        outcome.message,
        "output 'v' was not produced: 'leak' resolves outside the working directory \
         (through a symbolic link): refused"
    );
    assert!(!outcome.outputs.values().any(|v| v.contains("host data")));

    // Absolute and `..` paths are refused before anything runs.
    let marker = root.path().join("task-1-7").join("marker");
    for bad in ["/etc/hostname", "../secret", "a/../../secret"] {
        let (outcome, _) = run_script(
            "echo ran > marker; exit 0",
            vec![path_output("v", bad)],
            root.path(),
        )
        .await;
        assert_eq!(outcome.outcome, Outcome::Failed, "{bad}");
        assert_eq!(outcome.error_class, ErrorClass::User);
        assert_eq!(
            outcome.message,
            format!(
                "output 'v': path '{bad}' must be relative to the working directory, without '..'"
            )
        );
        assert!(!marker.exists());
    }
}

#[tokio::test]
async fn a_missing_declared_file_fails_a_successful_attempt() {
    let root = tempfile::tempdir().unwrap();
    let script = r#"echo "other=1" >> "$SCABBARD_OUTPUT""#;
    let (outcome, _) = run_script(
        script,
        vec![path_output("version", "out/version")],
        root.path(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.error_class, ErrorClass::User);
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(
        outcome.message,
        "output 'version' was not produced: file 'out/version' not found in the working directory"
    );
    // What was produced is kept for debugging.
    assert_eq!(outcome.outputs, map(&[("other", "1")]));
}

#[tokio::test]
async fn outputs_are_kept_on_a_failing_exit_code() {
    let root = tempfile::tempdir().unwrap();
    let script = r#"echo "progress=step 2" >> "$SCABBARD_OUTPUT"; exit 3"#;
    let (outcome, chunks) = run_script(
        script,
        vec![path_output("report", "report.txt")],
        root.path(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.exit_code, 3);
    // The real failure stays the message; the missing output is a log line.
    assert_eq!(outcome.message, "exited with code 3");
    assert_eq!(outcome.outputs, map(&[("progress", "step 2")]));
    assert_eq!(
        text(&chunks, OutStream::System),
        "output 'report' was not produced: file 'report.txt' not found in the working directory\n"
    );
}

#[tokio::test]
async fn outputs_are_kept_when_the_attempt_times_out() {
    let root = tempfile::tempdir().unwrap();
    let mut spec = spec(&[
        "sh",
        "-c",
        r#"echo "seen=1" >> "$SCABBARD_OUTPUT"; sleep 100"#,
    ]);
    spec.timeout_ms = 300;
    let (outcome, _) = run(&spec, root.path(), CancellationToken::new()).await;
    assert_eq!(outcome.outcome, Outcome::TimedOut);
    assert_eq!(outcome.outputs, map(&[("seen", "1")]));
}

#[tokio::test]
async fn last_stdout_line_with_and_without_a_final_newline() {
    let root = tempfile::tempdir().unwrap();
    for (script, expected) in [
        ("echo building; echo 1.2.3; echo; echo '   '", "1.2.3"),
        ("echo building; printf 'v2 no newline'", "v2 no newline"),
        ("echo first; echo error >&2", "first"),
    ] {
        let (outcome, _) = run_script(script, vec![last_line_output("v")], root.path()).await;
        assert_eq!(outcome.outcome, Outcome::Succeeded, "{script}: {outcome:?}");
        assert_eq!(outcome.outputs, map(&[("v", expected)]), "{script}");
    }
}

#[tokio::test]
async fn last_stdout_line_after_a_huge_line() {
    let root = tempfile::tempdir().unwrap();
    let huge = "head -c 1000000 /dev/zero | tr '\\0' x";
    // A huge line followed by a short one: the short one.
    let script = format!("{huge}; echo; echo done");
    let (outcome, _) = run_script(&script, vec![last_line_output("v")], root.path()).await;
    assert_eq!(outcome.outcome, Outcome::Succeeded, "{outcome:?}");
    assert_eq!(outcome.outputs, map(&[("v", "done")]));
    // A huge last line cannot be the value: the attempt fails and says why.
    let (outcome, _) = run_script(huge, vec![last_line_output("v")], root.path()).await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(
        outcome.message,
        "output 'v' was not produced: the last non-empty stdout line is 1000000 bytes, \
         more than the 16 KiB limit"
    );
    // No stdout at all.
    let (outcome, _) = run_script("true", vec![last_line_output("v")], root.path()).await;
    assert_eq!(
        outcome.message,
        "output 'v' was not produced: the task wrote no non-empty line to stdout"
    );
}

#[tokio::test]
async fn container_path_outputs_are_refused_by_the_shell_executor() {
    let root = tempfile::tempdir().unwrap();
    let (outcome, _) = run_script(
        "true",
        vec![output("dist", Source::ContainerPath("/app/dist".into()))],
        root.path(),
    )
    .await;
    assert_eq!(outcome.outcome, Outcome::Failed);
    assert_eq!(outcome.error_class, ErrorClass::User);
    assert!(
        outcome
            .message
            .starts_with("output 'dist' uses `container_path`, which only container tasks support"),
        "{}",
        outcome.message
    );
}

#[tokio::test]
async fn a_replaced_output_file_is_not_followed_and_does_not_hang() {
    let root = tempfile::tempdir().unwrap();
    for (script, note) in [
        (
            r#"rm "$SCABBARD_OUTPUT"; mkfifo "$SCABBARD_OUTPUT""#,
            "it is not a regular file",
        ),
        (
            r#"ln -sf /etc/hostname "$SCABBARD_OUTPUT""#,
            "it is a symbolic link",
        ),
        (
            r#"rm "$SCABBARD_OUTPUT""#,
            "the file was removed by the task",
        ),
    ] {
        let (outcome, chunks) = tokio::time::timeout(
            Duration::from_secs(10),
            run_script(script, vec![], root.path()),
        )
        .await
        .expect("finished in time");
        assert_eq!(outcome.outcome, Outcome::Succeeded, "{script}");
        assert!(outcome.outputs.is_empty());
        let system = text(&chunks, OutStream::System);
        assert!(system.contains(note), "{script}: {system}");
    }
}
