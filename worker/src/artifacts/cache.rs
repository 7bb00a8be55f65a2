//! The worker's cache of input artifacts, keyed by the SHA-256 of their archive.
//!
//! Layout: `<root>/<sha256>/content` is the unpacked file or directory of one archive whose
//! digest was checked. An entry is built in `<root>/.tmp-<random>/` (archive downloaded
//! there, checked, unpacked to `content`, archive deleted) and renamed into place, so a crash
//! never leaves a half entry under a digest's name; leftovers are deleted when the cache
//! opens. Concurrent attempts needing the same digest fetch it once: the others wait for
//! that fetch and reuse its entry.
//!
//! Entries are read-only and shared: callers hold a [`CacheLease`] while an attempt uses
//! one, and copy from it, never change it. The cache is bounded by bytes of unpacked content:
//! beyond the bound the least recently used entries that no lease holds are evicted (renamed
//! out of the way, then deleted). An entry larger than the bound lives only while it is used.
//!
//! All file-system work runs on the blocking pool; the state lock is never held across an
//! `.await`. The root is private to the worker's user (0700). The cache does not know where
//! archives come from: [`ArtifactCache::get`] takes the fetch as a function.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use scabbard_common::artifact::{is_sha256, sha256_file, unpack};
use scabbard_common::proto::{ArtifactKind, ArtifactRef};
use scabbard_common::{Error, Result};

/// Name of an entry's unpacked content.
const CONTENT: &str = "content";
/// Prefix of entries being built.
const TMP_PREFIX: &str = ".tmp-";
/// Prefix of evicted entries being deleted.
const EVICT_PREFIX: &str = ".evict-";

/// A bounded, digest-keyed cache of unpacked artifacts (cheap to clone).
#[derive(Clone)]
pub(crate) struct ArtifactCache {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// One lock per digest being fetched: the first caller fetches, the others wait.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Bytes of content of every entry.
    total: u64,
    /// Moves on every use; orders entries by recency.
    clock: u64,
}

struct Entry {
    kind: ArtifactKind,
    size: u64,
    last_used: u64,
    /// Leases held.
    pins: u32,
}

/// One attempt's use of a cache entry; the entry cannot be evicted while this lives.
pub(crate) struct CacheLease {
    inner: Arc<Inner>,
    sha256: String,
    /// The unpacked file or directory (read-only: copy it, never change it).
    pub(crate) content: PathBuf,
    /// File or directory.
    pub(crate) kind: ArtifactKind,
    /// Bytes of unpacked content.
    pub(crate) size: u64,
    /// Whether this call fetched the entry (false: it was cached).
    pub(crate) fetched: bool,
}

impl std::fmt::Debug for CacheLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLease")
            .field("sha256", &self.sha256)
            .field("content", &self.content)
            .field("fetched", &self.fetched)
            .finish()
    }
}

impl Drop for CacheLease {
    fn drop(&mut self) {
        let over = {
            let mut s = self.inner.lock();
            s.clock += 1;
            let clock = s.clock;
            if let Some(e) = s.entries.get_mut(&self.sha256) {
                e.pins = e.pins.saturating_sub(1);
                e.last_used = clock;
            }
            s.total > self.inner.max_bytes
        };
        if over {
            let inner = self.inner.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(move || inner.evict());
                }
                Err(_) => inner.evict(),
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A lease on `sha256` if it is cached (pins it and marks it used).
    fn lease(self: &Arc<Self>, sha256: &str, fetched: bool) -> Option<CacheLease> {
        let mut s = self.lock();
        s.clock += 1;
        let clock = s.clock;
        let e = s.entries.get_mut(sha256)?;
        e.pins += 1;
        e.last_used = clock;
        Some(CacheLease {
            inner: self.clone(),
            sha256: sha256.to_string(),
            content: self.root.join(sha256).join(CONTENT),
            kind: e.kind,
            size: e.size,
            fetched,
        })
    }

    /// Evicts least recently used unpinned entries until the total fits (blocking).
    fn evict(&self) {
        let victims: Vec<PathBuf> = {
            let mut s = self.lock();
            let mut idle: Vec<(u64, String)> = s
                .entries
                .iter()
                .filter(|(_, e)| e.pins == 0)
                .map(|(k, e)| (e.last_used, k.clone()))
                .collect();
            idle.sort_unstable();
            let mut victims = Vec::new();
            for (_, sha) in idle {
                if s.total <= self.max_bytes {
                    break;
                }
                // Renamed while the lock is held, so a new fetch of the same digest can
                // never meet the old directory under its name.
                let trash = self.root.join(format!(
                    "{EVICT_PREFIX}{sha}-{:016x}",
                    rand::random::<u64>()
                ));
                if let Err(e) = std::fs::rename(self.root.join(&sha), &trash) {
                    tracing::warn!(sha256 = %sha, error = %e, "cannot evict an artifact cache entry");
                    continue;
                }
                if let Some(e) = s.entries.remove(&sha) {
                    s.total -= e.size;
                }
                victims.push(trash);
            }
            victims
        };
        for v in victims {
            if let Err(e) = std::fs::remove_dir_all(&v) {
                tracing::warn!(dir = %v.display(), error = %e, "cannot delete an evicted artifact");
            }
        }
    }
}

/// Deletes a half-built entry unless it was moved into place.
struct TmpDir(Option<PathBuf>);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else { return };
        let remove = move || {
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot delete a partial artifact");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(remove);
            }
            Err(_) => remove(),
        }
    }
}

impl ArtifactCache {
    /// Opens the cache at `root` (created 0700), adopting the entries a previous run left
    /// and deleting its half-built ones; evicts down to `max_bytes`.
    pub(crate) async fn open(root: &Path, max_bytes: u64) -> Result<Self> {
        let root = root.to_path_buf();
        let inner = tokio::task::spawn_blocking(move || -> Result<Inner> {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&root)?;
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
            let state = scan(&root)?;
            Ok(Inner {
                root,
                max_bytes,
                state: Mutex::new(state),
                fetching: Mutex::new(HashMap::new()),
            })
        })
        .await
        .map_err(Error::internal)??;
        let inner = Arc::new(inner);
        let evicting = inner.clone();
        tokio::task::spawn_blocking(move || evicting.evict())
            .await
            .map_err(Error::internal)?;
        Ok(Self { inner })
    }

    /// The entry of `artifact`'s digest, fetched first if it is not cached: `fetch` writes
    /// the archive to the path it is given; the archive's SHA-256 and size are then checked
    /// against `artifact` (a mismatch is refused and nothing is kept) and it is unpacked.
    pub(crate) async fn get<F, Fut>(&self, artifact: &ArtifactRef, fetch: F) -> Result<CacheLease>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let sha = artifact.sha256.as_str();
        if !is_sha256(sha) {
            return Err(Error::invalid(format!(
                "artifact {}/{} has no valid SHA-256 ({sha:?})",
                artifact.task_id, artifact.name
            )));
        }
        if let Some(lease) = self.inner.lease(sha, false) {
            return Ok(lease);
        }
        let lock = {
            let mut f = self
                .inner
                .fetching
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            f.entry(sha.to_string()).or_default().clone()
        };
        let result = async {
            let _fetching = lock.lock().await;
            // Whoever held the lock before may have fetched it.
            if let Some(lease) = self.inner.lease(sha, false) {
                return Ok(lease);
            }
            self.fetch_into_place(artifact, fetch).await
        }
        .await;
        {
            let mut f = self
                .inner
                .fetching
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Only the map and this call hold it: nobody else waits on it.
            if Arc::strong_count(&lock) == 2 {
                f.remove(sha);
            }
        }
        result
    }

    async fn fetch_into_place<F, Fut>(&self, artifact: &ArtifactRef, fetch: F) -> Result<CacheLease>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let kind = artifact.kind();
        if !matches!(kind, ArtifactKind::File | ArtifactKind::Directory) {
            return Err(Error::invalid(format!(
                "artifact {}/{} has no kind (file or directory)",
                artifact.task_id, artifact.name
            )));
        }
        let tmp = self.inner.root.join(format!(
            "{TMP_PREFIX}{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        ));
        tokio::fs::create_dir(&tmp).await?;
        let mut guard = TmpDir(Some(tmp.clone()));
        let archive = tmp.join("archive.tar.zst");
        fetch(archive.clone()).await?;
        let inner = self.inner.clone();
        let want = artifact.clone();
        let placed =
            tokio::task::spawn_blocking(move || place(&inner, &tmp, &archive, &want, kind))
                .await
                .map_err(Error::internal)?;
        let size = placed?;
        guard.0 = None;
        let lease = self
            .inner
            .lease(&artifact.sha256, true)
            .ok_or_else(|| Error::internal("a cache entry vanished right after it was added"))?;
        if self.inner.lock().total > self.inner.max_bytes {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || inner.evict())
                .await
                .map_err(Error::internal)?;
        }
        tracing::debug!(sha256 = %artifact.sha256, size, "artifact cached");
        Ok(lease)
    }

    /// Bytes of content cached now.
    #[cfg(test)]
    pub(crate) fn total_bytes(&self) -> u64 {
        self.inner.lock().total
    }

    /// Digests cached now.
    #[cfg(test)]
    pub(crate) fn digests(&self) -> Vec<String> {
        let mut d: Vec<String> = self.inner.lock().entries.keys().cloned().collect();
        d.sort();
        d
    }
}

/// Checks the archive in `tmp`, unpacks it, moves `tmp` to `<root>/<sha256>` and records
/// the entry (blocking). Returns the content's size.
fn place(
    inner: &Inner,
    tmp: &Path,
    archive: &Path,
    want: &ArtifactRef,
    kind: ArtifactKind,
) -> Result<u64> {
    let what = format!("artifact {}/{}", want.task_id, want.name);
    let size = std::fs::metadata(archive)?.len();
    let digest = sha256_file(archive)?;
    if digest != want.sha256 || (want.size > 0 && size != want.size) {
        return Err(Error::Internal(format!(
            "{what}: the archive has SHA-256 {digest} and {size} bytes, expected {} and {} bytes: refused",
            want.sha256, want.size
        )));
    }
    let content = tmp.join(CONTENT);
    unpack(archive, kind, &content)
        .map_err(|e| Error::Internal(format!("{what}: cannot unpack the archive: {e}")))?;
    std::fs::remove_file(archive)?;
    let bytes = content_bytes(&content)?;
    let dest = inner.root.join(&want.sha256);
    let mut s = inner.lock();
    // Under the lock: eviction renames entries away under it too.
    if let Err(e) = std::fs::rename(tmp, &dest) {
        // A directory under the digest's name that no entry accounts for: stale.
        if dest.exists() && !s.entries.contains_key(&want.sha256) {
            std::fs::remove_dir_all(&dest)?;
            std::fs::rename(tmp, &dest)?;
        } else {
            return Err(e.into());
        }
    }
    s.clock += 1;
    let clock = s.clock;
    s.total += bytes;
    s.entries.insert(
        want.sha256.clone(),
        Entry {
            kind,
            size: bytes,
            last_used: clock,
            pins: 0,
        },
    );
    Ok(bytes)
}

/// Bytes of the regular files under `path` (links and directories count nothing).
fn content_bytes(path: &Path) -> io::Result<u64> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(if meta.is_file() { meta.len() } else { 0 });
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        total += content_bytes(&entry?.path())?;
    }
    Ok(total)
}

/// Adopts complete entries under `root`, oldest (by modification time) first, and deletes
/// half-built or half-evicted ones.
fn scan(root: &Path) -> Result<State> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(TMP_PREFIX) || name.starts_with(EVICT_PREFIX) || !is_sha256(&name) {
            tracing::info!(path = %path.display(), "deleting a leftover in the artifact cache");
            let removed = if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete it");
            }
            continue;
        }
        let content = path.join(CONTENT);
        let kind = match std::fs::symlink_metadata(&content) {
            Ok(m) if m.is_dir() => ArtifactKind::Directory,
            Ok(m) if m.is_file() => ArtifactKind::File,
            _ => {
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
        };
        let modified = entry.metadata()?.modified().ok();
        found.push((modified, name, kind, content_bytes(&content)?));
    }
    found.sort();
    let mut state = State::default();
    for (_, sha, kind, size) in found {
        state.clock += 1;
        state.total += size;
        state.entries.insert(
            sha,
            Entry {
                kind,
                size,
                last_used: state.clock,
                pins: 0,
            },
        );
    }
    Ok(state)
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
