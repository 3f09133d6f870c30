//! TLS for `wss://`: the certificate chain and private key (PEM files named by `--tls-cert` and
//! `--tls-key`), loaded at start and re-read on SIGHUP.
//!
//! One rustls [`ServerConfig`] serves the whole broker; every shard
//! starts each accepted connection's TLS session from it. The certificate it presents comes
//! from [`TlsContext`]'s resolver, which holds the current certificate and key behind a lock
//! that is read once per TLS handshake (never per message). [`TlsContext::reload`] loads the
//! files again and swaps the pair only if the new one is complete and consistent: sessions
//! already running keep the keys they agreed on, new handshakes present the new certificate,
//! and a broken file leaves the old pair in place with an error that names the file.
//!
//! Protocol versions: TLS 1.3 and 1.2, rustls's safe defaults for cipher suites (with the
//! `ring` provider), in the broker's order of preference: AES-128-GCM first (see
//! `provider_preferring_aes_128`). No ALPN: a WebSocket upgrade is HTTP/1.1, which needs none. No client
//! certificates.

pub mod records;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, Error as TlsError, InconsistentKeys, ServerConfig};

/// Which record layer carries a TLS session's data once rustls finished its handshake
/// (`--tls-records`, docs/SECURITY.md "What TLS costs").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRecords {
    /// [`records`]: decrypted in place in the connection's buffer and sealed from the batch,
    /// with rustls's AEADs and key schedule (`in-place`, the default).
    InPlace,
    /// rustls's buffered `ServerConnection` does the records too (`rustls`).
    Rustls,
}

impl TlsRecords {
    pub fn parse(text: &str) -> Result<TlsRecords, String> {
        match text {
            "in-place" => Ok(TlsRecords::InPlace),
            "rustls" => Ok(TlsRecords::Rustls),
            _ => Err(format!("unknown TLS record layer \"{text}\": use in-place or rustls")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TlsRecords::InPlace => "in-place",
            TlsRecords::Rustls => "rustls",
        }
    }
}

/// The two PEM files TLS is served from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, the broker's own certificate first (`--tls-cert`).
    pub cert: PathBuf,
    /// The private key of that certificate: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) (`--tls-key`).
    pub key: PathBuf,
}

/// The broker's TLS settings: the files, the certificate currently presented, and the rustls
/// configuration every connection starts from. Shared by all shards and the signal thread.
pub struct TlsContext {
    files: TlsFiles,
    current: Arc<CurrentCertificate>,
    server_config: Arc<ServerConfig>,
}

impl fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsContext").field("files", &self.files).finish_non_exhaustive()
    }
}

impl TlsContext {
    /// Loads and checks the files; the error says which file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Arc<TlsContext>, String> {
        let provider = Arc::new(provider_preferring_aes_128());
        let certified = load_certified_key(&files, &provider)?;
        let current = Arc::new(CurrentCertificate(RwLock::new(Arc::new(certified))));
        let mut server_config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|error| format!("cannot set up TLS: {error}"))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        // The broker's order of cipher suites decides, not the client's (see
        // `provider_preferring_aes_128`).
        server_config.ignore_client_order = true;
        // The in-place record layer (`--tls-records in-place`, `records`) takes the traffic
        // secrets from rustls once the handshake is done; rustls hands them out only when asked
        // through `dangerous_into_kernel_connection`, which only that layer calls.
        server_config.enable_secret_extraction = true;
        Ok(Arc::new(TlsContext { files, current, server_config: Arc::new(server_config) }))
    }

    /// Reads the files again and presents the new certificate to every new handshake. On an
    /// error the certificate in use stays, and the error says why the new one was refused.
    pub fn reload(&self) -> Result<(), String> {
        let provider = self.server_config.crypto_provider().clone();
        let certified = load_certified_key(&self.files, &provider)?;
        *self.current.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(certified);
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration each new TLS session starts from.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config.clone()
    }
}

/// ring's provider with its cipher suites reordered: AES-128-GCM first, then AES-256-GCM, then
/// ChaCha20-Poly1305, in TLS 1.3 and in TLS 1.2. With `ignore_client_order` the broker picks
/// AES-128-GCM whenever the client offers it, as Go's crypto/tls (nats-server) does: 10 AES
/// rounds instead of 14 per block, the same GHASH, a 128-bit key (TLS 1.3's mandatory suite).
/// The set of suites is rustls's safe default, unchanged; only the order differs.
fn provider_preferring_aes_128() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    let rank = |suite: &rustls::SupportedCipherSuite| match suite.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    };
    // A stable sort: the version is negotiated first, then the first suite of that version in
    // this order that the client offers is chosen.
    provider.cipher_suites.sort_by_key(rank);
    provider
}

/// The certificate and key presented to new handshakes; replaced whole by a reload.
#[derive(Debug)]
struct CurrentCertificate(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

/// Reads the certificate chain and the key, and checks that the key belongs to the certificate.
fn load_certified_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let cert_pem = read_file(&files.cert, "certificate", "--tls-cert")?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<Vec<_>, _>>().map_err(|error| {
        format!("TLS certificate file {} (--tls-cert) is not valid PEM: {error}", show(&files.cert))
    })?;
    if chain.is_empty() {
        return Err(format!(
            "TLS certificate file {} (--tls-cert) holds no certificate (no \"-----BEGIN CERTIFICATE-----\" block); give \
             the PEM certificate chain, the broker's own certificate first",
            show(&files.cert)
        ));
    }
    let key_pem = read_file(&files.key, "private key", "--tls-key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| match error {
        pem::Error::NoItemsFound => format!(
            "TLS key file {} (--tls-key) holds no private key (no \"-----BEGIN PRIVATE KEY-----\", \"RSA PRIVATE KEY\" \
             or \"EC PRIVATE KEY\" block); give the PEM private key of the certificate",
            show(&files.key)
        ),
        error => format!("TLS key file {} (--tls-key) is not valid PEM: {error}", show(&files.key)),
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|error| match error {
        TlsError::InconsistentKeys(InconsistentKeys::KeyMismatch) => format!(
            "the private key in {} (--tls-key) does not match the certificate in {} (--tls-cert); give the key the \
             certificate was issued for",
            show(&files.key),
            show(&files.cert)
        ),
        error => {
            format!("cannot use the TLS key {} with the certificate {}: {error}", show(&files.key), show(&files.cert))
        }
    })
}

fn read_file(path: &Path, what: &str, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| {
        let problem = match error.kind() {
            io::ErrorKind::NotFound => "no such file".to_string(),
            io::ErrorKind::PermissionDenied => "permission denied (the broker cannot read it)".to_string(),
            _ => error.to_string(),
        };
        format!("cannot read the TLS {what} file {} ({flag}): {problem}", show(path))
    })
}

fn show(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::transport::tests::{certificate_files, handshake_in_memory};

    #[test]
    fn the_broker_chooses_aes_128_gcm_even_when_the_client_prefers_aes_256() {
        let dir = std::env::temp_dir().join(format!("mbws-tls-suite-test-{}", std::process::id()));
        let files = certificate_files(&dir);
        let cert = CertificateDer::from_pem_file(&files.cert).unwrap();
        let context = TlsContext::load(files).unwrap();
        let _ = std::fs::remove_dir_all(dir);
        // rustls's client lists AES-256-GCM first.
        for (version, expected) in [
            (&rustls::version::TLS13, CipherSuite::TLS13_AES_128_GCM_SHA256),
            (&rustls::version::TLS12, CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
        ] {
            let (_client, server) = handshake_in_memory(context.server_config(), &cert, version);
            assert_eq!(server.negotiated_cipher_suite().map(|suite| suite.suite()), Some(expected), "{version:?}");
        }
    }

    #[test]
    fn a_missing_file_is_named_with_its_flag() {
        let files = TlsFiles { cert: "/nonexistent/cert.pem".into(), key: "/nonexistent/key.pem".into() };
        let error = TlsContext::load(files).unwrap_err();
        assert!(error.contains("/nonexistent/cert.pem") && error.contains("--tls-cert"), "{error}");
        assert!(error.contains("no such file"), "{error}");
    }
}
