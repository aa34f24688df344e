//! The learned decoders' fitting: ridge regression with the strength chosen on a held-back
//! tenth of the training samples. In primal form (the d × d Gram matrix) for thousands of
//! samples of a few thousand features; in dual form (the n × n kernel matrix, the same
//! estimator) when features outnumber samples, as for whole generations read at every step.
//! Matrix products by candle, solves by Cholesky.

use candle_core::{Device, Tensor};
use nalgebra::DMatrix;

use crate::attacker::{AttackError, Result};

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
/// The same for the dual form (multiples of the kernel matrix's mean diagonal).
const DUAL_GRID: [f64; 6] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0];

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

fn to_tensor(m: &DMatrix<f64>) -> Result<Tensor> {
    let (r, c) = m.shape();
    let flat: Vec<f32> = (0..r)
        .flat_map(|i| (0..c).map(move |j| (i, j)))
        .map(|(i, j)| m[(i, j)] as f32)
        .collect();
    Ok(Tensor::from_vec(flat, (r, c), &Device::Cpu)?)
}

/// Ridge weights [d, k] of centred rows `xc` [n, d] → `yc` [n, k] through the n × n kernel.
fn dual_weights(xc: &Tensor, yc: &Tensor, lambda: f64) -> Result<Tensor> {
    let k = to_na(&xc.matmul(&xc.t()?.contiguous()?)?)?;
    let alpha = to_tensor(&solve(&k, &to_na(yc)?, lambda)?)?;
    Ok(xc.t()?.contiguous()?.matmul(&alpha)?)
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
        if xa.dim(1)? > n {
            return Self::fit_dual(&xa, &ya, xm, ym);
        }
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
        Ok(Self {
            x_mean: xm.flatten_all()?.to_vec1::<f32>()?,
            y_mean: ym.flatten_all()?.to_vec1::<f32>()?,
            w: to_tensor(&solve(&g, &b, lambda)?)?,
            lambda,
        })
    }

    /// `W = Xᵀ(XXᵀ + λI)⁻¹Y` on centred rows: the ridge estimator through the n × n kernel.
    fn fit_dual(xa: &Tensor, ya: &Tensor, xm: Tensor, ym: Tensor) -> Result<Self> {
        let n = xa.dim(0)?;
        let xc = xa.broadcast_sub(&xm)?;
        let yc = ya.broadcast_sub(&ym)?;
        let kernel = |a: &Tensor, b: &Tensor| -> Result<DMatrix<f64>> {
            to_na(&a.matmul(&b.t()?.contiguous()?)?)
        };
        let cut = n - n / 10;
        let (xf, xv) = (xc.narrow(0, 0, cut)?, xc.narrow(0, cut, n - cut)?);
        let kf = kernel(&xf, &xf)?;
        let kvf = kernel(&xv, &xf)?;
        let yf = to_na(&yc.narrow(0, 0, cut)?)?;
        let yv = to_na(&yc.narrow(0, cut, n - cut)?)?;
        let scale = |k: &DMatrix<f64>| (k.trace() / k.nrows() as f64).max(1e-12);
        let mut best: Option<(f64, f64)> = None;
        for rel in DUAL_GRID {
            let Ok(alpha) = solve(&kf, &yf, rel * scale(&kf)) else {
                continue;
            };
            let err = (&kvf * alpha - &yv).norm_squared();
            if best.is_none_or(|(e, _)| err < e) {
                best = Some((err, rel));
            }
        }
        let (_, rel) = best.ok_or_else(|| AttackError::Setup("no ridge strength fits".into()))?;
        let lambda = rel * scale(&kernel(&xc, &xc)?);
        Ok(Self {
            x_mean: xm.flatten_all()?.to_vec1::<f32>()?,
            y_mean: ym.flatten_all()?.to_vec1::<f32>()?,
            w: dual_weights(&xc, &yc, lambda)?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, d: usize, seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
    }

    /// The dual form is the same estimator as the primal one at the same strength.
    #[test]
    fn dual_weights_equal_primal_weights() {
        let (n, d, k) = (30, 50, 3);
        let x = random(n, d, 1);
        let y = random(n, k, 2);
        for lambda in [0.1, 1.0, 10.0] {
            let primal = to_tensor(
                &solve(
                    &to_na(&x.t().unwrap().matmul(&x).unwrap()).unwrap(),
                    &to_na(&x.t().unwrap().matmul(&y).unwrap()).unwrap(),
                    lambda,
                )
                .unwrap(),
            )
            .unwrap();
            let dual = dual_weights(&x, &y, lambda).unwrap();
            let diff = (&primal - &dual).unwrap().abs().unwrap().max_all().unwrap();
            let size = primal.abs().unwrap().max_all().unwrap();
            let (diff, size) = (
                diff.to_scalar::<f32>().unwrap(),
                size.to_scalar::<f32>().unwrap(),
            );
            assert!(
                diff <= 1e-4 * size,
                "λ = {lambda}: primal and dual differ by {diff} (max {size})"
            );
        }
    }

    /// With more features than samples `fit` takes the dual path and still recovers a linear
    /// map well enough to predict held-out rows.
    #[test]
    fn wide_fit_predicts_a_linear_map() {
        let (n, d, k) = (200, 300, 2);
        let x = random(n + 20, d, 3);
        let w = random(d, k, 4);
        let y = x.matmul(&w).unwrap();
        let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
        let (xs, ys) = (rows(&x), rows(&y));
        let fit = Linear::fit(&xs[..n], &ys[..n]).unwrap();
        let pred = fit.predict(&xs[n..]).unwrap();
        let (mut err, mut var) = (0f64, 0f64);
        for (p, t) in pred.iter().zip(&ys[n..]) {
            for (a, b) in p.iter().zip(t) {
                err += ((a - b) as f64).powi(2);
                var += (*b as f64).powi(2);
            }
        }
        // 200 samples of a 300-dimensional map: the minimum-norm fit explains about 2/3 of
        // a held-out row's variance; a broken solve explains none.
        assert!(err < 0.6 * var, "held-out residual {err} of {var}");
    }
}
