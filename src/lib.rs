//! cartedge: a multi-region shopping-cart edge.
//!
//! Layout, lowest layer first (ARCHITECTURE.md declares the layers; a test holds them):
//! - [`domain`]: ids, money, carts and their rules; pure, no I/O.
//! - [`store`]: PostgreSQL pools with explicit intent, the Redis cache, the catalog, migrations.
//! - [`config`]: typed layered configuration (a leaf: data, layering, syntax checks).
//! - [`pki`]: certificate and key files, the public listener's certificate slot.
//! - [`topology`]: the ring file and the region set.
//! - [`auth`]: token and guest-session verification; [`limits`]: rate limits.
//! - [`forward`]: edge-to-edge client, mutual TLS, cross-region cache fences.
//! - [`app`]: the edge's shared state, built from configuration.
//! - [`api`]: route table, typed commands, handlers, error-to-response, cart rendering.
//! - [`server`]: accept loop, connections, framing checks, graceful shutdown.
//! - [`preflight`]: the semantic configuration checks `serve` and `check-config` share.
//! - [`service`]: running one edge: bound listeners, serving until shutdown, reload on SIGHUP.
//! - `fuzzing` (cargo feature `fuzzing`, off by default): fuzz entry points (the `fuzz/`
//!   targets and the corpus replay test call them).
//!
//! This library is the service and nothing else. The command line (`src/cli.rs`) and the local
//! cluster launcher (`src/local/`) are modules of the `cartedge` binary; the process harness and
//! the link proxy they and the tests use live in the `cartedge-dev` crate
//! (`crates/cartedge-dev`), so nothing in here spawns databases or runs `apt-get`.

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod domain;
pub mod forward;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod limits;
pub mod metrics;
pub mod pki;
pub mod preflight;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod topology;
