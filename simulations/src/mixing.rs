//! One round of each averaging scheme over the arena, through `medmesh-protocol`'s averaging
//! and aggregation functions. Returns the transfers it implies, for the link model.

use medmesh_protocol::averaging::{
    AveragingError, metropolis_hastings_weights, pairwise_average, weighted_mean,
};
use medmesh_protocol::robust::{coordinate_median, trim_count, trimmed_mean};
use medmesh_training::rng::Rng;

use crate::arena::Arena;
use crate::links::Transfers;
use crate::scenario::{AggregationName, SchemeName};

/// What the schemes need besides the state.
#[derive(Debug, Clone)]
pub struct Mixer<'a> {
    /// Communication graph.
    pub adjacency: &'a [Vec<usize>],
    /// Training samples per site (weights of the mean).
    pub sample_weights: &'a [f64],
    /// How received models are combined (MH, epidemic, FedAvg).
    pub aggregation: AggregationName,
    /// For the trimmed mean.
    pub trim_fraction: f64,
    /// Receivers per site for epidemic push.
    pub fanout: usize,
    /// The FedAvg server.
    pub server: usize,
}

/// Combines `own` and `received` (with sample weights) into `out` by `rule`.
pub fn aggregate(
    rule: AggregationName,
    trim_fraction: f64,
    inputs: &[(&[f32], f64)],
    out: &mut [f32],
) -> Result<(), AveragingError> {
    match rule {
        AggregationName::Mean => weighted_mean(inputs, out),
        AggregationName::Median => {
            let rows: Vec<&[f32]> = inputs.iter().map(|(x, _)| *x).collect();
            coordinate_median(&rows, out)
        }
        AggregationName::TrimmedMean => {
            let rows: Vec<&[f32]> = inputs.iter().map(|(x, _)| *x).collect();
            trimmed_mean(&rows, trim_count(rows.len(), trim_fraction), out)
        }
    }
}

/// Push-sum's keep share when splitting into `parts` pushes: `PushSum::split`'s rule.
fn keep_share(parts: usize) -> f64 {
    1.0 / (parts as f64 + 1.0)
}

/// Runs one round of `scheme`. `push_weights` holds push-sum's weights (the arena then holds
/// sums); `online` says who takes part.
pub fn exchange(
    scheme: SchemeName,
    m: &Mixer<'_>,
    arena: &mut Arena,
    push_weights: &mut [f64],
    online: &[bool],
    rng: &mut Rng,
) -> Result<Transfers, AveragingError> {
    let n = arena.nodes();
    let mut t = Transfers::default();
    match scheme {
        SchemeName::LocalOnly => {}
        SchemeName::PairwiseGossip => {
            let mut order: Vec<usize> = (0..n).filter(|&i| online[i]).collect();
            rng.shuffle(&mut order);
            let mut matched = vec![false; n];
            for &i in &order {
                if matched[i] {
                    continue;
                }
                let free: Vec<usize> = m.adjacency[i]
                    .iter()
                    .copied()
                    .filter(|&j| online[j] && !matched[j])
                    .collect();
                if free.is_empty() {
                    continue;
                }
                let j = free[rng.below(free.len())];
                matched[i] = true;
                matched[j] = true;
                let (a, b) = arena.pair_mut(i, j);
                let (wi, wj) = (m.sample_weights[i], m.sample_weights[j]);
                // Both end with the same average; compute it once into `a`, copy to `b`.
                pairwise_average(a, b, wi, wj)?;
                b.copy_from_slice(a);
                t.pairs.push((i, j));
                t.pairs.push((j, i));
            }
        }
        SchemeName::PushSum => {
            let targets: Vec<Option<usize>> = (0..n)
                .map(|i| {
                    let ns: Vec<usize> = m.adjacency[i]
                        .iter()
                        .copied()
                        .filter(|&j| online[j])
                        .collect();
                    (online[i] && !ns.is_empty()).then(|| ns[rng.below(ns.len())])
                })
                .collect();
            let mut incoming: Vec<Vec<usize>> = vec![Vec::new(); n];
            for (i, target) in targets.iter().enumerate() {
                if let Some(j) = target {
                    incoming[*j].push(i);
                    t.pairs.push((i, *j));
                }
            }
            let keep = keep_share(1);
            let share = |i: usize| if targets[i].is_some() { keep } else { 1.0 };
            let next_weights: Vec<f64> = (0..n)
                .map(|i| {
                    push_weights[i] * share(i)
                        + incoming[i]
                            .iter()
                            .map(|&k| push_weights[k] * keep)
                            .sum::<f64>()
                })
                .collect();
            let rows: Vec<Vec<(usize, f64)>> = (0..n)
                .map(|i| {
                    std::iter::once((i, share(i)))
                        .chain(incoming[i].iter().map(|&k| (k, keep)))
                        .collect()
                })
                .collect();
            arena.mix(&rows);
            push_weights.copy_from_slice(&next_weights);
        }
        SchemeName::MetropolisHastings => {
            let live: Vec<Vec<usize>> = (0..n)
                .map(|i| {
                    if online[i] {
                        m.adjacency[i]
                            .iter()
                            .copied()
                            .filter(|&j| online[j])
                            .collect()
                    } else {
                        Vec::new()
                    }
                })
                .collect();
            let weights = metropolis_hastings_weights(&live)?;
            for (i, ns) in live.iter().enumerate() {
                t.pairs.extend(ns.iter().map(|&j| (j, i)));
            }
            neighbourhood_round(m, arena, &live, Some(&weights))?;
        }
        SchemeName::Epidemic => {
            let members: Vec<usize> = (0..n).filter(|&i| online[i]).collect();
            let mut received: Vec<Vec<usize>> = vec![Vec::new(); n];
            for &i in &members {
                let mut pool: Vec<usize> = members.iter().copied().filter(|&j| j != i).collect();
                rng.shuffle(&mut pool);
                for &j in pool.iter().take(m.fanout) {
                    received[j].push(i);
                    t.pairs.push((i, j));
                }
            }
            for r in &mut received {
                r.sort_unstable();
            }
            neighbourhood_round(m, arena, &received, None)?;
        }
        SchemeName::Fedavg => {
            let s = m.server;
            if online[s] {
                let clients: Vec<usize> = (0..n).filter(|&i| online[i] && i != s).collect();
                let mut everyone = clients.clone();
                everyone.push(s);
                everyone.sort_unstable();
                let inputs: Vec<(&[f32], f64)> = everyone
                    .iter()
                    .map(|&i| (arena.row(i), m.sample_weights[i]))
                    .collect();
                let mut global = vec![0f32; arena.dim()];
                aggregate(m.aggregation, m.trim_fraction, &inputs, &mut global)?;
                for &i in &everyone {
                    arena.row_mut(i).copy_from_slice(&global);
                }
                for &c in &clients {
                    t.pairs.push((c, s));
                    t.pairs.push((s, c));
                }
            }
        }
    }
    Ok(t)
}

/// Every node combines its own vector with those of `sources[i]`: with `weights` (rows of a
/// mixing matrix) under the mean rule, otherwise by the aggregation rule.
fn neighbourhood_round(
    m: &Mixer<'_>,
    arena: &mut Arena,
    sources: &[Vec<usize>],
    weights: Option<&[Vec<(usize, f64)>]>,
) -> Result<(), AveragingError> {
    let failure = std::sync::Mutex::new(None);
    arena.step(|i, a, out| {
        if sources[i].is_empty() {
            out.copy_from_slice(a.row(i));
            return;
        }
        let result = match (m.aggregation, weights) {
            (AggregationName::Mean, Some(w)) => {
                let inputs: Vec<(&[f32], f64)> =
                    w[i].iter().map(|&(j, wij)| (a.row(j), wij)).collect();
                weighted_mean(&inputs, out)
            }
            _ => {
                let inputs: Vec<(&[f32], f64)> = std::iter::once(i)
                    .chain(sources[i].iter().copied())
                    .map(|j| (a.row(j), m.sample_weights[j]))
                    .collect();
                aggregate(m.aggregation, m.trim_fraction, &inputs, out)
            }
        };
        if let Err(e) = result {
            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            out.copy_from_slice(a.row(i));
        }
    });
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{complete, ring, star};
    use medmesh_protocol::averaging::PushSum;

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

    fn mixer<'a>(adj: &'a [Vec<usize>], w: &'a [f64]) -> Mixer<'a> {
        Mixer {
            adjacency: adj,
            sample_weights: w,
            aggregation: AggregationName::Mean,
            trim_fraction: 0.2,
            fanout: 2,
            server: 0,
        }
    }

    #[test]
    fn pairwise_gossip_on_a_complete_graph_reaches_the_exact_mean() {
        let n = 16;
        let init = rows(n, 5);
        let adj = complete(n);
        let w = vec![1.0; n];
        let mut a = Arena::new(&init);
        let mut rng = Rng::new(1);
        for _ in 0..80 {
            exchange(
                SchemeName::PairwiseGossip,
                &mixer(&adj, &w),
                &mut a,
                &mut [],
                &[true; 16],
                &mut rng,
            )
            .unwrap();
        }
        let target = mean_of(&init, &w);
        for i in 0..n {
            for (x, m) in a.row(i).iter().zip(&target) {
                assert!((f64::from(*x) - m).abs() < 1e-4, "{x} vs {m}");
            }
        }
    }

    #[test]
    fn push_sum_conserves_mass_and_matches_the_protocol_type() {
        let n = 12;
        let init = rows(n, 4);
        let adj = ring(n).unwrap();
        let w = vec![1.0; n];
        let mut a = Arena::new(&init);
        let mut weights = vec![1.0; n];
        let mut rng = Rng::new(2);
        let total: Vec<f64> = (0..4)
            .map(|c| init.iter().map(|r| f64::from(r[c])).sum())
            .collect();
        for _ in 0..300 {
            exchange(
                SchemeName::PushSum,
                &mixer(&adj, &w),
                &mut a,
                &mut weights,
                &[true; 12],
                &mut rng,
            )
            .unwrap();
            assert!((weights.iter().sum::<f64>() - n as f64).abs() < 1e-9);
            for (c, t) in total.iter().enumerate() {
                let s: f64 = (0..n).map(|i| f64::from(a.row(i)[c])).sum();
                assert!((s - t).abs() < 1e-2, "mass of coordinate {c}: {s} vs {t}");
            }
        }
        let target = mean_of(&init, &w);
        for (i, w) in weights.iter().enumerate() {
            let estimate = f64::from(a.row(i)[0]) / w;
            assert!((estimate - target[0]).abs() < 1e-3);
        }
        // The simulator's split is the protocol's: keep 1/2, push 1/2.
        let mut p = PushSum::new(&[2.0, 4.0], 1.0).unwrap();
        let share = p.split(1);
        assert_eq!((p.weight, share[0].weight), (keep_share(1), keep_share(1)));
    }

    #[test]
    fn fedavg_gives_everyone_the_sample_weighted_mean_in_one_round() {
        let n = 6;
        let init = rows(n, 3);
        let adj = star(n, 0).unwrap();
        let w = vec![10.0, 20.0, 5.0, 5.0, 40.0, 20.0];
        let mut a = Arena::new(&init);
        let t = exchange(
            SchemeName::Fedavg,
            &mixer(&adj, &w),
            &mut a,
            &mut [],
            &[true; 6],
            &mut Rng::new(3),
        )
        .unwrap();
        assert_eq!(t.pairs.len(), 2 * (n - 1));
        let target = mean_of(&init, &w);
        for i in 0..n {
            for (x, m) in a.row(i).iter().zip(&target) {
                assert!((f64::from(*x) - m).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn offline_sites_keep_their_models() {
        let n = 5;
        let init = rows(n, 3);
        let adj = complete(n);
        let w = vec![1.0; n];
        let online = [true, true, false, true, true];
        for scheme in [
            SchemeName::MetropolisHastings,
            SchemeName::Epidemic,
            SchemeName::PairwiseGossip,
        ] {
            let mut a = Arena::new(&init);
            let t = exchange(
                scheme,
                &mixer(&adj, &w),
                &mut a,
                &mut [],
                &online,
                &mut Rng::new(4),
            )
            .unwrap();
            assert_eq!(a.row(2), init[2].as_slice());
            assert!(t.pairs.iter().all(|&(f, to)| f != 2 && to != 2));
        }
    }
}
