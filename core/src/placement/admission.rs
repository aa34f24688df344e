//! Admission before allocation: from the operands' shapes alone, what a shard op will produce
//! and an upper bound on what it allocates while running (output, padded input, im2col
//! columns, attention score chunks), with checked arithmetic — so a request whose shapes wrap,
//! claim more elements than memory holds, or exceed a budget is refused before any tensor is
//! allocated. The server admits every op against its limits and a process-wide budget
//! (`MemoryBudget`); the phone derives what each reply must look like from the same rules.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::vocab::error::{Error, Result};
use crate::vocab::layers::ShardLayer;
use crate::vocab::ops::{Operand, ShardOp};

/// What an admitted op will produce and the most it may hold in memory while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub out: Vec<usize>,
    pub peak_bytes: u64,
}

fn refuse(msg: String) -> Error {
    Error::InvalidArgument(format!("refused before running: {msg}"))
}

/// Bytes of an f32 tensor of dimensions `d`, or an error where the count overflows.
pub fn f32_bytes(d: &[usize]) -> Result<u64> {
    d.iter()
        .try_fold(4u64, |acc, &x| acc.checked_mul(x as u64))
        .ok_or_else(|| refuse(format!("{d:?} has more elements than memory holds")))
}

fn add(a: u64, b: u64) -> Result<u64> {
    a.checked_add(b)
        .ok_or_else(|| refuse("byte count overflows".into()))
}

fn mul(a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| refuse(format!("{a} × {b} overflows")))
}

fn rank<const N: usize>(d: &[usize], what: &str) -> Result<[usize; N]> {
    <[usize; N]>::try_from(d).map_err(|_| refuse(format!("{what} needs rank {N}, got {d:?}")))
}

/// `bytes` times `k` (a small constant count of same-sized temporaries).
fn times(bytes: u64, k: u64) -> Result<u64> {
    bytes
        .checked_mul(k)
        .ok_or_else(|| refuse("byte count overflows".into()))
}

/// Admits `op` given its operands' dimensions (`dims`) and this server's layers; `None` for an
/// op without a result (a release). `attention_chunk` is the executor's query chunk.
pub fn admit<T>(
    op: &ShardOp<T>,
    layers: &HashMap<String, ShardLayer>,
    dims: &dyn Fn(&Operand<T>) -> Result<Vec<usize>>,
    attention_chunk: usize,
) -> Result<Option<Admission>> {
    let same = |d: Vec<usize>, k: u64| -> Result<Admission> {
        let b = f32_bytes(&d)?;
        Ok(Admission {
            out: d,
            peak_bytes: times(b, k)?,
        })
    };
    let layer = |name: &str| {
        layers
            .get(name)
            .ok_or_else(|| Error::InvalidArgument(format!("this shard holds no layer `{name}`")))
    };
    Ok(Some(match op {
        ShardOp::Release { .. } => return Ok(None),
        ShardOp::Conv2d {
            layer: l,
            input,
            pad,
        } => {
            let ShardLayer::Conv2d(c) = layer(l)? else {
                return Err(refuse(format!("`{l}` is not a convolution")));
            };
            let [b, ch, h, w] = rank::<4>(&dims(input)?, "a convolution")?;
            if ch != c.in_channels || c.kernel == 0 || c.stride == 0 {
                return Err(refuse(format!("`{l}` on {ch} channels")));
            }
            let ph = h
                .checked_add(pad.top)
                .and_then(|v| v.checked_add(pad.bottom));
            let pw = w
                .checked_add(pad.left)
                .and_then(|v| v.checked_add(pad.right));
            let (Some(ph), Some(pw)) = (ph, pw) else {
                return Err(refuse(format!("padding {pad:?} overflows")));
            };
            if ph < c.kernel || pw < c.kernel {
                return Err(refuse(format!(
                    "`{l}`: a {}×{} kernel on a padded {ph}×{pw} input",
                    c.kernel, c.kernel
                )));
            }
            let (ho, wo) = (
                (ph - c.kernel) / c.stride + 1,
                (pw - c.kernel) / c.stride + 1,
            );
            let out = vec![b, c.out_channels, ho, wo];
            // The padded copy and im2col's columns [b·ho·wo, c·k·k] besides the output (also a
            // bound on the tap path's bands and on Winograd's transformed inputs, 16 values per
            // 2×2 tile and channel) …
            let cols = [b, ho, wo, ch, c.kernel, c.kernel];
            let mut peak = add(
                add(f32_bytes(&out)?, f32_bytes(&[b, ch, ph, pw])?)?,
                f32_bytes(&cols)?,
            )?;
            if c.kernel == 3 && c.stride == 1 {
                // … and Winograd's transformed kernel [co, 16, ci] and products [co, 16, tiles],
                // which the columns do not bound (`model::winograd`).
                let tiles = [b, ho.div_ceil(2), wo.div_ceil(2)];
                let tiles = tiles.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                let tiles =
                    tiles.ok_or_else(|| refuse("a convolution's tile count overflows".into()))?;
                peak = add(peak, f32_bytes(&[c.out_channels, 16, ch])?)?;
                peak = add(peak, f32_bytes(&[c.out_channels, 16, tiles])?)?;
            }
            Admission {
                out,
                peak_bytes: peak,
            }
        }
        ShardOp::GroupNormStats { layer: l, input } => {
            let ShardLayer::GroupNorm(g) = layer(l)? else {
                return Err(refuse(format!("`{l}` is not a GroupNorm")));
            };
            let d = dims(input)?;
            let [b, ch, _, _] = rank::<4>(&d, "GroupNorm statistics")?;
            if ch != g.channels || g.groups == 0 || ch % g.groups != 0 {
                return Err(refuse(format!("`{l}` on {d:?}")));
            }
            let x = f32_bytes(&d)?;
            let out = vec![b, g.groups, 3];
            Admission {
                peak_bytes: add(times(x, 2)?, f32_bytes(&out)?)?,
                out,
            }
        }
        ShardOp::GroupNormApply {
            layer: l,
            input,
            moments,
        } => {
            let ShardLayer::GroupNorm(g) = layer(l)? else {
                return Err(refuse(format!("`{l}` is not a GroupNorm")));
            };
            let (xd, md) = (dims(input)?, dims(moments)?);
            let [b, ch, _, _] = rank::<4>(&xd, "GroupNorm")?;
            if ch != g.channels || g.groups == 0 || ch % g.groups != 0 || md != [b, g.groups, 2] {
                return Err(refuse(format!("`{l}` on {xd:?} with moments {md:?}")));
            }
            same(xd, 3)?
        }
        ShardOp::LayerNorm { layer: l, input } => {
            let ShardLayer::LayerNorm(n) = layer(l)? else {
                return Err(refuse(format!("`{l}` is not a LayerNorm")));
            };
            let d = dims(input)?;
            if d.last() != Some(&n.dim) {
                return Err(refuse(format!("`{l}` on {d:?}")));
            }
            same(d, 3)?
        }
        ShardOp::Linear { layer: l, input } => {
            let ShardLayer::Linear(n) = layer(l)? else {
                return Err(refuse(format!("`{l}` is not a linear layer")));
            };
            let d = dims(input)?;
            if d.is_empty() || d.last() != Some(&n.in_features) {
                return Err(refuse(format!("`{l}` on {d:?}")));
            }
            let mut out = d.clone();
            if let Some(last) = out.last_mut() {
                *last = n.out_features;
            }
            Admission {
                peak_bytes: add(times(f32_bytes(&out)?, 2)?, f32_bytes(&d)?)?,
                out,
            }
        }
        ShardOp::Attention { q, k, v, heads } => {
            attention(&dims(q)?, &dims(k)?, &dims(v)?, *heads, attention_chunk)?
        }
        ShardOp::Identity { input } => Admission {
            out: dims(input)?,
            peak_bytes: 0,
        },
        ShardOp::Silu { input } | ShardOp::Scale { input, .. } => same(dims(input)?, 2)?,
        ShardOp::Geglu { input, .. } => {
            let mut d = dims(input)?;
            match d.last_mut() {
                Some(l) if *l % 2 == 0 && *l > 0 => *l /= 2,
                _ => return Err(refuse(format!("GEGLU on {d:?}"))),
            }
            same(d, 4)?
        }
        ShardOp::Add { a, b } => {
            let (a, b) = (dims(a)?, dims(b)?);
            if a != b {
                return Err(refuse(format!("add of {a:?} and {b:?}")));
            }
            same(a, 1)?
        }
        ShardOp::AddChannelBias { input, bias } => {
            let (x, e) = (dims(input)?, dims(bias)?);
            let [b, c, _, _] = rank::<4>(&x, "a channel bias")?;
            if e != [b, c] {
                return Err(refuse(format!("channel bias {e:?} on {x:?}")));
            }
            same(x, 2)?
        }
        ShardOp::TimestepEmbedding { batch, dim, .. } => {
            if *batch == 0 || *batch > 4096 || *dim == 0 || *dim > (1 << 16) {
                return Err(refuse(format!("timestep embedding {batch}×{dim}")));
            }
            same(vec![*batch, *dim], 3)?
        }
        ShardOp::Narrow {
            input,
            dim,
            start,
            len,
        } => {
            let mut d = dims(input)?;
            let size = d
                .get(*dim)
                .copied()
                .ok_or_else(|| refuse(format!("narrow on dim {dim} of {d:?}")))?;
            if *len == 0 || start.checked_add(*len).is_none_or(|e| e > size) {
                return Err(refuse(format!(
                    "narrow {start}+{len} of dim {dim} of {d:?}"
                )));
            }
            d[*dim] = *len;
            same(d, 1)?
        }
        ShardOp::Cat { inputs, dim } => {
            let all = inputs.iter().map(dims).collect::<Result<Vec<_>>>()?;
            same(cat(&all, *dim)?, 1)?
        }
        ShardOp::UpsampleRows {
            input,
            dst_h,
            dst_first,
            dst_len,
            dst_w,
            ..
        } => {
            let [b, c, _, _] = rank::<4>(&dims(input)?, "an up-sampling")?;
            if *dst_len == 0
                || *dst_w == 0
                || *dst_h > (1 << 16)
                || *dst_w > (1 << 16)
                || dst_first.checked_add(*dst_len).is_none_or(|e| e > *dst_h)
            {
                return Err(refuse(format!(
                    "up-sampling to rows {dst_first}+{dst_len} of {dst_h}, {dst_w} wide"
                )));
            }
            same(vec![b, c, *dst_len, *dst_w], 2)?
        }
        ShardOp::ToTokens { input } => {
            let [b, c, h, w] = rank::<4>(&dims(input)?, "to_tokens")?;
            same(vec![b, mul(h, w)?, c], 2)?
        }
        ShardOp::ToSpatial { input, h, w } => {
            let d = dims(input)?;
            let [b, n, c] = rank::<3>(&d, "to_spatial")?;
            if h.checked_mul(*w) != Some(n) {
                return Err(refuse(format!("to_spatial {h}×{w} of {d:?}")));
            }
            same(vec![b, c, *h, *w], 2)?
        }
    }))
}

/// softmax(q kᵀ/√d) v by query chunks: q [B, Tq, C], k and v [B, Tk, C], `heads` dividing C.
fn attention(
    q: &[usize],
    k: &[usize],
    v: &[usize],
    heads: usize,
    chunk: usize,
) -> Result<Admission> {
    let [b, tq, c] = rank::<3>(q, "attention queries")?;
    let [bk, tk, ck] = rank::<3>(k, "attention keys")?;
    if k != v || bk != b || ck != c || tk == 0 || heads == 0 || c % heads != 0 {
        return Err(refuse(format!(
            "attention of q {q:?}, k {k:?}, v {v:?} with {heads} heads"
        )));
    }
    let rows = chunk.max(1).min(tq);
    // Per-head copies of q, k, v and the output; one chunk's scores and probabilities.
    let copies = times(add(f32_bytes(q)?, times(f32_bytes(k)?, 2)?)?, 2)?;
    let scores = times(f32_bytes(&[b, heads, rows, tk])?, 2)?;
    Ok(Admission {
        out: q.to_vec(),
        peak_bytes: add(copies, scores)?,
    })
}

/// Dimensions of a concatenation along `dim`: equal ranks, equal sizes off `dim`.
fn cat(all: &[Vec<usize>], dim: usize) -> Result<Vec<usize>> {
    let first = all
        .first()
        .ok_or_else(|| refuse("an empty concatenation".into()))?;
    if dim >= first.len() {
        return Err(refuse(format!("cat on dim {dim} of {first:?}")));
    }
    let mut out = first.clone();
    out[dim] = 0;
    for d in all {
        let fits = d.len() == first.len()
            && d.iter()
                .zip(first)
                .enumerate()
                .all(|(i, (a, b))| i == dim || a == b);
        if !fits {
            return Err(refuse(format!("cat of {first:?} and {d:?} on dim {dim}")));
        }
        out[dim] = out[dim]
            .checked_add(d[dim])
            .ok_or_else(|| refuse("concatenated size overflows".into()))?;
    }
    Ok(out)
}

/// A byte budget shared by every session of a process: each op reserves its admitted peak
/// before it runs and each kept tensor its size while it is held; a reservation that does not
/// fit is refused (the request fails, the process lives).
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Reserves `bytes` until the returned guard is dropped, or refuses.
    pub fn reserve(self: &Arc<Self>, bytes: u64, what: &str) -> Result<Reservation> {
        let mut now = self.used.load(Ordering::Acquire);
        loop {
            let next = now
                .checked_add(bytes)
                .filter(|&n| n <= self.limit)
                .ok_or_else(|| {
                    refuse(format!(
                        "{what} needs {bytes} bytes; the server's memory budget has {} of {} left",
                        self.limit.saturating_sub(now),
                        self.limit
                    ))
                })?;
            match self
                .used
                .compare_exchange(now, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Reservation {
                        budget: Arc::clone(self),
                        bytes,
                    })
                }
                Err(actual) => now = actual,
            }
        }
    }
}

/// Bytes held from a `MemoryBudget`, given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::layers::Conv2dSpec;
    use crate::vocab::precision::Pad;

    /// A conv op on an operand of dimensions `d` through a layer of kernel `k`; its admitted peak.
    fn conv_peak(ci: usize, co: usize, k: usize, d: [usize; 4]) -> u64 {
        let mut layers = HashMap::new();
        let spec = Conv2dSpec::new("c".into(), ci, co, k, 1, k / 2);
        layers.insert("c".to_string(), ShardLayer::Conv2d(spec));
        let p = k / 2;
        let op: ShardOp<()> = ShardOp::Conv2d {
            layer: "c".into(),
            input: Operand::Handle(0),
            pad: Pad {
                top: p,
                bottom: p,
                left: p,
                right: p,
            },
        };
        let dims = |_: &Operand<()>| Ok(d.to_vec());
        let a = admit(&op, &layers, &dims, 1024).expect("admitted");
        a.expect("a result").peak_bytes
    }

    #[test]
    fn a_3x3_convolution_counts_winograds_kernel_and_products() {
        // SD1.5's widest up-block conv at 16×16, CFG batch 2: 128 tiles, the Winograd path.
        let (b, ci, co, h) = (2, 2560, 1280, 16);
        let peak = conv_peak(ci, co, 3, [b, ci, h, h]);
        let f = |n: usize| 4 * n as u64;
        let out = f(b * co * h * h);
        let padded = f(b * ci * (h + 2) * (h + 2));
        let cols = f(b * h * h * ci * 9);
        let kernel = f(co * 16 * ci);
        let products = f(co * 16 * b * (h / 2) * (h / 2));
        assert_eq!(peak, out + padded + cols + kernel + products);
        // A 1×1 convolution has no Winograd term.
        let peak = conv_peak(ci, co, 1, [b, ci, h, h]);
        assert_eq!(
            peak,
            f(b * co * h * h) + f(b * ci * h * h) + f(b * h * h * ci)
        );
    }
}
