//! One UNet training step (forward, Dice+CE loss, backward, Adam) at the reference size:
//! batch 8, 128x128, 1 channel, 2 classes, base 16, depth 4, batch norm. Every backend
//! compiled in is measured in the same run; `benches/reference/unet_step.py` runs the
//! identical step in PyTorch on the same machine for the cross-framework ratio.
//!
//! The 3D UNet (`model.dims = 3`) takes the same step on the same number of voxels: batch 2
//! of 16 x 64 x 64 patches (random crops with foreground oversampling and mirroring, as in
//! training), so its ratio to the 2D step is the cost of the third dimension
//! (`unet_step.py --dims 3` for PyTorch's).
//!
//! `flex-stock` is flex with the kernels burn-flex 0.22.1 ships in place of the ones medmesh's
//! patch adds (convolutions, batch normalization; vendor/burn-flex/PATCH.md): the "before",
//! measured in the same run. Both run with medmesh's malloc settings
//! (`medmesh_training::allocator`), which any `Trainer` applies.
//!
//! `cargo bench -p medmesh-benches --bench training_step [--features ndarray-backend,cpu-jit,cuda,wgpu]`

use burn_flex::ops::stock::use_stock_kernels;
use criterion::{Criterion, criterion_group, criterion_main};
use medmesh_protocol::manifest::{Normalization, Optimizer};
use medmesh_training::data::slices::SliceSet;
use medmesh_training::data::volumes::{VolumeCase, VolumeSet};
use medmesh_training::model::UNetConfig;
use medmesh_training::{DeviceSpec, TrainSettings, Trainer, WgpuAdapter};

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

/// One volume of 24 x 80 x 80 voxels (a little larger than a patch, so crops move).
fn volumes() -> VolumeSet {
    let (d, h, w) = (24, 80, 80);
    let n = d * h * w;
    let image = medmesh_benches::weights(n, 3)
        .iter()
        .map(|v| v * 20.0)
        .collect();
    let label = (0..n)
        .map(|i| u8::from((i % w) > w / 2 && (i / w) % h > h / 3))
        .collect();
    VolumeSet {
        channels: 1,
        patch: [16, 64, 64],
        cases: vec![VolumeCase::new("bench", [d, h, w], image, label)],
    }
}

const DEVICES: [DeviceSpec; 5] = [
    DeviceSpec::Flex,
    DeviceSpec::NdArray,
    DeviceSpec::CpuJit,
    DeviceSpec::Cuda(0),
    DeviceSpec::Wgpu(WgpuAdapter::Best),
];

/// Every device, and flex a second time with burn-flex 0.22.1's own kernels (`flex-stock`,
/// the "before" of medmesh's patch in vendor/burn-flex) in place of medmesh's.
fn variants() -> Vec<(String, DeviceSpec, bool)> {
    let mut all = vec![("flex-stock".to_string(), DeviceSpec::Flex, true)];
    all.extend(DEVICES.map(|spec| (spec.to_string(), spec, false)));
    all
}

fn training_step(c: &mut Criterion) {
    let config = UNetConfig {
        dims: 2,
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
    for (name, spec, stock) in variants() {
        let Ok(device) = spec.device() else { continue };
        // Built and warmed up (allocations, kernel compilation) only when the filter picks
        // it: a GPU backend's warm-up on a software adapter would still be running on both
        // cores while the next backend is measured.
        let mut trainer = None;
        group.bench_function(name, |b| {
            use_stock_kernels(stock);
            let trainer = trainer.get_or_insert_with(|| {
                let mut t = Trainer::with(config, settings.clone(), device.clone());
                t.train_round(&data, |_| {});
                t
            });
            b.iter(|| trainer.train_round(&data, |_| {}));
            use_stock_kernels(false);
        });
    }
    group.finish();

    let volumes = volumes();
    let config = UNetConfig { dims: 3, ..config };
    let settings = TrainSettings {
        batch_size: 2,
        ..settings
    };
    let mut group = c.benchmark_group("unet3d_train_step_b2_16x64x64_base16_depth4");
    group.sample_size(10);
    for (name, spec, stock) in variants() {
        // ndarray's 3D convolutions are too slow to be worth minutes of a bench run.
        if spec == DeviceSpec::NdArray {
            continue;
        }
        let Ok(device) = spec.device() else { continue };
        let mut trainer = None;
        group.bench_function(name, |b| {
            use_stock_kernels(stock);
            let trainer = trainer.get_or_insert_with(|| {
                let mut t = Trainer::with(config, settings.clone(), device.clone());
                t.train_round(&volumes, |_| {});
                t
            });
            b.iter(|| trainer.train_round(&volumes, |_| {}));
            use_stock_kernels(false);
        });
    }
    group.finish();
}

criterion_group!(benches, training_step);
criterion_main!(benches);
