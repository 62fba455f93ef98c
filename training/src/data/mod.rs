//! Medical images and masks: volumes as loaded, and the 2D slice sets the model trains on.
//!
//! * [`msd`]: the Medical Segmentation Decathlon layout (`dataset.json`, NIfTI files).
//! * [`png_pairs`]: `images/NAME.png` with `masks/NAME.png`.
//! * [`synthetic`]: seeded, non-IID multi-site data with scanner and annotator effects.
//! * [`brain`]: semi-real brain extraction cases built from a public T1 template.
//! * [`slices`]: volumes to normalized, resized 2D training slices.
//! * [`volumes`]: whole normalized volumes and random 3D patches, for a 3D UNet.
//! * [`fingerprint`]: a site's dataset statistics for the federated experiment plan.

pub mod brain;
pub mod fingerprint;
pub mod slices;
pub mod synthetic;
pub mod volumes;

pub use medmesh_imaging::{Case, DataError, LabelVolume, Volume, dicom, load_dir, msd, png_pairs};

/// Generates site `site`'s cases: synthetic lesions, or brain extraction from `template`
/// when given, with the site's scanner (and, for lesions, its lesion statistics) from
/// `preset`. Deterministic in `seed`.
pub fn generate_site_cases(
    template: Option<&brain::BrainTemplate>,
    preset: synthetic::Preset,
    site: usize,
    cases: usize,
    size: usize,
    slices: usize,
    seed: u64,
) -> Vec<Case> {
    let profile = synthetic::site_profile(preset, site, cases, seed);
    match template {
        None => synthetic::generate_site(&profile, size, slices, seed, site),
        Some(t) => {
            brain::generate_site(t, &profile.scanner, profile.cases, size, slices, seed, site)
        }
    }
}
