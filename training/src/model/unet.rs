//! A 2D or 3D UNet: `depth` resolution levels of double 3x3 (3x3x3) convolutions with
//! normalization, stride-2 convolutions down (as nnU-Net does, instead of max-pooling),
//! transposed convolutions up, skip connections, and a 1x1 head of logits. One network
//! definition serves both: each convolution is a 2D or a 3D layer, chosen by `dims`, and
//! feature maps carry their rank ([`Feature`]).
//!
//! Why no max-pool: on burn's CPU backend max-pooling with indices and its backward pass took
//! about 45% of a training step (measured with `perf` on the step benchmark); a strided first
//! convolution does the downsampling as part of work the level does anyway.

use burn::nn::conv::{
    Conv2d, Conv2dConfig, Conv3d, Conv3dConfig, ConvTranspose2d, ConvTranspose2dConfig,
    ConvTranspose3d, ConvTranspose3dConfig,
};
use burn::nn::{
    BatchNorm, BatchNormConfig, GroupNorm, GroupNormConfig, PaddingConfig2d, PaddingConfig3d, Relu,
};
use burn::prelude::*;
use medmesh_protocol::manifest::{Manifest, Normalization};

/// Shape of a UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UNetConfig {
    /// 2 (slices) or 3 (patches).
    pub dims: usize,
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
            dims: m.model.dims as usize,
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
                DoubleConv::new(self, input, width(level), stride, device)
            })
            .collect();
        let decoder = (0..self.depth - 1)
            .rev()
            .map(|level| UpBlock {
                up: UpConv::new(self.dims, width(level + 1), width(level), device),
                conv: DoubleConv::new(self, 2 * width(level), width(level), 1, device),
            })
            .collect();
        UNet {
            encoder,
            decoder,
            head: Conv::new(self.dims, width(0), self.classes, 1, 1, device),
        }
    }
}

/// A feature map: `[batch, channels, height, width]` in a 2D network,
/// `[batch, channels, depth, height, width]` in a 3D one.
#[derive(Debug, Clone)]
pub enum Feature {
    /// Of a 2D network.
    Planar(Tensor<4>),
    /// Of a 3D network.
    Volumetric(Tensor<5>),
}

impl Feature {
    /// Applies a rank-generic layer (normalization, activation).
    fn map(
        self,
        planar: impl FnOnce(Tensor<4>) -> Tensor<4>,
        volumetric: impl FnOnce(Tensor<5>) -> Tensor<5>,
    ) -> Self {
        match self {
            Feature::Planar(x) => Feature::Planar(planar(x)),
            Feature::Volumetric(x) => Feature::Volumetric(volumetric(x)),
        }
    }

    fn dims(&self) -> usize {
        match self {
            Feature::Planar(_) => 2,
            Feature::Volumetric(_) => 3,
        }
    }
}

fn mismatch(layer: usize, input: usize) -> ! {
    unreachable!(
        "a {input}D feature map reached a {layer}D layer: networks and batches are built from the same manifest"
    )
}

/// A 2D or 3D convolution.
#[derive(Module, Debug)]
pub enum Conv {
    /// 2D.
    Planar(Conv2d),
    /// 3D.
    Volumetric(Conv3d),
}

impl Conv {
    /// A `kernel`-wide convolution (padding keeps the size at stride 1), without bias unless
    /// it is the 1-wide head.
    fn new(
        dims: usize,
        input: usize,
        output: usize,
        kernel: usize,
        stride: usize,
        device: &Device,
    ) -> Self {
        let pad = kernel / 2;
        let bias = kernel == 1;
        if dims == 3 {
            Conv::Volumetric(
                Conv3dConfig::new([input, output], [kernel; 3])
                    .with_stride([stride; 3])
                    .with_padding(PaddingConfig3d::Explicit(pad, pad, pad))
                    .with_bias(bias)
                    .init(device),
            )
        } else {
            Conv::Planar(
                Conv2dConfig::new([input, output], [kernel; 2])
                    .with_stride([stride; 2])
                    .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                    .with_bias(bias)
                    .init(device),
            )
        }
    }

    fn forward(&self, x: Feature) -> Feature {
        match (self, x) {
            (Conv::Planar(c), Feature::Planar(x)) => Feature::Planar(c.forward(x)),
            (Conv::Volumetric(c), Feature::Volumetric(x)) => Feature::Volumetric(c.forward(x)),
            (c, x) => mismatch(c.dims(), x.dims()),
        }
    }

    fn dims(&self) -> usize {
        match self {
            Conv::Planar(_) => 2,
            Conv::Volumetric(_) => 3,
        }
    }
}

/// A 2D or 3D stride-2 transposed convolution (doubles each side).
#[derive(Module, Debug)]
pub enum UpConv {
    /// 2D.
    Planar(ConvTranspose2d),
    /// 3D.
    Volumetric(ConvTranspose3d),
}

impl UpConv {
    fn new(dims: usize, input: usize, output: usize, device: &Device) -> Self {
        if dims == 3 {
            UpConv::Volumetric(
                ConvTranspose3dConfig::new([input, output], [2; 3])
                    .with_stride([2; 3])
                    .init(device),
            )
        } else {
            UpConv::Planar(
                ConvTranspose2dConfig::new([input, output], [2; 2])
                    .with_stride([2; 2])
                    .init(device),
            )
        }
    }

    fn forward(&self, x: Feature) -> Feature {
        match (self, x) {
            (UpConv::Planar(c), Feature::Planar(x)) => Feature::Planar(c.forward(x)),
            (UpConv::Volumetric(c), Feature::Volumetric(x)) => Feature::Volumetric(c.forward(x)),
            (UpConv::Planar(_), x) => mismatch(2, x.dims()),
            (UpConv::Volumetric(_), x) => mismatch(3, x.dims()),
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

    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Norm::Batch(n) => n.forward(x),
            Norm::Group(n) => n.forward(x),
        }
    }

    fn forward_feature(&self, x: Feature) -> Feature {
        x.map(|x| self.forward(x), |x| self.forward(x))
    }
}

/// conv3x3 (with `stride`) -> norm -> ReLU -> conv3x3 -> norm -> ReLU.
#[derive(Module, Debug)]
pub struct DoubleConv {
    conv1: Conv,
    norm1: Norm,
    conv2: Conv,
    norm2: Norm,
    activation: Relu,
}

impl DoubleConv {
    fn new(
        config: &UNetConfig,
        input: usize,
        output: usize,
        stride: usize,
        device: &Device,
    ) -> Self {
        let (dims, norm) = (config.dims, config.normalization);
        Self {
            conv1: Conv::new(dims, input, output, 3, stride, device),
            norm1: Norm::new(output, norm, device),
            conv2: Conv::new(dims, output, output, 3, 1, device),
            norm2: Norm::new(output, norm, device),
            activation: Relu::new(),
        }
    }

    fn relu(&self, x: Feature) -> Feature {
        x.map(
            |x| self.activation.forward(x),
            |x| self.activation.forward(x),
        )
    }

    fn forward(&self, x: Feature) -> Feature {
        let x = self.relu(self.norm1.forward_feature(self.conv1.forward(x)));
        self.relu(self.norm2.forward_feature(self.conv2.forward(x)))
    }
}

/// Upsample, concatenate the skip connection, double conv.
#[derive(Module, Debug)]
pub struct UpBlock {
    up: UpConv,
    conv: DoubleConv,
}

/// The UNet.
#[derive(Module, Debug)]
pub struct UNet {
    encoder: Vec<DoubleConv>,
    decoder: Vec<UpBlock>,
    head: Conv,
}

impl UNet {
    /// 2 or 3.
    pub fn dims(&self) -> usize {
        self.head.dims()
    }

    /// Logits `[batch, classes, height, width]` for images `[batch, channels, height, width]`
    /// (a 2D network).
    ///
    /// # Panics
    /// If the network is 3D.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self.forward_feature(Feature::Planar(x)) {
            Feature::Planar(y) => y,
            Feature::Volumetric(_) => mismatch(2, 3),
        }
    }

    /// Logits `[batch, classes, depth, height, width]` for patches
    /// `[batch, channels, depth, height, width]` (a 3D network).
    ///
    /// # Panics
    /// If the network is 2D.
    pub fn forward_volume(&self, x: Tensor<5>) -> Tensor<5> {
        match self.forward_feature(Feature::Volumetric(x)) {
            Feature::Volumetric(y) => y,
            Feature::Planar(_) => mismatch(3, 2),
        }
    }

    /// Logits for a feature map of the network's rank.
    pub fn forward_feature(&self, x: Feature) -> Feature {
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
            let joined = match (up, skip) {
                (Feature::Planar(u), Feature::Planar(s)) => {
                    Feature::Planar(Tensor::cat(vec![u, s], 1))
                }
                (Feature::Volumetric(u), Feature::Volumetric(s)) => {
                    Feature::Volumetric(Tensor::cat(vec![u, s], 1))
                }
                (u, s) => mismatch(u.dims(), s.dims()),
            };
            x = block.conv.forward(joined);
        }
        self.head.forward(x)
    }
}
