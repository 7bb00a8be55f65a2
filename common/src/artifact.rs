//! The artifact archive format, shared by the worker (packs what a task produced, unpacks
//! its inputs), the CLI (`scabbard artifacts get`) and the benchmark: one tar stream
//! compressed with zstd, its SHA-256 taken over the compressed bytes.
//!
//! A **directory** artifact is a tar of the directory's entries with paths relative to it
//! (no leading `./`); a **file** artifact is a tar holding that one file under the name
//! `file`. Symbolic links are kept as links (never followed), so a link in a directory
//! cannot pull files from outside it into the archive; sockets, devices and FIFOs are
//! refused. Unpacking refuses entries that would land outside the destination (absolute
//! paths, `..`, links pointing out), which the `tar` crate's `unpack_in` guarantees.
//!
//! Everything here is blocking I/O: call it from `spawn_blocking`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::proto::ArtifactKind;

/// zstd level: fast enough to keep up with the network on one core, still a good ratio on
/// build outputs.
const ZSTD_LEVEL: i32 = 3;
/// Name of the single entry of a file artifact's tar.
const FILE_ENTRY: &str = "file";
/// I/O buffer size.
const BUF: usize = 1 << 20;

/// What [`pack`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// File or directory.
    pub kind: ArtifactKind,
    /// SHA-256 (lowercase hex) of the archive.
    pub sha256: String,
    /// Bytes of the archive.
    pub size: u64,
    /// Bytes of the regular files packed (before compression).
    pub content_bytes: u64,
}

/// SHA-256 of everything written through it (ring's implementation: SHA-NI where the CPU has it).
pub struct HashingWriter<W> {
    inner: W,
    ctx: ring::digest::Context,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Hashes what goes to `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
            written: 0,
        }
    }

    /// The inner writer, the hex digest and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex(self.ctx.finish().as_ref()), self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// An incremental SHA-256 for data that arrives in pieces (uploads, downloads).
pub struct Sha256(ring::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Self(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl Sha256 {
    /// The digest of `data` at once.
    pub fn digest(data: &[u8]) -> String {
        let mut h = Self::default();
        h.update(data);
        h.finish()
    }

    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The lowercase hex digest.
    pub fn finish(self) -> String {
        hex(self.0.finish().as_ref())
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 of a whole file.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::default();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

/// Whether `s` is a SHA-256 in lowercase hex.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Packs the file or directory at `src` (not followed if it is a link) into a new archive
/// at `archive`.
pub fn pack(src: &Path, archive: &Path) -> io::Result<Packed> {
    let meta = std::fs::symlink_metadata(src)?;
    let kind = if meta.is_dir() {
        ArtifactKind::Directory
    } else if meta.is_file() {
        ArtifactKind::File
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is neither a regular file nor a directory",
                src.display()
            ),
        ));
    };
    let out = BufWriter::with_capacity(BUF, File::create(archive)?);
    let hashing = HashingWriter::new(out);
    let mut encoder = zstd::stream::Encoder::new(hashing, ZSTD_LEVEL)?;
    let mut content_bytes = 0u64;
    {
        let mut tar = tar::Builder::new(&mut encoder);
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        match kind {
            ArtifactKind::File => {
                content_bytes = meta.len();
                tar.append_path_with_name(src, FILE_ENTRY)?;
            }
            _ => append_tree(&mut tar, src, Path::new(""), &mut content_bytes)?,
        }
        tar.finish()?;
    }
    let hashing = encoder.finish()?;
    let (mut out, sha256, size) = hashing.finish();
    out.flush()?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(Packed {
        kind,
        sha256,
        size,
        content_bytes,
    })
}

/// Adds the entries under `dir` (as `rel/...`) in name order, so equal trees pack equally.
fn append_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    rel: &Path,
    content_bytes: &mut u64,
) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = rel.join(e.file_name());
        let meta = std::fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            tar.append_dir(&name, &path)?;
            append_tree(tar, &path, &name, content_bytes)?;
        } else if ft.is_file() || ft.is_symlink() {
            if ft.is_file() {
                *content_bytes += meta.len();
            }
            tar.append_path_with_name(&path, &name)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is a socket, device or FIFO: artifacts hold files, directories and links",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Unpacks `archive` (of `kind`) to `dest`: the directory itself for a directory
/// artifact (created; it must not exist yet), the file for a file artifact.
pub fn unpack(archive: &Path, kind: ArtifactKind, dest: &Path) -> io::Result<()> {
    let reader = BufReader::with_capacity(BUF, File::open(archive)?);
    unpack_from(reader, kind, dest)
}

/// Like [`unpack`], from any reader of the archive's bytes.
pub fn unpack_from(reader: impl Read, kind: ArtifactKind, dest: &Path) -> io::Result<()> {
    let decoder = zstd::stream::Decoder::new(reader)?;
    let mut tar = tar::Archive::new(decoder);
    tar.set_preserve_permissions(true);
    tar.set_preserve_mtime(true);
    tar.set_overwrite(false);
    match kind {
        ArtifactKind::File => {
            let parent = dest.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent)?;
            let mut entries = tar.entries()?;
            let mut entry = entries
                .next()
                .ok_or_else(|| bad("the archive is empty"))??;
            if entry.path()?.as_ref() != Path::new(FILE_ENTRY)
                || entry.header().entry_type() != tar::EntryType::Regular
            {
                return Err(bad("a file artifact must hold one regular file"));
            }
            entry.unpack(dest)?;
            if entries.next().is_some() {
                let _ = std::fs::remove_file(dest);
                return Err(bad("a file artifact must hold one regular file"));
            }
            Ok(())
        }
        _ => {
            std::fs::create_dir_all(dest)?;
            for entry in tar.entries()? {
                let mut entry = entry?;
                // `unpack_in` refuses paths leaving `dest` (and links pointing out of it).
                if !entry.unpack_in(dest)? {
                    return Err(bad(format!(
                        "entry {} would land outside the destination",
                        entry.path()?.display()
                    )));
                }
            }
            Ok(())
        }
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A temporary archive path next to `dir` (`<dir>/.<name>.<random>.tar.zst`).
pub fn temp_archive(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.{:016x}.tar.zst", rand::random::<u64>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("bin/sub")).unwrap();
        std::fs::write(root.join("bin/app"), b"\x7fELF binary").unwrap();
        std::fs::write(root.join("bin/sub/data.txt"), "hello\n".repeat(1000)).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::os::unix::fs::symlink("app", root.join("bin/link")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("bin/app"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }

    #[test]
    fn directories_round_trip_with_modes_links_and_empty_dirs() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        tree(&src);
        let archive = d.path().join("a.tar.zst");
        let p = pack(&src, &archive).unwrap();
        assert_eq!(p.kind, ArtifactKind::Directory);
        assert_eq!(p.size, std::fs::metadata(&archive).unwrap().len());
        assert_eq!(p.sha256, sha256_file(&archive).unwrap());
        assert_eq!(p.content_bytes, 11 + 6000);
        let out = d.path().join("out");
        unpack(&archive, p.kind, &out).unwrap();
        assert_eq!(
            std::fs::read(out.join("bin/app")).unwrap(),
            b"\x7fELF binary"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("bin/sub/data.txt")).unwrap(),
            "hello\n".repeat(1000)
        );
        assert!(out.join("empty").is_dir());
        assert_eq!(
            std::fs::read_link(out.join("bin/link")).unwrap(),
            Path::new("app")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("bin/app"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        // Equal trees pack to equal archives.
        let again = pack(&src, &d.path().join("b.tar.zst")).unwrap();
        assert_eq!(again.sha256, p.sha256);
    }

    #[test]
    fn files_round_trip_under_any_name() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("report.json");
        std::fs::write(&src, br#"{"ok":true}"#).unwrap();
        let archive = d.path().join("a.tar.zst");
        let p = pack(&src, &archive).unwrap();
        assert_eq!(p.kind, ArtifactKind::File);
        let dest = d.path().join("deep/dir/renamed.json");
        unpack(&archive, p.kind, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), br#"{"ok":true}"#);
    }

    #[test]
    fn hostile_archives_do_not_escape() {
        let d = tempfile::tempdir().unwrap();
        // A tar whose entry climbs out with `..`, written by hand (the builder refuses it).
        let archive = d.path().join("evil.tar.zst");
        {
            let f = File::create(&archive).unwrap();
            let mut enc = zstd::stream::Encoder::new(f, 3).unwrap();
            let mut header = tar::Header::new_gnu();
            let data = b"pwned";
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            let name = b"../escaped.txt";
            header.as_old_mut().name[..name.len()].copy_from_slice(name);
            header.set_cksum();
            let mut tar = tar::Builder::new(&mut enc);
            tar.append(&header, &data[..]).unwrap();
            tar.finish().unwrap();
            drop(tar);
            enc.finish().unwrap();
        }
        let out = d.path().join("out");
        assert!(unpack(&archive, ArtifactKind::Directory, &out).is_err());
        assert!(!d.path().join("escaped.txt").exists());
        // A directory archive is not a file artifact.
        let src = d.path().join("src");
        tree(&src);
        let dir_archive = d.path().join("dir.tar.zst");
        pack(&src, &dir_archive).unwrap();
        assert!(unpack(&dir_archive, ArtifactKind::File, &d.path().join("f")).is_err());
    }

    #[test]
    fn special_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
        let err = pack(&src, &d.path().join("a.tar.zst")).unwrap_err();
        assert!(err.to_string().contains("socket"), "{err}");
        drop(sock);
    }

    #[test]
    fn sha256_is_the_standard_one() {
        let mut h = Sha256::default();
        h.update(b"abc");
        assert_eq!(
            h.finish(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256(
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        ));
        assert!(!is_sha256("BA78"));
    }
}
