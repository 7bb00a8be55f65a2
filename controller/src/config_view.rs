//! The effective configuration as `AdminService.GetConfig` shows it (`GET /api/v1/config`,
//! the web UI's configuration page): the [`ControllerConfig`] after file, environment and
//! flags, serialized with its TOML key names, with every secret hidden. Owns the rule of
//! what a secret is ([`is_secret`]) and the redaction of credentials inside URLs.

use scabbard_common::proto::{ConfigEntry, GetConfigResponse};
use serde_json::{Map, Value};

use crate::config::ControllerConfig;

/// What a set secret reads as.
pub const HIDDEN: &str = "<hidden>";

/// Whether the key `name` (the last part of a dotted key) holds a secret: tokens,
/// passwords, secret and access keys. Paths to files holding them (`*_file`) are not
/// secrets and stay visible.
pub fn is_secret(name: &str) -> bool {
    if name.ends_with("_file") || name.ends_with("_dir") || name.ends_with("_path") {
        return false;
    }
    let n = name.to_ascii_lowercase();
    [
        "token",
        "password",
        "passwd",
        "secret",
        "access_key",
        "credential",
        "private_key",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// The view of `cfg` answered by `advertise`.
pub fn effective(cfg: &ControllerConfig, advertise: &str) -> GetConfigResponse {
    let mut v = serde_json::to_value(cfg).unwrap_or_else(|e| {
        let mut m = Map::new();
        m.insert("error".into(), Value::String(e.to_string()));
        Value::Object(m)
    });
    let mut entries = Vec::new();
    redact(&mut v, "", &mut entries);
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    GetConfigResponse {
        entries,
        json: v.to_string(),
        answered_by: advertise.to_string(),
    }
}

/// Hides secrets in `v` (in place) and lists its leaves under `prefix`.
fn redact(v: &mut Value, prefix: &str, out: &mut Vec<ConfigEntry>) {
    let Value::Object(m) = v else { return };
    for (k, child) in m.iter_mut() {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if child.is_object() {
            redact(child, &key, out);
            continue;
        }
        let secret = is_secret(k);
        let set = !matches!(child, Value::Null) && child.as_str() != Some("");
        if secret && set {
            *child = Value::String(HIDDEN.into());
        } else {
            hide_url_credentials(child);
        }
        out.push(ConfigEntry {
            key,
            value: text(child),
            secret,
        });
    }
}

/// `scheme://user:pass@host` → `scheme://<hidden>@host`, in strings and lists of them.
fn hide_url_credentials(v: &mut Value) {
    match v {
        Value::String(s) => {
            if let Some((scheme, rest)) = s.split_once("://") {
                let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
                if let Some(at) = authority.rfind('@') {
                    *s = format!("{scheme}://{HIDDEN}@{}", &rest[at + 1..]);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(hide_url_credentials),
        _ => {}
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_hidden_and_the_rest_is_shown() {
        let mut cfg = ControllerConfig::default();
        let secret = "SUPERSECRET-value-0123456789";
        cfg.registration_token = secret.into();
        cfg.bootstrap_token = Some(secret.into());
        cfg.bootstrap_token_file = Some("/etc/scabbard/bootstrap".into());
        cfg.etcd.password = Some(secret.into());
        cfg.etcd.username = Some("root".into());
        cfg.etcd.endpoints = vec![format!("http://root:{secret}@etcd:2379")];
        cfg.artifacts.s3.secret_access_key = secret.into();
        cfg.artifacts.s3.access_key_id = secret.into();
        cfg.artifacts.s3.bucket = "builds".into();
        cfg.telemetry.otlp_endpoint = Some(format!("https://u:{secret}@otel:4317"));
        let view = effective(&cfg, "ctl:7070");
        assert!(!view.json.contains(secret), "{}", view.json);
        for e in &view.entries {
            assert!(!e.value.contains(secret), "{e:?}");
        }
        let get = |k: &str| {
            view.entries
                .iter()
                .find(|e| e.key == k)
                .unwrap_or_else(|| panic!("{k} missing: {:?}", view.entries))
        };
        assert_eq!(get("registration_token").value, HIDDEN);
        assert!(get("registration_token").secret);
        assert_eq!(get("etcd.password").value, HIDDEN);
        assert_eq!(get("artifacts.s3.secret_access_key").value, HIDDEN);
        assert_eq!(get("artifacts.s3.bucket").value, "builds");
        assert_eq!(get("bootstrap_token_file").value, "/etc/scabbard/bootstrap");
        assert!(!get("bootstrap_token_file").secret);
        assert_eq!(get("etcd.username").value, "root");
        assert!(get("etcd.endpoints").value.contains("<hidden>@etcd:2379"));
        assert_eq!(get("listen").value, cfg.listen.to_string());
        assert_eq!(view.answered_by, "ctl:7070");
        // An unset secret reads as unset, not hidden.
        let view = effective(&ControllerConfig::default(), "x");
        let e = view
            .entries
            .iter()
            .find(|e| e.key == "registration_token")
            .expect("key");
        assert_eq!((e.value.as_str(), e.secret), ("", true));
    }
}
