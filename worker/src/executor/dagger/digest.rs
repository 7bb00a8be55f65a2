//! Digests of exported outputs: `sha256:<hex>` of a file's bytes, or of a directory tree
//! described canonically — each entry in byte order of its relative path, as
//! `<path>\0<kind>\0<what>\n` where a file is `f`, its executable bit and the sha256 of its
//! bytes, a directory `d`, and a symlink `l` and its target. Two exports of the same tree
//! have the same digest whatever the file system's order or timestamps.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// The digest of a file or directory tree at `path` (symlinks are not followed).
pub(super) fn digest_path(path: &Path) -> io::Result<String> {
    let meta = std::fs::symlink_metadata(path)?;
    let hex = if meta.is_dir() {
        let mut hasher = Sha256::new();
        let mut entries = Vec::new();
        walk(path, Path::new(""), &mut entries)?;
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (rel, line) in entries {
            hasher.update(&rel);
            hasher.update(b"\0");
            hasher.update(line.as_bytes());
            hasher.update(b"\n");
        }
        hex::encode(hasher.finalize())
    } else {
        file_sha256(path)?
    };
    Ok(format!("sha256:{hex}"))
}

fn file_sha256(path: &Path) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
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

/// Collects `(relative path bytes, description)` of everything under `dir`.
fn walk(dir: &Path, rel: &Path, out: &mut Vec<(Vec<u8>, String)>) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let rel = rel.join(entry.file_name());
        let key = rel.as_os_str().as_bytes().to_vec();
        let meta = std::fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            out.push((key, "d".into()));
            walk(&path, &rel, out)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)?;
            out.push((
                key,
                format!("l\0{}", hex::encode(target.as_os_str().as_bytes())),
            ));
        } else if ft.is_file() {
            let exec = if meta.permissions().mode() & 0o111 != 0 {
                "x"
            } else {
                "-"
            };
            out.push((key, format!("f\0{exec}\0{}", file_sha256(&path)?)));
        } else {
            out.push((key, "o".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_digest_is_sha256_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "hello\n").unwrap();
        assert_eq!(
            digest_path(&f).unwrap(),
            "sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
    }

    #[test]
    fn tree_digest_is_stable_and_sees_content_names_modes_and_links() {
        let make = |root: &Path, order_rev: bool| {
            let mut names = vec!["a", "b", "c"];
            if order_rev {
                names.reverse();
            }
            std::fs::create_dir_all(root.join("sub")).unwrap();
            for n in names {
                std::fs::write(root.join("sub").join(n), n).unwrap();
            }
            std::fs::write(root.join("top"), "top").unwrap();
            std::os::unix::fs::symlink("top", root.join("link")).unwrap();
        };
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        make(one.path(), false);
        make(two.path(), true);
        let d1 = digest_path(one.path()).unwrap();
        assert_eq!(d1, digest_path(two.path()).unwrap());
        std::fs::write(two.path().join("sub/a"), "changed").unwrap();
        let d2 = digest_path(two.path()).unwrap();
        assert_ne!(d1, d2);
        std::fs::set_permissions(
            two.path().join("top"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        assert_ne!(d2, digest_path(two.path()).unwrap());
        let three = tempfile::tempdir().unwrap();
        make(three.path(), false);
        std::fs::remove_file(three.path().join("link")).unwrap();
        std::os::unix::fs::symlink("sub", three.path().join("link")).unwrap();
        assert_ne!(d1, digest_path(three.path()).unwrap());
    }
}
