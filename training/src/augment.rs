//! nnU-Net-style augmentation of 2D training slices (the manifest's
//! `training.augmentation`): rotation, scaling and elastic deformation move image and label
//! together; Gaussian noise, Gaussian blur, brightness, intensity shift and gamma change the
//! image only. nnU-Net's order: spatial, noise, blur, brightness, shift, gamma.
//!
//! A slice is `channels` planes of `height x width` f32 (row-major) and a label plane of the
//! same size. A 3D patch is a stack of `depth` such planes per channel (and `depth` label
//! planes): spatial transforms and blur act in the plane, the same for every plane of the
//! stack (rotation about the plane's normal, as nnU-Net augments anisotropic data), and gamma
//! keeps each channel's statistics over the whole stack. Spatial transforms resample the image bilinearly and the label by nearest
//! neighbour about the slice's centre; what comes from outside the slice is each channel's
//! minimum (air, in a normalized scan) and background.

use medmesh_protocol::manifest::Augmentation;

use crate::rng::Rng;

/// The augmentation the unseen-site figures are measured with (README; `cargo run --example
/// unseen_site -p medmesh-training`): nnU-Net's transforms, its noise (variance up to 0.1)
/// and probability, wider rotation, gamma and brightness ranges. As a manifest:
/// `augmentation = { rotate_degrees = 35.0, scale = [0.7, 1.3], gamma = [0.6, 2.0],
/// brightness = [0.7, 1.3], noise = 0.32, blur = [0.5, 1.5] }`.
pub const MEASURED: Augmentation = Augmentation {
    probability: 0.2,
    rotate_degrees: Some(35.0),
    scale: Some([0.7, 1.3]),
    elastic: None,
    gamma: Some([0.6, 2.0]),
    brightness: Some([0.7, 1.3]),
    shift: None,
    noise: Some(0.32),
    blur: Some([0.5, 1.5]),
};

/// One slice's pixels, borrowed for augmentation.
pub struct Slice<'a> {
    /// Channel planes (`depth` per channel), row-major.
    pub image: &'a mut [f32],
    /// Class per pixel (`depth` planes).
    pub label: &'a mut [u8],
    /// Channels.
    pub channels: usize,
    /// Planes per channel: 1 for a 2D slice.
    pub depth: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// Applies `spec`'s transforms to `slice`, each with `spec.probability`.
pub fn augment(spec: &Augmentation, slice: &mut Slice<'_>, rng: &mut Rng) {
    let p = spec.probability;
    let hit = |rng: &mut Rng| rng.uniform() < p;
    let angle = match spec.rotate_degrees {
        Some(deg) if hit(rng) => rng.range(-deg, deg).to_radians(),
        _ => 0.0,
    };
    let zoom = match spec.scale {
        Some([lo, hi]) if hit(rng) => rng.range(lo, hi),
        _ => 1.0,
    };
    let elastic = match spec.elastic {
        Some([alpha, sigma]) if hit(rng) => {
            Some(displacement(slice.height, slice.width, alpha, sigma, rng))
        }
        _ => None,
    };
    if angle != 0.0 || zoom != 1.0 || elastic.is_some() {
        warp(slice, angle, zoom, elastic.as_ref());
    }
    let plane = slice.height * slice.width;
    if let Some(max) = spec.noise
        && hit(rng)
    {
        let std = rng.range(0.0, max);
        for v in slice.image.iter_mut() {
            *v += (std * rng.normal()) as f32;
        }
    }
    if let Some([lo, hi]) = spec.blur
        && hit(rng)
    {
        let sigma = rng.range(lo, hi);
        for channel in slice.image.chunks_mut(plane) {
            gaussian_blur(channel, slice.height, slice.width, sigma);
        }
    }
    if let Some([lo, hi]) = spec.brightness
        && hit(rng)
    {
        let factor = rng.range(lo, hi) as f32;
        slice.image.iter_mut().for_each(|v| *v *= factor);
    }
    if let Some([lo, hi]) = spec.shift
        && hit(rng)
    {
        let offset = rng.range(lo, hi) as f32;
        slice.image.iter_mut().for_each(|v| *v += offset);
    }
    if let Some([lo, hi]) = spec.gamma
        && hit(rng)
    {
        let g = rng.range(lo, hi);
        for channel in slice.image.chunks_mut(plane * slice.depth.max(1)) {
            gamma(channel, g);
        }
    }
}

/// A smooth random displacement field `(dy, dx)` per pixel: uniform noise in [-1, 1],
/// blurred by a Gaussian of `sigma` pixels, scaled so its largest displacement is `alpha`.
fn displacement(h: usize, w: usize, alpha: f64, sigma: f64, rng: &mut Rng) -> Vec<(f32, f32)> {
    let field = |rng: &mut Rng| {
        let mut f: Vec<f32> = (0..h * w).map(|_| rng.range(-1.0, 1.0) as f32).collect();
        gaussian_blur(&mut f, h, w, sigma);
        let peak = f.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        f.iter_mut().for_each(|v| *v *= alpha as f32 / peak);
        f
    };
    let (dy, dx) = (field(rng), field(rng));
    dy.into_iter().zip(dx).collect()
}

/// Resamples `slice` through rotation by `angle`, zoom by `zoom` (both about the centre) and
/// the optional displacement field.
fn warp(slice: &mut Slice<'_>, angle: f64, zoom: f64, field: Option<&Vec<(f32, f32)>>) {
    let (h, w) = (slice.height, slice.width);
    let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
    let (sin, cos) = angle.sin_cos();
    // Where each output pixel comes from: the inverse rotation and zoom, then the field.
    let source: Vec<(f64, f64)> = (0..h * w)
        .map(|i| {
            let (y, x) = ((i / w) as f64 - cy, (i % w) as f64 - cx);
            let sy = (cos * y - sin * x) / zoom + cy;
            let sx = (sin * y + cos * x) / zoom + cx;
            match field {
                Some(f) => (sy + f64::from(f[i].0), sx + f64::from(f[i].1)),
                None => (sy, sx),
            }
        })
        .collect();
    let plane = h * w;
    for channel in slice.image.chunks_mut(plane) {
        let fill = channel.iter().copied().fold(f32::INFINITY, f32::min);
        let src = channel.to_vec();
        for (out, &(sy, sx)) in channel.iter_mut().zip(&source) {
            *out = bilinear(&src, h, w, sy, sx).unwrap_or(fill);
        }
    }
    for label in slice.label.chunks_mut(plane) {
        let src = label.to_vec();
        for (out, &(sy, sx)) in label.iter_mut().zip(&source) {
            let (r, c) = (sy.round(), sx.round());
            let inside = r >= 0.0 && c >= 0.0 && r <= (h - 1) as f64 && c <= (w - 1) as f64;
            *out = if inside {
                src[r as usize * w + c as usize]
            } else {
                0
            };
        }
    }
}

fn bilinear(src: &[f32], h: usize, w: usize, y: f64, x: f64) -> Option<f32> {
    if y < -0.5 || x < -0.5 || y > h as f64 - 0.5 || x > w as f64 - 0.5 {
        return None;
    }
    let (y, x) = (y.clamp(0.0, (h - 1) as f64), x.clamp(0.0, (w - 1) as f64));
    let (y0, x0) = (y.floor() as usize, x.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
    let (fy, fx) = ((y - y0 as f64) as f32, (x - x0 as f64) as f32);
    let top = src[y0 * w + x0] * (1.0 - fx) + src[y0 * w + x1] * fx;
    let bottom = src[y1 * w + x0] * (1.0 - fx) + src[y1 * w + x1] * fx;
    Some(top * (1.0 - fy) + bottom * fy)
}

/// Separable Gaussian blur of one plane, edges replicated, kernel radius 3 sigma.
pub fn gaussian_blur(plane: &mut [f32], h: usize, w: usize, sigma: f64) {
    if sigma <= 0.0 {
        return;
    }
    let radius = (3.0 * sigma).ceil() as isize;
    let kernel: Vec<f32> = (-radius..=radius)
        .map(|k| (-(k * k) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let total: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
    let pass = |src: &[f32], dst: &mut [f32], along_rows: bool| {
        for r in 0..h {
            for c in 0..w {
                let mut acc = 0.0;
                for (k, weight) in kernel.iter().enumerate() {
                    let off = k as isize - radius;
                    let (rr, cc) = if along_rows {
                        (r as isize, (c as isize + off).clamp(0, w as isize - 1))
                    } else {
                        ((r as isize + off).clamp(0, h as isize - 1), c as isize)
                    };
                    acc += weight * src[rr as usize * w + cc as usize];
                }
                dst[r * w + c] = acc;
            }
        }
    };
    let mut tmp = vec![0.0; plane.len()];
    pass(plane, &mut tmp, true);
    pass(&tmp, plane, false);
}

/// Gamma on the plane's intensities scaled to [0, 1], then the plane's mean and standard
/// deviation restored (nnU-Net's `retain_stats`).
fn gamma(plane: &mut [f32], g: f64) {
    let stats = |p: &[f32]| {
        let n = p.len().max(1) as f64;
        let mean = p.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
        let var = p
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var.sqrt())
    };
    let (mean, std) = stats(plane);
    let lo = plane.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = plane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let range = f64::from(hi - lo);
    if range <= 1e-12 {
        return;
    }
    for v in plane.iter_mut() {
        let unit = f64::from(*v - lo) / range;
        *v = (unit.powf(g) * range + f64::from(lo)) as f32;
    }
    let (new_mean, new_std) = stats(plane);
    let scale = if new_std > 1e-12 { std / new_std } else { 1.0 };
    for v in plane.iter_mut() {
        *v = ((f64::from(*v) - new_mean) * scale + mean) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn only(change: impl FnOnce(&mut Augmentation)) -> Augmentation {
        let mut a = Augmentation {
            probability: 1.0,
            rotate_degrees: None,
            scale: None,
            elastic: None,
            gamma: None,
            brightness: None,
            shift: None,
            noise: None,
            blur: None,
        };
        change(&mut a);
        a
    }

    /// A 16 x 16 slice with a bright 4 x 4 square labelled 1 in its top-left quadrant.
    fn square() -> (Vec<f32>, Vec<u8>) {
        let (mut image, mut label) = (vec![0.0f32; 256], vec![0u8; 256]);
        for r in 2..6 {
            for c in 2..6 {
                image[r * 16 + c] = 1.0;
                label[r * 16 + c] = 1;
            }
        }
        (image, label)
    }

    /// The square after `change`.
    fn on_square(change: impl FnOnce(&mut Slice<'_>)) -> (Vec<f32>, Vec<u8>) {
        let (mut image, mut label) = square();
        let mut slice = Slice {
            image: &mut image,
            label: &mut label,
            channels: 1,
            depth: 1,
            height: 16,
            width: 16,
        };
        change(&mut slice);
        (image, label)
    }

    fn run(spec: &Augmentation, seed: u64) -> (Vec<f32>, Vec<u8>) {
        on_square(|slice| augment(spec, slice, &mut Rng::new(seed)))
    }

    /// A 3D patch's planes all take the transform a single slice takes with the same draws.
    #[test]
    fn a_stack_of_planes_moves_as_one() {
        let spec = only(|a| {
            a.rotate_degrees = Some(30.0);
            a.scale = Some([0.8, 1.2]);
            a.elastic = Some([2.0, 3.0]);
            a.gamma = Some([0.7, 1.5]);
        });
        let (single_image, single_label) = run(&spec, 11);
        let (image, label) = square();
        let (mut image, mut label) = (image.repeat(3), label.repeat(3));
        let mut stack = Slice {
            image: &mut image,
            label: &mut label,
            channels: 1,
            depth: 3,
            height: 16,
            width: 16,
        };
        augment(&spec, &mut stack, &mut Rng::new(11));
        for plane in 0..3 {
            assert_eq!(label[plane * 256..(plane + 1) * 256], single_label[..]);
            for (a, b) in image[plane * 256..(plane + 1) * 256]
                .iter()
                .zip(&single_image)
            {
                assert!((a - b).abs() < 1e-5, "plane {plane}: {a} vs {b}");
            }
        }
    }

    /// A rotation by exactly 90 degrees (the range's ends, [90, 90]) moves the square to the
    /// quadrant a hand computation says, image and label alike.
    #[test]
    fn rotation_moves_image_and_label_together() {
        let (image, label) = on_square(|slice| warp(slice, std::f64::consts::FRAC_PI_2, 1.0, None));
        // Output (y, x) takes source (cos*y' - sin*x', sin*y' + cos*x') about the centre
        // 7.5: source row = 15 - x, source column = y. The square at rows and columns 2..6
        // lands at rows 2..6 and columns 10..14.
        for r in 0..16 {
            for c in 0..16 {
                let inside = (2..6).contains(&r) && (10..14).contains(&c);
                assert_eq!(label[r * 16 + c], u8::from(inside), "label at {r},{c}");
                let want = if inside { 1.0 } else { 0.0 };
                assert!((image[r * 16 + c] - want).abs() < 1e-5, "image at {r},{c}");
            }
        }
    }

    #[test]
    fn zoom_and_elastic_keep_labels_crisp_and_follow_the_image() {
        let spec = only(|a| {
            a.scale = Some([0.7, 1.4]);
            a.elastic = Some([3.0, 4.0]);
            a.rotate_degrees = Some(30.0);
        });
        for seed in 0..20 {
            let (image, label) = run(&spec, seed);
            assert!(label.iter().all(|l| *l <= 1));
            // Every labelled pixel is bright and every clearly bright pixel is labelled: the
            // label moved with the image.
            for (v, l) in image.iter().zip(&label) {
                if *l == 1 {
                    assert!(*v > 0.25, "seed {seed}: labelled pixel of intensity {v}");
                }
                if *v > 0.75 {
                    assert_eq!(*l, 1, "seed {seed}: bright pixel {v} unlabelled");
                }
            }
        }
        assert_ne!(run(&spec, 1), run(&spec, 2), "random");
        assert_eq!(run(&spec, 3), run(&spec, 3), "seeded");
    }

    #[test]
    fn intensity_transforms_do_what_they_say() {
        let (base, base_label) = square();
        let (bright, label) = run(&only(|a| a.brightness = Some([2.0, 2.0])), 1);
        assert_eq!(label, base_label, "intensity transforms leave labels alone");
        assert!(bright.iter().zip(&base).all(|(b, v)| *b == 2.0 * v));
        let (shifted, _) = run(&only(|a| a.shift = Some([0.5, 0.5])), 1);
        assert!(shifted.iter().zip(&base).all(|(s, v)| *s == v + 0.5));
        let (blurred, _) = run(&only(|a| a.blur = Some([1.0, 1.0])), 1);
        let total = |p: &[f32]| p.iter().sum::<f32>();
        // Nearly all of it: the edge replication drops the kernel's far tail near the border.
        assert!(
            (total(&blurred) - total(&base)).abs() < 0.01 * total(&base),
            "blur keeps the sum"
        );
        assert!(
            blurred[2 * 16 + 2] < 1.0 && blurred[16 + 1] > 0.0,
            "and spreads the edge"
        );
        let (noisy, _) = run(&only(|a| a.noise = Some(0.5)), 1);
        assert!(noisy.iter().zip(&base).any(|(n, v)| n != v));
        // Gamma keeps mean and deviation but bends the curve: a ramp stops being linear.
        let mut ramp: Vec<f32> = (0..256).map(|i| i as f32 / 255.0).collect();
        let before = ramp.clone();
        gamma(&mut ramp, 2.0);
        let mean = |p: &[f32]| p.iter().sum::<f32>() / p.len() as f32;
        assert!((mean(&ramp) - mean(&before)).abs() < 1e-4);
        let mid = ramp[128] - (ramp[0] + ramp[255]) / 2.0;
        assert!(mid < -0.05, "convex for gamma 2: {mid}");
    }

    #[test]
    fn probability_zero_in_effect_changes_nothing() {
        let spec = Augmentation {
            probability: 1e-12,
            ..only(|a| {
                a.rotate_degrees = Some(90.0);
                a.noise = Some(1.0);
                a.gamma = Some([0.5, 2.0]);
            })
        };
        assert_eq!(run(&spec, 5), square());
    }
}
