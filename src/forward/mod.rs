//! Edge-to-edge traffic between regions: mutual TLS material and (next) the pooled HTTP/2
//! client that forwards writes to the owner's home region.

pub mod tls;
