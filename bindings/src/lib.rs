//! veil-ffi: the thin FFI layer over veil-core for Swift and Kotlin. The UniFFI surface (async
//! `generate`, progress listener, cancel handle, typed errors) arrives with the SDK issue; this
//! crate exists now so the workspace layout matches the design card.

/// The veil-core version these bindings wrap.
pub fn core_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
