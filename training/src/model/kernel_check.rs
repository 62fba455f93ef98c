//! The kernels medmesh's patched burn-flex adds (`vendor/burn-flex`, see its PATCH.md), forward
//! and backward, checked against direct f64 computations through burn's public API on the flex
//! device, as training calls them:
//! - convolutions (`conv_gemm.rs`) against a six-loop convolution, on shapes that reach every
//!   branch: 2D and 3D, stride 1 and 2, symmetric and asymmetric padding, dilation, groups,
//!   bias, pointwise kernels, tiles that split the output, one image and several;
//! - batch normalization in training mode (`batch_norm.rs`) against its textbook formulas.

use burn::prelude::*;
use burn::tensor::module::{batch_norm_train, conv2d, conv3d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Gradients, TensorData};

/// One convolution in 3D terms (2D cases have depth 1 everywhere).
#[derive(Debug, Clone, Copy)]
struct Case {
    dims: usize,
    batch: usize,
    c_in: usize,
    c_out: usize,
    groups: usize,
    input: [usize; 3],
    kernel: [usize; 3],
    stride: [usize; 3],
    padding: [(usize, usize); 3],
    dilation: [usize; 3],
    bias: bool,
}

impl Case {
    fn output(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| {
            let span = self.dilation[a] * (self.kernel[a] - 1) + 1;
            (self.input[a] + self.padding[a].0 + self.padding[a].1 - span) / self.stride[a] + 1
        })
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// `y`, `dx`, `dw`, `db` of `sum(y * r)` for a direct convolution, in f64.
fn reference(
    c: &Case,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    r: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let [id, ih, iw] = c.input;
    let [od, oh, ow] = c.output();
    let [kd, kh, kw] = c.kernel;
    let (cig, cog) = (c.c_in / c.groups, c.c_out / c.groups);
    let xi = |n, ch, z, y, x_| (((n * c.c_in + ch) * id + z) * ih + y) * iw + x_;
    let wi = |o, ch, z, y, x_| (((o * cig + ch) * kd + z) * kh + y) * kw + x_;
    let yi = |n, o, z, y, x_| (((n * c.c_out + o) * od + z) * oh + y) * ow + x_;
    let mut out = vec![0f64; c.batch * c.c_out * od * oh * ow];
    let mut dx = vec![0f64; x.len()];
    let mut dw = vec![0f64; w.len()];
    let mut db = vec![0f64; c.c_out];
    for n in 0..c.batch {
        for o in 0..c.c_out {
            let g = o / cog;
            for (z, y, x_) in
                (0..od).flat_map(|z| (0..oh).flat_map(move |y| (0..ow).map(move |x_| (z, y, x_))))
            {
                let mut acc = if c.bias { f64::from(b[o]) } else { 0.0 };
                let grad = f64::from(r[yi(n, o, z, y, x_)]);
                db[o] += grad;
                for ch in 0..cig {
                    let ci = g * cig + ch;
                    for (a, bb, cc) in (0..kd).flat_map(|a| {
                        (0..kh).flat_map(move |bb| (0..kw).map(move |cc| (a, bb, cc)))
                    }) {
                        let pos = [
                            (z * c.stride[0] + a * c.dilation[0]) as isize
                                - c.padding[0].0 as isize,
                            (y * c.stride[1] + bb * c.dilation[1]) as isize
                                - c.padding[1].0 as isize,
                            (x_ * c.stride[2] + cc * c.dilation[2]) as isize
                                - c.padding[2].0 as isize,
                        ];
                        if pos
                            .iter()
                            .zip(c.input)
                            .any(|(&p, s)| p < 0 || p >= s as isize)
                        {
                            continue;
                        }
                        let (pz, py, px) = (pos[0] as usize, pos[1] as usize, pos[2] as usize);
                        let xv = f64::from(x[xi(n, ci, pz, py, px)]);
                        let wv = f64::from(w[wi(o, ch, a, bb, cc)]);
                        acc += xv * wv;
                        dx[xi(n, ci, pz, py, px)] += grad * wv;
                        dw[wi(o, ch, a, bb, cc)] += grad * xv;
                    }
                }
                out[yi(n, o, z, y, x_)] = acc;
            }
        }
    }
    (out, dx, dw, if c.bias { db } else { vec![] })
}

fn close(what: &str, c: &dyn core::fmt::Debug, got: Vec<f32>, want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what} of {c:?}: length");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(*g) - w).abs() <= 1e-5 * scale,
            "{what} of {c:?}: element {i} is {g}, the direct convolution gives {w}"
        );
    }
}

/// The gradient `grads` holds for the leaf `t`.
fn grad(t: &Tensor<1>, grads: &Gradients) -> Vec<f32> {
    data(t.grad(grads).expect("the leaf takes part in the loss"))
}

fn data(t: Tensor<1>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32 tensor")
}

fn check(c: Case) {
    let device = Device::flex().autodiff();
    let [id, ih, iw] = c.input;
    let [kd, kh, kw] = c.kernel;
    let out = c.output();
    let x = values(c.batch * c.c_in * id * ih * iw, 1);
    let w = values(c.c_out * (c.c_in / c.groups) * kd * kh * kw, 2);
    let b = values(c.c_out, 3);
    let r = values(c.batch * c.c_out * out.iter().product::<usize>(), 4);
    let (want_y, want_dx, want_dw, want_db) = reference(&c, &x, &w, &b, &r);

    let flat = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
    let (xt, wt, bt) = (
        flat(&x).require_grad(),
        flat(&w).require_grad(),
        flat(&b).require_grad(),
    );
    let bias = c.bias.then(|| bt.clone());
    let y: Tensor<1> = if c.dims == 2 {
        let opts = ConvOptions::new_with_padding(
            [c.stride[1], c.stride[2]],
            [c.padding[1], c.padding[2]],
            [c.dilation[1], c.dilation[2]],
            c.groups,
        );
        let x4 = xt.clone().reshape([c.batch, c.c_in, ih, iw]);
        let w4 = wt.clone().reshape([c.c_out, c.c_in / c.groups, kh, kw]);
        conv2d(x4, w4, bias, opts).flatten(0, 3)
    } else {
        let opts = ConvOptions::new_with_padding(c.stride, c.padding, c.dilation, c.groups);
        let x5 = xt.clone().reshape([c.batch, c.c_in, id, ih, iw]);
        let w5 = wt.clone().reshape([c.c_out, c.c_in / c.groups, kd, kh, kw]);
        conv3d(x5, w5, bias, opts).flatten(0, 4)
    };
    close("output", &c, data(y.clone()), &want_y);
    let grads = (y * flat(&r)).sum().backward();
    close("input gradient", &c, grad(&xt, &grads), &want_dx);
    close("weight gradient", &c, grad(&wt, &grads), &want_dw);
    if c.bias {
        close("bias gradient", &c, grad(&bt, &grads), &want_db);
    }
}

const UNET_3X3: Case = Case {
    dims: 2,
    batch: 3,
    c_in: 4,
    c_out: 5,
    groups: 1,
    input: [1, 9, 11],
    kernel: [1, 3, 3],
    stride: [1, 1, 1],
    padding: [(0, 0), (1, 1), (1, 1)],
    dilation: [1, 1, 1],
    bias: true,
};

#[test]
fn the_unets_convolutions_match_a_direct_convolution() {
    check(UNET_3X3);
    // The stride-2 down convolution, with a column count it does not divide.
    check(Case {
        stride: [1, 2, 2],
        bias: false,
        ..UNET_3X3
    });
    // The 1x1 head: no column buffer.
    check(Case {
        kernel: [1, 1, 1],
        padding: [(0, 0); 3],
        ..UNET_3X3
    });
    // One image: gemm splits the work instead of the images.
    check(Case {
        batch: 1,
        ..UNET_3X3
    });
}

#[test]
fn large_inputs_split_into_tiles_and_3d_kernels_match() {
    // 64 output rows of 70 columns with 36 taps: more than one tile.
    check(Case {
        batch: 2,
        input: [1, 64, 70],
        ..UNET_3X3
    });
    let cube = Case {
        dims: 3,
        batch: 2,
        c_in: 3,
        c_out: 4,
        groups: 1,
        input: [5, 6, 7],
        kernel: [3, 3, 3],
        stride: [1, 1, 1],
        padding: [(1, 1); 3],
        dilation: [1, 1, 1],
        bias: true,
    };
    check(cube);
    check(Case {
        stride: [2, 2, 2],
        ..cube
    });
}

#[test]
fn groups_dilation_and_asymmetric_padding_match() {
    check(Case {
        c_in: 4,
        c_out: 6,
        groups: 2,
        dilation: [1, 2, 1],
        padding: [(0, 0), (2, 0), (0, 1)],
        ..UNET_3X3
    });
    // burn's conv3d refuses asymmetric padding; odd strides and kernels instead.
    check(Case {
        dims: 3,
        input: [4, 9, 11],
        stride: [2, 3, 2],
        kernel: [2, 2, 4],
        padding: [(1, 1), (0, 0), (3, 3)],
        dilation: [1, 1, 2],
        ..UNET_3X3
    });
}

#[test]
fn batch_norm_in_training_matches_its_formulas() {
    let (n, c, h, w) = (3, 4, 5, 7);
    let plane = h * w;
    let count = (n * plane) as f64;
    // An offset far from zero, as raw CT values have: centring must not lose it.
    let x: Vec<f32> = values(n * c * plane, 5)
        .iter()
        .map(|v| 40.0 + 3.0 * v)
        .collect();
    let gamma = values(c, 6);
    let beta = values(c, 7);
    let r = values(x.len(), 8);
    let at = |b: usize, ch: usize, i: usize| (b * c + ch) * plane + i;

    let (mut y, mut dx) = (vec![0f64; x.len()], vec![0f64; x.len()]);
    let (mut means, mut vars, mut dgamma, mut dbeta) = (vec![], vec![], vec![], vec![]);
    for ch in 0..c {
        let idx: Vec<usize> = (0..n)
            .flat_map(|b| (0..plane).map(move |i| at(b, ch, i)))
            .collect();
        let mean = idx.iter().map(|&i| f64::from(x[i])).sum::<f64>() / count;
        let var = idx
            .iter()
            .map(|&i| (f64::from(x[i]) - mean).powi(2))
            .sum::<f64>()
            / count;
        let inv_std = 1.0 / (var + 1e-5).sqrt();
        let xhat = |i: usize| (f64::from(x[i]) - mean) * inv_std;
        let sum_r = idx.iter().map(|&i| f64::from(r[i])).sum::<f64>();
        let sum_rx = idx.iter().map(|&i| f64::from(r[i]) * xhat(i)).sum::<f64>();
        let g = f64::from(gamma[ch]);
        for &i in &idx {
            y[i] = g * xhat(i) + f64::from(beta[ch]);
            dx[i] = g * inv_std / count * (count * f64::from(r[i]) - sum_r - xhat(i) * sum_rx);
        }
        means.push(mean);
        vars.push(var);
        dgamma.push(sum_rx);
        dbeta.push(sum_r);
    }

    let device = Device::flex().autodiff();
    let flat = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
    let (xt, gt, bt) = (
        flat(&x).require_grad(),
        flat(&gamma).require_grad(),
        flat(&beta).require_grad(),
    );
    let out = batch_norm_train(
        xt.clone().reshape([n, c, h, w]),
        gt.clone(),
        bt.clone(),
        1e-5,
    );
    let case = "input [3, 4, 5, 7]";
    close("batch mean", &case, data(out.mean), &means);
    close("batch variance", &case, data(out.variance), &vars);
    let y_t = out.output.flatten(0, 3);
    close("batch-norm output", &case, data(y_t.clone()), &y);
    let grads = (y_t * flat(&r)).sum().backward();
    close("batch-norm input gradient", &case, grad(&xt, &grads), &dx);
    close("gamma gradient", &case, grad(&gt, &grads), &dgamma);
    close("beta gradient", &case, grad(&bt, &grads), &dbeta);
}
