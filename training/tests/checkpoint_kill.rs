//! `kill -9` during checkpoint writes: a child process does nothing but write checkpoints,
//! so a kill at any moment lands mid-write most of the time. After every kill the checkpoint
//! on disk must load whole, and its round must never go backwards.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use medmesh_protocol::Manifest;
use medmesh_training::model::UNetConfig;
use medmesh_training::{TrainSettings, Trainer, atomic_file, checkpoint};

/// Enough kills that some land mid-write: about a third do on this machine.
const KILLS: usize = 30;

const WRITER_ENV: &str = "MEDMESH_TEST_CHECKPOINT_WRITER";

fn manifest() -> Manifest {
    Manifest::parse(include_str!("../../examples/synthetic-quickstart.toml")).unwrap()
}

fn load(path: &Path) -> Result<Trainer, checkpoint::CheckpointError> {
    let m = manifest();
    checkpoint::load(
        path,
        UNetConfig::from_manifest(&m),
        TrainSettings::from_manifest(&m),
        Device::flex(),
    )
}

/// The child: resumes from the checkpoint at `$MEDMESH_TEST_CHECKPOINT_WRITER` when there
/// is one, then writes the next round's checkpoint over and over until killed.
#[test]
#[ignore = "a helper process that killed_mid_write_never_corrupts_the_checkpoint starts"]
fn checkpoint_writer_process() {
    let Some(path) = std::env::var_os(WRITER_ENV).map(PathBuf::from) else {
        return;
    };
    let mut trainer = if path.exists() {
        load(&path).unwrap()
    } else {
        Trainer::new(&manifest(), Device::flex())
    };
    let until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < until {
        trainer.set_round(trainer.round() + 1);
        checkpoint::save(&trainer, &path).unwrap();
    }
}

fn spawn_writer(path: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["checkpoint_writer_process", "--exact", "--ignored"])
        .env(WRITER_ENV, path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn leftovers(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")
        })
        .count()
}

#[test]
fn killed_mid_write_never_corrupts_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.bin");
    // Deterministic kill delays (xorshift), spread over a few write durations.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut delay = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        Duration::from_millis(20 + state % 400)
    };
    let (mut last_round, mut torn) = (0, 0);
    for kill in 0..KILLS {
        let mut child = spawn_writer(&path);
        // Wait for this child's first write, then let it run a little longer.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !path.exists() || load(&path).is_ok_and(|t| t.round() <= last_round) {
            assert!(Instant::now() < deadline, "the writer wrote nothing");
            assert!(child.try_wait().unwrap().is_none(), "the writer died");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(delay());
        child.kill().unwrap();
        child.wait().unwrap();

        if leftovers(dir.path()) > 0 {
            torn += 1;
        }
        let trainer = load(&path)
            .unwrap_or_else(|e| panic!("after kill {kill}, the checkpoint does not load: {e}"));
        assert!(
            trainer.round() > last_round,
            "kill {kill}: round went from {last_round} to {}",
            trainer.round()
        );
        last_round = trainer.round();
        atomic_file::remove_leftovers(&path).unwrap();
        assert_eq!(leftovers(dir.path()), 0);
    }
    eprintln!("{KILLS} kills, {torn} mid-write, last round {last_round}");
    assert!(
        torn > 0,
        "no kill landed mid-write; the test did not test anything"
    );
}
