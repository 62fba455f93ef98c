//! Weighted averaging of 2 and of 8 models of 8M parameters, beside a memcpy of the bytes
//! the average reads. Target: at least half of memcpy's throughput.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use medmesh_benches::{memcpy, weights};
use medmesh_protocol::averaging::weighted_mean;

const PARAMS: usize = 8 << 20;

fn averaging(c: &mut Criterion) {
    let mut group = c.benchmark_group("weighted_mean_8M");
    group.sample_size(10);
    for k in [2usize, 8] {
        let models: Vec<Vec<f32>> = (0..k).map(|i| weights(PARAMS, i as u64)).collect();
        let input_bytes = (k * PARAMS * 4) as u64;
        group.throughput(Throughput::Bytes(input_bytes));

        let src: Vec<u8> = models.iter().flat_map(|m| bytemuck_bytes(m)).collect();
        let mut dst = vec![0u8; src.len()];
        group.bench_function(BenchmarkId::new("memcpy_baseline", k), |b| {
            b.iter(|| memcpy(&mut dst, &src))
        });

        let inputs: Vec<(&[f32], f64)> = models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.as_slice(), 1.0 + i as f64))
            .collect();
        let mut out = vec![0f32; PARAMS];
        group.bench_function(BenchmarkId::new("weighted_mean", k), |b| {
            b.iter(|| weighted_mean(&inputs, &mut out).expect("equal lengths"))
        });
    }
    group.finish();
}

fn bytemuck_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

criterion_group!(benches, averaging);
criterion_main!(benches);
