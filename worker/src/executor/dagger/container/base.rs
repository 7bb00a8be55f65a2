//! The container before its first step: every ID resolved up front, then the chain of
//! calls that builds it (see the parent module for the order). Nothing here runs a step.

use dagger_sdk::{
    Container, ContainerWithMountedCacheOpts, DirectoryWithNewFileOpts, GitRefTreeOpts,
    HostDirectoryOpts, Id, Query,
};
use scabbard_common::proto::ErrorClass;
use tokio::sync::mpsc;

use super::{OUTPUT_ENV, OUTPUT_FILE, SCRATCH, Step, Stopped, at, note};
use crate::executor::dagger::gql::Failure;
use crate::executor::dagger::plan::{GitCheckout, Gpus, Plan};
use crate::executor::{ExecOutcome, OutputChunk};

/// Mode of the files Scabbard creates in the container (any user may write them).
const SCRATCH_FILE_MODE: isize = 0o666;

/// The built (not yet run) container and what was resolved on the way.
pub(super) struct Base {
    pub(super) container: Container,
    /// The commit of each git checkout, in plan order.
    pub(super) commits: Vec<String>,
}

/// Resolves every ID, then builds the container before its first step.
pub(super) async fn base_container(
    client: &Query,
    plan: &Plan,
    out: &mpsc::Sender<OutputChunk>,
) -> Step<Base> {
    let mut secret_ids: Vec<(String, Id)> = Vec::new();
    for s in &plan.secrets {
        let id = client
            .set_secret(s.name.as_str(), s.value.as_str())
            .id()
            .await
            .map_err(at(format!("setting secret {}", s.name)))?;
        secret_ids.push((s.env.clone(), id));
    }
    let registry = match &plan.registry {
        Some(r) => {
            let id = client
                .set_secret(r.secret_name.as_str(), r.password.as_str())
                .id()
                .await
                .map_err(at(format!("setting secret {}", r.secret_name)))?;
            Some((r, id))
        }
        None => None,
    };
    let mut cache_ids = Vec::new();
    for c in &plan.caches {
        let id = client
            .cache_volume(c.volume.as_str())
            .id()
            .await
            .map_err(at(format!("cache volume {}", c.volume)))?;
        cache_ids.push(id);
    }
    let mut dir_ids = Vec::new();
    for d in &plan.dirs {
        let host_path = d.host_path.to_string_lossy();
        let exclude: Vec<&str> = d.exclude.iter().map(String::as_str).collect();
        let opts = HostDirectoryOpts {
            exclude: (!exclude.is_empty()).then_some(exclude),
            gitignore: None,
            include: None,
            no_cache: None,
        };
        let id = client
            .host()
            .directory_opts(host_path.as_ref(), opts)
            .id()
            .await
            .map_err(at(format!("host directory {host_path}")))?;
        dir_ids.push(id);
    }
    let mut commits = Vec::new();
    let mut tree_ids = Vec::new();
    for g in &plan.git {
        let (commit, tree) = checkout(client, g).await?;
        note(
            out,
            format!(
                "{}: {} {} is commit {commit}",
                g.field,
                g.url,
                g.reference.as_deref().unwrap_or("HEAD")
            ),
        )
        .await;
        commits.push(commit);
        tree_ids.push(tree);
    }
    let mut download_ids = Vec::new();
    for d in &plan.downloads {
        let id = client
            .http(d.url.as_str())
            .id()
            .await
            .map_err(at(format!("download {}", d.url)))?;
        download_ids.push(id);
    }
    let mut input_ids = Vec::new();
    for i in &plan.inputs {
        let local = i.local.to_string_lossy();
        let id = if i.dir {
            client.host().directory(local.as_ref()).id().await
        } else {
            client.host().file(local.as_ref()).id().await
        }
        .map_err(at(format!("input for {}", i.path)))?;
        input_ids.push(id);
    }
    let scratch = scratch_dir(client, plan.steps.len())
        .id()
        .await
        .map_err(at("creating the scratch directory"))?;

    let mut c = client.container();
    if let Some((r, id)) = registry {
        c = c.with_registry_auth(r.address.as_str(), r.username.as_str(), id);
    }
    c = c.from(plan.image.as_str());
    match &plan.gpus {
        Some(Gpus::All) => c = c.experimental_with_all_gp_us(),
        Some(Gpus::Devices(devices)) => c = c.experimental_with_gpu(devices.clone()),
        None => {}
    }
    for (name, value) in &plan.env {
        c = c.with_env_variable(name.as_str(), value.as_str());
    }
    c = c.with_env_variable(OUTPUT_ENV, OUTPUT_FILE);
    c = c.with_directory(SCRATCH, scratch);
    for (env, id) in secret_ids {
        c = c.with_secret_variable(env, id);
    }
    for (cache, id) in plan.caches.iter().zip(cache_ids) {
        let opts = ContainerWithMountedCacheOpts {
            expand: None,
            owner: None,
            sharing: cache.sharing.clone(),
            source: None,
        };
        c = c.with_mounted_cache_opts(cache.path.as_str(), id, opts);
    }
    for (dir, id) in plan.dirs.iter().zip(dir_ids) {
        c = c.with_directory(dir.path.as_str(), id);
    }
    for (g, id) in plan.git.iter().zip(tree_ids) {
        c = c.with_directory(g.path.as_str(), id);
    }
    for (d, id) in plan.downloads.iter().zip(download_ids) {
        c = c.with_file(d.path.as_str(), id);
    }
    for (i, id) in plan.inputs.iter().zip(input_ids) {
        c = if i.dir {
            c.with_directory(i.path.as_str(), id)
        } else {
            c.with_file(i.path.as_str(), id)
        };
    }
    if let Some(w) = &plan.workdir {
        c = c.with_workdir(w.as_str());
    }
    Ok(Base {
        container: c,
        commits,
    })
}

/// The scratch directory mounted at [`SCRATCH`]: the empty `$SCABBARD_OUTPUT` file and
/// the files each step's stdout and stderr are redirected to, all mode 0666 (so a
/// container running as another user can write them).
fn scratch_dir(client: &Query, steps: usize) -> dagger_sdk::Directory {
    let file = |d: dagger_sdk::Directory, path: String| {
        d.with_new_file_opts(
            path,
            "",
            DirectoryWithNewFileOpts {
                permissions: Some(SCRATCH_FILE_MODE),
            },
        )
    };
    let mut dir = file(client.directory(), "output".into());
    for n in 1..=steps {
        dir = file(dir, format!("steps/{n}.out"));
        dir = file(dir, format!("steps/{n}.err"));
    }
    dir
}

/// Resolves a git source's ref to a commit, then the tree of that commit (so the checkout
/// is cached by commit). A ref or repository that does not exist is the task's failure.
async fn checkout(client: &Query, g: &GitCheckout) -> Step<(String, Id)> {
    let repo = client.git(g.url.as_str());
    let reference = match &g.reference {
        Some(r) => repo.r#ref(r.as_str()),
        None => repo.head(),
    };
    let doing = format!(
        "{}: resolving {} of {}",
        g.field,
        g.reference.as_deref().unwrap_or("HEAD"),
        g.url
    );
    let commit = match reference.commit().await {
        Ok(commit) => commit,
        Err(e) => {
            let failure = Failure::from_sdk(&e);
            if let Failure::Engine(why) = &failure
                && is_missing_ref(why)
            {
                return Err(Stopped::Done(ExecOutcome::failed(
                    1,
                    ErrorClass::User,
                    format!("{doing}: {why} (check {}.url and .ref)", g.field),
                )));
            }
            return Err(Stopped::Sdk { failure, doing });
        }
    };
    let opts = GitRefTreeOpts {
        depth: None,
        discard_git_dir: Some(!g.keep_git_dir),
        include_tags: None,
    };
    let tree = repo
        .commit(commit.as_str())
        .tree_opts(opts)
        .id()
        .await
        .map_err(at(format!("{}: the tree of commit {commit}", g.field)))?;
    Ok((commit, tree))
}

/// Whether an engine message says the repository or ref does not exist (as opposed to the
/// network or the engine failing).
fn is_missing_ref(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "couldn't find remote ref",
        "repository not found",
        "unknown revision",
        "not a valid ref",
        "does not appear to be a git repository",
    ]
    .iter()
    .any(|p| m.contains(p))
}
