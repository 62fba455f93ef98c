//! One experiment at one site, on its own thread (training is CPU- or GPU-bound and must
//! not stall the network task). Each round: train locally and offer the result, gather the
//! models of the round's sources (the round engine's graph, the same at every site), check
//! them, confirm pairs with the partner, merge by the engine's rule, validate, checkpoint,
//! and gossip a signed progress record. After the training rounds, the engine's reduce
//! rounds (exchange only) bring every site to the same model. At the end: export the model
//! with signed provenance.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use libp2p::PeerId;
use medmesh_crypto::PublicKey;
use medmesh_protocol::encoding::residue_bytes;
use medmesh_protocol::envelope::chunk_size_for;
use medmesh_protocol::progress::MAX_FAILURE_LEN;
use medmesh_protocol::robust::check_update;
use medmesh_protocol::round::{Overlay, Phase, RoundRules, Shape};
use medmesh_protocol::stop::StopRule;
use medmesh_protocol::swa::TailMean;
use medmesh_protocol::{
    Announcement, ExchangeState, Manifest, ParamLayout, ProgressRecord, Provenance, Request,
    Response, SignedManifest, SignedProgress, SignedProvenance, UpdateAnswer, UpdateEnvelope,
    UpdateExpectation, UpdateHeader, UpdateRequest, WeightEncoding,
};
use medmesh_training::params::{self, Selection};
use medmesh_training::{DeviceSpec, Trainer, atomic_file, checkpoint, export};

use super::exchange::{FetchError, Want, fetch_update};
use super::privacy::{Privatizer, Release};
use super::round::{self, MaskedUpload, Received, RoundNet, RoundView};
use super::store::{self, RunnerState};
use super::{Node, Served};
use crate::metrics::RoundDone;
use crate::net;
use crate::site_data;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The node is stopping: the runner left between rounds (or mid-round, before anything of
/// that round was kept), so a restart resumes from the last checkpoint.
#[derive(Debug, thiserror::Error)]
#[error("the node is stopping")]
pub struct Stopped;

/// Fails with [`Stopped`] once the node stops.
fn check_running(node: &Node) -> Result<()> {
    if node.tasks.is_stopping() {
        Err(Stopped.into())
    } else {
        Ok(())
    }
}

/// Runs `signed` at this node to the end, or until the node stops ([`Stopped`]).
pub fn run(node: &Arc<Node>, signed: &SignedManifest) -> Result<()> {
    let m = &signed.manifest;
    let digest = m.digest();
    let dir = store::experiment_dir(&node.config.node.state_dir, &m.id);
    let dataset = node
        .config
        .datasets
        .get(&m.task.dataset)
        .with_context(|| format!("dataset {:?} is not configured", m.task.dataset))?;
    let cache = site_data::Cache {
        dir: &dir.join("slices"),
        memory_budget: node.config.node.data_memory_mib * 1024 * 1024,
    };
    let data = site_data::load(&dataset.path, m, Some(cache))?;
    let device_spec = node.config.node.device.parse::<DeviceSpec>()?;
    let device = device_spec.device()?;
    let ckpt = dir.join("checkpoint.bin");
    let ledger = dir.join("privacy-ledger.bin");
    for file in [&ckpt, &dir.join("progress.json"), &ledger] {
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
            device.clone(),
        )
        .with_context(|| format!("resuming from {}", ckpt.display()))?;
        tracing::info!(experiment = %m.id, round = t.round(), "resumed from checkpoint");
        t
    } else {
        Trainer::new(m, device.clone())
    };
    let selection = Selection::for_manifest(m.averaging.keep_normalization_local);
    let layout = params::layout(&trainer.model(), selection);
    let mut state = RunnerState::load(&dir)?;
    // SWA: the mean of this site's models over the last `training.swa_rounds` rounds, kept
    // beside the checkpoint so that a restart goes on averaging where it stopped.
    let swa_path = dir.join("swa.f32");
    let mut tail = load_tail(&swa_path, state.swa_count, layout.num_params());
    let me = node.identity.public_key();
    let mut rules = RoundRules::from_manifest(m);
    let sample_weight = rules.site_mass(data.train.len());
    tracing::info!(
        experiment = %m.id,
        dims = m.model.dims,
        train_samples = data.train.len(),
        validation_cases = data.validation.cases(),
        slices_on_disk = data.train.is_on_disk(),
        params = layout.num_params(),
        "experiment started"
    );
    set_progress(node, &m.id, trainer.round(), false);

    let metric = m.evaluation.metric;
    let report = Reporter {
        m,
        digest,
        contribution_weight: sample_weight,
        device: device_spec.to_string(),
    };
    // The time budget of `stop.max_minutes` counts from this site's first start.
    let started = *state.started_unix_ms.get_or_insert_with(unix_ms);
    let started = UNIX_EPOCH + Duration::from_millis(started);
    if state.dice_initial.is_none() {
        let scores = trainer.evaluate(&data.validation);
        state.dice_initial = Some(scores.mean_dice as f32);
        state.save(&dir)?;
        report.publish(
            node,
            &state,
            0,
            f32::NAN,
            scores.score(metric) as f32,
            (0, None),
            false,
        );
    }
    if let Some(mu) = m.training.proximal_mu {
        tracing::info!(experiment = %m.id, mu, "FedProx: local training is held near each round's starting model");
    }
    let stop_rule = StopRule::from_manifest(m);
    let mut last = (f32::NAN, state.dice_initial.unwrap_or(0.0));
    let mut last_metric = last.1;
    // Releases start from the initial model, which every member derives from the seed; the
    // ledger carries the count and the last release across restarts.
    let mut privatizer = match m.privacy.clip_norm {
        Some(_) => {
            let initial = Trainer::new(m, device.clone()).weights(selection);
            Privatizer::for_manifest(m, initial, &ledger)?
        }
        None => None,
    };
    if let Some(p) = &privatizer {
        let spent = p.spent();
        tracing::info!(
            experiment = %m.id,
            clip_norm = m.privacy.clip_norm,
            noise_sigma = p.sigma(),
            releases = p.releases(),
            epsilon = spent.map(|s| s.epsilon),
            target_epsilon = m.privacy.target_epsilon,
            "updates leave this site clipped and with Gaussian noise"
        );
        state.privacy = spent;
    }
    let mut budget_spent_told = false;
    let manifest_rounds = rules.training_rounds;
    let mut mass = state.mass.unwrap_or(sample_weight);
    // Push-sum shares owed to this site that missed their round: fetched (and their mass
    // added) the next round instead of dropped.
    let mut late: Vec<(PublicKey, u64)> = Vec::new();

    // Rounds this site has completed, the final reduce's included (the trainer counts
    // training rounds only: progress, checkpoints and provenance speak of those).
    let mut done = trainer.round();
    // The last training round's peers averaged and averaging shift, for the final record.
    let mut last_exchange: (u32, Option<f32>) = (0, None);
    loop {
        check_running(node)?;
        // Training ends at the earliest round a site announced having met a stop rule.
        let announced = node.registry.announced_ends(&m.id);
        let earliest = announced.iter().copied().min();
        let end = stop_rule.agreed_end(manifest_rounds, done.min(rules.training_rounds), announced);
        if end != rules.training_rounds {
            if earliest.is_some_and(|e| e < end) {
                tracing::warn!(
                    experiment = %m.id,
                    "a site announced the end of training after round {}, which this site has trained past: it ends after round {end}, and its model will agree with the others' only approximately",
                    earliest.unwrap_or(end)
                );
            } else {
                tracing::info!(experiment = %m.id, "a site met a stop rule: training ends after round {end}");
            }
            rules.training_rounds = end;
        }
        let members = node.node_members();
        if done >= rules.total_rounds(members.len()) {
            break;
        }
        let round = done + 1;
        let round_started = Instant::now();
        let me_at = members
            .iter()
            .position(|k| *k == me)
            .context("this node is no longer an active node member of the roster")?;
        let graph = rules.graph(round, Overlay::Complete(members.len()));
        let trains = rules.phase(round) == Phase::Train;
        // Training is over: the weight average of the last rounds goes into the reduce.
        if !trains && !state.swa_applied {
            trainer
                .adopt_mean(&tail, selection)
                .context("taking the average of the last rounds")?;
            state.swa_applied = true;
        }

        // 0. Connect to this round's neighbours (closing what no round needs) while training.
        let neighbours: Vec<PeerId> = graph
            .neighbours(me_at)
            .iter()
            .map(|&j| net::peer_id_of(&members[j]))
            .collect();
        node.tasks
            .block_on(node.net.want(neighbours.clone()))
            .ok_or(Stopped)?;
        if trains {
            hold_for_peers(node, m, round, &neighbours)?;
        }

        // 1. Train (not in the final reduce), and offer the result.
        let stats = trains.then(|| trainer.train_round(&data.train, |_| {}));
        let local = trainer.weights(selection);
        let shared = match privatizer.as_mut() {
            Some(p) if trains => {
                let shared = match p.release(&local) {
                    Ok(Release::Fresh(shared, factor)) => {
                        tracing::debug!(
                            round,
                            clip_factor = factor,
                            "privatized this round's update"
                        );
                        shared
                    }
                    Ok(Release::Spent(last)) => {
                        if !std::mem::replace(&mut budget_spent_told, true) {
                            let s = p.spent();
                            tracing::warn!(
                                experiment = %m.id,
                                round,
                                releases = p.releases(),
                                epsilon = s.map(|s| s.epsilon),
                                target_epsilon = m.privacy.target_epsilon,
                                "privacy budget spent: this site publishes nothing new and serves its last release again"
                            );
                        }
                        last
                    }
                    Err(e) => {
                        tracing::error!(experiment = %m.id, round, "{e}; this round serves the last release again");
                        p.last_release().to_vec()
                    }
                };
                state.privacy = p.spent();
                Some(shared)
            }
            _ => None,
        };
        let (kept, sent) = rules.split_mass(&graph, me_at, mass);
        let secure = m.averaging.secure_aggregation && graph.shape() == Shape::Group;
        // Only rounds someone pulls are served: a site idle for a few reduce steps would
        // otherwise push the round its sinks still need out of the served window. Under
        // secure aggregation the exchange serves masked uploads instead.
        if !secure && !graph.sinks(me_at).is_empty() {
            serve(
                node,
                m,
                digest,
                &layout,
                round,
                shared.as_deref().unwrap_or(&local),
                sent,
            );
        }
        // Served and sealed now, unless secure aggregation masks it in the exchange: free it
        // before peers' updates arrive.
        let shared = if secure { shared } else { None };

        // 2. Gather from this round's sources (and push-sum shares that came late).
        let deadline = Instant::now() + Duration::from_secs(m.averaging.round_timeout_secs.into());
        let view = RoundView {
            rules: &rules,
            graph: &graph,
            members: &members,
            me: me_at,
            layout: &layout,
            norm_bound: m.averaging.norm_bound,
        };
        let mut round_net = NodeNet {
            node,
            expect: UpdateExpectation {
                experiment_id: &m.id,
                manifest_digest: &digest,
                layout: &layout,
                encoding: m.averaging.encoding,
            },
            deadline,
            timeout: Duration::from_secs(m.averaging.round_timeout_secs.into()),
        };
        let x = if secure {
            let secret_with = |k: &PublicKey| node.identity.shared_secret(k).ok().map(|s| *s);
            let outgoing = shared.as_deref().unwrap_or(&local);
            round::exchange_secure(&view, outgoing, kept, digest, &secret_with, &mut round_net)
        } else {
            round::exchange(
                &view,
                &local,
                kept,
                std::mem::take(&mut late),
                &mut round_net,
            )
            .context("combining the round's models")?
        };
        drop(shared);
        // Nothing of a round cut short by shutdown is kept: the restart redoes it.
        check_running(node)?;
        for r in &x.refused {
            node.metrics.rejected(r.reason);
            tracing::warn!(peer = %net::peer_id_of(&r.sender), round, reason = r.reason, "dropped an update: {}", r.detail);
        }
        late = x.late;
        if x.merged.is_none()
            && let Some((key, k)) = x.ahead
        {
            let peer = net::peer_id_of(&key);
            match catch_up(node, &mut trainer, selection, &layout, m, digest, peer, key) {
                Ok(()) => {
                    tracing::info!(%peer, from = round, to = k, "fell behind; adopted a peer's model");
                    done = trainer.round();
                    trainer.set_round(done.min(rules.training_rounds));
                    persist(node, &trainer, &ckpt, &state, &dir);
                    set_progress(node, &m.id, trainer.round(), false);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%peer, "fell behind, and could not adopt a peer's model: {e:#}")
                }
            }
        }

        // 3. Take the merged model and the new mass.
        let averaged = x.contributors.len();
        let shift = x
            .merged
            .as_deref()
            .map(|merged| rms_difference(merged, &local));
        if trains {
            last_exchange = (averaged as u32, shift);
        }
        if let Some(merged) = &x.merged {
            trainer
                .set_weights(merged, selection)
                .context("loading averaged weights")?;
        }
        mass = x.mass;
        state.mass = Some(mass);
        for k in x.contributors {
            if !state.contributors.contains(&k) {
                state.contributors.push(k);
            }
        }
        if trains && (averaged as u32) < m.averaging.min_peers {
            tracing::warn!(
                round,
                averaged,
                min_peers = m.averaging.min_peers,
                "fewer peers than the manifest asks; the round counts as local"
            );
        }
        done = round;
        trainer.set_round(round.min(rules.training_rounds));
        if trains
            && trainer.fold_into(
                &mut tail,
                round,
                rules.training_rounds,
                m.training.swa_rounds,
                selection,
            )
        {
            let bytes: Vec<u8> = tail.mean.iter().flat_map(|v| v.to_le_bytes()).collect();
            atomic_file::write(&swa_path, &bytes, 0o600)
                .with_context(|| format!("writing {}", swa_path.display()))?;
            state.swa_count = tail.count;
        }

        // 4. Evaluate, check the stop rules, checkpoint, tell.
        let scores = trainer.evaluate(&data.validation);
        let dice = scores.mean_dice as f32;
        let loss = stats.map_or(last.0, |s| s.mean_loss as f32);
        last = (loss, dice);
        last_metric = scores.score(metric) as f32;
        if trains && stop_rule.is_set() {
            let elapsed = SystemTime::now()
                .duration_since(started)
                .unwrap_or_default();
            let met = stop_rule.observe(&mut state.stop, round, f64::from(last_metric), elapsed);
            if let Some(reason) = met
                && state.stop_after.is_none()
                && let Some(end) = StopRule::announce(round, rules.training_rounds)
            {
                tracing::info!(experiment = %m.id, round, "{reason}: announcing that training ends after round {end}");
                state.stop_after = Some(end);
            }
        }
        if !state.contributors.contains(&me) {
            state.contributors.push(me);
        }
        persist(node, &trainer, &ckpt, &state, &dir);
        set_progress(node, &m.id, done, false);
        node.metrics.round_done(
            &m.id,
            RoundDone {
                round: trainer.round(),
                dice,
                loss,
                peers_averaged: trains.then_some(averaged),
                elapsed: round_started.elapsed(),
            },
        );
        tracing::info!(
            experiment = %m.id,
            round,
            phase = if trains { "train" } else { "reduce" },
            loss,
            val_dice = dice,
            peers = averaged,
            mass,
            "round done"
        );
        if round < rules.training_rounds {
            report.publish(
                node,
                &state,
                round,
                loss,
                last_metric,
                (averaged as u32, shift),
                false,
            );
        }
    }

    // A consortium of one has no reduce rounds: its average is taken here.
    if !state.swa_applied && tail.get().is_some() {
        trainer
            .adopt_mean(&tail, selection)
            .context("taking the average of the last rounds")?;
        state.swa_applied = true;
        let scores = trainer.evaluate(&data.validation);
        last = (last.0, scores.mean_dice as f32);
        last_metric = scores.score(metric) as f32;
    }
    export_results(
        node,
        m,
        digest,
        &trainer,
        &mut state,
        (last.0, last_metric),
        &dir,
    )?;
    if let Some(steps) = m.training.personalize_steps {
        personalize(m, &mut trainer, &data, steps as usize, &mut state, &dir)?;
    }
    set_progress(node, &m.id, trainer.round(), true);
    report.publish(
        node,
        &state,
        trainer.round(),
        last.0,
        last_metric,
        last_exchange,
        true,
    );
    // The slice cache is a normalized copy of the site's images: none is kept past its use.
    drop(data);
    match std::fs::remove_dir_all(dir.join("slices")) {
        Ok(()) => tracing::info!(experiment = %m.id, "removed the slice cache"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(experiment = %m.id, "could not remove the slice cache: {e}"),
    }
    tracing::info!(experiment = %m.id, val_dice = last.1, "experiment finished; model exported");
    Ok(())
}

/// The SWA mean saved at `path` after `count` rounds, if it is there and fits the layout;
/// otherwise an empty one (averaging restarts, which still gives an average).
fn load_tail(path: &Path, count: u32, params: u64) -> TailMean {
    if count == 0 {
        return TailMean::default();
    }
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() as u64 == params * 4 => TailMean::restored(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            count,
        ),
        Ok(bytes) => {
            tracing::warn!(path = %path.display(), bytes = bytes.len(), "the average of the last rounds does not fit the model; averaging restarts");
            TailMean::default()
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "the average of the last rounds is unreadable ({e}); averaging restarts");
            TailMean::default()
        }
    }
}

/// Personalization: fine-tunes the consensus model (already exported) on this site's own
/// training slices, writes it as `export/personalized.safetensors` and records its score.
/// Nothing of it leaves the site but the score.
fn personalize(
    m: &Manifest,
    trainer: &mut Trainer,
    data: &site_data::SiteData,
    steps: usize,
    state: &mut RunnerState,
    dir: &Path,
) -> Result<()> {
    let stats = trainer.fine_tune(&data.train, steps);
    let score = trainer
        .evaluate(&data.validation)
        .score(m.evaluation.metric) as f32;
    let path = dir.join("export/personalized.safetensors");
    export::save(
        &trainer.model(),
        trainer.config(),
        &[
            ("experiment_id", m.id.clone()),
            ("personalized_steps", steps.to_string()),
        ],
        &path,
    )?;
    state.personalized_metric = Some(score);
    state.save(dir)?;
    tracing::info!(
        experiment = %m.id,
        steps = stats.steps,
        metric = score,
        path = %path.display(),
        "personalized model fine-tuned on this site's data"
    );
    Ok(())
}

/// How often a held round looks again for its neighbours.
const HOLD_POLL: Duration = Duration::from_millis(100);

/// Holds a training round until `averaging.min_peers` of its `neighbours` (all of them, if
/// the round gives this site fewer) are connected. It gives up, logs and counts the round
/// when the round timeout passes, or as soon as too many neighbours failed to dial for the
/// rest to make up the number: a member that is down does not cost a round timeout.
fn hold_for_peers(node: &Node, m: &Manifest, round: u64, neighbours: &[PeerId]) -> Result<()> {
    let required = (m.averaging.min_peers as usize).min(neighbours.len());
    if required == 0 {
        return Ok(());
    }
    let timeout = Duration::from_secs(m.averaging.round_timeout_secs.into());
    let deadline = Instant::now() + timeout;
    loop {
        let reach = node
            .tasks
            .block_on(node.net.reachability(neighbours.to_vec()))
            .ok_or(Stopped)?;
        if reach.connected >= required {
            return Ok(());
        }
        let hopeless = neighbours.len() - reach.failed < required;
        if hopeless || Instant::now() >= deadline {
            node.metrics.rounds_short_of_peers.inc();
            tracing::warn!(
                experiment = %m.id,
                round,
                reachable = reach.connected,
                unreachable = reach.failed,
                min_peers = m.averaging.min_peers,
                "fewer of the round's neighbours reachable than min_peers asks{}; training the round anyway",
                if hopeless { "" } else { " after the round timeout" }
            );
            return Ok(());
        }
        std::thread::sleep(HOLD_POLL);
    }
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

/// Records the rounds this site has completed (the final reduce's included: peers read it
/// to know whether to wait for this site's model) and whether it finished.
fn set_progress(node: &Node, id: &str, rounds_done: u64, finished: bool) {
    node.registry.set_progress(id, rounds_done, finished);
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
        attempt: 0,
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
    node.registry
        .serve(&m.id, round, Served { envelope, payload });
}

/// Slack past the round deadline for the two ends of a pair to confirm.
const CONFIRM_GRACE: Duration = Duration::from_secs(2);

/// How often to ask a partner again while its side is pending.
const CONFIRM_POLL: Duration = Duration::from_millis(100);

/// The round's network: the node's libp2p handle, blocking the runner thread.
struct NodeNet<'a> {
    node: &'a Node,
    expect: UpdateExpectation<'a>,
    deadline: Instant,
    /// The manifest's round timeout (each secure-aggregation attempt gets one).
    timeout: Duration,
}

impl RoundNet for NodeNet<'_> {
    fn gather(
        &mut self,
        wanted: &[(PublicKey, u64)],
    ) -> Vec<((PublicKey, u64), Result<Received, FetchError>)> {
        let (node, expect, deadline) = (self.node, self.expect, self.deadline);
        let fetches = wanted.iter().map(|&(key, round)| async move {
            let want = Want {
                round: Some(round),
                attempt: 0,
                expect,
                deadline,
                wait_for_training: true,
            };
            let fetched = fetch_update(node, net::peer_id_of(&key), key, &want).await;
            let received = fetched.map(|f| Received {
                sender: f.sender,
                round: f.envelope.header.round,
                weight: f.envelope.header.sample_weight,
                values: f.values,
            });
            ((key, round), received)
        });
        // Empty when the node stops; the runner then leaves before using the round.
        node.tasks
            .block_on(futures::future::join_all(fetches))
            .unwrap_or_default()
    }

    fn serve_masked(&mut self, round: u64, attempt: u32, residues: &[u64], mass: f64) {
        let payload = residue_bytes(residues);
        let e = self.expect;
        let header = UpdateHeader {
            experiment_id: e.experiment_id.to_owned(),
            manifest_digest: *e.manifest_digest,
            round,
            attempt,
            sender: self.node.identity.public_key(),
            layout_digest: e.layout.digest(),
            num_params: e.layout.num_params(),
            encoding: WeightEncoding::Masked,
            sample_weight: mass,
            payload_len: 0,
            payload_hash: [0; 32],
            chunk_size: chunk_size_for(payload.len() as u64),
        };
        let envelope = UpdateEnvelope::seal(header, &payload, &self.node.identity);
        self.node
            .registry
            .serve(e.experiment_id, round, Served { envelope, payload });
    }

    fn gather_masked(
        &mut self,
        senders: &[PublicKey],
        round: u64,
        attempt: u32,
    ) -> Vec<(PublicKey, Result<MaskedUpload, FetchError>)> {
        let node = self.node;
        let expect = UpdateExpectation {
            encoding: WeightEncoding::Masked,
            ..self.expect
        };
        let deadline = Instant::now() + self.timeout;
        let fetches = senders.iter().map(|&key| async move {
            let want = Want {
                round: Some(round),
                attempt,
                expect,
                deadline,
                wait_for_training: true,
            };
            let fetched = fetch_update(node, net::peer_id_of(&key), key, &want).await;
            let upload = fetched.map(|f| MaskedUpload {
                residues: f.residues,
                mass: f.envelope.header.sample_weight,
            });
            (key, upload)
        });
        node.tasks
            .block_on(futures::future::join_all(fetches))
            .unwrap_or_default()
    }

    fn confirm(&mut self, partner: PublicKey, round: u64, got: bool) -> bool {
        let partner = net::peer_id_of(&partner);
        let (node, id) = (self.node, self.expect.experiment_id);
        let confirmed = node
            .tasks
            .block_on(confirm_pair(
                node,
                id,
                partner,
                round,
                got,
                self.deadline + CONFIRM_GRACE,
            ))
            .unwrap_or(false);
        if got && !confirmed {
            tracing::info!(%partner, round, "the partner did not get this node's model; both keep their own");
        }
        confirmed
    }
}

/// Settles a pairwise exchange: records this end's side (`got`: it has the partner's model,
/// checked), then asks the partner for its side until it is decided or `deadline`. True only
/// if both ends got each other's model, so both use the exchange or neither does.
async fn confirm_pair(
    node: &Node,
    experiment_id: &str,
    partner: PeerId,
    round: u64,
    got: bool,
    deadline: Instant,
) -> bool {
    let state = if got {
        ExchangeState::Fetched
    } else {
        ExchangeState::Failed
    };
    node.registry.set_exchange(experiment_id, round, state);
    if !got {
        return false;
    }
    let query = Request::Update(UpdateRequest::Exchange {
        experiment_id: experiment_id.to_owned(),
        round,
    });
    loop {
        match node.net.request(partner, query.clone()).await {
            Ok(Response::Update(UpdateAnswer::Exchange { round: r, state })) if r == round => {
                match state {
                    ExchangeState::Fetched => return true,
                    ExchangeState::Failed => return false,
                    ExchangeState::Pending => {}
                }
            }
            Ok(other) => {
                tracing::debug!(%partner, round, "unexpected answer to an exchange query: {}", other.describe());
                return false;
            }
            Err(e) => tracing::debug!(%partner, round, "exchange query failed: {e}"),
        }
        if Instant::now() + CONFIRM_POLL >= deadline {
            return false;
        }
        tokio::time::sleep(CONFIRM_POLL).await;
    }
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
        attempt: 0,
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
        .tasks
        .block_on(fetch_update(node, peer, key, &want))
        .ok_or(Stopped)??;
    check_update(&fetched.values, layout, &fetched.values, None)?;
    trainer.set_weights(&fetched.values, selection)?;
    trainer.set_round(fetched.envelope.header.round);
    Ok(())
}

/// Signs and spreads this site's progress records.
struct Reporter<'a> {
    m: &'a Manifest,
    digest: [u8; 32],
    /// The weight this site brings to averaging: its training slices.
    contribution_weight: f64,
    /// The compute device, as configured.
    device: String,
}

impl Reporter<'_> {
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        node: &Arc<Node>,
        state: &RunnerState,
        round: u64,
        loss: f32,
        metric: f32,
        (peers_averaged, averaging_shift): (u32, Option<f32>),
        finished: bool,
    ) {
        let traffic = node.registry.traffic(&self.m.id);
        let record = ProgressRecord {
            experiment_id: self.m.id.clone(),
            manifest_digest: self.digest,
            round,
            node: node.identity.public_key(),
            loss,
            metric,
            personalized_metric: state.personalized_metric.filter(|_| finished),
            contribution_weight: self.contribution_weight,
            peers_averaged,
            finished,
            stop_after: state.stop_after,
            privacy_epsilon: state.privacy.map(|p| p.epsilon),
            device: self.device.clone(),
            bytes_sent: traffic.sent,
            bytes_received: traffic.received,
            averaging_shift,
            failure: None,
            unix_ms: unix_ms(),
        };
        spread(node, record);
    }
}

/// Signs `record`, keeps it, and sends it to the connected members.
fn spread(node: &Arc<Node>, record: ProgressRecord) {
    let signed = SignedProgress::sign(record, &node.identity);
    node.registry.record_progress(&signed);
    node.broadcast(
        Request::Announce(Announcement::Progress(Box::new(signed))),
        &[],
    );
}

/// Tells the consortium, in a signed record, that this site's run of `signed` failed and
/// why (after [`run`] returned an error other than [`Stopped`]). The dataset's folder and the
/// state directory are named by their configuration keys, not their paths.
pub fn publish_failure(node: &Arc<Node>, signed: &SignedManifest, why: &str) {
    let m = &signed.manifest;
    let me = node.identity.public_key();
    // This site's latest record: the round, scores and spending the failure repeats.
    let last = node
        .registry
        .progress(Some(&m.id), usize::MAX)
        .into_iter()
        .find(|p| p.record.node == me)
        .map(|p| p.record);
    let traffic = node.registry.traffic(&m.id);
    // Other members learn why, not where this site keeps its files.
    let mut failure = why.to_owned();
    if let Some(d) = node.config.datasets.get(&m.task.dataset) {
        let folder = d.path.display().to_string();
        failure = failure.replace(&folder, &format!("[datasets.{}]", m.task.dataset));
    }
    let state = node.config.node.state_dir.display().to_string();
    failure = failure.replace(&state, "[state_dir]");
    if failure.len() > MAX_FAILURE_LEN {
        let mut end = MAX_FAILURE_LEN - 3;
        while !failure.is_char_boundary(end) {
            end -= 1;
        }
        failure.truncate(end);
        failure.push_str("...");
    }
    let record = ProgressRecord {
        experiment_id: m.id.clone(),
        manifest_digest: m.digest(),
        round: last.as_ref().map_or(0, |r| r.round),
        node: me,
        loss: last.as_ref().map_or(f32::NAN, |r| r.loss),
        metric: last.as_ref().map_or(f32::NAN, |r| r.metric),
        personalized_metric: None,
        contribution_weight: last.as_ref().map_or(0.0, |r| r.contribution_weight),
        peers_averaged: 0,
        finished: false,
        stop_after: None,
        privacy_epsilon: last.as_ref().and_then(|r| r.privacy_epsilon),
        device: node.config.node.device.clone(),
        bytes_sent: traffic.sent,
        bytes_received: traffic.received,
        averaging_shift: None,
        failure: Some(failure),
        unix_ms: unix_ms(),
    };
    spread(node, record);
}

/// The root mean square of `a - b`.
fn rms_difference(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len()).max(1);
    let sum: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    (sum / n as f64).sqrt() as f32
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
        privacy: state.privacy,
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
