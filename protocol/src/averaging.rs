//! Averaging rules over flat f32 parameter vectors, shared by the node and the simulator.
//!
//! All functions are pure: they read slices and write into caller-owned buffers, so the
//! caller decides where memory lives (one model buffer per peer in the node, one arena for
//! thousands of nodes in the simulator).

use std::collections::BTreeSet;

/// Values processed per block in multi-input loops. Small enough that the output block stays
/// in L1 while every input streams through it once.
const BLOCK: usize = 4096;

/// Why averaging inputs were refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AveragingError {
    /// No inputs at all.
    #[error("nothing to average")]
    NoInputs,
    /// Vectors of different lengths.
    #[error("input {index} has {len} values, expected {expected}")]
    LengthMismatch {
        /// Offending input.
        index: usize,
        /// Its length.
        len: usize,
        /// The output's length.
        expected: usize,
    },
    /// A weight that is negative, NaN or infinite, or weights summing to zero.
    #[error(
        "weight {weight} of input {index} is not a finite non-negative number (or all weights are zero)"
    )]
    BadWeight {
        /// Offending input.
        index: usize,
        /// Its weight.
        weight: f64,
    },
    /// A graph whose adjacency is not symmetric or names missing nodes.
    #[error("graph is not a valid undirected graph: {0}")]
    BadGraph(String),
}

fn check_lengths(
    inputs: impl Iterator<Item = usize>,
    expected: usize,
) -> Result<usize, AveragingError> {
    let mut count = 0;
    for (index, len) in inputs.enumerate() {
        if len != expected {
            return Err(AveragingError::LengthMismatch {
                index,
                len,
                expected,
            });
        }
        count += 1;
    }
    if count == 0 {
        return Err(AveragingError::NoInputs);
    }
    Ok(count)
}

/// Writes `sum_i w_i x_i / sum_i w_i` into `out`.
///
/// ```
/// use medmesh_protocol::averaging::weighted_mean;
/// let mut out = [0.0; 2];
/// weighted_mean(&[(&[1.0, 2.0][..], 1.0), (&[3.0, 4.0][..], 3.0)], &mut out).unwrap();
/// assert_eq!(out, [2.5, 3.5]);
/// ```
pub fn weighted_mean(inputs: &[(&[f32], f64)], out: &mut [f32]) -> Result<(), AveragingError> {
    check_lengths(inputs.iter().map(|(x, _)| x.len()), out.len())?;
    let mut total = 0.0;
    for (index, (_, w)) in inputs.iter().enumerate() {
        if !(w.is_finite() && *w >= 0.0) {
            return Err(AveragingError::BadWeight { index, weight: *w });
        }
        total += w;
    }
    if total <= 0.0 {
        return Err(AveragingError::BadWeight {
            index: 0,
            weight: 0.0,
        });
    }
    let coefficients: Vec<f32> = inputs.iter().map(|(_, w)| (w / total) as f32).collect();
    for (start, out_block) in (0..).step_by(BLOCK).zip(out.chunks_mut(BLOCK)) {
        let end = start + out_block.len();
        let (first, rest) = inputs.split_first().ok_or(AveragingError::NoInputs)?;
        let c0 = coefficients[0];
        for (o, x) in out_block.iter_mut().zip(&first.0[start..end]) {
            *o = c0 * x;
        }
        for ((x, _), c) in rest.iter().zip(&coefficients[1..]) {
            for (o, x) in out_block.iter_mut().zip(&x[start..end]) {
                *o += c * x;
            }
        }
    }
    Ok(())
}

/// Pairwise gossip step, seen from one side: `local` becomes the weighted average of itself
/// and `remote` (`local_weight` and `remote_weight` are sample counts; equal weights give the
/// plain midpoint). Both partners applying it with swapped roles end at the same vector.
pub fn pairwise_average(
    local: &mut [f32],
    remote: &[f32],
    local_weight: f64,
    remote_weight: f64,
) -> Result<(), AveragingError> {
    check_lengths(std::iter::once(remote.len()), local.len())?;
    for (index, w) in [local_weight, remote_weight].into_iter().enumerate() {
        if !(w.is_finite() && w > 0.0) {
            return Err(AveragingError::BadWeight { index, weight: w });
        }
    }
    let a = (local_weight / (local_weight + remote_weight)) as f32;
    let b = 1.0 - a;
    for (l, r) in local.iter_mut().zip(remote) {
        *l = a * *l + b * r;
    }
    Ok(())
}

/// Push-sum state of one node: the running weighted sum `s` and mass `w`; its estimate of the
/// network average is `s / w`. Mass is never created or lost, only moved, so the estimates
/// converge to the true weighted mean even over directed, asynchronous links.
#[derive(Debug, Clone, PartialEq)]
pub struct PushSum {
    /// Weighted sum of values.
    pub sum: Vec<f32>,
    /// Mass (initially the node's sample weight).
    pub weight: f64,
}

/// A share of push-sum mass in flight to a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PushSumShare {
    /// Weighted sum part.
    pub sum: Vec<f32>,
    /// Mass part.
    pub weight: f64,
}

impl PushSum {
    /// Starts from a node's model `x` with mass `weight`: `s = weight * x`.
    pub fn new(x: &[f32], weight: f64) -> Result<Self, AveragingError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AveragingError::BadWeight { index: 0, weight });
        }
        let w = weight as f32;
        Ok(Self {
            sum: x.iter().map(|v| v * w).collect(),
            weight,
        })
    }

    /// Splits the state into `parts + 1` equal shares, keeps one, returns `parts` to send.
    pub fn split(&mut self, parts: usize) -> Vec<PushSumShare> {
        let keep = 1.0 / (parts as f64 + 1.0);
        self.weight *= keep;
        let k = keep as f32;
        for v in &mut self.sum {
            *v *= k;
        }
        (0..parts)
            .map(|_| PushSumShare {
                sum: self.sum.clone(),
                weight: self.weight,
            })
            .collect()
    }

    /// Adds a received share.
    pub fn absorb(&mut self, share: &PushSumShare) -> Result<(), AveragingError> {
        self.absorb_parts(&share.sum, share.weight)
    }

    /// Adds a received share given as its parts (e.g. straight from a decoded payload).
    pub fn absorb_parts(&mut self, sum: &[f32], weight: f64) -> Result<(), AveragingError> {
        check_lengths(std::iter::once(sum.len()), self.sum.len())?;
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(AveragingError::BadWeight { index: 0, weight });
        }
        self.weight += weight;
        for (s, r) in self.sum.iter_mut().zip(sum) {
            *s += r;
        }
        Ok(())
    }

    /// Writes the current estimate `s / w` into `out`.
    pub fn estimate(&self, out: &mut [f32]) -> Result<(), AveragingError> {
        check_lengths(std::iter::once(self.sum.len()), out.len())?;
        let inv = (1.0 / self.weight) as f32;
        for (o, s) in out.iter_mut().zip(&self.sum) {
            *o = s * inv;
        }
        Ok(())
    }
}

/// Metropolis-Hastings mixing weights of an undirected graph given as adjacency lists:
/// `W_ij = 1 / (1 + max(d_i, d_j))` for each edge, `W_ii = 1 - sum_j W_ij`. The matrix is
/// symmetric and doubly stochastic, so repeated neighbour averaging converges to the mean.
/// Returns, per node, `(neighbour, weight)` pairs with the node itself first.
pub fn metropolis_hastings_weights(
    adjacency: &[Vec<usize>],
) -> Result<Vec<Vec<(usize, f64)>>, AveragingError> {
    let n = adjacency.len();
    let sets: Vec<BTreeSet<usize>> = adjacency
        .iter()
        .map(|a| a.iter().copied().collect())
        .collect();
    for (i, neighbours) in sets.iter().enumerate() {
        for &j in neighbours {
            if j >= n {
                return Err(AveragingError::BadGraph(format!(
                    "node {i} lists node {j}, but there are only {n}"
                )));
            }
            if j == i {
                return Err(AveragingError::BadGraph(format!("node {i} lists itself")));
            }
            if !sets[j].contains(&i) {
                return Err(AveragingError::BadGraph(format!(
                    "edge {i}->{j} has no {j}->{i}"
                )));
            }
        }
    }
    Ok(sets
        .iter()
        .enumerate()
        .map(|(i, neighbours)| {
            let di = neighbours.len();
            let mut row: Vec<(usize, f64)> = neighbours
                .iter()
                .map(|&j| (j, 1.0 / (1.0 + di.max(sets[j].len()) as f64)))
                .collect();
            let off: f64 = row.iter().map(|(_, w)| w).sum();
            row.insert(0, (i, 1.0 - off));
            row
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn mean_of_identical_vectors_is_that_vector(x in proptest::collection::vec(-1e3f32..1e3, 1..5000), k in 1usize..9, w in proptest::collection::vec(0.1f64..100.0, 9)) {
            let inputs: Vec<(&[f32], f64)> = (0..k).map(|i| (x.as_slice(), w[i])).collect();
            let mut out = vec![0.0; x.len()];
            weighted_mean(&inputs, &mut out).unwrap();
            for (o, v) in out.iter().zip(&x) {
                prop_assert!((o - v).abs() <= 1e-5 * v.abs().max(1.0), "{o} vs {v}");
            }
        }

        #[test]
        fn push_sum_conserves_mass(seed_values in proptest::collection::vec(proptest::collection::vec(-10f32..10.0, 16), 2..8), steps in proptest::collection::vec((any::<usize>(), 1usize..4), 1..40)) {
            let n = seed_values.len();
            let mut nodes: Vec<PushSum> = seed_values.iter().enumerate().map(|(i, x)| PushSum::new(x, 1.0 + i as f64).unwrap()).collect();
            let mass = |nodes: &[PushSum]| -> (f64, Vec<f64>) {
                let w = nodes.iter().map(|p| p.weight).sum();
                let s = (0..16).map(|d| nodes.iter().map(|p| f64::from(p.sum[d])).sum()).collect();
                (w, s)
            };
            let (w0, s0) = mass(&nodes);
            for (pick, fanout) in steps {
                let from = pick % n;
                let shares = nodes[from].split(fanout);
                for (k, share) in shares.iter().enumerate() {
                    let to = (from + 1 + k) % n;
                    nodes[to].absorb(share).unwrap();
                }
            }
            let (w1, s1) = mass(&nodes);
            prop_assert!((w0 - w1).abs() < 1e-9 * w0);
            for (a, b) in s0.iter().zip(&s1) {
                prop_assert!((a - b).abs() < 1e-3 * a.abs().max(1.0), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn weighted_mean_rejects_bad_input() {
        let x = [1.0f32; 3];
        let mut out = [0.0; 3];
        assert_eq!(weighted_mean(&[], &mut out), Err(AveragingError::NoInputs));
        assert!(matches!(
            weighted_mean(&[(&x[..2], 1.0)], &mut out),
            Err(AveragingError::LengthMismatch { .. })
        ));
        assert!(matches!(
            weighted_mean(&[(&x[..], f64::NAN)], &mut out),
            Err(AveragingError::BadWeight { .. })
        ));
        assert!(matches!(
            weighted_mean(&[(&x[..], 0.0)], &mut out),
            Err(AveragingError::BadWeight { .. })
        ));
    }

    #[test]
    fn pairwise_partners_agree() {
        let (a0, b0) = (vec![1.0f32, 5.0], vec![3.0f32, -1.0]);
        let (mut a, mut b) = (a0.clone(), b0.clone());
        pairwise_average(&mut a, &b0, 1.0, 3.0).unwrap();
        pairwise_average(&mut b, &a0, 3.0, 1.0).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, vec![2.5, 0.5]);
    }

    #[test]
    fn push_sum_converges_to_weighted_mean() {
        let xs = [vec![0.0f32], vec![10.0], vec![4.0], vec![2.0]];
        let weights = [1.0, 1.0, 2.0, 4.0];
        let truth = (0.0 + 10.0 + 8.0 + 8.0) / 8.0;
        let mut nodes: Vec<PushSum> = xs
            .iter()
            .zip(weights)
            .map(|(x, w)| PushSum::new(x, w).unwrap())
            .collect();
        for round in 0..60 {
            for i in 0..4 {
                let share = nodes[i].split(1).remove(0);
                nodes[(i + 1 + round % 3) % 4].absorb(&share).unwrap();
            }
        }
        for node in &nodes {
            let mut est = [0.0];
            node.estimate(&mut est).unwrap();
            assert!((est[0] - truth).abs() < 1e-3, "{} vs {truth}", est[0]);
        }
    }

    #[test]
    fn metropolis_hastings_is_doubly_stochastic() {
        // A star with a tail: degrees differ.
        let adjacency = vec![vec![1, 2, 3], vec![0], vec![0, 3], vec![0, 2]];
        let w = metropolis_hastings_weights(&adjacency).unwrap();
        let mut dense = [[0.0f64; 4]; 4];
        for (i, row) in w.iter().enumerate() {
            for &(j, v) in row {
                dense[i][j] = v;
            }
        }
        for i in 0..4 {
            let row: f64 = dense[i].iter().sum();
            let col: f64 = dense.iter().map(|r| r[i]).sum();
            assert!((row - 1.0).abs() < 1e-12 && (col - 1.0).abs() < 1e-12);
            for (j, other) in dense.iter().enumerate() {
                assert!((dense[i][j] - other[i]).abs() < 1e-12);
                assert!(dense[i][j] >= 0.0);
            }
        }
        assert!(metropolis_hastings_weights(&[vec![1], vec![]]).is_err());
    }
}
