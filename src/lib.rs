//! cartedge: a multi-region shopping-cart edge.
//!
//! Layout (see ARCHITECTURE.md for the invariants between these):
//! - [`domain`]: ids, money, carts and their rules; pure, no I/O.
//! - [`store`]: PostgreSQL pools with explicit intent, the Redis cache, the catalog, migrations.
//! - [`api`]: routing, identity, request parsing, error-to-response, cart rendering.
//! - [`server`]: accept loop, connections, graceful shutdown.
//! - [`config`]: typed layered configuration.
//! - [`app`]: wiring of the above into one shared state.
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
pub mod config;
pub mod domain;
pub mod forward;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod pki;
pub mod preflight;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod topology;
