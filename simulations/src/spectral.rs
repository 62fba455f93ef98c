//! The spectral gap of a mixing matrix: how fast neighbour averaging forgets its start.
//!
//! For a symmetric doubly-stochastic `W`, the consensus error shrinks by at most the second
//! largest eigenvalue modulus (SLEM) per round; the gap is `1 - SLEM`.

/// SLEM of the sparse mixing matrix `weights` (rows of `(column, weight)`), by power
/// iteration on the subspace orthogonal to the all-ones vector. Deterministic.
pub fn slem(weights: &[Vec<(usize, f64)>], iterations: usize) -> f64 {
    let n = weights.len();
    if n < 2 {
        return 0.0;
    }
    let mut rng = medmesh_training::rng::Rng::new(0x5EC7);
    let mut x: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let mut y = vec![0.0; n];
    let mut estimate = 0.0;
    for _ in 0..iterations.max(1) {
        let mean = x.iter().sum::<f64>() / n as f64;
        x.iter_mut().for_each(|v| *v -= mean);
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        x.iter_mut().for_each(|v| *v /= norm);
        for (i, row) in weights.iter().enumerate() {
            y[i] = row.iter().map(|&(j, w)| w * x[j]).sum();
        }
        estimate = y.iter().map(|v| v * v).sum::<f64>().sqrt();
        std::mem::swap(&mut x, &mut y);
    }
    estimate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::Arena;
    use crate::topology::{complete, exponential, random_regular, ring};
    use medmesh_protocol::averaging::metropolis_hastings_weights;

    #[test]
    fn ring_matches_its_closed_form() {
        // MH weights on a ring: 1/3 everywhere, eigenvalues 1/3 + 2/3 cos(2 pi k / n).
        for n in [5, 8, 12] {
            let w = metropolis_hastings_weights(&ring(n).unwrap()).unwrap();
            let expected = (1..n)
                .map(|k| {
                    (1.0 / 3.0 + 2.0 / 3.0 * (std::f64::consts::TAU * k as f64 / n as f64).cos())
                        .abs()
                })
                .fold(0.0, f64::max);
            let got = slem(&w, 5000);
            assert!((got - expected).abs() < 1e-6, "n={n}: {got} vs {expected}");
        }
        let w = metropolis_hastings_weights(&complete(6)).unwrap();
        assert!(slem(&w, 100) < 1e-9, "complete graph mixes in one round");
    }

    #[test]
    fn better_connected_graphs_mix_faster() {
        let n = 32;
        let gap =
            |adj: Vec<Vec<usize>>| 1.0 - slem(&metropolis_hastings_weights(&adj).unwrap(), 4000);
        let (ring_gap, regular_gap, exp_gap) = (
            gap(ring(n).unwrap()),
            gap(random_regular(n, 4, 3).unwrap()),
            gap(exponential(n).unwrap()),
        );
        assert!(
            ring_gap < regular_gap && ring_gap < exp_gap,
            "{ring_gap} {regular_gap} {exp_gap}"
        );
    }

    #[test]
    fn consensus_error_decays_at_the_predicted_rate() {
        for adj in [ring(16).unwrap(), random_regular(16, 4, 9).unwrap()] {
            let w = metropolis_hastings_weights(&adj).unwrap();
            let rate = slem(&w, 5000);
            let init: Vec<Vec<f32>> = (0..16).map(|i| vec![(i * 7 % 16) as f32, 1.0]).collect();
            let mut s = Arena::new(&init);
            let all: Vec<usize> = (0..16).collect();
            for _ in 0..20 {
                s.mix(&w);
            }
            let e20 = s.consensus_error(&all, None);
            for _ in 0..20 {
                s.mix(&w);
            }
            let measured = (s.consensus_error(&all, None) / e20).powf(1.0 / 20.0);
            assert!(
                (measured - rate).abs() / rate < 0.2,
                "measured {measured}, predicted {rate}"
            );
        }
    }
}
