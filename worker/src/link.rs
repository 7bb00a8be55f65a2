//! The worker's way to the controller for calls outside the session stream (the artifact
//! store): which controller leads now, the TLS settings, the agent token, and the artifact
//! limits the controller announced in `Welcome`. The connection updates it (new target after
//! a redirect or a failover, new token after registering again, limits on every `Welcome`);
//! the runner reads it for every call. A call that comes back with a leader hint moves the
//! target at once, without waiting for the session to notice.
//!
//! It holds one cached gRPC channel per target; it never holds its lock across an `.await`.

use std::sync::{Mutex, MutexGuard, PoisonError};

use scabbard_common::client::{self, ArtifactServiceClient, ClientOptions};
use scabbard_common::proto::Welcome;
use scabbard_common::{Error, Result};
use tonic::transport::Channel;

/// The controller's artifact limits (0 = none), from the last `Welcome`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ArtifactLimits {
    /// Largest packed artifact (`max_artifact_bytes`).
    pub(crate) per_artifact: u64,
    /// Largest total of one attempt's packed artifacts (`max_task_artifact_bytes`).
    pub(crate) per_task: u64,
}

#[derive(Default)]
struct State {
    target: String,
    token: Option<String>,
    limits: ArtifactLimits,
    /// The channel to `.0`, once connected.
    channel: Option<(String, Channel)>,
}

/// Shared by the connection (writer) and the runner (reader).
pub(crate) struct ControllerLink {
    opts: ClientOptions,
    state: Mutex<State>,
}

impl ControllerLink {
    /// A link to `target` with the TLS settings of `opts` (its token is ignored: the agent
    /// token is set with [`Self::set_token`]).
    pub(crate) fn new(target: &str, opts: ClientOptions) -> Self {
        Self {
            opts: ClientOptions {
                token: None,
                ..opts
            },
            state: Mutex::new(State {
                target: target.to_string(),
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The controller calls go to now.
    #[cfg(test)]
    pub(crate) fn target(&self) -> String {
        self.lock().target.clone()
    }

    /// Points calls at another controller (a redirect, a failover, the next address).
    pub(crate) fn set_target(&self, target: &str) {
        let mut s = self.lock();
        if s.target != target {
            s.target = target.to_string();
            s.channel = None;
        }
    }

    /// The agent token to send (after registering, or registering again).
    pub(crate) fn set_token(&self, token: &str) {
        self.lock().token = Some(token.to_string());
    }

    /// Takes the limits of a `Welcome`.
    pub(crate) fn welcomed(&self, w: &Welcome) {
        self.lock().limits = ArtifactLimits {
            per_artifact: w.max_artifact_bytes,
            per_task: w.max_task_artifact_bytes,
        };
    }

    /// The limits of the last `Welcome`.
    pub(crate) fn limits(&self) -> ArtifactLimits {
        self.lock().limits
    }

    /// Learns from a failed call: a leader hint moves the target; a connection failure
    /// drops the cached channel so the next call connects again.
    pub(crate) fn failed(&self, e: &Error) {
        match e {
            Error::NotLeader {
                leader: Some(leader),
            } => self.set_target(leader),
            Error::Unavailable(_) | Error::Internal(_) => self.lock().channel = None,
            _ => {}
        }
    }

    /// An artifact-service client to the current target carrying the agent token.
    pub(crate) async fn artifacts(&self) -> Result<ArtifactServiceClient<client::AuthedChannel>> {
        let (target, token, cached) = {
            let s = self.lock();
            let cached = s
                .channel
                .as_ref()
                .filter(|(t, _)| *t == s.target)
                .map(|(_, c)| c.clone());
            (s.target.clone(), s.token.clone(), cached)
        };
        let Some(token) = token else {
            return Err(Error::Unavailable(
                "the worker has no agent token yet (not registered)".into(),
            ));
        };
        let channel = match cached {
            Some(c) => c,
            None => {
                let c = client::connect_with(&target, &self.opts).await?;
                let mut s = self.lock();
                if s.target == target {
                    s.channel = Some((target, c.clone()));
                }
                c
            }
        };
        Ok(
            ArtifactServiceClient::new(client::authed(channel, Some(&token))?)
                .max_decoding_message_size(client::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(client::MAX_MESSAGE_BYTES),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_move_the_target_and_welcome_sets_limits() {
        let link = ControllerLink::new("127.0.0.1:1", ClientOptions::default());
        link.failed(&Error::NotLeader {
            leader: Some("127.0.0.1:2".into()),
        });
        assert_eq!(link.target(), "127.0.0.1:2");
        link.failed(&Error::NotLeader { leader: None });
        assert_eq!(link.target(), "127.0.0.1:2");
        link.welcomed(&Welcome {
            max_artifact_bytes: 10,
            max_task_artifact_bytes: 20,
            ..Default::default()
        });
        assert_eq!(
            link.limits(),
            ArtifactLimits {
                per_artifact: 10,
                per_task: 20
            }
        );
    }

    #[tokio::test]
    async fn no_call_before_the_worker_has_a_token() {
        let link = ControllerLink::new("127.0.0.1:1", ClientOptions::default());
        let e = link.artifacts().await.unwrap_err();
        assert!(e.to_string().contains("no agent token"), "{e}");
    }
}
