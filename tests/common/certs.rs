//! Throwaway TLS certificates for the tests, made with the `openssl` command-line tool: a
//! self-signed end-entity certificate (not a CA: rustls refuses a CA certificate as a server's
//! own) for `localhost` and `127.0.0.1`, with its P-256 key, valid for one day.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate and key file pair.
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPair {
    pub fn cert_str(&self) -> &str {
        self.cert.to_str().unwrap()
    }

    pub fn key_str(&self) -> &str {
        self.key.to_str().unwrap()
    }

    /// The broker flags that serve this pair.
    pub fn flags(&self) -> [&str; 4] {
        ["--tls-cert", self.cert_str(), "--tls-key", self.key_str()]
    }
}

/// Makes `<name>.crt` and `<name>.key` in `dir`, subject CN=`name`.
pub fn make_certificate(dir: &Path, name: &str) -> CertPair {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let output = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", &format!("/CN={name}")])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl (apt-get install openssl) to make a test certificate");
    assert!(output.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&output.stderr));
    CertPair { cert, key }
}
