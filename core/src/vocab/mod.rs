//! The shared vocabulary: the words every other layer speaks, defined at the bottom so that no
//! layer has to import a higher one to name them. Nothing here imports another module of this
//! crate (checked by `tests/layers.rs`).
//!
//! - `error`: `Error` and `Result`, with the wire's and transport's errors it carries.
//! - `layers`: layer specs by diffusers name (`Conv2dSpec`, `GroupNormSpec`, …), their `Role`,
//!   and `ShardLayer`, what a shard server may hold.
//! - `precision`: `WireDtype` and `Pad`.
//! - `engine`: the `Engine` trait, the arithmetic of every op over some value type.
//! - `ops`: `ShardOp`, `Operand`, requests and replies, and the `ShardBackend` trait.
//! - `job`: the `obfuscated` policy's `EarlySteps` job, its accelerations and `SchedulerKind`.

pub mod engine;
pub mod error;
pub mod job;
pub mod layers;
pub mod ops;
pub mod precision;

/// Protocol version spoken by this build. A server refuses other versions.
pub const PROTOCOL_VERSION: u16 = 6;

/// A duration of `seconds`, where that is a positive, finite number of seconds (the one rule for
/// every timeout a user configures: the SDK, the CLI and the server all read it here).
pub fn positive_seconds(seconds: f64) -> Option<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
}
