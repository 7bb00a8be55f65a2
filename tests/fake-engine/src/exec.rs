//! Running one exec's argv as a host process inside a prepared root.
//!
//! The process is started through util-linux `unshare --pid --fork --kill-child
//! --root=<root> --wd=<workdir>` (plus `--map-root-user` when we are not root): it sees the
//! root as `/`, runs as PID 1 of its own PID namespace, and when it exits — or when we kill
//! `unshare` — the kernel kills everything it left behind. Nothing outlives an exec, as in
//! a BuildKit container. The environment is exactly the container's.
//!
//! While it runs, each output line goes to the session's stderr as `[exec <label>] <line>`
//! and to a capture file (unless redirected into a container file). `/dev/null`, `zero`,
//! `random` and `urandom` exist during the exec only (root only; they are not part of the
//! result). A program that is not in the root is exit code 127 with a shell-like message.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::engine::Engine;
use crate::error::{Context, Failure};
use crate::fsutil::resolve_in_root;
use crate::object::absolute;

/// Longest progress line; longer lines are split.
const MAX_LINE: usize = 16 * 1024;

/// Where an output stream goes.
pub(crate) enum Sink {
    /// Captured into this host file (and streamed as progress).
    Capture(PathBuf),
    /// Written straight into this host file (a container file).
    Redirect(PathBuf),
}

/// One process to run.
pub(crate) struct Run<'a> {
    pub(crate) root: &'a Path,
    pub(crate) argv: &'a [String],
    pub(crate) env: Vec<(String, String)>,
    /// Absolute container path; it exists in the root.
    pub(crate) workdir: &'a str,
    pub(crate) user: Option<(u32, u32)>,
    pub(crate) stdin: Option<&'a str>,
    pub(crate) stdout: Sink,
    pub(crate) stderr: Sink,
    /// Prefix of progress lines.
    pub(crate) label: &'a str,
}

/// Runs `run` to its end; returns its exit code (128 + signal when killed by one). Fails
/// only if the process cannot be run at all, or the session shuts down meanwhile.
pub(crate) fn run(engine: &Engine, run: Run<'_>) -> Result<i32, Failure> {
    let Some(program) = run.argv.first() else {
        return Err(Failure::engine(
            "fake engine: withExec needs at least one argument (no default command is modelled)",
        ));
    };
    let path_var = run
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    if !findable(run.root, program, run.workdir, path_var) {
        let message = format!("{program}: not found\n");
        write_sink(&run.stderr, message.as_bytes())?;
        engine.progress(&format!("[exec {}] {}", run.label, message.trim_end()));
        touch_sink(&run.stdout)?;
        return Ok(127);
    }
    if !engine.isolation.root && run.user.is_some_and(|u| u != (0, 0)) {
        return Err(Failure::engine(
            "fake engine: withUser needs the engine to run as root (unprivileged, only root is mapped)",
        ));
    }
    let devices = Devices::create(run.root, engine.isolation.root);
    let code = engine.handle.block_on(spawn_and_wait(engine, &run));
    drop(devices);
    code
}

/// Whether `program` names an executable file in the root (directly, or through `PATH`).
fn findable(root: &Path, program: &str, workdir: &str, path_var: &str) -> bool {
    let executable = |container_path: &str| {
        resolve_in_root(root, container_path, true)
            .ok()
            .and_then(|p| fs::metadata(p).ok())
            .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return executable(&absolute(workdir, program));
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .any(|dir| executable(&absolute(&absolute(workdir, dir), program)))
}

async fn spawn_and_wait(engine: &Engine, run: &Run<'_>) -> Result<i32, Failure> {
    let mut cmd = tokio::process::Command::new(&engine.isolation.unshare);
    if !engine.isolation.root {
        cmd.arg("--map-root-user");
    }
    cmd.args(["--pid", "--fork", "--kill-child"])
        .arg(format!("--root={}", run.root.display()))
        .arg(format!("--wd={}", run.workdir));
    if let Some((uid, gid)) = run.user {
        cmd.arg(format!("--setuid={uid}"))
            .arg(format!("--setgid={gid}"));
    }
    cmd.arg("--")
        .args(run.argv)
        .env_clear()
        .envs(run.env.iter().map(|(k, v)| (k, v)))
        .stdin(if run.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(stdio_for(&run.stdout)?)
        .stderr(stdio_for(&run.stderr)?)
        .kill_on_drop(true);
    die_with_parent(cmd.as_std_mut());
    let mut child = cmd.spawn().map_err(|e| {
        Failure::engine(format!(
            "fake engine: cannot run {} (util-linux): {e}",
            engine.isolation.unshare.display()
        ))
    })?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let feed = async {
        if let (Some(mut pipe), Some(text)) = (stdin, run.stdin) {
            // The process may exit without reading: a broken pipe is its business.
            let _ = pipe.write_all(text.as_bytes()).await;
        }
    };
    let out = pump(engine, run.label, stdout, &run.stdout);
    let err = pump(engine, run.label, stderr, &run.stderr);
    let wait = async {
        tokio::select! {
            status = child.wait() => status.map(Some),
            () = engine.shutdown.cancelled() => {
                // Killing unshare kills its child (--kill-child), and with it the namespace.
                let _ = child.start_kill();
                child.wait().await.map(|_| None)
            }
        }
    };
    let (status, out, err, ()) = tokio::join!(wait, out, err, feed);
    out?;
    err?;
    match status.context(|| "waiting for an exec".into())? {
        Some(status) => {
            use std::os::unix::process::ExitStatusExt;
            Ok(status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(1))
        }
        None => Err(Failure::engine(
            "fake engine: the session is shutting down; the exec was killed",
        )),
    }
}

fn stdio_for(sink: &Sink) -> Result<Stdio, Failure> {
    Ok(match sink {
        Sink::Capture(_) => Stdio::piped(),
        Sink::Redirect(path) => {
            Stdio::from(fs::File::create(path).context(|| format!("creating {}", path.display()))?)
        }
    })
}

/// Copies a pipe into the capture file, and its lines into the progress output.
async fn pump(
    engine: &Engine,
    label: &str,
    pipe: Option<impl AsyncRead + Unpin>,
    sink: &Sink,
) -> Result<(), Failure> {
    let (Some(mut pipe), Sink::Capture(path)) = (pipe, sink) else {
        return Ok(());
    };
    // Plain file writes: this future runs on a blocking thread (see `run`).
    let mut file = fs::File::create(path).context(|| format!("creating {}", path.display()))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut line: Vec<u8> = Vec::new();
    loop {
        let n = pipe.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .context(|| format!("writing {}", path.display()))?;
        for &b in &buf[..n] {
            if b == b'\n' || line.len() >= MAX_LINE {
                engine.progress(&format!(
                    "[exec {label}] {}",
                    String::from_utf8_lossy(&line)
                ));
                line.clear();
                if b == b'\n' {
                    continue;
                }
            }
            line.push(b);
        }
    }
    if !line.is_empty() {
        engine.progress(&format!(
            "[exec {label}] {}",
            String::from_utf8_lossy(&line)
        ));
    }
    Ok(())
}

fn write_sink(sink: &Sink, data: &[u8]) -> Result<(), Failure> {
    let path = match sink {
        Sink::Capture(p) | Sink::Redirect(p) => p,
    };
    fs::write(path, data).context(|| format!("writing {}", path.display()))
}

fn touch_sink(sink: &Sink) -> Result<(), Failure> {
    write_sink(sink, b"")
}

/// Makes the process get SIGKILL when the thread that started it ends — when the session
/// dies, even by SIGKILL, `unshare` dies and takes the exec's namespace with it. (The
/// starting thread waits for the exec, so it outlives it otherwise.)
fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe; it touches no memory of the parent.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The device nodes of `/dev` while an exec runs.
struct Devices {
    made: Vec<PathBuf>,
}

impl Devices {
    const NODES: [(&'static str, u32, u32); 4] = [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("random", 1, 8),
        ("urandom", 1, 9),
    ];

    fn create(root: &Path, as_root: bool) -> Self {
        let mut made = Vec::new();
        let dev = root.join("dev");
        if !as_root || fs::create_dir_all(&dev).is_err() {
            return Self { made };
        }
        for (name, major, minor) in Self::NODES {
            let path = dev.join(name);
            if fs::symlink_metadata(&path).is_ok() {
                continue;
            }
            if mknod_char(&path, major, minor) {
                made.push(path);
            }
        }
        Self { made }
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        for path in &self.made {
            let _ = fs::remove_file(path);
        }
    }
}

/// Creates a character device node (mode 0666).
fn mknod_char(path: &Path, major: u32, minor: u32) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let dev = libc::makedev(major, minor);
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call; mknod
    // reads nothing else.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o666, dev) };
    if rc != 0 {
        return false;
    }
    // The umask narrowed the mode.
    fs::set_permissions(path, fs::Permissions::from_mode(0o666)).is_ok()
}
