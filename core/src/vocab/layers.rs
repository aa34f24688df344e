//! Layer specifications: what a layer is (its diffusers name, channels, kernel), not its
//! weights. The U-Net is a tree of these; an `Engine` looks weights up by name, so the same
//! tree runs on real tensors, on shapes (for `veil plan`), or on a shard server that holds only
//! the weights it needs.

use crate::vocab::precision::Pad;

/// A 2-D convolution, `name.weight` [out, in, k, k] and `name.bias` [out].
#[derive(Debug, Clone, PartialEq)]
pub struct Conv2dSpec {
    pub name: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2dSpec {
    pub fn new(
        name: String,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        Self {
            name,
            in_channels: cin,
            out_channels: cout,
            kernel,
            stride,
            padding,
        }
    }
    pub fn params(&self) -> Vec<(String, Vec<usize>)> {
        vec![
            (
                format!("{}.weight", self.name),
                vec![
                    self.out_channels,
                    self.in_channels,
                    self.kernel,
                    self.kernel,
                ],
            ),
            (format!("{}.bias", self.name), vec![self.out_channels]),
        ]
    }
    /// Output rows for `rows` input rows.
    pub fn out_len(&self, len: usize) -> usize {
        (len + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1
    }

    /// The input rows of a `len`-row map that output rows `out` read, clipped to the map, and
    /// the explicit zero padding that stands for what falls outside it (rows above and below;
    /// the usual padding left and right). One rule for every row split of a convolution.
    pub fn input_rows(
        &self,
        out: &std::ops::Range<usize>,
        len: usize,
    ) -> (std::ops::Range<usize>, Pad) {
        let p = self.padding;
        // In padded coordinates: [first, end) may reach past the map on either side.
        let first = (out.start * self.stride) as isize - p as isize;
        let end = ((out.end - 1) * self.stride + self.kernel) as isize - p as isize;
        let lo = first.max(0) as usize;
        let hi = end.min(len as isize) as usize;
        let pad = Pad {
            top: (lo as isize - first) as usize,
            bottom: (end - hi as isize) as usize,
            left: p,
            right: p,
        };
        (lo..hi, pad)
    }
}

/// What a per-token layer is part of. Placement tables map roles to parties (strict runs the
/// feed-forward on the servers' strips and the attention sub-layers on the phone), so the
/// U-Net states what a layer *is* and never which party runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// LayerNorms before attention and the q/k/v/out projections.
    Attention,
    /// The GEGLU feed-forward and the LayerNorm before it.
    FeedForward,
    /// A transformer's proj_in / proj_out.
    Projection,
    /// The timestep MLP and the resnets' time_emb_proj.
    TimeEmbedding,
    /// SDXL's added conditioning (`add_embedding`) and, on a U-Net that has it, the timestep
    /// MLP and every resnet's time_emb_proj: the embedding they read carries the pooled text
    /// embedding, so every table runs them on the phone.
    PooledText,
    #[default]
    Other,
}

/// A linear layer, `name.weight` [out, in] and optionally `name.bias` [out].
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSpec {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    pub role: Role,
}

impl LinearSpec {
    pub fn new(name: String, i: usize, o: usize, bias: bool) -> Self {
        Self {
            name,
            in_features: i,
            out_features: o,
            bias,
            role: Role::Other,
        }
    }
    pub fn with_role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }
    pub fn params(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![(
            format!("{}.weight", self.name),
            vec![self.out_features, self.in_features],
        )];
        if self.bias {
            v.push((format!("{}.bias", self.name), vec![self.out_features]));
        }
        v
    }
}

/// GroupNorm with affine parameters `name.weight`/`name.bias` [channels].
#[derive(Debug, Clone, PartialEq)]
pub struct GroupNormSpec {
    pub name: String,
    pub groups: usize,
    pub channels: usize,
    pub eps: f64,
    /// Neighbour rows the op after this norm needs (1 before a 3×3 convolution, 0 before a
    /// 1×1 or per-token op). Strict placement fetches that many halo rows with the statistics.
    pub consumer_halo: usize,
}

impl GroupNormSpec {
    pub fn new(name: String, groups: usize, channels: usize, eps: f64) -> Self {
        Self {
            name,
            groups,
            channels,
            eps,
            consumer_halo: 1,
        }
    }
    pub fn with_consumer_halo(mut self, rows: usize) -> Self {
        self.consumer_halo = rows;
        self
    }
    pub fn params(&self) -> Vec<(String, Vec<usize>)> {
        vec![
            (format!("{}.weight", self.name), vec![self.channels]),
            (format!("{}.bias", self.name), vec![self.channels]),
        ]
    }
}

/// LayerNorm over the last dimension with affine parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormSpec {
    pub name: String,
    pub dim: usize,
    pub eps: f64,
    pub role: Role,
}

impl LayerNormSpec {
    pub fn new(name: String, dim: usize, eps: f64) -> Self {
        Self {
            name,
            dim,
            eps,
            role: Role::Other,
        }
    }
    pub fn with_role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }
    pub fn params(&self) -> Vec<(String, Vec<usize>)> {
        vec![
            (format!("{}.weight", self.name), vec![self.dim]),
            (format!("{}.bias", self.name), vec![self.dim]),
        ]
    }
}

/// Which GELU a GEGLU feed-forward uses. diffusers uses the exact (erf) form; candle-transformers'
/// SD module uses the tanh approximation, so comparisons against it must select `Tanh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GeluKind {
    #[default]
    Erf,
    Tanh,
}

/// The layers a shard server can be asked to run, by name.
#[derive(Debug, Clone, PartialEq)]
pub enum ShardLayer {
    Conv2d(Conv2dSpec),
    GroupNorm(GroupNormSpec),
    Linear(LinearSpec),
    LayerNorm(LayerNormSpec),
}

impl ShardLayer {
    pub fn name(&self) -> &str {
        match self {
            ShardLayer::Conv2d(c) => &c.name,
            ShardLayer::GroupNorm(g) => &g.name,
            ShardLayer::Linear(l) => &l.name,
            ShardLayer::LayerNorm(l) => &l.name,
        }
    }
    pub fn params(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            ShardLayer::Conv2d(c) => c.params(),
            ShardLayer::GroupNorm(g) => g.params(),
            ShardLayer::Linear(l) => l.params(),
            ShardLayer::LayerNorm(l) => l.params(),
        }
    }
}
