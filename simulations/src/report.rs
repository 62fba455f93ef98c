//! What a run leaves behind: `report.json` (the scenario and a summary per variant), one CSV
//! time series per variant, and PNG plots with every variant of the scenario on one figure.

use std::path::Path;

use serde::Serialize;

use crate::engine::VariantResult;
use crate::scenario::{Mode, Scenario};

/// One variant's summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Variant name.
    pub name: String,
    /// First round at the target (consensus error or mean Dice), if reached.
    pub rounds_to_target: Option<u32>,
    /// Virtual seconds to the target, if reached.
    pub time_to_target_s: Option<f64>,
    /// Virtual seconds for all rounds.
    pub total_time_s: f64,
    /// Bytes sent per site over the run.
    pub bytes_per_node: f64,
    /// Consensus error after the last round.
    pub final_consensus_error: f64,
    /// Per-round decay of the consensus error from round 1 to the round that reached the
    /// target (or the last), `(e_k / e_1)^(1 / (k - 1))`.
    pub measured_rate: Option<f64>,
    /// For `metropolis-hastings`: the rate its spectral gap predicts (SLEM).
    pub predicted_rate: Option<f64>,
    /// For `metropolis-hastings`: rounds to the target the spectral gap predicts.
    pub predicted_rounds_to_target: Option<u32>,
    /// Mean Dice over honest sites after the last round.
    pub final_mean_dice: Option<f64>,
    /// Worst honest site after the last round.
    pub final_min_dice: Option<f64>,
    /// Final Dice per honest site: (site index, Dice).
    pub final_dice: Vec<(usize, f64)>,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario as run.
    pub scenario: Scenario,
    /// Per variant, in run order.
    pub variants: Vec<Summary>,
    /// Learning mode: per preset, what the variants are measured against.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub baselines: Vec<Baselines>,
}

/// A preset's pooled and unseen-site baselines (see `medmesh_training::baselines`).
#[derive(Debug, Clone, Serialize)]
pub struct Baselines {
    /// The data preset.
    pub preset: String,
    /// One model on every site's training cases, same total steps: Dice per site.
    pub pooled_dice: Vec<f64>,
    /// Its mean over sites.
    pub pooled_mean_dice: f64,
    /// The held-out site (0-based) and FedAvg-without-it's Dice there.
    pub unseen: Option<(usize, f64)>,
}

/// Summarizes `v` against the scenario's target.
pub fn summarize(s: &Scenario, v: &VariantResult) -> Summary {
    let reached = v.rows.iter().find(|r| match s.mode {
        Mode::Consensus => r.consensus_error <= s.consensus.target_error,
        Mode::Learning => r.mean_dice.is_some_and(|d| d >= s.learning.target_dice),
    });
    let first = v.rows.first();
    let last = v.rows.last();
    // The decay is measured up to the target: below it float32 rounding sets a floor.
    let decay_end = match s.mode {
        Mode::Consensus => v
            .rows
            .iter()
            .find(|r| r.consensus_error <= s.consensus.target_error)
            .or(last),
        Mode::Learning => last,
    };
    let measured_rate = match (first, decay_end) {
        (Some(a), Some(b)) if b.round > a.round && a.consensus_error > 0.0 => {
            Some((b.consensus_error / a.consensus_error).powf(1.0 / f64::from(b.round - a.round)))
        }
        _ => None,
    };
    let predicted_rounds_to_target = match (v.slem, first) {
        (Some(rate), Some(a)) if rate > 0.0 && rate < 1.0 && a.consensus_error > 0.0 => {
            let target = s.consensus.target_error;
            Some(if a.consensus_error <= target {
                1
            } else {
                1 + ((target / a.consensus_error).ln() / rate.ln()).ceil() as u32
            })
        }
        _ => None,
    };
    Summary {
        name: v.name.clone(),
        rounds_to_target: reached.map(|r| r.round),
        time_to_target_s: reached.map(|r| r.virtual_time_s),
        total_time_s: last.map_or(0.0, |r| r.virtual_time_s),
        bytes_per_node: last.map_or(0.0, |r| r.bytes_total as f64 / s.nodes as f64),
        final_consensus_error: last.map_or(0.0, |r| r.consensus_error),
        measured_rate,
        predicted_rate: v.slem,
        predicted_rounds_to_target,
        final_mean_dice: last.and_then(|r| r.mean_dice),
        final_min_dice: last.and_then(|r| r.min_dice),
        final_dice: v.final_dice.clone(),
    }
}

/// The CSV time series of one variant.
pub fn csv(v: &VariantResult) -> String {
    let mut out =
        String::from("round,virtual_time_s,consensus_error,mean_dice,min_dice,bytes_total,online");
    for (site, _) in &v.final_dice {
        out.push_str(&format!(",dice_site_{site}"));
    }
    out.push('\n');
    let opt = |x: Option<f64>| x.map_or_else(String::new, |v| format!("{v:.6}"));
    for r in &v.rows {
        out.push_str(&format!(
            "{},{:.3},{:.6e},{},{},{},{}",
            r.round,
            r.virtual_time_s,
            r.consensus_error,
            opt(r.mean_dice),
            opt(r.min_dice),
            r.bytes_total,
            r.online
        ));
        // Each site's Dice at full precision: what a node logs for the same round.
        for d in &r.site_dice {
            out.push_str(&format!(",{d}"));
        }
        out.push('\n');
    }
    out
}

/// A file-name-safe variant name.
pub fn file_stem(name: &str) -> String {
    name.replace('/', "_")
}

/// Writes `report.json` and the CSVs into `dir`.
pub fn write(dir: &Path, report: &Report, results: &[VariantResult]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("report.json"), json + "\n")?;
    for v in results {
        std::fs::write(dir.join(format!("{}.csv", file_stem(&v.name))), csv(v))?;
    }
    Ok(())
}
