//! A site's data for an experiment: its dataset sliced to the manifest's input size (or, for a
//! 3D model, its volumes) and split into training and validation cases. The node, `train-local` and the demo's local-only
//! baseline all call this, so they train and score on exactly the same slices.

use std::path::Path;

use anyhow::{Context, Result};
use medmesh_protocol::Manifest;
use medmesh_training::data::load_dir;
use medmesh_training::data::msd::DatasetReader;
use medmesh_training::data::slices::stream_site_split;
use medmesh_training::data::volumes::VolumeSet;
use medmesh_training::samples::{SiteSet, site_split};

/// Training and validation data of one site.
#[derive(Debug)]
pub struct SiteData {
    /// What the site trains on.
    pub train: SiteSet,
    /// What the site scores on (whole cases held out).
    pub validation: SiteSet,
    /// Cases in the dataset.
    pub cases: usize,
}

/// Where a large dataset's slices go, and how much of them may stay in memory.
#[derive(Debug, Clone)]
pub struct Cache<'a> {
    /// The slice cache directory (rewritten on each load).
    pub dir: &'a Path,
    /// Bytes of slices that may be held in memory; a larger set is read from disk a slice at
    /// a time.
    pub memory_budget: u64,
}

/// Loads `dir` (MSD or PNG pairs) for `m`. With a cache, an MSD dataset is sliced one case at
/// a time through it ([`stream_site_split`]): memory holds one case and at most the budget of
/// slices, whatever the dataset's size. PNG pairs, and every dataset without a cache, are
/// loaded whole.
///
/// A 3D model (`model.dims = 3`) trains on whole volumes, which stay in memory: they are read
/// one case at a time, and with a cache, more than its memory budget is refused.
pub fn load(dir: &Path, m: &Manifest, cache: Option<Cache<'_>>) -> Result<SiteData> {
    let (channels, classes) = (m.task.channels as usize, m.task.classes as usize);
    let loading = || format!("loading dataset {}", dir.display());
    let msd = dir.join("dataset.json").is_file();
    let (train, validation, cases) = match cache {
        _ if m.model.dims == 3 => {
            anyhow::ensure!(
                msd,
                "{}: model.dims = 3 trains on volumes, and this is not an MSD dataset \
                 (dataset.json and NIfTI files); PNG images are 2D",
                dir.display()
            );
            let reader = DatasetReader::open(dir, channels, classes).with_context(loading)?;
            let mut volumes = VolumeSet::empty(m, channels);
            for i in 0..reader.len() {
                volumes
                    .push(&reader.read(i).with_context(loading)?, m)
                    .with_context(loading)?;
                if let Some(cache) = &cache {
                    anyhow::ensure!(
                        volumes.bytes() <= cache.memory_budget,
                        "{}: a 3D model holds the site's volumes in memory, and {} of {} cases \
                         already take {} MiB, more than node.data_memory_mib = {} MiB",
                        dir.display(),
                        i + 1,
                        reader.len(),
                        volumes.bytes() >> 20,
                        cache.memory_budget >> 20
                    );
                }
            }
            let (train, validation) =
                volumes.split(m.evaluation.validation_fraction, m.training.seed);
            (train.into(), validation.into(), reader.len())
        }
        Some(cache) if msd => {
            let reader = DatasetReader::open(dir, channels, classes).with_context(loading)?;
            let (train, validation) = stream_site_split(&reader, m, cache.dir, cache.memory_budget)
                .with_context(loading)?;
            (train.into(), validation.into(), reader.len())
        }
        _ => {
            let cases = load_dir(dir, channels, classes).with_context(loading)?;
            let (train, validation) = site_split(&cases, m)?;
            (train, validation, cases.len())
        }
    };
    anyhow::ensure!(
        !train.is_empty(),
        "{}: no training data after the validation split",
        dir.display()
    );
    Ok(SiteData {
        train,
        validation,
        cases,
    })
}
