//! From volumes to the 2D slices a model trains on: per-case intensity normalization
//! (percentile clip, then z-score), slicing along an axis, resizing to the manifest's input
//! size, and thinning out slices without foreground.

use medmesh_protocol::manifest::Intensity;

use super::{Case, DataError};
use crate::rng::Rng;

/// How volumes become training slices.
#[derive(Debug, Clone)]
pub struct SliceOptions {
    /// Axis to slice along: 0 (sagittal, x), 1 (coronal, y) or 2 (axial, z).
    pub axis: usize,
    /// Output height and width.
    pub size: [usize; 2],
    /// Probability of keeping a slice whose mask is all background.
    pub keep_empty: f64,
    /// Lower and upper intensity percentiles to clip each case to before its z-score.
    pub clip_percentiles: (f64, f64),
    /// The manifest's normalization: per-case z-score, or CT's fixed clip and scale.
    pub intensity: Intensity,
    /// Seed for choosing which empty slices to keep.
    pub seed: u64,
}

impl SliceOptions {
    /// Axial slices at `size`, keeping a third of the empty ones.
    pub fn new(size: [usize; 2], seed: u64) -> Self {
        Self {
            axis: 2,
            size,
            keep_empty: 0.35,
            clip_percentiles: (0.5, 99.5),
            intensity: Intensity::default(),
            seed,
        }
    }
}

/// 2D slices ready for batching: images `[n, channels, height, width]` and labels
/// `[n, height, width]`, row-major, with the case each slice came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SliceSet {
    /// Channels per image.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// Pixel values, slice after slice.
    pub images: Vec<f32>,
    /// Class per pixel, slice after slice.
    pub labels: Vec<u8>,
    /// Index into `case_names` for each slice.
    pub case_of: Vec<usize>,
    /// Names of the cases.
    pub case_names: Vec<String>,
}

impl SliceSet {
    /// Number of slices.
    pub fn len(&self) -> usize {
        self.case_of.len()
    }

    /// Whether there are no slices.
    pub fn is_empty(&self) -> bool {
        self.case_of.is_empty()
    }

    /// Pixels of one slice's image.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.channels * self.height * self.width;
        &self.images[i * n..(i + 1) * n]
    }

    /// Pixels of one slice's label.
    pub fn label(&self, i: usize) -> &[u8] {
        let n = self.height * self.width;
        &self.labels[i * n..(i + 1) * n]
    }

    /// The slices of the given cases, in order (for train/validation splits by case).
    pub fn subset(&self, cases: &[usize]) -> SliceSet {
        let mut out = SliceSet {
            channels: self.channels,
            height: self.height,
            width: self.width,
            case_names: cases.iter().map(|&c| self.case_names[c].clone()).collect(),
            ..Default::default()
        };
        for (new_index, &case) in cases.iter().enumerate() {
            for i in (0..self.len()).filter(|&i| self.case_of[i] == case) {
                out.images.extend_from_slice(self.image(i));
                out.labels.extend_from_slice(self.label(i));
                out.case_of.push(new_index);
            }
        }
        out
    }

    /// Several sets in one (the pooled baseline's union of every site's training cases).
    /// Case names are prefixed with the set's index so they stay distinct.
    pub fn concat(sets: &[&SliceSet]) -> SliceSet {
        let first = sets.first().copied().cloned().unwrap_or_default();
        let mut out = SliceSet {
            channels: first.channels,
            height: first.height,
            width: first.width,
            ..Default::default()
        };
        for (k, set) in sets.iter().enumerate() {
            let offset = out.case_names.len();
            out.case_names
                .extend(set.case_names.iter().map(|c| format!("{k}/{c}")));
            out.images.extend_from_slice(&set.images);
            out.labels.extend_from_slice(&set.labels);
            out.case_of.extend(set.case_of.iter().map(|c| c + offset));
        }
        out
    }

    /// Splits cases (not slices, so no case is on both sides) into training and validation,
    /// with `fraction` of the cases (at least one, if there are two or more) for validation.
    pub fn split(&self, fraction: f64, seed: u64) -> (SliceSet, SliceSet) {
        let mut cases: Vec<usize> = (0..self.case_names.len()).collect();
        Rng::derive(seed, 0x5EED_5711).shuffle(&mut cases);
        let n_val = ((cases.len() as f64 * fraction).round() as usize)
            .clamp(usize::from(cases.len() > 1), cases.len().saturating_sub(1));
        let (val, train) = cases.split_at(n_val);
        let (mut train, mut val) = (train.to_vec(), val.to_vec());
        train.sort_unstable();
        val.sort_unstable();
        (self.subset(&train), self.subset(&val))
    }
}

/// A site's slices for `manifest`: `cases` sliced to its input size and split into
/// (training, validation) by whole cases. Node, baselines and simulator all call this, so
/// they train and score on the same slices.
pub fn site_split(
    cases: &[Case],
    manifest: &medmesh_protocol::Manifest,
) -> Result<(SliceSet, SliceSet), DataError> {
    let [h, w] = manifest.task.input_size;
    let seed = manifest.training.seed;
    let mut opts = SliceOptions::new([h as usize, w as usize], seed);
    opts.axis = manifest.task.plane.axis();
    opts.intensity = manifest.task.intensity;
    let slices = match manifest.task.target_spacing {
        Some(to) => {
            let resampled = cases
                .iter()
                .map(|c| c.resampled(to))
                .collect::<Result<Vec<_>, _>>()?;
            slice_cases(&resampled, &opts)?
        }
        None => slice_cases(cases, &opts)?,
    };
    Ok(slices.split(manifest.evaluation.validation_fraction, seed))
}

/// Normalizes, slices and resizes `cases`.
pub fn slice_cases(cases: &[Case], opts: &SliceOptions) -> Result<SliceSet, DataError> {
    let channels = cases.first().map_or(1, |c| c.image.channels);
    let [height, width] = opts.size;
    let mut set = SliceSet {
        channels,
        height,
        width,
        case_names: cases.iter().map(|c| c.name.clone()).collect(),
        ..Default::default()
    };
    let mut rng = Rng::derive(opts.seed, 0x0051_1CE5);
    for (case_index, case) in cases.iter().enumerate() {
        let normalized = normalize(case, opts);
        let dims = case.image.dims;
        let (rows_axis, cols_axis) = match opts.axis {
            0 => (2, 1),
            1 => (2, 0),
            _ => (1, 0),
        };
        let (rows, cols) = (dims[rows_axis], dims[cols_axis]);
        let index = |r: usize, c: usize, s: usize| {
            let mut p = [0usize; 3];
            p[rows_axis] = r;
            p[cols_axis] = c;
            p[opts.axis.min(2)] = s;
            p[0] + dims[0] * (p[1] + dims[1] * p[2])
        };
        for s in 0..dims[opts.axis.min(2)] {
            let label: Vec<u8> = (0..rows * cols)
                .map(|i| case.label.data[index(i / cols, i % cols, s)])
                .collect();
            if label.iter().all(|&l| l == 0) && rng.uniform() >= opts.keep_empty {
                continue;
            }
            set.labels
                .extend(resize_nearest(&label, rows, cols, height, width));
            for ch in 0..channels {
                let plane = &normalized[ch * case.image.voxels()..(ch + 1) * case.image.voxels()];
                let img: Vec<f32> = (0..rows * cols)
                    .map(|i| plane[index(i / cols, i % cols, s)])
                    .collect();
                set.images
                    .extend(resize_bilinear(&img, rows, cols, height, width));
            }
            set.case_of.push(case_index);
        }
    }
    Ok(set)
}

/// Per channel: clip to the percentiles, then subtract the mean and divide by the standard
/// deviation, so scanners with different intensity scales land in the same range. With
/// CT's scheme, every case gets the manifest's fixed clip and scale instead, so Hounsfield
/// units keep their meaning across cases and sites.
fn normalize(case: &Case, opts: &SliceOptions) -> Vec<f32> {
    if let Some(([lo, hi], mean, std)) = opts.intensity.ct() {
        return case
            .image
            .data
            .iter()
            .map(|v| ((f64::from(*v).clamp(lo, hi) - mean) / std) as f32)
            .collect();
    }
    let (lo_pct, hi_pct) = opts.clip_percentiles;
    let n = case.image.voxels();
    let mut out = Vec::with_capacity(case.image.data.len());
    for plane in case.image.data.chunks(n.max(1)) {
        let lo = percentile(plane, lo_pct);
        let hi = percentile(plane, hi_pct);
        let clipped: Vec<f32> = plane.iter().map(|v| v.clamp(lo, hi.max(lo))).collect();
        let mean = clipped.iter().map(|v| f64::from(*v)).sum::<f64>() / clipped.len().max(1) as f64;
        let var = clipped
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / clipped.len().max(1) as f64;
        let std = var.sqrt().max(1e-6);
        out.extend(
            clipped
                .iter()
                .map(|v| ((f64::from(*v) - mean) / std) as f32),
        );
    }
    out
}

fn percentile(values: &[f32], pct: f64) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let mut copy = values.to_vec();
    let k = ((pct / 100.0) * (copy.len() - 1) as f64).round() as usize;
    let (_, v, _) = copy.select_nth_unstable_by(k.min(values.len() - 1), f32::total_cmp);
    *v
}

/// Nearest-neighbour resize (for labels: never invents a class).
pub fn resize_nearest<T: Copy>(src: &[T], rows: usize, cols: usize, h: usize, w: usize) -> Vec<T> {
    (0..h * w)
        .map(|i| {
            let (r, c) = (i / w, i % w);
            let sr = ((r as f64 + 0.5) * rows as f64 / h as f64) as usize;
            let sc = ((c as f64 + 0.5) * cols as f64 / w as f64) as usize;
            src[sr.min(rows - 1) * cols + sc.min(cols - 1)]
        })
        .collect()
}

/// Bilinear resize (for images).
pub fn resize_bilinear(src: &[f32], rows: usize, cols: usize, h: usize, w: usize) -> Vec<f32> {
    if rows == h && cols == w {
        return src.to_vec();
    }
    (0..h * w)
        .map(|i| {
            let (r, c) = (i / w, i % w);
            let y = ((r as f64 + 0.5) * rows as f64 / h as f64 - 0.5).clamp(0.0, (rows - 1) as f64);
            let x = ((c as f64 + 0.5) * cols as f64 / w as f64 - 0.5).clamp(0.0, (cols - 1) as f64);
            let (y0, x0) = (y.floor() as usize, x.floor() as usize);
            let (y1, x1) = ((y0 + 1).min(rows - 1), (x0 + 1).min(cols - 1));
            let (fy, fx) = ((y - y0 as f64) as f32, (x - x0 as f64) as f32);
            let top = src[y0 * cols + x0] * (1.0 - fx) + src[y0 * cols + x1] * fx;
            let bottom = src[y1 * cols + x0] * (1.0 - fx) + src[y1 * cols + x1] * fx;
            top * (1.0 - fy) + bottom * fy
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{LabelVolume, Volume};

    fn cube(name: &str, n: usize) -> Case {
        let dims = [n, n, n];
        let voxels = n * n * n;
        let label: Vec<u8> = (0..voxels)
            .map(|i| u8::from(i / (n * n) == n / 2))
            .collect();
        Case {
            name: name.into(),
            image: Volume {
                dims,
                spacing: [1.0; 3],
                channels: 1,
                data: (0..voxels)
                    .map(|i| (i % 97) as f32 * 10.0 + 1000.0)
                    .collect(),
            },
            label: LabelVolume { dims, data: label },
        }
    }

    /// `task.target_spacing` resamples before slicing, and `task.plane` picks the slices'
    /// anatomical plane in the RAS volume.
    #[test]
    fn manifests_choose_the_spacing_and_the_plane() {
        let mut case = cube("c", 8);
        case.label.data.fill(1);
        let mut m = medmesh_protocol::Manifest::parse(include_str!(
            "../../../examples/synthetic-quickstart.toml"
        ))
        .unwrap();
        let count = |m: &medmesh_protocol::Manifest| {
            let (train, validation) = site_split(std::slice::from_ref(&case), m).unwrap();
            train.len() + validation.len()
        };
        assert_eq!(count(&m), 8);
        m.task.target_spacing = Some([1.0, 1.0, 2.0]);
        m.validate().unwrap();
        assert_eq!(count(&m), 4, "axial slices at 2 mm");
        m.task.plane = medmesh_protocol::manifest::Plane::Sagittal;
        m.task.target_spacing = Some([0.5, 1.0, 2.0]);
        assert_eq!(count(&m), 16, "sagittal slices at 0.5 mm");
        m.task.target_spacing = Some([0.0, 1.0, 1.0]);
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains("task.target_spacing"), "{err}");
    }

    #[test]
    fn slices_are_normalized_resized_and_thinned() {
        let cases = vec![cube("a", 8), cube("b", 8)];
        let mut opts = SliceOptions::new([16, 16], 1);
        opts.keep_empty = 0.0;
        let set = slice_cases(&cases, &opts).unwrap();
        // Only the one slice per case with foreground survives.
        assert_eq!(set.len(), 2);
        assert_eq!(set.image(0).len(), 256);
        assert!(set.label(0).iter().all(|&l| l == 1));
        let mean = set.images.iter().sum::<f32>() / set.images.len() as f32;
        assert!(mean.abs() < 0.5, "z-scored: {mean}");
        opts.keep_empty = 1.0;
        assert_eq!(slice_cases(&cases, &opts).unwrap().len(), 16);
    }

    /// CT's scheme clips and scales every case alike: the same Hounsfield value gives the same
    /// input whichever case it is in (a per-case z-score would not).
    #[test]
    fn ct_intensities_keep_their_meaning_across_cases() {
        use medmesh_protocol::manifest::IntensityScheme;
        let (a, mut b) = (cube("a", 8), cube("b", 8));
        b.image.data.iter_mut().for_each(|v| *v = *v * 0.5 - 400.0);
        let mut opts = SliceOptions::new([8, 8], 1);
        opts.keep_empty = 1.0;
        opts.intensity = Intensity {
            scheme: IntensityScheme::Ct,
            clip: Some([200.0, 1500.0]),
            mean: Some(1000.0),
            std: Some(250.0),
        };
        let set = slice_cases(&[a.clone(), b.clone()], &opts).unwrap();
        let expected = |v: f32| ((f64::from(v).clamp(200.0, 1500.0) - 1000.0) / 250.0) as f32;
        // Axial slice 0, pixel (0, 0) is voxel 0 of each case.
        assert_eq!(set.image(0)[0], expected(a.image.data[0]));
        assert_eq!(set.image(8)[0], expected(b.image.data[0]));
        assert_eq!(expected(b.image.data[0]), -3.2, "100 is clipped to 200");
        // The per-case z-score maps both cases to the same range instead.
        opts.intensity = Intensity::default();
        let z = slice_cases(&[a, b], &opts).unwrap();
        assert!((z.image(0)[0] - z.image(8)[0]).abs() < 1e-3);
    }

    #[test]
    fn split_is_by_case_and_deterministic() {
        let cases: Vec<Case> = (0..10).map(|i| cube(&format!("c{i}"), 4)).collect();
        let mut opts = SliceOptions::new([4, 4], 1);
        opts.keep_empty = 1.0;
        let set = slice_cases(&cases, &opts).unwrap();
        let (train, val) = set.split(0.2, 3);
        assert_eq!(val.case_names.len(), 2);
        assert_eq!(train.len() + val.len(), set.len());
        assert!(val.case_names.iter().all(|n| !train.case_names.contains(n)));
        assert_eq!(set.split(0.2, 3).1.case_names, val.case_names);
    }

    #[test]
    fn resizing_keeps_labels_crisp() {
        let labels = vec![0u8, 1, 2, 3];
        let up = resize_nearest(&labels, 2, 2, 4, 4);
        assert!(up.iter().all(|l| labels.contains(l)));
        let img = resize_bilinear(&[0.0, 1.0, 0.0, 1.0], 2, 2, 2, 4);
        assert!(img.iter().all(|v| (0.0..=1.0).contains(v)));
    }
}
