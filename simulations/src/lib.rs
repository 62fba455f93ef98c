//! medmesh's consortium simulator: replays consortia (tens to thousands of sites, WAN links,
//! churn, attackers, non-IID data) in virtual time and compares averaging schemes. Each
//! round's graph, mass split, confirmation and combination come from `medmesh-protocol`'s
//! round engine, and training from `medmesh-training`: the functions the nodes call, never
//! copies of them, so what it predicts is what the nodes do.
//!
//! * [`scenario`]: the scenario file format.
//! * [`topology`]: communication graphs.
//! * [`links`]: per-site links and hardware; transfer times.
//! * [`churn`]: who is online each round.
//! * [`arena`]: every site's vector in two contiguous arenas.
//! * [`mixing`]: one round of each scheme.
//! * [`spectral`]: the spectral gap that predicts neighbour averaging's rate.
//! * [`engine`]: the round loop, in consensus-only and learning modes.
//! * [`report`] and [`plot`]: JSON, CSV and PNG outputs.

pub mod arena;
pub mod churn;
pub mod engine;
pub mod links;
pub mod mixing;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod spectral;
pub mod topology;

use std::path::Path;

pub use engine::SimError;
pub use report::Report;
pub use scenario::Scenario;

/// Runs every variant of `scenario`, calling `on_round(done, total)` as rounds complete, and
/// returns the report and the raw series.
pub fn run(
    scenario: &Scenario,
    on_round: &mut dyn FnMut(u64, u64),
) -> Result<(Report, Vec<engine::VariantResult>), SimError> {
    let variants = engine::variants(scenario);
    let mut total = 0;
    for (method, rule, _) in &variants {
        total += match method {
            scenario::Method::Gossip(scheme) => {
                engine::variant_rules(scenario, *scheme, *rule)?.total_rounds(scenario.nodes)
            }
            scenario::Method::Fedavg | scenario::Method::LocalOnly => u64::from(scenario.rounds),
        };
    }
    let mut done = 0;
    let mut results = Vec::with_capacity(variants.len());
    for (scheme, rule, preset) in variants {
        let mut tick = || {
            done += 1;
            on_round(done, total);
        };
        results.push(engine::run_variant(
            scenario,
            scheme,
            rule,
            preset.as_deref(),
            &mut tick,
        )?);
    }
    let baselines = match scenario.mode {
        scenario::Mode::Learning => scenario
            .learning
            .presets
            .iter()
            .map(|p| engine::learning_baselines(scenario, p))
            .collect::<Result<_, _>>()?,
        scenario::Mode::Consensus => Vec::new(),
    };
    let report = Report {
        scenario: scenario.clone(),
        variants: results
            .iter()
            .map(|v| report::summarize(scenario, v))
            .collect(),
        baselines,
    };
    Ok((report, results))
}

/// Runs `scenario` and writes everything into `out` (plots unless `plots` is false).
pub fn run_to_dir(
    scenario: &Scenario,
    out: &Path,
    plots: bool,
    on_round: &mut dyn FnMut(u64, u64),
) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
    if plots {
        plot::ensure_font()?;
    }
    let (report, results) = run(scenario, on_round)?;
    report::write(out, &report, &results)?;
    if plots {
        plot::write_all(out, scenario, &results)?;
    }
    Ok(report)
}
