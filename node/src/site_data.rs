//! A site's data for an experiment: its dataset sliced to the manifest's input size and split
//! into training and validation cases. The node, `train-local` and the demo's local-only
//! baseline all call this, so they train and score on exactly the same slices.

use std::path::Path;

use anyhow::{Context, Result};
use medmesh_protocol::Manifest;
use medmesh_training::data::load_dir;
use medmesh_training::data::msd::DatasetReader;
use medmesh_training::data::slices::{SliceSet, site_split, stream_site_split};

/// Training and validation slices of one site.
#[derive(Debug)]
pub struct SiteData {
    /// What the site trains on.
    pub train: SliceSet,
    /// What the site scores on (whole cases held out).
    pub validation: SliceSet,
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
pub fn load(dir: &Path, m: &Manifest, cache: Option<Cache<'_>>) -> Result<SiteData> {
    let (channels, classes) = (m.task.channels as usize, m.task.classes as usize);
    let loading = || format!("loading dataset {}", dir.display());
    let (train, validation, cases) = match cache {
        Some(cache) if dir.join("dataset.json").is_file() => {
            let reader = DatasetReader::open(dir, channels, classes).with_context(loading)?;
            let (train, validation) = stream_site_split(&reader, m, cache.dir, cache.memory_budget)
                .with_context(loading)?;
            (train, validation, reader.len())
        }
        _ => {
            let cases = load_dir(dir, channels, classes).with_context(loading)?;
            let (train, validation) = site_split(&cases, m)?;
            (train, validation, cases.len())
        }
    };
    anyhow::ensure!(
        !train.is_empty(),
        "{}: no training slices after the validation split",
        dir.display()
    );
    Ok(SiteData {
        train,
        validation,
        cases,
    })
}
