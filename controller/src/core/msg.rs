//! The core actor's mailbox: every request it takes ([`CoreMsg`]) and what comes back.

use super::*;

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// What an attached session gets back.
pub(crate) struct Attached {
    pub(crate) agent_id: String,
    pub(crate) session: u64,
    pub(crate) welcome: Welcome,
    /// Attempt ids (task, token) the session may report on.
    pub(crate) attempts: Vec<(String, u64)>,
    /// When the session last heard from the agent (unix ms), kept by the session: plain
    /// heartbeats never reach the core, which reads this for `last_seen_ms`.
    pub(crate) last_seen: Arc<std::sync::atomic::AtomicI64>,
}

/// Where a submit comes from: kept with the new task, or written beside it.
#[derive(Default)]
pub(crate) struct Origin {
    /// The submitter's trace context (stored with the task).
    pub(crate) trace: trace::Trace,
    /// The task this submit reruns (`Task.rerun_of`); empty for a plain submit.
    pub(crate) rerun_of: String,
    /// The `task.submit` audit entry, written in the new task's commit (the core fills in
    /// its target); an idempotent repeat writes nothing, so its caller records it.
    pub(crate) audit: Option<Box<scabbard_common::proto::AuditEntry>>,
}

/// Requests to the core actor.
pub(crate) enum CoreMsg {
    Submit {
        spec: Box<TaskSpec>,
        idempotency_key: String,
        /// Resolved and checked by the API (exists, the caller may use it).
        project: String,
        origin: Origin,
        reply: Reply<(Task, bool)>,
    },
    /// Submits each entry as [`CoreMsg::Submit`] would, in order, in one message.
    SubmitBatch {
        entries: Vec<BatchEntry>,
    },
    /// A submit whose idempotency key or input producers were not in memory, back from
    /// reading them in the store (off the core): `found` is the task id the key names in
    /// the store (if any) and the records read.
    SubmitLooked {
        spec: Box<TaskSpec>,
        idempotency_key: String,
        project: String,
        origin: Origin,
        reply: Reply<(Task, bool)>,
        found: Result<(Option<String>, Vec<Task>)>,
    },
    Get {
        id: String,
        reply: Reply<Task>,
    },
    List {
        req: ListTasksRequest,
        reply: Reply<(Vec<Task>, String)>,
    },
    Cancel {
        id: String,
        reason: String,
        reply: Reply<Task>,
    },
    /// Placement explanation events of queued tasks (see `core::waiting`), and the current
    /// explanations of `ids`.
    SubscribePlacements {
        ids: Vec<String>,
        reply: oneshot::Sender<(Vec<Task>, broadcast::Receiver<Arc<Task>>)>,
    },
    Subscribe {
        ids: Vec<String>,
        reply: oneshot::Sender<(Vec<Task>, broadcast::Receiver<Arc<Task>>)>,
    },
    Register {
        stored: StoredAgent,
        reply: Reply<()>,
    },
    Attach {
        /// From the agent token the session authenticated with.
        agent_id: String,
        hello: Hello,
        tx: agent_tx::AgentTx,
        reply: Reply<Attached>,
    },
    Detach {
        agent_id: String,
        session: u64,
        /// When the session last heard from the agent: the grace period runs from here,
        /// so a silent agent is lost one lease after it fell silent, not two.
        last_heard: std::time::Instant,
    },
    FromAgent {
        agent_id: String,
        session: u64,
        msg: agent_message::Msg,
    },
    ListAgents {
        reply: Reply<Vec<Agent>>,
    },
    DrainAgent {
        id: String,
        reason: String,
        reply: Reply<Agent>,
    },
    /// Returns a drained agent to service (see `agent_admin`).
    UndrainAgent {
        id: String,
        reason: String,
        reply: Reply<Agent>,
    },
    /// Forgets a lost agent (see `agent_admin`).
    RemoveAgent {
        id: String,
        reply: Reply<Agent>,
    },
    Stats {
        reply: oneshot::Sender<CoreStats>,
    },
    SubmitWorkflow {
        spec: Box<scabbard_common::proto::WorkflowSpec>,
        idempotency_key: String,
        project: String,
        template: Option<scabbard_common::proto::TemplateRef>,
        /// The spec passed `workflow::validate::workflow_spec` outside the core.
        validated: bool,
        /// The submitter's trace context (stored with the workflow).
        trace: trace::Trace,
        reply: Reply<(Workflow, bool)>,
    },
    GetWorkflow {
        id: String,
        reply: Reply<Workflow>,
    },
    /// Answers once every write the core queued before this message is durable: a read
    /// of the store after it sees everything the core had told anyone (workflow `List`).
    Durable {
        reply: Reply<()>,
    },
    CancelWorkflow {
        id: String,
        reason: String,
        reply: Reply<Workflow>,
    },
    CreateSchedule {
        spec: scabbard_common::proto::ScheduleSpec,
        project: String,
        paused: bool,
        reply: Reply<scabbard_common::proto::Schedule>,
    },
    GetSchedule {
        id: String,
        reply: Reply<scabbard_common::proto::Schedule>,
    },
    ListSchedules {
        project: String,
        reply: oneshot::Sender<Vec<scabbard_common::proto::Schedule>>,
    },
    PauseSchedule {
        id: String,
        pause: bool,
        reply: Reply<scabbard_common::proto::Schedule>,
    },
    DeleteSchedule {
        id: String,
        reply: Reply<()>,
    },
    ListBreakers {
        all: bool,
        reply: oneshot::Sender<Vec<scabbard_common::proto::Breaker>>,
    },
    ResetBreaker {
        key: String,
        reply: Reply<scabbard_common::proto::Breaker>,
    },
    /// May this agent start uploading this artifact of its attempt?
    ArtifactUploadStart {
        agent_id: String,
        task_id: String,
        fencing_token: u64,
        name: String,
        size: u64,
        reply: Reply<artifacts::UploadGrant>,
    },
    /// Records a completed upload on its attempt (durable before the reply).
    ArtifactRecord {
        agent_id: String,
        artifact: Box<scabbard_common::proto::ArtifactRef>,
        reply: oneshot::Sender<
            std::result::Result<scabbard_common::proto::ArtifactRef, artifacts::RecordRefused>,
        >,
    },
    /// The ref of an input artifact an agent wants for an attempt it runs.
    ArtifactForInput {
        agent_id: String,
        for_task_id: String,
        for_fencing_token: u64,
        task_id: String,
        name: String,
        reply: Reply<scabbard_common::proto::ArtifactRef>,
    },
    /// The retention sweeper deleted these finished tasks and workflows from the store:
    /// drop them from memory (a live task or workflow is never touched).
    Forget {
        ids: Vec<String>,
    },
    /// What a task (or, with `workflow`, a workflow) serves.
    ServedArtifacts {
        id: String,
        workflow: bool,
        reply: Reply<artifacts::Served>,
    },
    /// Runs a task again: a new task with the source's spec (its secrets opened and
    /// sealed anew), submitted as [`CoreMsg::Submit`] with `rerun_of` set.
    RerunTask {
        source: Box<Task>,
        idempotency_key: String,
        trace: trace::Trace,
        reply: Reply<(Task, bool)>,
    },
    /// Runs a workflow again: a new workflow with the source's spec and template ref.
    RerunWorkflow {
        source: Box<Workflow>,
        idempotency_key: String,
        trace: trace::Trace,
        reply: Reply<(Workflow, bool)>,
    },
    /// Fires a schedule once now (idempotency key already namespaced by the API).
    TriggerSchedule {
        id: String,
        idempotency_key: String,
        reply: Reply<(Workflow, bool, scabbard_common::proto::Schedule)>,
    },
    /// Changes a schedule's set fields (validated as a create is).
    UpdateSchedule {
        req: Box<scabbard_common::proto::UpdateScheduleRequest>,
        reply: Reply<scabbard_common::proto::Schedule>,
    },
    /// An attempt's log was archived in the blob store: record it, then ack its agent.
    LogArchived {
        task_id: String,
        fencing_token: u64,
        archived: crate::logstore::archive::Archived,
    },
}

/// One entry of [`CoreMsg::SubmitBatch`]: what a [`CoreMsg::Submit`] carries.
pub(crate) struct BatchEntry {
    pub(crate) spec: Box<TaskSpec>,
    pub(crate) idempotency_key: String,
    /// Resolved and checked by the API (exists, the caller may use it).
    pub(crate) project: String,
    pub(crate) trace: trace::Trace,
    pub(crate) reply: Reply<(Task, bool)>,
}
