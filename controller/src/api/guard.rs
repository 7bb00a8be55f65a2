//! Long-lived API streams (task watches, log follows) end the moment the token that opened
//! them is revoked, like agent sessions do.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::tasks::BoxStream;
use crate::auth::Catalog;

/// Forwards `rx` until it ends or `token_id` is revoked (then ends with `UNAUTHENTICATED`).
pub(crate) fn close_on_revoke<T: Send + 'static>(
    catalog: Arc<Catalog>,
    token_id: String,
    mut rx: mpsc::Receiver<Result<T, Status>>,
) -> BoxStream<T> {
    let (tx, out) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut revocations = catalog.revocations();
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => if tx.send(m).await.is_err() { return },
                    None => return,
                },
                id = revocations.recv() => {
                    let revoked = match id {
                        Ok(id) => id == token_id,
                        Err(RecvError::Lagged(_)) => {
                            catalog.token(&token_id).is_none_or(|t| t.revoked)
                        }
                        Err(RecvError::Closed) => {
                            revocations = catalog.revocations();
                            false
                        }
                    };
                    if revoked {
                        let _ = tx
                            .send(Err(Status::unauthenticated(format!(
                                "token {token_id} was revoked: the stream is closed"
                            ))))
                            .await;
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(out))
}

/// Ends an [`Outbox`](super::streams::Outbox) stream with `UNAUTHENTICATED` the moment
/// `token_id` is revoked (until the client drops it).
pub(crate) fn end_on_revoke<T: Send + 'static>(
    catalog: Arc<Catalog>,
    token_id: String,
    ender: super::streams::Ender<T>,
) {
    tokio::spawn(async move {
        let mut revocations = catalog.revocations();
        loop {
            tokio::select! {
                id = revocations.recv() => {
                    let revoked = match id {
                        Ok(id) => id == token_id,
                        Err(RecvError::Lagged(_)) => {
                            catalog.token(&token_id).is_none_or(|t| t.revoked)
                        }
                        Err(RecvError::Closed) => {
                            revocations = catalog.revocations();
                            false
                        }
                    };
                    if revoked {
                        ender.end(Status::unauthenticated(format!(
                            "token {token_id} was revoked: the stream is closed"
                        )));
                        return;
                    }
                }
                _ = ender.closed() => return,
            }
        }
    });
}
