//! Local training and evaluation of one site's model: the inner loop of every node and of
//! every simulated site.

use burn::grad_clipping::GradientClippingConfig;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::tensor::Bytes;
use medmesh_protocol::manifest::{Augmentation, Manifest, Metric, Optimizer};
use medmesh_protocol::swa::{self, TailMean};
use serde::Serialize;

use crate::model::{UNet, UNetConfig, init};
use crate::params::{self, ParamsError, Selection};
use crate::rng::Rng;
use crate::samples::TrainingSet;

/// Training hyper-parameters, from the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSettings {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Local epochs per round, if the manifest counts epochs.
    pub local_epochs: Option<usize>,
    /// Local steps per round, if the manifest counts steps.
    pub local_steps: Option<usize>,
    /// Seed of initialization and shuffling.
    pub seed: u64,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Weight decay.
    pub weight_decay: Option<f64>,
    /// Gradient norm clipping.
    pub grad_clip: Option<f64>,
    /// Rounds planned (for the learning-rate schedule).
    pub rounds: usize,
    /// FedProx's mu: the local loss gains mu/2 * ||w - w_round_start||^2.
    pub proximal_mu: Option<f64>,
    /// Augmentation beyond the random horizontal flips.
    pub augmentation: Option<Augmentation>,
}

impl TrainSettings {
    /// The settings a manifest asks for.
    pub fn from_manifest(m: &Manifest) -> Self {
        let t = &m.training;
        Self {
            learning_rate: t.learning_rate,
            batch_size: t.batch_size as usize,
            local_epochs: t.local_epochs.map(|e| e as usize),
            local_steps: t.local_steps.map(|s| s as usize),
            seed: t.seed,
            optimizer: t.optimizer,
            weight_decay: t.weight_decay,
            grad_clip: t.grad_clip,
            rounds: m.averaging.rounds as usize,
            proximal_mu: t.proximal_mu,
            augmentation: t.augmentation,
        }
    }

    /// Cosine decay from the peak rate to a tenth of it over the planned rounds.
    pub fn learning_rate_at(&self, round: u64) -> f64 {
        let progress = (round as f64 / self.rounds.max(1) as f64).min(1.0);
        self.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
    }

    fn optimizer(&self) -> ModuleOptimizer {
        let clip = self
            .grad_clip
            .map(|c| GradientClippingConfig::Norm(c as f32));
        match self.optimizer {
            Optimizer::Adam => AdamConfig::new()
                .with_weight_decay(self.weight_decay.map(|p| WeightDecayConfig::new(p as f32)))
                .with_grad_clipping(clip)
                .init(),
            Optimizer::Adamw => AdamWConfig::new()
                .with_weight_decay(self.weight_decay.unwrap_or(0.0) as f32)
                .with_grad_clipping(clip)
                .init(),
        }
    }
}

/// What one round of local training did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RoundStats {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Mean training loss over those steps.
    pub mean_loss: f64,
    /// Training samples (slices) seen.
    pub samples: usize,
}

/// Per-case and mean validation scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// Mean over cases of the mean foreground Dice.
    pub mean_dice: f64,
    /// Mean over cases of the mean foreground IoU.
    pub mean_iou: f64,
    /// Each case's scores.
    pub cases: Vec<CaseScore>,
}

impl Evaluation {
    /// The mean score of `metric` (a manifest's `evaluation.metric`).
    pub fn score(&self, metric: Metric) -> f64 {
        match metric {
            Metric::Dice => self.mean_dice,
            Metric::Iou => self.mean_iou,
        }
    }
}

/// One case's scores (all its slices together, i.e. a 3D Dice).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseScore {
    /// Case name.
    pub case: String,
    /// Mean foreground Dice.
    pub dice: f64,
    /// Dice per foreground class.
    pub dice_per_class: Vec<f64>,
    /// Mean foreground IoU.
    pub iou: f64,
    /// 95th-percentile Hausdorff distance in pixels, mean over foreground classes; `None`
    /// where a class is in the prediction or the truth but not both.
    pub hd95: Option<f64>,
}

/// Training progress, for progress bars and logs.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// Step within the round (1-based).
    pub step: usize,
    /// Steps in the round.
    pub of: usize,
    /// This step's loss.
    pub loss: f64,
}

/// One site's model, optimizer and schedule position.
pub struct Trainer {
    pub(crate) model: UNet,
    pub(crate) optim: ModuleOptimizer,
    pub(crate) config: UNetConfig,
    pub(crate) settings: TrainSettings,
    pub(crate) device: Device,
    pub(crate) round: u64,
    pub(crate) rng: Rng,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("round", &self.round)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// A freshly initialized site model for `manifest` on `device` (a plain device; autodiff
    /// is added here).
    pub fn new(manifest: &Manifest, device: Device) -> Self {
        Self::with(
            UNetConfig::from_manifest(manifest),
            TrainSettings::from_manifest(manifest),
            device,
        )
    }

    /// A freshly initialized model of `config` trained with `settings`.
    pub fn with(config: UNetConfig, settings: TrainSettings, device: Device) -> Self {
        crate::allocator::keep_freed_memory();
        let train_device = device.clone().autodiff();
        let model = init::seeded(&config, settings.seed, &train_device);
        Self {
            optim: settings.optimizer(),
            rng: Rng::derive(settings.seed, 0x005A_3B1E),
            model,
            config,
            settings,
            device,
            round: 0,
        }
    }

    /// The network's shape.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Rounds of local training completed.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Moves the schedule to `round`, for a site that adopts a peer's model of that round
    /// (a late joiner, or a restart that fell behind).
    pub fn set_round(&mut self, round: u64) {
        self.round = round;
    }

    /// The model, with batch-norm running statistics brought up to date.
    pub fn model(&self) -> UNet {
        // Running statistics update lazily (per thread) and sync when the mode is set; the
        // clone shares their storage, so this syncs `self.model` too.
        self.model.clone().train()
    }

    /// The flat weights of `selection`.
    pub fn weights(&self, selection: Selection) -> Vec<f32> {
        params::flatten(&self.model(), selection)
    }

    /// Replaces the weights of `selection` (e.g. with an average); the optimizer state is kept.
    pub fn set_weights(&mut self, values: &[f32], selection: Selection) -> Result<(), ParamsError> {
        // `model()` first folds pending batch-norm statistics in; left pending, they would
        // overwrite the loaded ones at the next training step. Clones share storage: cheap.
        self.model = params::load_flat(self.model(), values, selection)?;
        Ok(())
    }

    /// SWA (`training.swa_rounds`): folds this model's `selection` into `tail` when training
    /// round `round` is one of the last `swa_rounds` of `training_rounds`. Returns whether it
    /// did.
    pub fn fold_into(
        &self,
        tail: &mut TailMean,
        round: u64,
        training_rounds: u64,
        swa_rounds: Option<u32>,
        selection: Selection,
    ) -> bool {
        let fold = swa_rounds.is_some_and(|k| swa::in_window(round, training_rounds, k));
        if fold {
            tail.add(&self.weights(selection));
        }
        fold
    }

    /// SWA's end: the model's `selection` becomes `tail`'s mean, if it has one.
    pub fn adopt_mean(&mut self, tail: &TailMean, selection: Selection) -> Result<(), ParamsError> {
        match tail.get() {
            Some(mean) => self.set_weights(mean, selection),
            None => Ok(()),
        }
    }

    /// Optimizer steps one round of local training takes on `slices` training samples
    /// (slices, or cases for a 3D model): the manifest's steps, or its epochs in batches.
    pub fn steps_per_round(&self, slices: usize) -> usize {
        let batch = self.settings.batch_size.min(slices.max(1));
        match (self.settings.local_steps, self.settings.local_epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => e * slices.div_ceil(batch),
            (None, None) => slices.div_ceil(batch),
        }
    }

    /// One round of local training on `data`: the manifest's epochs or steps, with FedProx's
    /// proximal term toward the weights the round started from when the manifest sets mu.
    pub fn train_round(
        &mut self,
        data: &(impl TrainingSet + ?Sized),
        on_step: impl FnMut(StepInfo),
    ) -> RoundStats {
        let steps = self.steps_per_round(data.len());
        let lr = self.settings.learning_rate_at(self.round);
        let stats = self.train_steps(data, steps, lr, self.settings.proximal_mu, on_step);
        self.round += 1;
        stats
    }

    /// Personalization: `steps` steps of plain local fine-tuning at the end of the schedule's
    /// learning rate, after the federated rounds. The round count does not move.
    pub fn fine_tune(&mut self, data: &(impl TrainingSet + ?Sized), steps: usize) -> RoundStats {
        let lr = self.settings.learning_rate_at(self.settings.rounds as u64);
        self.train_steps(data, steps, lr, None, |_| {})
    }

    fn train_steps(
        &mut self,
        data: &(impl TrainingSet + ?Sized),
        steps: usize,
        lr: f64,
        proximal_mu: Option<f64>,
        mut on_step: impl FnMut(StepInfo),
    ) -> RoundStats {
        let n = data.len();
        let batch = self.settings.batch_size.min(n.max(1));
        if n == 0 || steps == 0 {
            return RoundStats {
                steps: 0,
                mean_loss: 0.0,
                samples: 0,
            };
        }
        let train_device = self.device.clone().autodiff();
        // FedProx anchors at the weights the round starts from (detached: constants).
        let anchor: Option<(f64, Vec<Tensor<1>>)> = proximal_mu.map(|mu| {
            let anchor = trainable(&self.model)
                .into_iter()
                .map(Tensor::detach)
                .collect();
            (mu, anchor)
        });
        let mut order: Vec<usize> = Vec::new();
        let mut total_loss = 0.0;
        for step in 0..steps {
            let mut indices = Vec::with_capacity(batch);
            while indices.len() < batch {
                if order.is_empty() {
                    order = (0..n).collect();
                    self.rng.shuffle(&mut order);
                }
                indices.extend(order.pop());
            }
            let batch = data.batch(
                &indices,
                self.settings.augmentation.as_ref(),
                self.config.classes,
                &mut self.rng,
                &train_device,
            );
            let mut loss = batch.loss(&self.model);
            // The reported loss is the segmentation loss alone.
            let loss_value: f64 = loss.clone().into_scalar::<f32>().into();
            if let Some((mu, anchor)) = &anchor {
                loss = loss + proximal_term(&self.model, anchor).mul_scalar(*mu / 2.0);
            }
            let grads = GradientsParams::from_grads(loss.backward(), &self.model);
            self.model = self.optim.step(lr, self.model.clone(), grads);
            total_loss += loss_value;
            on_step(StepInfo {
                step: step + 1,
                of: steps,
                loss: loss_value,
            });
        }
        RoundStats {
            steps,
            mean_loss: total_loss / steps as f64,
            samples: steps * batch,
        }
    }

    /// Validation scores on `data`, per case and mean.
    pub fn evaluate(&self, data: &(impl TrainingSet + ?Sized)) -> Evaluation {
        data.evaluate(&self.model.valid(), &self.device, self.config.classes)
    }

    /// Serializes model record and optimizer state (with ParamIds, so they stay matched).
    pub(crate) fn state_bytes(&self) -> Result<(Vec<u8>, Vec<u8>), burn::store::RecordError> {
        let model = self.model().into_record().into_bytes()?;
        let optim = self.optim.into_bytes()?;
        Ok((model.to_vec(), optim.to_vec()))
    }

    /// Restores from [`Trainer::state_bytes`] output.
    pub(crate) fn restore(
        config: UNetConfig,
        settings: TrainSettings,
        device: Device,
        model: Vec<u8>,
        optim: Vec<u8>,
        round: u64,
        rng_state: u64,
    ) -> Result<Self, burn::store::RecordError> {
        let record = burn::store::ModuleRecord::from_bytes(Bytes::from_bytes_vec(model))?;
        // Records carry the mode flags of whoever saved them; training resumes in training mode.
        let model = config
            .init(&device.clone().autodiff())
            .try_load_record(record)?
            .train();
        let optim = settings
            .optimizer()
            .from_bytes(Bytes::from_bytes_vec(optim))?;
        Ok(Self {
            model,
            optim,
            config,
            settings,
            device,
            round,
            rng: Rng::from_state(rng_state),
        })
    }
}

/// The model's trainable parameters, each flattened, in module order.
fn trainable(model: &UNet) -> Vec<Tensor<1>> {
    struct Collect(Vec<Tensor<1>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            if value.is_require_grad() {
                self.0.push(value.flatten::<1>(0, D - 1));
            }
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// ||w - anchor||^2 over the trainable parameters, differentiable in w.
fn proximal_term(model: &UNet, anchor: &[Tensor<1>]) -> Tensor<1> {
    trainable(model)
        .into_iter()
        .zip(anchor)
        .map(|(w, a)| (w - a.clone()).powi_scalar(2).sum())
        .reduce(|a, b| a + b)
        .unwrap_or_else(|| unreachable!("a UNet has parameters"))
}

/// Per-case and mean validation scores of `model` (in validation mode) on `data`.
pub fn evaluate(
    model: &UNet,
    data: &(impl TrainingSet + ?Sized),
    device: &Device,
    classes: usize,
) -> Evaluation {
    data.evaluate(model, device, classes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::slices::{SliceOptions, SliceSet, slice_cases};
    use crate::data::synthetic::{Preset, generate_site, site_profile};

    fn setup() -> (Manifest, SliceSet) {
        let mut m =
            Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap();
        m.task.input_size = [32, 32];
        m.training.local_epochs = None;
        m.training.local_steps = Some(8);
        let cases = generate_site(&site_profile(Preset::Iid, 0, 3, 5), 32, 4, 5, 0);
        let data = slice_cases(&cases, &SliceOptions::new([32, 32], 5)).unwrap();
        (m, data)
    }

    fn drift(m: &Manifest, data: &SliceSet) -> f64 {
        let mut t = Trainer::new(m, Device::flex());
        // Convolutions only: batch-norm running statistics follow the data, not the loss.
        let start = t.weights(Selection::WithoutNormalization);
        t.train_round(data, |_| {});
        let end = t.weights(Selection::WithoutNormalization);
        start
            .iter()
            .zip(&end)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn the_proximal_term_holds_local_training_near_the_round_start() {
        let (m, data) = setup();
        let free = drift(&m, &data);
        let mut prox = m.clone();
        prox.training.proximal_mu = Some(100.0);
        let held = drift(&prox, &data);
        eprintln!("drift over a round: {free:.4} without, {held:.4} with mu = 100");
        assert!(held < 0.7 * free, "{held} vs {free}");
    }

    #[test]
    fn fine_tuning_takes_its_steps_without_moving_the_round() {
        let (m, data) = setup();
        let mut t = Trainer::new(&m, Device::flex());
        t.train_round(&data, |_| {});
        let before = t.weights(Selection::All);
        let stats = t.fine_tune(&data, 3);
        assert_eq!((stats.steps, t.round()), (3, 1));
        assert_ne!(t.weights(Selection::All), before);
    }
}
