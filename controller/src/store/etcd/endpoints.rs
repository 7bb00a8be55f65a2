//! Dead-endpoint detection: a task probes every configured etcd endpoint on a connection of
//! its own (a `Status` call, answered by the member itself, bounded by `attempt_timeout`)
//! every half `attempt_timeout`, and takes an endpoint that missed two probes in a row
//! (about 2 s by default) out of the client's balancer, so
//! requests stop going to a killed or frozen member; it goes back once it answers again.
//! The last endpoint in service is never taken out. Owns no request of the store's.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Probes missed in a row before an endpoint is taken out.
const MISSES: u32 = 2;

/// Aborts the prober when the store drops.
pub(super) struct Prober(JoinHandle<()>);

impl Drop for Prober {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts probing `endpoints` of `client` (a no-op for a single endpoint: nothing to fail
/// over to). `opts` connect one probe client per endpoint.
pub(super) fn spawn(
    client: Client,
    endpoints: Vec<String>,
    opts: ConnectOptions,
    attempt_timeout: Duration,
) -> Option<Prober> {
    if endpoints.len() < 2 {
        return None;
    }
    let every = (attempt_timeout / 2).max(Duration::from_millis(50));
    Some(Prober(tokio::spawn(async move {
        let mut probes: Vec<Option<Client>> = vec![None; endpoints.len()];
        let mut misses = vec![0u32; endpoints.len()];
        let mut out = vec![false; endpoints.len()];
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let opts = &opts;
            let answers = futures::future::join_all(endpoints.iter().zip(probes.iter_mut()).map(
                |(ep, probe)| async move {
                    let ask = async {
                        if probe.is_none() {
                            *probe =
                                Some(Client::connect([ep.as_str()], Some(opts.clone())).await?);
                        }
                        match probe.as_mut() {
                            Some(c) => c.status().await.map(drop),
                            None => Ok(()),
                        }
                    };
                    match tokio::time::timeout(attempt_timeout, ask).await {
                        Ok(Ok(())) => true,
                        _ => {
                            // A fresh connection next time (the old one may hang).
                            *probe = None;
                            false
                        }
                    }
                },
            ))
            .await;
            for (i, ok) in answers.into_iter().enumerate() {
                misses[i] = if ok { 0 } else { misses[i].saturating_add(1) };
                let in_service = out.iter().filter(|o| !**o).count();
                if !out[i] && misses[i] >= MISSES && in_service > 1 {
                    if client.remove_endpoint(&endpoints[i]).await.is_ok() {
                        warn!(endpoint = %endpoints[i], "etcd endpoint does not answer: taken out of service");
                        out[i] = true;
                    }
                } else if out[i] && ok && client.add_endpoint(&endpoints[i]).await.is_ok() {
                    info!(endpoint = %endpoints[i], "etcd endpoint answers again: back in service");
                    out[i] = false;
                }
            }
        }
    })))
}
