//! The attacker's linear algebra: least squares (K/V inversion) and ridge regression (linear
//! probes), on nalgebra. Rows are samples.

use nalgebra::DMatrix;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LinalgError {
    #[error("{what}: expected {expected} columns/rows, got {got}")]
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("ridge needs at least 2 samples, got {0}")]
    TooFewSamples(usize),
    #[error("the regularised system is not positive definite")]
    NotPositiveDefinite,
}

/// Least-squares solution `X` of `X · A ≈ B` (rows of `B` are observations, `A` is `c × m`):
/// `X = B · A⁺`. With `A` of full row rank `c ≤ m` the solution is exact for exact data.
/// Returns `X` (`rows(B) × c`) and the relative residual ‖X·A − B‖ / ‖B‖.
pub fn solve_rows(a: &DMatrix<f64>, b: &DMatrix<f64>) -> Result<(DMatrix<f64>, f64), LinalgError> {
    if a.ncols() != b.ncols() {
        return Err(LinalgError::Shape {
            what: "least squares",
            expected: a.ncols(),
            got: b.ncols(),
        });
    }
    // Xᵀ solves Aᵀ · Xᵀ = Bᵀ in the least-squares sense.
    let svd = a.transpose().svd(true, true);
    let xt = svd
        .solve(&b.transpose(), 1e-12)
        .map_err(|_| LinalgError::NotPositiveDefinite)?;
    let x = xt.transpose();
    let fit = &x * a;
    let norm = b.norm();
    let residual = if norm > 0.0 {
        (fit - b).norm() / norm
    } else {
        0.0
    };
    Ok((x, residual))
}

/// A fitted ridge regression `y ≈ (x − x̄)·W + ȳ`.
///
/// Primal (`W` stored) when features are fewer than samples; dual otherwise (`W = Xcᵀ·α`, kept
/// as the centred training rows and `α`, so a probe on 10⁵-dimensional views of 10² generations
/// never forms a 10⁵ × 10³ matrix).
#[derive(Debug, Clone)]
pub struct Ridge {
    x_mean: Vec<f64>,
    y_mean: Vec<f64>,
    weights: RidgeWeights,
    /// The regularisation chosen.
    pub lambda: f64,
}

#[derive(Debug, Clone)]
enum RidgeWeights {
    Primal(DMatrix<f64>),
    Dual {
        /// Centred training rows, `n × d`, f32 to halve the memory of wide views.
        xc: Vec<Vec<f32>>,
        alpha: DMatrix<f64>,
    },
}

fn column_means(rows: &[Vec<f32>], d: usize) -> Vec<f64> {
    let mut m = vec![0f64; d];
    for r in rows {
        m.iter_mut().zip(r).for_each(|(a, &b)| *a += b as f64);
    }
    m.iter_mut().for_each(|v| *v /= rows.len() as f64);
    m
}

fn check_rows(rows: &[Vec<f32>], d: usize, what: &'static str) -> Result<(), LinalgError> {
    match rows.iter().find(|r| r.len() != d) {
        Some(r) => Err(LinalgError::Shape {
            what,
            expected: d,
            got: r.len(),
        }),
        None => Ok(()),
    }
}

/// Relative regularisation strengths tried by leave-one-out (dual) — multiples of the mean
/// diagonal of the Gram matrix.
const LAMBDA_GRID: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];

impl Ridge {
    /// Fits `y ≈ f(x)` on rows `x` (n × d) and `y` (n × k). `lambda`: `Some(relative)` fixes
    /// the strength (relative to the mean diagonal of XcᵀXc or XcXcᵀ); `None` picks it from a
    /// grid by exact leave-one-out error (dual form only; primal uses 1e-4).
    pub fn fit(x: &[Vec<f32>], y: &[Vec<f32>], lambda: Option<f64>) -> Result<Self, LinalgError> {
        let n = x.len();
        if n < 2 {
            return Err(LinalgError::TooFewSamples(n));
        }
        if y.len() != n {
            return Err(LinalgError::Shape {
                what: "ridge targets",
                expected: n,
                got: y.len(),
            });
        }
        let d = x[0].len();
        let k = y[0].len();
        check_rows(x, d, "ridge features")?;
        check_rows(y, k, "ridge targets")?;
        let x_mean = column_means(x, d);
        let y_mean = column_means(y, k);
        let yc = DMatrix::from_fn(n, k, |i, j| y[i][j] as f64 - y_mean[j]);
        if d <= n {
            let xc = DMatrix::from_fn(n, d, |i, j| x[i][j] as f64 - x_mean[j]);
            let gram = xc.transpose() * &xc;
            let scale = gram.trace() / d.max(1) as f64;
            let lambda = lambda.unwrap_or(1e-4) * scale.max(1e-12);
            let mut sys = gram;
            for i in 0..d {
                sys[(i, i)] += lambda;
            }
            let chol = sys.cholesky().ok_or(LinalgError::NotPositiveDefinite)?;
            let w = chol.solve(&(xc.transpose() * &yc));
            return Ok(Self {
                x_mean,
                y_mean,
                weights: RidgeWeights::Primal(w),
                lambda,
            });
        }
        let xc: Vec<Vec<f32>> = x
            .iter()
            .map(|r| {
                r.iter()
                    .zip(&x_mean)
                    .map(|(&v, m)| (v as f64 - m) as f32)
                    .collect()
            })
            .collect();
        let mut gram = DMatrix::<f64>::zeros(n, n);
        for i in 0..n {
            for j in 0..=i {
                let g: f64 = xc[i]
                    .iter()
                    .zip(&xc[j])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                gram[(i, j)] = g;
                gram[(j, i)] = g;
            }
        }
        let scale = (gram.trace() / n as f64).max(1e-12);
        let grid: Vec<f64> = match lambda {
            Some(l) => vec![l],
            None => LAMBDA_GRID.to_vec(),
        };
        let mut best: Option<(f64, f64, DMatrix<f64>)> = None;
        for rel in grid {
            let lambda = rel * scale;
            let mut sys = gram.clone();
            for i in 0..n {
                sys[(i, i)] += lambda;
            }
            let Some(chol) = sys.cholesky() else { continue };
            let inv = chol.inverse();
            let alpha = &inv * &yc;
            // Leave-one-out residual of kernel ridge: e_i = α_i / (K + λI)⁻¹_ii.
            let mut loo = 0f64;
            for i in 0..n {
                let d = inv[(i, i)];
                for j in 0..k {
                    let e = alpha[(i, j)] / d;
                    loo += e * e;
                }
            }
            if best.as_ref().is_none_or(|(l, _, _)| loo < *l) {
                best = Some((loo, lambda, alpha));
            }
        }
        let (_, lambda, alpha) = best.ok_or(LinalgError::NotPositiveDefinite)?;
        Ok(Self {
            x_mean,
            y_mean,
            weights: RidgeWeights::Dual { xc, alpha },
            lambda,
        })
    }

    /// The prediction for one row.
    pub fn predict(&self, x: &[f32]) -> Result<Vec<f32>, LinalgError> {
        if x.len() != self.x_mean.len() {
            return Err(LinalgError::Shape {
                what: "ridge input",
                expected: self.x_mean.len(),
                got: x.len(),
            });
        }
        let centred: Vec<f64> = x
            .iter()
            .zip(&self.x_mean)
            .map(|(&v, m)| v as f64 - m)
            .collect();
        let mut y = self.y_mean.clone();
        match &self.weights {
            RidgeWeights::Primal(w) => {
                for (i, c) in centred.iter().enumerate() {
                    for (j, out) in y.iter_mut().enumerate() {
                        *out += c * w[(i, j)];
                    }
                }
            }
            RidgeWeights::Dual { xc, alpha } => {
                for (i, row) in xc.iter().enumerate() {
                    let kx: f64 = row.iter().zip(&centred).map(|(&a, b)| a as f64 * b).sum();
                    for (j, out) in y.iter_mut().enumerate() {
                        *out += kx * alpha[(i, j)];
                    }
                }
            }
        }
        Ok(y.into_iter().map(|v| v as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
    }

    #[test]
    fn least_squares_inverts_a_full_rank_projection_exactly() {
        let mut r = lcg(1);
        let (t, c, m) = (40, 6, 10);
        let x = DMatrix::from_fn(t, c, |_, _| r());
        let a = DMatrix::from_fn(c, m, |_, _| r());
        let b = &x * &a;
        let (got, residual) = solve_rows(&a, &b).unwrap();
        assert!((got - x).norm() < 1e-9);
        assert!(residual < 1e-12);
    }

    #[test]
    fn least_squares_of_an_underdetermined_projection_is_not_exact() {
        // 6 features seen through 3 outputs: the null space is lost.
        let mut r = lcg(2);
        let x = DMatrix::from_fn(20, 6, |_, _| r());
        let a = DMatrix::from_fn(6, 3, |_, _| r());
        let (got, residual) = solve_rows(&a, &(&x * &a)).unwrap();
        assert!(residual < 1e-9, "the fit reproduces what was seen");
        assert!((got - x).norm() > 0.1, "but not the features themselves");
    }

    #[test]
    fn ridge_recovers_a_linear_map_in_both_forms() {
        let mut r = lcg(3);
        for (n, d) in [(200, 8), (30, 100)] {
            let w: Vec<Vec<f64>> = (0..d).map(|_| (0..3).map(|_| r()).collect()).collect();
            let row =
                |r: &mut dyn FnMut() -> f64| -> Vec<f32> { (0..d).map(|_| r() as f32).collect() };
            let target = |x: &[f32]| -> Vec<f32> {
                (0..3)
                    .map(|j| (0..d).map(|i| x[i] as f64 * w[i][j]).sum::<f64>() as f32 + 0.5)
                    .collect()
            };
            let xs: Vec<Vec<f32>> = (0..n).map(|_| row(&mut r)).collect();
            let ys: Vec<Vec<f32>> = xs.iter().map(|x| target(x)).collect();
            let ridge = Ridge::fit(&xs, &ys, None).unwrap();
            if d <= n {
                // Enough samples: any new point is predicted.
                let x = row(&mut r);
                let (p, t) = (ridge.predict(&x).unwrap(), target(&x));
                for (a, b) in p.iter().zip(&t) {
                    assert!((a - b).abs() < 1e-2, "{p:?} vs {t:?}");
                }
            } else {
                // Fewer samples than features: training points are fitted, and a new point
                // inside their span is predicted.
                let x: Vec<f32> = xs[0]
                    .iter()
                    .zip(&xs[1])
                    .map(|(a, b)| 0.5 * (a + b))
                    .collect();
                let (p, t) = (ridge.predict(&x).unwrap(), target(&x));
                for (a, b) in p.iter().zip(&t) {
                    assert!((a - b).abs() < 5e-2, "{p:?} vs {t:?}");
                }
            }
        }
    }

    #[test]
    fn ridge_rejects_bad_shapes() {
        assert_eq!(
            Ridge::fit(&[vec![1.0]], &[vec![1.0]], None).unwrap_err(),
            LinalgError::TooFewSamples(1)
        );
        let x = vec![vec![1.0, 2.0], vec![3.0]];
        assert!(matches!(
            Ridge::fit(&x, &[vec![1.0], vec![2.0]], None),
            Err(LinalgError::Shape { .. })
        ));
        let ok = Ridge::fit(
            &[vec![1.0], vec![2.0], vec![3.0]],
            &[vec![2.0], vec![4.0], vec![6.0]],
            None,
        )
        .unwrap();
        assert!(matches!(
            ok.predict(&[1.0, 2.0]),
            Err(LinalgError::Shape { .. })
        ));
        assert!((ok.predict(&[4.0]).unwrap()[0] - 8.0).abs() < 1e-2);
    }
}
