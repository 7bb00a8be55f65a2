//! TLS on the controller's listener (rustls, ring provider) and mutual TLS for workers:
//! [`TlsConfig`] says where the certificate, key and client CA are; [`server_builder`]
//! applies them to the gRPC server; [`check_agent_identity`] matches a worker's verified
//! client certificate against the agent it claims to be.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use scabbard_common::tls::{CLIENT_CERT_PHRASE, cert_names, read_cert_pem, read_key_pem};
use scabbard_common::{Error, Result};
use serde::{Deserialize, Serialize};
use tonic::transport::ClientTlsConfig;
use tonic::transport::server::ServerTlsConfig;
use tonic::transport::{Certificate, CertificateDer, Identity, Server};

/// How long a client may take to finish the TLS handshake (plaintext or stalled clients
/// are dropped after this).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[tls]` of the controller config. Without `cert_file` the listener is plaintext.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain of the controller (leaf first). Turns TLS on.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle client certificates are verified against (mutual TLS). Clients
    /// without a certificate are still let in (API clients use tokens); a certificate
    /// that does not verify is refused during the handshake.
    pub client_ca_file: Option<PathBuf>,
    /// `AgentService.Register` and `Session` refuse workers without a verified client
    /// certificate naming the agent (needs `client_ca_file`).
    pub require_worker_client_cert: bool,
    /// PEM CA bundle the other controllers' certificates are verified against: with it a
    /// follower forwards client calls to the leader over TLS (see `forward`); without it
    /// a TLS follower answers with a redirect (`UNAVAILABLE` and the leader's address).
    pub peer_ca_file: Option<PathBuf>,
    /// Name the leader's certificate is checked against when forwarding (default: the
    /// host of the leader's advertised address).
    pub peer_domain: Option<String>,
}

impl TlsConfig {
    /// Whether the listener speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// Refuses inconsistent settings and unreadable or malformed files, naming them.
    pub fn validate(&self) -> Result<()> {
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                read_cert_pem(cert, "tls.cert_file")?;
                read_key_pem(key, "tls.key_file")?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::invalid(
                    "tls.cert_file is set without tls.key_file (--tls-key)",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "tls.key_file is set without tls.cert_file (--tls-cert)",
                ));
            }
        }
        if let Some(ca) = &self.client_ca_file {
            if !self.enabled() {
                return Err(Error::invalid(
                    "tls.client_ca_file needs TLS: set tls.cert_file and tls.key_file (--tls-cert, --tls-key)",
                ));
            }
            read_cert_pem(ca, "tls.client_ca_file")?;
        }
        if let Some(ca) = &self.peer_ca_file {
            if !self.enabled() {
                return Err(Error::invalid(
                    "tls.peer_ca_file needs TLS: set tls.cert_file and tls.key_file (--tls-cert, --tls-key)",
                ));
            }
            read_cert_pem(ca, "tls.peer_ca_file")?;
        }
        if self.peer_domain.is_some() && self.peer_ca_file.is_none() {
            return Err(Error::invalid(
                "tls.peer_domain needs tls.peer_ca_file (--tls-peer-ca), the CA of the other controllers' certificates",
            ));
        }
        if self.require_worker_client_cert && self.client_ca_file.is_none() {
            return Err(Error::invalid(
                "tls.require_worker_client_cert needs tls.client_ca_file (--tls-client-ca), the CA that issues worker certificates",
            ));
        }
        // Builds the rustls configuration once, so a key that does not match its
        // certificate stops the process before it binds anything.
        server_builder(self)?;
        Ok(())
    }

    /// The tonic server TLS settings, or `None` for plaintext.
    pub fn server_config(&self) -> Result<Option<ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) else {
            return Ok(None);
        };
        let mut tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read_cert_pem(cert, "tls.cert_file")?,
                read_key_pem(key, "tls.key_file")?,
            ))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca_file {
            tls = tls
                .client_ca_root(Certificate::from_pem(read_cert_pem(
                    ca,
                    "tls.client_ca_file",
                )?))
                .client_auth_optional(true);
        }
        Ok(Some(tls))
    }
}

/// How followers reach the leader to forward calls: `Ok(None)` plaintext (no TLS on the
/// listener), `Ok(Some(_))` TLS verified against `peer_ca_file`; `Err` when the listener
/// speaks TLS but no peer CA is set (followers redirect instead of forwarding).
pub fn peer_client_config(
    tls: &TlsConfig,
) -> std::result::Result<Option<ClientTlsConfig>, &'static str> {
    if !tls.enabled() {
        return Ok(None);
    }
    let Some(ca) = &tls.peer_ca_file else {
        return Err("tls.peer_ca_file is not set");
    };
    // Read (and checked) at validation; a file gone since then stops forwarding only.
    let Ok(pem) = read_cert_pem(ca, "tls.peer_ca_file") else {
        return Err("tls.peer_ca_file cannot be read");
    };
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(d) = &tls.peer_domain {
        c = c.domain_name(d.clone());
    }
    Ok(Some(c))
}

/// `Server::builder()`, with TLS applied when `tls` enables it.
pub fn server_builder(tls: &TlsConfig) -> Result<Server> {
    let builder = Server::builder();
    let Some(config) = tls.server_config()? else {
        return Ok(builder);
    };
    builder.tls_config(config).map_err(|e| {
        let why = scabbard_common::client::error_chain(&e);
        let why = if why.contains("KeyMismatch") {
            "the key does not belong to the certificate".to_string()
        } else {
            why
        };
        Error::invalid(format!(
            "TLS settings (tls.cert_file {}, tls.key_file {}): {why}",
            shown(&tls.cert_file),
            shown(&tls.key_file),
        ))
    })
}

fn shown(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "-".into(), |p| p.display().to_string())
}

/// Checks that the caller's verified client certificate (`peer_certs`, from
/// `Request::peer_certs`) belongs to the agent: its CN or a DNS SAN must equal
/// `agent_name` or `agent_id`. Without a certificate this fails only when `required`
/// (`UNAUTHENTICATED`); a certificate naming someone else always fails
/// (`PERMISSION_DENIED`).
///
/// The chain itself was verified against `client_ca_file` during the handshake.
pub fn check_agent_identity(
    peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    agent_id: &str,
    agent_name: &str,
    required: bool,
) -> Result<()> {
    let leaf = peer_certs.as_deref().and_then(|c| c.first());
    let Some(leaf) = leaf else {
        if required {
            return Err(Error::Unauthenticated(format!(
                "this controller requires workers to present a {CLIENT_CERT_PHRASE} (mutual TLS): start the worker with --client-cert and --client-key issued by the controller's client CA, and --ca-cert"
            )));
        }
        return Ok(());
    };
    let names = cert_names(leaf.as_ref()).map_err(|e| {
        Error::PermissionDenied(format!("the {CLIENT_CERT_PHRASE} cannot be read: {e}"))
    })?;
    if names.contains(agent_name) || names.contains(agent_id) {
        return Ok(());
    }
    let who = if agent_id.is_empty() || agent_id == agent_name {
        format!("{agent_name:?}")
    } else {
        format!("{agent_name:?} (id {agent_id:?})")
    };
    Err(Error::PermissionDenied(format!(
        "the {CLIENT_CERT_PHRASE} is issued to {}, not to agent {who}: use the certificate issued for this worker, or name the worker after its certificate (--name)",
        names.describe()
    )))
}

/// Whether the caller's verified client certificate names `agent_id` itself (its CN or a
/// DNS SAN): proof enough to re-register that id. A certificate naming only the agent's
/// name does not prove the id.
pub fn cert_names_agent_id(
    peer_certs: Option<&Arc<Vec<CertificateDer<'static>>>>,
    agent_id: &str,
) -> bool {
    peer_certs
        .and_then(|c| c.first())
        .and_then(|leaf| cert_names(leaf.as_ref()).ok())
        .is_some_and(|names| names.contains(agent_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pki() -> (tempfile::TempDir, scabbard_common::tls::DevPki) {
        let dir = tempfile::tempdir().unwrap();
        let pki = scabbard_common::tls::generate_dev_pki(dir.path(), "w1", &[]).unwrap();
        (dir, pki)
    }

    fn der(path: &std::path::Path) -> Arc<Vec<CertificateDer<'static>>> {
        Arc::new(scabbard_common::tls::pem_file_certs(path, "cert").unwrap())
    }

    #[test]
    fn identity_is_checked_against_cn_and_san() {
        let (_d, pki) = pki();
        let certs = der(&pki.worker_cert);
        check_agent_identity(Some(certs.clone()), "agent-1", "w1", true).unwrap();
        check_agent_identity(Some(certs.clone()), "w1", "other", true).unwrap();
        let e = check_agent_identity(Some(certs), "agent-1", "w2", false).unwrap_err();
        assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
        assert!(e.to_string().contains("CN=w1"), "{e}");
        let e = check_agent_identity(None, "agent-1", "w1", true).unwrap_err();
        assert!(matches!(e, Error::Unauthenticated(_)), "{e}");
        check_agent_identity(None, "agent-1", "w1", false).unwrap();
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let (_d, pki) = pki();
        let only_cert = TlsConfig {
            cert_file: Some(pki.server_cert.clone()),
            ..Default::default()
        };
        assert!(
            only_cert
                .validate()
                .unwrap_err()
                .to_string()
                .contains("key_file")
        );
        let require_without_ca = TlsConfig {
            cert_file: Some(pki.server_cert.clone()),
            key_file: Some(pki.server_key.clone()),
            require_worker_client_cert: true,
            ..Default::default()
        };
        assert!(
            require_without_ca
                .validate()
                .unwrap_err()
                .to_string()
                .contains("client_ca_file")
        );
        let swapped = TlsConfig {
            cert_file: Some(pki.server_key.clone()),
            key_file: Some(pki.server_key.clone()),
            ..Default::default()
        };
        let e = swapped.validate().unwrap_err().to_string();
        assert!(
            e.contains("tls.cert_file") && e.contains("server.key"),
            "{e}"
        );
        let good = TlsConfig {
            cert_file: Some(pki.server_cert.clone()),
            key_file: Some(pki.server_key.clone()),
            client_ca_file: Some(pki.ca_cert.clone()),
            require_worker_client_cert: true,
            peer_ca_file: Some(pki.ca_cert.clone()),
            peer_domain: None,
        };
        good.validate().unwrap();
        assert!(server_builder(&good).is_ok());
        assert!(matches!(peer_client_config(&good), Ok(Some(_))));
        let no_peer = TlsConfig {
            peer_ca_file: None,
            ..good.clone()
        };
        assert!(
            peer_client_config(&no_peer).is_err(),
            "TLS without a peer CA redirects"
        );
        assert!(matches!(
            peer_client_config(&TlsConfig::default()),
            Ok(None)
        ));
        let domain_alone = TlsConfig {
            peer_domain: Some("controller".into()),
            ..no_peer
        };
        let e = domain_alone.validate().unwrap_err().to_string();
        assert!(e.contains("tls.peer_ca_file"), "{e}");
    }

    #[test]
    fn mismatched_key_is_refused_when_building_the_server() {
        let (_d, pki) = pki();
        let cfg = TlsConfig {
            cert_file: Some(pki.server_cert.clone()),
            key_file: Some(pki.worker_key.clone()),
            ..Default::default()
        };
        let Err(e) = server_builder(&cfg) else {
            panic!("a key that does not match the certificate must be refused");
        };
        let e = e.to_string();
        assert!(
            e.contains("key_file") && e.contains("does not belong"),
            "{e}"
        );
        assert!(
            cfg.validate().is_err(),
            "validate catches it before binding"
        );
    }
}
