//! What tests use to set up the engine's world and read what happened in it.
//!
//! - [`Fixtures`]: the outside world, shared by every engine that names it — image
//!   overlays, `git.json`, `http.json`, `registries.json`, and the pushes that came back.
//! - [`EngineState`]: one simulated engine's state directory — the exec log and the cache
//!   volumes.
//! - [`LocalRepo`]: a local git repository to stand behind a `git.json` URL.
//! - [`runner_host`] / [`fake_dagger_bin`]: how a worker is pointed at the fake.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::records::{ExecRecord, Push, read_jsonl};

/// The `fake-dagger` binary built beside the running test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/fake-dagger`). Panics with a hint
/// when it is not built.
pub fn fake_dagger_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the current executable");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("fake-dagger");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace --all-targets)",
        bin.display()
    );
    bin
}

/// The runner host (`[dagger].runner_host`, `_EXPERIMENTAL_DAGGER_RUNNER_HOST`) of the engine
/// whose state is in `state`, with the world in `fixtures`: `fake://<state>?fixtures=<dir>`.
pub fn runner_host(state: &Path, fixtures: Option<&Path>) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.');
    let escape =
        |p: &Path| percent_encoding::utf8_percent_encode(&p.to_string_lossy(), KEEP).to_string();
    match fixtures {
        Some(f) => format!("fake://{}?fixtures={}", escape(state), escape(f)),
        None => format!("fake://{}", escape(state)),
    }
}

/// The directory name of an image reference under `images/` (`/` → `__`).
pub fn image_dir_name(reference: &str) -> String {
    reference.replace('/', "__")
}

/// Credentials a registry of the fixtures requires.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Credentials {
    username: String,
    password: String,
}

/// The outside world of one or more fake engines.
#[derive(Debug, Clone)]
pub struct Fixtures {
    dir: PathBuf,
}

impl Fixtures {
    /// Fixtures in `dir` (created). It must be absolute.
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        if !dir.is_absolute() {
            return Err(io::Error::other("the fixtures dir must be absolute"));
        }
        fs::create_dir_all(dir.join("images"))?;
        Ok(Self { dir })
    }

    /// The fixtures directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The overlay directory of image `reference` (created): its files are laid over the
    /// base root filesystem of containers `from` that image.
    pub fn image_dir(&self, reference: &str) -> io::Result<PathBuf> {
        let dir = self.dir.join("images").join(image_dir_name(reference));
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Puts a file at container path `path` in image `reference`.
    pub fn image_file(
        &self,
        reference: &str,
        path: &str,
        contents: impl AsRef<[u8]>,
        mode: u32,
    ) -> io::Result<()> {
        let file = self
            .image_dir(reference)?
            .join(path.trim_start_matches('/'));
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&file, contents)?;
        fs::set_permissions(&file, fs::Permissions::from_mode(mode))
    }

    /// Puts an executable script answering command `name` at `/usr/local/bin/<name>` in
    /// image `reference` (`#!/bin/sh` is added when the script has no `#!` line).
    pub fn image_tool(&self, reference: &str, name: &str, script: &str) -> io::Result<()> {
        let body = if script.starts_with("#!") {
            script.to_string()
        } else {
            format!("#!/bin/sh\n{script}")
        };
        self.image_file(reference, &format!("/usr/local/bin/{name}"), body, 0o755)
    }

    /// Puts the host's program `host` at container path `path` in image `reference`, with
    /// the shared libraries `ldd` says it needs at their host paths: a real tool where a
    /// busybox applet will not do (busybox's shell runs its own applets before any program in
    /// PATH, so `date` or `find` can only be replaced together with `/bin/sh`, e.g. by the
    /// host's dash).
    pub fn image_host_binary(&self, reference: &str, host: &Path, path: &str) -> io::Result<()> {
        let dir = self.image_dir(reference)?;
        let copy = |from: &Path, to: &str| -> io::Result<()> {
            let dest = dir.join(to.trim_start_matches('/'));
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)?;
            }
            let _ = fs::remove_file(&dest);
            fs::copy(from, &dest)?;
            let mode = fs::metadata(from)?.permissions().mode() & 0o7777;
            fs::set_permissions(&dest, fs::Permissions::from_mode(mode | 0o444))
        };
        copy(host, path)?;
        let out = Command::new("ldd").arg(host).output()?;
        if !out.status.success() {
            // A static program needs nothing more.
            return Ok(());
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux… (0x…)"
            let lib = line
                .split("=>")
                .last()
                .and_then(|r| r.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            if let Some(lib) = lib {
                let real = fs::canonicalize(lib)?;
                copy(&real, lib)?;
            }
        }
        Ok(())
    }

    /// Makes `from(reference)` fail with `message` (a GraphQL error).
    pub fn fail_image(&self, reference: &str, message: &str) -> io::Result<()> {
        let path = self
            .dir
            .join("images")
            .join(format!("{}.error", image_dir_name(reference)));
        fs::write(path, message)
    }

    /// Serves `url` to `git(url)` from the local repository `repo`.
    pub fn git_repo(&self, url: &str, repo: &Path) -> io::Result<()> {
        self.update_table("git.json", |t: &mut BTreeMap<String, String>| {
            t.insert(url.to_string(), repo.to_string_lossy().into_owned());
        })
    }

    /// Serves `url` to `http(url)` from the file `path` (read when the URL is resolved).
    pub fn http_file(&self, url: &str, path: &Path) -> io::Result<()> {
        self.update_table("http.json", |t: &mut BTreeMap<String, String>| {
            t.insert(url.to_string(), path.to_string_lossy().into_owned());
        })
    }

    /// Makes registry `host` require `username` and `password` for pushes.
    pub fn registry(&self, host: &str, username: &str, password: &str) -> io::Result<()> {
        self.update_table(
            "registries.json",
            |t: &mut BTreeMap<String, Credentials>| {
                t.insert(
                    host.to_string(),
                    Credentials {
                        username: username.to_string(),
                        password: password.to_string(),
                    },
                );
            },
        )
    }

    /// Every push so far, oldest first.
    pub fn pushes(&self) -> io::Result<Vec<Push>> {
        read_jsonl(&self.dir.join("pushes.jsonl"))
    }

    /// The pushed image (a tar of its root filesystem) with hex digest `digest`.
    pub fn pushed_image(&self, digest: &str) -> PathBuf {
        self.dir
            .join("registry/sha256")
            .join(format!("{digest}.tar"))
    }

    /// Rewrites a JSON table atomically (the engine never reads half of it).
    fn update_table<T>(&self, name: &str, change: impl FnOnce(&mut T)) -> io::Result<()>
    where
        T: Serialize + for<'de> Deserialize<'de> + Default,
    {
        let path = self.dir.join(name);
        let mut table: T = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => T::default(),
            Err(e) => return Err(e),
        };
        change(&mut table);
        let staged = tempfile::NamedTempFile::new_in(&self.dir)?;
        fs::write(
            staged.path(),
            serde_json::to_vec_pretty(&table).map_err(io::Error::other)?,
        )?;
        staged.persist(&path).map_err(|e| e.error)?;
        Ok(())
    }
}

/// The state directory of one simulated engine (persistent, like a real engine's).
#[derive(Debug, Clone)]
pub struct EngineState {
    dir: PathBuf,
}

impl EngineState {
    /// The engine whose state is in `dir` (created). It must be absolute.
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        if !dir.is_absolute() {
            return Err(io::Error::other("the engine state dir must be absolute"));
        }
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The runner host of this engine (see [`runner_host`]).
    pub fn runner_host(&self, fixtures: Option<&Fixtures>) -> String {
        runner_host(&self.dir, fixtures.map(Fixtures::dir))
    }

    /// Every exec evaluation so far, oldest first: real runs and cache answers.
    pub fn execs(&self) -> io::Result<Vec<ExecRecord>> {
        read_jsonl(&self.dir.join("execs.jsonl"))
    }

    /// The real runs so far (`cached: false`).
    pub fn runs(&self) -> io::Result<Vec<ExecRecord>> {
        Ok(self.execs()?.into_iter().filter(|r| !r.cached).collect())
    }

    /// How many times a process really ran with exactly `args`.
    pub fn runs_of(&self, args: &[&str]) -> io::Result<usize> {
        Ok(self.runs()?.iter().filter(|r| r.args == args).count())
    }

    /// The content directory of cache volume `key`, if an exec ever used it.
    pub fn cache_volume(&self, key: &str) -> Option<PathBuf> {
        let (_, dir) = crate::store::Store::volume_path(&self.dir, key);
        Some(dir.join("data")).filter(|d| d.is_dir())
    }

    /// The keys of every cache volume an exec used, sorted.
    pub fn cache_volumes(&self) -> io::Result<Vec<String>> {
        let mut keys = Vec::new();
        let dir = self.dir.join("volumes");
        if !dir.is_dir() {
            return Ok(keys);
        }
        for entry in fs::read_dir(dir)? {
            if let Ok(name) = fs::read_to_string(entry?.path().join("name")) {
                keys.push(name);
            }
        }
        keys.sort();
        Ok(keys)
    }
}

/// A local git repository (branch `main`) to serve a `git.json` URL.
#[derive(Debug, Clone)]
pub struct LocalRepo {
    dir: PathBuf,
}

impl LocalRepo {
    /// A new repository in `dir` (created), with branch `main` and no commits.
    pub fn init(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let repo = Self { dir: dir.into() };
        fs::create_dir_all(&repo.dir)?;
        repo.git(&["init", "--quiet", "--initial-branch=main"])?;
        Ok(repo)
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `files` (path, content), commits everything and returns the commit id.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> io::Result<String> {
        for (path, content) in files {
            let file = self.dir.join(path);
            if let Some(parent) = file.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(file, content)?;
        }
        self.git(&["add", "--all"])?;
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message])?;
        self.git(&["rev-parse", "HEAD"])
    }

    /// Tags the current commit.
    pub fn tag(&self, name: &str) -> io::Result<()> {
        self.git(&["tag", name]).map(drop)
    }

    fn git(&self, args: &[&str]) -> io::Result<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.dir)
            .args([
                "-c",
                "user.name=Scabbard Tests",
                "-c",
                "user.email=tests@scabbard.invalid",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .output()
            .map_err(|e| io::Error::other(format!("running git (install git): {e}")))?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "git {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}
