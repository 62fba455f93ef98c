//! One round's exchange at one site, apart from training, disk and sockets: pull the models
//! of the round's sources (and push-sum shares that missed their round), check them, settle
//! a pair with its partner, and merge by the round engine's rule. It reaches the network
//! only through [`RoundNet`], so it is unit-tested with an in-memory network.

use std::borrow::Cow;

use medmesh_crypto::PublicKey;
use medmesh_protocol::ParamLayout;
use medmesh_protocol::averaging::AveragingError;
use medmesh_protocol::robust::{UpdateRejection, check_update};
use medmesh_protocol::round::{Incoming, RoundGraph, RoundRules, Shape};

use super::exchange::FetchError;

/// A peer's model of a round, received and verified (signature, hash, layout).
#[derive(Debug, Clone)]
pub struct Received {
    /// The sender.
    pub sender: PublicKey,
    /// The round it belongs to.
    pub round: u64,
    /// Its weights.
    pub values: Vec<f32>,
    /// The mass it carries (sample count, or push-sum share).
    pub weight: f64,
}

/// What a round needs from the network.
pub trait RoundNet {
    /// Fetches each `(sender, round)` model, all at once, until the round's deadline.
    fn gather(
        &mut self,
        wanted: &[(PublicKey, u64)],
    ) -> Vec<((PublicKey, u64), Result<Received, FetchError>)>;

    /// Records this end's side of the pair exchange of `round` (`got`: it has the
    /// partner's model, checked) and, if it got it, asks `partner` for its side. True only
    /// when both ends got each other's model.
    fn confirm(&mut self, partner: PublicKey, round: u64, got: bool) -> bool;
}

/// A round as one site sees it.
pub struct RoundView<'a> {
    /// The experiment's rules.
    pub rules: &'a RoundRules,
    /// The round's graph.
    pub graph: &'a RoundGraph,
    /// The roster's node members, sorted (the graph's indices).
    pub members: &'a [PublicKey],
    /// This site's index.
    pub me: usize,
    /// The layout being averaged.
    pub layout: &'a ParamLayout,
    /// The manifest's `norm_bound`.
    pub norm_bound: Option<f64>,
}

/// A model this site refused, and why.
#[derive(Debug)]
pub struct Refusal {
    /// The sender.
    pub sender: PublicKey,
    /// A short name of the rule broken (the metrics label).
    pub reason: &'static str,
    /// What exactly was wrong.
    pub detail: String,
}

/// What a round's exchange gave.
#[derive(Debug, Default)]
pub struct Exchanged {
    /// The merged model, when anything was merged in.
    pub merged: Option<Vec<f32>>,
    /// This site's mass after the round.
    pub mass: f64,
    /// Senders whose models went into `merged`.
    pub contributors: Vec<PublicKey>,
    /// Models refused, with the reasons.
    pub refused: Vec<Refusal>,
    /// The furthest peer ahead of this round, and its round (this site fell behind).
    pub ahead: Option<(PublicKey, u64)>,
    /// Push-sum shares that missed this round: to fetch next round.
    pub late: Vec<(PublicKey, u64)>,
}

/// The metrics label of a failed check.
pub fn rejection_label(e: &UpdateRejection) -> &'static str {
    match e {
        UpdateRejection::LayoutMismatch { .. } => "wrong_layout",
        UpdateRejection::NonFinite { .. } => "non_finite_weights",
        UpdateRejection::NormExceeded { .. } => "norm_bound",
    }
}

/// Runs the exchange of `view`'s round: `local` is this site's model after training and
/// `kept` the mass it kept ([`RoundRules::split_mass`]); `late` are push-sum shares owed from
/// earlier rounds.
pub fn exchange(
    view: &RoundView<'_>,
    local: &[f32],
    kept: f64,
    late: Vec<(PublicKey, u64)>,
    net: &mut impl RoundNet,
) -> Result<Exchanged, AveragingError> {
    let round = view.graph.round();
    let shape = view.graph.shape();
    let mut wanted: Vec<(PublicKey, u64)> = view
        .graph
        .sources(view.me)
        .iter()
        .map(|&j| (view.members[j], round))
        .collect();
    wanted.extend(late);
    let mut out = Exchanged {
        mass: kept,
        ..Exchanged::default()
    };
    let mut accepted: Vec<Received> = Vec::new();
    let weight_bound = view.rules.weight_bound(shape, view.members.len());
    for ((sender, asked), result) in net.gather(&wanted) {
        match result {
            Ok(r) if r.weight > weight_bound => out.refused.push(Refusal {
                sender,
                reason: "sample_weight_bound",
                detail: format!(
                    "claims a sample weight of {} where the manifest allows at most {weight_bound}",
                    r.weight
                ),
            }),
            Ok(r) => match check_update(&r.values, view.layout, local, view.norm_bound) {
                Ok(()) => accepted.push(r),
                Err(e) => out.refused.push(Refusal {
                    sender,
                    reason: rejection_label(&e),
                    detail: e.to_string(),
                }),
            },
            Err(FetchError::Unavailable {
                latest_round: Some(k),
                ..
            }) if k > round => {
                if out.ahead.is_none_or(|(_, best)| k > best) {
                    out.ahead = Some((sender, k));
                }
            }
            Err(FetchError::Invalid { reason, detail }) => out.refused.push(Refusal {
                sender,
                reason,
                detail,
            }),
            Err(FetchError::Deadline | FetchError::Net(_))
                if shape == Shape::PushSum && asked == round =>
            {
                out.late.push((sender, asked));
            }
            Err(e) => tracing::debug!(%sender, round, "no update: {e}"),
        }
    }
    if shape.needs_confirmation()
        && let Some(&partner) = view.graph.sources(view.me).first()
        && !net.confirm(view.members[partner], round, !accepted.is_empty())
    {
        accepted.clear();
    }
    let mut incoming: Vec<Incoming<'_>> = accepted
        .iter()
        .filter_map(|r| {
            let member = view.members.iter().position(|k| *k == r.sender)?;
            Some(Incoming {
                member,
                values: Cow::Borrowed(&r.values),
                weight: r.weight,
            })
        })
        .collect();
    let mut merged = vec![0f32; local.len()];
    let outcome =
        view.rules
            .combine(view.graph, view.me, local, kept, &mut incoming, &mut merged)?;
    out.mass = outcome.weight;
    if outcome.combined > 0 {
        out.merged = Some(merged);
        out.contributors = accepted.iter().map(|r| r.sender).collect();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use medmesh_crypto::Identity;
    use medmesh_protocol::manifest::{Aggregation, Scheme};
    use medmesh_protocol::round::Overlay;
    use medmesh_protocol::{DType, TensorSpec};

    use super::*;

    /// An in-memory network: what each `(sender, round)` fetch gives, and what the partner
    /// says of its side of a pair.
    #[derive(Default)]
    struct FakeNet {
        models: HashMap<(PublicKey, u64), Result<Received, FetchError>>,
        partner_got_ours: bool,
        asked: Vec<(PublicKey, u64)>,
        confirmed: Vec<(u64, bool)>,
    }

    impl RoundNet for FakeNet {
        fn gather(
            &mut self,
            wanted: &[(PublicKey, u64)],
        ) -> Vec<((PublicKey, u64), Result<Received, FetchError>)> {
            self.asked.extend_from_slice(wanted);
            wanted
                .iter()
                .map(|w| {
                    let answer = self.models.remove(w).unwrap_or(Err(FetchError::Deadline));
                    (*w, answer)
                })
                .collect()
        }

        fn confirm(&mut self, _partner: PublicKey, round: u64, got: bool) -> bool {
            self.confirmed.push((round, got));
            got && self.partner_got_ours
        }
    }

    const DIM: usize = 4;

    fn layout() -> ParamLayout {
        ParamLayout {
            tensors: vec![TensorSpec {
                name: "w".into(),
                shape: vec![DIM as u64],
                dtype: DType::F32,
            }],
        }
    }

    fn members(n: usize) -> Vec<PublicKey> {
        let mut keys: Vec<PublicKey> = (0..n)
            .map(|i| Identity::from_seed(&[i as u8 + 1; 32]).public_key())
            .collect();
        keys.sort_by_key(|k| k.to_bytes());
        keys
    }

    fn rules(scheme: Scheme) -> RoundRules {
        RoundRules {
            scheme,
            seed: 3,
            fanout: 2,
            group_size: 3,
            aggregation: Aggregation::Mean,
            trim_fraction: 0.0,
            clip_norm: None,
            max_sample_weight: 1e5,
            training_rounds: 10,
            final_reduce: true,
        }
    }

    /// Site 0's view of `graph`.
    fn view<'a>(
        rules: &'a RoundRules,
        graph: &'a RoundGraph,
        members: &'a [PublicKey],
        layout: &'a ParamLayout,
        norm_bound: Option<f64>,
    ) -> RoundView<'a> {
        RoundView {
            rules,
            graph,
            members,
            me: 0,
            layout,
            norm_bound,
        }
    }

    fn model(v: f32) -> Vec<f32> {
        vec![v; DIM]
    }

    fn received(sender: PublicKey, round: u64, v: f32, weight: f64) -> Received {
        Received {
            sender,
            round,
            values: model(v),
            weight,
        }
    }

    #[test]
    fn a_pair_merges_only_when_both_ends_got_each_others_model() {
        let keys = members(4);
        let r = rules(Scheme::PairwiseGossip);
        let graph = r.graph(2, Overlay::Complete(4));
        let layout = layout();
        let view = view(&r, &graph, &keys, &layout, None);
        let partner = keys[graph.sources(0)[0]];
        // Both got it: the sample-weighted midpoint.
        let mut net = FakeNet {
            partner_got_ours: true,
            ..FakeNet::default()
        };
        net.models
            .insert((partner, 2), Ok(received(partner, 2, 4.0, 3.0)));
        let x = exchange(&view, &model(0.0), 1.0, Vec::new(), &mut net).unwrap();
        assert_eq!(x.merged, Some(model(3.0)));
        assert_eq!((x.mass, x.contributors.len()), (1.0, 1));
        assert_eq!(net.confirmed, [(2, true)]);
        // The partner did not get ours: both keep their models.
        let mut net = FakeNet::default();
        net.models
            .insert((partner, 2), Ok(received(partner, 2, 4.0, 3.0)));
        let x = exchange(&view, &model(0.0), 1.0, Vec::new(), &mut net).unwrap();
        assert_eq!((x.merged, x.mass), (None, 1.0));
        // The partner dropped out: this end says so, and keeps its model.
        let mut net = FakeNet {
            partner_got_ours: true,
            ..FakeNet::default()
        };
        let x = exchange(&view, &model(0.0), 1.0, Vec::new(), &mut net).unwrap();
        assert_eq!(x.merged, None);
        assert_eq!(net.confirmed, [(2, false)]);
    }

    #[test]
    fn a_late_push_sum_share_is_added_the_next_round() {
        let keys = members(3);
        let r = rules(Scheme::PushSum);
        // A round where someone pushes to site 0.
        let (round, graph) = (1..50)
            .map(|t| (t, r.graph(t, Overlay::Complete(3))))
            .find(|(_, g)| !g.sources(0).is_empty())
            .unwrap();
        let layout = layout();
        let view = view(&r, &graph, &keys, &layout, None);
        let pushers: Vec<PublicKey> = graph.sources(0).iter().map(|&j| keys[j]).collect();
        // Nothing arrives in time: the shares are owed, the mass is what the site kept.
        let mut net = FakeNet::default();
        let x = exchange(&view, &model(1.0), 2.0, Vec::new(), &mut net).unwrap();
        assert_eq!(x.merged, None);
        assert_eq!(x.mass, 2.0);
        let owed: Vec<(PublicKey, u64)> = pushers.iter().map(|k| (*k, round)).collect();
        assert_eq!(x.late, owed);
        // Next round they come: their mass is added with the next round's pushes.
        let next = r.graph(round + 1, Overlay::Complete(3));
        let view = RoundView {
            graph: &next,
            ..view
        };
        let mut net = FakeNet::default();
        for k in &pushers {
            net.models
                .insert((*k, round), Ok(received(*k, round, 5.0, 2.0)));
        }
        let x = exchange(&view, &model(1.0), 2.0, owed.clone(), &mut net).unwrap();
        for w in &owed {
            assert!(net.asked.contains(w));
        }
        let expected_mass = 2.0 + 2.0 * pushers.len() as f64;
        assert_eq!(x.mass, expected_mass);
        let expected = (2.0 + 10.0 * pushers.len() as f32) / expected_mass as f32;
        for v in x.merged.unwrap() {
            assert!((v - expected).abs() < 1e-6, "{v} vs {expected}");
        }
        // A share owed from an earlier round is asked for once: not again if it misses.
        assert!(x.late.iter().all(|(_, r)| *r == round + 1));
    }

    #[test]
    fn poisoned_and_far_updates_are_refused_and_named() {
        let keys = members(6);
        let mut r = rules(Scheme::MetropolisHastings);
        r.fanout = 5;
        let graph = r.graph(1, Overlay::Complete(6));
        let layout = layout();
        let view = view(&r, &graph, &keys, &layout, Some(10.0));
        let mut net = FakeNet::default();
        let mut nan = received(keys[1], 1, 1.0, 1.0);
        nan.values[2] = f32::NAN;
        net.models.insert((keys[1], 1), Ok(nan));
        net.models
            .insert((keys[2], 1), Ok(received(keys[2], 1, 1e4, 1.0)));
        net.models.insert(
            (keys[3], 1),
            Err(FetchError::Invalid {
                reason: "hash_mismatch",
                detail: "payload hash differs".into(),
            }),
        );
        net.models
            .insert((keys[4], 1), Ok(received(keys[4], 1, 1.0, 1.0)));
        let x = exchange(&view, &model(1.0), 1.0, Vec::new(), &mut net).unwrap();
        let reasons: Vec<&str> = x.refused.iter().map(|r| r.reason).collect();
        assert_eq!(
            reasons,
            ["non_finite_weights", "norm_bound", "hash_mismatch"]
        );
        assert_eq!(x.contributors, [keys[4]]);
        // Only the honest model went in; site 5 never answered.
        for v in x.merged.unwrap() {
            assert!((v - 1.0).abs() < 1e-6, "{v}");
        }
    }

    #[test]
    fn a_peer_ahead_is_reported_when_nothing_arrives() {
        let keys = members(2);
        let r = rules(Scheme::PairwiseGossip);
        let graph = r.graph(1, Overlay::Complete(2));
        let layout = layout();
        let view = view(&r, &graph, &keys, &layout, None);
        let mut net = FakeNet::default();
        net.models.insert(
            (keys[1], 1),
            Err(FetchError::Unavailable {
                reason: medmesh_protocol::Unavailable::NoLongerKept,
                latest_round: Some(7),
            }),
        );
        let x = exchange(&view, &model(0.0), 1.0, Vec::new(), &mut net).unwrap();
        assert_eq!(x.ahead, Some((keys[1], 7)));
        assert_eq!(x.merged, None);
    }
}
