//! A 32 MiB model update between two nodes over loopback, through the whole stack (TCP,
//! pnet, Noise, Yamux, request-response chunks, envelope and hash checks, decode), beside
//! two baselines measured in the same run:
//!
//! * `raw_tcp_baseline`: the same bytes over a plain loopback TCP connection.
//! * `encryption_baseline`: the ciphers alone on the same bytes: pnet's XSalsa20 plus
//!   Noise's ChaCha20-Poly1305 in its 65 519-byte frames (one pass of each, as a sender
//!   does; the receiver does the same work again on its side of the link).
//!
//! Target: the transfer at least half the encryption baseline's throughput.

use std::sync::Arc;
use std::time::Duration;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medmesh_benches::weights;
use medmesh_crypto::Identity;
use medmesh_node::net::{NetEvent, loopback};
use medmesh_node::service::{Served, exchange, inbound};
use medmesh_protocol::envelope::DEFAULT_CHUNK_SIZE;
use medmesh_protocol::{
    DType, ParamLayout, Request, Response, TensorSpec, UpdateEnvelope, UpdateExpectation,
    UpdateHeader, UpdateRequest, WeightEncoding,
};
use salsa20::XSalsa20;
use salsa20::cipher::{KeyIvInit, StreamCipher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PARAMS: usize = 8 << 20; // 8M f32 = 32 MiB
const PORT: u16 = 47_990;

fn header(layout: &ParamLayout, sender: &Identity, digest: [u8; 32]) -> UpdateHeader {
    UpdateHeader {
        experiment_id: "bench".into(),
        manifest_digest: digest,
        round: 1,
        attempt: 0,
        sender: sender.public_key(),
        layout_digest: layout.digest(),
        num_params: layout.num_params(),
        encoding: WeightEncoding::F32,
        sample_weight: 1.0,
        payload_len: 0,
        payload_hash: [0; 32],
        chunk_size: DEFAULT_CHUNK_SIZE,
    }
}

fn transfer(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let layout = ParamLayout {
        tensors: vec![TensorSpec {
            name: "w".into(),
            shape: vec![PARAMS as u64],
            dtype: DType::F32,
        }],
    };
    let values = weights(PARAMS, 1);
    let payload = WeightEncoding::F32.encode(&values);
    let digest = [7u8; 32];
    let (pair, envelope) = rt.block_on(async {
        let mut pair = loopback::connected_pair(PORT).await.expect("loopback pair");
        let envelope = UpdateEnvelope::seal(
            header(&layout, &pair.server_identity, digest),
            &payload,
            &pair.server_identity,
        );
        let served = Arc::new(Served {
            envelope: envelope.clone(),
            payload: payload.clone(),
        });
        let server = pair.server.clone();
        let mut requests =
            std::mem::replace(&mut pair.server_requests, tokio::sync::mpsc::channel(1).1);
        tokio::spawn(async move {
            while let Some(event) = requests.recv().await {
                if let NetEvent::Request {
                    request, channel, ..
                } = event
                {
                    let answer = match *request {
                        Request::Update(UpdateRequest::Chunk { offset, .. }) => {
                            inbound::chunk_of(&served, offset)
                                .unwrap_or_else(|reason| Response::Refused { reason })
                        }
                        _ => Response::Refused {
                            reason: "bench".into(),
                        },
                    };
                    server.respond(channel, answer).await;
                }
            }
        });
        (pair, envelope)
    });
    let (client, server_peer) = (pair.client.clone(), pair.server_peer);

    let mut group = c.benchmark_group("update_transfer_32MiB");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));

    let expect = UpdateExpectation {
        experiment_id: "bench",
        manifest_digest: &digest,
        layout: &layout,
        encoding: WeightEncoding::F32,
    };
    group.bench_function("medmesh_transfer", |b| {
        b.iter(|| {
            rt.block_on(exchange::download(&client, server_peer, &envelope, &expect))
                .expect("transfer")
        })
    });

    let (mut tcp_client, mut tcp_server) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connect = tokio::net::TcpStream::connect(addr);
        let (accepted, connected) = tokio::join!(listener.accept(), connect);
        (connected.expect("connect"), accepted.expect("accept").0)
    });
    let mut received = vec![0u8; payload.len()];
    group.bench_function("raw_tcp_baseline", |b| {
        b.iter(|| {
            rt.block_on(async {
                let send = tcp_server.write_all(&payload);
                let receive = tcp_client.read_exact(&mut received);
                let (sent, got) = tokio::join!(send, receive);
                sent.expect("send");
                got.expect("receive");
            })
        })
    });

    let mut buf = payload.clone();
    let aead = ChaCha20Poly1305::new(&[3u8; 32].into());
    group.bench_function("encryption_baseline", |b| {
        b.iter(|| {
            let mut pnet = XSalsa20::new(&[9u8; 32].into(), &[5u8; 24].into());
            pnet.apply_keystream(&mut buf);
            // Noise frames carry at most 65 535 bytes including the 16-byte tag.
            for (n, frame) in buf.chunks_mut(65_519).enumerate() {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&(n as u64).to_le_bytes());
                aead.encrypt_in_place_detached(Nonce::from_slice(&nonce), b"", frame)
                    .expect("frame encrypts");
            }
        })
    });
    group.finish();
}

criterion_group!(benches, transfer);
criterion_main!(benches);
