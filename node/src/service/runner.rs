//! One experiment at one site, on its own thread (training is CPU- or GPU-bound and must
//! not stall the network task). Each round: train locally, publish the update, fetch peers'
//! updates chosen by the manifest's scheme, check and aggregate them, validate, checkpoint,
//! and gossip a signed progress record. At the end: export the model with signed provenance.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use libp2p::PeerId;
use medmesh_crypto::PublicKey;
use medmesh_protocol::averaging::weighted_mean;
use medmesh_protocol::envelope::chunk_size_for;
use medmesh_protocol::manifest::{Aggregation, Scheme};
use medmesh_protocol::robust::{
    check_update, clip_towards, coordinate_median, trim_count, trimmed_mean,
};
use medmesh_protocol::{
    Manifest, Message, ParamLayout, ProgressRecord, Provenance, SignedManifest, SignedProgress,
    SignedProvenance, UpdateEnvelope, UpdateExpectation, UpdateHeader,
};
use medmesh_training::params::{self, Selection};
use medmesh_training::rng::Rng;
use medmesh_training::{DeviceSpec, Trainer, atomic_file, checkpoint, export};

use super::exchange::{FetchError, Fetched, Want, fetch_update};
use super::privacy::Privatizer;
use super::store::{self, RunnerState};
use super::{Node, SERVED_ROUNDS, Served, inbound, lock};
use crate::site_data;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `signed` at this node to the end.
pub fn run(node: &Arc<Node>, signed: &SignedManifest) -> Result<()> {
    let m = &signed.manifest;
    let digest = m.digest();
    let dir = store::experiment_dir(&node.config.node.state_dir, &m.id);
    let dataset = node
        .config
        .datasets
        .get(&m.task.dataset)
        .with_context(|| format!("dataset {:?} is not configured", m.task.dataset))?;
    let data = site_data::load(&dataset.path, m)?;
    let device = node.config.node.device.parse::<DeviceSpec>()?.device()?;
    let ckpt = dir.join("checkpoint.bin");
    for file in [&ckpt, &dir.join("progress.json")] {
        match atomic_file::remove_leftovers(file) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                experiment = %m.id,
                "removed {n} partial file(s) of {} left by an interrupted write",
                file.display()
            ),
            Err(e) => tracing::warn!("cannot clean up beside {}: {e}", file.display()),
        }
    }
    let mut trainer = if ckpt.exists() {
        let t = checkpoint::load(
            &ckpt,
            medmesh_training::model::UNetConfig::from_manifest(m),
            medmesh_training::TrainSettings::from_manifest(m),
            device,
        )
        .with_context(|| format!("resuming from {}", ckpt.display()))?;
        tracing::info!(experiment = %m.id, round = t.round(), "resumed from checkpoint");
        t
    } else {
        Trainer::new(m, device)
    };
    let selection = Selection::for_manifest(m.averaging.keep_normalization_local);
    let layout = params::layout(&trainer.model(), selection);
    let mut state = RunnerState::load(&dir)?;
    let me = node.identity.public_key();
    let sample_weight = data.train.len() as f64;
    let rounds = u64::from(m.averaging.rounds);
    tracing::info!(
        experiment = %m.id,
        train_slices = data.train.len(),
        validation_slices = data.validation.len(),
        params = layout.num_params(),
        "experiment started"
    );
    set_progress(node, &m.id, trainer.round(), false);

    if state.dice_initial.is_none() {
        let dice = trainer.evaluate(&data.validation).mean_dice as f32;
        state.dice_initial = Some(dice);
        state.save(&dir)?;
        publish_progress(node, m, digest, 0, f32::NAN, dice, 0, false);
    }
    let mut last = (f32::NAN, state.dice_initial.unwrap_or(0.0));
    let mut privatizer =
        Privatizer::for_manifest(m).context("seeding the privacy noise from the OS")?;
    if let Some(p) = &privatizer {
        tracing::info!(
            experiment = %m.id,
            clip_norm = m.privacy.clip_norm,
            noise_sigma = p.sigma(),
            "updates leave this site clipped and with Gaussian noise"
        );
    }
    let mut rng = Rng::derive(
        m.training.seed,
        u64::from_le_bytes(me.to_bytes()[..8].try_into().unwrap_or_default()) ^ trainer.round(),
    );

    while trainer.round() < rounds {
        let round = trainer.round() + 1;
        let start = privatizer.is_some().then(|| trainer.weights(selection));
        let stats = trainer.train_round(&data.train, |_| {});
        let local = trainer.weights(selection);
        let shared = match (privatizer.as_mut(), start) {
            (Some(p), Some(start)) => {
                let mut shared = local.clone();
                let factor = p.apply(&start, &mut shared);
                tracing::debug!(
                    round,
                    clip_factor = factor,
                    "privatized this round's update"
                );
                Some(shared)
            }
            _ => None,
        };
        serve(
            node,
            m,
            digest,
            &layout,
            round,
            shared.as_deref().unwrap_or(&local),
            sample_weight,
        );
        // Sealed into the served payload now; free it before peers' updates arrive.
        drop(shared);

        let peers = node.runtime.block_on(node.net.connected_nodes());
        let chosen = choose_peers(m, &peers, &mut rng);
        let deadline = Instant::now() + Duration::from_secs(m.averaging.round_timeout_secs.into());
        let expect = UpdateExpectation {
            experiment_id: &m.id,
            manifest_digest: &digest,
            layout: &layout,
            encoding: m.averaging.encoding,
        };
        let want = Want {
            round: Some(round),
            expect,
            deadline,
            wait_for_training: true,
        };
        let results = node.runtime.block_on(fetch_all(node, &chosen, &want));

        let mut accepted: Vec<Fetched> = Vec::new();
        let mut ahead: Option<(PeerId, PublicKey, u64)> = None;
        for (peer, result) in results {
            match result {
                Ok(f) => match check_update(&f.values, &layout, &local, m.averaging.norm_bound) {
                    Ok(()) => accepted.push(f),
                    Err(e) => {
                        let reason = rejection_label(&e);
                        node.metrics.rejected(reason);
                        tracing::warn!(%peer, round, reason, "dropped an update: {e}");
                    }
                },
                Err(FetchError::Unavailable {
                    latest_round: Some(k),
                    ..
                }) if k > round => {
                    if ahead.is_none_or(|(_, _, best)| k > best)
                        && let Some(key) = node.node_key(&peer)
                    {
                        ahead = Some((peer, key, k));
                    }
                }
                Err(FetchError::Invalid { reason, detail }) => {
                    node.metrics.rejected(reason);
                    tracing::warn!(%peer, round, reason, "dropped an update: {detail}");
                }
                Err(e) => tracing::debug!(%peer, round, "no update: {e}"),
            }
        }

        if accepted.is_empty()
            && let Some((peer, key, k)) = ahead
        {
            match catch_up(node, &mut trainer, selection, &layout, m, digest, peer, key) {
                Ok(()) => {
                    tracing::info!(%peer, from = round, to = k, "fell behind; adopted a peer's model");
                    persist(node, &trainer, &ckpt, &state, &dir);
                    set_progress(node, &m.id, trainer.round(), false);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%peer, "fell behind, and could not adopt a peer's model: {e:#}")
                }
            }
        }

        if !accepted.is_empty() {
            let merged = aggregate(m, &local, sample_weight, me, &accepted)?;
            trainer
                .set_weights(&merged, selection)
                .context("loading averaged weights")?;
            for f in &accepted {
                if !state.contributors.contains(&f.sender) {
                    state.contributors.push(f.sender);
                }
            }
        }
        if (accepted.len() as u32) < m.averaging.min_peers {
            tracing::warn!(
                round,
                averaged = accepted.len(),
                min_peers = m.averaging.min_peers,
                "fewer peers than the manifest asks; the round counts as local"
            );
        }
        let dice = trainer.evaluate(&data.validation).mean_dice as f32;
        last = (stats.mean_loss as f32, dice);
        if !state.contributors.contains(&me) {
            state.contributors.push(me);
        }
        persist(node, &trainer, &ckpt, &state, &dir);
        set_progress(node, &m.id, round, false);
        node.metrics.rounds_completed.inc();
        node.metrics.round.set(round as f64);
        node.metrics.dice.set(f64::from(dice));
        node.metrics.loss.set(stats.mean_loss);
        node.metrics.peers_averaged.set(accepted.len() as f64);
        tracing::info!(
            experiment = %m.id,
            round,
            loss = stats.mean_loss,
            val_dice = dice,
            peers = accepted.len(),
            "round done"
        );
        let finished = round == rounds;
        if !finished {
            publish_progress(
                node,
                m,
                digest,
                round,
                last.0,
                dice,
                accepted.len() as u32,
                false,
            );
        }
    }

    export_results(node, m, digest, &trainer, &mut state, last, &dir)?;
    set_progress(node, &m.id, trainer.round(), true);
    publish_progress(node, m, digest, trainer.round(), last.0, last.1, 0, true);
    tracing::info!(experiment = %m.id, val_dice = last.1, "experiment finished; model exported");
    Ok(())
}

/// Writes the checkpoint, then the runner state. A failure (full disk, I/O error) is logged
/// and counted but not fatal: writes are atomic, so the previous checkpoint stays whole;
/// training goes on in memory, peers are still served, and the next round writes again.
fn persist(node: &Node, trainer: &Trainer, ckpt: &Path, state: &RunnerState, dir: &Path) {
    let written = checkpoint::save(trainer, ckpt)
        .map_err(anyhow::Error::from)
        .and_then(|()| state.save(dir));
    if let Err(e) = written {
        node.metrics.checkpoint_failures.inc();
        tracing::error!(
            round = trainer.round(),
            "could not write the checkpoint (the previous one is kept; retrying next round): {e:#}"
        );
    }
}

fn rejection_label(e: &medmesh_protocol::robust::UpdateRejection) -> &'static str {
    use medmesh_protocol::robust::UpdateRejection as R;
    match e {
        R::LayoutMismatch { .. } => "wrong_layout",
        R::NonFinite { .. } => "non_finite_weights",
        R::NormExceeded { .. } => "norm_bound",
    }
}

fn set_progress(node: &Node, id: &str, rounds_done: u64, finished: bool) {
    if let Some(e) = lock(&node.experiments).get_mut(id) {
        e.rounds_done = rounds_done;
        e.finished = finished;
    }
}

/// Seals this round's local weights and offers them to peers; forgets old rounds.
fn serve(
    node: &Node,
    m: &Manifest,
    digest: [u8; 32],
    layout: &ParamLayout,
    round: u64,
    local: &[f32],
    sample_weight: f64,
) {
    let payload = match &node.hooks.tamper_update {
        Some(tamper) => {
            let mut sent = local.to_vec();
            tamper(round, &mut sent);
            m.averaging.encoding.encode(&sent)
        }
        None => m.averaging.encoding.encode(local),
    };
    let header = UpdateHeader {
        experiment_id: m.id.clone(),
        manifest_digest: digest,
        round,
        sender: node.identity.public_key(),
        layout_digest: layout.digest(),
        num_params: layout.num_params(),
        encoding: m.averaging.encoding,
        sample_weight,
        payload_len: 0,
        payload_hash: [0; 32],
        chunk_size: chunk_size_for(payload.len() as u64),
    };
    let mut envelope = UpdateEnvelope::seal(header, &payload, &node.identity);
    let mut payload = payload;
    if let Some(tamper) = &node.hooks.tamper_offer {
        tamper(round, &mut envelope, &mut payload);
    }
    if let Some(e) = lock(&node.experiments).get_mut(&m.id) {
        e.served
            .insert(round, Arc::new(Served { envelope, payload }));
        while e.served.len() as u64 > SERVED_ROUNDS {
            e.served.pop_first();
        }
    }
}

/// The peers this round's scheme averages with. Every node runs the whole mesh it is
/// connected to, so `metropolis-hastings` is neighbour averaging on the complete graph of
/// live members (there its weights are uniform; samples weigh in instead, as in FedAvg).
fn choose_peers(m: &Manifest, connected: &[PeerId], rng: &mut Rng) -> Vec<PeerId> {
    let take = match m.averaging.scheme {
        Scheme::MetropolisHastings | Scheme::PushSum => connected.len(),
        Scheme::PairwiseGossip => 1,
        Scheme::Epidemic => m.averaging.fanout.unwrap_or(1) as usize,
    };
    let mut pool = connected.to_vec();
    let mut chosen = Vec::new();
    while chosen.len() < take && !pool.is_empty() {
        let i = rng.below(pool.len());
        chosen.push(pool.swap_remove(i));
    }
    chosen.sort();
    chosen
}

async fn fetch_all(
    node: &Node,
    peers: &[PeerId],
    want: &Want<'_>,
) -> Vec<(PeerId, Result<Fetched, FetchError>)> {
    let fetches = peers.iter().filter_map(|&peer| {
        let key = node.node_key(&peer)?;
        Some(async move { (peer, fetch_update(node, peer, key, want).await) })
    });
    futures::future::join_all(fetches).await
}

/// Combines the local update with the accepted ones by the manifest's rule. Inputs are
/// ordered by sender key, so every node that averages the same set computes the same bits.
fn aggregate(
    m: &Manifest,
    local: &[f32],
    local_weight: f64,
    me: PublicKey,
    accepted: &[Fetched],
) -> Result<Vec<f32>> {
    // Centred clipping: no single peer can move the model further than `clip_norm`.
    let clipped: Vec<Vec<f32>> = match m.averaging.clip_norm {
        Some(bound) => accepted
            .iter()
            .map(|f| {
                let mut v = f.values.clone();
                clip_towards(&mut v, local, bound);
                v
            })
            .collect(),
        None => Vec::new(),
    };
    let mut inputs: Vec<(PublicKey, &[f32], f64)> = vec![(me, local, local_weight)];
    inputs.extend(accepted.iter().enumerate().map(|(i, f)| {
        let values = clipped.get(i).unwrap_or(&f.values);
        (f.sender, values.as_slice(), f.envelope.header.sample_weight)
    }));
    inputs.sort_by_key(|(k, _, _)| k.to_bytes());
    let mut out = vec![0f32; local.len()];
    let slices: Vec<&[f32]> = inputs.iter().map(|(_, v, _)| *v).collect();
    match m.averaging.aggregation {
        Aggregation::Mean => {
            let weighted: Vec<(&[f32], f64)> = inputs.iter().map(|(_, v, w)| (*v, *w)).collect();
            weighted_mean(&weighted, &mut out)?;
        }
        Aggregation::Median => coordinate_median(&slices, &mut out)?,
        Aggregation::TrimmedMean => {
            let trim = trim_count(slices.len(), m.averaging.trim_fraction.unwrap_or(0.0));
            trimmed_mean(&slices, trim, &mut out)?;
        }
    }
    Ok(out)
}

/// Adopts `peer`'s latest update when this node has fallen behind (a restart after the
/// peers moved on, or a late join).
#[allow(clippy::too_many_arguments)]
fn catch_up(
    node: &Node,
    trainer: &mut Trainer,
    selection: Selection,
    layout: &ParamLayout,
    m: &Manifest,
    digest: [u8; 32],
    peer: PeerId,
    key: PublicKey,
) -> Result<()> {
    let want = Want {
        round: None,
        expect: UpdateExpectation {
            experiment_id: &m.id,
            manifest_digest: &digest,
            layout,
            encoding: m.averaging.encoding,
        },
        deadline: Instant::now() + Duration::from_secs(m.averaging.round_timeout_secs.into()),
        wait_for_training: false,
    };
    let fetched = node
        .runtime
        .block_on(fetch_update(node, peer, key, &want))?;
    check_update(&fetched.values, layout, &fetched.values, None)?;
    trainer.set_weights(&fetched.values, selection)?;
    trainer.set_round(fetched.envelope.header.round);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn publish_progress(
    node: &Arc<Node>,
    m: &Manifest,
    digest: [u8; 32],
    round: u64,
    loss: f32,
    metric: f32,
    peers_averaged: u32,
    finished: bool,
) {
    let record = ProgressRecord {
        experiment_id: m.id.clone(),
        manifest_digest: digest,
        round,
        node: node.identity.public_key(),
        loss,
        metric,
        contribution_weight: 0.0,
        peers_averaged,
        finished,
        unix_ms: unix_ms(),
    };
    let signed = SignedProgress::sign(record, &node.identity);
    inbound::record_progress(node, &signed);
    node.broadcast(Message::Progress(signed), &[]);
}

/// Writes `export/model.safetensors` and `export/provenance.json`.
fn export_results(
    node: &Node,
    m: &Manifest,
    digest: [u8; 32],
    trainer: &Trainer,
    state: &mut RunnerState,
    (loss, metric): (f32, f32),
    dir: &Path,
) -> Result<()> {
    let export_dir = dir.join("export");
    let model_path = export_dir.join("model.safetensors");
    let extra = [
        ("manifest_digest", hex::encode(digest)),
        ("experiment_id", m.id.clone()),
        (
            "input_size",
            format!("{}x{}", m.task.input_size[0], m.task.input_size[1]),
        ),
        ("rounds", trainer.round().to_string()),
    ];
    export::save(&trainer.model(), trainer.config(), &extra, &model_path)?;
    let model = std::fs::read(&model_path)?;
    let mut contributors = state.contributors.clone();
    contributors.sort_by_key(|k| k.to_bytes());
    contributors.dedup();
    let provenance = Provenance {
        experiment_id: m.id.clone(),
        manifest_digest: digest,
        node: node.identity.public_key(),
        rounds_completed: trainer.round(),
        contributors,
        final_metric: metric,
        final_loss: loss,
        model_hash: *blake3::hash(&model).as_bytes(),
        unix_ms: unix_ms(),
    };
    let signed = SignedProvenance::sign(provenance, &node.identity);
    atomic_file::write(
        &export_dir.join("provenance.json"),
        &serde_json::to_vec_pretty(&signed)?,
        0o644,
    )?;
    Ok(())
}
