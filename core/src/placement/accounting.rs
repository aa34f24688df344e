//! Accounting: what every offloaded op moved (bytes up and down per backend), how many round
//! trips it took, and the FLOPs each party spent. The runtime fills it during real runs and
//! during shape-only plans alike, so `veil plan` and `--stats` come from one code path.

use serde::Serialize;

/// The kind of an offloaded op, for PPIDM-style tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Conv,
    Attention,
    GroupNorm,
    /// Strict: strips gathered to the phone (for the attention sub-layers, or the output).
    Gather,
    /// Strict: neighbour rows fetched for a convolution outside a GroupNorm round trip.
    Halo,
    /// Obfuscated: the early steps of all candidates (prompts and noise up, latents down).
    EarlySteps,
}

impl OpKind {
    pub const ALL: [OpKind; 6] = [
        OpKind::Conv,
        OpKind::Attention,
        OpKind::GroupNorm,
        OpKind::Gather,
        OpKind::Halo,
        OpKind::EarlySteps,
    ];
    pub fn label(self) -> &'static str {
        match self {
            OpKind::Conv => "Conv",
            OpKind::Attention => "Att",
            OpKind::GroupNorm => "GN",
            OpKind::Gather => "Gather",
            OpKind::Halo => "Halo",
            OpKind::EarlySteps => "Early",
        }
    }
}

/// One offloaded op: bytes each backend received (up) and returned (down), as tensors in the
/// wire dtype (`up`, `down`) and as they travelled after the shard codec and compression
/// (`sent_up`, `sent_down`; the same numbers where nothing crossed a wire, as in plans).
#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    pub kind: OpKind,
    pub layer: String,
    pub up: Vec<u64>,
    pub down: Vec<u64>,
    pub sent_up: Vec<u64>,
    pub sent_down: Vec<u64>,
}

impl Transfer {
    /// A transfer whose bytes travelled as they are.
    pub fn uncoded(kind: OpKind, layer: String, up: Vec<u64>, down: Vec<u64>) -> Self {
        Self {
            kind,
            layer,
            sent_up: up.clone(),
            sent_down: down.clone(),
            up,
            down,
        }
    }
}

/// Totals for one run (one U-Net call, or a whole generation).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Accounting {
    pub backends: usize,
    pub transfers: Vec<Transfer>,
    pub round_trips: u64,
    pub device_flops: u64,
    pub server_flops: Vec<u64>,
    pub unet_calls: u64,
}

impl Accounting {
    pub fn new(backends: usize) -> Self {
        Self {
            backends,
            server_flops: vec![0; backends],
            ..Default::default()
        }
    }
    /// Tensor payload bytes sent to the servers, as they travelled (after the shard codec and
    /// compression).
    pub fn bytes_up(&self) -> u64 {
        self.transfers.iter().flat_map(|t| &t.sent_up).sum()
    }
    pub fn bytes_down(&self) -> u64 {
        self.transfers.iter().flat_map(|t| &t.sent_down).sum()
    }
    pub fn bytes_up_of(&self, backend: usize) -> u64 {
        self.transfers.iter().map(|t| t.sent_up[backend]).sum()
    }
    pub fn bytes_down_of(&self, backend: usize) -> u64 {
        self.transfers.iter().map(|t| t.sent_down[backend]).sum()
    }
    /// Tensor bytes sent to the servers at the wire dtype, before any codec or compression.
    pub fn raw_bytes_up(&self) -> u64 {
        self.transfers.iter().flat_map(|t| &t.up).sum()
    }
    pub fn raw_bytes_down(&self) -> u64 {
        self.transfers.iter().flat_map(|t| &t.down).sum()
    }
    pub fn server_flops_total(&self) -> u64 {
        self.server_flops.iter().sum()
    }
    /// Adds another run's totals (e.g. per-step accounting into a generation's).
    pub fn absorb(&mut self, other: Accounting) {
        self.transfers.extend(other.transfers);
        self.round_trips += other.round_trips;
        self.device_flops += other.device_flops;
        for (a, b) in self.server_flops.iter_mut().zip(other.server_flops) {
            *a += b;
        }
        self.unet_calls += other.unet_calls;
    }
}

/// FLOP counts (multiply and add counted separately), from shapes alone.
pub mod flops {
    fn prod(d: &[usize]) -> u64 {
        d.iter().map(|&x| x as u64).product()
    }
    /// A convolution producing `out` [B, Cout, H, W] from `cin` channels with a k×k kernel.
    pub fn conv2d(out: &[usize], cin: usize, k: usize) -> u64 {
        2 * prod(out) * (cin * k * k) as u64 + prod(out)
    }
    pub fn linear(out: &[usize], in_features: usize) -> u64 {
        2 * prod(out) * in_features as u64 + prod(out)
    }
    /// QKᵀ and AV matmuls plus the softmax, for q [B, Tq, C] against Tk keys.
    pub fn attention(q: &[usize], tk: usize, heads: usize) -> u64 {
        let (b, tq, c) = (q[0] as u64, q[1] as u64, q[2] as u64);
        4 * b * tq * tk as u64 * c + 5 * b * heads as u64 * tq * tk as u64
    }
    /// Statistics of a block (sum, deviations, squares).
    pub fn group_norm_stats(x: &[usize]) -> u64 {
        4 * prod(x)
    }
    /// Normalisation and affine.
    pub fn norm_apply(x: &[usize]) -> u64 {
        4 * prod(x)
    }
    pub fn elementwise(x: &[usize], per_element: u64) -> u64 {
        per_element * prod(x)
    }
}
