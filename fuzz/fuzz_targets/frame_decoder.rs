//! Feeds arbitrary bytes to the wire decoder under the default limits. Any panic, abort,
//! out-of-memory or timeout is a bug: malformed input must come back as a `WireError`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_core::wire::codec::decode;
use veil_core::wire::Limits;

fuzz_target!(|data: &[u8]| {
    let _ = decode(data, &Limits::default());
});
