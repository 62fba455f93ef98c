//! One UNet training step (forward, Dice+CE loss, backward, Adam) at the reference size:
//! batch 8, 128x128, 1 channel, 2 classes, base 16, depth 4, batch norm. Every backend
//! compiled in is measured in the same run; `benches/reference/unet_step.py` runs the
//! identical step in PyTorch on the same machine for the cross-framework ratio.
//!
//! `cargo bench -p medmesh-benches --bench training_step [--features ndarray-backend,cpu-jit,cuda,wgpu]`

use criterion::{Criterion, criterion_group, criterion_main};
use medmesh_protocol::manifest::{Normalization, Optimizer};
use medmesh_training::data::slices::SliceSet;
use medmesh_training::model::UNetConfig;
use medmesh_training::{DeviceSpec, TrainSettings, Trainer};

fn batch() -> SliceSet {
    let (h, w, n) = (128, 128, 8);
    let images = medmesh_benches::weights(n * h * w, 3)
        .iter()
        .map(|v| v * 20.0)
        .collect();
    let labels = (0..n * h * w)
        .map(|i| u8::from((i % w) > w / 2 && (i / w) % h > h / 3))
        .collect();
    SliceSet::from_memory([1, h, w], images, labels, vec![0; n], vec!["bench".into()])
}

fn training_step(c: &mut Criterion) {
    let config = UNetConfig {
        in_channels: 1,
        classes: 2,
        depth: 4,
        base_channels: 16,
        normalization: Normalization::Batch,
    };
    let settings = TrainSettings {
        learning_rate: 1e-3,
        batch_size: 8,
        local_epochs: None,
        local_steps: Some(1),
        seed: 1,
        optimizer: Optimizer::Adam,
        weight_decay: None,
        grad_clip: None,
        rounds: 1_000_000,
        proximal_mu: None,
        augmentation: None,
    };
    let data = batch();
    let mut group = c.benchmark_group("unet_train_step_b8_128px_base16_depth4");
    group.sample_size(10);
    for spec in [
        DeviceSpec::Flex,
        DeviceSpec::NdArray,
        DeviceSpec::CpuJit,
        DeviceSpec::Cuda(0),
        DeviceSpec::Wgpu,
    ] {
        let Ok(device) = spec.device() else { continue };
        let mut trainer = Trainer::with(config, settings.clone(), device);
        trainer.train_round(&data, |_| {}); // warm up (allocations, kernel compilation)
        group.bench_function(spec.to_string(), |b| {
            b.iter(|| trainer.train_round(&data, |_| {}))
        });
    }
    group.finish();
}

criterion_group!(benches, training_step);
criterion_main!(benches);
