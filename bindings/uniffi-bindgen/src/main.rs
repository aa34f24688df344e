//! `cargo run -p uniffi-bindgen -- generate --library <libveil_ffi> --language kotlin|swift
//! --out-dir DIR`: the generator at exactly the uniffi version veil-ffi is built with.

fn main() {
    uniffi::uniffi_bindgen_main()
}
