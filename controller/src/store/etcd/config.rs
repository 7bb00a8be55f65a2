//! How to reach etcd: [`EtcdConfig`], the `[etcd]` table of the controller's TOML config,
//! checked up front by [`EtcdConfig::validate`]. Owns no connection.

use std::path::PathBuf;
use std::time::Duration;

use scabbard_common::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How to reach etcd. In TOML, durations are strings with a unit: `"5s"`, `"500ms"`, `"1m"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs: `http://host:2379`, or `https://host:2379` with `ca_file`.
    pub endpoints: Vec<String>,
    /// etcd user (with `password`).
    pub username: Option<String>,
    /// etcd password (with `username`).
    pub password: Option<String>,
    /// CA bundle (PEM) that etcd's certificate must chain to; required for `https://`.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS, with `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Prefix of every key Scabbard stores (default `/scabbard/`); callers never see it.
    /// Ends with `/` so that two namespaces never overlap.
    pub namespace: String,
    /// Bound of every request, retries included (default 5 s).
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub request_timeout: Duration,
    /// Bound of one try of a request (default 1 s). A read or keep-alive that got no answer
    /// within it is sent again (to any live member) until `request_timeout`; a transaction
    /// is reported `Unavailable`, its outcome unknown, and the committer sends it again. A
    /// request caught on a member whose etcd leader just died thus costs about this much,
    /// not `request_timeout`.
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub attempt_timeout: Duration,
    /// How long an HTTP/2 keep-alive ping on an etcd connection may go unanswered before the
    /// connection is dropped as dead (default 2 s); pings go every half of it.
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub keep_alive_timeout: Duration,
    /// Bound of [`EtcdStore::connect`](super::EtcdStore::connect) (default 5 s).
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub connect_timeout: Duration,
    /// The etcd servers' `--max-request-bytes` (etcd's default: 1.5 MiB). Scabbard keeps
    /// every record and every transaction under it, with room for framing.
    pub max_request_bytes: usize,
    /// Most compares, or operations per branch, in one transaction: the etcd servers'
    /// `--max-txn-ops` (etcd's default: 128). The leader groups its writes into
    /// transactions of at most this many operations, so a higher limit lets a busy cluster
    /// commit more per round trip. `0` (the default) finds it at start: the largest of
    /// 1024, 512, 256 and 128 the servers take. A figure set here is checked at start.
    pub max_txn_ops: usize,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            namespace: "/scabbard/".into(),
            request_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(1),
            keep_alive_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 0,
        }
    }
}

impl EtcdConfig {
    /// Refuses settings that cannot work, naming the field (`etcd.<field>`).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid(format!("etcd.{msg}")));
        if self.endpoints.is_empty() {
            return bad("endpoints must list at least one URL (--etcd-endpoints)".into());
        }
        if self.max_request_bytes < 64 * 1024 {
            return bad(format!(
                "max_request_bytes = {} is below 64 KiB; set it to the etcd servers' --max-request-bytes",
                self.max_request_bytes
            ));
        }
        if self.max_txn_ops != 0 && !(16..=65_536).contains(&self.max_txn_ops) {
            return bad(format!(
                "max_txn_ops = {} is out of range: set it to the etcd servers' --max-txn-ops (16 to 65536; etcd's default is 128), or 0 to find it at start",
                self.max_txn_ops
            ));
        }
        let mut https = 0;
        for e in &self.endpoints {
            match e.split_once("://") {
                Some(("https", rest)) if !rest.trim().is_empty() => https += 1,
                Some(("http", rest)) if !rest.trim().is_empty() => {}
                _ => {
                    return bad(format!(
                        "endpoints: {e:?} is not a URL like http://127.0.0.1:2379 or https://host:2379"
                    ));
                }
            }
        }
        if https != 0 && https != self.endpoints.len() {
            return bad("endpoints mix http:// and https:// URLs".into());
        }
        let tls_files = self.ca_file.is_some() || self.cert_file.is_some();
        if https > 0 && self.ca_file.is_none() {
            return bad(
                "ca_file is required with https:// endpoints (no system roots are trusted)".into(),
            );
        }
        if https == 0 && tls_files {
            return bad("ca_file/cert_file/key_file need https:// endpoints".into());
        }
        match (&self.username, &self.password) {
            (Some(u), Some(_)) if u.is_empty() => return bad("username must not be empty".into()),
            (Some(_), None) | (None, Some(_)) => {
                return bad("username and etcd.password go together".into());
            }
            _ => {}
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad("cert_file and etcd.key_file go together".into());
        }
        for (field, f) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if let Some(f) = f
                && !f.is_file()
            {
                return bad(format!("{field}: {} is not a readable file", f.display()));
            }
        }
        if self.namespace.is_empty() || !self.namespace.ends_with('/') {
            return bad(format!(
                "namespace {:?} must be non-empty and end with '/' (e.g. \"/scabbard/\")",
                self.namespace
            ));
        }
        if self.request_timeout < Duration::from_millis(10) {
            return bad("request_timeout must be at least 10ms".into());
        }
        if self.attempt_timeout < Duration::from_millis(10) {
            return bad("attempt_timeout must be at least 10ms".into());
        }
        if self.keep_alive_timeout < Duration::from_millis(100) {
            return bad("keep_alive_timeout must be at least 100ms".into());
        }
        if self.connect_timeout < Duration::from_millis(10) {
            return bad("connect_timeout must be at least 10ms".into());
        }
        Ok(())
    }
}

/// Deserializes `"250ms"`, `"5s"`, `"1m"` or combinations like `"1m30s"`.
fn duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("empty duration: write e.g. \"5s\" or \"500ms\"".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration {s:?}: write e.g. \"5s\" or \"500ms\""))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            unit => {
                return Err(format!(
                    "bad duration unit {unit:?} in {s:?} (use ms, s or m, e.g. \"5s\")"
                ));
            }
        };
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// A duration as the config writes it (`"1500ms"`), for the effective configuration.
fn duration_text<S: Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(c: &EtcdConfig) -> String {
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn default_is_valid() {
        EtcdConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_fields_are_named() {
        let base = EtcdConfig::default();
        let c = EtcdConfig {
            endpoints: vec![],
            ..base.clone()
        };
        assert!(err(&c).contains("etcd.endpoints"), "{}", err(&c));
        let c = EtcdConfig {
            endpoints: vec!["127.0.0.1:2379".into()],
            ..base.clone()
        };
        assert!(err(&c).contains("etcd.endpoints"));
        let c = EtcdConfig {
            endpoints: vec!["http://a:1".into(), "https://b:1".into()],
            ..base.clone()
        };
        assert!(err(&c).contains("mix"));
        let c = EtcdConfig {
            endpoints: vec!["https://a:1".into()],
            ..base.clone()
        };
        assert!(err(&c).contains("etcd.ca_file"));
        let c = EtcdConfig {
            ca_file: Some("/etc/hostname".into()),
            ..base.clone()
        };
        assert!(err(&c).contains("https"));
        let c = EtcdConfig {
            username: Some("u".into()),
            ..base.clone()
        };
        assert!(err(&c).contains("etcd.username"));
        let c = EtcdConfig {
            namespace: "/x".into(),
            ..base.clone()
        };
        assert!(err(&c).contains("etcd.namespace"));
        let c = EtcdConfig {
            request_timeout: Duration::ZERO,
            ..base.clone()
        };
        assert!(err(&c).contains("etcd.request_timeout"));
        let c = EtcdConfig {
            connect_timeout: Duration::ZERO,
            ..base.clone()
        };
        assert!(err(&c).contains("etcd.connect_timeout"));
        for n in [1, 15, 65_537] {
            let c = EtcdConfig {
                max_txn_ops: n,
                ..base.clone()
            };
            assert!(err(&c).contains("etcd.max_txn_ops"), "{}", err(&c));
        }
        let c = EtcdConfig {
            endpoints: vec!["https://a:1".into()],
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..base
        };
        assert!(err(&c).contains("etcd.ca_file"));
    }

    #[test]
    fn parses_from_toml_with_durations() {
        let c: EtcdConfig = toml::from_str(
            r#"
            endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
            namespace = "/prod/"
            request_timeout = "1500ms"
            connect_timeout = "1m"
            attempt_timeout = "750ms"
            max_txn_ops = 1024
            "#,
        )
        .unwrap();
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.namespace, "/prod/");
        assert_eq!(c.request_timeout, Duration::from_millis(1500));
        assert_eq!(c.connect_timeout, Duration::from_secs(60));
        assert_eq!(c.attempt_timeout, Duration::from_millis(750));
        assert_eq!(c.max_txn_ops, 1024);
        assert_eq!(c.keep_alive_timeout, Duration::from_secs(2));
        assert_eq!(c.username, None);
        c.validate().unwrap();
        let unknown = toml::from_str::<EtcdConfig>("endpoint = []").unwrap_err();
        assert!(unknown.to_string().contains("endpoint"), "{unknown}");
        let no_unit = toml::from_str::<EtcdConfig>("request_timeout = \"5\"").unwrap_err();
        assert!(no_unit.to_string().contains("unit"), "{no_unit}");
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("s").is_err());
    }
}
