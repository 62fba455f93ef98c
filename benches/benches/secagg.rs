//! Secure aggregation's cost in a group of 4 on a model of 8M parameters: one member's masked
//! upload (fixed point plus three ChaCha20 mask streams) and the unmasking of the group's
//! four uploads, beside a memcpy of the model's f32 bytes. Bytes: an upload is 8 bytes per
//! weight where an f32 update is 4.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use medmesh_benches::{memcpy, weights};
use medmesh_crypto::Identity;
use medmesh_protocol::secagg::{GroupContext, masked_upload, unmask_mean};

const PARAMS: usize = 8 << 20;
const GROUP: usize = 4;

fn secagg(c: &mut Criterion) {
    let mut group = c.benchmark_group("secagg_8M_group_of_4");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((PARAMS * 4) as u64));
    let ids: Vec<Identity> = (0..GROUP)
        .map(|i| Identity::from_seed(&[i as u8 + 1; 32]))
        .collect();
    let ctx = GroupContext::new([1; 32], 1, ids.iter().map(Identity::public_key).collect())
        .expect("a group of 4");
    let models: Vec<Vec<f32>> = (0..GROUP).map(|i| weights(PARAMS, i as u64)).collect();
    let upload = |i: usize| {
        let secrets: Vec<[u8; 32]> = ctx
            .members
            .iter()
            .map(|k| ids[i].shared_secret(k).map(|s| *s).unwrap_or_default())
            .collect();
        masked_upload(&ctx, i, &models[i], 100.0, |j| ctx.pair_seed(&secrets[j]))
            .expect("weights within range")
    };

    let src: Vec<u8> = models[0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut dst = vec![0u8; src.len()];
    group.bench_function(BenchmarkId::new("memcpy_baseline", PARAMS), |b| {
        b.iter(|| memcpy(&mut dst, &src))
    });
    group.bench_function(BenchmarkId::new("masked_upload", PARAMS), |b| {
        b.iter(|| upload(0))
    });
    let uploads: Vec<Vec<u64>> = (0..GROUP).map(upload).collect();
    let refs: Vec<&[u64]> = uploads.iter().map(Vec::as_slice).collect();
    group.bench_function(BenchmarkId::new("unmask_group_mean", PARAMS), |b| {
        b.iter(|| unmask_mean(&refs, 400.0).expect("equal lengths"))
    });
    group.finish();
}

criterion_group!(benches, secagg);
criterion_main!(benches);
