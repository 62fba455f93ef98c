//! `medmesh data prepare`: per-site datasets in the MSD layout; `medmesh data import`: a
//! folder of DICOM series as a site dataset; `medmesh data fingerprint`: a site's signed
//! dataset statistics.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use medmesh_protocol::fingerprint::SignedFingerprint;
use medmesh_training::data::brain::BrainTemplate;
use medmesh_training::data::generate_site_cases;
use medmesh_training::data::msd::{self, write_dataset, write_dataset_of};
use medmesh_training::data::synthetic::Preset;
use medmesh_training::data::{Case, LabelVolume, dicom};

use crate::cli::TaskArg;
use crate::config::NodeConfig;
use crate::keystore;

/// Options of `medmesh data prepare`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrepareArgs {
    /// Which task.
    #[arg(long, value_enum)]
    pub task: TaskArg,
    /// Number of sites.
    #[arg(long, default_value_t = 4)]
    pub sites: usize,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// How sites differ: iid, feature-shift, label-skew, realistic, skewed.
    #[arg(long, default_value = "realistic")]
    pub preset: String,
    /// Seed; the same seed gives the same data.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Cases per site (before the preset's uneven sizes).
    #[arg(long, default_value_t = 16)]
    pub cases: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Slices per case.
    #[arg(long, default_value_t = 12)]
    pub slices: usize,
}

/// Writes `out/site-1`, `out/site-2`, ...
pub fn prepare(p: &PrepareArgs) -> Result<()> {
    let preset: Preset = p.preset.parse().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(p.sites >= 1, "--sites must be at least 1");
    anyhow::ensure!(
        (16..=512).contains(&p.size),
        "--size must be 16 to 512 pixels"
    );
    anyhow::ensure!(
        p.cases >= 2 && p.slices >= 1,
        "--cases must be at least 2 and --slices at least 1"
    );
    let template = match p.task {
        TaskArg::Brain => Some(BrainTemplate::load_default()?),
        TaskArg::Synthetic => None,
    };
    for site in 0..p.sites {
        let cases = generate_site_cases(
            template.as_ref(),
            preset,
            site,
            p.cases,
            p.size,
            p.slices,
            p.seed,
        );
        let dir = p.out.join(format!("site-{}", site + 1));
        let (name, classes): (&str, &[&str]) = match p.task {
            TaskArg::Synthetic => ("synthetic-lesions", &["background", "lesion"]),
            TaskArg::Brain => ("brain-extraction", &["background", "brain"]),
        };
        let description = format!(
            "medmesh {name}, site {} of {}, preset {preset}, seed {}",
            site + 1,
            p.sites,
            p.seed
        );
        write_dataset(&dir, name, &description, classes, &cases)
            .with_context(|| format!("writing {}", dir.display()))?;
        tracing::info!(site = site + 1, cases = cases.len(), dir = %dir.display(), "site dataset written");
        println!("{}: {} cases", dir.display(), cases.len());
    }
    Ok(())
}

/// Options of `medmesh data import`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// A folder of DICOM series (searched recursively; a file per slice, or multi-frame
    /// files whose frames are the slices). Each series'
    /// label is a DICOM SEG that references it (anywhere under the folder; segment numbers
    /// become classes), or a NIfTI named `label.nii.gz` (or `label.nii`) in the folder of its
    /// files.
    #[arg(long)]
    pub dicom: PathBuf,
    /// The site dataset to write (MSD layout: dataset.json, imagesTr/, labelsTr/).
    #[arg(long)]
    pub out: PathBuf,
    /// Label names, background first; a label voxel (a SEG's segment number) must be below
    /// their number.
    #[arg(long, value_delimiter = ',', default_value = "background,foreground")]
    pub labels: Vec<String>,
    /// The dataset's name in dataset.json.
    #[arg(long, default_value = "imported")]
    pub name: String,
}

/// Converts every series under `--dicom` (rescaled, in RAS, with its spacing) and its label
/// into an MSD-layout dataset.
pub fn import(a: &ImportArgs) -> Result<()> {
    anyhow::ensure!(
        a.labels.len() >= 2,
        "--labels needs the background and at least one class"
    );
    let series = dicom::read_series(&a.dicom)
        .with_context(|| format!("reading DICOM under {}", a.dicom.display()))?;
    let modality = series_modality(&series)?;
    let mut cases = Vec::with_capacity(series.len());
    for (k, mut s) in series.into_iter().enumerate() {
        let nifti = ["label.nii.gz", "label.nii"]
            .iter()
            .map(|n| s.dir.join(n))
            .find(|p| p.is_file());
        let (label, source) = match (s.segmentation.take(), nifti) {
            (Some(seg), Some(nifti)) => anyhow::bail!(
                "series {}: labelled twice, by the DICOM SEG {} and by {}; keep one",
                s.uid,
                seg.path.display(),
                nifti.display()
            ),
            (Some(seg), None) => {
                let classes = a.labels.len();
                if let Some((n, name)) = seg
                    .segments
                    .iter()
                    .find(|(n, _)| usize::from(*n) >= classes)
                {
                    anyhow::bail!(
                        "{}: segment {n} ({name:?}) has no class: --labels names {classes} \
                         (background and {}), and segment numbers become classes",
                        seg.path.display(),
                        a.labels[1..].join(", ")
                    );
                }
                let names: Vec<String> = seg
                    .segments
                    .iter()
                    .map(|(n, l)| format!("{n} {l}"))
                    .collect();
                let source = format!(
                    "DICOM SEG {} (segments: {})",
                    seg.path.display(),
                    names.join(", ")
                );
                (seg.label, source)
            }
            (None, Some(label_path)) => nifti_label(&s, &label_path, a.labels.len())?,
            (None, None) => anyhow::bail!(
                "series {} in {}: no label: neither a DICOM SEG referencing it nor a \
                 label.nii.gz beside its files",
                s.uid,
                s.dir.display()
            ),
        };
        let name = format!("case-{:03}", k + 1);
        println!(
            "{name}: series {} ({}), {:?} voxels, spacing {:.3?} mm, label {source}",
            s.uid,
            s.description.as_deref().unwrap_or("no description"),
            s.volume.dims,
            s.volume.spacing,
        );
        cases.push(Case {
            name,
            image: s.volume,
            label,
        });
    }
    let labels: Vec<&str> = a.labels.iter().map(String::as_str).collect();
    let description = format!("imported from DICOM under {}", a.dicom.display());
    write_dataset_of(&a.out, &a.name, &description, &modality, &labels, &cases)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("{}: {} cases of {modality}", a.out.display(), cases.len());
    Ok(())
}

/// The label NIfTI beside a series, checked to lie where the series lies; with a description
/// of where it came from.
fn nifti_label(
    s: &dicom::Series,
    label_path: &Path,
    classes: usize,
) -> Result<(LabelVolume, String)> {
    let (label, placed) = msd::read_label_placed(label_path, classes)?;
    // The label must cover the series' grid in the patient: same voxels, and its first
    // and last voxel within half a voxel of the series' (origin, spacing and direction).
    let far = s.volume.dims.map(|d| (d.max(1) - 1) as f64);
    let tolerance = 0.5
        * s.volume
            .spacing
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
    let misplaced = [[0.0; 3], far]
        .iter()
        .map(|&ijk| distance(placed.apply(ijk), s.affine.apply(ijk)))
        .fold(0.0, f64::max);
    anyhow::ensure!(
        label.dims == s.volume.dims && misplaced <= tolerance,
        "{}: the label's grid is {:?} voxels of {:.3?} mm from {:.1?} mm (RAS), series {}'s \
         is {:?} of {:.3?} mm from {:.1?} mm ({misplaced:.1} mm apart at a corner): it \
         does not belong to this series",
        label_path.display(),
        label.dims,
        placed.spacing(),
        placed.apply([0.0; 3]),
        s.uid,
        s.volume.dims,
        s.volume.spacing,
        s.affine.apply([0.0; 3]),
    );
    let source = format!(
        "{} (corners within {misplaced:.3} mm)",
        label_path.display()
    );
    Ok((label, source))
}

fn distance(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The modality every series shares, as `dataset.json` names it ("MR" becomes "MRI").
fn series_modality(series: &[dicom::Series]) -> Result<String> {
    let name = |s: &dicom::Series| match s.modality.as_deref() {
        Some("MR") => "MRI".to_owned(),
        Some(m) => m.to_owned(),
        None => "unknown".to_owned(),
    };
    let first = series.first().map(name).unwrap_or_else(|| "unknown".into());
    if let Some(other) = series.iter().find(|s| name(s) != first) {
        anyhow::bail!(
            "series {} is {} but series {} is {first}: import each modality into its own dataset",
            other.uid,
            name(other),
            series[0].uid
        );
    }
    Ok(first)
}

/// Options of `medmesh data fingerprint`.
#[derive(Debug, Clone, clap::Args)]
pub struct FingerprintArgs {
    /// The node's configuration: its identity signs, its roster names the consortium, its
    /// `[datasets.NAME]` section says where the dataset is.
    #[arg(long)]
    pub config: PathBuf,
    /// The dataset, by the name manifests give it (`task.dataset`).
    #[arg(long)]
    pub dataset: String,
    /// Where to write the signed fingerprint (JSON, for the data-protection officer to read
    /// before it is sent).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

/// Computes, signs and writes the fingerprint of one configured dataset.
pub fn fingerprint(a: &FingerprintArgs) -> Result<()> {
    anyhow::ensure!(
        a.force || !a.out.exists(),
        "{} already exists; refusing to overwrite it (pass --force to replace it)",
        a.out.display()
    );
    let cfg = NodeConfig::load(&a.config, None)?;
    let section = cfg.datasets.get(&a.dataset).with_context(|| {
        format!(
            "{} has no [datasets.{}] section (it has: {})",
            a.config.display(),
            a.dataset,
            cfg.datasets.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let identity = keystore::load_identity(&cfg.node.identity)?;
    let roster = keystore::load_roster(&cfg.node.roster)?
        .into_genesis(None)
        .with_context(|| format!("roster {}", cfg.node.roster.display()))?;
    let roster = roster.roster();
    roster
        .authorize(&identity.public_key(), medmesh_crypto::Role::Node)
        .with_context(|| {
            format!(
                "{} is not an active node of the roster",
                identity.public_key()
            )
        })?;
    let dir = &section.path;
    // Channels and classes as the dataset declares them; PNG pairs are one channel.
    let (modalities, channels, classes) = if dir.join("dataset.json").is_file() {
        let meta = msd::read_meta(dir)?;
        let modalities: Vec<String> = meta.modality.values().cloned().collect();
        let channels = modalities.len().max(1);
        (modalities, channels, meta.labels.len().max(2))
    } else {
        (Vec::new(), 1, 256)
    };
    let cases = medmesh_training::data::load_dir(dir, channels, classes)
        .with_context(|| format!("loading dataset {} from {}", a.dataset, dir.display()))?;
    let f = medmesh_training::data::fingerprint::fingerprint(
        &cases,
        &modalities,
        &roster.consortium,
        &a.dataset,
        identity.public_key(),
    );
    let signed = SignedFingerprint::sign(f, &identity);
    let text = serde_json::to_string_pretty(&signed).context("rendering the fingerprint")?;
    keystore::write_atomic(&a.out, text.as_bytes(), 0o644)?;
    let f = &signed.fingerprint;
    let fg = &f.foreground[0];
    println!(
        "wrote {}: dataset {} of consortium {}, signed by {}",
        a.out.display(),
        f.dataset,
        f.consortium,
        identity.public_key()
    );
    println!(
        "  {} cases; modality {}; channel 0 foreground: {} voxels, mean {:.4}, std {:.4}, \
         0.5th-99.5th percentile {:.4} to {:.4}",
        f.cases.len(),
        if f.modalities.iter().all(String::is_empty) {
            "unknown".to_owned()
        } else {
            f.modalities.join("+")
        },
        fg.voxels,
        fg.mean,
        fg.std,
        fg.quantiles[0],
        fg.quantiles[fg.quantiles.len() - 1]
    );
    println!(
        "  it holds each case's grid size and spacing, and per channel the count, mean, \
         standard deviation and 101 quantiles of foreground intensities: no voxel, label or \
         case name"
    );
    Ok(())
}
