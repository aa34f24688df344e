//! A tap on what the phone sends one shard server: a copy of every encoded message, so a test
//! can scan the bytes that really left (for the prompt's embeddings, say), not only what the
//! runtime's view audit says it sent.

use std::sync::{Arc, Mutex};

use veil_core::transport::QuicBackend;

/// The bytes a `QuicBackend` sent since the tap was attached.
#[derive(Debug, Clone, Default)]
pub struct Tap {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    /// Starts recording what `backend` sends (replacing any observer it had).
    pub fn attach(backend: &QuicBackend) -> Self {
        let tap = Self::default();
        let bytes = tap.bytes.clone();
        backend.observe_sent(Some(Arc::new(move |sent: &[u8]| {
            if let Ok(mut b) = bytes.lock() {
                b.extend_from_slice(sent);
            }
        })));
        tap
    }

    /// The bytes recorded so far; the tap starts again from empty.
    pub fn take(&self) -> Vec<u8> {
        self.bytes
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
    }
}
