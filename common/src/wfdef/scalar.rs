//! Lenient scalar fields of the workflow file format, and durations.
//!
//! YAML writers do not always quote what they mean as text (`PORT: 8080`), and template
//! rendering turns every placeholder into a string (`limit: "${{ params.n }}"` becomes
//! `"4"`). So text fields take any scalar, and numeric and boolean fields also take a
//! string holding the number. Durations are `250ms`, `30s`, `5m`, `2h`, combinations such
//! as `1h30m`, or a whole number of milliseconds.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serializer};

/// One scalar as written, before it is read as the field's type.
enum Scalar {
    Str(String),
    Int(i128),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn text(self) -> String {
        match self {
            Scalar::Str(s) => s,
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

/// Reads one scalar (or null: `None`) and converts it with `F` *inside* the visitor, so a
/// conversion error carries the scalar's own path and line.
struct With<F> {
    convert: F,
    expecting: &'static str,
}

impl<'de, T, F> Visitor<'de> for With<F>
where
    F: FnOnce(Option<Scalar>) -> Result<T, String>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.convert)(Some(Scalar::Str(v.to_string()))).map_err(E::custom)
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<T, E> {
        (self.convert)(Some(Scalar::Str(v))).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.convert)(Some(Scalar::Int(v.into()))).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.convert)(Some(Scalar::Int(v.into()))).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.convert)(Some(Scalar::Float(v))).map_err(E::custom)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        (self.convert)(Some(Scalar::Bool(v))).map_err(E::custom)
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        (self.convert)(None).map_err(E::custom)
    }
    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        (self.convert)(None).map_err(E::custom)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
}

fn read<'de, D, T, F>(d: D, expecting: &'static str, convert: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(Option<Scalar>) -> Result<T, String>,
{
    d.deserialize_any(With { convert, expecting })
}

fn whole<T: TryFrom<i128> + FromStr>(s: Scalar) -> Result<T, String> {
    let ty = std::any::type_name::<T>();
    match s {
        Scalar::Int(i) => T::try_from(i).map_err(|_| format!("{i} is out of range for {ty}")),
        Scalar::Str(s) => s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a whole number (as {ty})")),
        Scalar::Float(f) => Err(format!("{f} is not a whole number")),
        Scalar::Bool(b) => Err(format!("{b} is not a whole number")),
    }
}

/// Text taken from any scalar.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Text(pub(crate) String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read(d, "text", |s| {
            Ok(Text(s.map(Scalar::text).unwrap_or_default()))
        })
    }
}

/// A whole number taken from a number or from text holding one.
pub(crate) struct Num<T>(pub(crate) T);

impl<'de, T> Deserialize<'de> for Num<T>
where
    T: TryFrom<i128> + FromStr,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        read(d, "a whole number", |s| match s {
            None => Err("a whole number is required here".into()),
            Some(s) => whole(s).map(Num),
        })
    }
}

/// Any text field (required unless the field also says `default`); null is "".
pub(crate) fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Text::deserialize(d)?.0)
}

/// Optional text.
pub(crate) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    read(d, "text", |s| Ok(s.map(Scalar::text)))
}

/// A list of text; null is the empty list.
pub(crate) fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<Text>>::deserialize(d)?
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.0)
        .collect())
}

/// A map of text to text; null is the empty map.
pub(crate) fn string_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::<BTreeMap<Text, Text>>::deserialize(d)?
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.0, v.0))
        .collect())
}

/// A whole number; null is 0.
pub(crate) fn int<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128> + FromStr + Default,
{
    read(d, "a whole number", |s| {
        s.map(whole).unwrap_or(Ok(T::default()))
    })
}

/// An optional whole number: absent or null is None (so an explicit 0 stays 0).
pub(crate) fn opt_int<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128> + FromStr,
{
    read(d, "a whole number", |s| s.map(whole).transpose())
}

/// A list of whole numbers; null is the empty list.
pub(crate) fn ints<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128> + FromStr,
{
    Ok(Option::<Vec<Num<T>>>::deserialize(d)?
        .unwrap_or_default()
        .into_iter()
        .map(|n| n.0)
        .collect())
}

/// A number with a fraction; null is 0.
pub(crate) fn float<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    read(d, "a number", |s| match s {
        None => Ok(0.0),
        Some(Scalar::Bool(b)) => Err(format!("{b} is not a number")),
        Some(s) => {
            let t = s.text();
            t.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("{t:?} is not a number"))
        }
    })
}

/// `true`/`false` (also as text); null is false.
pub(crate) fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    read(d, "true or false", |s| match s {
        None => Ok(false),
        Some(Scalar::Bool(b)) => Ok(b),
        Some(s) => match s.text().trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            t => Err(format!("{t:?} is not true or false")),
        },
    })
}

/// A field that is there, even as a bare `key:` (null): `Some(None)`.
pub(crate) fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::<T>::deserialize(d)?))
}

/// A duration in milliseconds; null is 0.
pub(crate) fn duration_ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    read(
        d,
        "a duration (30s, 5m, 1h30m) or milliseconds",
        |s| match s {
            None => Ok(0),
            Some(Scalar::Int(i)) => u64::try_from(i).map_err(|_| format!("{i} is not a duration")),
            Some(s) => parse_duration_ms(&s.text()),
        },
    )
}

/// Writes a duration field in the most readable exact form.
pub(crate) fn ser_duration_ms<S: Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration_ms(*ms))
}

/// Parses `250ms`, `30s`, `5m`, `2h`, `1d`, combinations (`1h30m`) or a whole number of
/// milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration (e.g. 30s, 5m, 1h30m or milliseconds)".into());
    }
    if let Ok(ms) = t.parse::<u64>() {
        return Ok(ms);
    }
    let mut total: u64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "{s:?} is not a duration: expected a number at {rest:?} (e.g. 30s, 5m, 1h30m or milliseconds)"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?} is not a duration: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "{s:?} is not a duration: unknown unit {unit:?} (use ms, s, m, h or d)"
                ));
            }
        };
        total = n
            .checked_mul(scale)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too long a duration"))?;
    }
    Ok(total)
}

/// Formats milliseconds as the largest exact unit: `90s`, `10m`, `250ms`, `1h`.
pub fn format_duration_ms(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ];
    if ms == 0 {
        return "0s".into();
    }
    for (scale, unit) in UNITS {
        if ms.is_multiple_of(scale) {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
}
