//! `Container` fields. Builders (`from`, `with…`, `withExec`) return a new container value
//! and run nothing; `sync`, `exitCode`, `stdout`, `stderr`, `exists`, `publish` and what is
//! read through `directory`/`file` evaluate it (see [`crate::eval`]).

use serde_json::json;

use crate::engine::Engine;
use crate::error::Failure;
use crate::eval::View;
use crate::object::{
    Base, Ctr, Dir, ExecNode, ExecSpec, Expect, FileObj, FileOp, Filter, Gpus, KeyInput, Mount,
    MountSource, Object, RegistryAuth, Sharing, exec_key,
};
use crate::query::Field;
use crate::resolve::{Args, Out, unsupported};

const ON: &str = "Container";

/// Resolves `field` on container `c`.
pub(crate) fn field(engine: &Engine, c: &Ctr, field: &Field) -> Result<Out, Failure> {
    let built = |c: Ctr| Ok(Object::Container(c).into());
    let mut next = c.clone();
    match field.name.as_str() {
        "id" => {
            Args::new(field, ON, &[])?;
            Ok(Out::Scalar(json!(Object::Container(c.clone()).id())))
        }
        "from" => {
            let args = Args::new(field, ON, &["address"])?;
            let reference = args.req_string("address")?;
            let digest = engine.image_overlay(&reference)?;
            next.base = Base::Image { reference, digest };
            next.pending.clear();
            built(next)
        }
        "withEnvVariable" => {
            let args = Args::new(field, ON, &["name", "value", "expand"])?;
            let name = args.req_string("name")?;
            let mut value = args.req_string("value")?;
            if args.bool("expand")? {
                value = expand(&value, &c.env);
            }
            match next.env.iter_mut().find(|(k, _)| *k == name) {
                Some(entry) => entry.1 = value,
                None => next.env.push((name.clone(), value)),
            }
            next.secret_env.retain(|(k, _)| *k != name);
            built(next)
        }
        "withoutEnvVariable" => {
            let args = Args::new(field, ON, &["name"])?;
            let name = args.req_string("name")?;
            next.env.retain(|(k, _)| *k != name);
            built(next)
        }
        "withSecretVariable" => {
            let args = Args::new(field, ON, &["name", "secret"])?;
            let name = args.req_string("name")?;
            let Object::Secret { name: secret } = args.object("secret", "Secret")? else {
                unreachable!("object() checked the type");
            };
            engine.secret(&secret)?;
            next.env.retain(|(k, _)| *k != name);
            next.secret_env.retain(|(k, _)| *k != name);
            next.secret_env.push((name, secret));
            built(next)
        }
        "withMountedCache" => {
            let args = Args::new(
                field,
                ON,
                &["path", "cache", "sharing", "owner", "source", "expand"],
            )?;
            if field.arg("source").is_some() {
                return Err(Failure::engine(
                    "fake engine: unsupported argument source of Container.withMountedCache",
                ));
            }
            let Object::CacheVolume { key } = args.object("cache", "CacheVolume")? else {
                unreachable!("object() checked the type");
            };
            let sharing = match args.enumeration("sharing")?.as_deref() {
                None | Some("SHARED") => Sharing::Shared,
                Some("PRIVATE") => Sharing::Private,
                Some("LOCKED") => Sharing::Locked,
                Some(other) => {
                    return Err(Failure::engine(format!(
                        "fake engine: unknown cache sharing mode {other}"
                    )));
                }
            };
            let path = path_arg(&args, c)?;
            next.mounts.retain(|m| m.path != path);
            next.mounts.push(Mount {
                path,
                source: MountSource::Cache { key, sharing },
                owner: args.string("owner")?,
            });
            built(next)
        }
        "withMountedDirectory" => {
            let args = Args::new(field, ON, &["path", "source", "owner", "expand"])?;
            let Object::Directory(dir) = args.object("source", "Directory")? else {
                unreachable!("object() checked the type");
            };
            let path = path_arg(&args, c)?;
            next.mounts.retain(|m| m.path != path);
            next.mounts.push(Mount {
                path,
                source: MountSource::Directory(dir),
                owner: args.string("owner")?,
            });
            built(next)
        }
        "withoutMount" => {
            let args = Args::new(field, ON, &["path", "expand"])?;
            let path = path_arg(&args, c)?;
            next.mounts.retain(|m| m.path != path);
            built(next)
        }
        "withDirectory" => {
            let args = Args::new(
                field,
                ON,
                &[
                    "path",
                    "source",
                    "exclude",
                    "include",
                    "owner",
                    "gitignore",
                    "expand",
                ],
            )?;
            args.only_false("gitignore")?;
            let Object::Directory(dir) = args.object("source", "Directory")? else {
                unreachable!("object() checked the type");
            };
            next.pending.push(FileOp::Directory {
                path: path_arg(&args, c)?,
                dir,
                filter: Filter {
                    include: args.strings("include")?,
                    exclude: args.strings("exclude")?,
                },
                owner: args.string("owner")?,
            });
            built(next)
        }
        "withFile" => {
            let args = Args::new(
                field,
                ON,
                &["path", "source", "permissions", "owner", "expand"],
            )?;
            let Object::File(file) = args.object("source", "File")? else {
                unreachable!("object() checked the type");
            };
            next.pending.push(FileOp::File {
                path: path_arg(&args, c)?,
                file,
                permissions: args.permissions("permissions")?,
                owner: args.string("owner")?,
            });
            built(next)
        }
        "withNewFile" => {
            let args = Args::new(
                field,
                ON,
                &["path", "contents", "permissions", "owner", "expand"],
            )?;
            let mut contents = args.string("contents")?.unwrap_or_default();
            if args.bool("expand")? {
                contents = expand(&contents, &c.env);
            }
            next.pending.push(FileOp::NewFile {
                path: path_arg(&args, c)?,
                contents,
                permissions: args.permissions("permissions")?,
                owner: args.string("owner")?,
            });
            built(next)
        }
        "withWorkdir" => {
            let args = Args::new(field, ON, &["path", "expand"])?;
            next.workdir = Some(path_arg(&args, c)?);
            built(next)
        }
        "withUser" => {
            let args = Args::new(field, ON, &["name"])?;
            next.user = Some(args.req_string("name")?);
            built(next)
        }
        "withoutDirectory" | "withoutFile" => {
            let args = Args::new(field, ON, &["path", "expand"])?;
            next.pending.push(FileOp::Remove {
                path: path_arg(&args, c)?,
            });
            built(next)
        }
        "withEntrypoint" => {
            let args = Args::new(field, ON, &["args", "keepDefaultArgs"])?;
            next.entrypoint = Some(args.strings("args")?);
            built(next)
        }
        "withRegistryAuth" => {
            let args = Args::new(field, ON, &["address", "username", "secret"])?;
            let address = args.req_string("address")?;
            let Object::Secret { name: secret } = args.object("secret", "Secret")? else {
                unreachable!("object() checked the type");
            };
            next.registry_auth.retain(|a| a.address != address);
            next.registry_auth.push(RegistryAuth {
                address,
                username: args.req_string("username")?,
                secret,
            });
            built(next)
        }
        "experimentalWithAllGPUs" => {
            Args::new(field, ON, &[])?;
            next.gpus = Some(Gpus::All);
            built(next)
        }
        "experimentalWithGPU" => {
            let args = Args::new(field, ON, &["devices"])?;
            next.gpus = Some(Gpus::Devices(args.strings("devices")?));
            built(next)
        }
        "withExec" => with_exec(c, field),
        "sync" => {
            Args::new(field, ON, &[])?;
            evaluate(engine, c)?;
            Ok(Out::Scalar(json!(Object::Container(c.clone()).id())))
        }
        "exitCode" | "stdout" | "stderr" => {
            Args::new(field, ON, &[])?;
            let Some(node) = c.last_exec() else {
                return Err(Failure::engine(format!(
                    "fake engine: {}: no command has been executed on this container (withExec)",
                    field.name
                )));
            };
            let snapshot = engine.ensure_exec(node)?;
            if field.name == "exitCode" {
                return Ok(Out::Scalar(json!(engine.exec_result(&node.key)?.exit_code)));
            }
            let bytes = std::fs::read(snapshot.join(&field.name))?;
            Ok(Out::Scalar(json!(String::from_utf8_lossy(&bytes))))
        }
        "exists" => {
            let args = Args::new(
                field,
                ON,
                &["path", "expectedType", "doNotFollowSymlinks", "expand"],
            )?;
            let view = engine.ctr_view(c)?;
            let host = view.host(&path_arg(&args, c)?, !args.bool("doNotFollowSymlinks")?)?;
            let meta = std::fs::symlink_metadata(&host).ok();
            let answer = match (args.enumeration("expectedType")?.as_deref(), meta) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some("DIRECTORY_TYPE"), Some(m)) => m.is_dir(),
                (Some("REGULAR_TYPE"), Some(m)) => m.is_file(),
                (Some("SYMLINK_TYPE"), Some(m)) => m.is_symlink(),
                (Some(other), _) => {
                    return Err(Failure::engine(format!(
                        "fake engine: unknown expectedType {other}"
                    )));
                }
            };
            Ok(Out::Scalar(json!(answer)))
        }
        "directory" => {
            let args = Args::new(field, ON, &["path", "expand"])?;
            Ok(Object::Directory(Dir::Ctr {
                ctr: Box::new(c.clone()),
                path: path_arg(&args, c)?,
            })
            .into())
        }
        "file" => {
            let args = Args::new(field, ON, &["path", "expand"])?;
            Ok(Object::File(FileObj::InDir {
                dir: Dir::Ctr {
                    ctr: Box::new(c.clone()),
                    path: "/".into(),
                },
                path: path_arg(&args, c)?,
            })
            .into())
        }
        "publish" => {
            let args = Args::new(
                field,
                ON,
                &[
                    "address",
                    "platformVariants",
                    "forcedCompression",
                    "mediaTypes",
                ],
            )?;
            if field.arg("platformVariants").is_some() {
                return Err(Failure::engine(
                    "fake engine: unsupported argument platformVariants of Container.publish",
                ));
            }
            Ok(Out::Scalar(json!(
                engine.publish(c, &args.req_string("address")?)?
            )))
        }
        _ => Err(unsupported(field, ON)),
    }
}

fn with_exec(c: &Ctr, field: &Field) -> Result<Out, Failure> {
    let args = Args::new(
        field,
        ON,
        &[
            "args",
            "expect",
            "redirectStdout",
            "redirectStderr",
            "redirectStdin",
            "stdin",
            "expand",
            "noInit",
            "useEntrypoint",
            "experimentalPrivilegedNesting",
            "insecureRootCapabilities",
        ],
    )?;
    for unmodelled in [
        "useEntrypoint",
        "experimentalPrivilegedNesting",
        "insecureRootCapabilities",
    ] {
        args.only_false(unmodelled)?;
    }
    if field.arg("redirectStdin").is_some() {
        return Err(Failure::engine(
            "fake engine: unsupported argument redirectStdin of Container.withExec",
        ));
    }
    let mut argv = args.strings("args")?;
    if argv.is_empty() {
        return Err(Failure::engine(
            "fake engine: withExec needs args (the fake models no default command)",
        ));
    }
    if args.bool("expand")? {
        argv = argv.iter().map(|a| expand(a, &c.env)).collect();
    }
    let expect = match args.enumeration("expect")?.as_deref() {
        None | Some("SUCCESS") => Expect::Success,
        Some("FAILURE") => Expect::Failure,
        Some("ANY") => Expect::Any,
        Some(other) => {
            return Err(Failure::engine(format!(
                "fake engine: unknown expect value {other}"
            )));
        }
    };
    let spec = ExecSpec {
        args: argv,
        expect,
        redirect_stdout: args.string("redirectStdout")?,
        redirect_stderr: args.string("redirectStderr")?,
        stdin: args.string("stdin")?,
    };
    let key = exec_key(&KeyInput::of(c, &spec));
    let next = Ctr {
        base: Base::Exec(Box::new(ExecNode {
            parent: c.clone(),
            spec,
            key,
        })),
        pending: Vec::new(),
        ..c.clone()
    };
    Ok(Object::Container(next).into())
}

/// The `path` argument, `$VAR`s expanded when `expand` is true, made absolute.
fn path_arg(args: &Args<'_>, c: &Ctr) -> Result<String, Failure> {
    let mut path = args.req_string("path")?;
    if args.bool("expand")? {
        path = expand(&path, &c.env);
    }
    Ok(c.abs(&path))
}

/// Evaluates a container: its last exec (or image), and its pending operations.
fn evaluate(engine: &Engine, c: &Ctr) -> Result<(), Failure> {
    if let Some(node) = c.last_exec() {
        engine.ensure_exec(node)?;
    }
    let _view: View = engine.ctr_view(c)?;
    Ok(())
}

/// `$NAME` and `${NAME}` replaced by the variables' values (unset: empty).
fn expand(text: &str, env: &[(String, String)]) -> String {
    let lookup = |name: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'{') {
            chars.next();
            let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
            out.push_str(&lookup(&name));
        } else {
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if c == '_' || c.is_ascii_alphanumeric() {
                    name.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            if name.is_empty() {
                out.push('$');
            } else {
                out.push_str(&lookup(&name));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn expands_variables() {
        let env = vec![
            ("A".to_string(), "1".to_string()),
            ("B_2".to_string(), "x".to_string()),
        ];
        assert_eq!(expand("$A-${B_2}-$C-$", &env), "1-x--$");
    }
}
