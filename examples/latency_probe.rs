//! Latency of the four request kinds of a running local cluster, sequentially (one request in
//! flight), so the figures show the path's own latency and the emulated links, not queueing:
//! a home-region write, a forwarded write, a replica read and a cache-hit read.
//!
//!   cargo run --release -- local up --detach
//!   cargo run --release --example latency_probe -- .cartedge/local 200

use std::time::{Duration, Instant};

use bytes::Bytes;
use cartedge::config::{Config, Sources};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// (name, method, URL, body, the `Cart-Source` every answer must carry).
type Phase<'a> = (&'a str, &'a str, String, Option<String>, Option<&'a str>);

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn call(
    client: &HttpClient,
    method: &str,
    url: &str,
    token: &str,
    body: Option<String>,
) -> (Duration, u16, Option<String>) {
    let mut request = http::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {token}"));
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let started = Instant::now();
    let response = client.request(request).await.expect("request");
    let status = response.status().as_u16();
    let source = response
        .headers()
        .get("cart-source")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let _ = response.into_body().collect().await;
    (started.elapsed(), status, source)
}

fn report(name: &str, mut samples: Vec<Duration>, unexpected: usize) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<22} n={:<4} median {:>7.2} ms   p99 {:>7.2} ms   (unexpected answers: {unexpected})",
        samples.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| ".cartedge/local".into()));
    let samples: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(200);
    let cluster: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cluster.json"))?)?;
    let edge = |id: &str| -> String {
        cluster["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .map(|r| r["edge_url"].as_str().unwrap().to_string())
            .unwrap()
    };
    let (sg, th) = (edge("sg"), edge("th"));
    let config = Config::load(
        &Sources::new(None, Some(dir.join("regions/sg.toml"))),
        std::env::vars(),
    )?;
    let ring = cartedge::topology::load_ring(&dir.join("ring.toml"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let run = format!("{:x}", now % 0xfffff);
    let users: Vec<(String, String)> = (0..)
        .map(|n| format!("probe-{run}-{n}"))
        .filter(|user| ring.locate(&format!("u:{user}")).home == "sg")
        .take(samples)
        .map(|user| {
            let token =
                cartedge::auth::issue_token(&config.auth, &user, Duration::from_secs(3600), now)
                    .unwrap();
            (user, token)
        })
        .collect();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    // Warm the connections (client to edges, th's forwarder to sg).
    for (_, token) in users.iter().take(3) {
        call(&client, "GET", &format!("{sg}/api/v1/cart"), token, None).await;
        call(&client, "GET", &format!("{th}/api/v1/cart"), token, None).await;
    }
    let add = |item: u32| Some(format!(r#"{{"item_id":"sku-{item:05}","quantity":1}}"#));
    let phases: [Phase; 4] = [
        (
            "home-region write",
            "POST",
            format!("{sg}/api/v1/cart/items"),
            add(1),
            None,
        ),
        (
            "forwarded write (th→sg)",
            "POST",
            format!("{th}/api/v1/cart/items"),
            add(2),
            None,
        ),
        // th's replica of sg-1 has replayed by then; th's cache holds only sg's fences.
        (
            "replica read (th)",
            "GET",
            format!("{th}/api/v1/cart"),
            None,
            Some("replica"),
        ),
        (
            "cache-hit read (th)",
            "GET",
            format!("{th}/api/v1/cart"),
            None,
            Some("cache"),
        ),
    ];
    for (name, method, url, body, expected_source) in phases {
        if expected_source == Some("replica") {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let (mut took, mut unexpected) = (Vec::new(), 0);
        for (_, token) in &users {
            let (elapsed, status, source) = call(&client, method, &url, token, body.clone()).await;
            let wrong_source = expected_source.is_some_and(|e| source.as_deref() != Some(e));
            unexpected += usize::from(status != 200 || wrong_source);
            took.push(elapsed);
        }
        report(name, took, unexpected);
    }
    Ok(())
}
