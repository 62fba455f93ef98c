//! `medmesh simulate`: runs a scenario of the consortium simulator with a progress bar and
//! prints a summary table.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use medmesh_sim::Scenario;

/// Options of `medmesh simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// The scenario file (TOML).
    #[arg(long)]
    pub scenario: PathBuf,
    /// Output directory.
    #[arg(long, default_value = "simulation")]
    pub out: PathBuf,
    /// Override the scenario's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override the number of sites (e.g. a smaller trial run).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Override the number of rounds.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Skip the PNG plots.
    #[arg(long)]
    pub no_plots: bool,
}

/// Runs the scenario.
pub fn run(o: &Options) -> Result<()> {
    let mut scenario = Scenario::from_file(&o.scenario)
        .with_context(|| format!("scenario {}", o.scenario.display()))?;
    if let Some(seed) = o.seed {
        scenario.seed = seed;
    }
    if let Some(n) = o.nodes {
        scenario.nodes = n;
    }
    if let Some(r) = o.rounds {
        scenario.rounds = r;
    }
    scenario
        .validate()
        .with_context(|| format!("scenario {} with the overrides", o.scenario.display()))?;
    let started = Instant::now();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} variant-rounds [{elapsed} / ~{eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = medmesh_sim::run_to_dir(&scenario, &o.out, !o.no_plots, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    bar.finish_and_clear();
    println!(
        "{:<44} {:>8} {:>12} {:>12} {:>12} {:>10}",
        "variant", "rounds*", "time* (s)", "MB/node", "consensus", "mean Dice"
    );
    for v in &report.variants {
        let opt_u = |x: Option<u32>| x.map_or_else(|| "-".into(), |v| v.to_string());
        let opt_f = |x: Option<f64>, p: usize| x.map_or_else(|| "-".into(), |v| format!("{v:.p$}"));
        println!(
            "{:<44} {:>8} {:>12} {:>12.2} {:>12.2e} {:>10}",
            v.name,
            opt_u(v.rounds_to_target),
            opt_f(v.time_to_target_s, 1),
            v.bytes_per_node / 1e6,
            v.final_consensus_error,
            opt_f(v.final_mean_dice, 3),
        );
    }
    for b in &report.baselines {
        println!(
            "{:<44} {:>8} {:>12} {:>12} {:>12} {:>10.3}",
            format!("pooled ({})", b.preset),
            "-",
            "-",
            "-",
            "-",
            b.pooled_mean_dice
        );
        if let Some((site, dice)) = b.unseen {
            println!(
                "{:<44} {:>8} {:>12} {:>12} {:>12} {:>10.3}",
                format!("unseen site {} ({})", site + 1, b.preset),
                "-",
                "-",
                "-",
                "-",
                dice
            );
        }
    }
    println!(
        "* to the target ({}); report, CSV and plots in {} ({:.1} s)",
        match scenario.mode {
            medmesh_sim::scenario::Mode::Consensus =>
                format!("consensus error {}", scenario.consensus.target_error),
            medmesh_sim::scenario::Mode::Learning =>
                format!("mean Dice {}", scenario.learning.target_dice),
        },
        o.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
