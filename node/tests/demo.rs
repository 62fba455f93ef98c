//! `medmesh demo` end to end at a small size: real node processes, the researcher's
//! submission, local-only baselines and `report.json` in the documented shape.

#[test]
fn demo_writes_a_complete_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_medmesh"))
        .args([
            "demo",
            "--sites",
            "3",
            "--rounds",
            "2",
            "--local-steps",
            "3",
            "--held-out",
            "2",
            "--port",
            "48300",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("found the other 2 through the DHT"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let nodes = report["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert!(n["peer_id"].as_str().unwrap().starts_with("12D3KooW"));
        assert_eq!(n["rounds_completed"], 2);
        for key in [
            "dice_initial",
            "dice_final",
            "dice_local_only",
            "dice_pooled",
        ] {
            let v = n[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
        // The unseen-site baseline is the held-out site's only.
        let unseen = n["dice_unseen"].as_f64();
        assert_eq!(unseen.is_some(), n["site"] == "site-2", "{n}");
        assert!(unseen.is_none_or(|v| (0.0..=1.0).contains(&v)));
        assert!(n["bytes_sent"].as_u64().unwrap() > 0);
        assert!(n["bytes_received"].as_u64().unwrap() > 0);
    }
    assert!(report["consensus_distance"].as_f64().unwrap() <= 0.01);
    assert_eq!(report["metric"], "dice");
    for key in ["federated", "local_only", "pooled"] {
        assert!(report["mean"][key].as_f64().is_some(), "{report}");
    }
    for column in ["federated", "local-only", "pooled", "unseen"] {
        assert!(stdout.contains(column), "{stdout}");
    }
    assert_eq!(report["manifest_hash"].as_str().unwrap().len(), 64);
    assert!(report["wall_seconds"].as_f64().unwrap() > 0.0);

    // A second run may reuse its own directory, but not someone else's.
    let foreign = dir.path().join("not-a-demo");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("precious.txt"), "keep").unwrap();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_medmesh"))
        .args(["demo", "--out"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a previous demo directory"));
    assert!(foreign.join("precious.txt").exists());
}
