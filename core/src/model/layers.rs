//! Layer specifications: what a layer is (its diffusers name, channels, kernel), not its
//! weights. The U-Net is a tree of these; an `Engine` looks weights up by name, so the same
//! tree runs on real tensors, on shapes (for `veil plan`), or on a shard server that holds only
//! the weights it needs.

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
}

/// A linear layer, `name.weight` [out, in] and optionally `name.bias` [out].
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSpec {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

impl LinearSpec {
    pub fn new(name: String, i: usize, o: usize, bias: bool) -> Self {
        Self {
            name,
            in_features: i,
            out_features: o,
            bias,
        }
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
}

impl GroupNormSpec {
    pub fn new(name: String, groups: usize, channels: usize, eps: f64) -> Self {
        Self {
            name,
            groups,
            channels,
            eps,
        }
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
}

impl LayerNormSpec {
    pub fn new(name: String, dim: usize, eps: f64) -> Self {
        Self { name, dim, eps }
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
}
