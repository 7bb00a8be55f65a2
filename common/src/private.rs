//! Files and directories only their owner may read: Scabbard's data dirs are 0700 and the
//! files in them 0600 (task logs, the store, tokens, keys, credentials). New files are
//! created exclusively (`O_EXCL`) with that mode, so a file planted or left behind with a
//! wider mode is never written into. Existing dirs and files found wider at start are
//! tightened, with a warning.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of private directories.
pub const DIR_MODE: u32 = 0o700;
/// Mode of private files.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) with mode 0700; an existing `dir` that group or
/// others may use is tightened to 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    tighten(dir, DIR_MODE)
}

/// Removes the group and other bits of `path` (to `mode`) if it has any, with a warning.
pub fn tighten(path: &Path, mode: u32) -> io::Result<()> {
    let meta = fs::metadata(path)?;
    let current = meta.permissions().mode() & 0o7777;
    if current & 0o077 != 0 {
        tracing::warn!(path = %path.display(), from = format!("{current:o}"), to = format!("{mode:o}"), "tightening permissions: only the owner may use this");
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Creates a new file at `path`, mode 0600; fails if something is there already.
pub fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Creates a new file at `path` for a temporary write (to be renamed into place), mode
/// 0600: a leftover of an earlier attempt is removed first, never reused.
pub fn create_temp(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    create_new(path)
}

/// Makes sure a private file exists at `path`: created empty (exclusively, 0600) when
/// missing, tightened to 0600 when it exists with a wider mode.
pub fn ensure_file(path: &Path) -> io::Result<()> {
    match create_new(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => tighten(path, FILE_MODE),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn dirs_are_created_and_tightened_to_0700() {
        let d = tempfile::tempdir().unwrap();
        let new = d.path().join("a/b");
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        let wide = d.path().join("wide");
        fs::create_dir(&wide).unwrap();
        fs::set_permissions(&wide, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&wide).unwrap();
        assert_eq!(mode(&wide), 0o700);
    }

    #[test]
    fn files_are_created_exclusively_0600_and_tightened() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        create_new(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(
            create_new(&f).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        // A temporary file left behind with a wide mode is replaced, not reused.
        let tmp = d.path().join("t.tmp");
        fs::write(&tmp, "old").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        create_temp(&tmp).unwrap();
        assert_eq!(mode(&tmp), 0o600);
        assert_eq!(fs::read(&tmp).unwrap(), b"");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        ensure_file(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        let g = d.path().join("g");
        ensure_file(&g).unwrap();
        assert_eq!(mode(&g), 0o600);
    }
}
