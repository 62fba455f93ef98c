//! Real `medmesh run` processes on loopback: discovery through the DHT, a whole experiment,
//! the closed network, manifest checks, and a node killed and restarted mid-experiment.

use std::path::Path;
use std::time::{Duration, Instant};

use medmesh_crypto::{Identity, NetworkKey};
use medmesh_node::client::Client;
use medmesh_node::local::{self, LocalConsortium, Nodes};
use medmesh_node::metrics::parse_value;
use medmesh_node::service::privacy::{Privatizer, Release};
use medmesh_protocol::manifest::Scheme;
use medmesh_protocol::{Manifest, SignedManifest};

const BIN: &str = env!("CARGO_BIN_EXE_medmesh");

/// A small, fast experiment: 32 px, few rounds, short timeouts.
fn manifest(rounds: u32) -> Manifest {
    let mut m = local::test_manifest(rounds, Scheme::MetropolisHastings).unwrap();
    m.id = "net-test".into();
    m.task.input_size = [32, 32];
    m.training.batch_size = 4;
    m.averaging.round_timeout_secs = 20;
    m.validate().unwrap();
    m
}

/// Ports are per test so tests can run at once.
fn start(dir: &Path, n: usize, port: u16) -> (LocalConsortium, Nodes, tokio::runtime::Runtime) {
    start_with(dir, n, port, |_| {})
}

/// [`start`], with `prepare` run on the consortium's files before the nodes start.
fn start_with(
    dir: &Path,
    n: usize,
    port: u16,
    prepare: impl FnOnce(&LocalConsortium),
) -> (LocalConsortium, Nodes, tokio::runtime::Runtime) {
    let c = LocalConsortium::create(dir, n, port).unwrap();
    c.prepare_data(8, 32, 4).unwrap();
    prepare(&c);
    let mut nodes = Nodes(Vec::new());
    for i in 0..n {
        nodes.0.push(c.spawn_node(Path::new(BIN), i, 1).unwrap());
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The metrics of dashboards without a token (`prepare` may have given one a token).
    let metrics: Vec<String> = (0..n)
        .filter(|&i| !c.node_dir(i).join("dashboard.token").exists())
        .map(|i| c.metrics_addr(i))
        .collect();
    local::wait_for_mesh(&rt, &metrics, &mut nodes, n).unwrap_or_else(|e| {
        panic!("{e}\n{}", logs(&c, n));
    });
    (c, nodes, rt)
}

fn logs(c: &LocalConsortium, n: usize) -> String {
    (0..n)
        .map(|i| {
            let text = std::fs::read_to_string(c.node_dir(i).join("node.log")).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            format!(
                "--- node {} ---\n{}\n",
                i + 1,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect()
}

fn researcher(c: &LocalConsortium, rt: &tokio::runtime::Runtime, node: usize) -> Client {
    rt.block_on(c.researcher_client(node)).unwrap()
}

/// Waits until `done` holds for the status records, or panics with the nodes' logs.
fn wait_until(
    c: &LocalConsortium,
    rt: &tokio::runtime::Runtime,
    client: &Client,
    n: usize,
    timeout: Duration,
    mut done: impl FnMut(&[medmesh_protocol::SignedProgress]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let records = rt.block_on(client.status(Some("net-test"))).unwrap();
        if done(&records) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out; status {records:?}\n{}",
            logs(c, n)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits up to 10 s for a node's metric to reach `at_least`.
fn wait_for_metric(rt: &tokio::runtime::Runtime, addr: &str, name: &str, at_least: f64) {
    wait_for_metric_within(rt, addr, name, at_least, Duration::from_secs(10));
}

/// Waits up to `timeout` for a node's metric to reach `at_least`.
fn wait_for_metric_within(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    name: &str,
    at_least: f64,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = rt.block_on(local::scrape(addr)).unwrap();
        let value = parse_value(&text, name).unwrap();
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} = {value}, expected >= {at_least}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn all_finished(n: usize) -> impl FnMut(&[medmesh_protocol::SignedProgress]) -> bool {
    move |r| r.len() == n && r.iter().all(|p| p.record.finished)
}

#[test]
fn three_nodes_find_each_other_train_and_agree() {
    let dir = tempfile::tempdir().unwrap();
    let n = 3;
    let (c, nodes, rt) = start(dir.path(), n, 17300);
    // The researcher's commands, as a researcher types them (from the consortium directory).
    let manifest_path = dir.path().join("experiment.toml");
    std::fs::write(&manifest_path, manifest(3).to_toml()).unwrap();
    let node = c.addr(1).to_string();
    let researcher_cli = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .current_dir(dir.path())
            .args(args)
            .args(["--key", "researcher.key", "--node", &node])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let submitted = researcher_cli(&["experiment", "submit", "--manifest", "experiment.toml"]);
    assert!(submitted.contains("accepted"), "{submitted}");
    let client = researcher(&c, &rt, 1);
    wait_until(
        &c,
        &rt,
        &client,
        n,
        Duration::from_secs(300),
        all_finished(n),
    );
    let status = researcher_cli(&["experiment", "status", "--experiment", "net-test"]);
    for site in ["site-1", "site-2", "site-3"] {
        assert!(status.contains(site), "{status}");
    }
    assert_eq!(status.matches("(finished)").count(), 3, "{status}");
    let exported = researcher_cli(&["export", "--experiment", "net-test", "--out", "exported"]);
    assert!(exported.contains("3 contributing sites"), "{exported}");
    assert!(dir.path().join("exported/model.safetensors").exists());
    assert!(dir.path().join("exported/provenance.json").exists());

    let mut models = Vec::new();
    for i in 0..n {
        let node = researcher(&c, &rt, i);
        let (model, provenance) = rt.block_on(node.export("net-test")).unwrap();
        assert_eq!(provenance.provenance.rounds_completed, 3);
        assert_eq!(
            provenance.provenance.contributors.len(),
            n,
            "every site contributed"
        );
        let path = dir.path().join(format!("model-{i}.safetensors"));
        std::fs::write(&path, model).unwrap();
        models.push(path);
    }
    let distance =
        local::consensus_distance(&models, medmesh_training::params::Selection::All).unwrap();
    assert!(
        distance <= 0.01,
        "consensus distance {distance}\n{}",
        logs(&c, n)
    );
    // Every node counted the bytes of the exchange.
    for i in 0..n {
        let text = rt.block_on(local::scrape(&c.metrics_addr(i))).unwrap();
        assert!(parse_value(&text, "medmesh_bytes_received_total").unwrap() > 1e5);
        assert_eq!(
            parse_value(&text, "medmesh_rounds_completed_total"),
            Some(3.0)
        );
    }
    drop(nodes);
}

#[test]
fn outsiders_and_bad_manifests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let n = 2;
    let (c, nodes, rt) = start(dir.path(), n, 17600);

    // Without the network key the handshake cannot complete.
    let wrong_key = NetworkKey::generate().unwrap();
    let outsider = rt.block_on(Client::connect(
        &c.researcher,
        &wrong_key,
        c.roster.clone(),
        c.addr(0),
    ));
    assert!(
        outsider.is_err(),
        "a peer without the network key connected"
    );
    // The node sees the failed handshake a moment after the outsider does.
    wait_for_metric(
        &rt,
        &c.metrics_addr(0),
        "medmesh_handshakes_failed_total",
        1.0,
    );

    // With the network key but not on the roster: disconnected, counted, no answers.
    let stranger = Identity::generate().unwrap();
    let answered = rt.block_on(async {
        let client =
            Client::connect(&stranger, &c.network_key, c.roster.clone(), c.addr(0)).await?;
        client.status(None).await
    });
    assert!(answered.is_err(), "a key not on the roster got an answer");
    wait_for_metric(
        &rt,
        &c.metrics_addr(0),
        "medmesh_connections_refused_total",
        1.0,
    );

    let client = researcher(&c, &rt, 0);
    // Signed by a node, not a researcher.
    let by_node = SignedManifest::sign(manifest(2), &c.sites[1]);
    let err = rt.block_on(client.submit(by_node)).unwrap_err().to_string();
    assert!(err.contains("rejected"), "{err}");
    // Tampered after signing.
    let mut tampered = SignedManifest::sign(manifest(2), &c.researcher);
    tampered.manifest.averaging.rounds = 50;
    let err = rt
        .block_on(client.submit(tampered))
        .unwrap_err()
        .to_string();
    assert!(err.contains("signature"), "{err}");
    // Nothing started anywhere.
    std::thread::sleep(Duration::from_secs(1));
    assert!(rt.block_on(client.status(None)).unwrap().is_empty());
    for i in 0..n {
        assert!(!c.node_dir(i).join("state/experiments").exists());
    }
    let metrics = rt.block_on(local::scrape(&c.metrics_addr(0))).unwrap();
    assert!(
        metrics.contains("medmesh_rejected_total{reason=\"bad_manifest\"} 2"),
        "{metrics}"
    );
    drop(nodes);
}

#[test]
fn a_killed_node_resumes_from_its_checkpoint_and_the_others_finish() {
    let dir = tempfile::tempdir().unwrap();
    let n = 3;
    let (c, mut nodes, rt) = start(dir.path(), n, 17900);
    let client = researcher(&c, &rt, 0);
    let rounds = 20;
    rt.block_on(client.submit(SignedManifest::sign(manifest(rounds), &c.researcher)))
        .unwrap();
    let victim = 2;
    let victim_key = c.sites[victim].public_key();
    wait_until(&c, &rt, &client, n, Duration::from_secs(300), |r| {
        r.iter()
            .any(|p| p.record.node == victim_key && p.record.round >= 2)
    });
    nodes.0[victim].kill().unwrap();
    nodes.0[victim].wait().unwrap();
    let at_kill = rt.block_on(client.status(Some("net-test"))).unwrap();
    let victim_round = at_kill
        .iter()
        .find(|p| p.record.node == victim_key)
        .map(|p| p.record.round)
        .unwrap();
    assert!(
        victim_round < u64::from(rounds) - 3,
        "killed too late, at round {victim_round}"
    );

    // The others go on without it and finish.
    let others: Vec<_> = (0..n)
        .filter(|&i| i != victim)
        .map(|i| c.sites[i].public_key())
        .collect();
    wait_until(&c, &rt, &client, n, Duration::from_secs(400), |r| {
        others
            .iter()
            .all(|k| r.iter().any(|p| p.record.node == *k && p.record.finished))
    });

    // Restarted, it resumes from its checkpoint and finishes too.
    nodes.0[victim] = c.spawn_node(Path::new(BIN), victim, 1).unwrap();
    wait_until(
        &c,
        &rt,
        &client,
        n,
        Duration::from_secs(300),
        all_finished(n),
    );
    let log = std::fs::read_to_string(c.node_dir(victim).join("node.log")).unwrap();
    assert!(log.contains("resumed from checkpoint"), "{log}");
    // The others had moved on: it adopted a peer's model rather than train alone.
    assert!(log.contains("adopted a peer's model"), "{log}");
    drop(nodes);
}

#[test]
fn a_revoked_member_is_disconnected_once_the_roster_spreads() {
    let dir = tempfile::tempdir().unwrap();
    let n = 3;
    let (c, nodes, rt) = start(dir.path(), n, 18600);
    let client = researcher(&c, &rt, 0);
    let revoked = c.sites[2].public_key();
    let mut next = c.roster.clone();
    next.version += 1;
    next.revoke(revoked, "laptop stolen");

    // Endorsed by someone who is not a steward: refused, nothing changes.
    let mut forged = medmesh_crypto::SignedRoster::unsigned(next.clone());
    forged.endorse(&c.sites[1]);
    let err = rt
        .block_on(client.announce_roster(forged))
        .unwrap_err()
        .to_string();
    assert!(err.contains("refused"), "{err}");

    let mut signed = medmesh_crypto::SignedRoster::unsigned(next);
    signed.endorse(&c.researcher);
    rt.block_on(client.announce_roster(signed)).unwrap();
    // Both honest nodes end up connected only to each other.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let connected: Vec<f64> = (0..2)
            .map(|i| {
                let text = rt.block_on(local::scrape(&c.metrics_addr(i))).unwrap();
                parse_value(&text, "medmesh_peers_connected").unwrap()
            })
            .collect();
        if connected == [1.0, 1.0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still connected: {connected:?}\n{}",
            logs(&c, n)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The adopted roster survives a restart.
    assert!(c.node_dir(1).join("state/roster.toml").exists());
    drop(nodes);
}

#[test]
fn with_a_third_of_the_nodes_killed_the_rest_finish() {
    let dir = tempfile::tempdir().unwrap();
    let n = 6;
    let (c, mut nodes, rt) = start(dir.path(), n, 18100);
    let client = researcher(&c, &rt, 0);
    let rounds = 10;
    // Both neighbours of a round (two random matchings) must be reachable before a site
    // trains it; a killed neighbour's refused dial ends the wait at once.
    let mut m = manifest(rounds);
    m.averaging.min_peers = 2;
    m.validate().unwrap();
    rt.block_on(client.submit(SignedManifest::sign(m, &c.researcher)))
        .unwrap();
    let victims = [4, 5];
    wait_until(&c, &rt, &client, n, Duration::from_secs(300), |r| {
        r.iter().filter(|p| p.record.round >= 2).count() >= n
    });
    // One clinic shuts its node down (SIGTERM): it stops its experiment between steps and
    // exits cleanly, promptly. The other crashes (SIGKILL).
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &nodes.0[victims[0]].id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let asked = Instant::now();
    let status = loop {
        if let Some(status) = nodes.0[victims[0]].try_wait().unwrap() {
            break status;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "a node still runs 20 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(c.node_dir(victims[0]).join("node.log")).unwrap();
    assert!(log.contains("experiment paused"), "{log}");
    assert!(log.contains("stopped; checkpoints are on disk"), "{log}");
    nodes.0[victims[1]].kill().unwrap();
    nodes.0[victims[1]].wait().unwrap();
    let survivors: Vec<_> = (0..n)
        .filter(|i| !victims.contains(i))
        .map(|i| c.sites[i].public_key())
        .collect();
    wait_until(&c, &rt, &client, n, Duration::from_secs(400), |r| {
        survivors.iter().all(|k| {
            r.iter()
                .any(|p| p.record.node == *k && p.record.finished && p.record.round == 10)
        })
    });
    // Rounds paired with a dead site were counted short of peers, and did not wait out the
    // round timeout (20 s) each.
    let short: f64 = (0..n)
        .filter(|i| !victims.contains(i))
        .map(|i| {
            let text = rt.block_on(local::scrape(&c.metrics_addr(i))).unwrap();
            parse_value(&text, "medmesh_rounds_short_of_peers_total").unwrap()
        })
        .sum();
    assert!(short >= 1.0, "no round was short of peers");
    let log = std::fs::read_to_string(c.node_dir(0).join("node.log")).unwrap();
    assert!(!log.contains("after the round timeout"), "{log}");
    let records = rt.block_on(client.status(Some("net-test"))).unwrap();
    for v in victims {
        let key = c.sites[v].public_key();
        let r = records.iter().find(|p| p.record.node == key).unwrap();
        assert!(!r.record.finished && r.record.round < 10, "{r:?}");
    }
    drop(nodes);
}

/// A tmpfs mounted over a directory (tests run as root, as CI does), unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: u64) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let options = format!("size={size}");
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &options,
                "tmpfs",
                path.to_str().unwrap(),
            ],
        );
        Self(path.to_owned())
    }

    /// Bytes in use.
    fn used(&self) -> u64 {
        let out = sh("df", &["-B1", "--output=used", self.0.to_str().unwrap()]);
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    fn resize(&self, size: u64) {
        let options = format!("remount,size={size}");
        sh("mount", &["-o", &options, self.0.to_str().unwrap()]);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn sh(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The round of the checkpoint at `path`, loaded and checksum-checked as a node resumes it.
fn checkpoint_round(path: &Path, m: &Manifest) -> Result<u64, String> {
    let device = "flex"
        .parse::<medmesh_training::DeviceSpec>()
        .unwrap()
        .device()
        .unwrap();
    medmesh_training::checkpoint::load(
        path,
        medmesh_training::model::UNetConfig::from_manifest(m),
        medmesh_training::TrainSettings::from_manifest(m),
        device,
    )
    .map(|t| t.round())
    .map_err(|e| e.to_string())
}

#[test]
fn a_full_disk_keeps_the_previous_checkpoint_and_the_node_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (n, port, rounds) = (2, 19600, 10);
    let c = LocalConsortium::create(dir.path(), n, port).unwrap();
    c.prepare_data(8, 32, 4).unwrap();
    // Node 1's state lives on a small disk of its own.
    let disk = Tmpfs::mount(&c.node_dir(0).join("state"), 64 << 20);
    let mut nodes = Nodes(Vec::new());
    for i in 0..n {
        nodes.0.push(c.spawn_node(Path::new(BIN), i, 1).unwrap());
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics: Vec<String> = (0..n).map(|i| c.metrics_addr(i)).collect();
    local::wait_for_mesh(&rt, &metrics, &mut nodes, n).unwrap();
    let client = researcher(&c, &rt, 1);
    let m = manifest(rounds);
    rt.block_on(client.submit(SignedManifest::sign(m.clone(), &c.researcher)))
        .unwrap();

    // After its first checkpoint, the disk fills up: half a checkpoint is left free, and an
    // atomic write needs a whole one beside the old.
    let ckpt = c
        .node_dir(0)
        .join("state/experiments/net-test/checkpoint.bin");
    let deadline = Instant::now() + Duration::from_secs(300);
    while checkpoint_round(&ckpt, &m).is_err() {
        assert!(Instant::now() < deadline, "no checkpoint\n{}", logs(&c, n));
        std::thread::sleep(Duration::from_millis(20));
    }
    let size = std::fs::metadata(&ckpt).unwrap().len();
    disk.resize(disk.used() + size / 2);
    let kept = checkpoint_round(&ckpt, &m).unwrap();
    assert!(
        kept < u64::from(rounds) - 3,
        "disk filled too late, at {kept}"
    );

    // Rounds go on; each failed write is counted, and the kept checkpoint stays whole.
    wait_for_metric_within(
        &rt,
        &c.metrics_addr(0),
        "medmesh_checkpoint_failures_total",
        2.0,
        Duration::from_secs(120),
    );
    assert_eq!(checkpoint_round(&ckpt, &m), Ok(kept));
    let log = std::fs::read_to_string(c.node_dir(0).join("node.log")).unwrap();
    assert!(
        log.contains("could not write the checkpoint") && log.contains("No space left on device"),
        "{log}"
    );
    // The other node kept averaging with the full-disk node meanwhile.
    let key0 = c.sites[0].public_key();
    let records = rt.block_on(client.status(Some("net-test"))).unwrap();
    let at = records.iter().find(|p| p.record.node == key0).unwrap();
    assert!(at.record.round >= kept + 2, "{records:?}");

    // Killed while the disk is full, restarted once space is freed: it resumes from the
    // kept checkpoint and finishes with the other.
    nodes.0[0].kill().unwrap();
    nodes.0[0].wait().unwrap();
    assert_eq!(checkpoint_round(&ckpt, &m), Ok(kept));
    disk.resize(64 << 20);
    nodes.0[0] = c.spawn_node(Path::new(BIN), 0, 1).unwrap();
    wait_until(
        &c,
        &rt,
        &client,
        n,
        Duration::from_secs(400),
        all_finished(n),
    );
    let log = std::fs::read_to_string(c.node_dir(0).join("node.log")).unwrap();
    assert!(log.contains("resumed from checkpoint"), "{log}");
    assert_eq!(checkpoint_round(&ckpt, &m), Ok(u64::from(rounds)));
    drop(nodes);
}

/// RMS of the change between the updates node 1 sent in the last two rounds of `m`, as a
/// member fetches them off the wire.
fn last_sent_change(c: &LocalConsortium, rt: &tokio::runtime::Runtime, m: &Manifest) -> f64 {
    let client = researcher(c, rt, 0);
    rt.block_on(client.submit(SignedManifest::sign(m.clone(), &c.researcher)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let records = rt.block_on(client.status(Some(&m.id))).unwrap();
        if records.len() == 2 && records.iter().all(|p| p.record.finished) {
            break;
        }
        assert!(Instant::now() < deadline, "{records:?}\n{}", logs(c, 2));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Site 2's key: a node member may fetch updates.
    let fetch = |round: u64| {
        rt.block_on(c.fetch_offered_update(m, 0, 1, round))
            .unwrap()
            .1
    };
    let rounds = u64::from(m.averaging.rounds);
    let (a, b) = (fetch(rounds - 1), fetch(rounds));
    let sum: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum();
    (sum / a.len() as f64).sqrt()
}

#[test]
fn privacy_noise_is_on_what_leaves_a_site() {
    let dir = tempfile::tempdir().unwrap();
    let (c, nodes, rt) = start(dir.path(), 2, 20500);
    let mut plain = manifest(4);
    plain.id = "plain".into();
    let mut private = manifest(4);
    private.id = "private".into();
    let sigma = 0.2;
    private.privacy.clip_norm = Some(1.0);
    private.privacy.noise_multiplier = Some(sigma);
    // A budget of exactly the four rounds' releases.
    let four = medmesh_protocol::accounting::epsilon(sigma, 4, 1e-5).0;
    private.privacy.target_epsilon = Some(four * 1.000_001);
    private.validate().unwrap();

    let without = last_sent_change(&c, &rt, &plain);
    let with = last_sent_change(&c, &rt, &private);
    eprintln!(
        "RMS change between the last two sent updates: {without:.5} plain, {with:.5} with noise sigma {sigma}"
    );
    // Each release is the previous one plus the site's clipped change (at most clip_norm 1
    // in L2: tiny per weight) plus one fresh draw of noise: the change between two releases
    // is that noise, where training alone moves weights far less.
    assert!(without < sigma / 5.0, "{without}");
    assert!((0.9 * sigma..1.2 * sigma).contains(&with), "{with}");
    let log = std::fs::read_to_string(c.node_dir(0).join("node.log")).unwrap();
    assert!(log.contains("updates leave this site clipped and with Gaussian noise"));

    // What the releases spent is in every site's status and in the provenance.
    let client = researcher(&c, &rt, 0);
    let records = rt.block_on(client.status(Some("private"))).unwrap();
    assert_eq!(records.len(), 2);
    for p in &records {
        let spent = p.record.privacy_epsilon.expect("epsilon in the status");
        assert!((spent - four).abs() < 1e-9, "{spent} vs {four}");
    }
    let plain_records = rt.block_on(client.status(Some("plain"))).unwrap();
    assert!(
        plain_records
            .iter()
            .all(|p| p.record.privacy_epsilon.is_none())
    );
    let provenance: medmesh_protocol::SignedProvenance = serde_json::from_slice(
        &std::fs::read(experiment_dir(&c, 0, "private").join("export/provenance.json")).unwrap(),
    )
    .unwrap();
    let dp = provenance
        .provenance
        .privacy
        .expect("privacy in the provenance");
    assert_eq!(dp.releases, 4);
    assert!(
        (dp.epsilon - four).abs() < 1e-9 && dp.delta == 1e-5,
        "{dp:?}"
    );

    // A site whose ledger already counts two releases of an experiment (its checkpoint was
    // lost, say) has half the budget left: it releases twice more, then serves its last
    // release again and publishes nothing new.
    let mut spent = private.clone();
    spent.id = "spent".into();
    let flex = "flex".parse::<medmesh_training::DeviceSpec>().unwrap();
    let initial = medmesh_training::Trainer::new(&spent, flex.device().unwrap())
        .weights(medmesh_training::params::Selection::for_manifest(false));
    let mut earlier = Privatizer::for_manifest(
        &spent,
        initial.clone(),
        &experiment_dir(&c, 0, "spent").join("privacy-ledger.bin"),
    )
    .unwrap()
    .unwrap();
    for _ in 0..2 {
        assert!(matches!(earlier.release(&initial), Ok(Release::Fresh(..))));
    }
    drop(earlier);
    last_sent_change(&c, &rt, &spent);
    let fetch = |round: u64| {
        rt.block_on(c.fetch_offered_update(&spent, 0, 1, round))
            .unwrap()
            .1
    };
    assert_eq!(fetch(3), fetch(4), "nothing new after the budget");
    let log = std::fs::read_to_string(c.node_dir(0).join("node.log")).unwrap();
    assert!(
        log.contains("privacy budget spent: this site publishes nothing new"),
        "{log}"
    );
    let records = rt.block_on(client.status(Some("spent"))).unwrap();
    for p in &records {
        let spent = p.record.privacy_epsilon.unwrap();
        assert!(spent <= four * 1.000_001, "{spent}");
    }
    drop(nodes);
}

fn experiment_dir(c: &LocalConsortium, node: usize, id: &str) -> std::path::PathBuf {
    let dir = c.node_dir(node).join("state/experiments").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Sends `request` as is to a dashboard and reads until the server closes (at most 10 s).
fn raw_http(addr: &str, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// GET `path` from a dashboard, with a bearer token if given; the status line and the body.
fn get(addr: &str, path: &str, token: Option<&str>) -> (String, String) {
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let text = raw_http(
        addr,
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}connection: close\r\n\r\n")
            .as_bytes(),
    );
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// Debian's Chromium, which `.ci/run` installs.
fn chromium() -> &'static str {
    for path in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(path).exists() {
            return path;
        }
    }
    panic!(
        "the dashboard test needs a headless Chromium: `apt-get install chromium` (.ci/run installs it)"
    );
}

/// Runs headless Chromium on `url` with `args`, after the page's scripts have had
/// `budget_ms` of (virtual) time.
fn run_chromium(url: &str, budget_ms: u32, args: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            &format!("--user-data-dir={}", profile.path().display()),
            &format!("--virtual-time-budget={budget_ms}"),
        ])
        .args(args)
        .arg(url)
        .output()
        .unwrap()
}

#[test]
fn the_dashboard_shows_every_site_in_a_browser_and_bad_http_leaves_training_alone() {
    let browser = chromium();
    let dir = tempfile::tempdir().unwrap();
    let n = 3;
    let token = "a-test-token-of-forty-characters-long-00";
    let (c, mut nodes, rt) = start_with(dir.path(), n, 21500, |c| {
        // Site 3's first image is corrupt: its experiment fails at start, and says so.
        let images = c.site_data(2).join("imagesTr");
        let mut files: Vec<_> = std::fs::read_dir(&images)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        std::fs::write(&files[0], b"not a NIfTI file").unwrap();
        // Node 1's dashboard asks for a token.
        std::fs::write(c.node_dir(0).join("dashboard.token"), format!("{token}\n")).unwrap();
        let config = c.node_dir(0).join("node.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        let text = text.replace(
            "[dashboard]\n",
            "[dashboard]\ntoken_file = \"dashboard.token\"\n",
        );
        std::fs::write(&config, text).unwrap();
    });
    let dash = c.metrics_addr(0);
    let client = researcher(&c, &rt, 0);
    let rounds = 6;
    rt.block_on(client.submit(SignedManifest::sign(manifest(rounds), &c.researcher)))
        .unwrap();

    // Bad HTTP while the experiment trains.
    let (status, _) = get(&dash, "/api/v1/node", None);
    assert!(status.contains("401"), "no token: {status}");
    let (status, _) = get(
        &dash,
        "/api/v1/node",
        Some("a-wrong-token-of-forty-characters-long-0"),
    );
    assert!(status.contains("401"), "wrong token: {status}");
    let (status, body) = get(&dash, "/api/v1/node", Some(token));
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("\"site\":\"site-1\""), "{body}");
    let (status, _) = get(&dash, "/", None);
    assert!(
        status.contains("200"),
        "the page itself holds no data: {status}"
    );
    let post = raw_http(
        &dash,
        b"POST /api/v1/node HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    );
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    assert!(
        post.contains("content-security-policy: default-src 'none'"),
        "{post}"
    );
    assert!(post.contains("x-frame-options: DENY"), "{post}");
    let garbage = raw_http(
        &dash,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xff\xfe\r\n\r\n",
    );
    assert!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
        "{garbage}"
    );
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: localhost\r\nx-filler: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = raw_http(&dash, huge.as_bytes());
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer:.200}"
    );
    // Without a token, only loopback host names are answered (DNS rebinding).
    let rebound = raw_http(
        &c.metrics_addr(1),
        b"GET /api/v1/node HTTP/1.1\r\nhost: attacker.example\r\nconnection: close\r\n\r\n",
    );
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    // Slow clients: more than the dashboard serves at once, each sending half a request.
    let slow: Vec<std::net::TcpStream> = (0..80)
        .map(|_| {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(&dash).unwrap();
            let _ = s.write_all(b"GET /api/v1/node HTTP/1.1\r\nhost: loc");
            s
        })
        .collect();
    let started = Instant::now();
    for mut s in slow {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = Vec::new();
        // Closed by the server: a clean end, or a reset for those over the connection limit.
        let kept = s.read_to_end(&mut buf).is_err_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        });
        assert!(!kept, "a slow client was kept past the header timeout");
    }
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    let (status, _) = get(&dash, "/metrics", Some(token));
    assert!(status.contains("200"), "after the slow clients: {status}");

    // The healthy sites finish; the broken one reports why it failed.
    let failed = |r: &medmesh_protocol::SignedProgress| r.record.failure.is_some();
    wait_until(&c, &rt, &client, n, Duration::from_secs(300), |r| {
        r.len() == n && r.iter().all(|p| p.record.finished || failed(p))
    });
    local::check_alive(&mut nodes).unwrap();
    let (_, body) = get(&dash, "/api/v1/experiments/net-test", Some(token));
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sites = e["sites"].as_array().unwrap();
    assert_eq!(sites.len(), n, "{e}");
    let site3 = sites.iter().find(|s| s["site"] == "site-3").unwrap();
    assert_eq!(site3["status"], "failed", "{e}");
    let reason = site3["failure"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("[datasets.synthetic]/./imagesTr/"),
        "{reason}"
    );
    assert!(
        !reason.contains(&dir.path().display().to_string()),
        "{reason}"
    );
    for site in ["site-1", "site-2"] {
        let curve = e["history"][site].as_array().unwrap();
        assert_eq!(curve.len(), rounds as usize + 1, "{site}: {curve:?}");
    }
    assert!(
        e["provenance"]["model_hash"].as_str().unwrap().len() == 64,
        "{e}"
    );
    let metrics = get(&dash, "/metrics", Some(token)).1;
    assert!(
        metrics.contains(&format!(
            "medmesh_rounds_completed_total{{experiment=\"net-test\"}} {rounds}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("medmesh_round_duration_seconds_count{experiment=\"net-test\"}"));

    // The page, rendered by a real browser after its scripts ran.
    let url = format!("http://{dash}/#token={token}");
    let out = run_chromium(&url, 10_000, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dom.contains("data-experiment=\"net-test\""),
        "{browser} rendered no experiment:\n{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for site in ["site-1", "site-2", "site-3"] {
        assert!(
            dom.contains(&format!("<tr data-site=\"{site}\"")),
            "{site} missing:\n{dom}"
        );
    }
    for site in ["site-1", "site-2"] {
        assert!(
            dom.contains(&format!("data-site=\"{site}\" data-rounds=\"{rounds}\"")),
            "no {rounds}-round curve for {site}:\n{dom}"
        );
    }
    assert!(
        dom.contains("data-site=\"site-3\" data-status=\"failed\""),
        "{dom}"
    );
    let shown_reason = reason
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    assert!(
        dom.contains(&shown_reason),
        "the failure reason is not shown:\n{dom}"
    );
    // A screenshot, kept as the test's artifact.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = run_chromium(
        &url,
        10_000,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1400,1500",
            "--hide-scrollbars",
        ],
    );
    assert!(
        shot.metadata().is_ok_and(|m| m.len() > 10_000),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    drop(nodes);
}
