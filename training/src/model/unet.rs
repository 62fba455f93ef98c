//! A 2D UNet: `depth` resolution levels of double 3x3 convolutions with normalization,
//! stride-2 convolutions down (as nnU-Net does, instead of max-pooling), transposed
//! convolutions up, skip connections, and a 1x1 head of logits.
//!
//! Why no max-pool: on burn's CPU backend max-pooling with indices and its backward pass took
//! about 45% of a training step (measured with `perf` on the step benchmark); a strided first
//! convolution does the downsampling as part of work the level does anyway.

use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, GroupNorm, GroupNormConfig, PaddingConfig2d, Relu};
use burn::prelude::*;
use medmesh_protocol::manifest::{Manifest, Normalization};

/// Shape of a UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UNetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes (background included).
    pub classes: usize,
    /// Resolution levels (3 to 5).
    pub depth: usize,
    /// Channels at the first level; doubles per level.
    pub base_channels: usize,
    /// Normalization layers.
    pub normalization: Normalization,
}

impl UNetConfig {
    /// The network a manifest asks for.
    pub fn from_manifest(m: &Manifest) -> Self {
        Self {
            in_channels: m.task.channels as usize,
            classes: m.task.classes as usize,
            depth: m.model.depth as usize,
            base_channels: m.model.base_channels as usize,
            normalization: m.model.normalization,
        }
    }

    /// Builds the network (burn's default initialization; see [`super::init`] for seeding).
    pub fn init(&self, device: &Device) -> UNet {
        let width = |level: usize| self.base_channels << level;
        let encoder = (0..self.depth)
            .map(|level| {
                let (input, stride) = if level == 0 {
                    (self.in_channels, 1)
                } else {
                    (width(level - 1), 2)
                };
                DoubleConv::new(input, width(level), stride, self.normalization, device)
            })
            .collect();
        let decoder = (0..self.depth - 1)
            .rev()
            .map(|level| UpBlock {
                up: ConvTranspose2dConfig::new([width(level + 1), width(level)], [2, 2])
                    .with_stride([2, 2])
                    .init(device),
                conv: DoubleConv::new(
                    2 * width(level),
                    width(level),
                    1,
                    self.normalization,
                    device,
                ),
            })
            .collect();
        UNet {
            encoder,
            decoder,
            head: Conv2dConfig::new([width(0), self.classes], [1, 1]).init(device),
        }
    }
}

/// Batch or group normalization.
#[derive(Module, Debug)]
pub enum Norm {
    /// Batch normalization (running statistics).
    Batch(BatchNorm),
    /// Group normalization (no running statistics).
    Group(GroupNorm),
}

impl Norm {
    fn new(channels: usize, kind: Normalization, device: &Device) -> Self {
        match kind {
            Normalization::Batch => Norm::Batch(BatchNormConfig::new(channels).init(device)),
            Normalization::Group => {
                Norm::Group(GroupNormConfig::new((channels / 4).clamp(1, 8), channels).init(device))
            }
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Norm::Batch(n) => n.forward(x),
            Norm::Group(n) => n.forward(x),
        }
    }
}

/// conv3x3 (with `stride`) -> norm -> ReLU -> conv3x3 -> norm -> ReLU.
#[derive(Module, Debug)]
pub struct DoubleConv {
    conv1: Conv2d,
    norm1: Norm,
    conv2: Conv2d,
    norm2: Norm,
    activation: Relu,
}

impl DoubleConv {
    fn new(
        input: usize,
        output: usize,
        stride: usize,
        norm: Normalization,
        device: &Device,
    ) -> Self {
        let conv = |i, o, s| {
            Conv2dConfig::new([i, o], [3, 3])
                .with_stride([s, s])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(device)
        };
        Self {
            conv1: conv(input, output, stride),
            norm1: Norm::new(output, norm, device),
            conv2: conv(output, output, 1),
            norm2: Norm::new(output, norm, device),
            activation: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self
            .activation
            .forward(self.norm1.forward(self.conv1.forward(x)));
        self.activation
            .forward(self.norm2.forward(self.conv2.forward(x)))
    }
}

/// Upsample, concatenate the skip connection, double conv.
#[derive(Module, Debug)]
pub struct UpBlock {
    up: ConvTranspose2d,
    conv: DoubleConv,
}

/// The UNet.
#[derive(Module, Debug)]
pub struct UNet {
    encoder: Vec<DoubleConv>,
    decoder: Vec<UpBlock>,
    head: Conv2d,
}

impl UNet {
    /// Logits `[batch, classes, height, width]` for images `[batch, channels, height, width]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut skips = Vec::with_capacity(self.encoder.len());
        let mut x = x;
        for block in &self.encoder {
            x = block.forward(x);
            skips.push(x.clone());
        }
        skips.pop();
        for block in &self.decoder {
            let skip = skips
                .pop()
                .unwrap_or_else(|| unreachable!("one skip per decoder level"));
            let up = block.up.forward(x);
            x = block.conv.forward(Tensor::cat(vec![up, skip], 1));
        }
        self.head.forward(x)
    }
}
