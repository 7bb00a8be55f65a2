//! Starting a shell task as another user, isolated from the worker and from other tasks:
//! util-linux `unshare` puts the command in a new PID namespace with its own `/proc` (it
//! sees only its own processes, so no other task's `/proc/<pid>/environ`), drops to the
//! task user's uid and gid with no supplementary groups, and, with `--kill-child`, takes the
//! command down if it dies. The namespace ends with its first process: whatever the task
//! left running, even outside its process group, is killed by the kernel.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::config::{Hide, RunAs};
use crate::layout::{allows, first_untraversable};

/// `argv` run as `r` in its own PID namespace with its own `/proc`, through `unshare`.
pub(super) fn command(r: &RunAs, argv: &[String]) -> Command {
    let mut cmd = Command::new(&r.unshare);
    cmd.args([
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--setuid",
        &r.uid.to_string(),
        "--setgid",
        &r.gid.to_string(),
        "--",
    ])
    .args(argv);
    cmd
}

/// Covers each path given before `--` (a directory with an empty, unreadable tmpfs, a file
/// with /dev/null), then runs the rest. Run as root of a new user namespace, in a new mount
/// namespace it owns.
const COVER: &str = r#"set -e
while [ "$1" != -- ]; do
  if [ -d "$1" ]; then
    mount -t tmpfs -o mode=000,size=4k,nosuid,nodev,noexec scabbard-hidden "$1"
  else
    mount --bind /dev/null "$1"
  fi
  shift
done
shift
exec "$@"
"#;

/// `argv` run in its own user, mount and PID namespaces (its own `/proc`) where `h.paths`
/// are covered. The covering is done as root of a first user namespace; the task then runs
/// in a second one nested in it, as the worker's uid and gid: it has no privilege over the
/// covering mounts (and mounts inherited into any namespace it makes are locked), so it
/// cannot uncover them, and it sees no process but its own.
pub(super) fn hidden_command(h: &Hide, argv: &[String]) -> Command {
    let mut cmd = Command::new(&h.unshare);
    cmd.args([
        "--user",
        "--map-root-user",
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "--",
        "/bin/sh",
        "-c",
        COVER,
        "scabbard-hide",
    ])
    .args(&h.paths)
    .arg("--")
    .arg(&h.unshare)
    .args([
        "--user",
        &format!("--map-user={}", h.uid),
        &format!("--map-group={}", h.gid),
        "--",
    ])
    .args(argv);
    cmd
}

/// Where `program` is for `r`: itself when it holds a '/', else the first file in `path`
/// that `r` may reach and execute (blocking).
pub(super) fn find_program(program: &str, path: &OsStr, r: &RunAs) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::split_paths(path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|candidate| executable_by(candidate, r))
}

fn executable_by(p: &Path, r: &RunAs) -> bool {
    let Ok(meta) = std::fs::metadata(p) else {
        return false;
    };
    meta.is_file()
        && allows(&meta, r, 1)
        && p.parent()
            .is_some_and(|dir| matches!(first_untraversable(dir, r), Ok(None)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_as_the_task_user() {
        let nobody = RunAs {
            user: "nobody".into(),
            uid: 65534,
            gid: 65534,
            unshare: "/usr/bin/unshare".into(),
        };
        let d = tempfile::tempdir().unwrap();
        let private = d.path().join("private");
        std::fs::create_dir(&private).unwrap();
        let tool = private.join("sh");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        // The worker's own directory comes first in PATH, but nobody cannot enter it.
        let path =
            std::env::join_paths([private.as_path(), Path::new("/usr/bin"), Path::new("/bin")])
                .unwrap();
        let found = find_program("sh", &path, &nobody).unwrap();
        assert!(
            found == Path::new("/usr/bin/sh") || found == Path::new("/bin/sh"),
            "{found:?}"
        );
        assert_eq!(find_program("no-such-tool-here", &path, &nobody), None);
        assert_eq!(
            find_program("./local.sh", &path, &nobody),
            Some(PathBuf::from("./local.sh"))
        );
    }
}
