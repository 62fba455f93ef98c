//! From volumes to the 2D slices a model trains on: per-case intensity normalization
//! (percentile clip, then z-score), slicing along an axis, resizing to the manifest's input
//! size, and thinning out slices without foreground.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use medmesh_protocol::manifest::Intensity;

use super::msd::DatasetReader;
use super::{Case, DataError};
use crate::rng::Rng;
use medmesh_imaging::io_error;

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
/// `[n, height, width]`, row-major, with the case each slice came from. The pixels live in
/// memory, or in a slice cache on disk ([`stream_site_split`]) read a slice at a time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SliceSet {
    /// Channels per image.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    pixels: Pixels,
    /// Index into `case_names` for each slice.
    pub case_of: Vec<usize>,
    /// Names of the cases.
    pub case_names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
enum Pixels {
    Memory { images: Vec<f32>, labels: Vec<u8> },
    Disk(Arc<DiskPixels>),
}

impl Default for Pixels {
    fn default() -> Self {
        Pixels::Memory {
            images: Vec::new(),
            labels: Vec::new(),
        }
    }
}

/// A slice cache: `images.f32` (little-endian) and `labels.u8`, slice after slice.
#[derive(Debug)]
struct DiskPixels {
    dir: PathBuf,
    images: File,
    labels: File,
}

impl PartialEq for DiskPixels {
    fn eq(&self, other: &Self) -> bool {
        self.dir == other.dir
    }
}

impl DiskPixels {
    /// `len` bytes of `file` from `offset`.
    fn read(&self, file: &File, name: &str, offset: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        // The cache is this process's own file, written just before; a failing read is a
        // failing disk, which training cannot go on without.
        file.read_exact_at(&mut bytes, offset).unwrap_or_else(|e| {
            panic!(
                "reading the slice cache {}: {e}",
                self.dir.join(name).display()
            )
        });
        bytes
    }
}

impl SliceSet {
    /// A set of in-memory slices.
    pub fn from_memory(
        [channels, height, width]: [usize; 3],
        images: Vec<f32>,
        labels: Vec<u8>,
        case_of: Vec<usize>,
        case_names: Vec<String>,
    ) -> Self {
        assert_eq!(images.len(), case_of.len() * channels * height * width);
        assert_eq!(labels.len(), case_of.len() * height * width);
        Self {
            channels,
            height,
            width,
            pixels: Pixels::Memory { images, labels },
            case_of,
            case_names,
        }
    }

    fn empty_like(&self) -> Self {
        Self {
            channels: self.channels,
            height: self.height,
            width: self.width,
            ..Default::default()
        }
    }

    /// Number of slices.
    pub fn len(&self) -> usize {
        self.case_of.len()
    }

    /// Whether there are no slices.
    pub fn is_empty(&self) -> bool {
        self.case_of.is_empty()
    }

    /// Whether the pixels are read from a slice cache on disk.
    pub fn is_on_disk(&self) -> bool {
        matches!(self.pixels, Pixels::Disk(_))
    }

    /// Pixels of one slice's image.
    pub fn image(&self, i: usize) -> Cow<'_, [f32]> {
        self.images_between(i, i + 1)
    }

    /// Pixels of the images of slices `start..end`, one after the other.
    pub fn images_between(&self, start: usize, end: usize) -> Cow<'_, [f32]> {
        let n = self.channels * self.height * self.width;
        match &self.pixels {
            Pixels::Memory { images, .. } => Cow::Borrowed(&images[start * n..end * n]),
            Pixels::Disk(disk) => {
                let offset = (start * n * 4) as u64;
                let bytes = disk.read(&disk.images, "images.f32", offset, (end - start) * n * 4);
                Cow::Owned(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            }
        }
    }

    /// Pixels of one slice's label.
    pub fn label(&self, i: usize) -> Cow<'_, [u8]> {
        let n = self.height * self.width;
        match &self.pixels {
            Pixels::Memory { labels, .. } => Cow::Borrowed(&labels[i * n..(i + 1) * n]),
            Pixels::Disk(disk) => {
                Cow::Owned(disk.read(&disk.labels, "labels.u8", (i * n) as u64, n))
            }
        }
    }

    /// Appends one slice (in-memory sets only).
    fn push(&mut self, image: &[f32], label: &[u8], case: usize) {
        match &mut self.pixels {
            Pixels::Memory { images, labels } => {
                images.extend_from_slice(image);
                labels.extend_from_slice(label);
            }
            Pixels::Disk(_) => unreachable!("slices are appended to in-memory sets only"),
        }
        self.case_of.push(case);
    }

    /// The slices of the given cases, in order (for train/validation splits by case), in
    /// memory.
    pub fn subset(&self, cases: &[usize]) -> SliceSet {
        let mut out = SliceSet {
            case_names: cases.iter().map(|&c| self.case_names[c].clone()).collect(),
            ..self.empty_like()
        };
        for (new_index, &case) in cases.iter().enumerate() {
            for i in (0..self.len()).filter(|&i| self.case_of[i] == case) {
                out.push(&self.image(i), &self.label(i), new_index);
            }
        }
        out
    }

    /// Several sets in one, in memory (the pooled baseline's union of every site's training
    /// cases). Case names are prefixed with the set's index so they stay distinct.
    pub fn concat(sets: &[&SliceSet]) -> SliceSet {
        let mut out = sets
            .first()
            .map_or_else(SliceSet::default, |s| s.empty_like());
        for (k, set) in sets.iter().enumerate() {
            let offset = out.case_names.len();
            out.case_names
                .extend(set.case_names.iter().map(|c| format!("{k}/{c}")));
            for i in 0..set.len() {
                out.push(&set.image(i), &set.label(i), set.case_of[i] + offset);
            }
        }
        out
    }

    /// Splits cases (not slices, so no case is on both sides) into training and validation,
    /// with `fraction` of the cases (at least one, if there are two or more) for validation.
    pub fn split(&self, fraction: f64, seed: u64) -> (SliceSet, SliceSet) {
        let (train, val) = split_cases(self.case_names.len(), fraction, seed);
        (self.subset(&train), self.subset(&val))
    }
}

/// Which of `n` cases train and which validate (both ascending): `fraction` of them, at least
/// one if there are two or more, for validation, drawn with `seed`.
pub fn split_cases(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut cases: Vec<usize> = (0..n).collect();
    Rng::derive(seed, 0x5EED_5711).shuffle(&mut cases);
    let n_val =
        ((n as f64 * fraction).round() as usize).clamp(usize::from(n > 1), n.saturating_sub(1));
    let (val, train) = cases.split_at(n_val);
    let (mut train, mut val) = (train.to_vec(), val.to_vec());
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// The slicing options `manifest` asks for.
pub(crate) fn options_for(manifest: &medmesh_protocol::Manifest) -> SliceOptions {
    let [h, w] = manifest.task.input_size;
    let mut opts = SliceOptions::new([h as usize, w as usize], manifest.training.seed);
    opts.axis = manifest.task.plane.axis();
    opts.intensity = manifest.task.intensity;
    opts
}

/// A site's slices for `manifest`: `cases` sliced to its input size and split into
/// (training, validation) by whole cases. Node, baselines and simulator all call this (or
/// [`stream_site_split`], which gives the same slices), so they train and score alike.
pub fn site_split(
    cases: &[Case],
    manifest: &medmesh_protocol::Manifest,
) -> Result<(SliceSet, SliceSet), DataError> {
    let opts = options_for(manifest);
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
    Ok(slices.split(
        manifest.evaluation.validation_fraction,
        manifest.training.seed,
    ))
}

/// [`site_split`] for a dataset larger than memory: cases are read, resampled and sliced one
/// at a time into a slice cache under `cache` (`train/` and `validation/`, each
/// `images.f32` + `labels.u8`), so memory holds one case, not the dataset. A set whose cache
/// fits in `memory_budget` bytes is then read into memory; a larger one stays on disk and is
/// read a slice at a time. The slices equal [`site_split`]'s.
pub fn stream_site_split(
    reader: &DatasetReader,
    manifest: &medmesh_protocol::Manifest,
    cache: &Path,
    memory_budget: u64,
) -> Result<(SliceSet, SliceSet), DataError> {
    let opts = options_for(manifest);
    let (train, val) = split_cases(
        reader.len(),
        manifest.evaluation.validation_fraction,
        manifest.training.seed,
    );
    let mut writers = [
        CacheWriter::create(&cache.join("train"), &opts)?,
        CacheWriter::create(&cache.join("validation"), &opts)?,
    ];
    let mut rng = Rng::derive(opts.seed, SLICE_STREAM);
    for i in 0..reader.len() {
        let mut case = reader.read(i)?;
        if let Some(to) = manifest.task.target_spacing {
            case = case.resampled(to)?;
        }
        let (side, index) = match train.binary_search(&i) {
            Ok(k) => (0, k),
            Err(_) => (1, val.binary_search(&i).unwrap_or_else(|_| unreachable!())),
        };
        let writer = &mut writers[side];
        writer.set.case_names.push(case.name.clone());
        let mut failed = None;
        slice_case(&case, &opts, &mut rng, |image, label| {
            if failed.is_none() {
                failed = writer.append(image, label, index).err();
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
    }
    let [train, val] = writers;
    Ok((train.finish(memory_budget)?, val.finish(memory_budget)?))
}

/// The stream the slicer draws which empty slices to keep from.
const SLICE_STREAM: u64 = 0x0051_1CE5;

/// Writes slices to a cache directory.
struct CacheWriter {
    dir: PathBuf,
    images: BufWriter<File>,
    labels: BufWriter<File>,
    set: SliceSet,
}

impl CacheWriter {
    fn create(dir: &Path, opts: &SliceOptions) -> Result<Self, DataError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let open = |name: &str| {
            let path = dir.join(name);
            File::create(&path)
                .map(BufWriter::new)
                .map_err(io_error(&path))
        };
        Ok(Self {
            dir: dir.to_owned(),
            images: open("images.f32")?,
            labels: open("labels.u8")?,
            set: SliceSet {
                channels: 0,
                height: opts.size[0],
                width: opts.size[1],
                ..Default::default()
            },
        })
    }

    fn append(&mut self, image: &[f32], label: &[u8], case: usize) -> Result<(), DataError> {
        self.set.channels = image.len() / label.len().max(1);
        let bytes: Vec<u8> = image.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.images
            .write_all(&bytes)
            .map_err(io_error(self.dir.join("images.f32")))?;
        self.labels
            .write_all(label)
            .map_err(io_error(self.dir.join("labels.u8")))?;
        self.set.case_of.push(case);
        Ok(())
    }

    fn finish(self, memory_budget: u64) -> Result<SliceSet, DataError> {
        let Self {
            dir,
            images,
            labels,
            mut set,
        } = self;
        for (w, name) in [(images, "images.f32"), (labels, "labels.u8")] {
            w.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .map_err(io_error(dir.join(name)))?;
        }
        let open = |name: &str| {
            let path = dir.join(name);
            File::open(&path).map_err(io_error(&path))
        };
        set.channels = set.channels.max(1);
        let disk = DiskPixels {
            images: open("images.f32")?,
            labels: open("labels.u8")?,
            dir,
        };
        let bytes = (set.len() * set.height * set.width * (4 * set.channels + 1)) as u64;
        set.pixels = Pixels::Disk(Arc::new(disk));
        if bytes <= memory_budget {
            let images = set.images_between(0, set.len()).into_owned();
            let labels = (0..set.len())
                .flat_map(|i| set.label(i).into_owned())
                .collect();
            set.pixels = Pixels::Memory { images, labels };
        }
        Ok(set)
    }
}

/// Normalizes, slices and resizes `cases`.
pub fn slice_cases(cases: &[Case], opts: &SliceOptions) -> Result<SliceSet, DataError> {
    let mut set = SliceSet {
        channels: cases.first().map_or(1, |c| c.image.channels),
        height: opts.size[0],
        width: opts.size[1],
        case_names: cases.iter().map(|c| c.name.clone()).collect(),
        ..Default::default()
    };
    let mut rng = Rng::derive(opts.seed, SLICE_STREAM);
    for (case_index, case) in cases.iter().enumerate() {
        slice_case(case, opts, &mut rng, |image, label| {
            set.push(image, label, case_index);
        });
    }
    Ok(set)
}

/// Normalizes one case and hands each kept slice, resized, to `emit` as (image planes,
/// label). `rng` decides which slices without foreground to keep; it runs on across cases.
fn slice_case(
    case: &Case,
    opts: &SliceOptions,
    rng: &mut Rng,
    mut emit: impl FnMut(&[f32], &[u8]),
) {
    let channels = case.image.channels;
    let [height, width] = opts.size;
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
    let mut image = Vec::with_capacity(channels * height * width);
    for s in 0..dims[opts.axis.min(2)] {
        let label: Vec<u8> = (0..rows * cols)
            .map(|i| case.label.data[index(i / cols, i % cols, s)])
            .collect();
        if label.iter().all(|&l| l == 0) && rng.uniform() >= opts.keep_empty {
            continue;
        }
        image.clear();
        for ch in 0..channels {
            let plane = &normalized[ch * case.image.voxels()..(ch + 1) * case.image.voxels()];
            let img: Vec<f32> = (0..rows * cols)
                .map(|i| plane[index(i / cols, i % cols, s)])
                .collect();
            image.extend(resize_bilinear(&img, rows, cols, height, width));
        }
        emit(&image, &resize_nearest(&label, rows, cols, height, width));
    }
}

/// Per channel: clip to the percentiles, then subtract the mean and divide by the standard
/// deviation, so scanners with different intensity scales land in the same range. With
/// CT's scheme, every case gets the manifest's fixed clip and scale instead, so Hounsfield
/// units keep their meaning across cases and sites.
pub(crate) fn normalize(case: &Case, opts: &SliceOptions) -> Vec<f32> {
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
        let images = set.images_between(0, set.len());
        let mean = images.iter().sum::<f32>() / images.len() as f32;
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

    /// Streaming through the slice cache gives exactly the in-memory slices, on disk when
    /// they exceed the budget and in memory when they fit; and a model trains from disk.
    #[test]
    fn streamed_slices_equal_in_memory_ones_on_disk_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<Case> = (0..5)
            .map(|i| {
                let mut c = cube(&format!("c{i}"), 8);
                c.image.spacing = [1.0, 1.0, 2.0];
                c
            })
            .collect();
        let data = dir.path().join("site");
        super::super::msd::write_dataset(&data, "t", "t", &["bg", "fg"], &cases).unwrap();
        let mut m = medmesh_protocol::Manifest::parse(include_str!(
            "../../../examples/synthetic-quickstart.toml"
        ))
        .unwrap();
        m.task.input_size = [16, 16];
        m.task.target_spacing = Some([1.0, 1.0, 1.0]);
        m.evaluation.validation_fraction = 0.4;
        let loaded = super::super::msd::read_dataset(&data, 1, 2).unwrap();
        let (train, validation) = site_split(&loaded, &m).unwrap();
        let reader = DatasetReader::open(&data, 1, 2).unwrap();
        let same = |a: &SliceSet, b: &SliceSet| {
            assert_eq!(
                (a.len(), &a.case_of, &a.case_names),
                (b.len(), &b.case_of, &b.case_names)
            );
            assert_eq!(a.images_between(0, a.len()), b.images_between(0, b.len()));
            for i in 0..a.len() {
                assert_eq!(a.label(i), b.label(i));
            }
        };
        let (t, v) = stream_site_split(&reader, &m, &dir.path().join("cache"), 0).unwrap();
        assert!(t.is_on_disk() && v.is_on_disk());
        assert!(train.len() > 5 && !validation.is_empty());
        same(&t, &train);
        same(&v, &validation);
        let (t, v) = stream_site_split(&reader, &m, &dir.path().join("cache2"), 1 << 30).unwrap();
        assert!(!t.is_on_disk() && !v.is_on_disk());
        same(&t, &train);
        same(&v, &validation);
        let (t, _) = stream_site_split(&reader, &m, &dir.path().join("cache3"), 0).unwrap();
        let mut trainer = crate::Trainer::new(&m, burn::tensor::Device::flex());
        assert!(trainer.train_round(&t, |_| {}).mean_loss.is_finite());
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
