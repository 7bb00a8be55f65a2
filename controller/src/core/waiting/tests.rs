//! Tests of placement explanations: requirements, tallies, wording.
use super::*;
use crate::core::AgentEntry;
use crate::core::placement::AgentIndex;
use crate::core::scheduler::{Warm, fits};
use scabbard_common::proto::{Agent, StoredAgent};
use scabbard_common::proto::{
    ContainerStep, ContainerTask, Requirements, ShellTask, task_spec::Kind,
};

fn cand<'a>(
    project: &'a str,
    caps: &'a [String],
    labels: &'a HashMap<String, String>,
    warm: &'a Warm,
) -> Candidate<'a> {
    Candidate {
        id: "a",
        project,
        capabilities: caps,
        labels,
        slots: 1,
        running: 0,
        warm,
    }
}

/// `first_miss` says None exactly when `fits` says yes, and names the first miss.
#[test]
fn first_miss_agrees_with_fits() {
    let warm = Warm::default();
    let shell = |labels: &[(&str, &str)], caps: &[&str]| TaskSpec {
        kind: Some(Kind::Shell(ShellTask {
            command: vec!["true".into()],
        })),
        requirements: Some(Requirements {
            capabilities: caps.iter().map(|s| s.to_string()).collect(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }),
        ..Default::default()
    };
    let container = TaskSpec {
        kind: Some(Kind::Container(ContainerTask {
            image: "alpine".into(),
            steps: vec![ContainerStep::default()],
            ..Default::default()
        })),
        ..Default::default()
    };
    let shell_caps = vec!["shell".to_string(), "noop".to_string()];
    let dagger_caps = vec!["dagger".to_string()];
    let linux: HashMap<String, String> = [("os".into(), "linux".into())].into();
    let none = HashMap::new();
    let specs = [
        shell(&[("os", "windows")], &[]),
        shell(&[("os", "linux")], &[]),
        shell(&[], &["gpu"]),
        container.clone(),
    ];
    for spec in &specs {
        for caps in [&shell_caps, &dagger_caps] {
            for labels in [&linux, &none] {
                for project in ["", "p", "q"] {
                    let a = cand(project, caps, labels, &warm);
                    assert_eq!(
                        first_miss(spec, "p", &a).is_none(),
                        fits(spec, "p", &a),
                        "{spec:?} on {caps:?} {labels:?} {project}"
                    );
                }
            }
        }
    }
    let a = cand("", &shell_caps, &linux, &warm);
    assert_eq!(
        first_miss(&specs[0], "p", &a),
        Some((PlacementReason::MissingLabel, "label os=windows".into()))
    );
    assert_eq!(
        first_miss(&container, "p", &a),
        Some((PlacementReason::NoEngine, "capability dagger".into()))
    );
    let bound = cand("q", &dagger_caps, &none, &warm);
    assert_eq!(
        first_miss(&container, "p", &bound).map(|m| m.0),
        Some(PlacementReason::OtherProject)
    );
}

fn agent(caps: &[&str], labels: &[(&str, &str)], slots: u32, running: usize) -> AgentEntry {
    let (tx, _rx, _) = crate::core::agent_tx::AgentTx::channel(1);
    AgentEntry {
        stored: StoredAgent {
            agent: Some(Agent {
                capabilities: caps.iter().map(|s| s.to_string()).collect(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                slots,
                ..Default::default()
            }),
            ..Default::default()
        },
        conn: Some(crate::core::Conn {
            session: 1,
            tx,
            last_seen: Default::default(),
        }),
        running: (0..running).map(|i| format!("t{i}")).collect(),
        disconnected_at: None,
        lost: false,
        last_seen_ms: 0,
        warm: Default::default(),
    }
}

/// The index counts agents by the first requirement they miss, one look per
/// signature: 10,000 agents of three kinds cost three.
#[test]
fn the_index_tallies_agents_by_requirement() {
    let mut ix = AgentIndex::default();
    for i in 0..10_000 {
        let e = match i % 4 {
            0 => agent(&["shell"], &[("os", "linux")], 2, 0),
            1 => agent(&["shell"], &[("os", "windows")], 1, 1),
            _ => agent(&["dagger"], &[("os", "windows")], 2, 0),
        };
        ix.sync(&format!("a{i:05}"), Some(&e));
    }
    let windows = TaskSpec {
        kind: Some(Kind::Shell(ShellTask {
            command: vec!["true".into()],
        })),
        requirements: Some(Requirements {
            labels: [("os".to_string(), "windows".to_string())].into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut looks = 0;
    let t = ix.tally(
        |a| {
            looks += 1;
            first_miss(&windows, "p", a)
        },
        |_| true,
    );
    assert_eq!(looks, 3);
    assert_eq!(t.considered, 10_000);
    // Windows shell agents fit, and every one of them is busy.
    assert_eq!((t.eligible, t.free, t.usable), (2_500, 0, false));
    let mut missed: Vec<(String, usize)> = t.missed.into_iter().map(|((_, r), n)| (r, n)).collect();
    missed.sort();
    assert_eq!(
        missed,
        [
            ("capability shell".to_string(), 5_000),
            ("label os=windows".to_string(), 2_500)
        ]
    );
}

#[test]
fn filters_read_as_nomad_does() {
    let f = PlacementFilter {
        requirement: "label os=windows".into(),
        agents: 3,
    };
    assert_eq!(phrase(&f), "3 missing label os=windows");
    let f = PlacementFilter {
        requirement: "bound to another project".into(),
        agents: 1,
    };
    assert_eq!(phrase(&f), "1 bound to another project");
}
