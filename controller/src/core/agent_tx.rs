//! The core's sending end of one agent session: a bounded queue that never drops a message
//! silently. When the agent does not read its messages fast enough and the queue is full,
//! the session is closed instead (the agent reconnects, and its `Hello` resynchronises
//! what it runs: an Assign it never got is requeued, a Cancel it never got is sent again).

use scabbard_common::proto::ControllerMessage;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotSent {
    /// The queue was full: the session is being closed.
    Overflowed,
    /// The session has ended.
    Closed,
}

/// Cheap handle to an agent session's outbound queue (see the module docs).
#[derive(Clone)]
pub(crate) struct AgentTx {
    /// Boxed: a queue allocates room for its first 32 messages up front, and a message
    /// is ~850 bytes inline (an `Assign` carries the spec), which with 10,000 sessions is
    /// most of their memory.
    tx: mpsc::Sender<Box<ControllerMessage>>,
    /// Cancelled when the queue overflowed: the session ends.
    overflow: CancellationToken,
}

impl AgentTx {
    /// A queue of `capacity` messages; the receiver goes to the session, which must also
    /// end when the returned token is cancelled.
    pub(crate) fn channel(
        capacity: usize,
    ) -> (
        Self,
        mpsc::Receiver<Box<ControllerMessage>>,
        CancellationToken,
    ) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let overflow = CancellationToken::new();
        (
            Self {
                tx,
                overflow: overflow.clone(),
            },
            rx,
            overflow,
        )
    }

    /// Queues `msg` without waiting. A full queue closes the session (and the message is
    /// not sent: the agent resynchronises on reconnect); a closed one means the session
    /// has already ended.
    pub(crate) fn try_send(&self, msg: ControllerMessage) -> Result<(), NotSent> {
        match self.tx.try_send(Box::new(msg)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Closed(_)) => Err(NotSent::Closed),
            Err(TrySendError::Full(_)) => {
                if !self.overflow.is_cancelled() {
                    warn!(
                        capacity = self.tx.max_capacity(),
                        "an agent session's outbound queue overflowed: closing the session so the agent reconnects and resynchronises"
                    );
                }
                self.overflow.cancel();
                Err(NotSent::Overflowed)
            }
        }
    }

    /// Whether the session was closed because its queue overflowed.
    #[cfg(test)]
    pub(crate) fn overflowed(&self) -> bool {
        self.overflow.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scabbard_common::proto::{Drain, controller_message};

    fn drain() -> ControllerMessage {
        ControllerMessage {
            msg: Some(controller_message::Msg::Drain(Drain { reason: "x".into() })),
        }
    }

    #[tokio::test]
    async fn a_full_queue_closes_the_session_instead_of_dropping_silently() {
        let (tx, mut rx, closed) = AgentTx::channel(2);
        tx.try_send(drain()).unwrap();
        tx.try_send(drain()).unwrap();
        assert!(!closed.is_cancelled());
        assert_eq!(tx.try_send(drain()), Err(NotSent::Overflowed));
        assert!(closed.is_cancelled() && tx.overflowed());
        // What was queued before the overflow is still there for the session to see.
        assert!(rx.recv().await.is_some());
        drop(rx);
        assert_eq!(tx.try_send(drain()), Err(NotSent::Closed));
    }
}
