//! The learned decoders' fitting: ridge regression in primal form for thousands of samples
//! of a few thousand features — the Gram matrix by candle's matrix product, the solve by
//! Cholesky — with the strength chosen on a held-back tenth of the training samples.

use candle_core::{Device, Tensor};
use nalgebra::DMatrix;

use crate::attack::{AttackError, Result};

/// A fitted linear map `y ≈ (x − x̄)·W + ȳ`.
pub struct Linear {
    x_mean: Vec<f32>,
    y_mean: Vec<f32>,
    /// [d, k].
    w: Tensor,
    pub lambda: f64,
}

/// Relative strengths tried (multiples of the Gram matrix's mean diagonal).
const GRID: [f64; 4] = [1e-4, 1e-3, 1e-2, 1e-1];

fn matrix(rows: &[Vec<f32>], what: &str) -> Result<Tensor> {
    let d = rows.first().map_or(0, Vec::len);
    if d == 0 || rows.iter().any(|r| r.len() != d) {
        return Err(AttackError::Setup(format!("{what}: ragged or empty rows")));
    }
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu)?)
}

fn to_na(t: &Tensor) -> Result<DMatrix<f64>> {
    let (r, c) = t.dims2()?;
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(DMatrix::from_fn(r, c, |i, j| v[i * c + j] as f64))
}

/// `(G + λI)⁻¹·B` for symmetric positive semi-definite `G`.
fn solve(g: &DMatrix<f64>, b: &DMatrix<f64>, lambda: f64) -> Result<DMatrix<f64>> {
    let mut sys = g.clone();
    for i in 0..sys.nrows() {
        sys[(i, i)] += lambda;
    }
    let chol = sys
        .cholesky()
        .ok_or_else(|| AttackError::Setup("ridge system not positive definite".into()))?;
    Ok(chol.solve(b))
}

/// Centred Gram and cross products of rows `x` [n, d], `y` [n, k] about the given means.
fn normal_equations(
    x: &Tensor,
    y: &Tensor,
    xm: &Tensor,
    ym: &Tensor,
) -> Result<(DMatrix<f64>, DMatrix<f64>)> {
    let xc = x.broadcast_sub(xm)?;
    let yc = y.broadcast_sub(ym)?;
    let xt = xc.t()?.contiguous()?;
    Ok((to_na(&xt.matmul(&xc)?)?, to_na(&xt.matmul(&yc)?)?))
}

impl Linear {
    /// Fits on `x` (n × d) → `y` (n × k).
    pub fn fit(x: &[Vec<f32>], y: &[Vec<f32>]) -> Result<Self> {
        let n = x.len();
        if n < 20 || y.len() != n {
            return Err(AttackError::Setup(format!(
                "ridge needs ≥ 20 paired samples, got {n} and {}",
                y.len()
            )));
        }
        let (xa, ya) = (matrix(x, "features")?, matrix(y, "targets")?);
        let xm = xa.mean_keepdim(0)?;
        let ym = ya.mean_keepdim(0)?;
        // Strength by error on the last tenth, fitted on the rest.
        let cut = n - n / 10;
        let (xf, yf) = (xa.narrow(0, 0, cut)?, ya.narrow(0, 0, cut)?);
        let (xv, yv) = (xa.narrow(0, cut, n - cut)?, ya.narrow(0, cut, n - cut)?);
        let (g, b) = normal_equations(&xf, &yf, &xm, &ym)?;
        let scale = (g.trace() / g.nrows() as f64).max(1e-12);
        let xvc = to_na(&xv.broadcast_sub(&xm)?)?;
        let yvc = to_na(&yv.broadcast_sub(&ym)?)?;
        let mut best: Option<(f64, f64)> = None;
        for rel in GRID {
            let Ok(wf) = solve(&g, &b, rel * scale) else {
                continue;
            };
            let err = (&xvc * wf - &yvc).norm_squared();
            if best.is_none_or(|(e, _)| err < e) {
                best = Some((err, rel));
            }
        }
        let (_, rel) = best.ok_or_else(|| AttackError::Setup("no ridge strength fits".into()))?;
        let (g, b) = normal_equations(&xa, &ya, &xm, &ym)?;
        let lambda = rel * (g.trace() / g.nrows() as f64).max(1e-12);
        let w = solve(&g, &b, lambda)?;
        let (d, k) = w.shape();
        let flat: Vec<f32> = (0..d)
            .flat_map(|i| (0..k).map(move |j| (i, j)))
            .map(|(i, j)| w[(i, j)] as f32)
            .collect();
        Ok(Self {
            x_mean: xm.flatten_all()?.to_vec1::<f32>()?,
            y_mean: ym.flatten_all()?.to_vec1::<f32>()?,
            w: Tensor::from_vec(flat, (d, k), &Device::Cpu)?,
            lambda,
        })
    }

    /// Predictions for rows `x`.
    pub fn predict(&self, x: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let xa = matrix(x, "features")?;
        let xm = Tensor::from_slice(&self.x_mean, (1, self.x_mean.len()), &Device::Cpu)?;
        let ym = Tensor::from_slice(&self.y_mean, (1, self.y_mean.len()), &Device::Cpu)?;
        let y = xa.broadcast_sub(&xm)?.matmul(&self.w)?.broadcast_add(&ym)?;
        Ok(y.to_vec2::<f32>()?)
    }
}
