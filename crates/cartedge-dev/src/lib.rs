//! cartedge-dev: developer tooling for running cartedge on one machine.
//!
//! - [`procs`]: starts and stops real PostgreSQL (primaries and streaming replicas) and Redis
//!   server processes on loopback ports, installing the Debian packages when run as root. The
//!   integration tests and `cartedge local up` share it.
//! - [`ha`]: the HA cluster's processes: pg_auto_failover monitors and nodes (a primary and a
//!   synchronous standby per shard) and HAProxy in front of a region's edges.
//! - [`redis_ha`]: a Redis replica of a running master and the `redis-sentinel` processes
//!   that watch it (Redis high availability for the tests and `local up --ha`).
//! - [`linkproxy`]: a userspace TCP proxy between local regions, adding one-way delay and
//!   cutting links on demand, steered over a small HTTP control API.
//!
//! This crate must not depend on the `cartedge` service library (the `cartedge` binary
//! depends on both), and the service library must never depend on it: nothing that spawns
//! databases or runs `apt-get` ships inside the edge.

pub mod ha;
pub mod linkproxy;
pub mod procs;
pub mod redis_ha;
