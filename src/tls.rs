//! TLS termination for callers: the server certificate and, with
//! `client_ca`, mutual TLS in which a client certificate names its caller
//! by its one URI SAN. Both sit behind swappable handles, so SIGHUP can
//! replace them without touching established connections.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

/// A caller identity proven by a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsIdentity(pub String);

/// The one URI SAN of a certificate; none or several is an error.
pub fn uri_san(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subjectAltName: {e}"))?;
    let uris: Vec<&str> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err("the client certificate has no URI SAN (its caller identity)".into()),
        _ => {
            Err("the client certificate has several URI SANs; exactly one names its caller".into())
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a certificate chain and its private key, refusing anything rustls
/// (or pingora, which panics on bad files) could not use.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = read_pem_certs(cert)?;
    let key_pem = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    let private_key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("{}: not valid PEM: {e}", key.display()))?
        .ok_or_else(|| format!("{}: no private key found", key.display()))?;
    let signing_key = provider()
        .key_provider
        .load_private_key(private_key)
        .map_err(|e| format!("{}: unusable private key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not belong to {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(certified)
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", path.display()));
    }
    Ok(certs)
}

/// The system's trusted roots, read once: reading them costs milliseconds.
fn system_roots() -> &'static Result<Arc<RootCertStore>, String> {
    static ROOTS: std::sync::OnceLock<Result<Arc<RootCertStore>, String>> =
        std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        let certs = rustls_native_certs::load_native_certs()
            .map_err(|e| format!("cannot read the system's trusted roots: {e}"))?;
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err("the system has no trusted roots; set ca_file".into());
        }
        Ok(Arc::new(roots))
    })
}

/// Verified TLS to a data source that sealgate connects to itself (the
/// database fronts): the data source's `ca_file`, else the system roots;
/// the host name is always checked. TLS 1.2 and 1.3, no ALPN.
pub fn upstream_client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = match ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_pem_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
            }
            Arc::new(roots)
        }
        None => system_roots().clone()?,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A server configuration for TLS a client asks for inside its protocol
/// (PostgreSQL's SSLRequest): the swappable certificate and client
/// verifier, as on the HTTP TLS listeners.
pub fn in_protocol_server_config(
    cert: Arc<ServerCert>,
    client: Option<Arc<ClientVerifier>>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match client {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    }
    .with_cert_resolver(cert);
    Ok(Arc::new(config))
}

/// The `tls-server-end-point` channel binding data (RFC 5929): the
/// server certificate's hash, with SHA-256 unless its signature uses a
/// stronger hash.
pub fn server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let algorithm = cert.signature_algorithm.algorithm.to_id_string();
    // sha384WithRSAEncryption, ecdsa-with-SHA384; sha512 likewise.
    Some(match algorithm.as_str() {
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => sha2::Sha384::digest(der).to_vec(),
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => sha2::Sha512::digest(der).to_vec(),
        _ => sha2::Sha256::digest(der).to_vec(),
    })
}

/// When the leaf certificate of `key` expires, as Unix time.
pub fn expiry_unix(key: &CertifiedKey) -> Option<i64> {
    let leaf = key.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Whether a TLS client must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCert {
    /// The HTTP TLS listeners: a certificate is the only proof there is.
    Required,
    /// Database fronts: a caller may prove itself with a certificate, or
    /// with a token sent as the password inside TLS.
    Optional,
}

/// A verifier for client certificates signed by the CAs in `client_ca`.
pub fn load_client_verifier(
    client_ca: &Path,
    cert: ClientCert,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_pem_certs(client_ca)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", client_ca.display()))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    match cert {
        ClientCert::Required => builder.build(),
        ClientCert::Optional => builder.allow_unauthenticated().build(),
    }
    .map_err(|e| format!("{}: {e}", client_ca.display()))
}

/// The server certificate in force; SIGHUP swaps it.
pub struct ServerCert {
    current: ArcSwap<CertifiedKey>,
}

impl ServerCert {
    pub fn new(key: CertifiedKey) -> Self {
        ServerCert {
            current: ArcSwap::from_pointee(key),
        }
    }

    pub fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerCert")
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

struct Delegate(Arc<dyn ClientCertVerifier>);

/// Verifies client certificates against the CAs in force (SIGHUP swaps
/// them) and refuses, during the handshake, any without exactly one URI SAN.
pub struct ClientVerifier {
    current: ArcSwap<Delegate>,
}

impl ClientVerifier {
    pub fn new(verifier: Arc<dyn ClientCertVerifier>) -> Self {
        ClientVerifier {
            current: ArcSwap::from_pointee(Delegate(verifier)),
        }
    }

    pub fn replace(&self, verifier: Arc<dyn ClientCertVerifier>) {
        self.current.store(Arc::new(Delegate(verifier)));
    }
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientVerifier")
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.current.load().0.client_auth_mandatory()
    }

    /// No hints: they would have to outlive a swap of the CAs.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .0
            .verify_client_cert(end_entity, intermediates, now)?;
        uri_san(end_entity).map_err(rustls::Error::General)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_sans(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_is_the_one_uri_san() {
        let uri = |s: &str| rcgen::SanType::URI(s.try_into().unwrap());
        let dns = |s: &str| rcgen::SanType::DnsName(s.try_into().unwrap());
        assert_eq!(
            uri_san(&cert_with_sans(vec![
                uri("spiffe://prod/billing"),
                dns("billing.local")
            ]))
            .unwrap(),
            "spiffe://prod/billing"
        );
        assert!(uri_san(&cert_with_sans(vec![dns("billing.local")]))
            .unwrap_err()
            .contains("no URI SAN"));
        assert!(
            uri_san(&cert_with_sans(vec![uri("spiffe://a"), uri("spiffe://b")]))
                .unwrap_err()
                .contains("several")
        );
    }
}
