//! Edge-to-edge traffic between regions: mutual TLS material ([`tls`]), the HTTP/2 client (one
//! multiplexed connection per peer) that forwards writes and home-region reads ([`client`]), and
//! the batched cross-region cache fences ([`invalidate`]).

pub mod client;
pub mod invalidate;
pub mod tls;

pub use client::{ForwardError, Forwarded, Forwarder, Settings};
