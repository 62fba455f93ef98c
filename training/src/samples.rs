//! What a [`Trainer`](crate::Trainer) trains and scores on, behind one interface: 2D slices
//! ([`SliceSet`]) for a 2D UNet, whole volumes ([`VolumeSet`]) sampled as 3D patches for a 3D
//! one, or a site's data as the manifest asks for it ([`SiteSet`]).

use burn::prelude::*;
use burn::tensor::activation::softmax;
use medmesh_protocol::Manifest;
use medmesh_protocol::manifest::Augmentation;

use crate::augment;
use crate::data::slices::{self, SliceSet};
use crate::data::volumes::VolumeSet;
use crate::data::{Case, DataError};
use crate::loss::{dice_ce_loss, one_hot};
use crate::metrics::Scores;
use crate::model::UNet;
use crate::rng::Rng;
use crate::trainer::{CaseScore, Evaluation};

/// A training batch on the device: images and one-hot targets.
#[derive(Debug, Clone)]
pub enum Batch {
    /// `[batch, channels | classes, height, width]`.
    Planar {
        /// Images.
        images: Tensor<4>,
        /// One-hot targets.
        targets: Tensor<4>,
    },
    /// `[batch, channels | classes, depth, height, width]`.
    Volumetric {
        /// Images.
        images: Tensor<5>,
        /// One-hot targets.
        targets: Tensor<5>,
    },
}

impl Batch {
    /// The segmentation loss of `model` on this batch.
    pub fn loss(self, model: &UNet) -> Tensor<1> {
        match self {
            Batch::Planar { images, targets } => dice_ce_loss(model.forward(images), targets),
            Batch::Volumetric { images, targets } => {
                dice_ce_loss(model.forward_volume(images), targets)
            }
        }
    }
}

/// Data a trainer can draw batches from and be scored on.
pub trait TrainingSet {
    /// Samples in one epoch: slices, or cases (one patch each).
    fn len(&self) -> usize;

    /// Whether there is nothing to train on.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// 2 (slices) or 3 (volumes): the network rank this data is for.
    fn dims(&self) -> usize;

    /// A training batch of samples `indices`: randomly mirrored, then augmented with
    /// `augmentation` when given.
    fn batch(
        &self,
        indices: &[usize],
        augmentation: Option<&Augmentation>,
        classes: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Batch;

    /// `model`'s scores (in validation mode) on every case.
    fn evaluate(&self, model: &UNet, device: &Device, classes: usize) -> Evaluation;
}

/// Dice, IoU and HD95 of one case's prediction `p` against truth `t`, both laid out with
/// `dims[0]` fastest.
fn score_case(name: &str, p: &[u8], t: &[u8], dims: [usize; 3], classes: usize) -> CaseScore {
    let s = Scores::of(p, t, classes);
    let per_class: Option<Vec<f64>> = (1..classes as u8)
        .map(|c| crate::metrics::hd95(p, t, dims, c))
        .collect();
    let hd95 = per_class.map(|v| v.iter().sum::<f64>() / v.len().max(1) as f64);
    CaseScore {
        case: name.to_owned(),
        dice: s.mean_dice(),
        iou: s.mean_iou(),
        dice_per_class: s.dice,
        hd95,
    }
}

fn evaluation(cases: Vec<CaseScore>) -> Evaluation {
    let n = cases.len().max(1) as f64;
    Evaluation {
        mean_dice: cases.iter().map(|c| c.dice).sum::<f64>() / n,
        mean_iou: cases.iter().map(|c| c.iou).sum::<f64>() / n,
        cases,
    }
}

/// Reverses `data` (`blocks` of `[d][h][w]`) along `axis` (0 depth, 1 rows, 2 columns).
fn mirror<T: Copy>(data: &mut [T], [d, h, w]: [usize; 3], axis: usize) {
    for block in data.chunks_mut(d * h * w) {
        match axis {
            2 => block.chunks_mut(w).for_each(<[T]>::reverse),
            1 => {
                for plane in block.chunks_mut(h * w) {
                    for r in 0..h / 2 {
                        let (top, bottom) = plane.split_at_mut((h - 1 - r) * w);
                        top[r * w..(r + 1) * w].swap_with_slice(&mut bottom[..w]);
                    }
                }
            }
            _ => {
                for z in 0..d / 2 {
                    let (front, back) = block.split_at_mut((d - 1 - z) * h * w);
                    front[z * h * w..(z + 1) * h * w].swap_with_slice(&mut back[..h * w]);
                }
            }
        }
    }
}

impl TrainingSet for SliceSet {
    fn len(&self) -> usize {
        SliceSet::len(self)
    }

    fn dims(&self) -> usize {
        2
    }

    /// Each slice mirrored left-right with probability 1/2 (the one mirror that keeps a
    /// slice anatomically plausible), then augmented.
    fn batch(
        &self,
        indices: &[usize],
        augmentation: Option<&Augmentation>,
        classes: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Batch {
        let (c, h, w) = (self.channels, self.height, self.width);
        let mut images = Vec::with_capacity(indices.len() * c * h * w);
        let mut labels = Vec::with_capacity(indices.len() * h * w);
        for &i in indices {
            let flip = rng.uniform() < 0.5;
            let (image_start, label_start) = (images.len(), labels.len());
            images.extend_from_slice(&self.image(i));
            labels.extend_from_slice(&self.label(i));
            if flip {
                mirror(&mut images[image_start..], [1, h, w], 2);
                mirror(&mut labels[label_start..], [1, h, w], 2);
            }
            if let Some(spec) = augmentation {
                let mut slice = augment::Slice {
                    image: &mut images[image_start..],
                    label: &mut labels[label_start..],
                    channels: c,
                    depth: 1,
                    height: h,
                    width: w,
                };
                augment::augment(spec, &mut slice, rng);
            }
        }
        let b = indices.len();
        Batch::Planar {
            images: Tensor::from_data(TensorData::new(images, [b, c, h, w]), device),
            targets: Tensor::from_data(
                TensorData::new(one_hot(&labels, b, classes, h * w), [b, classes, h, w]),
                device,
            ),
        }
    }

    /// Every slice predicted, then each case's slices scored together (a 3D Dice).
    fn evaluate(&self, model: &UNet, device: &Device, classes: usize) -> Evaluation {
        let pred = predict_slices(model, self, device);
        let plane = self.height * self.width;
        let cases = (0..self.case_names.len())
            .filter_map(|case| {
                let slices: Vec<usize> = (0..self.len())
                    .filter(|&i| self.case_of[i] == case)
                    .collect();
                if slices.is_empty() {
                    return None;
                }
                let p: Vec<u8> = slices
                    .iter()
                    .flat_map(|&i| pred[i * plane..(i + 1) * plane].iter().copied())
                    .collect();
                let t: Vec<u8> = slices
                    .iter()
                    .flat_map(|&i| self.label(i).into_owned())
                    .collect();
                let dims = [self.width, self.height, slices.len()];
                Some(score_case(&self.case_names[case], &p, &t, dims, classes))
            })
            .collect();
        evaluation(cases)
    }
}

/// Predicted label maps of a 2D `model` (in validation mode) for every slice of `data`, in
/// order.
pub fn predict_slices(model: &UNet, data: &SliceSet, device: &Device) -> Vec<u8> {
    let (c, h, w) = (data.channels, data.height, data.width);
    let mut out = Vec::with_capacity(data.len() * h * w);
    for start in (0..data.len()).step_by(16) {
        let end = (start + 16).min(data.len());
        let images = data.images_between(start, end).into_owned();
        let x = Tensor::<4>::from_data(TensorData::new(images, [end - start, c, h, w]), device);
        let pred = model.forward(x).argmax(1).into_data();
        out.extend(pred.iter::<i64>().map(|v| v as u8));
    }
    out
}

impl TrainingSet for VolumeSet {
    fn len(&self) -> usize {
        VolumeSet::len(self)
    }

    fn dims(&self) -> usize {
        3
    }

    /// One random patch per index (a case), with foreground oversampling; mirrored along
    /// each axis with probability 1/2 (as nnU-Net does), then augmented.
    fn batch(
        &self,
        indices: &[usize],
        augmentation: Option<&Augmentation>,
        classes: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Batch {
        let c = self.channels;
        let [d, h, w] = self.patch;
        let voxels = d * h * w;
        let mut images = Vec::with_capacity(indices.len() * c * voxels);
        let mut labels = Vec::with_capacity(indices.len() * voxels);
        for &case in indices {
            let (mut image, mut label) = self.random_patch(case, rng);
            for axis in 0..3 {
                if rng.uniform() < 0.5 {
                    mirror(&mut image, self.patch, axis);
                    mirror(&mut label, self.patch, axis);
                }
            }
            if let Some(spec) = augmentation {
                let mut patch = augment::Slice {
                    image: &mut image,
                    label: &mut label,
                    channels: c,
                    depth: d,
                    height: h,
                    width: w,
                };
                augment::augment(spec, &mut patch, rng);
            }
            images.extend(image);
            labels.extend(label);
        }
        let b = indices.len();
        Batch::Volumetric {
            images: Tensor::from_data(TensorData::new(images, [b, c, d, h, w]), device),
            targets: Tensor::from_data(
                TensorData::new(one_hot(&labels, b, classes, voxels), [b, classes, d, h, w]),
                device,
            ),
        }
    }

    /// Each case predicted whole, patch by patch ([`VolumeSet::tiles`]; softmax summed
    /// where tiles overlap), and scored as a volume.
    fn evaluate(&self, model: &UNet, device: &Device, classes: usize) -> Evaluation {
        let cases = (0..self.cases.len())
            .map(|i| {
                let case = &self.cases[i];
                let p = predict_volume(model, self, i, device, classes);
                let [d, h, w] = case.dims;
                score_case(&case.name, &p, &case.label, [w, h, d], classes)
            })
            .collect();
        evaluation(cases)
    }
}

/// Predicted labels of a 3D `model` (in validation mode) for case `case` of `data`, in the
/// case's layout.
pub fn predict_volume(
    model: &UNet,
    data: &VolumeSet,
    case: usize,
    device: &Device,
    classes: usize,
) -> Vec<u8> {
    let [d, h, w] = data.cases[case].dims;
    let [pd, ph, pw] = data.patch;
    let voxels = d * h * w;
    let mut probs = vec![0f32; classes * voxels];
    for start in data.tiles(case) {
        let (image, _) = data.crop(case, start);
        let x = Tensor::<5>::from_data(
            TensorData::new(image, [1, data.channels, pd, ph, pw]),
            device,
        );
        let p = softmax(model.forward_volume(x), 1).into_data();
        let p = p
            .as_slice::<f32>()
            .unwrap_or_else(|e| unreachable!("f32 logits: {e:?}"));
        for z in 0..pd {
            let sz = start[0] + z as isize;
            for y in 0..ph {
                let sy = start[1] + y as isize;
                for x in 0..pw {
                    let sx = start[2] + x as isize;
                    let inside = (0..d as isize).contains(&sz)
                        && (0..h as isize).contains(&sy)
                        && (0..w as isize).contains(&sx);
                    if !inside {
                        continue;
                    }
                    let v = (sz as usize * h + sy as usize) * w + sx as usize;
                    for k in 0..classes {
                        probs[k * voxels + v] += p[((k * pd + z) * ph + y) * pw + x];
                    }
                }
            }
        }
    }
    (0..voxels)
        .map(|v| {
            (0..classes)
                .max_by(|&a, &b| probs[a * voxels + v].total_cmp(&probs[b * voxels + v]))
                .unwrap_or(0) as u8
        })
        .collect()
}

/// A site's data as its manifest's model needs it: slices for 2D, volumes for 3D.
#[derive(Debug, Clone, PartialEq)]
pub enum SiteSet {
    /// For `model.dims = 2`.
    Slices(SliceSet),
    /// For `model.dims = 3`.
    Volumes(VolumeSet),
}

impl From<SliceSet> for SiteSet {
    fn from(s: SliceSet) -> Self {
        SiteSet::Slices(s)
    }
}

impl From<VolumeSet> for SiteSet {
    fn from(v: VolumeSet) -> Self {
        SiteSet::Volumes(v)
    }
}

impl SiteSet {
    /// Samples in one epoch: slices, or cases (one patch each).
    pub fn len(&self) -> usize {
        TrainingSet::len(self)
    }

    /// Whether there is nothing to train on.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of cases.
    pub fn cases(&self) -> usize {
        match self {
            SiteSet::Slices(s) => s.case_names.len(),
            SiteSet::Volumes(v) => v.len(),
        }
    }

    /// Several sites' sets in one (the pooled baseline). Sets of one manifest are all slices
    /// or all volumes.
    pub fn concat(sets: &[&SiteSet]) -> SiteSet {
        let slices: Vec<&SliceSet> = sets
            .iter()
            .filter_map(|s| match s {
                SiteSet::Slices(s) => Some(s),
                SiteSet::Volumes(_) => None,
            })
            .collect();
        let volumes: Vec<&VolumeSet> = sets
            .iter()
            .filter_map(|s| match s {
                SiteSet::Volumes(v) => Some(v),
                SiteSet::Slices(_) => None,
            })
            .collect();
        assert!(
            slices.is_empty() || volumes.is_empty(),
            "sets of one manifest are all slices or all volumes"
        );
        if volumes.is_empty() {
            SiteSet::Slices(SliceSet::concat(&slices))
        } else {
            SiteSet::Volumes(VolumeSet::concat(&volumes))
        }
    }

    /// The slices, for a 2D manifest.
    pub fn slices(&self) -> Option<&SliceSet> {
        match self {
            SiteSet::Slices(s) => Some(s),
            SiteSet::Volumes(_) => None,
        }
    }

    /// Whether the samples are read from a cache on disk rather than held in memory.
    pub fn is_on_disk(&self) -> bool {
        matches!(self, SiteSet::Slices(s) if s.is_on_disk())
    }
}

/// A site's (training, validation) data for `manifest` from its `cases`: slices
/// ([`slices::site_split`]) for a 2D model, volumes for a 3D one, split by the same cases.
pub fn site_split(cases: &[Case], manifest: &Manifest) -> Result<(SiteSet, SiteSet), DataError> {
    if manifest.model.dims == 3 {
        let set = VolumeSet::from_cases(cases, manifest)?;
        let (train, validation) = set.split(
            manifest.evaluation.validation_fraction,
            manifest.training.seed,
        );
        Ok((train.into(), validation.into()))
    } else {
        let (train, validation) = slices::site_split(cases, manifest)?;
        Ok((train.into(), validation.into()))
    }
}

impl TrainingSet for SiteSet {
    fn len(&self) -> usize {
        match self {
            SiteSet::Slices(s) => TrainingSet::len(s),
            SiteSet::Volumes(v) => TrainingSet::len(v),
        }
    }

    fn dims(&self) -> usize {
        match self {
            SiteSet::Slices(_) => 2,
            SiteSet::Volumes(_) => 3,
        }
    }

    fn batch(
        &self,
        indices: &[usize],
        augmentation: Option<&Augmentation>,
        classes: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Batch {
        match self {
            SiteSet::Slices(s) => s.batch(indices, augmentation, classes, rng, device),
            SiteSet::Volumes(v) => v.batch(indices, augmentation, classes, rng, device),
        }
    }

    fn evaluate(&self, model: &UNet, device: &Device, classes: usize) -> Evaluation {
        match self {
            SiteSet::Slices(s) => s.evaluate(model, device, classes),
            SiteSet::Volumes(v) => v.evaluate(model, device, classes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mirroring reverses exactly one axis of each block, and twice is the identity.
    #[test]
    fn mirrors_reverse_one_axis() {
        let dims = [2, 3, 4];
        let data: Vec<usize> = (0..48).collect();
        let at =
            |v: &[usize], b: usize, z: usize, y: usize, x: usize| v[b * 24 + (z * 3 + y) * 4 + x];
        for axis in 0..3 {
            let mut m = data.clone();
            mirror(&mut m, dims, axis);
            for b in 0..2 {
                for z in 0..2 {
                    for y in 0..3 {
                        for x in 0..4 {
                            let (sz, sy, sx) = match axis {
                                0 => (1 - z, y, x),
                                1 => (z, 2 - y, x),
                                _ => (z, y, 3 - x),
                            };
                            assert_eq!(at(&m, b, z, y, x), at(&data, b, sz, sy, sx));
                        }
                    }
                }
            }
            mirror(&mut m, dims, axis);
            assert_eq!(m, data);
        }
    }
}
