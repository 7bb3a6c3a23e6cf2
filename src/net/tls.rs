//! TLS with rustls (ring provider): the acceptor for clients, built from `[server.tls]`
//! (with the optional check of client certificates against `ca`, and the CN a `cert` rule
//! compares with the user name), and the connector towards PostgreSQL, built from each
//! database's `server_tls`.
//!
//! Both are built when a config is turned into a running state (at startup and at every
//! reload), so a missing or unreadable file is reported then, with its path, and never
//! when a client or server connection is opened.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ChannelBindingMode, ClientTlsConfig, ClientTlsMode, ServerTlsConfig, ServerTlsMode};

/// The ALPN protocol name PostgreSQL 17 registered. Offered on both sides: a client or
/// server that offers no ALPN is unaffected, and one that insists on it (direct TLS
/// negotiation in PostgreSQL 17) finds it.
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Why TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsError {
    fn file(path: &Path, reason: impl fmt::Display) -> Self {
        TlsError::File {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Client-facing TLS: what to answer an `SSLRequest` with, and whether plaintext clients
/// are refused.
#[derive(Clone)]
pub struct ClientTls {
    acceptor: TlsAcceptor,
    required: bool,
    /// `tls-server-end-point` data of the certificate clients get, for SCRAM-SHA-256-PLUS;
    /// `None` when its signature algorithm defines none (see `auth::channel_binding`), or
    /// with `channel_binding = "disable"`.
    channel_binding: Option<Arc<[u8]>>,
    /// `ca` is set: clients are asked for a certificate, and one they present was checked
    /// against it during the handshake.
    checks_client_certificates: bool,
}

impl ClientTls {
    /// Reads the certificate chain and key of `[server.tls]`. `None` for `mode = "disable"`:
    /// `SSLRequest` is then answered 'N' and the files are not read.
    pub fn load(config: &ClientTlsConfig) -> Result<Option<ClientTls>, TlsError> {
        if config.mode == ClientTlsMode::Disable {
            return Ok(None);
        }
        let certs = read_certificates(&config.cert)?;
        // The certificate a client binds to is the first of the chain it receives.
        let channel_binding = match certs.first().map(|cert| crate::auth::tls_server_end_point(cert)) {
            // Behind a proxy that terminates or adds TLS, a client would bind to the proxy's
            // certificate and be refused: the operator turns the offer off.
            _ if config.channel_binding == ChannelBindingMode::Disable => None,
            Some(Ok(data)) => Some(Arc::from(data)),
            Some(Err(error)) => {
                tracing::warn!(cert = %config.cert.display(), %error,
                    "SCRAM-SHA-256-PLUS (channel binding) is not offered to TLS clients");
                None
            }
            None => None,
        };
        let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|error| match error {
            pem::Error::NoItemsFound => TlsError::file(&config.key, "no PEM private key found"),
            error => TlsError::file(&config.key, error),
        })?;
        let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let builder = match &config.ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certificates(ca)? {
                    roots.add(cert).map_err(|error| TlsError::file(ca, error))?;
                }
                // Clients without a certificate are let through the handshake: the address
                // rules decide whether their login needs one (`cert`) or a password. A
                // certificate that is presented must chain to `ca`, or the handshake fails,
                // as in PostgreSQL with `ssl_ca_file`.
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|error| TlsError::file(ca, error))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server_config = builder.with_single_cert(certs, key).map_err(|error| {
            TlsError::file(
                &config.key,
                format!("cannot be used with {}: {error}", config.cert.display()),
            )
        })?;
        server_config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        // An idle TLS client (1.3 or 1.2) is handed over at a takeover with its traffic keys
        // (`crate::net::record`); rustls gives them out only when this is set.
        server_config.enable_secret_extraction = true;
        Ok(Some(ClientTls {
            acceptor: TlsAcceptor::from(Arc::new(server_config)),
            required: config.mode == ClientTlsMode::Require,
            channel_binding,
            checks_client_certificates: config.ca.is_some(),
        }))
    }

    /// The `tls-server-end-point` channel binding data of pgrelay's certificate, if its
    /// signature algorithm defines one.
    pub fn channel_binding(&self) -> Option<&[u8]> {
        self.channel_binding.as_deref()
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// `mode = "require"`: clients that do not use TLS are refused.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Whether clients are asked for a certificate (`ca` is set).
    pub fn checks_client_certificates(&self) -> bool {
        self.checks_client_certificates
    }
}

/// Why a client certificate names no user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommonNameError {
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("client certificate contains no user name")]
    Missing,
    #[error("the certificate's common name is not a text string")]
    NotText,
    #[error("the certificate's common name contains embedded null")]
    EmbeddedNull,
}

/// The first common name (CN) of a certificate's subject, which a `cert` rule compares
/// with the user name, as PostgreSQL does without a user name map.
///
/// The certificate was verified during the handshake; this only reads it. Only the string
/// types a CN is written in (UTF8String, PrintableString, IA5String, TeletexString) are
/// read: PostgreSQL takes the raw bytes of the first CN, and a BMPString's or
/// UniversalString's bytes contain NULs, which it refuses, as this does.
pub fn certificate_common_name(cert: &CertificateDer<'_>) -> Result<String, CommonNameError> {
    use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, TeletexStringRef, Utf8StringRef};
    use x509_cert::der::{Decode, Tag, Tagged};

    let parsed = x509_cert::Certificate::from_der(cert.as_ref())
        .map_err(|error| CommonNameError::Unparsable(error.to_string()))?;
    let value = parsed
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == x509_cert::der::oid::db::rfc4519::CN)
        .map(|attribute| &attribute.value)
        .ok_or(CommonNameError::Missing)?;
    let text = match value.tag() {
        Tag::Utf8String => Utf8StringRef::try_from(value).map(|s| s.as_str().to_owned()),
        Tag::PrintableString => PrintableStringRef::try_from(value).map(|s| s.as_str().to_owned()),
        Tag::Ia5String => Ia5StringRef::try_from(value).map(|s| s.as_str().to_owned()),
        Tag::TeletexString => TeletexStringRef::try_from(value).map(|s| s.as_str().to_owned()),
        _ => return Err(CommonNameError::NotText),
    }
    .map_err(|_| CommonNameError::NotText)?;
    if text.contains('\0') {
        return Err(CommonNameError::EmbeddedNull);
    }
    if text.is_empty() {
        return Err(CommonNameError::Missing);
    }
    Ok(text)
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("required", &self.required)
            .field("channel_binding", &self.channel_binding.is_some())
            .field("checks_client_certificates", &self.checks_client_certificates)
            .finish()
    }
}

/// TLS towards the servers of one database, with libpq's `sslmode` meanings.
pub struct ServerTls {
    config: ServerTlsConfig,
    /// `None` for `disable`.
    connector: Option<TlsConnector>,
}

impl ServerTls {
    /// Builds the connector; for `verify-full` reads the CA file.
    pub fn build(config: &ServerTlsConfig) -> Result<ServerTls, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let client_config = match (config.mode, &config.ca) {
            (ServerTlsMode::Disable, _) => None,
            (ServerTlsMode::VerifyFull, Some(ca)) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certificates(ca)? {
                    roots.add(cert).map_err(|error| TlsError::file(ca, error))?;
                }
                Some(builder.with_root_certificates(roots).with_no_client_auth())
            }
            // Validation makes `ca` required for verify-full; should it be missing anyway,
            // refusing every connection is the safe reading.
            (ServerTlsMode::VerifyFull, None) => Some(
                builder
                    .with_root_certificates(RootCertStore::empty())
                    .with_no_client_auth(),
            ),
            // libpq's prefer and require encrypt but do not authenticate the server.
            (ServerTlsMode::Prefer | ServerTlsMode::Require, _) => Some(
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCertificate::new()))
                    .with_no_client_auth(),
            ),
        };
        Ok(ServerTls {
            config: config.clone(),
            connector: client_config.map(|mut client_config| {
                client_config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
                // A takeover hands a server connection over with its traffic keys
                // (`crate::net::apart`).
                client_config.enable_secret_extraction = true;
                TlsConnector::from(Arc::new(client_config))
            }),
        })
    }

    /// Plain TCP, whatever the server offers.
    pub fn disabled() -> ServerTls {
        ServerTls {
            config: ServerTlsConfig {
                mode: ServerTlsMode::Disable,
                ca: None,
            },
            connector: None,
        }
    }

    pub fn mode(&self) -> ServerTlsMode {
        self.config.mode
    }

    /// The settings this was built from (a reload compares them).
    pub fn config(&self) -> &ServerTlsConfig {
        &self.config
    }

    /// `None` for `disable`.
    pub fn connector(&self) -> Option<&TlsConnector> {
        self.connector.as_ref()
    }

    /// The name a `host:port` address is checked against (`verify-full`), and sent as SNI
    /// when it is a DNS name.
    pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
        let host = match addr.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => addr,
        };
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        ServerName::try_from(host.to_owned()).map_err(|error| format!("invalid server name \"{host}\": {error}"))
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").field("config", &self.config).finish()
    }
}

/// Every certificate of a PEM file, in order (leaf first for a chain).
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|error| TlsError::file(path, error))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::file(path, error))?;
    if certs.is_empty() {
        return Err(TlsError::file(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// Accepts any server certificate (libpq's `sslmode=prefer` and `require`), but still
/// checks the handshake signatures, so the session keys belong to whoever holds the
/// certificate's key: the connection is encrypted, only not authenticated.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AnyCertificate {
    fn new() -> Self {
        AnyCertificate {
            algorithms: ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_from_addresses() {
        let name = |addr: &str| ServerTls::server_name(addr).map(|name| name.to_str().into_owned());
        assert_eq!(name("db.example.com:5432").as_deref(), Ok("db.example.com"));
        assert_eq!(name("127.0.0.1:5432").as_deref(), Ok("127.0.0.1"));
        assert_eq!(name("[::1]:5432").as_deref(), Ok("::1"));
        assert_eq!(name("localhost").as_deref(), Ok("localhost"));
        assert!(name("bad name:5432").is_err());
    }

    #[test]
    fn missing_files_are_reported_with_their_path() {
        let config = ClientTlsConfig {
            cert: PathBuf::from("/nonexistent/server.crt"),
            key: PathBuf::from("/nonexistent/server.key"),
            mode: ClientTlsMode::Require,
            channel_binding: ChannelBindingMode::Offer,
            ca: None,
        };
        let error = ClientTls::load(&config).map(|_| ()).map_err(|e| e.to_string());
        assert!(
            matches!(&error, Err(message) if message.starts_with("/nonexistent/server.crt: ")),
            "{error:?}"
        );
        let disabled = ClientTlsConfig {
            mode: ClientTlsMode::Disable,
            ..config
        };
        assert!(matches!(ClientTls::load(&disabled), Ok(None)));
        let server = ServerTls::build(&ServerTlsConfig {
            mode: ServerTlsMode::VerifyFull,
            ca: Some(PathBuf::from("/nonexistent/root.crt")),
        })
        .map(|_| ())
        .map_err(|e| e.to_string());
        assert!(
            matches!(&server, Err(message) if message.starts_with("/nonexistent/root.crt: ")),
            "{server:?}"
        );
    }

    fn certificate(subject: &[(rcgen::DnType, rcgen::DnValue)]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in subject {
            params.distinguished_name.push(kind.clone(), value.clone());
        }
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn the_common_name_is_read_from_the_subject() {
        use rcgen::{DnType, DnValue};
        let cn = |subject: &[(DnType, DnValue)]| certificate_common_name(&certificate(subject));
        assert_eq!(
            cn(&[
                (DnType::OrganizationName, "Example".into()),
                (DnType::CommonName, "app".into())
            ]),
            Ok("app".to_owned())
        );
        assert_eq!(
            cn(&[(DnType::CommonName, "zoë smith".into())]),
            Ok("zoë smith".to_owned())
        );
        let printable = rcgen::string::PrintableString::try_from("report").unwrap();
        assert_eq!(
            cn(&[(DnType::CommonName, DnValue::PrintableString(printable))]),
            Ok("report".to_owned())
        );
        let ia5 = rcgen::string::Ia5String::try_from("batch").unwrap();
        assert_eq!(
            cn(&[(DnType::CommonName, DnValue::Ia5String(ia5))]),
            Ok("batch".to_owned())
        );
        assert_eq!(
            cn(&[(DnType::OrganizationName, "Example".into())]),
            Err(CommonNameError::Missing)
        );
        assert_eq!(cn(&[(DnType::CommonName, "".into())]), Err(CommonNameError::Missing));
        assert_eq!(
            cn(&[(DnType::CommonName, "app\0admin".into())]),
            Err(CommonNameError::EmbeddedNull)
        );
        let bmp = rcgen::string::BmpString::try_from("app").unwrap();
        assert_eq!(
            cn(&[(DnType::CommonName, DnValue::BmpString(bmp))]),
            Err(CommonNameError::NotText)
        );
        assert!(matches!(
            certificate_common_name(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])),
            Err(CommonNameError::Unparsable(_))
        ));
    }

    #[test]
    fn a_missing_client_ca_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("server.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        let mut config = ClientTlsConfig {
            cert: dir.path().join("server.crt"),
            key: dir.path().join("server.key"),
            mode: ClientTlsMode::Allow,
            channel_binding: ChannelBindingMode::Offer,
            ca: None,
        };
        let tls = ClientTls::load(&config).unwrap().unwrap();
        assert!(!tls.checks_client_certificates());
        config.ca = Some(dir.path().join("server.crt"));
        let tls = ClientTls::load(&config).unwrap().unwrap();
        assert!(tls.checks_client_certificates());
        config.ca = Some(PathBuf::from("/nonexistent/client-ca.crt"));
        let error = ClientTls::load(&config).map(|_| ()).map_err(|e| e.to_string());
        assert!(
            matches!(&error, Err(message) if message.starts_with("/nonexistent/client-ca.crt: ")),
            "{error:?}"
        );
    }

    #[test]
    fn empty_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let config = ClientTlsConfig {
            cert: empty.clone(),
            key: empty.clone(),
            mode: ClientTlsMode::Allow,
            channel_binding: ChannelBindingMode::Offer,
            ca: None,
        };
        let error = ClientTls::load(&config).map(|_| ()).map_err(|e| e.to_string());
        assert!(
            matches!(&error, Err(message) if message.ends_with("no PEM certificate found")),
            "{error:?}"
        );
    }
}
