//! The dashboard's JSON API, read-only, for the page and for scripts (the README lists the
//! routes and fields):
//!
//! * `GET /api/v1/node`: this node: version, device, traffic, rejected messages by reason,
//!   its experiments' checkpoints.
//! * `GET /api/v1/consortium`: the roster's members and each one's connection from here.
//! * `GET /api/v1/experiments`: every experiment this node knows, with each site's latest
//!   signed progress.
//! * `GET /api/v1/experiments/{id}`: one experiment with each site's curves (every round
//!   heard), and this node's signed provenance once it finished.
//!
//! Times are milliseconds since the Unix epoch; a missing value is `null`.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use medmesh_crypto::{PublicKey, Role};
use medmesh_protocol::messages::{MAX_STATUS_RECORDS, PROTOCOL_VERSION};
use medmesh_protocol::{ProgressRecord, SignedProvenance};
use serde_json::{Value, json};

use crate::net;
use crate::service::Node;
use crate::service::registry::ExperimentView;
use crate::service::store;

/// The answer to `path`, or `None` for an unknown route.
pub async fn answer(node: &Node, started: Instant, path: &str) -> Option<Value> {
    let rest = path.strip_prefix("/api/v1")?;
    match rest {
        "" | "/" => Some(json!({
            "routes": [
                "/api/v1/node",
                "/api/v1/consortium",
                "/api/v1/experiments",
                "/api/v1/experiments/{id}",
                "/metrics",
            ]
        })),
        "/node" => Some(this_node(node, started)),
        "/consortium" => Some(consortium(node).await),
        "/experiments" => Some(Value::Array(
            node.registry
                .experiments()
                .iter()
                .map(|e| experiment(node, e, false))
                .collect(),
        )),
        _ => {
            let id = rest.strip_prefix("/experiments/")?;
            let view = node
                .registry
                .experiments()
                .into_iter()
                .find(|e| e.signed.manifest.id == id)?;
            Some(experiment(node, &view, true))
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A real number for JSON: NaN and infinities are `null`.
fn real(v: f32) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

/// The roster's site name of `key`, or its peer id.
fn site_of(node: &Node, key: &PublicKey) -> String {
    let roster = node.roster.read().unwrap_or_else(|p| p.into_inner());
    roster
        .roster()
        .members
        .iter()
        .find(|m| m.public_key == *key)
        .map_or_else(|| net::peer_id_of(key).to_string(), |m| m.site.clone())
}

fn this_node(node: &Node, started: Instant) -> Value {
    let me = node.identity.public_key();
    let m = &node.metrics;
    let rejected: BTreeMap<&str, u64> = m.rejected_counts().into_iter().collect();
    let checkpoints: Vec<Value> = node
        .registry
        .experiments()
        .iter()
        .filter(|e| e.not_participating.is_none() || e.rounds_done > 0)
        .map(|e| {
            let id = &e.signed.manifest.id;
            let file =
                store::experiment_dir(&node.config.node.state_dir, id).join("checkpoint.bin");
            let meta = std::fs::metadata(&file).ok();
            json!({
                "experiment": id,
                "round": e.rounds_done,
                "bytes": meta.as_ref().map(std::fs::Metadata::len),
                "written_ms": meta.and_then(|m| m.modified().ok()).map(unix_ms),
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "protocol_version": PROTOCOL_VERSION,
        "site": site_of(node, &me),
        "peer_id": node.identity.peer_id().to_string(),
        "public_key": me.to_string(),
        "device": node.config.node.device,
        "listen": node.config.network.listen,
        "uptime_secs": started.elapsed().as_secs(),
        "connections": {
            "members": m.peers_connected.get(),
            "direct": m.peers_direct.get(),
            "relayed": m.peers_relayed.get(),
            "routing_table": m.routing_table_peers.get(),
        },
        "nat": {
            "reachability": match m.reachable.get() {
                1 => "reachable",
                -1 => "not reachable",
                _ => "unknown",
            },
            "relay_reservations": m.relay_reservations.get(),
            "relayed_circuits": m.relayed_circuits.get(),
        },
        "traffic": {
            "bytes_sent": m.bytes_sent.get(),
            "bytes_received": m.bytes_received.get(),
        },
        "refused": {
            "not_member": m.refused_not_member.get(),
            "failed_handshakes": m.failed_handshakes.get(),
            "http": m.http_refused.get(),
        },
        "rejected": rejected,
        "checkpoint_failures": m.checkpoint_failures.get(),
        "rounds_short_of_peers": m.rounds_short_of_peers.get(),
        "checkpoints": checkpoints,
    })
}

async fn consortium(node: &Node) -> Value {
    let peers = node.net.peers().await;
    let me = node.identity.public_key();
    let (name, version, members) = {
        let roster = node.roster.read().unwrap_or_else(|p| p.into_inner());
        let r = roster.roster();
        let members: Vec<_> = r
            .members
            .iter()
            .map(|m| {
                let active = roster.authorize(&m.public_key, m.role).is_ok();
                (m.clone(), active)
            })
            .collect();
        (r.consortium.clone(), r.version, members)
    };
    // The latest record of each site, of any experiment: a member heard of without a
    // connection.
    let mut last_record: BTreeMap<[u8; 32], u64> = BTreeMap::new();
    for p in node.registry.progress(None, MAX_STATUS_RECORDS) {
        let t = last_record.entry(p.record.node.to_bytes()).or_default();
        *t = (*t).max(p.record.unix_ms);
    }
    let members: Vec<Value> = members
        .iter()
        .map(|(m, active)| {
            let peer = net::peer_id_of(&m.public_key);
            let state = peers.iter().find(|p| p.peer == peer);
            let is_self = m.public_key == me;
            let connection = if is_self {
                "this node"
            } else if m.role != Role::Node {
                "client"
            } else if state.is_some_and(|s| s.connected_since.is_some()) {
                "connected"
            } else if state.is_some_and(|s| s.unreachable) {
                "unreachable"
            } else {
                "not connected"
            };
            json!({
                "site": m.site,
                "role": match m.role { Role::Node => "node", Role::Researcher => "researcher" },
                "public_key": m.public_key.to_string(),
                "peer_id": peer.to_string(),
                "active": active,
                "this_node": is_self,
                "connection": connection,
                "connected_since_ms": state.and_then(|s| s.connected_since).map(unix_ms),
                "last_seen_ms": state.and_then(|s| s.last_seen).map(unix_ms),
                "address": state.and_then(|s| s.address.as_ref()).map(ToString::to_string),
                "path": state.and_then(|s| s.path).map(|p| p.to_string()),
                "last_record_ms": last_record.get(&m.public_key.to_bytes()),
            })
        })
        .collect();
    json!({
        "consortium": name,
        "roster_version": version,
        "members": members,
    })
}

/// This node's status in an experiment, and why.
fn status(e: &ExperimentView) -> (&'static str, Option<&str>) {
    match e.not_participating.as_deref() {
        Some(why) if why.starts_with("failed") => ("failed", Some(why)),
        Some(why) => ("observing", Some(why)),
        None if e.finished => ("finished", None),
        None => ("running", None),
    }
}

fn site_status(r: &ProgressRecord) -> &'static str {
    match (&r.failure, r.finished) {
        (Some(_), _) => "failed",
        (None, true) => "finished",
        (None, false) => "running",
    }
}

fn point(r: &ProgressRecord) -> Value {
    json!({
        "round": r.round,
        "loss": real(r.loss),
        "metric": real(r.metric),
        "peers_averaged": r.peers_averaged,
        "averaging_shift": r.averaging_shift.map(real),
        "bytes_sent": r.bytes_sent,
        "bytes_received": r.bytes_received,
        "unix_ms": r.unix_ms,
    })
}

fn experiment(node: &Node, e: &ExperimentView, detail: bool) -> Value {
    let m = &e.signed.manifest;
    let (state, reason) = status(e);
    let latest = node.registry.progress(Some(&m.id), MAX_STATUS_RECORDS);
    // Every active node member of the roster is a site of the experiment; those not heard
    // from yet are listed too.
    let mut sites: Vec<Value> = node
        .node_members()
        .iter()
        .map(|key| {
            let record = latest.iter().find(|p| p.record.node == *key);
            let mut site = json!({
                "site": site_of(node, key),
                "public_key": key.to_string(),
                "status": "no report yet",
            });
            if let Some(p) = record {
                let r = &p.record;
                let fields = json!({
                    "status": site_status(r),
                    "round": r.round,
                    "loss": real(r.loss),
                    "metric": real(r.metric),
                    "personalized_metric": r.personalized_metric.map(real),
                    "peers_averaged": r.peers_averaged,
                    "averaging_shift": r.averaging_shift.map(real),
                    "bytes_sent": r.bytes_sent,
                    "bytes_received": r.bytes_received,
                    "device": r.device,
                    "privacy_epsilon": r.privacy_epsilon,
                    "failure": r.failure,
                    "updated_ms": r.unix_ms,
                });
                if let (Value::Object(site), Value::Object(fields)) = (&mut site, fields) {
                    site.extend(fields);
                }
            }
            site
        })
        .collect();
    sites.sort_by(|a, b| a["site"].as_str().cmp(&b["site"].as_str()));
    let mut out = json!({
        "id": m.id,
        "title": m.title,
        "manifest_digest": hex::encode(e.digest),
        "dataset": m.task.dataset,
        "scheme": format!("{:?}", m.averaging.scheme),
        "rounds": m.averaging.rounds,
        "metric": format!("{:?}", m.evaluation.metric),
        "status": state,
        "reason": reason,
        "this_node": {
            "rounds_done": e.rounds_done,
            "bytes_sent": e.traffic.sent,
            "bytes_received": e.traffic.received,
        },
        "sites": sites,
    });
    if detail {
        let history: BTreeMap<String, Vec<Value>> = node
            .registry
            .history(&m.id)
            .iter()
            .map(|(key, rounds)| (site_of(node, key), rounds.iter().map(point).collect()))
            .collect();
        out["history"] = json!(history);
        out["provenance"] = provenance(node, &m.id);
    }
    out
}

/// This node's signed provenance of a finished experiment, or `null`.
fn provenance(node: &Node, id: &str) -> Value {
    let path =
        store::experiment_dir(&node.config.node.state_dir, id).join("export/provenance.json");
    let Ok(bytes) = std::fs::read(&path) else {
        return Value::Null;
    };
    match serde_json::from_slice::<SignedProvenance>(&bytes) {
        Ok(signed) => {
            let p = &signed.provenance;
            json!({
                "model_hash": hex::encode(p.model_hash),
                "rounds_completed": p.rounds_completed,
                "contributors": p.contributors.iter().map(|k| site_of(node, k)).collect::<Vec<_>>(),
                "final_metric": real(p.final_metric),
                "final_loss": real(p.final_loss),
                "signed_by": site_of(node, &p.node),
                "unix_ms": p.unix_ms,
            })
        }
        Err(e) => json!({ "error": format!("{}: {e}", path.display()) }),
    }
}
