//! Precision and padding words shared by the runtime, the wire and the servers: the element
//! type tensors travel in, and the explicit zero padding of a split convolution.

use crate::vocab::error::{Error, Result};

/// Explicit zero padding (rows above and below, columns left and right) for a split convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pad {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

/// Element type of tensors on the wire between the phone and the shard servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl WireDtype {
    pub fn size(self) -> usize {
        match self {
            WireDtype::F32 => 4,
            WireDtype::F16 | WireDtype::Bf16 => 2,
        }
    }
}

impl std::str::FromStr for WireDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "f16" | "fp16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(Error::InvalidArgument(format!(
                "unknown wire dtype `{other}` (expected f32, f16 or bf16)"
            ))),
        }
    }
}

impl std::fmt::Display for WireDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireDtype::F32 => "f32",
            WireDtype::F16 => "f16",
            WireDtype::Bf16 => "bf16",
        })
    }
}

/// Lossy coding of the activations that cross the wire (`--compress`): block quantization,
/// alone or of the step-to-step change against a reference both ends keep (docs/PROTOCOL.md
/// §8). GroupNorm statistics and moments always travel exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum ShardCodec {
    /// Tensors travel in the wire dtype.
    #[default]
    None,
    /// 8-bit codes with one scale per block.
    Int8,
    /// 4-bit codes with one scale per block.
    Int4,
    /// The change since the last step, 4-bit, with error feedback.
    ResidualInt4,
    /// The change since the last step, 2-bit, with error feedback.
    ResidualInt2,
    /// The change since the last step as its sign and one magnitude per block, with error
    /// feedback.
    ResidualSign,
    /// The change since the last step at one uniform step per tensor (a fraction of its RMS),
    /// range-coded, with error feedback.
    ResidualEntropy,
}

impl ShardCodec {
    /// Every codec, in the order the CLI lists them.
    pub const ALL: [ShardCodec; 7] = [
        ShardCodec::None,
        ShardCodec::Int8,
        ShardCodec::Int4,
        ShardCodec::ResidualInt4,
        ShardCodec::ResidualInt2,
        ShardCodec::ResidualSign,
        ShardCodec::ResidualEntropy,
    ];

    /// The stable name (CLI, SDK, stats.json).
    pub fn name(self) -> &'static str {
        match self {
            ShardCodec::None => "none",
            ShardCodec::Int8 => "int8",
            ShardCodec::Int4 => "int4",
            ShardCodec::ResidualInt4 => "residual-int4",
            ShardCodec::ResidualInt2 => "residual-int2",
            ShardCodec::ResidualSign => "residual-sign",
            ShardCodec::ResidualEntropy => "residual-entropy",
        }
    }

    /// Whether the codec sends changes against a reference both ends keep.
    pub fn residual(self) -> bool {
        matches!(
            self,
            ShardCodec::ResidualInt4
                | ShardCodec::ResidualInt2
                | ShardCodec::ResidualSign
                | ShardCodec::ResidualEntropy
        )
    }
}

impl std::str::FromStr for ShardCodec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ShardCodec::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown codec `{s}` (expected one of {})",
                    ShardCodec::ALL.map(ShardCodec::name).join(", ")
                ))
            })
    }
}

impl std::fmt::Display for ShardCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
