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
