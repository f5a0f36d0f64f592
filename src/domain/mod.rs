//! The pure core: identifiers, money, carts and the rules that change them.
//!
//! Architecture invariant: nothing here does I/O, reads a clock, or imports hyper,
//! tokio-postgres or redis (a test in `tests/api/layering.rs` greps for it). Timestamps arrive
//! from the store; decisions come back as values the store executes.

pub mod cart;
pub mod ids;
pub mod lifecycle;
pub mod money;
pub mod order;
pub mod ring;
pub mod variant;
