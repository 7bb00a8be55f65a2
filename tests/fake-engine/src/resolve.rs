//! Executing a parsed query: walking its selections over the engine's objects and building
//! the response. Fields and arguments the fake does not model are errors that name them
//! (`fake engine: unsupported field X on Y`), never silently ignored.
//!
//! Root, `Host`, `Directory`, `File`, git and the small types are here; `Container` is in
//! [`crate::container`].

use serde_json::{Map, Value as Json, json};

use crate::engine::Engine;
use crate::error::{Context, Failure};
use crate::fsutil;
use crate::object::{Ctr, Dir, FileObj, FileOp, Filter, Object, absolute};
use crate::query::{Field, Selection, Value};
use crate::sources::RefKind;

/// What the engine reports as its version.
pub(crate) const ENGINE_VERSION: &str = "v0.19.0-scabbard-fake";

/// Something fields are selected on.
pub(crate) enum Node {
    Query,
    Host,
    Obj(Box<Object>),
}

impl Node {
    fn type_name(&self) -> &'static str {
        match self {
            Node::Query => "Query",
            Node::Host => "Host",
            Node::Obj(o) => o.type_name(),
        }
    }
}

/// What a field resolves to.
pub(crate) enum Out {
    Scalar(Json),
    Node(Node),
}

impl From<Object> for Out {
    fn from(o: Object) -> Self {
        Out::Node(Node::Obj(Box::new(o)))
    }
}

/// Runs a whole query: `{"data": …}` or `{"data": null, "errors": [one]}`.
pub(crate) fn execute(engine: &Engine, selections: &[Selection]) -> Json {
    let mut path = Vec::new();
    match select(engine, &Node::Query, selections, &mut path) {
        Ok(data) => json!({ "data": data }),
        Err(failure) => json!({ "data": null, "errors": [failure.to_graphql(&path)] }),
    }
}

fn select(
    engine: &Engine,
    node: &Node,
    selections: &[Selection],
    path: &mut Vec<String>,
) -> Result<Map<String, Json>, Failure> {
    let mut out = Map::new();
    for selection in selections {
        match selection {
            Selection::Field(field) => {
                path.push(field.response_key().to_string());
                let value = match resolve(engine, node, field)? {
                    Out::Scalar(v) if field.selections.is_empty() => v,
                    Out::Scalar(_) => {
                        return Err(Failure::engine(format!(
                            "fake engine: field {} on {} is a scalar and takes no selection",
                            field.name,
                            node.type_name()
                        )));
                    }
                    Out::Node(n) if field.selections.is_empty() => {
                        return Err(Failure::engine(format!(
                            "fake engine: field {} on {} returns a {}: select its fields",
                            field.name,
                            node.type_name(),
                            n.type_name()
                        )));
                    }
                    Out::Node(n) => Json::Object(select(engine, &n, &field.selections, path)?),
                };
                path.pop();
                out.insert(field.response_key().to_string(), value);
            }
            Selection::Fragment { on, selections } => {
                if on != node.type_name() {
                    return Err(Failure::engine(format!(
                        "fake engine: the object is a {}, not a {on}",
                        node.type_name()
                    )));
                }
                out.extend(select(engine, node, selections, path)?);
            }
        }
    }
    Ok(out)
}

fn resolve(engine: &Engine, node: &Node, field: &Field) -> Result<Out, Failure> {
    match node {
        Node::Query => query_field(engine, field),
        Node::Host => host_field(engine, field),
        Node::Obj(obj) => match obj.as_ref() {
            Object::Container(c) => crate::container::field(engine, c, field),
            Object::Directory(d) => directory_field(engine, d, field),
            Object::File(f) => file_field(engine, f, field),
            obj => small_field(engine, obj, field),
        },
    }
}

/// Argument access for one field, refusing arguments it does not model.
pub(crate) struct Args<'a> {
    field: &'a Field,
    on: &'static str,
}

impl<'a> Args<'a> {
    /// The arguments of `field` on type `on`, which may only be among `allowed`.
    pub(crate) fn new(
        field: &'a Field,
        on: &'static str,
        allowed: &[&str],
    ) -> Result<Self, Failure> {
        if let Some((name, _)) = field
            .args
            .iter()
            .find(|(k, _)| !allowed.contains(&k.as_str()))
        {
            return Err(Failure::engine(format!(
                "fake engine: unsupported argument {name} of {on}.{}",
                field.name
            )));
        }
        Ok(Self { field, on })
    }

    fn wrong(&self, name: &str, want: &str, got: &Value) -> Failure {
        Failure::engine(format!(
            "fake engine: argument {name} of {}.{} must be {want}, not {}",
            self.on,
            self.field.name,
            got.kind()
        ))
    }

    pub(crate) fn string(&self, name: &str) -> Result<Option<String>, Failure> {
        match self.field.arg(name) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.wrong(name, "a string", v)),
        }
    }

    pub(crate) fn req_string(&self, name: &str) -> Result<String, Failure> {
        self.string(name)?.ok_or_else(|| {
            Failure::engine(format!(
                "fake engine: {}.{} needs argument {name}",
                self.on, self.field.name
            ))
        })
    }

    pub(crate) fn bool(&self, name: &str) -> Result<bool, Failure> {
        match self.field.arg(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.wrong(name, "a boolean", v)),
        }
    }

    /// A boolean argument the fake only models as `false`.
    pub(crate) fn only_false(&self, name: &str) -> Result<(), Failure> {
        if self.bool(name)? {
            return Err(Failure::engine(format!(
                "fake engine: unsupported argument {name}: true of {}.{}",
                self.on, self.field.name
            )));
        }
        Ok(())
    }

    pub(crate) fn int(&self, name: &str) -> Result<Option<i64>, Failure> {
        match self.field.arg(name) {
            None => Ok(None),
            Some(Value::Int(i)) => Ok(Some(*i)),
            Some(v) => Err(self.wrong(name, "an integer", v)),
        }
    }

    pub(crate) fn enumeration(&self, name: &str) -> Result<Option<String>, Failure> {
        match self.field.arg(name) {
            None => Ok(None),
            Some(Value::Enum(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.wrong(name, "an enum value", v)),
        }
    }

    pub(crate) fn strings(&self, name: &str) -> Result<Vec<String>, Failure> {
        match self.field.arg(name) {
            None => Ok(Vec::new()),
            Some(Value::List(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => Ok(s.clone()),
                    v => Err(self.wrong(name, "a list of strings", v)),
                })
                .collect(),
            Some(v) => Err(self.wrong(name, "a list", v)),
        }
    }

    /// The object an ID argument names, which must be of type `want`.
    pub(crate) fn object(&self, name: &str, want: &str) -> Result<Object, Failure> {
        let id = self.req_string(name)?;
        let obj = Object::from_id(&id)?;
        if obj.type_name() != want {
            return Err(Failure::engine(format!(
                "fake engine: argument {name} of {}.{} must be a {want} ID, not a {} ID",
                self.on,
                self.field.name,
                obj.type_name()
            )));
        }
        Ok(obj)
    }

    /// File permissions (an integer).
    pub(crate) fn permissions(&self, name: &str) -> Result<Option<u32>, Failure> {
        self.int(name)?
            .map(|p| {
                u32::try_from(p)
                    .ok()
                    .filter(|p| *p <= 0o7777)
                    .ok_or_else(|| Failure::engine(format!("fake engine: bad permissions {p}")))
            })
            .transpose()
    }
}

/// `unsupported field X on Y`.
pub(crate) fn unsupported(field: &Field, on: &str) -> Failure {
    Failure::engine(format!(
        "fake engine: unsupported field {} on {on}",
        field.name
    ))
}

fn id_of(obj: &Object, field: &Field) -> Result<Out, Failure> {
    Args::new(field, obj.type_name(), &[])?;
    Ok(Out::Scalar(json!(obj.id())))
}

fn query_field(engine: &Engine, field: &Field) -> Result<Out, Failure> {
    const ON: &str = "Query";
    let loaded = |want: &str| -> Result<Out, Failure> {
        let args = Args::new(field, ON, &["id"])?;
        Ok(args.object("id", want)?.into())
    };
    match field.name.as_str() {
        "version" => {
            Args::new(field, ON, &[])?;
            Ok(Out::Scalar(json!(ENGINE_VERSION)))
        }
        "directory" => {
            // An empty directory, built up with withNewFile/withDirectory/withFile.
            Args::new(field, ON, &[])?;
            Ok(Object::Directory(Dir::Ctr {
                ctr: Box::default(),
                path: "/".into(),
            })
            .into())
        }
        "container" => {
            // `platform` is accepted and ignored: the fake runs host binaries.
            Args::new(field, ON, &["platform"])?;
            Ok(Object::Container(Default::default()).into())
        }
        "setSecret" => {
            let args = Args::new(field, ON, &["name", "plaintext"])?;
            let name = args.req_string("name")?;
            engine.set_secret(&name, &args.req_string("plaintext")?);
            Ok(Object::Secret { name }.into())
        }
        "cacheVolume" => {
            let args = Args::new(field, ON, &["key"])?;
            Ok(Object::CacheVolume {
                key: args.req_string("key")?,
            }
            .into())
        }
        "host" => {
            Args::new(field, ON, &[])?;
            Ok(Out::Node(Node::Host))
        }
        "git" => {
            let args = Args::new(
                field,
                ON,
                &[
                    "url",
                    "keepGitDir",
                    "httpAuthToken",
                    "sshKnownHosts",
                    "sshAuthSocket",
                    "httpAuthUsername",
                    "httpAuthHeader",
                    "experimentalServiceHost",
                ],
            )?;
            for unmodelled in [
                "httpAuthToken",
                "sshAuthSocket",
                "httpAuthHeader",
                "experimentalServiceHost",
            ] {
                if field.arg(unmodelled).is_some() {
                    return Err(Failure::engine(format!(
                        "fake engine: unsupported argument {unmodelled} of Query.git"
                    )));
                }
            }
            let url = args.req_string("url")?;
            engine.git_repo(&url)?;
            Ok(Object::GitRepository {
                url,
                keep_git_dir: args.bool("keepGitDir")?,
            }
            .into())
        }
        "http" => {
            let args = Args::new(
                field,
                ON,
                &[
                    "url",
                    "name",
                    "permissions",
                    "checksum",
                    "authHeader",
                    "experimentalServiceHost",
                ],
            )?;
            for unmodelled in ["authHeader", "experimentalServiceHost"] {
                if field.arg(unmodelled).is_some() {
                    return Err(Failure::engine(format!(
                        "fake engine: unsupported argument {unmodelled} of Query.http"
                    )));
                }
            }
            let file = engine.http_file(
                &args.req_string("url")?,
                args.string("name")?,
                args.permissions("permissions")?,
            )?;
            if let Some(want) = args.string("checksum")? {
                let FileObj::Blob { digest, .. } = &file else {
                    unreachable!("downloads are blobs");
                };
                let got = format!("sha256:{}", digest.split('-').next().unwrap_or_default());
                if got != want {
                    return Err(Failure::engine(format!(
                        "fake engine: http checksum mismatch: want {want}, got {got}"
                    )));
                }
            }
            Ok(Object::File(file).into())
        }
        "node" => {
            let args = Args::new(field, ON, &["id"])?;
            Ok(Object::from_id(&args.req_string("id")?)?.into())
        }
        "loadContainerFromID" => loaded("Container"),
        "loadDirectoryFromID" => loaded("Directory"),
        "loadFileFromID" => loaded("File"),
        "loadSecretFromID" => loaded("Secret"),
        "loadCacheVolumeFromID" => loaded("CacheVolume"),
        "loadGitRepositoryFromID" => loaded("GitRepository"),
        "loadGitRefFromID" => loaded("GitRef"),
        _ => Err(unsupported(field, ON)),
    }
}

fn host_field(engine: &Engine, field: &Field) -> Result<Out, Failure> {
    const ON: &str = "Host";
    match field.name.as_str() {
        "directory" => {
            let args = Args::new(
                field,
                ON,
                &["path", "exclude", "include", "noCache", "gitignore"],
            )?;
            args.only_false("gitignore")?;
            let filter = Filter {
                include: args.strings("include")?,
                exclude: args.strings("exclude")?,
            };
            Ok(
                Object::Directory(engine.host_directory(&args.req_string("path")?, &filter)?)
                    .into(),
            )
        }
        "file" => {
            let args = Args::new(field, ON, &["path", "noCache"])?;
            Ok(Object::File(engine.host_file(&args.req_string("path")?)?).into())
        }
        _ => Err(unsupported(field, ON)),
    }
}

fn directory_field(engine: &Engine, dir: &Dir, field: &Field) -> Result<Out, Failure> {
    const ON: &str = "Directory";
    match field.name.as_str() {
        "id" => id_of(&Object::Directory(dir.clone()), field),
        "sync" => {
            Args::new(field, ON, &[])?;
            engine.dir_view(dir)?;
            Ok(Out::Scalar(json!(Object::Directory(dir.clone()).id())))
        }
        "directory" => {
            let args = Args::new(field, ON, &["path"])?;
            Ok(Object::Directory(dir.join(&args.req_string("path")?)).into())
        }
        "file" => {
            let args = Args::new(field, ON, &["path"])?;
            Ok(Object::File(FileObj::InDir {
                dir: dir.clone(),
                path: args.req_string("path")?,
            })
            .into())
        }
        "entries" => {
            let args = Args::new(field, ON, &["path"])?;
            let view = engine.dir_view(dir)?;
            let at = view.host(&args.string("path")?.unwrap_or_else(|| ".".into()), true)?;
            let mut names = Vec::new();
            for entry in std::fs::read_dir(&at).context(|| format!("listing {}", view.dir))? {
                let entry = entry?;
                let mut name = entry.file_name().to_string_lossy().into_owned();
                if entry.file_type()?.is_dir() {
                    name.push('/');
                }
                names.push(name);
            }
            names.sort();
            Ok(Out::Scalar(json!(names)))
        }
        "withNewFile" => {
            let args = Args::new(field, ON, &["path", "contents", "permissions"])?;
            let (ctr, at) = building(dir);
            let op = FileOp::NewFile {
                path: absolute(&at, &args.req_string("path")?),
                contents: args.string("contents")?.unwrap_or_default(),
                permissions: args.permissions("permissions")?,
                owner: None,
            };
            Ok(Object::Directory(with_op(ctr, at, op)).into())
        }
        "withDirectory" => {
            let args = Args::new(field, ON, &["path", "directory", "exclude", "include"])?;
            let Object::Directory(source) = args.object("directory", "Directory")? else {
                unreachable!("object() checked the type");
            };
            let (ctr, at) = building(dir);
            let op = FileOp::Directory {
                path: absolute(&at, &args.req_string("path")?),
                dir: source,
                filter: Filter {
                    include: args.strings("include")?,
                    exclude: args.strings("exclude")?,
                },
                owner: None,
            };
            Ok(Object::Directory(with_op(ctr, at, op)).into())
        }
        "withFile" => {
            let args = Args::new(field, ON, &["path", "source", "permissions"])?;
            let Object::File(file) = args.object("source", "File")? else {
                unreachable!("object() checked the type");
            };
            let (ctr, at) = building(dir);
            let op = FileOp::File {
                path: absolute(&at, &args.req_string("path")?),
                file,
                permissions: args.permissions("permissions")?,
                owner: None,
            };
            Ok(Object::Directory(with_op(ctr, at, op)).into())
        }
        "export" => {
            let args = Args::new(field, ON, &["path", "wipe"])?;
            let dest = engine.host_path(&args.req_string("path")?);
            let view = engine.dir_view(dir)?;
            export_dir(&view.host(".", true)?, &dest)?;
            Ok(Out::Scalar(json!(dest.to_string_lossy())))
        }
        _ => Err(unsupported(field, ON)),
    }
}

/// A directory as a filesystem being built: a container whose `path` is the directory
/// (a content tree is first copied into an empty one).
fn building(dir: &Dir) -> (Ctr, String) {
    match dir {
        Dir::Ctr { ctr, path } => ((**ctr).clone(), path.clone()),
        Dir::Content { .. } => (
            Ctr {
                pending: vec![FileOp::Directory {
                    path: "/".into(),
                    dir: dir.clone(),
                    filter: Filter::default(),
                    owner: None,
                }],
                ..Ctr::default()
            },
            "/".into(),
        ),
    }
}

fn with_op(mut ctr: Ctr, at: String, op: FileOp) -> Dir {
    ctr.pending.push(op);
    Dir::Ctr {
        ctr: Box::new(ctr),
        path: at,
    }
}

/// Replaces `dest`'s content with the tree at `src` (parents created; swapped in whole).
fn export_dir(src: &std::path::Path, dest: &std::path::Path) -> Result<(), Failure> {
    let parent = dest.parent().ok_or_else(|| {
        Failure::engine(format!("fake engine: cannot export to {}", dest.display()))
    })?;
    std::fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
    let staged = tempfile::Builder::new()
        .prefix(".fake-export-")
        .tempdir_in(parent)
        .context(|| format!("exporting to {}", dest.display()))?;
    let tree = staged.path().join("tree");
    fsutil::copy_tree(src, &tree, None).context(|| format!("exporting to {}", dest.display()))?;
    fsutil::remove_path(dest).context(|| format!("replacing {}", dest.display()))?;
    std::fs::rename(&tree, dest).context(|| format!("exporting to {}", dest.display()))?;
    Ok(())
}

fn file_field(engine: &Engine, file: &FileObj, field: &Field) -> Result<Out, Failure> {
    const ON: &str = "File";
    match field.name.as_str() {
        "id" => id_of(&Object::File(file.clone()), field),
        "sync" => {
            Args::new(field, ON, &[])?;
            engine.file_path(file)?;
            Ok(Out::Scalar(json!(Object::File(file.clone()).id())))
        }
        "name" => {
            Args::new(field, ON, &[])?;
            let name = match file {
                FileObj::Blob { name, .. } => name.clone(),
                FileObj::InDir { path, .. } => {
                    path.rsplit('/').next().unwrap_or_default().to_string()
                }
            };
            Ok(Out::Scalar(json!(name)))
        }
        "contents" => {
            Args::new(field, ON, &[])?;
            let (_view, path) = engine.file_path(file)?;
            let bytes = std::fs::read(&path).context(|| format!("reading {}", path.display()))?;
            Ok(Out::Scalar(json!(String::from_utf8_lossy(&bytes))))
        }
        "size" => {
            Args::new(field, ON, &[])?;
            let (_view, path) = engine.file_path(file)?;
            Ok(Out::Scalar(json!(std::fs::metadata(&path)?.len())))
        }
        "export" => {
            let args = Args::new(field, ON, &["path", "allowParentDirPath"])?;
            let dest = engine.host_path(&args.req_string("path")?);
            let (_view, src) = engine.file_path(file)?;
            let dest = if dest.is_dir() && args.bool("allowParentDirPath")? {
                dest.join(src.file_name().unwrap_or_default())
            } else {
                dest
            };
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let staged = tempfile::NamedTempFile::new_in(
                dest.parent().unwrap_or(std::path::Path::new("/")),
            )?;
            std::fs::copy(&src, staged.path())
                .context(|| format!("exporting to {}", dest.display()))?;
            staged.persist(&dest).map_err(|e| {
                Failure::engine(format!("fake engine: exporting to {}: {e}", dest.display()))
            })?;
            Ok(Out::Scalar(json!(dest.to_string_lossy())))
        }
        _ => Err(unsupported(field, ON)),
    }
}

fn small_field(engine: &Engine, obj: &Object, field: &Field) -> Result<Out, Failure> {
    let on = obj.type_name();
    if field.name == "id" {
        return id_of(obj, field);
    }
    match obj {
        Object::GitRepository { url, keep_git_dir } => {
            let args = Args::new(field, on, &["name", "id"])?;
            let which = match field.name.as_str() {
                "ref" => RefKind::Any(args.req_string("name")?),
                "branch" => RefKind::Branch(args.req_string("name")?),
                "tag" => RefKind::Tag(args.req_string("name")?),
                "commit" => RefKind::Commit(args.req_string("id")?),
                "head" => RefKind::Head,
                _ => return Err(unsupported(field, on)),
            };
            let commit = engine.git_resolve(url, &which)?;
            Ok(Object::GitRef {
                url: url.clone(),
                commit,
                keep_git_dir: *keep_git_dir,
            }
            .into())
        }
        Object::GitRef {
            url,
            commit,
            keep_git_dir,
        } => match field.name.as_str() {
            "commit" => {
                Args::new(field, on, &[])?;
                Ok(Out::Scalar(json!(commit)))
            }
            "tree" => {
                let args = Args::new(
                    field,
                    on,
                    &[
                        "discardGitDir",
                        "depth",
                        "includeTags",
                        "sshKnownHosts",
                        "sshAuthSocket",
                    ],
                )?;
                let git_dir = *keep_git_dir && !args.bool("discardGitDir")?;
                Ok(Object::Directory(engine.git_tree(url, commit, git_dir)?).into())
            }
            _ => Err(unsupported(field, on)),
        },
        Object::Secret { name } => match field.name.as_str() {
            "name" => {
                Args::new(field, on, &[])?;
                Ok(Out::Scalar(json!(name)))
            }
            _ => Err(unsupported(field, on)),
        },
        _ => Err(unsupported(field, on)),
    }
}
