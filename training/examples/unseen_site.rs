//! How a federated brain-extraction model does at a site unlike any that trained, with and
//! without augmentation.
//!
//! Three training sites (the brain task's `feature-shift` scanners, heads tilted up to 11°
//! at 0.9-1.1 of the template's size) train by FedAvg. The unseen site
//! (`brain::generate_unseen_site`) tilts its heads 20-34°, shows them smaller, and has a
//! scanner outside the training sites' gamma, bias-field and noise ranges. Run:
//!
//! ```sh
//! cargo run --example unseen_site -p medmesh-training [-- ROUNDS [PROBABILITY]]
//! ```
//!
//! `UNSEEN=pose` keeps the training sites' scanner and `UNSEEN=scanner` their pose;
//! `SCANNER=gamma,bias,noise,blur` replaces the unseen scanner's values: to tell which
//! difference costs what.

use burn::tensor::Device;
use medmesh_protocol::Manifest;
use medmesh_protocol::manifest::Augmentation;
use medmesh_training::augment::MEASURED;
use medmesh_training::baselines::{self, Site};
use medmesh_training::data::brain::{self, BrainTemplate, Pose, UNSEEN_SCANNER};
use medmesh_training::data::generate_site_cases;
use medmesh_training::data::slices::{SliceOptions, slice_cases};
use medmesh_training::data::synthetic::{Noise, Preset, Scanner};
use medmesh_training::samples::site_split;

fn main() {
    let arg = |i: usize, default: f64| {
        std::env::args().nth(i).map_or(default, |a| {
            a.parse().expect("ROUNDS and PROBABILITY are numbers")
        })
    };
    let (rounds, probability) = (arg(1, 12.0) as u32, arg(2, 0.2));
    let template = BrainTemplate::load_default().expect("mricron-data installed");
    let mut m = Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap();
    m.task.input_size = [48, 48];
    m.averaging.rounds = rounds;
    m.training.local_epochs = None;
    m.training.local_steps = Some(8);
    let size = 48;
    let sites: Vec<Site> = (0..3)
        .map(|i| {
            let cases =
                generate_site_cases(Some(&template), Preset::FeatureShift, i, 8, size, 8, 3);
            let (train, validation) = site_split(&cases, &m).unwrap();
            Site { train, validation }
        })
        .collect();
    let mut scanner = UNSEEN_SCANNER;
    if let Ok(v) = std::env::var("SCANNER") {
        let f: Vec<f64> = v
            .split(',')
            .map(|x| x.parse().expect("SCANNER numbers"))
            .collect();
        (scanner.gamma, scanner.bias, scanner.noise_level) = (f[0], f[1], f[2]);
        scanner.blur = f[3] as usize;
    }
    let usual = Scanner {
        gain: 1.0,
        gamma: 1.0,
        bias: 0.1,
        noise: Noise::Gaussian,
        noise_level: 0.04,
        blur: 0,
    };
    let (scanner, pose) = match std::env::var("UNSEEN").as_deref() {
        Ok("pose") => (usual, Pose::UNSEEN),
        Ok("scanner") => (scanner, Pose::USUAL),
        _ => (scanner, Pose::UNSEEN),
    };
    let unseen_cases = brain::generate_posed_site(&template, &scanner, pose, 8, size, 8, 3, 99);
    let mut opts = SliceOptions::new([size, size], m.training.seed);
    opts.keep_empty = 0.0;
    let unseen = slice_cases(&unseen_cases, &opts).unwrap();
    let device = Device::flex();
    println!(
        "{rounds} rounds of FedAvg over 3 brain sites, 8 local steps each, 48 x 48; \
         augmentation probability {probability}"
    );
    println!(
        "{:<14} {:>10} {:>12} {:>8}",
        "augmentation", "own sites", "unseen site", "gap"
    );
    let augmentation = Augmentation {
        probability,
        ..MEASURED
    };
    for (name, aug) in [("flips only", None), ("nnU-Net-like", Some(augmentation))] {
        m.training.augmentation = aug;
        m.validate().unwrap();
        let t0 = std::time::Instant::now();
        let trainers = baselines::federated_average(&m, &sites.iter().collect::<Vec<_>>(), &device);
        let own: Vec<f64> = trainers
            .iter()
            .zip(&sites)
            .map(|(t, s)| baselines::score(&m, t, &s.validation))
            .collect();
        let own_mean = own.iter().sum::<f64>() / own.len() as f64;
        let away = baselines::score(&m, &trainers[0], &unseen);
        println!(
            "{name:<14} {own_mean:>10.3} {away:>12.3} {:>8.3}   (own {own:.3?}, {:.0} s)",
            own_mean - away,
            t0.elapsed().as_secs_f64()
        );
    }
}
