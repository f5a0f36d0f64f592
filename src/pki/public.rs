//! TLS on the public listener: the certificate the edge presents to shoppers, reloadable.
//!
//! The rustls configuration is built once; its certificate comes from a [`CertSlot`], a
//! resolver whose certified key is swapped whole by [`PublicTls::install`] (called by
//! `App::reload`). A connection that starts after a reload gets the new certificate,
//! connections already open keep theirs, and a certificate or key that does not load leaves the
//! running one in place. The two PEM files are read through `pki`; this module holds the
//! listener's policy (protocol versions, ALPN, no client certificates) and opens no sockets
//! (that is `server`).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::pki::{self, load_certified_key};

/// Offered in this order: HTTP/2 first, HTTP/1.1 for clients that cannot speak it.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The value of `Strict-Transport-Security` on every response served over TLS: browsers that
/// saw it once refuse plain HTTP to this host (and its subdomains) for a year.
pub const HSTS: &str = "max-age=31536000; includeSubDomains";

/// The public listener's certificate, swapped whole on reload.
pub struct CertSlot {
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSlot").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Everything the public listener needs for TLS: the swappable certificate and the rustls
/// configuration that presents it.
pub struct PublicTls {
    slot: Arc<CertSlot>,
    config: Arc<rustls::ServerConfig>,
}

impl PublicTls {
    /// Loads the certificate and key; TLS 1.2 and 1.3 only, ALPN `h2` then `http/1.1`, no
    /// client certificates.
    pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<PublicTls> {
        let slot = Arc::new(CertSlot {
            current: ArcSwap::from_pointee(load_certified_key(cert_file, key_file)?),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(pki::provider())
            .with_safe_default_protocol_versions()
            .context("selecting TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(slot.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(PublicTls {
            slot,
            config: Arc::new(config),
        })
    }

    /// The configuration new connections are accepted with.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    /// Makes `key` (from [`pki::load_certified_key`]) the certificate of every connection accepted
    /// from now on; connections already open keep theirs.
    pub fn install(&self, key: CertifiedKey) {
        self.slot.current.store(Arc::new(key));
    }
}
