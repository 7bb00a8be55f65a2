//! Accepting connections with bounds, for every listener of the controller (gRPC and
//! metrics):
//!
//! * a **per-address cap** (`max_connections_per_ip`): a connection from an address that
//!   already has that many open is closed at once, before any byte is read;
//! * a **handshake timeout** (`handshake_timeout_ms`): a connection that has not sent the
//!   first bytes of its handshake (the 24-byte HTTP/2 preface, a TLS ClientHello, an HTTP/1
//!   request line) within the timeout is closed. Silent TCP connections therefore cost
//!   a slot for at most that long, and never starve the accept loop or health checks.
//!
//! Accept errors (e.g. out of file descriptors) pause the loop briefly instead of ending
//! it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

use crate::config::ControllerConfig;

/// Bytes a client must send before its handshake counts as started (the HTTP/2 client
/// preface is 24 bytes; a TLS ClientHello and an HTTP/1 request line are longer).
const HANDSHAKE_BYTES: usize = 24;

/// The connection bounds of one listener.
pub struct ConnLimits {
    per_ip: usize,
    handshake_timeout: Duration,
    open: Mutex<HashMap<IpAddr, usize>>,
    refused: AtomicU64,
    timed_out: AtomicU64,
}

impl ConnLimits {
    /// The bounds `cfg` asks for.
    pub fn from_config(cfg: &ControllerConfig) -> Arc<Self> {
        Arc::new(Self {
            per_ip: cfg.max_connections_per_ip,
            handshake_timeout: Duration::from_millis(cfg.handshake_timeout_ms),
            open: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        })
    }

    /// Connections refused for being over the per-address cap, so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections closed for not starting their handshake in time, so far.
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpPermit> {
        let mut open = self.open.lock().expect("connection counts lock");
        let n = open.entry(ip).or_default();
        if self.per_ip > 0 && *n >= self.per_ip {
            return None;
        }
        *n += 1;
        Some(IpPermit {
            limits: self.clone(),
            ip,
        })
    }

    /// Accepts from `listener` forever, yielding the connections within bounds.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> impl Stream<Item = io::Result<GuardedConn>> + Send + 'static {
        futures::stream::unfold((listener, self), |(listener, limits)| async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: wait for connections to close, keep serving.
                        warn!(error = %e, "accept failed; retrying shortly");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(permit) = limits.admit(peer.ip()) else {
                    let n = limits.refused.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        warn!(peer = %peer.ip(), cap = limits.per_ip, refused = n, "connection refused: too many open from this address (max_connections_per_ip)");
                    }
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = GuardedConn::new(stream, limits.clone(), permit);
                return Some((Ok(conn), (listener, limits)));
            }
        })
    }
}

/// A slot of the per-address cap, given back on drop.
struct IpPermit {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().expect("connection counts lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// An accepted connection inside the bounds: reads fail with `TimedOut` when its
/// handshake has not started in time.
pub struct GuardedConn {
    io: TcpStream,
    peer: Option<SocketAddr>,
    /// Until the handshake started.
    deadline: Option<Pin<Box<Sleep>>>,
    seen: usize,
    limits: Arc<ConnLimits>,
    _permit: IpPermit,
}

impl GuardedConn {
    fn new(io: TcpStream, limits: Arc<ConnLimits>, permit: IpPermit) -> Self {
        Self {
            peer: io.peer_addr().ok(),
            deadline: Some(Box::pin(tokio::time::sleep(limits.handshake_timeout))),
            io,
            seen: 0,
            limits,
            _permit: permit,
        }
    }

    /// The client's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }
}

impl AsyncRead for GuardedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return r;
        };
        match r {
            Poll::Ready(Ok(())) => {
                this.seen += buf.filled().len() - before;
                if this.seen >= HANDSHAKE_BYTES {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.limits.timed_out.fetch_add(1, Ordering::Relaxed);
                    debug!(peer = ?this.peer, "no handshake in time: closing the connection");
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no handshake within {} ms (handshake_timeout_ms)",
                            this.limits.handshake_timeout.as_millis()
                        ),
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
            r => r,
        }
    }
}

impl AsyncWrite for GuardedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for GuardedConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(per_ip: usize, timeout_ms: u64) -> Arc<ConnLimits> {
        ConnLimits::from_config(&ControllerConfig {
            max_connections_per_ip: per_ip,
            handshake_timeout_ms: timeout_ms,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn over_the_cap_is_refused_and_silence_times_out_but_talkers_stay() {
        let l = limits(2, 300);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        let incoming = l.clone().incoming(listener);
        tokio::spawn(async move {
            tokio::pin!(incoming);
            while let Some(c) = incoming.next().await {
                let _ = tx.send(c.unwrap());
            }
        });
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut a = accepted.recv().await.unwrap();
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut b = accepted.recv().await.unwrap();
        let mut over = TcpStream::connect(addr).await.unwrap();
        // The third was refused: closed without a byte.
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf))
            .await
            .expect("refused connection closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(l.refused(), 1);
        talker.write_all(&[b'x'; 30]).await.unwrap();
        // Server side: the talker's bytes arrive and its deadline is lifted; the silent one
        // times out.
        let (first, second) = (&mut a, &mut b);
        let mut got = 0;
        let mut timed_out = 0;
        for conn in [first, second] {
            let r = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("read ends");
            match r {
                Ok(n) => got += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
                    timed_out += 1;
                }
            }
        }
        assert_eq!((got > 0, timed_out), (true, 1));
        assert_eq!(l.timed_out(), 1);
        drop((a, b));
        let _ = silent.read(&mut buf).await;
        // Slots were given back: new connections are accepted again.
        let _c = TcpStream::connect(addr).await.unwrap();
        let _ = accepted.recv().await.unwrap();
    }
}
