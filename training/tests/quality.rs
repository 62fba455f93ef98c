//! Training quality on small models and images, so these run in minutes on 2 CPU cores.

use burn::tensor::Device;
use medmesh_protocol::Manifest;
use medmesh_training::baselines::{self, Site};
use medmesh_training::data::brain::{self, BrainTemplate};
use medmesh_training::data::generate_site_cases;
use medmesh_training::data::slices::{SliceOptions, SliceSet, slice_cases};
use medmesh_training::data::synthetic::{Preset, generate_site, site_profile};
use medmesh_training::params::Selection;
use medmesh_training::samples::site_split;
use medmesh_training::{Trainer, checkpoint, export};

/// Rounds of the skewed-task and brain baselines tests.
const SKEWED_ROUNDS: u32 = 32;
const BRAIN_ROUNDS: u32 = 6;
/// Rounds and steps per round of the 3D test.
const THREE_D_ROUNDS: u32 = 6;
const THREE_D_STEPS: u32 = 10;

/// The training device: flex, or `MEDMESH_TEST_DEVICE` (`benches/gpu.sh` sets `cuda:0`).
fn test_device() -> Device {
    match std::env::var("MEDMESH_TEST_DEVICE") {
        Ok(name) => name
            .parse::<medmesh_training::DeviceSpec>()
            .and_then(|d| d.device())
            .unwrap_or_else(|e| panic!("MEDMESH_TEST_DEVICE={name}: {e}")),
        Err(_) => Device::flex(),
    }
}

fn manifest(rounds: u32) -> Manifest {
    let mut m = Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap();
    m.averaging.rounds = rounds;
    m
}

fn synthetic_site(site: usize, preset: Preset, cases: usize) -> (SliceSet, SliceSet) {
    let profile = site_profile(preset, site, cases, 11);
    let cases = generate_site(&profile, 64, 12, 11, site);
    let set = slice_cases(&cases, &SliceOptions::new([64, 64], 11)).unwrap();
    set.split(0.2, 11)
}

fn train(trainer: &mut Trainer, data: &SliceSet, rounds: usize) {
    for r in 0..rounds {
        let stats = trainer.train_round(data, |_| {});
        eprintln!(
            "round {r}: loss {:.4} over {} steps",
            stats.mean_loss, stats.steps
        );
    }
}

#[test]
fn synthetic_site_alone_reaches_dice_085() {
    let (train_set, val) = synthetic_site(0, Preset::Iid, 20);
    let m = manifest(8);
    let mut trainer = Trainer::new(&m, Device::flex());
    let t0 = std::time::Instant::now();
    train(&mut trainer, &train_set, 8);
    let eval = trainer.evaluate(&val);
    eprintln!(
        "synthetic: {} train slices, {:?}, dice {:.4}",
        train_set.len(),
        t0.elapsed(),
        eval.mean_dice
    );
    assert!(
        eval.mean_dice >= 0.85,
        "validation Dice {:.4}",
        eval.mean_dice
    );
}

#[test]
fn brain_site_alone_reaches_dice_090() {
    let template = BrainTemplate::load_default().expect("mricron-data is installed by .ci/run");
    let scanner = site_profile(Preset::FeatureShift, 2, 0, 5).scanner;
    let cases = brain::generate_site(&template, &scanner, 14, 64, 8, 5, 2);
    let (train_set, val) = slice_cases(&cases, &SliceOptions::new([64, 64], 5))
        .unwrap()
        .split(0.2, 5);
    let m = manifest(6);
    let mut trainer = Trainer::new(&m, test_device());
    let t0 = std::time::Instant::now();
    train(&mut trainer, &train_set, 6);
    let eval = trainer.evaluate(&val);
    eprintln!(
        "brain: {} train slices, {:?}, dice {:.4}",
        train_set.len(),
        t0.elapsed(),
        eval.mean_dice
    );
    assert!(
        eval.mean_dice >= 0.90,
        "validation Dice {:.4}",
        eval.mean_dice
    );
}

#[test]
fn averaged_weights_of_two_sites_make_a_working_model() {
    let (train_a, val_a) = synthetic_site(0, Preset::FeatureShift, 14);
    let (train_b, val_b) = synthetic_site(1, Preset::FeatureShift, 14);
    let m = manifest(6);
    // Same seed: both sites start from the same initial model, as in a real experiment.
    let mut a = Trainer::new(&m, Device::flex());
    let mut b = Trainer::new(&m, Device::flex());
    let weight = |t: &SliceSet| t.len() as f64;
    // FedAvg by hand through the flat weights path: train a round each, average, load back.
    for round in 0..6 {
        a.train_round(&train_a, |_| {});
        b.train_round(&train_b, |_| {});
        if round == 0 {
            // Loading right after training (batch-norm statistics still pending) must stick.
            let w = vec![0.5f32; a.weights(Selection::All).len()];
            let mut probe = Trainer::new(&m, Device::flex());
            probe.train_round(&train_a, |_| {});
            probe.set_weights(&w, Selection::All).unwrap();
            assert_eq!(probe.weights(Selection::All), w);
        }
        let (wa, wb) = (a.weights(Selection::All), b.weights(Selection::All));
        let mut mean = vec![0.0; wa.len()];
        medmesh_protocol::averaging::weighted_mean(
            &[(&wa, weight(&train_a)), (&wb, weight(&train_b))],
            &mut mean,
        )
        .unwrap();
        a.set_weights(&mean, Selection::All).unwrap();
        b.set_weights(&mean, Selection::All).unwrap();
        assert_eq!(a.weights(Selection::All), mean);
    }
    let (da, db) = (a.evaluate(&val_a).mean_dice, a.evaluate(&val_b).mean_dice);
    eprintln!("averaged model: dice site A {da:.4}, site B {db:.4}");
    assert!(da > 0.8 && db > 0.8, "averaged model: {da:.4} / {db:.4}");
}

#[test]
fn resuming_from_a_checkpoint_equals_an_uninterrupted_run() {
    let (train_set, _) = synthetic_site(3, Preset::Iid, 6);
    let mut m = manifest(4);
    m.training.local_epochs = None;
    m.training.local_steps = Some(3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.ckpt");

    let mut straight = Trainer::new(&m, Device::flex());
    train(&mut straight, &train_set, 4);

    let mut first = Trainer::new(&m, Device::flex());
    train(&mut first, &train_set, 2);
    checkpoint::save(&first, &path).unwrap();
    drop(first);
    let mut resumed = checkpoint::load(
        &path,
        *straight.config(),
        medmesh_training::TrainSettings::from_manifest(&m),
        Device::flex(),
    )
    .unwrap();
    assert_eq!(resumed.round(), 2);
    train(&mut resumed, &train_set, 2);
    let (x, y) = (
        straight.weights(Selection::All),
        resumed.weights(Selection::All),
    );
    let max_diff = x
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert_eq!(max_diff, 0.0, "resumed run differs by up to {max_diff}");

    // A damaged checkpoint is refused with a clear error; the good one still loads.
    let bytes = std::fs::read(&path).unwrap();
    let broken = dir.path().join("broken.ckpt");
    std::fs::write(&broken, &bytes[..bytes.len() / 2]).unwrap();
    let err = checkpoint::load(
        &broken,
        *straight.config(),
        medmesh_training::TrainSettings::from_manifest(&m),
        Device::flex(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("corrupt checkpoint"), "{err}");
}

#[test]
fn exported_safetensors_are_readable_by_the_safetensors_crate() {
    let m = manifest(1);
    let trainer = Trainer::new(&m, Device::flex());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    export::save(
        &trainer.model(),
        trainer.config(),
        &[("manifest_digest", "abc".into())],
        &path,
    )
    .unwrap();

    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = st.tensor("encoder.0.conv1.weight").unwrap();
    assert_eq!(w.shape(), &[8, 1, 3, 3]);
    assert_eq!(st.tensor("head.weight").unwrap().shape(), &[2, 8, 1, 1]);
    assert_eq!(st.tensor("head.bias").unwrap().shape(), &[2]);
    assert!(
        st.tensor("encoder.0.norm1.weight").is_ok(),
        "norm scale uses PyTorch's name"
    );
    assert!(st.tensor("encoder.0.norm1.running_var").is_ok());
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["manifest_digest"], "abc");

    let (model, config) = export::load(&path, &Device::flex()).unwrap();
    assert_eq!(config, *trainer.config());
    assert_eq!(
        medmesh_training::params::flatten(&model, Selection::All),
        trainer.weights(Selection::All)
    );
}

/// Sites of `preset` for manifest `m`, generated at its input size.
fn sites(m: &Manifest, preset: Preset, n: usize, cases: usize, slices: usize) -> Vec<Site> {
    let template = None;
    (0..n)
        .map(|i| {
            let size = m.task.input_size[0] as usize;
            let cases = generate_site_cases(template, preset, i, cases, size, slices, 1);
            let (train, validation) = site_split(&cases, m).unwrap();
            Site { train, validation }
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn on_the_skewed_task_federation_beats_training_alone() {
    let mut m = Manifest::parse(include_str!("../../examples/synthetic-skewed.toml")).unwrap();
    m.averaging.rounds = SKEWED_ROUNDS;
    let sites = sites(&m, Preset::Skewed, 4, 10, 8);
    let device = Device::flex();
    let t0 = std::time::Instant::now();
    let local: Vec<f64> = sites
        .iter()
        .map(|s| baselines::local_only(&m, s, &device).1)
        .collect();
    let fed: Vec<f64> =
        baselines::federated_average(&m, &sites.iter().collect::<Vec<_>>(), &device)
            .iter()
            .zip(&sites)
            .map(|(t, s)| baselines::score(&m, t, &s.validation))
            .collect();
    eprintln!(
        "skewed task, {:?}: local-only {local:.3?} (mean {:.3}), federated {fed:.3?} (mean {:.3})",
        t0.elapsed(),
        mean(&local),
        mean(&fed)
    );
    assert!(
        mean(&fed) >= mean(&local) + 0.05,
        "federated {:.3} vs local-only {:.3}",
        mean(&fed),
        mean(&local)
    );
}

#[test]
fn brain_model_of_the_other_sites_is_within_005_of_pooled_at_an_unseen_site() {
    let template = BrainTemplate::load_default().expect("mricron-data is installed by .ci/run");
    let mut m = manifest(BRAIN_ROUNDS);
    m.task.input_size = [48, 48];
    m.training.local_epochs = None;
    m.training.local_steps = Some(8);
    let sites: Vec<Site> = (0..3)
        .map(|i| {
            let cases = generate_site_cases(Some(&template), Preset::FeatureShift, i, 6, 48, 6, 3);
            let (train, validation) = site_split(&cases, &m).unwrap();
            Site { train, validation }
        })
        .collect();
    let device = Device::flex();
    let t0 = std::time::Instant::now();
    let pooled = baselines::pooled(&m, &sites, &device);
    let unseen = baselines::unseen(&m, &sites, 0, &device);
    eprintln!(
        "brain, {:?}: pooled {pooled:.3?}, unseen site 1 {unseen:.3}",
        t0.elapsed()
    );
    assert!(
        unseen >= pooled[0] - 0.05,
        "unseen {unseen:.3} vs pooled {:.3}",
        pooled[0]
    );
}

/// Augmentation carries a federated brain model to a site whose heads lie and whose scanner
/// differs as no training site's do (`brain::generate_unseen_site`), without costing the
/// training sites: the README's unseen-site figures, held by a bar.
#[test]
fn augmentation_carries_a_brain_model_to_an_unseen_pose_and_scanner() {
    let template = BrainTemplate::load_default().expect("mricron-data is installed by .ci/run");
    let mut m = manifest(12);
    m.task.input_size = [48, 48];
    m.training.local_epochs = None;
    m.training.local_steps = Some(8);
    let sites: Vec<Site> = (0..3)
        .map(|i| {
            let cases = generate_site_cases(Some(&template), Preset::FeatureShift, i, 8, 48, 8, 3);
            let (train, validation) = site_split(&cases, &m).unwrap();
            Site { train, validation }
        })
        .collect();
    let mut opts = SliceOptions::new([48, 48], m.training.seed);
    opts.keep_empty = 0.0;
    let unseen = slice_cases(&brain::generate_unseen_site(&template, 8, 48, 8, 3), &opts).unwrap();
    let device = Device::flex();
    let mut run = |augmentation| {
        m.training.augmentation = augmentation;
        let trainers = baselines::federated_average(&m, &sites.iter().collect::<Vec<_>>(), &device);
        let own = mean(
            &trainers
                .iter()
                .zip(&sites)
                .map(|(t, s)| baselines::score(&m, t, &s.validation))
                .collect::<Vec<_>>(),
        );
        (own, baselines::score(&m, &trainers[0], &unseen))
    };
    let (own_plain, unseen_plain) = run(None);
    let (own_augmented, unseen_augmented) = run(Some(medmesh_training::augment::MEASURED));
    eprintln!(
        "brain: flips only: own {own_plain:.3}, unseen {unseen_plain:.3}; \
         augmented: own {own_augmented:.3}, unseen {unseen_augmented:.3}"
    );
    assert!(
        unseen_augmented >= unseen_plain + 0.3,
        "unseen site: {unseen_augmented:.3} augmented vs {unseen_plain:.3}"
    );
    assert!(
        own_augmented >= own_plain - 0.02,
        "own sites: {own_augmented:.3} augmented vs {own_plain:.3}"
    );
}

/// `model.dims = 3`: a 3D UNet trained on random 16 x 32 x 32 patches (a third of them
/// forced onto a lesion) of 40 x 40 x 20 synthetic volumes, and scored on whole held-out
/// volumes tiled by patches, segments the lesions: the README's 3D figure.
#[test]
fn a_3d_unet_on_patches_segments_synthetic_lesions() {
    let mut m = manifest(THREE_D_ROUNDS);
    m.model.dims = 3;
    m.task.input_depth = Some(16);
    m.task.input_size = [32, 32];
    m.training.batch_size = 2;
    m.training.local_epochs = None;
    m.training.local_steps = Some(THREE_D_STEPS);
    m.validate().unwrap();
    let profile = site_profile(Preset::Iid, 0, 12, 11);
    let cases = generate_site(&profile, 40, 20, 11, 0);
    let (train_set, val) = site_split(&cases, &m).unwrap();
    assert_eq!((train_set.len(), val.cases()), (10, 2));
    let mut trainer = Trainer::new(&m, test_device());
    let t0 = std::time::Instant::now();
    let before = trainer.evaluate(&val).mean_dice;
    for r in 0..THREE_D_ROUNDS {
        let stats = trainer.train_round(&train_set, |_| {});
        eprintln!(
            "3D round {r}: loss {:.4}, {:?}",
            stats.mean_loss,
            t0.elapsed()
        );
    }
    let eval = trainer.evaluate(&val);
    eprintln!(
        "3D: {} steps of 2 patches, {:?}, Dice {before:.3} -> {:.3}",
        THREE_D_ROUNDS * THREE_D_STEPS,
        t0.elapsed(),
        eval.mean_dice
    );
    assert!(
        eval.mean_dice >= 0.80,
        "validation Dice {:.4}",
        eval.mean_dice
    );
}
