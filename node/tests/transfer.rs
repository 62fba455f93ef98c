//! Model updates between two members on the real private transport: resumption after
//! dropped chunks, and detection of tampered or truncated payloads.

use std::collections::HashSet;
use std::sync::Arc;

use medmesh_node::net::{NetEvent, loopback};
use medmesh_node::service::exchange::{self, FetchError};
use medmesh_node::service::{Served, inbound};
use medmesh_protocol::envelope::DEFAULT_CHUNK_SIZE;
use medmesh_protocol::messages::UpdateChunk;
use medmesh_protocol::{
    DType, ParamLayout, Request, Response, TensorSpec, UpdateAnswer, UpdateEnvelope,
    UpdateExpectation, UpdateHeader, UpdateRequest, WeightEncoding,
};

const PARAMS: usize = 1_500_000; // 6 MB: six chunks

fn layout() -> ParamLayout {
    ParamLayout {
        tensors: vec![TensorSpec {
            name: "w".into(),
            shape: vec![PARAMS as u64],
            dtype: DType::F32,
        }],
    }
}

/// How the server misbehaves on a chunk request (by offset), once per offset.
#[derive(Clone, Copy)]
enum Fault {
    /// Never answer (the stream closes under the requester).
    Drop,
    /// Answer with one bit flipped.
    FlipBit,
    /// Answer with the chunk's last byte missing.
    Truncate,
}

/// Serves an update with `faults`, downloads it, and returns the result.
async fn fetch_with(port: u16, faults: Vec<(u64, Fault)>) -> Result<Vec<f32>, FetchError> {
    let mut pair = loopback::connected_pair(port).await.unwrap();
    let values: Vec<f32> = (0..PARAMS).map(|i| (i as f32).sin()).collect();
    let payload = WeightEncoding::F32.encode(&values);
    let layout = layout();
    let digest = [3u8; 32];
    let header = UpdateHeader {
        experiment_id: "t".into(),
        manifest_digest: digest,
        round: 2,
        attempt: 0,
        sender: pair.server_identity.public_key(),
        layout_digest: layout.digest(),
        num_params: layout.num_params(),
        encoding: WeightEncoding::F32,
        sample_weight: 1.0,
        payload_len: 0,
        payload_hash: [0; 32],
        chunk_size: DEFAULT_CHUNK_SIZE,
    };
    let envelope = UpdateEnvelope::seal(header, &payload, &pair.server_identity);
    let served = Arc::new(Served {
        envelope: envelope.clone(),
        payload,
    });
    let server = pair.server.clone();
    tokio::spawn(async move {
        let mut done = HashSet::new();
        while let Some(event) = pair.server_requests.recv().await {
            let NetEvent::Request {
                request, channel, ..
            } = event
            else {
                continue;
            };
            let Request::Update(UpdateRequest::Chunk { offset, .. }) = *request else {
                continue;
            };
            let fault = faults
                .iter()
                .find(|(o, _)| *o == offset)
                .map(|(_, f)| *f)
                .filter(|_| done.insert(offset));
            let mut answer = inbound::chunk_of(&served, offset).unwrap();
            match (fault, &mut answer) {
                (Some(Fault::Drop), _) => {
                    drop(channel);
                    continue;
                }
                (
                    Some(Fault::FlipBit),
                    Response::Update(UpdateAnswer::Chunk(UpdateChunk { bytes, .. })),
                ) => {
                    bytes[100] ^= 1;
                }
                (
                    Some(Fault::Truncate),
                    Response::Update(UpdateAnswer::Chunk(UpdateChunk { bytes, .. })),
                ) => {
                    bytes.pop();
                }
                _ => {}
            }
            server.respond(channel, answer).await;
        }
    });
    let expect = UpdateExpectation {
        experiment_id: "t",
        manifest_digest: &digest,
        layout: &layout,
        encoding: WeightEncoding::F32,
    };
    exchange::download(&pair.client, pair.server_peer, &envelope, &expect).await
}

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_resumes_after_dropped_chunks() {
    let got = fetch_with(18400, vec![(MIB, Fault::Drop), (3 * MIB, Fault::Drop)])
        .await
        .unwrap();
    let expected: Vec<f32> = (0..PARAMS).map(|i| (i as f32).sin()).collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_fails_the_hash_check() {
    let err = fetch_with(18401, vec![(2 * MIB, Fault::FlipBit)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            FetchError::Invalid {
                reason: "hash_mismatch",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_chunk_is_refused() {
    let err = fetch_with(18402, vec![(0, Fault::Truncate)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Invalid {
                reason: "chunk_out_of_place",
                ..
            }
        ),
        "{err}"
    );
}

/// A node entering a round closes connections its round does not need, but not one carrying
/// a request: a peer a round ahead may be asking for this node's next model right then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_change_keeps_a_connection_that_carries_a_request() {
    let mut pair = loopback::connected_pair(18403).await.unwrap();
    let client = pair.client.clone();
    let server_peer = pair.server_peer;
    let asked = tokio::spawn(async move {
        let query = Request::Update(UpdateRequest::Exchange {
            experiment_id: "t".into(),
            round: 4,
        });
        client.request_once(server_peer, query).await
    });
    let (peer, channel) = loop {
        match pair.server_requests.recv().await {
            Some(NetEvent::Request { peer, channel, .. }) => break (peer, channel),
            Some(_) => {}
            None => panic!("no request arrived"),
        }
    };
    // The server's next round wants neither this peer nor anyone: the question is pending.
    pair.server.want(Vec::new()).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(pair.server.connected_nodes().await, vec![peer]);
    let answer = Response::Refused {
        reason: "late".into(),
    };
    pair.server.respond(channel, answer.clone()).await;
    assert_eq!(asked.await.unwrap().unwrap(), answer);
    // Answered, the connection is no longer needed: the next round change closes it.
    pair.server.want(Vec::new()).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !pair.server.connected_nodes().await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "still connected");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
