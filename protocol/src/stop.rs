//! Early stopping without a coordinator.
//!
//! A manifest's `[stop]` rules (a target metric, patience, a time budget) are checked by each
//! site on its own validation metric after each training round. The first site that meets one
//! announces, in its signed progress records, the last training round of the experiment:
//! [`STOP_MARGIN`] rounds after the one it met the rule in, so that the announcement reaches
//! every site before any of them trains past it. Every site ends its training at the
//! earliest round announced ([`StopRule::agreed_end`]), then runs the final reduce: all sites stop
//! after the same round and export the same model.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

/// Rounds between the round a site meets a stop rule and the last training round it
/// announces: time for the signed announcement to reach every site.
pub const STOP_MARGIN: u64 = 2;

/// The stop rules of a manifest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StopRule {
    /// Stop once a site's validation metric reaches this.
    pub target_metric: Option<f64>,
    /// Stop after this many training rounds without a better validation metric.
    pub patience_rounds: Option<u32>,
    /// Stop once a site has run the experiment this long.
    pub max_time: Option<Duration>,
}

/// Which rule a site met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// The validation metric reached the target.
    TargetMetric,
    /// No better validation metric for `patience_rounds` rounds.
    Patience,
    /// The time budget is spent.
    MaxMinutes,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::TargetMetric => "stop.target_metric reached",
            StopReason::Patience => "stop.patience_rounds without improvement",
            StopReason::MaxMinutes => "stop.max_minutes spent",
        })
    }
}

/// What a site remembers between rounds (and restarts) to apply the rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StopState {
    /// The best validation metric so far and the training round it came in.
    pub best: Option<(u64, f64)>,
}

impl StopRule {
    /// The rules of `m`.
    pub fn from_manifest(m: &Manifest) -> Self {
        Self {
            target_metric: m.stop.target_metric,
            patience_rounds: m.stop.patience_rounds,
            max_time: m
                .stop
                .max_minutes
                .map(|min| Duration::from_secs(u64::from(min) * 60)),
        }
    }

    /// Whether any rule is set.
    pub fn is_set(&self) -> bool {
        self.target_metric.is_some() || self.patience_rounds.is_some() || self.max_time.is_some()
    }

    /// Takes the validation `metric` after training round `round`, `elapsed` time into the
    /// experiment at this site; returns the rule met, if any.
    pub fn observe(
        &self,
        state: &mut StopState,
        round: u64,
        metric: f64,
        elapsed: Duration,
    ) -> Option<StopReason> {
        // NaN never improves and never meets a target.
        if state.best.is_none_or(|(_, best)| metric > best) {
            state.best = Some((round, metric));
        }
        if self.target_metric.is_some_and(|t| metric >= t) {
            return Some(StopReason::TargetMetric);
        }
        if let (Some(p), Some((best_round, _))) = (self.patience_rounds, state.best)
            && round >= best_round + u64::from(p)
        {
            return Some(StopReason::Patience);
        }
        if self.max_time.is_some_and(|max| elapsed >= max) {
            return Some(StopReason::MaxMinutes);
        }
        None
    }

    /// The last training round a site announces when it meets a rule after `round`; `None`
    /// when that is no earlier than the manifest's `training_rounds` (nothing to announce).
    pub fn announce(round: u64, training_rounds: u64) -> Option<u64> {
        let end = round + STOP_MARGIN;
        (end < training_rounds).then_some(end)
    }
}

impl StopRule {
    /// The last training round every site keeps to: the earliest announced, never more than
    /// the manifest's `training_rounds`, and never before `trained` (the rounds this site has
    /// trained already: an announcement it heard too late cannot undo them). A manifest
    /// without stop rules runs all its rounds, whatever a member announces.
    pub fn agreed_end(
        &self,
        training_rounds: u64,
        trained: u64,
        announced: impl IntoIterator<Item = u64>,
    ) -> u64 {
        if !self.is_set() {
            return training_rounds;
        }
        announced
            .into_iter()
            .min()
            .map_or(training_rounds, |end| end.min(training_rounds))
            .max(trained.min(training_rounds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(target: Option<f64>, patience: Option<u32>, minutes: Option<u64>) -> StopRule {
        StopRule {
            target_metric: target,
            patience_rounds: patience,
            max_time: minutes.map(|m| Duration::from_secs(m * 60)),
        }
    }

    #[test]
    fn a_target_stops_when_met() {
        let r = rule(Some(0.8), None, None);
        let mut s = StopState::default();
        assert_eq!(r.observe(&mut s, 1, 0.5, Duration::ZERO), None);
        assert_eq!(r.observe(&mut s, 2, f64::NAN, Duration::ZERO), None);
        assert_eq!(
            r.observe(&mut s, 3, 0.8, Duration::ZERO),
            Some(StopReason::TargetMetric)
        );
    }

    #[test]
    fn patience_counts_rounds_since_the_best() {
        let r = rule(None, Some(2), None);
        let mut s = StopState::default();
        let history = [0.5, 0.6, 0.59, 0.7, 0.7, 0.65];
        let met: Vec<Option<StopReason>> = history
            .iter()
            .enumerate()
            .map(|(i, &m)| r.observe(&mut s, i as u64 + 1, m, Duration::ZERO))
            .collect();
        // Best 0.7 at round 4 (an equal value does not improve); two rounds later: stop.
        assert_eq!(met[..5], [None; 5]);
        assert_eq!(met[5], Some(StopReason::Patience));
        assert_eq!(s.best, Some((4, 0.7)));
    }

    #[test]
    fn the_time_budget_counts_from_the_start() {
        let r = rule(None, None, Some(30));
        let mut s = StopState::default();
        assert_eq!(
            r.observe(&mut s, 1, 0.1, Duration::from_secs(29 * 60)),
            None
        );
        assert_eq!(
            r.observe(&mut s, 2, 0.1, Duration::from_secs(30 * 60)),
            Some(StopReason::MaxMinutes)
        );
        assert!(!rule(None, None, None).is_set());
    }

    #[test]
    fn announcements_leave_a_margin_and_the_earliest_wins() {
        assert_eq!(StopRule::announce(3, 20), Some(3 + STOP_MARGIN));
        assert_eq!(StopRule::announce(18, 20), None, "the manifest ends sooner");
        let r = rule(Some(0.9), None, None);
        assert_eq!(r.agreed_end(20, 4, []), 20);
        assert_eq!(r.agreed_end(20, 4, [9, 7, 12]), 7);
        assert_eq!(r.agreed_end(20, 4, [30]), 20);
        // Heard too late: what was trained stays trained.
        assert_eq!(r.agreed_end(20, 9, [7]), 9);
        assert_eq!(r.agreed_end(5, 9, []), 5);
        // Without stop rules, announcements (a malicious member's) change nothing.
        assert_eq!(rule(None, None, None).agreed_end(20, 4, [5]), 20);
    }
}
