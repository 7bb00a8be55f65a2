//! Tests of the dagger executor without an engine: a recording mock of the SDK's GraphQL
//! client ([`mock`]), a fake engine speaking Dagger's HTTP protocol with a fake `dagger`
//! CLI ([`fake_engine`]), and a test against a real engine when `DAGGER_LIVE=1`
//! ([`live`]).

mod fake_engine;
mod fake_session;
mod live;
mod mock;
mod mock_results;
mod mock_secrets;
mod support;

use std::path::Path;
use std::time::Duration;

use scabbard_common::proto;

use crate::executor::{ExecContext, OutStream, OutputChunk};

pub(super) fn ctx(work_root: &Path) -> ExecContext {
    ExecContext {
        task_id: "task-1".into(),
        fencing_token: 7,
        attempt: 1,
        agent_id: "agent-1".into(),
        agent_name: "host-1".into(),
        work_root: work_root.to_path_buf(),
        default_timeout: Duration::from_secs(30),
        project: "default".into(),
        inputs: Vec::new(),
        artifact_dir: work_root.join("artifacts"),
        trace: None,
    }
}

/// A container task running `steps` on `image`.
pub(super) fn container_spec(image: &str, steps: &[&[&str]]) -> proto::TaskSpec {
    proto::TaskSpec {
        kind: Some(proto::task_spec::Kind::Container(proto::ContainerTask {
            image: image.into(),
            steps: steps
                .iter()
                .map(|args| proto::ContainerStep {
                    cache: false,
                    args: args.iter().map(|s| s.to_string()).collect(),
                    name: String::new(),
                })
                .collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

pub(super) fn container_mut(spec: &mut proto::TaskSpec) -> &mut proto::ContainerTask {
    match spec.kind.as_mut() {
        Some(proto::task_spec::Kind::Container(c)) => c,
        _ => panic!("not a container spec"),
    }
}

pub(super) fn text(chunks: &[OutputChunk], stream: OutStream) -> String {
    let bytes: Vec<u8> = chunks
        .iter()
        .filter(|c| c.stream == stream)
        .flat_map(|c| c.data.iter().copied())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
