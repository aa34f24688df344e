//! diffusers' `embeddings.py` as far as the U-Net needs it: the sinusoidal `Timesteps`
//! projection (of the timestep, and of SDXL's six size-and-crop ids) and SDXL's added
//! conditioning input (`text_embeds` beside the ids' embeddings), built on the phone.

use candle_core::{DType, Tensor};

use crate::model::config::TextTime;
use crate::vocab::error::{Error, Result};

/// diffusers' `get_timestep_embedding` for one value `t`: `dim` sines and cosines (cosines
/// first when `flip`), frequencies 10000^(−i / (dim/2 − shift)), computed in f32 as diffusers
/// does so that the rounding matches.
pub fn sinusoidal_embedding(t: f64, dim: usize, flip: bool, shift: f64) -> Vec<f32> {
    let half = dim / 2;
    let mut row = vec![0f32; dim];
    for i in 0..half {
        let exponent = (-(10000f32.ln()) * i as f32) / (half as f32 - shift as f32);
        let arg = t as f32 * exponent.exp();
        let (s, c) = (arg.sin(), arg.cos());
        if flip {
            row[i] = c;
            row[half + i] = s;
        } else {
            row[i] = s;
            row[half + i] = c;
        }
    }
    row
}

/// SDXL's six ids for an image of `height` × `width` generated whole: original size, crop
/// top-left (0, 0), target size — the pipeline's defaults.
pub fn default_time_ids(height: usize, width: usize) -> [f64; TextTime::IDS] {
    let (h, w) = (height as f64, width as f64);
    [h, w, 0.0, 0.0, h, w]
}

/// The added embedding's input [B, input_dim] for pooled text embeddings `pooled` [B, P]:
/// each row's pooled embedding, then each of the six ids' sinusoidal embedding (the U-Net's
/// `add_time_proj`, with its own flip and shift).
pub fn text_time_input(
    tt: &TextTime,
    pooled: &Tensor,
    ids: &[f64; TextTime::IDS],
    flip: bool,
    shift: f64,
) -> Result<Tensor> {
    let (b, p) = pooled.dims2()?;
    if p != tt.pooled_dim {
        return Err(Error::InvalidArgument(format!(
            "pooled text embedding of width {p}, the U-Net's added conditioning takes {}",
            tt.pooled_dim
        )));
    }
    let row: Vec<f32> = ids
        .iter()
        .flat_map(|&id| sinusoidal_embedding(id, tt.id_dim, flip, shift))
        .collect();
    let ids =
        Tensor::from_vec(row, (1, TextTime::IDS * tt.id_dim), pooled.device())?.repeat((b, 1))?;
    Ok(Tensor::cat(&[&pooled.to_dtype(DType::F32)?, &ids], 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_puts_cosines_first() {
        let a = sinusoidal_embedding(3.0, 4, false, 0.0);
        let b = sinusoidal_embedding(3.0, 4, true, 0.0);
        assert_eq!(&a[..2], &b[2..]);
        assert_eq!(&a[2..], &b[..2]);
        assert!((a[0] - 3f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn added_input_is_pooled_then_ids() {
        let tt = TextTime {
            id_dim: 4,
            input_dim: 3 + 24,
            pooled_dim: 3,
        };
        let pooled = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &candle_core::Device::Cpu)
            .expect("tensor");
        let x = text_time_input(&tt, &pooled, &default_time_ids(48, 64), true, 0.0).expect("input");
        assert_eq!(x.dims(), &[2, 27]);
        let v: Vec<Vec<f32>> = x.to_vec2().expect("vec");
        assert_eq!(&v[1][..3], &[4., 5., 6.]);
        assert_eq!(&v[0][3..7], &sinusoidal_embedding(48.0, 4, true, 0.0)[..]);
        assert_eq!(&v[0][11..15], &sinusoidal_embedding(0.0, 4, true, 0.0)[..]);
        let wrong = Tensor::zeros((1, 2), DType::F32, &candle_core::Device::Cpu).expect("z");
        assert!(text_time_input(&tt, &wrong, &[0.0; 6], true, 0.0).is_err());
    }
}
