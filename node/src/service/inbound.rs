//! Answers to peers. Every request from the network is checked here before anything acts
//! on it; a bad one gets a `Refused` (or a manifest verdict naming the problem), is counted,
//! and is logged once per peer and reason.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use libp2p::PeerId;
use medmesh_crypto::Role;
use medmesh_protocol::messages::{MAX_STATUS_RECORDS, UpdateChunk};
use medmesh_protocol::{
    Announcement, AnnouncementAnswer, Artifact, ArtifactAnswer, ArtifactRequest, Request, Response,
    SignedManifest, SignedProgress, StatusAnswer, StatusQuery, Unavailable, UpdateAnswer,
    UpdateRequest,
};

use super::{Node, Registered, Served, store};

/// Handles one request and returns the answer.
pub async fn handle(node: &Arc<Node>, peer: PeerId, request: Request) -> Response {
    // The allow-list admits roster members only; the role decides what each may ask.
    let role = node.role_of(&peer);
    let permitted = match role {
        Some(role) => request
            .permitted(role)
            .map_err(|why| format!("a {role} member: {why}")),
        None => Err("not an active member of the roster".to_owned()),
    };
    if let Err(why) = permitted {
        node.metrics.rejected("forbidden");
        tracing::warn!(%peer, request = request.kind(), "refused: {why}");
        return refused(why);
    }
    match request {
        Request::Announce(Announcement::Manifest(signed)) => on_manifest(node, peer, *signed),
        Request::Announce(Announcement::Progress(p)) => on_progress(node, peer, *p),
        Request::Announce(Announcement::Roster(r)) => on_roster(node, r).await,
        Request::Update(UpdateRequest::Offer {
            experiment_id,
            round,
            attempt,
        }) => Response::Update(node.registry.offer(&experiment_id, round, attempt)),
        Request::Update(UpdateRequest::Chunk {
            experiment_id,
            round,
            attempt,
            offset,
        }) => on_chunk_request(node, &experiment_id, round, attempt, offset),
        Request::Update(UpdateRequest::Exchange {
            experiment_id,
            round,
        }) => Response::Update(UpdateAnswer::Exchange {
            round,
            state: node.registry.exchange(&experiment_id, round),
        }),
        Request::Status(StatusQuery { experiment_id }) => on_status(node, experiment_id.as_deref()),
        Request::Artifact(request) => {
            if let Err(why) = export_allowed(node, role, &request.experiment_id) {
                node.metrics.rejected("forbidden");
                tracing::warn!(%peer, experiment = %request.experiment_id, "refused an export: {why}");
                return refused(why);
            }
            let node = node.clone();
            tokio::task::spawn_blocking(move || on_artifact(&node, &request))
                .await
                .unwrap_or_else(|e| refused(format!("artifact read failed: {e}")))
        }
    }
}

/// Whether a member of `role` may download `id`'s exports: nodes always, researchers where
/// the manifest lets them (`export.researchers`).
fn export_allowed(node: &Node, role: Option<Role>, id: &str) -> Result<(), String> {
    let researcher = role == Some(Role::Researcher);
    match node.registry.manifest(id) {
        Some(m) if researcher && !m.manifest.export.researchers => Err(format!(
            "experiment {id:?} keeps its model with the sites (export.researchers = false)"
        )),
        _ => Ok(()),
    }
}

fn refused(reason: String) -> Response {
    Response::Refused { reason }
}

/// When a member connects: tell it about running experiments, so that nodes that were
/// offline or joined late learn of them.
pub fn greet(node: &Arc<Node>, peer: PeerId) {
    let manifests = node.registry.unfinished();
    let n = node.clone();
    node.tasks.spawn(async move {
        for m in manifests {
            let _ = n
                .net
                .request(peer, Request::Announce(Announcement::Manifest(Box::new(m))))
                .await;
        }
    });
}

fn on_manifest(node: &Arc<Node>, peer: PeerId, signed: SignedManifest) -> Response {
    let digest = signed.manifest.digest();
    let id = signed.manifest.id.clone();
    let ack = |rejection: Option<String>| {
        Response::Announce(AnnouncementAnswer::Manifest {
            experiment_id: id.clone(),
            manifest_digest: digest,
            rejection,
        })
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
    // Members forward a new manifest to each other at once: registration is atomic, so
    // exactly one handler adopts it.
    let registered = node.registry.register(&signed, &node.config.datasets);
    match registered {
        Registered::Known => return ack(None),
        Registered::Conflict(existing) => return conflict(node, peer, &id, existing, ack),
        Registered::New | Registered::Observed => {}
    }
    if let Err(e) = store::save_manifest(&node.config.node.state_dir, &signed) {
        node.registry.remove(&id);
        tracing::error!(experiment = %id, "cannot persist the manifest: {e:#}");
        return ack(Some(format!("node cannot persist the manifest: {e:#}")));
    }
    tracing::info!(%peer, experiment = %id, digest = %hex::encode(digest), "accepted a manifest");
    if registered == Registered::New {
        node.start(signed.clone());
    }
    node.broadcast(
        Request::Announce(Announcement::Manifest(Box::new(signed))),
        &[peer],
    );
    ack(None)
}

fn conflict(
    node: &Node,
    peer: PeerId,
    id: &str,
    existing: [u8; 32],
    ack: impl Fn(Option<String>) -> Response,
) -> Response {
    node.metrics.rejected("manifest_replay");
    let why = format!(
        "experiment {id:?} already exists with a different manifest ({}); a changed experiment needs a new id",
        hex::encode(&existing[..8])
    );
    tracing::warn!(%peer, "rejected a manifest: {why}");
    ack(Some(why))
}

fn on_progress(node: &Arc<Node>, peer: PeerId, p: SignedProgress) -> Response {
    let ack = Response::Announce(AnnouncementAnswer::Ack);
    let verified = {
        let roster = node.roster.read().unwrap_or_else(|p| p.into_inner());
        p.verify(roster.roster())
    };
    if let Err(e) = verified {
        node.metrics.rejected("bad_progress");
        tracing::debug!(%peer, "rejected a progress record: {e}");
        return refused(e.to_string());
    }
    if !node
        .registry
        .knows(&p.record.experiment_id, &p.record.manifest_digest)
    {
        return ack;
    }
    if node.registry.record_progress(&p) {
        let origin = crate::net::peer_id_of(&p.record.node);
        node.broadcast(
            Request::Announce(Announcement::Progress(Box::new(p))),
            &[peer, origin],
        );
    }
    ack
}

/// Asks `peer` for the progress records it knows and keeps the newer ones that verify and
/// belong to experiments this node knows.
pub async fn sync_status(node: &Arc<Node>, peer: PeerId) {
    let query = Request::Status(StatusQuery {
        experiment_id: None,
    });
    let records = match node.net.request(peer, query).await {
        Ok(Response::Status(StatusAnswer { records, .. })) => records,
        Ok(_) | Err(_) => return,
    };
    for p in records {
        let verified = {
            let roster = node.roster.read().unwrap_or_else(|p| p.into_inner());
            p.verify(roster.roster()).is_ok()
        };
        if !verified {
            node.metrics.rejected("bad_progress");
        } else if node
            .registry
            .knows(&p.record.experiment_id, &p.record.manifest_digest)
        {
            node.registry.record_progress(&p);
        }
    }
}

async fn on_roster(node: &Arc<Node>, candidate: medmesh_crypto::SignedRoster) -> Response {
    let ack = Response::Announce(AnnouncementAnswer::Ack);
    let accepted = {
        let current = node.roster.read().unwrap_or_else(|p| p.into_inner());
        if candidate.roster.version <= current.roster().version {
            return ack;
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
            node.broadcast(Request::Announce(Announcement::Roster(candidate)), &[]);
            ack
        }
        Err(e) => {
            node.metrics.rejected("bad_roster");
            tracing::warn!("rejected a roster update: {e}");
            refused(e.to_string())
        }
    }
}

fn on_chunk_request(node: &Node, id: &str, round: u64, attempt: u32, offset: u64) -> Response {
    let Some(served) = node.registry.served(id, round, attempt) else {
        return Response::Update(UpdateAnswer::Unavailable {
            experiment_id: id.to_owned(),
            reason: Unavailable::NotServed,
            latest_round: None,
        });
    };
    match chunk_of(&served, offset) {
        Ok(chunk) => {
            if let Response::Update(UpdateAnswer::Chunk(c)) = &chunk {
                node.registry.add_traffic(id, c.bytes.len() as u64, 0);
            }
            chunk
        }
        Err(why) => {
            node.metrics.rejected("bad_offset");
            refused(why)
        }
    }
}

/// The chunk of `served`'s payload at `offset`, which must be a chunk boundary.
pub fn chunk_of(served: &Served, offset: u64) -> Result<Response, String> {
    let h = &served.envelope.header;
    let chunk = u64::from(h.chunk_size);
    let len = served.payload.len() as u64;
    if offset >= len || !offset.is_multiple_of(chunk) {
        return Err(format!(
            "offset {offset} is not a chunk boundary below {len}"
        ));
    }
    let end = (offset + chunk).min(len);
    Ok(Response::Update(UpdateAnswer::Chunk(UpdateChunk {
        experiment_id: h.experiment_id.clone(),
        round: h.round,
        offset,
        bytes: served.payload[offset as usize..end as usize].to_vec(),
    })))
}

fn on_status(node: &Node, id: Option<&str>) -> Response {
    Response::Status(StatusAnswer {
        node: node.identity.public_key(),
        records: node.registry.progress(id, MAX_STATUS_RECORDS),
    })
}

/// Chunk size of artifact downloads.
const ARTIFACT_CHUNK: u64 = 1 << 20;

fn on_artifact(node: &Node, request: &ArtifactRequest) -> Response {
    let ArtifactRequest {
        experiment_id: id,
        artifact,
        offset,
    } = request;
    let unavailable = |why| Response::Artifact(ArtifactAnswer::Unavailable(why));
    match node.registry.finished(id) {
        None => return unavailable(Unavailable::UnknownExperiment),
        Some(false) => return unavailable(Unavailable::NotFinished),
        Some(true) => {}
    }
    let path = store::experiment_dir(&node.config.node.state_dir, id)
        .join("export")
        .join(Artifact::file_name(*artifact));
    let read = || -> std::io::Result<Response> {
        let mut f = std::fs::File::open(&path)?;
        let total_len = f.metadata()?.len();
        if *offset > total_len {
            return Ok(refused(format!("offset {offset} beyond {total_len} bytes")));
        }
        f.seek(SeekFrom::Start(*offset))?;
        let mut bytes = Vec::with_capacity(ARTIFACT_CHUNK.min(total_len - offset) as usize);
        f.take(ARTIFACT_CHUNK).read_to_end(&mut bytes)?;
        Ok(Response::Artifact(ArtifactAnswer::Chunk {
            total_len,
            offset: *offset,
            bytes,
        }))
    };
    read().unwrap_or_else(|e| {
        tracing::error!(path = %path.display(), "cannot read an export: {e}");
        unavailable(Unavailable::ExportUnreadable)
    })
}
