//! TLS on the public listener: protocol versions, ALPN, HSTS, `Secure` cookies, and a
//! certificate reloaded without a restart (a broken one keeps the running certificate).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cartedge::config::{Config, Sources};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::helpers::{defaults_path, test_config_text, TestApp, TestOptions};

/// Bound on one connection's handshake or one exchange.
const LIMIT: Duration = Duration::from_secs(10);

/// A throwaway self-signed certificate for `localhost`: (certificate DER, cert PEM, key PEM).
fn throwaway_certificate() -> (Vec<u8>, String, String) {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    (
        generated.cert.der().to_vec(),
        generated.cert.pem(),
        generated.signing_key.serialize_pem(),
    )
}

struct CertFiles {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl CertFiles {
    fn new() -> CertFiles {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("edge.pem"), dir.path().join("edge.key"));
        CertFiles {
            _dir: dir,
            cert,
            key,
        }
    }

    /// Writes a new certificate and key; returns the certificate's DER.
    fn write_new(&self) -> Vec<u8> {
        let (der, cert, key) = throwaway_certificate();
        std::fs::write(&self.cert, cert).unwrap();
        std::fs::write(&self.key, key).unwrap();
        der
    }

    fn overlay(&self) -> String {
        format!(
            "[server]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            self.cert.display(),
            self.key.display()
        )
    }
}

async fn tls_edge(files: &CertFiles) -> TestApp {
    TestApp::spawn_with(TestOptions {
        overlay: files.overlay(),
        ..TestOptions::default()
    })
    .await
}

/// A client trusting exactly the certificate `trusted` (so a handshake succeeds only when the
/// edge presents it), offering `alpn` and `versions`.
fn client(
    trusted: &[u8],
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(trusted.to_vec())).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn connect(app: &TestApp, connector: &TlsConnector) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(app.address).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(LIMIT, connector.connect(name, tcp))
        .await
        .expect("handshake finished")
}

/// The leaf certificate the edge presents to a new connection (trusting only `expected`, a
/// different certificate fails the handshake, so this also tells which one is presented).
async fn presented_leaf(app: &TestApp, expected: &[u8]) -> Option<Vec<u8>> {
    let stream = connect(app, &client(expected, &[b"h2"], rustls::DEFAULT_VERSIONS))
        .await
        .ok()?;
    Some(stream.get_ref().1.peer_certificates()?.first()?.to_vec())
}

fn negotiated(stream: &TlsStream<TcpStream>) -> (Option<Vec<u8>>, Option<rustls::ProtocolVersion>) {
    let connection = stream.get_ref().1;
    (
        connection.alpn_protocol().map(<[u8]>::to_vec),
        connection.protocol_version(),
    )
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

async fn over_h2(stream: TlsStream<TcpStream>, request: Request<Full<Bytes>>) -> Answer {
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = tokio::time::timeout(LIMIT, sender.send_request(request))
        .await
        .expect("answered")
        .unwrap();
    collect(response).await
}

async fn over_h1(stream: TlsStream<TcpStream>, request: Request<Full<Bytes>>) -> Answer {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = tokio::time::timeout(LIMIT, sender.send_request(request))
        .await
        .expect("answered")
        .unwrap();
    collect(response).await
}

async fn collect(response: http::Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn a_client_offering_h2_gets_h2_and_hsts_over_tls() {
    let files = CertFiles::new();
    let der = files.write_new();
    let app = tls_edge(&files).await;
    assert!(
        app.app.tls,
        "cookies are marked Secure when the public listener is TLS"
    );
    let stream = connect(
        &app,
        &client(&der, &[b"h2", b"http/1.1"], rustls::DEFAULT_VERSIONS),
    )
    .await
    .unwrap();
    let (alpn, version) = negotiated(&stream);
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
    let answer = over_h2(stream, get("https://localhost/health")).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(
        answer.headers["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    assert_eq!(answer.headers["x-content-type-options"], "nosniff");
}

#[tokio::test]
async fn a_client_offering_only_http11_gets_http11_and_secure_cookies() {
    let files = CertFiles::new();
    let der = files.write_new();
    let app = tls_edge(&files).await;
    let stream = connect(
        &app,
        &client(&der, &[b"http/1.1"], rustls::DEFAULT_VERSIONS),
    )
    .await
    .unwrap();
    assert_eq!(negotiated(&stream).0.as_deref(), Some(&b"http/1.1"[..]));
    // A guest's first write: the new session's cookie may only travel over TLS.
    let request = Request::post("/api/v1/cart/items")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"item_id":"sku-00001","quantity":1}"#,
        )))
        .unwrap();
    let answer = over_h1(stream, request).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert!(answer.headers.contains_key("strict-transport-security"));
    let session_cookie = answer
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("cart_session="))
        .expect("session cookie")
        .to_string();
    assert!(session_cookie.contains("; Secure"), "{session_cookie}");
}

#[tokio::test]
async fn tls_12_is_accepted_and_tls_10_and_11_are_refused() {
    let files = CertFiles::new();
    let der = files.write_new();
    let app = tls_edge(&files).await;
    let stream = connect(&app, &client(&der, &[b"h2"], &[&rustls::version::TLS12]))
        .await
        .unwrap();
    assert_eq!(
        negotiated(&stream).1,
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    drop(stream);
    // rustls has no TLS 1.0/1.1 client, so these ClientHellos are written by hand: legacy
    // version 3.1 / 3.2, no supported_versions extension, two CBC suites of that era, and a
    // signature_algorithms extension (without it the hello is refused for that instead).
    for (name, minor) in [("TLS 1.0", 1u8), ("TLS 1.1", 2u8)] {
        let mut body = vec![0x03, minor];
        body.extend([0x42; 32]); // random
        body.push(0); // no session id
        body.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // cipher suites
        body.extend([0x01, 0x00]); // compression: null only
                                   // Extensions (10 bytes): signature_algorithms (13) listing rsa_pkcs1_sha256 and
                                   // ecdsa_secp256r1_sha256.
        body.extend([
            0x00, 0x0a, 0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x01, 0x04, 0x03,
        ]);
        let mut handshake = vec![0x01, 0x00, 0x00, body.len() as u8];
        handshake.extend(&body);
        let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
        record.extend(&handshake);
        let mut tcp = TcpStream::connect(app.address).await.unwrap();
        tcp.write_all(&record).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(LIMIT, tcp.read_to_end(&mut answer))
            .await
            .expect("the server closed the connection")
            .unwrap();
        // One fatal alert record (type 21, level 2), protocol_version (70), then close.
        assert_eq!(answer.first(), Some(&0x15), "{name}: {answer:?}");
        assert_eq!(answer.get(5..7), Some(&[2u8, 70][..]), "{name}: {answer:?}");
    }
}

#[tokio::test]
async fn hsts_is_never_sent_over_plain_http() {
    let app = TestApp::spawn().await;
    assert!(!app.app.tls);
    let health = app.send("GET", "/health", &[], None).await;
    assert_eq!(health.status, StatusCode::OK);
    assert!(health.header("strict-transport-security").is_none());
    let cart = app.add("alice", "sku-00001", 1).await;
    assert!(cart.header("strict-transport-security").is_none());
}

#[tokio::test]
async fn a_reload_presents_the_new_certificate_and_a_broken_one_keeps_the_old() {
    let files = CertFiles::new();
    let first = files.write_new();
    let app = tls_edge(&files).await;
    assert_eq!(presented_leaf(&app, &first).await, Some(first.clone()));

    let second = files.write_new();
    // Until the reload, new connections still get the first certificate.
    assert_eq!(presented_leaf(&app, &first).await, Some(first.clone()));
    app.app.reload(&app.config).expect("reload");
    assert_eq!(presented_leaf(&app, &second).await, Some(second.clone()));
    assert_eq!(
        presented_leaf(&app, &first).await,
        None,
        "old certificate retired"
    );

    // A truncated certificate file: refused, the second certificate stays.
    let pem = std::fs::read_to_string(&files.cert).unwrap();
    std::fs::write(&files.cert, &pem[..pem.len() / 2]).unwrap();
    let error = app.app.reload(&app.config).unwrap_err();
    assert!(format!("{error:#}").contains("edge.pem"), "{error:#}");
    assert_eq!(presented_leaf(&app, &second).await, Some(second.clone()));

    // A certificate whose key is another's: refused too.
    let (_, other_cert, _) = throwaway_certificate();
    std::fs::write(&files.cert, other_cert).unwrap();
    let error = app.app.reload(&app.config).unwrap_err();
    assert!(format!("{error:#}").contains("does not fit"), "{error:#}");
    assert_eq!(presented_leaf(&app, &second).await, Some(second));
}

fn load_with(overlay: &str) -> Result<Config, String> {
    let sources = Sources {
        defaults: Some(defaults_path()),
        region: None,
        overlay: Some(test_config_text(
            "postgres://x@127.0.0.1/x",
            "redis://127.0.0.1/",
            "p:",
            overlay,
        )),
    };
    let config =
        Config::load(&sources, Vec::<(String, String)>::new()).map_err(|e| e.to_string())?;
    cartedge::preflight::check(&config).map_err(|e| e.to_string())?;
    Ok(config)
}

fn tls_overlay(cert: &Path, key: &Path) -> String {
    format!(
        "[server]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

#[test]
fn tls_settings_are_validated_before_anything_is_bound() {
    let files = CertFiles::new();
    files.write_new();
    assert!(load_with(&files.overlay()).is_ok());
    let only_cert = format!("[server]\ntls_cert_file = \"{}\"\n", files.cert.display());
    let error = load_with(&only_cert).unwrap_err();
    assert!(error.contains("both be set"), "{error}");
    let missing = files.cert.with_file_name("missing.pem");
    let error = load_with(&tls_overlay(&missing, &files.key)).unwrap_err();
    assert!(error.contains("missing.pem"), "{error}");
    let error = load_with(&tls_overlay(Path::new("/dev/zero"), &files.key)).unwrap_err();
    assert!(error.contains("not a regular file"), "{error}");
    // The key of another certificate.
    let (_, _, other_key) = throwaway_certificate();
    std::fs::write(&files.key, other_key).unwrap();
    let error = load_with(&files.overlay()).unwrap_err();
    assert!(error.contains("does not fit"), "{error}");
}
