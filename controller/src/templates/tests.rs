use std::collections::HashMap;

use proptest::prelude::*;
use scabbard_common::proto::{self, task_spec::Kind};

use super::*;

mod builtins;

fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn node<'a>(spec: &'a proto::WorkflowSpec, name: &str) -> &'a proto::WorkflowTask {
    spec.tasks
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn container(t: &proto::WorkflowTask) -> &proto::ContainerTask {
    match &t.spec.as_ref().unwrap().kind {
        Some(Kind::Container(c)) => c,
        other => panic!("{} is not a container task: {other:?}", t.name),
    }
}

fn shape(spec: &proto::WorkflowSpec) -> Vec<(String, Vec<String>)> {
    spec.tasks
        .iter()
        .map(|t| (t.name.clone(), t.depends_on.clone()))
        .collect()
}

fn edges(list: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    list.iter()
        .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
        .collect()
}

/// A registry of the built-ins plus the given files, or the load error's message.
fn load(files: &[(&str, &str)]) -> std::result::Result<Registry, String> {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    Registry::load(Some(dir.path())).map_err(|e| {
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        e.to_string()
    })
}

#[test]
fn every_builtin_loads() {
    for (file_name, text) in BUILTINS {
        if let Err(es) = file::parse(text, BUILTIN_SOURCE) {
            panic!("{file_name}: {}", es.join("\n"));
        }
    }
    let list = Registry::builtin().list();
    let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ci-pipeline",
            "data-processing",
            "ml-training",
            "scheduled-maintenance"
        ]
    );
    for t in &list {
        assert_eq!(t.source, "builtin");
        assert_eq!(t.versions, vec![1]);
        assert!(!t.description.is_empty(), "{}", t.name);
        assert!(t.body.contains("workflow:"), "{}", t.name);
    }
    assert!(Registry::load(None).unwrap().get("ci-pipeline", 0).is_ok());
}

#[test]
fn bad_parameters_are_all_reported_at_once() {
    let reg = Registry::builtin();
    let e = reg
        .render(
            "ci-pipeline",
            0,
            &params(&[
                ("go_version", "1.9"),
                ("parallelism", "x"),
                ("publish", "maybe"),
                ("packages", "./ok,bad pkg"),
                ("nope", "1"),
            ]),
        )
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let msg = e.to_string();
    for part in [
        "6 parameter errors in template ci-pipeline v1",
        "param repository: required, no default",
        r#"param go_version: "1.9" is not one of 1.22, 1.23"#,
        r#"param parallelism: "x" is not an integer"#,
        r#"param publish: "maybe" is not a boolean"#,
        r#"param packages: item "bad pkg" does not match the pattern"#,
        "param nope: no such parameter",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
    let e = reg
        .render(
            "ci-pipeline",
            0,
            &params(&[("repository", "ftp://x"), ("parallelism", "65")]),
        )
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("2 parameter errors"), "{e}");
    assert!(
        e.contains("param parallelism: 65 is above the maximum 64"),
        "{e}"
    );
    assert!(
        e.contains(r#"param repository: "ftp://x" does not match"#),
        "{e}"
    );
}

const LISTS: &str = r#"
name: lists
parameters:
  - {name: items, type: list, default: [a, b]}
  - {name: word, type: string, default: w}
workflow:
  tasks:
    - name: t
      shell: {command: [echo, "${{ params.items }}", "x=${{ params.items }}", "${{ params.word }}", "${{params.items}}"]}
      env: {ITEMS: "${{ params.items }}", "K_${{ params.word }}": v}
      labels: {next: "${{ tasks.t.outputs.v }}"}
"#;

fn command(spec: &proto::WorkflowSpec, i: usize) -> Vec<String> {
    match &spec.tasks[i].spec.as_ref().unwrap().kind {
        Some(Kind::Shell(s)) => s.command.clone(),
        other => panic!("not shell: {other:?}"),
    }
}

#[test]
fn lists_expand_as_elements_and_join_elsewhere() {
    let reg = load(&[("lists.yaml", LISTS)]).unwrap();
    let (spec, _) = reg.render("lists", 0, &HashMap::new()).unwrap();
    assert_eq!(
        spec.name, "lists",
        "an unnamed body takes the template's name"
    );
    assert_eq!(
        command(&spec, 0),
        ["echo", "a", "b", "x=a,b", "w", "a", "b"]
    );
    let t = spec.tasks[0].spec.as_ref().unwrap();
    assert_eq!(t.env["ITEMS"], "a,b");
    assert_eq!(t.env["K_w"], "v");
    let (spec, _) = reg
        .render(
            "lists",
            0,
            &params(&[("items", r#"["one, two", "three"]"#)]),
        )
        .unwrap();
    assert_eq!(
        command(&spec, 0),
        [
            "echo",
            "one, two",
            "three",
            "x=one, two,three",
            "w",
            "one, two",
            "three"
        ]
    );
    let (spec, _) = reg.render("lists", 0, &params(&[("items", "")])).unwrap();
    assert_eq!(command(&spec, 0), ["echo", "x=", "w"]);
    let e = reg
        .render("lists", 0, &params(&[("items", "[1, 2]")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("param items: ") && e.contains("JSON array of strings"),
        "{e}"
    );
}

#[test]
fn task_output_references_survive_rendering() {
    let reg = load(&[("lists.yaml", LISTS)]).unwrap();
    let (spec, _) = reg.render("lists", 0, &HashMap::new()).unwrap();
    assert_eq!(
        spec.tasks[0].spec.as_ref().unwrap().labels["next"],
        "${{ tasks.t.outputs.v }}"
    );
}

#[test]
fn the_default_of_a_list_is_shown_as_it_would_be_given() {
    let reg = load(&[("lists.yaml", LISTS)]).unwrap();
    let t = reg.get("lists", 0).unwrap();
    let items = &t.params[0];
    assert_eq!(items.r#type(), proto::ParamType::List);
    assert_eq!((items.default.as_str(), items.has_default), ("a,b", true));
    let ci = reg.get("ci-pipeline", 0).unwrap();
    let repo = ci.params.iter().find(|p| p.name == "repository").unwrap();
    assert!(repo.required && !repo.has_default);
    assert_eq!(repo.pattern, "^(https?|git|ssh)://.+");
    let go = ci.params.iter().find(|p| p.name == "go_version").unwrap();
    assert_eq!(go.values, ["1.22", "1.23"]);
}

#[test]
fn broken_files_are_all_reported_with_file_and_field() {
    let bad_field = "name: bad-field\nworkflow:\n  tasks:\n    - name: a\n      noop: {}\n      timeout: soon\n";
    let unknown_param = "name: unknown-param\nparameters: [{name: a, default: x}]\nworkflow:\n  tasks:\n    - name: a\n      shell: {command: [echo, \"${{ params.nope }}\"]}\n";
    let syntax = "name: syntax\nworkflow: [\n";
    let dup_a = "name: dup\nversion: 3\nworkflow: {tasks: [{name: a, noop: {}}]}\n";
    let dup_b = "name: dup\nversion: 3\nworkflow: {tasks: [{name: b, noop: {}}]}\n";
    let shadow = "name: ci-pipeline\nversion: 1\nworkflow: {tasks: [{name: a, noop: {}}]}\n";
    let unknown_key = "name: unknown-key\nparameters: [{name: a, default: x, kind: string}]\nworkflow: {tasks: []}\n";
    let e = load(&[
        ("bad-field.yaml", bad_field),
        ("unknown-param.yml", unknown_param),
        ("syntax.yaml", syntax),
        ("dup-a.yaml", dup_a),
        ("dup-b.yaml", dup_b),
        ("shadow.yaml", shadow),
        ("unknown-key.yaml", unknown_key),
        ("ignored.txt", "not a template"),
    ])
    .unwrap_err();
    assert!(e.starts_with("6 template errors: "), "{e}");
    for part in [
        "bad-field.yaml: workflow.tasks[0].timeout: \"soon\" is not a duration",
        "unknown-param.yml: workflow.tasks[0].shell.command[1]: unknown parameter \"nope\"",
        "syntax.yaml: ",
        "dup-b.yaml: template dup version 3 is also defined in ",
        "shadow.yaml: template ci-pipeline version 1 is built in",
        "unknown-key.yaml: parameters[0]: unknown field `kind`",
    ] {
        assert!(e.contains(part), "{part:?} missing from: {e}");
    }
    assert!(e.contains("dup-a.yaml"), "{e}");
    assert!(!e.contains("ignored.txt"), "{e}");
}

#[test]
fn parameter_declarations_are_checked_at_load() {
    let cases = [
        (
            "[{name: a, required: true, default: x}]",
            "parameters[0].default: a: a required parameter takes no default",
        ),
        (
            "[{name: a}]",
            "parameters[0].default: a: give a default, or say required: true",
        ),
        (
            "[{name: n, type: int, default: 100, max: 10}]",
            "parameters[0].default: n: 100 is above the maximum 10",
        ),
        (
            "[{name: e, type: enum, default: x}]",
            "parameters[0].values: e: an enum needs its values",
        ),
        (
            "[{name: e, type: enum, values: [1.20], default: x}]",
            "parameters[0].values: e: 1.2 is read by YAML as a fractional number",
        ),
        (
            "[{name: n, type: int, default: 1, pattern: x}]",
            "parameters[0].pattern: n: a pattern applies to string and list parameters",
        ),
        (
            "[{name: s, default: x, min: 1}]",
            "parameters[0].min: s: min and max apply to int parameters",
        ),
        (
            "[{name: s, default: x, pattern: '('}]",
            "parameters[0].pattern: s: \"(\" is not a regular expression",
        ),
        (
            "[{name: s, default: abc, pattern: 'a'}]",
            "parameters[0].default: s: \"abc\" does not match the pattern \"a\"",
        ),
        (
            "[{name: 'bad-name', default: x}]",
            "parameters[0].name: \"bad-name\" is not a parameter name",
        ),
        (
            "[{name: a, default: x}, {name: a, default: y}]",
            "parameters[1].name: \"a\" is declared twice",
        ),
        (
            "[{name: t, type: number, default: 1}]",
            "parameters[0].type: unknown variant `number`",
        ),
    ];
    for (decl, want) in cases {
        let text = format!(
            "name: p\nparameters: {decl}\nworkflow: {{tasks: [{{name: a, noop: {{}}}}]}}\n"
        );
        let e = load(&[("p.yaml", &text)]).unwrap_err();
        assert!(
            e.contains(&format!("p.yaml: {want}")),
            "{decl}\nwant {want:?}\ngot: {e}"
        );
    }
}

#[test]
fn expressions_other_than_params_and_tasks_are_refused() {
    let text = "name: x\nworkflow:\n  tasks:\n    - name: a\n      shell: {command: [echo, \"${{ secrets.token }}\", \"${{ params.a\"]}\n";
    let e = load(&[("x.yaml", text)]).unwrap_err();
    assert!(
        e.contains("workflow.tasks[0].shell.command[1]: unknown expression"),
        "{e}"
    );
    assert!(
        e.contains("workflow.tasks[0].shell.command[2]: \"${{\" at byte 0 is not closed"),
        "{e}"
    );
}

#[test]
fn versions_resolve_and_unknown_ones_are_not_found() {
    let v1 = "name: rel\nversion: 1\nparameters: [{name: who, default: one}]\nworkflow: {tasks: [{name: a, shell: {command: [echo, \"${{ params.who }}\"]}}]}\n";
    let v2 = "name: rel\nversion: 2\nworkflow: {name: rel-two, tasks: [{name: a, noop: {}}, {name: b, depends_on: [a], noop: {}}]}\n";
    let reg = load(&[("rel-v2.yaml", v2), ("rel-v1.yaml", v1)]).unwrap();
    let latest = reg.get("rel", 0).unwrap();
    assert_eq!(latest.version, 2);
    assert_eq!(latest.versions, vec![1, 2]);
    assert!(latest.source.ends_with("rel-v2.yaml"), "{}", latest.source);
    assert_eq!(latest.body, v2);
    assert_eq!(reg.get("rel", 1).unwrap().params.len(), 1);
    let listed = reg.list();
    let rel = listed.iter().find(|t| t.name == "rel").unwrap();
    assert_eq!((rel.version, rel.versions.clone()), (2, vec![1, 2]));
    assert_eq!(listed.len(), 5);

    let (spec, v) = reg.render("rel", 0, &HashMap::new()).unwrap();
    assert_eq!((spec.name.as_str(), v, spec.tasks.len()), ("rel-two", 2, 2));
    let (spec, v) = reg.render("rel", 1, &params(&[("who", "me")])).unwrap();
    assert_eq!(v, 1);
    assert_eq!(command(&spec, 0), ["echo", "me"]);
    // v2 takes no parameters.
    let e = reg
        .render("rel", 2, &params(&[("who", "me")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("param who: no such parameter (rel takes none)"),
        "{e}"
    );

    let e = reg.get("rel", 7).unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(
        e.to_string()
            .contains("rel version 7 (loaded versions: 1, 2)"),
        "{e}"
    );
    let e = reg.render("nope", 0, &HashMap::new()).unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(
        e.to_string()
            .contains("template \"nope\" not found (available: ci-pipeline, data-processing"),
        "{e}"
    );
}

#[test]
fn values_that_break_the_workflow_are_reported_with_the_field() {
    let text = "name: t\nparameters: [{name: limit, default: '1h'}]\nworkflow: {tasks: [{name: a, noop: {}, timeout: \"${{ params.limit }}\"}]}\n";
    let reg = load(&[("t.yaml", text)]).unwrap();
    let (spec, _) = reg.render("t", 0, &HashMap::new()).unwrap();
    assert_eq!(spec.tasks[0].spec.as_ref().unwrap().timeout_ms, 3_600_000);
    let e = reg
        .render("t", 0, &params(&[("limit", "soon")]))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = e.to_string();
    assert!(e.starts_with("template t v1: "), "{e}");
    assert!(
        e.contains("workflow.tasks[0].timeout: \"soon\" is not a duration"),
        "{e}"
    );
}

#[test]
fn a_missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = Registry::load(Some(&dir.path().join("absent"))).unwrap_err();
    assert!(e.to_string().contains("template directory"), "{e}");
}

const TYPED: &str = r#"
name: typed
parameters:
  - {name: n, type: int, default: 0, min: -50, max: 50}
  - {name: flag, type: bool, default: false}
  - {name: mode, type: enum, values: [fast, safe, "1.5"], default: safe}
  - {name: slug, type: string, default: abc, pattern: '[a-z]+(-[a-z]+)*'}
workflow:
  tasks:
    - name: t
      shell: {command: [run, "${{ params.n }}", "${{ params.flag }}", "${{ params.mode }}", "${{ params.slug }}"]}
      priority: "${{ params.n }}"
"#;

fn typed() -> Registry {
    load(&[("typed.yaml", TYPED)]).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_valid_value_renders(
        n in -50i64..=50,
        flag in prop::sample::select(vec!["true", "false", "yes", "no", "1", "0", "TRUE", "No"]),
        mode in prop::sample::select(vec!["fast", "safe", "1.5"]),
        slug in "[a-z]{1,8}(-[a-z]{1,8}){0,3}",
    ) {
        let reg = typed();
        let given = params(&[
            ("n", &n.to_string()),
            ("flag", flag),
            ("mode", mode),
            ("slug", &slug),
        ]);
        let (spec, _) = reg.render("typed", 0, &given).unwrap();
        let truth = matches!(flag.to_ascii_lowercase().as_str(), "true" | "yes" | "1");
        prop_assert_eq!(
            command(&spec, 0),
            vec!["run".to_string(), n.to_string(), truth.to_string(), mode.to_string(), slug.clone()]
        );
        prop_assert_eq!(i64::from(spec.tasks[0].spec.as_ref().unwrap().priority), n);
    }

    #[test]
    fn any_string_off_the_pattern_is_refused(slug in any::<String>()) {
        let pattern = regex::Regex::new("^(?:[a-z]+(-[a-z]+)*)$").unwrap();
        prop_assume!(!pattern.is_match(&slug));
        let e = typed()
            .render("typed", 0, &params(&[("slug", &slug)]))
            .unwrap_err()
            .to_string();
        prop_assert!(e.starts_with("1 parameter error in template typed v1: param slug: "), "{}", e);
    }

    #[test]
    fn ints_out_of_range_and_unknown_enum_values_are_refused(
        n in prop_oneof![i64::MIN..-50, 51..i64::MAX],
        mode in "[a-z]{1,6}".prop_filter("not a value", |m| m != "fast" && m != "safe"),
    ) {
        let e = typed()
            .render("typed", 0, &params(&[("n", &n.to_string()), ("mode", &mode)]))
            .unwrap_err()
            .to_string();
        prop_assert!(e.starts_with("2 parameter errors"), "{}", e);
        prop_assert!(e.contains("param n: "), "{}", e);
        prop_assert!(e.contains(&format!("param mode: {mode:?} is not one of fast, safe, 1.5")), "{}", e);
    }
}

#[test]
fn rendered_builtins_write_as_yaml_and_read_back() {
    let reg = Registry::builtin();
    let required = params(&[
        ("repository", "https://github.com/acme/app.git"),
        ("source_url", "https://example.com/sales.csv"),
        ("destination", "s3://acme-data/sales"),
        ("code_repository", "https://github.com/acme/model.git"),
        ("dataset_url", "s3://acme/datasets/churn.parquet"),
        ("model_name", "churn"),
        ("bucket", "acme-ops"),
    ]);
    for t in reg.list() {
        let given: HashMap<String, String> = required
            .iter()
            .filter(|(k, _)| t.params.iter().any(|p| &p.name == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let (spec, _) = reg.render(&t.name, 0, &given).unwrap();
        let yaml = wfdef::to_yaml(&spec);
        if std::env::var_os("SCABBARD_PRINT_TEMPLATES").is_some() {
            println!("---\n{yaml}");
        }
        let back = wfdef::parse_workflow(&yaml, &t.name).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(back, spec, "{}", t.name);
    }
}
