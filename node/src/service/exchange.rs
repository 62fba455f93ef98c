//! Fetching a peer's model update: the signed envelope first (checked against the local
//! manifest and layout before a payload byte moves), then the payload chunk by chunk, a few
//! chunks in flight, each chunk under the request timeout, resuming at the last good offset
//! after a dropped connection, and the whole payload hash-checked before it is decoded.

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use libp2p::PeerId;
use medmesh_crypto::PublicKey;
use medmesh_protocol::encoding::residues;
use medmesh_protocol::{
    Announcement, PayloadAssembler, Request, Response, Unavailable, UpdateAnswer, UpdateEnvelope,
    UpdateError, UpdateExpectation, UpdateRequest, WeightEncoding,
};

use super::Node;
use crate::net::{self, NetError, NetworkHandle};

/// Most chunk requests in flight per transfer: enough to hide a round trip.
const MAX_WINDOW: u64 = 4;

/// Chunk requests kept in flight for a payload: up to [`MAX_WINDOW`], but never more than an
/// eighth of the payload, so that the few copies a chunk has on its way (sender's slice,
/// frames, receiver's buffer) stay a fraction of the model even for small models.
fn window(payload_len: u64, chunk: u64) -> usize {
    (payload_len / 8)
        .div_ceil(chunk.max(1))
        .clamp(1, MAX_WINDOW) as usize
}

/// Attempts to resume one transfer after errors.
const RESUME_ATTEMPTS: u32 = 3;

/// How often to ask again while a peer is still training the round.
const POLL: Duration = Duration::from_millis(250);

/// A received and verified update.
#[derive(Debug)]
pub struct Fetched {
    /// The sender (checked against the connection's peer id).
    pub sender: PublicKey,
    /// Its envelope.
    pub envelope: UpdateEnvelope,
    /// Decoded weights (empty for a masked upload).
    pub values: Vec<f32>,
    /// A masked upload's residues (secure aggregation; empty otherwise).
    pub residues: Vec<u64>,
}

/// Why no update came from a peer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The peer does not have it.
    #[error("peer has no update: {reason}")]
    Unavailable {
        /// Why not.
        reason: Unavailable,
        /// Rounds the peer has completed, if it runs the experiment.
        latest_round: Option<u64>,
    },
    /// Still not available at the deadline.
    #[error("round timeout: no update before the deadline")]
    Deadline,
    /// The network failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The update broke the rules; the peer is misbehaving.
    #[error("{detail}")]
    Invalid {
        /// A short name of the rule broken (the metrics label).
        reason: &'static str,
        /// What exactly was wrong.
        detail: String,
    },
    /// The peer answered with the wrong kind of message.
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

/// What to fetch and how it must look.
pub struct Want<'a> {
    /// Round wanted, or the latest.
    pub round: Option<u64>,
    /// The attempt at the round (0, or a secure-aggregation redo).
    pub attempt: u32,
    /// What a valid update looks like.
    pub expect: UpdateExpectation<'a>,
    /// Give up at this instant.
    pub deadline: Instant,
    /// Keep asking while the peer reports it is training the wanted round.
    pub wait_for_training: bool,
}

/// Fetches `peer`'s update per `want`.
pub async fn fetch_update(
    node: &Node,
    peer: PeerId,
    sender: PublicKey,
    want: &Want<'_>,
) -> Result<Fetched, FetchError> {
    let id = want.expect.experiment_id;
    let mut announced = false;
    let mut redials = 0;
    let envelope = loop {
        let query = Request::Update(UpdateRequest::Offer {
            experiment_id: id.to_owned(),
            round: want.round,
            attempt: want.attempt,
        });
        let answer = match node.net.request(peer, query).await {
            Ok(answer) => answer,
            // A peer a round behind closes connections its own round does not need, and may
            // close this one as the question arrives: ask again on a fresh connection, a few
            // times, so that a pair's exchange does not fail on that race. A peer that is
            // gone fails the next dial, which ends it.
            Err(e @ NetError::ConnectionClosed(_)) => {
                redials += 1;
                if redials > RESUME_ATTEMPTS || Instant::now() + POLL >= want.deadline {
                    return Err(e.into());
                }
                tracing::debug!(%peer, "asking again for an update: {e}");
                tokio::time::sleep(POLL).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match answer {
            Response::Update(UpdateAnswer::Offer(envelope)) => break envelope,
            Response::Update(UpdateAnswer::Unavailable {
                reason,
                latest_round,
                ..
            }) => {
                let unknown = reason == Unavailable::UnknownExperiment;
                let training_it = match (want.round, latest_round) {
                    // It runs the experiment and has not reached the round: it is on its
                    // way (training, or a step of the final reduce behind). The round's
                    // deadline bounds the wait. An unknown experiment may still be on its
                    // way to it.
                    (Some(r), Some(done)) => {
                        done < r
                            || (want.attempt > 0
                                && done == r
                                && reason == Unavailable::NotYetTrained)
                    }
                    (Some(_), None) => unknown,
                    (None, _) => false,
                };
                if unknown && !announced {
                    // Sparse connections can leave a member out of the manifest's flood:
                    // whoever needs it in a round hands it over.
                    announced = true;
                    announce_manifest(node, peer, id).await;
                }
                if !(want.wait_for_training && training_it) {
                    return Err(FetchError::Unavailable {
                        reason,
                        latest_round,
                    });
                }
                if Instant::now() + POLL >= want.deadline {
                    return Err(FetchError::Deadline);
                }
                tokio::time::sleep(POLL).await;
            }
            other => return Err(FetchError::Protocol(other.describe())),
        }
    };
    if envelope.header.sender != sender {
        return Err(FetchError::Invalid {
            reason: "wrong_sender",
            detail: format!(
                "update signed by {} arrived from {peer}",
                envelope.header.sender
            ),
        });
    }
    if want.round.is_some_and(|r| r != envelope.header.round)
        || (want.round.is_some() && want.attempt != envelope.header.attempt)
    {
        return Err(FetchError::Invalid {
            reason: "replayed_update",
            detail: format!(
                "asked for round {:?} attempt {}, got an update of round {} attempt {}",
                want.round, want.attempt, envelope.header.round, envelope.header.attempt
            ),
        });
    }
    let _permit = node
        .transfers
        .acquire()
        .await
        .map_err(|_| NetError::Shutdown)?;
    // The path is asked before and after: the connection may close right after the last
    // chunk (a round change, or a reconnection for another hole punch).
    let path_before = node.net.path(peer).await;
    let started = Instant::now();
    let (values, residues) = if envelope.header.encoding == WeightEncoding::Masked {
        let raw = assemble(&node.net, peer, &envelope, &want.expect)
            .await?
            .finish_raw()
            .map_err(FetchError::from)?;
        (Vec::new(), residues(&raw))
    } else {
        (
            download(&node.net, peer, &envelope, &want.expect).await?,
            Vec::new(),
        )
    };
    let elapsed = started.elapsed();
    let path = match node.net.path(peer).await.or(path_before) {
        Some(net::Path::Relayed { .. }) => "relayed",
        Some(net::Path::Direct) => "direct",
        None => "unknown",
    };
    node.metrics
        .transfer_done(want.expect.experiment_id, path, elapsed);
    tracing::info!(
        %peer,
        round = envelope.header.round,
        bytes = envelope.header.payload_len,
        ms = elapsed.as_millis() as u64,
        path,
        "received a model update"
    );
    node.registry
        .add_traffic(want.expect.experiment_id, 0, envelope.header.payload_len);
    Ok(Fetched {
        sender,
        envelope,
        values,
        residues,
    })
}

/// Sends `peer` this node's signed manifest of experiment `id`.
async fn announce_manifest(node: &Node, peer: PeerId, id: &str) {
    if let Some(signed) = node.registry.manifest(id) {
        tracing::debug!(%peer, experiment = %id, "peer does not know the experiment; announcing it");
        let _ = node
            .net
            .request(
                peer,
                Request::Announce(Announcement::Manifest(Box::new(signed))),
            )
            .await;
    }
}

impl From<UpdateError> for FetchError {
    fn from(e: UpdateError) -> Self {
        Self::Invalid {
            reason: e.label(),
            detail: e.to_string(),
        }
    }
}

/// Streams the payload of `envelope` from `peer` and returns the decoded values.
pub async fn download(
    net: &NetworkHandle,
    peer: PeerId,
    envelope: &UpdateEnvelope,
    expect: &UpdateExpectation<'_>,
) -> Result<Vec<f32>, FetchError> {
    assemble(net, peer, envelope, expect)
        .await?
        .finish()
        .map_err(FetchError::from)
}

/// Streams the payload of `envelope` from `peer` into a complete assembler.
async fn assemble(
    net: &NetworkHandle,
    peer: PeerId,
    envelope: &UpdateEnvelope,
    expect: &UpdateExpectation<'_>,
) -> Result<PayloadAssembler, FetchError> {
    let mut assembler =
        PayloadAssembler::new(envelope, expect, Vec::new()).map_err(FetchError::from)?;
    let h = &envelope.header;
    let chunk = u64::from(h.chunk_size);
    let window = window(h.payload_len, chunk);
    let mut attempts = 0;
    while !assembler.is_complete() {
        let mut next = assembler.received();
        let mut in_flight = FuturesOrdered::new();
        let mut failed = None;
        loop {
            while in_flight.len() < window && next < h.payload_len {
                let request = Request::Update(UpdateRequest::Chunk {
                    experiment_id: h.experiment_id.clone(),
                    round: h.round,
                    attempt: h.attempt,
                    offset: next,
                });
                in_flight.push_back(net.request(peer, request));
                next += chunk;
            }
            let Some(answer) = in_flight.next().await else {
                break;
            };
            match answer {
                Ok(Response::Update(UpdateAnswer::Chunk(c))) if c.round == h.round => {
                    assembler
                        .push(c.offset, &c.bytes)
                        .map_err(FetchError::from)?;
                }
                Ok(other) => return Err(FetchError::Protocol(other.describe())),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            attempts += 1;
            if attempts > RESUME_ATTEMPTS || matches!(e, NetError::Shutdown) {
                return Err(e.into());
            }
            tracing::debug!(%peer, offset = assembler.received(), "transfer interrupted, resuming: {e}");
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempts))).await;
        }
    }
    Ok(assembler)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_window_is_an_eighth_of_the_payload_at_most_four_chunks() {
        use super::window;
        assert_eq!(window(1 << 20, 64 << 10), 2);
        assert_eq!(window(8 << 20, 512 << 10), 2);
        assert_eq!(window(64 << 20, 1 << 20), 4);
        assert_eq!(window(10, 16 << 10), 1);
        assert_eq!(window(0, 0), 1);
    }
}
