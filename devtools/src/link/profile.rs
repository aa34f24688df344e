//! What a link does to traffic (`LinkProfile`: rates, delay, queue) and how a user names one
//! (`"5g"`, `"up=81.14mbit,down=340.56mbit,rtt=30ms"`).

use std::fmt;
use std::time::Duration;

use super::{LinkError, MIN_QUEUE_BYTES};

/// One direction of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → server (the phone's uplink).
    Up,
    /// Server → client (the phone's downlink).
    Down,
}

/// What the emulated link does: per-direction bandwidth, round-trip time, queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkProfile {
    /// Uplink (client → server) bandwidth in bits per second; `f64::INFINITY` = no limit.
    pub up_bps: f64,
    /// Downlink (server → client) bandwidth in bits per second; `f64::INFINITY` = no limit.
    pub down_bps: f64,
    /// Round-trip time added by the link (RTT/2 each way).
    pub rtt: Duration,
    /// Drop-tail queue per direction in bytes; `None` = 2 × that direction's bandwidth-delay
    /// product, at least [`MIN_QUEUE_BYTES`].
    pub queue_bytes: Option<usize>,
}

impl LinkProfile {
    /// PPIDM's 5G assumption: 81.14 Mbit/s up, 340.56 Mbit/s down, 30 ms RTT.
    pub const fn five_g() -> Self {
        Self {
            up_bps: 81.14e6,
            down_bps: 340.56e6,
            rtt: Duration::from_millis(30),
            queue_bytes: None,
        }
    }

    /// `5g`, or comma-separated `key=value`: `up=100mbit,down=300mbit,rtt=20ms` (all three
    /// required) and optionally `queue=512kb`. Rates take `bit`, `kbit`, `mbit`, `gbit` (or
    /// `bps`, `kbps`, `mbps`, `gbps`; decimal prefixes; a bare number is bit/s) or `inf`; times
    /// `us`, `ms`, `s`; queue sizes `b`, `kb`, `mb` (decimal) or `kib`, `mib`.
    pub fn parse(text: &str) -> Result<Self, LinkError> {
        let err = |message: String| LinkError::Profile {
            profile: text.to_string(),
            message,
        };
        let t = text.trim();
        if t.eq_ignore_ascii_case("5g") {
            return Ok(Self::five_g());
        }
        let (mut up, mut down, mut rtt, mut queue) = (None, None, None, None);
        for part in t.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err(format!("`{part}` is not key=value")))?;
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim());
            match key.as_str() {
                "up" => up = Some(parse_rate(value).map_err(err)?),
                "down" => down = Some(parse_rate(value).map_err(err)?),
                "rtt" => rtt = Some(parse_duration(value).map_err(err)?),
                "queue" => queue = Some(parse_bytes(value).map_err(err)?),
                other => {
                    return Err(err(format!(
                        "unknown key `{other}` (expected up, down, rtt, queue)"
                    )))
                }
            }
        }
        match (up, down, rtt) {
            (Some(up_bps), Some(down_bps), Some(rtt)) => Ok(Self {
                up_bps,
                down_bps,
                rtt,
                queue_bytes: queue,
            }),
            _ => Err(err(
                "expected `5g` or up=RATE,down=RATE,rtt=TIME[,queue=BYTES]".into(),
            )),
        }
    }

    /// The delay each datagram gets in each direction (RTT/2).
    pub fn one_way_delay(&self) -> Duration {
        self.rtt / 2
    }

    /// Bits per second of one direction.
    pub fn bps(&self, dir: Direction) -> f64 {
        match dir {
            Direction::Up => self.up_bps,
            Direction::Down => self.down_bps,
        }
    }

    /// The drop-tail limit of one direction in bytes.
    pub fn queue_limit(&self, dir: Direction) -> usize {
        if let Some(q) = self.queue_bytes {
            return q;
        }
        let bps = self.bps(dir);
        if !bps.is_finite() {
            return usize::MAX;
        }
        let bdp = bps / 8.0 * self.rtt.as_secs_f64();
        // Saturating float → int conversion; a huge BDP is simply a huge queue.
        ((2.0 * bdp) as usize).max(MIN_QUEUE_BYTES)
    }

    /// Seconds to serialize `bytes` at one direction's rate (0 for an unlimited direction).
    pub fn serialization_seconds(&self, dir: Direction, bytes: u64) -> f64 {
        let bps = self.bps(dir);
        if bps.is_finite() && bps > 0.0 {
            bytes as f64 * 8.0 / bps
        } else {
            0.0
        }
    }

    pub(super) fn check(&self) -> Result<(), LinkError> {
        for (name, v) in [("up", self.up_bps), ("down", self.down_bps)] {
            if v.is_nan() || v <= 0.0 {
                return Err(LinkError::Profile {
                    profile: self.to_string(),
                    message: format!("{name} rate must be positive"),
                });
            }
        }
        Ok(())
    }
}

impl Default for LinkProfile {
    fn default() -> Self {
        Self::five_g()
    }
}

impl fmt::Display for LinkProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = |bps: f64| {
            if bps.is_finite() {
                format!("{:.2} Mbit/s", bps / 1e6)
            } else {
                "unlimited".to_string()
            }
        };
        write!(
            f,
            "up {}, down {}, RTT {:.1} ms",
            rate(self.up_bps),
            rate(self.down_bps),
            self.rtt.as_secs_f64() * 1e3
        )?;
        if let Some(q) = self.queue_bytes {
            write!(f, ", queue {q} B")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for LinkProfile {
    type Err = LinkError;
    fn from_str(s: &str) -> Result<Self, LinkError> {
        Self::parse(s)
    }
}

/// Splits `12.5mbit` into (12.5, "mbit").
fn number_and_unit(s: &str) -> Result<(f64, String), String> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_' || c == 'e' || c == 'E'))
        .unwrap_or(s.len());
    // `e` may start a unit too (none of ours does), so only digits/dots/exponent are numeric.
    let (num, unit) = s.split_at(end);
    let value: f64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| format!("`{s}` does not start with a number"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("`{s}` is not a non-negative number"));
    }
    Ok((value, unit.trim().to_ascii_lowercase()))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "inf" || t == "unlimited" {
        return Ok(f64::INFINITY);
    }
    let (v, unit) = number_and_unit(&t)?;
    let scale = match unit.trim_end_matches("/s") {
        "" | "bit" | "bps" => 1.0,
        "k" | "kbit" | "kbps" => 1e3,
        "m" | "mbit" | "mbps" => 1e6,
        "g" | "gbit" | "gbps" => 1e9,
        other => return Err(format!("unknown rate unit `{other}` in `{s}`")),
    };
    let bps = v * scale;
    if bps <= 0.0 {
        return Err(format!("rate `{s}` must be positive"));
    }
    Ok(bps)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (v, unit) = number_and_unit(s)?;
    let secs = match unit.as_str() {
        "us" | "µs" => v * 1e-6,
        "ms" => v * 1e-3,
        "s" | "" => v,
        other => return Err(format!("unknown time unit `{other}` in `{s}`")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let (v, unit) = number_and_unit(s)?;
    let scale = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit `{other}` in `{s}`")),
    };
    let bytes = (v * scale).round();
    if bytes < 1.0 || bytes > usize::MAX as f64 {
        return Err(format!("queue size `{s}` out of range"));
    }
    Ok(bytes as usize)
}

// ---------------------------------------------------------------------------------------------
// The bottleneck
