//! The core's part of artifacts: who may upload what (the agent holding the attempt, a
//! declared name, within the size limits), recording an upload on its attempt durably,
//! who may download what (an agent for an input of an attempt it runs; API tokens for the
//! succeeded results of their project), and deleting the uploads of attempts whose
//! result will never refer to them. Bytes never pass through here: the artifact service
//! moves them, before and after asking.

use scabbard_common::proto::{ArtifactRef, Outcome, Task, TaskResult, TaskState};
use scabbard_common::time::now_ms;
use scabbard_common::{Error, Result};
use tokio::sync::oneshot;

use super::{Effect, State};
use crate::artifacts::fmt_bytes;

/// What the core knows of the task an upload belongs to (for the stored ref).
#[derive(Debug, Clone, Default)]
pub(crate) struct UploadGrant {
    pub(crate) project: String,
    pub(crate) workflow_id: String,
    pub(crate) workflow_node: String,
}

/// Why an upload was not recorded, and whether its object must stay (an earlier upload
/// of the same name by the same attempt is recorded under the same key).
#[derive(Debug)]
pub(crate) struct RecordRefused {
    pub(crate) error: Error,
    pub(crate) keep_object: bool,
}

/// The artifacts a task or workflow serves, and the project they belong to.
#[derive(Debug, Clone, Default)]
pub(crate) struct Served {
    pub(crate) project: String,
    /// Why nothing is served yet ("task t1 is RUNNING"), when that is the case.
    pub(crate) pending: Option<String>,
    pub(crate) artifacts: Vec<ArtifactRef>,
    /// Nodes (task id, node name) of a workflow whose tasks left the core's memory: the
    /// caller adds what their records in the store serve.
    pub(crate) evicted: Vec<(String, String)>,
}

/// What a task serves: its succeeded result's artifacts.
pub(crate) fn served_of(t: &Task) -> Served {
    let mut served = Served {
        project: t.project.clone(),
        ..Default::default()
    };
    match t.result.as_ref() {
        Some(r) if t.state() == TaskState::Succeeded => served.artifacts = r.artifacts.clone(),
        _ => {
            served.pending = Some(format!(
                "task {} is {}; artifacts are served once it succeeded",
                t.id,
                state_name(t.state())
            ))
        }
    }
    served
}

fn state_name(s: TaskState) -> &'static str {
    s.as_str_name().trim_start_matches("TASK_STATE_")
}

impl State {
    /// The task of an attempt `agent_id` must hold (current token, ASSIGNED or RUNNING).
    fn held_attempt(&self, agent_id: &str, task_id: &str, token: u64) -> Result<&Task> {
        let t = &self
            .tasks
            .get(task_id)
            .ok_or_else(|| Error::not_found("task", task_id))?
            .task;
        let live = matches!(t.state(), TaskState::Assigned | TaskState::Running);
        if t.fencing_token == token && t.agent_id == agent_id && live {
            return Ok(t);
        }
        Err(Error::PermissionDenied(format!(
            "agent {agent_id} does not run attempt {token} of task {task_id} (the task is {}, its current attempt is {}{}): only the agent running an attempt may upload its artifacts or fetch its inputs",
            state_name(t.state()),
            t.fencing_token,
            if t.agent_id.is_empty() {
                String::new()
            } else {
                format!(" on agent {}", t.agent_id)
            }
        )))
    }

    /// Checks that `name` is declared by the task and `size` fits both limits, given what
    /// the attempt already recorded (an earlier upload of the same name is replaced).
    fn check_upload(&self, t: &Task, name: &str, size: u64) -> Result<()> {
        let declared = t.spec.as_ref().map(|s| &s.artifacts[..]).unwrap_or(&[]);
        if !declared.iter().any(|a| a.name == name) {
            let names: Vec<&str> = declared.iter().map(|a| a.name.as_str()).collect();
            return Err(Error::invalid(format!(
                "name: task {} declares no artifact {name:?} ({})",
                t.id,
                if names.is_empty() {
                    "it declares none".to_string()
                } else {
                    format!("it declares {}", names.join(", "))
                }
            )));
        }
        let limits = &self.cfg.artifacts;
        if limits.max_artifact_bytes > 0 && size > limits.max_artifact_bytes {
            return Err(Error::ResourceExhausted(format!(
                "artifact {name:?} of task {} is {} ({size} bytes), over the limit of {} per artifact (artifacts.max_artifact_bytes)",
                t.id,
                fmt_bytes(size),
                fmt_bytes(limits.max_artifact_bytes)
            )));
        }
        let others: u64 = t
            .attempts
            .last()
            .map(|a| {
                a.artifacts
                    .iter()
                    .filter(|r| r.name != name)
                    .map(|r| r.size)
                    .sum()
            })
            .unwrap_or(0);
        let total = others.saturating_add(size);
        if limits.max_task_artifact_bytes > 0 && total > limits.max_task_artifact_bytes {
            return Err(Error::ResourceExhausted(format!(
                "artifact {name:?} of task {} is {} ({size} bytes): with the {} already uploaded by this attempt that is {}, over the limit of {} per task (artifacts.max_task_artifact_bytes)",
                t.id,
                fmt_bytes(size),
                fmt_bytes(others),
                fmt_bytes(total),
                fmt_bytes(limits.max_task_artifact_bytes)
            )));
        }
        Ok(())
    }

    /// May `agent_id` start uploading artifact `name` (`size` bytes) of its attempt?
    pub(super) fn artifact_upload_start(
        &self,
        agent_id: &str,
        task_id: &str,
        token: u64,
        name: &str,
        size: u64,
    ) -> Result<UploadGrant> {
        let t = self.held_attempt(agent_id, task_id, token)?;
        self.check_upload(t, name, size)?;
        Ok(UploadGrant {
            project: t.project.clone(),
            workflow_id: t.workflow_id.clone(),
            workflow_node: t.workflow_node.clone(),
        })
    }

    /// Records a completed upload on its attempt (replacing an earlier one of the same
    /// name); answers once that is durable. Checks again what the start checked: the
    /// attempt may have ended, or another upload may have used up the task's limit.
    pub(super) async fn record_artifact(
        &mut self,
        agent_id: &str,
        mut artifact: ArtifactRef,
        reply: oneshot::Sender<std::result::Result<ArtifactRef, RecordRefused>>,
    ) {
        let had_same_name = self.tasks.get(&artifact.task_id).is_some_and(|e| {
            e.task.attempts.iter().any(|a| {
                a.fencing_token == artifact.fencing_token
                    && a.artifacts.iter().any(|r| r.name == artifact.name)
            })
        });
        let refuse = |error| RecordRefused {
            error,
            keep_object: had_same_name,
        };
        let checked = self
            .held_attempt(agent_id, &artifact.task_id, artifact.fencing_token)
            .and_then(|t| self.check_upload(t, &artifact.name, artifact.size));
        if let Err(e) = checked {
            let _ = reply.send(Err(refuse(e)));
            return;
        }
        let Some(entry) = self.tasks.get_mut(&artifact.task_id) else {
            return;
        };
        let t = &mut entry.task;
        artifact.project = t.project.clone();
        artifact.workflow_id = t.workflow_id.clone();
        artifact.workflow_node = t.workflow_node.clone();
        artifact.created_at_ms = now_ms();
        let Some(attempt) = t.attempts.last_mut() else {
            let _ = reply.send(Err(refuse(Error::internal("attempt without a record"))));
            return;
        };
        attempt.artifacts.retain(|r| r.name != artifact.name);
        attempt.artifacts.push(artifact.clone());
        t.updated_at_ms = artifact.created_at_ms;
        let task = t.clone();
        let effect: Effect = Box::new(move |r| {
            let _ = reply.send(match r {
                Ok(()) => Ok(artifact),
                Err(e) => Err(RecordRefused {
                    error: Error::Unavailable(format!("could not record the upload: {e}")),
                    keep_object: had_same_name,
                }),
            });
        });
        self.persist_task(task, vec![effect]).await;
    }

    /// The ref of artifact `name` of task `task_id`, if `agent_id` runs attempt
    /// (`for_task_id`, `for_token`) and that task names it among its inputs.
    pub(super) fn artifact_for_input(
        &self,
        agent_id: &str,
        for_task_id: &str,
        for_token: u64,
        task_id: &str,
        name: &str,
    ) -> Result<ArtifactRef> {
        let consumer = self.held_attempt(agent_id, for_task_id, for_token)?;
        let inputs = consumer.spec.as_ref().map(|s| &s.inputs[..]).unwrap_or(&[]);
        let named = inputs.iter().any(|i| {
            i.artifact
                .as_ref()
                .is_some_and(|a| a.task_id == task_id && a.name == name)
        });
        if !named {
            return Err(Error::PermissionDenied(format!(
                "artifact {name:?} of task {task_id} is not an input of task {for_task_id}: an agent may only fetch the inputs of the attempts it runs"
            )));
        }
        match self.task_artifacts(task_id) {
            Ok(served) => find(&served, task_id, name),
            // The producer left memory: the consumer's spec holds the ref it was given
            // from the producer's succeeded record at submit.
            Err(Error::NotFound { .. }) => inputs
                .iter()
                .filter_map(|i| i.artifact.as_ref())
                .find(|a| a.task_id == task_id && a.name == name)
                .cloned()
                .ok_or_else(|| Error::not_found("artifact", name)),
            Err(e) => Err(e),
        }
    }

    /// What task `task_id` serves: its succeeded result's artifacts.
    pub(super) fn task_artifacts(&self, task_id: &str) -> Result<Served> {
        let t = &self
            .tasks
            .get(task_id)
            .ok_or_else(|| Error::not_found("task", task_id))?
            .task;
        Ok(served_of(t))
    }

    /// What workflow `workflow_id` serves: the artifacts of every node's succeeded task.
    pub(super) fn workflow_artifacts(&self, workflow_id: &str) -> Result<Served> {
        let w = self.get_workflow(workflow_id)?;
        let mut served = Served {
            project: w.project.clone(),
            ..Default::default()
        };
        for node in &w.nodes {
            if node.task_id.is_empty() {
                continue;
            }
            if !self.tasks.contains_key(&node.task_id) {
                served
                    .evicted
                    .push((node.task_id.clone(), node.name.clone()));
                continue;
            }
            if let Ok(s) = self.task_artifacts(&node.task_id) {
                served
                    .artifacts
                    .extend(s.artifacts.into_iter().map(|mut a| {
                        a.workflow_id = w.id.clone();
                        a.workflow_node = node.name.clone();
                        a
                    }));
            }
        }
        Ok(served)
    }

    /// The objects an attempt uploaded that its task's result does not refer to.
    pub(super) fn unreferenced_uploads(&self, task: &Task, token: u64) -> Vec<ArtifactRef> {
        let kept = task
            .result
            .as_ref()
            .map(|r| &r.artifacts[..])
            .unwrap_or(&[]);
        task.attempts
            .iter()
            .filter(|a| a.fencing_token == token)
            .flat_map(|a| a.artifacts.iter())
            .filter(|r| {
                !kept
                    .iter()
                    .any(|k| k.fencing_token == r.fencing_token && k.name == r.name)
            })
            .cloned()
            .collect()
    }

    /// Deletes `refs` in the background (best effort), now.
    pub(super) fn discard_uploads(&self, refs: &[ArtifactRef]) {
        if refs.is_empty() {
            return;
        }
        if let Some(store) = &self.artifacts {
            store.discard(
                refs.iter()
                    .map(|r| store.key(&r.task_id, r.fencing_token, &r.name)),
            );
        }
    }

    /// An effect deleting `refs` (best effort) once the write that drops them is durable.
    pub(super) fn discard_effect(&self, refs: Vec<ArtifactRef>) -> Option<Effect> {
        let store = self.artifacts.clone()?;
        if refs.is_empty() {
            return None;
        }
        Some(Box::new(move |r| {
            if r.is_ok() {
                store.discard(
                    refs.iter()
                        .map(|r| store.key(&r.task_id, r.fencing_token, &r.name)),
                );
            }
        }))
    }

    /// A finished attempt's result as recorded: a success takes the attempt's recorded
    /// uploads as its artifacts (whatever the worker listed), and becomes an infrastructure
    /// failure when a required declared artifact was not uploaded; other outcomes carry
    /// none.
    pub(super) fn with_recorded_artifacts(
        &self,
        task_id: &str,
        mut result: TaskResult,
    ) -> TaskResult {
        let Some(t) = self.tasks.get(task_id).map(|e| &e.task) else {
            return result;
        };
        if result.outcome() != Outcome::Succeeded {
            result.artifacts.clear();
            return result;
        }
        let recorded = t.attempts.last().map(|a| &a.artifacts[..]).unwrap_or(&[]);
        let declared = t.spec.as_ref().map(|s| &s.artifacts[..]).unwrap_or(&[]);
        if let Some(missing) = declared
            .iter()
            .find(|d| !d.optional && !recorded.iter().any(|r| r.name == d.name))
        {
            return TaskResult {
                outcome: Outcome::Failed as i32,
                exit_code: result.exit_code,
                message: format!(
                    "artifact {:?} was not uploaded (required, path {:?})",
                    missing.name, missing.path
                ),
                error_class: scabbard_common::proto::ErrorClass::Infrastructure as i32,
                outputs: result.outputs,
                ..Default::default()
            };
        }
        result.artifacts = recorded.to_vec();
        result
    }
}

/// Artifact `name` among what `served` serves, or why not.
pub(crate) fn find(served: &Served, task_id: &str, name: &str) -> Result<ArtifactRef> {
    if let Some(a) = served.artifacts.iter().find(|a| a.name == name) {
        return Ok(a.clone());
    }
    Err(Error::NotFound {
        kind: "artifact",
        id: match &served.pending {
            Some(why) => format!("{task_id}/{name} ({why})"),
            None => format!("{task_id}/{name}"),
        },
    })
}

/// Whether two reports of one attempt say the same, apart from the artifacts (which the
/// controller replaces with what the attempt recorded).
pub(super) fn same_report(a: &TaskResult, b: &TaskResult) -> bool {
    let strip = |r: &TaskResult| TaskResult {
        artifacts: Vec::new(),
        ..r.clone()
    };
    strip(a) == strip(b)
}
