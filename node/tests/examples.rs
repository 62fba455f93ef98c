//! Every shipped example manifest passes `medmesh experiment check` and runs as a short
//! `medmesh demo` (one round, two local steps), as the README tells a researcher to rehearse
//! it.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_medmesh");

fn medmesh(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_example_checks_and_runs_as_a_short_demo() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut names: Vec<String> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml") || n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    let dir = tempfile::tempdir().unwrap();
    let mut private = 0;
    for (k, name) in names.iter().enumerate() {
        let path = examples.join(name);
        let path = path.to_str().unwrap();
        let (ok, text) = medmesh(&["experiment", "check", "--manifest", path]);
        assert!(ok && text.contains("digest"), "{name}: {text}");

        // The README's rehearsal command: brain extraction on the brain task, the rest on
        // synthetic sites; three sites where the manifest wants two peers a round.
        let task = if name.starts_with("brain") {
            "brain"
        } else {
            "synthetic"
        };
        let out = dir.path().join(format!("demo-{k}"));
        let port = (18500 + 20 * k).to_string();
        let (ok, text) = medmesh(&[
            "demo",
            "--manifest",
            path,
            "--task",
            task,
            "--sites",
            "3",
            "--rounds",
            "1",
            "--local-steps",
            "2",
            "--port",
            &port,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{name}: {text}");
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        let nodes = report["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3, "{name}");
        for n in nodes {
            assert_eq!(n["rounds_completed"], 1, "{name}: {n}");
        }
        assert!(
            report["consensus_distance"].as_f64().unwrap() <= 0.01,
            "{name}: {report}"
        );
        // With privacy noise, each site reports the epsilon its one release spent, and
        // `check` what the manifest's rounds would.
        if report["privacy_delta"].is_f64() {
            private += 1;
            for n in nodes {
                let spent = n["privacy_epsilon"].as_f64();
                assert!(spent.is_some_and(|e| e > 0.0), "{name}: {n}");
            }
            assert!(
                text.contains("differential privacy: epsilon spent"),
                "{text}"
            );
            let (_, check) = medmesh(&["experiment", "check", "--manifest", path]);
            assert!(check.contains("spend epsilon"), "{check}");
        }
    }
    assert!(
        private >= 1,
        "no example runs with privacy noise: {names:?}"
    );
}
