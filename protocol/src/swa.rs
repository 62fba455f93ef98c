//! Stochastic weight averaging over the last training rounds (`training.swa_rounds`): a
//! site's model after each of the last rounds' exchanges is folded into a running mean, and
//! that mean, not the last iterate, is what the site carries into the final reduce. Node,
//! simulator and baselines call the same two functions, so they average the same rounds.

/// Whether training round `round` (1-based) is one of the last `k` of `training_rounds`.
pub fn in_window(round: u64, training_rounds: u64, k: u32) -> bool {
    round <= training_rounds && round + u64::from(k) > training_rounds
}

/// The running mean of the models folded in so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TailMean {
    /// The mean (empty before the first model).
    pub mean: Vec<f32>,
    /// Models folded in.
    pub count: u32,
}

impl TailMean {
    /// A mean of `count` models, restored from a checkpoint.
    pub fn restored(mean: Vec<f32>, count: u32) -> Self {
        Self { mean, count }
    }

    /// Folds `model` in. A model of another length than the mean's restarts the mean (a
    /// layout change can only come from a bug, and a fresh mean is still a valid average).
    pub fn add(&mut self, model: &[f32]) {
        if self.count == 0 || self.mean.len() != model.len() {
            self.mean = model.to_vec();
            self.count = 1;
            return;
        }
        self.count += 1;
        let k = 1.0 / f64::from(self.count);
        for (m, &w) in self.mean.iter_mut().zip(model) {
            *m = (f64::from(*m) + (f64::from(w) - f64::from(*m)) * k) as f32;
        }
    }

    /// The mean, once a model was folded in.
    pub fn get(&self) -> Option<&[f32]> {
        (self.count > 0).then_some(self.mean.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_the_last_k_training_rounds() {
        let rounds: Vec<u64> = (1..=12).filter(|&r| in_window(r, 10, 3)).collect();
        assert_eq!(rounds, [8, 9, 10]);
        assert!(
            (1..=10).all(|r| in_window(r, 10, 20)),
            "k beyond the rounds: all of them"
        );
        assert!(
            !in_window(11, 10, 3),
            "reduce rounds are not training rounds"
        );
    }

    #[test]
    fn the_mean_is_the_mean() {
        let mut t = TailMean::default();
        assert_eq!(t.get(), None);
        for w in [[1.0f32, -2.0], [2.0, 0.0], [6.0, 8.0]] {
            t.add(&w);
        }
        assert_eq!(t.count, 3);
        let m = t.get().unwrap();
        assert!(
            (m[0] - 3.0).abs() < 1e-6 && (m[1] - 2.0).abs() < 1e-6,
            "{m:?}"
        );
        t.add(&[1.0]);
        assert_eq!((t.count, t.get().unwrap()), (1, &[1.0f32][..]));
    }
}
