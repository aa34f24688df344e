//! The SDK's typed options: placement policy, scheduler, wire format, activation codec and
//! device. Apps pick a variant instead of typing a name (`"strict"` was one typo from
//! `"ppidm"`); with the `uniffi` feature they are Swift and Kotlin enums. Each maps onto the
//! internal type the runtime uses, so nothing here is parsed twice.

use std::fmt;
use std::str::FromStr;

use crate::model::device::DeviceChoice;
use crate::placement::policy::{GnVariant, Policy as PlacementPolicy};
use crate::vocab::job::SchedulerKind;
use crate::vocab::precision::{ShardCodec, WireDtype};

use super::error::VeilError;

/// Where the U-Net's work runs, and so what each server can learn (docs/PRIVACY.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
pub enum Policy {
    /// Each server holds only its own spatial strip (plus one halo row); everything
    /// text-derived stays on the phone. Recommended.
    Strict,
    /// One full-model server runs the first steps of K candidate prompts that differ only in
    /// their sensitive attributes (ObCLIP); the phone finishes its own.
    Obfuscated,
    /// Everything on the phone; no servers.
    Local,
    /// Research only: PPIDM's split, whose servers recover the prompt through attention keys
    /// and values. Refused unless `VeilConfig::allow_research_policies` is set.
    Ppidm,
}

/// The denoising scheduler (diffusers' names in the comments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
pub enum Scheduler {
    /// `DDIMScheduler`.
    Ddim,
    /// `DPMSolverMultistepScheduler` (DPM-Solver++ 2M).
    DpmSolverMultistep,
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `EulerAncestralDiscreteScheduler` (stochastic; SD-Turbo with `trailing` spacing).
    EulerAncestral,
    /// `LCMScheduler` (Latent Consistency Models; stochastic).
    Lcm,
}

/// The dtype tensors travel in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
pub enum WireFormat {
    F32,
    /// Half the bytes of f32; lossy (docs/BENCHMARKS.md).
    F16,
    Bf16,
}

/// Lossy coding of activations on the wire (docs/PROTOCOL.md §8); `Exact` sends them in the
/// wire format as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
pub enum WireCodec {
    Exact,
    Int8,
    Int4,
    ResidualInt4,
    ResidualInt2,
    ResidualSign,
    ResidualEntropy,
}

/// Where the phone's share of the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
pub enum Device {
    /// Metal on Apple targets in a build with Metal, else the CPU.
    Auto,
    Cpu,
    /// A Metal device that cannot be created falls back to the CPU (logged).
    Metal,
}

/// Names and parsing, for Rust callers that read settings from text (a config file).
macro_rules! names {
    ($ty:ident, $what:literal, $($variant:ident => $name:literal),+ $(,)?) => {
        impl $ty {
            /// The name the CLI and the docs use.
            pub fn name(self) -> &'static str {
                match self { $(Self::$variant => $name),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
        impl FromStr for $ty {
            type Err = VeilError;
            fn from_str(s: &str) -> Result<Self, VeilError> {
                match s.trim() {
                    $($name => Ok(Self::$variant),)+
                    other => Err(VeilError::config(format!(
                        concat!("unknown ", $what, " `{}` (expected {})"),
                        other,
                        [$($name),+].join(", ")
                    ))),
                }
            }
        }
    };
}

names!(Policy, "policy", Strict => "strict", Obfuscated => "obfuscated", Local => "local",
    Ppidm => "ppidm");
names!(Scheduler, "scheduler", Ddim => "ddim", DpmSolverMultistep => "dpm++2m",
    Euler => "euler", EulerAncestral => "euler-a", Lcm => "lcm");
names!(WireFormat, "wire format", F32 => "f32", F16 => "f16", Bf16 => "bf16");
names!(WireCodec, "codec", Exact => "none", Int8 => "int8", Int4 => "int4",
    ResidualInt4 => "residual-int4", ResidualInt2 => "residual-int2",
    ResidualSign => "residual-sign", ResidualEntropy => "residual-entropy");
names!(Device, "device", Auto => "auto", Cpu => "cpu", Metal => "metal");

impl Policy {
    pub(crate) fn placement(self) -> PlacementPolicy {
        match self {
            Self::Strict => PlacementPolicy::Strict,
            Self::Obfuscated => PlacementPolicy::Obfuscated,
            Self::Local => PlacementPolicy::Local,
            Self::Ppidm => PlacementPolicy::Ppidm {
                gn: GnVariant::Exact,
            },
        }
    }

    /// Whether a generation under this policy sends anything to a server.
    pub fn needs_servers(self) -> bool {
        self != Self::Local
    }
}

impl From<Scheduler> for SchedulerKind {
    fn from(s: Scheduler) -> Self {
        match s {
            Scheduler::Ddim => Self::Ddim,
            Scheduler::DpmSolverMultistep => Self::DpmSolverMultistep,
            Scheduler::Euler => Self::EulerDiscrete,
            Scheduler::EulerAncestral => Self::EulerAncestral,
            Scheduler::Lcm => Self::Lcm,
        }
    }
}

impl From<WireFormat> for WireDtype {
    fn from(w: WireFormat) -> Self {
        match w {
            WireFormat::F32 => Self::F32,
            WireFormat::F16 => Self::F16,
            WireFormat::Bf16 => Self::Bf16,
        }
    }
}

impl From<WireCodec> for ShardCodec {
    fn from(c: WireCodec) -> Self {
        match c {
            WireCodec::Exact => Self::None,
            WireCodec::Int8 => Self::Int8,
            WireCodec::Int4 => Self::Int4,
            WireCodec::ResidualInt4 => Self::ResidualInt4,
            WireCodec::ResidualInt2 => Self::ResidualInt2,
            WireCodec::ResidualSign => Self::ResidualSign,
            WireCodec::ResidualEntropy => Self::ResidualEntropy,
        }
    }
}

impl From<Device> for DeviceChoice {
    fn from(d: Device) -> Self {
        match d {
            Device::Auto => Self::Auto,
            Device::Cpu => Self::Cpu,
            Device::Metal => Self::Metal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_internal_parsers() {
        for p in [
            Policy::Strict,
            Policy::Obfuscated,
            Policy::Local,
            Policy::Ppidm,
        ] {
            assert_eq!(p.name().parse::<Policy>().unwrap(), p);
            assert_eq!(p.placement().name(), p.name());
        }
        for s in [
            Scheduler::Ddim,
            Scheduler::DpmSolverMultistep,
            Scheduler::Euler,
            Scheduler::EulerAncestral,
            Scheduler::Lcm,
        ] {
            assert_eq!(s.name().parse::<SchedulerKind>().unwrap(), s.into());
        }
        for w in [WireFormat::F32, WireFormat::F16, WireFormat::Bf16] {
            assert_eq!(w.name().parse::<WireDtype>().unwrap(), w.into());
        }
        for c in [
            WireCodec::Exact,
            WireCodec::Int8,
            WireCodec::Int4,
            WireCodec::ResidualInt4,
            WireCodec::ResidualInt2,
            WireCodec::ResidualSign,
            WireCodec::ResidualEntropy,
        ] {
            assert_eq!(c.name().parse::<ShardCodec>().unwrap(), c.into());
        }
        for d in [Device::Auto, Device::Cpu, Device::Metal] {
            assert_eq!(d.name().parse::<DeviceChoice>().unwrap(), d.into());
        }
        let e = "strikt".parse::<Policy>().unwrap_err().to_string();
        assert!(
            e.contains("unknown policy `strikt`") && e.contains("strict"),
            "{e}"
        );
    }
}
