//! One site on its own through the real binary: prepare data, train, evaluate.

use std::path::Path;
use std::process::Command;

fn medmesh(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_medmesh"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn prepare_train_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ok, out, err) = medmesh(
        d,
        &[
            "data",
            "prepare",
            "--task",
            "synthetic",
            "--sites",
            "2",
            "--out",
            "data",
            "--preset",
            "iid",
            "--cases",
            "6",
            "--slices",
            "6",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("site-2: 6 cases"), "{out}");
    assert!(d.join("data/site-1/imagesTr/site1_case000.nii.gz").exists());

    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/synthetic-quickstart.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("rounds = 10", "rounds = 2");
    std::fs::write(d.join("m.toml"), text).unwrap();
    let (ok, out, err) = medmesh(
        d,
        &[
            "--log-format",
            "json",
            "train-local",
            "--data",
            "data/site-1",
            "--manifest",
            "m.toml",
            "--out",
            "model.safetensors",
            "--checkpoint",
            "site.ckpt",
        ],
    );
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["rounds"], 2);
    assert!(
        err.lines()
            .any(|l| l.starts_with('{') && l.contains("round done")),
        "JSON logs: {err}"
    );
    assert!(d.join("site.ckpt").exists());

    // Resuming a finished run trains no further and re-exports the same model.
    let (ok, out2, err) = medmesh(
        d,
        &[
            "train-local",
            "--data",
            "data/site-1",
            "--manifest",
            "m.toml",
            "--out",
            "again.safetensors",
            "--checkpoint",
            "site.ckpt",
        ],
    );
    assert!(ok, "{err}");
    let again: serde_json::Value = serde_json::from_str(out2.trim()).unwrap();
    assert_eq!(again["dice_final"], summary["dice_final"]);

    // Sliced a case at a time into a cache, with no memory for slices: training reads every
    // batch from disk, and trains exactly as from memory.
    let (ok, out3, err) = medmesh(
        d,
        &[
            "--log-format",
            "json",
            "train-local",
            "--data",
            "data/site-1",
            "--manifest",
            "m.toml",
            "--out",
            "streamed.safetensors",
            "--cache",
            "slices",
            "--memory-mib",
            "0",
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains(r#""from_disk":true"#), "{err}");
    assert!(d.join("slices/train/images.f32").is_file());
    let streamed: serde_json::Value = serde_json::from_str(out3.trim()).unwrap();
    assert_eq!(streamed["dice_final"], summary["dice_final"]);

    let (ok, out, err) = medmesh(
        d,
        &[
            "evaluate",
            "--model",
            "model.safetensors",
            "--data",
            "data/site-2",
        ],
    );
    assert!(ok, "{err}");
    let eval: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(eval["mean_dice"].as_f64().unwrap() >= 0.0);
    assert_eq!(eval["cases"].as_array().unwrap().len(), 6);

    let (ok, _, err) = medmesh(
        d,
        &["evaluate", "--model", "m.toml", "--data", "data/site-2"],
    );
    assert!(!ok && err.contains("m.toml"), "{err}");
    let (ok, _, err) = medmesh(
        d,
        &[
            "train-local",
            "--data",
            "nowhere",
            "--manifest",
            "m.toml",
            "--out",
            "x",
        ],
    );
    assert!(!ok && err.contains("not a dataset directory"), "{err}");
    let (ok, _, err) = medmesh(
        d,
        &[
            "data",
            "prepare",
            "--task",
            "synthetic",
            "--out",
            "x",
            "--preset",
            "weird",
        ],
    );
    assert!(!ok && err.contains("unknown preset"), "{err}");
}

/// `model.dims = 3` through the binary: train-local on volumes, evaluate whole volumes with the
/// manifest, and clear refusals where a 3D model cannot go.
#[test]
fn a_3d_model_trains_evaluates_and_refuses_what_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ok, _, err) = medmesh(
        d,
        &[
            "data",
            "prepare",
            "--task",
            "synthetic",
            "--sites",
            "1",
            "--out",
            "data",
            "--preset",
            "iid",
            "--cases",
            "6",
            "--size",
            "40",
            "--slices",
            "20",
        ],
    );
    assert!(ok, "{err}");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let text = std::fs::read_to_string(examples.join("lesions-3d.toml"))
        .unwrap()
        .replace("rounds = 8", "rounds = 1")
        .replace("local_steps = 10", "local_steps = 3");
    std::fs::write(d.join("m3.toml"), text).unwrap();
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train-local",
            "--data",
            "data/site-1",
            "--manifest",
            "m3.toml",
            "--out",
            "m3.safetensors",
        ];
        args.extend_from_slice(extra);
        medmesh(d, &args)
    };
    let (ok, out, err) = train(&[]);
    assert!(ok, "{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["rounds"], 1);
    assert_eq!(
        summary["train_samples"], 5,
        "one patch per training case: {summary}"
    );
    assert_eq!(summary["validation_cases"], 1);

    let evaluate = |extra: &[&str]| {
        let mut args = vec![
            "evaluate",
            "--model",
            "m3.safetensors",
            "--data",
            "data/site-1",
        ];
        args.extend_from_slice(extra);
        medmesh(d, &args)
    };
    let (ok, out, err) = evaluate(&["--manifest", "m3.toml"]);
    assert!(ok, "{err}");
    let eval: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        eval["cases"].as_array().unwrap().len(),
        6,
        "whole volumes: {eval}"
    );
    let (ok, _, err) = evaluate(&[]);
    assert!(
        !ok && err.contains("is a 3D model; pass --manifest"),
        "{err}"
    );
    let two_d = examples.join("synthetic-quickstart.toml");
    let (ok, _, err) = evaluate(&["--manifest", two_d.to_str().unwrap()]);
    assert!(!ok && err.contains("model.dims = 2"), "{err}");

    // Volumes stay in memory: a budget they exceed is refused by name.
    let (ok, _, err) = train(&["--cache", "cache", "--memory-mib", "0"]);
    assert!(!ok && err.contains("node.data_memory_mib"), "{err}");
    // A folder that is no MSD dataset holds no volumes.
    std::fs::create_dir(d.join("flat")).unwrap();
    let (ok, _, err) = medmesh(
        d,
        &[
            "train-local",
            "--data",
            "flat",
            "--manifest",
            "m3.toml",
            "--out",
            "x",
        ],
    );
    assert!(
        !ok && err.contains("model.dims = 3 trains on volumes"),
        "{err}"
    );
}

/// `medmesh run` tries its compute device before it joins the mesh: a device this build
/// lacks is refused at start, naming it and the cargo feature that has it; `auto` starts and
/// logs the device it chose.
#[test]
fn run_tries_its_device_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let c = medmesh_node::local::LocalConsortium::create(dir.path(), 1, 17950).unwrap();
    c.prepare_data(2, 16, 2).unwrap();
    let config = c.node_dir(0).join("node.toml");
    let start = |device: &str, log: &Path| {
        let file = std::fs::File::create(log).unwrap();
        Command::new(env!("CARGO_BIN_EXE_medmesh"))
            .args(["run", "--config"])
            .arg(&config)
            .env("MEDMESH_NODE__DEVICE", device)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap()
    };
    // Waits up to a minute for the node to exit, or for `line` in its log.
    let wait = |child: &mut std::process::Child, log: &Path, line: &str| {
        for _ in 0..600 {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status.success());
            }
            if std::fs::read_to_string(log).unwrap().contains(line) {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!(
            "neither exited nor logged {line:?}: {}",
            std::fs::read_to_string(log).unwrap()
        );
    };

    // Starts the node on `device`. A build that has the device may start (the machine has the
    // hardware); otherwise it must exit at start, saying all of `says`, and never join.
    let refused = |device: &str, built: bool, says: &[&str]| {
        let log = dir.path().join(format!("{device}.log"));
        let mut node = start(device, &log);
        let exited = wait(&mut node, &log, "starting node");
        let text = std::fs::read_to_string(&log).unwrap();
        if built && exited.is_none() {
            let _ = node.kill();
        } else {
            assert_eq!(exited, Some(false), "refused at start: {text}");
            assert!(says.iter().all(|s| text.contains(s)), "{text}");
            assert!(!text.contains("starting node"), "it never joined: {text}");
        }
        let _ = node.wait();
    };
    // A build without CUDA names the feature; one with it, on a machine without a GPU, says so.
    let missing = if cfg!(feature = "cuda") {
        "does not work on this machine"
    } else {
        "--features cuda"
    };
    refused(
        "cuda:0",
        cfg!(feature = "cuda"),
        &["node.device = \"cuda:0\"", missing],
    );
    // The tests' binary has the wgpu backend (node's dev-dependency turns it on). A machine
    // without a discrete GPU, as CI is, refuses `wgpu:discrete` at start and says why.
    refused(
        "wgpu:discrete",
        true,
        &["\"wgpu:discrete\"", "does not work on this machine"],
    );

    let log = dir.path().join("auto.log");
    let mut node = start("auto", &log);
    let exited = wait(&mut node, &log, "starting node");
    let _ = node.kill();
    let _ = node.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(exited, None, "auto starts: {text}");
    let chosen = text
        .lines()
        .find(|l| l.contains("compute device"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(chosen.contains("configured=auto"), "{chosen}");
    if !cfg!(any(feature = "cuda", feature = "wgpu")) {
        assert!(chosen.contains("device=flex"), "{chosen}");
    }
}
