//! The process group of a shell attempt: making the child the leader of its own session
//! (and tying its life to the worker's), starting it (riding out a busy executable),
//! signalling every process in the group, and telling when the group is gone. Nothing here
//! knows about output or outcomes.

use std::io;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use tokio::time::{Instant, sleep};

/// Kills the whole process group if `run` is dropped before it finished.
pub(in crate::executor) struct GroupGuard(pub(in crate::executor) Option<libc::pid_t>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            signal_group(pgid, libc::SIGKILL);
        }
    }
}

/// Makes the child the leader of a new session and process group, and has the kernel
/// SIGKILL it if the worker dies.
pub(in crate::executor) fn own_process_group(cmd: &mut std::process::Command) {
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (setsid, prctl, getppid); it allocates nothing.
    // PR_SET_PDEATHSIG fires when the *thread* that forked dies: spawns happen on runtime
    // threads, which live as long as the worker.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The worker may have died between fork and prctl: then nobody is left to kill us.
            if libc::getppid() != parent {
                return Err(io::Error::other("the worker exited"));
            }
            Ok(())
        });
    }
}

/// How long a spawn keeps retrying an executable that is busy being written.
const BUSY_RETRY: Duration = Duration::from_secs(2);

/// Spawns `cmd`, retrying for a moment while the kernel says the executable is busy
/// (`ETXTBSY`). That happens when the file was just written, by a package upgrade replacing
/// the `dagger` CLI, or when another thread forked while holding it open for writing: the
/// fork keeps the descriptor until it execs. Any other error is returned at once.
pub(in crate::executor) async fn spawn_when_not_busy(
    cmd: &mut tokio::process::Command,
) -> io::Result<tokio::process::Child> {
    let deadline = Instant::now() + BUSY_RETRY;
    let mut pause = Duration::from_millis(5);
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

/// Sends `signal` to every process of the group; a group that is already gone is fine.
pub(in crate::executor) fn signal_group(pgid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill() has no memory-safety preconditions; a negative pid targets the group.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(-pgid, signal) };
    if rc == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal, error = %e, "cannot signal process group");
        }
    }
}

/// Whether a live process is left in the group. Zombies do not count: they hold nothing,
/// and an init that reaps orphans slowly (as in some containers) must not delay us.
fn group_alive(pgid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks for existence; no memory is involved.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(-pgid, 0) };
    if rc == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    procs.flatten().any(|entry| {
        // `pid (comm) state ppid pgrp ...`; comm may contain anything, even ')'.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        let mut fields = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace();
        let (state, pgrp) = (fields.next(), fields.nth(1));
        state != Some("Z") && pgrp.and_then(|p| p.parse().ok()) == Some(pgid)
    })
}

/// Polls until the group is empty or `deadline` passes; true if it is gone.
pub(in crate::executor) async fn wait_group_gone(pgid: libc::pid_t, deadline: Instant) -> bool {
    loop {
        if !group_alive(pgid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(10)).await;
    }
}
