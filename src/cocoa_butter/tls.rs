//! TLS material from the configuration: PEM certificates and keys read and
//! checked at start, so a missing or malformed file refuses start-up with
//! the key that named it instead of failing at the first handshake.
//!
//! Two users: the NATS client (`[nats.tls]`; async-nats reads the files
//! itself, this module only checks them first) and the rooms' HTTP and gRPC
//! listeners (`[tls]`; served from the [`ServerTls`] built here). The crypto
//! is rustls with the *ring* provider, the one async-nats already uses.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// A client that opens a connection and never finishes the handshake must
/// not hold a task and a socket for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {reason}")]
    Unreadable {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{key}: {path} holds no PEM certificate")]
    NoCertificate { key: &'static str, path: PathBuf },
    #[error("{key}: {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { key: &'static str, path: PathBuf },
    #[error("{key}: {path}: {reason}")]
    Malformed {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{key}: {reason}")]
    Rejected { key: &'static str, reason: String },
}

/// The process-wide rustls provider. Named explicitly rather than taken
/// from crate features, so a dependency that enables a second provider
/// cannot make building a config ambiguous.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs *ring* as the process default, for libraries that build their
/// own rustls configs from it (tonic's TLS acceptor). Idempotent.
pub fn install_default_provider() {
    // Err means a default is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| TlsError::Unreadable {
        key,
        path: path.to_path_buf(),
        reason: err.to_string(),
    })
}

/// Every certificate of a PEM file, at least one.
pub fn load_certs(
    key: &'static str,
    path: &Path,
) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), TlsError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Malformed {
            key,
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_path_buf(),
        });
    }
    Ok((bytes, certs))
}

/// The first private key of a PEM file. The parser's own message is not
/// repeated: for a damaged key file it could quote part of the key.
pub fn load_key(
    key: &'static str,
    path: &Path,
) -> Result<(Vec<u8>, PrivateKeyDer<'static>), TlsError> {
    let bytes = read(key, path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(private) => Ok((bytes, private)),
        Err(pem::Error::NoItemsFound) => Err(TlsError::NoKey {
            key,
            path: path.to_path_buf(),
        }),
        Err(_) => Err(TlsError::Malformed {
            key,
            path: path.to_path_buf(),
            reason: "not a valid PEM private key".into(),
        }),
    }
}

/// A CA file as trust anchors.
pub fn load_roots(key: &'static str, path: &Path) -> Result<(Vec<u8>, RootCertStore), TlsError> {
    let (bytes, certs) = load_certs(key, path)?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|err| TlsError::Malformed {
            key,
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {err}"),
        })?;
    }
    Ok((bytes, roots))
}

/// Where a listener's or a client's certificate, key and CA come from,
/// with the configuration keys that named them (for error messages).
#[derive(Debug, Clone, Copy)]
pub struct Keys {
    pub cert: &'static str,
    pub key: &'static str,
    pub ca: &'static str,
}

/// Checks what async-nats will load for the NATS connection: the CA parses
/// into trust anchors and the client certificate matches its key.
pub fn check_client_files(
    keys: Keys,
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<(), TlsError> {
    let roots = match ca {
        Some(path) => load_roots(keys.ca, path)?.1,
        None => RootCertStore::empty(),
    };
    if let Some((cert, key)) = identity {
        let (_, chain) = load_certs(keys.cert, cert)?;
        let (_, private) = load_key(keys.key, key)?;
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsError::Rejected {
                key: keys.cert,
                reason: err.to_string(),
            })?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(|err| TlsError::Rejected {
                key: keys.key,
                reason: format!("does not go with {}: {err}", keys.cert),
            })?;
    }
    Ok(())
}

/// TLS for the rooms' HTTP and gRPC listeners, loaded once at start.
#[derive(Clone)]
pub struct ServerTls {
    http: Arc<ServerConfig>,
    grpc: tonic::transport::ServerTlsConfig,
    mutual: bool,
}

impl fmt::Debug for ServerTls {
    // The configs hold the private key: show only what is not secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.mutual)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the listener certificate chain and key, and with `client_ca`
    /// requires every client to present a certificate that CA signed.
    pub fn load(
        keys: Keys,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let (cert_pem, chain) = load_certs(keys.cert, cert)?;
        let (key_pem, private) = load_key(keys.key, key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsError::Rejected {
                key: keys.cert,
                reason: err.to_string(),
            })?;
        let mut grpc = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&cert_pem, &key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        let builder = match client_ca {
            Some(path) => {
                let (ca_pem, roots) = load_roots(keys.ca, path)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|err| TlsError::Rejected {
                            key: keys.ca,
                            reason: err.to_string(),
                        })?;
                grpc = grpc.client_ca_root(tonic::transport::Certificate::from_pem(ca_pem));
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut http =
            builder
                .with_single_cert(chain, private)
                .map_err(|err| TlsError::Rejected {
                    key: keys.key,
                    reason: format!("does not go with {}: {err}", keys.cert),
                })?;
        // Only HTTP/1.1 is offered: axum is built without its http2
        // feature, so whether h2 would be served depends on what other
        // crates happen to enable in hyper-util. gRPC has its own config.
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            http: Arc::new(http),
            grpc,
            mutual: client_ca.is_some(),
        })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.mutual
    }

    /// For tonic's server builder.
    pub fn grpc_config(&self) -> tonic::transport::ServerTlsConfig {
        self.grpc.clone()
    }

    /// The TLS handshake on an accepted connection, bounded by
    /// `HANDSHAKE_TIMEOUT`.
    pub async fn handshake<IO>(
        &self,
        io: IO,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let acceptor = TlsAcceptor::from(self.http.clone());
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}
