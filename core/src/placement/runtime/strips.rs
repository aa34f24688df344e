//! Ops on resident strips (the `strict` policy): convolutions with halo exchange and
//! GroupNorm with globally merged statistics.

use super::*;

impl<'a, E: Engine> Runtime<'a, E> {
    pub(super) fn on_servers(&self, vals: &[&Val<E>]) -> bool {
        if !self.placement.resident() {
            return false;
        }
        if vals.iter().all(|v| v.is_remote()) {
            return true;
        }
        !vals.iter().all(|v| v.as_local().is_some())
    }

    pub(super) fn piece_elems(
        &self,
        dims: &[usize],
        layout: &Layout,
        server: usize,
    ) -> Result<u64> {
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
    /// input's layout and is of class `class`. `flops_per_out` counts FLOPs per output element.
    pub(super) fn map_remote(
        &mut self,
        x: &Val<E>,
        layer: &str,
        out_dims: Vec<usize>,
        flops_per_out: u64,
        class: DepClass,
        op: impl Fn(Operand<E::T>) -> ShardOp<E::T>,
    ) -> Result<Val<E>> {
        let (id, layout) = self.remote_of(x, layer)?;
        let (out, oid) = self.new_remote(out_dims.clone(), layout.clone(), class);
        for i in 0..self.backends.len() {
            let f = flops_per_out * self.piece_elems(&out_dims, &layout, i)?;
            self.emit(i, op(Operand::Handle(id)), Some(oid), f);
        }
        Ok(out)
    }

    /// Two values' operands aligned piece by piece (row extents intersected).
    pub(super) fn align2(
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

    pub(super) async fn conv_strips(&mut self, c: &Conv2dSpec, x: &Val<E>) -> Result<Val<E>> {
        let d = x.dims().to_vec();
        let (h, w) = (d[2], d[3]);
        let (ho, wo) = (c.out_len(h), c.out_len(w));
        let out_own = self.strips(ho)?;
        // Input rows each server needs for its own output rows, clipped to the map.
        let need: Vec<(Range<usize>, Pad)> = out_own.iter().map(|r| c.input_rows(r, h)).collect();
        let out_dims = vec![d[0], c.out_channels, ho, wo];
        // A convolution reads a few rows around each output row: it keeps the input's class.
        let class = x.class();
        let (out, oid) = self.new_remote(out_dims.clone(), Layout::Rows(out_own.clone()), class);
        // The phone holds the input for the latent, and for a map it normalised itself (after
        // SDXL's text-derived bias, `add_channel_bias`): each server then gets exactly its rows
        // (its strip and halo). Otherwise the servers hold it, widened by halo rows where a
        // piece lacks some. The only phone-held map that is still `Raw` is the U-Net's input.
        let kind = match class {
            DepClass::Raw => ViewKind::Latent,
            _ => ViewKind::Strip,
        };
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
                        kind,
                        Some((h, w)),
                        Some(r.clone()),
                        false,
                        class,
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

    pub(super) async fn group_norm_strips(
        &mut self,
        g: &GroupNormSpec,
        x: &Val<E>,
    ) -> Result<Val<E>> {
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
        // Under stale sync, the previous call's statistics and halo rows; this call's wait in
        // the queue for the next round trip.
        let (outs, asks) = self
            .replies_or_stale((OpKind::GroupNorm, &g.name, &g.name), replies, asks)
            .await?;
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
        // The halo rows keep the map's class; the moments, statistics of the whole map, and
        // every row normalised with them are at least `WholeMap`.
        let xv = self.attach_halo(x, &g.name, id, &ext, asks, &outs)?;
        let (xid, layout) = self.remote_of(&xv, &g.name)?;
        let class = x.class().at_least(DepClass::WholeMap);
        let (out, oid) = self.new_remote(d.clone(), layout.clone(), class);
        for i in 0..n {
            let view = self.view(
                i,
                &g.name,
                ViewKind::Moments,
                None,
                None,
                false,
                class,
                &moments,
            );
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
}
