//! Synchronous neighbour averaging on a fixed graph with Metropolis-Hastings weights: the
//! consensus-only core that the simulator's schemes are measured against.

use medmesh_protocol::averaging::{AveragingError, metropolis_hastings_weights};

/// Vectors of every node in one contiguous arena (`nodes x dim`), plus a second arena to
/// write the next round into: exactly two copies, whatever the node count.
#[derive(Debug, Clone)]
pub struct ConsensusState {
    dim: usize,
    current: Vec<f32>,
    next: Vec<f32>,
    weights: Vec<Vec<(usize, f64)>>,
}

impl ConsensusState {
    /// Starts from `initial` (one vector per node) on the graph `adjacency`.
    pub fn new(adjacency: &[Vec<usize>], initial: &[Vec<f32>]) -> Result<Self, AveragingError> {
        let dim = initial.first().map_or(0, Vec::len);
        if initial.len() != adjacency.len() {
            return Err(AveragingError::BadGraph(format!(
                "{} initial vectors for {} nodes",
                initial.len(),
                adjacency.len()
            )));
        }
        if let Some((index, v)) = initial.iter().enumerate().find(|(_, v)| v.len() != dim) {
            return Err(AveragingError::LengthMismatch {
                index,
                len: v.len(),
                expected: dim,
            });
        }
        let current: Vec<f32> = initial.iter().flatten().copied().collect();
        Ok(Self {
            dim,
            next: vec![0.0; current.len()],
            current,
            weights: metropolis_hastings_weights(adjacency)?,
        })
    }

    /// One round: every node replaces its vector by the weighted average of its neighbourhood.
    pub fn step(&mut self) {
        let d = self.dim;
        for (i, row) in self.weights.iter().enumerate() {
            let out = &mut self.next[i * d..(i + 1) * d];
            out.fill(0.0);
            for &(j, w) in row {
                let w = w as f32;
                for (o, x) in out.iter_mut().zip(&self.current[j * d..(j + 1) * d]) {
                    *o += w * x;
                }
            }
        }
        std::mem::swap(&mut self.current, &mut self.next);
    }

    /// Node `i`'s vector.
    pub fn node(&self, i: usize) -> &[f32] {
        &self.current[i * self.dim..(i + 1) * self.dim]
    }

    /// Max over nodes of `||x_i - mean|| / ||mean||` (absolute distance if the mean is 0).
    pub fn consensus_error(&self) -> f64 {
        let n = self.weights.len();
        if n == 0 || self.dim == 0 {
            return 0.0;
        }
        let mut mean = vec![0f64; self.dim];
        for i in 0..n {
            for (m, x) in mean.iter_mut().zip(self.node(i)) {
                *m += f64::from(*x) / n as f64;
            }
        }
        let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt();
        let worst = (0..n)
            .map(|i| {
                self.node(i)
                    .iter()
                    .zip(&mean)
                    .map(|(x, m)| (f64::from(*x) - m).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .fold(0.0, f64::max);
        if norm > 0.0 { worst / norm } else { worst }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{complete, ring};

    fn initial(n: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| vec![i as f32, 10.0 - i as f32, 1.0])
            .collect()
    }

    #[test]
    fn ring_converges_to_the_mean_and_keeps_it() {
        let mut s = ConsensusState::new(&ring(8).unwrap(), &initial(8)).unwrap();
        let start = s.consensus_error();
        for _ in 0..300 {
            s.step();
        }
        assert!(
            s.consensus_error() < 1e-4 * start,
            "{} -> {}",
            start,
            s.consensus_error()
        );
        assert!((s.node(3)[0] - 3.5).abs() < 1e-3 && (s.node(5)[1] - 6.5).abs() < 1e-3);
    }

    #[test]
    fn complete_graph_agrees_in_one_round() {
        let mut s = ConsensusState::new(&complete(5), &initial(5)).unwrap();
        s.step();
        assert!(s.consensus_error() < 1e-6);
    }

    #[test]
    fn mismatched_inputs_are_refused() {
        assert!(ConsensusState::new(&ring(4).unwrap(), &initial(3)).is_err());
        let mut bad = initial(4);
        bad[2].push(0.0);
        assert!(ConsensusState::new(&ring(4).unwrap(), &bad).is_err());
    }
}
