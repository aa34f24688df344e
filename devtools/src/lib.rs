//! veil-devtools: tooling for Veil's tests and benchmarks that no app ships. The product
//! library (`veil-core`, and through it the FFI) does not depend on it.
//!
//! - `link`: a UDP relay that imposes a mobile link's delay, bandwidth and queue on the QUIC
//!   traffic between the phone and its shard servers (`veil bench link`, `veil eval`).
//! - `tap`: a copy of every message a QUIC backend sends, for tests that scan the bytes.

pub mod link;
pub mod tap;
