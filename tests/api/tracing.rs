//! W3C Trace Context at the edge: every response names its trace in `traceresponse`, a valid
//! client `traceparent` is continued, an invalid one is replaced (never echoed). The cross-region
//! half (one trace id in both regions' logs) is in `local.rs`, whose edges log to files.

use crate::helpers::{h, TestApp};

/// `00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids not all zero: (trace id, span id).
fn parse_traceresponse(value: &str) -> (String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert_eq!(parts[0], "00", "{value}");
    assert!(
        lower_hex(parts[1], 32) && parts[1] != "0".repeat(32),
        "{value}"
    );
    assert!(
        lower_hex(parts[2], 16) && parts[2] != "0".repeat(16),
        "{value}"
    );
    assert!(lower_hex(parts[3], 2), "{value}");
    (parts[1].to_string(), parts[2].to_string())
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_PARENT: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn every_response_carries_a_traceresponse_and_each_request_gets_its_own_trace() {
    let app = TestApp::spawn().await;
    let mut traces = Vec::new();
    for (method, path, headers, body, status) in [
        ("GET", "/health", vec![], None, 200),
        (
            "GET",
            "/api/v1/cart",
            vec![app.bearer("tr-alice")],
            None,
            200,
        ),
        (
            "HEAD",
            "/api/v1/cart",
            vec![app.bearer("tr-alice")],
            None,
            200,
        ),
        (
            "POST",
            "/api/v1/cart/items",
            vec![app.bearer("tr-alice")],
            Some(r#"{"item_id":"sku-00001","quantity":1}"#),
            200,
        ),
        ("GET", "/api/v1/nowhere", vec![], None, 404),
        ("POST", "/api/v1/cart", vec![], None, 405),
        (
            "GET",
            "/api/v1/cart",
            vec![h("authorization", "Bearer not-a-token")],
            None,
            401,
        ),
    ] {
        let response = app.send(method, path, &headers, body).await;
        assert_eq!(response.status.as_u16(), status, "{method} {path}");
        let value = response
            .header("traceresponse")
            .unwrap_or_else(|| panic!("{method} {path} has no traceresponse"));
        traces.push(parse_traceresponse(value).0);
    }
    let distinct: std::collections::HashSet<&String> = traces.iter().collect();
    assert_eq!(
        distinct.len(),
        traces.len(),
        "a new trace per request: {traces:?}"
    );
}

#[tokio::test]
async fn a_valid_traceparent_is_continued_in_a_span_of_the_edges_own() {
    let app = TestApp::spawn().await;
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    for (method, path, body) in [
        ("GET", "/api/v1/cart", None),
        (
            "POST",
            "/api/v1/cart/items",
            Some(r#"{"item_id":"sku-00001","quantity":1}"#),
        ),
    ] {
        let response = app
            .send(
                method,
                path,
                &[app.bearer("tr-bob"), h("traceparent", &traceparent)],
                body,
            )
            .await;
        assert_eq!(response.status, 200);
        let (trace, span) = parse_traceresponse(response.header("traceresponse").unwrap());
        assert_eq!(trace, CLIENT_TRACE, "the client's trace is continued");
        assert_ne!(span, CLIENT_PARENT, "the edge names its own span");
    }
}

#[tokio::test]
async fn an_invalid_traceparent_is_replaced_not_echoed() {
    let app = TestApp::spawn().await;
    let upper = CLIENT_TRACE.to_uppercase();
    for invalid in [
        format!("00-{upper}-{CLIENT_PARENT}-01"),
        format!("00-{}-{CLIENT_PARENT}-01", "0".repeat(32)),
        format!("ff-{CLIENT_TRACE}-{CLIENT_PARENT}-01"),
        format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01-extra"),
        format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}"),
        "<script>".to_string(),
    ] {
        let response = app
            .send(
                "GET",
                "/api/v1/cart",
                &[app.bearer("tr-carol"), h("traceparent", &invalid)],
                None,
            )
            .await;
        assert_eq!(response.status, 200, "{invalid}");
        let value = response.header("traceresponse").unwrap();
        let (trace, _) = parse_traceresponse(value);
        assert_ne!(
            trace.to_lowercase(),
            CLIENT_TRACE,
            "{invalid} was continued"
        );
        assert!(!value.contains(&invalid), "{invalid} was echoed");
    }
}
