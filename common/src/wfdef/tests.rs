use super::*;
use crate::proto::{output_spec::Source, task_spec::Kind};

const FULL: &str = r#"
name: build-and-test
failure_policy: fail_fast
priority: 5
labels: {team: web}
concurrency: {key: deploy-prod, limit: 1}
default_retry: {max_attempts: 3, initial_backoff: 1s, max_backoff: 1m, multiplier: 2.0, jitter: 0.2, retry_on: [exit_code, timeout, infrastructure], retry_exit_codes: [1], max_infra_retries: 3}
tasks:
  - name: build
    depends_on: []
    shell: {command: [sh, -c, "make"]}
    env: {A: b, PORT: 8080}
    labels: {}
    requirements: {capabilities: [shell], labels: {os: linux}}
    priority: 0
    timeout: 10m
    retry: {max_attempts: 2, retry_on: [exit_code]}
    concurrency: {key: x, limit: 1}
    breakers: ["registry:ghcr.io"]
    outputs: [{name: version, path: out/version.txt}, {name: sha, last_stdout_line: true}, {name: bin, container_path: /out/bin}]
  - name: test
    depends_on: [build]
    container:
      image: "golang:1.23"
      workdir: /src
      registry_auth: ghcr.io
      steps: [{name: test, args: [go, test, ./...]}]
      secrets: [{env: TOKEN, source: gh-token}]
      caches: [{volume: gomod, path: /go/pkg/mod, sharing: shared}]
      directories: [{host_path: ., path: /src, exclude: [target]}]
    timeout: 90000
  - name: call
    depends_on: [build]
    dagger_call: {module: ./ci, function: build, args: [--src, .]}
    timeout: 1h30m
  - name: done
    depends_on: [test, call]
    noop: {}
"#;

#[test]
fn the_full_example_reads_into_the_protocol() {
    let spec = parse_workflow(FULL, "wf.yaml").unwrap();
    assert_eq!(spec.name, "build-and-test");
    assert_eq!(spec.failure_policy(), proto::FailurePolicy::FailFast);
    assert_eq!(spec.priority, 5);
    assert_eq!(spec.labels["team"], "web");
    let c = spec.concurrency.as_ref().unwrap();
    assert_eq!((c.key.as_str(), c.limit), ("deploy-prod", 1));
    let r = spec.default_retry.as_ref().unwrap();
    assert_eq!(r.max_attempts, 3);
    assert_eq!(r.initial_backoff_ms, 1000);
    assert_eq!(r.max_backoff_ms, 60_000);
    assert_eq!(r.multiplier, 2.0);
    assert_eq!(r.jitter, 0.2);
    assert_eq!(r.retry_on.len(), 3);
    assert_eq!(r.retry_exit_codes, vec![1]);
    assert_eq!(r.max_infra_retries, Some(3));
    assert_eq!(spec.tasks.len(), 4);

    let build = spec.tasks[0].spec.as_ref().unwrap();
    assert!(matches!(&build.kind, Some(Kind::Shell(s)) if s.command == ["sh", "-c", "make"]));
    assert_eq!(build.env["PORT"], "8080");
    assert_eq!(build.timeout_ms, 600_000);
    assert_eq!(build.requirements.as_ref().unwrap().labels["os"], "linux");
    assert_eq!(build.breakers, vec!["registry:ghcr.io"]);
    assert_eq!(build.outputs.len(), 3);
    assert_eq!(
        build.outputs[0].source,
        Some(Source::Path("out/version.txt".into()))
    );
    assert_eq!(build.outputs[1].source, Some(Source::LastStdoutLine(true)));
    assert_eq!(
        build.outputs[2].source,
        Some(Source::ContainerPath("/out/bin".into()))
    );

    let test = spec.tasks[1].spec.as_ref().unwrap();
    assert_eq!(spec.tasks[1].depends_on, vec!["build"]);
    assert_eq!(test.timeout_ms, 90_000);
    let Some(Kind::Container(ct)) = &test.kind else {
        panic!("container expected");
    };
    assert_eq!(ct.image, "golang:1.23");
    assert_eq!(ct.steps[0].args, ["go", "test", "./..."]);
    assert_eq!(ct.caches[0].sharing(), proto::CacheSharing::Shared);
    assert_eq!(ct.directories[0].exclude, vec!["target"]);
    assert_eq!(ct.secrets[0].source, "gh-token");

    let call = spec.tasks[2].spec.as_ref().unwrap();
    assert_eq!(call.timeout_ms, 5_400_000);
    assert!(matches!(&call.kind, Some(Kind::DaggerCall(d)) if d.function == "build"));
    assert!(matches!(
        spec.tasks[3].spec.as_ref().unwrap().kind,
        Some(Kind::Noop(_))
    ));
}

#[test]
fn yaml_output_reads_back_to_the_same_spec() {
    let spec = parse_workflow(FULL, "wf.yaml").unwrap();
    let yaml = to_yaml(&spec);
    let again = parse_workflow(&yaml, "out.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(spec, again, "{yaml}");
    assert!(yaml.contains("timeout: 10m"), "{yaml}");
    assert!(
        yaml.contains("timeout: 1h30m") || yaml.contains("timeout: 90m"),
        "{yaml}"
    );
    assert!(yaml.contains("noop: {}"), "{yaml}");
}

#[test]
fn json_is_read_too() {
    let spec = parse_workflow(
        r#"{"name": "j", "tasks": [{"name": "a", "noop": {}}, {"name": "b", "depends_on": ["a"], "shell": {"command": ["true"]}, "timeout": 250}]}"#,
        "wf.json",
    )
    .unwrap();
    assert_eq!(spec.tasks.len(), 2);
    assert_eq!(spec.tasks[1].spec.as_ref().unwrap().timeout_ms, 250);
}

fn error_of(yaml: &str) -> String {
    parse_workflow(yaml, "bad.yaml").unwrap_err()
}

#[test]
fn each_bad_field_names_its_path() {
    let cases = [
        (
            "tasks: [{name: a, noop: {}}, {name: b, noop: {}}, {name: c, noop: {}, retry: {multiplier: fast}}]",
            "tasks[2].retry.multiplier",
        ),
        (
            "tasks: [{name: a, noop: {}, retry: {multiplier: 0.5}}]",
            "tasks[0].retry.multiplier",
        ),
        (
            "tasks: [{name: a, noop: {}, retry: {jitter: 1.5}}]",
            "tasks[0].retry.jitter",
        ),
        (
            "tasks: [{name: a, noop: {}, timeout: 10 minutes}]",
            "tasks[0].timeout",
        ),
        (
            "tasks: [{name: a, noop: {}, priority: high}]",
            "tasks[0].priority",
        ),
        (
            "tasks: [{name: a, noop: {}, retry: {retry_on: [sometimes]}}]",
            "tasks[0].retry.retry_on[0]",
        ),
        ("failure_policy: maybe\ntasks: []", "failure_policy"),
        (
            "tasks: [{name: a, container: {image: x, steps: [], caches: [{volume: v, path: /c, sharing: wide}]}}]",
            "tasks[0].container.caches[0].sharing",
        ),
        (
            "tasks: [{name: a, noop: {}, outputs: [{name: o}]}]",
            "tasks[0].outputs[0]",
        ),
        (
            "tasks: [{name: a, noop: {}, outputs: [{name: o, path: x, last_stdout_line: true}]}]",
            "tasks[0].outputs[0]",
        ),
        (
            "tasks: [{name: a, noop: {}, concurrency: {key: k, limit: -1}}]",
            "tasks[0].concurrency.limit",
        ),
        (
            "default_retry: {initial_backoff: 5 s}\ntasks: []",
            "default_retry.initial_backoff",
        ),
        ("tasks: [{noop: {}}]", "tasks[0]"),
    ];
    for (yaml, path) in cases {
        let e = error_of(yaml);
        assert!(e.starts_with("bad.yaml: "), "{e}");
        assert!(e.contains(&format!("{path}:")), "{yaml}\n→ {e}");
    }
}

#[test]
fn syntax_and_type_errors_name_the_line() {
    let e = error_of("name: x\ntasks:\n  - name: a\n    noop: {}\n    timeout: soon\n");
    assert!(e.contains("tasks[0].timeout"), "{e}");
    assert!(e.contains("line 5"), "{e}");
    let e = error_of("name: x\ntasks: [\n");
    assert!(e.starts_with("bad.yaml: "), "{e}");
    assert!(e.contains("line"), "{e}");
}

#[test]
fn unknown_keys_are_refused() {
    for (yaml, key) in [
        ("nmae: x\ntasks: []", "nmae"),
        ("tasks: [{name: a, noop: {}, retries: 3}]", "retries"),
        (
            "tasks: [{name: a, container: {image: x, steps: [{args: [a], nmae: s}]}}]",
            "nmae",
        ),
        ("tasks: [{name: a, noop: {extra: 1}}]", "extra"),
        ("default_retry: {attempts: 2}\ntasks: []", "attempts"),
    ] {
        let e = error_of(yaml);
        assert!(
            e.contains(&format!("unknown field `{key}`")),
            "{yaml}\n→ {e}"
        );
    }
}

#[test]
fn a_task_with_two_kinds_or_none_is_refused() {
    let e = error_of("tasks: [{name: a, shell: {command: [x]}, container: {image: i, steps: []}}]");
    assert!(e.contains("tasks[0]: "), "{e}");
    assert!(e.contains("shell and container"), "{e}");
    let e = error_of("tasks: [{name: a, env: {A: b}}]");
    assert!(
        e.contains("exactly one of shell, container, dagger_call or noop"),
        "{e}"
    );
    // A bare `noop:` still counts as the noop kind.
    let spec = parse_workflow("tasks: [{name: a, noop: }]", "x").unwrap();
    assert!(matches!(
        spec.tasks[0].spec.as_ref().unwrap().kind,
        Some(Kind::Noop(_))
    ));
}

#[test]
fn numbers_and_durations_may_be_given_as_text() {
    let spec = parse_workflow(
        r#"
priority: "7"
concurrency: {key: k, limit: "4"}
tasks:
  - name: a
    noop: {}
    timeout: "30000"
    retry: {max_attempts: "3", multiplier: "1.5", retry_exit_codes: ["2"]}
    outputs: [{name: o, last_stdout_line: "true"}]
"#,
        "x",
    )
    .unwrap();
    assert_eq!(spec.priority, 7);
    assert_eq!(spec.concurrency.unwrap().limit, 4);
    let t = spec.tasks[0].spec.as_ref().unwrap();
    assert_eq!(t.timeout_ms, 30_000);
    let r = t.retry.as_ref().unwrap();
    assert_eq!((r.max_attempts, r.multiplier), (3, 1.5));
    assert_eq!(r.retry_exit_codes, vec![2]);
}

#[test]
fn values_read_with_field_paths() {
    let v: Value =
        serde_yaml_ng::from_str("tasks: [{name: a, noop: {}}, {name: b, noop: {}, timeout: x}]")
            .unwrap();
    let e = workflow_from_value(v).unwrap_err();
    assert_eq!(e.path, "tasks[1].timeout");
    let v: Value = serde_yaml_ng::from_str("tasks: [{name: a, noop: {}, bogus: 1}]").unwrap();
    let e = workflow_from_value(v).unwrap_err();
    assert!(e.to_string().contains("tasks[0]"), "{e}");
    assert!(e.message.contains("bogus"), "{e}");
}

#[test]
fn durations_parse_and_format() {
    for (s, ms) in [
        ("250ms", 250),
        ("30s", 30_000),
        ("5m", 300_000),
        ("2h", 7_200_000),
        ("1d", 86_400_000),
        ("1h30m", 5_400_000),
        ("1500", 1500),
    ] {
        assert_eq!(parse_duration_ms(s), Ok(ms), "{s}");
        assert_eq!(parse_duration_ms(&format_duration_ms(ms)), Ok(ms));
    }
    for bad in ["", "x", "5x", "m5", "1.5s", "-1s"] {
        assert!(parse_duration_ms(bad).is_err(), "{bad}");
    }
    assert_eq!(format_duration_ms(90_000), "90s");
    assert_eq!(format_duration_ms(1_001), "1001ms");
}
