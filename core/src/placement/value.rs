//! Values the U-Net computes with under a placement: a tensor that lives on the phone, on the
//! shard servers (as session handles, one strip per server), or on both. The runtime moves a
//! value only when an op needs it where it is not, and remembers both copies, so a gathered
//! feature map is not fetched twice and a scattered one is not sent twice. Every value carries
//! its dependency class (`DepClass`: raw, whole map, or text), fixed when it is made; both
//! copies have it, so rows relayed from a server's handle are audited with it.

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use crate::placement::audit::DepClass;
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
    /// What the tensor under the handle depends on (the class of its value).
    pub class: DepClass,
    release: Arc<Mutex<Vec<HandleId>>>,
}

impl Remote {
    pub fn new(
        id: HandleId,
        layout: Layout,
        class: DepClass,
        release: Arc<Mutex<Vec<HandleId>>>,
    ) -> Self {
        Self {
            id,
            layout,
            class,
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
    class: DepClass,
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
    /// A value held by the phone, of class `Raw` (a function of the sample's own rows and
    /// public values); `local_classed` for any other.
    pub fn local(dims: Vec<usize>, t: T) -> Self {
        Self::local_classed(dims, t, DepClass::Raw)
    }

    /// A value held by the phone that depends on what `class` says.
    pub fn local_classed(dims: Vec<usize>, t: T, class: DepClass) -> Self {
        let local = OnceLock::new();
        let _ = local.set(t);
        Self(Arc::new(Inner {
            dims,
            class,
            local,
            remote: OnceLock::new(),
        }))
    }

    /// A value held by the servers; it has the class of its handle.
    pub(crate) fn remote(dims: Vec<usize>, r: Remote) -> Self {
        let class = r.class;
        let remote = OnceLock::new();
        let _ = remote.set(r);
        Self(Arc::new(Inner {
            dims,
            class,
            local: OnceLock::new(),
            remote,
        }))
    }

    /// The logical (whole-map) dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0.dims
    }

    /// What the value depends on: raw rows, the whole map, or the text.
    pub fn class(&self) -> DepClass {
        self.0.class
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

    /// Records the servers' copy; the handle takes the value's class.
    pub(crate) fn set_remote(&self, mut r: Remote) {
        r.class = self.0.class;
        let _ = self.0.remote.set(r);
    }

    /// Whether the servers hold it.
    pub fn is_remote(&self) -> bool {
        self.0.remote.get().is_some()
    }
}
