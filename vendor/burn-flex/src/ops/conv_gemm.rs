//! medmesh addition (see `PATCH.md`): convolution forward and backward passes as one im2col or
//! col2im pass plus gemm calls that read and write the NCDHW tensors where they lie.
//!
//! burn-flex 0.22.1 runs a training step's convolutions through three different routes: the
//! forward pass converts the input to channels-last, builds im2col tiles, multiplies each into a
//! fresh buffer and scatters that into the output; the input gradient goes through
//! `conv_transpose` (another gemm and a col2im); the weight gradient is a convolution whose
//! "kernel" is the whole output gradient. Here all three share one tiling and one column layout:
//!
//! - the column buffer of a tile holds, for every kernel tap `(c, kd, kh, kw)`, one row of input
//!   values over the tile's output positions. With stride 1 each row is a shifted copy of input
//!   rows, so im2col and col2im are `memcpy`s and vector adds;
//! - forward: `out[b, :, tile] = W · col`, written straight into the output (bias first, then
//!   the product accumulated onto it);
//! - input gradient: for stride 1, the forward pass of `dy` with the flipped kernel
//!   ([`Geometry::as_forward`]); otherwise `col = Wᵀ · dy[b, :, tile]`, then col2im adds the
//!   rows back into `dx[b]`, one image per worker;
//! - weight gradient: `dW += dy[b, :, tile] · colᵀ`, one accumulator per image (held
//!   transposed, so gemm packs the small `dy` tile), summed in image order, so the result does
//!   not depend on the thread count or on scheduling.
//!
//! Every element type the stock kernels take is covered: f32, f64 and f16 natively (gemm
//! supports them), bf16 through f32 as the stock kernels do.

use alloc::vec;
use alloc::vec::Vec;
use core::ops::Add;

use burn_backend::DType;
use burn_backend::ops::ConvOptions;
use burn_std::{Bytes, Element, Shape, f16};
use num_traits::{One, Zero};

use crate::{FlexTensor, Layout};

pub(crate) use super::stock::stock;

/// Column-buffer elements a tile aims for: 1 MiB of f32, which keeps the buffer in L2 between
/// the im2col pass that writes it and the gemm that reads it.
const COL_BUDGET: usize = 256 * 1024;

/// Shape of one convolution, in 3D (2D convolutions have depth 1).
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    groups: usize,
    /// Input channels per group.
    c_in: usize,
    /// Output channels per group.
    c_out: usize,
    input: [usize; 3],
    output: [usize; 3],
    kernel: [usize; 3],
    stride: [usize; 3],
    padding: [usize; 3],
    dilation: [usize; 3],
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], output: [usize; 3], options: &ConvOptions<3>) -> Self {
        let groups = options.groups;
        Self {
            batch: x[0],
            groups,
            c_in: w[1],
            c_out: w[0] / groups,
            input: [x[2], x[3], x[4]],
            output,
            kernel: [w[2], w[3], w[4]],
            stride: options.stride,
            padding: options.padding_begin(),
            dilation: options.dilation,
        }
    }

    fn taps(&self) -> usize {
        self.kernel.iter().product()
    }

    /// Rows of the column buffer (and of the weight matrix of one group).
    fn col_len(&self) -> usize {
        self.c_in * self.taps()
    }

    fn in_plane(&self) -> usize {
        self.input.iter().product()
    }

    fn out_plane(&self) -> usize {
        self.output.iter().product()
    }

    /// Output rows (`od`, `oh` pairs) per tile.
    fn rows_per_tile(&self) -> usize {
        let rows = self.output[0] * self.output[1];
        (COL_BUDGET / (self.col_len() * self.output[2]).max(1)).clamp(1, rows.max(1))
    }

    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> + Clone {
        let rows = self.output[0] * self.output[1];
        let per = self.rows_per_tile();
        (0..rows.div_ceil(per)).map(move |t| (t * per, ((t + 1) * per).min(rows)))
    }

    /// For a stride-1, one-group convolution whose padding stays within its dilated kernel, the
    /// convolution that maps the output gradient to the input gradient (with [`flip_kernel`]):
    /// the output gradient is its input, zero-padded by the kernel's span less the padding.
    /// This takes the forward path (im2col, then gemm written straight into the gradient)
    /// instead of gemm then col2im, which adds into a zeroed gradient, one image per worker.
    fn as_forward(&self) -> Option<Geometry> {
        let span = |a: usize| self.dilation[a] * (self.kernel[a] - 1);
        let fits = (0..3).all(|a| self.padding[a] <= span(a));
        (self.stride == [1, 1, 1] && self.groups == 1 && fits).then(|| Geometry {
            batch: self.batch,
            groups: 1,
            c_in: self.c_out,
            c_out: self.c_in,
            input: self.output,
            output: self.input,
            kernel: self.kernel,
            stride: [1, 1, 1],
            padding: [0, 1, 2].map(|a| span(a) - self.padding[a]),
            dilation: self.dilation,
        })
    }

    /// A 1x1x1 kernel with stride 1 and no padding reads the input as it lies: no column
    /// buffer.
    fn pointwise(&self) -> bool {
        self.kernel == [1, 1, 1] && self.stride == [1, 1, 1] && self.padding == [0, 0, 0]
    }
}

/// The element types gemm multiplies.
pub(crate) trait Elem:
    Copy + Send + Sync + 'static + Zero + One + Add<Output = Self> + bytemuck::Pod + Element
{
    const DTYPE: DType;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
}
impl Elem for f64 {
    const DTYPE: DType = DType::F64;
}
impl Elem for f16 {
    const DTYPE: DType = DType::F16;
}

/// The half-open range of output positions `o` whose input index `o * stride + offset - pad`
/// lies in `[0, size)`.
fn valid(out: usize, size: usize, stride: usize, offset: usize, pad: usize) -> (usize, usize) {
    // o * stride + offset >= pad
    let lo = if pad > offset {
        (pad - offset).div_ceil(stride)
    } else {
        0
    };
    // o * stride + offset - pad <= size - 1
    let hi = if size + pad > offset {
        ((size + pad - offset - 1) / stride + 1).min(out)
    } else {
        0
    };
    (lo.min(out), hi.max(lo.min(out)))
}

/// Visits every (column-buffer row segment, input row) pair of one tile: `f(tap_row_segment_range,
/// input_row_start, lo, hi, in_offset)` where output positions `lo..hi` of the segment read input
/// positions `o * stride_w + in_offset` of the input row; the rest of the segment lies in the
/// padding.
#[inline(always)]
fn for_each_segment(
    g: &Geometry,
    rows: (usize, usize),
    mut f: impl FnMut(usize, Option<usize>, usize, usize, usize),
) {
    let [in_d, in_h, in_w] = g.input;
    let [_, out_h, out_w] = g.output;
    let [k_d, k_h, k_w] = g.kernel;
    let [s_d, s_h, s_w] = g.stride;
    let [p_d, p_h, p_w] = g.padding;
    let [d_d, d_h, d_w] = g.dilation;
    let tile = (rows.1 - rows.0) * out_w;
    let mut row = 0;
    for c in 0..g.c_in {
        let plane = c * in_d * in_h * in_w;
        for kd in 0..k_d {
            for kh in 0..k_h {
                for kw in 0..k_w {
                    let (lo, hi) = valid(out_w, in_w, s_w, kw * d_w, p_w);
                    // lo * s_w + kw * d_w >= p_w whenever lo < hi.
                    let offset = (lo * s_w + kw * d_w).saturating_sub(p_w);
                    for (i, r) in (rows.0..rows.1).enumerate() {
                        let (od, oh) = (r / out_h, r % out_h);
                        let id = (od * s_d + kd * d_d).checked_sub(p_d).filter(|&v| v < in_d);
                        let ih = (oh * s_h + kh * d_h).checked_sub(p_h).filter(|&v| v < in_h);
                        let input = match (id, ih) {
                            (Some(id), Some(ih)) if lo < hi => {
                                Some(plane + (id * in_h + ih) * in_w + offset)
                            }
                            _ => None,
                        };
                        f(row * tile + i * out_w, input, lo, hi, s_w);
                    }
                    row += 1;
                }
            }
        }
    }
}

/// Fills `col` (`col_len` rows of the tile's width) from one image's input channels of one group.
/// Compiled for each SIMD level, as the stock kernels are.
#[cfg_attr(feature = "simd", macerator::with_simd)]
fn im2col<#[cfg(feature = "simd")] S: macerator::Simd, T: Elem>(
    g: &Geometry,
    x: &[T],
    col: &mut [T],
    rows: (usize, usize),
) {
    let out_w = g.output[2];
    for_each_segment(g, rows, |seg, input, lo, hi, stride| {
        let seg = &mut col[seg..seg + out_w];
        match input {
            None => seg.fill(T::zero()),
            Some(start) => {
                seg[..lo].fill(T::zero());
                seg[hi..].fill(T::zero());
                if stride == 1 {
                    seg[lo..hi].copy_from_slice(&x[start..start + hi - lo]);
                } else {
                    for (j, v) in seg[lo..hi].iter_mut().enumerate() {
                        *v = x[start + j * stride];
                    }
                }
            }
        }
    });
}

/// Adds `col` back into one image's input-gradient channels of one group.
#[cfg_attr(feature = "simd", macerator::with_simd)]
fn col2im<#[cfg(feature = "simd")] S: macerator::Simd, T: Elem>(
    g: &Geometry,
    col: &[T],
    dx: &mut [T],
    rows: (usize, usize),
) {
    for_each_segment(g, rows, |seg, input, lo, hi, stride| {
        if let Some(start) = input {
            let seg = &col[seg + lo..seg + hi];
            if stride == 1 {
                for (d, &v) in dx[start..start + hi - lo].iter_mut().zip(seg) {
                    *d = *d + v;
                }
            } else {
                for (j, &v) in seg.iter().enumerate() {
                    let d = &mut dx[start + j * stride];
                    *d = *d + v;
                }
            }
        }
    });
}

/// `dst := [dst +] lhs · rhs` through gemm, every matrix given by its pointer and (row, column)
/// strides.
///
/// # Safety
/// The pointers and strides must describe matrices of the given sizes inside live allocations,
/// and `dst` must not overlap the others.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm<T: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    accumulate: bool,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    parallel: bool,
) {
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2 as isize,
            dst.1 as isize,
            accumulate,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A raw pointer that rayon workers may share; each writes a disjoint part of the allocation.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn at(self, offset: usize) -> *mut T {
        unsafe { self.0.add(offset) }
    }
}

std::thread_local! {
    /// Each worker's column buffer, kept between calls (u64s: aligned for every element type).
    static SCRATCH: core::cell::RefCell<Vec<u64>> = const { core::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's column buffer, `len` elements long. Its contents are whatever the
/// last user left; im2col and gemm (without `accumulate`) overwrite all of it.
/// A worker that waits inside a parallel gemm may pick up another item of the same loop; that one
/// finds the buffer taken and works in a fresh one.
fn with_scratch<T: Elem, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    fn view<T: Elem>(buf: &mut Vec<u64>, len: usize) -> &mut [T] {
        let bytes = len * core::mem::size_of::<T>();
        let words = bytes.div_ceil(8);
        if buf.len() < words {
            buf.resize(words, 0);
        }
        let raw: &mut [u8] = bytemuck::cast_slice_mut(&mut buf[..words]);
        bytemuck::cast_slice_mut(&mut raw[..bytes])
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(view(&mut buf, len)),
        Err(_) => f(view(&mut Vec::new(), len)),
    })
}

/// Whether work split over images leaves cores idle, so gemm should split its own work instead.
fn few_images(batch: usize) -> bool {
    batch < rayon::current_num_threads()
}

fn forward<T: Elem>(x: &[T], w: &[T], bias: Option<&[T]>, g: &Geometry) -> Vec<T> {
    use rayon::prelude::*;
    let (k, s, plane) = (g.col_len(), g.out_plane(), g.in_plane());
    let channels = g.groups * g.c_out;
    let mut out = vec![T::zero(); g.batch * channels * s];
    let dst = Shared(out.as_mut_ptr());
    let out_w = g.output[2];
    let parallel_gemm = few_images(g.batch) && g.tiles().count() < rayon::current_num_threads();
    let items: Vec<(usize, (usize, usize))> = (0..g.batch)
        .flat_map(|b| g.tiles().map(move |t| (b, t)))
        .collect();
    items.par_iter().for_each(|&(b, rows)| {
        let (s0, t) = (rows.0 * out_w, (rows.1 - rows.0) * out_w);
        for group in 0..g.groups {
            let x_g = &x[(b * g.groups + group) * g.c_in * plane..][..g.c_in * plane];
            let first = (b * channels + group * g.c_out) * s + s0;
            if let Some(bias) = bias {
                for o in 0..g.c_out {
                    let v = bias[group * g.c_out + o];
                    // SAFETY: this tile's columns of this image's channels belong to this item.
                    unsafe { core::slice::from_raw_parts_mut(dst.at(first + o * s), t) }.fill(v);
                }
            }
            // SAFETY: out[b, group's channels, s0..s0 + t] is written by this item only; the
            // weight rows of the group and the column buffer are read-only here.
            let multiply = |rhs| unsafe {
                gemm(
                    (g.c_out, t, k),
                    (dst.at(first), s, 1),
                    bias.is_some(),
                    (w[group * g.c_out * k..].as_ptr(), k, 1),
                    rhs,
                    parallel_gemm,
                )
            };
            if g.pointwise() {
                multiply((x_g[s0..].as_ptr(), plane, 1));
            } else {
                with_scratch(k * t, |col: &mut [T]| {
                    im2col(g, x_g, col, rows);
                    multiply((col.as_ptr(), t, 1));
                });
            }
        }
    });
    out
}

fn x_backward<T: Elem>(w: &[T], dy: &[T], g: &Geometry) -> Vec<T> {
    use rayon::prelude::*;
    let (k, s, plane) = (g.col_len(), g.out_plane(), g.in_plane());
    let channels = g.groups * g.c_out;
    let out_w = g.output[2];
    let parallel_gemm = few_images(g.batch);
    let mut dx = vec![T::zero(); g.batch * g.groups * g.c_in * plane];
    dx.par_chunks_mut(g.groups * g.c_in * plane)
        .enumerate()
        .for_each(|(b, dx_b)| {
            for group in 0..g.groups {
                let dx_g = &mut dx_b[group * g.c_in * plane..][..g.c_in * plane];
                let w_g = w[group * g.c_out * k..].as_ptr();
                for rows in g.tiles() {
                    let (s0, t) = (rows.0 * out_w, (rows.1 - rows.0) * out_w);
                    let dy_tile = dy[(b * channels + group * g.c_out) * s + s0..].as_ptr();
                    // Wᵀ: element (i, j) is w[j * k + i].
                    let lhs = (w_g, 1, k);
                    if g.pointwise() {
                        // SAFETY: dx_g[.., s0..s0 + t] is this tile's, rows `plane` apart.
                        unsafe {
                            gemm(
                                (k, t, g.c_out),
                                (dx_g[s0..].as_mut_ptr(), plane, 1),
                                false,
                                lhs,
                                (dy_tile, s, 1),
                                parallel_gemm,
                            );
                        }
                        continue;
                    }
                    with_scratch(k * t, |col: &mut [T]| {
                        // SAFETY: `col` holds k * t elements; the others are read-only here.
                        unsafe {
                            gemm(
                                (k, t, g.c_out),
                                (col.as_mut_ptr(), t, 1),
                                false,
                                lhs,
                                (dy_tile, s, 1),
                                parallel_gemm,
                            );
                        }
                        col2im(g, col, &mut *dx_g, rows);
                    });
                }
            }
        });
    dx
}

fn weight_backward<T: Elem>(x: &[T], dy: &[T], g: &Geometry) -> Vec<T> {
    use rayon::prelude::*;
    let (k, s, plane) = (g.col_len(), g.out_plane(), g.in_plane());
    let channels = g.groups * g.c_out;
    let out_w = g.output[2];
    let parallel_gemm = few_images(g.batch);
    let size = channels * k;
    // One accumulator per image, summed in image order: the same sums whatever the threads.
    // Each accumulator is the gradient transposed, group by group: element (o, j) of a group at
    // j * c_out + o. gemm then writes its destination column by column and packs only the
    // output-gradient tile, where the row-major layout would have it transpose the larger column
    // buffer on every tile.
    let partial: Vec<Vec<T>> = (0..g.batch)
        .into_par_iter()
        .map(|b| {
            let mut dw_t = vec![T::zero(); size];
            for group in 0..g.groups {
                let x_g = &x[(b * g.groups + group) * g.c_in * plane..][..g.c_in * plane];
                let dw_g = dw_t[group * g.c_out * k..].as_mut_ptr();
                for rows in g.tiles() {
                    let (s0, t) = (rows.0 * out_w, (rows.1 - rows.0) * out_w);
                    let dy_tile = dy[(b * channels + group * g.c_out) * s + s0..].as_ptr();
                    // colᵀ: element (i, j) is col[j * t + i].
                    // SAFETY: `dw_t` is this image's own; the others are read-only here.
                    let multiply = |rhs| unsafe {
                        gemm(
                            (g.c_out, k, t),
                            (dw_g, 1, g.c_out),
                            true,
                            (dy_tile, s, 1),
                            rhs,
                            parallel_gemm,
                        )
                    };
                    if g.pointwise() {
                        multiply((x_g[s0..].as_ptr(), 1, plane));
                    } else {
                        with_scratch(k * t, |col: &mut [T]| {
                            im2col(g, x_g, col, rows);
                            multiply((col.as_ptr(), 1, t));
                        });
                    }
                }
            }
            dw_t
        })
        .collect();
    let mut parts = partial.into_iter();
    let mut sum = parts.next().unwrap_or_else(|| vec![T::zero(); size]);
    for part in parts {
        for (a, b) in sum.iter_mut().zip(part) {
            *a = *a + b;
        }
    }
    let mut dw = vec![T::zero(); size];
    for (group_t, group) in sum
        .chunks_exact(g.c_out * k)
        .zip(dw.chunks_exact_mut(g.c_out * k))
    {
        for (o, row) in group.chunks_exact_mut(k).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = group_t[j * g.c_out + o];
            }
        }
    }
    dw
}

fn bias_backward<T: Elem>(dy: &[T], batch: usize, channels: usize, plane: usize) -> Vec<T> {
    let mut db = vec![T::zero(); channels];
    for b in 0..batch {
        for (c, sum) in db.iter_mut().enumerate() {
            let row = &dy[(b * channels + c) * plane..][..plane];
            // Eight running sums: they vectorize, where one serial sum cannot.
            let mut lanes = [T::zero(); 8];
            let chunks = row.chunks_exact(8);
            let tail = chunks.remainder();
            for chunk in chunks {
                for (l, &v) in lanes.iter_mut().zip(chunk) {
                    *l = *l + v;
                }
            }
            let mut total = lanes.iter().fold(T::zero(), |a, &b| a + b);
            for &v in tail {
                total = total + v;
            }
            *sum = *sum + total;
        }
    }
    db
}

// ----------------------------------------------------------------------------------------------
// Tensor-level entry points. Shapes are 5D here: 2D convolutions arrive with depth 1.
// ----------------------------------------------------------------------------------------------

fn output_size(input: usize, kernel: usize, options: &ConvOptions<3>, axis: usize) -> usize {
    let (begin, end) = options.padding[axis];
    let span = options.dilation[axis] * (kernel - 1) + 1;
    (input + begin + end).saturating_sub(span) / options.stride[axis] + 1
}

fn tensor<T: Elem>(data: Vec<T>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(Shape::from(shape)),
        T::DTYPE,
    )
}

/// Runs `f` on the tensors' elements for the float dtypes; bf16 goes through f32. `None` for any
/// other dtype (the caller's stock path reports it).
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($t:expr),* ) $(, $extra:expr)*) => {
        match $dtype {
            DType::F32 => Some($f::<f32>($(&$t),* $(, $extra)*)),
            DType::F64 => Some($f::<f64>($(&$t),* $(, $extra)*)),
            DType::F16 => Some($f::<f16>($(&$t),* $(, $extra)*)),
            DType::BF16 => {
                let out = $f::<f32>(
                    $(&super::conv_common::convert_bf16_to_f32(&$t)),* $(, $extra)*
                );
                Some(super::conv_common::convert_f32_to_bf16(&out))
            }
            _ => None,
        }
    };
}

fn forward_typed<T: Elem>(
    x: &FlexTensor,
    w: &FlexTensor,
    bias: Option<&FlexTensor>,
    options: &ConvOptions<3>,
) -> FlexTensor {
    let (x, w) = (x.to_contiguous(), w.to_contiguous());
    let (xs, ws) = (x.layout().shape().to_vec(), w.layout().shape().to_vec());
    let output = [0, 1, 2].map(|a| output_size(xs[2 + a], ws[2 + a], options, a));
    let g = Geometry::new(&xs, &ws, output, options);
    let bias = bias.map(|b| b.to_contiguous());
    let out = forward(
        x.storage::<T>(),
        w.storage::<T>(),
        bias.as_ref().map(|b| b.storage::<T>()),
        &g,
    );
    tensor(out, vec![g.batch, ws[0], output[0], output[1], output[2]])
}

/// `conv3d(x, w, bias)`; `None` for a dtype this module does not handle.
pub(crate) fn conv3d(
    x: &FlexTensor,
    w: &FlexTensor,
    bias: Option<&FlexTensor>,
    options: &ConvOptions<3>,
) -> Option<FlexTensor> {
    match x.dtype() {
        DType::F32 => Some(forward_typed::<f32>(x, w, bias, options)),
        DType::F64 => Some(forward_typed::<f64>(x, w, bias, options)),
        DType::F16 => Some(forward_typed::<f16>(x, w, bias, options)),
        DType::BF16 => {
            use super::conv_common::{convert_bf16_to_f32 as up, convert_f32_to_bf16 as down};
            let bias = bias.map(up);
            let out = forward_typed::<f32>(&up(x), &up(w), bias.as_ref(), options);
            Some(down(&out))
        }
        _ => None,
    }
}

fn x_backward_typed<T: Elem>(
    x: &FlexTensor,
    w: &FlexTensor,
    dy: &FlexTensor,
    options: &ConvOptions<3>,
) -> FlexTensor {
    let (w, dy) = (w.to_contiguous(), dy.to_contiguous());
    let xs = x.layout().shape().to_vec();
    let (ws, ys) = (w.layout().shape().to_vec(), dy.layout().shape().to_vec());
    let g = Geometry::new(&xs, &ws, [ys[2], ys[3], ys[4]], options);
    let dx = match g.as_forward() {
        Some(transposed) => forward(
            dy.storage::<T>(),
            &flip_kernel(w.storage::<T>(), &g),
            None,
            &transposed,
        ),
        None => x_backward(w.storage::<T>(), dy.storage::<T>(), &g),
    };
    tensor(dx, xs)
}

/// `w[o, c, kd, kh, kw]` as `w'[c, o, KD-1-kd, KH-1-kh, KW-1-kw]`: the kernel whose forward
/// convolution of the output gradient is the input gradient of a stride-1 convolution.
fn flip_kernel<T: Elem>(w: &[T], g: &Geometry) -> Vec<T> {
    let taps = g.taps();
    let mut flipped = vec![T::zero(); w.len()];
    for o in 0..g.c_out {
        for c in 0..g.c_in {
            let from = &w[(o * g.c_in + c) * taps..][..taps];
            let to = &mut flipped[(c * g.c_out + o) * taps..][..taps];
            for (t, &v) in to.iter_mut().rev().zip(from) {
                *t = v;
            }
        }
    }
    flipped
}

/// The gradient of `conv3d` with respect to its input.
pub(crate) fn conv3d_x_backward(
    x: &FlexTensor,
    w: &FlexTensor,
    dy: &FlexTensor,
    options: &ConvOptions<3>,
) -> Option<FlexTensor> {
    by_dtype!(x.dtype(), x_backward_typed(x, w, dy), options)
}

fn weight_backward_typed<T: Elem>(
    x: &FlexTensor,
    w: &FlexTensor,
    dy: &FlexTensor,
    options: &ConvOptions<3>,
) -> FlexTensor {
    let (x, dy) = (x.to_contiguous(), dy.to_contiguous());
    let (xs, ys) = (x.layout().shape().to_vec(), dy.layout().shape().to_vec());
    let ws = w.layout().shape().to_vec();
    let g = Geometry::new(&xs, &ws, [ys[2], ys[3], ys[4]], options);
    tensor(weight_backward(x.storage::<T>(), dy.storage::<T>(), &g), ws)
}

/// The gradient of `conv3d` with respect to its weight.
pub(crate) fn conv3d_weight_backward(
    x: &FlexTensor,
    w: &FlexTensor,
    dy: &FlexTensor,
    options: &ConvOptions<3>,
) -> Option<FlexTensor> {
    by_dtype!(x.dtype(), weight_backward_typed(x, w, dy), options)
}

fn bias_backward_typed<T: Elem>(dy: &FlexTensor) -> FlexTensor {
    let dy = dy.to_contiguous();
    let shape = dy.layout().shape().to_vec();
    let plane = shape[2..].iter().product();
    tensor(
        bias_backward(dy.storage::<T>(), shape[0], shape[1], plane),
        vec![shape[1]],
    )
}

/// The gradient of any convolution with respect to its bias: `dy` summed over batch and space.
pub(crate) fn conv_bias_backward(dy: &FlexTensor) -> Option<FlexTensor> {
    by_dtype!(dy.dtype(), bias_backward_typed(dy))
}

/// Views an NCHW tensor (or a 2D weight) as NC1HW.
pub(crate) fn to_3d(t: &FlexTensor) -> FlexTensor {
    let s = t.layout().shape();
    t.reshape(Shape::from(vec![s[0], s[1], 1, s[2], s[3]]))
}

/// Drops the depth axis that [`to_3d`] added.
pub(crate) fn to_2d(t: FlexTensor) -> FlexTensor {
    let s = t.layout().shape();
    t.reshape(Shape::from(vec![s[0], s[1], s[3], s[4]]))
}

/// 2D options as 3D ones with a depth axis of size 1.
pub(crate) fn options_3d(o: &ConvOptions<2>) -> ConvOptions<3> {
    ConvOptions::new_with_padding(
        [1, o.stride[0], o.stride[1]],
        [(0, 0), o.padding[0], o.padding[1]],
        [1, o.dilation[0], o.dilation[1]],
        o.groups,
    )
}
