//! cartedge: a multi-region shopping-cart edge.
//!
//! Layout (see ARCHITECTURE.md for the invariants between these):
//! - [`domain`]: ids, money, carts and their rules; pure, no I/O.
//! - [`store`]: PostgreSQL pools with explicit intent, the Redis cache, the catalog, migrations.
//! - [`api`]: routing, identity, request parsing, error-to-response, cart rendering.
//! - [`server`]: accept loop, connections, graceful shutdown.
//! - [`config`]: typed layered configuration.
//! - [`app`]: wiring of the above into one shared state.
//! - [`local`]: the local cluster launcher and the process harness tests use.
//! - [`cli`]: the `cartedge` command line.
//! - [`fuzzing`]: fuzz entry points (the `fuzz/` targets and the corpus replay test call them).

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod domain;
pub mod forward;
pub mod fuzzing;
pub mod local;
pub mod pki;
pub mod preflight;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod topology;
