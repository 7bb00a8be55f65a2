//! Workflow templates: parameterised workflow definitions, versioned, loaded from the
//! built-ins shipped in the binary and from a directory of YAML files. This module owns the
//! [`Registry`] of every loaded version and rendering a template with parameter values into
//! a [`proto::WorkflowSpec`]; the gRPC `TemplateService` sits on top of it.
//!
//! A template file:
//!
//! ```yaml
//! name: ci-pipeline
//! version: 2
//! description: Build and test.
//! parameters:
//!   - {name: repository, type: string, required: true, pattern: '^(https?|git|ssh)://.+'}
//!   - {name: parallelism, type: int, default: 4, min: 1, max: 64}
//!   - {name: platforms, type: list, default: [linux/amd64]}
//! workflow:
//!   tasks:
//!     - name: build
//!       shell: {command: [make, "-j${{ params.parallelism }}", "${{ params.platforms }}"]}
//! ```
//!
//! Every string of the workflow body may hold `${{ params.NAME }}`; a list element that is
//! exactly a list parameter expands into its items. `${{ tasks.NODE.outputs.KEY }}` stays as
//! written for the controller to fill at run time. Layout: `file` reads and checks one file,
//! `params` reads parameter values, `render` substitutes placeholders.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use scabbard_common::{Error, Result, proto, wfdef};

mod file;
mod params;
mod render;

use file::Loaded;

/// The built-in templates: (file name, text).
const BUILTINS: [(&str, &str); 4] = [
    (
        "ci-pipeline.yaml",
        include_str!("../../templates/ci-pipeline.yaml"),
    ),
    (
        "data-processing.yaml",
        include_str!("../../templates/data-processing.yaml"),
    ),
    (
        "ml-training.yaml",
        include_str!("../../templates/ml-training.yaml"),
    ),
    (
        "scheduled-maintenance.yaml",
        include_str!("../../templates/scheduled-maintenance.yaml"),
    ),
];

/// `Template.source` of the built-ins.
pub const BUILTIN_SOURCE: &str = "builtin";

/// Every loaded version of every template.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    templates: BTreeMap<String, BTreeMap<u32, Loaded>>,
}

impl Registry {
    /// The built-in templates plus every `*.yaml` / `*.yml` file in `dir` (if given). A
    /// broken file, a name+version defined twice, or a file reusing a built-in's
    /// name+version fails the load; the one error lists every problem, each naming its file
    /// and field.
    pub fn load(dir: Option<&Path>) -> Result<Self> {
        let mut reg = Self::builtin();
        let Some(dir) = dir else {
            return Ok(reg);
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| Error::invalid(format!("template directory {}: {e}", dir.display())))?;
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| {
                Error::invalid(format!("template directory {}: {e}", dir.display()))
            })?;
            let path = entry.path();
            let yaml = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e == "yaml" || e == "yml");
            if yaml && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        let mut errors = Vec::new();
        for path in paths {
            let source = path.display().to_string();
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!("{source}: {e}"));
                    continue;
                }
            };
            match file::parse(&text, &source) {
                Ok(t) => {
                    if let Err(e) = reg.insert(t) {
                        errors.push(e);
                    }
                }
                Err(es) => errors.extend(es),
            }
        }
        match errors.len() {
            0 => Ok(reg),
            1 => Err(Error::invalid(errors.remove(0))),
            n => Err(Error::invalid(format!(
                "{n} template errors: {}",
                errors.join("; ")
            ))),
        }
    }

    /// The built-in templates alone.
    pub fn builtin() -> Self {
        let mut reg = Self::default();
        for (file_name, text) in BUILTINS {
            let loaded = file::parse(text, BUILTIN_SOURCE)
                .map_err(|es| es.join("; "))
                .and_then(|t| reg.insert(t));
            if let Err(e) = loaded {
                // A bug caught by the tests; the rest of the registry still works.
                tracing::error!(file = file_name, error = %e, "built-in template is broken");
            }
        }
        reg
    }

    /// Adds one loaded template unless its name+version is taken.
    fn insert(&mut self, t: Loaded) -> std::result::Result<(), String> {
        let versions = self.templates.entry(t.name.clone()).or_default();
        if let Some(old) = versions.get(&t.version) {
            return Err(if old.source == BUILTIN_SOURCE {
                format!(
                    "{}: template {} version {} is built in; give yours another name or version",
                    t.source, t.name, t.version
                )
            } else {
                format!(
                    "{}: template {} version {} is also defined in {}",
                    t.source, t.name, t.version, old.source
                )
            });
        }
        versions.insert(t.version, t);
        Ok(())
    }

    /// The latest version of each template, sorted by name; `versions` lists every loaded
    /// version of it.
    pub fn list(&self) -> Vec<proto::Template> {
        self.templates
            .values()
            .filter_map(|versions| versions.values().next_back().map(|t| self.describe(t)))
            .collect()
    }

    /// One version of a template (0 = the latest).
    pub fn get(&self, name: &str, version: u32) -> Result<proto::Template> {
        self.find(name, version).map(|t| self.describe(t))
    }

    /// Renders a template (0 = the latest version) with parameter values given as text.
    /// Every problem with the values is reported at once, in one INVALID_ARGUMENT naming
    /// each parameter. Returns the workflow and the version used.
    pub fn render(
        &self,
        name: &str,
        version: u32,
        params: &HashMap<String, String>,
    ) -> Result<(proto::WorkflowSpec, u32)> {
        let t = self.find(name, version)?;
        let mut values = HashMap::with_capacity(t.params.len());
        let mut errors = Vec::new();
        for p in &t.params {
            let raw = match (params.get(&p.name), &p.default) {
                (Some(v), _) => v.as_str(),
                (None, Some(d)) => d.as_str(),
                (None, None) => {
                    errors.push(format!("param {}: required, no default", p.name));
                    continue;
                }
            };
            match p.parse(raw) {
                Ok(v) => {
                    values.insert(p.name.clone(), v);
                }
                Err(e) => errors.push(format!("param {}: {e}", p.name)),
            }
        }
        let mut unknown: Vec<&String> = params
            .keys()
            .filter(|k| !t.params.iter().any(|p| &p.name == *k))
            .collect();
        unknown.sort();
        for k in unknown {
            let takes = t
                .params
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            errors.push(format!(
                "param {k}: no such parameter ({} takes {})",
                t.name,
                if takes.is_empty() { "none" } else { &takes }
            ));
        }
        if !errors.is_empty() {
            let n = errors.len();
            return Err(Error::invalid(format!(
                "{n} parameter error{} in template {} v{}: {}",
                if n == 1 { "" } else { "s" },
                t.name,
                t.version,
                errors.join("; ")
            )));
        }
        let body = render::substitute(&t.workflow, &values);
        let mut spec = wfdef::workflow_from_value(body).map_err(|e| {
            Error::invalid(format!(
                "template {} v{}: the parameters give an invalid workflow: {}",
                t.name,
                t.version,
                file::body_error(&e)
            ))
        })?;
        if spec.name.is_empty() {
            spec.name = t.name.clone();
        }
        Ok((spec, t.version))
    }

    fn find(&self, name: &str, version: u32) -> Result<&Loaded> {
        let Some(versions) = self.templates.get(name) else {
            let names: Vec<&str> = self.templates.keys().map(String::as_str).collect();
            return Err(Error::NotFoundListing(format!(
                "template {name:?} not found (available: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        };
        let found = if version == 0 {
            versions.values().next_back()
        } else {
            versions.get(&version)
        };
        found.ok_or_else(|| {
            Error::not_found(
                "template",
                format!(
                    "{name} version {version} (loaded versions: {})",
                    version_list(versions)
                ),
            )
        })
    }

    fn describe(&self, t: &Loaded) -> proto::Template {
        proto::Template {
            name: t.name.clone(),
            version: t.version,
            description: t.description.clone(),
            params: t.params.iter().map(|p| p.to_proto()).collect(),
            source: t.source.clone(),
            versions: self
                .templates
                .get(&t.name)
                .map(|v| v.keys().copied().collect())
                .unwrap_or_default(),
            body: t.body.clone(),
        }
    }
}

fn version_list(versions: &BTreeMap<u32, Loaded>) -> String {
    versions
        .keys()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
