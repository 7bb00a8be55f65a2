//! Filesystem work on trees: copying (with filters), content digests, resolving container
//! paths inside a root (symlinks followed as a chroot would), atomic installs.
//!
//! Everything here is blocking: callers run it on blocking threads. Special files
//! (devices, sockets, FIFOs) are never copied or hashed: the engine provides `/dev` itself.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Context, Failure};
use crate::object::Filter;

/// Most symlinks followed while resolving one path (Linux's limit).
const MAX_LINKS: usize = 40;

/// Copies the tree at `src` into `dst` (created if missing), merging with what is there:
/// files and links replace, directories merge. `filter` applies to paths relative to `src`.
pub(crate) fn copy_tree(src: &Path, dst: &Path, filter: Option<&Filter>) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            src.display()
        )));
    }
    ensure_dir(dst, meta.permissions().mode())?;
    copy_children(src, dst, "", filter)
}

fn copy_children(src: &Path, dst: &Path, rel: &str, filter: Option<&Filter>) -> io::Result<()> {
    for entry in sorted_entries(src)? {
        let name = entry.to_string_lossy().into_owned();
        let rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let from = src.join(&entry);
        let to = dst.join(&entry);
        let meta = fs::symlink_metadata(&from)?;
        if meta.is_dir() {
            if filter.is_some_and(|f| !f.enters(&rel)) {
                continue;
            }
            if filter.is_none_or(|f| f.keeps(&rel)) {
                ensure_dir(&to, meta.permissions().mode())?;
            }
            copy_children(&from, &to, &rel, filter)?;
        } else if filter.is_none_or(|f| f.keeps(&rel)) {
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent)?;
            }
            copy_entry(&from, &to, &meta)?;
        }
    }
    Ok(())
}

/// Copies one file or symlink to `to`, replacing what is there. Special files are skipped.
pub(crate) fn copy_entry(from: &Path, to: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(from)?;
        remove_path(to)?;
        std::os::unix::fs::symlink(target, to)
    } else if ft.is_file() {
        if fs::symlink_metadata(to).is_ok_and(|m| !m.is_file()) {
            remove_path(to)?;
        }
        fs::copy(from, to)?;
        fs::set_permissions(to, fs::Permissions::from_mode(meta.permissions().mode()))
    } else {
        Ok(())
    }
}

/// Makes `path` a directory with `mode` (replacing a file or link there).
fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            remove_path(path)?;
            fs::create_dir(path)?;
        }
        Err(_) => fs::create_dir_all(path)?,
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
}

/// Names in `dir`, sorted bytewise.
fn sorted_entries(dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    let mut names = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

/// Removes a file, link or tree; nothing there is fine.
pub(crate) fn remove_path(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// SHA-256 (hex) of a tree: every directory, file (mode and content) and symlink (target)
/// by relative path. Times and owners do not count.
pub(crate) fn tree_digest(root: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    hash_dir(root, "", &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

fn hash_dir(dir: &Path, rel: &str, hasher: &mut Sha256) -> io::Result<()> {
    for entry in sorted_entries(dir)? {
        let rel = format!("{rel}/{}", entry.to_string_lossy());
        let path = dir.join(&entry);
        let meta = fs::symlink_metadata(&path)?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            hasher.update(format!("D {rel} {mode:o}\n"));
            hash_dir(&path, &rel, hasher)?;
        } else if meta.is_symlink() {
            let target = fs::read_link(&path)?;
            hasher.update(format!("L {rel} {}\n", target.display()));
        } else if meta.is_file() {
            hasher.update(format!(
                "F {rel} {mode:o} {} {}\n",
                meta.len(),
                file_digest(&path)?
            ));
        }
    }
    Ok(())
}

/// SHA-256 (hex) of a file's content.
pub(crate) fn file_digest(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Renames the staged `tmp` to `dest` unless `dest` already exists (someone else installed
/// the same content first: `tmp` is then removed).
pub(crate) fn install(tmp: &Path, dest: &Path) -> io::Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    if fs::symlink_metadata(dest).is_ok() {
        return remove_path(tmp);
    }
    match fs::rename(tmp, dest) {
        Ok(()) => Ok(()),
        Err(_) if fs::symlink_metadata(dest).is_ok() => remove_path(tmp),
        Err(e) => Err(e),
    }
}

/// The host path of container path `path` under `root`, following symlinks as if `root`
/// were `/` (never leaving it). The last component is followed only if `follow_last`.
/// Components that do not exist are kept as they are.
pub(crate) fn resolve_in_root(
    root: &Path,
    path: &str,
    follow_last: bool,
) -> Result<PathBuf, Failure> {
    let mut todo: Vec<String> = components(path).into_iter().rev().collect();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            done.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&done);
        candidate.push(&part);
        let last = todo.is_empty();
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.is_symlink() && (!last || follow_last) => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Failure::engine(format!(
                        "{path}: too many levels of symbolic links"
                    )));
                }
                let target = fs::read_link(&candidate)
                    .context(|| format!("reading link {}", candidate.display()))?;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    done.clear();
                }
                todo.extend(components(&target).into_iter().rev());
            }
            _ => done.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&done);
    Ok(out)
}

fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .map(str::to_string)
        .collect()
}

/// Resolves `path` under `root` and creates the missing directories up to it.
pub(crate) fn make_dirs_in_root(root: &Path, path: &str) -> Result<PathBuf, Failure> {
    let mut so_far = String::new();
    for part in components(path) {
        so_far.push('/');
        so_far.push_str(&part);
        let host = resolve_in_root(root, &so_far, true)?;
        if fs::symlink_metadata(&host).is_err() {
            fs::create_dir(&host).context(|| format!("creating {so_far}"))?;
        }
    }
    resolve_in_root(root, path, true)
}

/// Changes the owner of everything under `path` (links themselves, not their targets).
pub(crate) fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// A file's permission bits.
pub(crate) fn mode_of(meta: &fs::Metadata) -> u32 {
    meta.mode() & 0o7777
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_links_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("data/sub")).unwrap();
        std::os::unix::fs::symlink("/data", root.join("out")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("data/sub/up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(root, "/out/sub", true).unwrap(),
            root.join("data/sub")
        );
        assert_eq!(
            resolve_in_root(root, "/out", false).unwrap(),
            root.join("out")
        );
        // `..` never leaves the root.
        assert_eq!(
            resolve_in_root(root, "/data/sub/up/etc", true).unwrap(),
            root.join("etc")
        );
        assert_eq!(
            resolve_in_root(root, "/../../x", true).unwrap(),
            root.join("x")
        );
        assert!(resolve_in_root(root, "/loop/x", true).is_err());
    }

    #[test]
    fn digests_see_content_modes_and_links_but_not_times() {
        let a = tempfile::tempdir().unwrap();
        fs::create_dir(a.path().join("d")).unwrap();
        fs::write(a.path().join("d/f"), "x").unwrap();
        std::os::unix::fs::symlink("d/f", a.path().join("l")).unwrap();
        let b = tempfile::tempdir().unwrap();
        copy_tree(a.path(), b.path(), None).unwrap();
        fs::set_permissions(b.path(), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(a.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let d1 = tree_digest(a.path()).unwrap();
        assert_eq!(d1, tree_digest(b.path()).unwrap());
        fs::write(b.path().join("d/f"), "y").unwrap();
        assert_ne!(d1, tree_digest(b.path()).unwrap());
        fs::write(b.path().join("d/f"), "x").unwrap();
        assert_eq!(d1, tree_digest(b.path()).unwrap());
        fs::set_permissions(b.path().join("d/f"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_ne!(d1, tree_digest(b.path()).unwrap());
    }

    #[test]
    fn copies_with_a_filter() {
        let a = tempfile::tempdir().unwrap();
        fs::create_dir_all(a.path().join("target/debug")).unwrap();
        fs::create_dir_all(a.path().join("src")).unwrap();
        fs::write(a.path().join("target/debug/bin"), "b").unwrap();
        fs::write(a.path().join("src/main.rs"), "m").unwrap();
        let b = tempfile::tempdir().unwrap();
        let filter = Filter {
            include: vec![],
            exclude: vec!["target".into()],
        };
        copy_tree(a.path(), b.path(), Some(&filter)).unwrap();
        assert!(b.path().join("src/main.rs").exists());
        assert!(!b.path().join("target").exists());
    }
}
