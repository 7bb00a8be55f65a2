//! Task secrets at rest: the values of `TaskSpec.secret_env`.
//!
//! - On submit every value is sealed ([`SecretBox::seal_spec`]) before the task is stored:
//!   AES-256-GCM with a random 96-bit nonce per value, the variable's name as associated
//!   data, kept as `sealed:v1:<hex(nonce ‖ ciphertext ‖ tag)>`. The store, the core's
//!   memory and task events only ever hold that form.
//! - The worker gets the plain values in its `Assign` ([`SecretBox::unseal_spec`]), nothing
//!   else does.
//! - Every task leaving through the API has its values replaced by [`MASK`] ([`masked`]).
//!
//! The key is 32 random bytes, hex-encoded in a file: `secrets_key_file`, or on the
//! embedded store `<data_dir>/secrets.key`, generated (mode 0600) on the first start. With
//! several controllers (etcd) every controller needs the same file; without one, tasks
//! carrying secrets are refused.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use scabbard_common::proto::{Task, TaskSpec};
use scabbard_common::{Error, Result};

use crate::config::ControllerConfig;

/// What every secret value looks like to API clients.
pub const MASK: &str = "***";
/// Prefix of a sealed value.
const PREFIX: &str = "sealed:v1:";
/// Key length (AES-256).
pub const KEY_LEN: usize = 32;
/// Name of the key generated in the data dir (embedded store, no `secrets_key_file`).
pub const KEY_FILE_NAME: &str = "secrets.key";

/// Seals and opens secret values with the cluster's key.
pub struct SecretBox {
    /// `None`: no key configured (etcd without `secrets_key_file`): secrets are refused.
    key: Option<LessSafeKey>,
    rng: SystemRandom,
}

impl fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretBox")
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl SecretBox {
    /// A box sealing with `key`.
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256 key");
        Self {
            key: Some(LessSafeKey::new(unbound)),
            rng: SystemRandom::new(),
        }
    }

    /// A box without a key: any task carrying secrets is refused.
    pub fn disabled() -> Self {
        Self {
            key: None,
            rng: SystemRandom::new(),
        }
    }

    /// The box `cfg` asks for: its `secrets_key_file`; else, on the embedded store,
    /// `<data_dir>/secrets.key` (generated on first use); else (etcd) none.
    pub fn from_config(cfg: &ControllerConfig) -> Result<Self> {
        if let Some(path) = &cfg.secrets_key_file {
            return Ok(Self::new(&read_key_file(path)?));
        }
        if cfg.store == "etcd" {
            return Ok(Self::disabled());
        }
        Ok(Self::new(&load_or_create_key(
            &cfg.data_dir.join(KEY_FILE_NAME),
        )?))
    }

    /// Whether a key is configured.
    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    fn key(&self) -> Result<&LessSafeKey> {
        self.key.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(
                "this controller has no key to store secret_env values with: set secrets_key_file \
                 (32 random bytes, hex; e.g. `openssl rand -hex 32`) to the same file on every \
                 controller of the cluster"
                    .into(),
            )
        })
    }

    /// Seals one value of variable `name`.
    pub fn seal(&self, name: &str, value: &str) -> Result<String> {
        let key = self.key()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| Error::internal("no randomness for a nonce"))?;
        let mut data = value.as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(name.as_bytes()),
            &mut data,
        )
        .map_err(|_| Error::internal("sealing a secret failed"))?;
        let mut out = Vec::with_capacity(NONCE_LEN + data.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(format!("{PREFIX}{}", hex::encode(out)))
    }

    /// Opens a value sealed by [`seal`](Self::seal) for variable `name`. Fails (without
    /// saying more) when it was sealed with another key, for another name, or changed.
    pub fn open(&self, name: &str, sealed: &str) -> Result<String> {
        let bad = || {
            Error::FailedPrecondition(format!(
                "secret_env[{name:?}] cannot be decrypted: it was sealed with another key \
                 (is secrets_key_file the same on every controller?) or is corrupt"
            ))
        };
        let key = self.key()?;
        let raw = sealed
            .strip_prefix(PREFIX)
            .and_then(|h| hex::decode(h).ok())
            .ok_or_else(bad)?;
        if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(bad());
        }
        let (nonce, data) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut data = data.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut data)
            .map_err(|_| bad())?;
        String::from_utf8(plain.to_vec()).map_err(|_| bad())
    }

    /// Seals every `secret_env` value of a spec (before it is stored).
    pub fn seal_spec(&self, spec: &mut TaskSpec) -> Result<()> {
        for (name, value) in spec.secret_env.iter_mut() {
            *value = self.seal(name, value)?;
        }
        Ok(())
    }

    /// Opens every `secret_env` value of a stored spec (for the worker's `Assign`).
    pub fn unseal_spec(&self, spec: &mut TaskSpec) -> Result<()> {
        for (name, value) in spec.secret_env.iter_mut() {
            *value = self.open(name, value)?;
        }
        Ok(())
    }
}

/// Replaces every `secret_env` value of the spec with [`MASK`].
pub fn mask_spec(spec: &mut TaskSpec) {
    for v in spec.secret_env.values_mut() {
        MASK.clone_into(v);
    }
}

/// The task as API clients see it: every `secret_env` value replaced with [`MASK`].
pub fn masked(mut task: Task) -> Task {
    if let Some(spec) = task.spec.as_mut() {
        mask_spec(spec);
    }
    task
}

/// Reads a key file: 64 hex digits (surrounding whitespace ignored).
pub fn read_key_file(path: &Path) -> Result<[u8; KEY_LEN]> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::invalid(format!("secrets_key_file {}: {e}", path.display())))?;
    parse_key(text.trim()).ok_or_else(|| {
        Error::invalid(format!(
            "secrets_key_file {}: expected {} hex digits (32 random bytes, e.g. `openssl rand -hex 32`)",
            path.display(),
            KEY_LEN * 2
        ))
    })
}

fn parse_key(hex_text: &str) -> Option<[u8; KEY_LEN]> {
    hex::decode(hex_text).ok()?.try_into().ok()
}

/// A fresh random key.
pub fn generate_key() -> Result<[u8; KEY_LEN]> {
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| Error::internal("no randomness for a key"))?;
    Ok(key)
}

/// The key at `path`, created (mode 0600, hex) if it does not exist yet.
fn load_or_create_key(path: &Path) -> Result<[u8; KEY_LEN]> {
    if path.exists() {
        return read_key_file(path);
    }
    let key = generate_key()?;
    let io_err = |e: std::io::Error| {
        Error::invalid(format!(
            "cannot create the secrets key {}: {e}",
            path.display()
        ))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        scabbard_common::private::private_dir(dir).map_err(io_err)?;
    }
    // Written under a temporary name then linked into place: a crash never leaves a
    // partial key, and of two controllers starting at once on one data dir, one key wins.
    let tmp = tmp_path(path);
    {
        let mut f = scabbard_common::private::create_temp(&tmp).map_err(io_err)?;
        f.write_all(format!("{}\n", hex::encode(key)).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io_err)?;
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "generated the key that seals task secrets");
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key_file(path),
        Err(e) => Err(io_err(e)),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed() -> SecretBox {
        SecretBox::new(&generate_key().unwrap())
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let b = boxed();
        let a = b.seal("TOKEN", "hunter2").unwrap();
        let c = b.seal("TOKEN", "hunter2").unwrap();
        assert!(a.starts_with(PREFIX), "{a}");
        assert_ne!(a, c, "a nonce is never reused");
        assert!(!a.contains("hunter2"));
        assert_eq!(b.open("TOKEN", &a).unwrap(), "hunter2");
        assert_eq!(b.open("TOKEN", &c).unwrap(), "hunter2");
        assert_eq!(b.open("E", &b.seal("E", "").unwrap()).unwrap(), "");
        let long = "x".repeat(64 * 1024);
        assert_eq!(b.open("L", &b.seal("L", &long).unwrap()).unwrap(), long);
    }

    #[test]
    fn tampering_is_detected() {
        let b = boxed();
        let s = b.seal("TOKEN", "hunter2").unwrap();
        // Flip each byte of the hex payload in turn: nonce, ciphertext and tag.
        let payload = s.strip_prefix(PREFIX).unwrap();
        for i in 0..payload.len() {
            let mut chars: Vec<char> = payload.chars().collect();
            chars[i] = if chars[i] == '0' { '1' } else { '0' };
            let t = format!("{PREFIX}{}", chars.into_iter().collect::<String>());
            let e = b.open("TOKEN", &t).unwrap_err();
            assert!(e.to_string().contains("cannot be decrypted"), "{e}");
        }
        // Truncated, not hex, no prefix, moved to another variable.
        assert!(b.open("TOKEN", &s[..s.len() - 2]).is_err());
        assert!(b.open("TOKEN", &format!("{PREFIX}zz")).is_err());
        assert!(b.open("TOKEN", "hunter2").is_err());
        assert!(b.open("OTHER", &s).is_err());
    }

    #[test]
    fn wrong_key_is_refused() {
        let s = boxed().seal("TOKEN", "hunter2").unwrap();
        let e = boxed().open("TOKEN", &s).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("secrets_key_file"), "{e}");
    }

    #[test]
    fn without_a_key_secrets_are_refused_and_plain_specs_pass() {
        let b = SecretBox::disabled();
        let mut plain = TaskSpec::default();
        b.seal_spec(&mut plain).unwrap();
        let mut spec = TaskSpec::default();
        spec.secret_env.insert("S".into(), "v".into());
        let e = b.seal_spec(&mut spec).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(
            e.to_string().contains("same file on every controller"),
            "{e}"
        );
    }

    #[test]
    fn specs_seal_unseal_and_mask() {
        let b = boxed();
        let mut spec = TaskSpec::default();
        spec.env.insert("PLAIN".into(), "visible".into());
        spec.secret_env.insert("A".into(), "alpha".into());
        spec.secret_env.insert("B".into(), "beta".into());
        b.seal_spec(&mut spec).unwrap();
        assert!(spec.secret_env.values().all(|v| v.starts_with(PREFIX)));
        let task = masked(Task {
            spec: Some(spec.clone()),
            ..Default::default()
        });
        let shown = task.spec.unwrap();
        assert!(shown.secret_env.values().all(|v| v == MASK));
        assert_eq!(shown.env["PLAIN"], "visible");
        b.unseal_spec(&mut spec).unwrap();
        assert_eq!(spec.secret_env["A"], "alpha");
        assert_eq!(spec.secret_env["B"], "beta");
    }

    #[test]
    fn key_file_is_generated_once_with_mode_0600_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cfg = ControllerConfig {
            data_dir: dir.path().join("data"),
            ..Default::default()
        };
        let first = SecretBox::from_config(&cfg).unwrap();
        let path = cfg.data_dir.join(KEY_FILE_NAME);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = first.seal("S", "v").unwrap();
        let again = SecretBox::from_config(&cfg).unwrap();
        assert_eq!(again.open("S", &sealed).unwrap(), "v");
        // No leftovers from the write.
        let names: Vec<_> = std::fs::read_dir(&cfg.data_dir).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn configured_key_file_is_used_and_checked_and_etcd_without_one_is_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = generate_key().unwrap();
        std::fs::write(&path, format!("  {}\n", hex::encode(key))).unwrap();
        let cfg = ControllerConfig {
            data_dir: dir.path().join("data"),
            secrets_key_file: Some(path.clone()),
            store: "etcd".into(),
            ..Default::default()
        };
        let b = SecretBox::from_config(&cfg).unwrap();
        assert_eq!(
            SecretBox::new(&key)
                .open("S", &b.seal("S", "v").unwrap())
                .unwrap(),
            "v"
        );
        assert!(!cfg.data_dir.join(KEY_FILE_NAME).exists());
        std::fs::write(&path, "abcd").unwrap();
        let e = SecretBox::from_config(&cfg).unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        let etcd = ControllerConfig {
            secrets_key_file: None,
            ..cfg
        };
        assert!(!SecretBox::from_config(&etcd).unwrap().enabled());
    }
}
