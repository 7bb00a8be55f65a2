//! `scabbard artifacts list|get` against a real controller: tables and JSON for a task and
//! a workflow, directory and file artifacts unpacked byte for byte (modes and links kept),
//! and a corrupted object refused with nothing left behind.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use scabbard_common::artifact::pack;
use scabbard_common::client::artifacts::upload_artifact;
use scabbard_common::proto::workflow_service_client::WorkflowServiceClient;
use scabbard_common::proto::{
    ArtifactSpec, ArtifactUploadHeader, Outcome, Requirements, SubmitWorkflowRequest, TaskResult,
    TaskSpec, WorkflowSpec, WorkflowState, WorkflowTask,
};
use scabbard_tests::agent::FakeAgent;
use scabbard_tests::*;

const T: Duration = Duration::from_secs(30);

/// Every entry under `root`: relative path → (mode, contents or link target).
fn tree(root: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let body = if m.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .display()
                    .to_string()
                    .into_bytes()
            } else if m.is_dir() {
                stack.push(p.clone());
                Vec::new()
            } else {
                std::fs::read(&p).unwrap()
            };
            out.insert(rel, (m.permissions().mode() & 0o7777, body));
        }
    }
    out
}

fn run(cmd: &mut std::process::Command) -> (bool, String, String) {
    let out = cmd.output().expect("run scabbard");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn list_and_get_for_tasks_and_workflows() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = Controller::start(&dir.path().join("c"), 0, &ControllerOpts::default())?;
    let addr = c.addr.to_string();
    let mut a = FakeAgent::connect(&addr, "a").await?;

    // What the task "produced": a directory (modes, a link, an empty dir) and a file.
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("bin"))?;
    std::fs::create_dir_all(src.join("empty"))?;
    std::fs::write(src.join("bin/app"), b"\x7fELF...")?;
    std::fs::set_permissions(src.join("bin/app"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(src.join("README"), "hello\n".repeat(10_000))?;
    std::os::unix::fs::symlink("bin/app", src.join("app"))?;
    let report = dir.path().join("report.json");
    std::fs::write(&report, br#"{"passed": 12}"#)?;
    let dist_archive = dir.path().join("dist.tar.zst");
    let report_archive = dir.path().join("report.tar.zst");
    let dist = pack(&src, &dist_archive)?;
    let rep = pack(&report, &report_archive)?;

    let node_spec = TaskSpec {
        requirements: Some(Requirements {
            labels: [("name".to_string(), "a".to_string())].into(),
            ..Default::default()
        }),
        artifacts: ["dist", "report"]
            .map(|n| ArtifactSpec {
                name: n.into(),
                path: format!("out/{n}"),
                optional: false,
            })
            .to_vec(),
        ..shell("true")
    };
    let wf = WorkflowServiceClient::new(admin_channel(&addr).await?)
        .submit(SubmitWorkflowRequest {
            spec: Some(WorkflowSpec {
                name: "ci".into(),
                tasks: vec![WorkflowTask {
                    name: "build".into(),
                    spec: Some(node_spec),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            idempotency_key: String::new(),
            project: String::new(),
        })
        .await?
        .into_inner()
        .workflow
        .unwrap();
    let assign = a.accept_next(T).await?;
    let task = assign.task_id.clone();
    for (name, archive, packed) in [
        ("dist", &dist_archive, &dist),
        ("report", &report_archive, &rep),
    ] {
        let h = ArtifactUploadHeader {
            task_id: task.clone(),
            fencing_token: assign.fencing_token,
            name: name.into(),
            kind: packed.kind as i32,
            size: packed.size,
            sha256: packed.sha256.clone(),
        };
        upload_artifact(&mut a.artifacts(), h, archive).await?;
    }
    a.finish(
        &task,
        assign.fencing_token,
        TaskResult {
            outcome: Outcome::Succeeded as i32,
            ..Default::default()
        },
    )
    .await?;
    let wfc = WorkflowServiceClient::new(admin_channel(&addr).await?);
    eventually("the workflow to succeed", T, || {
        let mut wfc = wfc.clone();
        let id = wf.id.clone();
        async move {
            let w = wfc
                .get(scabbard_common::proto::GetWorkflowRequest { id })
                .await
                .ok()?
                .into_inner();
            (w.state() == WorkflowState::Succeeded).then_some(())
        }
    })
    .await?;

    let cfg = tempfile::tempdir()?;
    let scabbard = || {
        let mut cmd = cli(cfg.path());
        cmd.args(["artifacts", "--help"]);
        cmd
    };
    let (ok, help, _) = run(&mut scabbard());
    assert!(
        ok && help.contains("list") && help.contains("get"),
        "{help}"
    );
    let artifacts = |args: &[&str]| {
        let mut cmd = cli(cfg.path());
        cmd.arg("artifacts")
            .args(args)
            .args(["--controller", &addr]);
        run(&mut cmd)
    };

    // list: a table for the task, JSON for the workflow.
    let (ok, out, err) = artifacts(&["list", &task]);
    assert!(ok, "{err}");
    for says in [
        "TASK/NODE",
        "dist",
        "directory",
        "report",
        "file",
        &dist.sha256[..12],
    ] {
        assert!(out.contains(says), "{out} should say {says}");
    }
    let (ok, out, err) = artifacts(&["list", &wf.id, "-o", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let items = v.as_array().expect("an array");
    assert_eq!(items.len(), 2, "{out}");
    assert!(
        items
            .iter()
            .all(|i| i["workflowNode"] == "build" && i["taskId"] == task.as_str())
    );
    // The proto3 JSON mapping: 64-bit integers are strings.
    assert_eq!(items[0]["size"], dist.size.to_string());
    assert_eq!(items[0]["sha256"], dist.sha256.as_str());

    // get: everything of the task; one artifact of a workflow's node; a whole workflow.
    let d1 = dir.path().join("d1");
    let (ok, out, err) = artifacts(&["get", &task, "-o", d1.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("dist →"), "{out}");
    assert_eq!(tree(&d1.join("dist")), tree(&src));
    assert_eq!(std::fs::read(d1.join("report"))?, std::fs::read(&report)?);
    let d2 = dir.path().join("d2");
    let (ok, _, err) = artifacts(&[
        "get",
        &wf.id,
        "dist",
        "--node",
        "build",
        "-o",
        d2.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(tree(&d2.join("dist")), tree(&src));
    assert!(!d2.join("report").exists());
    let d3 = dir.path().join("d3");
    let (ok, _, err) = artifacts(&["get", &wf.id, "-o", d3.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(tree(&d3.join("build/dist")), tree(&src));
    assert!(d3.join("build/report").is_file());
    // Never over what exists.
    let (ok, _, err) = artifacts(&["get", &task, "dist", "-o", d1.to_str().unwrap()]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = artifacts(&["get", &task, "nope", "-o", d1.to_str().unwrap()]);
    assert!(!ok && err.contains("it serves dist, report"), "{err}");
    let (ok, _, err) = artifacts(&["get", &wf.id, "--node", "test", "-o", d1.to_str().unwrap()]);
    assert!(!ok && err.contains("nodes with artifacts: build"), "{err}");

    // A stored object that no longer matches its digest: refused, nothing left.
    let stored = c
        .data_dir
        .join("artifacts")
        .join(&task)
        .join(assign.fencing_token.to_string())
        .join("dist.tar.zst");
    let mut bytes = std::fs::read(&stored)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&stored, &bytes)?;
    let d4 = dir.path().join("d4");
    let (ok, _, err) = artifacts(&["get", &task, "dist", "-o", d4.to_str().unwrap()]);
    assert!(!ok, "a corrupt artifact must fail");
    assert!(
        err.contains("SHA-256") && err.contains(&dist.sha256),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&d4)?.count(),
        0,
        "nothing may be left in {}",
        d4.display()
    );

    // An unknown id.
    let (ok, _, err) = artifacts(&["list", "01nosuchthing"]);
    assert!(!ok && err.contains("no task or workflow"), "{err}");
    Ok(())
}
