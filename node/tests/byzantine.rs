//! Byzantine-robust averaging in real nodes: one of five sites sends its weights sign-flipped
//! and scaled by 10. With the plain mean the honest sites' models suffer; with the
//! coordinate-wise trimmed mean, or the mean of updates clipped to a norm around the local
//! model, they stay within 0.05 Dice of a clean run.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use medmesh_node::client::Client;
use medmesh_node::config::NodeConfig;
use medmesh_node::local::{self, LocalConsortium, Nodes};
use medmesh_node::service::{self, Hooks};
use medmesh_protocol::manifest::{Aggregation, Scheme};
use medmesh_protocol::{Manifest, SignedManifest};

const BIN: &str = env!("CARGO_BIN_EXE_medmesh");
const SITES: usize = 5;
const ATTACKER: usize = 4;

fn manifest(aggregation: Aggregation, clip_norm: Option<f64>) -> Manifest {
    let mut m = local::test_manifest(12, Scheme::MetropolisHastings).unwrap();
    // Every site averages with all four others each round (the robust rules need inputs).
    m.averaging.fanout = Some(64);
    m.id = "byzantine-test".into();
    m.task.input_size = [32, 32];
    m.averaging.aggregation = aggregation;
    if aggregation == Aggregation::TrimmedMean {
        m.averaging.trim_fraction = Some(0.2);
    }
    m.averaging.clip_norm = clip_norm;
    m.averaging.round_timeout_secs = 60;
    m.validate().unwrap();
    m
}

/// Runs one experiment; returns the honest sites' final Dice.
fn run(aggregation: Aggregation, clip_norm: Option<f64>, attack: bool, port: u16) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let c = LocalConsortium::create(dir.path(), SITES, port).unwrap();
    c.prepare_data(12, 32, 6).unwrap();
    let mut nodes = Nodes(Vec::new());
    for i in 0..ATTACKER {
        nodes.0.push(c.spawn_node(Path::new(BIN), i, 1).unwrap());
    }
    // The last site runs in this process, so it can be given a tampering hook.
    let config_path = c.node_dir(ATTACKER).join("node.toml");
    let config = NodeConfig::load(&config_path, None).unwrap();
    let hooks = Hooks {
        tamper_update: attack.then(|| {
            Arc::new(|_round: u64, w: &mut [f32]| w.iter_mut().for_each(|v| *v *= -10.0))
                as service::UpdateTamper
        }),
        ..Hooks::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.spawn(async move {
        if let Err(e) = service::run_with(config, hooks).await {
            eprintln!("in-process node stopped: {e:#}");
        }
    });
    let metrics: Vec<String> = (0..SITES).map(|i| c.metrics_addr(i)).collect();
    local::wait_for_mesh(&rt, &metrics, &mut nodes, SITES).unwrap();

    let client = rt
        .block_on(Client::connect(
            &c.researcher,
            &c.network_key,
            c.roster.clone(),
            c.addr(0),
        ))
        .unwrap();
    let signed = SignedManifest::sign(manifest(aggregation, clip_norm), &c.researcher);
    rt.block_on(client.submit(signed)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    let records = loop {
        let records = rt.block_on(client.status(Some("byzantine-test"))).unwrap();
        if records.len() == SITES && records.iter().all(|p| p.record.finished) {
            break records;
        }
        assert!(Instant::now() < deadline, "did not finish: {records:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let honest: Vec<f64> = (0..ATTACKER)
        .map(|i| {
            let key = c.sites[i].public_key();
            let r = records.iter().find(|p| p.record.node == key).unwrap();
            f64::from(r.record.metric)
        })
        .collect();
    drop(nodes);
    rt.shutdown_background();
    honest
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn the_trimmed_mean_and_clipping_withstand_a_sign_flipping_member_and_the_mean_does_not() {
    let clean = run(Aggregation::Mean, None, false, 18700);
    let attacked_mean = run(Aggregation::Mean, None, true, 18800);
    let attacked_trimmed = run(Aggregation::TrimmedMean, None, true, 18900);
    let attacked_clipped = run(Aggregation::Mean, Some(1.0), true, 19400);
    let (c, m) = (mean(&clean), mean(&attacked_mean));
    let (t, k) = (mean(&attacked_trimmed), mean(&attacked_clipped));
    eprintln!(
        "honest mean Dice: clean {c:.3}, attacked+mean {m:.3}, attacked+trimmed-mean {t:.3}, \
         attacked+mean+clip-norm {k:.3}"
    );
    assert!(
        c > 0.3,
        "the clean run must learn something to compare against: {clean:?}"
    );
    for (name, robust) in [
        ("trimmed mean", &attacked_trimmed),
        ("clipping", &attacked_clipped),
    ] {
        let r = mean(robust);
        assert!(r >= c - 0.05, "{name} {robust:?} vs clean {clean:?}");
        assert!(r > m + 0.2, "{name} {robust:?} vs mean {attacked_mean:?}");
    }
}
