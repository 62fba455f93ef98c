//! Which sites are online each round: random leaves and rejoins, and scripted events.

use medmesh_training::rng::Rng;

use crate::scenario::{Churn, TraceEvent};

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
        for e in churn.trace.iter().filter(|e| e.round == round) {
            let join = e.event == TraceEvent::Join;
            if join && !self.online[e.site] {
                back.push(e.site);
            }
            self.online[e.site] = join;
        }
        back.sort_unstable();
        back.dedup();
        back.retain(|&i| self.online[i]);
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
    fn a_trace_moves_the_sites_it_names() {
        let churn = Churn {
            trace: crate::scenario::parse_trace("2,3,crash\n4,3,join\n").unwrap(),
            ..Churn::default()
        };
        let mut p = Presence::new(5, 1);
        p.advance(&churn, 2);
        assert!(!p.is_online(3) && p.is_online(2));
        assert_eq!(p.advance(&churn, 4), vec![3]);
        assert!(p.is_online(3));
    }

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
