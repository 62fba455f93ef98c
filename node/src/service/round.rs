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
use medmesh_protocol::secagg::{GroupContext, masked_upload, unmask_mean};

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

    /// Serves this site's masked upload of `round` at `attempt`, carrying `mass`.
    fn serve_masked(&mut self, round: u64, attempt: u32, residues: &[u64], mass: f64);

    /// Fetches the masked uploads of `senders` for `round` at `attempt`, each until a round
    /// timeout from now.
    fn gather_masked(
        &mut self,
        senders: &[PublicKey],
        round: u64,
        attempt: u32,
    ) -> Vec<(PublicKey, Result<MaskedUpload, FetchError>)>;
}

/// A group mate's masked upload (secure aggregation).
#[derive(Debug, Clone)]
pub struct MaskedUpload {
    /// Its residues ([`medmesh_protocol::secagg`]).
    pub residues: Vec<u64>,
    /// The mass it carries.
    pub mass: f64,
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

/// Runs a `group-average` round under secure aggregation: serves this site's masked upload of
/// `outgoing` (its model, or its privacy release) with `mass`, gathers its group mates',
/// and takes the group's weighted mean. A mate whose upload does not arrive (or claims too
/// much mass) is left out by a redo over the others with fresh masks, while three remain;
/// otherwise the round counts as local. `secret_with(k)` is this member's pairwise secret
/// with `k` (`Identity::shared_secret`).
pub fn exchange_secure(
    view: &RoundView<'_>,
    outgoing: &[f32],
    mass: f64,
    manifest_digest: [u8; 32],
    secret_with: &dyn Fn(&PublicKey) -> Option<[u8; 32]>,
    net: &mut impl RoundNet,
) -> Exchanged {
    let round = view.graph.round();
    let me = view.members[view.me];
    let mut out = Exchanged {
        mass,
        ..Exchanged::default()
    };
    let group: Vec<PublicKey> = view
        .rules
        .group_of(view.graph, view.me)
        .into_iter()
        .map(|i| view.members[i])
        .collect();
    let mut ctx = match GroupContext::new(manifest_digest, round, group) {
        Ok(ctx) => ctx,
        Err(e) => {
            tracing::warn!(round, "secure aggregation: {e}; the round counts as local");
            return out;
        }
    };
    let secrets: Vec<(PublicKey, [u8; 32])> = ctx
        .members
        .iter()
        .filter(|k| **k != me)
        .filter_map(|k| secret_with(k).map(|s| (*k, s)))
        .collect();
    if secrets.len() + 1 != ctx.members.len() {
        tracing::warn!(
            round,
            "secure aggregation: no secret can be agreed with a group member's key; the round counts as local"
        );
        return out;
    }
    let secret_of = |k: &PublicKey| secrets.iter().find(|(x, _)| x == k).map(|(_, s)| *s);
    let weight_bound = view.rules.weight_bound(Shape::Group, view.members.len());
    loop {
        let Ok(at) = ctx.position(&me) else {
            return out;
        };
        let upload = masked_upload(&ctx, at, outgoing, mass, |j| {
            ctx.pair_seed(&secret_of(&ctx.members[j]).unwrap_or_default())
        });
        let upload = match upload {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(round, "secure aggregation: {e}; the round counts as local");
                return out;
            }
        };
        net.serve_masked(round, ctx.attempt, &upload, mass);
        let mates: Vec<PublicKey> = ctx.members.iter().copied().filter(|k| *k != me).collect();
        let mut delivered = vec![true; ctx.members.len()];
        let mut uploads = vec![upload];
        let mut total = mass;
        let mut senders = Vec::new();
        for (sender, result) in net.gather_masked(&mates, round, ctx.attempt) {
            let at = ctx.position(&sender).unwrap_or(usize::MAX);
            match result {
                Ok(u) if u.mass > weight_bound || u.residues.len() != outgoing.len() => {
                    out.refused.push(Refusal {
                        sender,
                        reason: if u.mass > weight_bound {
                            "sample_weight_bound"
                        } else {
                            "wrong_layout"
                        },
                        detail: format!(
                            "masked upload of {} values claiming mass {} (at most {weight_bound})",
                            u.residues.len(),
                            u.mass
                        ),
                    });
                    if let Some(d) = delivered.get_mut(at) {
                        *d = false;
                    }
                }
                Ok(u) => {
                    uploads.push(u.residues);
                    total += u.mass;
                    senders.push(sender);
                }
                Err(e) => {
                    tracing::debug!(%sender, round, attempt = ctx.attempt, "no masked upload: {e}");
                    if let Some(d) = delivered.get_mut(at) {
                        *d = false;
                    }
                }
            }
        }
        if delivered.iter().all(|&d| d) {
            let refs: Vec<&[u64]> = uploads.iter().map(Vec::as_slice).collect();
            match unmask_mean(&refs, total)
                .map_err(|e| e.to_string())
                .and_then(|mean| {
                    check_update(&mean, view.layout, outgoing, None)
                        .map(|()| mean)
                        .map_err(|e| e.to_string())
                }) {
                Ok(mean) => {
                    out.merged = Some(mean);
                    out.contributors = senders;
                }
                Err(e) => tracing::warn!(
                    round,
                    "secure aggregation: the group's mean is unusable ({e}); the round counts as local"
                ),
            }
            return out;
        }
        match ctx.without(&delivered) {
            Ok(next) => {
                tracing::info!(
                    round,
                    attempt = next.attempt,
                    missing = delivered.iter().filter(|d| !**d).count(),
                    "secure aggregation: redoing the round without group members whose upload did not arrive"
                );
                ctx = next;
            }
            Err(e) => {
                tracing::warn!(round, "secure aggregation: {e}; the round counts as local");
                return out;
            }
        }
    }
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
        masked: HashMap<(PublicKey, u32), MaskedUpload>,
        served_masked: Vec<(u32, Vec<u64>)>,
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

        fn serve_masked(&mut self, _round: u64, attempt: u32, residues: &[u64], _mass: f64) {
            self.served_masked.push((attempt, residues.to_vec()));
        }

        fn gather_masked(
            &mut self,
            senders: &[PublicKey],
            _round: u64,
            attempt: u32,
        ) -> Vec<(PublicKey, Result<MaskedUpload, FetchError>)> {
            senders
                .iter()
                .map(|k| {
                    let answer = self
                        .masked
                        .remove(&(*k, attempt))
                        .ok_or(FetchError::Deadline);
                    (*k, answer)
                })
                .collect()
        }
    }

    /// The upload `id` (holding `x` with `mass`) makes in `ctx`.
    fn upload_of(id: &Identity, ctx: &GroupContext, x: &[f32], mass: f64) -> MaskedUpload {
        let at = ctx.position(&id.public_key()).unwrap();
        let residues = masked_upload(ctx, at, x, mass, |j| {
            ctx.pair_seed(&id.shared_secret(&ctx.members[j]).unwrap())
        })
        .unwrap();
        MaskedUpload { residues, mass }
    }

    #[test]
    fn a_secure_group_takes_its_weighted_mean_and_survives_a_drop_out() {
        let ids: Vec<Identity> = (0..4)
            .map(|i| Identity::from_seed(&[i as u8 + 1; 32]))
            .collect();
        let keys = members(4);
        let id_of = |k: &PublicKey| ids.iter().find(|i| i.public_key() == *k).unwrap();
        let mut r = rules(Scheme::GroupAverage);
        r.group_size = 4;
        let graph = r.graph(3, Overlay::Complete(4));
        let layout = layout();
        let view = view(&r, &graph, &keys, &layout, None);
        let me = id_of(&keys[0]);
        let secret = |k: &PublicKey| me.shared_secret(k).ok().map(|s| *s);
        let x = |i: usize| model(1.0 + i as f32);
        let mass = |i: usize| 10.0 * (i + 1) as f64;
        let digest = [7; 32];
        let first = GroupContext::new(digest, 3, keys.clone()).unwrap();

        // Every mate delivers: the exact weighted mean, and what this site served is noise.
        let mut net = FakeNet::default();
        for (i, key) in keys.iter().enumerate().skip(1) {
            net.masked
                .insert((*key, 0), upload_of(id_of(key), &first, &x(i), mass(i)));
        }
        let out = exchange_secure(&view, &x(0), mass(0), digest, &secret, &mut net);
        let want =
            (0..4).map(|i| mass(i) * (1.0 + i as f64)).sum::<f64>() / (0..4).map(mass).sum::<f64>();
        let merged = out.merged.unwrap();
        assert!(
            merged.iter().all(|v| (f64::from(*v) - want).abs() < 1e-5),
            "{merged:?}"
        );
        assert_eq!(out.contributors.len(), 3);
        assert_eq!(out.mass, mass(0), "a member keeps its own sample count");
        let (attempt, served) = &net.served_masked[0];
        assert_eq!(*attempt, 0);
        assert!(
            served
                .iter()
                .all(|&r| secagg_value_is_far(r, f64::from(x(0)[0]) * mass(0))),
            "the upload hides the model"
        );

        // Member 2 drops out: the others redo without it, with fresh masks.
        let mut net = FakeNet::default();
        for i in [1, 3] {
            net.masked.insert(
                (keys[i], 0),
                upload_of(id_of(&keys[i]), &first, &x(i), mass(i)),
            );
        }
        let redo = first.without(&[true, true, false, true]).unwrap();
        for i in [1, 3] {
            net.masked.insert(
                (keys[i], 1),
                upload_of(id_of(&keys[i]), &redo, &x(i), mass(i)),
            );
        }
        let out = exchange_secure(&view, &x(0), mass(0), digest, &secret, &mut net);
        let want = [0, 1, 3]
            .iter()
            .map(|&i| mass(i) * (1.0 + i as f64))
            .sum::<f64>()
            / [0, 1, 3].iter().map(|&i| mass(i)).sum::<f64>();
        let merged = out.merged.unwrap();
        assert!(
            merged.iter().all(|v| (f64::from(*v) - want).abs() < 1e-5),
            "{merged:?}"
        );
        assert_eq!(out.contributors.len(), 2);
        let attempts: Vec<u32> = net.served_masked.iter().map(|s| s.0).collect();
        assert_eq!(attempts, vec![0, 1]);

        // Two drop out: fewer than three remain, and the round counts as local.
        let mut net = FakeNet::default();
        net.masked.insert(
            (keys[1], 0),
            upload_of(id_of(&keys[1]), &first, &x(1), mass(1)),
        );
        let out = exchange_secure(&view, &x(0), mass(0), digest, &secret, &mut net);
        assert!(out.merged.is_none());
    }

    /// Whether residue `r`, read as fixed point, is far from `value`.
    fn secagg_value_is_far(r: u64, value: f64) -> bool {
        (medmesh_protocol::secagg::from_fixed(r) - value).abs() > 1.0
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
