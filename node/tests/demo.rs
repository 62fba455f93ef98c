//! `medmesh demo` end to end at a small size: real node processes, the researcher's
//! submission, local-only baselines and `report.json` in the documented shape, and the
//! dashboard it leaves running with `--keep-running`.

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// GET `path` on a node's dashboard; the body.
fn dashboard_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

#[test]
fn demo_writes_a_complete_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_medmesh"))
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
            "18300",
            "--keep-running",
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its output, line by line, until it says the nodes keep running.
    let (lines, rx) = std::sync::mpsc::channel();
    let reader = BufReader::new(demo.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut stdout = String::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stdout.contains("the nodes keep running") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => stdout.push_str(&(line + "\n")),
            Err(_) => {
                let _ = demo.kill();
                let mut stderr = String::new();
                let _ = demo.stderr.take().unwrap().read_to_string(&mut stderr);
                panic!("the demo stopped or hung:\n{stdout}\n{stderr}");
            }
        }
    }
    assert!(
        stdout.contains("found the other 2 through the DHT"),
        "{stdout}"
    );
    // The nodes stay up after the report: the dashboard the demo names answers.
    let dashboard = "127.0.0.1:18400";
    assert!(
        stdout.contains(&format!("dashboard: http://{dashboard}/")),
        "{stdout}"
    );
    let experiments: serde_json::Value =
        serde_json::from_str(&dashboard_get(dashboard, "/api/v1/experiments")).unwrap();
    let sites = experiments[0]["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 3, "{experiments}");
    assert!(
        sites.iter().all(|s| s["status"] == "finished"),
        "{experiments}"
    );
    assert!(dashboard_get(dashboard, "/").contains("<title>medmesh</title>"));
    // Ctrl-C stops it cleanly.
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let status = demo.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        std::net::TcpStream::connect(dashboard).is_err(),
        "the nodes outlived the demo"
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
