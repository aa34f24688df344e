//! Where the phone's model runs: `auto`, `cpu` or `metal`. `auto` takes Metal on Apple targets
//! when this build has the `metal` feature, else the CPU. A Metal device that cannot be created
//! falls back to the CPU with the reason logged. No Metal device exists on the machines that
//! build and test Veil: that path compiles only where `metal` is on, and is kept to the one
//! `Device::new_metal` call below (see docs/ARCHITECTURE.md, "Devices").

use candle_core::Device;

use crate::vocab::error::{Error, Result};

/// The device a user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Metal,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            o => Err(Error::InvalidArgument(format!(
                "unknown device `{o}` (expected auto, cpu or metal)"
            ))),
        }
    }
}

impl DeviceChoice {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Metal => "metal",
        }
    }

    /// Whether this build can run Metal at all.
    pub const fn metal_built() -> bool {
        cfg!(all(feature = "metal", target_vendor = "apple"))
    }

    /// Checks the choice against this build: `metal` in a build without it is an error (the
    /// app asked for something this binary cannot do), not a silent CPU run.
    pub fn check(self) -> Result<()> {
        if self == Self::Metal && !Self::metal_built() {
            return Err(Error::Unsupported(
                "device metal: this build has no Metal (the `metal` feature on an Apple target)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The device to load onto, and why it is not the one asked for where it is not.
    pub fn select(self) -> Result<(Device, Option<String>)> {
        self.check()?;
        let want_metal = match self {
            Self::Cpu => false,
            Self::Metal => true,
            Self::Auto => Self::metal_built(),
        };
        if !want_metal {
            return Ok((Device::Cpu, None));
        }
        match new_metal() {
            Ok(d) => Ok((d, None)),
            Err(e) => {
                let reason = format!("Metal unavailable ({e}); running on the CPU");
                tracing::warn!("{reason}");
                Ok((Device::Cpu, Some(reason)))
            }
        }
    }
}

#[cfg(all(feature = "metal", target_vendor = "apple"))]
fn new_metal() -> candle_core::Result<Device> {
    Device::new_metal(0)
}

#[cfg(not(all(feature = "metal", target_vendor = "apple")))]
fn new_metal() -> candle_core::Result<Device> {
    Err(candle_core::Error::Msg("not built".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_selects_the_cpu_here() {
        for (s, c) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            (" metal ", DeviceChoice::Metal),
        ] {
            assert_eq!(s.parse::<DeviceChoice>().expect("parse"), c);
            assert_eq!(c.name(), s.trim());
        }
        assert!("gpu".parse::<DeviceChoice>().is_err());
        let (d, why) = DeviceChoice::Auto.select().expect("auto");
        assert!(d.is_cpu() || DeviceChoice::metal_built());
        assert!(why.is_none() || DeviceChoice::metal_built());
        assert!(DeviceChoice::Cpu.select().expect("cpu").0.is_cpu());
        if !DeviceChoice::metal_built() {
            let e = DeviceChoice::Metal.select().expect_err("no metal here");
            assert!(e.to_string().contains("no Metal"), "{e}");
        }
    }
}
