//! The runtime as the U-Net sees it: `UNetOps`, each op placed by the policy's table — on the
//! phone, split by rows over the servers (`ppidm`), or on resident strips (`strict`).
//! Each op's output carries the dependency class of its inputs (their maximum), raised by the
//! op itself: GroupNorm and self-attention to at least `WholeMap`, cross-attention to `Text`
//! (`DepClass` documents the rule).

use super::*;
use crate::model::ops::UNetOps;

impl<E: Engine> UNetOps for Runtime<'_, E> {
    type T = E::T;
    type Val = Val<E>;

    /// Wraps a phone tensor as a value. The U-Net's [B, C, H, W] sample is `Raw`; every other
    /// tensor it is handed (the [B, T, D] text states, any added conditioning) is `Text`.
    fn input(&self, t: E::T) -> Val<E> {
        let class = if self.engine.dims(&t).len() == 4 {
            DepClass::Raw
        } else {
            DepClass::Text
        };
        self.lv(t, class)
    }

    /// The phone's copy of `v`, gathering it from the strips if needed (one round trip).
    async fn local(&mut self, v: &Val<E>) -> Result<E::T> {
        if let Some(t) = v.as_local() {
            return Ok(t.clone());
        }
        let t = self.gather(v, "gather").await?;
        v.set_local(t.clone());
        Ok(t)
    }

    fn dims(&self, v: &Val<E>) -> Vec<usize> {
        v.dims().to_vec()
    }

    fn note_unet_call(&mut self) {
        self.acct.unet_calls += 1;
        self.calls += 1;
        let dropped = self.released.lock().map(|r| r.clone()).unwrap_or_default();
        for b in self.backends {
            b.dropped(&dropped);
            b.begin_step(self.calls - 1);
        }
    }

    /// The (rows, columns) of each U-Net level, finest first; strict strips are cut from the
    /// coarsest level and scaled up, so down- and up-sampling stay inside a strip (plus one
    /// halo row).
    fn set_pyramid(&mut self, levels: &[(usize, usize)]) -> Result<()> {
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

    fn timestep_embedding(
        &mut self,
        t: f64,
        batch: usize,
        dim: usize,
        flip: bool,
        shift: f64,
        role: Role,
    ) -> Result<Val<E>> {
        if self.placement.layer(role) == LayerPlace::Strips && self.placement.resident() {
            // The timestep is public: its embedding is `Raw`.
            let (out, oid) = self.new_remote(vec![batch, dim], Layout::Replicated, DepClass::Raw);
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
        Ok(self.lv(y, DepClass::Raw))
    }

    /// A convolution: on the phone, PPICnv (one round trip), or on the resident strips.
    async fn conv2d(&mut self, c: &Conv2dSpec, x: &Val<E>) -> Result<Val<E>> {
        let class = x.class();
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
                Ok(self.lv(y, class))
            }
            ConvPlace::SplitRows => {
                let x = self.local(x).await?;
                let y = self.conv_split(c, &x, class).await?;
                Ok(self.lv(y, class))
            }
        }
    }

    /// GroupNorm: on the phone, PPIGN, or exact on the strips. The output is at least
    /// `WholeMap`: every row is normalised with statistics of rows it does not cover.
    async fn group_norm(&mut self, g: &GroupNormSpec, x: &Val<E>) -> Result<Val<E>> {
        let in_class = x.class();
        let class = in_class.at_least(DepClass::WholeMap);
        let variant = match self.placement.group_norm {
            // A map only the phone holds is normalised there: sending it to the strips to be
            // normalised would hand each server its rows before normalisation.
            GnPlace::Strips if x.is_remote() => return self.group_norm_strips(g, x).await,
            GnPlace::Strips | GnPlace::Device => {
                let x = self.local(x).await?;
                let d = self.engine.dims(&x);
                let stats = self.engine.group_norm_stats(g, &x)?;
                let moments = self.engine.merge_group_stats(&[stats])?;
                self.acct.device_flops += flops::group_norm_stats(&d) + flops::norm_apply(&d);
                let y = self.engine.group_norm_apply(g, &x, &moments)?;
                return Ok(self.lv(y, class));
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
                in_class,
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
        Ok(self.lv(y, class))
    }

    async fn linear(&mut self, l: &LinearSpec, x: &Val<E>) -> Result<Val<E>> {
        let mut out_dims = x.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = l.out_features;
        }
        if self.placement.layer(l.role) == LayerPlace::Strips && self.placement.resident() {
            let per = 2 * l.in_features as u64 + 1;
            let name = l.name.clone();
            return self.map_remote(x, &l.name, out_dims, per, x.class(), |input| {
                ShardOp::Linear {
                    layer: name.clone(),
                    input,
                }
            });
        }
        let class = x.class();
        let x = self.local(x).await?;
        let y = self.engine.linear(l, &x)?;
        self.acct.device_flops += flops::linear(&self.engine.dims(&y), l.in_features);
        Ok(self.lv(y, class))
    }

    async fn layer_norm(&mut self, l: &LayerNormSpec, x: &Val<E>) -> Result<Val<E>> {
        if self.placement.layer(l.role) == LayerPlace::Strips && self.placement.resident() {
            let name = l.name.clone();
            // Over the channels of each token: it keeps the input's class.
            return self.map_remote(x, &l.name, x.dims().to_vec(), 8, x.class(), |input| {
                ShardOp::LayerNorm {
                    layer: name.clone(),
                    input,
                }
            });
        }
        let class = x.class();
        let x = self.local(x).await?;
        let d = self.engine.dims(&x);
        self.acct.device_flops += flops::group_norm_stats(&d) + flops::norm_apply(&d);
        let y = self.engine.layer_norm(l, &x)?;
        Ok(self.lv(y, class))
    }

    /// The attention core (PPIAtt when split: Q rows split, K and V whole to every backend).
    /// Self-attention mixes every token (output at least `WholeMap`); keys that are not the
    /// map's tokens are text, so a cross-attention's keys, values and output are `Text`.
    async fn attention(
        &mut self,
        layer: &str,
        q: &Val<E>,
        k: &Val<E>,
        v: &Val<E>,
        heads: usize,
    ) -> Result<Val<E>> {
        let cross = k.dims().get(1) != q.dims().get(1);
        let text_floor = if cross { DepClass::Text } else { DepClass::Raw };
        let (qc, kc, vc) = (
            q.class(),
            k.class().at_least(text_floor),
            v.class().at_least(text_floor),
        );
        let class = DepClass::of([qc, kc, vc]).at_least(DepClass::WholeMap);
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
            return Ok(self.lv(o, class));
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
            let mut views = vec![self.view(i, layer, ViewKind::Query, map, q_rows, false, qc, &qb)];
            for (t, c) in [(&k, kc), (&v, vc)] {
                views.push(if self_attn {
                    self.view(
                        i,
                        layer,
                        ViewKind::KeyValue,
                        map,
                        map.map(|(h, _)| 0..h),
                        false,
                        c,
                        t,
                    )
                } else {
                    self.view(i, layer, ViewKind::TextKeyValue, None, None, true, c, t)
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
        Ok(self.lv(o, class))
    }

    async fn silu(&mut self, x: &Val<E>) -> Result<Val<E>> {
        if self.on_servers(&[x]) {
            return self.map_remote(x, "silu", x.dims().to_vec(), 4, x.class(), |input| {
                ShardOp::Silu { input }
            });
        }
        let class = x.class();
        let x = self.local(x).await?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&x), 4);
        let y = self.engine.silu(&x)?;
        Ok(self.lv(y, class))
    }

    async fn geglu(&mut self, x: &Val<E>, kind: GeluKind) -> Result<Val<E>> {
        if self.on_servers(&[x]) {
            let mut d = x.dims().to_vec();
            if let Some(l) = d.last_mut() {
                *l /= 2;
            }
            return self.map_remote(x, "geglu", d, 8, x.class(), |input| ShardOp::Geglu {
                input,
                kind,
            });
        }
        let class = x.class();
        let x = self.local(x).await?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&x), 4);
        let y = self.engine.geglu(&x, kind)?;
        Ok(self.lv(y, class))
    }

    async fn scale(&mut self, x: &Val<E>, f: f64) -> Result<Val<E>> {
        if self.on_servers(&[x]) {
            return self.map_remote(x, "scale", x.dims().to_vec(), 1, x.class(), |input| {
                ShardOp::Scale { input, factor: f }
            });
        }
        let class = x.class();
        let x = self.local(x).await?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&x), 1);
        let y = self.engine.scale(&x, f)?;
        Ok(self.lv(y, class))
    }

    async fn add(&mut self, a: &Val<E>, b: &Val<E>) -> Result<Val<E>> {
        let class = DepClass::of([a.class(), b.class()]);
        if self.on_servers(&[a, b]) {
            let (layout, ops) = self.align2(a, b, "add")?;
            let d = a.dims().to_vec();
            let (out, oid) = self.new_remote(d.clone(), layout.clone(), class);
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
        Ok(self.lv(y, class))
    }

    /// A bias the phone holds that depends on the prompt (SDXL's pooled text embedding,
    /// projected) is never sent: the map comes to the phone instead, and stays there through
    /// the GroupNorm and SiLU that follow (`group_norm` keeps a phone-only map on the phone), so
    /// the servers next receive it normalised, as a strip, like the output of a cross-attention.
    async fn add_channel_bias(&mut self, x: &Val<E>, e: &Val<E>) -> Result<Val<E>> {
        let class = DepClass::of([x.class(), e.class()]);
        let text_bias = !e.is_remote() && e.class() == DepClass::Text;
        if self.on_servers(&[x, e]) && !text_bias {
            let (ie, _) = self.remote_of(e, "channel bias")?;
            let d = x.dims().to_vec();
            return self.map_remote(x, "channel bias", d, 1, class, |input| {
                ShardOp::AddChannelBias {
                    input,
                    bias: Operand::Handle(ie),
                }
            });
        }
        let x = self.local(x).await?;
        let e = self.local(e).await?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&x), 1);
        let y = self.engine.add_channel_bias(&x, &e)?;
        Ok(self.lv(y, class))
    }

    async fn cat(&mut self, xs: &[Val<E>], dim: usize) -> Result<Val<E>> {
        let refs: Vec<&Val<E>> = xs.iter().collect();
        let class = DepClass::of(xs.iter().map(|x| x.class()));
        if self.on_servers(&refs) && dim == 1 && xs.len() == 2 && xs[0].dims().len() == 4 {
            let (layout, ops) = self.align2(&xs[0], &xs[1], "cat")?;
            let mut d = xs[0].dims().to_vec();
            d[1] += xs[1].dims()[1];
            let (out, oid) = self.new_remote(d, layout, class);
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
        Ok(self.lv(y, class))
    }

    async fn upsample_nearest(&mut self, x: &Val<E>, h: usize, w: usize) -> Result<Val<E>> {
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
            let (out, oid) =
                self.new_remote(out_dims.clone(), Layout::Rows(own.clone()), x.class());
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
        let class = x.class();
        let x = self.local(x).await?;
        let y = self.engine.upsample_nearest(&x, h, w)?;
        Ok(self.lv(y, class))
    }

    async fn to_tokens(&mut self, x: &Val<E>) -> Result<Val<E>> {
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
                x.class(),
            );
            for i in 0..self.backends.len() {
                let input = self.rows_operand(i, id, &ext[i], &own[i], row)?;
                self.emit(i, ShardOp::ToTokens { input }, Some(oid), 0);
            }
            return Ok(out);
        }
        let class = x.class();
        let x = self.local(x).await?;
        let y = self.engine.to_tokens(&x)?;
        Ok(self.lv(y, class))
    }

    async fn to_spatial(&mut self, x: &Val<E>, h: usize, w: usize) -> Result<Val<E>> {
        if self.on_servers(&[x]) {
            let (id, layout) = self.remote_of(x, "to_spatial")?;
            if layout != (Layout::Tokens { h, w }) {
                return Err(internal(format!("to_spatial {h}x{w} of {layout:?}")));
            }
            let d = x.dims().to_vec();
            let own = self.strips(h)?;
            let (out, oid) =
                self.new_remote(vec![d[0], d[2], h, w], Layout::Rows(own.clone()), x.class());
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
        let class = x.class();
        let x = self.local(x).await?;
        let y = self.engine.to_spatial(&x, h, w)?;
        Ok(self.lv(y, class))
    }

    /// The cached attention delta of transformer block `block`, when this call reuses it.
    fn reused_attention(&self, block: &str) -> Option<Val<E>> {
        let r = self.reuse.as_ref()?;
        if self.call_index() < r.from_call {
            return None;
        }
        r.deltas.get(block).cloned()
    }

    /// Offers a block's attention result: at the last call before the gate, the delta
    /// `after − before` is kept (computed on the phone, which holds both).
    async fn offer_attention(
        &mut self,
        block: &str,
        before: &Val<E>,
        after: &Val<E>,
    ) -> Result<()> {
        let gate = match &self.reuse {
            Some(r) if r.from_call == self.call_index() + 1 => r.from_call,
            _ => return Ok(()),
        };
        let class = DepClass::of([before.class(), after.class()]);
        let b = self.local(before).await?;
        let a = self.local(after).await?;
        let delta = self.engine.add(&a, &self.engine.scale(&b, -1.0)?)?;
        self.acct.device_flops += flops::elementwise(&self.engine.dims(&a), 2);
        let v = self.lv(delta, class);
        if let Some(r) = self.reuse.as_mut().filter(|r| r.from_call == gate) {
            r.deltas.insert(block.to_string(), v);
        }
        Ok(())
    }
}
