//! `medmesh data prepare`: per-site datasets in the MSD layout.

use std::path::PathBuf;

use anyhow::{Context, Result};
use medmesh_training::data::brain::BrainTemplate;
use medmesh_training::data::generate_site_cases;
use medmesh_training::data::msd::write_dataset;
use medmesh_training::data::synthetic::Preset;

use crate::cli::TaskArg;

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
