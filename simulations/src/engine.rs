//! The simulation: every variant (scheme x aggregation x data preset) replays the same sites,
//! links, churn and attackers round by round in virtual time.

use medmesh_protocol::Manifest;
use medmesh_protocol::averaging::metropolis_hastings_weights;
use medmesh_protocol::manifest::{Aggregation, Scheme};
use medmesh_protocol::robust::check_update;
use medmesh_protocol::round::{Overlay, Phase, RoundRules};
use medmesh_protocol::swa::{self, TailMean};
use medmesh_training::baselines;
use medmesh_training::data::brain::BrainTemplate;
use medmesh_training::data::generate_site_cases;
use medmesh_training::data::synthetic::Preset;
use medmesh_training::params::Selection;
use medmesh_training::rng::Rng;
use medmesh_training::samples::{SiteSet, site_split};
use medmesh_training::{DeviceSpec, Trainer};
use serde::Serialize;

use crate::arena::Arena;
use crate::churn::Presence;
use crate::links::{self, Site};
use crate::mixing::{Round, exchange};
use crate::scenario::{Attack, DataTask, Method, Mode, Scenario, Topology};
use crate::{spectral, topology};

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The topology cannot be built.
    #[error("topology: {0}")]
    Topology(#[from] topology::TopologyError),
    /// Averaging failed (a bug or a degenerate input).
    #[error("averaging: {0}")]
    Averaging(#[from] medmesh_protocol::averaging::AveragingError),
    /// Data generation or loading failed.
    #[error("data: {0}")]
    Data(String),
    /// Training failed.
    #[error("training: {0}")]
    Training(String),
}

/// One round of one variant.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRow {
    /// Round (1-based).
    pub round: u32,
    /// Virtual seconds since the start when the last online site finished the round.
    pub virtual_time_s: f64,
    /// Max over honest online sites of `||x_i - mean|| / ||mean||`.
    pub consensus_error: f64,
    /// Mean validation Dice over honest sites (learning mode).
    pub mean_dice: Option<f64>,
    /// Worst honest site's Dice (learning mode).
    pub min_dice: Option<f64>,
    /// Each honest site's Dice, by site index (learning mode).
    pub site_dice: Vec<f64>,
    /// Bytes sent by all sites so far.
    pub bytes_total: u64,
    /// Sites online this round.
    pub online: usize,
}

/// One variant's run.
#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    /// `scheme[/aggregation][/preset]`.
    pub name: String,
    /// Scheme.
    pub scheme: String,
    /// Aggregation rule.
    pub aggregation: String,
    /// Data preset (learning mode).
    pub preset: Option<String>,
    /// Per round.
    pub rows: Vec<RoundRow>,
    /// Final Dice per honest site (learning mode), by site index.
    pub final_dice: Vec<(usize, f64)>,
    /// For `metropolis-hastings`: second largest eigenvalue modulus of its mixing matrix.
    pub slem: Option<f64>,
}

/// Every variant of a scenario, in a fixed order.
pub fn variants(s: &Scenario) -> Vec<(Method, Aggregation, Option<String>)> {
    let presets: Vec<Option<String>> = match s.mode {
        Mode::Consensus => vec![None],
        Mode::Learning => s.learning.presets.iter().cloned().map(Some).collect(),
    };
    let mut out = Vec::new();
    for preset in presets {
        for &method in &s.schemes {
            let rules: Vec<Aggregation> = if aggregates(method) {
                s.aggregations.clone()
            } else {
                vec![Aggregation::Mean]
            };
            for rule in rules {
                out.push((method, rule, preset.clone()));
            }
        }
    }
    out
}

/// Whether `method` combines by an aggregation rule.
fn aggregates(method: Method) -> bool {
    match method {
        Method::Gossip(scheme) => scheme.takes_aggregation(),
        Method::Fedavg => true,
        Method::LocalOnly => false,
    }
}

/// The round rules of a gossip variant: from the learning manifest (what a node would run),
/// or in consensus mode from the scenario alone (no final reduce: a consensus study
/// measures the gossip itself).
pub fn variant_rules(
    s: &Scenario,
    scheme: Scheme,
    aggregation: Aggregation,
) -> Result<RoundRules, SimError> {
    Ok(match s.mode {
        Mode::Learning => RoundRules::from_manifest(&variant_manifest(s, scheme, aggregation)?),
        Mode::Consensus => RoundRules {
            scheme,
            seed: s.seed,
            fanout: s.fanout,
            group_size: s.group_size,
            aggregation,
            trim_fraction: s.byzantine.trim_fraction,
            clip_norm: None,
            max_sample_weight: medmesh_protocol::manifest::DEFAULT_MAX_SAMPLE_WEIGHT as f64,
            training_rounds: u64::from(s.rounds),
            final_reduce: false,
        },
    })
}

/// The manifest a consortium would sign for this variant.
pub fn variant_manifest(
    s: &Scenario,
    scheme: Scheme,
    aggregation: Aggregation,
) -> Result<Manifest, SimError> {
    let mut m = learning_manifest(s)?;
    m.averaging.scheme = scheme;
    m.averaging.aggregation = aggregation;
    m.averaging.fanout = scheme.takes_fanout().then_some(s.fanout as u32);
    m.averaging.group_size = (scheme == Scheme::GroupAverage).then_some(s.group_size as u32);
    m.averaging.trim_fraction =
        (aggregation == Aggregation::TrimmedMean).then_some(s.byzantine.trim_fraction);
    m.validate()
        .map_err(|e| SimError::Training(e.to_string()))?;
    Ok(m)
}

/// The scenario's communication graph.
pub fn build_topology(s: &Scenario) -> Result<Vec<Vec<usize>>, SimError> {
    let n = s.nodes;
    Ok(match s.topology {
        Topology::Complete => topology::complete(n),
        Topology::Ring => topology::ring(n)?,
        Topology::Torus { rows, cols } => topology::torus(rows, cols)?,
        Topology::RandomRegular { degree } => topology::random_regular(n, degree, s.seed)?,
        Topology::ErdosRenyi { p } => topology::erdos_renyi(n, p, s.seed)?,
        Topology::WattsStrogatz { k, beta } => topology::watts_strogatz(n, k, beta, s.seed)?,
        Topology::Exponential => topology::exponential(n)?,
        Topology::Kademlia { bucket_size } => topology::kademlia(n, bucket_size, s.seed)?,
    })
}

/// The small-UNet manifest learning mode trains with.
pub fn learning_manifest(s: &Scenario) -> Result<Manifest, SimError> {
    let l = &s.learning;
    let mut m = Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml"))
        .map_err(|e| SimError::Training(e.to_string()))?;
    m.id = format!("sim-{}", s.name);
    m.task.input_size = [l.size as u32, l.size as u32];
    m.model.base_channels = l.base_channels;
    m.model.depth = l.depth;
    m.training.batch_size = l.batch_size;
    m.training.learning_rate = l.learning_rate;
    m.training.local_epochs = None;
    m.training.local_steps = Some(l.local_steps);
    m.training.seed = s.seed;
    m.training.swa_rounds = l.swa_rounds;
    m.averaging.rounds = s.rounds;
    m.validate()
        .map_err(|e| SimError::Training(e.to_string()))?;
    Ok(m)
}

struct LearningSite {
    trainer: Trainer,
    train: SiteSet,
    validation: SiteSet,
}

fn learning_sites(s: &Scenario, preset: &str, m: &Manifest) -> Result<Vec<LearningSite>, SimError> {
    let l = &s.learning;
    let preset: Preset = preset.parse().map_err(SimError::Data)?;
    let template = match l.task {
        DataTask::Brain => {
            Some(BrainTemplate::load_default().map_err(|e| SimError::Data(e.to_string()))?)
        }
        DataTask::Synthetic => None,
    };
    let device = "flex"
        .parse::<DeviceSpec>()
        .and_then(|d| d.device())
        .map_err(|e| SimError::Training(e.to_string()))?;
    (0..s.nodes)
        .map(|site| {
            let cases = generate_site_cases(
                template.as_ref(),
                preset,
                site,
                l.cases,
                l.size,
                l.slices,
                s.seed,
            );
            let (train, validation) =
                site_split(&cases, m).map_err(|e| SimError::Data(e.to_string()))?;
            Ok(LearningSite {
                trainer: Trainer::new(m, device.clone()),
                train,
                validation,
            })
        })
        .collect()
}

/// The pooled and unseen-site baselines of `preset`, on the same sites, slices and manifest
/// the variants train with.
pub fn learning_baselines(
    s: &Scenario,
    preset: &str,
) -> Result<crate::report::Baselines, SimError> {
    let m = learning_manifest(s)?;
    let sites: Vec<baselines::Site> = learning_sites(s, preset, &m)?
        .into_iter()
        .map(|l| baselines::Site {
            train: l.train,
            validation: l.validation,
        })
        .collect();
    let device = "flex"
        .parse::<DeviceSpec>()
        .and_then(|d| d.device())
        .map_err(|e| SimError::Training(e.to_string()))?;
    let pooled = baselines::pooled(&m, &sites, &device);
    let held_out = s.learning.held_out.checked_sub(1);
    Ok(crate::report::Baselines {
        preset: preset.to_owned(),
        pooled_mean_dice: pooled.iter().sum::<f64>() / pooled.len().max(1) as f64,
        pooled_dice: pooled,
        unseen: held_out.map(|k| (k, baselines::unseen(&m, &sites, k, &device))),
    })
}

/// Sites that attack: `fraction` of them, never site 0 (the FedAvg server).
pub fn byzantine_sites(s: &Scenario) -> Vec<bool> {
    let k = (s.nodes as f64 * s.byzantine.fraction).floor() as usize;
    let mut pool: Vec<usize> = (1..s.nodes).collect();
    Rng::derive(s.seed, 0xB42).shuffle(&mut pool);
    let mut flags = vec![false; s.nodes];
    for &i in pool.iter().take(k) {
        flags[i] = true;
    }
    flags
}

fn attack(x: &mut [f32], kind: Attack, scale: f64, rng: &mut Rng) {
    match kind {
        Attack::SignFlip => x.iter_mut().for_each(|v| *v *= -(scale as f32)),
        Attack::Scaling => x.iter_mut().for_each(|v| *v *= scale as f32),
        Attack::Noise => {
            let n = x.len().max(1) as f64;
            let mean = x.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
            let std = (x
                .iter()
                .map(|v| (f64::from(*v) - mean).powi(2))
                .sum::<f64>()
                / n)
                .sqrt();
            for v in x.iter_mut() {
                *v += (rng.normal() * std * scale) as f32;
            }
        }
    }
}

/// Runs one variant. `on_round` is called after each round.
pub fn run_variant(
    s: &Scenario,
    method: Method,
    aggregation: Aggregation,
    preset: Option<&str>,
    on_round: &mut dyn FnMut(),
) -> Result<VariantResult, SimError> {
    let n = s.nodes;
    let adjacency = match method {
        Method::Fedavg => topology::star(n, 0)?,
        _ => build_topology(s)?,
    };
    let rules = match method {
        Method::Gossip(scheme) => Some(variant_rules(s, scheme, aggregation)?),
        Method::Fedavg | Method::LocalOnly => None,
    };
    let sites: Vec<Site> = links::draw_sites(n, &s.network, s.seed);
    let byzantine = byzantine_sites(s);
    let mut learning = match (s.mode, preset) {
        (Mode::Learning, Some(p)) => {
            let m = learning_manifest(s)?;
            Some((learning_sites(s, p, &m)?, m))
        }
        _ => None,
    };
    let selection = learning.as_ref().map_or(Selection::All, |(_, m)| {
        Selection::for_manifest(m.averaging.keep_normalization_local)
    });
    let (mut arena, sample_weights, compute_s) = match &learning {
        Some((ls, m)) => {
            let rows: Vec<Vec<f32>> = ls.iter().map(|l| l.trainer.weights(selection)).collect();
            let rules = RoundRules::from_manifest(m);
            let weights: Vec<f64> = ls
                .iter()
                .map(|l| rules.site_mass(l.train.len().max(1)))
                .collect();
            let steps = f64::from(m.training.local_steps.unwrap_or(1));
            (Arena::new(&rows), weights, steps * s.network.step_seconds)
        }
        None => {
            let dim = s.consensus.dim;
            let seed = s.seed;
            let arena = Arena::from_fn(n, dim, |i, row| {
                let mut rng = Rng::derive(seed, 0xC0_0000 + i as u64);
                row.iter_mut().for_each(|v| *v = rng.normal() as f32 + 1.0);
            });
            (arena, vec![1.0; n], s.network.step_seconds)
        }
    };
    // The node's update checks (layout, finiteness) on what a site receives.
    let layout = learning
        .as_ref()
        .map(|(ls, _)| medmesh_training::params::layout(&ls[0].trainer.model(), selection));
    let accept = layout.as_ref().map(|layout| {
        move |values: &[f32], own: &[f32]| check_update(values, layout, own, None).is_ok()
    });
    let bytes = s.network.encoding.payload_len(arena.dim() as u64);
    // Every site's mass: its sample count (push-sum moves it around).
    let mut mass = sample_weights.clone();
    let mut presence = Presence::new(n, s.seed);
    let mut attack_rng = Rng::derive(s.seed, 0xA77);
    let mut clock = vec![0.0f64; n];
    let mut bytes_total = 0u64;
    let rounds = rules
        .as_ref()
        .map_or(u64::from(s.rounds), |r| r.total_rounds(n));
    let overlay = match s.topology {
        Topology::Complete => Overlay::Complete(n),
        _ => Overlay::Restricted(&adjacency),
    };
    let mut rows = Vec::with_capacity(rounds as usize);
    let honest: Vec<usize> = (0..n).filter(|&i| !byzantine[i]).collect();
    let mut final_dice = Vec::new();
    // SWA (`training.swa_rounds`): each site's mean over the last training rounds, taken by
    // the node's functions (`medmesh_protocol::swa`) over the same rounds.
    let swa_rounds = learning.as_ref().and_then(|(_, m)| m.training.swa_rounds);
    let mut tails = vec![TailMean::default(); n];
    let mut swa_applied = false;

    for round in 1..=rounds {
        let round_u32 = u32::try_from(round).unwrap_or(u32::MAX);
        let back = presence.advance(&s.churn, round_u32);
        let online: Vec<bool> = presence.flags().to_vec();
        let now = (0..n)
            .filter(|&i| online[i])
            .map(|i| clock[i])
            .fold(0.0, f64::max);
        for i in back {
            clock[i] = clock[i].max(now);
        }
        let trains = rules
            .as_ref()
            .is_none_or(|r| r.phase(round) == Phase::Train);
        // Training is over: each site's average of its last rounds goes into the reduce.
        if !trains && !swa_applied {
            for (i, tail) in tails.iter().enumerate() {
                if let Some(mean) = tail.get() {
                    arena.row_mut(i).copy_from_slice(mean);
                }
            }
            swa_applied = true;
        }
        if trains && let Some((ls, _)) = &mut learning {
            for i in honest.iter().copied().filter(|&i| online[i]) {
                let site = &mut ls[i];
                site.trainer
                    .set_weights(arena.row(i), selection)
                    .map_err(|e| SimError::Training(e.to_string()))?;
                site.trainer.train_round(&site.train, |_| {});
                let trained = site.trainer.weights(selection);
                arena.row_mut(i).copy_from_slice(&trained);
            }
        }
        if trains {
            for i in (0..n).filter(|&i| byzantine[i] && online[i]) {
                attack(
                    arena.row_mut(i),
                    s.byzantine.attack,
                    s.byzantine.scale,
                    &mut attack_rng,
                );
            }
        }
        let ready: Vec<f64> = (0..n)
            .map(|i| {
                if online[i] && trains {
                    clock[i] + compute_s / sites[i].speed
                } else {
                    clock[i]
                }
            })
            .collect();
        let step = Round {
            method,
            rules: rules.as_ref(),
            aggregation,
            trim_fraction: s.byzantine.trim_fraction,
            overlay,
            sample_weights: &sample_weights,
            round,
            online: &online,
            accept: accept.as_ref().map(|f| f as &crate::mixing::Accept<'_>),
        };
        let transfers = exchange(&step, &mut arena, &mut mass)?;
        let training_rounds = rules
            .as_ref()
            .map_or(u64::from(s.rounds), |r| r.training_rounds);
        if trains && swa_rounds.is_some_and(|k| swa::in_window(round, training_rounds, k)) {
            for &i in honest.iter().filter(|&&i| online[i]) {
                tails[i].add(arena.row(i));
            }
            // Without a reduce phase (FedAvg, local-only), the average is the end model.
            if rules.is_none() && round == training_rounds {
                for (i, tail) in tails.iter().enumerate() {
                    if let Some(mean) = tail.get() {
                        arena.row_mut(i).copy_from_slice(mean);
                    }
                }
                swa_applied = true;
            }
        }
        let mut next_clock = clock.clone();
        match method {
            Method::Fedavg => {
                let clients: Vec<usize> = (1..n).filter(|&i| online[i]).collect();
                if online[0] {
                    links::settle_star_round(
                        &sites,
                        bytes,
                        s.network.loss,
                        &ready,
                        0,
                        &clients,
                        &mut next_clock,
                    );
                } else {
                    next_clock.copy_from_slice(&ready);
                }
            }
            _ => links::settle_peer_round(
                &sites,
                bytes,
                s.network.loss,
                &ready,
                &transfers,
                &mut next_clock,
            ),
        }
        for i in 0..n {
            if online[i] {
                clock[i] = next_clock[i];
            }
        }
        bytes_total += bytes * transfers.pairs.len() as u64;
        let members: Vec<usize> = honest.iter().copied().filter(|&i| online[i]).collect();
        let consensus_error = arena.consensus_error(&members, None);
        let (mut mean_dice, mut min_dice, mut site_dice) = (None, None, Vec::new());
        if let Some((ls, _)) = &mut learning {
            let mut scores = Vec::with_capacity(honest.len());
            for &i in &honest {
                let site = &mut ls[i];
                site.trainer
                    .set_weights(arena.row(i), selection)
                    .map_err(|e| SimError::Training(e.to_string()))?;
                scores.push((i, site.trainer.evaluate(&site.validation).mean_dice));
            }
            let k = scores.len().max(1) as f64;
            mean_dice = Some(scores.iter().map(|(_, d)| d).sum::<f64>() / k);
            min_dice = Some(scores.iter().map(|(_, d)| *d).fold(f64::INFINITY, f64::min));
            site_dice = scores.iter().map(|(_, d)| *d).collect();
            final_dice = scores;
        }
        rows.push(RoundRow {
            round: round_u32,
            virtual_time_s: (0..n).map(|i| clock[i]).fold(0.0, f64::max),
            consensus_error,
            mean_dice,
            min_dice,
            site_dice,
            bytes_total,
            online: online.iter().filter(|o| **o).count(),
        });
        on_round();
    }

    // The spectral prediction holds where Metropolis-Hastings mixes on a fixed graph: the
    // whole topology every round (a fanout of at least its largest degree).
    let slem = rules
        .as_ref()
        .is_some_and(|r| r.mixes_on_the_whole_overlay(overlay))
        .then(|| metropolis_hastings_weights(&adjacency).map(|w| spectral::slem(&w, 2000)))
        .transpose()?;
    let mut name = method.as_str().to_string();
    if aggregates(method) {
        name = format!("{name}/{}", aggregation.as_str());
    }
    if let Some(p) = preset {
        name = format!("{name}/{p}");
    }
    Ok(VariantResult {
        name,
        scheme: method.as_str().into(),
        aggregation: aggregation.as_str().into(),
        preset: preset.map(str::to_owned),
        rows,
        final_dice,
        slem,
    })
}
