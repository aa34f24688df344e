//! Feeds arbitrary bytes to the wire decoder under the default limits, then hands what decodes
//! to a session's shard codec end the way `veil-server` does (docs/PROTOCOL.md §8). Any panic,
//! abort, out-of-memory or timeout is a bug: malformed input must come back as a `WireError`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_core::wire::codec::decode;
use veil_core::wire::references::CodecEnd;
use veil_core::wire::{Limits, Message};

fuzz_target!(|data: &[u8]| {
    let mut end = CodecEnd::new(16 << 20, 64);
    match decode(data, &Limits::default()) {
        Ok(Message::Request { mut calls, .. }) => {
            let _ = end.decode_calls(&mut calls);
        }
        Ok(Message::Reply { outputs }) => {
            for t in outputs {
                let _ = end.decode(t);
            }
        }
        _ => {}
    }
});
