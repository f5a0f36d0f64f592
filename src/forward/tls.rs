//! Mutual TLS between edges (being written).
