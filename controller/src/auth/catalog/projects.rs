//! Project records: the tenancy unit. Names are checked here; quotas are read by the core
//! (queued/running limits) and by the auth layer (request rates).

use prost::Message;
use scabbard_common::proto::{Project, ProjectQuota, TokenKind};
use scabbard_common::time::now_ms;
use scabbard_common::{Error, Result};

use super::{Catalog, PROJECT_PREFIX};
use crate::audit;
use crate::auth::principal::{ALL_PROJECTS, Principal};
use crate::store::{Compare, Op, Txn};

/// Checks a project name: 1–63 of `[a-z0-9-]`, starting with a letter.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "project name {name:?} must be 1-63 characters of a-z, 0-9 and '-', starting with a letter"
        )))
    }
}

fn validate(p: &Project) -> Result<()> {
    validate_name(&p.name)?;
    if p.description.len() > 1024 {
        return Err(Error::invalid("description is longer than 1024 bytes"));
    }
    if let Some(q) = &p.quota
        && q.burst > 0
        && q.requests_per_second == 0
    {
        return Err(Error::invalid(
            "quota.burst needs quota.requests_per_second as well",
        ));
    }
    if p.retention_days != 0.0 {
        crate::config::check_retention_days(
            "retention_days (0 = the controller's)",
            p.retention_days,
        )?;
    }
    Ok(())
}

impl Catalog {
    /// One project.
    pub fn project(&self, name: &str) -> Option<Project> {
        let c = self.cache.read().expect("catalog lock");
        c.projects.get(name).map(|(p, _)| p.clone())
    }

    /// A project's quota (zeros when it sets none or does not exist).
    pub fn quota(&self, name: &str) -> ProjectQuota {
        self.project(name).and_then(|p| p.quota).unwrap_or_default()
    }

    /// Projects visible to `who`.
    pub fn list_projects(&self, who: &Principal) -> Vec<Project> {
        let c = self.cache.read().expect("catalog lock");
        c.projects
            .values()
            .map(|(p, _)| p)
            .filter(|p| who.may_access(&p.name))
            .cloned()
            .collect()
    }

    /// Creates a project (cluster-wide admins only).
    pub async fn create_project(&self, who: &Principal, mut p: Project) -> Result<Project> {
        who.require_cluster_wide("creating a project")?;
        validate(&p)?;
        if p.name == ALL_PROJECTS {
            return Err(Error::invalid("\"*\" is not a project name"));
        }
        p.created_at_ms = now_ms();
        let key = format!("{PROJECT_PREFIX}{}", p.name);
        let a = audit::entry(who, "project.create", &p.name, &p.name, quota_detail(&p));
        let resp = self
            .store
            .txn(Txn {
                compares: vec![Compare::absent(key.clone())],
                success: vec![Op::put(key, p.encode_to_vec()), audit::op(&a)],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(Error::AlreadyExists(format!(
                "project {:?} already exists",
                p.name
            )));
        }
        self.put_project(p.clone(), resp.revision);
        Ok(p)
    }

    /// A project's own retention in days, if it sets one (read on every sweep, so a change
    /// takes effect on the next round).
    pub fn retention_days(&self, name: &str) -> Option<f64> {
        self.project(name)
            .map(|p| p.retention_days)
            .filter(|d| *d > 0.0)
    }

    /// Every project's own retention in days (projects that set one).
    pub fn retention_overrides(&self) -> Vec<(String, f64)> {
        let c = self.cache.read().expect("catalog lock");
        c.projects
            .values()
            .filter(|(p, _)| p.retention_days > 0.0)
            .map(|(p, _)| (p.name.clone(), p.retention_days))
            .collect()
    }

    /// Replaces a project's description, quota and retention.
    pub async fn update_project(&self, who: &Principal, p: Project) -> Result<Project> {
        validate(&p)?;
        who.check_project(&format!("project {}", p.name), &p.name)?;
        let (old, rev) = {
            let c = self.cache.read().expect("catalog lock");
            c.projects
                .get(&p.name)
                .cloned()
                .ok_or_else(|| Error::not_found("project", p.name.clone()))?
        };
        let new = Project {
            created_at_ms: old.created_at_ms,
            ..p
        };
        let key = format!("{PROJECT_PREFIX}{}", new.name);
        let a = audit::entry(
            who,
            "project.update",
            &new.name,
            &new.name,
            quota_detail(&new),
        );
        let resp = self
            .store
            .txn(Txn {
                compares: vec![Compare::mod_revision(key.clone(), rev)],
                success: vec![Op::put(key, new.encode_to_vec()), audit::op(&a)],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(Error::Conflict(format!(
                "project {} changed concurrently; retry",
                new.name
            )));
        }
        self.put_project(new.clone(), resp.revision);
        Ok(new)
    }

    /// Deletes a project and revokes its tokens (the caller checked it has no live tasks).
    pub async fn delete_project(&self, who: &Principal, name: &str) -> Result<()> {
        who.require_cluster_wide("deleting a project")?;
        validate_name(name)?;
        if name == crate::auth::DEFAULT_PROJECT {
            return Err(Error::FailedPrecondition(
                "the default project cannot be deleted".into(),
            ));
        }
        let rev = {
            let c = self.cache.read().expect("catalog lock");
            c.projects
                .get(name)
                .map(|(_, r)| *r)
                .ok_or_else(|| Error::not_found("project", name))?
        };
        let key = format!("{PROJECT_PREFIX}{name}");
        let a = audit::entry(who, "project.delete", name, name, "");
        let resp = self
            .store
            .txn(Txn {
                compares: vec![Compare::mod_revision(key.clone(), rev)],
                success: vec![Op::delete(key), audit::op(&a)],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(Error::Conflict(format!(
                "project {name} changed concurrently; retry"
            )));
        }
        self.cache
            .write()
            .expect("catalog lock")
            .projects
            .remove(name);
        for t in self.list_tokens(Some(name), TokenKind::Unspecified, false) {
            self.revoke_token(who, &t.id, "project deleted").await?;
        }
        Ok(())
    }

    fn put_project(&self, p: Project, rev: i64) {
        let mut c = self.cache.write().expect("catalog lock");
        if c.projects.get(&p.name).is_none_or(|(_, r)| *r <= rev) {
            c.projects.insert(p.name.clone(), (p, rev));
        }
    }
}

fn quota_detail(p: &Project) -> String {
    let q = p.quota.unwrap_or_default();
    format!(
        "max_queued={} max_running={} rps={} burst={} retention_days={}",
        q.max_queued_tasks, q.max_running_tasks, q.requests_per_second, q.burst, p.retention_days
    )
}
