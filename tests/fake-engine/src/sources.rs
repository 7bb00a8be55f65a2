//! What comes from outside the engine, read when its ID is resolved: images (fixture
//! overlays), host directories and files, git repositories (`git.json` → a local repository,
//! resolved with the host's `git`) and downloads (`http.json` → a local file). Everything
//! read is copied into the content store, so later changes outside never change an ID
//! already handed out, and a change is seen by the next resolution.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::engine::Engine;
use crate::error::{Context, Failure};
use crate::fixtures::image_dir_name;
use crate::fsutil;
use crate::object::{Dir, FileObj, Filter};
use crate::store::NO_OVERLAY;

/// How `git(url)` picks a commit.
pub(crate) enum RefKind {
    /// `ref(name)`: a branch, a tag, a full ref or a commit.
    Any(String),
    Branch(String),
    Tag(String),
    Commit(String),
    Head,
}

impl Engine {
    /// The content digest of image `reference`'s fixture files ([`NO_OVERLAY`] when it has
    /// none); the image's `.error` file makes this fail with its text.
    pub(crate) fn image_overlay(&self, reference: &str) -> Result<String, Failure> {
        let Some(fixtures) = &self.fixtures else {
            return Ok(NO_OVERLAY.into());
        };
        let name = image_dir_name(reference);
        let dir = fixtures.join("images").join(&name);
        let error_file = fixtures.join("images").join(format!("{name}.error"));
        if let Ok(message) = fs::read_to_string(&error_file) {
            return Err(Failure::engine(message.trim().to_string()));
        }
        if !dir.is_dir() {
            return Ok(NO_OVERLAY.into());
        }
        self.snapshot_tree(&dir, None)
    }

    /// Copies a host tree into the content store; returns its digest.
    fn snapshot_tree(&self, src: &Path, filter: Option<&Filter>) -> Result<String, Failure> {
        let scratch = self.store.scratch()?;
        let staged = scratch.path().join("tree");
        fsutil::copy_tree(src, &staged, filter).context(|| format!("reading {}", src.display()))?;
        self.store.add_tree(&staged)
    }

    /// `host.directory(path, …)`: the directory as it is now.
    pub(crate) fn host_directory(&self, path: &str, filter: &Filter) -> Result<Dir, Failure> {
        let host = self.host_path(path);
        if !host.is_dir() {
            return Err(Failure::engine(format!(
                "fake engine: host directory {}: no such directory",
                host.display()
            )));
        }
        let digest = self.snapshot_tree(&host, (!filter.is_empty()).then_some(filter))?;
        Ok(Dir::Content {
            digest,
            sub: "/".into(),
        })
    }

    /// Copies a host file into the blob store.
    fn snapshot_file(&self, src: &Path, mode: Option<u32>) -> Result<String, Failure> {
        let meta = fs::metadata(src).context(|| format!("reading {}", src.display()))?;
        if !meta.is_file() {
            return Err(Failure::engine(format!(
                "fake engine: {} is not a file",
                src.display()
            )));
        }
        let scratch = self.store.scratch()?;
        let staged = scratch.path().join("file");
        fs::copy(src, &staged).context(|| format!("reading {}", src.display()))?;
        self.store
            .add_blob(&staged, mode.unwrap_or(meta.permissions().mode() & 0o7777))
    }

    /// `host.file(path)`: the file as it is now.
    pub(crate) fn host_file(&self, path: &str) -> Result<FileObj, Failure> {
        let host = self.host_path(path);
        let digest = self.snapshot_file(&host, None)?;
        Ok(FileObj::Blob {
            digest,
            name: file_name(&host.to_string_lossy()),
        })
    }

    /// `http(url)`: the file `http.json` maps the URL to, as it is now.
    pub(crate) fn http_file(
        &self,
        url: &str,
        name: Option<String>,
        permissions: Option<u32>,
    ) -> Result<FileObj, Failure> {
        let table: BTreeMap<String, String> = self.fixture_table("http.json")?;
        let Some(path) = table.get(url) else {
            return Err(Failure::engine(format!(
                "fake engine: http {url}: no such URL in http.json (the fake has no network)"
            )));
        };
        let digest = self.snapshot_file(Path::new(path), Some(permissions.unwrap_or(0o644)))?;
        Ok(FileObj::Blob {
            digest,
            name: name.unwrap_or_else(|| file_name(url.split(['?', '#']).next().unwrap_or(url))),
        })
    }

    /// Reads a JSON map from the fixtures directory (missing file: empty).
    pub(crate) fn fixture_table<T: for<'de> serde::Deserialize<'de> + Default>(
        &self,
        name: &str,
    ) -> Result<T, Failure> {
        let path = self.fixtures(name)?.join(name);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Failure::engine(format!("fake engine: {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(Failure::engine(format!(
                "fake engine: {}: {e}",
                path.display()
            ))),
        }
    }

    /// The local repository `git.json` maps `url` to (a `.git` suffix may differ).
    pub(crate) fn git_repo(&self, url: &str) -> Result<PathBuf, Failure> {
        let table: BTreeMap<String, String> = self.fixture_table("git.json")?;
        let alt = match url.strip_suffix(".git") {
            Some(bare) => bare.to_string(),
            None => format!("{url}.git"),
        };
        table
            .get(url)
            .or_else(|| table.get(&alt))
            .map(PathBuf::from)
            .ok_or_else(|| {
                Failure::engine(format!(
                    "fake engine: git {url}: no such repository in git.json (the fake has no network)"
                ))
            })
    }

    /// The commit a ref of `url` names now.
    pub(crate) fn git_resolve(&self, url: &str, which: &RefKind) -> Result<String, Failure> {
        let repo = self.git_repo(url)?;
        let (shown, candidates): (String, Vec<String>) = match which {
            RefKind::Any(name) => (
                name.into(),
                vec![
                    format!("refs/heads/{name}"),
                    format!("refs/tags/{name}"),
                    name.to_string(),
                ],
            ),
            RefKind::Branch(name) => (
                format!("branch {name}"),
                vec![format!(
                    "refs/heads/{}",
                    name.trim_start_matches("refs/heads/")
                )],
            ),
            RefKind::Tag(name) => (
                format!("tag {name}"),
                vec![format!(
                    "refs/tags/{}",
                    name.trim_start_matches("refs/tags/")
                )],
            ),
            RefKind::Commit(id) => (format!("commit {id}"), vec![id.to_string()]),
            RefKind::Head => ("HEAD".into(), vec!["HEAD".into()]),
        };
        for candidate in candidates {
            let out = git(&repo)
                .args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
                .arg(format!("{candidate}^{{commit}}"))
                .output()
                .context(|| "running git (install git)".into())?;
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
            }
        }
        Err(Failure::engine(format!(
            "fake engine: git {url}: {shown} not found in {}",
            repo.display()
        )))
    }

    /// The tree of `commit` (with its `.git` if `git_dir`), from the content store when
    /// this commit was read before.
    pub(crate) fn git_tree(&self, url: &str, commit: &str, git_dir: bool) -> Result<Dir, Failure> {
        let name = if git_dir {
            format!("{commit}.git")
        } else {
            commit.to_string()
        };
        let done = |digest: String| Dir::Content {
            digest,
            sub: "/".into(),
        };
        if let Some(digest) = self.store.git_tree(&name) {
            return Ok(done(digest));
        }
        let _lock = self.store.lock(&format!("git-{name}"))?;
        if let Some(digest) = self.store.git_tree(&name) {
            return Ok(done(digest));
        }
        let repo = self.git_repo(url)?;
        let scratch = self.store.scratch()?;
        let tree = scratch.path().join("tree");
        if git_dir {
            run_git(
                git(scratch.path())
                    .args(["clone", "--quiet", "--no-checkout", "--no-hardlinks", "--"])
                    .arg(&repo)
                    .arg(&tree),
            )?;
            run_git(git(&tree).args(["checkout", "--quiet", "--detach", commit]))?;
        } else {
            fs::create_dir_all(&tree)?;
            let out = git(&repo)
                .args(["archive", "--format=tar", commit])
                .stderr(Stdio::piped())
                .output()
                .context(|| "running git archive (install git)".into())?;
            if !out.status.success() {
                return Err(Failure::engine(format!(
                    "fake engine: git archive {commit}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            tar::Archive::new(out.stdout.as_slice())
                .unpack(&tree)
                .context(|| format!("unpacking {commit}"))?;
        }
        let digest = self.store.add_tree(&tree)?;
        self.store.set_git_tree(&name, &digest)?;
        Ok(done(digest))
    }
}

/// `git` in `dir`, trusting any owner (fixture repositories belong to whoever made them).
fn git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-c")
        .arg("safe.directory=*")
        .arg("-C")
        .arg(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null());
    cmd
}

fn run_git(cmd: &mut Command) -> Result<(), Failure> {
    let out = cmd
        .output()
        .context(|| "running git (install git)".into())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Failure::engine(format!(
            "fake engine: git failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn file_name(path: &str) -> String {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("index")
        .to_string()
}
