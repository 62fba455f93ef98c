//! Segmentation metrics on predicted and true label maps.

/// Dice and IoU of one class between two label maps. A class absent from both counts as a
/// perfect match (1.0): predicting nothing where there is nothing is right.
pub fn dice_iou(pred: &[u8], truth: &[u8], class: u8) -> (f64, f64) {
    let (mut inter, mut p, mut t) = (0usize, 0usize, 0usize);
    for (a, b) in pred.iter().zip(truth) {
        let (pa, tb) = (*a == class, *b == class);
        inter += usize::from(pa && tb);
        p += usize::from(pa);
        t += usize::from(tb);
    }
    if p + t == 0 {
        return (1.0, 1.0);
    }
    let dice = 2.0 * inter as f64 / (p + t) as f64;
    let iou = inter as f64 / (p + t - inter) as f64;
    (dice, iou)
}

/// Per-class Dice and IoU for classes `1..classes` (background excluded), and their means.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scores {
    /// Dice per foreground class.
    pub dice: Vec<f64>,
    /// IoU per foreground class.
    pub iou: Vec<f64>,
}

impl Scores {
    /// Scores of a prediction.
    pub fn of(pred: &[u8], truth: &[u8], classes: usize) -> Self {
        let (dice, iou) = (1..classes as u8).map(|c| dice_iou(pred, truth, c)).unzip();
        Self { dice, iou }
    }

    /// Mean Dice over foreground classes.
    pub fn mean_dice(&self) -> f64 {
        mean(&self.dice)
    }

    /// Mean IoU over foreground classes.
    pub fn mean_iou(&self) -> f64 {
        mean(&self.iou)
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        1.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_and_iou_basics() {
        assert_eq!(dice_iou(&[1, 1, 0, 0], &[1, 1, 0, 0], 1), (1.0, 1.0));
        assert_eq!(
            dice_iou(&[0, 0], &[0, 0], 1),
            (1.0, 1.0),
            "empty vs empty is perfect"
        );
        assert_eq!(dice_iou(&[1, 0], &[0, 0], 1), (0.0, 0.0));
        let (d, i) = dice_iou(&[1, 1, 0, 0], &[1, 0, 1, 0], 1);
        assert!((d - 0.5).abs() < 1e-12 && (i - 1.0 / 3.0).abs() < 1e-12);
        let s = Scores::of(&[0, 1, 2, 2], &[0, 1, 2, 1], 3);
        assert_eq!(s.dice.len(), 2);
        assert!((s.mean_dice() - (2.0 / 3.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    }
}

/// 95th-percentile symmetric Hausdorff distance (in voxels) between the surfaces of `class`
/// in two label volumes of `dims` (x fastest): the larger of the two directed 95th
/// percentiles, as MONAI computes it. `Some(0.0)` when the class is absent from both, `None`
/// when it is absent from exactly one (the distance is undefined).
///
/// Exact Euclidean distances via separable squared-distance transforms (Felzenszwalb and
/// Huttenlocher), so it runs in time linear in the voxel count.
pub fn hd95(pred: &[u8], truth: &[u8], dims: [usize; 3], class: u8) -> Option<f64> {
    let a = surface(pred, dims, class);
    let b = surface(truth, dims, class);
    match (a.iter().any(|&s| s), b.iter().any(|&s| s)) {
        (false, false) => return Some(0.0),
        (true, false) | (false, true) => return None,
        _ => {}
    }
    let directed = |from: &[bool], to: &[bool]| {
        let dist = squared_distance_transform(to, dims);
        let mut d: Vec<f64> = from
            .iter()
            .zip(&dist)
            .filter(|(s, _)| **s)
            .map(|(_, d)| d.sqrt())
            .collect();
        percentile(&mut d, 95.0)
    };
    Some(directed(&a, &b).max(directed(&b, &a)))
}

/// Voxels of `class` with a 6-neighbour outside it or beyond the volume's edge. Axes of
/// length 1 (a single slice) have no neighbours along them: a 2D image has a 2D boundary.
fn surface(labels: &[u8], [nx, ny, nz]: [usize; 3], class: u8) -> Vec<bool> {
    let at = |x: usize, y: usize, z: usize| labels[x + nx * (y + ny * z)] == class;
    let open = |i: usize, n: usize| n > 1 && (i == 0 || i + 1 == n);
    (0..nx * ny * nz)
        .map(|i| {
            let (x, y, z) = (i % nx, (i / nx) % ny, i / (nx * ny));
            at(x, y, z)
                && (open(x, nx)
                    || open(y, ny)
                    || open(z, nz)
                    || (nx > 1 && (!at(x - 1, y, z) || !at(x + 1, y, z)))
                    || (ny > 1 && (!at(x, y - 1, z) || !at(x, y + 1, z)))
                    || (nz > 1 && (!at(x, y, z - 1) || !at(x, y, z + 1))))
        })
        .collect()
}

/// Squared Euclidean distance from every voxel to the nearest `true` voxel.
fn squared_distance_transform(seeds: &[bool], [nx, ny, nz]: [usize; 3]) -> Vec<f64> {
    let mut d: Vec<f64> = seeds
        .iter()
        .map(|&s| if s { 0.0 } else { f64::INFINITY })
        .collect();
    let mut line = Vec::new();
    let mut out = Vec::new();
    let strides = [(nx, 1, ny * nz), (ny, nx, nx * nz), (nz, nx * ny, nx * ny)];
    for (axis, &(len, stride, count)) in strides.iter().enumerate() {
        for k in 0..count {
            let base = match axis {
                0 => k * nx,
                1 => (k % nx) + (k / nx) * nx * ny,
                _ => k,
            };
            line.clear();
            line.extend((0..len).map(|i| d[base + i * stride]));
            distance_1d(&line, &mut out);
            for (i, v) in out.iter().enumerate() {
                d[base + i * stride] = *v;
            }
        }
    }
    d
}

/// 1D squared-distance transform of a sampled function (lower envelope of parabolas).
fn distance_1d(f: &[f64], out: &mut Vec<f64>) {
    let n = f.len();
    out.clear();
    out.resize(n, f64::INFINITY);
    let mut v = vec![0usize; n];
    let mut z = vec![0f64; n + 1];
    let mut k = 0usize;
    let Some(first) = f.iter().position(|x| x.is_finite()) else {
        return;
    };
    v[0] = first;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in first + 1..n {
        if !f[q].is_finite() {
            continue;
        }
        let meet = |p: usize| {
            ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * (q as f64 - p as f64))
        };
        let mut s = meet(v[k]);
        // z[0] is -inf, so this stops at k = 0 at the latest.
        while s <= z[k] {
            k -= 1;
            s = meet(v[k]);
        }
        k += 1;
        v[k] = q;
        z[k] = s;
        z[k + 1] = f64::INFINITY;
    }
    let mut j = 0;
    for (q, o) in out.iter_mut().enumerate() {
        while z[j + 1] < q as f64 {
            j += 1;
        }
        let p = v[j];
        *o = (q as f64 - p as f64).powi(2) + f[p];
    }
}

fn percentile(values: &mut [f64], pct: f64) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    let rank = (pct / 100.0 * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

#[cfg(test)]
mod hausdorff_tests {
    use super::*;

    fn square(n: usize, x0: usize, y0: usize, side: usize) -> Vec<u8> {
        (0..n * n)
            .map(|i| {
                u8::from((x0..x0 + side).contains(&(i % n)) && (y0..y0 + side).contains(&(i / n)))
            })
            .collect()
    }

    #[test]
    fn shifted_squares_are_their_shift_apart() {
        let a = square(32, 5, 5, 10);
        assert_eq!(hd95(&a, &a, [32, 32, 1], 1), Some(0.0));
        let b = square(32, 8, 5, 10);
        let d = hd95(&a, &b, [32, 32, 1], 1).unwrap();
        assert!((d - 3.0).abs() < 1e-9, "{d}");
        // Diagonal shift: compare with a brute-force computation over the surfaces.
        let c = square(32, 9, 9, 10);
        let d = hd95(&a, &c, [32, 32, 1], 1).unwrap();
        assert!((d - brute_hd95(&a, &c, 32)).abs() < 1e-9, "{d}");
        assert_eq!(hd95(&a, &vec![0; 1024], [32, 32, 1], 1), None);
        assert_eq!(
            hd95(&vec![0; 1024], &vec![0; 1024], [32, 32, 1], 1),
            Some(0.0)
        );
    }

    fn brute_hd95(a: &[u8], b: &[u8], n: usize) -> f64 {
        let sa = surface(a, [n, n, 1], 1);
        let sb = surface(b, [n, n, 1], 1);
        let pts = |s: &[bool]| -> Vec<(f64, f64)> {
            (0..n * n)
                .filter(|&i| s[i])
                .map(|i| ((i % n) as f64, (i / n) as f64))
                .collect()
        };
        let (pa, pb) = (pts(&sa), pts(&sb));
        let directed = |from: &[(f64, f64)], to: &[(f64, f64)]| {
            let mut d: Vec<f64> = from
                .iter()
                .map(|p| {
                    to.iter()
                        .map(|q| ((p.0 - q.0).powi(2) + (p.1 - q.1).powi(2)).sqrt())
                        .fold(f64::INFINITY, f64::min)
                })
                .collect();
            percentile(&mut d, 95.0)
        };
        directed(&pa, &pb).max(directed(&pb, &pa))
    }

    #[test]
    fn interior_is_not_surface() {
        let a = square(8, 2, 2, 4);
        let s = surface(&a, [8, 8, 1], 1);
        assert_eq!(
            s.iter().filter(|&&v| v).count(),
            12,
            "a 4x4 square has 12 boundary pixels"
        );
    }

    #[test]
    fn distance_transform_matches_brute_force() {
        let dims = [7, 6, 5];
        let n = 7 * 6 * 5;
        let seeds: Vec<bool> = (0..n).map(|i| i % 17 == 3 || i == 100).collect();
        let d = squared_distance_transform(&seeds, dims);
        let coord = |i: usize| ((i % 7) as f64, ((i / 7) % 6) as f64, (i / 42) as f64);
        for (i, got) in d.iter().enumerate() {
            let (x, y, z) = coord(i);
            let brute = (0..n)
                .filter(|&j| seeds[j])
                .map(|j| {
                    let (a, b, c) = coord(j);
                    (x - a).powi(2) + (y - b).powi(2) + (z - c).powi(2)
                })
                .fold(f64::INFINITY, f64::min);
            assert_eq!(*got, brute, "voxel {i}");
        }
    }
}
