//! What a federated result is measured against, with the manifest's own model, optimizer,
//! schedule and metric:
//!
//! * **local-only**: each site trains alone for the experiment's rounds.
//! * **pooled**: one model trains on the union of every site's training slices for the same
//!   rounds, each round as many steps as all sites take together (the same total number of
//!   steps), then scores on each site's validation slices. The upper bound federated
//!   learning is compared with, were the data allowed to move.
//! * **federated average** (FedAvg): every site trains a round, then all weights are
//!   averaged, weighted by training slices: the ideal gossip converges to. With site k left
//!   out and scored on k's validation slices, it is the **unseen-site** baseline: how the
//!   consortium's model does at a clinic that never trained.
//!
//! The demo and the simulator's learning mode both call these, so their baselines agree.

use burn::tensor::Device;
use medmesh_protocol::Manifest;
use medmesh_protocol::averaging::weighted_mean;
use medmesh_protocol::swa::TailMean;

use crate::params::Selection;
use crate::samples::{SiteSet, TrainingSet};
use crate::{TrainSettings, Trainer};

/// One site's data (slices, or volumes for a 3D model).
#[derive(Debug, Clone)]
pub struct Site {
    /// What the site trains on.
    pub train: SiteSet,
    /// What it scores on.
    pub validation: SiteSet,
}

/// The manifest's metric of `trainer` on `data`.
pub fn score(m: &Manifest, trainer: &Trainer, data: &(impl TrainingSet + ?Sized)) -> f64 {
    trainer.evaluate(data).score(m.evaluation.metric)
}

/// Trains `t` on `data` for the manifest's rounds, averaging the last `swa_rounds` of them
/// as the federation does.
fn train_rounds(m: &Manifest, t: &mut Trainer, data: &SiteSet) {
    let rounds = u64::from(m.averaging.rounds);
    let mut tail = TailMean::default();
    for round in 1..=rounds {
        t.train_round(data, |_| {});
        t.fold_into(
            &mut tail,
            round,
            rounds,
            m.training.swa_rounds,
            Selection::All,
        );
    }
    t.adopt_mean(&tail, Selection::All)
        .unwrap_or_else(|e| unreachable!("a mean of this model's own weights fits it: {e}"));
}

/// The initial model's score and the score after training alone for the manifest's rounds.
pub fn local_only(m: &Manifest, site: &Site, device: &Device) -> (f64, f64) {
    let mut t = Trainer::new(m, device.clone());
    let initial = score(m, &t, &site.validation);
    train_rounds(m, &mut t, &site.train);
    (initial, score(m, &t, &site.validation))
}

/// The pooled model's score on each site's validation slices.
pub fn pooled(m: &Manifest, sites: &[Site], device: &Device) -> Vec<f64> {
    let union = SiteSet::concat(&sites.iter().map(|s| &s.train).collect::<Vec<_>>());
    let probe = Trainer::new(m, device.clone());
    let steps: usize = sites
        .iter()
        .map(|s| probe.steps_per_round(s.train.len()))
        .sum();
    let mut settings = TrainSettings::from_manifest(m);
    settings.local_steps = Some(steps.max(1));
    settings.local_epochs = None;
    let mut t = Trainer::with(*probe.config(), settings, device.clone());
    train_rounds(m, &mut t, &union);
    sites.iter().map(|s| score(m, &t, &s.validation)).collect()
}

/// FedAvg over `sites` for the manifest's rounds (its FedProx term and FedBN selection
/// included); returns each site's trainer at the end.
pub fn federated_average(m: &Manifest, sites: &[&Site], device: &Device) -> Vec<Trainer> {
    let selection = Selection::for_manifest(m.averaging.keep_normalization_local);
    let mut trainers: Vec<Trainer> = sites
        .iter()
        .map(|_| Trainer::new(m, device.clone()))
        .collect();
    let weights: Vec<f64> = sites.iter().map(|s| s.train.len() as f64).collect();
    let rounds = u64::from(m.averaging.rounds);
    let mut tails = vec![TailMean::default(); sites.len()];
    for round in 1..=rounds {
        for (t, s) in trainers.iter_mut().zip(sites) {
            t.train_round(&s.train, |_| {});
        }
        average(&mut trainers, &weights, selection);
        for (t, tail) in trainers.iter().zip(&mut tails) {
            t.fold_into(tail, round, rounds, m.training.swa_rounds, selection);
        }
    }
    for (t, tail) in trainers.iter_mut().zip(&tails) {
        t.adopt_mean(tail, selection)
            .unwrap_or_else(|e| unreachable!("a mean of this model's own weights fits it: {e}"));
    }
    trainers
}

/// Replaces `selection` in every trainer with the weighted mean over all of them.
fn average(trainers: &mut [Trainer], weights: &[f64], selection: Selection) {
    let flat: Vec<Vec<f32>> = trainers.iter().map(|t| t.weights(selection)).collect();
    let inputs: Vec<(&[f32], f64)> = flat
        .iter()
        .zip(weights)
        .map(|(w, &k)| (w.as_slice(), k.max(f64::MIN_POSITIVE)))
        .collect();
    let mut mean = vec![0f32; flat.first().map_or(0, Vec::len)];
    weighted_mean(&inputs, &mut mean)
        .unwrap_or_else(|e| unreachable!("sites of one manifest share a layout: {e}"));
    for t in trainers {
        t.set_weights(&mean, selection)
            .unwrap_or_else(|e| unreachable!("the mean has the layout it came from: {e}"));
    }
}

/// Leave-one-site-out: FedAvg over every site but `held_out`, scored on `held_out`'s
/// validation slices. Where normalization stays local (FedBN), the unseen site has none of
/// its own, so it gets the mean of every parameter, normalization included.
pub fn unseen(m: &Manifest, sites: &[Site], held_out: usize, device: &Device) -> f64 {
    let others: Vec<&Site> = sites
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != held_out)
        .map(|(_, s)| s)
        .collect();
    let mut trainers = federated_average(m, &others, device);
    let weights: Vec<f64> = others.iter().map(|s| s.train.len() as f64).collect();
    average(&mut trainers, &weights, Selection::All);
    score(m, &trainers[0], &sites[held_out].validation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::slices::{SliceOptions, slice_cases};
    use crate::data::synthetic::{Preset, generate_site, site_profile};

    fn site(i: usize) -> Site {
        let cases = generate_site(&site_profile(Preset::Iid, i, 4, 3), 32, 4, 3, i);
        let (train, validation) = slice_cases(&cases, &SliceOptions::new([32, 32], 3))
            .unwrap()
            .split(0.25, 3);
        Site {
            train: train.into(),
            validation: validation.into(),
        }
    }

    fn manifest() -> Manifest {
        let mut m =
            Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap();
        m.task.input_size = [32, 32];
        m.averaging.rounds = 1;
        m
    }

    #[test]
    fn pooled_takes_as_many_steps_as_all_sites_together() {
        let sites = [site(0), site(1)];
        let m = manifest();
        let slices = |s: &SiteSet| s.slices().unwrap().clone();
        let union = slices(&SiteSet::concat(&[&sites[0].train, &sites[1].train]));
        let (a, b) = (slices(&sites[0].train), slices(&sites[1].train));
        assert_eq!(union.len(), a.len() + b.len());
        assert_eq!(
            union.case_names.len(),
            a.case_names.len() + b.case_names.len()
        );
        let scores = pooled(&m, &sites, &Device::flex());
        assert_eq!(scores.len(), 2);
        assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
    }

    #[test]
    fn federated_average_ends_with_one_model_everywhere() {
        let sites = [site(0), site(1), site(2)];
        let m = manifest();
        let trainers = federated_average(&m, &sites.iter().collect::<Vec<_>>(), &Device::flex());
        let w0 = trainers[0].weights(Selection::All);
        assert!(trainers.iter().all(|t| t.weights(Selection::All) == w0));
        let mut fedbn = m.clone();
        fedbn.averaging.keep_normalization_local = true;
        let trainers =
            federated_average(&fedbn, &sites.iter().collect::<Vec<_>>(), &Device::flex());
        let shared = Selection::WithoutNormalization;
        assert_eq!(trainers[0].weights(shared), trainers[1].weights(shared));
        assert_ne!(
            trainers[0].weights(Selection::All),
            trainers[1].weights(Selection::All),
            "normalization layers stay each site's own"
        );
        let held_out = unseen(&m, &sites, 0, &Device::flex());
        assert!((0.0..=1.0).contains(&held_out));
    }
}
