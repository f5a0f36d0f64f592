//! Edge-to-edge traffic between regions: mutual TLS material ([`tls`]) and the pooled HTTP/2
//! client that forwards writes and home-region reads ([`client`]).

pub mod client;
pub mod invalidate;
pub mod tls;

pub use client::{ForwardError, Forwarded, Forwarder, Settings};
