//! `scabbard context list|use|show`: the contexts of `contexts.toml` (see
//! [`crate::contexts`]).

use anyhow::Result;

use crate::args::ContextCommand;
use crate::contexts::{self, Contexts, Ctx};
use crate::printable::printable;
use crate::render;

/// A context as printed with `-o json|yaml`.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Shown<'a> {
    name: &'a str,
    controller: &'a str,
    token: &'a str,
    ca_cert: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
    tls_domain: Option<&'a str>,
    current: bool,
}

fn shown<'a>(c: &'a Ctx, current: Option<&str>) -> Shown<'a> {
    let p = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    Shown {
        name: &c.name,
        controller: &c.controller,
        token: &c.token,
        ca_cert: p(&c.ca_cert),
        client_cert: p(&c.client_cert),
        client_key: p(&c.client_key),
        tls_domain: c.tls_domain.as_deref(),
        current: current == Some(c.name.as_str()),
    }
}

pub(crate) fn context(c: ContextCommand, selected: Option<String>) -> Result<u8> {
    let path = contexts::path()?;
    let mut all = Contexts::load(&path)?;
    match c {
        ContextCommand::List => {
            let cur = selected.as_deref().or(all.current.as_deref());
            let items: Vec<Shown> = all.contexts.iter().map(|c| shown(c, cur)).collect();
            render::show(&items, || {
                if items.is_empty() {
                    say!("no contexts yet: `scabbard login` and `scabbard dev` create them");
                    return;
                }
                say!(
                    "{:<2}{:<16} {:<32} {:<16} TLS",
                    "",
                    "NAME",
                    "CONTROLLER",
                    "TOKEN"
                );
                for s in &items {
                    say!(
                        "{:<2}{:<16} {:<32} {:<16} {}",
                        if s.current { "*" } else { "" },
                        printable(s.name),
                        printable(s.controller),
                        printable(s.token),
                        if s.ca_cert.is_some() { "yes" } else { "no" }
                    );
                }
            })?;
        }
        ContextCommand::Use { name } => {
            all.require(&name)?;
            all.current = Some(name.clone());
            all.save(&path)?;
            let c = all.require(&name)?;
            if render::structured() {
                render::show(&shown(c, Some(&name)), || ())?;
            } else {
                say!(
                    "switched to context {:?} (controller {})",
                    printable(&name),
                    printable(&c.controller)
                );
            }
        }
        ContextCommand::Show { name } => {
            let name = name.or(selected).or_else(|| all.current.clone());
            let Some(name) = name else {
                say!(
                    "no current context: commands use --controller, SCABBARD_CONTROLLER or the credentials file ({})",
                    crate::credentials::path()?.display()
                );
                return Ok(0);
            };
            let c = all.require(&name)?;
            let cur = all.current.as_deref();
            render::show(&shown(c, cur), || {
                say!("name:        {}", printable(&c.name));
                say!("controller:  {}", printable(&c.controller));
                say!("token:       {}", printable(&c.token));
                let p = |p: &Option<std::path::PathBuf>| {
                    p.as_ref()
                        .map_or("-".to_string(), |p| p.display().to_string())
                };
                say!("ca cert:     {}", p(&c.ca_cert));
                say!("client cert: {}", p(&c.client_cert));
                say!("client key:  {}", p(&c.client_key));
                say!("tls domain:  {}", c.tls_domain.as_deref().unwrap_or("-"));
                say!("current:     {}", cur == Some(c.name.as_str()));
                say!("file:        {}", path.display());
            })?;
        }
    }
    Ok(0)
}
