//! The GPU code path without a GPU: burn's wgpu backend, with its real compute kernels, run on
//! a software Vulkan (Mesa's lavapipe, Debian's `mesa-vulkan-drivers`, which `.ci/run`
//! installs) and held against flex from the same seed.
//!
//! `cargo test --workspace` builds the `wgpu` feature (a dev-dependency of `medmesh-node` turns
//! it on), so this runs with the README's test command; `cargo test -p medmesh-training` alone
//! builds without it and skips this file.
#![cfg(feature = "wgpu")]

use burn::tensor::Device;
use medmesh_protocol::Manifest;
use medmesh_training::data::slices::{SliceOptions, SliceSet, slice_cases};
use medmesh_training::data::synthetic::{Preset, generate_site, site_profile};
use medmesh_training::params::Selection;
use medmesh_training::{DeviceSpec, Trainer, WgpuAdapter};

/// Losses of the same steps on flex and on wgpu may differ by float summation order only: at
/// most this much apart, step by step, over the first round (13 steps). Measured: 7e-5.
const LOSS_TOLERANCE: f64 = 1e-3;
/// Rounds of training on each device, the Dice the wgpu-trained model must reach (measured:
/// 0.930), and how far from flex's it may end.
const ROUNDS: u32 = 4;
const DICE: f64 = 0.85;
const DICE_TOLERANCE: f64 = 0.02;

fn software_vulkan() -> Device {
    DeviceSpec::Wgpu(WgpuAdapter::Software)
        .device()
        .unwrap_or_else(|e| {
            panic!(
                "{e}: this test needs a Vulkan driver on the CPU; install Debian's \
                 mesa-vulkan-drivers (.ci/run does)"
            )
        })
}

fn manifest() -> Manifest {
    let mut m = Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap();
    m.averaging.rounds = ROUNDS;
    m
}

fn site() -> (SliceSet, SliceSet) {
    let profile = site_profile(Preset::Iid, 0, 12, 11);
    let cases = generate_site(&profile, 64, 12, 11, 0);
    slice_cases(&cases, &SliceOptions::new([64, 64], 11))
        .unwrap()
        .split(0.2, 11)
}

fn round_losses(trainer: &mut Trainer, data: &SliceSet) -> Vec<f64> {
    let mut losses = Vec::new();
    trainer.train_round(data, |step| losses.push(step.loss));
    losses
}

#[test]
fn wgpu_on_a_software_vulkan_trains_like_flex_from_the_same_seed() {
    let (train, val) = site();
    let m = manifest();
    let mut flex = Trainer::new(&m, Device::flex());
    let mut gpu = Trainer::new(&m, software_vulkan());
    assert_eq!(
        flex.weights(Selection::All),
        gpu.weights(Selection::All),
        "the same seed initializes the same weights on both devices"
    );

    let t0 = std::time::Instant::now();
    let on_flex = round_losses(&mut flex, &train);
    let flex_time = t0.elapsed();
    let t0 = std::time::Instant::now();
    let on_gpu = round_losses(&mut gpu, &train);
    let gpu_time = t0.elapsed();
    eprintln!(
        "round 1, {} steps: flex {flex_time:?}, wgpu on lavapipe {gpu_time:?}",
        on_flex.len()
    );
    let worst = on_flex
        .iter()
        .zip(&on_gpu)
        .enumerate()
        .map(|(step, (a, b))| {
            eprintln!("step {}: flex {a:.6}, wgpu {b:.6}", step + 1);
            (a - b).abs()
        })
        .fold(0.0, f64::max);
    eprintln!("largest loss difference over the round: {worst:.2e}");
    assert_eq!(on_flex.len(), on_gpu.len());
    assert!(
        worst <= LOSS_TOLERANCE,
        "flex and wgpu losses differ by {worst} (flex {on_flex:?}, wgpu {on_gpu:?})"
    );

    // The rest of the schedule: the GPU-trained model segments, as well as flex's does.
    for _ in 1..ROUNDS {
        flex.train_round(&train, |_| {});
        gpu.train_round(&train, |_| {});
    }
    let (on_flex, on_gpu) = (flex.evaluate(&val).mean_dice, gpu.evaluate(&val).mean_dice);
    eprintln!("after {ROUNDS} rounds: validation Dice flex {on_flex:.4}, wgpu {on_gpu:.4}");
    assert!(
        on_gpu >= DICE,
        "validation Dice {on_gpu:.4} after {ROUNDS} rounds on wgpu"
    );
    assert!(
        (on_gpu - on_flex).abs() <= DICE_TOLERANCE,
        "wgpu Dice {on_gpu:.4}, flex {on_flex:.4}"
    );
}
