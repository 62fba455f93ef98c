//! medmesh addition (see `PATCH.md`): batch normalization in training mode, forward and backward,
//! as two passes over each channel.
//!
//! burn-backend's default builds both out of tensor operations: each swaps the batch and channel
//! axes (a copy), reduces, and broadcasts back, about a dozen passes over the activations for the
//! forward pass and as many for the backward one. Here the statistics of one channel come from
//! one pass over its `batch` contiguous runs, and the output (or the input gradient) from a
//! second. Channels run in parallel; sums run in eight f32 lanes per run and in f64 across runs,
//! in a fixed order, so results do not depend on the thread count.
//!
//! The formulas are the default's: biased variance; `x_grad = gamma * inv_std * (dy - mean(dy)
//! - x_hat * mean(dy * x_hat))`. f16 and bf16 go through f32.

use alloc::vec;
use alloc::vec::Vec;

use burn_backend::DType;
use burn_std::{Bytes, Shape, bf16, f16};

use crate::{FlexTensor, Layout};

/// The element types computed natively.
trait Real:
    Copy
    + Send
    + Sync
    + bytemuck::Pod
    + burn_std::Element
    + core::ops::Add<Output = Self>
    + core::ops::Sub<Output = Self>
    + core::ops::Mul<Output = Self>
{
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    /// Sum of `f(v)` over a run, in eight lanes.
    fn lanes_sum(run: &[Self], f: impl Fn(Self) -> Self) -> f64;
}

macro_rules! real {
    ($t:ty, $dtype:expr) => {
        impl Real for $t {
            const DTYPE: DType = $dtype;
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn lanes_sum(run: &[Self], f: impl Fn(Self) -> Self) -> f64 {
                let mut lanes = [0.0 as $t; 8];
                let chunks = run.chunks_exact(8);
                let tail = chunks.remainder();
                for chunk in chunks {
                    for (l, &v) in lanes.iter_mut().zip(chunk) {
                        *l += f(v);
                    }
                }
                let mut total: f64 = lanes.iter().map(|&l| l as f64).sum();
                for &v in tail {
                    total += f(v) as f64;
                }
                total
            }
        }
    };
}
real!(f32, DType::F32);
real!(f64, DType::F64);

/// A raw pointer that rayon workers share; each writes its own channel's runs.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// `[batch, channels, plane]` of a tensor shaped `[batch, channels, ...]`.
fn dims(t: &FlexTensor) -> (usize, usize, usize) {
    let s = t.layout().shape();
    (s[0], s[1], s[2..].iter().product())
}

fn tensor<T: Real>(data: Vec<T>, shape: Shape) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(shape), T::DTYPE)
}

/// Calls `f(channel, run)` for every run of `batch` runs of a channel, in batch order.
#[inline(always)]
fn runs<T>(
    data: &[T],
    (batch, channels, plane): (usize, usize, usize),
    c: usize,
) -> impl Iterator<Item = &[T]> {
    (0..batch).map(move |b| &data[(b * channels + c) * plane..][..plane])
}

fn for_channels(channels: usize, f: impl Fn(usize) + Send + Sync) {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        (0..channels).into_par_iter().for_each(f);
    }
    #[cfg(not(feature = "rayon"))]
    (0..channels).for_each(f);
}

/// Normalizes channel `c` into `out` (the whole output's pointer); returns its mean and biased
/// variance. Compiled for each SIMD level, as the stock kernels are.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(feature = "simd", macerator::with_simd)]
fn train_channel<#[cfg(feature = "simd")] S: macerator::Simd, T: Real>(
    xs: &[T],
    shape: (usize, usize, usize),
    c: usize,
    gamma: T,
    beta: T,
    epsilon: f64,
    out: *mut T,
) -> (f64, f64) {
    let (batch, channels, plane) = shape;
    let count = (batch * plane) as f64;
    let mean = runs(xs, shape, c)
        .map(|r| T::lanes_sum(r, |v| v))
        .sum::<f64>()
        / count;
    let m = T::from_f64(mean);
    let var = runs(xs, shape, c)
        .map(|r| {
            T::lanes_sum(r, |v| {
                let d = v - m;
                d * d
            })
        })
        .sum::<f64>()
        / count;
    let scale = T::from_f64(gamma.to_f64() / (var + epsilon).sqrt());
    for b in 0..batch {
        let at = (b * channels + c) * plane;
        // SAFETY: the caller hands each channel to one worker; its runs are written here only.
        let o = unsafe { core::slice::from_raw_parts_mut(out.add(at), plane) };
        for (o, &v) in o.iter_mut().zip(&xs[at..at + plane]) {
            *o = (v - m) * scale + beta;
        }
    }
    (mean, var)
}

/// Writes channel `c` of the input gradient into `dx` (the whole gradient's pointer); returns the
/// gradients of gamma and beta.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(feature = "simd", macerator::with_simd)]
fn backward_channel<#[cfg(feature = "simd")] S: macerator::Simd, T: Real>(
    xs: &[T],
    ys: &[T],
    shape: (usize, usize, usize),
    c: usize,
    gamma: T,
    stats: (f64, f64),
    epsilon: f64,
    dx: *mut T,
) -> (f64, f64) {
    let (mean, variance) = stats;
    let (batch, channels, plane) = shape;
    let count = (batch * plane) as f64;
    let inv_std = 1.0 / (variance + epsilon).sqrt();
    let m = T::from_f64(mean);
    // Σ dy and Σ dy (x - mean); x_hat = (x - mean) * inv_std.
    let (mut sum_dy, mut sum_dy_xc) = (0.0f64, 0.0f64);
    for b in 0..batch {
        let at = (b * channels + c) * plane;
        let (xr, yr) = (&xs[at..at + plane], &ys[at..at + plane]);
        sum_dy += T::lanes_sum(yr, |v| v);
        let mut acc = [T::from_f64(0.0); 8];
        let (xc, yc) = (xr.chunks_exact(8), yr.chunks_exact(8));
        let (xt, yt) = (xc.remainder(), yc.remainder());
        for (xv, yv) in xc.zip(yc) {
            for i in 0..8 {
                acc[i] = acc[i] + yv[i] * (xv[i] - m);
            }
        }
        sum_dy_xc += acc.iter().map(|a| a.to_f64()).sum::<f64>();
        for (&xv, &yv) in xt.iter().zip(yt) {
            sum_dy_xc += (yv * (xv - m)).to_f64();
        }
    }
    // dx = gamma * inv_std * (dy - Σdy/n - x_hat * Σ(dy x_hat)/n)
    //    = k * dy - k * p * (x - mean) - k * Σdy/n, with k = gamma * inv_std and
    //    p = Σ(dy (x - mean)) * inv_std² / n.
    let k = gamma.to_f64() * inv_std;
    let p = sum_dy_xc * inv_std * inv_std / count;
    let (k_t, kp) = (T::from_f64(k), T::from_f64(k * p));
    let offset = T::from_f64(k * sum_dy / count);
    for b in 0..batch {
        let at = (b * channels + c) * plane;
        // SAFETY: the caller hands each channel to one worker; its runs are written here only.
        let o = unsafe { core::slice::from_raw_parts_mut(dx.add(at), plane) };
        for ((o, &xv), &yv) in o
            .iter_mut()
            .zip(&xs[at..at + plane])
            .zip(&ys[at..at + plane])
        {
            *o = k_t * yv - kp * (xv - m) - offset;
        }
    }
    (sum_dy_xc * inv_std, sum_dy)
}

fn train_typed<T: Real>(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    epsilon: f64,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let x = x.to_contiguous();
    let (gamma, beta) = (gamma.to_contiguous(), beta.to_contiguous());
    let shape = dims(&x);
    let channels = shape.1;
    let (xs, gs, bs) = (x.storage::<T>(), gamma.storage::<T>(), beta.storage::<T>());
    let mut out = vec![T::from_f64(0.0); xs.len()];
    let mut stats = vec![(0.0f64, 0.0f64); channels];
    let (dst, stat) = (Shared(out.as_mut_ptr()), Shared(stats.as_mut_ptr()));
    for_channels(channels, |c| {
        let (dst, stat) = (dst, stat);
        let (g, beta) = (gs[c], bs[c]);
        let stats = train_channel(xs, shape, c, g, beta, epsilon, dst.0);
        // SAFETY: one slot per channel.
        unsafe { *stat.0.add(c) = stats };
    });
    let mean = stats.iter().map(|s| T::from_f64(s.0)).collect();
    let var = stats.iter().map(|s| T::from_f64(s.1)).collect();
    let per_channel = Shape::from(vec![channels]);
    (
        tensor(out, x.layout().shape().clone()),
        tensor(mean, per_channel.clone()),
        tensor(var, per_channel),
    )
}

fn backward_typed<T: Real>(
    x: &FlexTensor,
    gamma: &FlexTensor,
    mean: &FlexTensor,
    variance: &FlexTensor,
    epsilon: f64,
    dy: &FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let (x, dy) = (x.to_contiguous(), dy.to_contiguous());
    let (gamma, mean, variance) = (
        gamma.to_contiguous(),
        mean.to_contiguous(),
        variance.to_contiguous(),
    );
    let shape = dims(&x);
    let channels = shape.1;
    let (xs, ys) = (x.storage::<T>(), dy.storage::<T>());
    let (gs, ms, vs) = (
        gamma.storage::<T>(),
        mean.storage::<T>(),
        variance.storage::<T>(),
    );
    let mut dx = vec![T::from_f64(0.0); xs.len()];
    let mut grads = vec![(0.0f64, 0.0f64); channels];
    let (dst, grad) = (Shared(dx.as_mut_ptr()), Shared(grads.as_mut_ptr()));
    for_channels(channels, |c| {
        let (dst, grad) = (dst, grad);
        let stats = (ms[c].to_f64(), vs[c].to_f64());
        let grads = backward_channel(xs, ys, shape, c, gs[c], stats, epsilon, dst.0);
        // SAFETY: one slot per channel.
        unsafe { *grad.0.add(c) = grads };
    });
    let per_channel = Shape::from(vec![channels]);
    (
        tensor(dx, x.layout().shape().clone()),
        tensor(
            grads.iter().map(|g| T::from_f64(g.0)).collect(),
            per_channel.clone(),
        ),
        tensor(
            grads.iter().map(|g| T::from_f64(g.1)).collect(),
            per_channel,
        ),
    )
}

fn up(t: &FlexTensor) -> FlexTensor {
    match t.dtype() {
        DType::F16 => super::module::cast_to_f32(t.clone(), f16::to_f32),
        DType::BF16 => super::module::cast_to_f32(t.clone(), bf16::to_f32),
        _ => t.clone(),
    }
}

fn down(t: FlexTensor, dtype: DType) -> FlexTensor {
    match dtype {
        DType::F16 => super::module::cast_from_f32(t, f16::from_f32),
        DType::BF16 => super::module::cast_from_f32(t, bf16::from_f32),
        _ => t,
    }
}

/// Normalized output, batch mean and biased batch variance.
pub(crate) fn train(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    epsilon: f64,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let dtype = x.dtype();
    let (o, m, v) = match dtype {
        DType::F64 => train_typed::<f64>(&x, &gamma, &beta, epsilon),
        DType::F32 | DType::F16 | DType::BF16 => {
            train_typed::<f32>(&up(&x), &up(&gamma), &up(&beta), epsilon)
        }
        other => panic!("batch_norm_train: unsupported dtype {other:?}"),
    };
    (down(o, dtype), down(m, dtype), down(v, dtype))
}

/// Gradients of the input, `gamma` and `beta`.
pub(crate) fn backward(
    x: FlexTensor,
    gamma: FlexTensor,
    mean: FlexTensor,
    variance: FlexTensor,
    epsilon: f64,
    dy: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let dtype = x.dtype();
    let (dx, dg, db) = match dtype {
        DType::F64 => backward_typed::<f64>(&x, &gamma, &mean, &variance, epsilon, &dy),
        DType::F32 | DType::F16 | DType::BF16 => backward_typed::<f32>(
            &up(&x),
            &up(&gamma),
            &up(&mean),
            &up(&variance),
            epsilon,
            &up(&dy),
        ),
        other => panic!("batch_norm_train_backward: unsupported dtype {other:?}"),
    };
    (down(dx, dtype), down(dg, dtype), down(db, dtype))
}

// ----------------------------------------------------------------------------------------------
// burn-backend 0.22.1's default `batch_norm_train` and `batch_norm_train_backward`, written out
// for Flex (the trait's defaults cannot be called once overridden), behind `ops::stock`.
// ----------------------------------------------------------------------------------------------

use crate::Flex;
use burn_backend::Scalar;
use burn_backend::TensorMetadata;
use burn_backend::ops::{BatchNormTrain, BatchNormTrainBackward, FloatTensorOps, ModuleOps};

pub(crate) fn stock_train(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    epsilon: f64,
) -> BatchNormTrain<Flex> {
    type B = Flex;
    let shape = x.shape();
    let channels = shape[1];
    let samples_per_channel = shape.num_elements() / channels;
    let flattened = Shape::new([channels, samples_per_channel]);
    let mut per_channel = vec![1; shape.num_dims()];
    per_channel[1] = channels;
    let mean = B::float_mean_dim(
        B::float_reshape(B::float_swap_dims(x.clone(), 0, 1), flattened.clone()),
        1,
    );
    let mean = B::float_reshape(mean, Shape::from(per_channel));
    let centered = B::float_sub(x.clone(), mean.clone());
    let variance = B::float_mean_dim(
        B::float_reshape(
            B::float_swap_dims(B::float_mul(centered.clone(), centered), 0, 1),
            flattened,
        ),
        1,
    );
    let mean = B::float_reshape(mean, Shape::new([channels]));
    let variance = B::float_reshape(variance, Shape::new([channels]));
    let output = B::batch_norm(x, gamma, beta, mean.clone(), variance.clone(), epsilon);
    BatchNormTrain::new(output, mean, variance)
}

pub(crate) fn stock_backward(
    x: FlexTensor,
    gamma: FlexTensor,
    mean: FlexTensor,
    variance: FlexTensor,
    epsilon: f64,
    output_grad: FlexTensor,
) -> BatchNormTrainBackward<Flex> {
    type B = Flex;
    let shape = x.shape();
    let rank = shape.num_dims();
    let channels = shape[1];
    let flattened = Shape::new([channels, shape.num_elements() / channels]);
    let mut per_channel = vec![1; rank];
    per_channel[1] = channels;
    let per_channel = Shape::from(per_channel);
    let inv_std = B::float_reshape(
        B::float_recip(B::float_sqrt(B::float_add_scalar(
            variance,
            Scalar::Float(epsilon),
        ))),
        per_channel.clone(),
    );
    let normalized = B::float_mul(
        B::float_sub(x, B::float_reshape(mean, per_channel.clone())),
        inv_std.clone(),
    );
    let output_grad_flat = B::float_reshape(
        B::float_swap_dims(output_grad.clone(), 0, 1),
        flattened.clone(),
    );
    let normalized_grad_flat = B::float_reshape(
        B::float_swap_dims(B::float_mul(output_grad.clone(), normalized.clone()), 0, 1),
        flattened,
    );
    let beta_grad = B::float_sum_dim(output_grad_flat.clone(), 1);
    let gamma_grad = B::float_sum_dim(normalized_grad_flat.clone(), 1);
    let mean_grad = B::float_reshape(B::float_mean_dim(output_grad_flat, 1), per_channel.clone());
    let mean_normalized_grad = B::float_reshape(
        B::float_mean_dim(normalized_grad_flat, 1),
        per_channel.clone(),
    );
    let centred_grad = B::float_sub(output_grad, mean_grad);
    let projected = B::float_mul(normalized, mean_normalized_grad);
    let scale = B::float_mul(B::float_reshape(gamma, per_channel), inv_std);
    let x_grad = B::float_mul(scale, B::float_sub(centred_grad, projected));
    BatchNormTrainBackward::new(
        x_grad,
        B::float_reshape(gamma_grad, Shape::new([channels])),
        B::float_reshape(beta_grad, Shape::new([channels])),
    )
}
