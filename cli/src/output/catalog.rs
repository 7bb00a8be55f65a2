//! Human-readable templates (with their parameter tables), schedules and circuit
//! breakers.

use scabbard_common::proto::{
    Breaker, BreakerState, OverlapPolicy, ParamType, Schedule, Template, TemplateParam,
};

use super::{ago, clip, relative, table, utc};

/// `string`, `int`, `bool`, `enum`, `list`.
fn param_type(p: &TemplateParam) -> String {
    match p.r#type() {
        ParamType::Unspecified => "string".into(),
        t => t
            .as_str_name()
            .trim_start_matches("PARAM_TYPE_")
            .to_ascii_lowercase(),
    }
}

/// The values an enum allows (`a|b|c`), the pattern a string must match (`/re/`), and
/// an int's range (`1..=10`, `>= 1`, `<= 10`).
fn allowed(p: &TemplateParam) -> String {
    let mut parts = Vec::new();
    if !p.values.is_empty() {
        parts.push(p.values.join("|"));
    }
    if !p.pattern.is_empty() {
        parts.push(format!("/{}/", p.pattern));
    }
    match (p.min, p.max) {
        (Some(lo), Some(hi)) => parts.push(format!("{lo}..={hi}")),
        (Some(lo), None) => parts.push(format!(">= {lo}")),
        (None, Some(hi)) => parts.push(format!("<= {hi}")),
        (None, None) => {}
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod allowed_tests {
    use super::*;

    #[test]
    fn allowed_shows_int_ranges() {
        let p = TemplateParam {
            min: Some(1),
            max: Some(10),
            ..Default::default()
        };
        assert_eq!(allowed(&p), "1..=10");
        let p = TemplateParam {
            min: Some(0),
            ..Default::default()
        };
        assert_eq!(allowed(&p), ">= 0");
        assert_eq!(allowed(&TemplateParam::default()), "-");
    }
}

/// The rows of a template's parameter table: name, type, required, default, allowed
/// values or pattern, description.
pub(crate) fn param_rows(params: &[TemplateParam]) -> Vec<[String; 6]> {
    params
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                param_type(p),
                if p.required { "yes" } else { "no" }.to_string(),
                if p.has_default {
                    format!("{:?}", p.default)
                } else {
                    "-".into()
                },
                allowed(p),
                p.description.clone(),
            ]
        })
        .collect()
}

/// A table of templates.
pub(crate) fn templates(ts: &[Template]) {
    let rows = ts
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.version.to_string(),
                t.params.len().to_string(),
                t.source.clone(),
                clip(first_line(&t.description), 60),
            ]
        })
        .collect();
    table(["NAME", "VERSION", "PARAMS", "SOURCE", "DESCRIPTION"], rows);
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// One template: what it is, then its parameters.
pub(crate) fn template(t: &Template, body: bool) {
    say!("name:        {}", t.name);
    say!("version:     {}", t.version);
    if !t.versions.is_empty() {
        let vs: Vec<String> = t.versions.iter().map(u32::to_string).collect();
        say!("versions:    {}", vs.join(", "));
    }
    say!("source:      {}", t.source);
    if !t.description.is_empty() {
        say!("description: {}", t.description.trim_end());
    }
    say!();
    if t.params.is_empty() {
        say!("no parameters");
    } else {
        table(
            [
                "PARAMETER",
                "TYPE",
                "REQUIRED",
                "DEFAULT",
                "ALLOWED",
                "DESCRIPTION",
            ],
            param_rows(&t.params),
        );
    }
    if body {
        say!();
        say!("{}", t.body.trim_end());
    }
}

/// `skip`, `queue`, `cancel-previous`.
fn overlap(p: OverlapPolicy) -> &'static str {
    match p {
        OverlapPolicy::Queue => "queue",
        OverlapPolicy::CancelPrevious => "cancel-previous",
        OverlapPolicy::Skip | OverlapPolicy::Unspecified => "skip",
    }
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        "-".into()
    } else {
        format!("{} UTC ({})", utc(ms), relative(ms))
    }
}

/// A table of schedules.
pub(crate) fn schedules(ss: &[Schedule]) {
    let rows = ss
        .iter()
        .map(|s| {
            let spec = s.spec.clone().unwrap_or_default();
            let tz = if spec.timezone.is_empty() {
                "UTC".to_string()
            } else {
                spec.timezone.clone()
            };
            [
                s.id.clone(),
                spec.name.clone(),
                spec.cron.clone(),
                tz,
                spec.template.clone(),
                if s.paused { "paused" } else { "active" }.to_string(),
                if s.paused || s.next_tick_ms <= 0 {
                    "-".into()
                } else {
                    relative(s.next_tick_ms)
                },
                clip(&s.last_outcome, 40),
            ]
        })
        .collect();
    table(
        [
            "ID", "NAME", "CRON", "TIMEZONE", "TEMPLATE", "STATE", "NEXT", "LAST",
        ],
        rows,
    );
}

/// One schedule, in detail.
pub(crate) fn schedule(s: &Schedule) {
    let spec = s.spec.clone().unwrap_or_default();
    say!("id:           {}", s.id);
    say!("name:         {}", spec.name);
    say!("project:      {}", s.project);
    say!("cron:         {}", spec.cron);
    say!(
        "timezone:     {}",
        if spec.timezone.is_empty() {
            "UTC"
        } else {
            &spec.timezone
        }
    );
    let version = match spec.template_version {
        0 => "latest".to_string(),
        v => format!("version {v}"),
    };
    say!("template:     {} ({version})", spec.template);
    let mut params: Vec<_> = spec.params.iter().collect();
    params.sort();
    for (k, v) in params {
        say!("  param:      {k}={v}");
    }
    say!("overlap:      {}", overlap(spec.overlap()));
    let window = match spec.catch_up_window_ms {
        0 => 60_000,
        ms => ms,
    };
    say!("catch-up:     {}", duration(window));
    say!(
        "state:        {}",
        if s.paused { "paused" } else { "active" }
    );
    say!("created:      {}", ago(s.created_at_ms));
    say!("next tick:    {}", when(s.next_tick_ms));
    say!("last tick:    {}", when(s.last_tick_ms));
    if !s.last_outcome.is_empty() {
        say!("last outcome: {}", s.last_outcome);
    }
    if !s.last_workflow_id.is_empty() {
        say!("last run:     {}", s.last_workflow_id);
    }
    say!("fired:        {}  skipped: {}", s.fired, s.skipped);
}

/// `90s`, `5m`, `1h30m`, `250ms` for milliseconds.
pub(crate) fn duration(ms: u64) -> String {
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let (h, m, sec) = (s / 3600, s % 3600 / 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if sec > 0 || out.is_empty() {
        out.push_str(&format!("{sec}s"));
    }
    out
}

/// `OPEN`, `HALF_OPEN`, `CLOSED`.
pub(crate) fn breaker_state(b: &Breaker) -> &'static str {
    b.state().as_str_name().trim_start_matches("BREAKER_STATE_")
}

/// A table of circuit breakers.
pub(crate) fn breakers(bs: &[Breaker]) {
    let rows = bs
        .iter()
        .map(|b| {
            [
                b.key.clone(),
                breaker_state(b).to_string(),
                b.failures.to_string(),
                b.trips.to_string(),
                if b.state() == BreakerState::Open && b.retry_at_ms > 0 {
                    relative(b.retry_at_ms)
                } else {
                    "-".into()
                },
                clip(&b.last_error, 60),
            ]
        })
        .collect();
    table(
        ["KEY", "STATE", "FAILURES", "TRIPS", "RETRY", "LAST ERROR"],
        rows,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_rows_show_type_default_and_allowed_values() {
        let params = vec![
            TemplateParam {
                name: "env".into(),
                r#type: ParamType::Enum as i32,
                required: true,
                values: vec!["staging".into(), "prod".into()],
                description: "where to deploy".into(),
                ..TemplateParam::default()
            },
            TemplateParam {
                name: "tag".into(),
                r#type: ParamType::String as i32,
                default: "latest".into(),
                has_default: true,
                pattern: "[a-z0-9.]+".into(),
                ..TemplateParam::default()
            },
            TemplateParam {
                name: "n".into(),
                ..TemplateParam::default()
            },
        ];
        let rows = param_rows(&params);
        assert_eq!(
            rows[0],
            ["env", "enum", "yes", "-", "staging|prod", "where to deploy"].map(String::from)
        );
        assert_eq!(
            rows[1],
            ["tag", "string", "no", "\"latest\"", "/[a-z0-9.]+/", ""].map(String::from)
        );
        assert_eq!(rows[2][1], "string");
        assert_eq!(rows[2][4], "-");
    }

    #[test]
    fn durations_print_compactly() {
        assert_eq!(duration(60_000), "1m");
        assert_eq!(duration(5_400_000), "1h30m");
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(1_500), "1500ms");
    }
}
