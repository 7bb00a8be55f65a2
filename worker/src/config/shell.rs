//! The `[shell]` section of the worker configuration: whom shell tasks run as, and what
//! they may not see.
//!
//! With `run_as` set, every shell task runs as that unprivileged user, in its own PID
//! namespace with its own `/proc`, started through util-linux `unshare` (see
//! `executor::shell`). Resolving the section checks up front what that needs: the user
//! exists and is not root, the worker itself runs as root, and `unshare` is there. It does
//! not look at the file system: `layout` checks the directory modes once they exist.
//!
//! With `hide` set instead (for a worker that is not root, e.g. `scabbard dev`), tasks keep
//! the worker's user but run in their own user, mount and PID namespaces where the listed
//! paths are covered (an empty, unreadable directory or an empty file) and only their own
//! processes exist. Resolving checks that the paths exist and that this host lets an
//! unprivileged process create those namespaces.

use std::ffi::{CString, OsStr};
use std::io;
use std::path::{Path, PathBuf};

use scabbard_common::{Error, Result};
use serde::Deserialize;

/// `[shell]`: how shell tasks run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShellConfig {
    /// Run shell tasks as this unprivileged user: a user name (its primary group is used)
    /// or `uid[:gid]`. Each task then runs in its own PID namespace with its own `/proc`
    /// (it sees only its own processes), with no supplementary groups, in a work dir it
    /// owns (0700). The worker must run as root; the worker's data dir, identity, spool,
    /// artifact cache, configuration and other tasks' work dirs are out of the task's reach.
    /// Unset: tasks run as the worker's own user.
    pub run_as: Option<String>,
    /// Path of util-linux `unshare` (used with `run_as` and `hide`). Default: `unshare`
    /// found in PATH.
    pub unshare: Option<PathBuf>,
    /// Absolute paths that shell tasks must not see (e.g. the worker's data dir, a
    /// credentials directory): each task runs in its own user, mount and PID namespaces
    /// where they are covered, as the worker's own user, seeing only its own processes. It
    /// cannot uncover them (it holds no privilege over those mounts). For workers that do
    /// not run as root; with `run_as`, file modes already keep such files from tasks. The
    /// task's work dir must not be inside one of them.
    pub hide: Vec<PathBuf>,
}

/// A resolved `hide`: what shell tasks must not see, and how they are started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hide {
    /// Covered in each task's mount namespace.
    pub paths: Vec<PathBuf>,
    /// The worker's own user and group, which the task keeps.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Absolute path of `unshare`.
    pub unshare: PathBuf,
}

/// A resolved `run_as`: whom shell tasks run as, and the tool that starts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// As configured (for messages).
    pub user: String,
    /// The task's user id.
    pub uid: u32,
    /// The task's group id (its only group).
    pub gid: u32,
    /// Absolute path of `unshare`.
    pub unshare: PathBuf,
}

impl ShellConfig {
    /// Refuses a section that cannot work, naming the field.
    pub fn validate(&self) -> Result<()> {
        self.resolve()?;
        self.resolve_hide().map(|_| ())
    }

    /// The resolved `hide`, `None` when it is empty.
    pub fn resolve_hide(&self) -> Result<Option<Hide>> {
        if self.hide.is_empty() {
            return Ok(None);
        }
        if self.run_as.is_some() {
            return Err(Error::invalid(
                "shell.hide and shell.run_as do not go together: with run_as, the worker's \
                 private files are already out of the task user's reach (leave hide out)",
            ));
        }
        for p in &self.hide {
            if !p.is_absolute() {
                return Err(Error::invalid(format!(
                    "shell.hide: {} is not an absolute path",
                    p.display()
                )));
            }
            if std::fs::symlink_metadata(p).is_err() {
                return Err(Error::invalid(format!(
                    "shell.hide: {} does not exist (create it, or leave it out)",
                    p.display()
                )));
            }
        }
        let path = std::env::var_os("PATH");
        let unshare = match &self.unshare {
            Some(p) => p.clone(),
            None => find_in_path("unshare", path.as_deref()).ok_or_else(|| {
                Error::invalid(
                    "shell.hide needs util-linux `unshare`, which is not in PATH: install util-linux, or set shell.unshare",
                )
            })?,
        };
        if find_in_path("mount", path.as_deref()).is_none() {
            return Err(Error::invalid(
                "shell.hide needs util-linux `mount` in PATH: install mount",
            ));
        }
        // One try, now, rather than a failure in every task.
        let probe = std::process::Command::new(&unshare)
            .args([
                "--user",
                "--map-root-user",
                "--mount",
                "--pid",
                "--fork",
                "true",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(|e| {
                Error::invalid(format!("shell.hide: cannot run {}: {e}", unshare.display()))
            })?;
        if !probe.status.success() {
            return Err(Error::invalid(format!(
                "shell.hide needs unprivileged user namespaces, which this host refuses ({}): \
                 enable them (sysctl kernel.unprivileged_userns_clone=1, or \
                 user.max_user_namespaces > 0), or run the worker as root with shell.run_as",
                String::from_utf8_lossy(&probe.stderr).trim()
            )));
        }
        Ok(Some(Hide {
            paths: self.hide.clone(),
            uid: real_uid(),
            gid: real_gid(),
            unshare,
        }))
    }

    /// The resolved `run_as`, `None` when shell tasks run as the worker's user.
    pub fn resolve(&self) -> Result<Option<RunAs>> {
        self.resolve_with(effective_uid(), std::env::var_os("PATH").as_deref())
    }

    /// [`Self::resolve`] for a worker running as `euid` with `path` as its PATH.
    fn resolve_with(&self, euid: u32, path: Option<&OsStr>) -> Result<Option<RunAs>> {
        let Some(spec) = self.run_as.as_deref() else {
            return Ok(None);
        };
        let bad = |why: String| Err(Error::invalid(format!("shell.run_as {why}")));
        let spec = spec.trim();
        if spec.is_empty() {
            return bad(
                "must not be empty (leave it out to run shell tasks as the worker's user)".into(),
            );
        }
        let (uid, gid) = match parse_ids(spec) {
            Some((uid, Some(gid))) => (uid, gid),
            Some((uid, None)) => match lookup_uid(uid) {
                Ok(Some((_, gid))) => (uid, gid),
                // A uid without a passwd entry: its group is the same number.
                Ok(None) => (uid, uid),
                Err(e) => return bad(format!("{spec:?}: cannot look the user up: {e}")),
            },
            None => match lookup_name(spec) {
                Ok(Some(ids)) => ids,
                Ok(None) => return bad(format!("{spec:?}: no such user on this host")),
                Err(e) => return bad(format!("{spec:?}: cannot look the user up: {e}")),
            },
        };
        if uid == 0 || gid == 0 {
            return bad(format!(
                "must be an unprivileged user, got {spec:?} (uid {uid}, gid {gid})"
            ));
        }
        if euid != 0 {
            return bad(format!(
                "= {spec:?} needs the worker to run as root (it starts each task as that user in its own PID namespace); this worker runs as uid {euid}"
            ));
        }
        let unshare = match &self.unshare {
            Some(p) if !p.is_absolute() => {
                return Err(Error::invalid(format!(
                    "shell.unshare must be an absolute path, got {}",
                    p.display()
                )));
            }
            Some(p) if !is_executable(p) => {
                return Err(Error::invalid(format!(
                    "shell.unshare: {} is not an executable file (install util-linux)",
                    p.display()
                )));
            }
            Some(p) => p.clone(),
            None => match find_in_path("unshare", path) {
                Some(p) => p,
                None => {
                    return bad(
                        "needs util-linux `unshare`, which is not in PATH: install util-linux, or set shell.unshare to its path".into(),
                    );
                }
            },
        };
        Ok(Some(RunAs {
            user: spec.to_string(),
            uid,
            gid,
            unshare,
        }))
    }
}

/// `uid` or `uid:gid`, all digits.
fn parse_ids(spec: &str) -> Option<(u32, Option<u32>)> {
    let (uid, gid) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let uid = uid.parse().ok()?;
    let gid = match gid {
        Some(g) => Some(g.parse().ok()?),
        None => None,
    };
    Some((uid, gid))
}

/// The effective user id of this process.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid() has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

/// The real user id of this process.
fn real_uid() -> u32 {
    // SAFETY: getuid() has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::getuid()
    }
}

/// The real group id of this process.
fn real_gid() -> u32 {
    // SAFETY: getgid() has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::getgid()
    }
}

/// (uid, primary gid) of a user name, through the system's user database (NSS).
fn lookup_name(name: &str) -> io::Result<Option<(u32, u32)>> {
    let name = CString::new(name).map_err(|_| io::Error::other("the name contains a NUL"))?;
    lookup(|pwd, buf, result| {
        // SAFETY: every pointer is valid for the call: `name` is a NUL-terminated string,
        // `pwd` and `result` point to live locals, `buf` to `buf.len()` writable bytes.
        #[allow(unsafe_code)]
        unsafe {
            libc::getpwnam_r(name.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), result)
        }
    })
}

/// (uid, primary gid) of a user id, if it has a passwd entry.
fn lookup_uid(uid: u32) -> io::Result<Option<(u32, u32)>> {
    lookup(|pwd, buf, result| {
        // SAFETY: as in `lookup_name`.
        #[allow(unsafe_code)]
        unsafe {
            libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), result)
        }
    })
}

/// Calls a `getpw*_r` function with a growing buffer; (uid, gid) of the entry found.
fn lookup(
    mut call: impl FnMut(*mut libc::passwd, &mut [libc::c_char], *mut *mut libc::passwd) -> libc::c_int,
) -> io::Result<Option<(u32, u32)>> {
    let mut size = 4096;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: `passwd` is plain old data; all-zero is a valid (if meaningless) value,
        // overwritten by the call before it is read.
        #[allow(unsafe_code)]
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, &mut buf, &mut result);
        if rc == libc::ERANGE && size < (1 << 20) {
            size *= 4;
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some((pwd.pw_uid, pwd.pw_gid)));
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `program` in the directories of `path` (a PATH value).
fn find_in_path(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_absolute() && is_executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> Option<&'static OsStr> {
        Some(OsStr::new("/usr/local/bin:/usr/bin:/bin"))
    }

    fn section(run_as: &str) -> ShellConfig {
        ShellConfig {
            run_as: Some(run_as.into()),
            unshare: None,
            hide: Vec::new(),
        }
    }

    #[test]
    fn names_and_ids_resolve() {
        let r = section("nobody").resolve_with(0, path()).unwrap().unwrap();
        assert_eq!((r.uid, r.gid), (65534, 65534));
        assert!(r.unshare.is_absolute() && r.unshare.ends_with("unshare"));
        let r = section("1234:2345")
            .resolve_with(0, path())
            .unwrap()
            .unwrap();
        assert_eq!((r.uid, r.gid), (1234, 2345));
        // A uid without an entry keeps its own number as the group.
        let r = section("54321").resolve_with(0, path()).unwrap().unwrap();
        assert_eq!((r.uid, r.gid), (54321, 54321));
        let r = section("65534").resolve_with(0, path()).unwrap().unwrap();
        assert_eq!((r.uid, r.gid), (65534, 65534));
        assert_eq!(
            ShellConfig::default().resolve_with(1000, path()).unwrap(),
            None
        );
    }

    #[test]
    fn errors_name_the_field_and_the_reason() {
        let cases = [
            (section("no-such-user-here"), 0, "no such user"),
            (section("root"), 0, "unprivileged"),
            (section("0"), 0, "unprivileged"),
            (section("1000:0"), 0, "unprivileged"),
            (section(""), 0, "must not be empty"),
            (section("nobody"), 1000, "needs the worker to run as root"),
            (
                ShellConfig {
                    run_as: Some("nobody".into()),
                    unshare: Some("/nonexistent/unshare".into()),
                    hide: Vec::new(),
                },
                0,
                "shell.unshare: /nonexistent/unshare is not an executable",
            ),
            (
                ShellConfig {
                    run_as: Some("nobody".into()),
                    unshare: Some("unshare".into()),
                    hide: Vec::new(),
                },
                0,
                "shell.unshare must be an absolute path",
            ),
        ];
        for (cfg, euid, want) in cases {
            let err = cfg.resolve_with(euid, path()).unwrap_err().to_string();
            assert!(err.contains(want), "{cfg:?}: {err}");
            assert!(err.contains("shell."), "{err}");
        }
    }

    #[test]
    fn a_missing_unshare_is_named() {
        // A PATH without util-linux: the message says what to install.
        let err = section("nobody")
            .resolve_with(0, Some(OsStr::new("/nonexistent:/also-not-here")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`unshare`") && err.contains("util-linux"),
            "{err}"
        );
    }
}
