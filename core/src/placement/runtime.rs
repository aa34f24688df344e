//! The placement runtime: the U-Net calls it for every op, and it decides from the policy's
//! placement table where the op runs. Under `local` everything runs on the phone; under
//! `ppidm` each offloaded op is one round trip (row blocks with halo rows out, results back);
//! under `strict` activations stay resident on the servers as strips (session handles), ops on
//! them are queued per server and sent together with the next request the phone must wait for
//! (GroupNorm statistics, a gather for the attention sub-layers, missing halo rows). The
//! runtime accounts bytes, round trips and FLOPs, and records every tensor a server receives
//! in the view audit.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use futures::future::try_join_all;

use crate::error::{Error, Result};
use crate::model::layers::{Conv2dSpec, GeluKind, GroupNormSpec, LayerNormSpec, LinearSpec};
use crate::placement::accounting::{flops, Accounting, OpKind, Transfer};
use crate::placement::audit::{Audit, View, ViewKind};
use crate::placement::backend::{
    upsample_source_row, HandleId, Operand, ShardBackend, ShardCall, ShardOp, ShardRequest,
};
use crate::placement::engine::{Engine, Pad, WireDtype};
use crate::placement::policy::{
    partition, AttnPlace, ConvPlace, GnPlace, GnVariant, LayerPlace, Placement,
};
use crate::placement::value::{Layout, Remote, Value};

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
    /// From this U-Net call on, keep every tensor a server receives next to its view (the
    /// evaluation's attacks read what a server saw; off in normal runs).
    capture_from: Option<u64>,
    captured: Vec<(View, E::T)>,
}

fn prod(d: &[usize]) -> u64 {
    d.iter().map(|&x| x as u64).product()
}

fn internal(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(format!("placement runtime: {}", msg.into()))
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
            capture_from: None,
            captured: Vec::new(),
        })
    }

    /// Keeps a copy of every tensor sent to a server from U-Net call `from_call` on, with its
    /// view (`take_captured`). For evaluation: an attacker's input is exactly these tensors.
    pub fn with_capture(mut self, from_call: Option<u64>) -> Self {
        self.capture_from = from_call;
        self
    }

    /// The captured (view, tensor) pairs so far, in send order.
    pub fn take_captured(&mut self) -> Vec<(View, E::T)> {
        std::mem::take(&mut self.captured)
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
    pub fn note_unet_call(&mut self) {
        self.acct.unet_calls += 1;
        self.calls += 1;
    }
    fn call_index(&self) -> u64 {
        self.calls.saturating_sub(1)
    }

    /// The (rows, columns) of each U-Net level, finest first; strict strips are cut from the
    /// coarsest level and scaled up, so down- and up-sampling stay inside a strip (plus one
    /// halo row).
    pub fn set_pyramid(&mut self, levels: &[(usize, usize)]) -> Result<()> {
        self.pyramid = levels.to_vec();
        if self.placement.resident() {
            for &(h, w) in levels {
                let strips = self.strips(h)?;
                for (i, s) in strips.into_iter().enumerate() {
                    self.audit.strips[i].insert((h, w), s);
                }
            }
        }
        Ok(())
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

    fn lv(&self, t: E::T) -> Val<E> {
        Value::local(self.engine.dims(&t), t)
    }

    fn fresh(&mut self) -> HandleId {
        let h = self.next_handle;
        self.next_handle += 1;
        h
    }

    fn new_remote(&mut self, dims: Vec<usize>, layout: Layout) -> (Val<E>, HandleId) {
        let id = self.fresh();
        let v = Value::remote(dims, Remote::new(id, layout, self.released.clone()));
        (v, id)
    }

    /// A view of an inline tensor sent to `server`.
    #[allow(clippy::too_many_arguments)]
    fn view(
        &mut self,
        server: usize,
        layer: &str,
        kind: ViewKind,
        resolution: Option<(usize, usize)>,
        rows: Option<Range<usize>>,
        text_indexed: bool,
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
            bytes: self.bytes(t),
        };
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
        for o in outgoing {
            self.audit.views.extend(o.views);
            requests.push(ShardRequest { calls: o.calls });
        }
        let futures = requests
            .into_iter()
            .zip(self.backends.iter())
            .enumerate()
            .map(|(i, (req, b))| async move {
                if req.calls.is_empty() {
                    return Ok(crate::placement::backend::ShardReply {
                        outputs: Vec::new(),
                    });
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
        let mut down = Vec::with_capacity(replies.len());
        let mut outs = Vec::with_capacity(replies.len());
        for r in replies {
            down.push(r.outputs.iter().map(|t| self.bytes(t)).sum());
            outs.push(
                r.outputs
                    .iter()
                    .map(|t| self.engine.through_wire(t, self.wire))
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
        });
        self.acct.round_trips += 1;
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

    // ---- moving values -------------------------------------------------------------------

    /// The phone's copy of `v`, gathering it from the strips if needed (one round trip).
    pub async fn local(&mut self, v: &Val<E>) -> Result<E::T> {
        if let Some(t) = v.as_local() {
            return Ok(t.clone());
        }
        let t = self.gather(v, "gather").await?;
        v.set_local(t.clone());
        Ok(t)
    }

    async fn gather(&mut self, v: &Val<E>, layer: &str) -> Result<E::T> {
        let r = v
            .as_remote()
            .ok_or_else(|| internal("a value is neither on the phone nor on the servers"))?;
        let (id, layout) = (r.id, r.layout.clone());
        let n = self.backends.len();
        let mut replies: Vec<Vec<ShardCall<E::T>>> = vec![Vec::new(); n];
        let dim = match &layout {
            Layout::Rows(ext) => {
                let own = self.strips(v.dims()[2])?;
                for i in 0..n {
                    let op = if ext[i] == own[i] {
                        ShardOp::Identity {
                            input: Operand::Handle(id),
                        }
                    } else {
                        ShardOp::Narrow {
                            input: Operand::Handle(id),
                            dim: 2,
                            start: own[i].start - ext[i].start,
                            len: own[i].len(),
                        }
                    };
                    replies[i].push(ShardCall::reply(op));
                }
                2
            }
            Layout::Tokens { .. } => {
                for r in replies.iter_mut() {
                    r.push(ShardCall::reply(ShardOp::Identity {
                        input: Operand::Handle(id),
                    }));
                }
                1
            }
            Layout::Replicated => {
                replies[0].push(ShardCall::reply(ShardOp::Identity {
                    input: Operand::Handle(id),
                }));
                let mut outs = self.flush(OpKind::Gather, layer, replies).await?;
                return outs
                    .get_mut(0)
                    .and_then(|o| o.pop())
                    .ok_or_else(|| internal("replicated gather got no reply"));
            }
        };
        let parts = Self::one_reply(self.flush(OpKind::Gather, layer, replies).await?)?;
        self.engine.cat(&parts, dim)
    }

    /// Sends everything queued, plus `replies`, plus queued releases: one round trip.
    async fn flush(
        &mut self,
        kind: OpKind,
        layer: &str,
        replies: Vec<Vec<ShardCall<E::T>>>,
    ) -> Result<Vec<Vec<E::T>>> {
        let n = self.backends.len();
        let released: Vec<HandleId> = self
            .released
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        let mut outgoing = Vec::with_capacity(n);
        for (i, extra) in replies.into_iter().enumerate() {
            let mut calls = std::mem::take(&mut self.pending[i]);
            calls.extend(extra);
            if !calls.is_empty() {
                calls.extend(released.iter().map(|&handle| ShardCall {
                    op: ShardOp::Release { handle },
                    keep_as: None,
                    reply: false,
                }));
            }
            outgoing.push(Outgoing {
                calls,
                views: std::mem::take(&mut self.pending_views[i]),
            });
        }
        // Releases a server was not sent this time wait for the next request.
        if outgoing.iter().any(|o| o.calls.is_empty()) {
            if let Ok(mut r) = self.released.lock() {
                r.extend(released);
            }
        }
        let f = std::mem::replace(&mut self.pending_flops, vec![0; n]);
        self.round_trip(kind, layer, outgoing, f).await
    }

    fn emit(&mut self, server: usize, op: ShardOp<E::T>, keep: Option<HandleId>, flops: u64) {
        self.pending[server].push(ShardCall {
            op,
            keep_as: keep,
            reply: false,
        });
        self.pending_flops[server] += flops;
    }

    fn queue_release(&self, id: HandleId) {
        if let Ok(mut r) = self.released.lock() {
            r.push(id);
        }
    }

    /// The handle and layout of `v` on the servers, scattering the phone's copy if needed
    /// (queued; sent with the next request).
    fn remote_of(&mut self, v: &Val<E>, layer: &str) -> Result<(HandleId, Layout)> {
        if let Some(r) = v.as_remote() {
            return Ok((r.id, r.layout.clone()));
        }
        let t = v
            .as_local()
            .cloned()
            .ok_or_else(|| internal("a value is neither on the phone nor on the servers"))?;
        let d = v.dims().to_vec();
        let layout = match d.len() {
            4 => Layout::Rows(self.strips(d[2])?),
            3 => match self.token_map {
                Some((h, w)) if h * w == d[1] => Layout::Tokens { h, w },
                _ => {
                    return Err(internal(format!(
                        "{layer}: a {d:?} tensor is not the tokens of a feature map and may not \
                         be placed on the servers"
                    )))
                }
            },
            1 | 2 => Layout::Replicated,
            _ => {
                return Err(internal(format!(
                    "{layer}: cannot place {d:?} on the servers"
                )))
            }
        };
        let id = self.fresh();
        for i in 0..self.backends.len() {
            let (piece, kind, res, rows) = match &layout {
                Layout::Rows(ext) => (
                    self.engine.narrow(&t, 2, ext[i].start, ext[i].len())?,
                    ViewKind::Strip,
                    Some((d[2], d[3])),
                    Some(ext[i].clone()),
                ),
                Layout::Tokens { h, w } => {
                    let own = self.strips(*h)?[i].clone();
                    (
                        self.engine.narrow(&t, 1, own.start * w, own.len() * w)?,
                        ViewKind::Strip,
                        Some((*h, *w)),
                        Some(own),
                    )
                }
                Layout::Replicated => (t.clone(), ViewKind::Vector, None, None),
            };
            let piece = self.wire(&piece)?;
            let view = self.view(i, layer, kind, res, rows, false, &piece);
            self.pending_views[i].push(view);
            self.emit(
                i,
                ShardOp::Identity {
                    input: Operand::Inline(piece),
                },
                Some(id),
                0,
            );
        }
        v.set_remote(Remote::new(id, layout.clone(), self.released.clone()));
        Ok((id, layout))
    }

    /// An operand for rows `want` of a row-laid value whose piece on `server` covers `ext`.
    fn rows_operand(
        &mut self,
        server: usize,
        id: HandleId,
        ext: &Range<usize>,
        want: &Range<usize>,
        row_flops: u64,
    ) -> Result<Operand<E::T>> {
        if ext == want {
            return Ok(Operand::Handle(id));
        }
        if want.start < ext.start || want.end > ext.end || want.is_empty() {
            return Err(internal(format!(
                "rows {want:?} asked of a piece holding {ext:?}"
            )));
        }
        let tmp = self.fresh();
        self.emit(
            server,
            ShardOp::Narrow {
                input: Operand::Handle(id),
                dim: 2,
                start: want.start - ext.start,
                len: want.len(),
            },
            Some(tmp),
            row_flops * want.len() as u64,
        );
        self.queue_release(tmp);
        Ok(Operand::Handle(tmp))
    }

    /// Replies that fetch the rows of `need[i]` that server `i`'s piece lacks from the servers
    /// that own them. Returns, per requesting server, (top?, source server, reply index, rows).
    fn halo_requests(
        &mut self,
        id: HandleId,
        ext: &[Range<usize>],
        own: &[Range<usize>],
        need: &[Range<usize>],
        replies: &mut [Vec<ShardCall<E::T>>],
    ) -> Vec<Vec<HaloAsk>> {
        let n = ext.len();
        let mut asks = vec![Vec::new(); n];
        for i in 0..n {
            let missing = [
                (true, need[i].start..ext[i].start.max(need[i].start)),
                (false, ext[i].end.min(need[i].end)..need[i].end),
            ];
            for (top, m) in missing {
                if m.is_empty() {
                    continue;
                }
                for j in 0..n {
                    let r = m.start.max(own[j].start).max(ext[j].start)
                        ..m.end.min(own[j].end).min(ext[j].end);
                    if r.is_empty() {
                        continue;
                    }
                    replies[j].push(ShardCall::reply(ShardOp::Narrow {
                        input: Operand::Handle(id),
                        dim: 2,
                        start: r.start - ext[j].start,
                        len: r.len(),
                    }));
                    asks[i].push(HaloAsk {
                        top,
                        source: j,
                        reply: replies[j].len() - 1,
                        rows: r,
                    });
                }
            }
        }
        asks
    }

    /// Queues, per server, the concatenation [fetched rows above, piece, fetched rows below].
    fn attach_halo(
        &mut self,
        v: &Val<E>,
        layer: &str,
        id: HandleId,
        ext: &[Range<usize>],
        asks: Vec<Vec<HaloAsk>>,
        outs: &[Vec<E::T>],
    ) -> Result<Val<E>> {
        if asks.iter().all(|a| a.is_empty()) {
            return Ok(v.clone());
        }
        let d = v.dims().to_vec();
        let res = (d[2], d[3]);
        let mut new_ext = ext.to_vec();
        for (i, a) in asks.iter().enumerate() {
            for x in a {
                new_ext[i] = new_ext[i].start.min(x.rows.start)..new_ext[i].end.max(x.rows.end);
            }
        }
        let (nv, nid) = self.new_remote(d.clone(), Layout::Rows(new_ext.clone()));
        for (i, mut a) in asks.into_iter().enumerate() {
            if a.is_empty() {
                self.emit(
                    i,
                    ShardOp::Identity {
                        input: Operand::Handle(id),
                    },
                    Some(nid),
                    0,
                );
                continue;
            }
            a.sort_by_key(|x| x.rows.start);
            let mut inputs = Vec::new();
            let mut placed_self = false;
            for HaloAsk {
                top,
                source: j,
                reply: k,
                rows: r,
            } in a
            {
                if !top && !placed_self {
                    inputs.push(Operand::Handle(id));
                    placed_self = true;
                }
                let rows = outs
                    .get(j)
                    .and_then(|o| o.get(k))
                    .cloned()
                    .ok_or_else(|| internal("missing halo reply"))?;
                let rows = self.wire(&rows)?;
                let view = self.view(i, layer, ViewKind::Halo, Some(res), Some(r), false, &rows);
                self.pending_views[i].push(view);
                inputs.push(Operand::Inline(rows));
            }
            if !placed_self {
                inputs.push(Operand::Handle(id));
            }
            self.emit(i, ShardOp::Cat { inputs, dim: 2 }, Some(nid), 0);
        }
        Ok(nv)
    }

    /// `v` with each server's piece covering `need[i]` (one round trip when rows are missing).
    async fn ensure_rows(
        &mut self,
        v: &Val<E>,
        layer: &str,
        need: &[Range<usize>],
    ) -> Result<(Val<E>, HandleId, Vec<Range<usize>>)> {
        let (id, layout) = self.remote_of(v, layer)?;
        let Layout::Rows(ext) = layout else {
            return Err(internal(format!("{layer}: rows of a non-spatial value")));
        };
        if ext
            .iter()
            .zip(need)
            .all(|(e, r)| e.start <= r.start && r.end <= e.end)
        {
            return Ok((v.clone(), id, ext));
        }
        let own = self.strips(v.dims()[2])?;
        let mut replies = vec![Vec::new(); self.backends.len()];
        let asks = self.halo_requests(id, &ext, &own, need, &mut replies);
        let outs = self.flush(OpKind::Halo, layer, replies).await?;
        let nv = self.attach_halo(v, layer, id, &ext, asks, &outs)?;
        let (nid, layout) = self.remote_of(&nv, layer)?;
        let Layout::Rows(next) = layout else {
            return Err(internal("halo attach changed the layout"));
        };
        Ok((nv, nid, next))
    }

    // ---- strip ops ---------------------------------------------------------------------

    fn on_servers(&self, vals: &[&Val<E>]) -> bool {
        if !self.placement.resident() {
            return false;
        }
        if vals.iter().all(|v| v.is_remote()) {
            return true;
        }
        !vals.iter().all(|v| v.as_local().is_some())
    }

    fn piece_elems(&self, dims: &[usize], layout: &Layout, server: usize) -> Result<u64> {
        Ok(match layout {
            Layout::Replicated => prod(dims),
            Layout::Rows(ext) => prod(&piece_dims(dims, 2, ext[server].len())),
            Layout::Tokens { h, w } => {
                let own = self.strips(*h)?[server].len();
                prod(&piece_dims(dims, 1, own * w))
            }
        })
    }

    /// Applies a per-element (or per-token) op to every server's piece; the output keeps the
    /// input's layout. `flops_per_out` counts FLOPs per output element.
    fn map_remote(
        &mut self,
        x: &Val<E>,
        layer: &str,
        out_dims: Vec<usize>,
        flops_per_out: u64,
        op: impl Fn(Operand<E::T>) -> ShardOp<E::T>,
    ) -> Result<Val<E>> {
        let (id, layout) = self.remote_of(x, layer)?;
        let (out, oid) = self.new_remote(out_dims.clone(), layout.clone());
        for i in 0..self.backends.len() {
            let f = flops_per_out * self.piece_elems(&out_dims, &layout, i)?;
            self.emit(i, op(Operand::Handle(id)), Some(oid), f);
        }
        Ok(out)
    }

    /// Two values' operands aligned piece by piece (row extents intersected).
    fn align2(
        &mut self,
        a: &Val<E>,
        b: &Val<E>,
        layer: &str,
    ) -> Result<(Layout, Vec<OperandPair<E::T>>)> {
        let (ia, la) = self.remote_of(a, layer)?;
        let (ib, lb) = self.remote_of(b, layer)?;
        let n = self.backends.len();
        match (&la, &lb) {
            (Layout::Rows(ea), Layout::Rows(eb)) => {
                let row = prod(&piece_dims(a.dims(), 2, 1));
                let mut ops = Vec::with_capacity(n);
                let mut ext = Vec::with_capacity(n);
                for i in 0..n {
                    let r = ea[i].start.max(eb[i].start)..ea[i].end.min(eb[i].end);
                    let oa = self.rows_operand(i, ia, &ea[i], &r, row)?;
                    let ob = self.rows_operand(i, ib, &eb[i], &r, row)?;
                    ops.push((oa, ob));
                    ext.push(r);
                }
                Ok((Layout::Rows(ext), ops))
            }
            _ if la == lb => Ok((
                la,
                (0..n)
                    .map(|_| (Operand::Handle(ia), Operand::Handle(ib)))
                    .collect(),
            )),
            _ => Err(internal(format!(
                "{layer}: operands laid out as {la:?} and {lb:?}"
            ))),
        }
    }

    async fn conv_strips(&mut self, c: &Conv2dSpec, x: &Val<E>) -> Result<Val<E>> {
        let d = x.dims().to_vec();
        let (h, w) = (d[2], d[3]);
        let (ho, wo) = (c.out_len(h), c.out_len(w));
        let out_own = self.strips(ho)?;
        let p = c.padding;
        // Input rows each server needs for its own output rows, clipped to the map.
        let need: Vec<(Range<usize>, Pad)> = out_own
            .iter()
            .map(|r| {
                let first = (r.start * c.stride) as isize - p as isize;
                let end = ((r.end - 1) * c.stride + c.kernel) as isize - p as isize;
                let lo = first.max(0) as usize;
                let hi = end.min(h as isize) as usize;
                (
                    lo..hi,
                    Pad {
                        top: (lo as isize - first) as usize,
                        bottom: (end - hi as isize) as usize,
                        left: p,
                        right: p,
                    },
                )
            })
            .collect();
        let out_dims = vec![d[0], c.out_channels, ho, wo];
        let (out, oid) = self.new_remote(out_dims.clone(), Layout::Rows(out_own.clone()));
        // The phone holds the input only for the latent: each server then gets exactly its rows.
        // Otherwise the servers hold it, widened by halo rows where a piece lacks some.
        let held = match x.as_remote() {
            Some(_) => {
                let rows: Vec<Range<usize>> = need.iter().map(|(r, _)| r.clone()).collect();
                Some(self.ensure_rows(x, &c.name, &rows).await?)
            }
            None => None,
        };
        let row = prod(&piece_dims(&d, 2, 1));
        for (i, (r, pad)) in need.iter().enumerate() {
            let input = match &held {
                Some((_, id, ext)) => self.rows_operand(i, *id, &ext[i], r, row)?,
                None => {
                    let t = x
                        .as_local()
                        .ok_or_else(|| internal("conv input is nowhere"))?;
                    let block = self.wire(&self.engine.narrow(t, 2, r.start, r.len())?)?;
                    let view = self.view(
                        i,
                        &c.name,
                        ViewKind::Latent,
                        Some((h, w)),
                        Some(r.clone()),
                        false,
                        &block,
                    );
                    self.pending_views[i].push(view);
                    Operand::Inline(block)
                }
            };
            let f = flops::conv2d(
                &piece_dims(&out_dims, 2, out_own[i].len()),
                c.in_channels,
                c.kernel,
            );
            self.emit(
                i,
                ShardOp::Conv2d {
                    layer: c.name.clone(),
                    input,
                    pad: *pad,
                },
                Some(oid),
                f,
            );
        }
        Ok(out)
    }

    async fn group_norm_strips(&mut self, g: &GroupNormSpec, x: &Val<E>) -> Result<Val<E>> {
        let d = x.dims().to_vec();
        let (id, layout) = self.remote_of(x, &g.name)?;
        let Layout::Rows(ext) = layout else {
            return Err(internal(format!(
                "{}: GroupNorm of a non-spatial value",
                g.name
            )));
        };
        let h = d[2];
        let own = self.strips(h)?;
        let n = self.backends.len();
        let row = prod(&piece_dims(&d, 2, 1));
        let mut replies: Vec<Vec<ShardCall<E::T>>> = vec![Vec::new(); n];
        for i in 0..n {
            let input = self.rows_operand(i, id, &ext[i], &own[i], row)?;
            self.pending_flops[i] += flops::group_norm_stats(&piece_dims(&d, 2, own[i].len()));
            replies[i].push(ShardCall::reply(ShardOp::GroupNormStats {
                layer: g.name.clone(),
                input,
            }));
        }
        // Prefetch the halo rows the next op needs (a 3×3 convolution: one per side) with the
        // statistics, so they cost no extra round trip.
        let halo = g.consumer_halo;
        let need: Vec<Range<usize>> = own
            .iter()
            .map(|r| r.start.saturating_sub(halo)..(r.end + halo).min(h))
            .collect();
        let asks = self.halo_requests(id, &ext, &own, &need, &mut replies);
        let outs = self.flush(OpKind::GroupNorm, &g.name, replies).await?;
        let stats = outs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                o.first().cloned().ok_or(Error::Backend {
                    backend: i,
                    message: "reply carried no statistics".into(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let moments = self.wire(&self.engine.merge_group_stats(&stats)?)?;
        let xv = self.attach_halo(x, &g.name, id, &ext, asks, &outs)?;
        let (xid, layout) = self.remote_of(&xv, &g.name)?;
        let (out, oid) = self.new_remote(d.clone(), layout.clone());
        for i in 0..n {
            let view = self.view(i, &g.name, ViewKind::Moments, None, None, false, &moments);
            self.pending_views[i].push(view);
            let f = 4 * self.piece_elems(&d, &layout, i)?;
            self.emit(
                i,
                ShardOp::GroupNormApply {
                    layer: g.name.clone(),
                    input: Operand::Handle(xid),
                    moments: Operand::Inline(moments.clone()),
                },
                Some(oid),
                f,
            );
        }
        Ok(out)
    }

    // ---- the ops the U-Net calls -------------------------------------------------------

    /// A convolution: on the phone, PPICnv (one round trip), or on the resident strips.
    pub async fn conv2d(&mut self, c: &Conv2dSpec, x: &Val<E>) -> Result<Val<E>> {
        match self.placement.conv {
            ConvPlace::Strips => self.conv_strips(c, x).await,
            ConvPlace::Device => {
                let x = self.local(x).await?;
                let p = c.padding;
                let sym = Pad {
                    top: p,
                    bottom: p,
                    left: p,
                    right: p,
                };
                let y = self.engine.conv2d(c, &x, sym)?;
                self.acct.device_flops +=
                    flops::conv2d(&self.engine.dims(&y), c.in_channels, c.kernel);
                Ok(self.lv(y))
            }
            ConvPlace::SplitRows => {
                let x = self.local(x).await?;
                let y = self.conv_split(c, &x).await?;
                Ok(self.lv(y))
            }
        }
    }

    /// PPICnv: output rows split; each backend gets its input rows plus halo.
    async fn conv_split(&mut self, c: &Conv2dSpec, x: &E::T) -> Result<E::T> {
        let p = c.padding;
        let d = self.engine.dims(x);
        let h = d[2];
        let out_rows = c.out_len(h);
        self.rows_check(&c.name, out_rows)?;
        let mut outgoing = Vec::new();
        let mut sflops = Vec::new();
        for (i, r) in partition(out_rows, self.backends.len())
            .into_iter()
            .enumerate()
        {
            // Input rows [first, end) in padded coordinates, clipped to the map; what falls
            // outside becomes explicit zero padding on the server.
            let first = (r.start * c.stride) as isize - p as isize;
            let end = ((r.end - 1) * c.stride + c.kernel) as isize - p as isize;
            let lo = first.max(0) as usize;
            let hi = (end.min(h as isize)) as usize;
            let pad = Pad {
                top: (lo as isize - first) as usize,
                bottom: (end - hi as isize) as usize,
                left: p,
                right: p,
            };
            let block = self.wire(&self.engine.narrow(x, 2, lo, hi - lo)?)?;
            let view = self.view(
                i,
                &c.name,
                ViewKind::Block,
                Some((h, d[3])),
                Some(lo..hi),
                false,
                &block,
            );
            let out_dims = [d[0], c.out_channels, r.len(), c.out_len(d[3])];
            sflops.push(flops::conv2d(&out_dims, c.in_channels, c.kernel));
            outgoing.push(Outgoing {
                calls: vec![ShardCall::reply(ShardOp::Conv2d {
                    layer: c.name.clone(),
                    input: Operand::Inline(block),
                    pad,
                })],
                views: vec![view],
            });
        }
        let parts = Self::one_reply(
            self.round_trip(OpKind::Conv, &c.name, outgoing, sflops)
                .await?,
        )?;
        self.engine.cat(&parts, 2)
    }

    /// GroupNorm: on the phone, PPIGN, or exact on the strips.
    pub async fn group_norm(&mut self, g: &GroupNormSpec, x: &Val<E>) -> Result<Val<E>> {
        let variant = match self.placement.group_norm {
            GnPlace::Strips => return self.group_norm_strips(g, x).await,
            GnPlace::Device => {
                let x = self.local(x).await?;
                let d = self.engine.dims(&x);
                let stats = self.engine.group_norm_stats(g, &x)?;
                let moments = self.engine.merge_group_stats(&[stats])?;
                self.acct.device_flops += flops::group_norm_stats(&d) + flops::norm_apply(&d);
                let y = self.engine.group_norm_apply(g, &x, &moments)?;
                return Ok(self.lv(y));
            }
            GnPlace::SplitRows(v) => v,
        };
        let x = self.local(x).await?;
        let d = self.engine.dims(&x);
        let h = d[2];
        self.rows_check(&g.name, h)?;
        let ranges = partition(h, self.backends.len());
        let mut outgoing = Vec::new();
        let mut sflops = Vec::new();
        for (i, r) in ranges.iter().enumerate() {
            let block = self.wire(&self.engine.narrow(&x, 2, r.start, r.len())?)?;
            sflops.push(flops::group_norm_stats(&self.engine.dims(&block)));
            let view = self.view(
                i,
                &g.name,
                ViewKind::Block,
                Some((h, d[3])),
                Some(r.clone()),
                false,
                &block,
            );
            outgoing.push(Outgoing {
                calls: vec![ShardCall::reply(ShardOp::GroupNormStats {
                    layer: g.name.clone(),
                    input: Operand::Inline(block),
                })],
                views: vec![view],
            });
        }
        let stats = Self::one_reply(
            self.round_trip(OpKind::GroupNorm, &g.name, outgoing, sflops)
                .await?,
        )?;
        self.acct.device_flops += flops::norm_apply(&d);
        let y = match variant {
            GnVariant::Exact => {
                let moments = self.engine.merge_group_stats(&stats)?;
                self.engine.group_norm_apply(g, &x, &moments)?
            }
            GnVariant::Paper => {
                // Each block normalised with its own statistics, as the paper's PPIGN does.
                let mut outs = Vec::with_capacity(ranges.len());
                for (r, s) in ranges.iter().zip(&stats) {
                    let moments = self.engine.merge_group_stats(std::slice::from_ref(s))?;
                    let block = self.engine.narrow(&x, 2, r.start, r.len())?;
                    outs.push(self.engine.group_norm_apply(g, &block, &moments)?);
                }
                self.engine.cat(&outs, 2)?
            }
        };
        Ok(self.lv(y))
    }

    /// The attention core (PPIAtt when split: Q rows split, K and V whole to every backend).
    pub async fn attention(
        &mut self,
        layer: &str,
        q: &Val<E>,
        k: &Val<E>,
        v: &Val<E>,
        heads: usize,
    ) -> Result<Val<E>> {
        let q = self.local(q).await?;
        let k = self.local(k).await?;
        let v = self.local(v).await?;
        let qd = self.engine.dims(&q);
        let tk = self.engine.dims(&k)[1];
        if self.placement.attention == AttnPlace::Device {
            self.acct.device_flops += flops::attention(&qd, tk, heads);
            let o = self
                .engine
                .attention(&q, &k, &v, heads, self.attention_chunk)?;
            return Ok(self.lv(o));
        }
        self.rows_check(layer, qd[1])?;
        let (k, v) = (self.wire(&k)?, self.wire(&v)?);
        // Which rows of which map the tokens index: self-attention keys cover the whole map,
        // cross-attention keys are indexed by text tokens.
        let map = self.token_map.filter(|(h, w)| h * w == qd[1]);
        let self_attn = tk == qd[1];
        let mut outgoing = Vec::new();
        let mut sflops = Vec::new();
        for (i, r) in partition(qd[1], self.backends.len())
            .into_iter()
            .enumerate()
        {
            let qb = self.wire(&self.engine.narrow(&q, 1, r.start, r.len())?)?;
            sflops.push(flops::attention(&[qd[0], r.len(), qd[2]], tk, heads));
            let q_rows = map.map(|(_, w)| r.start / w..r.end.div_ceil(w));
            let mut views = vec![self.view(i, layer, ViewKind::Query, map, q_rows, false, &qb)];
            for t in [&k, &v] {
                views.push(if self_attn {
                    self.view(
                        i,
                        layer,
                        ViewKind::KeyValue,
                        map,
                        map.map(|(h, _)| 0..h),
                        false,
                        t,
                    )
                } else {
                    self.view(i, layer, ViewKind::TextKeyValue, None, None, true, t)
                });
            }
            outgoing.push(Outgoing {
                calls: vec![ShardCall::reply(ShardOp::Attention {
                    q: Operand::Inline(qb),
                    k: Operand::Inline(k.clone()),
                    v: Operand::Inline(v.clone()),
                    heads,
                })],
                views,
            });
        }
        let parts = Self::one_reply(
            self.round_trip(OpKind::Attention, layer, outgoing, sflops)
                .await?,
        )?;
        let o = self.engine.cat(&parts, 1)?;
        Ok(self.lv(o))
    }

    pub async fn linear(&mut self, l: &LinearSpec, x: &Val<E>) -> Result<Val<E>> {
        let mut out_dims = x.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = l.out_features;
        }
        if self.placement.layer(l.role) == LayerPlace::Strips && self.placement.resident() {
            let per = 2 * l.in_features as u64 + 1;
            let name = l.name.clone();
            return self.map_remote(x, &l.name, out_dims, per, |input| ShardOp::Linear {
                layer: name.clone(),
                input,
            });
        }
        let x = self.local(x).await?;
        let y = self.engine.linear(l, &x)?;
        self.acct.device_flops += flops::linear(&self.engine.dims(&y), l.in_features);
        Ok(self.lv(y))
    }

    pub async fn layer_norm(&mut self, l: &LayerNormSpec, x: &Val<E>) -> Result<Val<E>> {
        if self.placement.layer(l.role) == LayerPlace::Strips && self.placement.resident() {
            let name = l.name.clone();
            return self.map_remote(x, &l.name, x.dims().to_vec(), 8, |input| {
                ShardOp::LayerNorm {
                    layer: name.clone(),
                    input,
                }
            });
        }
        let x = self.local(x).await?;
        let d = self.engine.dims(&x);
        self.acct.device_flops += flops::group_norm_stats(&d) + flops::norm_apply(&d);
        let y = self.engine.layer_norm(l, &x)?;
        Ok(self.lv(y))
    }

    pub async fn silu(&mut self, x: &Val<E>) -> Result<Val<E>> {
        if self.on_servers(&[x]) {
            return self.map_remote(x, "silu", x.dims().to_vec(), 4, |input| ShardOp::Silu {
                input,
            });
        }
        let x = self.local(x).await?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&x), 4);
        let y = self.engine.silu(&x)?;
        Ok(self.lv(y))
    }

    pub async fn geglu(&mut self, x: &Val<E>, kind: GeluKind) -> Result<Val<E>> {
        if self.on_servers(&[x]) {
            let mut d = x.dims().to_vec();
            if let Some(l) = d.last_mut() {
                *l /= 2;
            }
            return self.map_remote(x, "geglu", d, 8, |input| ShardOp::Geglu { input, kind });
        }
        let x = self.local(x).await?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&x), 4);
        let y = self.engine.geglu(&x, kind)?;
        Ok(self.lv(y))
    }

    pub async fn scale(&mut self, x: &Val<E>, f: f64) -> Result<Val<E>> {
        if self.on_servers(&[x]) {
            return self.map_remote(x, "scale", x.dims().to_vec(), 1, |input| ShardOp::Scale {
                input,
                factor: f,
            });
        }
        let x = self.local(x).await?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&x), 1);
        let y = self.engine.scale(&x, f)?;
        Ok(self.lv(y))
    }

    pub async fn add(&mut self, a: &Val<E>, b: &Val<E>) -> Result<Val<E>> {
        if self.on_servers(&[a, b]) {
            let (layout, ops) = self.align2(a, b, "add")?;
            let d = a.dims().to_vec();
            let (out, oid) = self.new_remote(d.clone(), layout.clone());
            for (i, (oa, ob)) in ops.into_iter().enumerate() {
                let f = self.piece_elems(&d, &layout, i)?;
                self.emit(i, ShardOp::Add { a: oa, b: ob }, Some(oid), f);
            }
            return Ok(out);
        }
        let a = self.local(a).await?;
        let b = self.local(b).await?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&a), 1);
        let y = self.engine.add(&a, &b)?;
        Ok(self.lv(y))
    }

    pub async fn add_channel_bias(&mut self, x: &Val<E>, e: &Val<E>) -> Result<Val<E>> {
        if self.on_servers(&[x, e]) {
            let (ie, _) = self.remote_of(e, "channel bias")?;
            let d = x.dims().to_vec();
            return self.map_remote(x, "channel bias", d, 1, |input| ShardOp::AddChannelBias {
                input,
                bias: Operand::Handle(ie),
            });
        }
        let x = self.local(x).await?;
        let e = self.local(e).await?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&x), 1);
        let y = self.engine.add_channel_bias(&x, &e)?;
        Ok(self.lv(y))
    }

    pub async fn cat(&mut self, xs: &[Val<E>], dim: usize) -> Result<Val<E>> {
        let refs: Vec<&Val<E>> = xs.iter().collect();
        if self.on_servers(&refs) && dim == 1 && xs.len() == 2 && xs[0].dims().len() == 4 {
            let (layout, ops) = self.align2(&xs[0], &xs[1], "cat")?;
            let mut d = xs[0].dims().to_vec();
            d[1] += xs[1].dims()[1];
            let (out, oid) = self.new_remote(d, layout);
            for (i, (oa, ob)) in ops.into_iter().enumerate() {
                self.emit(
                    i,
                    ShardOp::Cat {
                        inputs: vec![oa, ob],
                        dim: 1,
                    },
                    Some(oid),
                    0,
                );
            }
            return Ok(out);
        }
        let mut ts = Vec::with_capacity(xs.len());
        for x in xs {
            ts.push(self.local(x).await?);
        }
        let y = self.engine.cat(&ts, dim)?;
        Ok(self.lv(y))
    }

    pub async fn upsample_nearest(&mut self, x: &Val<E>, h: usize, w: usize) -> Result<Val<E>> {
        if self.on_servers(&[x]) && x.dims().len() == 4 {
            let d = x.dims().to_vec();
            let src_h = d[2];
            let own = self.strips(h)?;
            let need: Vec<Range<usize>> = own
                .iter()
                .map(|r| {
                    upsample_source_row(r.start, src_h, h)
                        ..upsample_source_row(r.end - 1, src_h, h) + 1
                })
                .collect();
            let (xv, id, ext) = self.ensure_rows(x, "upsample", &need).await?;
            let out_dims = vec![d[0], d[1], h, w];
            let (out, oid) = self.new_remote(out_dims.clone(), Layout::Rows(own.clone()));
            for i in 0..self.backends.len() {
                self.emit(
                    i,
                    ShardOp::UpsampleRows {
                        input: Operand::Handle(id),
                        src_first: ext[i].start,
                        src_h,
                        dst_h: h,
                        dst_first: own[i].start,
                        dst_len: own[i].len(),
                        dst_w: w,
                    },
                    Some(oid),
                    0,
                );
            }
            drop(xv);
            return Ok(out);
        }
        let x = self.local(x).await?;
        let y = self.engine.upsample_nearest(&x, h, w)?;
        Ok(self.lv(y))
    }

    pub async fn to_tokens(&mut self, x: &Val<E>) -> Result<Val<E>> {
        let d = x.dims().to_vec();
        if d.len() == 4 {
            self.token_map = Some((d[2], d[3]));
        }
        if self.on_servers(&[x]) && d.len() == 4 {
            let (id, layout) = self.remote_of(x, "to_tokens")?;
            let Layout::Rows(ext) = layout else {
                return Err(internal("to_tokens of a non-spatial value"));
            };
            let own = self.strips(d[2])?;
            let row = prod(&piece_dims(&d, 2, 1));
            let (out, oid) = self.new_remote(
                vec![d[0], d[2] * d[3], d[1]],
                Layout::Tokens { h: d[2], w: d[3] },
            );
            for i in 0..self.backends.len() {
                let input = self.rows_operand(i, id, &ext[i], &own[i], row)?;
                self.emit(i, ShardOp::ToTokens { input }, Some(oid), 0);
            }
            return Ok(out);
        }
        let x = self.local(x).await?;
        let y = self.engine.to_tokens(&x)?;
        Ok(self.lv(y))
    }

    pub async fn to_spatial(&mut self, x: &Val<E>, h: usize, w: usize) -> Result<Val<E>> {
        if self.on_servers(&[x]) {
            let (id, layout) = self.remote_of(x, "to_spatial")?;
            if layout != (Layout::Tokens { h, w }) {
                return Err(internal(format!("to_spatial {h}x{w} of {layout:?}")));
            }
            let d = x.dims().to_vec();
            let own = self.strips(h)?;
            let (out, oid) = self.new_remote(vec![d[0], d[2], h, w], Layout::Rows(own.clone()));
            for (i, r) in own.iter().enumerate() {
                self.emit(
                    i,
                    ShardOp::ToSpatial {
                        input: Operand::Handle(id),
                        h: r.len(),
                        w,
                    },
                    Some(oid),
                    0,
                );
            }
            return Ok(out);
        }
        let x = self.local(x).await?;
        let y = self.engine.to_spatial(&x, h, w)?;
        Ok(self.lv(y))
    }

    pub fn timestep_embedding(
        &mut self,
        t: f64,
        batch: usize,
        dim: usize,
        flip: bool,
        shift: f64,
    ) -> Result<Val<E>> {
        if self.placement.time_embedding == LayerPlace::Strips && self.placement.resident() {
            let (out, oid) = self.new_remote(vec![batch, dim], Layout::Replicated);
            for i in 0..self.backends.len() {
                self.emit(
                    i,
                    ShardOp::TimestepEmbedding {
                        timestep: t,
                        batch,
                        dim,
                        flip_sin_to_cos: flip,
                        shift,
                    },
                    Some(oid),
                    0,
                );
            }
            return Ok(out);
        }
        let y = self.engine.timestep_embedding(t, batch, dim, flip, shift)?;
        Ok(self.lv(y))
    }

    /// Wraps a phone tensor as a value.
    pub fn input(&self, t: E::T) -> Val<E> {
        self.lv(t)
    }

    pub fn dims(&self, v: &Val<E>) -> Vec<usize> {
        v.dims().to_vec()
    }

    // ---- attention reuse (T-GATE) -------------------------------------------------------

    /// The cached attention delta of transformer block `block`, when this call reuses it.
    pub fn reused_attention(&self, block: &str) -> Option<Val<E>> {
        let r = self.reuse.as_ref()?;
        if self.call_index() < r.from_call {
            return None;
        }
        r.deltas.get(block).cloned()
    }

    /// Offers a block's attention result: at the last call before the gate, the delta
    /// `after − before` is kept (computed on the phone, which holds both).
    pub async fn offer_attention(
        &mut self,
        block: &str,
        before: &Val<E>,
        after: &Val<E>,
    ) -> Result<()> {
        let gate = match &self.reuse {
            Some(r) if r.from_call == self.call_index() + 1 => r.from_call,
            _ => return Ok(()),
        };
        let b = self.local(before).await?;
        let a = self.local(after).await?;
        let delta = self.engine.add(&a, &self.engine.scale(&b, -1.0)?)?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&a), 2);
        let v = self.lv(delta);
        if let Some(r) = self.reuse.as_mut().filter(|r| r.from_call == gate) {
            r.deltas.insert(block.to_string(), v);
        }
        Ok(())
    }
}
