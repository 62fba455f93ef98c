//! The model-update codec on a 32 MiB update, beside a memcpy of the same bytes.
//!
//! * `encode_hash_sign`: flat f32 weights -> payload bytes -> BLAKE3 -> signed envelope.
//! * `verify_decode`: envelope check (signature, layout, sizes) -> chunks through the
//!   assembler -> hash check -> f32 weights.
//!
//! Target: each at least a third of memcpy's throughput.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use medmesh_benches::{memcpy, weights};
use medmesh_crypto::Identity;
use medmesh_protocol::envelope::{DEFAULT_CHUNK_SIZE, chunks};
use medmesh_protocol::{
    DType, ParamLayout, PayloadAssembler, TensorSpec, UpdateEnvelope, UpdateExpectation,
    UpdateHeader, WeightEncoding,
};

const PARAMS: usize = 8 << 20; // 8M f32 = 32 MiB

fn header(layout: &ParamLayout, sender: &Identity) -> UpdateHeader {
    UpdateHeader {
        experiment_id: "bench".into(),
        manifest_digest: [7; 32],
        round: 1,
        attempt: 0,
        sender: sender.public_key(),
        layout_digest: layout.digest(),
        num_params: layout.num_params(),
        encoding: WeightEncoding::F32,
        sample_weight: 100.0,
        payload_len: 0,
        payload_hash: [0; 32],
        chunk_size: DEFAULT_CHUNK_SIZE,
    }
}

fn codec(c: &mut Criterion) {
    let sender = Identity::from_seed(&[1; 32]);
    let layout = ParamLayout {
        tensors: vec![TensorSpec {
            name: "w".into(),
            shape: vec![PARAMS as u64],
            dtype: DType::F32,
        }],
    };
    let values = weights(PARAMS, 42);
    let bytes = WeightEncoding::F32.encode(&values);
    let mut group = c.benchmark_group("update_codec_32MiB");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.sample_size(20);

    let mut dst = vec![0u8; bytes.len()];
    group.bench_function("memcpy_baseline", |b| b.iter(|| memcpy(&mut dst, &bytes)));

    // The send path: the node keeps one scratch buffer; an f32 payload on a little-endian
    // machine is the weights' own memory and is chunked from there without a copy.
    let mut scratch = Vec::new();
    group.bench_function("encode_hash_sign", |b| {
        b.iter(|| {
            let payload = WeightEncoding::F32.payload(&values, &mut scratch);
            UpdateEnvelope::seal(header(&layout, &sender), payload, &sender)
        })
    });
    let mut scratch = Vec::new();
    group.bench_function("encode_hash_sign_f16", |b| {
        b.iter(|| {
            let mut h = header(&layout, &sender);
            h.encoding = WeightEncoding::F16;
            let payload = WeightEncoding::F16.payload(&values, &mut scratch);
            UpdateEnvelope::seal(h, payload, &sender)
        })
    });

    let envelope = UpdateEnvelope::seal(header(&layout, &sender), &bytes, &sender);
    let digest = [7u8; 32];
    let expect = UpdateExpectation {
        experiment_id: "bench",
        manifest_digest: &digest,
        layout: &layout,
        encoding: WeightEncoding::F32,
    };
    // The receive path: each chunk is hashed and decoded while in cache, into a weight
    // buffer recycled from the previous transfer (as the node does).
    let mut decoded = Vec::with_capacity(PARAMS);
    group.bench_function("verify_decode", |b| {
        b.iter(|| {
            let mut assembler =
                PayloadAssembler::new(&envelope, &expect, std::mem::take(&mut decoded))
                    .expect("valid envelope");
            for (offset, chunk) in chunks(&bytes, envelope.header.chunk_size) {
                assembler.push(offset, chunk).expect("in-order chunk");
            }
            decoded = assembler.finish().expect("intact payload");
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
