//! Every node's vector in one contiguous `nodes x dim` arena, plus a second arena to write
//! the next round into: exactly two copies of the state, whatever the node count.

use rayon::prelude::*;

/// The two arenas.
#[derive(Debug, Clone)]
pub struct Arena {
    dim: usize,
    current: Vec<f32>,
    next: Vec<f32>,
}

impl Arena {
    /// `rows` (one per node, all of one length) as the current state.
    pub fn new(rows: &[Vec<f32>]) -> Self {
        let dim = rows.first().map_or(0, Vec::len);
        let current: Vec<f32> = rows.iter().flatten().copied().collect();
        Self {
            dim,
            next: vec![0.0; current.len()],
            current,
        }
    }

    /// `nodes` rows of `dim` values from `fill(node, index)`, filled in parallel.
    pub fn from_fn(nodes: usize, dim: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        let mut current = vec![0.0; nodes * dim];
        if dim > 0 {
            current
                .par_chunks_mut(dim)
                .enumerate()
                .for_each(|(i, row)| fill(i, row));
        }
        Self {
            dim,
            next: vec![0.0; current.len()],
            current,
        }
    }

    /// Values per node.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Nodes.
    pub fn nodes(&self) -> usize {
        self.current.len().checked_div(self.dim).unwrap_or(0)
    }

    /// Node `i`'s vector.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.current[i * self.dim..(i + 1) * self.dim]
    }

    /// Node `i`'s vector, mutable.
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.current[i * self.dim..(i + 1) * self.dim]
    }

    /// Two distinct rows, mutable.
    pub fn pair_mut(&mut self, i: usize, j: usize) -> (&mut [f32], &mut [f32]) {
        assert_ne!(i, j, "a node does not pair with itself");
        let d = self.dim;
        let (lo, hi) = (i.min(j), i.max(j));
        let (a, b) = self.current.split_at_mut(hi * d);
        let (lo_row, hi_row) = (&mut a[lo * d..(lo + 1) * d], &mut b[..d]);
        if i < j {
            (lo_row, hi_row)
        } else {
            (hi_row, lo_row)
        }
    }

    /// One synchronous round: node `i`'s next vector is `compute(i, current, out)`; all rows
    /// are computed in parallel from the same current state, then the arenas swap.
    pub fn step(&mut self, compute: impl Fn(usize, &Arena, &mut [f32]) + Sync) {
        let mut next = std::mem::take(&mut self.next);
        if self.dim > 0 {
            let this = &*self;
            next.par_chunks_mut(this.dim)
                .enumerate()
                .for_each(|(i, out)| compute(i, this, out));
        }
        self.next = std::mem::replace(&mut self.current, next);
    }

    /// [`Arena::step`] where each row's computation also returns a value (one per node).
    pub fn step_map<R: Send>(
        &mut self,
        compute: impl Fn(usize, &Arena, &mut [f32]) -> R + Sync,
    ) -> Vec<R> {
        if self.dim == 0 {
            return Vec::new();
        }
        let mut next = std::mem::take(&mut self.next);
        let this = &*self;
        let out = next
            .par_chunks_mut(this.dim)
            .enumerate()
            .map(|(i, row)| compute(i, this, row))
            .collect();
        self.next = std::mem::replace(&mut self.current, next);
        out
    }

    /// Mixes with a sparse row-stochastic matrix: `x_i <- sum_j w_ij x_j` (rows of
    /// `(column, weight)`; an empty row keeps the node's vector).
    pub fn mix(&mut self, weights: &[Vec<(usize, f64)>]) {
        self.step(|i, a, out| {
            let row = &weights[i];
            if row.is_empty() {
                out.copy_from_slice(a.row(i));
                return;
            }
            out.fill(0.0);
            for &(j, w) in row {
                let w = w as f32;
                for (o, x) in out.iter_mut().zip(a.row(j)) {
                    *o += w * x;
                }
            }
        });
    }

    /// Max over `members` of `||x_i - mean|| / ||mean||`, the mean taken over `members`
    /// (the absolute distance when the mean is 0). With `scale`, row `i` is read as
    /// `x_i / scale[i]` (push-sum's estimates).
    pub fn consensus_error(&self, members: &[usize], scale: Option<&[f64]>) -> f64 {
        if members.is_empty() || self.dim == 0 {
            return 0.0;
        }
        let mean = self.mean(members, scale);
        let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt();
        let worst = members
            .par_iter()
            .map(|&i| {
                // A product per value rather than a division: this pass reads the whole
                // arena every round.
                let inv = scale.map_or(1.0, |s| 1.0 / s[i]);
                self.row(i)
                    .iter()
                    .zip(&mean)
                    .map(|(x, m)| (f64::from(*x) * inv - m).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect::<Vec<f64>>()
            .into_iter()
            .fold(0.0, f64::max);
        if norm > 0.0 { worst / norm } else { worst }
    }

    /// The mean vector of `members` (rows divided by `scale` when given), accumulated in f64
    /// in a fixed order.
    pub fn mean(&self, members: &[usize], scale: Option<&[f64]>) -> Vec<f64> {
        // Blocks of columns in parallel, rows streamed in order within each block: every
        // element is summed over `members` in the same order whatever the thread count.
        const BLOCK: usize = 2048;
        let d = self.dim;
        let k = members.len().max(1) as f64;
        let mut mean = vec![0f64; d];
        mean.par_chunks_mut(BLOCK).enumerate().for_each(|(b, out)| {
            let start = b * BLOCK;
            for &i in members {
                let inv = scale.map_or(1.0, |s| 1.0 / s[i]);
                let row = &self.current[i * d + start..i * d + start + out.len()];
                for (o, x) in out.iter_mut().zip(row) {
                    *o += f64::from(*x) * inv;
                }
            }
            out.iter_mut().for_each(|o| *o /= k);
        });
        mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{complete, ring};
    use medmesh_protocol::averaging::metropolis_hastings_weights;

    fn initial(n: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| vec![i as f32, 10.0 - i as f32, 1.0])
            .collect()
    }

    #[test]
    fn ring_converges_to_the_mean_and_keeps_it() {
        let w = metropolis_hastings_weights(&ring(8).unwrap()).unwrap();
        let mut a = Arena::new(&initial(8));
        let all: Vec<usize> = (0..8).collect();
        let start = a.consensus_error(&all, None);
        for _ in 0..300 {
            a.mix(&w);
        }
        assert!(a.consensus_error(&all, None) < 1e-4 * start);
        assert!((a.row(3)[0] - 3.5).abs() < 1e-3 && (a.row(5)[1] - 6.5).abs() < 1e-3);
    }

    #[test]
    fn complete_graph_agrees_in_one_round() {
        let w = metropolis_hastings_weights(&complete(5)).unwrap();
        let mut a = Arena::new(&initial(5));
        a.mix(&w);
        assert!(a.consensus_error(&[0, 1, 2, 3, 4], None) < 1e-6);
    }

    #[test]
    fn pairs_are_the_rows_asked_for() {
        let mut a = Arena::new(&initial(4));
        let (x, y) = a.pair_mut(3, 1);
        assert_eq!((x[0], y[0]), (3.0, 1.0));
    }
}
