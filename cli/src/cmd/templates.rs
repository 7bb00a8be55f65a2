//! `scabbard template list|show|render|run`: thin wrappers around `TemplateService`.

use anyhow::Result;
use scabbard_common::proto::template_service_client::TemplateServiceClient;
use scabbard_common::proto::{
    GetTemplateRequest, ListTemplatesRequest, RenderTemplateRequest, RunTemplateRequest,
};
use scabbard_common::wfdef;
use tonic::Code;

use crate::args::{TemplateCommand, param_map, version};
use crate::output::{self, catalog};
use crate::render;

pub(crate) async fn template(c: TemplateCommand) -> Result<u8> {
    match c {
        TemplateCommand::List { target } => {
            let mut t = TemplateServiceClient::new(super::connect(&target).await?);
            let resp = t
                .list(ListTemplatesRequest {})
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&resp.templates, || catalog::templates(&resp.templates))?;
        }
        TemplateCommand::Show {
            target,
            name,
            version: v,
            body,
        } => {
            let mut t = TemplateServiceClient::new(super::connect(&target).await?);
            let tpl = t
                .get(GetTemplateRequest {
                    name,
                    version: version(v),
                })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&tpl, || catalog::template(&tpl, body))?;
        }
        TemplateCommand::Render {
            target,
            name,
            params,
            version: v,
        } => {
            let params = param_map(params).map_err(anyhow::Error::msg)?;
            let mut t = TemplateServiceClient::new(super::connect(&target).await?);
            let resp = match t
                .render(RenderTemplateRequest {
                    name: name.clone(),
                    version: version(v),
                    params,
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == Code::InvalidArgument => return Ok(invalid(&name, &s)),
                Err(s) => return Err(output::status(s)),
            };
            if render::structured() {
                render::show(&resp, || ())?;
                return Ok(0);
            }
            esay!("# template {name} version {}", resp.version);
            print!(
                "{}",
                crate::printable::printable_text(&wfdef::to_yaml(
                    &resp.workflow.unwrap_or_default()
                ))
            );
        }
        TemplateCommand::Run {
            target,
            name,
            params,
            version: v,
            project,
            idempotency_key,
            watch,
            wait,
        } => {
            let params = param_map(params).map_err(anyhow::Error::msg)?;
            let channel = super::connect(&target).await?;
            let mut t = TemplateServiceClient::new(channel.clone());
            let resp = match t
                .run(RunTemplateRequest {
                    name: name.clone(),
                    version: version(v),
                    params,
                    idempotency_key: idempotency_key.unwrap_or_default(),
                    project: project.unwrap_or_default(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == Code::InvalidArgument => return Ok(invalid(&name, &s)),
                Err(s) => return Err(output::status(s)),
            };
            let mut wf = super::workflows::Client::new(channel);
            if wait {
                return super::verbs::started_with_progress(&mut wf, resp).await;
            }
            return super::workflows::started(&mut wf, resp, false, watch).await;
        }
    }
    Ok(0)
}

/// Prints every error of a refused render on stderr; the exit code is 1.
fn invalid(name: &str, s: &tonic::Status) -> u8 {
    esay!("error: template {name} does not render (INVALID_ARGUMENT):");
    for e in errors(s.message()) {
        esay!("  - {e}");
    }
    1
}

/// The separate errors of an INVALID_ARGUMENT message: one per line, or joined by `; `.
pub(crate) fn errors(message: &str) -> Vec<String> {
    let lines: Vec<&str> = message
        .lines()
        .map(|l| l.trim().trim_start_matches("- ").trim())
        .filter(|l| !l.is_empty())
        .collect();
    let parts: Vec<&str> = if lines.len() > 1 {
        lines
    } else {
        message
            .split("; ")
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect()
    };
    parts.into_iter().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_render_errors() {
        assert_eq!(
            errors("param env: required; param tag: does not match [a-z]+"),
            vec!["param env: required", "param tag: does not match [a-z]+"]
        );
        assert_eq!(
            errors("template has 2 errors:\n- param a: required\n- param b: not an int\n"),
            vec![
                "template has 2 errors:",
                "param a: required",
                "param b: not an int"
            ]
        );
        assert_eq!(errors("one problem"), vec!["one problem"]);
    }
}
