//! The experiments a node knows and the progress it has heard of, in one type that owns
//! them. Request handlers read it, experiment runners write it; neither touches the other.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use medmesh_crypto::PublicKey;
use medmesh_protocol::{
    ExchangeState, ProgressRecord, SignedManifest, SignedProgress, Unavailable, UpdateAnswer,
    UpdateEnvelope,
};

use crate::config::DatasetSection;

/// Rounds of updates (and pairwise exchange states) kept for slower peers.
pub const SERVED_ROUNDS: u64 = 3;

/// A model update this node serves to its peers.
#[derive(Debug)]
pub struct Served {
    /// The signed envelope.
    pub envelope: UpdateEnvelope,
    /// The encoded payload.
    pub payload: Vec<u8>,
}

/// What the node knows of one experiment.
#[derive(Debug)]
struct Experiment {
    /// The manifest as accepted.
    signed: SignedManifest,
    /// Its digest.
    digest: [u8; 32],
    /// Whether this node trains in it (it has the dataset); if not, why not.
    not_participating: Option<String>,
    /// This node's updates by round and attempt (the last [`SERVED_ROUNDS`] rounds).
    served: BTreeMap<(u64, u32), Arc<Served>>,
    /// Rounds this node has completed, the final reduce's included.
    rounds_done: u64,
    /// Whether this node finished (exported) the experiment.
    finished: bool,
    /// This node's side of its recent pairwise exchanges, by round (the partner asks).
    exchanges: BTreeMap<u64, ExchangeState>,
    /// Model-update payload bytes served to peers and fetched from them.
    traffic: Traffic,
}

/// Model-update payload bytes of one experiment at this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Served to peers.
    pub sent: u64,
    /// Fetched from peers.
    pub received: u64,
}

/// Rounds of each site's history kept for the dashboard's curves; older rounds are dropped
/// first.
pub const HISTORY_ROUNDS: usize = 10_000;

/// One experiment as the node knows it, for the dashboard.
#[derive(Debug, Clone)]
pub struct ExperimentView {
    /// The manifest as accepted.
    pub signed: SignedManifest,
    /// Its digest.
    pub digest: [u8; 32],
    /// Why this node does not (or no longer) train in it, if it doesn't.
    pub not_participating: Option<String>,
    /// Rounds this node has completed.
    pub rounds_done: u64,
    /// Whether this node finished it.
    pub finished: bool,
    /// This node's model-update traffic in it.
    pub traffic: Traffic,
}

/// What [`Registry::register`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// First time, and this node takes part: registered now, its runner is to start.
    New,
    /// First time, and this node does not take part (it lacks the dataset): registered.
    Observed,
    /// Already registered with the same digest.
    Known,
    /// The id is taken by a manifest with this other digest.
    Conflict([u8; 32]),
}

/// Experiments by id, and the latest signed progress per (experiment, site).
#[derive(Default)]
pub struct Registry {
    experiments: Mutex<HashMap<String, Experiment>>,
    progress: Mutex<BTreeMap<(String, PublicKey), SignedProgress>>,
    /// Every verified record heard, by (experiment, site) and round: the curves.
    history: Mutex<HashMap<(String, PublicKey), BTreeMap<u64, ProgressRecord>>>,
}

/// Locks a mutex, recovering from poisoning: state behind these locks stays consistent
/// between statements, so a panicked holder leaves nothing half-written.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// Registers a verified manifest unless its id is known, atomically (members forward a
    /// new manifest to each other at once: exactly one handler adopts it).
    pub fn register(
        &self,
        signed: &SignedManifest,
        datasets: &BTreeMap<String, DatasetSection>,
    ) -> Registered {
        let id = &signed.manifest.id;
        let digest = signed.manifest.digest();
        let mut experiments = lock(&self.experiments);
        if let Some(existing) = experiments.get(id) {
            return if existing.digest == digest {
                Registered::Known
            } else {
                Registered::Conflict(existing.digest)
            };
        }
        let dataset = &signed.manifest.task.dataset;
        let not_participating = (!datasets.contains_key(dataset)).then(|| {
            format!("dataset {dataset:?} is not configured at this node ([datasets.{dataset}])")
        });
        if let Some(why) = &not_participating {
            tracing::warn!(experiment = %id, "not participating: {why}");
        }
        let participates = not_participating.is_none();
        experiments.insert(
            id.clone(),
            Experiment {
                digest,
                signed: signed.clone(),
                not_participating,
                served: BTreeMap::new(),
                exchanges: BTreeMap::new(),
                rounds_done: 0,
                finished: false,
                traffic: Traffic::default(),
            },
        );
        if participates {
            Registered::New
        } else {
            Registered::Observed
        }
    }

    /// Forgets an experiment (its manifest could not be persisted).
    pub fn remove(&self, id: &str) {
        lock(&self.experiments).remove(id);
    }

    /// Marks an experiment this node no longer takes part in, and why.
    pub fn stop(&self, id: &str, why: String) {
        if let Some(e) = lock(&self.experiments).get_mut(id) {
            e.not_participating = Some(why);
        }
    }

    /// The manifest of an experiment.
    pub fn manifest(&self, id: &str) -> Option<SignedManifest> {
        lock(&self.experiments).get(id).map(|e| e.signed.clone())
    }

    /// Manifests of the experiments this node has not finished.
    pub fn unfinished(&self) -> Vec<SignedManifest> {
        lock(&self.experiments)
            .values()
            .filter(|e| !e.finished)
            .map(|e| e.signed.clone())
            .collect()
    }

    /// Whether `id` is known with manifest digest `digest`.
    pub fn knows(&self, id: &str, digest: &[u8; 32]) -> bool {
        lock(&self.experiments)
            .get(id)
            .is_some_and(|e| e.digest == *digest)
    }

    /// Whether this node finished `id`; `None` for an unknown experiment.
    pub fn finished(&self, id: &str) -> Option<bool> {
        lock(&self.experiments).get(id).map(|e| e.finished)
    }

    /// Records the rounds this site has completed (the final reduce's included: peers read
    /// it to know whether to wait for this site's model) and whether it finished.
    pub fn set_progress(&self, id: &str, rounds_done: u64, finished: bool) {
        if let Some(e) = lock(&self.experiments).get_mut(id) {
            e.rounds_done = rounds_done;
            e.finished = finished;
        }
    }

    /// Serves `served` as this node's update of `round`; forgets rounds older than the last
    /// [`SERVED_ROUNDS`].
    pub fn serve(&self, id: &str, round: u64, served: Served) {
        if let Some(e) = lock(&self.experiments).get_mut(id) {
            let attempt = served.envelope.header.attempt;
            e.served.insert((round, attempt), Arc::new(served));
            let mut rounds: Vec<u64> = e.served.keys().map(|k| k.0).collect();
            rounds.dedup();
            if let Some(&oldest_kept) = rounds.iter().rev().nth(SERVED_ROUNDS as usize - 1) {
                e.served.retain(|k, _| k.0 >= oldest_kept);
            }
        }
    }

    /// The update served for `round` at `attempt`.
    pub fn served(&self, id: &str, round: u64, attempt: u32) -> Option<Arc<Served>> {
        lock(&self.experiments)
            .get(id)
            .and_then(|e| e.served.get(&(round, attempt)).cloned())
    }

    /// The answer to a peer asking for this node's update of `round` at `attempt` (the latest
    /// if `None`).
    pub fn offer(&self, id: &str, round: Option<u64>, attempt: u32) -> UpdateAnswer {
        let unavailable = |reason, latest_round| UpdateAnswer::Unavailable {
            experiment_id: id.to_owned(),
            reason,
            latest_round,
        };
        let experiments = lock(&self.experiments);
        let Some(e) = experiments.get(id) else {
            return unavailable(Unavailable::UnknownExperiment, None);
        };
        if e.not_participating.is_some() {
            return unavailable(Unavailable::NotParticipating, None);
        }
        // Served rounds run ahead of completed ones while the node averages.
        let latest = e
            .served
            .keys()
            .next_back()
            .map_or(0, |k| k.0)
            .max(e.rounds_done);
        let found = match round {
            Some(r) => e.served.get(&(r, attempt)),
            None => e.served.values().next_back(),
        };
        match (found, round) {
            (Some(s), _) => UpdateAnswer::Offer(s.envelope.clone()),
            // A redo of the latest round may still come.
            (None, Some(r)) if r > latest || (r == latest && attempt > 0) => {
                unavailable(Unavailable::NotYetTrained, Some(latest))
            }
            (None, Some(_)) => unavailable(Unavailable::NoLongerKept, Some(latest)),
            (None, None) => unavailable(Unavailable::NoUpdateYet, Some(latest)),
        }
    }

    /// Records this node's side of the pairwise exchange of `round`.
    pub fn set_exchange(&self, id: &str, round: u64, state: ExchangeState) {
        if let Some(e) = lock(&self.experiments).get_mut(id) {
            e.exchanges.insert(round, state);
            while e.exchanges.len() as u64 > SERVED_ROUNDS {
                e.exchanges.pop_first();
            }
        }
    }

    /// This node's side of the pairwise exchange of `round`: `Pending` until its runner has
    /// decided.
    pub fn exchange(&self, id: &str, round: u64) -> ExchangeState {
        lock(&self.experiments)
            .get(id)
            .and_then(|e| e.exchanges.get(&round).copied())
            .unwrap_or(ExchangeState::Pending)
    }

    /// Counts model-update payload bytes of experiment `id` served or fetched.
    pub fn add_traffic(&self, id: &str, sent: u64, received: u64) {
        if let Some(e) = lock(&self.experiments).get_mut(id) {
            e.traffic.sent += sent;
            e.traffic.received += received;
        }
    }

    /// This node's model-update traffic in experiment `id`.
    pub fn traffic(&self, id: &str) -> Traffic {
        lock(&self.experiments)
            .get(id)
            .map(|e| e.traffic)
            .unwrap_or_default()
    }

    /// Every experiment this node knows, by id.
    pub fn experiments(&self) -> Vec<ExperimentView> {
        let mut all: Vec<ExperimentView> = lock(&self.experiments)
            .values()
            .map(|e| ExperimentView {
                signed: e.signed.clone(),
                digest: e.digest,
                not_participating: e.not_participating.clone(),
                rounds_done: e.rounds_done,
                finished: e.finished,
                traffic: e.traffic,
            })
            .collect();
        all.sort_by(|a, b| a.signed.manifest.id.cmp(&b.signed.manifest.id));
        all
    }

    /// The records heard of each site of experiment `id`, by round (the latest record of a
    /// round wins).
    pub fn history(&self, id: &str) -> Vec<(PublicKey, Vec<ProgressRecord>)> {
        let mut sites: Vec<(PublicKey, Vec<ProgressRecord>)> = lock(&self.history)
            .iter()
            .filter(|((e, _), _)| e == id)
            .map(|((_, site), rounds)| (*site, rounds.values().cloned().collect()))
            .collect();
        sites.sort_by_key(|(k, _)| k.to_bytes());
        sites
    }

    /// Keeps `p` in its site's history (unless it reports a failure), and as its latest if it is newer than what is known
    /// of its site; true if it was.
    pub fn record_progress(&self, p: &SignedProgress) -> bool {
        let key = (p.record.experiment_id.clone(), p.record.node);
        // A failure record repeats the site's last round: it is no point of its curves.
        if p.record.failure.is_none() {
            let mut history = lock(&self.history);
            let rounds = history.entry(key.clone()).or_default();
            let keep = rounds
                .get(&p.record.round)
                .is_none_or(|old| old.unix_ms <= p.record.unix_ms);
            if keep {
                rounds.insert(p.record.round, p.record.clone());
            }
            while rounds.len() > HISTORY_ROUNDS {
                rounds.pop_first();
            }
        }
        let mut all = lock(&self.progress);
        let newer = all.get(&key).is_none_or(|old| {
            (old.record.round, old.record.finished, old.record.unix_ms)
                < (p.record.round, p.record.finished, p.record.unix_ms)
        });
        if newer {
            all.insert(key, p.clone());
        }
        newer
    }

    /// The last training rounds sites announced for `id`, having met a stop rule.
    pub fn announced_ends(&self, id: &str) -> Vec<u64> {
        lock(&self.progress)
            .values()
            .filter(|p| p.record.experiment_id == id)
            .filter_map(|p| p.record.stop_after)
            .collect()
    }

    /// The latest record of each site, of one experiment or all, at most `max`.
    pub fn progress(&self, id: Option<&str>, max: usize) -> Vec<SignedProgress> {
        lock(&self.progress)
            .values()
            .filter(|p| id.is_none_or(|id| p.record.experiment_id == id))
            .take(max)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmesh_crypto::Identity;
    use medmesh_protocol::Manifest;

    fn signed(title: &str) -> SignedManifest {
        let researcher = Identity::from_seed(&[4; 32]);
        let mut m =
            Manifest::parse(include_str!("../../../examples/synthetic-quickstart.toml")).unwrap();
        m.title = title.into();
        SignedManifest::sign(m, &researcher)
    }

    #[test]
    fn concurrent_announcements_register_an_experiment_once() {
        let registry = Registry::default();
        let first = signed("one");
        let datasets = BTreeMap::new();
        let registered = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| registry.register(&first, &datasets)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|r| *r != Registered::Known)
                .count()
        });
        // Without the dataset the node observes the experiment, exactly once.
        assert_eq!(registered, 1);
        assert!(matches!(
            registry.register(&signed("two"), &datasets),
            Registered::Conflict(_)
        ));
        assert_eq!(
            registry.offer(&first.manifest.id, Some(1), 0),
            UpdateAnswer::Unavailable {
                experiment_id: first.manifest.id.clone(),
                reason: Unavailable::NotParticipating,
                latest_round: None,
            }
        );
    }

    #[test]
    fn offers_name_why_a_round_is_missing() {
        let registry = Registry::default();
        let m = signed("one");
        let id = m.manifest.id.clone();
        let datasets = BTreeMap::from([(
            m.manifest.task.dataset.clone(),
            DatasetSection {
                path: "/nowhere".into(),
                kind: None,
            },
        )]);
        assert_eq!(
            registry.offer("other", Some(1), 0),
            UpdateAnswer::Unavailable {
                experiment_id: "other".into(),
                reason: Unavailable::UnknownExperiment,
                latest_round: None,
            }
        );
        assert_eq!(registry.register(&m, &datasets), Registered::New);
        let envelope = |round| {
            let header = medmesh_protocol::UpdateHeader {
                experiment_id: id.clone(),
                manifest_digest: m.manifest.digest(),
                round,
                attempt: 0,
                sender: Identity::from_seed(&[1; 32]).public_key(),
                layout_digest: [0; 32],
                num_params: 1,
                encoding: medmesh_protocol::WeightEncoding::F32,
                sample_weight: 1.0,
                payload_len: 0,
                payload_hash: [0; 32],
                chunk_size: 4096,
            };
            UpdateEnvelope::seal(header, &[0; 4], &Identity::from_seed(&[1; 32]))
        };
        for round in 1..=5 {
            registry.serve(
                &id,
                round,
                Served {
                    envelope: envelope(round),
                    payload: vec![0; 4],
                },
            );
        }
        let reason = |round| match registry.offer(&id, round, 0) {
            UpdateAnswer::Unavailable {
                reason,
                latest_round,
                ..
            } => Err((reason, latest_round)),
            UpdateAnswer::Offer(e) => Ok(e.header.round),
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(Some(4)), Ok(4));
        assert_eq!(reason(None), Ok(5));
        assert_eq!(
            reason(Some(2)),
            Err((Unavailable::NoLongerKept, Some(5))),
            "only the last {SERVED_ROUNDS} rounds are kept"
        );
        assert_eq!(reason(Some(6)), Err((Unavailable::NotYetTrained, Some(5))));
        registry.set_progress(&id, 7, false);
        assert_eq!(reason(Some(7)), Err((Unavailable::NoLongerKept, Some(7))));
    }
}
