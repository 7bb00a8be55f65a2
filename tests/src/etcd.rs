//! Real etcd servers for tests: the `etcd` binary (Debian `etcd-server`) on free loopback
//! ports with its own data dir. Missing etcd is a test failure, never a skip.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::free_port;

fn etcd_bin() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("etcd"))
            .find(|f| f.exists())
    });
    found.expect("etcd is not installed: apt-get install etcd-server (or run scripts/setup.sh)")
}

/// One etcd member.
pub struct EtcdMember {
    /// Member name.
    pub name: String,
    /// Client URL (`http://127.0.0.1:port`).
    pub client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    initial_cluster: String,
    child: Option<Child>,
}

impl EtcdMember {
    fn spawn(&mut self, state: &str) -> Result<()> {
        let child = Command::new(etcd_bin())
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--listen-client-urls",
                &self.client_url,
                "--advertise-client-urls",
                &self.client_url,
            ])
            .args([
                "--listen-peer-urls",
                &self.peer_url,
                "--initial-advertise-peer-urls",
                &self.peer_url,
            ])
            .args([
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                state,
            ])
            .args([
                "--initial-cluster-token",
                "scabbard-test",
                "--logger=zap",
                "--log-level=error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn etcd")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same data dir and ports.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn("existing")
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running etcd cluster (1 or 3 members).
pub struct EtcdCluster {
    /// Its members.
    pub members: Vec<EtcdMember>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let mut m = EtcdMember {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{c}"),
                peer_url: format!("http://127.0.0.1:{p}"),
                data_dir: dir.path().join(format!("m{i}")),
                initial_cluster: initial_cluster.clone(),
                child: None,
            };
            m.spawn("new")?;
            members.push(m);
        }
        let cluster = Self { members, _dir: dir };
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Client URLs of every member, comma-separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until some member serves a linearizable read.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            for m in &self.members {
                let url = format!("{}/health", m.client_url);
                if http_get_ok(&url) {
                    return Ok(());
                }
            }
            if Instant::now() > end {
                bail!("etcd did not become healthy within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// GET over plain HTTP/1.0 on loopback; true for a 200 whose body says healthy.
fn http_get_ok(url: &str) -> bool {
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut s) = std::net::TcpStream::connect(host) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    (body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200")) && body.contains("true")
}
