//! medmesh's segmentation training engine: a 2D or 3D UNet on burn, the data it reads, and the
//! weights path the network and the simulator use.
//!
//! * [`data`]: NIfTI (Medical Segmentation Decathlon layout) and PNG loaders, the synthetic
//!   multi-site generator and the brain-extraction task, slicing and normalization.
//! * [`model`]: the UNet and its seeded initialization.
//! * [`trainer`]: local training rounds and evaluation; [`loss`] and [`metrics`].
//! * [`samples`]: what the trainer draws batches from: 2D slices or 3D patches of volumes.
//! * [`augment`]: nnU-Net-style augmentation of training slices.
//! * [`baselines`]: local-only, pooled, FedAvg and unseen-site baselines.
//! * [`params`]: weights as one flat vector with a stable layout (FedBN selection).
//! * [`checkpoint`] and [`export`]: atomic checkpoints; safetensors export.
//! * [`device`]: the compute device named in configuration.

pub mod allocator;
pub mod atomic_file;
pub mod augment;
pub mod baselines;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod export;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod params;
pub mod samples;
/// The seeded generator lives in `medmesh-protocol`: the round engine draws each round's
/// graph from it, so every site must draw the same numbers.
pub use medmesh_protocol::rng;
pub mod trainer;

pub use device::{DeviceSpec, WgpuAdapter};
pub use trainer::{Evaluation, RoundStats, TrainSettings, Trainer};
