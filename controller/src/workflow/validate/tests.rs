use super::*;
use proptest::prelude::*;
use scabbard_common::proto::{ShellTask, TaskSpec, WorkflowTask, task_spec::Kind};

fn node(name: &str, deps: &[&str], cmd: &str) -> WorkflowTask {
    WorkflowTask {
        name: name.into(),
        depends_on: deps.iter().map(|s| s.to_string()).collect(),
        spec: Some(TaskSpec {
            kind: Some(Kind::Shell(ShellTask {
                command: vec!["sh".into(), "-c".into(), cmd.into()],
            })),
            ..Default::default()
        }),
        when: String::new(),
    }
}

fn wf(tasks: Vec<WorkflowTask>) -> WorkflowSpec {
    WorkflowSpec {
        tasks,
        ..Default::default()
    }
}

fn err(spec: WorkflowSpec) -> String {
    let mut spec = spec;
    workflow_spec(&mut spec, &ControllerConfig::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn a_diamond_is_accepted_and_gets_default_timeouts() {
    let mut spec = wf(vec![
        node("a", &[], "true"),
        node("b", &["a"], "echo ${{ tasks.a.outputs.v }}"),
        node("c", &["a"], "true"),
        node("d", &["b", "c"], "echo ${{ tasks.a.outputs.v }}"),
    ]);
    workflow_spec(&mut spec, &ControllerConfig::default()).unwrap();
    assert!(
        spec.tasks
            .iter()
            .all(|t| t.spec.as_ref().unwrap().timeout_ms > 0)
    );
}

#[test]
fn empty_duplicate_unknown_and_cyclic_workflows_name_the_tasks() {
    assert!(err(wf(vec![])).contains("no tasks"));
    let e = err(wf(vec![node("a", &[], "x"), node("a", &[], "y")]));
    assert!(e.contains("duplicate task names: a"), "{e}");
    let e = err(wf(vec![node("a", &["ghost"], "x")]));
    assert!(
        e.contains("task a depends on unknown task(s): ghost"),
        "{e}"
    );
    let e = err(wf(vec![
        node("a", &["c"], "x"),
        node("b", &["a"], "x"),
        node("c", &["b"], "x"),
        node("d", &[], "x"),
    ]));
    assert!(
        e.contains("cycle") && e.contains('a') && e.contains('b') && e.contains('c'),
        "{e}"
    );
    assert!(!e.contains("-> d") && !e.contains("d ->"), "{e}");
    let e = err(wf(vec![node("self", &["self"], "x")]));
    assert!(e.contains("cycle: self -> self"), "{e}");
    let e = err(wf(vec![node("bad name", &[], "x")]));
    assert!(e.contains("\"bad name\""), "{e}");
}

#[test]
fn references_must_point_at_ancestors_and_be_well_formed() {
    let e = err(wf(vec![
        node("a", &[], "true"),
        node("b", &[], "echo ${{ tasks.a.outputs.v }}"),
    ]));
    assert!(
        e.contains("tasks[1] (b)") && e.contains("tasks.a.outputs.v"),
        "{e}"
    );
    let e = err(wf(vec![node("a", &[], "echo ${{ params.x }}")]));
    assert!(e.contains("params.x"), "{e}");
}

#[test]
fn node_specs_are_checked_like_tasks() {
    let mut bad = node("a", &[], "x");
    bad.spec.as_mut().unwrap().kind = Some(Kind::Shell(ShellTask { command: vec![] }));
    let e = err(wf(vec![bad]));
    assert!(
        e.contains("tasks[0] (a)") && e.contains("spec.shell.command"),
        "{e}"
    );
    let mut none = node("b", &[], "x");
    none.spec = None;
    assert!(err(wf(vec![none])).contains("tasks[0] (b): spec is required"));
}

proptest! {
    /// Random DAGs (edges only to earlier nodes) are accepted; adding one back edge along a
    /// path makes a cycle that is reported.
    #[test]
    fn dags_pass_and_back_edges_are_cycles(n in 2usize..30, edges in proptest::collection::vec((0usize..30, 0usize..30), 0..60)) {
        let mut tasks: Vec<WorkflowTask> = (0..n).map(|i| node(&format!("t{i}"), &[], "true")).collect();
        for (a, b) in edges {
            let (a, b) = (a % n, b % n);
            if a > b {
                let dep = format!("t{b}");
                if !tasks[a].depends_on.contains(&dep) {
                    tasks[a].depends_on.push(dep);
                }
            }
        }
        let mut spec = wf(tasks.clone());
        prop_assert!(workflow_spec(&mut spec, &ControllerConfig::default()).is_ok());
        // t0 depends on the last node, which (through a chain we add) depends on t0.
        let last = n - 1;
        tasks[last].depends_on.retain(|d| d != "t0");
        tasks[last].depends_on.push("t0".into());
        tasks[0].depends_on.push(format!("t{last}"));
        let e = err(wf(tasks));
        prop_assert!(e.contains("cycle"), "{}", e);
    }
}

fn producing(name: &str, deps: &[&str], artifacts: &[&str]) -> WorkflowTask {
    let mut n = node(name, deps, "true");
    let spec = n.spec.as_mut().unwrap();
    for a in artifacts {
        spec.artifacts.push(scabbard_common::proto::ArtifactSpec {
            name: a.to_string(),
            path: format!("out/{a}"),
            optional: false,
        });
    }
    n
}

fn consuming(name: &str, deps: &[&str], from: &str) -> WorkflowTask {
    let mut n = node(name, deps, "true");
    n.spec
        .as_mut()
        .unwrap()
        .inputs
        .push(scabbard_common::proto::ArtifactInput {
            from: from.into(),
            path: "in".into(),
            artifact: None,
        });
    n
}

#[test]
fn artifact_inputs_name_an_ancestor_and_an_artifact_it_declares() {
    let mut ok = wf(vec![
        producing("build", &[], &["dist"]),
        producing("lint", &["build"], &[]),
        consuming("deploy", &["lint"], "${{ tasks.build.artifacts.dist }}"),
    ]);
    workflow_spec(&mut ok, &ControllerConfig::default()).unwrap();

    let e = err(wf(vec![
        producing("build", &[], &["dist"]),
        consuming("deploy", &["build"], "${{ tasks.ghost.artifacts.dist }}"),
    ]));
    assert!(
        e.contains("inputs[0].from") && e.contains("no task ghost"),
        "{e}"
    );
    let e = err(wf(vec![
        producing("build", &[], &["dist"]),
        consuming("deploy", &["build"], "${{ tasks.build.artifacts.docs }}"),
    ]));
    assert!(
        e.contains("build declares no artifact docs (it declares: dist)"),
        "{e}"
    );
    let e = err(wf(vec![
        producing("build", &[], &["dist"]),
        consuming("deploy", &[], "${{ tasks.build.artifacts.dist }}"),
    ]));
    assert!(e.contains("not among its dependencies"), "{e}");
    // The producer depends on the consumer: a cycle through the input.
    let e = err(wf(vec![
        consuming("a", &[], "${{ tasks.b.artifacts.x }}"),
        producing("b", &["a"], &["x"]),
    ]));
    assert!(e.contains("cycle: a -> b -> a"), "{e}");
    let e = err(wf(vec![consuming("a", &[], "${{ tasks.a.outputs.x }}")]));
    assert!(e.contains("not an artifact reference"), "{e}");
}

#[test]
fn conditions_are_booleans_or_references_to_ancestors() {
    let mut a = node("a", &[], "true");
    a.when = "false".into();
    let mut b = node("b", &["a"], "true");
    b.when = "${{ tasks.a.outputs.go }}".into();
    workflow_spec(&mut wf(vec![a.clone(), b]), &ControllerConfig::default()).unwrap();
    let mut bad = node("c", &[], "true");
    bad.when = "yes".into();
    let e = err(wf(vec![bad]));
    assert!(e.contains("when") && e.contains("true or false"), "{e}");
    let mut stray = node("d", &[], "true");
    stray.when = "${{ tasks.a.outputs.go }}".into();
    let e = err(wf(vec![a, stray]));
    assert!(
        e.contains("(d) when") && e.contains("not among its dependencies"),
        "{e}"
    );
}

/// A 1,000-node DAG, each node depending on up to 20 earlier ones and referencing the
/// outputs of its furthest ancestor.
fn big_dag() -> WorkflowSpec {
    wf((0..MAX_NODES)
        .map(|i| {
            let deps: Vec<String> = (i.saturating_sub(20)..i).map(|d| format!("n{d}")).collect();
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            let cmd = if i > 0 {
                "echo ${{ tasks.n0.outputs.v }}".to_string()
            } else {
                "true".to_string()
            };
            node(&format!("n{i}"), &deps, &cmd)
        })
        .collect())
}

#[test]
fn a_thousand_node_dag_validates_without_quadratic_ancestry() {
    let mut spec = big_dag();
    let started = std::time::Instant::now();
    workflow_spec(&mut spec, &ControllerConfig::default()).unwrap();
    // Generous: it takes milliseconds; the quadratic version took seconds.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let anc = Ancestry::of(&spec);
    assert!(anc.is_ancestor(999, "n0"));
    assert!(anc.is_ancestor(21, "n0"));
    assert!(!anc.is_ancestor(0, "n1"));
    assert!(!anc.is_ancestor(5, "n5"));
}

#[test]
fn too_many_dependency_edges_are_refused() {
    let tasks = (0..300)
        .map(|i| {
            let deps: Vec<String> = (0..i).map(|d| format!("n{d}")).collect();
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            node(&format!("n{i}"), &deps, "true")
        })
        .collect();
    let e = err(wf(tasks));
    assert!(e.contains("44850 dependencies"), "{e}");
}

#[test]
fn a_cycle_bad_expressions_and_bad_specs_are_reported_in_one_answer() {
    let mut bad_spec = node("c", &[], "true");
    bad_spec.spec.as_mut().unwrap().priority = 5000;
    let e = err(wf(vec![
        node("a", &["b"], "echo ${{ tasks.b.outputs.v"),
        node("b", &["a"], "true"),
        bad_spec,
        node("d", &["ghost"], "true"),
    ]));
    assert!(e.contains("cycle: "), "{e}");
    assert!(e.contains("unknown task(s): ghost"), "{e}");
    assert!(e.contains("tasks[0] (a)"), "the bad expression too: {e}");
    assert!(e.contains("tasks[2] (c)") && e.contains("priority"), "{e}");
}
