//! TLS helpers shared by the controller, the worker, the CLI and the tests: reading PEM
//! files with errors that name the file, the names a certificate is issued to, and a
//! throwaway development PKI ([`generate_dev_pki`]) for `scabbard dev --tls` and tests.
//!
//! Only the `ring` crypto provider is used (rustls through tonic's `tls-ring`, rcgen with
//! `ring`).

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

/// Phrase present in every refusal caused by a missing or unusable client certificate
/// (workers use it to tell such a refusal from a bad agent token).
pub const CLIENT_CERT_PHRASE: &str = "client certificate";

/// Reads a PEM file of one or more X.509 certificates; `what` names the setting (e.g.
/// `"ca_cert"`) so errors say which file is wrong and why.
pub fn read_cert_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let pem = read_file(path, what)?;
    let certs = parse_certs(&pem).map_err(|why| bad_file(path, what, &why))?;
    for (i, der) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(der).map_err(|e| {
            bad_file(
                path,
                what,
                &format!("certificate #{} is not valid X.509: {e}", i + 1),
            )
        })?;
    }
    Ok(pem)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1); errors name the file.
pub fn read_key_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let pem = read_file(path, what)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(_) => Ok(pem),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(bad_file(
            path,
            what,
            "no private key found (expected a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block)",
        )),
        Err(e) => Err(bad_file(path, what, &format!("not a valid PEM key: {e}"))),
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::invalid(format!("{what} {}: cannot read: {e}", path.display())))
}

fn bad_file(path: &Path, what: &str, why: &str) -> Error {
    Error::invalid(format!("{what} {}: {why}", path.display()))
}

fn parse_certs(pem: &[u8]) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate found (expected a PEM \"CERTIFICATE\" block)".into());
    }
    Ok(certs)
}

/// The names a certificate is issued to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertNames {
    /// Subject common names (CN).
    pub common_names: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
}

impl CertNames {
    /// Whether `name` is one of the common names or DNS names (exact match; DNS names
    /// compare case-insensitively).
    pub fn contains(&self, name: &str) -> bool {
        !name.is_empty()
            && (self.common_names.iter().any(|n| n == name)
                || self.dns_names.iter().any(|n| n.eq_ignore_ascii_case(name)))
    }

    /// The name to show for the certificate: the first CN, else the first DNS name.
    pub fn primary(&self) -> Option<&str> {
        self.common_names
            .first()
            .or(self.dns_names.first())
            .map(String::as_str)
    }

    /// Every name, for messages (`CN=…, DNS=…`).
    pub fn describe(&self) -> String {
        let all: Vec<String> = self
            .common_names
            .iter()
            .map(|n| format!("CN={n}"))
            .chain(self.dns_names.iter().map(|n| format!("DNS={n}")))
            .collect();
        if all.is_empty() {
            "no CN or DNS name".into()
        } else {
            all.join(", ")
        }
    }
}

/// The subject CNs and DNS SANs of a DER certificate.
pub fn cert_names(der: &[u8]) -> Result<CertNames> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::invalid(format!("certificate is not valid X.509: {e}")))?;
    let common_names = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(n) => Some((*n).to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => {
            return Err(Error::invalid(format!(
                "certificate has a bad subjectAltName: {e}"
            )));
        }
    };
    Ok(CertNames {
        common_names,
        dns_names,
    })
}

/// The certificates of a PEM file, DER-encoded (leaf first); errors name the file.
pub fn pem_file_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_cert_pem(path, what)?;
    parse_certs(&pem).map_err(|why| bad_file(path, what, &why))
}

/// The names of the first (leaf) certificate in a PEM file.
pub fn pem_file_names(path: &Path, what: &str) -> Result<CertNames> {
    let certs = pem_file_certs(path, what)?;
    cert_names(&certs[0]).map_err(|e| bad_file(path, what, &e.to_string()))
}

/// A throwaway PKI written by [`generate_dev_pki`]: a CA, a server certificate for the
/// controller and a client certificate for one worker. Paths point into `dir`.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// Directory holding every file.
    pub dir: PathBuf,
    /// CA certificate (PEM): the controller's `client_ca_file`, the clients' `--ca-cert`.
    pub ca_cert: PathBuf,
    /// CA key (PEM, mode 0600): lets [`DevPki::issue_client_cert`] issue more certificates.
    pub ca_key: PathBuf,
    /// Controller certificate (PEM) for localhost, 127.0.0.1, ::1 and the extra names.
    pub server_cert: PathBuf,
    /// Controller key (PEM, mode 0600).
    pub server_key: PathBuf,
    /// The worker's name: CN and DNS SAN of `worker_cert`.
    pub worker_name: String,
    /// Worker client certificate (PEM).
    pub worker_cert: PathBuf,
    /// Worker key (PEM, mode 0600).
    pub worker_key: PathBuf,
}

/// How long dev certificates are valid.
const DEV_VALIDITY: ::time::Duration = ::time::Duration::days(365);

/// Generates a fresh CA, a controller certificate (SANs `localhost`, `127.0.0.1`, `::1`
/// plus `extra_server_names`) and a worker client certificate (CN and DNS SAN
/// `worker_name`) into `dir` (created 0700 if missing; keys written 0600).
///
/// For development and tests only: the CA key sits next to the certificates.
pub fn generate_dev_pki(
    dir: &Path,
    worker_name: &str,
    extra_server_names: &[String],
) -> Result<DevPki> {
    check_cert_name(worker_name)?;
    create_private_dir(dir)?;
    let suffix: u32 = rand::random();
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("Scabbard dev CA {suffix:08x}"));
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "Scabbard (development only)");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut ca_params);
    let ca_key = KeyPair::generate().map_err(pki_error)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(pki_error)?;
    let pki = DevPki {
        dir: dir.to_path_buf(),
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        worker_name: worker_name.to_string(),
        worker_cert: dir.join("worker.crt"),
        worker_key: dir.join("worker.key"),
    };
    write_file(&pki.ca_cert, ca_cert.pem().as_bytes(), false)?;
    write_file(&pki.ca_key, ca_key.serialize_pem().as_bytes(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    for n in extra_server_names {
        if !n.is_empty() && !names.contains(n) {
            names.push(n.clone());
        }
    }
    let mut server = CertificateParams::new(names).map_err(pki_error)?;
    server.distinguished_name = rcgen::DistinguishedName::new();
    server
        .distinguished_name
        .push(DnType::CommonName, "scabbard controller");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_defaults(&mut server);
    let server_key = KeyPair::generate().map_err(pki_error)?;
    let server_cert = server.signed_by(&server_key, &issuer).map_err(pki_error)?;
    write_file(&pki.server_cert, server_cert.pem().as_bytes(), false)?;
    write_file(&pki.server_key, server_key.serialize_pem().as_bytes(), true)?;

    issue_client(&issuer, worker_name, &pki.worker_cert, &pki.worker_key)?;
    Ok(pki)
}

impl DevPki {
    /// Issues another client certificate (CN and DNS SAN `name`) from this PKI's CA, as
    /// `<dir>/<name>.crt` and `<dir>/<name>.key`; returns (certificate, key) paths.
    pub fn issue_client_cert(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        check_cert_name(name)?;
        let ca_pem = String::from_utf8(read_cert_pem(&self.ca_cert, "CA certificate")?)
            .map_err(|_| bad_file(&self.ca_cert, "CA certificate", "not UTF-8"))?;
        let key_pem = String::from_utf8(read_key_pem(&self.ca_key, "CA key")?)
            .map_err(|_| bad_file(&self.ca_key, "CA key", "not UTF-8"))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| bad_file(&self.ca_key, "CA key", &e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .map_err(|e| bad_file(&self.ca_cert, "CA certificate", &e.to_string()))?;
        let cert = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        issue_client(&issuer, name, &cert, &key)?;
        Ok((cert, key))
    }
}

fn issue_client(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    cert_path: &Path,
    key_path: &Path,
) -> Result<()> {
    let mut params = CertificateParams::new(vec![name.to_string()]).map_err(pki_error)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf_defaults(&mut params);
    let key = KeyPair::generate().map_err(pki_error)?;
    let cert = params.signed_by(&key, issuer).map_err(pki_error)?;
    write_file(cert_path, cert.pem().as_bytes(), false)?;
    write_file(key_path, key.serialize_pem().as_bytes(), true)
}

fn leaf_defaults(params: &mut CertificateParams) {
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(params);
}

fn set_validity(params: &mut CertificateParams) {
    let now = ::time::OffsetDateTime::now_utc();
    // A little slack for clocks that are slightly behind.
    params.not_before = now - ::time::Duration::hours(1);
    params.not_after = now + DEV_VALIDITY;
}

/// Names usable as a certificate CN, DNS SAN and file name.
fn check_cert_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{name:?} cannot be a certificate name: use 1-64 letters, digits, '-', '.' or '_'"
        )))
    }
}

fn pki_error(e: rcgen::Error) -> Error {
    Error::internal(format!("generating certificates: {e}"))
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
        .map_err(|e| Error::invalid(format!("cannot create {}: {e}", dir.display())))
}

fn write_file(path: &Path, data: &[u8], private: bool) -> Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, if private { 0o600 } else { 0o644 });
    let fail = |e: std::io::Error| Error::invalid(format!("cannot write {}: {e}", path.display()));
    let mut f = o.open(path).map_err(fail)?;
    #[cfg(unix)]
    if private {
        // An existing file keeps its mode on open: tighten it.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
    }
    f.write_all(data).map_err(fail)?;
    f.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pki_has_the_expected_names_and_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            generate_dev_pki(&dir.path().join("tls"), "builder-1", &["ci.example".into()]).unwrap();
        let server = pem_file_names(&pki.server_cert, "server cert").unwrap();
        for n in ["localhost", "ci.example"] {
            assert!(server.contains(n), "{server:?} lacks {n}");
        }
        let worker = pem_file_names(&pki.worker_cert, "worker cert").unwrap();
        assert_eq!(worker.common_names, vec!["builder-1".to_string()]);
        assert!(worker.contains("builder-1") && !worker.contains("builder-2"));
        assert_eq!(worker.primary(), Some("builder-1"));
        read_key_pem(&pki.worker_key, "worker key").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for k in [&pki.ca_key, &pki.server_key, &pki.worker_key] {
                let mode = std::fs::metadata(k).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", k.display());
            }
        }
        let (cert, key) = pki.issue_client_cert("builder-2").unwrap();
        assert!(pem_file_names(&cert, "c").unwrap().contains("builder-2"));
        read_key_pem(&key, "k").unwrap();
    }

    #[test]
    fn bad_pem_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = read_cert_pem(&missing, "ca_cert").unwrap_err().to_string();
        assert!(e.contains("ca_cert") && e.contains("nope.pem"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let e = read_cert_pem(&junk, "ca_cert").unwrap_err().to_string();
        assert!(
            e.contains("junk.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = read_key_pem(&junk, "client_key").unwrap_err().to_string();
        assert!(
            e.contains("client_key") && e.contains("no private key"),
            "{e}"
        );
    }

    #[test]
    fn odd_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(generate_dev_pki(dir.path(), "a b", &[]).is_err());
        assert!(generate_dev_pki(dir.path(), "../x", &[]).is_err());
    }
}
