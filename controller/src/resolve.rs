//! What a caller typed where an id goes: a full id, a unique id prefix (at least
//! [`MIN_PREFIX`] characters) or, for schedules, agents and tokens, a name. Every RPC that
//! takes the id of a task, workflow, schedule, agent or token resolves it here first, so
//! gRPC, HTTP, MCP and the CLI all accept the same short forms.
//!
//! Tasks and workflows are found through the history index (`hist/t/`, `hist/w/` for a
//! cluster-wide caller, `hist/p/<project>/`, `hist/wp/<project>/` for a project-bound one;
//! see `core::history`): ids are ULIDs, so a prefix of an id is a prefix of its inverted
//! key, and one short range read answers whatever the history's size. A project-bound
//! caller only ever reads its own project's index: another project's ids are never
//! revealed. Schedules, agents and tokens are few and in memory: they are matched on the
//! list the caller may see.
//!
//! Two or more matches are `INVALID_ARGUMENT`, listing them (at most [`MAX_LISTED`]);
//! none is `NOT_FOUND`. This module reads; it never changes anything.

use prost::Message;
use scabbard_common::proto::{Agent, Schedule, Task, TokenInfo, Workflow};
use scabbard_common::{Error, Result};

use crate::auth::Principal;
use crate::core::TASK_PREFIX;
use crate::core::history::{self, IndexSpace, TASK_INDEX, WORKFLOW_INDEX};
use crate::store::Store;

/// The shortest id prefix looked up (shorter ones would match too much to be useful).
pub(crate) const MIN_PREFIX: usize = 4;
/// Most matches an ambiguity error lists.
pub(crate) const MAX_LISTED: usize = 10;
/// Length of a ULID, the id of tasks, workflows and schedules.
const ULID_LEN: usize = 26;

/// One match: the id and a few words about it (name, state, project).
struct Match {
    id: String,
    about: String,
}

/// `INVALID_ARGUMENT` listing the matches of an ambiguous `input`.
fn ambiguous(kind: &str, input: &str, matches: &[Match], more: bool) -> Error {
    let mut msg = format!(
        "{kind} {input:?} is ambiguous: it matches {}{} {kind}s; give more of the id:",
        if more { "more than " } else { "" },
        matches.len()
    );
    for m in matches.iter().take(MAX_LISTED) {
        msg.push_str(&format!("\n  {}  {}", m.id, m.about));
    }
    Error::invalid(msg)
}

/// Whether `s` could be (part of) a lower-case ULID.
fn ulid_chars(s: &str) -> bool {
    s.bytes().all(|c| {
        c.is_ascii_digit() || (c.is_ascii_lowercase() && !matches!(c, b'i' | b'l' | b'o' | b'u'))
    })
}

/// The inverted form of an id prefix (inversion maps each character on its own).
fn invert_prefix(prefix: &str) -> Option<String> {
    let padded = format!(
        "{prefix}{}",
        "0".repeat(ULID_LEN.saturating_sub(prefix.len()))
    );
    history::invert_id(&padded).map(|inv| inv[..prefix.len()].to_string())
}

/// What the id of a task or workflow resolves to: `Some(full id)`, or `None` when `input`
/// is no prefix to look up (a full id, or something that is not a ULID's start: the caller
/// goes on with it as given).
async fn indexed(
    store: &dyn Store,
    who: &Principal,
    input: &str,
    kind: &'static str,
    space: IndexSpace,
) -> Result<Option<String>> {
    let lower = input.to_ascii_lowercase();
    if lower.len() >= ULID_LEN || !ulid_chars(&lower) {
        return Ok(None);
    }
    if lower.len() < MIN_PREFIX {
        return Err(Error::invalid(format!(
            "{kind} id {input:?} is too short: give the full id or at least {MIN_PREFIX} characters of it"
        )));
    }
    let inv = invert_prefix(&lower).ok_or_else(|| Error::not_found(kind, input))?;
    let prefix = if who.cluster_wide() {
        format!("{}{inv}", space.all)
    } else {
        format!("{}{inv}", space.project_prefix(&who.project))
    };
    let page = store.range(&prefix, None, MAX_LISTED + 1).await?;
    let ids: Vec<String> = page
        .kvs
        .iter()
        .filter_map(|kv| {
            let inv = kv.key.rsplit('/').next()?;
            history::uninvert_id(inv)
        })
        .collect();
    match ids.len() {
        0 => Err(Error::not_found(kind, input)),
        1 => Ok(ids.into_iter().next()),
        _ => {
            let mut matches = Vec::new();
            for id in ids.iter().take(MAX_LISTED) {
                matches.push(Match {
                    about: describe(store, kind, id).await,
                    id: id.clone(),
                });
            }
            let more = ids.len() > MAX_LISTED || page.more;
            Err(ambiguous(kind, input, &matches, more))
        }
    }
}

/// A few words about a task or workflow: its state and name (read from its record).
async fn describe(store: &dyn Store, kind: &str, id: &str) -> String {
    let (key, task) = if kind == "task" {
        (format!("{TASK_PREFIX}{id}"), true)
    } else {
        (crate::core::workflows::records::header_key(id), false)
    };
    let Ok(Some(kv)) = store.get(&key).await else {
        return String::new();
    };
    if task {
        Task::decode(kv.value.as_slice())
            .map(|t| {
                let name = t.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                let state = t.state().as_str_name().trim_start_matches("TASK_STATE_");
                format!("{state}  {name}  (project {})", t.project)
            })
            .unwrap_or_default()
    } else {
        Workflow::decode(kv.value.as_slice())
            .map(|w| {
                let name = w.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                let state = w
                    .state()
                    .as_str_name()
                    .trim_start_matches("WORKFLOW_STATE_");
                format!("{state}  {name}  (project {})", w.project)
            })
            .unwrap_or_default()
    }
}

/// The task id `input` stands for (a full id or a unique prefix of one the caller may see).
pub(crate) async fn task(store: &dyn Store, who: &Principal, input: &str) -> Result<String> {
    Ok(indexed(store, who, input, "task", TASK_INDEX)
        .await?
        .unwrap_or_else(|| input.to_string()))
}

/// The workflow id `input` stands for (a full id or a unique prefix).
pub(crate) async fn workflow(store: &dyn Store, who: &Principal, input: &str) -> Result<String> {
    Ok(indexed(store, who, input, "workflow", WORKFLOW_INDEX)
        .await?
        .unwrap_or_else(|| input.to_string()))
}

/// The error for a task id that names no task: when `input` is (the prefix of) a
/// workflow's id, it says so and which command serves workflows (`verb`: `logs`, `get`, …);
/// otherwise it is `not_found`.
pub(crate) async fn not_a_task(
    store: &dyn Store,
    who: &Principal,
    input: &str,
    verb: &str,
    not_found: Error,
) -> Error {
    let wf = match indexed(store, who, input, "workflow", WORKFLOW_INDEX).await {
        Ok(Some(id)) => id,
        Ok(None) if input.len() == ULID_LEN => input.to_ascii_lowercase(),
        _ => return not_found,
    };
    match store
        .get(&crate::core::workflows::records::header_key(&wf))
        .await
    {
        Ok(Some(kv))
            if Workflow::decode(kv.value.as_slice()).is_ok_and(|w| who.may_access(&w.project)) =>
        {
            Error::invalid(format!(
                "{input} is a workflow, not a task: use `scabbard workflow {verb} {wf}` (WorkflowService), or give one of its tasks' ids (`scabbard workflow get {wf}` lists them)"
            ))
        }
        _ => not_found,
    }
}

/// The id of the schedule `input` names, among `visible` (the caller's): its id, its
/// name, or a unique id prefix.
pub(crate) fn schedule(visible: &[Schedule], input: &str) -> Result<String> {
    let name = |s: &Schedule| s.spec.as_ref().map(|x| x.name.clone()).unwrap_or_default();
    let about = |s: &Schedule| {
        format!(
            "{}  {}  (project {})",
            name(s),
            if s.paused { "paused" } else { "active" },
            s.project
        )
    };
    pick(
        "schedule",
        input,
        visible,
        |s| &s.id,
        |s| name(s) == input,
        about,
        "",
    )
}

/// The id of the agent `input` names: its id, its name, or a unique prefix of its id
/// (with or without `agent-`).
pub(crate) fn agent(agents: &[Agent], input: &str) -> Result<String> {
    let about = |a: &Agent| {
        let status = scabbard_common::proto::AgentStatus::try_from(a.status)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("AGENT_STATUS_")
                    .to_string()
            })
            .unwrap_or_default();
        format!("{}  {status}", a.name)
    };
    pick(
        "agent",
        input,
        agents,
        |a| &a.id,
        |a| a.name == input,
        about,
        "agent-",
    )
}

/// The id of the token `input` names among `visible`: its id, its name, or a unique
/// prefix of its id (with or without `tok_`).
pub(crate) fn token(visible: &[TokenInfo], input: &str) -> Result<String> {
    let about = |t: &TokenInfo| {
        format!(
            "{}  {}{}",
            t.name,
            t.kind().as_str_name().trim_start_matches("TOKEN_KIND_"),
            if t.revoked { "  revoked" } else { "" }
        )
    };
    pick(
        "token",
        input,
        visible,
        |t| &t.id,
        |t| !t.name.is_empty() && t.name == input,
        about,
        "tok_",
    )
}

/// Resolution over an in-memory list: the exact id, else exactly one name match, else a
/// unique id prefix (`id_prefix` may be left out of it).
fn pick<T>(
    kind: &'static str,
    input: &str,
    items: &[T],
    id: impl Fn(&T) -> &String,
    named: impl Fn(&T) -> bool,
    about: impl Fn(&T) -> String,
    id_prefix: &str,
) -> Result<String> {
    if input.is_empty() {
        return Err(Error::invalid(format!("{kind} id is required")));
    }
    if let Some(t) = items.iter().find(|t| id(t) == input) {
        return Ok(id(t).clone());
    }
    let list = |found: Vec<&T>, what: &str| -> Error {
        let matches: Vec<Match> = found
            .iter()
            .map(|t| Match {
                id: id(t).clone(),
                about: about(t),
            })
            .collect();
        let mut e = ambiguous(kind, input, &matches, false);
        if let Error::InvalidArgument(m) = &mut e {
            *m = m.replace("give more of the id", what);
        }
        e
    };
    let by_name: Vec<&T> = items.iter().filter(|t| named(t)).collect();
    match by_name.len() {
        1 => return Ok(id(by_name[0]).clone()),
        0 => {}
        _ => return Err(list(by_name, "use the id")),
    }
    let lower = input.to_ascii_lowercase();
    if lower.len() < MIN_PREFIX {
        return Err(Error::not_found(kind, input));
    }
    let with = format!("{id_prefix}{lower}");
    let by_prefix: Vec<&T> = items
        .iter()
        .filter(|t| {
            id(t).starts_with(&lower) || (!id_prefix.is_empty() && id(t).starts_with(&with))
        })
        .collect();
    match by_prefix.len() {
        0 => Err(Error::not_found(kind, input)),
        1 => Ok(id(by_prefix[0]).clone()),
        _ => Err(list(by_prefix, "give more of the id")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_named(id: &str, name: &str) -> Agent {
        Agent {
            id: id.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn prefixes_invert_like_whole_ids() {
        let id = ulid::Ulid::new().to_string().to_lowercase();
        let inv = history::invert_id(&id).unwrap();
        for n in [4, 9, 25] {
            assert_eq!(invert_prefix(&id[..n]).unwrap(), inv[..n]);
        }
    }

    #[test]
    fn agents_resolve_by_id_name_and_prefix() {
        let agents = vec![
            agent_named("agent-01kaaa1111", "build-1"),
            agent_named("agent-01kaaa2222", "build-2"),
            agent_named("agent-01kbbb3333", "dup"),
            agent_named("agent-01kccc4444", "dup"),
        ];
        assert_eq!(agent(&agents, "build-2").unwrap(), "agent-01kaaa2222");
        assert_eq!(
            agent(&agents, "agent-01kbbb3333").unwrap(),
            "agent-01kbbb3333"
        );
        assert_eq!(agent(&agents, "01kbbb").unwrap(), "agent-01kbbb3333");
        assert_eq!(agent(&agents, "agent-01kc").unwrap(), "agent-01kccc4444");
        let e = agent(&agents, "01kaaa").unwrap_err().to_string();
        assert!(
            e.contains("ambiguous") && e.contains("build-1") && e.contains("build-2"),
            "{e}"
        );
        let e = agent(&agents, "dup").unwrap_err().to_string();
        assert!(
            e.contains("use the id") && e.contains("agent-01kccc4444"),
            "{e}"
        );
        assert!(matches!(
            agent(&agents, "nope-nope"),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(agent(&agents, "01k"), Err(Error::NotFound { .. })));
    }

    #[test]
    fn schedules_and_tokens_resolve_by_name_and_prefix() {
        let sched = |id: &str, name: &str, project: &str| Schedule {
            id: id.into(),
            project: project.into(),
            spec: Some(scabbard_common::proto::ScheduleSpec {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let list = vec![
            sched("01kaaa0000000000000000000a", "nightly", "web"),
            sched("01kaaa0000000000000000000b", "weekly", "web"),
            sched("01kbbb0000000000000000000c", "nightly", "api"),
        ];
        assert_eq!(schedule(&list, "weekly").unwrap(), list[1].id);
        assert_eq!(schedule(&list, "01kbbb").unwrap(), list[2].id);
        let e = schedule(&list, "nightly").unwrap_err().to_string();
        assert!(
            e.contains("project web") && e.contains("project api"),
            "{e}"
        );
        assert!(schedule(&list[..2], "01kaaa").is_err());
        assert_eq!(schedule(&list[..2], "nightly").unwrap(), list[0].id);
        let tok = |id: &str, name: &str| TokenInfo {
            id: id.into(),
            name: name.into(),
            ..Default::default()
        };
        let tokens = vec![tok("tok_01kaaa11", "ci"), tok("tok_01kbbb22", "deploy")];
        assert_eq!(token(&tokens, "deploy").unwrap(), "tok_01kbbb22");
        assert_eq!(token(&tokens, "01kaaa").unwrap(), "tok_01kaaa11");
        assert_eq!(token(&tokens, "tok_01kb").unwrap(), "tok_01kbbb22");
        assert!(matches!(
            token(&tokens, "tok_01kc"),
            Err(Error::NotFound { .. })
        ));
    }
}
