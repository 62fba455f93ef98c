//! Every averaging scheme in real `medmesh run` processes on loopback: each node pulls from
//! the round engine's few neighbours (not from every member), and the experiment ends with
//! every site holding the same model (consensus distance at most 0.01). Also the traffic
//! table of the README: bytes and connections per node as the consortium grows.

use std::path::Path;
use std::time::{Duration, Instant};

use medmesh_node::client::Client;
use medmesh_node::local::{self, LocalConsortium, Nodes};
use medmesh_node::metrics::parse_value;
use medmesh_protocol::manifest::Scheme;
use medmesh_protocol::round::RoundRules;
use medmesh_protocol::{Manifest, SignedManifest};

const BIN: &str = env!("CARGO_BIN_EXE_medmesh");

const ROUNDS: u32 = 3;

fn manifest(scheme: Scheme, fanout: Option<u32>, rounds: u32) -> Manifest {
    let mut m = local::test_manifest(rounds, scheme).unwrap();
    m.id = format!("gossip-{}", scheme.as_str());
    m.task.input_size = [32, 32];
    m.training.batch_size = 4;
    m.averaging.round_timeout_secs = 30;
    if fanout.is_some() {
        m.averaging.fanout = fanout;
    }
    m.validate().unwrap();
    m
}

fn logs(c: &LocalConsortium, n: usize) -> String {
    (0..n)
        .map(|i| {
            let text = std::fs::read_to_string(c.node_dir(i).join("node.log")).unwrap_or_default();
            // The round's story, not the connection chatter.
            let keep = ["round", "update", "partner", "exchange", "WARN", "ERROR"];
            let tail: Vec<&str> = text
                .lines()
                .rev()
                .filter(|l| keep.iter().any(|k| l.contains(k)))
                .take(40)
                .collect();
            format!(
                "--- node {} ---\n{}\n",
                i + 1,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect()
}

/// The researcher's client, connected to site `i`.
fn researcher(c: &LocalConsortium, rt: &tokio::runtime::Runtime, i: usize) -> Client {
    rt.block_on(c.researcher_client(i)).unwrap()
}

/// What one experiment on a fresh consortium gave.
struct Outcome {
    /// Consensus distance of the exported models.
    distance: f64,
    /// Exported model size, bytes.
    model_bytes: f64,
    /// Rounds, the final reduce's included.
    rounds: f64,
    /// Per node: bytes sent and received over the experiment.
    bytes: Vec<(f64, f64)>,
    /// Per node: connections while rounds ran, mean and most (see [`Ran`]).
    connections: Vec<(f64, f64)>,
    /// Per node: training rounds its exported model's provenance records.
    trained: Vec<u64>,
    /// Per node: its last progress record.
    last: Vec<medmesh_protocol::ProgressRecord>,
}

/// A consortium of `sites` node processes in `dir`, their data written by `prepare`, `m`
/// submitted and run to the end; the nodes are still running when it returns.
struct Ran {
    c: LocalConsortium,
    nodes: Nodes,
    rt: tokio::runtime::Runtime,
    metrics: Vec<String>,
    /// Per node: node members it was connected to from the end of round 1 to the end of
    /// the experiment, averaged over samples every 250 ms, and the most at once.
    connections: Vec<(f64, f64)>,
}

/// `sites` node processes in `dir`, their data written by `prepare`, meshed, and `m`
/// submitted through the researcher's client at site `sites / 2` (returned).
fn start_experiment(
    dir: &Path,
    m: &Manifest,
    sites: usize,
    port: u16,
    prepare: impl FnOnce(&LocalConsortium),
) -> (
    LocalConsortium,
    Nodes,
    tokio::runtime::Runtime,
    Vec<String>,
    Client,
) {
    let c = LocalConsortium::create(dir, sites, port).unwrap();
    prepare(&c);
    let mut nodes = Nodes(Vec::new());
    for i in 0..sites {
        nodes.0.push(c.spawn_node(Path::new(BIN), i, 1).unwrap());
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics: Vec<String> = (0..sites).map(|i| c.metrics_addr(i)).collect();
    local::wait_for_mesh(&rt, &metrics, &mut nodes, sites)
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&c, sites)));
    let client = researcher(&c, &rt, sites / 2);
    rt.block_on(client.submit(SignedManifest::sign(m.clone(), &c.researcher)))
        .unwrap();
    (c, nodes, rt, metrics, client)
}

fn run_experiment(
    dir: &Path,
    m: &Manifest,
    sites: usize,
    port: u16,
    prepare: impl FnOnce(&LocalConsortium),
) -> Ran {
    let (c, nodes, rt, metrics, client) = start_experiment(dir, m, sites, port, prepare);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut samples = vec![Vec::new(); sites];
    loop {
        let records = rt.block_on(client.status(Some(&m.id))).unwrap();
        // Connections while rounds run: from the moment every site has finished round 1
        // (before, Kademlia's bootstrap has connected a small consortium fully).
        if records.len() == sites && records.iter().all(|p| p.record.round >= 1) {
            for (i, addr) in metrics.iter().enumerate() {
                let text = rt.block_on(local::scrape(addr)).unwrap_or_default();
                samples[i].push(parse_value(&text, "medmesh_peers_connected").unwrap_or(0.0));
            }
        }
        if records.len() == sites && records.iter().all(|p| p.record.finished) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: timed out; status {records:?}\n{}",
            m.id,
            logs(&c, sites)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(client);
    let connections = samples
        .iter()
        .map(|v| {
            let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
            (mean, v.iter().copied().fold(0.0, f64::max))
        })
        .collect();
    Ran {
        c,
        nodes,
        rt,
        metrics,
        connections,
    }
}

fn run_consortium(m: &Manifest, sites: usize, port: u16) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let Ran {
        c,
        nodes,
        rt,
        metrics,
        connections,
    } = run_experiment(dir.path(), m, sites, port, |c| {
        c.prepare_data(8, 32, 4).unwrap();
    });
    let mut models = Vec::new();
    let mut trained = Vec::new();
    for i in 0..sites {
        let node = researcher(&c, &rt, i);
        let (model, provenance) = rt.block_on(node.export(&m.id)).unwrap();
        trained.push(provenance.provenance.rounds_completed);
        let path = dir.path().join(format!("model-{i}.safetensors"));
        std::fs::write(&path, model).unwrap();
        models.push(path);
    }
    let bytes = metrics
        .iter()
        .map(|addr| {
            let text = rt.block_on(local::scrape(addr)).unwrap();
            (
                parse_value(&text, "medmesh_bytes_sent_total").unwrap(),
                parse_value(&text, "medmesh_bytes_received_total").unwrap(),
            )
        })
        .collect();
    // Asked of the node `run_experiment` watched: it has every site's final record.
    let watched = researcher(&c, &rt, sites / 2);
    let mut last: Vec<_> = rt
        .block_on(watched.status(Some(&m.id)))
        .unwrap()
        .into_iter()
        .map(|p| p.record)
        .collect();
    last.sort_by_key(|r| r.node.to_bytes());
    let outcome = Outcome {
        distance: local::consensus_distance(&models, medmesh_training::params::Selection::All)
            .unwrap(),
        model_bytes: std::fs::metadata(&models[0]).unwrap().len() as f64,
        rounds: RoundRules::from_manifest(m).total_rounds(sites) as f64,
        bytes,
        connections,
        trained,
        last,
    };
    if outcome.distance > 0.01 {
        panic!(
            "{}: consensus distance {}\n{}",
            m.id,
            outcome.distance,
            logs(&c, sites)
        );
    }
    drop(nodes);
    outcome
}

/// The node keys sorted: the round engine's member indices.
fn sorted_keys(c: &LocalConsortium) -> Vec<medmesh_crypto::PublicKey> {
    let mut keys: Vec<_> = c.sites.iter().map(|s| s.public_key()).collect();
    keys.sort_by_key(|k| k.to_bytes());
    keys
}

/// Five sites (not a power of two: the final reduce folds and unfolds), `scheme` end to end.
fn ends_in_agreement(scheme: Scheme, port: u16) {
    let sites = 5;
    let m = manifest(scheme, None, ROUNDS);
    let out = run_consortium(&m, sites, port);
    assert!(out.distance <= 0.01, "{scheme:?}: {}", out.distance);
    assert_eq!(out.trained, vec![u64::from(ROUNDS); sites]);
    for r in &out.last {
        assert!(r.finished && r.stop_after.is_none(), "{r:?}");
        assert!(r.contribution_weight > 0.0, "{r:?}");
    }
    // Traffic follows the round graph: a site downloads about `fanout` models a training
    // round and one a reduce step, never one from every member each round.
    let fanout = RoundRules::from_manifest(&m).fanout as f64;
    for (i, (_, received)) in out.bytes.iter().enumerate() {
        let per_round = received / out.rounds / out.model_bytes;
        assert!(
            per_round > 0.3 && per_round < fanout + 1.0,
            "{scheme:?}: site {} received {per_round:.2} models a round",
            i + 1
        );
    }
}

#[test]
fn pairwise_gossip_ends_in_agreement() {
    ends_in_agreement(Scheme::PairwiseGossip, 19700);
}

#[test]
fn push_sum_ends_in_agreement() {
    ends_in_agreement(Scheme::PushSum, 19720);
}

#[test]
fn metropolis_hastings_ends_in_agreement() {
    ends_in_agreement(Scheme::MetropolisHastings, 19740);
}

#[test]
fn epidemic_ends_in_agreement() {
    ends_in_agreement(Scheme::Epidemic, 19760);
}

/// Random groups of three among six sites: every member pulls its two group mates a
/// training round, whatever the consortium's size, and all end on the same model.
#[test]
fn group_average_ends_in_agreement() {
    let sites = 6;
    let mut m = manifest(Scheme::GroupAverage, None, ROUNDS);
    m.averaging.group_size = Some(3);
    m.averaging.min_peers = 2;
    m.validate().unwrap();
    let out = run_consortium(&m, sites, 20800);
    assert!(out.distance <= 0.01, "{}", out.distance);
    assert_eq!(out.trained, vec![u64::from(ROUNDS); sites]);
    for (i, (_, received)) in out.bytes.iter().enumerate() {
        let per_round = received / out.rounds / out.model_bytes;
        assert!(
            per_round > 0.3 && per_round < 2.5,
            "site {} received {per_round:.2} models a round",
            i + 1
        );
    }
    for r in &out.last {
        assert!(r.finished, "{r:?}");
    }
}

/// Secure aggregation in real nodes: four sites, one group of four. What a site serves is
/// masked (its residues uniform, not its weights); the group's mean is exact, so members end
/// on the same bits; and when a site dies mid-run the other three redo without it and
/// finish.
#[test]
fn secure_aggregation_hides_uploads_and_survives_a_drop_out() {
    let sites = 4;
    let rounds = 8;
    let mut m = manifest(Scheme::GroupAverage, None, rounds);
    m.id = "gossip-secure".into();
    m.averaging.group_size = Some(4);
    m.averaging.secure_aggregation = true;
    m.averaging.round_timeout_secs = 15;
    m.validate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (c, mut nodes, rt, _, client) = start_experiment(dir.path(), &m, sites, 20820, |c| {
        c.prepare_data(8, 32, 4).unwrap();
    });
    let status = || rt.block_on(client.status(Some(&m.id))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    // Two rounds with all four, then site 4 goes down.
    while !(status().len() == sites && status().iter().all(|p| p.record.round >= 2)) {
        assert!(
            Instant::now() < deadline,
            "{:?}\n{}",
            status(),
            logs(&c, sites)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let averaged_by_all = status().iter().all(|p| p.record.peers_averaged == 3);
    nodes.0[3].kill().unwrap();
    nodes.0[3].wait().unwrap();
    let gone = c.sites[3].public_key();
    loop {
        let records = status();
        let alive: Vec<_> = records.iter().filter(|p| p.record.node != gone).collect();
        if alive.len() == 3 && alive.iter().all(|p| p.record.finished) {
            for p in alive {
                assert_eq!(p.record.round, u64::from(rounds), "{p:?}");
                assert_eq!(
                    p.record.peers_averaged, 2,
                    "the last round (which the finished record reports) averaged the two other survivors"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{records:?}\n{}",
            logs(&c, sites)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        averaged_by_all,
        "all four averaged with three peers before the drop-out"
    );
    let log = std::fs::read_to_string(c.node_dir(0).join("node.log")).unwrap();
    assert!(
        log.contains("secure aggregation: redoing the round without group members"),
        "{}",
        logs(&c, sites)
    );
    // The three took the same group means: the same model, to the bit.
    let mut models = Vec::new();
    for i in 0..3 {
        let (model, _) = rt.block_on(researcher(&c, &rt, i).export(&m.id)).unwrap();
        let path = dir.path().join(format!("model-{i}.safetensors"));
        std::fs::write(&path, model).unwrap();
        models.push(path);
    }
    let distance =
        local::consensus_distance(&models, medmesh_training::params::Selection::All).unwrap();
    assert_eq!(distance, 0.0);
    // What site 1 served in the last round, fetched with site 2's key: masked residues,
    // uniform over 2^64, nothing like weights.
    let (envelope, values) = rt
        .block_on(c.fetch_offered_update(&m, 0, 1, u64::from(rounds)))
        .unwrap();
    assert_eq!(
        envelope.header.encoding,
        medmesh_protocol::WeightEncoding::Masked
    );
    let big = values.iter().filter(|v| v.abs() > 1e6).count() as f64 / values.len() as f64;
    assert!(big > 0.99, "{big} of the values look like masks");
    drop(nodes);
}

/// A stop rule met at a site ends training at every site after the same round, without a
/// coordinator: here `stop.target_metric` on IoU, low enough that sites meet it within the
/// first rounds and announce the end two rounds later, out of 12.
#[test]
fn a_stop_rule_ends_training_at_every_site_after_the_same_round() {
    let sites = 4;
    let mut m = manifest(Scheme::PairwiseGossip, None, 12);
    m.id = "gossip-stop".into();
    m.evaluation.metric = medmesh_protocol::manifest::Metric::Iou;
    m.stop.target_metric = Some(0.01);
    m.validate().unwrap();
    let out = run_consortium(&m, sites, 19780);
    // The earliest announced end, which every site kept to.
    let end = out
        .last
        .iter()
        .filter_map(|r| r.stop_after)
        .min()
        .unwrap_or_else(|| panic!("no site announced a stop: {:?}", out.last));
    assert!(
        (1 + medmesh_protocol::stop::STOP_MARGIN..12).contains(&end),
        "{end}"
    );
    assert_eq!(out.trained, vec![end; sites], "{:?}", out.last);
    assert!(out.distance <= 0.01, "{}", out.distance);
    for r in &out.last {
        assert!(r.finished && r.round == end, "{r:?}");
        assert!(r.metric > 0.0 && r.metric <= 1.0, "{r:?}");
    }
}

/// The README's traffic table: per scheme and consortium size (6 training rounds, then the
/// final reduce), what a node sends and receives per round (in models and MB, over every
/// round) and how many members it is connected to while rounds run.
/// Minutes of work on 2 cores, so it runs on demand:
/// `cargo test --release -p medmesh-node --test gossip -- --ignored --nocapture`.
#[test]
#[ignore = "the README's traffic table; minutes: run with --ignored --nocapture"]
fn traffic_table() {
    let mut port = 19800;
    println!(
        "| scheme | sites | sent / node / round | received / node / round | connections / node after round 1: mean (most at once) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let variants = [
        (Scheme::PairwiseGossip, None, "pairwise-gossip"),
        (Scheme::PushSum, None, "push-sum"),
        (
            Scheme::MetropolisHastings,
            None,
            "metropolis-hastings (fanout 2)",
        ),
        (Scheme::Epidemic, None, "epidemic (fanout 2)"),
        (
            Scheme::MetropolisHastings,
            Some(64),
            "all-to-all (metropolis-hastings, fanout >= sites)",
        ),
    ];
    for (scheme, fanout, label) in variants {
        let mut received_by_size = Vec::new();
        for sites in [4usize, 8, 16] {
            let out = run_consortium(&manifest(scheme, fanout, 6), sites, port);
            assert_eq!(out.trained, vec![6; sites]);
            port += 20;
            let n = sites as f64;
            let sent: f64 = out.bytes.iter().map(|b| b.0).sum::<f64>() / n / out.rounds;
            let received: f64 = out.bytes.iter().map(|b| b.1).sum::<f64>() / n / out.rounds;
            let connections = out.connections.iter().map(|c| c.0).sum::<f64>() / n;
            let max_connections = out.connections.iter().map(|c| c.1).fold(0.0, f64::max);
            println!(
                "| {label} | {sites} | {:.2} models ({:.2} MB) | {:.2} models ({:.2} MB) | {connections:.1} ({max_connections}) |",
                sent / out.model_bytes,
                sent / 1e6,
                received / out.model_bytes,
                received / 1e6,
            );
            received_by_size.push(received);
        }
        println!(
            "|   | 16 vs 4 | | x{:.2} | |",
            received_by_size[2] / received_by_size[0]
        );
    }
}

/// The simulator predicts the product: the same manifest, data and seed, once through real
/// nodes and once through `medmesh simulate`'s learning mode, give every site the same
/// validation Dice in every round, bit for bit (both run the same round engine and trainer;
/// each node process and the simulator compute on one thread, so float sums add up in the
/// same order), and the same final agreement.
#[test]
fn the_simulator_predicts_what_the_nodes_do() {
    use medmesh_protocol::manifest::Aggregation;
    use medmesh_training::data::generate_site_cases;
    use medmesh_training::data::msd::write_dataset;
    use medmesh_training::data::synthetic::Preset;

    let sites = 4;
    let dir = tempfile::tempdir().unwrap();
    let scenario_path = dir.path().join("agree.toml");
    std::fs::write(
        &scenario_path,
        r#"
name = "agree"
seed = 1
mode = "learning"
nodes = 4
rounds = 3
schemes = ["pairwise-gossip"]
[topology]
kind = "complete"
[learning]
task = "synthetic"
presets = ["feature-shift"]
cases = 8
size = 32
slices = 4
base_channels = 8
depth = 3
local_steps = 3
batch_size = 4
learning_rate = 0.003
"#,
    )
    .unwrap();
    let scenario = medmesh_sim::Scenario::from_file(&scenario_path).unwrap();
    let m =
        medmesh_sim::engine::variant_manifest(&scenario, Scheme::PairwiseGossip, Aggregation::Mean)
            .unwrap();

    // The simulator, as a researcher runs it.
    let sim_out = dir.path().join("sim");
    let run = std::process::Command::new(BIN)
        .env("RAYON_NUM_THREADS", "1")
        .args(["simulate", "--no-plots", "--scenario"])
        .arg(&scenario_path)
        .arg("--out")
        .arg(&sim_out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let csv = std::fs::read_to_string(sim_out.join("pairwise-gossip_feature-shift.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let sim_rows: Vec<Vec<f64>> = csv
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .map(|v| v.parse().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();

    // The nodes: node i holds the cases the simulator generates for its member index (its
    // place among the sorted node keys).
    let l = &scenario.learning;
    let write_data = |c: &LocalConsortium| {
        let keys = sorted_keys(c);
        for (i, site) in c.sites.iter().enumerate() {
            let member = keys.iter().position(|k| *k == site.public_key()).unwrap();
            let cases = generate_site_cases(
                None,
                "feature-shift".parse::<Preset>().unwrap(),
                member,
                l.cases,
                l.size,
                l.slices,
                scenario.seed,
            );
            let data = dir.path().join(format!("data/site-{}", i + 1));
            write_dataset(
                &data,
                "agree",
                "agreement test",
                &["background", "lesion"],
                &cases,
            )
            .unwrap();
        }
    };
    let Ran { c, nodes, .. } = run_experiment(dir.path(), &m, sites, 19900, write_data);
    drop(nodes);
    let keys = sorted_keys(&c);

    // Each node's per-round Dice, from its log ("round done ... round=R ... val_dice=D").
    let field = |line: &str, name: &str| -> Option<String> {
        let start = line.find(&format!(" {name}="))? + name.len() + 2;
        Some(line[start..].split(' ').next()?.to_string())
    };
    let total = RoundRules::from_manifest(&m).total_rounds(sites) as usize;
    assert_eq!(sim_rows.len(), total, "{csv}");
    for (i, site) in c.sites.iter().enumerate() {
        let member = keys.iter().position(|k| *k == site.public_key()).unwrap();
        let column = header
            .iter()
            .position(|h| *h == format!("dice_site_{member}"))
            .unwrap();
        let log = std::fs::read_to_string(c.node_dir(i).join("node.log")).unwrap();
        let node_dice: Vec<(usize, f32)> = log
            .lines()
            .filter(|l| l.contains("round done") && l.contains(&m.id))
            .map(|l| {
                (
                    field(l, "round").unwrap().parse().unwrap(),
                    field(l, "val_dice").unwrap().parse().unwrap(),
                )
            })
            .collect();
        assert_eq!(node_dice.len(), total, "site {}: {log}", i + 1);
        for (round, dice) in node_dice {
            let predicted = sim_rows[round - 1][column] as f32;
            assert_eq!(
                dice,
                predicted,
                "site {} (member {member}), round {round}: node {dice}, simulator {predicted}\n{csv}",
                i + 1
            );
        }
    }
    // Both end in exact agreement.
    let consensus = header.iter().position(|h| *h == "consensus_error").unwrap();
    assert_eq!(sim_rows[total - 1][consensus], 0.0, "{csv}");
}
