//! Reading one template file: its header (name, version, description), its parameters
//! (checked, defaults validated) and its workflow body, kept as a YAML value tree. At load
//! the body's placeholders are checked and it is rendered once with the defaults (stand-ins
//! for required parameters) so a broken body is reported before anyone runs it.

use std::collections::{HashMap, HashSet};

use scabbard_common::wfdef::{self, Value as Yaml};
use serde::Deserialize;

use super::params::{self, Kind, Param, Pattern, Value};
use super::render;

/// A template as loaded: checked and ready to render.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) description: String,
    pub(crate) params: Vec<Param>,
    /// The `workflow:` body, placeholders in place.
    pub(crate) workflow: Yaml,
    /// "builtin" or the file path.
    pub(crate) source: String,
    /// The whole file as written.
    pub(crate) body: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    name: String,
    #[serde(default = "first_version")]
    version: u32,
    #[serde(default)]
    description: String,
    #[serde(default)]
    parameters: Vec<ParamFile>,
    workflow: Yaml,
}

fn first_version() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamFile {
    name: String,
    #[serde(rename = "type", default)]
    kind: KindFile,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    default: Option<Yaml>,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    values: Vec<Yaml>,
    #[serde(default)]
    min: Option<i64>,
    #[serde(default)]
    max: Option<i64>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum KindFile {
    #[default]
    String,
    Int,
    Bool,
    Enum,
    List,
}

impl From<KindFile> for Kind {
    fn from(k: KindFile) -> Self {
        match k {
            KindFile::String => Kind::String,
            KindFile::Int => Kind::Int,
            KindFile::Bool => Kind::Bool,
            KindFile::Enum => Kind::Enum,
            KindFile::List => Kind::List,
        }
    }
}

/// Whether `name` can name a template: letters, digits, '-', '_' and '.', up to 64.
pub(crate) fn is_template_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Reads and checks one template file. Every error starts with `source` and names the
/// field; all problems found are returned, not just the first.
pub(crate) fn parse(text: &str, source: &str) -> Result<Loaded, Vec<String>> {
    let file: TemplateFile =
        serde_yaml_ng::from_str(text).map_err(|e| vec![format!("{source}: {e}")])?;
    let mut errors = Vec::new();
    if !is_template_name(&file.name) {
        errors.push(format!(
            "{source}: name: {:?} is not a template name (letters, digits, '-', '_', '.'; at most 64)",
            file.name
        ));
    }
    if file.version == 0 {
        errors.push(format!(
            "{source}: version: versions start at 1 (0 means \"latest\" when asking for one)"
        ));
    }
    let mut params = Vec::with_capacity(file.parameters.len());
    let mut seen = HashSet::new();
    for (i, p) in file.parameters.into_iter().enumerate() {
        let at = format!("{source}: parameters[{i}]");
        if !seen.insert(p.name.clone()) {
            errors.push(format!("{at}.name: {:?} is declared twice", p.name));
        }
        match param(p) {
            Ok(p) => params.push(p),
            Err((field, msg)) => errors.push(format!("{at}{field}: {msg}")),
        }
    }
    let names = params
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let names = if names.is_empty() {
        "none".into()
    } else {
        names
    };
    let known: HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
    let mut ref_errors = Vec::new();
    render::check(
        &file.workflow,
        "workflow",
        &|n| known.contains(n),
        &names,
        &mut ref_errors,
    );
    errors.extend(ref_errors.into_iter().map(|e| format!("{source}: {e}")));
    if errors.is_empty() {
        // The structure must convert with any valid values; try the defaults.
        let values: HashMap<String, Value> = params
            .iter()
            .map(|p| {
                let v = p
                    .default
                    .as_deref()
                    .and_then(|d| p.parse(d).ok())
                    .unwrap_or_else(|| p.stand_in());
                (p.name.clone(), v)
            })
            .collect();
        if let Err(e) = wfdef::workflow_from_value(render::substitute(&file.workflow, &values)) {
            errors.push(format!("{source}: {}", body_error(&e)));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Loaded {
        name: file.name,
        version: file.version,
        description: file.description.trim().to_string(),
        params,
        workflow: file.workflow,
        source: source.to_string(),
        body: text.to_string(),
    })
}

/// A conversion error of the workflow body, its path relative to the file.
pub(crate) fn body_error(e: &wfdef::FieldError) -> String {
    if e.path.is_empty() {
        format!("workflow: {}", e.message)
    } else {
        format!("workflow.{}: {}", e.path, e.message)
    }
}

/// Checks one parameter declaration; an error names the field within it.
fn param(p: ParamFile) -> Result<Param, (&'static str, String)> {
    let name = p.name;
    let kind = Kind::from(p.kind);
    if !params::is_ident(&name) {
        return Err((
            ".name",
            format!(
                "{name:?} is not a parameter name (a letter or '_', then letters, digits, '_')"
            ),
        ));
    }
    let ty = match kind {
        Kind::String => "string",
        Kind::Int => "int",
        Kind::Bool => "bool",
        Kind::Enum => "enum",
        Kind::List => "list",
    };
    if kind != Kind::Int && (p.min.is_some() || p.max.is_some()) {
        let field = if p.min.is_some() { ".min" } else { ".max" };
        return Err((
            field,
            format!("{name}: min and max apply to int parameters, not {ty}"),
        ));
    }
    if let (Some(min), Some(max)) = (p.min, p.max)
        && min > max
    {
        return Err((".min", format!("{name}: min {min} is above max {max}")));
    }
    let mut values = Vec::with_capacity(p.values.len());
    for v in &p.values {
        values.push(scalar_text(v).map_err(|e| (".values", format!("{name}: {e}")))?);
    }
    match kind {
        Kind::Enum if values.is_empty() => {
            return Err((".values", format!("{name}: an enum needs its values")));
        }
        Kind::Enum => {
            let mut seen = HashSet::new();
            if let Some(dup) = values.iter().find(|v| !seen.insert(v.as_str())) {
                return Err((".values", format!("{name}: {dup:?} is listed twice")));
            }
        }
        _ if !values.is_empty() => {
            return Err((
                ".values",
                format!("{name}: values apply to enum parameters, not {ty}"),
            ));
        }
        _ => {}
    }
    let pattern = match p.pattern {
        None => None,
        Some(_) if !matches!(kind, Kind::String | Kind::List) => {
            return Err((
                ".pattern",
                format!("{name}: a pattern applies to string and list parameters, not {ty}"),
            ));
        }
        Some(src) => Some(Pattern::new(&src).map_err(|e| (".pattern", format!("{name}: {e}")))?),
    };
    let default = match p.default {
        None => None,
        Some(v) => Some(default_text(kind, &v).map_err(|e| (".default", format!("{name}: {e}")))?),
    };
    if p.required && default.is_some() {
        return Err((
            ".default",
            format!("{name}: a required parameter takes no default (drop one of them)"),
        ));
    }
    if !p.required && default.is_none() {
        return Err((
            ".default",
            format!("{name}: give a default, or say required: true"),
        ));
    }
    let param = Param {
        name,
        kind,
        required: p.required,
        default,
        pattern,
        description: p.description.trim().to_string(),
        values,
        min: p.min,
        max: p.max,
    };
    if let Some(d) = &param.default
        && let Err(e) = param.parse(d)
    {
        return Err((".default", format!("{}: {e}", param.name)));
    }
    Ok(param)
}

/// The text of a default: a scalar, or for a list a YAML sequence of scalars.
fn default_text(kind: Kind, v: &Yaml) -> Result<String, String> {
    match (kind, v) {
        (Kind::List, Yaml::Sequence(items)) => {
            let items = items
                .iter()
                .map(scalar_text)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(params::list_text(&items))
        }
        _ => scalar_text(v),
    }
}

/// A scalar as text. Floats are refused: YAML reads `1.20` as 1.2, so they must be quoted.
fn scalar_text(v: &Yaml) -> Result<String, String> {
    match v {
        Yaml::String(s) => Ok(s.clone()),
        Yaml::Bool(b) => Ok(b.to_string()),
        Yaml::Number(n) if n.is_f64() => Err(format!(
            "{n} is read by YAML as a fractional number: write it in quotes to keep it as text"
        )),
        Yaml::Number(n) => Ok(n.to_string()),
        Yaml::Null => Err("a value is required (null given)".into()),
        Yaml::Sequence(_) | Yaml::Mapping(_) | Yaml::Tagged(_) => {
            Err("expected a single value (text, number or boolean)".into())
        }
    }
}
