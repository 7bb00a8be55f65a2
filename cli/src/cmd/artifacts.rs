//! `scabbard artifacts list|get`: what a task or workflow serves, and downloading it —
//! through the client library's [`download_artifact`] (resumes a dropped stream, checks
//! the SHA-256) into a temporary archive in the output directory, then unpacked into
//! `DIR/<name>`. Nothing is left behind by a download that fails its check.

use std::path::Path;

use anyhow::{Context, Result, bail};
use scabbard_common::client::artifacts::download_from;
use scabbard_common::client::{ArtifactServiceClient, AuthedChannel};
use scabbard_common::proto::{
    ArtifactKind, ArtifactRef, DownloadArtifactRequest, ListArtifactsRequest,
};
use tonic::Code;

use crate::args::ArtifactsCommand;
use crate::{output, render};

type Client = ArtifactServiceClient<AuthedChannel>;

pub(crate) async fn artifacts(c: ArtifactsCommand) -> Result<u8> {
    match c {
        ArtifactsCommand::List { target, id } => {
            let mut client = Client::new(super::connect(&target).await?);
            let (refs, _) = served(&mut client, &id).await?;
            render::show(&refs, || table(&refs))?;
            Ok(0)
        }
        ArtifactsCommand::Get {
            target,
            id,
            name,
            dir,
            node,
        } => {
            let mut client = Client::new(super::connect(&target).await?);
            let (refs, by_node) = match &node {
                Some(node) => {
                    let refs = list(&mut client, &id, true).await?;
                    let nodes: Vec<&str> = refs.iter().map(|r| r.workflow_node.as_str()).collect();
                    let picked: Vec<ArtifactRef> = refs
                        .iter()
                        .filter(|r| &r.workflow_node == node)
                        .cloned()
                        .collect();
                    if picked.is_empty() {
                        bail!(
                            "workflow {id} has no artifacts from node {node:?} (nodes with artifacts: {})",
                            if nodes.is_empty() {
                                "none".to_string()
                            } else {
                                nodes.join(", ")
                            }
                        );
                    }
                    (picked, false)
                }
                None => served(&mut client, &id).await?,
            };
            let refs = pick(refs, name.as_deref(), &id)?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for r in &refs {
                let dest = if by_node {
                    dir.join(&r.workflow_node).join(&r.name)
                } else {
                    dir.join(&r.name)
                };
                fetch(&mut client, r, &dest).await?;
                if render::structured() {
                    continue;
                }
                say!(
                    "{} → {} ({}, {}, sha256 {})",
                    r.name,
                    dest.display(),
                    kind_name(r),
                    scabbard_controller::artifacts::fmt_bytes(r.size),
                    &r.sha256[..r.sha256.len().min(12)]
                );
            }
            // JSON/YAML: the artifacts downloaded, as `artifacts list` shows them.
            if render::structured() {
                render::show(&refs, || ())?;
            }
            Ok(0)
        }
    }
}

/// What `id` serves: as a task, else as a workflow (then with `true`: nodes matter).
async fn served(client: &mut Client, id: &str) -> Result<(Vec<ArtifactRef>, bool)> {
    match list_raw(client, id, false).await {
        Ok(refs) => Ok((refs, false)),
        Err(s) if s.code() == Code::NotFound => match list_raw(client, id, true).await {
            Ok(refs) => Ok((refs, true)),
            Err(w) if w.code() == Code::NotFound => {
                bail!("no task or workflow {id:?} (NOT_FOUND)")
            }
            Err(w) => Err(output::status(w)),
        },
        Err(s) => Err(output::status(s)),
    }
}

async fn list(client: &mut Client, id: &str, workflow: bool) -> Result<Vec<ArtifactRef>> {
    list_raw(client, id, workflow).await.map_err(output::status)
}

async fn list_raw(
    client: &mut Client,
    id: &str,
    workflow: bool,
) -> std::result::Result<Vec<ArtifactRef>, tonic::Status> {
    let req = if workflow {
        ListArtifactsRequest {
            workflow_id: id.into(),
            ..Default::default()
        }
    } else {
        ListArtifactsRequest {
            task_id: id.into(),
            ..Default::default()
        }
    };
    Ok(client.list(req).await?.into_inner().artifacts)
}

/// `refs`, or only those named `name` (an error listing what there is when none is).
fn pick(refs: Vec<ArtifactRef>, name: Option<&str>, id: &str) -> Result<Vec<ArtifactRef>> {
    let names: Vec<String> = refs.iter().map(|r| r.name.clone()).collect();
    let picked: Vec<ArtifactRef> = match name {
        None => refs,
        Some(n) => refs.into_iter().filter(|r| r.name == n).collect(),
    };
    if picked.is_empty() {
        match name {
            Some(n) => bail!(
                "{id} serves no artifact {n:?} ({})",
                if names.is_empty() {
                    "it serves none: artifacts are served once a task succeeded".to_string()
                } else {
                    format!("it serves {}", names.join(", "))
                }
            ),
            None => {
                bail!("{id} serves no artifacts (a task serves its artifacts once it succeeded)")
            }
        }
    }
    Ok(picked)
}

/// Downloads `r` into a temporary archive next to `dest`, then unpacks it at `dest`.
/// On any failure, nothing of it is left.
async fn fetch(client: &mut Client, r: &ArtifactRef, dest: &Path) -> Result<()> {
    if dest.symlink_metadata().is_ok() {
        bail!(
            "{} already exists: remove it or choose another --output-dir",
            dest.display()
        );
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let archive = scabbard_common::artifact::temp_archive(parent, &r.name);
    let result = download_and_unpack(client, r, &archive, dest).await;
    let _ = std::fs::remove_file(&archive);
    if result.is_err() {
        remove(dest);
    }
    result
}

async fn download_and_unpack(
    client: &mut Client,
    r: &ArtifactRef,
    archive: &Path,
    dest: &Path,
) -> Result<()> {
    let file = tokio::fs::File::create(archive)
        .await
        .with_context(|| format!("creating {}", archive.display()))?;
    let mut sink = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let req = DownloadArtifactRequest {
        task_id: r.task_id.clone(),
        name: r.name.clone(),
        ..Default::default()
    };
    let mut counted = crate::progress::Counted {
        inner: &mut sink,
        bar: crate::progress::bytes(&r.name, r.size),
    };
    let got = download_from(client.clone(), &req, &mut counted)
        .await
        .map_err(|e| {
            anyhow::anyhow!("{e} ({}); nothing was written", output::code_name(e.code()))
        })?;
    if let Some(bar) = counted.bar.take() {
        bar.finish_and_clear();
    }
    drop(sink);
    let kind = got.kind();
    let (archive, dest_owned) = (archive.to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || {
        scabbard_common::artifact::unpack(&archive, kind, &dest_owned)
    })
    .await?
    .with_context(|| format!("unpacking {} into {}", got.name, dest.display()))?;
    Ok(())
}

/// Removes a file or directory, ignoring what is not there.
fn remove(p: &Path) {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

fn kind_name(r: &ArtifactRef) -> &'static str {
    match r.kind() {
        ArtifactKind::File => "file",
        ArtifactKind::Directory => "directory",
        ArtifactKind::Unspecified => "?",
    }
}

/// The task (or workflow node) an artifact comes from.
fn origin(r: &ArtifactRef) -> String {
    if r.workflow_node.is_empty() {
        r.task_id.clone()
    } else {
        format!("{} ({})", r.workflow_node, r.task_id)
    }
}

fn table(refs: &[ArtifactRef]) {
    if refs.is_empty() {
        say!("no artifacts (a task serves its artifacts once it succeeded)");
        return;
    }
    let w = refs
        .iter()
        .map(|r| origin(r).len())
        .max()
        .unwrap_or(0)
        .max("TASK/NODE".len());
    say!(
        "{:<w$}  {:<20} {:<9} {:>10}  {:<12}  CREATED (UTC)",
        "TASK/NODE",
        "NAME",
        "KIND",
        "SIZE",
        "SHA256"
    );
    for r in refs {
        say!(
            "{:<w$}  {:<20} {:<9} {:>10}  {:<12}  {}",
            origin(r),
            r.name,
            kind_name(r),
            scabbard_controller::artifacts::fmt_bytes(r.size),
            &r.sha256[..r.sha256.len().min(12)],
            output::utc(r.created_at_ms)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str) -> ArtifactRef {
        ArtifactRef {
            task_id: "t1".into(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn picking_a_missing_name_says_what_there_is() {
        let e = pick(vec![r("dist"), r("report")], Some("nope"), "t1").unwrap_err();
        assert!(e.to_string().contains("it serves dist, report"), "{e}");
        let e = pick(vec![], None, "t1").unwrap_err();
        assert!(e.to_string().contains("once it succeeded"), "{e}");
        assert_eq!(
            pick(vec![r("a"), r("b")], Some("b"), "t1").unwrap().len(),
            1
        );
    }
}
