//! `medmesh demo`: a throwaway consortium on this machine. It creates the network key, one
//! identity per site plus a researcher, a roster, and synthetic sites that differ by scanner;
//! starts N real `medmesh run` processes on 127.0.0.1 (only the first is anyone's bootnode,
//! the rest find each other through the DHT); submits an experiment as the researcher; shows
//! progress; trains each site alone with the same budget for comparison; and writes
//! `report.json`.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use libp2p::Multiaddr;
use medmesh_crypto::{Identity, Member, NetworkKey, Role, Roster, SignedRoster};
use medmesh_protocol::manifest::Scheme;
use medmesh_protocol::{Manifest, SignedManifest, SignedProgress};
use medmesh_training::params::{self, Selection};
use medmesh_training::{DeviceSpec, Trainer, export};
use serde::Serialize;

use super::data;
use crate::cli::TaskArg;
use crate::client::Client;
use crate::keystore;
use crate::metrics::parse_value;

/// Options of `medmesh demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Number of nodes (sites), 2 to 16.
    #[arg(long, default_value_t = 4)]
    pub nodes: u32,
    /// Training rounds (the final averaging-only rounds come on top).
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Averaging scheme: pairwise-gossip, push-sum, metropolis-hastings or epidemic.
    #[arg(long, default_value = "pairwise-gossip")]
    pub scheme: Scheme,
    /// Working directory (keys, data, node states, report.json).
    #[arg(long, default_value = "medmesh-demo")]
    pub out: PathBuf,
    /// First TCP port; node i listens on port + i.
    #[arg(long, default_value_t = 47100)]
    pub port: u16,
}

/// Written into the working directory so a rerun may clear it.
const MARKER: &str = ".medmesh-demo";
const EXPERIMENT: &str = "demo-synthetic-lesions";

/// One site's line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    /// libp2p peer id.
    pub peer_id: String,
    /// Site name on the roster.
    pub site: String,
    /// Validation Dice of the initial model.
    pub dice_initial: f64,
    /// Validation Dice after the federated run.
    pub dice_final: f64,
    /// Validation Dice after training alone for the same rounds.
    pub dice_local_only: f64,
    /// Rounds the node completed.
    pub rounds_completed: u32,
    /// Protocol bytes sent.
    pub bytes_sent: u64,
    /// Protocol bytes received.
    pub bytes_received: u64,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Per site.
    pub nodes: Vec<NodeReport>,
    /// max_i ||w_i - mean w|| / ||mean w|| over the exported models.
    pub consensus_distance: f64,
    /// The experiment's manifest digest (hex).
    pub manifest_hash: String,
    /// Seconds from start to report.
    pub wall_seconds: f64,
}

/// Kills the node processes when the demo ends, however it ends.
pub struct Nodes(pub Vec<Child>);

/// A consortium on this machine: keys, roster, per-site data and node configurations under
/// one directory. The demo and the multi-process tests build theirs with it.
pub struct LocalConsortium {
    /// Its directory.
    pub dir: PathBuf,
    /// The pre-shared network key.
    pub network_key: NetworkKey,
    /// The researcher (also the roster's steward).
    pub researcher: Identity,
    /// One identity per site.
    pub sites: Vec<Identity>,
    /// The roster.
    pub roster: Roster,
    /// Node i listens on `port + i` and serves metrics on `port + 100 + i`.
    pub port: u16,
}

impl LocalConsortium {
    /// Creates keys, roster and node configurations for `n` sites under `dir`.
    pub fn create(dir: &Path, n: usize, port: u16) -> Result<Self> {
        let network_key = NetworkKey::generate()?;
        keystore::save_network_key(&dir.join("swarm.key"), &network_key, true)?;
        let researcher = Identity::generate()?;
        keystore::save_identity(&dir.join("researcher.key"), &researcher, true)?;
        let sites: Vec<Identity> = (0..n)
            .map(|_| Identity::generate())
            .collect::<Result<_, _>>()?;
        let mut roster = Roster::genesis("demo", vec![researcher.public_key()], 1);
        roster.upsert_member(Member {
            public_key: researcher.public_key(),
            role: Role::Researcher,
            site: "research-lab".into(),
        });
        for (i, s) in sites.iter().enumerate() {
            roster.upsert_member(Member {
                public_key: s.public_key(),
                role: Role::Node,
                site: format!("site-{}", i + 1),
            });
        }
        let mut signed = SignedRoster::unsigned(roster.clone());
        signed.endorse(&researcher);
        keystore::save_roster(&dir.join("roster.toml"), &signed)?;
        let this = Self {
            dir: dir.to_owned(),
            network_key,
            researcher,
            sites,
            roster,
            port,
        };
        for i in 0..n {
            this.write_config(i)?;
        }
        Ok(this)
    }

    /// Writes `data/site-i`: synthetic sites that differ by scanner.
    pub fn prepare_data(&self, cases: usize, size: usize, slices: usize) -> Result<()> {
        data::prepare(&data::Prepare {
            task: TaskArg::Synthetic,
            sites: self.sites.len(),
            out: &self.dir.join("data"),
            preset: "feature-shift",
            seed: 1,
            cases,
            size,
            slices,
        })
    }

    /// Node i's directory.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("nodes/site-{}", i + 1))
    }

    /// Node i's listen address, with its peer id.
    pub fn addr(&self, i: usize) -> Multiaddr {
        format!(
            "/ip4/127.0.0.1/tcp/{}/p2p/{}",
            self.port + i as u16,
            self.sites[i].peer_id()
        )
        .parse()
        .unwrap_or_else(|e| unreachable!("a well-formed address: {e}"))
    }

    /// Node i's metrics endpoint.
    pub fn metrics_addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.port + 100 + i as u16)
    }

    /// The researcher's client, connected to node i.
    pub async fn researcher_client(&self, i: usize) -> Result<Client> {
        Client::connect(
            &self.researcher,
            &self.network_key,
            self.roster.clone(),
            self.addr(i),
        )
        .await
    }

    fn write_config(&self, i: usize) -> Result<()> {
        let dir = self.node_dir(i);
        std::fs::create_dir_all(&dir)?;
        keystore::save_identity(&dir.join("node.key"), &self.sites[i], true)?;
        // Only the first node is anyone's bootnode: the others are found through the DHT.
        let bootnodes = if i == 0 {
            String::new()
        } else {
            format!("\"{}\"", self.addr(0))
        };
        let config = format!(
            "[node]\nidentity = \"node.key\"\nnetwork_key = \"../../swarm.key\"\nroster = \"../../roster.toml\"\nstate_dir = \"state\"\ndevice = \"flex\"\n\n\
             [network]\nlisten = [\"/ip4/127.0.0.1/tcp/{}\"]\nbootnodes = [{bootnodes}]\n\n\
             [metrics]\nlisten = \"{}\"\n\n[datasets.synthetic]\npath = \"../../data/site-{}\"\n",
            self.port + i as u16,
            self.metrics_addr(i),
            i + 1
        );
        std::fs::write(dir.join("node.toml"), config)?;
        Ok(())
    }

    /// Starts `exe run` (the `medmesh` binary) for node i, logging to its `node.log`.
    pub fn spawn_node(&self, exe: &Path, i: usize, threads: usize) -> Result<Child> {
        let dir = self.node_dir(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("node.log"))?;
        std::process::Command::new(exe)
            .arg("run")
            .arg("--config")
            .arg(dir.join("node.toml"))
            .env("RAYON_NUM_THREADS", threads.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The demo's manifest: the quickstart experiment, averaged over every live peer.
pub fn demo_manifest(rounds: u32, scheme: Scheme) -> Result<Manifest> {
    let mut m = Manifest::parse(include_str!("../../../examples/synthetic-quickstart.toml"))?;
    m.id = EXPERIMENT.into();
    m.averaging.scheme = scheme;
    // Two peers a round where the scheme takes a fanout (epidemic needs one).
    m.averaging.fanout = scheme.takes_fanout().then_some(2);
    m.averaging.rounds = rounds;
    m.averaging.round_timeout_secs = 120;
    m.stop.target_metric = None;
    m.validate()?;
    Ok(m)
}

/// Runs the demo.
pub fn run(o: &DemoOptions) -> Result<()> {
    let started = Instant::now();
    anyhow::ensure!((2..=16).contains(&o.nodes), "--nodes must be 2 to 16");
    anyhow::ensure!((1..=200).contains(&o.rounds), "--rounds must be 1 to 200");
    prepare_dir(&o.out)?;
    let n = o.nodes as usize;

    println!(
        "1/5 creating a consortium of {n} sites and a researcher in {}",
        o.out.display()
    );
    let consortium = LocalConsortium::create(&o.out, n, o.port)?;

    println!("2/5 generating synthetic data: one scanner per site");
    consortium.prepare_data(16, 64, 12)?;

    println!("3/5 starting {n} nodes on 127.0.0.1");
    let threads = (std::thread::available_parallelism().map_or(2, |p| p.get()) / n).max(1);
    let exe = std::env::current_exe().context("locating the medmesh binary")?;
    let mut children = Nodes(Vec::new());
    for i in 0..n {
        children.0.push(consortium.spawn_node(&exe, i, threads)?);
    }
    let metrics_addrs: Vec<String> = (0..n).map(|i| consortium.metrics_addr(i)).collect();
    let (researcher, network_key, roster, sites) = (
        &consortium.researcher,
        &consortium.network_key,
        &consortium.roster,
        &consortium.sites,
    );

    let rt = super::network::runtime()?;
    wait_for_mesh(&rt, &metrics_addrs, &mut children, n)?;
    println!("    every node found the other {} through the DHT", n - 1);

    let manifest = demo_manifest(o.rounds, o.scheme)?;
    let digest = hex::encode(manifest.digest());
    let signed = SignedManifest::sign(manifest.clone(), researcher);
    let first = consortium.addr(0);
    println!(
        "4/5 submitting experiment {EXPERIMENT} as the researcher; training ({} rounds)",
        o.rounds
    );
    let client = rt.block_on(Client::connect(
        researcher,
        network_key,
        roster.clone(),
        first,
    ))?;
    rt.block_on(client.submit(signed))?;

    // The baseline trains beside the federation, on the same slices, from the same start.
    let baseline_manifest = manifest.clone();
    let data_dir = o.out.join("data");
    let baseline = std::thread::spawn(move || local_only(&baseline_manifest, &data_dir, n));

    let deadline = Instant::now()
        + Duration::from_secs(
            u64::from(o.rounds) * u64::from(manifest.averaging.round_timeout_secs) + 300,
        );
    let mut shown = String::new();
    let records = loop {
        std::thread::sleep(Duration::from_secs(3));
        check_alive(&mut children)?;
        let records = rt.block_on(client.status(Some(EXPERIMENT)))?;
        let line: Vec<String> = records
            .iter()
            .map(|p| {
                format!(
                    "{} r{} {:.3}",
                    client.site(&p.record.node),
                    p.record.round,
                    p.record.metric
                )
            })
            .collect();
        let line = line.join(" | ");
        if line != shown {
            println!("    {line}");
            shown = line;
        }
        if records.len() == n && records.iter().all(|p| p.record.finished) {
            break records;
        }
        if Instant::now() > deadline {
            bail!(
                "the experiment did not finish in time; logs are in {}/nodes/*/node.log",
                o.out.display()
            );
        }
    };

    println!("5/5 fetching the models and comparing with local-only training");
    let baselines = baseline
        .join()
        .map_err(|_| anyhow::anyhow!("the local-only baseline panicked"))??;
    let mut reports = Vec::new();
    let mut models = Vec::new();
    for (i, s) in sites.iter().enumerate() {
        let addr = consortium.addr(i);
        let c = rt.block_on(Client::connect(
            researcher,
            network_key,
            roster.clone(),
            addr,
        ))?;
        let (model, provenance) = rt.block_on(c.export(EXPERIMENT))?;
        let path = o.out.join(format!("models/site-{}.safetensors", i + 1));
        keystore::write_atomic(&path, &model, 0o644)?;
        models.push(path);
        let metrics = rt.block_on(scrape(&metrics_addrs[i]))?;
        let record: &SignedProgress = records
            .iter()
            .find(|p| p.record.node == s.public_key())
            .context("a site reported no progress")?;
        reports.push(NodeReport {
            peer_id: s.peer_id().to_string(),
            site: format!("site-{}", i + 1),
            dice_initial: baselines[i].0,
            dice_final: f64::from(record.record.metric),
            dice_local_only: baselines[i].1,
            rounds_completed: provenance.provenance.rounds_completed as u32,
            bytes_sent: parse_value(&metrics, "medmesh_bytes_sent_total").unwrap_or(0.0) as u64,
            bytes_received: parse_value(&metrics, "medmesh_bytes_received_total").unwrap_or(0.0)
                as u64,
        });
    }
    drop(children);
    let report = Report {
        consensus_distance: consensus_distance(&models)?,
        nodes: reports,
        manifest_hash: digest,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    let path = o.out.join("report.json");
    keystore::write_atomic(&path, &serde_json::to_vec_pretty(&report)?, 0o644)?;
    print!("{}", table(&report));
    println!("report: {}", path.display());
    Ok(())
}

fn prepare_dir(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = std::fs::read_dir(out)?.next().is_none();
        if !empty && !out.join(MARKER).exists() {
            bail!(
                "{} exists and is not a previous demo directory; choose another --out",
                out.display()
            );
        }
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join(MARKER),
        "created by medmesh demo; removed by the next run\n",
    )?;
    Ok(())
}

/// Fails if any node process has exited.
pub fn check_alive(children: &mut Nodes) -> Result<()> {
    for (i, c) in children.0.iter_mut().enumerate() {
        if let Some(status) = c.try_wait()? {
            bail!("node {} exited ({status}); see its node.log", i + 1);
        }
    }
    Ok(())
}

/// Waits until every node has found the other `n - 1` through the DHT (its routing table,
/// per its metrics). Nodes connect only to the peers their rounds need, so the routing
/// table, not the connection count, says a consortium has formed.
pub fn wait_for_mesh(
    rt: &tokio::runtime::Runtime,
    metrics: &[String],
    children: &mut Nodes,
    n: usize,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        check_alive(children)?;
        let mut known = Vec::new();
        for addr in metrics {
            let text = rt.block_on(scrape(addr)).unwrap_or_default();
            known.push(parse_value(&text, "medmesh_routing_table_peers").unwrap_or(0.0) as usize);
        }
        if known.iter().all(|&c| c + 1 >= n) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nodes did not find each other within 60 s (peers in each routing table: {known:?})"
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// GET /metrics.
pub async fn scrape(addr: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    Ok(body)
}

/// Per site: (initial Dice, Dice after training alone for the manifest's rounds).
fn local_only(m: &Manifest, data: &Path, n: usize) -> Result<Vec<(f64, f64)>> {
    let device = "flex".parse::<DeviceSpec>()?.device()?;
    let one = |i: usize| -> Result<(f64, f64)> {
        let site = crate::site_data::load(&data.join(format!("site-{}", i + 1)), m)?;
        let mut t = Trainer::new(m, device.clone());
        let initial = t.evaluate(&site.validation).mean_dice;
        for _ in 0..m.averaging.rounds {
            t.train_round(&site.train, |_| {});
        }
        Ok((initial, t.evaluate(&site.validation).mean_dice))
    };
    // Two workers (sites are independent and seeded alike, so the split changes nothing):
    // once the federation is done, the baseline's tail would otherwise leave a core idle.
    let workers = 2.min(n.max(1));
    let mut scores: Vec<Option<Result<(f64, f64)>>> = (0..n).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let one = &one;
                scope.spawn(move || {
                    (w..n)
                        .step_by(workers)
                        .map(|i| (i, one(i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (i, r) in h.join().unwrap_or_default() {
                scores[i] = Some(r);
            }
        }
    });
    scores
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            s.unwrap_or_else(|| Err(anyhow::anyhow!("the baseline of site-{} panicked", i + 1)))
        })
        .collect()
}

/// max_i ||w_i - mean w|| / ||mean w|| over the models' flat weights.
pub fn consensus_distance(models: &[PathBuf]) -> Result<f64> {
    let device = "flex".parse::<DeviceSpec>()?.device()?;
    let mut weights = Vec::new();
    for p in models {
        let (model, _) = export::load(p, &device)?;
        weights.push(params::flatten(&model, Selection::All));
    }
    let len = weights.first().map_or(0, Vec::len);
    anyhow::ensure!(
        weights.iter().all(|w| w.len() == len),
        "models differ in size"
    );
    let mut mean = vec![0f64; len];
    for w in &weights {
        for (m, v) in mean.iter_mut().zip(w) {
            *m += f64::from(*v) / weights.len() as f64;
        }
    }
    let norm = mean
        .iter()
        .map(|v| v * v)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    Ok(weights
        .iter()
        .map(|w| {
            w.iter()
                .zip(&mean)
                .map(|(a, b)| (f64::from(*a) - b).powi(2))
                .sum::<f64>()
                .sqrt()
                / norm
        })
        .fold(0.0, f64::max))
}

fn table(r: &Report) -> String {
    let mut out = format!(
        "\n{:<8} {:>12} {:>11} {:>11} {:>7} {:>12} {:>12}\n",
        "site", "Dice before", "federated", "local-only", "rounds", "sent", "received"
    );
    for n in &r.nodes {
        out.push_str(&format!(
            "{:<8} {:>12.3} {:>11.3} {:>11.3} {:>7} {:>9.1} MB {:>9.1} MB\n",
            n.site,
            n.dice_initial,
            n.dice_final,
            n.dice_local_only,
            n.rounds_completed,
            n.bytes_sent as f64 / 1e6,
            n.bytes_received as f64 / 1e6
        ));
    }
    out.push_str(&format!(
        "consensus distance {:.2e}, {:.0} s\n",
        r.consensus_distance, r.wall_seconds
    ));
    out
}
