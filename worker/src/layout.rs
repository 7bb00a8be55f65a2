//! The worker's files on disk and who may read them.
//!
//! ```text
//! <data_dir>/              0700 (0711 when shell tasks run as another user and the work
//!                          root is inside: they may pass through, never list it)
//!   identity               0600  agent id and token
//!   spool/                 0700  journal segments 0600
//!   artifact-cache/        0700  downloaded inputs
//!   work/                  the work root (unless `work_dir` puts it elsewhere):
//!                          0700, or 0711 with `shell.run_as`
//!     <task>-<token>-<random>/   0700, owned by the task's user (run_as)
//!     <task>-<token>/            0700, the worker's (no run_as; dagger tasks)
//!     <task>-<token>.artifacts/  0700, the worker's: what the attempt produced
//! ```
//!
//! With `shell.run_as`, startup also checks what the task's user could reach: it must be
//! able to pass through every directory down to the work root (else its tasks could not
//! start), and must not be able to read any file the worker's configuration names as
//! private (the configuration file itself, the client key, secret and password files).
//! Both checks use the owner/group/other mode bits with the task user's only group (tasks
//! run without supplementary groups); ACLs are not consulted.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use scabbard_common::{Error, Result};

use crate::config::{RunAs, SecretSource, WorkerConfig};

/// Creates the data dir, the spool and cache parents and the work root with the modes
/// above, and checks what a `run_as` user could reach (blocking).
pub(crate) fn prepare(cfg: &WorkerConfig, run_as: Option<&RunAs>) -> Result<()> {
    let data = &cfg.data_dir;
    let work = cfg.work_root();
    private_dir(data)?;
    for dir in [data.join("spool"), cfg.artifact_cache_dir()] {
        private_dir(&dir)?;
    }
    let identity = data.join("identity");
    if identity.exists() {
        set_mode(&identity, 0o600)?;
    }
    private_dir(&work)?;
    let Some(r) = run_as else {
        return Ok(());
    };
    // Tasks pass through (never list) the directories down to their work dirs.
    set_mode(&work, 0o711)?;
    if let Ok(below) = work.strip_prefix(data) {
        let mut dir = data.clone();
        set_mode(&dir, 0o711)?;
        for part in below.parent().into_iter().flat_map(Path::components) {
            dir.push(part);
            set_mode(&dir, 0o711)?;
        }
    }
    if let Some(blocked) = first_untraversable(&work, r)? {
        return Err(Error::invalid(format!(
            "shell.run_as = {:?}: that user cannot reach the work root {}: {} does not let uid {} / gid {} pass (give it o+x, e.g. chmod 711, or set work_dir to a directory it can reach)",
            r.user,
            work.display(),
            blocked.display(),
            r.uid,
            r.gid
        )));
    }
    for (field, path) in private_files(cfg) {
        if readable_by(&path, r)? {
            return Err(Error::invalid(format!(
                "shell.run_as = {:?}: {field} {} is readable by that user, so its tasks could read it: make it 0600 (or 0640 with a group the user is not in), or move it out of its reach",
                r.user,
                path.display()
            )));
        }
    }
    Ok(())
}

/// `dir` created if needed, mode 0700.
fn private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::invalid(format!("cannot create {}: {e}", dir.display())))?;
    set_mode(dir, 0o700)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| {
        Error::invalid(format!(
            "cannot set mode {mode:o} on {}: {e} (the worker must own it)",
            path.display()
        ))
    })
}

/// The files the configuration names whose content tasks must not see, with the field
/// naming each.
fn private_files(cfg: &WorkerConfig) -> Vec<(String, PathBuf)> {
    let mut files = Vec::new();
    if let Some(p) = &cfg.config_file {
        files.push(("the configuration file".to_string(), p.clone()));
    }
    if let Some(p) = &cfg.client_key {
        files.push(("client_key".to_string(), p.clone()));
    }
    for (name, source) in &cfg.dagger.secrets {
        if let SecretSource::File(p) = &source.source {
            files.push((format!("dagger.secrets.{name}"), p.clone()));
        }
    }
    for (address, auth) in &cfg.dagger.registries {
        if let Some(p) = &auth.password_file {
            files.push((
                format!("dagger.registries.{address:?}.password_file"),
                p.clone(),
            ));
        }
    }
    files
}

/// Whether the mode bits give `r` the permission `bit` (4 read, 1 search) on `meta`.
pub(crate) fn allows(meta: &fs::Metadata, r: &RunAs, bit: u32) -> bool {
    let mode = meta.mode();
    if meta.uid() == r.uid {
        mode & (bit << 6) != 0
    } else if meta.gid() == r.gid {
        mode & (bit << 3) != 0
    } else {
        mode & bit != 0
    }
}

/// The first directory from `/` down to `path` (inclusive) that `r` cannot pass through.
pub(crate) fn first_untraversable(path: &Path, r: &RunAs) -> Result<Option<PathBuf>> {
    let full = fs::canonicalize(path)?;
    let mut cur = PathBuf::new();
    for part in full.components() {
        cur.push(part);
        if !allows(&fs::metadata(&cur)?, r, 1) {
            return Ok(Some(cur));
        }
    }
    Ok(None)
}

/// Whether `r` could open `path` for reading (a missing file cannot be read).
fn readable_by(path: &Path, r: &RunAs) -> Result<bool> {
    let Ok(full) = fs::canonicalize(path) else {
        return Ok(false);
    };
    let Some(parent) = full.parent() else {
        return Ok(false);
    };
    if first_untraversable(parent, r)?.is_some() {
        return Ok(false);
    }
    Ok(allows(&fs::metadata(&full)?, r, 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nobody() -> RunAs {
        RunAs {
            user: "nobody".into(),
            uid: 65534,
            gid: 65534,
            unshare: "/usr/bin/unshare".into(),
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A temp dir the task user may pass through, whatever the umask.
    fn open_tempdir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        set_mode(d.path(), 0o711).unwrap();
        d
    }

    #[test]
    fn without_run_as_everything_is_private() {
        let d = tempfile::tempdir().unwrap();
        let cfg = WorkerConfig {
            data_dir: d.path().join("data"),
            ..WorkerConfig::default()
        };
        fs::create_dir_all(&cfg.data_dir).unwrap();
        set_mode(&cfg.data_dir, 0o755).unwrap();
        fs::write(cfg.data_dir.join("identity"), "a\nb\n").unwrap();
        set_mode(&cfg.data_dir.join("identity"), 0o644).unwrap();
        prepare(&cfg, None).unwrap();
        for dir in ["", "spool", "artifact-cache", "work"] {
            assert_eq!(mode(&cfg.data_dir.join(dir)), 0o700, "{dir:?}");
        }
        assert_eq!(mode(&cfg.data_dir.join("identity")), 0o600);
    }

    #[test]
    fn with_run_as_the_path_to_the_work_root_is_pass_through_only() {
        let d = open_tempdir();
        let cfg = WorkerConfig {
            data_dir: d.path().join("data"),
            ..WorkerConfig::default()
        };
        prepare(&cfg, Some(&nobody())).unwrap();
        assert_eq!(mode(&cfg.data_dir), 0o711);
        assert_eq!(mode(&cfg.data_dir.join("work")), 0o711);
        assert_eq!(mode(&cfg.data_dir.join("spool")), 0o700);
        assert_eq!(mode(&cfg.data_dir.join("artifact-cache")), 0o700);

        // A work root elsewhere: the data dir stays closed.
        let cfg = WorkerConfig {
            data_dir: d.path().join("data2"),
            work_dir: Some(d.path().join("elsewhere/work")),
            ..WorkerConfig::default()
        };
        fs::create_dir_all(d.path().join("elsewhere")).unwrap();
        set_mode(&d.path().join("elsewhere"), 0o755).unwrap();
        prepare(&cfg, Some(&nobody())).unwrap();
        assert_eq!(mode(&cfg.data_dir), 0o700);
        assert_eq!(mode(&d.path().join("elsewhere/work")), 0o711);
    }

    #[test]
    fn an_unreachable_work_root_is_named() {
        let d = tempfile::tempdir().unwrap();
        set_mode(d.path(), 0o700).unwrap(); // nobody cannot pass
        let cfg = WorkerConfig {
            data_dir: d.path().join("data"),
            ..WorkerConfig::default()
        };
        let err = prepare(&cfg, Some(&nobody())).unwrap_err().to_string();
        assert!(err.contains("cannot reach the work root"), "{err}");
        assert!(err.contains(&d.path().display().to_string()), "{err}");
    }

    #[test]
    fn files_the_task_could_read_are_refused() {
        let d = open_tempdir();
        let conf = d.path().join("worker.toml");
        fs::write(&conf, "slots = 1").unwrap();
        let secret = d.path().join("npm_token");
        fs::write(&secret, "s3cret").unwrap();
        let mut cfg = WorkerConfig::from_toml(&format!(
            "[dagger.secrets]\nnpm = {{ file = {:?} }}",
            secret.display().to_string()
        ))
        .unwrap();
        cfg.data_dir = d.path().join("data");
        cfg.config_file = Some(conf.clone());
        set_mode(&conf, 0o644).unwrap();
        set_mode(&secret, 0o600).unwrap();
        let err = prepare(&cfg, Some(&nobody())).unwrap_err().to_string();
        assert!(
            err.contains("the configuration file") && err.contains("readable"),
            "{err}"
        );
        set_mode(&conf, 0o600).unwrap();
        set_mode(&secret, 0o604).unwrap();
        let err = prepare(&cfg, Some(&nobody())).unwrap_err().to_string();
        assert!(err.contains("dagger.secrets.npm"), "{err}");
        set_mode(&secret, 0o600).unwrap();
        prepare(&cfg, Some(&nobody())).unwrap();
        // Readable by its mode, but behind a directory the user cannot pass: fine.
        let hidden = d.path().join("hidden");
        fs::create_dir(&hidden).unwrap();
        set_mode(&hidden, 0o700).unwrap();
        fs::write(hidden.join("key"), "k").unwrap();
        set_mode(&hidden.join("key"), 0o644).unwrap();
        cfg.client_key = Some(hidden.join("key"));
        prepare(&cfg, Some(&nobody())).unwrap();
    }
}
