//! Template parameters: their declared shape, and reading a value given as text (from a
//! `map<string,string>` or a default) into a typed value, with one plain sentence for each
//! thing that is wrong.

use regex::Regex;
use scabbard_common::proto;

/// The declared type of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    String,
    Int,
    Bool,
    Enum,
    List,
}

impl Kind {
    pub(crate) fn proto(self) -> proto::ParamType {
        match self {
            Kind::String => proto::ParamType::String,
            Kind::Int => proto::ParamType::Int,
            Kind::Bool => proto::ParamType::Bool,
            Kind::Enum => proto::ParamType::Enum,
            Kind::List => proto::ParamType::List,
        }
    }
}

/// A regular expression a string (or each list item) must match in full.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    /// As written in the template.
    pub(crate) source: String,
    /// Anchored at both ends.
    anchored: Regex,
}

impl Pattern {
    pub(crate) fn new(source: &str) -> Result<Self, String> {
        let anchored = Regex::new(&format!("^(?:{source})$"))
            .map_err(|e| format!("{source:?} is not a regular expression: {e}"))?;
        Ok(Pattern {
            source: source.to_string(),
            anchored,
        })
    }

    pub(crate) fn matches(&self, s: &str) -> bool {
        self.anchored.is_match(s)
    }
}

/// One declared parameter, checked at load.
#[derive(Debug, Clone)]
pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) required: bool,
    /// The default as it would be given (already known to be valid).
    pub(crate) default: Option<String>,
    pub(crate) pattern: Option<Pattern>,
    pub(crate) description: String,
    /// Allowed values of an enum.
    pub(crate) values: Vec<String>,
    /// Bounds of an int.
    pub(crate) min: Option<i64>,
    pub(crate) max: Option<i64>,
}

/// A parameter's value once read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    List(Vec<String>),
}

impl Value {
    /// The text a placeholder inside a longer string becomes: lists are comma-joined.
    pub(crate) fn text(&self) -> String {
        match self {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::List(items) => items.join(","),
        }
    }
}

/// Writes list items the way [`Param::parse`] reads them back: comma-separated when no
/// item holds a comma or is blank, else as a JSON array.
pub(crate) fn list_text(items: &[String]) -> String {
    let plain = items
        .iter()
        .all(|i| !i.contains(',') && !i.trim().is_empty() && i.trim() == i)
        && !items.first().is_some_and(|i| i.starts_with('['));
    if plain {
        items.join(",")
    } else {
        serde_json::to_string(items).unwrap_or_else(|_| items.join(","))
    }
}

impl Param {
    /// Reads a value given as text, or says what is wrong with it.
    pub(crate) fn parse(&self, raw: &str) -> Result<Value, String> {
        match self.kind {
            Kind::String => {
                self.check_pattern(raw, "")?;
                Ok(Value::Str(raw.to_string()))
            }
            Kind::Int => {
                let n: i64 = raw
                    .trim()
                    .parse()
                    .map_err(|_| format!("{raw:?} is not an integer"))?;
                if let Some(min) = self.min
                    && n < min
                {
                    return Err(format!("{n} is below the minimum {min}"));
                }
                if let Some(max) = self.max
                    && n > max
                {
                    return Err(format!("{n} is above the maximum {max}"));
                }
                Ok(Value::Int(n))
            }
            Kind::Bool => match raw.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "1" => Ok(Value::Bool(true)),
                "false" | "no" | "0" => Ok(Value::Bool(false)),
                _ => Err(format!(
                    "{raw:?} is not a boolean (true/false, yes/no or 1/0)"
                )),
            },
            Kind::Enum => {
                if self.values.iter().any(|v| v == raw) {
                    Ok(Value::Str(raw.to_string()))
                } else {
                    Err(format!("{raw:?} is not one of {}", self.values.join(", ")))
                }
            }
            Kind::List => {
                let items: Vec<String> = if raw.trim_start().starts_with('[') {
                    serde_json::from_str(raw)
                        .map_err(|e| format!("{raw:?} is not a JSON array of strings ({e})"))?
                } else if raw.trim().is_empty() {
                    Vec::new()
                } else {
                    raw.split(',').map(|i| i.trim().to_string()).collect()
                };
                for item in &items {
                    self.check_pattern(item, "item ")?;
                }
                Ok(Value::List(items))
            }
        }
    }

    fn check_pattern(&self, s: &str, what: &str) -> Result<(), String> {
        match &self.pattern {
            Some(p) if !p.matches(s) => Err(format!(
                "{what}{s:?} does not match the pattern {:?}",
                p.source
            )),
            _ => Ok(()),
        }
    }

    /// A value of the right type for checking a template's structure at load when the
    /// parameter has no default (its pattern is not honoured).
    pub(crate) fn stand_in(&self) -> Value {
        match self.kind {
            Kind::String => Value::Str("x".into()),
            Kind::Int => Value::Int(self.min.or(self.max).unwrap_or(0)),
            Kind::Bool => Value::Bool(false),
            Kind::Enum => Value::Str(self.values.first().cloned().unwrap_or_default()),
            Kind::List => Value::List(vec!["x".into()]),
        }
    }

    pub(crate) fn to_proto(&self) -> proto::TemplateParam {
        proto::TemplateParam {
            name: self.name.clone(),
            r#type: self.kind.proto() as i32,
            required: self.required,
            default: self.default.clone().unwrap_or_default(),
            has_default: self.default.is_some(),
            pattern: self
                .pattern
                .as_ref()
                .map(|p| p.source.clone())
                .unwrap_or_default(),
            description: self.description.clone(),
            values: self.values.clone(),
            min: self.min,
            max: self.max,
        }
    }
}

/// Whether `name` can be a parameter name: a letter or '_', then letters, digits, '_'.
pub(crate) fn is_ident(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 64
}
