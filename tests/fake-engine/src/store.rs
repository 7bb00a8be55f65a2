//! The engine's state directory, shared by every session of one simulated engine (possibly
//! at the same time: two tasks on one worker). Layout:
//!
//! ```text
//! base/<busybox sha>/          the base root filesystem (busybox + applet links, /etc, /tmp, /root)
//! images/<overlay digest>/     an image's root filesystem: base + the image's fixture files
//! content/dirs/<digest>/       trees: host directories, git trees, image overlays
//! content/files/<sha>-<mode>   blobs: host files, downloads
//! git/<commit>[.git]           the tree digest of a resolved commit
//! snapshots/<exec key>/        an exec's result: root/, stdout, stderr, result.json
//! volumes/<hash>/data/         a cache volume (its name in volumes/<hash>/name)
//! locks/                       flock files
//! tmp/                         scratch space (staged content, exec roots)
//! execs.jsonl                  one line per exec evaluation
//! ```
//!
//! Everything is written to `tmp/` first and renamed into place, so a reader never sees a
//! half-written entry; entries are immutable once installed (volumes excepted: they are
//! replaced whole, under their lock). Locks are `flock`s on files in `locks/`.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Context, Failure};
use crate::fsutil;
use crate::records::ExecRecord;

/// Where busybox is looked for on the host.
const BUSYBOX_PATHS: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];
/// The package that provides a static busybox.
pub(crate) const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Overlay digest of an image without fixture files.
pub(crate) const NO_OVERLAY: &str = "none";

/// An open state directory.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    root: PathBuf,
}

/// A held `flock`; released on drop.
pub(crate) struct Lock {
    _file: fs::File,
}

impl Store {
    /// Opens (creating) the state directory at `root`.
    pub(crate) fn open(root: &Path) -> io::Result<Self> {
        for sub in [
            "content/dirs",
            "content/files",
            "snapshots",
            "volumes",
            "locks",
            "tmp",
            "git",
            "images",
            "base",
        ] {
            fs::create_dir_all(root.join(sub))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// A fresh scratch directory, removed when dropped.
    pub(crate) fn scratch(&self) -> Result<tempfile::TempDir, Failure> {
        tempfile::Builder::new()
            .prefix("s-")
            .tempdir_in(self.root.join("tmp"))
            .context(|| "creating a scratch directory".into())
    }

    /// Takes the lock `name` (blocking until it is free).
    pub(crate) fn lock(&self, name: &str) -> Result<Lock, Failure> {
        let path = self.root.join("locks").join(format!("{name}.lock"));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .context(|| format!("opening {}", path.display()))?;
        file.lock()
            .context(|| format!("locking {}", path.display()))?;
        Ok(Lock { _file: file })
    }

    // ---- content store ----

    /// Path of a stored tree.
    pub(crate) fn tree(&self, digest: &str) -> PathBuf {
        self.root.join("content/dirs").join(digest)
    }

    /// Installs the staged tree `staged` (moved) and returns its digest.
    pub(crate) fn add_tree(&self, staged: &Path) -> Result<String, Failure> {
        let digest = fsutil::tree_digest(staged).context(|| "hashing a tree".into())?;
        fsutil::install(staged, &self.tree(&digest)).context(|| "storing a tree".into())?;
        Ok(digest)
    }

    /// Path of a stored blob.
    pub(crate) fn blob(&self, digest: &str) -> PathBuf {
        self.root.join("content/files").join(digest)
    }

    /// Installs the staged file `staged` (moved) with `mode`; returns its digest
    /// (`<sha256>-<mode>`).
    pub(crate) fn add_blob(&self, staged: &Path, mode: u32) -> Result<String, Failure> {
        let sha = fsutil::file_digest(staged).context(|| "hashing a file".into())?;
        let digest = format!("{sha}-{mode:o}");
        fs::set_permissions(staged, fs::Permissions::from_mode(mode))?;
        fsutil::install(staged, &self.blob(&digest)).context(|| "storing a file".into())?;
        Ok(digest)
    }

    /// The tree digest recorded for a git commit.
    pub(crate) fn git_tree(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.root.join("git").join(name))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|d| self.tree(d).is_dir())
    }

    /// Records the tree digest of a git commit.
    pub(crate) fn set_git_tree(&self, name: &str, digest: &str) -> Result<(), Failure> {
        let staged = self.scratch()?.keep();
        let file = staged.join("digest");
        fs::write(&file, digest)?;
        let dest = self.root.join("git").join(name);
        fs::rename(&file, &dest).context(|| format!("recording {}", dest.display()))?;
        let _ = fs::remove_dir(staged);
        Ok(())
    }

    // ---- snapshots ----

    /// The directory of an exec's result.
    pub(crate) fn snapshot(&self, key: &str) -> PathBuf {
        self.root.join("snapshots").join(key)
    }

    /// Whether an exec's result is stored.
    pub(crate) fn has_snapshot(&self, key: &str) -> bool {
        self.snapshot(key).join("result.json").is_file()
    }

    // ---- cache volumes ----

    /// The lock name and data directory of a cache volume.
    pub(crate) fn volume(&self, key: &str) -> (String, PathBuf) {
        Self::volume_path(&self.root, key)
    }

    /// [`Self::volume`] of the state directory `root`.
    pub(crate) fn volume_path(root: &Path, key: &str) -> (String, PathBuf) {
        let hash = volume_hash(key);
        (format!("volume-{hash}"), root.join("volumes").join(hash))
    }

    // ---- exec log ----

    /// Appends one line to `execs.jsonl`.
    pub(crate) fn record_exec(&self, record: &ExecRecord) -> Result<(), Failure> {
        let _lock = self.lock("execs")?;
        let mut line = serde_json::to_vec(record).map_err(|e| Failure::engine(e.to_string()))?;
        line.push(b'\n');
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("execs.jsonl"))?;
        file.write_all(&line)?;
        Ok(())
    }

    // ---- root filesystems ----

    /// The base root filesystem (built once per busybox binary).
    pub(crate) fn base_rootfs(&self) -> Result<PathBuf, Failure> {
        let busybox = find_busybox()?;
        let digest =
            fsutil::file_digest(&busybox).context(|| format!("reading {}", busybox.display()))?;
        let dest = self.root.join("base").join(&digest);
        if dest.is_dir() {
            return Ok(dest);
        }
        let _lock = self.lock("base")?;
        if dest.is_dir() {
            return Ok(dest);
        }
        let scratch = self.scratch()?;
        let root = scratch.path().join("root");
        build_base(&busybox, &root)?;
        fsutil::install(&root, &dest).context(|| "installing the base root filesystem".into())?;
        Ok(dest)
    }

    /// The root filesystem of an image with fixture overlay `overlay` (a tree digest, or
    /// [`NO_OVERLAY`]).
    pub(crate) fn image_rootfs(&self, overlay: &str) -> Result<PathBuf, Failure> {
        let base = self.base_rootfs()?;
        if overlay == NO_OVERLAY {
            return Ok(base);
        }
        let base_id = base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dest = self
            .root
            .join("images")
            .join(format!("{overlay}-{}", &base_id[..16.min(base_id.len())]));
        if dest.is_dir() {
            return Ok(dest);
        }
        let scratch = self.scratch()?;
        let root = scratch.path().join("root");
        fsutil::copy_tree(&base, &root, None)
            .context(|| "copying the base root filesystem".into())?;
        fsutil::copy_tree(&self.tree(overlay), &root, None)
            .context(|| "adding the image's files".into())?;
        fsutil::install(&root, &dest).context(|| "installing an image".into())?;
        Ok(dest)
    }
}

fn volume_hash(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..16])
}

/// The host's busybox, which must be statically linked (it runs inside roots without a
/// libc).
fn find_busybox() -> Result<PathBuf, Failure> {
    let candidates: Vec<PathBuf> = BUSYBOX_PATHS.iter().map(PathBuf::from).collect();
    find_busybox_in(&candidates)
}

fn find_busybox_in(candidates: &[PathBuf]) -> Result<PathBuf, Failure> {
    let missing = || {
        let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        Failure::engine(format!(
            "fake engine: no busybox on this host ({}): install Debian's {BUSYBOX_PACKAGE} (scripts/setup.sh does)",
            tried.join(", ")
        ))
    };
    let path = candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(missing)?;
    let mut head = vec![0u8; 64 * 1024];
    let n = {
        use std::io::Read;
        let mut f = fs::File::open(&path).context(|| format!("reading {}", path.display()))?;
        f.read(&mut head)?
    };
    let head = &head[..n];
    if !head.starts_with(b"\x7fELF") {
        return Err(Failure::engine(format!(
            "fake engine: {} is not an ELF binary: install Debian's {BUSYBOX_PACKAGE}",
            path.display()
        )));
    }
    let dynamic = head
        .windows(8)
        .any(|w| w == b"ld-linux" || w == b"ld-musl-");
    if dynamic {
        return Err(Failure::engine(format!(
            "fake engine: {} is dynamically linked and cannot run in a bare root: install Debian's {BUSYBOX_PACKAGE}",
            path.display()
        )));
    }
    Ok(path)
}

/// Lays out the base root filesystem at `root`.
fn build_base(busybox: &Path, root: &Path) -> Result<(), Failure> {
    let applets = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .context(|| format!("running {} --list", busybox.display()))?;
    if !applets.status.success() {
        return Err(Failure::engine(format!(
            "fake engine: {} --list failed: {}",
            busybox.display(),
            String::from_utf8_lossy(&applets.stderr).trim()
        )));
    }
    for (dir, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("root", 0o700),
        ("tmp", 0o1777),
        ("usr/bin", 0o755),
        ("usr/local/bin", 0o755),
    ] {
        let path = root.join(dir);
        fs::create_dir_all(&path)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    fs::copy(busybox, root.join("bin/busybox")).context(|| "copying busybox".into())?;
    fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755))?;
    for applet in String::from_utf8_lossy(&applets.stdout).split_whitespace() {
        if applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_must_be_there_and_static() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_busybox_in(&[dir.path().join("busybox")]).unwrap_err();
        assert!(
            err.to_string().contains("install Debian's busybox-static"),
            "{err}"
        );
        // A dynamically linked binary (git is one here) cannot run in a bare root.
        let git = ["/usr/bin/git", "/usr/local/bin/git"]
            .map(PathBuf::from)
            .into_iter()
            .find(|p| p.is_file())
            .expect("git is installed");
        let err = find_busybox_in(&[git]).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
        let script = dir.path().join("script");
        fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(
            find_busybox_in(&[script])
                .unwrap_err()
                .to_string()
                .contains("not an ELF")
        );
        // This host has the real one (scripts/setup.sh installs it).
        find_busybox().unwrap();
    }
}
