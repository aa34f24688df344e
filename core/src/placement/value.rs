//! Values the U-Net computes with under a placement: a tensor that lives on the phone, on the
//! shard servers (as session handles, one strip per server), or on both. The runtime moves a
//! value only when an op needs it where it is not, and remembers both copies, so a gathered
//! feature map is not fetched twice and a scattered one is not sent twice.

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use crate::placement::backend::HandleId;

/// How a value held by the servers is laid out over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The same tensor on every server (the timestep embedding).
    Replicated,
    /// A [B, C, H, W] map; server `i` holds rows `extents[i]` (its own strip, possibly widened
    /// by halo rows).
    Rows(Vec<Range<usize>>),
    /// The [B, H·W, C] tokens of an H×W map; each server holds the tokens of its own strip.
    Tokens { h: usize, w: usize },
}

/// A value's server-side copy. Dropping the last reference queues the handle's release, which
/// the runtime sends with its next request.
#[derive(Debug)]
pub(crate) struct Remote {
    pub id: HandleId,
    pub layout: Layout,
    release: Arc<Mutex<Vec<HandleId>>>,
}

impl Remote {
    pub fn new(id: HandleId, layout: Layout, release: Arc<Mutex<Vec<HandleId>>>) -> Self {
        Self {
            id,
            layout,
            release,
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Ok(mut r) = self.release.lock() {
            r.push(self.id);
        }
    }
}

#[derive(Debug)]
struct Inner<T> {
    dims: Vec<usize>,
    local: OnceLock<T>,
    remote: OnceLock<Remote>,
}

/// A U-Net activation under a placement (cheap to clone: shared).
#[derive(Debug)]
pub struct Value<T>(Arc<Inner<T>>);

impl<T> Clone for Value<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Value<T> {
    /// A value held by the phone.
    pub fn local(dims: Vec<usize>, t: T) -> Self {
        let local = OnceLock::new();
        let _ = local.set(t);
        Self(Arc::new(Inner {
            dims,
            local,
            remote: OnceLock::new(),
        }))
    }

    pub(crate) fn remote(dims: Vec<usize>, r: Remote) -> Self {
        let remote = OnceLock::new();
        let _ = remote.set(r);
        Self(Arc::new(Inner {
            dims,
            local: OnceLock::new(),
            remote,
        }))
    }

    /// The logical (whole-map) dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0.dims
    }

    /// The phone's copy, if it has one.
    pub fn as_local(&self) -> Option<&T> {
        self.0.local.get()
    }

    pub(crate) fn as_remote(&self) -> Option<&Remote> {
        self.0.remote.get()
    }

    pub(crate) fn set_local(&self, t: T) {
        let _ = self.0.local.set(t);
    }

    pub(crate) fn set_remote(&self, r: Remote) {
        let _ = self.0.remote.set(r);
    }

    /// Whether the servers hold it.
    pub fn is_remote(&self) -> bool {
        self.0.remote.get().is_some()
    }
}
