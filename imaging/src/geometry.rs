//! Where voxels are in the patient: a NIfTI file's voxel-to-world affine, reorientation to
//! one canonical orientation, and resampling to a target voxel spacing.
//!
//! World coordinates are NIfTI's: millimetres, +x towards the patient's right, +y anterior,
//! +z superior (RAS+). medmesh's canonical orientation is **RAS**: after a
//! [`Reorientation`], array axis 0 runs from the patient's left to right, axis 1 from
//! posterior to anterior and axis 2 from inferior to superior, so a slice across axis 2 is an
//! axial plane whatever order the scanner stored its voxels in. An oblique volume goes to
//! the closest canonical orientation (as nibabel's `as_closest_canonical`): axes are
//! permuted and flipped, never interpolated, so no voxel value changes.

use nifti::NiftiHeader;

/// Why a header's geometry cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GeometryError {
    /// The affine maps two voxel axes onto one world direction (or an axis onto nothing).
    #[error("the voxel-to-world affine is degenerate: {0}")]
    Degenerate(String),
    /// A spacing that is zero, negative or not finite.
    #[error("voxel spacing {0:?} is not positive and finite")]
    Spacing([f64; 3]),
}

/// A voxel-to-world affine: `world = m[..][0..3] * (i, j, k) + m[..][3]`, rows x, y, z.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine(pub [[f64; 4]; 3]);

impl Affine {
    /// Spacing along each axis, translation zero.
    pub fn scaling(spacing: [f64; 3]) -> Self {
        let [a, b, c] = spacing;
        Self([[a, 0.0, 0.0, 0.0], [0.0, b, 0.0, 0.0], [0.0, 0.0, c, 0.0]])
    }

    /// The affine a NIfTI-1 header declares: its sform when `sform_code > 0`, else its
    /// qform (quaternion, `pixdim[0]` the handedness) when `qform_code > 0`, else the spec's
    /// method 1 (`pixdim` scaling, no rotation).
    pub fn from_nifti(h: &NiftiHeader) -> Self {
        let pixdim = |i: usize| f64::from(h.pixdim[i]);
        if h.sform_code > 0 {
            let row = |r: [f32; 4]| r.map(f64::from);
            return Self([row(h.srow_x), row(h.srow_y), row(h.srow_z)]);
        }
        let spacing = [pixdim(1), pixdim(2), pixdim(3)].map(|s| if s > 0.0 { s } else { 1.0 });
        if h.qform_code <= 0 {
            return Self::scaling(spacing);
        }
        let (b, c, d) = (
            f64::from(h.quatern_b),
            f64::from(h.quatern_c),
            f64::from(h.quatern_d),
        );
        let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let r = [
            [
                a * a + b * b - c * c - d * d,
                2.0 * (b * c - a * d),
                2.0 * (b * d + a * c),
            ],
            [
                2.0 * (b * c + a * d),
                a * a + c * c - b * b - d * d,
                2.0 * (c * d - a * b),
            ],
            [
                2.0 * (b * d - a * c),
                2.0 * (c * d + a * b),
                a * a + d * d - b * b - c * c,
            ],
        ];
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let scale = [spacing[0], spacing[1], spacing[2] * qfac];
        let offset = [
            f64::from(h.quatern_x),
            f64::from(h.quatern_y),
            f64::from(h.quatern_z),
        ];
        let mut m = [[0.0; 4]; 3];
        for (row, (r, o)) in m.iter_mut().zip(r.iter().zip(offset)) {
            for col in 0..3 {
                row[col] = r[col] * scale[col];
            }
            row[3] = o;
        }
        Self(m)
    }

    /// Where voxel `ijk` is, in millimetres.
    pub fn apply(&self, ijk: [f64; 3]) -> [f64; 3] {
        self.0
            .map(|r| r[0] * ijk[0] + r[1] * ijk[1] + r[2] * ijk[2] + r[3])
    }

    /// The distance between neighbouring voxels along each axis, in millimetres.
    pub fn spacing(&self) -> [f64; 3] {
        [0, 1, 2].map(|c| self.0.iter().map(|r| r[c] * r[c]).sum::<f64>().sqrt())
    }

    /// For each voxel axis, the world direction it points to most: `R`/`L`, `A`/`P`, `S`/`I`
    /// (nibabel's `aff2axcodes`). `LPS` is DICOM's patient orientation stored as-is.
    pub fn axcodes(&self) -> Result<[char; 3], GeometryError> {
        let r = Reorientation::to_ras(self)?;
        let mut codes = [' '; 3];
        for (out, (&input, &flip)) in r.axes.iter().zip(&r.flip).enumerate() {
            codes[input] = match (out, flip) {
                (0, false) => 'R',
                (0, true) => 'L',
                (1, false) => 'A',
                (1, true) => 'P',
                (2, false) => 'S',
                _ => 'I',
            };
        }
        Ok(codes)
    }
}

/// Axes permuted and flipped: output axis `a` is input axis `axes[a]`, reversed where
/// `flip[a]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reorientation {
    /// The input axis behind each output axis.
    pub axes: [usize; 3],
    /// Whether that input axis runs backwards.
    pub flip: [bool; 3],
}

impl Reorientation {
    /// The permutation and flips that bring a volume with `affine` closest to RAS: each
    /// voxel axis goes to the world axis its direction follows most, the strongest pairs
    /// first.
    pub fn to_ras(affine: &Affine) -> Result<Self, GeometryError> {
        let spacing = affine.spacing();
        if spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(GeometryError::Degenerate(format!(
                "an axis has length {spacing:?}"
            )));
        }
        // Direction cosines: cos[w][v] = world component w of voxel axis v, unit length.
        let cos: [[f64; 3]; 3] = [0, 1, 2].map(|w| [0, 1, 2].map(|v| affine.0[w][v] / spacing[v]));
        let mut axes = [usize::MAX; 3];
        let mut flip = [false; 3];
        let mut used_voxel = [false; 3];
        for _ in 0..3 {
            let mut best: Option<(usize, usize, f64)> = None;
            for (w, row) in cos.iter().enumerate() {
                if axes[w] != usize::MAX {
                    continue;
                }
                for (v, c) in row.iter().enumerate() {
                    if !used_voxel[v] && best.is_none_or(|(_, _, b)| c.abs() > b) {
                        best = Some((w, v, c.abs()));
                    }
                }
            }
            let Some((w, v, strength)) = best else {
                break;
            };
            if strength < 1e-6 {
                return Err(GeometryError::Degenerate(format!(
                    "voxel axis {v} has no component along world axis {w}"
                )));
            }
            axes[w] = v;
            flip[w] = cos[w][v] < 0.0;
            used_voxel[v] = true;
        }
        Ok(Self { axes, flip })
    }

    /// Whether it changes nothing.
    pub fn is_identity(&self) -> bool {
        self.axes == [0, 1, 2] && self.flip == [false; 3]
    }

    /// The dimensions after reorienting a volume of `dims`.
    pub fn dims(&self, dims: [usize; 3]) -> [usize; 3] {
        self.axes.map(|a| dims[a])
    }

    /// The affine of the reoriented volume (same world positions, new voxel order).
    pub fn affine(&self, affine: &Affine, dims: [usize; 3]) -> Affine {
        let mut m = [[0.0; 4]; 3];
        // Output voxel o maps to input voxel: in[axes[a]] = flip ? n-1-o[a] : o[a].
        let mut origin = [0.0; 3];
        for a in 0..3 {
            if self.flip[a] {
                origin[self.axes[a]] = (dims[self.axes[a]] - 1) as f64;
            }
        }
        let world_origin = affine.apply(origin);
        for (w, row) in m.iter_mut().enumerate() {
            for (a, out) in row.iter_mut().take(3).enumerate() {
                let col = affine.0[w][self.axes[a]];
                *out = if self.flip[a] { -col } else { col };
            }
            row[3] = world_origin[w];
        }
        Affine(m)
    }

    /// Reorients `channels` stacked x-fastest volumes of `dims`.
    pub fn apply<T: Copy>(&self, data: &[T], dims: [usize; 3], channels: usize) -> Vec<T> {
        let out_dims = self.dims(dims);
        let voxels: usize = dims.iter().product();
        let stride = [1, dims[0], dims[0] * dims[1]];
        let mut out = Vec::with_capacity(data.len());
        for c in 0..channels {
            let volume = &data[c * voxels..(c + 1) * voxels];
            for k in 0..out_dims[2] {
                for j in 0..out_dims[1] {
                    for i in 0..out_dims[0] {
                        let o = [i, j, k];
                        let mut at = 0;
                        for a in 0..3 {
                            let n = if self.flip[a] {
                                out_dims[a] - 1 - o[a]
                            } else {
                                o[a]
                            };
                            at += n * stride[self.axes[a]];
                        }
                        out.push(volume[at]);
                    }
                }
            }
        }
        out
    }
}

/// The dimensions a volume of `dims` at `from` spacing has at `to` spacing (as nnU-Net:
/// rounded, at least one voxel).
pub fn resampled_dims(dims: [usize; 3], from: [f64; 3], to: [f64; 3]) -> [usize; 3] {
    [0, 1, 2].map(|a| ((dims[a] as f64 * from[a] / to[a]).round() as usize).max(1))
}

/// Where output voxel `n` of `out` samples an axis of `len` input voxels: voxel centres
/// aligned, the volume's extent kept, clamped to the input.
fn source(n: usize, len: usize, out: usize) -> f64 {
    let x = (n as f64 + 0.5) * len as f64 / out as f64 - 0.5;
    x.clamp(0.0, (len - 1) as f64)
}

fn check(dims: [usize; 3], from: [f64; 3], to: [f64; 3]) -> Result<(), GeometryError> {
    if dims.contains(&0) {
        return Err(GeometryError::Degenerate(format!(
            "a volume of {dims:?} voxels has an empty axis"
        )));
    }
    for s in [from, to] {
        if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(GeometryError::Spacing(s));
        }
    }
    Ok(())
}

/// Resamples `channels` stacked x-fastest volumes of `dims` from spacing `from` to `to`
/// by trilinear interpolation (images). Returns the data and its dimensions.
pub fn resample_linear(
    data: &[f32],
    dims: [usize; 3],
    channels: usize,
    from: [f64; 3],
    to: [f64; 3],
) -> Result<(Vec<f32>, [usize; 3]), GeometryError> {
    check(dims, from, to)?;
    let out = resampled_dims(dims, from, to);
    let voxels: usize = dims.iter().product();
    // Each axis's two neighbours and the weight of the upper one, per output index.
    let taps: [Vec<(usize, usize, f32)>; 3] = [0, 1, 2].map(|a| {
        (0..out[a])
            .map(|n| {
                let x = source(n, dims[a], out[a]);
                let lo = x.floor() as usize;
                let hi = (lo + 1).min(dims[a] - 1);
                (lo, hi, (x - lo as f64) as f32)
            })
            .collect()
    });
    let at = |i: usize, j: usize, k: usize| i + dims[0] * (j + dims[1] * k);
    let mut result = Vec::with_capacity(out.iter().product::<usize>() * channels);
    for c in 0..channels {
        let v = &data[c * voxels..(c + 1) * voxels];
        for &(k0, k1, wk) in &taps[2] {
            for &(j0, j1, wj) in &taps[1] {
                for &(i0, i1, wi) in &taps[0] {
                    let line =
                        |j: usize, k: usize| v[at(i0, j, k)] * (1.0 - wi) + v[at(i1, j, k)] * wi;
                    let plane = |k: usize| line(j0, k) * (1.0 - wj) + line(j1, k) * wj;
                    result.push(plane(k0) * (1.0 - wk) + plane(k1) * wk);
                }
            }
        }
    }
    Ok((result, out))
}

/// Resamples an x-fastest label volume of `dims` from spacing `from` to `to` by nearest
/// neighbour (labels stay labels).
pub fn resample_nearest(
    data: &[u8],
    dims: [usize; 3],
    from: [f64; 3],
    to: [f64; 3],
) -> Result<(Vec<u8>, [usize; 3]), GeometryError> {
    check(dims, from, to)?;
    let out = resampled_dims(dims, from, to);
    let taps: [Vec<usize>; 3] = [0, 1, 2].map(|a| {
        (0..out[a])
            .map(|n| (source(n, dims[a], out[a]) + 0.5).floor() as usize)
            .map(|i| i.min(dims[a] - 1))
            .collect()
    });
    let mut result = Vec::with_capacity(out.iter().product());
    for &k in &taps[2] {
        for &j in &taps[1] {
            for &i in &taps[0] {
                result.push(data[i + dims[0] * (j + dims[1] * k)]);
            }
        }
    }
    Ok((result, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2 x 3 x 4 volume whose value is its voxel index written as `100 i + 10 j + k`.
    fn numbered(dims: [usize; 3]) -> Vec<f32> {
        let mut v = Vec::new();
        for k in 0..dims[2] {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    v.push((100 * i + 10 * j + k) as f32);
                }
            }
        }
        v
    }

    fn value_at(data: &[f32], dims: [usize; 3], [i, j, k]: [usize; 3]) -> f32 {
        data[i + dims[0] * (j + dims[1] * k)]
    }

    /// Every output voxel sits where its input voxel sat: the world position of each
    /// voxel is kept by the new affine.
    fn assert_same_world(affine: &Affine, dims: [usize; 3]) {
        let r = Reorientation::to_ras(affine).unwrap();
        let data = numbered(dims);
        let out = r.apply(&data, dims, 1);
        let out_dims = r.dims(dims);
        let out_affine = r.affine(affine, dims);
        assert_eq!(out_affine.axcodes().unwrap(), ['R', 'A', 'S']);
        for k in 0..out_dims[2] {
            for j in 0..out_dims[1] {
                for i in 0..out_dims[0] {
                    let v = value_at(&out, out_dims, [i, j, k]) as usize;
                    let input = [v / 100, v / 10 % 10, v % 10].map(|x| x as f64);
                    let here = out_affine.apply([i, j, k].map(|x| x as f64));
                    let there = affine.apply(input);
                    for a in 0..3 {
                        assert!((here[a] - there[a]).abs() < 1e-9, "{here:?} {there:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn ras_is_left_alone() {
        let a = Affine::scaling([1.0, 2.0, 3.0]);
        assert_eq!(a.axcodes().unwrap(), ['R', 'A', 'S']);
        assert!(Reorientation::to_ras(&a).unwrap().is_identity());
        assert_eq!(a.spacing(), [1.0, 2.0, 3.0]);
    }

    #[test]
    fn a_flipped_axis_is_reversed() {
        // LAS (radiological): voxel i runs right to left.
        let a = Affine([
            [-2.0, 0.0, 0.0, 10.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
        ]);
        assert_eq!(a.axcodes().unwrap(), ['L', 'A', 'S']);
        let r = Reorientation::to_ras(&a).unwrap();
        let dims = [2, 3, 4];
        let out = r.apply(&numbered(dims), dims, 1);
        // Hand-computed: output voxel (0, j, k) is input voxel (1, j, k).
        assert_eq!(value_at(&out, dims, [0, 2, 3]), 123.0);
        assert_eq!(value_at(&out, dims, [1, 2, 3]), 23.0);
        assert_same_world(&a, dims);
    }

    #[test]
    fn permuted_axes_come_back_in_ras_order() {
        // DICOM-like LPS with the slices along y: i -> -x (L), j -> -z (I), k -> -y (P).
        let a = Affine([
            [-0.5, 0.0, 0.0, 0.0],
            [0.0, 0.0, -3.0, 0.0],
            [0.0, -1.0, 0.0, 0.0],
        ]);
        assert_eq!(a.axcodes().unwrap(), ['L', 'I', 'P']);
        let r = Reorientation::to_ras(&a).unwrap();
        assert_eq!(r.axes, [0, 2, 1]);
        assert_eq!(r.flip, [true, true, true]);
        let dims = [2, 3, 4];
        assert_eq!(r.dims(dims), [2, 4, 3]);
        let out = r.apply(&numbered(dims), dims, 1);
        // Output (0, 0, 0) is the input's last x, last k (y = P reversed), last j.
        assert_eq!(value_at(&out, [2, 4, 3], [0, 0, 0]), 123.0);
        assert_eq!(r.affine(&a, dims).spacing(), [0.5, 3.0, 1.0]);
        assert_same_world(&a, dims);
    }

    #[test]
    fn an_oblique_volume_goes_to_the_closest_canonical_orientation() {
        // Rotated 30 degrees about z, then axes i and j swapped: i follows y most.
        let (s, c) = (30f64.to_radians().sin(), 30f64.to_radians().cos());
        let a = Affine([
            [-s * 2.0, c, 0.0, 1.0],
            [c * 2.0, s, 0.0, 2.0],
            [0.0, 0.0, 1.5, 3.0],
        ]);
        assert_eq!(a.axcodes().unwrap(), ['A', 'R', 'S']);
        let r = Reorientation::to_ras(&a).unwrap();
        assert_eq!(r.axes, [1, 0, 2]);
        assert_same_world(&a, [2, 3, 4]);
    }

    #[test]
    fn a_degenerate_affine_is_refused() {
        let a = Affine([
            [1.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
        ]);
        assert!(matches!(
            Reorientation::to_ras(&a),
            Err(GeometryError::Degenerate(_))
        ));
    }

    #[test]
    fn qform_quaternions_give_the_rotation() {
        // 180 degrees about z: b = c = 0, d = 1 -> x and y flip.
        let mut h = NiftiHeader {
            qform_code: 1,
            sform_code: 0,
            pixdim: [1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0],
            quatern_d: 1.0,
            quatern_x: 5.0,
            ..NiftiHeader::default()
        };
        let a = Affine::from_nifti(&h);
        assert_eq!(
            a.0,
            [
                [-2.0, 0.0, 0.0, 5.0],
                [0.0, -3.0, 0.0, 0.0],
                [0.0, 0.0, 4.0, 0.0]
            ]
        );
        assert_eq!(a.axcodes().unwrap(), ['L', 'P', 'S']);
        // qfac -1 flips k.
        h.pixdim[0] = -1.0;
        assert_eq!(Affine::from_nifti(&h).axcodes().unwrap(), ['L', 'P', 'I']);
        // sform wins over qform.
        h.sform_code = 2;
        h.srow_x = [1.0, 0.0, 0.0, 0.0];
        h.srow_y = [0.0, 1.0, 0.0, 0.0];
        h.srow_z = [0.0, 0.0, 1.0, 0.0];
        assert_eq!(Affine::from_nifti(&h), Affine::scaling([1.0; 3]));
    }

    #[test]
    fn linear_resampling_matches_hand_computed_values() {
        // Along x: 4 voxels at 1 mm to 2 at 2 mm: the means of neighbouring pairs.
        let (down, dims) = resample_linear(
            &[0.0, 2.0, 4.0, 10.0],
            [4, 1, 1],
            1,
            [1.0; 3],
            [2.0, 1.0, 1.0],
        )
        .unwrap();
        assert_eq!(dims, [2, 1, 1]);
        assert_eq!(down, vec![1.0, 7.0]);
        // Along z: 2 voxels at 2 mm to 4 at 1 mm: the ends kept, quarters in between.
        let (up, dims) =
            resample_linear(&[0.0, 8.0], [1, 1, 2], 1, [1.0, 1.0, 2.0], [1.0; 3]).unwrap();
        assert_eq!(dims, [1, 1, 4]);
        assert_eq!(up, vec![0.0, 2.0, 6.0, 8.0]);
        // Trilinear: a linear ramp stays a ramp, each channel on its own.
        let dims = [3, 3, 3];
        let ramp: Vec<f32> = (0..27)
            .map(|n| (n % 3 + 2 * (n / 3 % 3) + 3 * (n / 9)) as f32)
            .collect();
        let two = [ramp.clone(), ramp.iter().map(|v| -v).collect()].concat();
        let (out, od) = resample_linear(&two, dims, 2, [1.0; 3], [0.5; 3]).unwrap();
        assert_eq!(od, [6, 6, 6]);
        let x = |n: usize| source(n, 3, 6) as f32;
        let expect = x(5) + 2.0 * x(2) + 3.0 * x(1);
        let got = out[5 + 6 * (2 + 6)];
        assert!((got - expect).abs() < 1e-5, "{got} {expect}");
        assert!((out[216 + 5 + 6 * (2 + 6)] + expect).abs() < 1e-5);
        assert!(resample_linear(&[0.0], [1, 1, 1], 1, [0.0, 1.0, 1.0], [1.0; 3]).is_err());
        assert!(resample_nearest(&[], [0, 1, 1], [1.0; 3], [2.0; 3]).is_err());
    }

    #[test]
    fn nearest_resampling_keeps_labels() {
        let (out, dims) =
            resample_nearest(&[0, 1, 2, 3], [4, 1, 1], [1.0; 3], [2.0, 1.0, 1.0]).unwrap();
        assert_eq!(dims, [2, 1, 1]);
        // Sample points 0.5 and 2.5 round up to voxels 1 and 3.
        assert_eq!(out, vec![1, 3]);
        let (out, _) = resample_nearest(&[0, 1], [1, 1, 2], [1.0, 1.0, 2.0], [1.0; 3]).unwrap();
        assert_eq!(out, vec![0, 0, 1, 1]);
    }
}
