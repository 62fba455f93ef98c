//! `medmesh simulate` on a shipped scenario, shrunk from the command line.

#[test]
fn simulate_runs_a_shipped_scenario_with_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../simulations/scenarios/scale.toml"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_medmesh"))
        .args([
            "simulate",
            "--scenario",
            scenario,
            "--nodes",
            "60",
            "--rounds",
            "8",
            "--out",
        ])
        .arg(dir.path().join("sim"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for variant in ["pairwise-gossip", "push-sum", "metropolis-hastings/mean"] {
        assert!(stdout.contains(variant), "{stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("sim/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["scenario"]["nodes"], 60);
    assert_eq!(report["variants"].as_array().unwrap().len(), 3);
    assert!(dir.path().join("sim/scale-consensus-time.png").exists());

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_medmesh"))
        .args(["simulate", "--scenario", scenario, "--nodes", "1"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("`nodes`"));
}
