//! Paths a container task names: host directories, which must stay inside the worker's
//! `workspace_root` (lexically and through symlinks), and container paths, which must be
//! absolute.

use std::path::{Component, Path, PathBuf};

use super::Refusal;

/// A host directory mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::executor::dagger) struct HostDir {
    /// Absolute, canonical, inside the workspace root.
    pub(in crate::executor::dagger) host_path: PathBuf,
    pub(in crate::executor::dagger) path: String,
    pub(in crate::executor::dagger) exclude: Vec<String>,
}

/// `path` as an absolute container path (`field` names it in the refusal).
pub(super) fn container_path(field: &str, path: &str) -> Result<String, Refusal> {
    if !path.starts_with('/') {
        return Err(Refusal::User(format!(
            "{field} must be an absolute container path, got {path:?}"
        )));
    }
    if path.contains('\0') {
        return Err(Refusal::User(format!("{field} holds a NUL byte")));
    }
    Ok(path.to_string())
}

/// `host_path` resolved inside `root`: relative ones under it, absolute ones must be in
/// it; `..` and symlinks may not leave it, and it must be an existing directory.
pub(in crate::executor::dagger) fn inside_workspace(
    host_path: &str,
    root: Option<&Path>,
) -> Result<PathBuf, Refusal> {
    let user = |m: String| Err(Refusal::User(m));
    let Some(root) = root else {
        return user(format!(
            "host directory {host_path}: this worker has no dagger.workspace_root, so tasks cannot mount host directories"
        ));
    };
    if host_path.is_empty() {
        return user("a directory mount needs a host_path".into());
    }
    let path = Path::new(host_path);
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    // Lexically first (so `..` cannot climb out even through missing directories)...
    let mut lexical = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                if !lexical.pop() {
                    return user(format!("host directory {host_path} leaves the workspace"));
                }
            }
            Component::CurDir => {}
            other => lexical.push(other),
        }
    }
    if !lexical.starts_with(root) {
        return user(format!(
            "host directory {host_path} is outside the workspace root {}",
            root.display()
        ));
    }
    // ...then through symlinks.
    let root_real = std::fs::canonicalize(root).map_err(|e| {
        Refusal::Infra(format!(
            "workspace root {} (dagger.workspace_root): {e}",
            root.display()
        ))
    })?;
    let real = match std::fs::canonicalize(&lexical) {
        Ok(real) => real,
        Err(e) => return user(format!("host directory {host_path}: {e}")),
    };
    if !real.starts_with(&root_real) {
        return user(format!(
            "host directory {host_path} leads outside the workspace root {} (through a symlink)",
            root.display()
        ));
    }
    if !real.is_dir() {
        return user(format!("host directory {host_path} is not a directory"));
    }
    Ok(real)
}
