//! How the rest of the controller reaches the core: [`CoreHandle`] (one running core actor
//! and its log store, for one leadership term), [`CoreRouter`] (the running core while this
//! controller leads, else a redirect to the leader) and its [`Route`].

use super::*;

/// Cheap handle to one running core actor (one leadership term) and its log store.
#[derive(Clone)]
pub struct CoreHandle {
    pub(super) tx: mpsc::Sender<CoreMsg>,
    pub(super) logs: Arc<LogStore>,
    pub(super) archive: Option<Arc<crate::logstore::archive::LogArchive>>,
    /// The store, for what is served off the core (finished tasks and workflows).
    pub(super) store: Arc<dyn Store>,
    /// How busy this term's persister is.
    pub(super) load: Arc<persist::Load>,
}

/// Where requests go on this controller: the running core when it leads, otherwise a
/// redirect to the leader. Services hold this; it follows leadership changes.
#[derive(Clone)]
pub struct CoreRouter {
    slot: watch::Receiver<Route>,
}

/// The current route of a [`CoreRouter`].
#[derive(Clone)]
pub enum Route {
    /// This controller leads; its core serves.
    Active(CoreHandle),
    /// Another controller leads (address if known).
    Follower(Option<String>),
}

impl CoreRouter {
    /// A router and the sender that switches it.
    pub fn new(initial: Route) -> (watch::Sender<Route>, Self) {
        let (tx, slot) = watch::channel(initial);
        (tx, Self { slot })
    }

    /// Follows route changes.
    pub fn watch(&self) -> watch::Receiver<Route> {
        self.slot.clone()
    }

    /// The running core, or `NotLeader` with the leader's address.
    pub fn current(&self) -> Result<CoreHandle> {
        match &*self.slot.borrow() {
            Route::Active(h) => Ok(h.clone()),
            Route::Follower(leader) => Err(Error::NotLeader {
                leader: leader.clone(),
            }),
        }
    }

    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> CoreMsg,
    ) -> Result<T> {
        self.current()?.call(make).await
    }

    pub(crate) async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> CoreMsg) -> Result<T> {
        self.current()?.ask(make).await
    }

    /// Hands `msg` to the running core (its replies travel inside it).
    pub(crate) async fn tell(&self, msg: CoreMsg) -> Result<()> {
        self.current()?
            .tx
            .send(msg)
            .await
            .map_err(|_| Error::Unavailable("controller is shutting down".into()))
    }
}

impl CoreHandle {
    pub(crate) async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> CoreMsg,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| Error::Unavailable("controller is shutting down".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("controller is shutting down".into()))
    }

    /// Like [`call`](Self::call) for requests whose reply is itself a `Result`.
    pub(crate) async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> CoreMsg) -> Result<T> {
        self.call(make).await?
    }

    pub(crate) async fn send(&self, msg: CoreMsg) {
        let _ = self.tx.send(msg).await;
    }

    /// How busy the live path is: the persister's commits, and messages waiting for the
    /// core.
    pub(crate) fn load(&self) -> (&persist::Load, usize) {
        (&self.load, self.tx.max_capacity() - self.tx.capacity())
    }

    /// The log store of this term.
    pub fn logs(&self) -> &Arc<LogStore> {
        &self.logs
    }

    /// The cluster-state store this core writes to.
    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Where finished attempts' logs are archived (None: no blob store).
    pub fn archive(&self) -> Option<&Arc<crate::logstore::archive::LogArchive>> {
        self.archive.as_ref()
    }

    /// A task: from the core when it holds it, else its record in the store (a finished
    /// task that left the core's memory; it did so only once that record was durable).
    pub(crate) async fn task(&self, id: &str) -> Result<Task> {
        let owned = id.to_string();
        match self.ask(|reply| CoreMsg::Get { id: owned, reply }).await {
            Err(Error::NotFound { .. }) => history::read_task(self.store.as_ref(), id)
                .await?
                .ok_or_else(|| Error::not_found("task", id)),
            other => other,
        }
    }

    /// A workflow: from the core when it holds it (live, or recently finished), else from
    /// the store (a finished workflow that left the core's memory once its final header was
    /// durable).
    pub(crate) async fn workflow(&self, id: &str) -> Result<Workflow> {
        let owned = id.to_string();
        match self
            .ask(|reply| CoreMsg::GetWorkflow { id: owned, reply })
            .await
        {
            Err(Error::NotFound { .. }) => history::read_workflow(self.store.as_ref(), id)
                .await?
                .ok_or_else(|| Error::not_found("workflow", id)),
            other => other,
        }
    }

    /// Current counters.
    pub async fn stats(&self) -> Result<CoreStats> {
        self.call(|reply| CoreMsg::Stats { reply }).await
    }
}
