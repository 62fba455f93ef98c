//! `medmesh simulate`: runs a scenario of the consortium simulator with a progress bar and
//! prints a summary table.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use medmesh_sim::Scenario;

/// Options of `medmesh simulate`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scenario file.
    pub scenario: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Seed override.
    pub seed: Option<u64>,
    /// Sites override.
    pub nodes: Option<usize>,
    /// Rounds override.
    pub rounds: Option<u32>,
    /// Write PNG plots.
    pub plots: bool,
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
    let report = medmesh_sim::run_to_dir(&scenario, &o.out, o.plots, &mut |done, total| {
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
