//! Answers to peers. Every message from the network is checked here before anything acts
//! on it; a bad one gets a `Refused` (or a `ManifestAck` naming the problem), is counted,
//! and is logged once per peer and reason.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use libp2p::PeerId;
use medmesh_protocol::messages::{MAX_STATUS_RECORDS, UpdateChunk};
use medmesh_protocol::{Artifact, ExchangeState, Message, SignedManifest, SignedProgress};

use super::{Experiment, Node, Served, lock, runner, store};

/// Handles one request and returns the answer.
pub async fn handle(node: &Arc<Node>, peer: PeerId, message: Message) -> Message {
    match message {
        Message::ManifestAnnouncement(signed) => on_manifest(node, peer, signed),
        Message::Progress(p) => on_progress(node, peer, p),
        Message::RosterAnnouncement(r) => on_roster(node, r).await,
        Message::UpdateQuery {
            experiment_id,
            round,
        } => on_update_query(node, &experiment_id, round),
        Message::UpdateRequest {
            experiment_id,
            round,
            offset,
        } => on_update_request(node, &experiment_id, round, offset),
        Message::StatusQuery { experiment_id } => on_status(node, experiment_id.as_deref()),
        Message::ExchangeQuery {
            experiment_id,
            round,
        } => on_exchange_query(node, &experiment_id, round),
        Message::ArtifactRequest {
            experiment_id,
            artifact,
            offset,
        } => {
            let node = node.clone();
            tokio::task::spawn_blocking(move || {
                on_artifact(&node, &experiment_id, artifact, offset)
            })
            .await
            .unwrap_or_else(|e| refused(format!("artifact read failed: {e}")))
        }
        other => {
            node.metrics.rejected("unexpected_message");
            tracing::debug!(%peer, "unexpected request {:?}", std::mem::discriminant(&other));
            refused("this message is not a request".into())
        }
    }
}

fn refused(reason: String) -> Message {
    Message::Refused { reason }
}

/// When a member connects: tell it about running experiments, so that nodes that were
/// offline or joined late learn of them.
pub fn greet(node: &Arc<Node>, peer: PeerId) {
    let manifests: Vec<SignedManifest> = lock(&node.experiments)
        .values()
        .filter(|e| !e.finished)
        .map(|e| e.signed.clone())
        .collect();
    let node = node.clone();
    node.runtime.clone().spawn(async move {
        for m in manifests {
            let _ = node
                .net
                .request(peer, Message::ManifestAnnouncement(m))
                .await;
        }
    });
}

fn on_manifest(node: &Arc<Node>, peer: PeerId, signed: SignedManifest) -> Message {
    let digest = signed.manifest.digest();
    let id = signed.manifest.id.clone();
    let ack = |rejection: Option<String>| Message::ManifestAck {
        experiment_id: id.clone(),
        manifest_digest: digest,
        rejection,
    };
    let verified = {
        let roster = node.roster.read().unwrap_or_else(|p| p.into_inner());
        signed
            .verify(roster.roster())
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    if let Err(e) = verified {
        node.metrics.rejected("bad_manifest");
        tracing::warn!(%peer, experiment = %id, "rejected a manifest: {e}");
        return ack(Some(e));
    }
    // Members forward a new manifest to each other at once: check and register under one
    // lock, so exactly one handler adopts it.
    match register(node, &signed) {
        Registered::Known => return ack(None),
        Registered::Conflict(existing) => {
            node.metrics.rejected("manifest_replay");
            let why = format!(
                "experiment {id:?} already exists with a different manifest ({}); a changed experiment needs a new id",
                hex::encode(&existing[..8])
            );
            tracing::warn!(%peer, "rejected a manifest: {why}");
            return ack(Some(why));
        }
        Registered::New => {}
    }
    if let Err(e) = store::save_manifest(&node.config.node.state_dir, &signed) {
        lock(&node.experiments).remove(&id);
        tracing::error!(experiment = %id, "cannot persist the manifest: {e:#}");
        return ack(Some(format!("node cannot persist the manifest: {e:#}")));
    }
    tracing::info!(%peer, experiment = %id, digest = %hex::encode(digest), "accepted a manifest");
    start(node, signed.clone());
    node.broadcast(Message::ManifestAnnouncement(signed), &[peer]);
    ack(None)
}

/// What [`register`] found.
pub enum Registered {
    /// First time: registered now.
    New,
    /// Already registered with the same digest.
    Known,
    /// The id is taken by a manifest with this other digest.
    Conflict([u8; 32]),
}

/// Registers a verified manifest unless its id is known, atomically.
pub fn register(node: &Node, signed: &SignedManifest) -> Registered {
    register_in(&node.experiments, &node.config.datasets, signed)
}

fn register_in(
    experiments: &std::sync::Mutex<std::collections::HashMap<String, Experiment>>,
    datasets: &std::collections::BTreeMap<String, crate::config::DatasetSection>,
    signed: &SignedManifest,
) -> Registered {
    let id = &signed.manifest.id;
    let digest = signed.manifest.digest();
    let mut experiments = lock(experiments);
    if let Some(existing) = experiments.get(id) {
        return if existing.digest == digest {
            Registered::Known
        } else {
            Registered::Conflict(existing.digest)
        };
    }
    let dataset = &signed.manifest.task.dataset;
    let not_participating = (!datasets.contains_key(dataset)).then(|| {
        format!("dataset {dataset:?} is not configured at this node ([datasets.{dataset}])")
    });
    if let Some(why) = &not_participating {
        tracing::warn!(experiment = %id, "not participating: {why}");
    }
    experiments.insert(
        id.clone(),
        Experiment {
            digest,
            signed: signed.clone(),
            not_participating,
            served: Default::default(),
            exchanges: Default::default(),
            rounds_done: 0,
            finished: false,
        },
    );
    Registered::New
}

/// Starts the runner of a registered experiment, if this node takes part.
pub fn start(node: &Arc<Node>, signed: SignedManifest) {
    let id = signed.manifest.id.clone();
    let participates = lock(&node.experiments)
        .get(&id)
        .is_some_and(|e| e.not_participating.is_none());
    if participates {
        let node = node.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("experiment {id}"))
            .spawn(move || {
                if let Err(e) = runner::run(&node, &signed) {
                    tracing::error!(experiment = %signed.manifest.id, "experiment stopped: {e:#}");
                    if let Some(exp) = lock(&node.experiments).get_mut(&signed.manifest.id) {
                        exp.not_participating = Some(format!("stopped: {e:#}"));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(experiment = %id, "cannot start the experiment thread: {e}");
        }
    }
}

fn on_progress(node: &Arc<Node>, peer: PeerId, p: SignedProgress) -> Message {
    let verified = {
        let roster = node.roster.read().unwrap_or_else(|p| p.into_inner());
        p.verify(roster.roster())
    };
    if let Err(e) = verified {
        node.metrics.rejected("bad_progress");
        tracing::debug!(%peer, "rejected a progress record: {e}");
        return refused(e.to_string());
    }
    let known = lock(&node.experiments)
        .get(&p.record.experiment_id)
        .is_some_and(|e| e.digest == p.record.manifest_digest);
    if !known {
        return Message::Ack;
    }
    if record_progress(node, &p) {
        let origin = super::super::net::peer_id_of(&p.record.node);
        node.broadcast(Message::Progress(p), &[peer, origin]);
    }
    Message::Ack
}

/// Asks `peer` for the progress records it knows and keeps the newer ones that verify and
/// belong to experiments this node knows.
pub async fn sync_status(node: &Arc<Node>, peer: PeerId) {
    let answer = node
        .net
        .request(
            peer,
            Message::StatusQuery {
                experiment_id: None,
            },
        )
        .await;
    let records = match answer {
        Ok(Message::StatusAnswer { records, .. }) => records,
        Ok(_) | Err(_) => return,
    };
    for p in records {
        let verified = {
            let roster = node.roster.read().unwrap_or_else(|p| p.into_inner());
            p.verify(roster.roster()).is_ok()
        };
        let known = lock(&node.experiments)
            .get(&p.record.experiment_id)
            .is_some_and(|e| e.digest == p.record.manifest_digest);
        if verified && known {
            record_progress(node, &p);
        } else if !verified {
            node.metrics.rejected("bad_progress");
        }
    }
}

/// Keeps `p` if it is newer than what is known of its site; true if it was.
pub fn record_progress(node: &Node, p: &SignedProgress) -> bool {
    let key = (p.record.experiment_id.clone(), p.record.node);
    let mut all = lock(&node.progress);
    let newer = all.get(&key).is_none_or(|old| {
        (old.record.round, old.record.finished, old.record.unix_ms)
            < (p.record.round, p.record.finished, p.record.unix_ms)
    });
    if newer {
        all.insert(key, p.clone());
    }
    newer
}

async fn on_roster(node: &Arc<Node>, candidate: medmesh_crypto::SignedRoster) -> Message {
    let accepted = {
        let current = node.roster.read().unwrap_or_else(|p| p.into_inner());
        if candidate.roster.version <= current.roster().version {
            return Message::Ack;
        }
        current.accept_update(&candidate)
    };
    match accepted {
        Ok(newer) => {
            let path = node.config.node.state_dir.join("roster.toml");
            if let Err(e) = crate::keystore::save_roster(&path, newer.signed()) {
                tracing::error!("cannot store the new roster: {e}");
            }
            tracing::info!(version = newer.roster().version, "adopted a newer roster");
            let members = super::member_list(&newer);
            *node.roster.write().unwrap_or_else(|p| p.into_inner()) = newer;
            node.net.set_members(members).await;
            node.broadcast(Message::RosterAnnouncement(candidate), &[]);
            Message::Ack
        }
        Err(e) => {
            node.metrics.rejected("bad_roster");
            tracing::warn!("rejected a roster update: {e}");
            refused(e.to_string())
        }
    }
}

fn unavailable(experiment_id: &str, reason: String, latest_round: Option<u64>) -> Message {
    Message::UpdateUnavailable {
        experiment_id: experiment_id.to_owned(),
        reason,
        latest_round,
    }
}

fn on_update_query(node: &Node, id: &str, round: Option<u64>) -> Message {
    let experiments = lock(&node.experiments);
    let Some(e) = experiments.get(id) else {
        return unavailable(id, "unknown experiment".into(), None);
    };
    if let Some(why) = &e.not_participating {
        return unavailable(id, format!("not participating: {why}"), None);
    }
    // Served rounds run ahead of completed ones while the node averages.
    let latest = Some(
        e.served
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(e.rounds_done),
    );
    let found = match round {
        Some(r) => e.served.get(&r),
        None => e.served.values().next_back(),
    };
    match (found, round) {
        (Some(s), _) => Message::UpdateOffer(s.envelope.clone()),
        (None, Some(r)) if Some(r) > latest => {
            unavailable(id, format!("round {r} is not trained yet"), latest)
        }
        (None, Some(r)) => unavailable(id, format!("round {r} is no longer kept"), latest),
        (None, None) => unavailable(id, "no update yet".into(), latest),
    }
}

fn on_update_request(node: &Node, id: &str, round: u64, offset: u64) -> Message {
    let served = lock(&node.experiments)
        .get(id)
        .and_then(|e| e.served.get(&round).cloned());
    let Some(s) = served else {
        return unavailable(id, format!("round {round} is not served"), None);
    };
    chunk_of(&s, offset).unwrap_or_else(|why| {
        node.metrics.rejected("bad_offset");
        refused(why)
    })
}

/// The chunk of `served`'s payload at `offset`, which must be a chunk boundary.
pub fn chunk_of(served: &Served, offset: u64) -> Result<Message, String> {
    let h = &served.envelope.header;
    let chunk = u64::from(h.chunk_size);
    let len = served.payload.len() as u64;
    if offset >= len || !offset.is_multiple_of(chunk) {
        return Err(format!(
            "offset {offset} is not a chunk boundary below {len}"
        ));
    }
    let end = (offset + chunk).min(len);
    Ok(Message::UpdateChunk(UpdateChunk {
        experiment_id: h.experiment_id.clone(),
        round: h.round,
        offset,
        bytes: served.payload[offset as usize..end as usize].to_vec(),
    }))
}

/// This node's side of a pairwise exchange: `Pending` until its runner has decided.
fn on_exchange_query(node: &Node, id: &str, round: u64) -> Message {
    let state = lock(&node.experiments)
        .get(id)
        .and_then(|e| e.exchanges.get(&round).copied())
        .unwrap_or(ExchangeState::Pending);
    Message::ExchangeAnswer { round, state }
}

fn on_status(node: &Node, id: Option<&str>) -> Message {
    let records: Vec<SignedProgress> = lock(&node.progress)
        .values()
        .filter(|p| id.is_none_or(|id| p.record.experiment_id == id))
        .take(MAX_STATUS_RECORDS)
        .cloned()
        .collect();
    Message::StatusAnswer {
        node: node.identity.public_key(),
        records,
    }
}

/// Chunk size of artifact downloads.
const ARTIFACT_CHUNK: u64 = 1 << 20;

fn on_artifact(node: &Node, id: &str, artifact: Artifact, offset: u64) -> Message {
    let finished = lock(&node.experiments).get(id).map(|e| e.finished);
    match finished {
        None => return unavailable(id, "unknown experiment".into(), None),
        Some(false) => return unavailable(id, "experiment not finished at this node".into(), None),
        Some(true) => {}
    }
    let path = store::experiment_dir(&node.config.node.state_dir, id)
        .join("export")
        .join(artifact.file_name());
    let read = || -> std::io::Result<Message> {
        let mut f = std::fs::File::open(&path)?;
        let total_len = f.metadata()?.len();
        if offset > total_len {
            return Ok(refused(format!("offset {offset} beyond {total_len} bytes")));
        }
        f.seek(SeekFrom::Start(offset))?;
        let mut bytes = Vec::with_capacity(ARTIFACT_CHUNK.min(total_len - offset) as usize);
        f.take(ARTIFACT_CHUNK).read_to_end(&mut bytes)?;
        Ok(Message::ArtifactChunk {
            total_len,
            offset,
            bytes,
        })
    };
    read().unwrap_or_else(|e| {
        tracing::error!(path = %path.display(), "cannot read an export: {e}");
        unavailable(id, format!("export unreadable: {e}"), None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmesh_crypto::Identity;
    use medmesh_protocol::Manifest;
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Mutex;

    #[test]
    fn concurrent_announcements_register_an_experiment_once() {
        let researcher = Identity::from_seed(&[4; 32]);
        let m =
            Manifest::parse(include_str!("../../../examples/synthetic-quickstart.toml")).unwrap();
        let signed = SignedManifest::sign(m.clone(), &researcher);
        let experiments = Mutex::new(HashMap::new());
        let datasets = BTreeMap::new();
        let new = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| register_in(&experiments, &datasets, &signed)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|r| matches!(r, Registered::New))
                .count()
        });
        assert_eq!(new, 1);
        let mut changed = m;
        changed.title.push('!');
        let other = SignedManifest::sign(changed, &researcher);
        assert!(matches!(
            register_in(&experiments, &datasets, &other),
            Registered::Conflict(_)
        ));
    }
}
