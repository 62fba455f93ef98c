//! One round of a variant over the arena. The gossip schemes run through
//! `medmesh-protocol`'s round engine, the very functions a node calls: the round's graph,
//! the mass split, the pair confirmation and the combination. Only the baselines a node
//! never runs (FedAvg with a server, local-only) live here. Returns the transfers the round
//! implies, for the link model.

use std::borrow::Cow;

use medmesh_protocol::averaging::AveragingError;
use medmesh_protocol::manifest::Aggregation;
use medmesh_protocol::round::{Incoming, Overlay, RoundRules, aggregate};

use crate::arena::Arena;
use crate::links::Transfers;
use crate::scenario::Method;

/// Whether site `i` accepts a received model (`values`, given its own `own`): the node's
/// update checks.
pub type Accept<'a> = dyn Fn(&[f32], &[f32]) -> bool + Sync + 'a;

/// One round, besides the state.
pub struct Round<'a> {
    /// What the variant runs.
    pub method: Method,
    /// The round rules of a gossip scheme (`None` for the baselines).
    pub rules: Option<&'a RoundRules>,
    /// FedAvg's rule.
    pub aggregation: Aggregation,
    /// FedAvg's trimmed-mean fraction.
    pub trim_fraction: f64,
    /// The graph rounds draw their edges from.
    pub overlay: Overlay<'a>,
    /// Training samples per site (FedAvg's weights).
    pub sample_weights: &'a [f64],
    /// The round (1-based).
    pub round: u64,
    /// Who takes part.
    pub online: &'a [bool],
    /// The receivers' checks; `None` accepts everything (consensus mode's vectors).
    pub accept: Option<&'a Accept<'a>>,
}

/// Runs one round: the arena holds every site's model, `mass` every site's mass (sample
/// counts, or push-sum weights).
pub fn exchange(
    r: &Round<'_>,
    arena: &mut Arena,
    mass: &mut [f64],
) -> Result<Transfers, AveragingError> {
    match (r.method, r.rules) {
        (Method::Gossip(_), Some(rules)) => gossip(r, rules, arena, mass),
        (Method::Fedavg, _) => fedavg(r, arena),
        (Method::LocalOnly, _) | (Method::Gossip(_), None) => Ok(Transfers::default()),
    }
}

fn gossip(
    r: &Round<'_>,
    rules: &RoundRules,
    arena: &mut Arena,
    mass: &mut [f64],
) -> Result<Transfers, AveragingError> {
    let n = arena.nodes();
    let graph = rules.graph(r.round, r.overlay);
    let online = r.online;
    let split: Vec<(f64, f64)> = (0..n)
        .map(|i| {
            if online[i] {
                rules.split_mass(&graph, i, mass[i])
            } else {
                (mass[i], 0.0)
            }
        })
        .collect();
    // A pull succeeds when both ends are online and the receiver accepts the model.
    let mut pulled: Vec<Vec<usize>> = (0..n)
        .map(|i| {
            if !online[i] {
                return Vec::new();
            }
            graph
                .sources(i)
                .iter()
                .copied()
                .filter(|&j| online[j] && r.accept.is_none_or(|ok| ok(arena.row(j), arena.row(i))))
                .collect()
        })
        .collect();
    if graph.shape().needs_confirmation() {
        // Both ends confirm, or neither uses the exchange.
        let confirmed: Vec<Vec<usize>> = (0..n)
            .map(|i| {
                pulled[i]
                    .iter()
                    .copied()
                    .filter(|&j| pulled[j].contains(&i))
                    .collect()
            })
            .collect();
        pulled = confirmed;
    }
    let mut t = Transfers::default();
    for (i, sources) in pulled.iter().enumerate() {
        t.pairs.extend(sources.iter().map(|&j| (j, i)));
    }
    let masses = arena.step_map(|i, a, out| {
        let mut incoming: Vec<Incoming<'_>> = pulled[i]
            .iter()
            .map(|&j| Incoming {
                member: j,
                values: Cow::Borrowed(a.row(j)),
                weight: split[j].1,
            })
            .collect();
        rules
            .combine(&graph, i, a.row(i), split[i].0, &mut incoming, out)
            .map(|merged| merged.weight)
    });
    for (m, new) in mass.iter_mut().zip(masses) {
        *m = new?;
    }
    Ok(t)
}

/// Centralized FedAvg, the server at site 0: everyone online gets the aggregate.
fn fedavg(r: &Round<'_>, arena: &mut Arena) -> Result<Transfers, AveragingError> {
    let mut t = Transfers::default();
    let n = arena.nodes();
    if !r.online.first().copied().unwrap_or(false) {
        return Ok(t);
    }
    let everyone: Vec<usize> = (0..n).filter(|&i| r.online[i]).collect();
    let inputs: Vec<(&[f32], f64)> = everyone
        .iter()
        .map(|&i| (arena.row(i), r.sample_weights[i]))
        .collect();
    let mut global = vec![0f32; arena.dim()];
    aggregate(r.aggregation, r.trim_fraction, &inputs, &mut global)?;
    for &i in &everyone {
        arena.row_mut(i).copy_from_slice(&global);
        if i != 0 {
            t.pairs.push((i, 0));
            t.pairs.push((0, i));
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{complete, ring};
    use medmesh_protocol::manifest::Scheme;

    fn rows(n: usize, dim: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| (0..dim).map(|c| ((i * 31 + c * 7) % 17) as f32).collect())
            .collect()
    }

    fn mean_of(rows: &[Vec<f32>], weights: &[f64]) -> Vec<f64> {
        let total: f64 = weights.iter().sum();
        (0..rows[0].len())
            .map(|c| {
                rows.iter()
                    .zip(weights)
                    .map(|(r, w)| f64::from(r[c]) * w)
                    .sum::<f64>()
                    / total
            })
            .collect()
    }

    fn rules(scheme: Scheme) -> RoundRules {
        RoundRules {
            scheme,
            seed: 1,
            fanout: 2,
            group_size: 3,
            aggregation: Aggregation::Mean,
            trim_fraction: 0.2,
            clip_norm: None,
            max_sample_weight: 1e5,
            training_rounds: 1000,
            final_reduce: false,
        }
    }

    fn run(
        method: Method,
        rules: &RoundRules,
        adj: &[Vec<usize>],
        w: &[f64],
        online: &[bool],
        arena: &mut Arena,
        rounds: u64,
    ) -> Transfers {
        // Every site's mass starts as its sample count.
        let mut mass = w.to_vec();
        let mut last = Transfers::default();
        for round in 1..=rounds {
            let r = Round {
                method,
                rules: Some(rules),
                aggregation: rules.aggregation,
                trim_fraction: rules.trim_fraction,
                overlay: Overlay::Restricted(adj),
                sample_weights: w,
                round,
                online,
                accept: None,
            };
            last = exchange(&r, arena, &mut mass).unwrap();
        }
        last
    }

    #[test]
    fn gossip_on_a_complete_graph_reaches_the_sample_weighted_mean() {
        let n = 16;
        let init = rows(n, 5);
        let adj = complete(n);
        let w: Vec<f64> = (0..n).map(|i| 1.0 + (i % 4) as f64).collect();
        let target = mean_of(&init, &w);
        for scheme in [
            Scheme::PairwiseGossip,
            Scheme::PushSum,
            Scheme::MetropolisHastings,
            Scheme::GroupAverage,
        ] {
            let mut a = Arena::new(&init);
            run(
                Method::Gossip(scheme),
                &rules(scheme),
                &adj,
                &w,
                &[true; 16],
                &mut a,
                80,
            );
            for i in 0..n {
                for (x, m) in a.row(i).iter().zip(&target) {
                    assert!((f64::from(*x) - m).abs() < 1e-3, "{scheme:?}: {x} vs {m}");
                }
            }
        }
    }

    #[test]
    fn fedavg_gives_everyone_the_sample_weighted_mean_in_one_round() {
        let n = 6;
        let init = rows(n, 3);
        let adj = complete(n);
        let w = vec![10.0, 20.0, 5.0, 5.0, 40.0, 20.0];
        let mut a = Arena::new(&init);
        let t = run(
            Method::Fedavg,
            &rules(Scheme::PairwiseGossip),
            &adj,
            &w,
            &[true; 6],
            &mut a,
            1,
        );
        assert_eq!(t.pairs.len(), 2 * (n - 1));
        let target = mean_of(&init, &w);
        for i in 0..n {
            for (x, m) in a.row(i).iter().zip(&target) {
                assert!((f64::from(*x) - m).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn offline_sites_keep_their_models_and_their_partners_too() {
        let n = 5;
        let init = rows(n, 3);
        let adj = ring(n).unwrap();
        let w = vec![1.0; n];
        let online = [true, true, false, true, true];
        for scheme in Scheme::ALL {
            let mut a = Arena::new(&init);
            let t = run(
                Method::Gossip(scheme),
                &rules(scheme),
                &adj,
                &w,
                &online,
                &mut a,
                1,
            );
            assert_eq!(a.row(2), init[2].as_slice());
            assert!(t.pairs.iter().all(|&(f, to)| f != 2 && to != 2));
        }
        // A pair whose other end is offline leaves the online end as it was.
        let r = rules(Scheme::PairwiseGossip);
        let g = r.graph(1, Overlay::Restricted(&adj));
        if let Some(&partner) = g.sources(2).first() {
            let mut a = Arena::new(&init);
            run(
                Method::Gossip(Scheme::PairwiseGossip),
                &r,
                &adj,
                &w,
                &online,
                &mut a,
                1,
            );
            assert_eq!(a.row(partner), init[partner].as_slice());
        }
    }
}
