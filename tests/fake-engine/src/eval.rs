//! Turning objects into files: a container's filesystem, a directory, a file — and running
//! the execs they depend on, at most once per op chain.
//!
//! [`Engine::ensure_exec`] is the cache: an exec whose snapshot is stored is never run
//! again (a `CACHED` line and a `cached: true` record, once per session). Otherwise its
//! parent is evaluated first, a lock on its key makes concurrent sessions wait for each
//! other (the second then finds the snapshot, as BuildKit merges identical vertices), and
//! the exec runs in a scratch root built from the parent: the parent's filesystem, its
//! pending file operations, then copies of mounted directories and cache volumes at their
//! paths. Afterwards cache volumes are copied back (each under its lock), mounts are taken
//! out (what they covered comes back), and the root, exit code, stdout and stderr become
//! the snapshot. A result its `expect` rejects is an `ExecError` and is not stored.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::error::{Context, Failure};
use crate::exec::{self, Sink};
use crate::fsutil::{self, make_dirs_in_root, resolve_in_root};
use crate::object::{Base, Ctr, Dir, ExecNode, FileObj, FileOp, MountSource, Sharing, absolute};
use crate::records::{ExecRecord, now_ms};
use crate::store::Lock;

/// `PATH` of an exec whose container sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A read-only view of a tree: `root` is what `/` means for links, `dir` the container
/// path of interest. Scratch copies it needed live as long as the view.
pub(crate) struct View {
    _scratch: Vec<tempfile::TempDir>,
    pub(crate) root: PathBuf,
    pub(crate) dir: String,
}

impl View {
    /// The host path of `sub` (relative to the view's directory, or absolute in its root).
    pub(crate) fn host(&self, sub: &str, follow_last: bool) -> Result<PathBuf, Failure> {
        resolve_in_root(&self.root, &absolute(&self.dir, sub), follow_last)
    }
}

/// What a stored exec result says about its run.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ExecResult {
    pub(crate) exit_code: i32,
    pub(crate) args: Vec<String>,
}

impl Engine {
    /// Makes sure exec `node` has a stored result; returns its snapshot directory.
    pub(crate) fn ensure_exec(&self, node: &ExecNode) -> Result<PathBuf, Failure> {
        let key = &node.key;
        let snapshot = self.store.snapshot(key);
        if self.was_evaluated(key) && self.store.has_snapshot(key) {
            return Ok(snapshot);
        }
        if self.store.has_snapshot(key) {
            self.cached(node)?;
            return Ok(snapshot);
        }
        // The parent first (outside our lock: it never needs ours).
        if let Base::Exec(parent) = &node.parent.base {
            self.ensure_exec(parent)?;
        }
        let _lock = self.store.lock(&format!("exec-{key}"))?;
        if self.store.has_snapshot(key) {
            self.cached(node)?;
            return Ok(snapshot);
        }
        self.run_exec(node)?;
        self.mark_evaluated(key);
        Ok(snapshot)
    }

    fn cached(&self, node: &ExecNode) -> Result<(), Failure> {
        if self.was_evaluated(&node.key) {
            return Ok(());
        }
        let result = self.exec_result(&node.key)?;
        self.progress(&format!("CACHED {}", shell_words(&node.spec.args)));
        self.record(node, true, result.exit_code)?;
        self.mark_evaluated(&node.key);
        Ok(())
    }

    /// The stored result of exec `key`.
    pub(crate) fn exec_result(&self, key: &str) -> Result<ExecResult, Failure> {
        let path = self.store.snapshot(key).join("result.json");
        let text = fs::read(&path).context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text)
            .map_err(|e| Failure::engine(format!("fake engine: {}: {e}", path.display())))
    }

    fn record(&self, node: &ExecNode, cached: bool, exit_code: i32) -> Result<(), Failure> {
        let parent = &node.parent;
        let record = ExecRecord {
            key: node.key.clone(),
            args: node.spec.args.clone(),
            image: parent.image().map(str::to_string),
            workdir: parent.workdir().to_string(),
            cached,
            exit_code,
            at_ms: now_ms(),
            session: self.session_id.clone(),
            env: parent.env.iter().cloned().collect::<BTreeMap<_, _>>(),
            secret_env: parent.secret_env.iter().map(|(k, _)| k.clone()).collect(),
            caches: parent
                .mounts
                .iter()
                .filter_map(|m| match &m.source {
                    MountSource::Cache { key, .. } => Some(format!("{key}:{}", m.path)),
                    MountSource::Directory(_) => None,
                })
                .collect(),
        };
        self.store.record_exec(&record)
    }

    fn run_exec(&self, node: &ExecNode) -> Result<(), Failure> {
        let parent = &node.parent;
        let spec = &node.spec;
        let scratch = self.store.scratch()?;
        let snap = scratch.path().join("snap");
        let root = snap.join("root");
        self.build_fs(parent, &root)?;

        // Directories to mount are evaluated before any volume is locked: evaluating one
        // may wait for another session's exec, which may wait for a volume we hold.
        let mut dir_views = Vec::new();
        for mount in &parent.mounts {
            dir_views.push(match &mount.source {
                MountSource::Directory(dir) => Some(self.dir_view(dir)?),
                MountSource::Cache { .. } => None,
            });
        }
        // Mounts: what they cover is stashed and comes back afterwards.
        let mut stashed: Vec<(PathBuf, Option<PathBuf>)> = Vec::new();
        let mut held: BTreeMap<String, Lock> = BTreeMap::new();
        for (i, (mount, view)) in parent.mounts.iter().zip(&dir_views).enumerate() {
            let at = make_dirs_in_root(&root, &mount.path)?;
            let stash = if fs::symlink_metadata(&at).is_ok() {
                let stash = scratch.path().join(format!("stash-{i}"));
                fs::rename(&at, &stash).context(|| format!("moving {} aside", mount.path))?;
                Some(stash)
            } else {
                None
            };
            fs::create_dir_all(&at)?;
            match (&mount.source, view) {
                (MountSource::Directory(_), Some(view)) => {
                    fsutil::copy_tree(&view.host(".", true)?, &at, None)
                        .context(|| format!("mounting a directory at {}", mount.path))?;
                }
                (MountSource::Directory(_), None) => unreachable!("views were taken above"),
                (MountSource::Cache { key, sharing }, _) => {
                    let (lock_name, volume) = self.store.volume(key);
                    let lock = match held.remove(key) {
                        Some(lock) => lock,
                        None => self.store.lock(&lock_name)?,
                    };
                    let data = volume.join("data");
                    if data.is_dir() {
                        fsutil::copy_tree(&data, &at, None)
                            .context(|| format!("mounting cache volume {key:?}"))?;
                    }
                    if *sharing == Sharing::Locked {
                        held.insert(key.clone(), lock);
                    }
                }
            }
            if let Some(owner) = &mount.owner {
                let (uid, gid) = lookup_owner(&root, owner)?;
                fsutil::chown_tree(&at, uid, gid)?;
            }
            stashed.push((at, stash));
        }

        let workdir = parent.workdir();
        make_dirs_in_root(&root, workdir)?;
        let user = match &parent.user {
            Some(u) => Some(lookup_owner(&root, u)?),
            None => None,
        };
        let env = self.exec_env(parent)?;
        let sink = |redirect: &Option<String>, name: &str| -> Result<Sink, Failure> {
            Ok(match redirect {
                Some(path) => {
                    let path = absolute(workdir, path);
                    let parent_dir = absolute(&path, "..");
                    let dir = make_dirs_in_root(&root, &parent_dir)?;
                    let file = Path::new(&path).file_name().ok_or_else(|| {
                        Failure::engine(format!("fake engine: bad redirect path {path}"))
                    })?;
                    Sink::Redirect(dir.join(file))
                }
                None => Sink::Capture(snap.join(name)),
            })
        };
        let stdout = sink(&spec.redirect_stdout, "stdout")?;
        let stderr = sink(&spec.redirect_stderr, "stderr")?;
        let label = self.exec_label(&node.key);
        self.progress(&format!("RUN [exec {label}] {}", shell_words(&spec.args)));
        let code = exec::run(
            self,
            exec::Run {
                root: &root,
                argv: &spec.args,
                env,
                workdir,
                user,
                stdin: spec.stdin.as_deref(),
                stdout,
                stderr,
                label: &label,
            },
        )?;
        self.progress(&format!("DONE [exec {label}] exit code {code}"));

        // Volumes keep what the exec left; mounts leave the result.
        for (mount, (at, stash)) in parent.mounts.iter().zip(stashed).rev() {
            if let MountSource::Cache { key, .. } = &mount.source {
                let (lock_name, volume) = self.store.volume(key);
                let _lock = match held.remove(key) {
                    Some(lock) => lock,
                    None => self.store.lock(&lock_name)?,
                };
                replace_volume(&volume, &at, key)?;
            }
            fsutil::remove_path(&at)?;
            match stash {
                Some(stash) => fs::rename(&stash, &at)?,
                None => fs::create_dir_all(&at)?,
            }
        }

        for name in ["stdout", "stderr"] {
            if !snap.join(name).exists() {
                fs::write(snap.join(name), "")?;
            }
        }
        self.record(node, false, code)?;
        if !spec.expect.accepts(code) {
            let read = |name: &str| {
                fs::read(snap.join(name)).map(|b| String::from_utf8_lossy(&b).into_owned())
            };
            return Err(Failure::Exec {
                cmd: spec.args.clone(),
                exit_code: code,
                stdout: read("stdout")?,
                stderr: read("stderr")?,
            });
        }
        let result = ExecResult {
            exit_code: code,
            args: spec.args.clone(),
        };
        fs::write(
            snap.join("result.json"),
            serde_json::to_vec(&result).unwrap_or_default(),
        )?;
        fsutil::install(&snap, &self.store.snapshot(&node.key))
            .context(|| "storing an exec result".into())?;
        Ok(())
    }

    /// The environment of an exec in `ctr`: the container's variables, its secrets, then
    /// `PATH`, `HOME` and GPUs.
    fn exec_env(&self, ctr: &Ctr) -> Result<Vec<(String, String)>, Failure> {
        let mut env: Vec<(String, String)> = ctr.env.clone();
        for (var, secret) in &ctr.secret_env {
            env.retain(|(k, _)| k != var);
            env.push((var.clone(), self.secret(secret)?));
        }
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        if !env.iter().any(|(k, _)| k == "HOME") {
            env.push(("HOME".into(), "/root".into()));
        }
        if let Some(gpus) = &ctr.gpus {
            env.retain(|(k, _)| k != "NVIDIA_VISIBLE_DEVICES");
            env.push(("NVIDIA_VISIBLE_DEVICES".into(), gpus.visible_devices()));
        }
        Ok(env)
    }

    /// Builds `ctr`'s filesystem (base, then pending operations) at `dest`.
    fn build_fs(&self, ctr: &Ctr, dest: &Path) -> Result<(), Failure> {
        match &ctr.base {
            Base::Scratch => fs::create_dir_all(dest)?,
            Base::Image { digest, .. } => {
                let image = self.store.image_rootfs(digest)?;
                fsutil::copy_tree(&image, dest, None).context(|| "copying an image".into())?;
            }
            Base::Exec(node) => {
                let snap = self.ensure_exec(node)?;
                fsutil::copy_tree(&snap.join("root"), dest, None)
                    .context(|| "copying an exec result".into())?;
            }
        }
        for op in &ctr.pending {
            self.apply(dest, op)?;
        }
        Ok(())
    }

    fn apply(&self, root: &Path, op: &FileOp) -> Result<(), Failure> {
        match op {
            FileOp::Directory {
                path,
                dir,
                filter,
                owner,
            } => {
                let view = self.dir_view(dir)?;
                let src = view.host(".", true)?;
                let dest = make_dirs_in_root(root, path)?;
                let filter = (!filter.is_empty()).then_some(filter);
                fsutil::copy_tree(&src, &dest, filter)
                    .context(|| format!("copying a directory to {path}"))?;
                if let Some(owner) = owner {
                    let (uid, gid) = lookup_owner(root, owner)?;
                    fsutil::chown_tree(&dest, uid, gid)?;
                }
            }
            FileOp::File {
                path,
                file,
                permissions,
                owner,
            } => {
                let (_view, src) = self.file_path(file)?;
                let dest = file_dest(root, path)?;
                let meta = fs::metadata(&src).context(|| format!("reading {}", src.display()))?;
                fsutil::copy_entry(&src, &dest, &meta)?;
                finish_file(root, &dest, *permissions, owner.as_deref())?;
            }
            FileOp::NewFile {
                path,
                contents,
                permissions,
                owner,
            } => {
                let dest = file_dest(root, path)?;
                fsutil::remove_path(&dest)?;
                fs::write(&dest, contents).context(|| format!("writing {path}"))?;
                finish_file(
                    root,
                    &dest,
                    Some(permissions.unwrap_or(0o644)),
                    owner.as_deref(),
                )?;
            }
            FileOp::Remove { path } => {
                let at = fsutil::resolve_in_root(root, path, false)?;
                if at != root {
                    fsutil::remove_path(&at).context(|| format!("removing {path}"))?;
                }
            }
        }
        Ok(())
    }

    /// A view of `ctr`'s filesystem: its base as stored when nothing is pending, else a
    /// scratch copy with the pending operations and mounted directories (cache volumes are
    /// not part of it).
    pub(crate) fn ctr_view(&self, ctr: &Ctr) -> Result<View, Failure> {
        let mounted: Vec<_> = ctr
            .mounts
            .iter()
            .filter_map(|m| match &m.source {
                MountSource::Directory(d) => Some((m.path.as_str(), d)),
                MountSource::Cache { .. } => None,
            })
            .collect();
        if ctr.pending.is_empty() && mounted.is_empty() {
            let (scratch, root) = match &ctr.base {
                Base::Scratch => {
                    let s = self.store.scratch()?;
                    let p = s.path().to_path_buf();
                    (vec![s], p)
                }
                Base::Image { digest, .. } => (Vec::new(), self.store.image_rootfs(digest)?),
                Base::Exec(node) => (Vec::new(), self.ensure_exec(node)?.join("root")),
            };
            return Ok(View {
                _scratch: scratch,
                root,
                dir: "/".into(),
            });
        }
        let scratch = self.store.scratch()?;
        let root = scratch.path().join("root");
        self.build_fs(ctr, &root)?;
        for (path, dir) in mounted {
            let view = self.dir_view(dir)?;
            let at = make_dirs_in_root(&root, path)?;
            fsutil::remove_path(&at)?;
            fsutil::copy_tree(&view.host(".", true)?, &at, None)?;
        }
        Ok(View {
            _scratch: vec![scratch],
            root,
            dir: "/".into(),
        })
    }

    /// A view of a directory; it must exist.
    pub(crate) fn dir_view(&self, dir: &Dir) -> Result<View, Failure> {
        let view = match dir {
            Dir::Content { digest, sub } => {
                let root = self.store.tree(digest);
                if !root.is_dir() {
                    return Err(Failure::engine(format!(
                        "fake engine: directory {digest} is not in this engine's content store"
                    )));
                }
                View {
                    _scratch: Vec::new(),
                    root,
                    dir: sub.clone(),
                }
            }
            Dir::Ctr { ctr, path } => {
                let mut view = self.ctr_view(ctr)?;
                view.dir = path.clone();
                view
            }
        };
        if !view.host(".", true)?.is_dir() {
            return Err(Failure::engine(format!(
                "fake engine: {}: no such directory",
                view.dir
            )));
        }
        Ok(view)
    }

    /// The host path of a file (and the view that keeps it there); it must be a file.
    pub(crate) fn file_path(&self, file: &FileObj) -> Result<(Option<View>, PathBuf), Failure> {
        let (view, path, shown) = match file {
            FileObj::Blob { digest, name } => (None, self.store.blob(digest), name.clone()),
            FileObj::InDir { dir, path } => {
                let view = self.dir_view(dir)?;
                let host = view.host(path, true)?;
                (Some(view), host, path.clone())
            }
        };
        if !path.is_file() {
            return Err(Failure::engine(format!(
                "fake engine: {shown}: no such file"
            )));
        }
        Ok((view, path))
    }
}

/// The host path a file operation writes (its parents created).
fn file_dest(root: &Path, path: &str) -> Result<PathBuf, Failure> {
    let dir = make_dirs_in_root(root, &absolute(path, ".."))?;
    let name = Path::new(path)
        .file_name()
        .ok_or_else(|| Failure::engine(format!("fake engine: {path} is not a file path")))?;
    Ok(dir.join(name))
}

fn finish_file(
    root: &Path,
    dest: &Path,
    mode: Option<u32>,
    owner: Option<&str>,
) -> Result<(), Failure> {
    if let Some(mode) = mode {
        fs::set_permissions(dest, fs::Permissions::from_mode(mode))?;
    }
    if let Some(owner) = owner {
        let (uid, gid) = lookup_owner(root, owner)?;
        std::os::unix::fs::lchown(dest, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Replaces a volume's data with the tree at `from`.
fn replace_volume(volume: &Path, from: &Path, key: &str) -> Result<(), Failure> {
    let data = volume.join("data");
    let staged = volume.join("data.new");
    let old = volume.join("data.old");
    fs::create_dir_all(volume)?;
    fs::write(volume.join("name"), key)?;
    fsutil::remove_path(&staged)?;
    fsutil::remove_path(&old)?;
    fsutil::copy_tree(from, &staged, None).context(|| format!("saving cache volume {key:?}"))?;
    if data.exists() {
        fs::rename(&data, &old)?;
    }
    fs::rename(&staged, &data)?;
    fsutil::remove_path(&old)?;
    Ok(())
}

/// `user[:group]` (names or numbers) in the root's `/etc/passwd` and `/etc/group`.
pub(crate) fn lookup_owner(root: &Path, spec: &str) -> Result<(u32, u32), Failure> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let table = |file: &str| -> Vec<Vec<String>> {
        let path = resolve_in_root(root, file, true).unwrap_or_default();
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(':').map(str::to_string).collect())
            .collect()
    };
    let passwd = table("/etc/passwd");
    let (uid, mut gid) = match user.parse::<u32>() {
        Ok(uid) => {
            let gid = passwd
                .iter()
                .find(|f| f.get(2).and_then(|u| u.parse().ok()) == Some(uid))
                .and_then(|f| f.get(3)?.parse().ok())
                .unwrap_or(uid);
            (uid, gid)
        }
        Err(_) => passwd
            .iter()
            .find(|f| f.first().map(String::as_str) == Some(user))
            .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
            .ok_or_else(|| {
                Failure::engine(format!(
                    "fake engine: no user {user:?} in the container's /etc/passwd"
                ))
            })?,
    };
    if let Some(group) = group {
        gid = match group.parse::<u32>() {
            Ok(g) => g,
            Err(_) => table("/etc/group")
                .iter()
                .find(|f| f.first().map(String::as_str) == Some(group))
                .and_then(|f| f.get(2)?.parse().ok())
                .ok_or_else(|| {
                    Failure::engine(format!(
                        "fake engine: no group {group:?} in the container's /etc/group"
                    ))
                })?,
        };
    }
    Ok((uid, gid))
}

/// argv as a shell would show it.
pub(crate) fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
