//! The placement runtime: policies (where each op runs), engines (the arithmetic, real or
//! shape-only), shard backends (where server-side work executes) and accounting.

pub mod accounting;
pub mod admission;
pub mod audit;
pub mod backend;
pub mod engine;
pub mod policy;
pub mod runtime;
pub mod value;

pub use accounting::{Accounting, OpKind};
pub use audit::{Audit, AuditReport, BytesByClass, DepClass, View, ViewKind};
pub use backend::{InProcessBackend, ShardBackend, ShardExecutor};
pub use engine::{CandleEngine, Engine, ShapeEngine, WireDtype};
pub use policy::{GnVariant, Placement, Policy};
pub use runtime::Runtime;
pub use value::{Layout, Value};
