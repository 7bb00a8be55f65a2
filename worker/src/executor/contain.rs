//! Containment of every process an attempt starts, including those that leave its process
//! group and session (`setsid sh -c '…' &`, double forks): they die with the attempt, with
//! the worker, and, after a `kill -9` of the worker, at its next start at the latest.
//!
//! With a writable cgroup v2 hierarchy (found through `/proc/self/mountinfo` and
//! `/proc/self/cgroup`) each attempt runs in its own cgroup,
//! `<worker's cgroup>/scabbard-<hash of the data dir>-<pid>/<task>-<token>`: the child enters it
//! between fork and exec, so nothing it starts can be outside. The end of the attempt
//! writes `cgroup.kill` (or SIGKILLs its `cgroup.procs` until empty, before Linux 5.14).
//! A sentinel process (`sh` reading a pipe only the worker holds) kills the whole
//! `scabbard-<hash>` tree when the worker dies, whatever killed it.
//!
//! Without cgroup v2 the worker becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`):
//! orphans re-parent to it rather than to init. The attempt's processes are then found by
//! the variables every task process inherits (`SCABBARD_TASK_ID`, `SCABBARD_ATTEMPT`),
//! killed at the end of the attempt, and reaped. A process that clears its environment
//! escapes this fallback (it cannot escape a cgroup).
//!
//! Either way, each attempt leaves a record in `<data_dir>/attempts/` (its cgroup, its
//! process group leader's pid and start time, its marker) while it runs. A worker that was
//! killed cannot clean up; the next one reads the records at start and kills what they name,
//! comparing start times so a reused pid is never signalled.
//!
//! This module only finds, kills and reaps processes; it knows nothing of outputs.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::{Instant, sleep};

/// How long a kill waits for the processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The worker's means of containing attempts; one per worker process.
#[derive(Debug)]
pub struct Containment {
    /// Parent of the attempts' cgroups, when cgroup v2 is usable.
    base: Option<PathBuf>,
    /// `<data_dir>/attempts`: one record per attempt that runs.
    records: PathBuf,
    /// Kills `base` when the worker dies (its stdin is a pipe only the worker holds).
    sentinel: Mutex<Option<std::process::Child>>,
}

/// One attempt's containment: dropping it kills whatever is left of the attempt.
#[derive(Debug)]
pub(crate) struct Cage {
    cgroup: Option<PathBuf>,
    /// `cgroup.procs` of `cgroup`, opened for the child to write itself into.
    procs: Option<OwnedFd>,
    record: PathBuf,
    marker: Marker,
}

/// The variables that mark an attempt's processes (fallback without cgroups).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Marker {
    task: Vec<u8>,
    attempt: Vec<u8>,
}

impl Marker {
    fn new(task_id: &str, attempt: u32) -> Self {
        Self {
            task: format!("SCABBARD_TASK_ID={task_id}").into_bytes(),
            attempt: format!("SCABBARD_ATTEMPT={attempt}").into_bytes(),
        }
    }

    fn matches(&self, environ: &[u8]) -> bool {
        let mut vars = environ.split(|b| *b == 0);
        let (mut task, mut attempt) = (false, false);
        for v in &mut vars {
            task |= v == self.task.as_slice();
            attempt |= v == self.attempt.as_slice();
        }
        task && attempt
    }
}

impl Containment {
    /// Sets up containment for a worker whose data dir is `data_dir` and kills what a
    /// previous life of this worker left running (blocking).
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        Self::open_with(data_dir, true)
    }

    /// [`Containment::open`], without cgroups unless `cgroups`.
    fn open_with(data_dir: &Path, cgroups: bool) -> io::Result<Self> {
        let records = data_dir.join("attempts");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&records)?;
        let base = match cgroup_base(data_dir).and_then(|b| {
            if cgroups {
                Ok(b)
            } else {
                let _ = fs::remove_dir(&b);
                Err(io::Error::other("not asked to"))
            }
        }) {
            Ok(base) => Some(base),
            Err(e) => {
                tracing::info!(error = %e, "no usable cgroup v2: attempts' processes are found by their environment, the worker is their subreaper");
                None
            }
        };
        let left = clean_leftovers(&records, base.as_deref());
        if left > 0 {
            tracing::warn!(
                processes = left,
                "killed processes a previous run of this worker left behind"
            );
        }
        let sentinel = match &base {
            Some(base) => match start_sentinel(base) {
                Ok(child) => Some(child),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the sentinel that kills tasks if the worker dies");
                    None
                }
            },
            None => {
                set_subreaper();
                None
            }
        };
        Ok(Self {
            base,
            records,
            sentinel: Mutex::new(sentinel),
        })
    }

    /// Whether attempts get their own cgroup.
    pub fn uses_cgroups(&self) -> bool {
        self.base.is_some()
    }

    /// The containment of one attempt, recorded on disk until it is dropped.
    pub(crate) fn cage(&self, task_id: &str, token: u64, attempt: u32) -> io::Result<Cage> {
        let name = format!("{}-{token}", super::safe_name(task_id));
        let marker = Marker::new(task_id, attempt);
        let record = self.records.join(&name);
        let (cgroup, procs) = match &self.base {
            Some(base) => {
                let dir = base.join(&name);
                if dir.exists() {
                    kill_cgroup_now(&dir);
                    let _ = fs::remove_dir(&dir);
                }
                fs::create_dir(&dir)?;
                let procs = fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(dir.join("cgroup.procs"))?;
                (Some(dir), Some(OwnedFd::from(procs)))
            }
            None => (None, None),
        };
        let cage = Cage {
            cgroup,
            procs,
            record,
            marker,
        };
        cage.write_record(None)?;
        Ok(cage)
    }
}

impl Drop for Containment {
    fn drop(&mut self) {
        let sentinel = self
            .sentinel
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut child) = sentinel {
            // Closing its stdin lets it run (there is nothing left to kill) and exit.
            drop(child.stdin.take());
            let _ = child.wait();
        }
        if let Some(base) = &self.base {
            let _ = fs::remove_dir(base); // kept while a cage is alive
        }
    }
}

impl Cage {
    /// Makes the child enter the attempt's cgroup before it execs.
    pub(crate) fn enter_on_exec(&self, cmd: &mut std::process::Command) {
        if let Some(procs) = &self.procs {
            enter_on_exec(cmd, procs);
        }
    }

    // SAFETY: the closure runs in the forked child before exec and only calls write(2),
    // which is async-signal-safe, on a descriptor the parent keeps open until the spawn
    // returned; it allocates nothing.
    /// Records the attempt's process group leader (for a worker that restarts).
    pub(crate) fn note_leader(&self, pgid: libc::pid_t) {
        let start = start_time(pgid);
        if let Err(e) = self.write_record(start.map(|s| (pgid, s))) {
            tracing::warn!(record = %self.record.display(), error = %e, "cannot record the attempt's processes");
        }
    }

    fn write_record(&self, leader: Option<(libc::pid_t, u64)>) -> io::Result<()> {
        let mut text = String::new();
        if let Some(cg) = &self.cgroup {
            text.push_str(&format!("cgroup {}\n", cg.display()));
        }
        if let Some((pid, start)) = leader {
            text.push_str(&format!("pgid {pid} {start}\n"));
        }
        text.push_str("marker ");
        text.push_str(&hex(&self.marker.task));
        text.push(' ');
        text.push_str(&hex(&self.marker.attempt));
        text.push('\n');
        let tmp = self.record.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &self.record)
    }

    /// Kills every process of the attempt and waits (bounded) until they are gone; true
    /// if none is left.
    pub(crate) async fn kill_all(&self) -> bool {
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let left = match &self.cgroup {
                Some(cg) => {
                    kill_cgroup_now(cg);
                    cgroup_populated(cg)
                }
                None => kill_marked_now(&self.marker) > 0,
            };
            if !left {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Cage {
    fn drop(&mut self) {
        // Normally `kill_all` ran already and this finds nothing.
        match &self.cgroup {
            Some(cg) => {
                kill_cgroup_now(cg);
                let deadline = std::time::Instant::now() + KILL_WAIT;
                while cgroup_populated(cg) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if let Err(e) = fs::remove_dir(cg) {
                    tracing::warn!(cgroup = %cg.display(), error = %e, "cannot remove the attempt's cgroup");
                }
            }
            None => {
                kill_marked_now(&self.marker);
            }
        }
        let _ = fs::remove_file(&self.record);
    }
}

/// Has the child of `cmd` write itself into the cgroup whose `cgroup.procs` is `procs`
/// before it execs; `procs` must stay open until the spawn returned.
fn enter_on_exec(cmd: &mut std::process::Command, procs: &OwnedFd) {
    let fd = procs.as_raw_fd();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only calls write(2),
    // which is async-signal-safe, on a descriptor the parent keeps open until the spawn
    // returned; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let b = b"0";
            if libc::write(fd, b.as_ptr().cast(), b.len()) != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `<cgroup v2 mount><worker's cgroup>/scabbard-<hash>`, created and checked usable.
fn cgroup_base(data_dir: &Path) -> io::Result<PathBuf> {
    let own = own_cgroup_dir()?;
    let data = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let digest = Sha256::digest(data.as_os_str().as_encoded_bytes());
    // One per life of the worker: a dying life's sentinel only ever touches its own.
    let prefix = format!("scabbard-{}-", hex(&digest[..8]));
    let base = own.join(format!("{prefix}{}", std::process::id()));
    clean_old_bases(&own, &prefix, &base);
    match fs::create_dir(&base) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    // A process must be able to enter a cgroup below it.
    let probe = base.join("probe");
    if probe.exists() {
        kill_cgroup_now(&probe);
        let _ = fs::remove_dir(&probe);
    }
    fs::create_dir(&probe)?;
    let tried = (|| {
        let procs = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(probe.join("cgroup.procs"))?;
        let procs = OwnedFd::from(procs);
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", ":"]);
        enter_on_exec(&mut cmd, &procs);
        let status = cmd.status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("probe exited with {status}")))
        }
    })();
    let _ = fs::remove_dir(&probe);
    tried.map(|()| base)
}

/// The directory of this process's cgroup in the cgroup v2 hierarchy.
fn own_cgroup_dir() -> io::Result<PathBuf> {
    let cgroups = fs::read_to_string("/proc/self/cgroup")?;
    let own = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::other("no cgroup v2 entry in /proc/self/cgroup"))?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let Some(rel) = own.strip_prefix(root.trim_end_matches('/')) else {
            continue;
        };
        let dir = Path::new(point).join(rel.trim_start_matches('/'));
        if dir.join("cgroup.procs").exists() {
            return Ok(dir);
        }
    }
    Err(io::Error::other("no cgroup v2 hierarchy is mounted"))
}

/// `sh`, in its own session, waiting for EOF on a pipe only the worker holds, then killing
/// every attempt cgroup.
fn start_sentinel(base: &Path) -> io::Result<std::process::Child> {
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args([
        "-c",
        // Once the worker is gone: kill every attempt, then remove the emptied cgroups
        // (retrying while the kernel takes the processes down).
        "read -r _ignored; echo 1 > \"$0/cgroup.kill\" 2>/dev/null; \
         for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do \
           for c in \"$0\"/*/; do [ -f \"$c/cgroup.procs\" ] && rmdir \"$c\" 2>/dev/null; done; \
           rmdir \"$0\" 2>/dev/null && exit 0; sleep 0.1; \
         done",
    ])
    .arg(base)
    .env_clear()
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    #[allow(unsafe_code)]
    // SAFETY: setsid(2) is async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
}

fn set_subreaper() {
    #[allow(unsafe_code)]
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
    if rc == -1 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot become a child subreaper");
    }
}

/// Kills every process in `cg` (and below) without waiting.
fn kill_cgroup_now(cg: &Path) {
    if fs::write(cg.join("cgroup.kill"), b"1").is_ok() {
        return;
    }
    // Before Linux 5.14: one by one (a fork racing with this is caught by the next round).
    for pid in cgroup_pids(cg) {
        signal(pid, libc::SIGKILL);
    }
}

fn cgroup_pids(cg: &Path) -> Vec<libc::pid_t> {
    fs::read_to_string(cg.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether a process is left in `cg` or below.
fn cgroup_populated(cg: &Path) -> bool {
    match fs::read_to_string(cg.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l == "populated 1"),
        Err(_) => !cgroup_pids(cg).is_empty(),
    }
}

fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill() has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, sig);
    }
}

/// What `/proc/<pid>/stat` says: (state, ppid, pgrp, start time in clock ticks).
fn stat(pid: libc::pid_t) -> Option<(char, libc::pid_t, libc::pid_t, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f.first()?.chars().next()?,
        f.get(1)?.parse().ok()?,
        f.get(2)?.parse().ok()?,
        f.get(19)?.parse().ok()?,
    ))
}

fn start_time(pid: libc::pid_t) -> Option<u64> {
    stat(pid).map(|s| s.3)
}

fn all_pids() -> Vec<libc::pid_t> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every live process carrying `marker` in its environment and reaps those that
/// were re-parented to the worker; returns how many were alive.
fn kill_marked_now(marker: &Marker) -> usize {
    let me = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    let mut alive = 0;
    for pid in all_pids() {
        if pid == me {
            continue;
        }
        let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !marker.matches(&environ) {
            continue;
        }
        let Some((state, ppid, _, _)) = stat(pid) else {
            continue;
        };
        if state == 'Z' {
            continue;
        }
        alive += 1;
        signal(pid, libc::SIGKILL);
        if ppid == me {
            // An orphan adopted by this (subreaper) worker: reap it once it died. Our own
            // direct children are reaped by whoever waits for them (they are never marked
            // orphans: the executor waits for its child before this runs).
            reap_soon(pid);
        }
    }
    alive
}

/// Reaps `pid` (a child of this process) within a moment, without blocking on it.
fn reap_soon(pid: libc::pid_t) {
    for _ in 0..100 {
        let mut status = 0;
        // SAFETY: waitpid writes only to `status`.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc != 0 {
            return; // reaped, or not ours
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Kills what the records of a previous life name; returns how many processes it found.
fn clean_leftovers(records: &Path, base: Option<&Path>) -> usize {
    let mut found = 0;
    let Ok(entries) = fs::read_dir(records) else {
        return 0;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let text = fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines() {
            let mut f = line.split_whitespace();
            match (f.next(), f.next(), f.next()) {
                (Some("cgroup"), Some(cg), None) => {
                    let cg = Path::new(cg);
                    // Only an attempt cgroup of this worker (any life of it).
                    if base.is_some_and(|b| same_worker(cg, b)) && cg.exists() {
                        found += cgroup_pids(cg).len();
                        kill_cgroup_now(cg);
                    }
                }
                (Some("pgid"), Some(pgid), Some(start)) => {
                    let (Ok(pgid), Ok(start)) = (pgid.parse(), start.parse::<u64>()) else {
                        continue;
                    };
                    found += kill_old_group(pgid, start);
                }
                (Some("marker"), Some(task), Some(attempt)) => {
                    if let (Some(task), Some(attempt)) = (unhex(task), unhex(attempt)) {
                        found += kill_marked_now(&Marker { task, attempt });
                    }
                }
                _ => {}
            }
        }
        let _ = fs::remove_file(&path);
    }
    found
}

/// Whether `cg` is an attempt cgroup of a life of the worker whose base is `base`
/// (`<own>/scabbard-<hash>-<pid>`): `<own>/scabbard-<hash>-<any pid>/<attempt>`.
fn same_worker(cg: &Path, base: &Path) -> bool {
    let (Some(own), Some(name)) = (base.parent(), base.file_name().and_then(|n| n.to_str())) else {
        return false;
    };
    let Some((prefix, _pid)) = name.rsplit_once('-') else {
        return false;
    };
    cg.parent().is_some_and(|life| {
        life.parent() == Some(own)
            && life
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n[prefix.len()..].starts_with('-'))
    })
}

/// Kills and removes the attempt cgroups of earlier lives of this worker (`<own>/<prefix>*`
/// other than `current`), recorded or not.
fn clean_old_bases(own: &Path, prefix: &str, current: &Path) {
    let Ok(entries) = fs::read_dir(own) else {
        return;
    };
    for e in entries.flatten() {
        let old = e.path();
        let ours = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix));
        if !ours || old == current || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        kill_cgroup_now(&old);
        let deadline = std::time::Instant::now() + KILL_WAIT;
        while cgroup_populated(&old) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Ok(dirs) = fs::read_dir(&old) {
            for d in dirs.flatten() {
                if d.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(d.path());
                }
            }
        }
        let _ = fs::remove_dir(&old);
    }
}

/// SIGKILLs the members of process group `pgid` that a previous life started: those that
/// began no earlier than its leader (`start`), unless the leader's pid now belongs to
/// another process (a reused pid).
fn kill_old_group(pgid: libc::pid_t, start: u64) -> usize {
    if let Some((_, _, _, now)) = stat(pgid)
        && now != start
    {
        return 0; // the pid was reused: not ours
    }
    let mut found = 0;
    for pid in all_pids() {
        if let Some((state, _, pgrp, began)) = stat(pid)
            && pgrp == pgid
            && began >= start
            && state != 'Z'
        {
            found += 1;
            signal(pid, libc::SIGKILL);
        }
    }
    found
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// For tests: whether a process with this pid is alive (not a zombie).
#[cfg(test)]
pub(crate) fn alive(pid: libc::pid_t) -> bool {
    stat(pid).is_some_and(|s| s.0 != 'Z')
}

#[cfg(test)]
mod tests;
