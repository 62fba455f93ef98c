//! A site's data for an experiment: its dataset sliced to the manifest's input size and split
//! into training and validation cases. The node, `train-local` and the demo's local-only
//! baseline all call this, so they train and score on exactly the same slices.

use std::path::Path;

use anyhow::{Context, Result};
use medmesh_protocol::Manifest;
use medmesh_training::data::load_dir;
use medmesh_training::data::slices::{SliceSet, site_split};

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

/// Loads `dir` (MSD or PNG pairs) for `m`.
pub fn load(dir: &Path, m: &Manifest) -> Result<SiteData> {
    let cases = load_dir(dir, m.task.channels as usize, m.task.classes as usize)
        .with_context(|| format!("loading dataset {}", dir.display()))?;
    let (train, validation) = site_split(&cases, m)?;
    anyhow::ensure!(
        !train.is_empty(),
        "{}: no training slices after the validation split",
        dir.display()
    );
    Ok(SiteData {
        train,
        validation,
        cases: cases.len(),
    })
}
