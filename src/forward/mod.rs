//! Edge-to-edge traffic between regions: mutual TLS material ([`tls`]), the HTTP/2 client (one
//! multiplexed connection per peer) that forwards writes and home-region reads ([`client`]),
//! the batched cross-region cache fences ([`invalidate`]), the janitor's question about a
//! stale merge to the user cart's home ([`settle`]) and the reconciler's parked adds sent to
//! their home ([`parked`]).

pub mod client;
pub mod invalidate;
pub mod parked;
pub mod settle;
pub mod tls;

pub use client::{ForwardError, Forwarded, Forwarder, Settings};
