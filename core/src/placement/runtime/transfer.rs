//! Moving values between the phone and the servers: gathering, the per-server queue of
//! strict-policy calls flushed with the next round trip, handles, and halo rows.

use super::*;

impl<'a, E: Engine> Runtime<'a, E> {
    pub(super) async fn gather(&mut self, v: &Val<E>, layer: &str) -> Result<E::T> {
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
    pub(super) async fn flush(
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
        let mut outs = self.round_trip(kind, layer, outgoing, f).await?;
        if let Some(stale) = self.stale.as_mut() {
            stale.collect(&mut outs)?;
        }
        Ok(outs)
    }

    pub(super) fn emit(
        &mut self,
        server: usize,
        op: ShardOp<E::T>,
        keep: Option<HandleId>,
        flops: u64,
    ) {
        self.pending[server].push(ShardCall {
            op,
            keep_as: keep,
            reply: false,
        });
        self.pending_flops[server] += flops;
    }

    pub(super) fn queue_release(&self, id: HandleId) {
        if let Ok(mut r) = self.released.lock() {
            r.push(id);
        }
    }

    /// The handle and layout of `v` on the servers, scattering the phone's copy if needed
    /// (queued; sent with the next request).
    pub(super) fn remote_of(&mut self, v: &Val<E>, layer: &str) -> Result<(HandleId, Layout)> {
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
            // A per-sample vector that depends on the prompt (a pooled text embedding, a time
            // embedding it was added to) is never scattered: only maps leave as strips.
            1 | 2 if v.class() == DepClass::Text => {
                return Err(internal(format!(
                    "{layer}: a text-derived {d:?} vector may not be sent to the servers"
                )))
            }
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
            let view = self.view(i, layer, kind, res, rows, false, v.class(), &piece);
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
        v.set_remote(Remote::new(
            id,
            layout.clone(),
            v.class(),
            self.released.clone(),
        ));
        Ok((id, layout))
    }

    /// An operand for rows `want` of a row-laid value whose piece on `server` covers `ext`.
    pub(super) fn rows_operand(
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
    pub(super) fn halo_requests(
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
    pub(super) fn attach_halo(
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
        // Halo rows are rows of `v`: they, and the widened value, keep its class.
        let class = v.class();
        let (nv, nid) = self.new_remote(d.clone(), Layout::Rows(new_ext.clone()), class);
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
                let view = self.view(
                    i,
                    layer,
                    ViewKind::Halo,
                    Some(res),
                    Some(r),
                    false,
                    class,
                    &rows,
                );
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
    pub(super) async fn ensure_rows(
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
        // Under stale sync, the previous call's rows; this call's ride with the next round trip.
        let key = format!("{layer} halo");
        let (outs, asks) = self
            .replies_or_stale((OpKind::Halo, layer, &key), replies, asks)
            .await?;
        let nv = self.attach_halo(v, layer, id, &ext, asks, &outs)?;
        let (nid, layout) = self.remote_of(&nv, layer)?;
        let Layout::Rows(next) = layout else {
            return Err(internal("halo attach changed the layout"));
        };
        Ok((nv, nid, next))
    }
}
