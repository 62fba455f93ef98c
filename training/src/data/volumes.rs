//! Whole volumes for a 3D UNet (`model.dims = 3`): each case resampled and normalized exactly
//! as [`super::slices`] does for 2D, laid out as the network reads patches
//! (`[channel][depth][row][column]`, depth across the manifest's plane), and random patches
//! drawn from it with nnU-Net's foreground oversampling.
//!
//! Unlike slices, volumes are held in memory: a node checks their size against its data
//! budget before training (see `node.data_memory_mib`).

use medmesh_protocol::Manifest;

use super::slices::{SliceOptions, normalize, options_for, split_cases};
use super::{Case, DataError};
use crate::rng::Rng;

/// nnU-Net's share of patches forced to contain foreground.
pub const FOREGROUND_OVERSAMPLING: f64 = 1.0 / 3.0;

/// One case in patch layout.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeCase {
    /// Case name.
    pub name: String,
    /// Extent along (depth, rows, columns): the plane's normal, then the plane's rows and
    /// columns as 2D slices have them.
    pub dims: [usize; 3],
    /// `channels` volumes of `dims`, columns fastest.
    pub image: Vec<f32>,
    /// Class per voxel.
    pub label: Vec<u8>,
    /// Indices of the voxels with a foreground class, for oversampling.
    foreground: Vec<u32>,
}

impl VolumeCase {
    /// A case already in patch layout: `image` holds `image.len() / voxels` channels of
    /// `dims` (depth, rows, columns), columns fastest; `label` one class per voxel.
    pub fn new(name: &str, dims: [usize; 3], image: Vec<f32>, label: Vec<u8>) -> Self {
        let foreground = label
            .iter()
            .enumerate()
            .filter(|(_, l)| **l != 0)
            .map(|(i, _)| i as u32)
            .collect();
        VolumeCase {
            name: name.to_owned(),
            dims,
            image,
            label,
            foreground,
        }
    }

    fn voxels(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A site's volumes and the patch size the network trains on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeSet {
    /// Channels per image.
    pub channels: usize,
    /// Patch extent along (depth, rows, columns).
    pub patch: [usize; 3],
    /// The cases.
    pub cases: Vec<VolumeCase>,
}

/// The patch a manifest asks for: `task.input_depth` planes of `task.input_size`.
fn patch_of(manifest: &Manifest) -> [usize; 3] {
    let [h, w] = manifest.task.input_size;
    let d = manifest.task.input_depth.unwrap_or(1);
    [d as usize, h as usize, w as usize]
}

impl VolumeSet {
    /// `cases` in patch layout for `manifest` (see [`VolumeSet::push`]).
    pub fn from_cases(cases: &[Case], manifest: &Manifest) -> Result<VolumeSet, DataError> {
        let channels = cases.first().map_or(1, |c| c.image.channels);
        let mut set = VolumeSet::empty(manifest, channels);
        for case in cases {
            set.push(case, manifest)?;
        }
        Ok(set)
    }

    /// No cases yet, with `manifest`'s patch.
    pub fn empty(manifest: &Manifest, channels: usize) -> VolumeSet {
        VolumeSet {
            channels,
            patch: patch_of(manifest),
            cases: Vec::new(),
        }
    }

    /// Adds `case` for `manifest`: resampled to its target spacing (when set), normalized
    /// as its slices would be, and turned so that depth runs across its plane.
    pub fn push(&mut self, case: &Case, manifest: &Manifest) -> Result<(), DataError> {
        let opts = options_for(manifest);
        let resampled;
        let case = match manifest.task.target_spacing {
            Some(to) => {
                resampled = case.resampled(to)?;
                &resampled
            }
            None => case,
        };
        self.cases.push(arrange(case, &opts));
        Ok(())
    }

    /// Number of cases: one patch each per epoch.
    pub fn len(&self) -> usize {
        self.cases.len()
    }

    /// Whether there are no cases.
    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }

    /// Bytes the volumes hold in memory.
    pub fn bytes(&self) -> u64 {
        self.cases
            .iter()
            .map(|c| (c.image.len() * 4 + c.label.len() + c.foreground.len() * 4) as u64)
            .sum()
    }

    /// The given cases, in order.
    pub fn subset(&self, cases: &[usize]) -> VolumeSet {
        VolumeSet {
            cases: cases.iter().map(|&c| self.cases[c].clone()).collect(),
            ..self.empty_like()
        }
    }

    /// Several sets in one (the pooled baseline); case names are prefixed with the set's index.
    pub fn concat(sets: &[&VolumeSet]) -> VolumeSet {
        let mut out = sets
            .first()
            .map_or_else(VolumeSet::default, |s| s.empty_like());
        for (k, set) in sets.iter().enumerate() {
            out.cases.extend(set.cases.iter().map(|c| VolumeCase {
                name: format!("{k}/{}", c.name),
                ..c.clone()
            }));
        }
        out
    }

    fn empty_like(&self) -> VolumeSet {
        VolumeSet {
            channels: self.channels,
            patch: self.patch,
            cases: Vec::new(),
        }
    }

    /// Splits by case into (training, validation) exactly as 2D slices split.
    pub fn split(&self, fraction: f64, seed: u64) -> (VolumeSet, VolumeSet) {
        let (train, val) = split_cases(self.cases.len(), fraction, seed);
        (self.subset(&train), self.subset(&val))
    }

    /// A random training patch of case `case`, `[channels][depth][rows][columns]` and its
    /// labels: with probability [`FOREGROUND_OVERSAMPLING`] centred on a random foreground
    /// voxel, otherwise anywhere. Where the patch reaches past the volume (a volume smaller
    /// than the patch lies at a random offset inside it), images are 0 (the normalized mean)
    /// and labels background.
    pub fn random_patch(&self, case: usize, rng: &mut Rng) -> (Vec<f32>, Vec<u8>) {
        let c = &self.cases[case];
        let centre =
            (rng.uniform() < FOREGROUND_OVERSAMPLING && !c.foreground.is_empty()).then(|| {
                let v = c.foreground[rng.below(c.foreground.len())] as usize;
                let [_, rows, cols] = c.dims;
                [v / (rows * cols), (v / cols) % rows, v % cols]
            });
        let start: [isize; 3] = std::array::from_fn(|a| {
            let (dim, p) = (c.dims[a] as isize, self.patch[a] as isize);
            let (lo, hi) = ((dim - p).min(0), (dim - p).max(0));
            match centre {
                Some(at) => (at[a] as isize - p / 2).clamp(lo, hi),
                None => lo + rng.below((hi - lo + 1) as usize) as isize,
            }
        });
        self.crop(case, start)
    }

    /// The patch of case `case` whose first voxel is at `start` (which may lie outside).
    pub fn crop(&self, case: usize, start: [isize; 3]) -> (Vec<f32>, Vec<u8>) {
        let c = &self.cases[case];
        let [pd, ph, pw] = self.patch;
        let [d, h, w] = c.dims;
        let mut image = vec![0f32; self.channels * pd * ph * pw];
        let mut label = vec![0u8; pd * ph * pw];
        // Columns inside the volume, the same for every row.
        let x0 = start[2].max(0) as usize;
        let x1 = ((start[2] + pw as isize).min(w as isize)).max(0) as usize;
        if x0 >= x1 {
            return (image, label);
        }
        for z in 0..pd {
            let sz = start[0] + z as isize;
            if sz < 0 || sz >= d as isize {
                continue;
            }
            for y in 0..ph {
                let sy = start[1] + y as isize;
                if sy < 0 || sy >= h as isize {
                    continue;
                }
                let src = (sz as usize * h + sy as usize) * w;
                let dst = (z * ph + y) * pw + (x0 as isize - start[2]) as usize;
                let n = x1 - x0;
                label[dst..dst + n].copy_from_slice(&c.label[src + x0..src + x1]);
                for ch in 0..self.channels {
                    let (s, t) = (ch * c.voxels(), ch * pd * ph * pw);
                    image[t + dst..t + dst + n]
                        .copy_from_slice(&c.image[s + src + x0..s + src + x1]);
                }
            }
        }
        (image, label)
    }

    /// Where patches start to cover case `case` (each axis: steps of a patch, the last one
    /// flush with the end; one centred patch where the volume is smaller).
    pub fn tiles(&self, case: usize) -> Vec<[isize; 3]> {
        let starts = |a: usize| -> Vec<isize> {
            let (dim, p) = (self.cases[case].dims[a] as isize, self.patch[a] as isize);
            if dim <= p {
                return vec![(dim - p) / 2];
            }
            let mut s: Vec<isize> = (0..dim - p).step_by(p as usize).collect();
            s.push(dim - p);
            s
        };
        let (zs, ys, xs) = (starts(0), starts(1), starts(2));
        let mut out = Vec::with_capacity(zs.len() * ys.len() * xs.len());
        for &z in &zs {
            for &y in &ys {
                for &x in &xs {
                    out.push([z, y, x]);
                }
            }
        }
        out
    }
}

/// Normalizes `case` and lays it out as (depth across the plane, rows, columns), the axes
/// [`super::slices`] slices along and within.
fn arrange(case: &Case, opts: &SliceOptions) -> VolumeCase {
    let normalized = normalize(case, opts);
    let dims = case.image.dims;
    let normal = opts.axis.min(2);
    let (rows_axis, cols_axis) = match normal {
        0 => (2, 1),
        1 => (2, 0),
        _ => (1, 0),
    };
    let out_dims = [dims[normal], dims[rows_axis], dims[cols_axis]];
    let voxels = case.image.voxels();
    let mut order = Vec::with_capacity(voxels);
    for s in 0..out_dims[0] {
        for r in 0..out_dims[1] {
            for c in 0..out_dims[2] {
                let mut p = [0usize; 3];
                p[normal] = s;
                p[rows_axis] = r;
                p[cols_axis] = c;
                order.push(p[0] + dims[0] * (p[1] + dims[1] * p[2]));
            }
        }
    }
    let image = (0..case.image.channels)
        .flat_map(|ch| {
            let plane = &normalized[ch * voxels..(ch + 1) * voxels];
            order.iter().map(move |&i| plane[i])
        })
        .collect();
    let label = order.iter().map(|&i| case.label.data[i]).collect();
    VolumeCase::new(&case.name, out_dims, image, label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{LabelVolume, Volume};

    /// A 4 x 3 x 2 (x, y, z) case whose voxel value is its RAS index and whose one
    /// foreground voxel is (3, 2, 1).
    fn case() -> Case {
        let dims = [4, 3, 2];
        let mut label = vec![0u8; 24];
        label[3 + 4 * (2 + 3)] = 1;
        Case {
            name: "c".into(),
            image: Volume {
                dims,
                spacing: [1.0; 3],
                channels: 1,
                data: (0..24).map(|v| v as f32).collect(),
            },
            label: LabelVolume { dims, data: label },
        }
    }

    fn manifest(plane: &str, patch: [u32; 3]) -> Manifest {
        let mut m =
            Manifest::parse(include_str!("../../../examples/synthetic-quickstart.toml")).unwrap();
        m.model.dims = 3;
        m.task.input_depth = Some(patch[0]);
        m.task.input_size = [patch[1], patch[2]];
        m.task.plane = match plane {
            "sagittal" => medmesh_protocol::manifest::Plane::Sagittal,
            "coronal" => medmesh_protocol::manifest::Plane::Coronal,
            _ => medmesh_protocol::manifest::Plane::Axial,
        };
        m
    }

    /// Axial patches run (z, y, x); sagittal ones (x, z, y), as sagittal slices have rows
    /// along z and columns along y. Checked on the label, which normalization leaves alone.
    #[test]
    fn depth_runs_across_the_plane() {
        let axial = VolumeSet::from_cases(&[case()], &manifest("axial", [2, 3, 4])).unwrap();
        assert_eq!(axial.cases[0].dims, [2, 3, 4]);
        assert_eq!(axial.cases[0].foreground, [(3 + 2) * 4 + 3]);
        let sagittal = VolumeSet::from_cases(&[case()], &manifest("sagittal", [4, 2, 3])).unwrap();
        assert_eq!(sagittal.cases[0].dims, [4, 2, 3]);
        // x = 3, z = 1, y = 2.
        assert_eq!(sagittal.cases[0].foreground, [(3 * 2 + 1) * 3 + 2]);
    }

    /// A crop reaching outside the volume pads with zeros and background, and keeps what is
    /// inside in place.
    #[test]
    fn crops_pad_outside_the_volume() {
        let set = VolumeSet::from_cases(&[case()], &manifest("axial", [2, 3, 4])).unwrap();
        let (full, labels) = set.crop(0, [0, 0, 0]);
        assert_eq!(full, set.cases[0].image);
        assert_eq!(labels, set.cases[0].label);
        let (shifted, labels) = set.crop(0, [1, -1, 2]);
        // Output (0, 1, 0) is volume (1, 0, 2); output (1, .., ..) is past the last plane.
        assert_eq!(shifted[4], set.cases[0].image[12 + 2]);
        assert!(shifted[12..].iter().all(|v| *v == 0.0));
        assert_eq!(shifted[0..4], [0.0; 4], "row -1 is outside");
        assert!(
            !labels.contains(&1),
            "the foreground voxel's row 2 lands at row 3, outside"
        );
        let (_, labels) = set.crop(0, [1, 0, 2]);
        assert_eq!(
            labels[2 * 4 + 1],
            1,
            "the foreground voxel (1, 2, 3) lands at (0, 2, 1)"
        );
        assert_eq!(labels.iter().filter(|l| **l == 1).count(), 1);
    }

    /// About a third of random patches are forced onto foreground, which a 1-voxel lesion
    /// would otherwise almost never be in.
    #[test]
    fn patches_oversample_foreground() {
        let mut c = case();
        let dims = [32, 32, 32];
        c.image = Volume {
            dims,
            spacing: [1.0; 3],
            channels: 1,
            data: vec![1.0; 32 * 32 * 32],
        };
        c.label = LabelVolume {
            dims,
            data: vec![0; 32 * 32 * 32],
        };
        c.label.data[5 + 32 * (7 + 32 * 30)] = 1;
        let set = VolumeSet::from_cases(&[c], &manifest("axial", [8, 16, 16])).unwrap();
        let mut rng = Rng::new(3);
        let hits = (0..600)
            .filter(|_| set.random_patch(0, &mut rng).1.contains(&1))
            .count();
        // Forced: 1/3; by chance (2/25 of z starts, 8/17 of y's, 6/17 of x's) 1.3% of the rest.
        assert!((160..240).contains(&hits), "{hits} of 600");
    }

    /// Tiles cover every voxel: steps of a patch, the last flush with the end, and a
    /// centred one along an axis shorter than the patch.
    #[test]
    fn tiles_cover_the_volume() {
        let mut set = VolumeSet::from_cases(&[case()], &manifest("axial", [8, 16, 16])).unwrap();
        set.cases[0].dims = [20, 16, 40];
        set.patch = [8, 32, 16];
        let tiles = set.tiles(0);
        let zs: Vec<isize> = tiles.iter().map(|t| t[0]).collect();
        assert!(tiles.iter().all(|t| t[1] == -8));
        assert_eq!(zs.iter().filter(|z| **z == 12).count(), 3);
        let xs: std::collections::BTreeSet<isize> = tiles.iter().map(|t| t[2]).collect();
        assert_eq!(xs.into_iter().collect::<Vec<_>>(), [0, 16, 24]);
        assert_eq!(tiles.len(), 3 * 3);
    }
}
