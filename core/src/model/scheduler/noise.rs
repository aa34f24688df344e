//! Where a stochastic sampler's fresh noise comes from (Euler Ancestral and LCM add noise at
//! every step).
//!
//! Design: `Scheduler::step` keeps its signature; a stochastic sampler owns a [`StepNoise`]
//! (`Scheduler::set_step_noise` replaces it) and asks it for step `i`'s noise by index. Two
//! sources:
//!
//! - [`SeededStepNoise`], what generations use: step `i`'s noise is [`seeded_normal`] (the
//!   generator of the initial noise) seeded by a key and `i`. It is a pure function of
//!   (key, step index), not a stream, so whoever runs step `i` draws the same noise: the
//!   `obfuscated` server running steps 0..k and the phone finishing k..T agree with a `local`
//!   run of the whole schedule, and a schedule entered mid-way (img2img) needs no skipping.
//!   The key is the initial noise itself ([`SeededStepNoise::keyed_by`]): the `obfuscated`
//!   server receives that noise but not the seed, so both sides derive the same key with no
//!   new wire field, and a run given explicit `latents` reproduces from them alone. (This
//!   tells the server nothing it could not already compute: it holds the initial noise.)
//! - [`ReplayStepNoise`]: given tensors, one per step. The golden tests feed the noise
//!   diffusers drew, so a stochastic trajectory can be compared with diffusers' exactly.
//!
//! One noise row is drawn per step and broadcast over the batch: the K candidates of an
//! `obfuscated` job start from one shared noise and must stay interchangeable to the server,
//! and the real candidate's trajectory is then the one-candidate run's.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::vocab::error::{Error, Result};

/// A source of standard-normal noise for the steps of one schedule.
pub trait StepNoise: Send {
    /// Noise of `shape` (one batch row) for step `step_index`.
    fn draw(&mut self, step_index: usize, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// Step `i`'s noise: [`seeded_normal`] under a seed mixed from a key and `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeededStepNoise {
    key: u64,
}

impl SeededStepNoise {
    pub fn new(key: u64) -> Self {
        Self { key }
    }

    /// Keyed by a tensor's f32 bits (FNV-1a, stable across platforms and Rust versions): the
    /// generation's initial noise, before `init_noise_sigma`.
    pub fn keyed_by(initial_noise: &Tensor) -> Result<Self> {
        let bits = initial_noise
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bits.iter().flat_map(|x| x.to_bits().to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(Self::new(h))
    }

    /// The seed of step `i` (distinct per step; `seed_from_u64` mixes it further).
    fn seed_of(&self, step_index: usize) -> u64 {
        self.key ^ (step_index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

impl StepNoise for SeededStepNoise {
    fn draw(&mut self, step_index: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
        seeded_normal(self.seed_of(step_index), shape, device)
    }
}

/// Given noise, one tensor per step (`None` where a step draws none); a step without one is an
/// error, as is a tensor of another shape than asked.
#[derive(Debug, Clone, Default)]
pub struct ReplayStepNoise {
    steps: Vec<Option<Tensor>>,
}

impl ReplayStepNoise {
    pub fn new(steps: Vec<Option<Tensor>>) -> Self {
        Self { steps }
    }
}

impl StepNoise for ReplayStepNoise {
    fn draw(&mut self, step_index: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self
            .steps
            .get(step_index)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("no replayed noise for step {step_index}"))
            })?;
        if t.dims() != shape {
            return Err(Error::InvalidArgument(format!(
                "replayed noise for step {step_index} has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        Ok(t.to_device(device)?)
    }
}

/// Standard normal noise from a seed (deterministic across platforms; not torch's generator,
/// so pass explicit latents or [`ReplayStepNoise`] to compare with diffusers).
pub fn seeded_normal(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        // Box–Muller: two uniforms in (0, 1] give two independent normals.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        v.push((r * a.cos()) as f32);
        if v.len() < n {
            v.push((r * a.sin()) as f32);
        }
    }
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// `sample`'s shape with the batch dimension 1: what one step's noise row is drawn as.
pub(super) fn row_shape(sample: &Tensor) -> Vec<usize> {
    let mut shape = sample.dims().to_vec();
    if let Some(b) = shape.first_mut() {
        *b = 1;
    }
    shape
}

/// Step `step_index`'s noise from `source`, broadcast to `sample`'s shape, in f32.
pub(super) fn step_noise(
    source: &mut dyn StepNoise,
    step_index: usize,
    sample: &Tensor,
) -> Result<Tensor> {
    let row = source.draw(step_index, &row_shape(sample), sample.device())?;
    Ok(row
        .to_dtype(candle_core::DType::F32)?
        .broadcast_as(sample.dims())?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_per_step_and_keyed() -> Result<()> {
        let dev = Device::Cpu;
        let shape = [1, 4, 2, 2];
        let init = seeded_normal(7, &shape, &dev)?;
        let draw = |s: &mut SeededStepNoise, i: usize| -> Result<Vec<f32>> {
            Ok(s.draw(i, &shape, &dev)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let mut a = SeededStepNoise::keyed_by(&init)?;
        let mut b = SeededStepNoise::keyed_by(&init)?;
        let a3 = draw(&mut a, 3)?;
        let _ = draw(&mut b, 0)?;
        // Order does not matter: step 3 is step 3 whoever drew what before.
        assert_eq!(draw(&mut b, 3)?, a3);
        assert_ne!(draw(&mut a, 2)?, a3);
        let other = SeededStepNoise::keyed_by(&seeded_normal(8, &shape, &dev)?)?;
        assert_ne!(other, a);
        Ok(())
    }

    #[test]
    fn replay_checks_steps_and_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let t = Tensor::zeros((1, 2), candle_core::DType::F32, &dev)?;
        let mut r = ReplayStepNoise::new(vec![Some(t), None]);
        assert!(r.draw(0, &[1, 2], &dev).is_ok());
        assert!(r.draw(0, &[1, 3], &dev).is_err());
        assert!(r.draw(1, &[1, 2], &dev).is_err());
        assert!(r.draw(2, &[1, 2], &dev).is_err());
        Ok(())
    }
}
