//! The attacker's linear algebra: least squares (the K/V inversion), on nalgebra. Rows are
//! samples.

use nalgebra::DMatrix;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LinalgError {
    #[error("{what}: expected {expected} columns/rows, got {got}")]
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("least squares: {0}")]
    Svd(&'static str),
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
    let xt = svd.solve(&b.transpose(), 1e-12).map_err(LinalgError::Svd)?;
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
}
