//! Templates through the API and the CLI: the built-ins render with their defaults and
//! refuse bad parameters listing every error; user templates load from a directory (a
//! broken file stops the controller naming the file and field) and run end to end.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use scabbard_common::proto::template_service_client::TemplateServiceClient;
use scabbard_common::proto::{
    GetTemplateRequest, ListTemplatesRequest, ParamType, RenderTemplateRequest, RunTemplateRequest,
    WorkflowState, task_spec::Kind,
};
use scabbard_tests::wf::{Cluster, wait_workflow};
use scabbard_tests::*;

const T: Duration = Duration::from_secs(60);

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn every_builtin_renders_with_its_defaults_into_dagger_container_tasks() -> anyhow::Result<()>
{
    let c = InProc::start().await?;
    let mut t = TemplateServiceClient::new(c.channel(ADMIN_TOKEN).await?);
    let list = t
        .list(ListTemplatesRequest {})
        .await?
        .into_inner()
        .templates;
    let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
    for builtin in [
        "ci-pipeline",
        "data-processing",
        "ml-training",
        "scheduled-maintenance",
    ] {
        assert!(names.contains(&builtin), "{names:?}");
        let tpl = t
            .get(GetTemplateRequest {
                name: builtin.into(),
                version: 0,
            })
            .await?
            .into_inner();
        assert_eq!(tpl.source, "builtin");
        assert!(!tpl.description.is_empty() && !tpl.body.is_empty());
        // The required parameters get a value; the rest take their defaults.
        let given = params(match builtin {
            "ci-pipeline" => &[("repository", "https://github.com/example/app.git")],
            "data-processing" => &[
                ("source_url", "https://data.example.com/in.csv"),
                ("destination", "s3://bucket-1/out"),
            ],
            "ml-training" => &[
                ("code_repository", "https://github.com/example/model.git"),
                ("dataset_url", "s3://datasets/train"),
                ("model_name", "churn-model"),
            ],
            _ => &[("bucket", "backups-1")],
        });
        let required: Vec<&str> = tpl
            .params
            .iter()
            .filter(|p| p.required)
            .map(|p| p.name.as_str())
            .collect();
        let mut keys: Vec<&str> = given.keys().map(String::as_str).collect();
        keys.sort();
        let mut req_sorted = required.clone();
        req_sorted.sort();
        assert_eq!(keys, req_sorted, "{builtin}: required parameters changed");
        assert!(
            tpl.params
                .iter()
                .all(|p| p.r#type() != ParamType::Unspecified)
        );
        let r = t
            .render(RenderTemplateRequest {
                name: builtin.into(),
                version: 0,
                params: given.clone(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("{builtin} with {given:?}: {e}"))?
            .into_inner();
        assert_eq!(r.version, tpl.version);
        let wf = r.workflow.unwrap();
        assert!(wf.tasks.len() >= 3, "{builtin}: {wf:?}");
        for task in &wf.tasks {
            let spec = task.spec.as_ref().unwrap();
            let Some(Kind::Container(c)) = &spec.kind else {
                panic!("{builtin}/{} is not a container task", task.name);
            };
            // Something to do: steps, or a source to fetch, or an image to publish.
            assert!(
                !c.image.is_empty()
                    && (!c.steps.is_empty()
                        || !c.git.is_empty()
                        || !c.downloads.is_empty()
                        || !c.publish.is_empty()),
                "{builtin}/{}: {c:?}",
                task.name
            );
            assert!(
                !serde_like(&spec.env).contains("${{ params."),
                "{builtin}: unrendered"
            );
        }
    }
    let ci = t
        .render(RenderTemplateRequest {
            name: "ci-pipeline".into(),
            version: 0,
            params: params(&[("repository", "https://github.com/example/app.git")]),
        })
        .await?
        .into_inner()
        .workflow
        .unwrap();
    let nodes: Vec<&str> = ci.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(nodes, ["checkout", "build", "test", "publish"]);
    Ok(())
}

fn serde_like(m: &HashMap<String, String>) -> String {
    format!("{m:?}")
}

#[tokio::test]
async fn bad_parameters_are_refused_with_every_error_listed() -> anyhow::Result<()> {
    let c = InProc::start().await?;
    let mut t = TemplateServiceClient::new(c.channel(ADMIN_TOKEN).await?);
    let r = t
        .render(RenderTemplateRequest {
            name: "ci-pipeline".into(),
            version: 0,
            params: params(&[
                ("go_version", "1.9"),
                ("parallelism", "lots"),
                ("nope", "x"),
            ]),
        })
        .await;
    let (code, msg) = code_and_message(r);
    assert_eq!(code, tonic::Code::InvalidArgument);
    for expect in ["repository", "go_version", "1.9", "parallelism", "nope"] {
        assert!(msg.contains(expect), "{expect} missing from: {msg}");
    }
    let r = t
        .render(RenderTemplateRequest {
            name: "no-such-template".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code_and_message(r).0, tonic::Code::NotFound);
    let r = t.render(RenderTemplateRequest::default()).await;
    assert_eq!(code_and_message(r).0, tonic::Code::InvalidArgument);
    Ok(())
}

const USER_TEMPLATE: &str = r#"
name: greet
version: 2
description: Say hello, then shout it.
parameters:
  - {name: who, type: string, required: true, pattern: '[a-z]+'}
  - {name: times, type: int, default: 2, min: 1, max: 5}
workflow:
  tasks:
    - name: hello
      shell: {command: [sh, -c, "echo greeting=hello-${{ params.who }} >> $SCABBARD_OUTPUT"]}
    - name: shout
      depends_on: [hello]
      shell: {command: [sh, -c, "for i in $(seq ${{ params.times }}); do echo ${{ tasks.hello.outputs.greeting }}; done"]}
"#;

#[tokio::test]
async fn a_user_template_runs_end_to_end_and_records_its_version() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("greet.yaml"), USER_TEMPLATE)?;
    let mut v1 = USER_TEMPLATE.replace("version: 2", "version: 1");
    v1 = v1.replace("Say hello", "Older: say hello").replace(
        "description: Older: say hello, then shout it.",
        "description: \"Older: say hello, then shout it.\"",
    );
    std::fs::write(dir.path().join("greet-v1.yml"), v1)?;
    let tdir = dir.path().display().to_string();
    let c = Cluster::start(&["w0"], 2, &["--templates-dir", &tdir])?;
    let mut t = TemplateServiceClient::new(c.channel().await?);
    let tpl = t
        .get(GetTemplateRequest {
            name: "greet".into(),
            version: 0,
        })
        .await?
        .into_inner();
    assert_eq!(tpl.version, 2);
    assert_eq!(tpl.versions, [1, 2]);
    assert!(tpl.source.ends_with("greet.yaml"), "{}", tpl.source);
    let run = t
        .run(RunTemplateRequest {
            name: "greet".into(),
            params: params(&[("who", "ada"), ("times", "3")]),
            ..Default::default()
        })
        .await?
        .into_inner()
        .workflow
        .unwrap();
    let r = run.template.clone().unwrap();
    assert_eq!((r.name.as_str(), r.version), ("greet", 2));
    assert_eq!(r.params["who"], "ada");
    let mut wfs = c.workflows().await?;
    let done = wait_workflow(&mut wfs, &run.id, T).await?;
    assert_eq!(done.state(), WorkflowState::Succeeded, "{done:#?}");
    let mut tasks = tasks_client(&c.addr()).await?;
    let shout = &done
        .nodes
        .iter()
        .find(|n| n.name == "shout")
        .unwrap()
        .task_id;
    assert_eq!(
        logs(&mut tasks, shout, 0, false).await?,
        "hello-ada\n".repeat(3)
    );
    // The CLI renders it and lists parameter errors one per line.
    let cfg = tempfile::tempdir()?;
    let out = cli(cfg.path())
        .args([
            "template",
            "render",
            "greet",
            "--controller",
            &c.addr(),
            "-p",
            "who=bob",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("hello-bob") && text.contains("shout"),
        "{text}"
    );
    let out = cli(cfg.path())
        .args(["template", "render", "greet", "--controller", &c.addr()])
        .args(["-p", "who=BOB", "-p", "times=9"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("who") && err.contains("times"), "{err}");
    Ok(())
}

#[test]
fn a_broken_template_file_stops_the_controller_naming_file_and_field() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("good.yaml"), USER_TEMPLATE)?;
    std::fs::write(
        dir.path().join("broken.yaml"),
        "name: broken\nversion: 1\nworkflow:\n  tasks:\n    - name: a\n      shell: {command: [echo]}\n      retry: {multiplier: fast}\n",
    )?;
    let mut child = std::process::Command::new(scabbard_bin())
        .args([
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--registration-token",
            TOKEN,
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--templates-dir")
        .arg(dir.path())
        .env("SCABBARD_BOOTSTRAP_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + T;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "controller did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err)?;
    assert!(!status.success());
    assert!(err.contains("broken.yaml"), "{err}");
    assert!(err.contains("retry.multiplier"), "{err}");
    Ok(())
}
