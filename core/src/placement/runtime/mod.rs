//! The placement runtime: the U-Net calls it for every op, and it decides from the policy's
//! placement table where the op runs. Under `local` everything runs on the phone; under
//! `ppidm` each offloaded op is one round trip (row blocks with halo rows out, results back);
//! under `strict` activations stay resident on the servers as strips (session handles), ops on
//! them are queued per server and sent together with the next request the phone must wait for
//! (GroupNorm statistics, a gather for the attention sub-layers, missing halo rows). The
//! runtime accounts bytes, round trips and FLOPs, and records every tensor a server receives
//! in the view audit.
//!
//! The runtime in parts, by mechanism:
//! - `mod.rs`: the runtime's state, its construction, accounting, audit and evaluation capture;
//! - `unet_ops.rs`: the ops the U-Net calls (`UNetOps`), each placed by the table;
//! - `transfer.rs`: moving values — gathers, the per-server queue of `strict` calls flushed with
//!   the next round trip, handles, halo rows;
//! - `strips.rs`: convolution and GroupNorm on resident strips (`strict`);
//! - `split.rs`: the row-split convolution of `ppidm`;
//! - `stale.rs`: stale synchronisation (`--stale-sync`): GroupNorm moments and halo rows one
//!   call old, this call's riding along with the next round trip;
//! - attention reuse (T-GATE) is the `reuse` cache here, offered and read in `unet_ops.rs`.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use futures::future::try_join_all;

mod replies;
mod split;
mod stale;
mod strips;
#[cfg(test)]
mod tests;
mod transfer;
mod unet_ops;

use crate::placement::accounting::{flops, Accounting, OpKind, Transfer};
use crate::placement::audit::{Audit, DepClass, View, ViewKind};
use crate::placement::backend::{
    upsample_source_row, HandleId, Operand, ShardBackend, ShardCall, ShardOp, ShardRequest,
};
use crate::placement::engine::{Engine, Pad, WireDtype};
use crate::placement::policy::{
    partition, AttnPlace, ConvPlace, GnPlace, GnVariant, LayerPlace, Placement,
};
use crate::placement::value::{Layout, Remote, Value};
use crate::vocab::error::{Error, Result};
use crate::vocab::layers::{
    Conv2dSpec, GeluKind, GroupNormSpec, LayerNormSpec, LinearSpec, Role, ShardLayer,
};

/// Default number of query rows per attention chunk (bounds the [heads, rows, keys] scores).
pub const DEFAULT_ATTENTION_CHUNK: usize = 1024;

/// A value of the runtime over engine `E`.
pub type Val<E> = Value<<E as Engine>::T>;

/// A halo row range server `i` asked for: (above its piece?, source server, index of the
/// source's reply, rows).
#[derive(Debug, Clone)]
struct HaloAsk {
    top: bool,
    source: usize,
    reply: usize,
    rows: Range<usize>,
}

/// Two operands of a binary op on one server.
type OperandPair<T> = (Operand<T>, Operand<T>);

/// What one server gets in one round trip: the calls, and the views of their inline tensors.
struct Outgoing<T> {
    calls: Vec<ShardCall<T>>,
    views: Vec<View>,
}

/// T-GATE-style reuse of attention outputs: from `from_call` on, each transformer block adds the
/// attention delta cached at the call before instead of recomputing it.
struct AttentionReuse<T> {
    from_call: u64,
    deltas: HashMap<String, Value<T>>,
}

/// Executes U-Net ops for one run under one placement.
pub struct Runtime<'a, E: Engine> {
    engine: &'a E,
    placement: Placement,
    backends: &'a [Arc<dyn ShardBackend<E::T>>],
    wire: WireDtype,
    attention_chunk: usize,
    acct: Accounting,
    audit: Audit,
    /// U-Net calls started on this runtime.
    calls: u64,
    /// (rows, columns) of each U-Net level, finest first.
    pyramid: Vec<(usize, usize)>,
    next_handle: HandleId,
    pending: Vec<Vec<ShardCall<E::T>>>,
    pending_views: Vec<Vec<View>>,
    pending_flops: Vec<u64>,
    released: Arc<Mutex<Vec<HandleId>>>,
    /// (H, W) of the feature map whose tokens the transformer is working on.
    token_map: Option<(usize, usize)>,
    reuse: Option<AttentionReuse<E::T>>,
    /// Stale synchronisation of GroupNorm moments and halo rows (`with_stale_sync`).
    stale: Option<stale::StaleSync<E::T>>,
    /// What each server's replies must look like (`with_reply_check`); without it only their
    /// count and finiteness are checked.
    replies: Option<replies::ReplyCheck>,
    /// From this U-Net call on, keep every tensor a server receives next to its view (the
    /// evaluation's attacks read what a server saw; off in normal runs).
    #[cfg(feature = "eval-capture")]
    capture_from: Option<u64>,
    #[cfg(feature = "eval-capture")]
    captured: Vec<(View, E::T)>,
    #[cfg(feature = "eval-capture")]
    captured_replies: Vec<CapturedReply<E::T>>,
}

/// A tensor a server returned (evaluation only): what it computed is part of what it knows.
#[cfg(feature = "eval-capture")]
#[derive(Debug, Clone)]
pub struct CapturedReply<T> {
    pub server: usize,
    pub call: u64,
    /// The round trip's kind and label.
    pub kind: OpKind,
    pub layer: String,
    pub tensor: T,
}

fn prod(d: &[usize]) -> u64 {
    d.iter().map(|&x| x as u64).product()
}

fn internal(msg: impl Into<String>) -> Error {
    Error::Internal(format!("placement runtime: {}", msg.into()))
}

/// Dimensions of a server's piece of a value with whole-map `dims` (rows `rows` of dim `axis`).
fn piece_dims(dims: &[usize], axis: usize, len: usize) -> Vec<usize> {
    let mut d = dims.to_vec();
    d[axis] = len;
    d
}

impl<'a, E: Engine> Runtime<'a, E> {
    /// A runtime; a placement that offloads work needs at least one backend.
    pub fn new(
        engine: &'a E,
        placement: Placement,
        backends: &'a [Arc<dyn ShardBackend<E::T>>],
        wire: WireDtype,
    ) -> Result<Self> {
        placement.validate()?;
        if placement.offloads() && backends.is_empty() {
            return Err(Error::InvalidArgument(
                "this placement offloads work but no shard backend was given".into(),
            ));
        }
        let n = backends.len();
        Ok(Self {
            engine,
            placement,
            backends,
            wire,
            attention_chunk: DEFAULT_ATTENTION_CHUNK,
            acct: Accounting::new(n),
            audit: Audit::new(n),
            calls: 0,
            pyramid: Vec::new(),
            next_handle: 1,
            pending: vec![Vec::new(); n],
            pending_views: vec![Vec::new(); n],
            pending_flops: vec![0; n],
            released: Arc::new(Mutex::new(Vec::new())),
            token_map: None,
            reuse: None,
            stale: None,
            replies: None,
            #[cfg(feature = "eval-capture")]
            capture_from: None,
            #[cfg(feature = "eval-capture")]
            captured: Vec::new(),
            #[cfg(feature = "eval-capture")]
            captured_replies: Vec::new(),
        })
    }

    /// Keeps a copy of every tensor sent to a server from U-Net call `from_call` on, with its
    /// view (`take_captured`). For evaluation: an attacker's input is exactly these tensors.
    #[cfg(feature = "eval-capture")]
    pub fn with_capture(mut self, from_call: Option<u64>) -> Self {
        self.capture_from = from_call;
        self
    }

    /// The captured (view, tensor) pairs so far, in send order.
    #[cfg(feature = "eval-capture")]
    pub fn take_captured(&mut self) -> Vec<(View, E::T)> {
        std::mem::take(&mut self.captured)
    }

    /// The captured replies so far (every tensor a server returned), in arrival order.
    #[cfg(feature = "eval-capture")]
    pub fn take_captured_replies(&mut self) -> Vec<CapturedReply<E::T>> {
        std::mem::take(&mut self.captured_replies)
    }

    /// Checks every reply's shape against what its request implies, given the layers the
    /// servers run (`UNet::shard_layers`): a server answering anything else is an error.
    pub fn with_reply_check(mut self, layers: HashMap<String, ShardLayer>) -> Self {
        self.replies = Some(replies::ReplyCheck::new(layers, self.backends.len()));
        self
    }

    pub fn with_attention_chunk(mut self, chunk: usize) -> Self {
        self.attention_chunk = chunk.max(1);
        self
    }

    /// Reuses each transformer block's attention output from U-Net call `from_call` on
    /// (T-GATE-style; `None` recomputes always).
    pub fn with_attention_reuse(mut self, from_call: Option<u64>) -> Self {
        self.reuse = from_call.map(|from_call| AttentionReuse {
            from_call,
            deltas: HashMap::new(),
        });
        self
    }

    pub fn engine(&self) -> &E {
        self.engine
    }
    pub fn accounting(&self) -> &Accounting {
        &self.acct
    }
    pub fn take_accounting(&mut self) -> Accounting {
        std::mem::replace(&mut self.acct, Accounting::new(self.backends.len()))
    }
    pub fn audit(&self) -> &Audit {
        &self.audit
    }
    pub fn take_audit(&mut self) -> Audit {
        std::mem::replace(&mut self.audit, Audit::new(self.backends.len()))
    }
    fn call_index(&self) -> u64 {
        self.calls.saturating_sub(1)
    }

    /// Each server's own rows of an `h`-row map.
    fn strips(&self, h: usize) -> Result<Vec<Range<usize>>> {
        let n = self.backends.len();
        let Some(level) = self.pyramid.iter().position(|&(ph, _)| ph == h) else {
            if self.pyramid.is_empty() && h >= n {
                return Ok(partition(h, n));
            }
            return Err(internal(format!("no strip layout for a map of {h} rows")));
        };
        let (coarse, _) = self.pyramid[self.pyramid.len() - 1];
        if coarse < n {
            return Err(Error::TooManyBackends {
                layer: format!("the {coarse}-row coarsest U-Net level"),
                rows: coarse,
                backends: n,
            });
        }
        let f = 1usize << (self.pyramid.len() - 1 - level);
        Ok(partition(coarse, n)
            .into_iter()
            .map(|r| r.start * f..(r.end * f).min(h))
            .collect())
    }

    fn bytes(&self, t: &E::T) -> u64 {
        prod(&self.engine.dims(t)) * self.wire.size() as u64
    }

    fn wire(&self, t: &E::T) -> Result<E::T> {
        self.engine.through_wire(t, self.wire)
    }

    /// A phone value of tensor `t`, depending on what `class` says.
    fn lv(&self, t: E::T, class: DepClass) -> Val<E> {
        Value::local_classed(self.engine.dims(&t), t, class)
    }

    fn fresh(&mut self) -> HandleId {
        let h = self.next_handle;
        self.next_handle += 1;
        h
    }

    /// A new server-side value (its handle is allocated here; the ops filling it are queued by
    /// the caller) of class `class`.
    fn new_remote(
        &mut self,
        dims: Vec<usize>,
        layout: Layout,
        class: DepClass,
    ) -> (Val<E>, HandleId) {
        let id = self.fresh();
        let v = Value::remote(dims, Remote::new(id, layout, class, self.released.clone()));
        (v, id)
    }

    /// A view of an inline tensor sent to `server`; `class` is what the tensor depends on.
    #[allow(clippy::too_many_arguments)]
    fn view(
        &mut self,
        server: usize,
        layer: &str,
        kind: ViewKind,
        resolution: Option<(usize, usize)>,
        rows: Option<Range<usize>>,
        text_indexed: bool,
        class: DepClass,
        t: &E::T,
    ) -> View {
        if let (Some(res), false) = (resolution, self.placement.resident()) {
            // Non-resident policies have no strips; report the even row split as the strip.
            let n = self.backends.len();
            if res.0 >= n && !self.audit.strips[server].contains_key(&res) {
                for (i, r) in partition(res.0, n).into_iter().enumerate() {
                    self.audit.strips[i].insert(res, r);
                }
            }
        }
        let view = View {
            server,
            call: self.call_index(),
            layer: layer.to_string(),
            kind,
            resolution,
            rows,
            text_indexed,
            class,
            bytes: self.bytes(t),
        };
        #[cfg(feature = "eval-capture")]
        if self.capture_from.is_some_and(|from| view.call >= from) {
            self.captured.push((view.clone(), t.clone()));
        }
        view
    }

    /// Sends one request to each backend concurrently (one round trip) and returns each
    /// backend's replies, rounded through the wire dtype. Inline operands must already be
    /// rounded by the caller (`wire`). Empty requests are not sent.
    async fn round_trip(
        &mut self,
        kind: OpKind,
        layer: &str,
        outgoing: Vec<Outgoing<E::T>>,
        server_flops: Vec<u64>,
    ) -> Result<Vec<Vec<E::T>>> {
        let up: Vec<u64> = outgoing
            .iter()
            .map(|o| {
                o.calls
                    .iter()
                    .flat_map(|c| c.op.inline_operands())
                    .map(|t| self.bytes(t))
                    .sum()
            })
            .collect();
        for (o, &bytes) in outgoing.iter().zip(&up) {
            let viewed: u64 = o.views.iter().map(|v| v.bytes).sum();
            if viewed != bytes {
                return Err(internal(format!(
                    "audit mismatch at {layer}: {bytes} bytes sent, {viewed} described"
                )));
            }
        }
        let mut requests = Vec::with_capacity(outgoing.len());
        let mut expected = Vec::with_capacity(outgoing.len());
        // Per server, the dtype each replied tensor travels in (GroupNorm statistics in f32).
        let mut asked: Vec<Vec<WireDtype>> = Vec::with_capacity(outgoing.len());
        for (i, o) in outgoing.into_iter().enumerate() {
            self.audit.views.extend(o.views);
            let wire = self.wire;
            asked.push(
                o.calls
                    .iter()
                    .filter(|c| c.reply)
                    .map(|c| c.op.reply_dtype(wire))
                    .collect(),
            );
            let engine = self.engine;
            expected.push(match self.replies.as_mut() {
                Some(r) => Some(r.expect(i, &o.calls, &|t| engine.dims(t))?),
                None => None,
            });
            requests.push(ShardRequest { calls: o.calls });
        }
        let futures = requests
            .into_iter()
            .zip(self.backends.iter())
            .enumerate()
            .map(|(i, (req, b))| async move {
                if req.calls.is_empty() {
                    return Ok(crate::placement::backend::ShardReply::in_process(Vec::new()));
                }
                b.execute(req).await.map_err(|e| match e {
                    Error::Backend { .. } | Error::Transport(_) => e,
                    other => Error::Backend {
                        backend: i,
                        message: other.to_string(),
                    },
                })
            });
        let replies = try_join_all(futures).await?;
        let mut sent_up = up.clone();
        let mut sent_down = Vec::with_capacity(replies.len());
        let mut down = Vec::with_capacity(replies.len());
        let mut outs = Vec::with_capacity(replies.len());
        for (i, r) in replies.into_iter().enumerate() {
            let want = expected.get(i).and_then(Option::as_deref);
            let dtypes = asked.get(i).map_or(&[][..], Vec::as_slice);
            replies::ReplyCheck::check(self.engine, i, want, &r.outputs, dtypes.len())?;
            let dims = |t: &E::T| prod(&self.engine.dims(t));
            let raw: u64 = r
                .outputs
                .iter()
                .zip(dtypes)
                .map(|(t, d)| dims(t) * d.size() as u64)
                .sum();
            down.push(raw);
            // What travelled, where the backend has a wire.
            match r.payload {
                Some(p) => {
                    sent_up[i] = p.up;
                    sent_down.push(p.down);
                }
                None => sent_down.push(raw),
            }
            outs.push(
                r.outputs
                    .iter()
                    .zip(dtypes)
                    .map(|(t, d)| self.engine.through_wire(t, *d))
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        for (acc, f) in self.acct.server_flops.iter_mut().zip(server_flops) {
            *acc += f;
        }
        self.acct.transfers.push(Transfer {
            kind,
            layer: layer.to_string(),
            up,
            down,
            sent_up,
            sent_down,
        });
        self.acct.round_trips += 1;
        #[cfg(feature = "eval-capture")]
        if self
            .capture_from
            .is_some_and(|from| self.call_index() >= from)
        {
            let call = self.call_index();
            for (server, o) in outs.iter().enumerate() {
                self.captured_replies
                    .extend(o.iter().map(|t| CapturedReply {
                        server,
                        call,
                        kind,
                        layer: layer.to_string(),
                        tensor: t.clone(),
                    }));
            }
        }
        Ok(outs)
    }

    fn rows_check(&self, layer: &str, rows: usize) -> Result<()> {
        if rows < self.backends.len() {
            return Err(Error::TooManyBackends {
                layer: layer.to_string(),
                rows,
                backends: self.backends.len(),
            });
        }
        Ok(())
    }

    fn one_reply(mut replies: Vec<Vec<E::T>>) -> Result<Vec<E::T>> {
        replies
            .iter_mut()
            .enumerate()
            .map(|(i, r)| {
                r.pop().ok_or(Error::Backend {
                    backend: i,
                    message: "reply carried no tensor".into(),
                })
            })
            .collect()
    }
}
