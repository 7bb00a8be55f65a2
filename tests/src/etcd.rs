//! Real etcd servers for tests: the `etcd` binary (Debian `etcd-server`) on free loopback
//! ports with its own temp data dir, killed (SIGKILL) and reaped on drop. A single server
//! ([`EtcdServer`]) or a cluster ([`EtcdCluster`]) whose members can be killed and
//! restarted on the same data dir and ports. A missing `etcd` is a test failure, never a skip.
//! Waits poll etcd's `/health` with a deadline; nothing sleeps a fixed time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;

use crate::free_port;

/// How long a start or restart may take before the test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at starting with fresh ports when another process took one meanwhile.
const PORT_ATTEMPTS: usize = 3;

/// The `etcd` binary on `PATH`, or an error saying how to install it.
pub fn etcd_bin() -> Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("etcd"))
                .find(|f| f.is_file())
        })
        .ok_or_else(|| {
            anyhow!(
                "the `etcd` binary is not on PATH: these tests need a real etcd. Install it with \
                 `apt-get install etcd-server` (Debian/Ubuntu), or run scripts/setup.sh"
            )
        })
}

/// One etcd process: its URLs, data dir and log are fixed, so it restarts as the same member.
pub struct EtcdMember {
    /// Member name (`m0`, `m1`, …).
    pub name: String,
    /// Client URL (`http://127.0.0.1:<port>`).
    pub client_url: String,
    /// Peer URL (`http://127.0.0.1:<port>`).
    pub peer_url: String,
    /// etcd's `--data-dir`.
    pub data_dir: PathBuf,
    /// etcd's stderr (errors only), appended across restarts.
    pub log: PathBuf,
    initial_cluster: String,
    /// More etcd flags (e.g. `--max-txn-ops=256`).
    extra: Vec<String>,
    child: Option<Child>,
}

impl EtcdMember {
    fn new(name: String, dir: &Path, client_port: u16, peer_port: u16) -> Self {
        Self {
            client_url: format!("http://127.0.0.1:{client_port}"),
            peer_url: format!("http://127.0.0.1:{peer_port}"),
            data_dir: dir.join(format!("{name}.data")),
            log: dir.join(format!("{name}.log")),
            initial_cluster: String::new(),
            extra: Vec::new(),
            name,
            child: None,
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let child = Command::new(etcd_bin()?)
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            // Ignored once the data dir exists (a restart rejoins as the same member).
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "scabbard-test"])
            .args(["--logger=zap", "--log-level=error"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn etcd member {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process runs (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `sig` (e.g. `SIGSTOP` to freeze it, `SIGCONT`), if it runs.
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            crate::send_signal(pid as i32, sig);
        }
    }

    /// SIGKILL and reap. Nothing happens if it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills it if running, then starts it again on the same data dir and ports, without
    /// waiting (a member alone cannot become healthy when its quorum is down).
    pub fn restart_nowait(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// [`Self::restart_nowait`], then waits until this member serves linearizable reads.
    pub fn restart(&mut self) -> Result<()> {
        self.restart_nowait()?;
        self.wait_healthy(START_TIMEOUT)
    }

    /// Waits until this member answers `/health` with true (it has a leader and serves a
    /// linearizable read); fails early, with etcd's log, if the process exits.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                bail!(
                    "etcd member {} exited ({status}) while starting: {}",
                    self.name,
                    self.log_tail()
                );
            }
            if self.child.is_none() {
                bail!("etcd member {} is not running", self.name);
            }
            if health_ok(&self.client_url) {
                return Ok(());
            }
            if Instant::now() > end {
                bail!(
                    "etcd member {} at {} not healthy within {timeout:?}: {}",
                    self.name,
                    self.client_url,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The value of a Prometheus metric without labels from `/metrics` (e.g.
    /// `etcd_debugging_mvcc_watcher_total`, the number of open watches).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(&self.client_url, "/metrics")?;
        body.lines().find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// The last 2 KiB of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(2048)));
            let _ = f.read_to_string(&mut text);
        }
        if text.trim().is_empty() {
            "(etcd logged nothing)".into()
        } else {
            format!("etcd log ({}):\n{text}", self.log.display())
        }
    }

    fn port_taken(&self) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains("address already in use"))
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running etcd cluster of one or more members on loopback.
pub struct EtcdCluster {
    /// Its members, in `--initial-cluster` order.
    pub members: Vec<EtcdMember>,
    /// Holds every member's data dir and log.
    pub dir: TempDir,
}

impl EtcdCluster {
    /// Starts `n` members (`--initial-cluster` on free peer ports) and waits until every
    /// one of them is healthy.
    pub fn start(n: usize) -> Result<Self> {
        Self::start_with(n, &[])
    }

    /// [`Self::start`], every member with the etcd flags `extra` too.
    pub fn start_with(n: usize, extra: &[&str]) -> Result<Self> {
        if n == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        etcd_bin()?;
        let mut attempt = 1;
        loop {
            match Self::try_start(n, extra) {
                Ok(c) => return Ok(c),
                // Another test took a port between `free_port` and etcd's bind.
                Err((e, true)) if attempt < PORT_ATTEMPTS => {
                    eprintln!("etcd: a port was taken ({e:#}); retrying with fresh ports");
                    attempt += 1;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    fn try_start(n: usize, extra: &[&str]) -> std::result::Result<Self, (anyhow::Error, bool)> {
        let dir = tempfile::Builder::new()
            .prefix("scabbard-etcd-")
            .tempdir()
            .map_err(|e| (e.into(), false))?;
        let mut members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember::new(format!("m{i}"), dir.path(), free_port(), free_port()))
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = initial_cluster.clone();
            m.extra = extra.iter().map(|a| a.to_string()).collect();
            m.spawn().map_err(|e| (e, false))?;
        }
        let mut cluster = Self { members, dir };
        if let Err(e) = cluster.wait_healthy(START_TIMEOUT) {
            let port_taken = cluster.members.iter().any(EtcdMember::port_taken);
            return Err((e, port_taken));
        }
        Ok(cluster)
    }

    /// Client URLs of every member, comma-separated (the form `--etcd-endpoints` takes).
    pub fn endpoints(&self) -> String {
        self.endpoint_list().join(",")
    }

    /// Client URLs of every member.
    pub fn endpoint_list(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Waits until every running member is healthy.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        for m in &mut self.members {
            if m.child.is_some() {
                m.wait_healthy(end.saturating_duration_since(Instant::now()))?;
            }
        }
        Ok(())
    }

    /// SIGKILLs member `i`.
    pub fn kill9(&mut self, i: usize) {
        self.members[i].kill9();
    }

    /// Restarts member `i` on its data dir and ports and waits until it is healthy.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.members[i].restart()
    }
}

/// A single-member etcd.
pub struct EtcdServer {
    /// Client URL (`http://127.0.0.1:<port>`).
    pub client_url: String,
    /// Holds etcd's data dir and its log.
    pub data_dir: TempDir,
    member: EtcdMember,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports and waits until it serves.
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// [`Self::start`] with the etcd flags `extra` too.
    pub fn start_with(extra: &[&str]) -> Result<Self> {
        let EtcdCluster { mut members, dir } = EtcdCluster::start_with(1, extra)?;
        let member = members.remove(0);
        Ok(Self {
            client_url: member.client_url.clone(),
            data_dir: dir,
            member,
        })
    }

    /// The client URL, as an endpoint list.
    pub fn endpoints(&self) -> String {
        self.client_url.clone()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.member.pid()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.member.kill9();
    }

    /// Starts it again (killing it first if running) on the same data dir and ports, and
    /// waits until it serves.
    pub fn restart(&mut self) -> Result<()> {
        self.member.restart()
    }

    /// The member, for logs and finer control.
    pub fn member(&mut self) -> &mut EtcdMember {
        &mut self.member
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // Before the data dir goes away.
        self.member.kill9();
    }
}

/// Whether etcd at `client_url` answers `GET /health` with `"health":"true"`.
fn health_ok(client_url: &str) -> bool {
    http_get(client_url, "/health").is_some_and(|body| body.contains("\"true\""))
}

/// The body of a `200` answer to `GET <path>` over plain HTTP/1.0 on loopback.
fn http_get(client_url: &str, path: &str) -> Option<String> {
    use std::io::Write;
    let host = client_url.strip_prefix("http://")?;
    let addr = host.parse::<std::net::SocketAddr>().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    // etcd's own health check gives up after 1 s.
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    (status.starts_with("HTTP/1.") && status.contains(" 200")).then(|| body.to_string())
}

/// Several controller processes on one etcd member, sharing a logs directory (leader lease
/// 2 s, agent lease 8 s), and worker processes connected to all of them.
pub struct EtcdControllers {
    /// The etcd cluster (one member).
    pub etcd: EtcdCluster,
    /// Holds the controllers' and workers' data dirs and the shared logs dir.
    pub dir: TempDir,
    /// The controller processes.
    pub controllers: Vec<crate::Controller>,
    /// The worker processes.
    pub workers: Vec<crate::Worker>,
}

impl EtcdControllers {
    /// Starts `controllers` controllers and `workers` workers with `slots` slots each.
    pub fn start(controllers: usize, workers: usize, slots: u32) -> Result<Self> {
        let etcd = EtcdCluster::start(1)?;
        let dir = tempfile::tempdir()?;
        let opts = crate::ControllerOpts {
            lease: "8s",
            extra: vec![
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                etcd.endpoints(),
                "--logs-dir".into(),
                dir.path().join("shared-logs").display().to_string(),
                "--leader-lease-ttl".into(),
                "2s".into(),
            ],
            ..crate::ControllerOpts::default()
        };
        let mut cs = Vec::new();
        for i in 0..controllers {
            cs.push(crate::Controller::start(
                &dir.path().join(format!("c{i}")),
                free_port(),
                &opts,
            )?);
        }
        let mut c = Self {
            etcd,
            dir,
            controllers: cs,
            workers: Vec::new(),
        };
        let addrs = c.addrs();
        for i in 0..workers {
            c.workers.push(crate::Worker::start(
                &addrs,
                &c.dir.path().join(format!("w{i}")),
                &format!("w{i}"),
                slots,
            )?);
        }
        Ok(c)
    }

    /// Every controller's address, comma-separated (as `--controller` takes them).
    pub fn addrs(&self) -> String {
        self.addrs_except("")
    }

    /// Like [`addrs`](Self::addrs), without `skip`.
    pub fn addrs_except(&self, skip: &str) -> String {
        self.controllers
            .iter()
            .map(|c| c.addr.to_string())
            .filter(|a| a != skip)
            .collect::<Vec<_>>()
            .join(",")
    }
}
