//! `medmesh train-local` and `medmesh evaluate`: one site on its own.

use std::path::Path;

use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use medmesh_protocol::Manifest;
use medmesh_protocol::stop::{StopRule, StopState};
use medmesh_training::data::load_dir;
use medmesh_training::data::slices::{SliceOptions, slice_cases};
use medmesh_training::data::volumes::VolumeSet;
use medmesh_training::model::UNetConfig;
use medmesh_training::{DeviceSpec, TrainSettings, Trainer, checkpoint, export, trainer};
use serde_json::json;

use super::read_text;

fn load_manifest(path: &Path) -> Result<Manifest> {
    Manifest::parse(&read_text(path)?)
        .with_context(|| format!("{} is not a valid manifest", path.display()))
}

fn device(name: &str) -> Result<burn::tensor::Device> {
    Ok(name.parse::<DeviceSpec>()?.device()?)
}

/// Trains one site for the manifest's rounds; exports the model; prints a JSON summary.
pub fn train_local(
    data: &Path,
    manifest: &Path,
    out: &Path,
    device_name: &str,
    ckpt: Option<&Path>,
    cache: Option<crate::site_data::Cache<'_>>,
) -> Result<()> {
    let m = load_manifest(manifest)?;
    let device = device(device_name)?;
    let site = crate::site_data::load(data, &m, cache)?;
    let (train_set, val_set) = (site.train, site.validation);
    tracing::info!(
        cases = site.cases,
        train_samples = train_set.len(),
        validation_cases = val_set.cases(),
        from_disk = train_set.is_on_disk(),
        device = device_name,
        "data loaded"
    );

    let config = UNetConfig::from_manifest(&m);
    let settings = TrainSettings::from_manifest(&m);
    let mut trainer = match ckpt.filter(|p| p.exists()) {
        Some(p) => {
            let t = checkpoint::load(p, config, settings, device)?;
            tracing::info!(round = t.round(), checkpoint = %p.display(), "resumed from checkpoint");
            t
        }
        None => Trainer::new(&m, device),
    };
    let rounds = m.averaging.rounds as u64;
    let metric = m.evaluation.metric;
    let first = trainer.evaluate(&val_set);
    let (initial, initial_dice) = (first.score(metric), first.mean_dice);
    let bar = ProgressBar::new(rounds);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} round {pos}/{len} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.round());
    let stop = StopRule::from_manifest(&m);
    let mut stop_state = StopState::default();
    let started = Instant::now();
    let (mut last, mut last_dice) = (initial, initial_dice);
    while trainer.round() < rounds {
        let stats = trainer.train_round(&train_set, |s| {
            bar.set_message(format!("step {}/{} loss {:.3}", s.step, s.of, s.loss))
        });
        let scores = trainer.evaluate(&val_set);
        (last, last_dice) = (scores.score(metric), scores.mean_dice);
        tracing::info!(
            round = trainer.round(),
            loss = stats.mean_loss,
            val_metric = last,
            metric = metric.as_str(),
            "round done"
        );
        bar.set_message(format!("val {} {last:.3}", metric.as_str()));
        bar.inc(1);
        if let Some(p) = ckpt {
            checkpoint::save(&trainer, p)?;
        }
        if let Some(reason) =
            stop.observe(&mut stop_state, trainer.round(), last, started.elapsed())
        {
            tracing::info!(val_metric = last, "{reason}; stopping early");
            break;
        }
    }
    bar.finish_and_clear();
    let extra = [
        ("manifest_digest", hex::encode(m.digest())),
        ("experiment_id", m.id.clone()),
        (
            "input_size",
            format!("{}x{}", m.task.input_size[0], m.task.input_size[1]),
        ),
        ("rounds", trainer.round().to_string()),
    ];
    export::save(&trainer.model(), trainer.config(), &extra, out)?;
    let summary = json!({
        "model": out.display().to_string(),
        "rounds": trainer.round(),
        "dice_initial": initial_dice,
        "dice_final": last_dice,
        "metric": metric.as_str(),
        "metric_initial": initial,
        "metric_final": last,
        // Slices, or cases for a 3D model: the samples of an epoch.
        "train_samples": train_set.len(),
        "validation_cases": val_set.cases(),
    });
    println!("{summary}");
    Ok(())
}

/// Scores a model on every slice of a dataset; prints `{"mean_dice", "cases": [...]}`.
pub fn evaluate(
    model_path: &Path,
    data: &Path,
    manifest: Option<&Path>,
    device_name: &str,
) -> Result<()> {
    let device = device(device_name)?;
    let (model, config) = export::load(model_path, &device)?;
    if config.dims == 3 {
        // A 3D model scores whole volumes patch by patch: the manifest gives patch, plane,
        // spacing and normalization.
        let m = load_manifest(manifest.with_context(|| {
            format!(
                "{} is a 3D model; pass --manifest for its patch size and plane",
                model_path.display()
            )
        })?)?;
        anyhow::ensure!(
            m.model.dims == 3,
            "{} is a 3D model and the manifest says model.dims = {}",
            model_path.display(),
            m.model.dims
        );
        let cases = load_dir(data, config.in_channels, config.classes)?;
        let volumes = VolumeSet::from_cases(&cases, &m)?;
        let eval = trainer::evaluate(&model, &volumes, &device, config.classes);
        println!("{}", serde_json::to_string(&eval)?);
        return Ok(());
    }
    let size = match manifest {
        Some(p) => {
            let m = load_manifest(p)?;
            anyhow::ensure!(
                m.model.dims == 2,
                "{} is a 2D model and the manifest says model.dims = {}",
                model_path.display(),
                m.model.dims
            );
            [m.task.input_size[0] as usize, m.task.input_size[1] as usize]
        }
        None => recorded_size(model_path)?,
    };
    let cases = load_dir(data, config.in_channels, config.classes)?;
    let mut opts = SliceOptions::new(size, 0);
    opts.keep_empty = 1.0;
    let slices = slice_cases(&cases, &opts)?;
    let eval = trainer::evaluate(&model, &slices, &device, config.classes);
    println!("{}", serde_json::to_string(&eval)?);
    Ok(())
}

fn recorded_size(path: &Path) -> Result<[usize; 2]> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let size = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("input_size").cloned())
        .with_context(|| format!("{} records no input size; pass --manifest", path.display()))?;
    let (h, w) = size
        .split_once('x')
        .context("input_size metadata is not HxW")?;
    Ok([h.parse()?, w.parse()?])
}
