//! A real S3-compatible server for the artifact store's tests: PyPI `moto[server]`'s
//! `moto_server` on a free loopback port (installed into `<repo>/.venv` by
//! `scripts/setup.sh`), killed on drop. A missing `moto_server` fails the test, naming the
//! setup command.
//!
//! Also a tiny S3 client over plain HTTP for what the store itself never does: create a
//! bucket, list its keys and its unfinished multipart uploads (moto checks no signatures).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Proc, eventually, free_port};

/// Access key the tests use (moto accepts any).
pub const ACCESS_KEY_ID: &str = "scabbard-test";
/// Secret key the tests use.
pub const SECRET_ACCESS_KEY: &str = "scabbard-test-secret";

/// Where `moto_server` is: `<repo>/.venv/bin/moto_server`, else on `PATH`.
pub fn moto_server_bin() -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = repo.join(".venv/bin/moto_server");
    if venv.exists() {
        return venv;
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("moto_server"))
            .find(|f| f.is_file())
    }) {
        return found;
    }
    panic!(
        "moto_server is missing (the S3-compatible test server): run scripts/setup.sh, which installs PyPI moto[server] into {}/.venv",
        repo.display()
    );
}

/// A running `moto_server`.
pub struct MotoServer {
    _proc: Proc,
    /// `127.0.0.1:<port>`.
    pub addr: String,
}

impl MotoServer {
    /// Starts one on a free loopback port and waits until it answers.
    pub async fn start() -> Result<Self> {
        let bin = moto_server_bin();
        let port = free_port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let server = Self {
            _proc: Proc::new(child, "moto_server"),
            addr: format!("127.0.0.1:{port}"),
        };
        eventually("moto_server to answer", Duration::from_secs(60), || async {
            server.request("GET", "/", "").await.ok()
        })
        .await?;
        Ok(server)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates `bucket`.
    pub async fn create_bucket(&self, bucket: &str) -> Result<()> {
        let (status, body) = self.request("PUT", &format!("/{bucket}"), "").await?;
        if status != 200 {
            bail!("creating bucket {bucket}: HTTP {status}: {body}");
        }
        Ok(())
    }

    /// Every key in `bucket`.
    pub async fn keys(&self, bucket: &str) -> Result<Vec<String>> {
        let (status, body) = self
            .request("GET", &format!("/{bucket}?list-type=2"), "")
            .await?;
        if status != 200 {
            bail!("listing bucket {bucket}: HTTP {status}: {body}");
        }
        Ok(elements(&body, "Key"))
    }

    /// Keys of the multipart uploads started in `bucket` and neither completed nor aborted.
    pub async fn pending_uploads(&self, bucket: &str) -> Result<Vec<String>> {
        let (status, body) = self
            .request("GET", &format!("/{bucket}?uploads"), "")
            .await?;
        if status != 200 {
            bail!("listing uploads of {bucket}: HTTP {status}: {body}");
        }
        Ok(elements(&body, "Key"))
    }

    /// Controller flags for the `s3` backend on `bucket` (the secret goes in the
    /// environment: [`MotoServer::controller_env`]).
    pub fn controller_flags(&self, bucket: &str) -> Vec<String> {
        [
            "--artifacts-backend",
            "s3",
            "--artifacts-s3-bucket",
            bucket,
            "--artifacts-s3-endpoint",
            &self.endpoint(),
            "--artifacts-s3-access-key-id",
            ACCESS_KEY_ID,
            "--artifacts-s3-allow-http",
            "--artifacts-s3-prefix",
            "ci/",
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// The `[artifacts]` config of the `s3` backend on `bucket`.
    pub fn config(&self, bucket: &str) -> scabbard_controller::artifacts::ArtifactsConfig {
        scabbard_controller::artifacts::ArtifactsConfig {
            backend: "s3".into(),
            s3: scabbard_controller::artifacts::S3Config {
                bucket: bucket.into(),
                endpoint: self.endpoint(),
                access_key_id: ACCESS_KEY_ID.into(),
                secret_access_key: SECRET_ACCESS_KEY.into(),
                allow_http: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// One HTTP/1.1 request; the status and body.
    async fn request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(&self.addr).await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
            .await
            .context("moto_server did not answer within 20 s")??;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("not an HTTP answer: {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }
}

/// The text of every `<tag>…</tag>` in `xml`.
fn elements(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i + open.len()..];
        let Some(j) = rest.find(&close) else { break };
        out.push(rest[..j].to_string());
        rest = &rest[j + close.len()..];
    }
    out
}
