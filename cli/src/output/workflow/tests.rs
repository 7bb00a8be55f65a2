use scabbard_common::proto::{WorkflowSpec, WorkflowTask};

use super::*;

fn node(name: &str, deps: &[&str], state: NodeState, attempts: u32, exit: i32) -> WorkflowNode {
    WorkflowNode {
        name: name.into(),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        state: state as i32,
        attempts,
        exit_code: exit,
        ..WorkflowNode::default()
    }
}

/// checkout → (build, lint) → deploy.
fn diamond() -> Workflow {
    let nodes = vec![
        node("checkout", &[], NodeState::Succeeded, 1, 0),
        node("build", &["checkout"], NodeState::Running, 2, 0),
        node("lint", &["checkout"], NodeState::Failed, 1, 3),
        node("deploy", &["build", "lint"], NodeState::Waiting, 0, 0),
    ];
    Workflow {
        id: "wf1".into(),
        spec: Some(WorkflowSpec {
            name: "ship".into(),
            tasks: nodes
                .iter()
                .map(|n| WorkflowTask {
                    name: n.name.clone(),
                    spec: None,
                    depends_on: n.depends_on.clone(),
                    when: String::new(),
                })
                .collect(),
            ..WorkflowSpec::default()
        }),
        state: WorkflowState::Running as i32,
        nodes,
        done: 2,
        total: 4,
        updated_at_ms: 3_723_000, // 01:02:03
        ..Workflow::default()
    }
}

#[test]
fn diamond_renders_each_node_once_under_its_deepest_dependency() {
    let lines = tree(&diamond());
    assert_eq!(
        lines,
        vec![
            "workflow wf1 ship  RUNNING  2/4 done",
            "  checkout        SUCCEEDED  attempt 1  exit 0",
            "  ├── build       RUNNING    attempt 2",
            "  └── lint        FAILED     attempt 1  exit 3",
            "      └── deploy  WAITING    after build",
        ]
    );
}

#[test]
fn deeper_dependencies_win_and_ties_go_to_the_later_node() {
    // d needs a (depth 0) and c (depth 1): it goes under c.
    let mut w = Workflow {
        id: "wf2".into(),
        state: WorkflowState::Succeeded as i32,
        nodes: vec![
            node("a", &[], NodeState::Succeeded, 1, 0),
            node("b", &[], NodeState::Skipped, 0, 0),
            node("c", &["a"], NodeState::Succeeded, 1, 0),
            node("d", &["a", "c"], NodeState::Succeeded, 1, 0),
        ],
        done: 4,
        total: 4,
        ..Workflow::default()
    };
    w.nodes[1].message = "dependency failed".into();
    assert_eq!(
        tree(&w),
        vec![
            "workflow wf2  SUCCEEDED  4/4 done",
            "  a          SUCCEEDED  attempt 1  exit 0",
            "  └── c      SUCCEEDED  attempt 1  exit 0",
            "      └── d  SUCCEEDED  attempt 1  exit 0  after a",
            "  b          SKIPPED    — dependency failed",
        ]
    );
}

#[test]
fn cycles_and_unknown_dependencies_do_not_hang_or_vanish() {
    let w = Workflow {
        id: "wf3".into(),
        nodes: vec![
            node("x", &["y"], NodeState::Waiting, 0, 0),
            node("y", &["x"], NodeState::Waiting, 0, 0),
            node("z", &["ghost"], NodeState::Waiting, 0, 0),
        ],
        ..Workflow::default()
    };
    let lines = tree(&w);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    for n in ["x", "y", "z"] {
        assert!(
            lines.iter().any(|l| l.contains(n)),
            "{n} missing: {lines:#?}"
        );
    }
    assert!(lines[3].contains("after ghost"), "{lines:#?}");
}

#[test]
fn changes_log_one_line_per_moved_node() {
    let before = diamond();
    let first = changes(None, &before);
    assert_eq!(first[0], "01:02:03 workflow wf1 ship  RUNNING  2/4 done");
    assert_eq!(first.len(), 5);

    let mut after = before.clone();
    after.nodes[1].state = NodeState::Succeeded as i32;
    after.done = 3;
    after.updated_at_ms = 3_724_000;
    assert_eq!(
        changes(Some(&before), &after),
        vec![
            "01:02:04 workflow wf1 ship  RUNNING  3/4 done",
            "01:02:04   build  SUCCEEDED  attempt 2  exit 0",
        ]
    );
    // Nothing moved: nothing printed.
    assert!(changes(Some(&after), &after).is_empty());
}

#[test]
fn header_shows_cancel_and_message() {
    let mut w = diamond();
    w.cancel_requested = true;
    assert!(header(&w).ends_with("2/4 done  cancel requested"));
    w.state = WorkflowState::Failed as i32;
    w.message = "node lint failed".into();
    assert_eq!(
        header(&w),
        "workflow wf1 ship  FAILED  2/4 done — node lint failed"
    );
}

#[test]
fn durations_read_naturally() {
    assert_eq!(took(0, 12_000), "12s");
    assert_eq!(took(0, 65_000), "1m05s");
    assert_eq!(took(0, 7_380_000), "2h03m");
}
