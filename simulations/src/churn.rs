//! Which sites are online each round: random leaves and rejoins, and scripted events.

use medmesh_training::rng::Rng;

use crate::scenario::Churn;

/// Online flags, updated before each round.
#[derive(Debug, Clone)]
pub struct Presence {
    online: Vec<bool>,
    rng: Rng,
}

impl Presence {
    /// Everyone online.
    pub fn new(n: usize, seed: u64) -> Self {
        Self {
            online: vec![true; n],
            rng: Rng::derive(seed, 0xC4_0211),
        }
    }

    /// Applies `churn` for `round`; returns the sites that came back (they resume from their
    /// checkpoint, i.e. the model they left with).
    pub fn advance(&mut self, churn: &Churn, round: u32) -> Vec<usize> {
        let mut back = Vec::new();
        for i in 0..self.online.len() {
            let p = if self.online[i] {
                churn.leave_probability
            } else {
                churn.rejoin_probability
            };
            if p > 0.0 && self.rng.uniform() < p {
                self.online[i] = !self.online[i];
                if self.online[i] {
                    back.push(i);
                }
            }
        }
        for e in churn.events.iter().filter(|e| e.round == round) {
            let on: Vec<usize> = (0..self.online.len()).filter(|&i| self.online[i]).collect();
            let off: Vec<usize> = (0..self.online.len())
                .filter(|&i| !self.online[i])
                .collect();
            for i in self.pick(&on, e.leave) {
                self.online[i] = false;
            }
            for i in self.pick(&off, e.rejoin) {
                self.online[i] = true;
                back.push(i);
            }
        }
        back.sort_unstable();
        back.dedup();
        back
    }

    fn pick(&mut self, from: &[usize], fraction: f64) -> Vec<usize> {
        let mut pool = from.to_vec();
        self.rng.shuffle(&mut pool);
        pool.truncate((from.len() as f64 * fraction).round() as usize);
        pool
    }

    /// Whether site `i` is online.
    pub fn is_online(&self, i: usize) -> bool {
        self.online[i]
    }

    /// The flags.
    pub fn flags(&self) -> &[bool] {
        &self.online
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::ChurnEvent;

    #[test]
    fn scripted_events_move_the_asked_fractions() {
        let churn = Churn {
            events: vec![
                ChurnEvent {
                    round: 3,
                    leave: 0.3,
                    rejoin: 0.0,
                },
                ChurnEvent {
                    round: 6,
                    leave: 0.0,
                    rejoin: 0.5,
                },
            ],
            ..Churn::default()
        };
        let mut p = Presence::new(20, 1);
        assert!(p.advance(&churn, 1).is_empty());
        p.advance(&churn, 3);
        assert_eq!(p.flags().iter().filter(|o| !**o).count(), 6);
        let back = p.advance(&churn, 6);
        assert_eq!(back.len(), 3);
        assert_eq!(p.flags().iter().filter(|o| !**o).count(), 3);
    }
}
