//! Mutual TLS between edges.
//!
//! Edges forward writes to each other over HTTP/2, and both ends must prove they are an edge
//! of *this* cluster, so every connection is mutually authenticated against one private CA.
//! This module owns the certificate policy for that: it generates the local cluster's CA and
//! one certificate per edge (used by the local launcher), it builds the rustls server and
//! client configurations (PEM files are read through `pki`), and it names the edge behind a
//! verified client certificate.
//!
//! It deliberately does no I/O besides reading and writing those files; it never opens sockets
//! (only the tests do, on 127.0.0.1), so connection handling stays in the forwarding client
//! and the server.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::pki::{load_certs, load_key, load_roots, provider};

/// DNS suffix of every edge's name in its certificate; `<name>` + this is what clients dial.
pub const EDGE_DNS_SUFFIX: &str = ".edge.cartedge.internal";
/// Subject CN of the local CA. The CA is re-created from these parameters when it is reused
/// (rcgen cannot parse `ca.pem` without its `x509-parser` feature), so it must never change.
const CA_COMMON_NAME: &str = "cartedge local CA";
/// The CA outlives many leaf rotations: 10 years (in days, with leap days).
const CA_LIFETIME: Duration = Duration::from_secs(3653 * 24 * 60 * 60);
/// Leaf certificates are valid for one year.
const LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Certificates are back-dated a little so a peer whose clock is slightly behind accepts them.
const CLOCK_SKEW: Duration = Duration::from_secs(60 * 60);
/// Edge-to-edge traffic is HTTP/2 only; the server also offers HTTP/1.1 for debugging tools.
const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
const CLIENT_ALPN: [&[u8]; 1] = [b"h2"];

/// Files written by `generate_local_pki`: `<dir>/ca.pem`, `<dir>/ca.key`, and for each edge
/// name `<dir>/<name>.pem` (leaf cert followed by nothing else) and `<dir>/<name>.key`
/// (PKCS#8), keys mode 0600.
///
/// The leaf file holds no chain because every edge trusts the CA directly; keys are 0600 so
/// only the launching user can read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeFiles {
    /// PEM file with the edge's leaf certificate only.
    pub cert: PathBuf,
    /// PEM file with the edge's PKCS#8 private key (mode 0600).
    pub key: PathBuf,
}

/// Creates a private CA (ECDSA P-256, CN "cartedge local CA", valid 10 years, basicConstraints
/// CA) and for each edge name a leaf cert signed by it: ECDSA P-256, CN = name, SANs: DNS
/// `<name>.edge.cartedge.internal`, DNS `localhost`, IP 127.0.0.1; EKUs serverAuth +
/// clientAuth; validity 1 year.
///
/// Idempotent, because the launcher runs it on every start and edges that are already running
/// must keep trusting each other: if `ca.pem`/`ca.key` exist the CA is reused (its key is
/// loaded with rcgen from `ca.key` and its parameters are rebuilt, then checked against
/// `ca.pem`), and only missing leaf files are created. An existing leaf that no longer
/// verifies against the CA (expired, issued by another CA, key not matching the certificate)
/// is re-issued with a warning. If only one of `ca.pem`/`ca.key` exists this fails rather than
/// replacing the CA. Edge names must be lowercase DNS labels (`[a-z0-9-]`, not `ca`).
///
/// Returns the files of every requested edge, in the order given. Not safe against two
/// processes generating into the same directory at the same time.
pub fn generate_local_pki(dir: &Path, edges: &[&str]) -> anyhow::Result<Vec<(String, EdgeFiles)>> {
    for name in edges {
        validate_edge_name(name)?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating PKI directory {}", dir.display()))?;

    let ca_cert_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let ca = load_or_create_ca(&ca_cert_path, &ca_key_path)?;
    let verifiers = LeafVerifiers::new(&ca_cert_path)?;

    let mut out = Vec::with_capacity(edges.len());
    for name in edges {
        let files = EdgeFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        let needs_issue = if files.cert.exists() && files.key.exists() {
            match verifiers.check(name, &files) {
                Ok(()) => false,
                Err(reason) => {
                    tracing::warn!(edge = %name, cert = %files.cert.display(), reason = %format!("{reason:#}"), "re-issuing unusable edge certificate");
                    true
                }
            }
        } else {
            true
        };
        if needs_issue {
            issue_leaf(&ca, name, &files)?;
            verifiers.check(name, &files).with_context(|| {
                format!(
                    "freshly issued certificate {} does not verify against {}; was ca.pem/ca.key created by another tool?",
                    files.cert.display(),
                    ca_cert_path.display()
                )
            })?;
            tracing::info!(edge = %name, cert = %files.cert.display(), "issued edge certificate");
        }
        out.push((name.to_string(), files));
    }
    Ok(out)
}

/// Server side: presents cert/key, REQUIRES a client cert chaining to `client_ca` (rustls
/// WebPkiClientVerifier), TLS 1.2+ (rustls default versions), ALPN ["h2", "http/1.1"],
/// aws-lc-rs provider explicitly (rustls::crypto::aws_lc_rs::default_provider()) so no
/// process-wide default provider is needed.
///
/// Client certificates are mandatory because only edges of this cluster may forward writes.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = provider();
    let roots = load_roots(client_ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .with_context(|| format!("building client verifier from {}", client_ca.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("selecting TLS protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .with_context(|| {
            format!(
                "using certificate {} with key {}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Client side: trusts only `ca` (not the system roots), presents cert/key as client auth,
/// ALPN ["h2"].
///
/// Only the private CA is trusted so that a forwarded write can never reach anything but an
/// edge of this cluster.
pub fn client_config(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("selecting TLS protocol versions")?
        .with_root_certificates(load_roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .with_context(|| {
            format!(
                "using client certificate {} with key {}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = CLIENT_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The peer edge's name, so the server can attribute a forwarded write to its source region.
///
/// This is the first DNS subject alternative name of the client certificate ending in
/// `.edge.cartedge.internal`, with that suffix stripped (names are read by `pki`, with
/// `x509-parser`), confirmed with rustls' own (webpki) name check; it must be a valid edge
/// name. The CN carries the same name in certificates from [`generate_local_pki`], but SANs are
/// what clients verify, so they are what counts.
///
/// Returns `None` before the handshake completes, or if the certificate names no edge. The
/// chain itself was already verified against the CA by the server's client verifier.
pub fn peer_edge_name(connection: &rustls::ServerConnection) -> Option<String> {
    edge_name_from_cert(connection.peer_certificates()?.first()?)
}

/// The server name a client uses to reach edge `name`: `<name>.edge.cartedge.internal`.
///
/// This (not `localhost` or an IP) is what clients verify, so a connection can only succeed if
/// the peer holds the certificate of the edge it meant to reach.
///
/// # Panics
///
/// If `name` does not form a valid DNS name (e.g. contains spaces); names accepted by
/// [`generate_local_pki`] always do.
pub fn edge_server_name(name: &str) -> ServerName<'static> {
    ServerName::try_from(format!("{name}{EDGE_DNS_SUFFIX}"))
        .unwrap_or_else(|_| panic!("edge name {name:?} does not form a valid DNS name"))
}

/// Edge names end up in DNS names and file names, so they are restricted to lowercase DNS
/// labels; `ca` is reserved for the CA's own files.
fn validate_edge_name(name: &str) -> anyhow::Result<()> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ensure!(
        !name.is_empty()
            && name.len() <= 63
            && valid_chars
            && !name.starts_with('-')
            && !name.ends_with('-'),
        "invalid edge name {name:?}: must be 1-63 characters of [a-z0-9-], not starting or ending with '-'"
    );
    ensure!(
        name != "ca",
        "invalid edge name \"ca\": reserved for the CA files"
    );
    Ok(())
}

/// Sets `not_before` to now minus [`CLOCK_SKEW`] and `not_after` to now plus `lifetime`.
///
/// Built from the Unix epoch plus a `std` duration because the `time` crate used by rcgen is
/// not a direct dependency of this crate.
fn set_validity(params: &mut CertificateParams, lifetime: Duration) -> anyhow::Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock is before 1970")?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(CLOCK_SKEW);
    params.not_after = epoch + now + lifetime;
    Ok(())
}

/// The CA's parameters. Also used to rebuild the issuer of an existing CA, so everything the
/// issuer needs (subject DN, key identifier method, key usages) must be deterministic.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    // Path length 0: the CA signs edge certificates directly, never intermediates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn load_or_create_ca(
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<Issuer<'static, KeyPair>> {
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => load_ca(cert_path, key_path),
        (false, false) => create_ca(cert_path, key_path),
        (cert_exists, _) => {
            let (present, missing) = if cert_exists {
                (cert_path, key_path)
            } else {
                (key_path, cert_path)
            };
            bail!(
                "{} exists but {} is missing; refusing to replace the CA (edges would stop trusting each other). Remove both to start over",
                present.display(),
                missing.display()
            )
        }
    }
}

/// Reuses an existing CA: the key comes from `ca.key`, the issuer parameters from
/// [`ca_params`], and the key must match the public key in `ca.pem`.
fn load_ca(cert_path: &Path, key_path: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let key_pem = fs::read_to_string(key_path)
        .with_context(|| format!("reading CA key {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("parsing CA key {}", key_path.display()))?;
    let ca_cert = load_certs(cert_path)
        .with_context(|| format!("reading CA certificate {}", cert_path.display()))?
        .swap_remove(0);
    let parsed = ParsedCertificate::try_from(&ca_cert)
        .with_context(|| format!("parsing CA certificate {}", cert_path.display()))?;
    ensure!(
        parsed.subject_public_key_info().as_ref() == key.subject_public_key_info().as_slice(),
        "CA key {} does not belong to CA certificate {}",
        key_path.display(),
        cert_path.display()
    );
    tracing::debug!(ca = %cert_path.display(), "reusing local CA");
    Ok(Issuer::new(ca_params(), key))
}

fn create_ca(cert_path: &Path, key_path: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating CA key")?;
    let mut params = ca_params();
    set_validity(&mut params, CA_LIFETIME)?;
    let cert = params
        .self_signed(&key)
        .context("self-signing CA certificate")?;
    // Key first: a CA certificate without its key would make the next run refuse to continue.
    write_file(key_path, key.serialize_pem().as_bytes(), true)?;
    write_file(cert_path, cert.pem().as_bytes(), false)?;
    tracing::info!(ca = %cert_path.display(), "created local CA");
    Ok(Issuer::new(params, key))
}

fn issue_leaf(ca: &Issuer<'_, KeyPair>, name: &str, files: &EdgeFiles) -> anyhow::Result<()> {
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating edge key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![
        SanType::DnsName(
            format!("{name}{EDGE_DNS_SUFFIX}")
                .try_into()
                .context("edge DNS name")?,
        ),
        SanType::DnsName("localhost".try_into().context("localhost DNS name")?),
        SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    ];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_LIFETIME)?;
    let cert = params
        .signed_by(&key, ca)
        .with_context(|| format!("signing certificate for edge {name}"))?;
    write_file(&files.key, key.serialize_pem().as_bytes(), true)?;
    write_file(&files.cert, cert.pem().as_bytes(), false)?;
    Ok(())
}

/// Writes `contents` to `path` via a temporary file and a rename, so readers never see a
/// partially written file; `secret` files are created with mode 0600 (on Unix).
fn write_file(path: &Path, contents: &[u8], secret: bool) -> anyhow::Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);

    let write = || -> io::Result<()> {
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            options.mode(if secret { 0o600 } else { 0o644 });
            let mut file = options.open(&tmp)?;
            // The umask may only remove bits, but make the mode exact regardless.
            file.set_permissions(fs::Permissions::from_mode(if secret {
                0o600
            } else {
                0o644
            }))?;
            file.write_all(contents)?;
            file.sync_all()?;
        }
        #[cfg(not(unix))]
        {
            let _ = secret;
            let mut file = options.open(&tmp)?;
            file.write_all(contents)?;
            file.sync_all()?;
        }
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("writing {}", path.display()))
    })
}

/// Checks that an edge's files are usable: the certificate chains to the CA for both server
/// and client use, is valid now and for the edge's DNS name, and the key matches it.
struct LeafVerifiers {
    server: Arc<WebPkiServerVerifier>,
    client: Arc<dyn ClientCertVerifier>,
}

impl LeafVerifiers {
    fn new(ca: &Path) -> anyhow::Result<Self> {
        let roots = load_roots(ca)?;
        let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .with_context(|| format!("building verifier from {}", ca.display()))?;
        let client = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .with_context(|| format!("building verifier from {}", ca.display()))?;
        Ok(Self { server, client })
    }

    fn check(&self, name: &str, files: &EdgeFiles) -> anyhow::Result<()> {
        let cert = load_certs(&files.cert)?.swap_remove(0);
        let now = UnixTime::now();
        self.server
            .verify_server_cert(&cert, &[], &edge_server_name(name), &[], now)
            .with_context(|| format!("{} as a server certificate", files.cert.display()))?;
        self.client
            .verify_client_cert(&cert, &[], now)
            .with_context(|| format!("{} as a client certificate", files.cert.display()))?;
        let key_pem = fs::read_to_string(&files.key)
            .with_context(|| format!("reading key {}", files.key.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("parsing key {}", files.key.display()))?;
        let parsed = ParsedCertificate::try_from(&cert)
            .with_context(|| format!("parsing {}", files.cert.display()))?;
        ensure!(
            parsed.subject_public_key_info().as_ref() == key.subject_public_key_info().as_slice(),
            "key {} does not belong to certificate {}",
            files.key.display(),
            files.cert.display()
        );
        Ok(())
    }
}

/// The edge names a certificate is issued to: its DNS subject alternative names ending in
/// [`EDGE_DNS_SUFFIX`], suffix stripped, lowercase, each a valid edge name; `None` if the
/// certificate cannot be read.
pub fn edge_names(cert: &CertificateDer<'_>) -> Option<Vec<String>> {
    let names = crate::pki::certificate_names(cert)?;
    Some(
        names
            .dns
            .iter()
            .filter_map(|dns| {
                let split = dns.len().checked_sub(EDGE_DNS_SUFFIX.len())?;
                let suffix = dns.get(split..)?;
                if split == 0 || !suffix.eq_ignore_ascii_case(EDGE_DNS_SUFFIX) {
                    return None;
                }
                let name = dns[..split].to_ascii_lowercase();
                validate_edge_name(&name).ok()?;
                Some(name)
            })
            .collect(),
    )
}

/// The edge name in a certificate, see [`peer_edge_name`].
fn edge_name_from_cert(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = ParsedCertificate::try_from(cert).ok()?;
    edge_names(cert)?
        .into_iter()
        .find(|name| rustls::client::verify_server_name(&parsed, &edge_server_name(name)).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// What the server saw of one connection: negotiated ALPN and peer edge name.
    type ServerSide = io::Result<(Option<Vec<u8>>, Option<String>)>;
    /// What the client saw: negotiated ALPN and the server's reply.
    type ClientSide = io::Result<(Option<Vec<u8>>, Vec<u8>)>;

    fn files_of<'a>(generated: &'a [(String, EdgeFiles)], name: &str) -> &'a EdgeFiles {
        &generated.iter().find(|(n, _)| n == name).unwrap().1
    }

    fn server_of(dir: &Path, files: &EdgeFiles) -> rustls::ServerConfig {
        server_config(&files.cert, &files.key, &dir.join("ca.pem")).unwrap()
    }

    fn client_of(dir: &Path, files: &EdgeFiles) -> rustls::ClientConfig {
        client_config(&files.cert, &files.key, &dir.join("ca.pem")).unwrap()
    }

    /// One connection on 127.0.0.1: the client sends "hello", the server answers "world".
    async fn exchange(
        server: rustls::ServerConfig,
        client: rustls::ClientConfig,
        server_name: ServerName<'static>,
    ) -> (ServerSide, ClientSide) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let server_task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            let conn = tls.get_ref().1;
            let seen = (
                conn.alpn_protocol().map(<[u8]>::to_vec),
                peer_edge_name(conn),
            );
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"hello");
            tls.write_all(b"world").await?;
            tls.shutdown().await?;
            Ok(seen)
        });
        let client_side: ClientSide = tokio::time::timeout(TIMEOUT, async {
            let tcp = TcpStream::connect(addr).await?;
            let mut tls = TlsConnector::from(Arc::new(client))
                .connect(server_name, tcp)
                .await?;
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            tls.write_all(b"hello").await?;
            tls.flush().await?;
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await?;
            Ok((alpn, buf.to_vec()))
        })
        .await
        .expect("client timed out");
        let server_side = tokio::time::timeout(TIMEOUT, server_task)
            .await
            .expect("server timed out")
            .unwrap();
        (server_side, client_side)
    }

    #[tokio::test]
    async fn mutual_tls_handshake_between_edges() {
        let dir = tempfile::tempdir().unwrap();
        let edges = generate_local_pki(dir.path(), &["sg", "th"]).unwrap();
        assert_eq!(
            edges.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["sg", "th"]
        );
        let sg = files_of(&edges, "sg");
        assert_eq!(sg.cert, dir.path().join("sg.pem"));
        assert_eq!(sg.key, dir.path().join("sg.key"));
        // Leaf file holds the leaf only.
        assert_eq!(load_certs(&sg.cert).unwrap().len(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in ["ca.key", "sg.key", "th.key"] {
                let mode = fs::metadata(dir.path().join(key))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{key}");
            }
        }

        let (server, client) = exchange(
            server_of(dir.path(), sg),
            client_of(dir.path(), files_of(&edges, "th")),
            edge_server_name("sg"),
        )
        .await;
        let (client_alpn, reply) = client.expect("client side failed");
        assert_eq!(client_alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(reply, b"world");
        let (server_alpn, peer) = server.expect("server side failed");
        assert_eq!(server_alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(peer.as_deref(), Some("th"));
    }

    #[tokio::test]
    async fn client_without_certificate_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let edges = generate_local_pki(dir.path(), &["sg"]).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(load_roots(&dir.path().join("ca.pem")).unwrap())
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        let (server, client) = exchange(
            server_of(dir.path(), files_of(&edges, "sg")),
            client,
            edge_server_name("sg"),
        )
        .await;
        assert!(
            server.is_err(),
            "server accepted a client without certificate"
        );
        assert!(
            client.is_err(),
            "client exchanged data without a certificate"
        );
    }

    #[tokio::test]
    async fn client_certificate_from_another_ca_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let edges = generate_local_pki(dir.path(), &["sg"]).unwrap();
        let foreign = generate_local_pki(other.path(), &["th"]).unwrap();
        assert_ne!(
            fs::read(dir.path().join("ca.pem")).unwrap(),
            fs::read(other.path().join("ca.pem")).unwrap()
        );
        // Trusts the right CA, but presents a certificate issued by the other one.
        let th = files_of(&foreign, "th");
        let client = client_config(&th.cert, &th.key, &dir.path().join("ca.pem")).unwrap();
        let (server, client) = exchange(
            server_of(dir.path(), files_of(&edges, "sg")),
            client,
            edge_server_name("sg"),
        )
        .await;
        let err = server.expect_err("server accepted a certificate from another CA");
        // Both CAs share the subject DN, so webpki finds a name match and rejects the
        // signature (BadSignature) rather than reporting UnknownIssuer.
        assert!(
            format!("{err}").contains("invalid peer certificate"),
            "{err}"
        );
        assert!(client.is_err());
    }

    #[tokio::test]
    async fn regeneration_keeps_ca_and_adds_edges() {
        let dir = tempfile::tempdir().unwrap();
        generate_local_pki(dir.path(), &["sg"]).unwrap();
        let ca_before = fs::read(dir.path().join("ca.pem")).unwrap();
        let ca_key_before = fs::read(dir.path().join("ca.key")).unwrap();
        let sg_before = fs::read(dir.path().join("sg.pem")).unwrap();

        let edges = generate_local_pki(dir.path(), &["sg", "th"]).unwrap();
        assert_eq!(fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        assert_eq!(fs::read(dir.path().join("ca.key")).unwrap(), ca_key_before);
        assert_eq!(fs::read(dir.path().join("sg.pem")).unwrap(), sg_before);

        // The later edge's certificate verifies against the original CA...
        let verifiers = LeafVerifiers::new(&dir.path().join("ca.pem")).unwrap();
        verifiers.check("th", files_of(&edges, "th")).unwrap();
        // ...and both directions of a real handshake work.
        for (server, client) in [("sg", "th"), ("th", "sg")] {
            let (server_side, client_side) = exchange(
                server_of(dir.path(), files_of(&edges, server)),
                client_of(dir.path(), files_of(&edges, client)),
                edge_server_name(server),
            )
            .await;
            assert_eq!(client_side.unwrap().1, b"world");
            assert_eq!(server_side.unwrap().1.as_deref(), Some(client));
        }
    }

    #[test]
    fn unusable_leaf_is_reissued_and_half_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        generate_local_pki(dir.path(), &["sg"]).unwrap();
        generate_local_pki(other.path(), &["sg"]).unwrap();
        // A leaf from another CA is replaced by one from this CA.
        fs::copy(other.path().join("sg.pem"), dir.path().join("sg.pem")).unwrap();
        fs::copy(other.path().join("sg.key"), dir.path().join("sg.key")).unwrap();
        let edges = generate_local_pki(dir.path(), &["sg"]).unwrap();
        let verifiers = LeafVerifiers::new(&dir.path().join("ca.pem")).unwrap();
        verifiers.check("sg", &edges[0].1).unwrap();

        fs::remove_file(dir.path().join("ca.key")).unwrap();
        let err = generate_local_pki(dir.path(), &["sg"]).unwrap_err();
        assert!(format!("{err:#}").contains("ca.key"), "{err:#}");
    }

    #[test]
    fn invalid_edge_names_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "ca", "SG", "s g", "-sg", "sg-", "../sg", "sg.th"] {
            assert!(generate_local_pki(dir.path(), &[bad]).is_err(), "{bad:?}");
        }
        assert!(!dir.path().join("ca.pem").exists());
    }

    #[test]
    fn edge_name_extraction_is_robust() {
        let dir = tempfile::tempdir().unwrap();
        let edges = generate_local_pki(dir.path(), &["my-edge-1"]).unwrap();
        let leaf = load_certs(&edges[0].1.cert).unwrap().swap_remove(0);
        assert_eq!(edge_name_from_cert(&leaf).as_deref(), Some("my-edge-1"));
        assert_eq!(edge_names(&leaf).unwrap(), ["my-edge-1"]);
        let names = crate::pki::certificate_names(&leaf).unwrap();
        assert_eq!(names.common_names, ["my-edge-1"]);
        assert_eq!(names.dns, ["my-edge-1.edge.cartedge.internal", "localhost"]);
        // The CA names no edge.
        let ca = load_certs(&dir.path().join("ca.pem"))
            .unwrap()
            .swap_remove(0);
        assert_eq!(edge_name_from_cert(&ca), None);
        // Truncated input never panics and never yields a name.
        for len in 0..leaf.len() {
            let cut = CertificateDer::from(&leaf[..len]);
            assert_eq!(edge_name_from_cert(&cut), None);
        }
        assert_eq!(edge_server_name("sg").to_str(), "sg.edge.cartedge.internal");
    }

    #[test]
    fn missing_files_are_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let err = server_config(&missing, &missing, &missing).unwrap_err();
        assert!(format!("{err:#}").contains("nope.pem"), "{err:#}");
        let err = client_config(&missing, &missing, &missing).unwrap_err();
        assert!(format!("{err:#}").contains("nope.pem"), "{err:#}");
    }
}
