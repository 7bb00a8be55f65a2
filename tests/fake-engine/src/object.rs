//! The engine's objects as values, their IDs, and the exec cache key.
//!
//! Every object is plain data: a container is its base (nothing, an image, or the exec that
//! produced it), the file operations since that base, and its configuration (env, secret
//! variables by name, mounts, workdir, user, GPUs, registry auth). A `withExec` makes a new
//! base whose [`ExecNode::key`] is computed right away from the parent's identity and the
//! exec's inputs — running it is lazy, on the first field that needs its result.
//!
//! IDs are `fk1.` + base64url(JSON) of the object: opaque to clients, self-contained, and
//! they survive `node(id:)`. They never hold a secret's value (only its name: values live
//! in the session).
//!
//! The exec key ([`exec_key`]) is a SHA-256 over the parent's key and everything that can
//! change what the exec does, never over secret values or wall-clock time, like
//! BuildKit's cache keys: identical op chains share results, any difference runs again.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Failure;

/// Anything a client can hold an ID for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t")]
pub(crate) enum Object {
    Container(Ctr),
    Directory(Dir),
    File(FileObj),
    Secret {
        name: String,
    },
    CacheVolume {
        key: String,
    },
    GitRepository {
        url: String,
        keep_git_dir: bool,
    },
    GitRef {
        url: String,
        commit: String,
        keep_git_dir: bool,
    },
}

impl Object {
    /// The GraphQL type name.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Object::Container(_) => "Container",
            Object::Directory(_) => "Directory",
            Object::File(_) => "File",
            Object::Secret { .. } => "Secret",
            Object::CacheVolume { .. } => "CacheVolume",
            Object::GitRepository { .. } => "GitRepository",
            Object::GitRef { .. } => "GitRef",
        }
    }

    /// This object's ID.
    pub(crate) fn id(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!(
            "{ID_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// The object an ID names.
    pub(crate) fn from_id(id: &str) -> Result<Self, Failure> {
        let bad = || Failure::engine(format!("fake engine: malformed ID {}", shorten(id)));
        let body = id.strip_prefix(ID_PREFIX).ok_or_else(bad)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad())?;
        serde_json::from_slice(&json).map_err(|_| bad())
    }
}

const ID_PREFIX: &str = "fk1.";

fn shorten(s: &str) -> String {
    if s.len() <= 40 {
        s.to_string()
    } else {
        let mut end = 40;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

/// A container.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Ctr {
    pub(crate) base: Base,
    /// File operations since the base, in order.
    pub(crate) pending: Vec<FileOp>,
    /// Plain variables, in the order they were first set.
    pub(crate) env: Vec<(String, String)>,
    /// Secret variables: (variable, secret name).
    pub(crate) secret_env: Vec<(String, String)>,
    pub(crate) mounts: Vec<Mount>,
    /// Absolute; `None` is `/`.
    pub(crate) workdir: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) gpus: Option<Gpus>,
    pub(crate) registry_auth: Vec<RegistryAuth>,
    /// Image config only (`withEntrypoint`): execs never use it, so it is not in exec keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) entrypoint: Option<Vec<String>>,
}

impl Ctr {
    /// The working directory (`/` unless set).
    pub(crate) fn workdir(&self) -> &str {
        self.workdir.as_deref().unwrap_or("/")
    }

    /// `path` made absolute against the working directory.
    pub(crate) fn abs(&self, path: &str) -> String {
        absolute(self.workdir(), path)
    }

    /// The image at the root of this container's chain.
    pub(crate) fn image(&self) -> Option<&str> {
        match &self.base {
            Base::Scratch => None,
            Base::Image { reference, .. } => Some(reference),
            Base::Exec(node) => node.parent.image(),
        }
    }

    /// The exec whose result this container holds, if any.
    pub(crate) fn last_exec(&self) -> Option<&ExecNode> {
        match &self.base {
            Base::Exec(node) => Some(node),
            _ => None,
        }
    }

    /// Identity of this container's filesystem (base, pending operations, mounted
    /// directories), for directories and files taken from it.
    pub(crate) fn fs_identity(&self) -> String {
        #[derive(Serialize)]
        struct Fs {
            base: String,
            ops: Vec<String>,
            mounts: Vec<(String, String)>,
        }
        let fs = Fs {
            base: self.base.key(),
            ops: self.pending.iter().map(FileOp::identity).collect(),
            mounts: self
                .mounts
                .iter()
                .filter_map(|m| match &m.source {
                    MountSource::Directory(d) => Some((m.path.clone(), d.identity())),
                    MountSource::Cache { .. } => None,
                })
                .collect(),
        };
        sha256_json(&fs)
    }
}

/// `path` against `base` (both container paths), normalised (no `.`, `..` or `//`).
pub(crate) fn absolute(base: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{base}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) enum Base {
    /// `container` without `from`: an empty filesystem.
    #[default]
    Scratch,
    /// `from(address)`: the base root filesystem plus the image's fixture files, whose
    /// content digest was taken when `from` was resolved.
    Image { reference: String, digest: String },
    /// The result of an exec.
    Exec(Box<ExecNode>),
}

impl Base {
    /// The key a child exec builds on.
    pub(crate) fn key(&self) -> String {
        match self {
            Base::Scratch => "scratch".into(),
            Base::Image { reference, digest } => format!("image:{reference}@{digest}"),
            Base::Exec(node) => format!("exec:{}", node.key),
        }
    }
}

/// A `withExec`: the container it runs in, what it runs, and its cache key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ExecNode {
    pub(crate) parent: Ctr,
    pub(crate) spec: ExecSpec,
    pub(crate) key: String,
}

/// What a `withExec` runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ExecSpec {
    pub(crate) args: Vec<String>,
    pub(crate) expect: Expect,
    pub(crate) redirect_stdout: Option<String>,
    pub(crate) redirect_stderr: Option<String>,
    pub(crate) stdin: Option<String>,
}

/// Which exit codes are a success.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Expect {
    #[default]
    Success,
    Failure,
    Any,
}

impl Expect {
    /// Whether `code` meets the expectation.
    pub(crate) fn accepts(self, code: i32) -> bool {
        match self {
            Expect::Success => code == 0,
            Expect::Failure => code != 0,
            Expect::Any => true,
        }
    }
}

/// A file operation recorded on a container and applied when its filesystem is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum FileOp {
    /// `withDirectory`: merge a directory's content at `path`.
    Directory {
        path: String,
        dir: Dir,
        filter: Filter,
        owner: Option<String>,
    },
    /// `withFile`.
    File {
        path: String,
        file: FileObj,
        permissions: Option<u32>,
        owner: Option<String>,
    },
    /// `withNewFile`.
    NewFile {
        path: String,
        contents: String,
        permissions: Option<u32>,
        owner: Option<String>,
    },
    /// `withoutDirectory` / `withoutFile`: removes what is at `path` (nothing there is fine).
    Remove { path: String },
}

impl FileOp {
    /// What the operation writes, for keys: content identities, never host paths.
    pub(crate) fn identity(&self) -> String {
        let json = match self {
            FileOp::Directory {
                path,
                dir,
                filter,
                owner,
            } => serde_json::json!(["dir", path, dir.identity(), filter, owner]),
            FileOp::File {
                path,
                file,
                permissions,
                owner,
            } => serde_json::json!(["file", path, file.identity(), permissions, owner]),
            FileOp::NewFile {
                path,
                contents,
                permissions,
                owner,
            } => serde_json::json!([
                "new",
                path,
                hex::encode(Sha256::digest(contents.as_bytes())),
                permissions,
                owner
            ]),
            FileOp::Remove { path } => serde_json::json!(["remove", path]),
        };
        json.to_string()
    }
}

/// Include and exclude patterns (see [`crate::glob`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Filter {
    pub(crate) include: Vec<String>,
    pub(crate) exclude: Vec<String>,
}

impl Filter {
    pub(crate) fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }
}

/// A mount: visible to execs at `path`, never part of the container's filesystem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Mount {
    pub(crate) path: String,
    pub(crate) source: MountSource,
    pub(crate) owner: Option<String>,
}

/// What is mounted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum MountSource {
    /// `withMountedCache`: a named volume of the engine; its content is not part of keys.
    Cache { key: String, sharing: Sharing },
    /// `withMountedDirectory`: a read-write copy of a directory, discarded after the exec.
    Directory(Dir),
}

/// Cache volume sharing modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Sharing {
    #[default]
    Shared,
    Private,
    Locked,
}

/// GPUs exposed to execs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Gpus {
    All,
    Devices(Vec<String>),
}

impl Gpus {
    /// The value of `NVIDIA_VISIBLE_DEVICES`.
    pub(crate) fn visible_devices(&self) -> String {
        match self {
            Gpus::All => "all".into(),
            Gpus::Devices(d) => d.join(","),
        }
    }
}

/// A `withRegistryAuth`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RegistryAuth {
    pub(crate) address: String,
    pub(crate) username: String,
    /// The secret's name (its value is in the session).
    pub(crate) secret: String,
}

/// A directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Dir {
    /// A tree in the engine's content store (a host directory, a git tree, …), or a
    /// sub-directory of one.
    Content { digest: String, sub: String },
    /// A path in a container's filesystem.
    Ctr { ctr: Box<Ctr>, path: String },
}

impl Dir {
    /// What the directory holds, for keys.
    pub(crate) fn identity(&self) -> String {
        match self {
            Dir::Content { digest, sub } => format!("content:{digest}:{sub}"),
            Dir::Ctr { ctr, path } => format!("ctr:{}:{path}", ctr.fs_identity()),
        }
    }

    /// The sub-directory `path`.
    pub(crate) fn join(&self, path: &str) -> Dir {
        match self {
            Dir::Content { digest, sub } => Dir::Content {
                digest: digest.clone(),
                sub: absolute(sub, path),
            },
            Dir::Ctr { ctr, path: base } => Dir::Ctr {
                ctr: ctr.clone(),
                path: absolute(base, path),
            },
        }
    }
}

/// A file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum FileObj {
    /// A file in the engine's blob store (a host file, a download).
    Blob { digest: String, name: String },
    /// A file in a directory.
    InDir { dir: Dir, path: String },
}

impl FileObj {
    /// What the file holds, for keys.
    pub(crate) fn identity(&self) -> String {
        match self {
            FileObj::Blob { digest, .. } => format!("blob:{digest}"),
            FileObj::InDir { dir, path } => format!("{}//{path}", dir.identity()),
        }
    }
}

/// Everything an exec's key covers.
#[derive(Debug, Serialize)]
pub(crate) struct KeyInput<'a> {
    pub(crate) parent: String,
    pub(crate) ops: Vec<String>,
    pub(crate) env: &'a [(String, String)],
    /// (variable, secret name): values never take part.
    pub(crate) secret_env: &'a [(String, String)],
    pub(crate) mounts: Vec<(String, String, Option<String>)>,
    pub(crate) workdir: &'a str,
    pub(crate) user: Option<&'a str>,
    pub(crate) gpus: Option<&'a Gpus>,
    pub(crate) spec: &'a ExecSpec,
}

impl<'a> KeyInput<'a> {
    /// The inputs of `spec` run in `parent`.
    pub(crate) fn of(parent: &'a Ctr, spec: &'a ExecSpec) -> Self {
        KeyInput {
            parent: parent.base.key(),
            ops: parent.pending.iter().map(FileOp::identity).collect(),
            env: &parent.env,
            secret_env: &parent.secret_env,
            mounts: parent
                .mounts
                .iter()
                .map(|m| {
                    let what = match &m.source {
                        // A volume's content never takes part, as in BuildKit.
                        MountSource::Cache { key, sharing } => format!("cache:{key}:{sharing:?}"),
                        MountSource::Directory(d) => d.identity(),
                    };
                    (m.path.clone(), what, m.owner.clone())
                })
                .collect(),
            workdir: parent.workdir(),
            user: parent.user.as_deref(),
            gpus: parent.gpus.as_ref(),
            spec,
        }
    }
}

/// The cache key of an exec.
pub(crate) fn exec_key(input: &KeyInput<'_>) -> String {
    sha256_json(input)
}

fn sha256_json<T: Serialize>(value: &T) -> String {
    // Serialising plain structs of strings cannot fail.
    let json = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(Sha256::digest(json))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctr() -> Ctr {
        Ctr {
            base: Base::Image {
                reference: "alpine".into(),
                digest: "d1".into(),
            },
            env: vec![("A".into(), "1".into())],
            secret_env: vec![("TOKEN".into(), "npm".into())],
            ..Default::default()
        }
    }

    fn spec(args: &[&str]) -> ExecSpec {
        ExecSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn key(c: &Ctr, s: &ExecSpec) -> String {
        exec_key(&KeyInput::of(c, s))
    }

    #[test]
    fn identical_chains_share_a_key_and_any_difference_changes_it() {
        let base = key(&ctr(), &spec(&["echo", "hi"]));
        assert_eq!(base, key(&ctr(), &spec(&["echo", "hi"])));
        assert_eq!(base.len(), 64);

        let mut c = ctr();
        c.env[0].1 = "2".into();
        assert_ne!(base, key(&c, &spec(&["echo", "hi"])), "env value");
        assert_ne!(base, key(&ctr(), &spec(&["echo", "hi", ""])), "args");
        assert_ne!(base, key(&ctr(), &spec(&["hi", "echo"])), "arg order");
        let mut s = spec(&["echo", "hi"]);
        s.expect = Expect::Any;
        assert_ne!(base, key(&ctr(), &s), "expect");
        let mut s = spec(&["echo", "hi"]);
        s.redirect_stdout = Some("/out".into());
        assert_ne!(base, key(&ctr(), &s), "redirect");
        let mut c = ctr();
        c.workdir = Some("/src".into());
        assert_ne!(base, key(&c, &spec(&["echo", "hi"])), "workdir");
        let mut c = ctr();
        c.user = Some("nobody".into());
        assert_ne!(base, key(&c, &spec(&["echo", "hi"])), "user");
        let mut c = ctr();
        c.gpus = Some(Gpus::All);
        assert_ne!(base, key(&c, &spec(&["echo", "hi"])), "gpus");
        let mut c = ctr();
        c.secret_env[0].1 = "other".into();
        assert_ne!(base, key(&c, &spec(&["echo", "hi"])), "secret name");
        let mut c = ctr();
        c.base = Base::Image {
            reference: "alpine".into(),
            digest: "d2".into(),
        };
        assert_ne!(base, key(&c, &spec(&["echo", "hi"])), "image content");
        let mut c = ctr();
        c.mounts.push(Mount {
            path: "/cache".into(),
            source: MountSource::Cache {
                key: "gomod".into(),
                sharing: Sharing::Shared,
            },
            owner: None,
        });
        let with_cache = key(&c, &spec(&["echo", "hi"]));
        assert_ne!(base, with_cache, "cache mount");
        c.mounts[0].source = MountSource::Cache {
            key: "other".into(),
            sharing: Sharing::Shared,
        };
        assert_ne!(with_cache, key(&c, &spec(&["echo", "hi"])), "volume name");
    }

    #[test]
    fn content_not_paths_of_added_directories_counts() {
        let with = |digest: &str| {
            let mut c = ctr();
            c.pending.push(FileOp::Directory {
                path: "/src".into(),
                dir: Dir::Content {
                    digest: digest.into(),
                    sub: "/".into(),
                },
                filter: Filter::default(),
                owner: None,
            });
            key(&c, &spec(&["ls"]))
        };
        assert_eq!(with("aaa"), with("aaa"));
        assert_ne!(with("aaa"), with("bbb"));
        let mut c = ctr();
        c.pending.push(FileOp::NewFile {
            path: "/f".into(),
            contents: "x".into(),
            permissions: None,
            owner: None,
        });
        let k1 = key(&c, &spec(&["ls"]));
        if let FileOp::NewFile { contents, .. } = &mut c.pending[0] {
            *contents = "y".into();
        }
        assert_ne!(k1, key(&c, &spec(&["ls"])));
    }

    #[test]
    fn a_child_key_depends_on_its_parent_exec() {
        let parent = |args: &[&str]| {
            let p = ctr();
            let s = spec(args);
            let k = key(&p, &s);
            Ctr {
                base: Base::Exec(Box::new(ExecNode {
                    parent: p,
                    spec: s,
                    key: k,
                })),
                ..ctr()
            }
        };
        assert_eq!(
            key(&parent(&["a"]), &spec(&["b"])),
            key(&parent(&["a"]), &spec(&["b"]))
        );
        assert_ne!(
            key(&parent(&["a"]), &spec(&["b"])),
            key(&parent(&["c"]), &spec(&["b"]))
        );
    }

    #[test]
    fn secret_values_are_not_an_input() {
        // The key input holds names only: its JSON never carries a value.
        let c = ctr();
        let s = spec(&["env"]);
        let json = serde_json::to_string(&KeyInput::of(&c, &s)).unwrap();
        assert!(json.contains("\"npm\""), "{json}");
        assert!(!json.contains("plaintext"));
    }

    #[test]
    fn ids_round_trip() {
        let mut c = ctr();
        c.pending.push(FileOp::NewFile {
            path: "/a \"b\"".into(),
            contents: "ü\n".into(),
            permissions: Some(0o755),
            owner: None,
        });
        for obj in [
            Object::Container(c),
            Object::Secret { name: "s".into() },
            Object::Directory(Dir::Content {
                digest: "d".into(),
                sub: "/x".into(),
            }),
        ] {
            let id = obj.id();
            assert!(id.starts_with("fk1.") && !id.contains('"'), "{id}");
            assert_eq!(Object::from_id(&id).unwrap(), obj);
        }
        assert!(Object::from_id("ctr-1").is_err());
        assert!(Object::from_id("fk1.!!").is_err());
    }

    #[test]
    fn paths_are_normalised_against_the_workdir() {
        assert_eq!(absolute("/", "a/b"), "/a/b");
        assert_eq!(absolute("/src", "out"), "/src/out");
        assert_eq!(absolute("/src", "/out/"), "/out");
        assert_eq!(absolute("/src", "../x/./y"), "/x/y");
        assert_eq!(absolute("/", "../.."), "/");
        assert_eq!(absolute("/", "."), "/");
    }
}
