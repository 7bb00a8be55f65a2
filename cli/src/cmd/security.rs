//! `scabbard login|logout|whoami`, `scabbard token create|list|revoke`,
//! `scabbard project create|list|get|update|delete`, `scabbard audit`: thin wrappers
//! around `AdminService` and `ProjectService`.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use scabbard_common::client::{self, AdminServiceClient, ProjectServiceClient};
use scabbard_common::proto::{
    CreateProjectRequest, CreateTokenRequest, DeleteProjectRequest, GetProjectRequest,
    ListAuditRequest, ListProjectsRequest, ListTokensRequest, Project, ProjectQuota,
    RevokeTokenRequest, Scope, TokenInfo, TokenKind, UpdateProjectRequest, WhoAmIRequest,
};

use crate::args::{
    AuditArgs, KindArg, LoginArgs, LogoutArgs, ProjectCommand, QuotaArgs, ScopeArg, Target,
    TokenCommand,
};
use crate::credentials::{self, Credentials, Entry, TokenSource};
use crate::{output, render};

/// Asks the controller who `token` is.
async fn who_am_i(controller: &str, opts: &client::ClientOptions) -> Result<TokenInfo> {
    let channel = client::connect_leader_with(controller, opts).await?;
    let mut admin = AdminServiceClient::new(client::authed(channel, opts.token.as_deref())?);
    let resp = admin
        .who_am_i(WhoAmIRequest {})
        .await
        .map_err(output::status)?
        .into_inner();
    resp.token
        .context("the controller did not say which token this is")
}

/// Reads a token from stdin; on a terminal, prompts and turns echo off while it is typed
/// (`stty -echo`), so the token never shows on the screen.
fn read_token() -> Result<String> {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let hidden = tty && stty("-echo");
    if tty {
        eprint!("API token (input hidden): ");
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if hidden {
        stty("echo");
        eprintln!();
    }
    read.context("reading the token from stdin")?;
    let token = line.trim().to_string();
    if token.is_empty() {
        bail!("no token given: type it at the prompt, pipe it on stdin, or set SCABBARD_TOKEN");
    }
    Ok(token)
}

pub(crate) async fn login(a: LoginArgs) -> Result<u8> {
    let t = a.target;
    let path = credentials::path()?;
    let mut creds = Credentials::load(&path)?;
    // `login --context NAME` without --controller logs in again to that context's
    // controller when it exists.
    let context_controller = match (&t.controller, crate::contexts::selected_name()) {
        (None, Some(name)) => crate::contexts::Contexts::load(&crate::contexts::path()?)?
            .get(name)
            .map(|c| c.controller.clone()),
        _ => None,
    };
    let wanted = t.controller.clone().or(context_controller);
    let saved = match &wanted {
        Some(addr) => creds.find(addr),
        None => creds.current(),
    }
    .cloned();
    let controller = wanted
        .or_else(|| saved.as_ref().map(|e| e.address.clone()))
        .unwrap_or_else(|| credentials::DEFAULT_CONTROLLER.to_string());
    let token = match t.token.clone().filter(|s| !s.trim().is_empty()) {
        Some(tok) => tok.trim().to_string(),
        None => read_token()?,
    };
    // TLS files: the flags' when any is given, else the ones saved before.
    let tls_given = t.ca_cert.is_some() || t.client_cert.is_some() || t.client_key.is_some();
    let abs = |p: &Option<PathBuf>| p.as_deref().map(credentials::absolute);
    let mut entry = Entry {
        address: controller.clone(),
        token: token.clone(),
        tls_domain: t.tls_domain.clone(),
        ..Entry::default()
    };
    if tls_given {
        entry.ca_cert = abs(&t.ca_cert);
        entry.client_cert = abs(&t.client_cert);
        entry.client_key = abs(&t.client_key);
    } else if let Some(s) = &saved {
        entry.ca_cert = s.ca_cert.clone();
        entry.client_cert = s.client_cert.clone();
        entry.client_key = s.client_key.clone();
        entry.tls_domain = entry.tls_domain.or_else(|| s.tls_domain.clone());
    }
    let opts = client::ClientOptions {
        token: Some(token),
        ca_cert: entry.ca_cert.clone(),
        client_cert: entry.client_cert.clone(),
        client_key: entry.client_key.clone(),
        tls_domain: entry.tls_domain.clone(),
        request_timeout: crate::args::request_timeout(),
    };
    let info = who_am_i(&controller, &opts)
        .await
        .with_context(|| format!("checking the token with {controller}"))?;
    if info.kind() != TokenKind::Api {
        bail!(
            "this is a {} token; `scabbard login` takes an API token",
            output::kind(&info)
        );
    }
    entry.token_id = Some(info.id.clone());
    entry.token_name = Some(info.name.clone());
    let ctx = save_context(&controller, &entry, None)?;
    creds.upsert(entry, true);
    creds.save(&path)?;
    say!(
        "logged in to {controller} as {:?} (token {}, scopes {}, project {}); context {ctx:?} is current",
        info.name,
        info.id,
        output::scopes(&info),
        info.project
    );
    say!("token saved in {}", path.display());
    Ok(0)
}

pub(crate) fn logout(a: LogoutArgs) -> Result<u8> {
    let path = credentials::path()?;
    let mut creds = Credentials::load(&path)?;
    let gone = if a.all {
        creds.current = None;
        std::mem::take(&mut creds.controllers)
    } else {
        let addr = match a.controller.or_else(|| creds.current.clone()) {
            Some(a) => a,
            None => bail!(
                "not logged in to any controller (no current entry in {})",
                path.display()
            ),
        };
        let gone = creds.remove(&addr);
        if gone.is_empty() {
            bail!("no saved token for {addr} in {}", path.display());
        }
        gone
    };
    creds.save(&path)?;
    for e in &gone {
        let id = e.token_id.as_deref().unwrap_or("?");
        say!("forgot the token for {} (token {id})", e.address);
    }
    if !gone.is_empty() {
        say!("the tokens stay valid until revoked: scabbard token revoke <id>");
    }
    Ok(0)
}

pub(crate) async fn whoami(target: Target) -> Result<u8> {
    let r = credentials::resolve(&target)?;
    r.token()?;
    let info = who_am_i(&r.controller, &r.opts).await?;
    if render::structured() {
        render::show(&info, || ())?;
        return Ok(0);
    }
    say!(
        "context:    {}",
        r.context
            .as_deref()
            .map_or("(none: --controller or the credentials file)".into(), |c| {
                crate::printable::printable(c).into_owned()
            })
    );
    say!("controller: {}", r.controller);
    match &r.source {
        TokenSource::Given => say!("token from: --token / SCABBARD_TOKEN"),
        TokenSource::File(p) => say!("token from: {}", p.display()),
        TokenSource::Context(t) => say!("token from: the context ({t})"),
        TokenSource::None => {}
    }
    output::token(&info);
    Ok(0)
}

fn kind(k: KindArg) -> TokenKind {
    match k {
        KindArg::Api => TokenKind::Api,
        KindArg::Registration => TokenKind::Registration,
        KindArg::Agent => TokenKind::Agent,
    }
}

fn scope(s: ScopeArg) -> Scope {
    match s {
        ScopeArg::Read => Scope::Read,
        ScopeArg::Submit => Scope::Submit,
        ScopeArg::Operator => Scope::Operator,
        ScopeArg::Admin => Scope::Admin,
    }
}

pub(crate) async fn token(c: TokenCommand) -> Result<u8> {
    match c {
        TokenCommand::Create {
            target,
            kind: k,
            name,
            scopes,
            project,
            ttl,
            uses,
        } => {
            match k {
                KindArg::Agent => bail!(
                    "agent tokens are issued when a worker registers; create a registration token (--kind registration)"
                ),
                KindArg::Api if scopes.is_empty() => {
                    bail!("an API token needs --scope (read, submit, operator or admin)")
                }
                KindArg::Registration if !scopes.is_empty() => {
                    bail!("registration tokens take no --scope")
                }
                KindArg::Api if uses.is_some() => {
                    bail!("--uses is for registration tokens")
                }
                _ => {}
            }
            let mut admin = AdminServiceClient::new(super::connect(&target).await?);
            let resp = admin
                .create_token(CreateTokenRequest {
                    kind: kind(k) as i32,
                    name,
                    scopes: scopes.into_iter().map(|s| scope(s) as i32).collect(),
                    project: project.unwrap_or_default(),
                    ttl_ms: ttl.map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX)),
                    max_uses: uses.unwrap_or(0),
                })
                .await
                .map_err(output::status)?
                .into_inner();
            if render::structured() {
                // The whole response: the token's info and its secret, shown this once.
                render::show(&resp, || ())?;
                return Ok(0);
            }
            let t = resp.token.unwrap_or_default();
            esay!(
                "created {} token {} {:?} (scopes {}, project {}, expires {})",
                output::kind(&t),
                t.id,
                t.name,
                output::scopes(&t),
                t.project,
                output::expires(&t)
            );
            esay!("The secret below is shown only this once: store it now.");
            // Alone on stdout, for scripts: TOKEN=$(scabbard token create ...).
            say!("{}", resp.secret);
        }
        TokenCommand::List {
            target,
            project,
            kind: k,
            all,
        } => {
            let mut admin = AdminServiceClient::new(super::connect(&target).await?);
            let tokens = admin
                .list_tokens(ListTokensRequest {
                    project: project.unwrap_or_default(),
                    kind: k.map_or(TokenKind::Unspecified, kind) as i32,
                    include_revoked: all,
                })
                .await
                .map_err(output::status)?
                .into_inner()
                .tokens;
            render::show(&tokens, || output::tokens(&tokens))?;
        }
        TokenCommand::Revoke { target, id, reason } => {
            let mut admin = AdminServiceClient::new(super::connect(&target).await?);
            let t = admin
                .revoke_token(RevokeTokenRequest { id, reason })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&t, || say!("revoked token {} {:?}", t.id, t.name))?;
        }
    }
    Ok(0)
}

/// `quota` with the given flags applied.
fn apply_quota(mut quota: ProjectQuota, q: QuotaArgs) -> ProjectQuota {
    if let Some(n) = q.max_queued {
        quota.max_queued_tasks = n;
    }
    if let Some(n) = q.max_running {
        quota.max_running_tasks = n;
    }
    if let Some(n) = q.rate {
        quota.requests_per_second = n;
    }
    if let Some(n) = q.burst {
        quota.burst = n;
    }
    quota
}

pub(crate) async fn project(c: ProjectCommand) -> Result<u8> {
    match c {
        ProjectCommand::Create {
            target,
            name,
            description,
            quota,
            retention_days,
        } => {
            let mut projects = ProjectServiceClient::new(super::connect(&target).await?);
            let p = projects
                .create(CreateProjectRequest {
                    project: Some(Project {
                        name,
                        description,
                        quota: Some(apply_quota(ProjectQuota::default(), quota)),
                        created_at_ms: 0,
                        retention_days: retention_days.unwrap_or(0.0),
                    }),
                })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&p, || say!("created project {}", p.name))?;
        }
        ProjectCommand::List { target } => {
            let mut projects = ProjectServiceClient::new(super::connect(&target).await?);
            let ps = projects
                .list(ListProjectsRequest {})
                .await
                .map_err(output::status)?
                .into_inner()
                .projects;
            render::show(&ps, || output::projects(&ps))?;
        }
        ProjectCommand::Get { target, name } => {
            let mut projects = ProjectServiceClient::new(super::connect(&target).await?);
            let p = projects
                .get(GetProjectRequest { name })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&p, || output::project(&p))?;
        }
        ProjectCommand::Update {
            target,
            name,
            description,
            quota,
            retention_days,
        } => {
            let mut projects = ProjectServiceClient::new(super::connect(&target).await?);
            // Update replaces description, quota and retention: start from the current ones.
            let mut p = projects
                .get(GetProjectRequest { name })
                .await
                .map_err(output::status)?
                .into_inner();
            if let Some(d) = description {
                p.description = d;
            }
            p.quota = Some(apply_quota(p.quota.unwrap_or_default(), quota));
            if let Some(d) = retention_days {
                p.retention_days = d;
            }
            let p = projects
                .update(UpdateProjectRequest { project: Some(p) })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&p, || output::project(&p))?;
        }
        ProjectCommand::Delete { target, name } => {
            let mut projects = ProjectServiceClient::new(super::connect(&target).await?);
            let resp = projects
                .delete(DeleteProjectRequest { name: name.clone() })
                .await
                .map_err(output::status)?
                .into_inner();
            render::show(&resp, || {
                say!("deleted project {name} (its tokens are revoked)")
            })?;
        }
    }
    Ok(0)
}

pub(crate) async fn audit(a: AuditArgs) -> Result<u8> {
    let mut admin = AdminServiceClient::new(super::connect(&a.target).await?);
    let entries = admin
        .list_audit(ListAuditRequest {
            limit: a.limit.clamp(1, 1000),
            project: a.project.unwrap_or_default(),
            action: a.action.unwrap_or_default(),
        })
        .await
        .map_err(output::status)?
        .into_inner()
        .entries;
    render::show(&entries, || output::audit(&entries))?;
    Ok(0)
}

/// For `scabbard dev`: the admin token kept in `<data_dir>/admin.token` (so a restart on
/// the same data dir, whose cluster is bootstrapped already, keeps a working token), or a
/// new one saved there.
pub(crate) fn dev_admin_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = scabbard_controller::auth::secrets::new_token(TokenKind::Api);
    credentials::write_private(&path, format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// For `scabbard dev`: saves `token` as the credentials entry for `addr` and the context
/// `dev` (or `--context`'s name) for it, made current; returns the file's path and the
/// context's name.
pub(crate) fn save_dev_login(
    addr: &str,
    token: &str,
    ca_cert: Option<&Path>,
) -> Result<(PathBuf, String)> {
    let path = credentials::path()?;
    let mut creds = Credentials::load(&path)?;
    let entry = Entry {
        address: addr.to_string(),
        token: token.to_string(),
        token_name: Some("bootstrap admin".into()),
        ca_cert: ca_cert.map(credentials::absolute),
        ..Entry::default()
    };
    let ctx = save_context(addr, &entry, Some("dev"))?;
    creds.upsert(entry, true);
    creds.save(&path)?;
    Ok((path, ctx))
}

/// Creates or updates the context for `controller` (named by `--context`, else the one
/// already naming that controller, else `fallback` or the controller's first address) with
/// `entry`'s TLS files and its token from the credentials file; makes it current.
fn save_context(controller: &str, entry: &Entry, fallback: Option<&str>) -> Result<String> {
    use crate::contexts::{self, Contexts, Ctx};
    let path = contexts::path()?;
    let mut all = Contexts::load(&path)?;
    let first = scabbard_common::client::addresses(controller)
        .into_iter()
        .next()
        .unwrap_or_else(|| controller.to_string());
    let name = match contexts::selected_name() {
        Some(n) => n.to_string(),
        None => all.name_for(controller, fallback.unwrap_or(&first)),
    };
    all.upsert_current(Ctx {
        name: name.clone(),
        controller: controller.to_string(),
        token: contexts::TOKEN_FROM_CREDENTIALS.into(),
        ca_cert: entry.ca_cert.clone(),
        client_cert: entry.client_cert.clone(),
        client_key: entry.client_key.clone(),
        tls_domain: entry.tls_domain.clone(),
    });
    all.save(&path)?;
    Ok(name)
}
