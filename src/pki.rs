//! Certificate and key material from PEM files, shared by every TLS user of the edge.
//!
//! The public listener (`pki::public`), the edge-to-edge client and server (`forward::tls`),
//! the JWT verification keys (`auth`) and the start-up checks (`preflight`) all read key
//! and certificate files through this module: each file is first checked to be a small regular
//! file, then parsed, and errors name the file. Names (DNS subject alternative names, the
//! subject CN) are read from certificates with `x509-parser`, never by hand.
//!
//! This module reads files and parses them; it opens no sockets. Its `public` submodule is the
//! public listener's certificate slot (rustls resolver, ALPN, reload); the edge-to-edge policy
//! (client authentication) is `forward::tls`.

pub mod public;

use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;

/// Largest key or certificate file the edge reads (real ones are a few KiB).
pub const MAX_KEY_FILE_BYTES: u64 = 1 << 20;

/// Checks that `path` is a regular file of at most [`MAX_KEY_FILE_BYTES`], so reading it can
/// neither block (a FIFO, a terminal) nor exhaust memory (`/dev/zero`).
pub fn check_small_file(path: &Path) -> Result<(), String> {
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !metadata.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if metadata.len() > MAX_KEY_FILE_BYTES {
        return Err(format!(
            "{} is larger than {MAX_KEY_FILE_BYTES} bytes",
            path.display()
        ));
    }
    Ok(())
}

/// Reads a small key or certificate file whole (see [`check_small_file`]).
pub fn read_small_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    check_small_file(path).map_err(anyhow::Error::msg)?;
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The crypto provider of every TLS configuration of the edge, chosen explicitly so that no
/// process-wide default provider has to be installed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// All certificates in a PEM file, which must contain at least one.
pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_small_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    ensure!(
        !certs.is_empty(),
        "no certificates found in {}",
        path.display()
    );
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = read_small_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .with_context(|| format!("reading private key from {}", path.display()))
}

/// The certificates of a CA file as a trust store.
pub fn load_roots(path: &Path) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .with_context(|| format!("adding CA certificate from {}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// A certificate chain (leaf first) and its key, loaded and checked to belong together.
pub fn load_certified_key(cert_file: &Path, key_file: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    CertifiedKey::from_der(chain, key, &provider()).with_context(|| {
        format!(
            "key {} does not fit certificate {}",
            key_file.display(),
            cert_file.display()
        )
    })
}

/// The names a certificate is issued to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateNames {
    /// The subject's common names, in order.
    pub common_names: Vec<String>,
    /// The DNS names of the subjectAltName extension, in order.
    pub dns: Vec<String>,
}

/// Reads the subject CN and the DNS subject alternative names of a DER certificate; `None` if
/// it does not parse (or its subjectAltName extension does not).
pub fn certificate_names(cert: &CertificateDer<'_>) -> Option<CertificateNames> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let common_names = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    let dns = match parsed.subject_alternative_name().ok()? {
        Some(extension) => extension
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    Some(CertificateNames { common_names, dns })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throwaway(names: &[&str]) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let generated = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("c.key"));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        (dir, cert, key)
    }

    #[test]
    fn names_are_read_from_the_subject_alternative_names() {
        let (_dir, cert, _) = throwaway(&["sg.edge.cartedge.internal", "localhost", "127.0.0.1"]);
        let leaf = load_certs(&cert).unwrap().swap_remove(0);
        let names = certificate_names(&leaf).unwrap();
        // The IP address is a SAN of another kind, not a DNS name.
        assert_eq!(names.dns, ["sg.edge.cartedge.internal", "localhost"]);
        // Truncated certificates never panic and never yield names.
        for len in 0..leaf.len() {
            assert_eq!(certificate_names(&CertificateDer::from(&leaf[..len])), None);
        }
    }

    #[test]
    fn a_certificate_and_its_key_load_together_and_a_stranger_key_does_not() {
        let (_one, cert, key) = throwaway(&["localhost"]);
        let (_two, _, other_key) = throwaway(&["localhost"]);
        assert!(load_certified_key(&cert, &key).is_ok());
        let error = load_certified_key(&cert, &other_key).unwrap_err();
        assert!(format!("{error:#}").contains("does not fit"), "{error:#}");
    }

    #[test]
    fn special_and_oversized_files_are_refused_before_reading() {
        let error = load_certs(Path::new("/dev/zero")).unwrap_err();
        assert!(
            format!("{error:#}").contains("not a regular file"),
            "{error:#}"
        );
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.pem");
        let file = std::fs::File::create(&big).unwrap();
        file.set_len(MAX_KEY_FILE_BYTES + 1).unwrap();
        let error = load_key(&big).unwrap_err();
        assert!(format!("{error:#}").contains("larger than"), "{error:#}");
        let error = load_certs(&dir.path().join("missing.pem")).unwrap_err();
        assert!(format!("{error:#}").contains("missing.pem"), "{error:#}");
    }
}
