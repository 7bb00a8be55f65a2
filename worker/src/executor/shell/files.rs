//! Files in and out of a shell attempt's work dir: its inputs are copied in before the
//! command starts (never linked: the cache entries they come from are shared and must stay
//! intact), owned by the task's user; after a successful command its declared artifacts are
//! moved to the runner's artifact dir.
//!
//! Every path is relative to the work dir and may not leave it: no absolute path, no `..`,
//! and no symbolic link on the way (the task controls the tree once it ran, and the worker
//! may be root). Everything here is blocking: call it from `spawn_blocking`.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown};
use std::path::{Component, Path, PathBuf};

use scabbard_common::proto::{ArtifactKind, ArtifactSpec};

use crate::executor::{ProducedArtifact, StagedInput};

/// Why files could not be placed or collected.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum FileError {
    /// The spec or the task is at fault (a bad path, a missing required artifact).
    User(String),
    /// The host is (a disk error).
    Infra(String),
}

/// Who the copies belong to: `(uid, gid)` of the task's user, or `None` to keep the
/// worker's.
pub(super) type Owner = Option<(u32, u32)>;

/// `path` as a relative path inside a directory: no root, no `..`, not empty; `.`
/// components dropped.
pub(super) fn inside(path: &str) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("goes up with '..'".into()),
            Component::RootDir | Component::Prefix(_) => return Err("is absolute".into()),
        }
    }
    if out.as_os_str().is_empty() {
        return Err("names the work dir itself".into());
    }
    Ok(out)
}

/// Copies every input to `workdir/<path>`, creating the directories on the way (owned by
/// `owner`); the copies belong to `owner`.
pub(super) fn place_inputs(
    workdir: &Path,
    inputs: &[StagedInput],
    owner: Owner,
) -> Result<(), FileError> {
    for input in inputs {
        let user = |why: String| {
            FileError::User(format!(
                "input {:?} (from {}): path {why}",
                input.path, input.from
            ))
        };
        let rel = inside(&input.path)
            .map_err(|why| user(format!("{why}: it must stay inside the work dir")))?;
        let dest = make_parents(workdir, &rel, owner).map_err(|e| match e {
            Walk::Refused(why) => user(why),
            Walk::Io(e) => FileError::Infra(format!("input {:?}: {e}", input.path)),
        })?;
        match fs::symlink_metadata(&dest) {
            Ok(_) => {
                return Err(user(
                    "is already taken (by another input at the same or an enclosing path)".into(),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(FileError::Infra(format!("input {:?}: {e}", input.path))),
        }
        copy_tree(&input.local, &dest, owner).map_err(|e| {
            FileError::Infra(format!(
                "input {:?}: cannot copy {}: {e}",
                input.path,
                input.local.display()
            ))
        })?;
    }
    Ok(())
}

/// Why walking a path inside the work dir stopped.
enum Walk {
    Refused(String),
    Io(io::Error),
}

/// Creates the directories of `rel`'s parent under `root` (owned by `owner`), refusing
/// symbolic links and non-directories on the way; returns `root/rel`.
fn make_parents(root: &Path, rel: &Path, owner: Owner) -> Result<PathBuf, Walk> {
    let mut cur = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        cur.push(part);
        if i + 1 == parts.len() {
            break;
        }
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Walk::Refused(format!(
                    "goes through the symbolic link {}",
                    shown(root, &cur)
                )));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Walk::Refused(format!(
                    "goes through {}, which is not a directory",
                    shown(root, &cur)
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(Walk::Io)?;
                chown(&cur, owner).map_err(Walk::Io)?;
            }
            Err(e) => return Err(Walk::Io(e)),
        }
    }
    Ok(cur)
}

fn shown(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

fn chown(p: &Path, owner: Owner) -> io::Result<()> {
    match owner {
        Some((uid, gid)) => lchown(p, Some(uid), Some(gid)),
        None => Ok(()),
    }
}

/// Copies a file, or a directory tree with its links (as links), modes and files, to
/// `dest` (which must not exist); every copy belongs to `owner`.
pub(super) fn copy_tree(src: &Path, dest: &Path, owner: Owner) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dest)?;
    } else if ft.is_dir() {
        fs::create_dir(dest)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dest.join(entry.file_name()), owner)?;
        }
        fs::set_permissions(dest, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else if ft.is_file() {
        fs::copy(src, dest)?;
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file, directory or link", src.display()),
        ));
    }
    chown(dest, owner)
}

/// Whether `name` can be a file name in the artifact dir (the controller checks names at
/// submit; this is the worker's own guard).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// What [`collect_artifacts`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Collected {
    /// Moved to the artifact dir, in spec order.
    pub(super) produced: Vec<ProducedArtifact>,
    /// Lines for the attempt's log (optional artifacts left out).
    pub(super) notes: Vec<String>,
}

/// Moves each declared artifact from `workdir/<path>` to `artifact_dir/<name>`. A missing
/// optional one is left out with a note; a missing required one, a path leaving the work
/// dir or going through a link, or a link as the artifact itself is a [`FileError::User`].
pub(super) fn collect_artifacts(
    workdir: &Path,
    declared: &[ArtifactSpec],
    artifact_dir: &Path,
) -> Result<Collected, FileError> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    let mut out = Collected::default();
    for spec in declared {
        let user = |why: String| {
            FileError::User(format!(
                "artifact {} (path {:?}) {why}",
                spec.name, spec.path
            ))
        };
        if !valid_name(&spec.name) {
            return Err(FileError::User(format!(
                "artifact name {:?} is not valid: use letters, digits, '_', '-' and '.'",
                spec.name
            )));
        }
        let rel = inside(&spec.path)
            .map_err(|why| user(format!("{why}: it must stay inside the work dir")))?;
        match locate(workdir, &rel) {
            Ok(Some(kind)) => found.push((spec, workdir.join(&rel), kind)),
            Ok(None) if spec.optional => out.notes.push(format!(
                "optional artifact {} ({}) was not produced; left out",
                spec.name, spec.path
            )),
            Ok(None) => missing.push(format!(
                "required artifact {} was not produced: {:?} does not exist in the work dir",
                spec.name, spec.path
            )),
            Err(Walk::Refused(why)) => return Err(user(why)),
            Err(Walk::Io(e)) => {
                return Err(FileError::Infra(format!("artifact {}: {e}", spec.name)));
            }
        }
    }
    if !missing.is_empty() {
        return Err(FileError::User(missing.join("; ")));
    }
    fs::create_dir_all(artifact_dir)
        .map_err(|e| FileError::Infra(format!("cannot create {}: {e}", artifact_dir.display())))?;
    for (spec, src, kind) in found {
        let dest = artifact_dir.join(&spec.name);
        move_path(&src, &dest).map_err(|e| {
            FileError::Infra(format!(
                "artifact {}: cannot move {} to {}: {e}",
                spec.name,
                src.display(),
                dest.display()
            ))
        })?;
        out.produced.push(ProducedArtifact {
            name: spec.name.clone(),
            kind,
        });
    }
    Ok(out)
}

/// The kind of what `root/rel` is, `None` if it does not exist; refuses links on the way
/// and as the artifact itself, and anything but files and directories.
fn locate(root: &Path, rel: &Path) -> Result<Option<ArtifactKind>, Walk> {
    let mut cur = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        cur.push(part);
        let last = i + 1 == parts.len();
        let meta = match fs::symlink_metadata(&cur) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
            Err(e) => return Err(Walk::Io(e)),
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            return Err(Walk::Refused(if last {
                "is a symbolic link: declare the file or directory itself".into()
            } else {
                format!(
                    "goes through the symbolic link {}: it must stay inside the work dir",
                    shown(root, &cur)
                )
            }));
        }
        if !last {
            if !ft.is_dir() {
                return Ok(None);
            }
            continue;
        }
        return if ft.is_dir() {
            Ok(Some(ArtifactKind::Directory))
        } else if ft.is_file() {
            Ok(Some(ArtifactKind::File))
        } else {
            Err(Walk::Refused(
                "is neither a regular file nor a directory".into(),
            ))
        };
    }
    Ok(None)
}

/// Renames `src` to `dest`, or copies and deletes it across file systems.
fn move_path(src: &Path, dest: &Path) -> io::Result<()> {
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(dest)?,
        Ok(_) => fs::remove_file(dest)?,
        Err(_) => {}
    }
    match fs::rename(src, dest) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_tree(src, dest, None)?;
            if fs::symlink_metadata(src)?.is_dir() {
                fs::remove_dir_all(src)
            } else {
                fs::remove_file(src)
            }
        }
        other => other,
    }
}

#[cfg(test)]
#[path = "files_tests.rs"]
mod tests;
