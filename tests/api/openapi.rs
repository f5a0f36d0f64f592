//! The OpenAPI document (`openapi.json`) is kept true: its paths are the router's, its schemas'
//! fields are what real responses carry, and its error codes are the edge's.

use std::collections::BTreeSet;

use crate::helpers::{h, TestApp};
use cartedge::api::error::ApiError;
use cartedge::api::Surface;
use serde_json::Value;

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn properties(document: &Value, schema: &str) -> BTreeSet<String> {
    document["components"]["schemas"][schema]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn every_documented_path_is_routed() {
    let document = document();
    assert_eq!(document["openapi"], "3.1.0");
    for path in document["paths"].as_object().unwrap().keys() {
        let concrete = path
            .replace("{line_id}", "sku-00001")
            .replace("{order_id}", &format!("ord_sg-1_{}", "0".repeat(32)));
        assert!(
            cartedge::api::route_name(&concrete).is_some(),
            "{path} is not routed"
        );
        let seed = concrete.trim_start_matches("/api/v1");
        assert!(
            cartedge::api::route_name(seed).is_some(),
            "{seed} is not routed"
        );
    }
}

/// Both directions: every documented operation is a public route of the router's table with
/// the same method, and every public route is documented (the seed's unprefixed paths aside).
#[test]
fn the_documented_operations_are_exactly_the_public_routes() {
    let documented: BTreeSet<(String, String)> = document()["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            let path = path.trim_start_matches("/api/v1").to_string();
            item.as_object()
                .unwrap()
                .keys()
                .filter(|key| *key != "parameters")
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = cartedge::api::ROUTES
        .iter()
        .filter(|route| route.surfaces.contains(Surface::Public))
        .map(|route| (route.method.to_string(), route.pattern.to_string()))
        .collect();
    assert_eq!(documented, routed);
}

/// Both directions: the documented warning codes are exactly the edge's closed list.
#[test]
fn the_documented_warning_codes_are_exactly_the_edges() {
    let edge: BTreeSet<String> = cartedge::domain::cart::WARNING_CODES
        .iter()
        .map(|code| code.to_string())
        .collect();
    let documented: Vec<String> = document()["components"]["schemas"]["Warning"]["properties"]
        ["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let documented_set: BTreeSet<String> = documented.iter().cloned().collect();
    assert_eq!(
        documented.len(),
        documented_set.len(),
        "a code documented twice"
    );
    assert_eq!(documented_set, edge);
}

/// Both directions: a code the edge can answer with must be documented, and a documented code
/// must be one the edge has. The edge's list comes from the error enum's own declaration.
#[test]
fn the_documented_error_codes_are_exactly_the_edges() {
    let edge: BTreeSet<String> = ApiError::all_codes().map(str::to_string).collect();
    let documented: Vec<String> = document()["components"]["schemas"]["Error"]["properties"]
        ["error"]["properties"]["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let documented_set: BTreeSet<String> = documented.iter().cloned().collect();
    assert_eq!(
        documented.len(),
        documented_set.len(),
        "a code is documented twice"
    );
    let undocumented: Vec<&String> = edge.difference(&documented_set).collect();
    assert!(
        undocumented.is_empty(),
        "not in openapi.json: {undocumented:?}"
    );
    let unknown: Vec<&String> = documented_set.difference(&edge).collect();
    assert!(
        unknown.is_empty(),
        "documented but not an ApiError code: {unknown:?}"
    );
}

#[tokio::test]
async fn real_responses_carry_exactly_the_documented_fields() {
    let document = document();
    let app = TestApp::spawn().await;
    let body = r#"{"item_id":"sku-00001","quantity":2,"variant":{"size":"M"}}"#;
    let cart = app
        .user("alice", "POST", "/api/v1/cart/items", Some(body))
        .await
        .json();
    assert_eq!(keys(&cart), properties(&document, "Cart"));
    assert_eq!(keys(&cart["items"][0]), properties(&document, "Line"));
    assert_eq!(keys(&cart["total_price"]), properties(&document, "Money"));
    let low = app.add("alice", "sku-low", 5).await.json();
    let warning_keys = keys(&low["warnings"][0]);
    assert!(
        warning_keys.is_subset(&properties(&document, "Warning")),
        "{warning_keys:?}"
    );
    let error = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[app.bearer("alice"), h("content-type", "application/json")],
            Some("{"),
        )
        .await
        .json();
    assert_eq!(keys(&error), properties(&document, "Error"));
    let session = app
        .send(
            "POST",
            "/api/v1/cart/items",
            &[],
            Some(r#"{"item_id":"sku-00002","quantity":1}"#),
        )
        .await
        .header("cart-session")
        .unwrap()
        .to_string();
    let merged = app
        .send(
            "POST",
            "/api/v1/cart/merge",
            &[app.bearer("alice"), h("cart-session", &session)],
            None,
        )
        .await
        .json();
    assert_eq!(keys(&merged), properties(&document, "MergedCart"));
    assert_eq!(
        keys(&merged["report"]),
        properties(&document, "MergeReport")
    );
    // sku-low has 3 in stock: leave it out of the order.
    app.user("alice", "DELETE", "/api/v1/cart/items/sku-low", None)
        .await;
    let order = app
        .send(
            "POST",
            "/api/v1/cart/checkout",
            &[app.bearer("alice"), h("idempotency-key", "o-1")],
            None,
        )
        .await
        .json();
    assert_eq!(keys(&order), properties(&document, "Order"));
    let line_keys = keys(&order["items"][0]);
    assert!(
        line_keys.is_subset(&properties(&document, "OrderLine")),
        "{line_keys:?}"
    );
    let health = app.send("GET", "/health", &[], None).await.json();
    assert_eq!(keys(&health), properties(&document, "Health"));
}
