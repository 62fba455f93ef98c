//! What each non-IID method does to per-site scores on the demo's skewed task, in process
//! (FedAvg stands for gossip, which ends at the same average):
//!
//! `cargo run --example non_iid_methods` (from the workspace root: it shares the tests' build)
//!
//! Sites, slices and manifest are the demo's (`examples/synthetic-skewed.toml`, preset
//! `skewed`, 4 sites of 10 cases, seed 1); FedProx uses mu = 0.01 and personalization 20
//! fine-tuning steps unless given as arguments: `-- MU STEPS`.

use burn::tensor::Device;
use medmesh_protocol::Manifest;
use medmesh_training::baselines::{self, Site};
use medmesh_training::data::generate_site_cases;
use medmesh_training::data::synthetic::Preset;
use medmesh_training::samples::site_split;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mu: f64 = args.first().map_or(0.01, |a| a.parse().expect("MU"));
    let steps: usize = args.get(1).map_or(20, |a| a.parse().expect("STEPS"));
    let m = Manifest::parse(include_str!("../../examples/synthetic-skewed.toml")).unwrap();
    let device = Device::flex();
    let size = m.task.input_size[0] as usize;
    let sites: Vec<Site> = (0..4)
        .map(|i| {
            let cases = generate_site_cases(None, Preset::Skewed, i, 10, size, 8, 1);
            let (train, validation) = site_split(&cases, &m).unwrap();
            Site { train, validation }
        })
        .collect();
    let all: Vec<&Site> = sites.iter().collect();
    let fed = |m: &Manifest| -> Vec<f64> {
        baselines::federated_average(m, &all, &device)
            .iter()
            .zip(&sites)
            .map(|(t, s)| baselines::score(m, t, &s.validation))
            .collect()
    };
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    rows.push((
        "local-only".into(),
        sites
            .iter()
            .map(|s| baselines::local_only(&m, s, &device).1)
            .collect(),
    ));
    rows.push(("pooled".into(), baselines::pooled(&m, &sites, &device)));
    rows.push(("FedAvg".into(), fed(&m)));
    let mut fedbn = m.clone();
    fedbn.averaging.keep_normalization_local = true;
    rows.push(("FedBN".into(), fed(&fedbn)));
    let mut prox = m.clone();
    prox.training.proximal_mu = Some(mu);
    rows.push((format!("FedProx (mu {mu})"), fed(&prox)));
    let mut tuned = baselines::federated_average(&m, &all, &device);
    rows.push((
        format!("FedAvg + personalization ({steps} steps)"),
        tuned
            .iter_mut()
            .zip(&sites)
            .map(|(t, s)| {
                t.fine_tune(&s.train, steps);
                baselines::score(&m, t, &s.validation)
            })
            .collect(),
    ));
    println!("| method | site-1 | site-2 | site-3 | site-4 | mean |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, v) in &rows {
        let cells: Vec<String> = v.iter().map(|d| format!("{d:.3}")).collect();
        println!(
            "| {name} | {} | {:.3} |",
            cells.join(" | "),
            v.iter().sum::<f64>() / v.len() as f64
        );
    }
    println!(
        "unseen site-1 (FedAvg of sites 2-4): {:.3}",
        baselines::unseen(&m, &sites, 0, &device)
    );
}
