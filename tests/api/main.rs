//! One integration-test binary against real PostgreSQL and Redis (see helpers.rs).

mod auth;
mod cache;
mod cart;
mod cli;
mod concurrency;
mod contract;
mod corrupt_rows;
mod drills;
#[cfg(feature = "fuzzing")]
mod fuzz_corpus;
mod helpers;
mod idempotency;
mod layering;
mod lifecycle;
mod loadgen;
mod local;
mod metrics;
mod openapi;
mod ops;
mod parking;
mod preflight;
mod protection;
mod regions;
mod reshard;
mod ring;
mod schemathesis;
mod sentinel;
mod shutdown;
mod tls;
mod tracing;
mod transport;
