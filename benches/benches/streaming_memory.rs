//! Peak memory of training on a dataset larger than memory, against loading it whole.
//!
//! Generates (once, into `target/bench-data/streaming`) an MSD dataset of 64 volumes of
//! 256 x 256 x 256 voxels: 4 GiB of f32 voxels, plus their labels. Then, each in a child
//! process of its own that reports its peak resident set (VmHWM):
//!
//! * **streamed**: `site_data::load` through a slice cache with a 64 MiB budget (as a node
//!   and `train-local --cache` do), two rounds of training, and a validation pass;
//! * **baseline**: the same dataset loaded whole (`load_dir`), as without a cache.
//!
//! Run: `cargo bench -p medmesh-benches --bench streaming_memory`. Set
//! `MEDMESH_BENCH_DATA=DIR` to keep the dataset elsewhere.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use medmesh_node::site_data::{self, Cache};
use medmesh_protocol::Manifest;
use medmesh_training::data::msd::{self, DatasetJson, TrainingPair};
use medmesh_training::data::{Case, load_dir};
use medmesh_training::{TrainSettings, Trainer};

const CASES: usize = 64;
const SIDE: usize = 256;
const BUDGET_MIB: u64 = 64;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let data = std::env::var_os("MEDMESH_BENCH_DATA").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-data/streaming"),
        PathBuf::from,
    );
    match args.iter().position(|a| a.starts_with("--child-")) {
        Some(i) => child(&args[i], &data),
        None => parent(&data),
    }
}

fn parent(data: &Path) {
    if !data.join("dataset.json").is_file() {
        let t0 = Instant::now();
        generate(data);
        eprintln!(
            "generated {} in {:.0} s",
            data.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    let voxels = (CASES * SIDE * SIDE * SIDE) as f64;
    let on_disk: u64 = ["imagesTr", "labelsTr"]
        .iter()
        .flat_map(|d| std::fs::read_dir(data.join(d)).unwrap())
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    println!(
        "dataset: {CASES} cases of {SIDE}^3, {:.2} GiB of f32 voxels + {:.2} GiB of labels \
         ({:.2} GiB gzipped on disk)",
        voxels * 4.0 / GIB,
        voxels / GIB,
        on_disk as f64 / GIB
    );
    let streamed = run_child("--child-streamed", data);
    let whole = run_child("--child-whole", data);
    println!(
        "peak RSS: streamed {:.0} MiB, loaded whole {:.0} MiB; ratio {:.3}",
        streamed / MIB,
        whole / MIB,
        streamed / whole
    );
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const MIB: f64 = 1024.0 * 1024.0;

/// Runs this benchmark again as `mode` and returns the child's peak resident bytes.
fn run_child(mode: &str, data: &Path) -> f64 {
    let t0 = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .arg(mode)
        .env("MEDMESH_BENCH_DATA", data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{mode}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{mode} ({:.0} s): {stdout}", t0.elapsed().as_secs_f64());
    let kib: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_kib "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the child reports its peak RSS");
    kib * 1024.0
}

fn child(mode: &str, data: &Path) {
    let m = manifest();
    match mode {
        "--child-streamed" => {
            let cache_dir = data.with_extension("cache");
            let cache = Cache {
                dir: &cache_dir,
                memory_budget: BUDGET_MIB * 1024 * 1024,
            };
            let site = site_data::load(data, &m, Some(cache)).unwrap();
            let mut t = Trainer::new(&m, burn::tensor::Device::flex());
            let steps: usize = (0..2)
                .map(|_| t.train_round(&site.train, |_| {}).steps)
                .sum();
            let dice = t.evaluate(&site.validation).mean_dice;
            println!(
                "{} train and {} validation slices, on disk: {}; {steps} steps; validation \
                 Dice {dice:.3}",
                site.train.len(),
                site.validation.len(),
                site.train.is_on_disk()
            );
            let _ = std::fs::remove_dir_all(&cache_dir);
        }
        "--child-whole" => {
            let cases = load_dir(data, 1, 2).unwrap();
            println!("{} cases in memory", cases.len());
        }
        other => panic!("unknown mode {other}"),
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .expect("Linux reports VmHWM");
    println!("peak_rss_kib {}", hwm.trim().trim_end_matches("kB").trim());
}

fn manifest() -> Manifest {
    let mut m = Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap();
    m.task.dataset = "streaming".into();
    m.averaging.rounds = 2;
    m.training.local_epochs = None;
    m.training.local_steps = Some(4);
    let _ = TrainSettings::from_manifest(&m);
    m
}

/// Writes the dataset four cases at a time (never all of it in memory), then its index.
fn generate(dir: &Path) {
    let mut training = Vec::new();
    for chunk in 0..CASES / 4 {
        let cases: Vec<Case> = (chunk * 4..chunk * 4 + 4).map(volume).collect();
        msd::write_dataset(
            dir,
            "streaming",
            "benchmark",
            &["background", "ball"],
            &cases,
        )
        .unwrap();
        training.extend(cases.iter().map(|c| TrainingPair {
            image: format!("./imagesTr/{}.nii.gz", c.name),
            label: format!("./labelsTr/{}.nii.gz", c.name),
        }));
    }
    let mut meta: DatasetJson = msd::read_meta(dir).unwrap();
    meta.num_training = training.len();
    meta.training = training;
    std::fs::write(
        dir.join("dataset.json"),
        serde_json::to_string_pretty(&meta).unwrap(),
    )
    .unwrap();
}

/// A smooth head-like volume with a ball of brighter tissue labelled 1, placed per case.
fn volume(k: usize) -> Case {
    let n = SIDE;
    let c = [
        n as f32 * (0.4 + 0.02 * (k % 10) as f32),
        n as f32 * 0.5,
        n as f32 * 0.5,
    ];
    let r = n as f32 * (0.15 + 0.01 * (k % 7) as f32);
    let mut image = Vec::with_capacity(n * n * n);
    let mut label = Vec::with_capacity(n * n * n);
    for z in 0..n {
        for y in 0..n {
            for x in 0..n {
                let d = ((x as f32 - c[0]).powi(2)
                    + (y as f32 - c[1]).powi(2)
                    + (z as f32 - c[2]).powi(2))
                .sqrt();
                let inside = d < r;
                let texture = ((x * 7 + y * 13 + z * 3 + k) % 17) as f32;
                image.push(if inside { 600.0 } else { 200.0 } + texture);
                label.push(u8::from(inside));
            }
        }
    }
    Case::one_channel(&format!("case-{k:03}"), [n; 3], image, label)
}
