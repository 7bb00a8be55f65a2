//! `Container.publish`: pushing an image to a registry of the fixtures.
//!
//! A registry host listed in `registries.json` (`{"registry.test": {"username": "bot",
//! "password": "s3cret"}}`) requires a `withRegistryAuth` for that host whose username and
//! secret value match; any other host accepts anonymous pushes. A push writes the image —
//! a deterministic tar of the container's filesystem — to `registry/sha256/<digest>.tar`
//! and appends `{"address","digest","at_ms"}` to `pushes.jsonl` in the fixtures directory.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::engine::Engine;
use crate::error::{Context, Failure};
use crate::object::Ctr;
use crate::records::{Push, now_ms};

/// Credentials a registry of the fixtures requires.
#[derive(Debug, Clone, Default, Deserialize)]
struct Credentials {
    username: String,
    password: String,
}

/// The registry host of an image address (`docker.io` when it names none).
pub(crate) fn registry_host(address: &str) -> String {
    let address = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    let first = address.split('/').next().unwrap_or_default();
    if first.contains('.') || first.contains(':') || first == "localhost" {
        first.split('@').next().unwrap_or(first).to_string()
    } else {
        "docker.io".into()
    }
}

impl Engine {
    /// Pushes `ctr` to `address`; returns `<address>@sha256:<digest>`.
    pub(crate) fn publish(&self, ctr: &Ctr, address: &str) -> Result<String, Failure> {
        let fixtures = self.fixtures("publish")?.to_path_buf();
        let host = registry_host(address);
        let registries: BTreeMap<String, Credentials> = self.fixture_table("registries.json")?;
        if let Some(want) = registries.get(&host) {
            let mut allowed = false;
            for auth in ctr
                .registry_auth
                .iter()
                .filter(|a| registry_host(&a.address) == host)
            {
                if auth.username == want.username && self.secret(&auth.secret)? == want.password {
                    allowed = true;
                }
            }
            if !allowed {
                return Err(Failure::engine(format!(
                    "failed to push {address}: 401 Unauthorized: authentication required to push to {host}"
                )));
            }
        }
        let view = self.ctr_view(ctr)?;
        let registry = fixtures.join("registry");
        let blobs = registry.join("sha256");
        fs::create_dir_all(&blobs)?;
        let staged = tempfile::NamedTempFile::new_in(&registry)?;
        let mut hashing = HashingWriter {
            inner: staged.as_file(),
            hasher: Sha256::new(),
        };
        {
            let mut builder = tar::Builder::new(&mut hashing);
            builder.follow_symlinks(false);
            append_tree(&mut builder, &view.root, "")
                .context(|| format!("packing the image for {address}"))?;
            builder.finish()?;
        }
        hashing.inner.flush()?;
        let digest = hex::encode(hashing.hasher.finalize());
        staged
            .persist(blobs.join(format!("{digest}.tar")))
            .map_err(|e| Failure::engine(format!("fake engine: storing the pushed image: {e}")))?;
        let push = Push {
            address: address.to_string(),
            digest: digest.clone(),
            at_ms: now_ms(),
            entrypoint: ctr.entrypoint.clone(),
        };
        append_line(&fixtures, "pushes.jsonl", &push)?;
        self.progress(&format!("pushed {address}@sha256:{digest}"));
        Ok(format!("{address}@sha256:{digest}"))
    }
}

/// Appends a JSON line to a fixtures file, under a lock beside it.
fn append_line<T: serde::Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), Failure> {
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!(".{name}.lock")))?;
    lock.lock()?;
    let mut line = serde_json::to_vec(value).map_err(|e| Failure::engine(e.to_string()))?;
    line.push(b'\n');
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))?
        .write_all(&line)?;
    Ok(())
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Appends the tree under `dir` in name order, with zeroed times and owners, so the same
/// filesystem always packs to the same bytes.
fn append_tree<W: Write>(builder: &mut tar::Builder<W>, dir: &Path, rel: &str) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = format!("{rel}{}", name.to_string_lossy());
        let meta = fs::symlink_metadata(&path)?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(crate::fsutil::mode_of(&meta));
        if meta.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, format!("{rel}/"), io::empty())?;
            append_tree(builder, &path, &format!("{rel}/"))?;
        } else if meta.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, &rel, fs::read_link(&path)?)?;
        } else if meta.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            builder.append_data(&mut header, &rel, fs::File::open(&path)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(registry_host("registry.test/acme/app:1"), "registry.test");
        assert_eq!(registry_host("registry.test"), "registry.test");
        assert_eq!(registry_host("localhost:5000/app"), "localhost:5000");
        assert_eq!(registry_host("alpine"), "docker.io");
        assert_eq!(registry_host("acme/app:1"), "docker.io");
        assert_eq!(registry_host("https://ghcr.io/acme"), "ghcr.io");
    }
}
