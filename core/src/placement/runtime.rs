//! The placement runtime: the U-Net calls it for every op, and it decides from the policy's
//! placement table whether the op runs on the device or is split over the shard backends. It
//! cuts the row blocks (with halo rows for convolutions), sends them concurrently, gathers the
//! results, rounds them through the wire dtype, and accounts bytes, round trips and FLOPs.

use std::sync::Arc;

use futures::future::try_join_all;

use crate::error::{Error, Result};
use crate::model::layers::{Conv2dSpec, GeluKind, GroupNormSpec, LayerNormSpec, LinearSpec};
use crate::placement::accounting::{flops, Accounting, OpKind, Transfer};
use crate::placement::backend::{Operand, ShardBackend, ShardCall, ShardOp, ShardRequest};
use crate::placement::engine::{Engine, Pad, WireDtype};
use crate::placement::policy::{partition, AttnPlace, ConvPlace, GnPlace, GnVariant, Placement};

/// Default number of query rows per attention chunk (bounds the [heads, rows, keys] scores).
pub const DEFAULT_ATTENTION_CHUNK: usize = 1024;

/// Executes U-Net ops for one run under one placement.
pub struct Runtime<'a, E: Engine> {
    engine: &'a E,
    placement: Placement,
    backends: &'a [Arc<dyn ShardBackend<E::T>>],
    wire: WireDtype,
    attention_chunk: usize,
    acct: Accounting,
}

fn prod(d: &[usize]) -> u64 {
    d.iter().map(|&x| x as u64).product()
}

impl<'a, E: Engine> Runtime<'a, E> {
    /// A runtime; a placement that splits work needs at least one backend.
    pub fn new(
        engine: &'a E,
        placement: Placement,
        backends: &'a [Arc<dyn ShardBackend<E::T>>],
        wire: WireDtype,
    ) -> Result<Self> {
        let splits = placement.conv != ConvPlace::Device
            || placement.group_norm != GnPlace::Device
            || placement.attention != AttnPlace::Device;
        if splits && backends.is_empty() {
            return Err(Error::InvalidArgument(
                "this placement offloads work but no shard backend was given".into(),
            ));
        }
        Ok(Self {
            engine,
            placement,
            backends,
            wire,
            attention_chunk: DEFAULT_ATTENTION_CHUNK,
            acct: Accounting::new(backends.len()),
        })
    }

    pub fn with_attention_chunk(mut self, chunk: usize) -> Self {
        self.attention_chunk = chunk.max(1);
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
    pub fn note_unet_call(&mut self) {
        self.acct.unet_calls += 1;
    }

    fn bytes(&self, t: &E::T) -> u64 {
        prod(&self.engine.dims(t)) * self.wire.size() as u64
    }

    /// Sends one request to each backend concurrently (one round trip) and returns each
    /// backend's replies, rounded through the wire dtype. Inline operands must already be
    /// rounded by the caller (`wire`).
    async fn round_trip(
        &mut self,
        kind: OpKind,
        layer: &str,
        requests: Vec<ShardRequest<E::T>>,
        server_flops: Vec<u64>,
    ) -> Result<Vec<Vec<E::T>>> {
        let up: Vec<u64> = requests
            .iter()
            .map(|r| {
                r.calls
                    .iter()
                    .flat_map(|c| c.op.inline_operands())
                    .map(|t| self.bytes(t))
                    .sum()
            })
            .collect();
        let futures = requests
            .into_iter()
            .zip(self.backends.iter())
            .enumerate()
            .map(|(i, (req, b))| async move {
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

    fn wire(&self, t: &E::T) -> Result<E::T> {
        self.engine.through_wire(t, self.wire)
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

    /// A convolution (PPICnv when split).
    pub async fn conv2d(&mut self, c: &Conv2dSpec, x: &E::T) -> Result<E::T> {
        let p = c.padding;
        let sym = Pad {
            top: p,
            bottom: p,
            left: p,
            right: p,
        };
        if self.placement.conv == ConvPlace::Device {
            let y = self.engine.conv2d(c, x, sym)?;
            self.acct.device_flops += flops::conv2d(&self.engine.dims(&y), c.in_channels, c.kernel);
            return Ok(y);
        }
        let d = self.engine.dims(x);
        let h = d[2];
        let out_rows = c.out_len(h);
        self.rows_check(&c.name, out_rows)?;
        let mut requests = Vec::new();
        let mut sflops = Vec::new();
        for r in partition(out_rows, self.backends.len()) {
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
            let out_dims = [d[0], c.out_channels, r.len(), c.out_len(d[3])];
            sflops.push(flops::conv2d(&out_dims, c.in_channels, c.kernel));
            requests.push(ShardRequest {
                calls: vec![ShardCall::reply(ShardOp::Conv2d {
                    layer: c.name.clone(),
                    input: Operand::Inline(block),
                    pad,
                })],
            });
        }
        let parts = Self::one_reply(
            self.round_trip(OpKind::Conv, &c.name, requests, sflops)
                .await?,
        )?;
        self.engine.cat(&parts, 2)
    }

    /// GroupNorm (PPIGN when split).
    pub async fn group_norm(&mut self, g: &GroupNormSpec, x: &E::T) -> Result<E::T> {
        let d = self.engine.dims(x);
        let variant = match self.placement.group_norm {
            GnPlace::Device => {
                let stats = self.engine.group_norm_stats(g, x)?;
                let moments = self.engine.merge_group_stats(&[stats])?;
                self.acct.device_flops += flops::group_norm_stats(&d) + flops::norm_apply(&d);
                return self.engine.group_norm_apply(g, x, &moments);
            }
            GnPlace::SplitRows(v) => v,
        };
        let h = d[2];
        self.rows_check(&g.name, h)?;
        let ranges = partition(h, self.backends.len());
        let mut requests = Vec::new();
        let mut blocks = Vec::new();
        let mut sflops = Vec::new();
        for r in &ranges {
            let block = self.wire(&self.engine.narrow(x, 2, r.start, r.len())?)?;
            sflops.push(flops::group_norm_stats(&self.engine.dims(&block)));
            requests.push(ShardRequest {
                calls: vec![ShardCall::reply(ShardOp::GroupNormStats {
                    layer: g.name.clone(),
                    input: Operand::Inline(block.clone()),
                })],
            });
            blocks.push(block);
        }
        let stats = Self::one_reply(
            self.round_trip(OpKind::GroupNorm, &g.name, requests, sflops)
                .await?,
        )?;
        self.acct.device_flops += flops::norm_apply(&d);
        match variant {
            GnVariant::Exact => {
                let moments = self.engine.merge_group_stats(&stats)?;
                self.engine.group_norm_apply(g, x, &moments)
            }
            GnVariant::Paper => {
                // Each block normalised with its own statistics, as the paper's PPIGN does.
                let mut outs = Vec::with_capacity(blocks.len());
                for (r, s) in ranges.iter().zip(&stats) {
                    let moments = self.engine.merge_group_stats(std::slice::from_ref(s))?;
                    let block = self.engine.narrow(x, 2, r.start, r.len())?;
                    outs.push(self.engine.group_norm_apply(g, &block, &moments)?);
                }
                self.engine.cat(&outs, 2)
            }
        }
    }

    /// The attention core (PPIAtt when split: Q rows split, K and V whole to every backend).
    pub async fn attention(
        &mut self,
        layer: &str,
        q: &E::T,
        k: &E::T,
        v: &E::T,
        heads: usize,
    ) -> Result<E::T> {
        let qd = self.engine.dims(q);
        let tk = self.engine.dims(k)[1];
        if self.placement.attention == AttnPlace::Device {
            self.acct.device_flops += flops::attention(&qd, tk, heads);
            return self.engine.attention(q, k, v, heads, self.attention_chunk);
        }
        self.rows_check(layer, qd[1])?;
        let (k, v) = (self.wire(k)?, self.wire(v)?);
        let mut requests = Vec::new();
        let mut sflops = Vec::new();
        for r in partition(qd[1], self.backends.len()) {
            let qb = self.wire(&self.engine.narrow(q, 1, r.start, r.len())?)?;
            sflops.push(flops::attention(&[qd[0], r.len(), qd[2]], tk, heads));
            requests.push(ShardRequest {
                calls: vec![ShardCall::reply(ShardOp::Attention {
                    q: Operand::Inline(qb),
                    k: Operand::Inline(k.clone()),
                    v: Operand::Inline(v.clone()),
                    heads,
                })],
            });
        }
        let parts = Self::one_reply(
            self.round_trip(OpKind::Attention, layer, requests, sflops)
                .await?,
        )?;
        self.engine.cat(&parts, 1)
    }

    // Ops that always run on the device under the policies implemented so far.

    pub fn linear(&mut self, l: &LinearSpec, x: &E::T) -> Result<E::T> {
        let y = self.engine.linear(l, x)?;
        self.acct.device_flops += flops::linear(&self.engine.dims(&y), l.in_features);
        Ok(y)
    }
    pub fn layer_norm(&mut self, l: &LayerNormSpec, x: &E::T) -> Result<E::T> {
        self.acct.device_flops +=
            flops::group_norm_stats(&self.engine.dims(x)) + flops::norm_apply(&self.engine.dims(x));
        self.engine.layer_norm(l, x)
    }
    pub fn silu(&mut self, x: &E::T) -> Result<E::T> {
        self.acct.device_flops += flops::elementwise(&self.engine.dims(x), 4);
        self.engine.silu(x)
    }
    pub fn geglu(&mut self, x: &E::T, kind: GeluKind) -> Result<E::T> {
        self.acct.device_flops += flops::elementwise(&self.engine.dims(x), 4);
        self.engine.geglu(x, kind)
    }
    pub fn add(&mut self, a: &E::T, b: &E::T) -> Result<E::T> {
        self.acct.device_flops += flops::elementwise(&self.engine.dims(a), 1);
        self.engine.add(a, b)
    }
    pub fn scale(&mut self, x: &E::T, f: f64) -> Result<E::T> {
        self.acct.device_flops += flops::elementwise(&self.engine.dims(x), 1);
        self.engine.scale(x, f)
    }
    pub fn add_channel_bias(&mut self, x: &E::T, e: &E::T) -> Result<E::T> {
        self.acct.device_flops += flops::elementwise(&self.engine.dims(x), 1);
        self.engine.add_channel_bias(x, e)
    }
    pub fn cat(&mut self, xs: &[E::T], dim: usize) -> Result<E::T> {
        self.engine.cat(xs, dim)
    }
    pub fn upsample_nearest(&mut self, x: &E::T, h: usize, w: usize) -> Result<E::T> {
        self.engine.upsample_nearest(x, h, w)
    }
    pub fn to_tokens(&mut self, x: &E::T) -> Result<E::T> {
        self.engine.to_tokens(x)
    }
    pub fn to_spatial(&mut self, x: &E::T, h: usize, w: usize) -> Result<E::T> {
        self.engine.to_spatial(x, h, w)
    }
    pub fn timestep_embedding(
        &mut self,
        t: f64,
        batch: usize,
        dim: usize,
        flip: bool,
        shift: f64,
    ) -> Result<E::T> {
        self.engine.timestep_embedding(t, batch, dim, flip, shift)
    }
    pub fn dims(&self, t: &E::T) -> Vec<usize> {
        self.engine.dims(t)
    }
}
