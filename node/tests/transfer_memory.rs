//! Heap used by model transfers, measured with a counting allocator: one member serves its
//! update to four downloads at once over the real private transport (both ends in this
//! process), as a node does in a round with four peers.
//!
//! What a transfer must hold is the model it delivers, decoded. Everything else (chunks in
//! flight, frames, the sender's side) must stay within three model sizes: no payload is
//! buffered whole, no per-peer copy of the served model. What is in flight is a few copies of
//! each chunk (sender's slice, frames, receiver's buffer); senders cut small models into small
//! chunks and receivers keep at most an eighth of a payload (and 4 chunks) in flight, so this
//! stays a fraction of the model at every size.

// A global allocator is an unsafe trait; this one forwards to `System` and counts.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use medmesh_node::net::{NetEvent, loopback};
use medmesh_node::service::{Served, exchange, inbound};
use medmesh_protocol::envelope::chunk_size_for;
use medmesh_protocol::{
    DType, ParamLayout, Request, Response, TensorSpec, UpdateEnvelope, UpdateExpectation,
    UpdateHeader, UpdateRequest, WeightEncoding,
};

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const DOWNLOADS: usize = 4;
const MIB: f64 = (1 << 20) as f64;

/// A 1 MiB model (the demo's UNet is about that size) and a 32 MiB one (a real 2D UNet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_hold_little_beyond_the_models_they_deliver() {
    for (port, params) in [(20400, 1 << 18), (20401, 8 << 20)] {
        let ratio = measure(port, params).await;
        assert!(
            ratio <= 3.0,
            "transfers of a {params}-weight model held {ratio:.2} model sizes beyond the \
             models they delivered"
        );
    }
}

/// Peak heap of [`DOWNLOADS`] concurrent downloads beyond the models they deliver, in
/// model sizes.
async fn measure(port: u16, params: usize) -> f64 {
    let mut pair = loopback::connected_pair(port).await.unwrap();
    let layout = ParamLayout {
        tensors: vec![TensorSpec {
            name: "w".into(),
            shape: vec![params as u64],
            dtype: DType::F32,
        }],
    };
    let values: Vec<f32> = (0..params).map(|i| (i as f32 * 1e-3).sin()).collect();
    let payload = WeightEncoding::F32.encode(&values);
    let model_bytes = payload.len();
    drop(values);
    let digest = [5u8; 32];
    let header = UpdateHeader {
        experiment_id: "mem".into(),
        manifest_digest: digest,
        round: 1,
        attempt: 0,
        sender: pair.server_identity.public_key(),
        layout_digest: layout.digest(),
        num_params: layout.num_params(),
        encoding: WeightEncoding::F32,
        sample_weight: 1.0,
        payload_len: 0,
        payload_hash: [0; 32],
        chunk_size: chunk_size_for(payload.len() as u64),
    };
    let envelope = UpdateEnvelope::seal(header, &payload, &pair.server_identity);
    let served = Arc::new(Served {
        envelope: envelope.clone(),
        payload,
    });
    // The serving side answers each request in its own task, as a node does.
    let server = pair.server.clone();
    tokio::spawn(async move {
        while let Some(event) = pair.server_requests.recv().await {
            let NetEvent::Request {
                request, channel, ..
            } = event
            else {
                continue;
            };
            let (served, server) = (served.clone(), server.clone());
            tokio::spawn(async move {
                let answer = match *request {
                    Request::Update(UpdateRequest::Chunk { offset, .. }) => {
                        inbound::chunk_of(&served, offset)
                            .unwrap_or_else(|reason| Response::Refused { reason })
                    }
                    _ => Response::Refused {
                        reason: "unexpected".into(),
                    },
                };
                server.respond(channel, answer).await;
            });
        }
    });
    let expect = UpdateExpectation {
        experiment_id: "mem",
        manifest_digest: &digest,
        layout: &layout,
        encoding: WeightEncoding::F32,
    };
    // Warm up connections and buffers, then measure from here.
    exchange::download(&pair.client, pair.server_peer, &envelope, &expect)
        .await
        .unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);

    let downloads = (0..DOWNLOADS)
        .map(|_| exchange::download(&pair.client, pair.server_peer, &envelope, &expect));
    let models: Vec<Vec<f32>> = futures::future::join_all(downloads)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();

    let peak = PEAK.load(Ordering::Relaxed) - before;
    let delivered = DOWNLOADS * model_bytes;
    let overhead = peak.saturating_sub(delivered);
    eprintln!(
        "{DOWNLOADS} concurrent downloads of a {:.0} MiB model: peak heap +{:.1} MiB = \
         {:.0} MiB delivered + {:.1} MiB in flight ({:.2} model sizes)",
        model_bytes as f64 / MIB,
        peak as f64 / MIB,
        delivered as f64 / MIB,
        overhead as f64 / MIB,
        overhead as f64 / model_bytes as f64,
    );
    assert_eq!(models.len(), DOWNLOADS);
    assert!(models.iter().all(|m| m.len() == params));
    // Buffering each payload whole, or copying the served model per peer, would each add
    // four model sizes here.
    overhead as f64 / model_bytes as f64
}
