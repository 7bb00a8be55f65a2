//! The `[artifacts]` section of the controller config: which backend holds artifacts (a
//! directory on this controller's disk, or an S3-compatible bucket), its settings, and the
//! size limits. Checked up front by [`ArtifactsConfig::validate`], errors naming the key.

use std::path::{Path, PathBuf};

use scabbard_common::{Error, Result};
use serde::{Deserialize, Serialize};

/// One GiB.
const GIB: u64 = 1 << 30;

/// Where artifacts live and how large they may be.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ArtifactsConfig {
    /// `local` (a directory on this controller's disk; the default) or `s3` (any
    /// S3-compatible object store, for several controllers).
    pub backend: String,
    /// Local backend: the directory (default `<data_dir>/artifacts`). Controllers sharing
    /// one etcd need the same directory (a shared filesystem), or the `s3` backend.
    pub dir: Option<PathBuf>,
    /// Largest packed artifact accepted, in bytes (0 = no limit).
    pub max_artifact_bytes: u64,
    /// Most bytes of artifacts one attempt of a task may upload, in bytes (0 = no limit).
    pub max_task_artifact_bytes: u64,
    /// S3 backend settings (`[artifacts.s3]`).
    pub s3: S3Config,
}

impl Default for ArtifactsConfig {
    fn default() -> Self {
        Self {
            backend: "local".into(),
            dir: None,
            max_artifact_bytes: 5 * GIB,
            max_task_artifact_bytes: 20 * GIB,
            s3: S3Config::default(),
        }
    }
}

/// An S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Garage, …).
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Bucket name (it must exist).
    pub bucket: String,
    /// Key prefix inside the bucket (e.g. `scabbard/`); objects are
    /// `<prefix>artifacts/<task>/<fencing token>/<name>.tar.zst`.
    pub prefix: String,
    /// Endpoint URL of a non-AWS store (e.g. `http://127.0.0.1:9000`); empty = AWS S3 in
    /// `region`.
    pub endpoint: String,
    /// Region (any value for most non-AWS stores).
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key (prefer `secret_access_key_file` or `SCABBARD_S3_SECRET_ACCESS_KEY`).
    pub secret_access_key: String,
    /// File holding the secret access key.
    pub secret_access_key_file: Option<PathBuf>,
    /// Allow a plain `http://` endpoint (loopback test servers, a store on a private link).
    pub allow_http: bool,
    /// Address buckets as `https://<bucket>.<endpoint>` instead of the default path style
    /// (`https://<endpoint>/<bucket>`), which every S3-compatible store understands.
    pub virtual_hosted_style: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: String::new(),
            region: "us-east-1".into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            secret_access_key_file: None,
            allow_http: false,
            virtual_hosted_style: false,
        }
    }
}

// Never print the secret.
impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &(!self.secret_access_key.is_empty()).then_some("***"),
            )
            .field("secret_access_key_file", &self.secret_access_key_file)
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .finish()
    }
}

impl ArtifactsConfig {
    /// The local backend's directory.
    pub fn local_dir(&self, data_dir: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| data_dir.join("artifacts"))
    }

    /// Refuses settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<()> {
        if self.max_artifact_bytes > 0
            && self.max_task_artifact_bytes > 0
            && self.max_artifact_bytes > self.max_task_artifact_bytes
        {
            return Err(Error::invalid(format!(
                "artifacts.max_artifact_bytes ({}) is larger than artifacts.max_task_artifact_bytes ({}): one artifact could never be stored",
                self.max_artifact_bytes, self.max_task_artifact_bytes
            )));
        }
        match self.backend.as_str() {
            "local" => {
                if let Some(d) = &self.dir
                    && d.as_os_str().is_empty()
                {
                    return Err(Error::invalid(
                        "artifacts.dir must not be empty when set (default <data_dir>/artifacts)",
                    ));
                }
                Ok(())
            }
            "s3" => self.s3.validate(),
            other => Err(Error::invalid(format!(
                "artifacts.backend {other:?} is not a backend: use \"local\" or \"s3\""
            ))),
        }
    }
}

impl S3Config {
    /// Checks the S3 settings (the bucket is only reached at start).
    pub fn validate(&self) -> Result<()> {
        let b = &self.bucket;
        if b.is_empty() {
            return Err(Error::invalid(
                "artifacts.s3.bucket is required with artifacts.backend = \"s3\" (--artifacts-s3-bucket)",
            ));
        }
        if b.len() < 3
            || b.len() > 63
            || !b
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        {
            return Err(Error::invalid(format!(
                "artifacts.s3.bucket {b:?} is not a bucket name (3-63 lowercase letters, digits, '-' or '.')"
            )));
        }
        if self.prefix.starts_with('/') || self.prefix.contains("//") {
            return Err(Error::invalid(format!(
                "artifacts.s3.prefix {:?} must not start with '/' or hold '//'",
                self.prefix
            )));
        }
        if !self.endpoint.is_empty() {
            let e = &self.endpoint;
            if e.starts_with("http://") {
                if !self.allow_http {
                    return Err(Error::invalid(format!(
                        "artifacts.s3.endpoint {e:?} is plain http: set artifacts.s3.allow_http = true (--artifacts-s3-allow-http) to allow it"
                    )));
                }
            } else if !e.starts_with("https://") {
                return Err(Error::invalid(format!(
                    "artifacts.s3.endpoint {e:?} must be an http:// or https:// URL"
                )));
            }
        }
        if self.region.is_empty() {
            return Err(Error::invalid(
                "artifacts.s3.region must not be empty (any value works for most non-AWS stores)",
            ));
        }
        if self.access_key_id.is_empty() {
            return Err(Error::invalid(
                "artifacts.s3.access_key_id is required with artifacts.backend = \"s3\" (--artifacts-s3-access-key-id or SCABBARD_S3_ACCESS_KEY_ID)",
            ));
        }
        match (
            &self.secret_access_key_file,
            self.secret_access_key.is_empty(),
        ) {
            (Some(_), false) => Err(Error::invalid(
                "set artifacts.s3.secret_access_key or artifacts.s3.secret_access_key_file, not both",
            )),
            (None, true) => Err(Error::invalid(
                "artifacts.s3.secret_access_key is required with artifacts.backend = \"s3\" (SCABBARD_S3_SECRET_ACCESS_KEY, or artifacts.s3.secret_access_key_file)",
            )),
            (Some(path), true) => self.read_secret_file(path).map(|_| ()),
            (None, false) => Ok(()),
        }
    }

    /// The secret access key (from the file when one is named).
    pub fn secret(&self) -> Result<String> {
        match &self.secret_access_key_file {
            Some(path) => self.read_secret_file(path),
            None => Ok(self.secret_access_key.clone()),
        }
    }

    fn read_secret_file(&self, path: &Path) -> Result<String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::invalid(format!(
                "artifacts.s3.secret_access_key_file {}: {e}",
                path.display()
            ))
        })?;
        let secret = text.trim();
        if secret.is_empty() {
            return Err(Error::invalid(format!(
                "artifacts.s3.secret_access_key_file {} is empty",
                path.display()
            )));
        }
        Ok(secret.to_string())
    }

    /// The key prefix, ending with `/` when not empty.
    pub(crate) fn normalized_prefix(&self) -> String {
        match self.prefix.as_str() {
            "" => String::new(),
            p if p.ends_with('/') => p.to_string(),
            p => format!("{p}/"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3() -> ArtifactsConfig {
        ArtifactsConfig {
            backend: "s3".into(),
            s3: S3Config {
                bucket: "builds".into(),
                endpoint: "https://s3.example.invalid".into(),
                access_key_id: "AKID".into(),
                secret_access_key: "secret".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn err(c: &ArtifactsConfig) -> String {
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_local_with_5_and_20_gib() {
        let c = ArtifactsConfig::default();
        c.validate().unwrap();
        assert_eq!(c.backend, "local");
        assert_eq!(c.max_artifact_bytes, 5 << 30);
        assert_eq!(c.max_task_artifact_bytes, 20 << 30);
        assert_eq!(c.local_dir(Path::new("/d")), PathBuf::from("/d/artifacts"));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let mut c = ArtifactsConfig {
            backend: "nfs".into(),
            ..Default::default()
        };
        assert!(err(&c).contains("artifacts.backend"));
        c.backend = "local".into();
        c.max_artifact_bytes = 10;
        c.max_task_artifact_bytes = 5;
        assert!(err(&c).contains("artifacts.max_artifact_bytes"));
        s3().validate().unwrap();
        let mut c = s3();
        c.s3.bucket.clear();
        assert!(err(&c).contains("artifacts.s3.bucket"));
        c.s3.bucket = "Bad_Bucket".into();
        assert!(err(&c).contains("artifacts.s3.bucket"));
        let mut c = s3();
        c.s3.endpoint = "http://127.0.0.1:9000".into();
        assert!(err(&c).contains("artifacts.s3.allow_http"));
        c.s3.allow_http = true;
        c.validate().unwrap();
        c.s3.endpoint = "ftp://x".into();
        assert!(err(&c).contains("artifacts.s3.endpoint"));
        let mut c = s3();
        c.s3.access_key_id.clear();
        assert!(err(&c).contains("artifacts.s3.access_key_id"));
        let mut c = s3();
        c.s3.secret_access_key.clear();
        assert!(err(&c).contains("artifacts.s3.secret_access_key"));
        c.s3.secret_access_key_file = Some("/nonexistent/secret".into());
        assert!(err(&c).contains("artifacts.s3.secret_access_key_file"));
        let mut c = s3();
        c.s3.prefix = "/abs".into();
        assert!(err(&c).contains("artifacts.s3.prefix"));
    }

    #[test]
    fn the_secret_comes_from_a_file_and_is_never_printed() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("secret");
        std::fs::write(&f, "  s3cr3t-value\n").unwrap();
        let mut c = s3();
        c.s3.secret_access_key.clear();
        c.s3.secret_access_key_file = Some(f);
        c.validate().unwrap();
        assert_eq!(c.s3.secret().unwrap(), "s3cr3t-value");
        let c = s3();
        assert!(!format!("{c:?}").contains("secret\""), "{c:?}");
        assert!(format!("{c:?}").contains("***"));
    }

    #[test]
    fn the_section_parses_from_toml_and_refuses_unknown_keys() {
        let c: ArtifactsConfig = toml::from_str(
            "backend = \"s3\"\nmax_artifact_bytes = 1024\n[s3]\nbucket = \"b1b\"\nprefix = \"p\"\nallow_http = true\n",
        )
        .unwrap();
        assert_eq!(c.s3.bucket, "b1b");
        assert_eq!(c.s3.normalized_prefix(), "p/");
        assert_eq!(c.max_artifact_bytes, 1024);
        assert!(toml::from_str::<ArtifactsConfig>("bakend = \"s3\"").is_err());
        assert!(toml::from_str::<ArtifactsConfig>("[s3]\nbuckett = \"x\"").is_err());
    }
}
