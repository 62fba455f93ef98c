//! A network partition that heals: six nodes train together, split into two groups of three
//! that train apart (each group averages only within itself), then the split heals and the
//! six reach consensus again. The nodes run in this process so a drill hook can cut them
//! off from each other; the cut is real (connections closed and refused), and so is the
//! reconnection.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use medmesh_node::client::Client;
use medmesh_node::config::NodeConfig;
use medmesh_node::local::{self, LocalConsortium, Nodes};
use medmesh_node::metrics::parse_value;
use medmesh_node::net::peer_id_of;
use medmesh_node::service::{self, Hooks};
use medmesh_protocol::manifest::Scheme;
use medmesh_protocol::{Manifest, SignedManifest, SignedProgress};
use tokio::sync::watch;

const SITES: usize = 6;
const ROUNDS: u64 = 14;
/// Split when every node has done this round...
const SPLIT_AT: u64 = 2;
/// ...and heal when every node has done this one.
const HEAL_AT: u64 = 6;

fn manifest() -> Manifest {
    let mut m = local::test_manifest(ROUNDS as u32, Scheme::MetropolisHastings).unwrap();
    // Every site pulls from every other it can reach: the split and the heal show in the
    // number of peers averaged.
    m.averaging.fanout = Some(64);
    m.id = "partition-test".into();
    m.task.input_size = [32, 32];
    m.averaging.round_timeout_secs = 20;
    m.validate().unwrap();
    m
}

/// The latest records per site, as the nodes behind `clients` know them.
fn records(rt: &tokio::runtime::Runtime, clients: &[&Client]) -> Vec<SignedProgress> {
    let mut out: Vec<SignedProgress> = Vec::new();
    for client in clients {
        for r in rt.block_on(client.status(Some("partition-test"))).unwrap() {
            match out.iter_mut().find(|o| o.record.node == r.record.node) {
                Some(o) if o.record.round < r.record.round => *o = r,
                Some(_) => {}
                None => out.push(r),
            }
        }
    }
    out
}

fn wait_rounds(rt: &tokio::runtime::Runtime, clients: &[&Client], at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let r = records(rt, clients);
        if r.len() == SITES && r.iter().all(|p| p.record.round >= at_least) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not all at round {at_least}: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn gauges(rt: &tokio::runtime::Runtime, c: &LocalConsortium, name: &str) -> Vec<f64> {
    (0..SITES)
        .map(|i| {
            let text = rt.block_on(local::scrape(&c.metrics_addr(i))).unwrap();
            parse_value(&text, name).unwrap_or(-1.0)
        })
        .collect()
}

fn wait_connected(rt: &tokio::runtime::Runtime, c: &LocalConsortium, peers: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let connected = gauges(rt, c, "medmesh_peers_connected");
        if connected.iter().all(|&p| p == peers) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {peers} peers each: {connected:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_partition_that_heals_reaches_consensus() {
    let dir = tempfile::tempdir().unwrap();
    let c = LocalConsortium::create(dir.path(), SITES, 20200).unwrap();
    c.prepare_data(8, 32, 4).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cuts = Vec::new();
    for i in 0..SITES {
        let config = NodeConfig::load(&c.node_dir(i).join("node.toml"), None).unwrap();
        let (cut, cut_off) = watch::channel(Vec::new());
        cuts.push(cut);
        let hooks = Hooks {
            cut_off: Some(cut_off),
            ..Hooks::default()
        };
        rt.spawn(async move {
            if let Err(e) = service::run_with(config, hooks).await {
                eprintln!("node {i} stopped: {e:#}");
            }
        });
    }
    let metrics: Vec<String> = (0..SITES).map(|i| c.metrics_addr(i)).collect();
    local::wait_for_mesh(&rt, &metrics, &mut Nodes(Vec::new()), SITES).unwrap();
    let connect = |i: usize| rt.block_on(c.researcher_client(i)).unwrap();
    // One researcher client in each future group.
    let (left, right) = (connect(0), connect(SITES - 1));
    let both = [&left, &right];
    rt.block_on(left.submit(SignedManifest::sign(manifest(), &c.researcher)))
        .unwrap();

    // Split {1,2,3} from {4,5,6}.
    wait_rounds(&rt, &both, SPLIT_AT);
    let peer = |i: usize| peer_id_of(&c.sites[i].public_key());
    let half = SITES / 2;
    for (i, cut) in cuts.iter().enumerate() {
        let other: Vec<PeerId> = if i < half {
            (half..SITES).map(peer).collect()
        } else {
            (0..half).map(peer).collect()
        };
        cut.send(other).unwrap();
    }
    wait_connected(&rt, &c, (half - 1) as f64);
    // Each group trains on: every node averages with its own group only.
    wait_rounds(&rt, &both, HEAL_AT);
    let split = records(&rt, &both);
    assert!(
        split
            .iter()
            .all(|p| p.record.peers_averaged == (half - 1) as u32),
        "averaged across the split: {split:?}"
    );

    // Heal: everyone reconnects and the six average together again.
    for cut in &cuts {
        cut.send(Vec::new()).unwrap();
    }
    wait_connected(&rt, &c, (SITES - 1) as f64);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let r = records(&rt, &both);
        if r.len() == SITES && r.iter().all(|p| p.record.finished) {
            break;
        }
        assert!(Instant::now() < deadline, "did not finish: {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        gauges(&rt, &c, "medmesh_peers_averaged"),
        vec![(SITES - 1) as f64; SITES],
        "the last round averaged all six"
    );
    // A node admits two connections per peer, and these clients hold some.
    drop((left, right));
    let mut models = Vec::new();
    for i in 0..SITES {
        let (model, provenance) = rt.block_on(connect(i).export("partition-test")).unwrap();
        assert_eq!(provenance.provenance.rounds_completed, ROUNDS);
        let path = dir.path().join(format!("model-{i}.safetensors"));
        std::fs::write(&path, model).unwrap();
        models.push(path);
    }
    let distance =
        local::consensus_distance(&models, medmesh_training::params::Selection::All).unwrap();
    eprintln!("consensus distance after the heal: {distance}");
    assert!(distance <= 0.01, "consensus distance {distance}");
    rt.shutdown_background();
}
